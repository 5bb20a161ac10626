// Token-grid S2 ops with gradients (worker/src/engine/cpu/s2.rs): tile merge,
// area pooling, channel concat, VILA's 2x2 downsample. One thread per value
// in a grid-stride loop. Every backward is a gather: each gradient value is
// computed by one thread from the values that feed it and added, so no two
// threads write the same value and no atomics are needed.

#define GRID_STRIDE(i, n)                                                                              \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

// out [batch, rows, cols, C] from split_rows x split_cols tiles of
// [th, tw, C]: tile (i, j) of image b is tile (i * split_cols + j) * batch + b
// of src, which starts at the first tile read.
extern "C" __global__ void tile_merge_fwd_f32(const act_t* src, act_t* out, unsigned long long batch,
                                              unsigned long long rows, unsigned long long cols,
                                              unsigned long long channels, unsigned long long th,
                                              unsigned long long tw, unsigned long long split_cols) {
    const unsigned long long n = batch * rows * cols * channels, tile_len = th * tw * channels;
    GRID_STRIDE(e, n) {
        const unsigned long long ch = e % channels, x = (e / channels) % cols, gr = e / (channels * cols);
        const unsigned long long r = gr % rows, b = gr / rows;
        const unsigned long long i = r / th, y = r % th, j = x / tw, xx = x % tw;
        const unsigned long long tile = (i * split_cols + j) * batch + b;
        out[e] = src[tile * tile_len + (y * tw + xx) * channels + ch];
    }
}

// dsrc (from the first tile, split_rows * split_cols * batch tiles) += the
// matching values of dout.
extern "C" __global__ void tile_merge_bwd_f32(const act_t* dout, act_t* dsrc, unsigned long long batch,
                                              unsigned long long rows, unsigned long long cols,
                                              unsigned long long channels, unsigned long long th,
                                              unsigned long long tw, unsigned long long split_cols,
                                              unsigned long long n_values) {
    const unsigned long long seg = tw * channels, tile_len = th * seg;
    GRID_STRIDE(e, n_values) {
        const unsigned long long t = e / tile_len, rem = e % tile_len;
        const unsigned long long b = t % batch, i = (t / batch) / split_cols, j = (t / batch) % split_cols;
        const unsigned long long y = rem / seg, w = rem % seg;
        dsrc[e] += dout[((b * rows + i * th + y) * cols + j * tw) * channels + w];
    }
}

// dst [batch, o_r, o_c, C]: the mean of each wr x wc window of src [batch,
// o_r * wr, o_c * wc, C], summed window row by row and divided by `count`,
// as on the CPU.
extern "C" __global__ void area_pool_fwd_f32(const act_t* src, act_t* dst, unsigned long long o_r,
                                             unsigned long long o_c, unsigned long long channels,
                                             unsigned long long wr, unsigned long long wc, float count,
                                             unsigned long long n_values) {
    const unsigned long long rows = o_r * wr, cols = o_c * wc;
    GRID_STRIDE(e, n_values) {
        const unsigned long long ch = e % channels, q = (e / channels) % o_c, gr = e / (channels * o_c);
        const unsigned long long r = gr % o_r, b = gr / o_r;
        float acc = 0.0f;
        for (unsigned long long dy = 0; dy < wr; ++dy) {
            const act_t* line = src + (b * rows + r * wr + dy) * cols * channels;
            for (unsigned long long dx = 0; dx < wc; ++dx) acc += line[(q * wc + dx) * channels + ch];
        }
        dst[e] = acc / count;
    }
}

// dsrc [batch, rows, cols, C] += ddst of its window / count.
extern "C" __global__ void area_pool_bwd_f32(const act_t* ddst, act_t* dsrc, unsigned long long rows,
                                             unsigned long long cols, unsigned long long channels,
                                             unsigned long long wr, unsigned long long wc, float count,
                                             unsigned long long n_values) {
    const unsigned long long o_r = rows / wr, o_c = cols / wc;
    GRID_STRIDE(e, n_values) {
        const unsigned long long ch = e % channels, c = (e / channels) % cols, gr = e / (channels * cols);
        const unsigned long long r = gr % rows, b = gr / rows;
        dsrc[e] += ddst[((b * o_r + r / wr) * o_c + c / wc) * channels + ch] / count;
    }
}

// dst[r, col_offset + c] = src[r, c] for src [rows, width], dst [rows, dst_width].
extern "C" __global__ void concat_cols_fwd_f32(const act_t* src, act_t* dst, unsigned long long width,
                                               unsigned long long dst_width, unsigned long long col_offset,
                                               unsigned long long n_values) {
    GRID_STRIDE(e, n_values) { dst[(e / width) * dst_width + col_offset + e % width] = src[e]; }
}

// dsrc[r, c] += ddst[r, col_offset + c]
extern "C" __global__ void concat_cols_bwd_f32(const act_t* ddst, act_t* dsrc, unsigned long long width,
                                               unsigned long long dst_width, unsigned long long col_offset,
                                               unsigned long long n_values) {
    GRID_STRIDE(e, n_values) { dsrc[e] += ddst[(e / width) * dst_width + col_offset + e % width]; }
}

// VILA DownSampleBlock on square grids [batch, side, side, C], h = ceil(side / 2):
// dst token (b, k * h + q) part `slot` (of 4, C values each) is source
// (2q + slot / 2, 2k + slot % 2), zero where that falls in the padding.
extern "C" __global__ void downsample2x2_fwd_f32(const act_t* src, act_t* dst, unsigned long long side,
                                                 unsigned long long h, unsigned long long channels,
                                                 unsigned long long n_values) {
    GRID_STRIDE(e, n_values) {
        const unsigned long long ch = e % channels, part = e / channels;
        const unsigned long long slot = part % 4, tok = part / 4;
        const unsigned long long q = tok % h, k = (tok / h) % h, b = tok / (h * h);
        const unsigned long long r = 2 * q + slot / 2, col = 2 * k + slot % 2;
        dst[e] = (r < side && col < side) ? src[((b * side + r) * side + col) * channels + ch] : 0.0f;
    }
}

// dsrc += the one dst value each source value went to (padding gradients are dropped).
extern "C" __global__ void downsample2x2_bwd_f32(const act_t* ddst, act_t* dsrc, unsigned long long side,
                                                 unsigned long long h, unsigned long long channels,
                                                 unsigned long long n_values) {
    GRID_STRIDE(e, n_values) {
        const unsigned long long ch = e % channels, col = (e / channels) % side, br = e / (channels * side);
        const unsigned long long r = br % side, b = br / side;
        const unsigned long long q = r / 2, k = col / 2, slot = (r % 2) * 2 + col % 2;
        dsrc[e] += ddst[((b * h * h + k * h + q) * 4 + slot) * channels + ch];
    }
}
