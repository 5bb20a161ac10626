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

use std::ops::Range;

/// Sums and gathers buffers across the ranks of a job.
///
/// The sharded operations ([`reduce_scatter_sum`](Self::reduce_scatter_sum),
/// [`all_gather`](Self::all_gather), for a sharded optimizer) cut a buffer
/// of `len` values into `W = world_size` equal shards, shard `r` being
/// [`shard_range`]`(len, W, r)`, i.e. `r * len / W .. (r + 1) * len / W`;
/// rank `r` owns shard `r`. `len` must be a multiple of `W` (callers pad):
/// any other length is an error that names both numbers, never a panic.
/// With one rank both are no-ops. Their errors are those of
/// `all_reduce_sum` (an aborted or broken collective names the rank, the
/// operation, the element count and, on the ring, the generation). The
/// ring counts a refused length as a failed call too, which breaks it for
/// good like any other (the other ranks may be in the call already, and
/// the shutdown releases them); NCCL refuses it before NCCL sees the call.
pub trait Collective: Send {
    /// What is reduced in place: host memory for the TCP ring, device memory
    /// for NCCL. It matches the backend's buffer type, so gradient buckets
    /// need no staging copy the backend could avoid.
    type Buf: Send;

    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Sums `buf` across all ranks in place. Every rank ends with the same
    /// bits. The TCP ring's reduction order is fixed, so a run repeats bit
    /// for bit: it cuts a buffer of any length into chunks
    /// `shard_range(len, W, c)` and sums each value of chunk c as
    /// `((x[c+1] + x[c+2]) + ...) + x[c]` (ranks mod W). NCCL picks its algorithm (ring, tree, NVLS) from the size,
    /// the topology and its version: the same job on the same machines
    /// repeats, another NCCL or cluster may round differently unless
    /// NCCL_ALGO and NCCL_PROTO are pinned.
    fn all_reduce_sum(&mut self, buf: &mut Self::Buf) -> anyhow::Result<()>;

    /// Sums a few host counters exactly (the step's global target-token
    /// count, which divides every gradient).
    fn all_reduce_sum_u64(&mut self, values: &mut [u64]) -> anyhow::Result<()>;

    /// Afterwards shard `rank` of `buf` on this rank holds the sum over all
    /// ranks of that shard; the rest of `buf` is unspecified (it may hold
    /// partial sums or the inputs) and must be overwritten, by
    /// [`all_gather`](Self::all_gather) say, before it is read.
    /// `buf.len()` must be a multiple of the world size (see the trait's
    /// docs).
    ///
    /// Order: on the TCP ring, fixed, so a run repeats bit for bit: value
    /// `i` of shard `c` is summed as `((x[c+1] + x[c+2]) + ...) + x[c]`
    /// (`x[q]` is rank q's value, ranks mod W), starting at the rank after
    /// the owner and ending at the owner. `all_reduce_sum` sums every value
    /// of a buffer of the same length in that same order, so a
    /// reduce-scatter followed by an all-gather gives the all-reduce's bits.
    /// NCCL's order is its own (see `all_reduce_sum`), and may differ from
    /// its all-reduce's.
    fn reduce_scatter_sum(&mut self, buf: &mut Self::Buf) -> anyhow::Result<()>;

    /// Copies shard `rank` of this rank's `buf` into shard `rank` of every
    /// rank's `buf`, so that afterwards every rank holds the same bits in
    /// the whole buffer: the concatenation of the owners' shards. Only
    /// copies, no arithmetic. `buf.len()` must be a multiple of the world
    /// size (see the trait's docs).
    fn all_gather(&mut self, buf: &mut Self::Buf) -> anyhow::Result<()>;
}

/// The values `[rank * len / W, (rank + 1) * len / W)` of a buffer of `len`
/// values cut into `W = world_size` shards: the part that rank `rank` owns
/// after [`Collective::reduce_scatter_sum`] and sends in
/// [`Collective::all_gather`]. For a multiple of the world size (what those
/// two accept) all shards are equal; otherwise (the ring's all-reduce cuts
/// any length this way) they differ by at most one value. Needs
/// `rank < world_size`.
pub fn shard_range(len: usize, world_size: usize, rank: usize) -> Range<usize> {
    debug_assert!(rank < world_size, "rank {rank} of world size {world_size}");
    // floor(r * len / W) without the product, which could overflow.
    let (per, extra) = (len / world_size, len % world_size);
    let start = |r: usize| r * per + r * extra / world_size;
    start(rank)..start(rank + 1)
}

/// The error of a sharded operation on a buffer the shards do not tile.
pub(crate) fn check_shardable(len: usize, world_size: usize) -> anyhow::Result<()> {
    if !len.is_multiple_of(world_size) {
        anyhow::bail!(
            "the buffer's length {len} is not a multiple of the world size {world_size} (callers pad to a multiple)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards tile the buffer in rank order, equal for a multiple of the
    /// world size, within one value otherwise, and match the formula.
    #[test]
    fn shards_tile_the_buffer() {
        for w in 1..=7 {
            for len in [0usize, 1, 2, 5, 6, 7, 12, 13, 1000, 1001] {
                let ranges: Vec<_> = (0..w).map(|r| shard_range(len, w, r)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[w - 1].end, len);
                for (r, s) in ranges.iter().enumerate() {
                    assert_eq!(*s, r * len / w..(r + 1) * len / w, "w={w} len={len} r={r}");
                    assert!(s.len() == len / w || s.len() == len / w + 1);
                    if len.is_multiple_of(w) {
                        assert_eq!(s.len(), len / w);
                    }
                }
            }
        }
        // No overflow where r * len would.
        let big = usize::MAX / 2;
        assert_eq!(shard_range(big, 4, 3).end, big);
    }

    #[test]
    fn a_length_the_shards_do_not_tile_names_both_numbers() {
        assert!(check_shardable(12, 3).is_ok());
        assert!(check_shardable(0, 4).is_ok());
        let e = check_shardable(10, 4).unwrap_err().to_string();
        assert!(e.contains("length 10") && e.contains("world size 4"), "{e}");
    }
}
