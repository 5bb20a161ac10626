//! Collectives between the ranks of a data-parallel job. Every rank calls the
//! same operations in the same order; the TCP ring (CPU workers) and NCCL
//! (GPU workers) both fill the one `Collective` trait, so the training loop
//! never knows which one sums its gradients.

#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(feature = "cuda")]
mod nccl_lib;
pub mod ring;
#[cfg(target_os = "linux")]
mod shm;

/// Sums buffers across the ranks of a job.
pub trait Collective: Send {
    /// What is reduced in place: host memory for the TCP ring, device memory
    /// for NCCL. It matches the backend's buffer type, so gradient buckets
    /// need no staging copy the backend could avoid.
    type Buf: Send;

    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Sums `buf` across all ranks in place. Every rank ends with the same
    /// bits. The TCP ring's reduction order is fixed, so a run repeats bit
    /// for bit. NCCL picks its algorithm (ring, tree, NVLS) from the size,
    /// the topology and its version: the same job on the same machines
    /// repeats, another NCCL or cluster may round differently unless
    /// NCCL_ALGO and NCCL_PROTO are pinned.
    fn all_reduce_sum(&mut self, buf: &mut Self::Buf) -> anyhow::Result<()>;

    /// Sums a few host counters exactly (the step's global target-token
    /// count, which divides every gradient).
    fn all_reduce_sum_u64(&mut self, values: &mut [u64]) -> anyhow::Result<()>;
}
