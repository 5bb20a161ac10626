// Pixel-side S2 ops (worker/src/engine/cpu/image.rs): bicubic resize,
// chessboard tile split, patchify. Forward only. One thread per output
// value in a grid-stride loop, so writes are coalesced and none overlap.

#define GRID_STRIDE(i, n)                                                                              \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

// PyTorch's cubic convolution kernels with A = -0.75, in f64 as on the CPU.
// The _rn intrinsics keep the compiler from fusing into FMAs, so the taps
// round exactly as the CPU's.
__device__ __forceinline__ double cubic1(double x) {  // |x| <= 1: ((A + 2) x - (A + 3)) x x + 1
    return __dadd_rn(__dmul_rn(__dmul_rn(__dsub_rn(__dmul_rn(1.25, x), 2.25), x), x), 1.0);
}

__device__ __forceinline__ double cubic2(double x) {  // 1 < |x| < 2: ((A x - 5A) x + 8A) x - 4A
    return __dsub_rn(__dmul_rn(__dadd_rn(__dmul_rn(__dsub_rn(__dmul_rn(-0.75, x), -3.75), x), -6.0), x), -3.0);
}

// The four clamped source indices and weights of output position i along one
// axis: source coordinate scale * (i + 0.5) - 0.5 (align_corners=False, not
// clamped at zero for cubic).
__device__ __forceinline__ void cubic_taps(unsigned long long i, double scale, unsigned long long in_size,
                                           unsigned long long idx[4], float w[4]) {
    const double real = __dsub_rn(__dmul_rn(scale, (double)i + 0.5), 0.5);
    const double base = floor(real);
    const double t = real - base;
    w[0] = (float)cubic2(t + 1.0);
    w[1] = (float)cubic1(t);
    w[2] = (float)cubic1(1.0 - t);
    w[3] = (float)cubic2(2.0 - t);
    const long long last = (long long)in_size - 1, b = (long long)base;
    for (int k = 0; k < 4; ++k) {
        long long j = b - 1 + k;
        j = j < 0 ? 0 : (j > last ? last : j);
        idx[k] = (unsigned long long)j;
    }
}

// [planes, s, s] -> [planes, d, d]. The CPU resizes rows first into a
// temporary, then columns; this computes the same four row sums per output
// (in the same order, unfused) and combines them, so the result is the CPU's.
extern "C" __global__ void resize_bicubic_f32(const act_t* src, act_t* dst, unsigned long long planes,
                                              unsigned long long s, unsigned long long d, double scale) {
    const unsigned long long n = planes * d * d;
    GRID_STRIDE(o, n) {
        const unsigned long long x = o % d, y = (o / d) % d, plane = o / (d * d);
        unsigned long long ix[4], iy[4];
        float wx[4], wy[4];
        cubic_taps(x, scale, s, ix, wx);
        cubic_taps(y, scale, s, iy, wy);
        const act_t* img = src + plane * s * s;
        float acc = 0.0f;
        for (int k = 0; k < 4; ++k) {
            const act_t* row = img + iy[k] * s;
            float h = __fmul_rn(wx[0], row[ix[0]]);
            h = __fadd_rn(h, __fmul_rn(wx[1], row[ix[1]]));
            h = __fadd_rn(h, __fmul_rn(wx[2], row[ix[2]]));
            h = __fadd_rn(h, __fmul_rn(wx[3], row[ix[3]]));
            acc = k == 0 ? __fmul_rn(wy[0], h) : __fadd_rn(acc, __fmul_rn(wy[k], h));
        }
        dst[o] = acc;
    }
}

// Chessboard split of [batch, C, size, size] into n x n tiles of side
// s = size / n: tile (i, j) of image b is tile (i * n + j) * batch + b of
// dst, which starts at the first tile written. n_values = n * n * batch * C * s * s.
extern "C" __global__ void tile_split_f32(const act_t* src, act_t* dst, unsigned long long batch,
                                          unsigned long long channels, unsigned long long size,
                                          unsigned long long n, unsigned long long n_values) {
    const unsigned long long s = size / n, tile_len = channels * s * s;
    GRID_STRIDE(e, n_values) {
        const unsigned long long t = e / tile_len, rem = e % tile_len;
        const unsigned long long c = rem / (s * s), y = (rem / s) % s, x = rem % s;
        const unsigned long long b = t % batch, i = (t / batch) / n, j = (t / batch) % n;
        dst[e] = src[((b * channels + c) * size + i * s + y) * size + j * s + x];
    }
}

// [batch, C, size, size] -> [batch, g * g, C * p * p] with g = size / p
// (trailing pixels dropped): patch (r, c) is row r * g + c, laid out [C][p][p].
extern "C" __global__ void patchify_f32(const act_t* src, act_t* dst, unsigned long long channels,
                                        unsigned long long size, unsigned long long p, unsigned long long n_values) {
    const unsigned long long g = size / p, row_len = channels * p * p;
    GRID_STRIDE(e, n_values) {
        const unsigned long long row = e / row_len, k = e % row_len;
        const unsigned long long b = row / (g * g), r = (row / g) % g, c = row % g;
        const unsigned long long ch = k / (p * p), y = (k / p) % p, x = k % p;
        dst[e] = src[((b * channels + ch) * size + r * p + y) * size + c * p + x];
    }
}
