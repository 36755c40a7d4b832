// Stand-in for <cuda_runtime.h> in the emulation build (ops.load_extension(emulation=True)): the CUDA C++ that
// csrc/*_cuda.cu uses, as host C++, so the unchanged kernels run on the CPU. Every CUDA thread is a fiber
// (scheduler.cpp) and fibers switch only where GPU threads can see each other: atomics, volatile_load/volatile_store
// (csrc/cuda_hooks.h), warp collectives and __syncthreads. Between two such points a thread runs alone.
//
// Not here (a kernel that needs them does not compile or is not checked): __shared__ memory, shuffles other than
// __shfl_sync, streams (a launch runs to completion when issued), the GPU's memory model (all accesses are
// sequentially consistent here), device math (host libm, no FMA contraction) and speed.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// ---- keywords and built-in types ----

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define warpSize 32

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- the scheduler (scheduler.cpp) ----

namespace clouds_emu {

struct ThreadIds {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local const ThreadIds* current;  // the running CUDA thread

enum Collective : int { kActiveMask, kMatchAny, kBallot, kShfl };

void switch_point();  // a random schedule may run another thread here
uint64_t warp_collective(Collective op, unsigned mask, uint64_t value, int src_lane);
void sync_threads();
void launch(dim3 grid, dim3 block, const char* kernel, void (*body)(void*), void* arg);
cudaError_t last_error(const char** message, bool clear);

// Host side (the clouds_emu ops in library.cpp): seed 0 runs the threads of each block in order, one block at a time,
// each thread until it ends or waits at a collective; another seed draws, at every switch point, which runnable thread
// of `resident_blocks` blocks (drawn in random order) goes on.
void set_schedule(int64_t seed, int64_t resident_blocks);
void get_stats(int64_t out[4]);  // launches, threads, switches, collectives since set_schedule

// CLOUDS_LAUNCH(kernel, grid, block, stream)(args...): the arguments are converted to the kernel's parameter types
// once, then every thread calls kernel with its own copies.
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  const char* name;
  void operator()(P... args) const {
    auto call = [&] { kernel(args...); };
    launch(grid, block, name, [](void* f) { (*static_cast<decltype(call)*>(f))(); }, &call);
  }
};

template <typename... P>
Launcher<P...> launcher(void (*kernel)(P...), dim3 grid, dim3 block, const char* name) {
  return {kernel, grid, block, name};
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "collective values are at most 64 bits");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace clouds_emu

#define CLOUDS_LAUNCH(kernel, grid, block, stream) ::clouds_emu::launcher(kernel, grid, block, #kernel)
#define threadIdx (::clouds_emu::current->thread_idx)
#define blockIdx (::clouds_emu::current->block_idx)
#define blockDim (::clouds_emu::current->block_dim)
#define gridDim (::clouds_emu::current->grid_dim)

inline cudaError_t cudaGetLastError() { return clouds_emu::last_error(nullptr, true); }
inline cudaError_t cudaPeekAtLastError() { return clouds_emu::last_error(nullptr, false); }

// ---- memory shared between threads: every access is a switch point ----

template <typename T>
T volatile_load(const T* p) {
  clouds_emu::switch_point();
  T v;
  __atomic_load(p, &v, __ATOMIC_RELAXED);
  return v;
}

template <typename T>
void volatile_store(T* p, T v) {
  clouds_emu::switch_point();
  __atomic_store(p, &v, __ATOMIC_RELAXED);
}

namespace clouds_emu {
// *p = op(*p, v) as one relaxed atomic read-modify-write (CUDA atomics order nothing); returns the old value
template <typename T, typename Op>
T atomic_update(T* p, T v, Op op) {
  switch_point();
  T old, want;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    want = op(old, v);
  } while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
}  // namespace clouds_emu

template <typename T>
T atomicAdd(T* p, std::type_identity_t<T> v) {
  return clouds_emu::atomic_update(p, v, [](T a, T b) { return static_cast<T>(a + b); });
}
template <typename T>
T atomicMin(T* p, std::type_identity_t<T> v) {
  return clouds_emu::atomic_update(p, v, [](T a, T b) { return b < a ? b : a; });
}
template <typename T>
T atomicMax(T* p, std::type_identity_t<T> v) {
  return clouds_emu::atomic_update(p, v, [](T a, T b) { return a < b ? b : a; });
}
template <typename T>
T atomicExch(T* p, std::type_identity_t<T> v) {
  return clouds_emu::atomic_update(p, v, [](T, T b) { return b; });
}
template <typename T>
T atomicCAS(T* p, std::type_identity_t<T> compare, std::type_identity_t<T> v) {
  clouds_emu::switch_point();
  __atomic_compare_exchange(p, &compare, &v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;  // the old value either way
}

// ---- warp collectives (all lanes of the mask arrive before any leaves) and the block barrier ----

inline unsigned __activemask() {  // the lanes of the warp that have not returned, once they all got here
  return static_cast<unsigned>(clouds_emu::warp_collective(clouds_emu::kActiveMask, 0, 0, 0));
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
  return static_cast<unsigned>(clouds_emu::warp_collective(clouds_emu::kMatchAny, mask, clouds_emu::to_bits(value), 0));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(clouds_emu::warp_collective(clouds_emu::kBallot, mask, predicate != 0, 0));
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  const unsigned t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  const int lane = static_cast<int>(t % 32);
  const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return clouds_emu::from_bits<T>(clouds_emu::warp_collective(clouds_emu::kShfl, mask, clouds_emu::to_bits(var), src));
}
inline void __syncthreads() { clouds_emu::sync_threads(); }

// ---- intrinsics and device math (host versions; the build uses -ffp-contract=off, so *_rn are plain operations) ----

template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
