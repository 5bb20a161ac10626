// The storage type of activations and of the weights' compute copies,
// prepended to every kernel source (kernels.rs). Each source is compiled
// twice: as is, where act_t is float, and with TESSERA_BF16 defined, where
// act_t holds a bf16 value. Kernels read and write act_t and compute in
// float (or double) either way; gradients of parameters, optimizer state,
// normalization statistics and reduction partials stay float/double. With
// act_t = float the kernels are the f32 kernels, unchanged.
//
// No cuda_bf16.h: the conversions are a few bit operations, so the kernels
// need no header NVRTC might not ship.

#ifdef TESSERA_BF16
struct act_t {
    unsigned short bits;
    __device__ __forceinline__ operator float() const { return __uint_as_float(((unsigned int)bits) << 16); }
    // Round to nearest even; a NaN stays a (quiet) NaN.
    __device__ __forceinline__ act_t& operator=(float f) {
        unsigned int u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            bits = (unsigned short)((u >> 16) | 0x40u);
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
            bits = (unsigned short)(u >> 16);
        }
        return *this;
    }
    __device__ __forceinline__ act_t& operator+=(float v) { return *this = (float)*this + v; }
    __device__ __forceinline__ act_t& operator*=(float v) { return *this = (float)*this * v; }
};
#else
typedef float act_t;
#endif
