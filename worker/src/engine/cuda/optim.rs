//! AdamW (kernels/optim.cu). The bias corrections are computed on the host
//! in f64, as the CPU backend does, so both run the same arithmetic.

use super::backend::Buf;
use super::context::{launch, Cuda};
use crate::engine::backend::AdamW;

pub(super) fn adamw(cu: &Cuda, param: &mut Buf, grad: &Buf, m: &mut Buf, v: &mut Buf, h: AdamW) {
    assert!(h.step >= 1, "AdamW step count is 1-based");
    let n = param.len;
    assert!(grad.len >= n && m.len >= n && v.len >= n, "adamw: state buffers shorter than the parameter");
    let lr = h.lr as f64;
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
    let decay = (1.0 - lr * h.weight_decay as f64) as f32;
    let step_size = (lr / bc1) as f32;
    let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
    let n64 = n as u64;
    if n > 0 {
        launch!(
            cu,
            "adamw_f32",
            cu.elems(n),
            &mut param.data,
            &grad.data,
            &mut m.data,
            &mut v.data,
            &h.beta1,
            &h.beta2,
            &h.eps,
            &decay,
            &step_size,
            &inv_sqrt_bc2,
            &h.grad_scale,
            &n64
        );
    }
}
