// Multi-scale deformable attention on the GPU, forward and backward (the pixel decoder's encoder, Sec. 3.1).
// Spec: ops.ms_deform_attn_ref; the same arithmetic as the CPU kernel in ms_deform_attn.cpp.
//
// Forward: one thread per output channel (b, q, h, d): consecutive threads read consecutive channels of a corner.
// Backward: one thread per sample (b, q, h, l, p): it loops over the Dh channels for the location and weight
// gradients (written directly) and adds its share of grad_value with atomics. Raw CUDA (no torch headers, so nvcc
// takes seconds); ms_deform_attn.cpp checks and allocates the tensors.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_hooks.h"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxLevels = 16;  // keep equal to clouds_cuda::kMsdaMaxLevels in ms_deform_attn.cpp

struct Levels {
  int64_t h[kMaxLevels], w[kMaxLevels], start[kMaxLevels];
};

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }  // never fused into an FMA
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Pixel coordinate of l in [0, 1] on a grid of n pixels (align_corners=False) from g = 2 * l - 1, every product rounded
// (__fmul_rn is never fused into an FMA): bit for bit the value of our CPU kernel and of torch's CPU grid_sample,
// (g + 1) * (n / 2) - 0.5 (halving is exact, so ((g + 1) * n - 1) / 2 rounds the same). Torch's CUDA grid_sample writes
// ((g + 1) * n - 1) / 2 too, but nvcc contracts it to fma(g + 1, n, -1): at pixel centres (l = (i + 0.5) / n, the
// model's reference points, where the bilinear gradient jumps) 252 of the 131,328 centres of grids 1..512 pixels wide
// then fall in the next cell (none on the model's level sizes at 768 or 1024x2048 inputs). We keep the CPU's rounding,
// so the CPU and CUDA ops pick the same cells (tests/test_emulation.py::test_emul_deform_attn_same_cells_as_cpu).
template <typename T>
__device__ __forceinline__ T source_coord(T l, int64_t n) {
  const T g = mul_rn(l, T(2)) - T(1);
  return (mul_rn(g + T(1), static_cast<T>(n)) - T(1)) / T(2);
}

// The four bilinear neighbours of (lx, ly) in [0, 1] on an h x w grid (align_corners=False): flat index (-1 outside)
// and weight; false when none is inside (also for NaN).
template <typename T>
__device__ __forceinline__ bool corners(T lx, T ly, int64_t h, int64_t w, int64_t idx[4], T wt[4], T& fx, T& fy) {
  const T x = source_coord(lx, w), y = source_coord(ly, h);
  if (!(x > T(-1) && x < static_cast<T>(w) && y > T(-1) && y < static_cast<T>(h))) return false;
  const T xf = floor(x), yf = floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  fx = x - xf;
  fy = y - yf;
  const bool xin0 = x0 >= 0, xin1 = x0 + 1 < w, yin0 = y0 >= 0, yin1 = y0 + 1 < h;
  idx[0] = xin0 && yin0 ? y0 * w + x0 : -1;
  idx[1] = xin1 && yin0 ? y0 * w + x0 + 1 : -1;
  idx[2] = xin0 && yin1 ? (y0 + 1) * w + x0 : -1;
  idx[3] = xin1 && yin1 ? (y0 + 1) * w + x0 + 1 : -1;
  wt[0] = (T(1) - fx) * (T(1) - fy);
  wt[1] = fx * (T(1) - fy);
  wt[2] = (T(1) - fx) * fy;
  wt[3] = fx * fy;
  return true;
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ value, const T* __restrict__ loc, const T* __restrict__ attn,
                               T* __restrict__ out, int64_t S, int64_t nH, int64_t Dh, int64_t Lq, int64_t nL,
                               int64_t nP, int64_t n, Levels lv) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const int64_t d = t % Dh, h = (t / Dh) % nH, bq = t / (Dh * nH), b = bq / Lq;
  const int64_t base = (bq * nH + h) * nL * nP, pix = nH * Dh;
  T acc = T(0);
  for (int64_t l = 0; l < nL; ++l) {
    const T* v = value + ((b * S + lv.start[l]) * nH + h) * Dh + d;
    for (int64_t p = 0; p < nP; ++p) {
      const int64_t k = base + l * nP + p;
      int64_t idx[4];
      T wt[4], fx, fy;
      if (!corners(loc[2 * k], loc[2 * k + 1], lv.h[l], lv.w[l], idx, wt, fx, fy)) continue;
      const T a = attn[k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (idx[i] >= 0) acc += wt[i] * a * v[idx[i] * pix];
    }
  }
  out[t] = acc;
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ value,
                                const T* __restrict__ loc, const T* __restrict__ attn, T* __restrict__ grad_value,
                                T* __restrict__ grad_loc, T* __restrict__ grad_attn, int64_t S, int64_t nH,
                                int64_t Dh, int64_t Lq, int64_t nL, int64_t nP, int64_t n, Levels lv) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (b, q, h, l, p)
  if (k >= n) return;
  const int64_t l = (k / nP) % nL, h = (k / (nP * nL)) % nH, bq = k / (nP * nL * nH), b = bq / Lq;
  int64_t idx[4];
  T wt[4], fx, fy;
  if (!corners(loc[2 * k], loc[2 * k + 1], lv.h[l], lv.w[l], idx, wt, fx, fy)) return;  // gradients stay zero
  const T a = attn[k];
  const int64_t off = ((b * S + lv.start[l]) * nH + h) * Dh, pix = nH * Dh;
  const T* g = grad_out + (bq * nH + h) * Dh;
  T dot[4] = {T(0), T(0), T(0), T(0)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (idx[i] < 0) continue;
    const T* vc = value + off + idx[i] * pix;
    T* gc = grad_value + off + idx[i] * pix;
    const T wa = wt[i] * a;
    T acc = T(0);
    for (int64_t d = 0; d < Dh; ++d) {
      const T gd = g[d];
      acc += gd * vc[d];
      atomicAdd(gc + d, wa * gd);
    }
    dot[i] = acc;
  }
  grad_attn[k] = wt[0] * dot[0] + wt[1] * dot[1] + wt[2] * dot[2] + wt[3] * dot[3];
  const T dx = (T(1) - fy) * (dot[1] - dot[0]) + fy * (dot[3] - dot[2]);
  const T dy = (T(1) - fx) * (dot[2] - dot[0]) + fx * (dot[3] - dot[1]);
  grad_loc[2 * k] = a * static_cast<T>(lv.w[l]) * dx;
  grad_loc[2 * k + 1] = a * static_cast<T>(lv.h[l]) * dy;
}

Levels make_levels(const int64_t* hw, int64_t nL) {
  Levels lv{};
  int64_t start = 0;
  for (int64_t l = 0; l < nL && l < kMaxLevels; ++l) {
    lv.h[l] = hw[2 * l];
    lv.w[l] = hw[2 * l + 1];
    lv.start[l] = start;
    start += lv.h[l] * lv.w[l];
  }
  return lv;
}

unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

// ---- launchers (declared in ms_deform_attn.cpp); hw: host array [h0, w0, h1, w1, ...] ----

namespace clouds_cuda {

template <typename T>
void msda_forward(const T* value, const T* loc, const T* attn, T* out, int64_t B, int64_t S, int64_t nH, int64_t Dh,
                  int64_t Lq, int64_t nL, int64_t nP, const int64_t* hw, cudaStream_t stream) {
  const int64_t n = B * Lq * nH * Dh;
  if (n == 0) return;  // an empty grid is an invalid launch configuration
  CLOUDS_LAUNCH(forward_kernel<T>, blocks(n), kThreads, stream)(value, loc, attn, out, S, nH, Dh, Lq, nL, nP, n,
                                                                 make_levels(hw, nL));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void msda_backward(const T* grad_out, const T* value, const T* loc, const T* attn, T* grad_value, T* grad_loc,
                   T* grad_attn, int64_t B, int64_t S, int64_t nH, int64_t Dh, int64_t Lq, int64_t nL, int64_t nP,
                   const int64_t* hw, cudaStream_t stream) {
  const int64_t n = B * Lq * nH * nL * nP;
  if (n == 0) return;  // no samples (nL or nP is 0): the gradients stay zero
  CLOUDS_LAUNCH(backward_kernel<T>, blocks(n), kThreads, stream)(grad_out, value, loc, attn, grad_value, grad_loc,
                                                                  grad_attn, S, nH, Dh, Lq, nL, nP, n,
                                                                  make_levels(hw, nL));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void msda_forward<float>(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, const int64_t*, cudaStream_t);
template void msda_forward<double>(const double*, const double*, const double*, double*, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, int64_t, const int64_t*, cudaStream_t);
template void msda_backward<float>(const float*, const float*, const float*, const float*, float*, float*, float*,
                                   int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*,
                                   cudaStream_t);
template void msda_backward<double>(const double*, const double*, const double*, const double*, double*, double*,
                                    double*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                    const int64_t*, cudaStream_t);

}  // namespace clouds_cuda
