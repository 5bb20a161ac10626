// Rotary position embedding, Hugging Face LLaMA style (rotate_half), as in
// worker/src/engine/cpu/rope.rs. The host computes inv_freq[i] =
// 1 / theta^(2i / head_dim) in f64 exactly as the CPU does; the angles and
// their cos/sin are taken in f64 and rounded to f32, as on the CPU.

#define GRID_STRIDE(i, n)                                                                              \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

// table[t * half + i] = cos(t * inv_freq[i]) and table[seq * half + t * half + i]
// = sin(t * inv_freq[i]), for positions t < seq.
extern "C" __global__ void rope_table_f32(const double* inv_freq, float* table, unsigned long long seq,
                                          unsigned long long half) {
    const unsigned long long n = seq * half;
    GRID_STRIDE(k, n) {
        const unsigned long long t = k / half, i = k - t * half;
        const double a = (double)t * inv_freq[i];
        table[k] = (float)cos(a);
        table[n + k] = (float)sin(a);
    }
}

// In place on x [batch, seq, heads, 2 * half], one thread per pair (i, i + half)
// of a head: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin at the row's position t.
// The table holds table_seq >= seq positions; inverse negates sin (the
// backward rotation).
extern "C" __global__ void rope_rotate_f32(act_t* x, const float* table, unsigned long long table_seq,
                                           unsigned long long seq, unsigned long long heads,
                                           unsigned long long half, unsigned long long pairs, int inverse) {
    GRID_STRIDE(p, pairs) {
        const unsigned long long head = p / half;  // index over batch * seq * heads
        const unsigned long long i = p - head * half;
        const unsigned long long t = (head / heads) % seq;
        const float c = table[t * half + i], s0 = table[table_seq * half + t * half + i];
        const float s = inverse ? -s0 : s0;
        act_t* h = x + head * 2 * half;
        const float x1 = h[i], x2 = h[i + half];
        h[i] = x1 * c - x2 * s;
        h[i + half] = x2 * c + x1 * s;
    }
}
