//! Row gathers and scatters: embedding lookup and image-token splicing.
//!
//! Buffers hold `n` rows of `dim` values (longer buffers are fine: only the
//! first `n` rows and ids are used); tables hold `len / dim` rows. A negative
//! index skips its row; an index past the table panics with a clear message.
use super::{rows_per_task, Real};
use rayon::prelude::*;

/// Checks the shared preconditions and returns the number of table rows.
fn check(table_len: usize, ids: &[i32], rows_len: usize, n: usize, dim: usize, what: &str) -> usize {
    assert!(dim > 0, "{what}: dim is 0");
    assert!(ids.len() >= n, "{what}: {} indices for {n} rows", ids.len());
    assert!(rows_len >= n * dim, "{what}: buffer of {rows_len} values holds fewer than {n} rows of {dim}");
    assert_eq!(table_len % dim, 0, "{what}: table length {table_len} is not a multiple of dim {dim}");
    let rows = table_len / dim;
    if let Some((i, &id)) = ids[..n].iter().enumerate().find(|(_, &id)| id >= 0 && id as usize >= rows) {
        panic!("{what}: index {id} at position {i} is out of range for a table of {rows} rows");
    }
    rows
}

/// Runs `f(row_of_dst, i)` for every `i` in `0..ids.len()` with a non-negative
/// id, on row `ids[i]` of `dst`. Tasks own disjoint row ranges of `dst` and
/// visit the ids in order, so each row sees its updates in index order: the
/// result is deterministic and equals a sequential loop.
fn for_each_target_row<T: Real>(dst: &mut [T], ids: &[i32], dim: usize, f: impl Fn(&mut [T], usize) + Sync) {
    let rows = dst.len() / dim;
    if rows == 0 || ids.is_empty() {
        return;
    }
    let tasks = (rayon::current_num_threads() * 4).clamp(1, rows);
    let per = rows.div_ceil(tasks);
    dst[..rows * dim].par_chunks_mut(per * dim).enumerate().for_each(|(t, chunk)| {
        let (r0, r1) = (t * per, t * per + chunk.len() / dim);
        for (i, &id) in ids.iter().enumerate() {
            if id >= 0 && (r0..r1).contains(&(id as usize)) {
                let r = id as usize - r0;
                f(&mut chunk[r * dim..(r + 1) * dim], i);
            }
        }
    });
}

/// `out[i, :] = table[ids[i], :]`; rows with a negative id are left as they are.
pub fn gather_rows<T: Real>(table: &[T], ids: &[i32], out: &mut [T], n: usize, dim: usize) {
    check(table.len(), ids, out.len(), n, dim, "gather_rows");
    let per = rows_per_task(n, dim);
    out[..n * dim].par_chunks_mut(per * dim).zip(ids[..n].par_chunks(per)).for_each(|(oc, ic)| {
        for (row, &id) in oc.chunks_exact_mut(dim).zip(ic) {
            if id >= 0 {
                let id = id as usize;
                row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
            }
        }
    });
}

/// `dtable[ids[i], :] += dout[i, :]`, skipping negative ids. Deterministic:
/// repeated ids are summed in index order whatever the thread count.
pub fn scatter_add_rows<T: Real>(dout: &[T], ids: &[i32], dtable: &mut [T], n: usize, dim: usize) {
    check(dtable.len(), ids, dout.len(), n, dim, "scatter_add_rows");
    for_each_target_row(dtable, &ids[..n], dim, |row, i| {
        for (d, &g) in row.iter_mut().zip(&dout[i * dim..(i + 1) * dim]) {
            *d += g;
        }
    });
}

/// `dst[rows[i], :] = src[i, :]`, skipping negative rows. With repeated rows the
/// last `i` wins, as in a sequential loop.
pub fn scatter_rows<T: Real>(src: &[T], rows: &[i32], dst: &mut [T], n: usize, dim: usize) {
    check(dst.len(), rows, src.len(), n, dim, "scatter_rows");
    for_each_target_row(dst, &rows[..n], dim, |row, i| row.copy_from_slice(&src[i * dim..(i + 1) * dim]));
}

/// `dsrc[i, :] += ddst[rows[i], :]`, skipping negative rows: the backward of
/// [`scatter_rows`] when its rows are distinct (image-token positions are).
pub fn gather_rows_add<T: Real>(ddst: &[T], rows: &[i32], dsrc: &mut [T], n: usize, dim: usize) {
    check(ddst.len(), rows, dsrc.len(), n, dim, "gather_rows_add");
    let per = rows_per_task(n, dim);
    dsrc[..n * dim].par_chunks_mut(per * dim).zip(rows[..n].par_chunks(per)).for_each(|(sc, ic)| {
        for (row, &id) in sc.chunks_exact_mut(dim).zip(ic) {
            if id >= 0 {
                let id = id as usize;
                for (d, &g) in row.iter_mut().zip(&ddst[id * dim..(id + 1) * dim]) {
                    *d += g;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{assert_close, dot, fd_grad, rand_vec};

    /// These ops are linear, so central differences (h = 1e-6, f64) are exact
    /// up to rounding; backward is held to 1e-7 relative.
    const TOL: f64 = 1e-7;
    const H: f64 = 1e-6;

    #[test]
    fn gather_rows_values_and_negative_ids() {
        let (rows, dim) = (5, 3);
        let table = rand_vec(1, rows * dim);
        let ids = [4, -1, 0, 4, 2];
        let mut out = vec![7.0; ids.len() * dim];
        gather_rows(&table, &ids, &mut out, ids.len(), dim);
        for (i, &id) in ids.iter().enumerate() {
            let want: &[f64] = if id < 0 { &[7.0; 3] } else { &table[id as usize * dim..][..dim] };
            assert_eq!(&out[i * dim..(i + 1) * dim], want);
        }
    }

    /// scatter_add_rows is the gradient of gather_rows (repeated and negative
    /// ids included), and it adds to what dtable already holds.
    #[test]
    fn scatter_add_rows_matches_fd() {
        let (rows, dim) = (6, 4);
        let ids = [3, 0, -1, 3, 5, 3, -7, 1];
        let n = ids.len();
        let table = rand_vec(2, rows * dim);
        let w = rand_vec(3, n * dim);
        let base = rand_vec(4, n * dim); // values left in place for negative ids
        let want = fd_grad(&table, H, |t| {
            let mut out = base.clone();
            gather_rows(t, &ids, &mut out, n, dim);
            dot(&out, &w)
        });
        let start = rand_vec(5, rows * dim);
        let mut got = start.clone();
        scatter_add_rows(&w, &ids, &mut got, n, dim);
        let got: Vec<f64> = got.iter().zip(&start).map(|(g, s)| g - s).collect();
        assert_close("scatter_add_rows", &got, &want, TOL);
    }

    /// Many repeated ids over many tasks: bit-identical to a sequential loop
    /// (same summation order per row), in f32 where order matters most.
    #[test]
    fn scatter_add_rows_is_deterministic() {
        let (rows, dim, n) = (37, 16, 3000);
        let ids: Vec<i32> = (0..n).map(|i| ((i * 7919) % 41) as i32 - 4).collect(); // some negative
        let dout: Vec<f32> = rand_vec(6, n * dim).iter().map(|&v| v as f32).collect();
        let mut want = vec![0.5f32; rows * dim];
        for (i, &id) in ids.iter().enumerate() {
            if id >= 0 {
                for c in 0..dim {
                    want[id as usize * dim + c] += dout[i * dim + c];
                }
            }
        }
        for _ in 0..3 {
            let mut got = vec![0.5f32; rows * dim];
            scatter_add_rows(&dout, &ids, &mut got, n, dim);
            assert_eq!(got, want);
        }
    }

    #[test]
    fn scatter_rows_values_and_last_write_wins() {
        let (rows, dim) = (6, 2);
        let src = rand_vec(7, 4 * dim);
        let idx = [5, -1, 2, 5];
        let mut dst = vec![9.0; rows * dim];
        scatter_rows(&src, &idx, &mut dst, 4, dim);
        let mut want = vec![9.0; rows * dim];
        want[4..6].copy_from_slice(&src[4..6]); // row 2 <- src 2
        want[10..12].copy_from_slice(&src[6..8]); // row 5 <- src 3 (the last of two)
        assert_eq!(dst, want);
    }

    /// gather_rows_add is the gradient of scatter_rows with distinct rows
    /// (a negative row gets no gradient), and it adds to dsrc.
    #[test]
    fn gather_rows_add_matches_fd() {
        let (rows, dim) = (7, 3);
        let idx = [4, 0, -1, 6, 2];
        let n = idx.len();
        let src = rand_vec(8, n * dim);
        let dst0 = rand_vec(9, rows * dim);
        let w = rand_vec(10, rows * dim);
        let want = fd_grad(&src, H, |s| {
            let mut dst = dst0.clone();
            scatter_rows(s, &idx, &mut dst, n, dim);
            dot(&dst, &w)
        });
        let start = rand_vec(11, n * dim);
        let mut got = start.clone();
        gather_rows_add(&w, &idx, &mut got, n, dim);
        let got: Vec<f64> = got.iter().zip(&start).map(|(g, s)| g - s).collect();
        assert_close("gather_rows_add", &got, &want, TOL);
        assert!(got[2 * dim..3 * dim].iter().all(|&v| v == 0.0));
    }

    #[test]
    #[should_panic(expected = "index 6 at position 1 is out of range for a table of 6 rows")]
    fn out_of_range_id_panics() {
        let table = vec![0.0f32; 12];
        let mut out = vec![0.0f32; 4];
        gather_rows(&table, &[1, 6], &mut out, 2, 2);
    }
}
