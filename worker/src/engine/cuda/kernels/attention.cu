// Kernels of fused (flash-style) softmax attention, per sequence and key
// block (worker/src/engine/cpu/attention.rs is the reference); the GEMMs
// around them are cuBLAS (attention.rs). Layouts, for the `heads` heads of
// one sequence of `seq` queries:
// - a score block: [heads, rows, kb] f32, rows = seq - i0 query rows from
//   i0 (j0 with causal, else 0) against the kb keys from j0;
// - row statistics (running max and sum, lse, delta): [heads, seq] f32;
// - accumulators and the activations' slice: [seq, heads, head_dim].
// Row kernels run one block per row with a multiple of 32 threads (at most
// 1024). Reductions are fixed trees (warp shuffles, then one warp over the
// warp totals), so results are the same run to run.
//
// P and dS are written as act_t: in place over their f32 inputs with f32
// activations, bf16 copies otherwise, as the GEMMs that take them beside
// bf16 tensors need (the rounding is that of act_from_f32).

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

// Keys of block j0.. (kb of them) that query i sees: with causal, those up
// to i (at least one: a causal block's rows start at its first key).
__device__ __forceinline__ unsigned long long visible_keys(unsigned long long i, unsigned long long j0,
                                                           unsigned long long kb, int causal) {
    if (!causal) return kb;
    const unsigned long long v = i - j0 + 1;
    return v < kb ? v : kb;
}

// Online-softmax update for one score row of key block j0 (blockIdx.x =
// h * rows + r, query i = i0 + r): the new running max m over the visible
// keys, P = exp(S - m) (0 for masked keys) into p, the running sum
// l = l * exp(m_old - m) + sum(P), and that row of the output accumulator
// o rescaled by the same correction. `first` (key block 0, which every row
// sees) starts from m = -inf, l = 0 and leaves o, which the P V GEMM then
// overwrites (beta 0), unread.
extern "C" __global__ void attn_fwd_block_rows(const float* s, act_t* p, float* m, float* l, float* o,
                                               unsigned long long seq, unsigned long long heads,
                                               unsigned long long head_dim, unsigned long long j0,
                                               unsigned long long kb, int causal, int first) {
    __shared__ float sh[33];
    const unsigned long long i0 = causal ? j0 : 0, rows = seq - i0;
    const unsigned long long h = blockIdx.x / rows, i = i0 + blockIdx.x % rows;
    const unsigned long long visible = visible_keys(i, j0, kb, causal), at = h * seq + i;
    const float* x = s + (unsigned long long)blockIdx.x * kb;
    act_t* px = p + (unsigned long long)blockIdx.x * kb;
    const float m_old = first ? __int_as_float(0xff800000) : m[at];
    float mx = __int_as_float(0xff800000);
    for (unsigned long long j = threadIdx.x; j < visible; j += blockDim.x) mx = fmaxf(mx, x[j]);
    const float m_new = fmaxf(m_old, block_reduce(mx, sh, 1));
    // exp(-inf) = 0 for the first block, as on the CPU.
    const float correction = expf(m_old - m_new);
    float sum = 0.0f;
    // Each thread rewrites only the values it read (p may be s itself).
    for (unsigned long long j = threadIdx.x; j < kb; j += blockDim.x) {
        const float e = j < visible ? expf(x[j] - m_new) : 0.0f;
        px[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, sh, 0);
    // Every thread read m[at] before block_reduce's barriers.
    if (threadIdx.x == 0) {
        l[at] = first ? sum : l[at] * correction + sum;
        m[at] = m_new;
    }
    if (!first) {
        float* orow = o + (i * heads + h) * head_dim;
        for (unsigned long long c = threadIdx.x; c < head_dim; c += blockDim.x) orow[c] *= correction;
    }
}

// After the last key block, row blockIdx.x = i * heads + h of the sequence:
// out = o / l (times the reciprocal, as the CPU) and lse = m + log(l).
extern "C" __global__ void attn_fwd_finish_rows(const float* o, const float* m, const float* l, float* lse,
                                                act_t* out, unsigned long long seq, unsigned long long heads,
                                                unsigned long long head_dim) {
    const unsigned long long row = blockIdx.x, at = (row % heads) * seq + row / heads;
    const float inv = 1.0f / l[at];
    for (unsigned long long c = threadIdx.x; c < head_dim; c += blockDim.x) {
        out[row * head_dim + c] = o[row * head_dim + c] * inv;
    }
    if (threadIdx.x == 0) lse[at] = m[at] + logf(l[at]);
}

// delta[h, i] = rowsum(dO * O) for row blockIdx.x = i * heads + h of the
// sequence: the softmax backward's correction, without the probabilities.
extern "C" __global__ void attn_bwd_delta_rows(const act_t* dout, const act_t* out, float* delta,
                                               unsigned long long seq, unsigned long long heads,
                                               unsigned long long head_dim) {
    __shared__ float sh[33];
    const unsigned long long row = blockIdx.x;
    const act_t* d = dout + row * head_dim;
    const act_t* x = out + row * head_dim;
    float dot = 0.0f;
    for (unsigned long long c = threadIdx.x; c < head_dim; c += blockDim.x) dot += (float)d[c] * (float)x[c];
    dot = block_reduce(dot, sh, 0);
    if (threadIdx.x == 0) delta[(row % heads) * seq + row / heads] = dot;
}

// Backward of key block j0 for one score row (blockIdx.x = h * rows + r,
// query i = i0 + r): P = exp(S - lse) as forward left it (0 for masked
// keys) into p, dS = P * (dP - delta) * scale into ds. p and ds may be s
// and dp themselves (each thread rewrites only what it read).
extern "C" __global__ void attn_bwd_block_rows(const float* s, const float* dp, const float* lse, const float* delta,
                                               act_t* p, act_t* ds, unsigned long long seq, unsigned long long j0,
                                               unsigned long long kb, int causal, float scale) {
    const unsigned long long i0 = causal ? j0 : 0, rows = seq - i0;
    const unsigned long long i = i0 + blockIdx.x % rows, at = (blockIdx.x / rows) * seq + i;
    const unsigned long long visible = visible_keys(i, j0, kb, causal), off = (unsigned long long)blockIdx.x * kb;
    const float row_lse = lse[at], row_delta = delta[at];
    for (unsigned long long j = threadIdx.x; j < kb; j += blockDim.x) {
        const float pv = j < visible ? expf(s[off + j] - row_lse) : 0.0f;
        const float g = pv * (dp[off + j] - row_delta) * scale;
        p[off + j] = pv;
        ds[off + j] = g;
    }
}

// dst += src over n values: dQ, accumulated in f32 over the key blocks,
// added into the gradient once (a bf16 dq is rounded once, not per block).
extern "C" __global__ void attn_add_f32(const float* src, act_t* dst, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        dst[i] += src[i];
    }
}
