// Test-only kernels of the emulated device (the "test" build, act_t =
// float): each broken one must make its launch fail with an error naming
// it (emu_ffi.rs's tests), and block_sum_f32 checks the barriers and
// shuffles give the right answer.

// Writes x[i] for i <= n: the last thread writes one past the end.
extern "C" __global__ void oob_index_f32(float* x, unsigned long long n) {
    const unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i <= n) x[i] = 1.0f;
}

// Writes the value before the buffer's start.
extern "C" __global__ void underflow_write_f32(float* x) {
    if (threadIdx.x == 0 && blockIdx.x == 0) x[-1] = 1.0f;
}

// Traps in one thread when *flag is nonzero.
extern "C" __global__ void trap_f32(int* flag) {
    if (*flag != 0 && threadIdx.x == 3) __trap();
}

// Only the even threads reach the first barrier: the odd ones wait at the
// second, a different one, which is undefined on a GPU.
extern "C" __global__ void divergent_barrier_f32(float* x) {
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
        x[threadIdx.x] = 1.0f;
    }
    __syncthreads();
}

// out[blockIdx.x] = sum of x over the block's threads (one value each), by
// warp shuffles, then shared memory and a barrier, then one warp's shuffles.
// The block size must be a multiple of 32.
extern "C" __global__ void block_sum_f32(const float* x, double* out) {
    __shared__ double warp_sums[32];
    const unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    double v = x[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = lane < blockDim.x / 32 ? warp_sums[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) w += __shfl_down_sync(0xffffffffu, w, o);
        if (lane == 0) out[blockIdx.x] = w;
    }
}

// Shuffles in a block that ends in a partial warp: lane 0 of the last warp
// reads lane 16, which does not exist when the block has 48 threads.
extern "C" __global__ void partial_warp_shuffle_f32(float* x) {
    x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 16);
}

// Lanes 0-15 of each warp shuffle while lanes 16-31 wait at __syncthreads:
// neither barrier can release.
extern "C" __global__ void split_warp_f32(float* x) {
    if ((threadIdx.x & 31u) < 16) x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
    else __syncthreads();
}

// A shuffle over half the warp: the emulator supports only the full mask.
extern "C" __global__ void half_mask_shuffle_f32(float* x) {
    x[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, x[threadIdx.x], 1);
}

// Recurses until the fiber's stack overflows (depth is never reached).
__device__ __noinline__ float deep(volatile float* p, unsigned long long depth) {
    volatile float pad[256];
    pad[depth % 256] = p[0];
    return depth ? deep(p, depth - 1) + pad[depth % 256] : pad[0];
}

extern "C" __global__ void stack_overflow_f32(float* x) {
    if (threadIdx.x == 0) x[0] = deep(x, 1ull << 40);
}

// A max over all threads with atomicMax on unsigned long long, as loss.cu
// flags bad rows, and integer adds.
extern "C" __global__ void atomics_f32(unsigned long long* mx, int* count) {
    atomicMax(mx, blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x);
    atomicAdd(count, 1);
}

// Every thread waits at a barrier `iters` times: the cost of a fiber switch.
extern "C" __global__ void barrier_loop_f32(unsigned long long iters) {
    for (unsigned long long i = 0; i < iters; ++i) __syncthreads();
}
