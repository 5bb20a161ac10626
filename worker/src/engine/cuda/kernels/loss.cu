// Cross-entropy with ignore index, fused forward and backward
// (worker/src/engine/cpu/loss.rs). One block of CE_THREADS per row (loss.rs
// launches exactly that many: the reductions assume it): one pass finds the
// row's max and sum of exp(x - max) together (online softmax, the sum in
// f64), a second writes dlogits; probabilities are never stored. Per-row
// losses go to row_loss, and sum_rows_f64 adds them in a fixed order.

#define CE_THREADS 256

#define NEG_INF __int_as_float(0xff800000)

// Folds (m2, s2) into (m, s), where s is a sum of exp(x - m). A side whose
// max is -inf holds no finite values and adds nothing.
__device__ __forceinline__ void merge(float& m, double& s, float m2, double s2) {
    const float mm = m2 > m ? m2 : m;
    const double a = (m == mm) ? s : s * exp((double)m - (double)mm);
    const double b = (m2 == mm) ? s2 : s2 * exp((double)m2 - (double)mm);
    m = mm;
    s = a + b;
}

// Row blockIdx.x: row_loss[row] = log(sum exp x) - x[t] (0 for an ignored row,
// NaN for a target past the vocab, whose row is also flagged in bad as
// n - row, so the host can name the first one). With dlogits, writes
// grad_scale * (softmax - onehot), or zeros for an ignored row.
__device__ void cross_entropy_row(const act_t* logits, const int* targets, act_t* dlogits, double* row_loss,
                                  unsigned long long* bad, unsigned long long n, unsigned long long vocab,
                                  float grad_scale) {
    __shared__ float lane_m[CE_THREADS];
    __shared__ double lane_s[CE_THREADS];
    const unsigned long long row = blockIdx.x;
    const act_t* x = logits + row * vocab;
    act_t* d = dlogits ? dlogits + row * vocab : 0;
    const int t = targets[row];
    if (t < 0) {  // uniform over the block: no barrier is skipped by only some threads
        if (d)
            for (unsigned long long j = threadIdx.x; j < vocab; j += CE_THREADS) d[j] = 0.0f;
        if (threadIdx.x == 0) row_loss[row] = 0.0;
        return;
    }
    if ((unsigned long long)t >= vocab) {
        if (threadIdx.x == 0) {
            row_loss[row] = __longlong_as_double(0x7ff8000000000000LL);  // NaN
            atomicMax(bad, n - row);  // integer max: the same whatever the order
        }
        return;
    }
    float m = NEG_INF;
    double s = 0.0;
    for (unsigned long long j = threadIdx.x; j < vocab; j += CE_THREADS) {
        const float v = x[j];
        if (v > m) {  // a new max rescales the sum so far (0 while m is -inf)
            s *= exp((double)m - (double)v);
            m = v;
        }
        // -inf adds nothing (and -inf - -inf would be NaN); NaN propagates.
        if (v != NEG_INF) s += (double)expf(v - m);
    }
    lane_m[threadIdx.x] = m;
    lane_s[threadIdx.x] = s;
    __syncthreads();
    for (unsigned int k = CE_THREADS / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) {
            float mm = lane_m[threadIdx.x];
            double ss = lane_s[threadIdx.x];
            merge(mm, ss, lane_m[threadIdx.x + k], lane_s[threadIdx.x + k]);
            lane_m[threadIdx.x] = mm;
            lane_s[threadIdx.x] = ss;
        }
        __syncthreads();
    }
    const float mx = lane_m[0];
    const double sum = lane_s[0];
    const double xt = (double)x[t];
    if (threadIdx.x == 0) row_loss[row] = log(sum) + (double)mx - xt;
    if (d) {
        const double k = (double)grad_scale / sum;
        // The target's entry is p_t - 1 with p_t in f64 (exact where p_t is
        // near 1); its owner writes it, so no other thread touches it.
        const float dt = (float)((double)grad_scale * (exp(xt - (double)mx) / sum - 1.0));
        for (unsigned long long j = threadIdx.x; j < vocab; j += CE_THREADS)
            d[j] = (j == (unsigned long long)t) ? dt : (float)((double)expf(x[j] - mx) * k);
    }
}

extern "C" __global__ void cross_entropy_f32(const act_t* logits, const int* targets, double* row_loss,
                                             unsigned long long* bad, unsigned long long n,
                                             unsigned long long vocab) {
    cross_entropy_row(logits, targets, 0, row_loss, bad, n, vocab, 1.0f);
}

extern "C" __global__ void cross_entropy_grad_f32(const act_t* logits, const int* targets, act_t* dlogits,
                                                  double* row_loss, unsigned long long* bad, unsigned long long n,
                                                  unsigned long long vocab, float grad_scale) {
    cross_entropy_row(logits, targets, dlogits, row_loss, bad, n, vocab, grad_scale);
}

// out[0] = sum of x[0..n] with one block of CE_THREADS: thread i adds
// x[i], x[i + CE_THREADS], ... in order, then a fixed tree. Deterministic.
extern "C" __global__ void sum_rows_f64(const double* x, double* out, unsigned long long n) {
    __shared__ double lane[CE_THREADS];
    double acc = 0.0;
    for (unsigned long long i = threadIdx.x; i < n; i += CE_THREADS) acc += x[i];
    lane[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned int k = CE_THREADS / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) lane[threadIdx.x] += lane[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = lane[0];
}
