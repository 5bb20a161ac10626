// Elementwise kernels of the Backend op list (worker/src/engine/backend.rs),
// f32. Each thread walks the array with a grid-stride loop, so any launch
// size covers any length. Compiled at start with NVRTC for the device's
// compute capability; CI compiles this file for sm_80 and sm_90.

extern "C" __global__ void fill_f32(float* x, float value, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        x[i] = value;
    }
}

// y += alpha * x
extern "C" __global__ void axpy_f32(float alpha, const float* x, float* y, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        y[i] += alpha * x[i];
    }
}

// x *= s
extern "C" __global__ void scale_f32(float* x, float s, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        x[i] *= s;
    }
}

// GELU, tanh approximation (gelu_pytorch_tanh, SigLIP) and exact erf
// (the projector), forward and backward; kind 0 = tanh, 1 = erf.
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

extern "C" __global__ void gelu_fwd_f32(const float* x, float* y, int kind, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        y[i] = gelu_value(x[i], kind);
    }
}

// dx = dy * gelu'(x) (written, not added)
extern "C" __global__ void gelu_bwd_f32(const float* x, const float* dy, float* dx, int kind, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        dx[i] = dy[i] * gelu_grad(x[i], kind);
    }
}

// AdamW with decoupled weight decay and bias correction, in the CPU
// backend's form (cpu/optim.rs): the host computes decay = 1 - lr * wd,
// step_size = lr / (1 - beta1^t) and inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t) in
// f64; then g = grad * grad_scale, m = b1 m + (1 - b1) g,
// v = b2 v + (1 - b2) g^2, p = p * decay - step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps).
extern "C" __global__ void adamw_f32(float* p, const float* grad, float* m, float* v, float beta1, float beta2,
                                     float eps, float decay, float step_size, float inv_sqrt_bc2, float grad_scale,
                                     unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float g = grad[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
    }
}
