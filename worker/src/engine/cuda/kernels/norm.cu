// STUB
extern "C" __global__ void norm_stub_f32(float* x) {}
