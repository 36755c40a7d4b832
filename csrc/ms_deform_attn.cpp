// Multi-scale deformable attention (Deformable-DETR core, the pixel decoder's encoder, Sec. 3.1) on the CPU, forward
// and backward. Spec: ops.ms_deform_attn_ref (grid_sample per level, bilinear, zeros outside, align_corners=False).
//
// Sampling point (x, y) in [0, 1] of a level h x w reads the pixel-centre grid at (x * w - 0.5, y * h - 0.5), the
// source coordinate grid_sample computes from 2 * loc - 1 (with its rounding); neighbours outside the map read zero. The value
// layout (B, S, nH, Dh) keeps the Dh channels of one (pixel, head) contiguous, so every corner is one vector FMA.
// Forward: parallel over (batch, query), all heads. Backward: parallel over (batch, head), so each thread owns its
// slice of grad_value (no atomics); it also writes the location and weight gradients of that (batch, head).
// The kernels are compiled for AVX-512, AVX2+FMA and baseline SIMD (the Dh loops vectorize) and picked at run time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "registration.h"

namespace {

#define MSDA_INLINE inline __attribute__((always_inline))

struct Sizes {
  int64_t B, S, nH, Dh, Lq, nL, nP;
  const int64_t* hw;     // (nL, 2) level heights and widths
  const int64_t* start;  // (nL,) first token of each level in S
};

// The four bilinear neighbours of a sampling point: flat pixel index (or -1 outside) and weight.
template <typename T>
struct Corners {
  int64_t idx[4];
  T w[4];
  T fx, fy;  // fractional position inside the cell (for the location gradient)
};

// v, rounded: keeps the compiler from fusing the product before it into an FMA (different rounding).
template <typename T>
MSDA_INLINE T rounded(T v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(v));
#elif defined(__GNUC__)
  asm("" : "+w"(v));
#endif
  return v;
}

// Pixel coordinate of l in [0, 1] on a grid of n pixels, rounded as grid_sample's CPU kernel computes it from
// g = 2 * l - 1 (align_corners=False): (g + 1) * (n / 2) - 0.5. At the model's initialization the sampling points
// sit exactly on pixel centres, where the bilinear gradient jumps: the same rounding picks the same cell.
template <typename T>
MSDA_INLINE T source_coord(T l, int64_t n) {
  const T g = rounded(l * T(2)) - T(1);
  return rounded((g + T(1)) * (static_cast<T>(n) / T(2))) - T(0.5);
}

// (x, y) in [0, 1] -> neighbours on an h x w grid; false when none is inside (also for NaN).
template <typename T>
MSDA_INLINE bool corners(T lx, T ly, int64_t h, int64_t w, Corners<T>& c) {
  const T x = source_coord(lx, w), y = source_coord(ly, h);  // align_corners=False
  if (!(x > T(-1) && x < static_cast<T>(w) && y > T(-1) && y < static_cast<T>(h))) return false;
  const T xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  c.fx = x - xf;
  c.fy = y - yf;
  const bool xin0 = x0 >= 0, xin1 = x0 + 1 < w, yin0 = y0 >= 0, yin1 = y0 + 1 < h;
  c.idx[0] = xin0 && yin0 ? y0 * w + x0 : -1;                 // (x0, y0)
  c.idx[1] = xin1 && yin0 ? y0 * w + x0 + 1 : -1;             // (x1, y0)
  c.idx[2] = xin0 && yin1 ? (y0 + 1) * w + x0 : -1;           // (x0, y1)
  c.idx[3] = xin1 && yin1 ? (y0 + 1) * w + x0 + 1 : -1;       // (x1, y1)
  c.w[0] = (T(1) - c.fx) * (T(1) - c.fy);
  c.w[1] = c.fx * (T(1) - c.fy);
  c.w[2] = (T(1) - c.fx) * c.fy;
  c.w[3] = c.fx * c.fy;
  return true;
}

// ---- forward ----

// out[b, q, h, :] = sum_{l, p} weight * bilinear(value_l[b, :, h, :], location), for queries [q_begin, q_end) of b.
template <typename T>
MSDA_INLINE void forward_rows(const Sizes& s, const T* __restrict__ value, const T* __restrict__ loc,
                              const T* __restrict__ attn, T* __restrict__ out, int64_t begin, int64_t end) {
  const int64_t Dh = s.Dh, pix = s.nH * s.Dh;  // value stride between pixels
  for (int64_t bq = begin; bq < end; ++bq) {
    const int64_t b = bq / s.Lq;
    for (int64_t h = 0; h < s.nH; ++h) {
      T* __restrict__ o = out + (bq * s.nH + h) * Dh;
      for (int64_t d = 0; d < Dh; ++d) o[d] = T(0);
      const int64_t base = (bq * s.nH + h) * s.nL * s.nP;  // (b, q, h, l=0, p=0) in weights
      for (int64_t l = 0; l < s.nL; ++l) {
        const int64_t lh = s.hw[2 * l], lw = s.hw[2 * l + 1];
        const T* v = value + ((b * s.S + s.start[l]) * s.nH + h) * Dh;
        for (int64_t p = 0; p < s.nP; ++p) {
          const int64_t k = base + l * s.nP + p;
          Corners<T> c;
          if (!corners(loc[2 * k], loc[2 * k + 1], lh, lw, c)) continue;
          const T a = attn[k];
          for (int i = 0; i < 4; ++i) {
            if (c.idx[i] < 0) continue;
            const T wa = c.w[i] * a;
            const T* __restrict__ vc = v + c.idx[i] * pix;
#pragma omp simd
            for (int64_t d = 0; d < Dh; ++d) o[d] += wa * vc[d];
          }
        }
      }
    }
  }
}

// ---- backward ----

// Gradients of one (b, h): grad_value[b, :, h, :] (zero-initialized), grad_loc and grad_attn of its samples.
template <typename T>
MSDA_INLINE void backward_head(const Sizes& s, const T* __restrict__ grad_out, const T* __restrict__ value,
                               const T* __restrict__ loc, const T* __restrict__ attn, T* __restrict__ grad_value,
                               T* __restrict__ grad_loc, T* __restrict__ grad_attn, int64_t b, int64_t h) {
  const int64_t Dh = s.Dh, pix = s.nH * s.Dh;
  for (int64_t q = 0; q < s.Lq; ++q) {
    const int64_t bq = b * s.Lq + q;
    const T* __restrict__ g = grad_out + (bq * s.nH + h) * Dh;
    const int64_t base = (bq * s.nH + h) * s.nL * s.nP;
    for (int64_t l = 0; l < s.nL; ++l) {
      const int64_t lh = s.hw[2 * l], lw = s.hw[2 * l + 1];
      const int64_t off = ((b * s.S + s.start[l]) * s.nH + h) * Dh;
      const T* v = value + off;
      T* gv = grad_value + off;
      for (int64_t p = 0; p < s.nP; ++p) {
        const int64_t k = base + l * s.nP + p;
        Corners<T> c;
        if (!corners(loc[2 * k], loc[2 * k + 1], lh, lw, c)) {
          grad_loc[2 * k] = grad_loc[2 * k + 1] = grad_attn[k] = T(0);
          continue;
        }
        const T a = attn[k];
        T dot[4] = {T(0), T(0), T(0), T(0)};  // <grad_out, value at corner i>
        for (int i = 0; i < 4; ++i) {
          if (c.idx[i] < 0) continue;
          const T wa = c.w[i] * a;
          const T* __restrict__ vc = v + c.idx[i] * pix;
          T* __restrict__ gc = gv + c.idx[i] * pix;
          T acc = T(0);
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < Dh; ++d) {
            acc += g[d] * vc[d];
            gc[d] += wa * g[d];
          }
          dot[i] = acc;
        }
        grad_attn[k] = c.w[0] * dot[0] + c.w[1] * dot[1] + c.w[2] * dot[2] + c.w[3] * dot[3];
        // d(bilinear)/dx and /dy in pixels; the pixel coordinate is loc * size - 0.5
        const T dx = (T(1) - c.fy) * (dot[1] - dot[0]) + c.fy * (dot[3] - dot[2]);
        const T dy = (T(1) - c.fx) * (dot[2] - dot[0]) + c.fx * (dot[3] - dot[1]);
        grad_loc[2 * k] = a * static_cast<T>(lw) * dx;
        grad_loc[2 * k + 1] = a * static_cast<T>(lh) * dy;
      }
    }
  }
}

template <typename T>
struct Args {
  Sizes s;
  const T *grad_out, *value, *loc, *attn;
  T *out, *grad_value, *grad_loc, *grad_attn;
  int64_t begin, end;  // forward: (b, q) range; backward: (b, h) range
};

template <typename T>
MSDA_INLINE void forward_range(const Args<T>& a) {
  forward_rows<T>(a.s, a.value, a.loc, a.attn, a.out, a.begin, a.end);
}

template <typename T>
MSDA_INLINE void backward_range(const Args<T>& a) {
  for (int64_t bh = a.begin; bh < a.end; ++bh)
    backward_head<T>(a.s, a.grad_out, a.value, a.loc, a.attn, a.grad_value, a.grad_loc, a.grad_attn, bh / a.s.nH,
                     bh % a.s.nH);
}

#if defined(__x86_64__) || defined(__i386__)
#define MSDA_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define MSDA_AVX2 __attribute__((target("avx2,fma")))
template <typename T> MSDA_AVX512 void forward_avx512(const Args<T>& a) { forward_range<T>(a); }
template <typename T> MSDA_AVX512 void backward_avx512(const Args<T>& a) { backward_range<T>(a); }
template <typename T> MSDA_AVX2 void forward_avx2(const Args<T>& a) { forward_range<T>(a); }
template <typename T> MSDA_AVX2 void backward_avx2(const Args<T>& a) { backward_range<T>(a); }
#endif
template <typename T> void forward_base(const Args<T>& a) { forward_range<T>(a); }
template <typename T> void backward_base(const Args<T>& a) { backward_range<T>(a); }

template <typename T>
struct Kernels {
  void (*forward)(const Args<T>&);
  void (*backward)(const Args<T>&);
};

template <typename T>
Kernels<T> pick_kernels() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return {forward_avx512<T>, backward_avx512<T>};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {forward_avx2<T>, backward_avx2<T>};
#endif
  return {forward_base<T>, backward_base<T>};
}

// ---- the ops ----

// Checks the shapes (see the schema in library.cpp); returns the level table [h0, w0, h1, w1, ...] and start offsets.
void check_inputs(const char* op, const at::Tensor& value, at::IntArrayRef shapes, const at::Tensor& locations,
                  const at::Tensor& weights) {
  TORCH_CHECK(value.dim() == 4 && locations.dim() == 6 && weights.dim() == 5, op,
              ": expected value (B, S, nH, Dh), locations (B, Lq, nH, nL, nP, 2) and weights (B, Lq, nH, nL, nP), got ",
              value.sizes(), ", ", locations.sizes(), " and ", weights.sizes());
  TORCH_CHECK(value.scalar_type() == locations.scalar_type() && value.scalar_type() == weights.scalar_type() &&
                  (value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble),
              op, ": expected float32 or float64 inputs of one dtype, got ", value.scalar_type(), ", ",
              locations.scalar_type(), " and ", weights.scalar_type());
  const int64_t B = value.size(0), S = value.size(1), nH = value.size(2);
  const int64_t Lq = locations.size(1), nL = locations.size(3), nP = locations.size(4);
  TORCH_CHECK(locations.size(0) == B && locations.size(2) == nH && locations.size(5) == 2, op, ": locations ",
              locations.sizes(), " do not match value ", value.sizes(), " (need (B, Lq, nH, nL, nP, 2))");
  TORCH_CHECK(weights.sizes() == locations.sizes().slice(0, 5), op, ": weights ", weights.sizes(),
              " must be locations.shape[:5] = ", locations.sizes().slice(0, 5));
  TORCH_CHECK(static_cast<int64_t>(shapes.size()) == 2 * nL, op, ": shapes must list h, w of the ", nL,
              " levels (", 2 * nL, " ints), got ", shapes.size());
  int64_t total = 0;
  for (int64_t l = 0; l < nL; ++l) {
    TORCH_CHECK(shapes[2 * l] > 0 && shapes[2 * l + 1] > 0, op, ": level ", l, " has size ", shapes[2 * l], "x",
                shapes[2 * l + 1]);
    total += shapes[2 * l] * shapes[2 * l + 1];
  }
  TORCH_CHECK(total == S, op, ": value has S=", S, " tokens but the level sizes sum to ", total);
  TORCH_CHECK(value.device() == locations.device() && value.device() == weights.device(), op,
              ": inputs on different devices");
}

Sizes make_sizes(const at::Tensor& value, const at::Tensor& locations, at::IntArrayRef shapes,
                 std::vector<int64_t>& start) {
  const int64_t nL = locations.size(3);
  start.assign(nL, 0);
  for (int64_t l = 1; l < nL; ++l) start[l] = start[l - 1] + shapes[2 * (l - 1)] * shapes[2 * (l - 1) + 1];
  return {value.size(0), value.size(1), value.size(2), value.size(3), locations.size(1), nL, locations.size(4),
          shapes.data(), start.data()};
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value_, at::IntArrayRef shapes, const at::Tensor& locations_,
                              const at::Tensor& weights_) {
  check_inputs("ms_deform_attn", value_, shapes, locations_, weights_);
  const at::Tensor value = value_.contiguous(), loc = locations_.contiguous(), attn = weights_.contiguous();
  std::vector<int64_t> start;
  const Sizes s = make_sizes(value, loc, shapes, start);
  at::Tensor out = at::empty({s.B, s.Lq, s.nH * s.Dh}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn", [&] {
    static const Kernels<scalar_t> K = pick_kernels<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, s.nH * s.nL * s.nP));  // ~2k samples a task
    at::parallel_for(0, s.B * s.Lq, grain, [&](int64_t begin, int64_t end) {
      K.forward({s, nullptr, value.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
                 out.data_ptr<scalar_t>(), nullptr, nullptr, nullptr, begin, end});
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& grad_output,
                                                                           const at::Tensor& value_,
                                                                           at::IntArrayRef shapes,
                                                                           const at::Tensor& locations_,
                                                                           const at::Tensor& weights_) {
  check_inputs("ms_deform_attn_backward", value_, shapes, locations_, weights_);
  const at::Tensor value = value_.contiguous(), loc = locations_.contiguous(), attn = weights_.contiguous();
  std::vector<int64_t> start;
  const Sizes s = make_sizes(value, loc, shapes, start);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.B && grad_output.size(1) == s.Lq &&
                  grad_output.size(2) == s.nH * s.Dh && grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn_backward: grad_output must be (B, Lq, nH*Dh) = (", s.B, ", ", s.Lq, ", ", s.nH * s.Dh,
              ") of ", value.scalar_type(), ", got ", grad_output.sizes(), " ", grad_output.scalar_type());
  const at::Tensor g = grad_output.contiguous();
  at::Tensor grad_value = at::zeros(value.sizes(), value.options());
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
  if (s.B * s.Lq * s.nH == 0 || s.Dh == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward", [&] {
    static const Kernels<scalar_t> K = pick_kernels<scalar_t>();
    at::parallel_for(0, s.B * s.nH, 1, [&](int64_t begin, int64_t end) {
      K.backward({s, g.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(),
                  attn.data_ptr<scalar_t>(), nullptr, grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
                  grad_attn.data_ptr<scalar_t>(), begin, end});
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

CLOUDS_CPU_IMPL(m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

#ifdef WITH_CUDA
// ---- CUDA: kernels in ms_deform_attn_cuda.cu (raw CUDA, quick to compile); tensors handled here ----

namespace clouds_cuda {
constexpr int64_t kMsdaMaxLevels = 16;  // keep equal to kMaxLevels in ms_deform_attn_cuda.cu
template <typename T>
void msda_forward(const T* value, const T* loc, const T* attn, T* out, int64_t B, int64_t S, int64_t nH, int64_t Dh,
                  int64_t Lq, int64_t nL, int64_t nP, const int64_t* hw, cudaStream_t stream);
template <typename T>
void msda_backward(const T* grad_out, const T* value, const T* loc, const T* attn, T* grad_value, T* grad_loc,
                   T* grad_attn, int64_t B, int64_t S, int64_t nH, int64_t Dh, int64_t Lq, int64_t nL, int64_t nP,
                   const int64_t* hw, cudaStream_t stream);
}  // namespace clouds_cuda

namespace {

at::Tensor ms_deform_attn_cuda(const at::Tensor& value_, at::IntArrayRef shapes, const at::Tensor& locations_,
                               const at::Tensor& weights_) {
  check_inputs("ms_deform_attn", value_, shapes, locations_, weights_);
  TORCH_CHECK(locations_.size(3) <= clouds_cuda::kMsdaMaxLevels, "ms_deform_attn: the CUDA kernel takes at most ",
              clouds_cuda::kMsdaMaxLevels, " levels, got ", locations_.size(3));
  const c10::cuda::CUDAGuard guard(value_.device());
  const at::Tensor value = value_.contiguous(), loc = locations_.contiguous(), attn = weights_.contiguous();
  const int64_t B = value.size(0), S = value.size(1), nH = value.size(2), Dh = value.size(3);
  const int64_t Lq = loc.size(1), nL = loc.size(3), nP = loc.size(4);
  at::Tensor out = at::empty({B, Lq, nH * Dh}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cuda", [&] {
    clouds_cuda::msda_forward<scalar_t>(value.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(),
                                        attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, S, nH, Dh, Lq, nL, nP,
                                        shapes.data(), c10::cuda::getCurrentCUDAStream());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& grad_output,
                                                                            const at::Tensor& value_,
                                                                            at::IntArrayRef shapes,
                                                                            const at::Tensor& locations_,
                                                                            const at::Tensor& weights_) {
  check_inputs("ms_deform_attn_backward", value_, shapes, locations_, weights_);
  TORCH_CHECK(locations_.size(3) <= clouds_cuda::kMsdaMaxLevels, "ms_deform_attn_backward: the CUDA kernel takes "
              "at most ", clouds_cuda::kMsdaMaxLevels, " levels, got ", locations_.size(3));
  const c10::cuda::CUDAGuard guard(value_.device());
  const at::Tensor value = value_.contiguous(), loc = locations_.contiguous(), attn = weights_.contiguous();
  const int64_t B = value.size(0), S = value.size(1), nH = value.size(2), Dh = value.size(3);
  const int64_t Lq = loc.size(1), nL = loc.size(3), nP = loc.size(4);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == B && grad_output.size(1) == Lq &&
                  grad_output.size(2) == nH * Dh && grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device(),
              "ms_deform_attn_backward: grad_output must be (B, Lq, nH*Dh) = (", B, ", ", Lq, ", ", nH * Dh, ") of ",
              value.scalar_type(), " on ", value.device(), ", got ", grad_output.sizes(), " ",
              grad_output.scalar_type());
  const at::Tensor g = grad_output.contiguous();
  at::Tensor grad_value = at::zeros(value.sizes(), value.options());  // atomics accumulate into it
  at::Tensor grad_loc = at::zeros(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::zeros(attn.sizes(), attn.options());
  if (B * Lq * nH == 0 || Dh == 0) return {grad_value, grad_loc, grad_attn};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    clouds_cuda::msda_backward<scalar_t>(g.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(),
                                         attn.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
                                         grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), B, S, nH, Dh,
                                         Lq, nL, nP, shapes.data(), c10::cuda::getCurrentCUDAStream());
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

CLOUDS_CUDA_IMPL(m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}
#endif
