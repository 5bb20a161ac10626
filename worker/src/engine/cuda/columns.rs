//! Deterministic column sums over many rows (kernels/columns.cu): rows are
//! cut into at most MAX_CHUNKS chunks, each (chunk, column) summed in f64
//! by one thread, then the chunks added in order. Used by the bias and
//! position-table gradients and by the norms' weight gradients.

use super::backend::Buf;
use super::context::{launch, Cuda, THREADS};
use super::driver::{DevMem, LaunchConfig};

/// At most this many row chunks for column-sum partials.
pub(super) const MAX_CHUNKS: usize = 256;

/// Rows per chunk of column-sum partials. It depends on the
/// shape alone (never on the GPU), so the summation order, and with it the
/// result, is the same on every card.
pub(super) fn chunk_rows(rows: usize) -> usize {
    rows.div_ceil(MAX_CHUNKS).max(32)
}

/// CUDA's limit on a grid's y size.
const MAX_GRID_Y: usize = 65_535;

/// Grid of the partial kernels: x = row chunk, y = block of THREADS columns.
/// The norms' kernels give each column block its own y index, so their
/// columns (a hidden size) must fit the grid; `strided` is for kernels that
/// stride over column blocks, whose y size is capped instead.
pub(super) fn partial_grid(chunks: usize, cols: usize, strided: bool) -> LaunchConfig {
    let mut col_blocks = cols.div_ceil(THREADS as usize);
    if strided {
        col_blocks = col_blocks.min(MAX_GRID_Y);
    }
    assert!(
        col_blocks <= MAX_GRID_Y,
        "column partials over {cols} columns need {col_blocks} column blocks, more than a grid holds ({MAX_GRID_Y})"
    );
    LaunchConfig { grid_dim: (chunks as u32, col_blocks as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// `out[c] += sum over chunks of part[chunk, c]`, in chunk order.
pub(super) fn reduce_partials(cu: &Cuda, part: &DevMem, out: &mut Buf, chunks: usize, cols: usize) {
    let (k, c) = (chunks as u64, cols as u64);
    launch!(cu, "column_partials_reduce_f32", cu.elems(cols), part, &mut out.data, &k, &c);
}

/// `out += column sums of x[rows, cols]`.
pub(super) fn col_sums_into(cu: &Cuda, x: &Buf, out: &mut Buf, rows: usize, cols: usize) {
    assert!(x.len >= rows * cols && out.len >= cols, "column sums: buffers smaller than [{rows}, {cols}]");
    if rows == 0 || cols == 0 {
        return;
    }
    let per = chunk_rows(rows);
    let chunks = rows.div_ceil(per);
    let part = cu.zeros::<f64>(chunks * cols);
    let (r, c, p) = (rows as u64, cols as u64, per as u64);
    launch!(cu, "col_sums_partial_f32", partial_grid(chunks, cols, true), &x.data, &part, &r, &c, &p);
    reduce_partials(cu, &part, out, chunks, cols);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_rows_and_stay_few() {
        for rows in [1, 31, 32, 33, 8191, 8192, 8193, 100_000, 1 << 22] {
            let per = chunk_rows(rows);
            let chunks = rows.div_ceil(per);
            assert!(chunks * per >= rows && (chunks - 1) * per < rows && chunks <= MAX_CHUNKS, "{rows}");
        }
    }

    /// A position table's gradient (~1M columns today) may outgrow the
    /// grid's y size: the striding kernel gets a capped grid, the norms'
    /// kernels (one y index per column block) a clear refusal.
    #[test]
    fn column_grids_fit_cuda_limits() {
        let small = partial_grid(4, 1152, false);
        assert_eq!(small.grid_dim, (4, 5, 1));
        let huge = 20_000_000;
        assert_eq!(partial_grid(8, huge, true).grid_dim, (8, MAX_GRID_Y as u32, 1));
        let refused = std::panic::catch_unwind(|| partial_grid(8, huge, false)).unwrap_err();
        let msg = refused.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("20000000 columns"), "{msg}");
    }
}
