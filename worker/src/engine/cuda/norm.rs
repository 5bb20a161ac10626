//! LayerNorm and RMSNorm, forward and backward (kernels/norm.cu): one block
//! per row, and deterministic column sums for the weight and bias gradients.

use super::backend::Buf;
use super::columns::{chunk_rows, partial_grid, reduce_partials};
use super::context::{launch, Cuda};

/// Threads per row block; kernels/norm.cu sizes its reduction for this
/// (`#define ROW_THREADS`, checked by a test below).
const ROW_THREADS: u32 = 256;

#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_fwd(
    cu: &Cuda,
    x: &Buf,
    w: &Buf,
    b: &Buf,
    y: &mut Buf,
    mean: &mut Buf,
    rstd: &mut Buf,
    rows: usize,
    cols: usize,
    eps: f32,
) {
    assert_eq!(x.len, rows * cols, "layernorm_fwd: x length does not match [{rows}, {cols}]");
    assert!(w.len >= cols && b.len >= cols, "layernorm_fwd: weight or bias shorter than {cols}");
    assert!(y.len >= rows * cols, "layernorm_fwd: y shorter than [{rows}, {cols}]");
    assert!(mean.len >= rows && rstd.len >= rows, "layernorm_fwd: mean or rstd shorter than {rows} rows");
    if rows == 0 || cols == 0 {
        return;
    }
    let c = cols as u64;
    launch!(
        cu,
        "layernorm_fwd_f32",
        cu.rows(rows, ROW_THREADS),
        &x.data,
        &w.data,
        &b.data,
        &mut y.data,
        &mut mean.data,
        &mut rstd.data,
        &c,
        &eps
    );
}

/// `x1 += residual`, then LayerNorm of `x1` (kernels/norm.cu
/// `add_layernorm_fwd_f32`, one block per row).
#[allow(clippy::too_many_arguments)]
pub(super) fn add_layernorm_fwd(
    cu: &Cuda,
    x1: &mut Buf,
    residual: &Buf,
    w: &Buf,
    b: &Buf,
    y: &mut Buf,
    mean: &mut Buf,
    rstd: &mut Buf,
    rows: usize,
    cols: usize,
    eps: f32,
) {
    assert_eq!(x1.len, rows * cols, "add_layernorm_fwd: x1 length does not match [{rows}, {cols}]");
    assert_eq!(residual.len, x1.len, "add_layernorm_fwd: residual length mismatch");
    assert!(w.len >= cols && b.len >= cols, "add_layernorm_fwd: weight or bias shorter than {cols}");
    assert!(y.len >= rows * cols, "add_layernorm_fwd: y shorter than [{rows}, {cols}]");
    assert!(mean.len >= rows && rstd.len >= rows, "add_layernorm_fwd: mean or rstd shorter than {rows} rows");
    if rows == 0 || cols == 0 {
        return;
    }
    let c = cols as u64;
    launch!(
        cu,
        "add_layernorm_fwd_f32",
        cu.rows(rows, ROW_THREADS),
        &mut x1.data,
        &residual.data,
        &w.data,
        &b.data,
        &mut y.data,
        &mut mean.data,
        &mut rstd.data,
        &c,
        &eps
    );
}

#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_bwd(
    cu: &Cuda,
    x: &Buf,
    w: &Buf,
    mean: &Buf,
    rstd: &Buf,
    dy: &Buf,
    dx: &mut Buf,
    dw: &mut Buf,
    db: &mut Buf,
    rows: usize,
    cols: usize,
) {
    let n = rows * cols;
    assert!(x.len >= n && dy.len >= n && dx.len >= n, "layernorm_bwd: x, dy or dx shorter than [{rows}, {cols}]");
    assert!(w.len >= cols && dw.len >= cols && db.len >= cols, "layernorm_bwd: w, dw or db shorter than {cols}");
    assert!(mean.len >= rows && rstd.len >= rows, "layernorm_bwd: mean or rstd shorter than {rows} rows");
    if rows == 0 || cols == 0 {
        return;
    }
    let c = cols as u64;
    launch!(
        cu,
        "layernorm_bwd_dx_f32",
        cu.rows(rows, ROW_THREADS),
        &x.data,
        &w.data,
        &mean.data,
        &rstd.data,
        &dy.data,
        &mut dx.data,
        &c
    );
    let per = chunk_rows(rows);
    let chunks = rows.div_ceil(per);
    let mut part_w = cu.zeros::<f64>(chunks * cols);
    let mut part_b = cu.zeros::<f64>(chunks * cols);
    let (r, p) = (rows as u64, per as u64);
    launch!(
        cu,
        "layernorm_bwd_params_partial_f32",
        partial_grid(chunks, cols, false),
        &x.data,
        &mean.data,
        &rstd.data,
        &dy.data,
        &mut part_w,
        &mut part_b,
        &r,
        &c,
        &p
    );
    reduce_partials(cu, &part_w, dw, chunks, cols);
    reduce_partials(cu, &part_b, db, chunks, cols);
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_fwd(
    cu: &Cuda,
    x: &Buf,
    w: &Buf,
    y: &mut Buf,
    rstd: &mut Buf,
    rows: usize,
    cols: usize,
    eps: f32,
) {
    assert_eq!(x.len, rows * cols, "rmsnorm_fwd: x length does not match [{rows}, {cols}]");
    assert!(w.len >= cols, "rmsnorm_fwd: weight shorter than {cols}");
    assert!(y.len >= rows * cols, "rmsnorm_fwd: y shorter than [{rows}, {cols}]");
    assert!(rstd.len >= rows, "rmsnorm_fwd: rstd shorter than {rows} rows");
    if rows == 0 || cols == 0 {
        return;
    }
    let c = cols as u64;
    launch!(cu, "rmsnorm_fwd_f32", cu.rows(rows, ROW_THREADS), &x.data, &w.data, &mut y.data, &mut rstd.data, &c, &eps);
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_bwd(
    cu: &Cuda,
    x: &Buf,
    w: &Buf,
    rstd: &Buf,
    dy: &Buf,
    dx: &mut Buf,
    dw: &mut Buf,
    rows: usize,
    cols: usize,
) {
    let n = rows * cols;
    assert!(x.len >= n && dy.len >= n && dx.len >= n, "rmsnorm_bwd: x, dy or dx shorter than [{rows}, {cols}]");
    assert!(w.len >= cols && dw.len >= cols, "rmsnorm_bwd: w or dw shorter than {cols}");
    assert!(rstd.len >= rows, "rmsnorm_bwd: rstd shorter than {rows} rows");
    if rows == 0 || cols == 0 {
        return;
    }
    let c = cols as u64;
    launch!(
        cu,
        "rmsnorm_bwd_dx_f32",
        cu.rows(rows, ROW_THREADS),
        &x.data,
        &w.data,
        &rstd.data,
        &dy.data,
        &mut dx.data,
        &c
    );
    let per = chunk_rows(rows);
    let chunks = rows.div_ceil(per);
    let mut part_w = cu.zeros::<f64>(chunks * cols);
    let (r, p) = (rows as u64, per as u64);
    launch!(
        cu,
        "rmsnorm_bwd_params_partial_f32",
        partial_grid(chunks, cols, false),
        &x.data,
        &rstd.data,
        &dy.data,
        &mut part_w,
        &r,
        &c,
        &p
    );
    reduce_partials(cu, &part_w, dw, chunks, cols);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_block_size_matches_the_kernels() {
        let src = include_str!("kernels/norm.cu");
        assert!(src.contains(&format!("#define ROW_THREADS {ROW_THREADS}\n")));
    }
}
