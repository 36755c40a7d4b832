// What the .cu files write beyond plain CUDA, so that the same source also runs in the emulation build
// (csrc/emulation/, ops.load_extension(emulation=True)), which defines these itself:
//  - CLOUDS_LAUNCH(kernel, grid, block, stream)(args...) launches kernel<<<grid, block, 0, stream>>>(args...);
//  - volatile_load(p) / volatile_store(p, v): a word that other threads change concurrently (a volatile access on the
//    GPU; in the emulation a point where another thread may run, and a relaxed atomic that ThreadSanitizer checks).
#pragma once

#ifndef CLOUDS_EMULATION
#define CLOUDS_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>

template <typename T>
__device__ __forceinline__ T volatile_load(const T* p) {
  return *static_cast<const volatile T*>(p);
}

template <typename T>
__device__ __forceinline__ void volatile_store(T* p, T v) {
  *static_cast<volatile T*>(p) = v;
}
#endif
