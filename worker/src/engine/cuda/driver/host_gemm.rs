//! `cublasGemmStridedBatchedEx` on the host, for the emulated device:
//! column-major `C[b] = alpha * op(A[b]) op(B[b]) + beta * C[b]`, exactly
//! the descriptor the backend hands cuBLAS. The operands are read as the
//! compute type takes them (f32 as is, or rounded to TF32 or bf16 the way
//! the tensor cores' input conversion rounds), products accumulate in f32,
//! and with `beta == 0` C is not read (cuBLAS's rule: NaN there vanishes).
//! Every matrix's extent is checked against its allocation first, so a
//! wrong leading dimension or stride is an error naming the operand, not a
//! read of a neighbour's memory.

use super::{Compute, GemmDesc, GemmMatrix};
use crate::engine::cuda::emu_ffi;
use crate::engine::cuda::kernels::Storage;

/// Round to TF32 (10 mantissa bits) to nearest, ties away from zero, as
/// `cvt.rna.tf32.f32` does.
fn tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & 0xffff_e000)
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Value `i` of a matrix's memory.
///
/// # Safety
/// `addr + i` must lie in a live allocation of values of `storage`.
unsafe fn load(addr: u64, storage: Storage, i: usize) -> f32 {
    match storage {
        Storage::F32 => ((addr as *const f32).add(i)).read_unaligned(),
        Storage::Bf16 => half::bf16::from_bits(((addr as *const u16).add(i)).read_unaligned()).to_f32(),
    }
}

/// # Safety
/// As [`load`].
unsafe fn store(addr: u64, storage: Storage, i: usize, v: f32) {
    match storage {
        Storage::F32 => ((addr as *mut f32).add(i)).write_unaligned(v),
        Storage::Bf16 => ((addr as *mut u16).add(i)).write_unaligned(half::bf16::from_f32(v).to_bits()),
    }
}

/// Checks that `batch` column-major `[rows, cols]` matrices fit `x`'s
/// allocation and that `ld` is valid, as cuBLAS validates it.
fn check(name: &str, x: &GemmMatrix, rows: usize, cols: usize, batch: usize) -> Result<(), String> {
    if x.ld < rows.max(1) {
        return Err(format!(
            "cuBLAS GEMM: ld{name} = {} is less than the {rows} rows of {name} (CUBLAS_STATUS_INVALID_VALUE)",
            x.ld
        ));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (batch - 1) * x.stride + (cols - 1) * x.ld + rows - 1;
    let size = match x.storage {
        Storage::F32 => 4,
        Storage::Bf16 => 2,
    };
    emu_ffi::check_range(x.addr, (last + 1) * size).map_err(|e| {
        format!("cuBLAS GEMM: matrix {name} ({batch} of [{rows}, {cols}], ld {}, stride {}): {e}", x.ld, x.stride)
    })
}

pub(super) fn gemm(g: &GemmDesc) -> Result<(), String> {
    let (m, n, k) = (g.m, g.n, g.k);
    if g.batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    if g.a.storage != g.b.storage {
        return Err("cuBLAS GEMM: A and B in different data types".into());
    }
    // Stored shapes: op(A) is [m, k], so A is [k, m] when transposed.
    let (ar, ac) = if g.trans_a { (k, m) } else { (m, k) };
    let (br, bc) = if g.trans_b { (n, k) } else { (k, n) };
    check("A", &g.a, ar, ac, g.batch)?;
    check("B", &g.b, br, bc, g.batch)?;
    check("C", &g.c, m, n, g.batch)?;
    let round: fn(f32) -> f32 = match (g.a.storage, g.compute) {
        (Storage::F32, Compute::FastTf32) => tf32,
        (Storage::F32, Compute::Fast16Bf) => bf16,
        _ => |x| x,
    };
    let mut a = vec![0f32; m * k];
    let mut b = vec![0f32; k * n];
    let mut c = vec![0f32; m * n];
    for batch in 0..g.batch {
        let (a0, b0, c0) = (batch * g.a.stride, batch * g.b.stride, batch * g.c.stride);
        // op(A) and op(B) as dense row-major f32 ([m, k] and [k, n]).
        // SAFETY: every index below is within the extents checked above.
        unsafe {
            for i in 0..m {
                for l in 0..k {
                    let at = if g.trans_a { a0 + i * g.a.ld + l } else { a0 + l * g.a.ld + i };
                    a[i * k + l] = round(load(g.a.addr, g.a.storage, at));
                }
            }
            for l in 0..k {
                for j in 0..n {
                    let at = if g.trans_b { b0 + l * g.b.ld + j } else { b0 + j * g.b.ld + l };
                    b[l * n + j] = round(load(g.b.addr, g.b.storage, at));
                }
            }
        }
        if k > 0 {
            // SAFETY: the slices hold [m, k], [k, n] and [m, n] row-major.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                )
            };
        } else {
            c.fill(0.0);
        }
        // SAFETY: within C's checked extent.
        unsafe {
            for j in 0..n {
                for i in 0..m {
                    let at = c0 + j * g.c.ld + i;
                    let prod = g.alpha * c[i * n + j];
                    let v = if g.beta == 0.0 { prod } else { prod + g.beta * load(g.c.addr, g.c.storage, at) };
                    store(g.c.addr, g.c.storage, at, v);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TF32 keeps 10 mantissa bits, rounding half away from zero; bf16 keeps
    /// 7, rounding half to even.
    #[test]
    fn operand_rounding_matches_the_tensor_cores_input_conversion() {
        let ulp10 = 1.0f32 / 1024.0;
        assert_eq!(tf32(1.0 + ulp10 / 2.0), 1.0 + ulp10); // tie: away from zero
        assert_eq!(tf32(-(1.0 + ulp10 / 2.0)), -(1.0 + ulp10));
        assert_eq!(tf32(1.0 + ulp10 / 4.0), 1.0);
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 1.0); // tie: to even
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert!(tf32(f32::NAN).is_nan() && tf32(f32::INFINITY) == f32::INFINITY);
    }

    fn matrix(addr: u64, ld: usize, stride: usize) -> GemmMatrix {
        GemmMatrix { addr, storage: Storage::F32, ld, stride }
    }

    /// A 2x3 times 3x2 product as cuBLAS computes it (column-major), then
    /// a descriptor whose leading dimension reaches past B's allocation and
    /// one whose ld is smaller than the rows: errors naming the matrix, and
    /// C untouched.
    #[test]
    fn computes_the_column_major_product_and_refuses_bad_descriptors() {
        let put = |v: &[f32]| {
            let addr = emu_ffi::alloc(v.len() * 4).unwrap();
            // SAFETY: a fresh allocation of v.len() f32s.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), addr as *mut f32, v.len()) };
            addr
        };
        // A = [[1, 2, 3], [4, 5, 6]] and B = [[1, 0], [0, 1], [1, 1]],
        // stored column-major.
        let a = put(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let b = put(&[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
        let c = put(&[9.0; 4]);
        let mut g = GemmDesc {
            trans_a: false,
            trans_b: false,
            m: 2,
            n: 2,
            k: 3,
            alpha: 1.0,
            a: matrix(a, 2, 6),
            b: matrix(b, 3, 6),
            beta: 0.0,
            c: matrix(c, 2, 4),
            batch: 1,
            compute: Compute::F32,
        };
        gemm(&g).unwrap();
        let read = || -> Vec<f32> {
            // SAFETY: C holds 4 f32s.
            unsafe { std::slice::from_raw_parts(c as *const f32, 4).to_vec() }
        };
        // A B = [[4, 5], [10, 11]], column-major.
        assert_eq!(read(), [4.0, 10.0, 5.0, 11.0]);
        g.b.ld = 4;
        let e = gemm(&g).unwrap_err();
        assert!(e.contains("matrix B (1 of [3, 2], ld 4") && e.contains("4 bytes past the end"), "{e}");
        g.b.ld = 2;
        let e = gemm(&g).unwrap_err();
        assert!(e.contains("ldB = 2") && e.contains("INVALID_VALUE"), "{e}");
        assert_eq!(read(), [4.0, 10.0, 5.0, 11.0]);
        for addr in [a, b, c] {
            // SAFETY: allocated above, freed once.
            unsafe { emu_ffi::free(addr) };
        }
    }
}
