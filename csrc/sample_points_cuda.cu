// Point prompts per connected component on the GPU (reference §5.2.2): the same outputs as the CPU kernel.
// Raw CUDA (no torch headers, so nvcc takes seconds); sample_points.cpp checks and allocates the tensors.
//
// A stable sort of the flat component map by id lists each component's pixels in raster order, so the pixel of
// rank r of component c is sorted_index[start(c) + r], with start(c) found by binary search. "interior" mode adds
// the exact Euclidean distance transform (column pass: one thread per column; row pass: one thread per row, lower
// envelope per run) and a per-component argmax packed into 64-bit keys (larger distance, then smaller index).
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_hooks.h"

namespace {

constexpr int kThreads = 256;

// ---- distance transform ----

__global__ void column_kernel(const int32_t* __restrict__ comp, int32_t* __restrict__ g, int64_t B, int64_t H,
                              int64_t W) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= B * W) return;
  const int64_t b = t / W, x = t % W;
  const int32_t* c = comp + b * H * W + x;
  int32_t* d = g + b * H * W + x;
  int32_t run = 0;
  for (int64_t y = 0; y < H; ++y) {
    run = (y > 0 && c[y * W] == c[(y - 1) * W]) ? run + 1 : 1;
    d[y * W] = run;
  }
  for (int64_t y = H - 1; y >= 0; --y) {
    run = (y < H - 1 && c[y * W] == c[(y + 1) * W]) ? run + 1 : 1;
    d[y * W] = min(d[y * W], run);
  }
}

// squared distance per pixel; v/f/z: per-row scratch of W + 3 entries
__global__ void row_kernel(const int32_t* __restrict__ comp, int32_t* g, int64_t rows, int64_t W, int64_t* v_all,
                           int64_t* f_all, double* z_all) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const int32_t* c = comp + r * W;
  int32_t* d = g + r * W;
  int64_t* v = v_all + r * (W + 3);
  int64_t* f = f_all + r * (W + 3);
  double* z = z_all + r * (W + 3);
  const double inf = 1e300;
  for (int64_t cs = 0; cs < W;) {
    int64_t ce = cs + 1;
    while (ce < W && c[ce] == c[cs]) ++ce;
    int64_t k = 0;
    v[0] = cs - 1;
    f[0] = 0;
    z[0] = -inf;
    z[1] = inf;
    for (int64_t q = cs; q <= ce; ++q) {
      const int64_t fq = q < ce ? static_cast<int64_t>(d[q]) * d[q] : 0;
      double s;
      while (true) {
        s = static_cast<double>((fq + q * q) - (f[k] + v[k] * v[k])) / static_cast<double>(2 * (q - v[k]));
        if (s <= z[k] && k > 0) --k;
        else break;
      }
      ++k;
      v[k] = q;
      f[k] = fq;
      z[k] = s;
      z[k + 1] = inf;
    }
    k = 0;
    for (int64_t x = cs; x < ce; ++x) {
      while (z[k + 1] < static_cast<double>(x)) ++k;
      d[x] = static_cast<int32_t>((x - v[k]) * (x - v[k]) + f[k]);
    }
    cs = ce;
  }
}

// best[c] = max over c's pixels of (d2 << 32 | ~index): the largest distance, then the first pixel
__global__ void argmax_kernel(const int32_t* __restrict__ comp, const int32_t* __restrict__ d2, int64_t n,
                              int64_t num_components, unsigned long long* best) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int32_t c = comp[i];
  if (c < 0 || c >= num_components) return;
  const unsigned long long key =
      (static_cast<unsigned long long>(d2[i]) << 32) | (0xFFFFFFFFull - static_cast<unsigned long long>(i));
  if (key > volatile_load(best + c)) atomicMax(best + c, key);  // best[c] only grows: skip most atomics
}

// ---- ranks -> pixels ----

template <typename T>
__device__ int64_t first_at_least(const T* a, int64_t n, int64_t x) {  // first index with a[i] >= x
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// One thread per candidate. draw_ranks is the CPU's (csrc/sample_points.cpp) and ops._draw_ranks, line for line.
__global__ void points_kernel(const int32_t* __restrict__ sorted_id, const int64_t* __restrict__ sorted_idx, int64_t n,
                              const int64_t* __restrict__ cand, const double* __restrict__ u, int64_t P, int64_t K,
                              int64_t R, int64_t num_components, const unsigned long long* __restrict__ best,
                              int64_t* __restrict__ scratch, int64_t* __restrict__ out) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= P) return;
  const int64_t c = cand[s];
  if (c < 0 || c >= num_components) return;                           // the row stays -1
  const int64_t lo = first_at_least(sorted_id, n, c), count = first_at_least(sorted_id, n, c + 1) - lo;
  if (count < K) return;
  int64_t* rank = scratch + s * 3 * R;
  int64_t* pos = rank + R;
  int64_t* val = pos + R;
  const bool interior = best != nullptr;
  int64_t skip = -1;
  if (interior) {
    const int64_t first = static_cast<int64_t>(0xFFFFFFFFull - (best[c] & 0xFFFFFFFFull));
    skip = first_at_least(sorted_idx + lo, count, first);
    out[s * K] = first;
  }
  const int64_t m = interior ? count - 1 : count;
  const double* us = u + s * R;
  for (int64_t j = 0; j < R; ++j) {
    const int64_t span = m - j;
    const int64_t r = j + min(static_cast<int64_t>(floor(us[j] * static_cast<double>(span))), span - 1);
    int64_t vr = r, vj = j;
    for (int64_t t = 0; t < j; ++t) {
      if (pos[t] == r) vr = val[t];
      if (pos[t] == j) vj = val[t];
    }
    rank[j] = vr;
    pos[j] = r;
    val[j] = vj;
  }
  for (int64_t j = 0; j < R; ++j) {
    const int64_t r = rank[j] + (interior && rank[j] >= skip ? 1 : 0);
    out[s * K + (interior ? 1 : 0) + j] = sorted_idx[lo + r];
  }
}

}  // namespace

// ---- launchers (declared in sample_points.cpp) ----

namespace clouds_cuda {

// d2 (B*H*W) <- squared distance to the nearest pixel of another id; v, f, z: scratch of (B*H, W+3) each
void sp_distance(const int32_t* comp, int32_t* d2, int64_t B, int64_t H, int64_t W, int64_t* v, int64_t* f,
                 double* z, cudaStream_t stream) {
  if (B * H * W == 0) return;  // an empty grid is an invalid launch configuration
  CLOUDS_LAUNCH(column_kernel, static_cast<unsigned>((B * W + kThreads - 1) / kThreads), kThreads, stream)(
      comp, d2, B, H, W);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  CLOUDS_LAUNCH(row_kernel, static_cast<unsigned>((B * H + 63) / 64), 64, stream)(comp, d2, B * H, W, v, f, z);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// best (num_components, zeroed) <- per id, (max d2) << 32 | ~(first pixel with it)
void sp_argmax(const int32_t* comp, const int32_t* d2, int64_t n, int64_t num_components, int64_t* best,
               cudaStream_t stream) {
  if (n == 0) return;
  CLOUDS_LAUNCH(argmax_kernel, static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, stream)(
      comp, d2, n, num_components, reinterpret_cast<unsigned long long*>(best));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out (P, K, filled with -1) <- flat pixel indices; best: sp_argmax's result for interior mode, else nullptr
void sp_points(const int32_t* sorted_id, const int64_t* sorted_idx, int64_t n, const int64_t* cand, const double* u,
               int64_t P, int64_t K, int64_t R, int64_t num_components, const int64_t* best, int64_t* scratch,
               int64_t* out, cudaStream_t stream) {
  if (P == 0) return;
  CLOUDS_LAUNCH(points_kernel, static_cast<unsigned>((P + kThreads - 1) / kThreads), kThreads, stream)(
      sorted_id, sorted_idx, n, cand, u, P, K, R, num_components,
      reinterpret_cast<const unsigned long long*>(best), scratch, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace clouds_cuda
