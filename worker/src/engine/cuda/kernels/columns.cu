// Deterministic column sums (worker/src/engine/cuda/columns.rs): the rows
// are cut into chunks of `per` rows; one thread sums one column of one
// chunk in f64, in row order, then one thread per column adds the chunks in
// order. No atomics: the same result on every run and every GPU.

#define GRID_STRIDE(i, n)                                                                              \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

// Grid (chunk, column block): part[chunk, c] = sum of x[r, c] over the
// chunk's rows. Column blocks stride by the grid's y size, which the host
// caps at CUDA's 65535 (a position table's gradient has ~1M columns).
extern "C" __global__ void col_sums_partial_f32(const act_t* x, double* part, unsigned long long rows,
                                                unsigned long long cols, unsigned long long per) {
    const unsigned long long r0 = blockIdx.x * per;
    const unsigned long long r1 = r0 + per < rows ? r0 + per : rows;
    for (unsigned long long c = blockIdx.y * (unsigned long long)blockDim.x + threadIdx.x; c < cols;
         c += (unsigned long long)gridDim.y * blockDim.x) {
        double acc = 0.0;
        for (unsigned long long r = r0; r < r1; ++r) acc += (double)x[r * cols + c];
        part[blockIdx.x * cols + c] = acc;
    }
}

// out[c] += sum over chunks k of part[k, c], in chunk order (one thread per
// column, no atomics: deterministic).
extern "C" __global__ void column_partials_reduce_f32(const double* part, float* out, unsigned long long chunks,
                                                  unsigned long long cols) {
    GRID_STRIDE(c, cols) {
        double acc = 0.0;
        for (unsigned long long k = 0; k < chunks; ++k) acc += part[k * cols + c];
        out[c] += (float)acc;
    }
}
