// CUDA's built-ins given a meaning on the host, so that kernels/*.cu compile
// as C++ for the emulated device (build.rs). Each emulated thread runs as a
// fiber on one OS thread (fibers.cpp); the index variables read that
// fiber's state, __shared__ is per OS thread (one block runs on an OS thread
// at a time and fibers never migrate), and barriers and shuffles call into
// the runtime's scheduler.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __shared__ static thread_local

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
};

static constexpr int warpSize = 32;

namespace tessera_emu {
// Set by the scheduler: the running fiber's threadIdx, the block's index,
// the launch's dimensions. __thread rather than thread_local: no TLS
// wrapper call on each read.
extern __thread const uint3* tls_thread_idx;
extern __thread uint3 tls_block_idx;
extern __thread dim3 tls_block_dim;
extern __thread dim3 tls_grid_dim;
}  // namespace tessera_emu

#define threadIdx (*::tessera_emu::tls_thread_idx)
#define blockIdx (static_cast<const uint3&>(::tessera_emu::tls_block_idx))
#define blockDim (static_cast<const dim3&>(::tessera_emu::tls_block_dim))
#define gridDim (static_cast<const dim3&>(::tessera_emu::tls_grid_dim))

extern "C" {
// The call site (file, line) names the barrier, so that threads waiting at
// different __syncthreads are an error rather than a silent match.
void tessera_emu_syncthreads(const char* file, int line);
void tessera_emu_syncwarp(unsigned mask, const char* file, int line);
// mode: 0 = idx, 1 = up, 2 = down, 3 = xor (the value's bits, widened).
unsigned long long tessera_emu_shuffle(unsigned mask, unsigned long long bits, int mode, int arg, int width,
                                       const char* file, int line);
[[noreturn]] void tessera_emu_trap(const char* file, int line);
}

// Compiler fences around the call: the block's other threads write shared
// memory while this one waits, so nothing may be cached across it.
__device__ inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    asm volatile("" ::: "memory");
    tessera_emu_syncthreads(file, line);
    asm volatile("" ::: "memory");
}

__device__ inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    asm volatile("" ::: "memory");
    tessera_emu_syncwarp(mask, file, line);
    asm volatile("" ::: "memory");
}

[[noreturn]] __device__ inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    tessera_emu_trap(file, line);
}

namespace tessera_emu {
template <typename T>
inline T shuffle(unsigned mask, T v, int mode, int arg, int width, const char* file, int line) {
    static_assert(std::is_arithmetic<T>::value && (sizeof(T) == 4 || sizeof(T) == 8),
                  "warp shuffles take 4- or 8-byte arithmetic values");
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof v);
    bits = tessera_emu_shuffle(mask, bits, mode, arg, width, file, line);
    memcpy(&v, &bits, sizeof v);
    return v;
}
}  // namespace tessera_emu

template <typename T>
__device__ inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize,
                                const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return tessera_emu::shuffle(mask, v, 0, src_lane, width, file, line);
}

template <typename T>
__device__ inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return tessera_emu::shuffle(mask, v, 1, (int)delta, width, file, line);
}

template <typename T>
__device__ inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return tessera_emu::shuffle(mask, v, 2, (int)delta, width, file, line);
}

template <typename T>
__device__ inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize,
                                    const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return tessera_emu::shuffle(mask, v, 3, lane_mask, width, file, line);
}

// Atomics. Relaxed, as CUDA's are; __atomic builtins keep them right should
// blocks ever run on several OS threads.
namespace tessera_emu {
template <typename T, typename F>
inline T atomic_update(T* a, F f) {
    T old;
    __atomic_load(a, &old, __ATOMIC_RELAXED);
    T next = f(old);
    while (!__atomic_compare_exchange(a, &old, &next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) next = f(old);
    return old;
}
}  // namespace tessera_emu

__device__ inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
__device__ inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
__device__ inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
__device__ inline float atomicAdd(float* a, float v) {
    return tessera_emu::atomic_update(a, [v](float o) { return o + v; });
}
__device__ inline double atomicAdd(double* a, double v) {
    return tessera_emu::atomic_update(a, [v](double o) { return o + v; });
}
__device__ inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
__device__ inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }

#define TESSERA_EMU_MINMAX_ATOMICS(T)                                                             \
    __device__ inline T atomicMax(T* a, T v) {                                                    \
        return tessera_emu::atomic_update(a, [v](T o) { return v > o ? v : o; });                 \
    }                                                                                             \
    __device__ inline T atomicMin(T* a, T v) {                                                    \
        return tessera_emu::atomic_update(a, [v](T o) { return v < o ? v : o; });                 \
    }                                                                                             \
    __device__ inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); } \
    __device__ inline T atomicCAS(T* a, T compare, T v) {                                         \
        __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);   \
        return compare;                                                                           \
    }
TESSERA_EMU_MINMAX_ATOMICS(int)
TESSERA_EMU_MINMAX_ATOMICS(unsigned)
TESSERA_EMU_MINMAX_ATOMICS(unsigned long long)
#undef TESSERA_EMU_MINMAX_ATOMICS

__device__ inline float atomicExch(float* a, float v) {
    float old;
    __atomic_exchange(a, &v, &old, __ATOMIC_RELAXED);
    return old;
}

// Round-to-nearest intrinsics: plain IEEE operations (the runtime builds
// with -ffp-contract=off, so they are never fused either).
__device__ inline float __fadd_rn(float a, float b) { return a + b; }
__device__ inline float __fsub_rn(float a, float b) { return a - b; }
__device__ inline float __fmul_rn(float a, float b) { return a * b; }
__device__ inline float __fdiv_rn(float a, float b) { return a / b; }
__device__ inline float __frcp_rn(float a) { return 1.0f / a; }
__device__ inline float __fsqrt_rn(float a) { return sqrtf(a); }
__device__ inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
__device__ inline double __dadd_rn(double a, double b) { return a + b; }
__device__ inline double __dsub_rn(double a, double b) { return a - b; }
__device__ inline double __dmul_rn(double a, double b) { return a * b; }
__device__ inline double __ddiv_rn(double a, double b) { return a / b; }
__device__ inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }

__device__ inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
__device__ inline double rsqrt(double x) { return 1.0 / sqrt(x); }
__device__ inline float __expf(float x) { return expf(x); }
__device__ inline float __logf(float x) { return logf(x); }

// Bit casts. Templates over the integer argument: kernels pass literals
// such as 0xff800000 (an unsigned int) where CUDA's parameter is an int.
namespace tessera_emu {
template <typename To, typename From>
inline To bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit casts keep the size");
    To out;
    memcpy(&out, &v, sizeof out);
    return out;
}
}  // namespace tessera_emu

template <typename I>
__device__ inline float __int_as_float(I i) {
    return tessera_emu::bit_cast<float>((int)i);
}
template <typename I>
__device__ inline float __uint_as_float(I i) {
    return tessera_emu::bit_cast<float>((unsigned int)i);
}
__device__ inline int __float_as_int(float f) { return tessera_emu::bit_cast<int>(f); }
__device__ inline unsigned int __float_as_uint(float f) { return tessera_emu::bit_cast<unsigned int>(f); }
template <typename I>
__device__ inline double __longlong_as_double(I i) {
    return tessera_emu::bit_cast<double>((long long)i);
}
__device__ inline long long __double_as_longlong(double d) { return tessera_emu::bit_cast<long long>(d); }

// CUDA's integer min and max take mixed widths and signedness with the usual
// arithmetic conversions, e.g. min(unsigned long long, unsigned long long).
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
__device__ inline std::common_type_t<A, B> min(A a, B b) {
    using T = std::common_type_t<A, B>;
    return (T)b < (T)a ? (T)b : (T)a;
}

template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
__device__ inline std::common_type_t<A, B> max(A a, B b) {
    using T = std::common_type_t<A, B>;
    return (T)a < (T)b ? (T)b : (T)a;
}
