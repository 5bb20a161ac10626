//! The hot loops of the preprocessing, compiled twice on x86-64: for the
//! baseline and with AVX2 (picked at run time, once per row). The vertical
//! pass and the normalization are plain loops the compiler vectorizes; the
//! RGB horizontal pass uses SSE4.1 intrinsics (a 3-channel pixel does not
//! vectorize on its own). Every kernel computes exactly what the scalar code
//! computes: the same integer sums as Pillow (integer addition is
//! associative, so the order of the terms does not matter), the same f32
//! normalization.

use super::resample::{clip8, horizontal_row, Coeffs, HALF};
use std::mem::MaybeUninit;
use std::ops::Range;
use tessera_job::image::{SIGLIP_MEAN, SIGLIP_STD};

/// `pub(super) fn $name`: runs `$avx2` where the CPU has AVX2, else
/// `$portable`.
macro_rules! dispatch {
    ($name:ident, $avx2:ident, $portable:path, ($($arg:ident: $ty:ty),*)) => {
        pub(super) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above),
                // the only requirement of this `target_feature` function.
                return unsafe { $avx2($($arg),*) };
            }
            $portable($($arg),*)
        }
    };
}

/// One output plane's rows, written by the normalization.
type Plane<'a> = &'a mut [MaybeUninit<f32>];

dispatch!(
    horizontal_rgb,
    horizontal_rgb_avx2,
    horizontal_row::<3>,
    (src: &[u8], co: &Coeffs, cols: Range<usize>, out: &mut [u8])
);
dispatch!(vertical_row, vertical_row_avx2, vertical_row_kernel, (rows: &[u8], k: &[i32], out: &mut [u8]));
dispatch!(normalize_rows, normalize_rows_avx2, normalize_rows_kernel, (hwc: &[u8], r: Plane, g: Plane, b: Plane));

/// [`horizontal_row`] for 3 channels (`src` starts at the row and may
/// go on past it), with the fixed-width windows (a kernel per window
/// width up to 8, taps unrolled).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn horizontal_rgb_avx2(src: &[u8], co: &Coeffs, cols: Range<usize>, out: &mut [u8]) {
    match co.width {
        1 => horizontal_rgb_w::<1>(src, co, cols, out),
        2 => horizontal_rgb_w::<2>(src, co, cols, out),
        3 => horizontal_rgb_w::<3>(src, co, cols, out),
        4 => horizontal_rgb_w::<4>(src, co, cols, out),
        5 => horizontal_rgb_w::<5>(src, co, cols, out),
        6 => horizontal_rgb_w::<6>(src, co, cols, out),
        7 => horizontal_rgb_w::<7>(src, co, cols, out),
        8 => horizontal_rgb_w::<8>(src, co, cols, out),
        _ => horizontal_rgb_w::<0>(src, co, cols, out),
    }
}

/// One output pixel per step: per tap, the pixel's 3 bytes and the byte
/// after them widened to 4 i32 lanes (the 4th lane is ignored), times
/// the tap's coefficient. `W` is the window width (0: `co.width`, not
/// unrolled). A pixel whose window ends at the end of `src` (no byte
/// after it) takes the scalar path. The result goes out as 4 bytes, the
/// 4th overwritten by the next pixel, except for the last pixel of `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn horizontal_rgb_w<const W: usize>(src: &[u8], co: &Coeffs, cols: Range<usize>, out: &mut [u8]) {
    use std::arch::x86_64::*;
    let width = if W == 0 { co.width } else { W };
    debug_assert_eq!(width, co.width);
    debug_assert_eq!(out.len(), cols.len() * 3);
    for (i, xx) in cols.enumerate() {
        let base = co.start[xx] * 3;
        let o = 3 * i;
        if base + width * 3 >= src.len() {
            horizontal_row::<3>(src, co, xx..xx + 1, &mut out[o..o + 3]);
            continue;
        }
        let s = &src[base..base + width * 3 + 1];
        let k = &co.window[xx * width..(xx + 1) * width];
        let mut ss = _mm_set1_epi32(HALF);
        for j in 0..width {
            let p = i32::from_le_bytes(s[3 * j..3 * j + 4].try_into().expect("4 bytes"));
            let v = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(p));
            ss = _mm_add_epi32(ss, _mm_mullo_epi32(v, _mm_set1_epi32(k[j])));
        }
        // clip8 on each lane: the shift, then i32 -> i16 -> u8 with
        // saturation, which clamps to 0..=255.
        let v = _mm_srai_epi32::<{ super::resample::PRECISION_BITS as i32 }>(ss);
        let v = _mm_packs_epi32(v, v);
        let v = _mm_packus_epi16(v, v);
        let b = _mm_cvtsi128_si32(v).to_le_bytes();
        if o + 4 <= out.len() {
            out[o..o + 4].copy_from_slice(&b);
        } else {
            out[o..o + 3].copy_from_slice(&b[..3]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn vertical_row_avx2(rows: &[u8], k: &[i32], out: &mut [u8]) {
    vertical_row_kernel(rows, k, out)
}

/// Vertical pass of one output row: `rows` holds the `k.len()` input
/// rows it sums, each `out.len()` bytes. Blocks of `B` columns keep their
/// sums in registers across the taps.
#[inline(always)]
fn vertical_row_kernel(rows: &[u8], k: &[i32], out: &mut [u8]) {
    const B: usize = 32;
    let stride = out.len();
    debug_assert_eq!(rows.len(), k.len() * stride);
    let mut x = 0;
    let mut blocks = out.chunks_exact_mut(B);
    for o in &mut blocks {
        let mut ss = [HALF; B];
        for (j, &kv) in k.iter().enumerate() {
            let r: &[u8; B] = rows[j * stride + x..j * stride + x + B].try_into().expect("a block of B bytes");
            for l in 0..B {
                ss[l] += r[l] as i32 * kv;
            }
        }
        for l in 0..B {
            o[l] = clip8(ss[l]);
        }
        x += B;
    }
    let rest = blocks.into_remainder();
    let mut ss = [HALF; B];
    for (j, &kv) in k.iter().enumerate() {
        for (s, &v) in ss.iter_mut().zip(&rows[j * stride + x..(j + 1) * stride]) {
            *s += v as i32 * kv;
        }
    }
    for (o, &s) in rest.iter_mut().zip(&ss) {
        *o = clip8(s);
    }
}

/// transformers' rescale + normalize of one value: `f32(v * (1/255))`
/// (the product in f64), then `(x - mean) / std` in f32.
#[inline(always)]
pub(super) fn normalize_value(v: u8) -> f32 {
    ((v as f64 * (1.0 / 255.0)) as f32 - SIGLIP_MEAN) / SIGLIP_STD
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn normalize_rows_avx2(hwc: &[u8], r: Plane, g: Plane, b: Plane) {
    normalize_rows_kernel(hwc, r, g, b)
}

/// HWC uint8 -> three planes of [`normalize_value`]s; writes every
/// element of `r`, `g` and `b` (each `hwc.len() / 3` long).
#[inline(always)]
fn normalize_rows_kernel(hwc: &[u8], r: Plane, g: Plane, b: Plane) {
    const B: usize = 16;
    assert!(hwc.len() == 3 * r.len() && r.len() == g.len() && g.len() == b.len());
    let blocks =
        hwc.chunks_exact(3 * B).zip(r.chunks_exact_mut(B)).zip(g.chunks_exact_mut(B)).zip(b.chunks_exact_mut(B));
    for (((p, r), g), b) in blocks {
        for i in 0..B {
            r[i].write(normalize_value(p[3 * i]));
            g[i].write(normalize_value(p[3 * i + 1]));
            b[i].write(normalize_value(p[3 * i + 2]));
        }
    }
    let done = r.len() / B * B;
    for (((p, r), g), b) in hwc[3 * done..].chunks_exact(3).zip(&mut r[done..]).zip(&mut g[done..]).zip(&mut b[done..])
    {
        r.write(normalize_value(p[0]));
        g.write(normalize_value(p[1]));
        b.write(normalize_value(p[2]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable kernels (what a CPU without AVX2 runs) give what the
    /// dispatched ones give.
    #[test]
    fn portable_kernels_match() {
        let bytes: Vec<u8> = (0..5 * 77).map(|i| (i * 97 % 256) as u8).collect();
        let k = [-3_000_000, 1_500_000, 4_000_000, 2_000_000, -400_000];
        let (mut a, mut b) = (vec![0u8; 77], vec![0u8; 77]);
        vertical_row(&bytes, &k, &mut a);
        vertical_row_kernel(&bytes, &k, &mut b);
        assert_eq!(a, b);
        let hwc = &bytes[..3 * 37];
        let planes = |f: fn(&[u8], Plane, Plane, Plane)| {
            let mut v = vec![MaybeUninit::new(f32::NAN); 3 * 37];
            let (r, gb) = v.split_at_mut(37);
            let (g, b) = gb.split_at_mut(37);
            f(hwc, r, g, b);
            // SAFETY: every element was initialized (to NaN) above.
            v.iter().map(|x| unsafe { x.assume_init() }.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(planes(normalize_rows), planes(normalize_rows_kernel));
        // Up (window 4), down (windows 5 and 13) and the general kernel
        // (window 61), on a row that ends where the image ends.
        for (w, ow) in [(25, 40), (25, 17), (25, 6), (120, 4)] {
            let co = super::super::resample::precompute_coeffs(w, ow);
            let row = &bytes[..3 * w];
            let (mut a, mut b) = (vec![0u8; 3 * ow], vec![0u8; 3 * ow]);
            horizontal_rgb(row, &co, 0..ow, &mut a);
            horizontal_row::<3>(row, &co, 0..ow, &mut b);
            assert_eq!(a, b, "{w} -> {ow}");
        }
    }
}
