// Connected components of equal label on the GPU (reference §5.2.1): the same outputs as the CPU kernel, bit for bit.
// Raw CUDA (no torch headers, so nvcc takes seconds); connected_components.cpp checks and allocates the tensors.
//
// Union-find over pixels (Playne & Hawick, "A new algorithm for parallel connected-component labelling on GPUs",
// 2018): every pixel starts as its own root, neighbours with equal labels are united with atomicMin so a root is
// always the smallest pixel index of its tree, i.e. the component's first pixel in raster order. Numbering the roots
// by a prefix sum over "is root" flags gives the raster-order ids of the CPU path. A batch is one tall image whose
// rows r with r % H == 0 are never linked to the row above.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_hooks.h"

namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// ---- union-find ----

// parent[] changes under the reader (other threads' atomicMin and path compression): volatile reads, never cached
__device__ __forceinline__ int32_t find_root(const int32_t* parent, int32_t a) {
  int32_t p = volatile_load(parent + a);
  while (p != a) {
    a = p;
    p = volatile_load(parent + a);
  }
  return a;
}

// Unite the trees of a and b, hanging the larger root under the smaller (retrying when another thread won).
__device__ __forceinline__ void unite(int32_t* parent, int32_t a, int32_t b) {
  bool done;
  do {
    a = find_root(parent, a);
    b = find_root(parent, b);
    if (a < b) {
      const int32_t old = atomicMin(parent + b, a);
      done = old == b;
      b = old;
    } else if (b < a) {
      const int32_t old = atomicMin(parent + a, b);
      done = old == a;
      a = old;
    } else {
      done = true;
    }
  } while (!done);
}

// ---- kernels ----

template <typename T>
__global__ void init_kernel(const T* __restrict__ lab, int32_t* __restrict__ parent, int64_t n, bool has_ign, T ign) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) parent[i] = (has_ign && lab[i] == ign) ? -1 : static_cast<int32_t>(i);
}

template <typename T>
__global__ void merge_kernel(const T* __restrict__ lab, int32_t* parent, int64_t n, int64_t H, int64_t W, bool diag) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || volatile_load(parent + i) < 0) return;  // ignored; others may atomicMin parent[i] meanwhile
  const int64_t r = i / W, c = i % W;
  const T l = lab[i];
  const int32_t me = static_cast<int32_t>(i);
  if (c > 0 && lab[i - 1] == l) unite(parent, me, me - 1);
  if (r % H != 0) {
    const int64_t up = i - W;
    if (lab[up] == l) unite(parent, me, static_cast<int32_t>(up));
    if (diag && c > 0 && lab[up - 1] == l) unite(parent, me, static_cast<int32_t>(up - 1));
    if (diag && c < W - 1 && lab[up + 1] == l) unite(parent, me, static_cast<int32_t>(up + 1));
  }
}

__global__ void flatten_kernel(int32_t* parent, int32_t* __restrict__ is_root, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int32_t p = volatile_load(parent + i);
  if (p >= 0) volatile_store(parent + i, find_root(parent, static_cast<int32_t>(i)));  // others read it meanwhile
  is_root[i] = p == static_cast<int32_t>(i);
}

// ids from the inclusive prefix sum of the root flags; class and area per id (areas aggregated per warp)
template <typename T>
__global__ void label_kernel(const T* __restrict__ lab, int32_t* parent, const int32_t* __restrict__ rank, int64_t n,
                             int64_t* __restrict__ cls, unsigned long long* __restrict__ area) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int32_t id = -1;
  if (i < n) {
    const int32_t root = parent[i];
    if (root >= 0) {
      id = rank[root] - 1;
      if (root == i) cls[id] = static_cast<int64_t>(lab[i]);
    }
    parent[i] = id;
  }
  const unsigned peers = __match_any_sync(__activemask(), id);
  if (id >= 0 && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1)
    atomicAdd(area + id, static_cast<unsigned long long>(__popc(peers)));
}

}  // namespace

// ---- launchers (declared in connected_components.cpp) ----

namespace clouds_cuda {

// parent (n) <- the root of each pixel (-1 on ignored pixels); is_root (n) <- 1 where a pixel is its own root
template <typename T>
void cc_union_find(const T* lab, int32_t* parent, int32_t* is_root, int64_t n, int64_t H, int64_t W, bool has_ign,
                   T ign, bool diag, cudaStream_t stream) {
  if (n == 0) return;  // an empty grid is an invalid launch configuration
  CLOUDS_LAUNCH(init_kernel<T>, blocks_for(n), kThreads, stream)(lab, parent, n, has_ign, ign);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  CLOUDS_LAUNCH(merge_kernel<T>, blocks_for(n), kThreads, stream)(lab, parent, n, H, W, diag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  CLOUDS_LAUNCH(flatten_kernel, blocks_for(n), kThreads, stream)(parent, is_root, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// parent (n) <- component ids from rank = inclusive cumsum(is_root); cls, area (zeroed) per id
template <typename T>
void cc_label(const T* lab, int32_t* parent, const int32_t* rank, int64_t n, int64_t* cls, int64_t* area,
              cudaStream_t stream) {
  if (n == 0) return;
  CLOUDS_LAUNCH(label_kernel<T>, blocks_for(n), kThreads, stream)(lab, parent, rank, n, cls,
                                                                  reinterpret_cast<unsigned long long*>(area));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define CLOUDS_INSTANTIATE(T)                                                                                     \
  template void cc_union_find<T>(const T*, int32_t*, int32_t*, int64_t, int64_t, int64_t, bool, T, bool,        \
                                 cudaStream_t);                                                                 \
  template void cc_label<T>(const T*, int32_t*, const int32_t*, int64_t, int64_t*, int64_t*, cudaStream_t);
CLOUDS_INSTANTIATE(uint8_t)
CLOUDS_INSTANTIATE(int32_t)
CLOUDS_INSTANTIATE(int64_t)
#undef CLOUDS_INSTANTIATE

}  // namespace clouds_cuda
