//! GELU and SwiGLU (kernels/activation.cu).

use super::backend::Buf;
use super::context::{launch, Cuda};
use crate::engine::backend::GeluKind;

fn kind_code(kind: GeluKind) -> i32 {
    match kind {
        GeluKind::Tanh => 0,
        GeluKind::Erf => 1,
    }
}

pub(super) fn gelu_fwd(cu: &Cuda, x: &Buf, y: &mut Buf, kind: GeluKind) {
    assert!(y.len >= x.len, "gelu_fwd: output shorter than input");
    let (k, n) = (kind_code(kind), x.len as u64);
    if n > 0 {
        launch!(cu, "gelu_fwd_f32", cu.elems(x.len), &x.data, &mut y.data, &k, &n);
    }
}

/// `y[r, :] += bias`, then `g = gelu(y)` (kernels/activation.cu `bias_gelu_fwd_f32`).
pub(super) fn bias_gelu_fwd(cu: &Cuda, y: &mut Buf, bias: &Buf, g: &mut Buf, rows: usize, cols: usize, kind: GeluKind) {
    let n = rows * cols;
    assert!(y.len >= n && bias.len >= cols, "bias_gelu_fwd: buffers smaller than [{rows}, {cols}]");
    assert!(g.len >= n, "bias_gelu_fwd: output shorter than [{rows}, {cols}]");
    let (k, c, n64) = (kind_code(kind), cols as u64, n as u64);
    if n > 0 {
        launch!(cu, "bias_gelu_fwd_f32", cu.elems(n), &mut y.data, &bias.data, &mut g.data, &k, &c, &n64);
    }
}

pub(super) fn gelu_bwd(cu: &Cuda, x: &Buf, dy: &Buf, dx: &mut Buf, kind: GeluKind) {
    assert!(dy.len >= x.len && dx.len >= x.len, "gelu_bwd: gradient buffers shorter than the input");
    let (k, n) = (kind_code(kind), x.len as u64);
    if n > 0 {
        launch!(cu, "gelu_bwd_f32", cu.elems(x.len), &x.data, &dy.data, &mut dx.data, &k, &n);
    }
}

pub(super) fn swiglu_fwd(cu: &Cuda, gate: &Buf, up: &Buf, out: &mut Buf) {
    assert!(up.len >= gate.len && out.len >= gate.len, "swiglu_fwd: buffers shorter than the gate");
    let n = gate.len as u64;
    if n > 0 {
        launch!(cu, "swiglu_fwd_f32", cu.elems(gate.len), &gate.data, &up.data, &mut out.data, &n);
    }
}

pub(super) fn swiglu_bwd(cu: &Cuda, gate: &Buf, up: &Buf, dout: &Buf, dgate: &mut Buf, dup: &mut Buf) {
    let n = gate.len;
    assert!(
        up.len >= n && dout.len >= n && dgate.len >= n && dup.len >= n,
        "swiglu_bwd: buffers shorter than the gate"
    );
    let n64 = n as u64;
    if n > 0 {
        launch!(
            cu,
            "swiglu_bwd_f32",
            cu.elems(n),
            &gate.data,
            &up.data,
            &dout.data,
            &mut dgate.data,
            &mut dup.data,
            &n64
        );
    }
}
