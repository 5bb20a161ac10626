// Elementwise kernels of the Backend op list (worker/src/engine/backend.rs),
// on act_t buffers (storage.cuh): the module of a buffer's storage type runs
// it, f32 for gradients and optimizer state. Each thread walks the array with a grid-stride loop, so any launch
// size covers any length. Compiled at start with NVRTC for the device's
// compute capability; CI compiles this file for sm_80 and sm_90.

#define GRID_STRIDE(i, n)                                                                              \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

extern "C" __global__ void fill_f32(act_t* x, float value, unsigned long long n) {
    GRID_STRIDE(i, n) { x[i] = value; }
}

// Storage conversions for `copy` between buffers of different types: a
// master weight into its compute copy, and back. With f32 storage both are
// plain copies (and unused: equal types copy with cuMemcpy).
extern "C" __global__ void act_from_f32(const float* src, act_t* dst, unsigned long long n) {
    GRID_STRIDE(i, n) { dst[i] = src[i]; }
}

extern "C" __global__ void f32_from_act(const act_t* src, float* dst, unsigned long long n) {
    GRID_STRIDE(i, n) { dst[i] = src[i]; }
}

// y += alpha * x
extern "C" __global__ void axpy_f32(float alpha, const act_t* x, act_t* y, unsigned long long n) {
    GRID_STRIDE(i, n) { y[i] += alpha * x[i]; }
}

// x *= s
extern "C" __global__ void scale_f32(act_t* x, float s, unsigned long long n) {
    GRID_STRIDE(i, n) { x[i] *= s; }
}

// y[r, c] += bias[c % cols] over rows * cols values: the bias of a linear
// layer, and (with cols = rows * width) a learned position table.
extern "C" __global__ void bias_add_f32(act_t* y, const act_t* bias, unsigned long long cols, unsigned long long n) {
    GRID_STRIDE(i, n) { y[i] += bias[i % cols]; }
}

// First pass of sum(x^2): block b sums its grid-stride share in f64 and
// adds it to partial[b] (zeroed by the host), so that several buffers
// launched in turn on one stream sum into the same partials. The host
// launches a fixed grid, and the second pass adds the partials in order,
// so the result is deterministic.
// Threads per block of sum_squares_partial_f32 (worker/src/engine/cuda/
// elementwise.rs launches THREADS, checked by a test there).
#define SUM_THREADS 256

extern "C" __global__ void sum_squares_partial_f32(const act_t* x, double* partial, unsigned long long n) {
    __shared__ double lane[SUM_THREADS];
    double acc = 0.0;
    GRID_STRIDE(i, n) {
        double v = x[i];
        acc += v * v;
    }
    lane[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) lane[threadIdx.x] += lane[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] += lane[0];
}

// Second pass: one thread adds the partials in order.
extern "C" __global__ void sum_partials_f64(const double* partial, double* out, unsigned long long n) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double acc = 0.0;
        for (unsigned long long i = 0; i < n; ++i) acc += partial[i];
        out[0] = acc;
    }
}
