//! STUB: being written (kernels/embedding.cu).
#![allow(unused_variables)]
use super::backend::{Buf, Idx};
use super::context::Cuda;

pub(super) fn gather_rows(cu: &Cuda, table: &Buf, ids: &Idx, out: &mut Buf, n: usize, dim: usize) {
    todo!()
}
pub(super) fn scatter_add_rows(cu: &Cuda, dout: &Buf, ids: &Idx, dtable: &mut Buf, n: usize, dim: usize) {
    todo!()
}
pub(super) fn scatter_rows(cu: &Cuda, src: &Buf, rows: &Idx, dst: &mut Buf, n: usize, dim: usize) {
    todo!()
}
pub(super) fn gather_rows_add(cu: &Cuda, ddst: &Buf, rows: &Idx, dsrc: &mut Buf, n: usize, dim: usize) {
    todo!()
}
