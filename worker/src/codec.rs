//! The host codec of tensors: f32 values to and from little-endian f32,
//! bf16 (round to nearest even) and f16 bytes, in parallel. A leaf that the
//! model's weight files, the checkpoint's optimizer files and the CUDA
//! backend's bf16 buffers all use, so the three encode alike.

use rayon::prelude::*;
use safetensors::tensor::Dtype;

/// The element type `save_model_dir` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
}

impl SaveDtype {
    /// The safetensors element type.
    pub fn safetensors(self) -> Dtype {
        match self {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::Bf16 => Dtype::BF16,
        }
    }
    pub fn size(self) -> usize {
        match self {
            SaveDtype::F32 => 4,
            SaveDtype::Bf16 => 2,
        }
    }
}

/// Elements converted per rayon task.
const CHUNK: usize = 1 << 16;

/// Decodes little-endian f32/bf16/f16 bytes into f32.
pub fn decode(data: &[u8], dtype: Dtype) -> Vec<f32> {
    let size = dtype.size();
    let mut out = vec![0f32; data.len() / size];
    out.par_chunks_mut(CHUNK).zip(data.par_chunks(CHUNK * size)).for_each(|(o, d)| match dtype {
        Dtype::F32 => {
            for (x, b) in o.iter_mut().zip(d.chunks_exact(4)) {
                *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (x, b) in o.iter_mut().zip(d.chunks_exact(2)) {
                *x = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        Dtype::F16 => {
            for (x, b) in o.iter_mut().zip(d.chunks_exact(2)) {
                *x = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        // The caller admits only the three types above.
        _ => {}
    });
    out
}

/// Encodes f32 values as little-endian f32 or bf16 (round to nearest even).
pub fn encode(data: &[f32], dtype: SaveDtype) -> Vec<u8> {
    let size = dtype.size();
    let mut out = vec![0u8; data.len() * size];
    out.par_chunks_mut(CHUNK * size).zip(data.par_chunks(CHUNK)).for_each(|(o, d)| match dtype {
        SaveDtype::F32 => {
            for (b, x) in o.chunks_exact_mut(4).zip(d) {
                b.copy_from_slice(&x.to_le_bytes());
            }
        }
        SaveDtype::Bf16 => {
            for (b, x) in o.chunks_exact_mut(2).zip(d) {
                b.copy_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
    });
    out
}
