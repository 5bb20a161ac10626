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
