//! Rotary position embedding in place (kernels/rope.cu): a cos/sin table per
//! call from the host's f64 inverse frequencies, then one thread per pair.

use super::backend::Buf;
use super::context::{launch, Cuda};
use crate::engine::backend::RopeShape;

/// Rotates each head of `x` (`[batch, seq, heads, head_dim]`) by its
/// position's angles; `inverse` rotates the other way (the backward pass).
pub(super) fn rotate(cu: &Cuda, x: &mut Buf, s: RopeShape, inverse: bool) {
    let (d, half) = (s.head_dim, s.head_dim / 2);
    assert!(d % 2 == 0, "rope needs an even head_dim, got {d}");
    let numel = s.batch * s.seq * s.heads * d;
    assert!(
        x.len >= numel,
        "rope: buffer of {} values is shorter than [{}, {}, {}, {d}]",
        x.len,
        s.batch,
        s.seq,
        s.heads
    );
    if numel == 0 {
        return;
    }
    // inv_freq in f64 with the CPU's expression, so both use the same angles.
    let inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / (s.theta as f64).powf((2 * i) as f64 / d as f64)).collect();
    let Some(inv_freq) = cu.record("rope (upload of inv_freq)", cu.stream.clone_htod(&inv_freq)) else {
        return;
    };
    let mut table = cu.zeros::<f32>(2 * s.seq * half);
    let (seq, heads, half64) = (s.seq as u64, s.heads as u64, half as u64);
    let inv = i32::from(inverse);
    launch!(cu, "rope_table_f32", cu.elems(s.seq * half), &inv_freq, &mut table, &seq, &half64, &inv);
    let pairs = (numel / 2) as u64;
    launch!(cu, "rope_rotate_f32", cu.elems(numel / 2), &mut x.data, &table, &seq, &heads, &half64, &pairs);
}
