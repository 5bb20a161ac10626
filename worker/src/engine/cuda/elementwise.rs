//! Elementwise ops, bias and position-table broadcasts, and the gradient
//! norm's sum of squares (kernels/elementwise.cu).

use super::backend::Buf;
use super::context::{launch, Cuda, THREADS};
use super::driver::LaunchConfig;
use super::kernels::Storage;

/// Blocks of the first sum-of-squares pass: fixed, so the reduction
/// order, and with it the result, never depends on the GPU.
const PARTIALS: usize = 256;

// Fill, copy, axpy, scale and the sum of squares serve activations and
// f32 state alike: each runs the kernel build of its buffer's storage.

pub(super) fn fill(cu: &Cuda, buf: &mut Buf, value: f32) {
    let n = buf.len;
    fill_range(cu, buf, 0, n, value)
}

/// Fills `len` values from `offset`.
pub(super) fn fill_range(cu: &Cuda, buf: &mut Buf, offset: usize, len: usize, value: f32) {
    if len == 0 {
        return;
    }
    let (n, storage) = (len as u64, buf.storage);
    let mut view = buf.view_mut(offset, len);
    launch!(cu, storage = storage, "fill_f32", cu.elems(len), &mut view, &value, &n);
}

/// Copies values; between storage types it converts (a master weight into
/// its bf16 compute copy rounds to nearest even).
pub(super) fn copy(cu: &Cuda, src: &Buf, src_off: usize, dst: &mut Buf, dst_off: usize, len: usize) {
    assert!(src_off + len <= src.len, "copy: source range {src_off}+{len} past {}", src.len);
    assert!(dst_off + len <= dst.len, "copy: destination range {dst_off}+{len} past {}", dst.len);
    if len == 0 {
        return;
    }
    let (from, to) = (src.storage, dst.storage);
    let from_view = src.view(src_off, len);
    let mut to_view = dst.view_mut(dst_off, len);
    let n = len as u64;
    match (from, to) {
        (a, b) if a == b => {
            let copied = cu.driver.dtod(from_view.addr, to_view.addr, from_view.bytes);
            cu.record("device copy", copied);
        }
        // The bf16 build's conversions (act_t = bf16).
        (Storage::F32, _) => {
            launch!(cu, storage = to, "act_from_f32", cu.elems(len), &from_view, &mut to_view, &n);
        }
        (_, Storage::F32) => {
            launch!(cu, storage = from, "f32_from_act", cu.elems(len), &from_view, &mut to_view, &n);
        }
        (a, b) => panic!("copy: no conversion from {a:?} to {b:?}"),
    }
}

pub(super) fn axpy(cu: &Cuda, alpha: f32, x: &Buf, y: &mut Buf) {
    assert_eq!(x.len, y.len, "axpy length mismatch");
    assert_eq!(x.storage, y.storage, "axpy: x and y in different storage types");
    let n = x.len as u64;
    if n > 0 {
        launch!(cu, storage = x.storage, "axpy_f32", cu.elems(x.len), &alpha, &x.data, &mut y.data, &n);
    }
}

pub(super) fn scale(cu: &Cuda, x: &mut Buf, s: f32) {
    let n = x.len as u64;
    if n > 0 {
        launch!(cu, storage = x.storage, "scale_f32", cu.elems(x.len), &mut x.data, &s, &n);
    }
}

/// Every buffer adds into the same partials on the one stream, so the
/// launches need no sync between them and the host waits once.
pub(super) fn sum_squares(cu: &Cuda, xs: &[&Buf]) -> f64 {
    if xs.iter().all(|x| x.len == 0) {
        return 0.0;
    }
    let partial = cu.zeros::<f64>(PARTIALS);
    let total = cu.zeros::<f64>(1);
    let parts = PARTIALS as u64;
    for x in xs.iter().filter(|x| x.len > 0) {
        let n = x.len as u64;
        let grid =
            LaunchConfig { grid_dim: (partial_blocks(x.len), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        launch!(cu, storage = x.storage, "sum_squares_partial_f32", grid, &x.data, &partial, &n);
    }
    launch!(cu, "sum_partials_f64", cu.rows(1, 32), &partial, &total, &parts);
    cu.read::<f64>("sum of squares (download)", &total, 0, 1).map_or(f64::NAN, |v| v[0])
}

/// Blocks of the first sum-of-squares pass over `n` values: a few values
/// per thread, at most PARTIALS. It depends on `n` alone, so the order of
/// the sum, and with it the result, is the same on every GPU; a small
/// tensor (a bias) no longer launches 256 blocks that would sum nothing.
fn partial_blocks(n: usize) -> u32 {
    n.div_ceil(4 * THREADS as usize).clamp(1, PARTIALS) as u32
}

/// `y[r, :] += bias` for `rows` rows of width `cols`.
pub(super) fn bias_add(cu: &Cuda, y: &mut Buf, bias: &Buf, rows: usize, cols: usize) {
    assert!(y.len >= rows * cols && bias.len >= cols, "bias_add: buffers smaller than [{rows}, {cols}]");
    let (c, n) = (cols as u64, (rows * cols) as u64);
    if n > 0 {
        launch!(cu, "bias_add_f32", cu.elems(rows * cols), &mut y.data, &bias.data, &c, &n);
    }
}

#[cfg(test)]
mod tests {
    /// The sum-of-squares kernel sizes its shared reduction for the block
    /// this module launches.
    #[test]
    fn sum_block_size_matches_the_kernel() {
        let src = include_str!("kernels/elementwise.cu");
        assert!(src.contains(&format!("#define SUM_THREADS {}\n", super::THREADS)));
    }
}
