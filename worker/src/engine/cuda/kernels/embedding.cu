// Row gathers and scatters (worker/src/engine/cpu/embedding.rs): embedding
// lookup and its gradient, and image-token splicing. A negative index skips
// its row; an index past the table traps (the CPU panics), which check()
// reports, rather than reading or writing out of bounds.

// Threads per block of scatter_rows_f32, which stages that many ids per tile
// (embedding.rs launches exactly that many, checked by a test there).
#define TILE 256

// out[i, :] = table[ids[i], :], or += when accumulate. One block per row i of
// out, threads over the columns; rows of out are distinct, so no two
// threads write the same value.
extern "C" __global__ void gather_rows_f32(const act_t* table, const int* ids, act_t* out, unsigned long long dim,
                                           unsigned long long table_rows, int accumulate) {
    const int id = ids[blockIdx.x];
    if (id < 0) return;
    if ((unsigned long long)id >= table_rows) __trap();
    const act_t* src = table + (unsigned long long)id * dim;
    act_t* dst = out + (unsigned long long)blockIdx.x * dim;
    for (unsigned long long c = threadIdx.x; c < dim; c += blockDim.x) {
        if (accumulate) dst[c] += src[c];
        else dst[c] = src[c];
    }
}

// dst[ids[i], :] += src[i, :] (accumulate) or = src[i, :], for i in 0..n in
// order. Repeated ids must not race, and float atomics would add in a
// different order each run, so each value of dst has one owner thread:
// block (task, column block) owns table rows [task * rows_per_task, ...) in
// column c, and walks all ids in index order, applying those in its range.
// Every value thus sees its updates in index order, as in a sequential loop
// (repeated adds sum in order, the last of repeated writes wins), whatever
// the grid. The ids are staged through shared memory, TILE at a time.
// D is the table's type: act_t (image-token splicing) or float (the
// embedding's gradient, f32 whatever the storage).
template <typename D>
__device__ void scatter_rows(const act_t* src, const int* ids, D* dst, unsigned long long n, unsigned long long dim,
                             unsigned long long table_rows, unsigned long long rows_per_task, int accumulate) {
    __shared__ int tile[TILE];
    const unsigned long long c = blockIdx.y * (unsigned long long)TILE + threadIdx.x;
    const unsigned long long r0 = blockIdx.x * rows_per_task;
    const unsigned long long r1 = min(table_rows, r0 + rows_per_task);
    for (unsigned long long base = 0; base < n; base += TILE) {
        const unsigned long long k = base + threadIdx.x;
        const int id = k < n ? ids[k] : -1;
        if (id >= 0 && (unsigned long long)id >= table_rows) __trap();
        tile[threadIdx.x] = id;
        __syncthreads();
        const unsigned long long count = min((unsigned long long)TILE, n - base);
        if (c < dim) {
            for (unsigned long long j = 0; j < count; ++j) {
                const int t = tile[j];
                if (t >= 0 && (unsigned long long)t >= r0 && (unsigned long long)t < r1) {
                    const float v = src[(base + j) * dim + c];
                    D* d = dst + (unsigned long long)t * dim + c;
                    if (accumulate) *d += v;
                    else *d = v;
                }
            }
        }
        __syncthreads();  // the tile is overwritten next round
    }
}

extern "C" __global__ void scatter_rows_f32(const act_t* src, const int* ids, act_t* dst, unsigned long long n,
                                            unsigned long long dim, unsigned long long table_rows,
                                            unsigned long long rows_per_task, int accumulate) {
    scatter_rows(src, ids, dst, n, dim, table_rows, rows_per_task, accumulate);
}

// The same into an f32 table: the embedding's gradient.
extern "C" __global__ void scatter_rows_into_f32(const act_t* src, const int* ids, float* dst, unsigned long long n,
                                                 unsigned long long dim, unsigned long long table_rows,
                                                 unsigned long long rows_per_task, int accumulate) {
    scatter_rows(src, ids, dst, n, dim, table_rows, rows_per_task, accumulate);
}
