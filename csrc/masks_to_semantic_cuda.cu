// Mask2Former semantic inference on the GPU, one thread per output pixel (reference §3.4).
//
// Each thread interpolates the Q mask logits at its pixel (torch's align_corners=False arithmetic), applies the
// sigmoid and accumulates sum_q p[q, c] * sigmoid in registers, kClassBlock classes at a time; then it writes the
// argmax or the scores. Nothing of size (B, Q, H, W) is allocated. Raw CUDA (no torch headers, so nvcc takes
// seconds); masks_to_semantic.cpp checks and allocates the tensors.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_hooks.h"

namespace {

constexpr int kThreads = 256;
constexpr int kClassBlock = 32;   // class accumulators per pass (registers); more classes take more passes

// torch: area_pixel_compute_source_index + guard_index_and_lambda (float math, align_corners=False)
__device__ __forceinline__ void source_index(float scale, int64_t dst, int64_t in, int64_t& i0, int64_t& i1,
                                             float& w0, float& w1) {
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  i0 = min(static_cast<int64_t>(floorf(src)), in - 1);
  const float lambda = fminf(fmaxf(src - static_cast<float>(i0), 0.f), 1.f);
  i1 = i0 + (i0 < in - 1 ? 1 : 0);
  w0 = 1.f - lambda;
  w1 = lambda;
}

__global__ void semantic_kernel(const float* __restrict__ prob, const float* __restrict__ masks, int64_t B, int64_t Q,
                                int64_t C, int64_t h, int64_t w, int64_t H, int64_t W, float scale_y, float scale_x,
                                int64_t* __restrict__ labels, float* __restrict__ scores) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= B * H * W) return;
  const int64_t x = t % W, y = (t / W) % H, b = t / (H * W);
  int64_t y0, y1, x0, x1;
  float wy0, wy1, wx0, wx1;
  source_index(scale_y, y, h, y0, y1, wy0, wy1);
  source_index(scale_x, x, w, x0, x1, wx0, wx1);
  const float* m = masks + b * Q * h * w;
  const float* p = prob + b * Q * C;
  float best = 0.f;
  int64_t arg = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kClassBlock) {
    float acc[kClassBlock];
#pragma unroll
    for (int c = 0; c < kClassBlock; ++c) acc[c] = 0.f;
    for (int64_t q = 0; q < Q; ++q) {
      const float* mq = m + q * h * w;
      const float t0 = mq[y0 * w + x0] * wx0 + mq[y0 * w + x1] * wx1;          // §3.4: bilinear
      const float t1 = mq[y1 * w + x0] * wx0 + mq[y1 * w + x1] * wx1;
      const float s = 1.f / (1.f + expf(-(t0 * wy0 + t1 * wy1)));            // §3.4: sigmoid
      const float* pq = p + q * C + c0;
#pragma unroll
      for (int c = 0; c < kClassBlock; ++c)
        if (c0 + c < C) acc[c] += __ldg(pq + c) * s;                          // §3.4: sum_q p[q, c] * mask
    }
#pragma unroll
    for (int c = 0; c < kClassBlock; ++c) {
      const int64_t cls = c0 + c;
      if (cls < C) {
        if (scores) scores[((b * C + cls) * H + y) * W + x] = acc[c];
        if (cls == 0 || acc[c] > best) {                                       // first max on ties
          best = acc[c];
          arg = cls;
        }
      }
    }
  }
  if (labels) labels[t] = arg;
}

}  // namespace

// ---- launcher (declared in masks_to_semantic.cpp) ----

namespace clouds_cuda {

// prob (B, Q, C), masks (B, Q, h, w) contiguous float32 -> labels (B, H, W) or scores (B, C, H, W) (one is nullptr)
void m2s_launch(const float* prob, const float* masks, int64_t B, int64_t Q, int64_t C, int64_t h, int64_t w,
                int64_t H, int64_t W, int64_t* labels, float* scores, cudaStream_t stream) {
  const int64_t n = B * H * W;
  if (n == 0) return;  // an empty grid is an invalid launch configuration
  CLOUDS_LAUNCH(semantic_kernel, static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, stream)(
      prob, masks, B, Q, C, h, w, H, W, static_cast<float>(h) / static_cast<float>(H),
      static_cast<float>(w) / static_cast<float>(W), labels, scores);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace clouds_cuda
