// Mask2Former semantic inference on the CPU, fused per output row (reference §3.4). Spec: ops.masks_to_semantic_ref.
//
// Per output row and per vector of L output pixels: interpolate the Q mask logits bilinearly (align_corners=False,
// torch's index/weight arithmetic and summation order: along x within an input row, then along y), sigmoid, and
// accumulate sum_q p[q, c] * sigmoid in C registers; then argmax (or store the scores). Input rows interpolated
// along x are cached (two rows of (W, Q) per thread), so the (B, Q, H, W) masks the naive path holds twice
// (~1.6 GB at Q=100, 1024x2048) never exist. The kernels use GCC/Clang vector extensions, compiled for AVX-512,
// AVX2+FMA and baseline SIMD and picked at run time, so the build flags stay portable.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "registration.h"

namespace {

// ---- interpolation weights (torch: area_pixel_compute_source_index + guard_index_and_lambda, float math) ----

struct Linear {
  std::vector<int32_t> i0, i1;
  std::vector<float> w0, w1;
};

// Source indices and weights of each of `out` outputs; entries up to `padded` repeat the last source with weight 0.
Linear linear_weights(int64_t in, int64_t out, int64_t padded) {
  Linear l;
  l.i0.assign(padded, static_cast<int32_t>(in - 1));
  l.i1.assign(padded, static_cast<int32_t>(in - 1));
  l.w0.assign(padded, 0.f);
  l.w1.assign(padded, 0.f);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t i = 0; i < out; ++i) {
    float src = scale * (static_cast<float>(i) + 0.5f) - 0.5f;
    if (src < 0.f) src = 0.f;
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    const float lambda = std::min(std::max(src - static_cast<float>(i0), 0.f), 1.f);
    l.i0[i] = static_cast<int32_t>(i0);
    l.i1[i] = static_cast<int32_t>(i0 + (i0 < in - 1 ? 1 : 0));
    l.w0[i] = 1.f - lambda;
    l.w1[i] = lambda;
  }
  return l;
}

// ---- SIMD kernels ----

#define CLOUDS_INLINE inline __attribute__((always_inline))
typedef float f4 __attribute__((vector_size(16), may_alias));
typedef int32_t i4 __attribute__((vector_size(16), may_alias));
typedef float f8 __attribute__((vector_size(32), may_alias));
typedef int32_t i8 __attribute__((vector_size(32), may_alias));
typedef float f16 __attribute__((vector_size(64), may_alias));
typedef int32_t i16 __attribute__((vector_size(64), may_alias));

// exp(x): Cephes' polynomial on x - n ln2 (max rel. error ~2 ulp), n rounded with the 1.5 * 2^23 trick;
// x is clamped to [-87, 88], where sigmoid has saturated in float32.
template <typename V, typename VI>
CLOUDS_INLINE V vexp(V x) {
  x = x > 88.f ? V{} + 88.f : x;
  x = x < -87.f ? V{} - 87.f : x;
  const V t = x * 1.44269504088896341f + 12582912.f;                  // n = round(x / ln2) in the low bits of t
  const V n = t - 12582912.f;
  x = x - n * 0.693359375f;
  x = x - n * -2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.f;
  const VI e = (reinterpret_cast<const VI&>(t) - 0x4B400000 + 127) << 23;  // 2^n as float bits
  return y * reinterpret_cast<const V&>(e);
}

struct RowArgs {
  const float* h0;      // input row y0 interpolated along x, blocked (W/L, Q, L)
  const float* h1;      // input row y1, same layout
  float wy0, wy1;
  const float* prob;    // (Q, Cp) class probabilities, zero-padded to Cp columns
  int64_t Q, C, Cp, W;
  float* sig;           // (Q, L) scratch
  float* scores;        // class c, pixel x at scores[c * cstride + x]; or nullptr
  int64_t cstride;
  int64_t* labels;      // (W,) or nullptr
};

// One output row: sigmoid of the interpolated logits, CB class accumulators per vector of L pixels, argmax/store.
template <typename V, typename VI, int CB>
CLOUDS_INLINE void semantic_row(const RowArgs& a) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  V* sig = reinterpret_cast<V*>(a.sig);
  for (int64_t x0 = 0; x0 < a.W; x0 += L) {
    const V* r0 = reinterpret_cast<const V*>(a.h0 + x0 * a.Q);
    const V* r1 = reinterpret_cast<const V*>(a.h1 + x0 * a.Q);
    for (int64_t q = 0; q < a.Q; ++q) {
      const V v = r0[q] * a.wy0 + r1[q] * a.wy1;                       // §3.4: bilinear (along y)
      sig[q] = 1.f / (1.f + vexp<V, VI>(-v));                           // §3.4: mask_prob = sigmoid
    }
    const int64_t n = std::min(L, a.W - x0);
    V best{};
    VI arg{};
    for (int64_t cb = 0; cb < a.Cp; cb += CB) {
      V acc[CB];
#pragma GCC unroll 32
      for (int c = 0; c < CB; ++c) acc[c] = V{};
      for (int64_t q = 0; q < a.Q; ++q) {                               // §3.4: sum_q p[q, c] * mask_prob[q]
        const V s = sig[q];
        const float* p = a.prob + q * a.Cp + cb;
#pragma GCC unroll 32
        for (int c = 0; c < CB; ++c) acc[c] += p[c] * s;
      }
#pragma GCC unroll 32
      for (int c = 0; c < CB; ++c) {
        const int64_t cls = cb + c;
        if (cls >= a.C) break;
        if (a.scores) std::memcpy(a.scores + cls * a.cstride + x0, &acc[c], n * sizeof(float));
        if (cls == 0) {
          best = acc[c];
        } else {                                                        // first max on ties, like torch.argmax
          const VI gt = acc[c] > best;
          best = gt ? acc[c] : best;
          arg = gt ? VI{} + static_cast<int32_t>(cls) : arg;
        }
      }
    }
    if (a.labels)
      for (int64_t i = 0; i < n; ++i) a.labels[x0 + i] = arg[i];
  }
}

struct InterpArgs {
  const float* src;     // query 0 of the input row; query q at src + q * qstride
  int64_t qstride, Q, w, Wp;
  const int32_t *x0, *x1;
  const float *wx0, *wx1;
  float* dst;           // blocked (Wp/L, Q, L)
};

// One input row interpolated along x for all queries. A block of L outputs whose sources span fewer than L input
// columns (any upsampling) loads L consecutive inputs once and permutes them; other blocks gather.
template <typename V, typename VI>
CLOUDS_INLINE void interp_row(const InterpArgs& a) {
  constexpr int64_t L = sizeof(V) / sizeof(float), QB = 16;            // QB queries per tile: few pages at a time
  for (int64_t q0 = 0; q0 < a.Q; q0 += QB) {
    const int64_t q1 = std::min(a.Q, q0 + QB);
    for (int64_t xb = 0; xb < a.Wp; xb += L) {
      float* d = a.dst + xb * a.Q;
      const int32_t base = a.x0[xb];
#if defined(__GNUC__) && !defined(__clang__)
      if (a.x1[xb + L - 1] - base < L && base + L <= a.w) {
        VI i0, i1;
        V w0, w1;
        std::memcpy(&i0, a.x0 + xb, sizeof(VI));
        std::memcpy(&i1, a.x1 + xb, sizeof(VI));
        std::memcpy(&w0, a.wx0 + xb, sizeof(V));
        std::memcpy(&w1, a.wx1 + xb, sizeof(V));
        i0 -= base;
        i1 -= base;
        for (int64_t q = q0; q < q1; ++q) {
          V v;
          std::memcpy(&v, a.src + q * a.qstride + base, sizeof(V));
          const V r = __builtin_shuffle(v, i0) * w0 + __builtin_shuffle(v, i1) * w1;  // §3.4: bilinear (x)
          std::memcpy(d + q * L, &r, sizeof(V));
        }
        continue;
      }
#endif
      for (int64_t q = q0; q < q1; ++q) {
        const float* s = a.src + q * a.qstride;
        for (int64_t i = 0; i < L; ++i)                                 // §3.4: bilinear (along x)
          d[q * L + i] = s[a.x0[xb + i]] * a.wx0[xb + i] + s[a.x1[xb + i]] * a.wx1[xb + i];
      }
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
#define CLOUDS_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define CLOUDS_AVX2 __attribute__((target("avx2,fma")))
CLOUDS_AVX512 void row_avx512(const RowArgs& a) { semantic_row<f16, i16, 20>(a); }
CLOUDS_AVX512 void interp_avx512(const InterpArgs& a) { interp_row<f16, i16>(a); }
CLOUDS_AVX2 void row_avx2(const RowArgs& a) { semantic_row<f8, i8, 10>(a); }
CLOUDS_AVX2 void interp_avx2(const InterpArgs& a) { interp_row<f8, i8>(a); }
#endif
void row_base(const RowArgs& a) { semantic_row<f4, i4, 10>(a); }
void interp_base(const InterpArgs& a) { interp_row<f4, i4>(a); }

struct Kernels {
  int64_t L, CB;
  void (*row)(const RowArgs&);
  void (*interp)(const InterpArgs&);
};

Kernels pick_kernels() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return {16, 20, row_avx512, interp_avx512};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {8, 10, row_avx2, interp_avx2};
#endif
  return {4, 10, row_base, interp_base};
}

// ---- the op ----

void check_inputs(const at::Tensor& class_prob, const at::Tensor& mask_logits, int64_t height, int64_t width) {
  TORCH_CHECK(class_prob.dim() == 3 && mask_logits.dim() == 4,
              "masks_to_semantic: expected class_prob (B, Q, C) and mask_logits (B, Q, h, w), got ",
              class_prob.sizes(), " and ", mask_logits.sizes());
  TORCH_CHECK(class_prob.scalar_type() == at::kFloat && mask_logits.scalar_type() == at::kFloat,
              "masks_to_semantic: expected float32 inputs, got ", class_prob.scalar_type(), " and ",
              mask_logits.scalar_type());
  const int64_t B = mask_logits.size(0), Q = mask_logits.size(1), h = mask_logits.size(2), w = mask_logits.size(3);
  const int64_t C = class_prob.size(2), H = height, W = width;
  TORCH_CHECK(class_prob.size(0) == B && class_prob.size(1) == Q,
              "masks_to_semantic: class_prob ", class_prob.sizes(), " does not match mask_logits ",
              mask_logits.sizes());
  TORCH_CHECK(H >= 0 && W >= 0, "masks_to_semantic: output size must be >= 0, got ", H, "x", W);
  TORCH_CHECK(C >= 1, "masks_to_semantic: need at least one class besides no-object");
  TORCH_CHECK((h > 0 && w > 0) || B * H * W == 0, "masks_to_semantic: empty masks ", mask_logits.sizes());
  TORCH_CHECK(class_prob.device() == mask_logits.device(), "masks_to_semantic: inputs on different devices");
}

at::Tensor masks_to_semantic_cpu(const at::Tensor& class_prob, const at::Tensor& mask_logits, int64_t height,
                                 int64_t width, bool return_scores) {
  check_inputs(class_prob, mask_logits, height, width);
  const int64_t B = mask_logits.size(0), Q = mask_logits.size(1), h = mask_logits.size(2), w = mask_logits.size(3);
  const int64_t C = class_prob.size(2), H = height, W = width;
  at::Tensor out = return_scores ? at::empty({B, C, H, W}, mask_logits.options())
                                 : at::empty({B, H, W}, mask_logits.options().dtype(at::kLong));
  if (B * H * W == 0) return out;
  static const Kernels K = pick_kernels();
  const int64_t L = K.L, Wp = (W + L - 1) / L * L, Cp = (C + K.CB - 1) / K.CB * K.CB;
  at::Tensor prob = at::zeros({B, Q, Cp}, class_prob.options());     // zero-padded classes
  prob.narrow(2, 0, C).copy_(class_prob);
  const at::Tensor masks = mask_logits.contiguous();                 // (B, Q, h, w)
  const float* m = masks.data_ptr<float>();
  const float* pr = prob.data_ptr<float>();
  const Linear ys = linear_weights(h, H, H), xs = linear_weights(w, W, Wp);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({3 * Wp * Q}, masks.options());          // two cached input rows + the sigmoids
    float* rows = buf.data_ptr<float>();
    int64_t key[2] = {-1, -1};                                        // (b, input row) held by each slot

    // slot holding input row `row` of image b, interpolated along x into a slot other than `keep` if missing
    auto input_row = [&](int64_t b, int64_t row, int keep) -> const float* {
      const int64_t k = b * h + row;
      for (int slot = 0; slot < 2; ++slot)
        if (key[slot] == k) return rows + slot * Wp * Q;
      const int slot = keep >= 0 ? 1 - keep : (key[0] < key[1] ? 0 : 1);
      K.interp({m + (b * Q * h + row) * w, h * w, Q, w, Wp, xs.i0.data(), xs.i1.data(), xs.w0.data(), xs.w1.data(),
                rows + slot * Wp * Q});
      key[slot] = k;
      return rows + slot * Wp * Q;
    };

    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / H, y = idx % H;
      const float* h0 = input_row(b, ys.i0[y], -1);
      const int keep = h0 == rows ? 0 : 1;
      const float* h1 = input_row(b, ys.i1[y], keep);
      RowArgs a{h0, h1, ys.w0[y], ys.w1[y], pr + b * Q * Cp, Q, C, Cp, W, rows + 2 * Wp * Q, nullptr, H * W, nullptr};
      if (return_scores) a.scores = out.data_ptr<float>() + b * C * H * W + y * W;
      else a.labels = out.data_ptr<int64_t>() + (b * H + y) * W;
      K.row(a);
    }
  });
  return out;
}

}  // namespace

CLOUDS_CPU_IMPL(m) {
  m.impl("masks_to_semantic", &masks_to_semantic_cpu);
}

#ifdef WITH_CUDA
// ---- CUDA: the kernel is in masks_to_semantic_cuda.cu (raw CUDA, quick to compile); tensors handled here ----

namespace clouds_cuda {
void m2s_launch(const float* prob, const float* masks, int64_t B, int64_t Q, int64_t C, int64_t h, int64_t w,
                int64_t H, int64_t W, int64_t* labels, float* scores, cudaStream_t stream);
}  // namespace clouds_cuda

namespace {

at::Tensor masks_to_semantic_cuda(const at::Tensor& class_prob, const at::Tensor& mask_logits, int64_t height,
                                  int64_t width, bool return_scores) {
  check_inputs(class_prob, mask_logits, height, width);
  const int64_t B = mask_logits.size(0), Q = mask_logits.size(1), h = mask_logits.size(2), w = mask_logits.size(3);
  const int64_t C = class_prob.size(2), H = height, W = width;
  const c10::cuda::CUDAGuard guard(mask_logits.device());
  at::Tensor out = return_scores ? at::empty({B, C, H, W}, mask_logits.options())
                                 : at::empty({B, H, W}, mask_logits.options().dtype(at::kLong));
  if (B * H * W == 0) return out;
  const at::Tensor prob = class_prob.contiguous(), masks = mask_logits.contiguous();
  clouds_cuda::m2s_launch(prob.data_ptr<float>(), masks.data_ptr<float>(), B, Q, C, h, w, H, W,
                          return_scores ? nullptr : out.data_ptr<int64_t>(),
                          return_scores ? out.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace

CLOUDS_CUDA_IMPL(m) {
  m.impl("masks_to_semantic", &masks_to_semantic_cuda);
}
#endif
