//! Row gathers and scatters (kernels/embedding.cu): embedding lookup and its
//! deterministic scatter-add gradient, and image-token splicing.
//!
//! Buffers hold `n` rows of `dim` values (longer ones are fine: only the
//! first `n` rows and ids are used); tables hold `len / dim` rows. A negative
//! index skips its row; an index past the table stops the kernel, and the
//! next `check()` reports the fault (the ids live on the GPU, and reading
//! them back here would stall every call).

use super::backend::{Buf, Idx};
use super::context::{launch, Cuda};
use super::driver::LaunchConfig;
use super::kernels::Storage;

/// Threads per block of `scatter_rows_f32`, the size of its id tile
/// (`#define TILE` in kernels/embedding.cu, checked by a test below).
const TILE: u32 = 256;

/// Threads per block of `gather_rows_f32` (any count works).
const GATHER_THREADS: u32 = 256;

/// The CPU's preconditions; returns the number of table rows.
fn check(table_len: usize, ids: &Idx, rows_len: usize, n: usize, dim: usize, what: &str) -> usize {
    assert!(dim > 0, "{what}: dim is 0");
    assert!(ids.len >= n, "{what}: {} indices for {n} rows", ids.len);
    assert!(rows_len >= n * dim, "{what}: buffer of {rows_len} values holds fewer than {n} rows of {dim}");
    assert_eq!(table_len % dim, 0, "{what}: table length {table_len} is not a multiple of dim {dim}");
    table_len / dim
}

/// `out[i, :] = table[ids[i], :]` (or `+=`), one block per row of `out`.
#[allow(clippy::too_many_arguments)]
fn gather(cu: &Cuda, table: &Buf, ids: &Idx, out: &mut Buf, n: usize, dim: usize, table_rows: usize, add: bool) {
    if n == 0 {
        return;
    }
    let (d, rows, acc) = (dim as u64, table_rows as u64, i32::from(add));
    let cfg = cu.rows(n, GATHER_THREADS);
    launch!(cu, "gather_rows_f32", cfg, &table.data, &ids.buf, &mut out.data, &d, &rows, &acc);
}

/// `dst[ids[i], :] += src[i, :]` (or `=`) in index order, row ranges of
/// `dst` split over blocks (see the kernel). The split only balances the
/// work: each value is updated by one thread in index order whatever it is.
#[allow(clippy::too_many_arguments)]
fn scatter(cu: &Cuda, src: &Buf, ids: &Idx, dst: &mut Buf, n: usize, dim: usize, table_rows: usize, add: bool) {
    if n == 0 {
        return;
    }
    let col_blocks = dim.div_ceil(TILE as usize);
    // About two blocks per SM in all; each block scans every id once.
    let tasks = (2 * cu.sms as usize).div_ceil(col_blocks).clamp(1, table_rows.max(1));
    let per = table_rows.div_ceil(tasks).max(1);
    let cfg =
        LaunchConfig { grid_dim: (tasks as u32, col_blocks as u32, 1), block_dim: (TILE, 1, 1), shared_mem_bytes: 0 };
    let (n64, d, rows, per64, acc) = (n as u64, dim as u64, table_rows as u64, per as u64, i32::from(add));
    // An f32 table is the embedding's gradient (state); an activation
    // table has the backend's storage.
    if dst.storage == Storage::F32 {
        launch!(cu, "scatter_rows_into_f32", cfg, &src.data, &ids.buf, &mut dst.data, &n64, &d, &rows, &per64, &acc);
    } else {
        launch!(cu, "scatter_rows_f32", cfg, &src.data, &ids.buf, &mut dst.data, &n64, &d, &rows, &per64, &acc);
    }
}

/// `out[i, :] = table[ids[i], :]`; rows with a negative id are left as they are.
pub(super) fn gather_rows(cu: &Cuda, table: &Buf, ids: &Idx, out: &mut Buf, n: usize, dim: usize) {
    let rows = check(table.len, ids, out.len, n, dim, "gather_rows");
    gather(cu, table, ids, out, n, dim, rows, false);
}

/// `dtable[ids[i], :] += dout[i, :]`, skipping negative ids; repeated ids
/// are summed in index order, as on the CPU, so the result is bitwise
/// repeatable.
pub(super) fn scatter_add_rows(cu: &Cuda, dout: &Buf, ids: &Idx, dtable: &mut Buf, n: usize, dim: usize) {
    let rows = check(dtable.len, ids, dout.len, n, dim, "scatter_add_rows");
    scatter(cu, dout, ids, dtable, n, dim, rows, true);
}

/// `dst[rows[i], :] = src[i, :]`, skipping negative rows; with repeated rows
/// the last `i` wins, as in a sequential loop.
pub(super) fn scatter_rows(cu: &Cuda, src: &Buf, rows: &Idx, dst: &mut Buf, n: usize, dim: usize) {
    let table_rows = check(dst.len, rows, src.len, n, dim, "scatter_rows");
    scatter(cu, src, rows, dst, n, dim, table_rows, false);
}

/// `dsrc[i, :] += ddst[rows[i], :]`, skipping negative rows: the backward of
/// [`scatter_rows`] when its rows are distinct.
pub(super) fn gather_rows_add(cu: &Cuda, ddst: &Buf, rows: &Idx, dsrc: &mut Buf, n: usize, dim: usize) {
    let table_rows = check(ddst.len, rows, dsrc.len, n, dim, "gather_rows_add");
    gather(cu, ddst, rows, dsrc, n, dim, table_rows, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_block_size_matches_the_kernel_tile() {
        let src = include_str!("kernels/embedding.cu");
        assert!(src.contains(&format!("#define TILE {TILE}\n")));
    }
}
