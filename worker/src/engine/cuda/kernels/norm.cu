// LayerNorm and RMSNorm over the last axis (worker/src/engine/cpu/norm.rs),
// f32 with the CPU's formulas. Row kernels run one block of ROW_THREADS per
// row (norm.rs launches exactly that many: the reductions assume it) and
// reduce in f64 with a fixed tree, so results are the same run to run.
// Backward adds into dx, dw and db; dw and db are column sums over rows,
// done without atomics: fixed chunks of rows give partial sums, which a
// second kernel (columns.cu) adds in chunk order.

#define ROW_THREADS 256

// Sum of v over the block, returned to every thread. Every thread of the
// block must call it (it holds barriers); lane has ROW_THREADS entries.
__device__ double block_sum(double v, double* lane) {
    lane[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = ROW_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) lane[threadIdx.x] += lane[threadIdx.x + s];
        __syncthreads();
    }
    double total = lane[0];
    __syncthreads();  // lane is reused by the next call
    return total;
}

// One row of LayerNorm, run by the whole block (it holds barriers: every
// thread must call it): yr = (xr - mean) * rstd * w + b; mean and variance
// in f64 (two passes, as on the CPU), saved as f32 mean[blockIdx.x] and
// rstd[blockIdx.x]. lane has ROW_THREADS entries.
__device__ void layernorm_row(const act_t* xr, const act_t* w, const act_t* b, act_t* yr, float* mean, float* rstd,
                              unsigned long long cols, float eps, double* lane) {
    double acc = 0.0;
    for (unsigned long long i = threadIdx.x; i < cols; i += ROW_THREADS) acc += (double)xr[i];
    const double mu = block_sum(acc, lane) / (double)cols;
    acc = 0.0;
    for (unsigned long long i = threadIdx.x; i < cols; i += ROW_THREADS) {
        double d = (double)xr[i] - mu;
        acc += d * d;
    }
    const double var = block_sum(acc, lane) / (double)cols;
    const float mu_f = (float)mu;
    const float rs_f = (float)(1.0 / sqrt(var + (double)eps));
    for (unsigned long long i = threadIdx.x; i < cols; i += ROW_THREADS) yr[i] = (xr[i] - mu_f) * rs_f * w[i] + b[i];
    if (threadIdx.x == 0) {
        mean[blockIdx.x] = mu_f;
        rstd[blockIdx.x] = rs_f;
    }
}

// y = (x - mean) * rstd * w + b, one block per row (layernorm_row).
extern "C" __global__ void layernorm_fwd_f32(const act_t* x, const act_t* w, const act_t* b, act_t* y, float* mean,
                                             float* rstd, unsigned long long cols, float eps) {
    __shared__ double lane[ROW_THREADS];
    const unsigned long long off = (unsigned long long)blockIdx.x * cols;
    layernorm_row(x + off, w, b, y + off, mean, rstd, cols, eps, lane);
}

// x1 += residual, then LayerNorm of the new x1 as layernorm_fwd_f32: the
// residual add of a pre-norm block fused with the norm after it, one block
// per row. x1 keeps the sum (backward and the next residual read it).
extern "C" __global__ void add_layernorm_fwd_f32(act_t* x1, const act_t* residual, const act_t* w, const act_t* b,
                                                 act_t* y, float* mean, float* rstd, unsigned long long cols,
                                                 float eps) {
    __shared__ double lane[ROW_THREADS];
    const unsigned long long off = (unsigned long long)blockIdx.x * cols;
    act_t* xr = x1 + off;
    const act_t* rr = residual + off;
    for (unsigned long long i = threadIdx.x; i < cols; i += ROW_THREADS) xr[i] += rr[i];
    // Every thread's part of the sum lands before any thread reads the row
    // (layernorm_row reads with this same stride today, but need not).
    __syncthreads();
    layernorm_row(xr, w, b, y + off, mean, rstd, cols, eps, lane);
}

// dx += rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w*xhat)), xhat = (x - mean) * rstd.
extern "C" __global__ void layernorm_bwd_dx_f32(const act_t* x, const act_t* w, const float* mean, const float* rstd,
                                                const act_t* dy, act_t* dx, unsigned long long cols) {
    __shared__ double lane[ROW_THREADS];
    const unsigned long long off = (unsigned long long)blockIdx.x * cols;
    const act_t* xr = x + off;
    const act_t* dyr = dy + off;
    act_t* dxr = dx + off;
    const float mu = mean[blockIdx.x], rs = rstd[blockIdx.x];
    double a = 0.0, b = 0.0;
    for (unsigned long long i = threadIdx.x; i < cols; i += ROW_THREADS) {
        float dxhat = dyr[i] * w[i];
        a += (double)dxhat;
        b += (double)(dxhat * (xr[i] - mu) * rs);
    }
    const float sum_dxhat = (float)block_sum(a, lane);
    const float sum_dxhat_xhat = (float)block_sum(b, lane);
    const float inv_n = 1.0f / (float)cols;
    for (unsigned long long i = threadIdx.x; i < cols; i += ROW_THREADS) {
        float xhat = (xr[i] - mu) * rs;
        dxr[i] += rs * (dyr[i] * w[i] - inv_n * sum_dxhat - xhat * inv_n * sum_dxhat_xhat);
    }
}

// Parameter-gradient partials of LayerNorm: block (chunk, column block);
// each thread sums rows [chunk * chunk_rows, ...) of its column in order,
// in f64: part_w[chunk, c] = sum dy * (x - mean) * rstd, part_b[chunk, c] = sum dy.
extern "C" __global__ void layernorm_bwd_params_partial_f32(const act_t* x, const float* mean, const float* rstd,
                                                            const act_t* dy, double* part_w, double* part_b,
                                                            unsigned long long rows, unsigned long long cols,
                                                            unsigned long long chunk_rows) {
    const unsigned long long c = blockIdx.y * (unsigned long long)blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const unsigned long long r0 = blockIdx.x * chunk_rows;
    const unsigned long long r1 = min(rows, r0 + chunk_rows);
    double aw = 0.0, ab = 0.0;
    for (unsigned long long r = r0; r < r1; ++r) {
        const unsigned long long i = r * cols + c;
        float g = dy[i];
        aw += (double)(g * (x[i] - mean[r]) * rstd[r]);
        ab += (double)g;
    }
    part_w[blockIdx.x * cols + c] = aw;
    part_b[blockIdx.x * cols + c] = ab;
}

// y = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) with the mean in f64.
extern "C" __global__ void rmsnorm_fwd_f32(const act_t* x, const act_t* w, act_t* y, float* rstd,
                                           unsigned long long cols, float eps) {
    __shared__ double lane[ROW_THREADS];
    const unsigned long long off = (unsigned long long)blockIdx.x * cols;
    const act_t* xr = x + off;
    act_t* yr = y + off;
    double acc = 0.0;
    for (unsigned long long i = threadIdx.x; i < cols; i += ROW_THREADS) {
        double v = (double)xr[i];
        acc += v * v;
    }
    const double ms = block_sum(acc, lane) / (double)cols;
    const float rs = (float)(1.0 / sqrt(ms + (double)eps));
    for (unsigned long long i = threadIdx.x; i < cols; i += ROW_THREADS) yr[i] = w[i] * (xr[i] * rs);
    if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
}

// dx += dy*w*rstd - x * (sum(dy*w*x) * rstd^3 / cols)
extern "C" __global__ void rmsnorm_bwd_dx_f32(const act_t* x, const act_t* w, const float* rstd, const act_t* dy,
                                              act_t* dx, unsigned long long cols) {
    __shared__ double lane[ROW_THREADS];
    const unsigned long long off = (unsigned long long)blockIdx.x * cols;
    const act_t* xr = x + off;
    const act_t* dyr = dy + off;
    act_t* dxr = dx + off;
    const float rs = rstd[blockIdx.x];
    double acc = 0.0;
    for (unsigned long long i = threadIdx.x; i < cols; i += ROW_THREADS) acc += (double)(dyr[i] * w[i] * xr[i]);
    const float dot = (float)block_sum(acc, lane);
    const float k = dot * rs * rs * rs / (float)cols;
    for (unsigned long long i = threadIdx.x; i < cols; i += ROW_THREADS) dxr[i] += dyr[i] * w[i] * rs - xr[i] * k;
}

// RMSNorm's dw partials, as layernorm_bwd_params_partial_f32: part_w[chunk, c] = sum dy * x * rstd.
extern "C" __global__ void rmsnorm_bwd_params_partial_f32(const act_t* x, const float* rstd, const act_t* dy,
                                                          double* part_w, unsigned long long rows,
                                                          unsigned long long cols, unsigned long long chunk_rows) {
    const unsigned long long c = blockIdx.y * (unsigned long long)blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const unsigned long long r0 = blockIdx.x * chunk_rows;
    const unsigned long long r1 = min(rows, r0 + chunk_rows);
    double aw = 0.0;
    for (unsigned long long r = r0; r < r1; ++r) {
        const unsigned long long i = r * cols + c;
        aw += (double)(dy[i] * x[i] * rstd[r]);
    }
    part_w[blockIdx.x * cols + c] = aw;
}
