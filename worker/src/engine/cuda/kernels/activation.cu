// Activations (worker/src/engine/cpu/activation.rs): GELU in its tanh form
// (gelu_pytorch_tanh, SigLIP's MLP) and exact erf form (the projector), and
// LLaMA's SiLU-gated product. Backward adds into the gradient buffers.

#define GRID_STRIDE(i, n)                                                                              \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

// kind 0 = tanh, 1 = erf
__device__ __forceinline__ float gelu_value(float x, int kind) {
    if (kind == 0) {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        float u = k * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

__device__ __forceinline__ float gelu_grad(float x, int kind) {
    if (kind == 0) {
        const float k = 0.7978845608028654f;
        float u = k * (x + 0.044715f * x * x * x);
        float t = tanhf(u);
        float du = k * (1.0f + 3.0f * 0.044715f * x * x);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    const float inv_sqrt2 = 0.7071067811865476f;
    const float inv_sqrt2pi = 0.3989422804014327f;
    return 0.5f * (1.0f + erff(x * inv_sqrt2)) + x * inv_sqrt2pi * expf(-0.5f * x * x);
}

extern "C" __global__ void gelu_fwd_f32(const act_t* x, act_t* y, int kind, unsigned long long n) {
    GRID_STRIDE(i, n) { y[i] = gelu_value(x[i], kind); }
}

// y[r, c] += bias[c % cols], then g = gelu(y), over rows * cols values: bias_add_f32 and
// gelu_fwd_f32 in one pass. y keeps the pre-activation, which gelu_bwd_f32 reads.
extern "C" __global__ void bias_gelu_fwd_f32(act_t* y, const act_t* bias, act_t* g, int kind, unsigned long long cols,
                                             unsigned long long n) {
    GRID_STRIDE(i, n) {
        const float v = y[i] + bias[i % cols];
        y[i] = v;
        g[i] = gelu_value(v, kind);
    }
}

// dx += dy * gelu'(x)
extern "C" __global__ void gelu_bwd_f32(const act_t* x, const act_t* dy, act_t* dx, int kind, unsigned long long n) {
    GRID_STRIDE(i, n) { dx[i] += dy[i] * gelu_grad(x[i], kind); }
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// out = silu(gate) * up
extern "C" __global__ void swiglu_fwd_f32(const act_t* gate, const act_t* up, act_t* out, unsigned long long n) {
    GRID_STRIDE(i, n) {
        float g = gate[i];
        out[i] = g * sigmoid(g) * up[i];
    }
}

// dup += dout * silu(gate); dgate += dout * up * silu'(gate)
extern "C" __global__ void swiglu_bwd_f32(const act_t* gate, const act_t* up, const act_t* dout, act_t* dgate,
                                          act_t* dup, unsigned long long n) {
    GRID_STRIDE(i, n) {
        float g = gate[i], u = up[i], d = dout[i];
        float s = sigmoid(g);
        dup[i] += d * g * s;
        dgate[i] += d * u * s * (1.0f + g * (1.0f - s));
    }
}
