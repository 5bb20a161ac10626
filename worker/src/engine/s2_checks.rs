//! Shape checks of the S2 ops, shared by every backend so that a bad
//! shape gets the same message whichever device runs it.

use super::backend::{GridShape, TileGrid};

/// Checks a merge of `split` tiles (from tile `src_tile_offset` of a stack
/// of `src_len` values) into a grid of `grid_len` values shaped `out_shape`;
/// returns the tile rows, tile columns and values per tile.
pub(crate) fn check_merge(
    op: &str,
    out_shape: GridShape,
    split: TileGrid,
    grid_len: usize,
    src_len: usize,
    src_tile_offset: usize,
) -> (usize, usize, usize) {
    assert!(
        split.rows > 0
            && split.cols > 0
            && out_shape.rows.is_multiple_of(split.rows)
            && out_shape.cols.is_multiple_of(split.cols),
        "{op}: grid {} x {} is not a whole number of {} x {} tiles",
        out_shape.rows,
        out_shape.cols,
        split.rows,
        split.cols
    );
    assert_eq!(grid_len, out_shape.numel(), "{op}: grid length does not match {out_shape:?}");
    let (th, tw) = (out_shape.rows / split.rows, out_shape.cols / split.cols);
    let tile_len = th * tw * out_shape.channels;
    let end = src_tile_offset + split.count() * out_shape.batch;
    assert!(src_len >= end * tile_len, "{op}: the tile stack is too short for tiles {src_tile_offset}..{end}");
    (th, tw, tile_len)
}

/// Checks the grid and pooled lengths; returns the pooled rows and columns.
pub(crate) fn check_pool(
    op: &str,
    grid_len: usize,
    pooled_len: usize,
    shape: GridShape,
    window: TileGrid,
) -> (usize, usize) {
    let GridShape { batch, rows, cols, channels } = shape;
    assert!(
        window.rows > 0 && window.cols > 0 && rows.is_multiple_of(window.rows) && cols.is_multiple_of(window.cols),
        "{op}: grid {rows} x {cols} is not a whole number of {} x {} windows",
        window.rows,
        window.cols
    );
    assert_eq!(grid_len, shape.numel(), "{op}: grid length does not match {shape:?}");
    let (o_r, o_c) = (rows / window.rows, cols / window.cols);
    assert_eq!(
        pooled_len,
        batch * o_r * o_c * channels,
        "{op}: pooled length does not match [{batch}, {o_r} x {o_c}, {channels}]"
    );
    (o_r, o_c)
}

/// Checks a `[rows, width]` block against columns `col_offset..` of a
/// `[rows, dst_width]` matrix.
pub(crate) fn check_cols(
    op: &str,
    narrow: usize,
    wide: usize,
    rows: usize,
    width: usize,
    dst_width: usize,
    col_offset: usize,
) {
    assert!(
        col_offset + width <= dst_width,
        "{op}: columns {col_offset}..{} exceed width {dst_width}",
        col_offset + width
    );
    assert_eq!(narrow, rows * width, "{op}: block length does not match [{rows}, {width}]");
    assert_eq!(wide, rows * dst_width, "{op}: matrix length does not match [{rows}, {dst_width}]");
}

/// `(batch, side, channels)` of a square grid: VILA's projector reshapes its
/// input as `sqrt(tokens) x sqrt(tokens)`, so it only ever sees square grids.
fn square_grid(op: &str, shape: GridShape) -> (usize, usize, usize) {
    assert_eq!(shape.rows, shape.cols, "{op}: the grid must be square, not {} x {}", shape.rows, shape.cols);
    (shape.batch, shape.rows, shape.channels)
}

/// Checks a 2x2 token merge between a square grid of `grid_len` values
/// shaped `shape` and `merged_len` merged values; returns the side, the
/// merged side and the channels.
pub(crate) fn check_downsample(
    op: &str,
    shape: GridShape,
    grid_len: usize,
    merged_len: usize,
) -> (usize, usize, usize) {
    let (batch, side, c) = square_grid(op, shape);
    let h = side.div_ceil(2);
    assert_eq!(grid_len, shape.numel(), "{op}: grid length does not match {shape:?}");
    assert_eq!(merged_len, batch * h * h * 4 * c, "{op}: merged length does not match [{batch}, {h}^2, {}]", 4 * c);
    (side, h, c)
}
