// Row kernels of softmax attention (worker/src/engine/cpu/attention.rs); the
// GEMMs around them are cuBLAS (attention.rs). One block per score row of
// `seq` values; the block size must be a multiple of 32 (at most 1024).
// Reductions are fixed trees (warp shuffles, then one warp over the warp
// totals), so results are the same run to run.

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (is_max == 0) or max (is_max == 1) of v over the block, returned to
// every thread. Every thread of the block must call it; `sh` holds 33 floats.
// The last barrier lets the caller reuse `sh` for the next reduction.
__device__ float block_reduce(float v, float* sh, int is_max) {
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const float identity = is_max ? __int_as_float(0xff800000) : 0.0f;
        float w = lane < warps ? sh[lane] : identity;
        w = is_max ? warp_max(w) : warp_sum(w);
        if (lane == 0) sh[32] = w;
    }
    __syncthreads();
    const float r = sh[32];
    __syncthreads();
    return r;
}

// In-place softmax of each row of scores [rows, seq]; with `causal`, row
// i (its query index is row % seq) sees keys 0..=i and the rest get 0.
// Each thread rereads only the values it wrote itself.
extern "C" __global__ void softmax_rows_f32(act_t* p, unsigned long long seq, int causal) {
    __shared__ float sh[33];
    act_t* x = p + (unsigned long long)blockIdx.x * seq;
    const unsigned long long visible = causal ? (unsigned long long)blockIdx.x % seq + 1 : seq;
    float mx = __int_as_float(0xff800000);  // -inf
    for (unsigned long long j = threadIdx.x; j < visible; j += blockDim.x) mx = fmaxf(mx, x[j]);
    mx = block_reduce(mx, sh, 1);
    float sum = 0.0f;
    for (unsigned long long j = threadIdx.x; j < visible; j += blockDim.x) {
        const float e = expf(x[j] - mx);
        x[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, sh, 0);
    // Multiply by the reciprocal, as the CPU backend does.
    const float inv = 1.0f / sum;
    for (unsigned long long j = threadIdx.x; j < seq; j += blockDim.x) x[j] = j < visible ? x[j] * inv : 0.0f;
}

// Softmax backward per row, in place on ds (which holds dP on entry):
// dS = P * (dP - rowsum(dP * P)) * scale. Masked entries have P = 0, so
// they come out 0 without a mask.
extern "C" __global__ void softmax_bwd_rows_f32(const act_t* p, act_t* ds, unsigned long long seq, float scale) {
    __shared__ float sh[33];
    const unsigned long long off = (unsigned long long)blockIdx.x * seq;
    const act_t* pr = p + off;
    act_t* dr = ds + off;
    float dot = 0.0f;
    for (unsigned long long j = threadIdx.x; j < seq; j += blockDim.x) dot += pr[j] * dr[j];
    dot = block_reduce(dot, sh, 0);
    for (unsigned long long j = threadIdx.x; j < seq; j += blockDim.x) dr[j] = pr[j] * (dr[j] - dot) * scale;
}
