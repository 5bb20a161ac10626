//! The CUDA backend's buffers. A buffer holds its values in one of two
//! storage types (kernels/storage.cuh): f32, or bf16 when the backend runs
//! with `precision = "bf16"`. Activations and the weights' compute copies
//! take the backend's storage type; gradients of parameters, master
//! weights, optimizer state and normalization statistics are "state" and
//! stay f32 whatever it is (`Backend::alloc_state`). Each op checks that
//! its buffers have the types its kernel was compiled for, so a buffer in
//! the wrong role is a panic naming the op, never values read as the wrong
//! type.

use super::context::Cuda;
use super::driver::{DevMem, DevSlice, Event};
use super::kernels::Storage;
use crate::codec::{self, SaveDtype};
use safetensors::tensor::Dtype;

impl Storage {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Storage::F32 => 4,
            Storage::Bf16 => 2,
        }
    }
}

/// A device buffer of `len` values. Buffers are allocated at least one
/// value long (CUDA cannot allocate zero bytes), so the length the model
/// asked for is kept beside the allocation.
pub struct Buf {
    /// The values' bytes, `storage.size()` per value.
    pub(crate) data: DevMem,
    pub(crate) len: usize,
    pub(crate) storage: Storage,
    /// Set by `mark_ready`: recorded on the compute stream once the ops
    /// writing this buffer were queued (a gradient bucket's copies), for
    /// the NCCL stream to wait on.
    pub(crate) ready: Option<Event>,
}

impl Buf {
    /// Values `start..start + len` (bounds checked).
    pub(crate) fn view(&self, start: usize, len: usize) -> DevSlice<'_> {
        let s = self.storage.size();
        self.data.slice(start * s, len * s)
    }

    /// Values `start..start + len`, to write (a `&mut` borrow, so no other
    /// view of the buffer is alive meanwhile).
    pub(crate) fn view_mut(&mut self, start: usize, len: usize) -> DevSlice<'_> {
        self.view(start, len)
    }
}

/// A device buffer of i32 indices.
pub struct Idx {
    pub(crate) buf: DevMem,
    pub(crate) len: usize,
}

/// Host values in a storage type's bytes: f32 as is, bf16 rounded to
/// nearest even (as the kernels round). These are a safetensors tensor's
/// bytes, so the weights' (parallel) encoder and decoder serve.
pub(super) fn encode(values: &[f32], storage: Storage) -> Vec<u8> {
    let dtype = match storage {
        Storage::F32 => SaveDtype::F32,
        Storage::Bf16 => SaveDtype::Bf16,
    };
    codec::encode(values, dtype)
}

/// The inverse of [`encode`].
pub(super) fn decode(bytes: &[u8], storage: Storage) -> Vec<f32> {
    let dtype = match storage {
        Storage::F32 => Dtype::F32,
        Storage::Bf16 => Dtype::BF16,
    };
    codec::decode(bytes, dtype)
}

impl Cuda {
    /// A zero-filled buffer of `len` values in `storage`.
    pub(super) fn buffer(&self, len: usize, storage: Storage) -> Buf {
        Buf { data: self.zeros::<u8>(len * storage.size()), len, storage, ready: None }
    }

    /// Checks the storage types of an op's buffers: `acts` are activations
    /// or compute copies (the backend's storage), `state` are f32.
    pub(super) fn roles(&self, op: &str, acts: &[&Buf], state: &[&Buf]) {
        for (i, b) in acts.iter().enumerate() {
            assert!(
                b.storage == self.storage,
                "{op}: activation buffer {i} is {:?}, the backend stores {:?} (a state buffer passed as an activation?)",
                b.storage,
                self.storage
            );
        }
        for (i, b) in state.iter().enumerate() {
            assert!(
                b.storage == Storage::F32,
                "{op}: state buffer {i} (a gradient, statistic or optimizer state) is {:?}, must be F32 \
                 (allocate it with alloc_state)",
                b.storage
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 keeps 8 bits of mantissa, rounded to nearest even; f32 is exact.
    #[test]
    fn host_encoding_round_trips() {
        let v = [1.0f32, -2.5, 3.3125, 1e-3, 65504.0, 0.0];
        assert_eq!(decode(&encode(&v, Storage::F32), Storage::F32), v);
        let back = decode(&encode(&v, Storage::Bf16), Storage::Bf16);
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 256.0, "{a} -> {b}");
        }
        assert_eq!(back[0], 1.0);
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: even wins.
        assert_eq!(decode(&encode(&[1.0 + 1.0 / 256.0], Storage::Bf16), Storage::Bf16), [1.0]);
        assert_eq!(encode(&[1.0], Storage::Bf16), 0x3f80u16.to_le_bytes());
    }
}
