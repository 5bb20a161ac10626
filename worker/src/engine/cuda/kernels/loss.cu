// STUB
extern "C" __global__ void loss_stub_f32(float* x) {}
