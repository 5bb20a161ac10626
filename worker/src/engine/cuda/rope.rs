//! Rotary position embedding in place (kernels/rope.cu): a cos/sin table
//! from the host's f64 inverse frequencies, built once per (head_dim,
//! theta) and kept (rebuilt only for a longer sequence), then one thread
//! per pair. Every layer's forward and backward reuse it, so a step makes
//! no host-to-device copy here (a copy from pageable memory would stall
//! the host until the GPU caught up).

use super::backend::Buf;
use super::context::{launch, Cuda};
use super::driver::DevMem;
use crate::engine::backend::RopeShape;
use std::sync::Arc;

/// The kept tables: per (head_dim, theta's bits), the positions covered and
/// the table.
pub(super) type RopeTables = std::collections::HashMap<(usize, u32), (usize, Arc<DevMem>)>;

/// The cos/sin table for at least `seq` positions, and how many it holds.
fn table(cu: &Cuda, s: RopeShape) -> Option<(usize, Arc<DevMem>)> {
    let (d, half) = (s.head_dim, s.head_dim / 2);
    let key = (d, s.theta.to_bits());
    let mut tables = cu.rope_tables.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((have, t)) = tables.get(&key) {
        if *have >= s.seq {
            return Some((*have, t.clone()));
        }
    }
    // inv_freq in f64 with the CPU's expression, so both use the same angles.
    let inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / (s.theta as f64).powf((2 * i) as f64 / d as f64)).collect();
    let inv_freq = cu.upload_values("rope (upload of inv_freq)", &inv_freq)?;
    let table = cu.zeros::<f32>(2 * s.seq * half);
    let (seq, half64) = (s.seq as u64, half as u64);
    launch!(cu, "rope_table_f32", cu.elems(s.seq * half), &inv_freq, &table, &seq, &half64);
    let kept = (s.seq, Arc::new(table));
    tables.insert(key, kept.clone());
    Some(kept)
}

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
    let Some((table_seq, table)) = table(cu, s) else {
        return;
    };
    let (table_seq, seq, heads, half64) = (table_seq as u64, s.seq as u64, s.heads as u64, half as u64);
    let (pairs, inv) = ((numel / 2) as u64, i32::from(inverse));
    let t: &DevMem = &table;
    launch!(
        cu,
        "rope_rotate_f32",
        cu.elems(numel / 2),
        &mut x.data,
        t,
        &table_seq,
        &seq,
        &heads,
        &half64,
        &pairs,
        &inv
    );
}
