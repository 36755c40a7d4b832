// Point prompts per connected component on the CPU (reference §5.2.2). Spec: ops.sample_points_ref.
//
// No per-component mask is ever built (the official code made a full-frame mask and ran np.where per component).
// A component's pixels are addressed by their rank in raster order: one pass over the map collects the row runs of
// the candidate components, ranks are drawn from the caller's uniforms, and each rank is found in its candidate's
// runs.
// "interior" mode first finds each candidate's pixel farthest from its boundary with an exact Euclidean distance
// transform (column pass + Felzenszwalb-Huttenlocher lower envelope per row run; ties -> first in raster order).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#ifdef WITH_CUDA
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "registration.h"

namespace {

// The image is cut into strips of rows of ~kPixelsPerStrip pixels, labelled independently then merged. They run in
// parallel only from kParallelPixels on: a 1024x2048 map takes ~1 ms on one core, less than what a fork/join can
// cost on a busy machine (a descheduled thread stalls every parallel region by a time slice).
constexpr int64_t kPixelsPerStrip = 1 << 20;
constexpr int64_t kParallelPixels = 1 << 23;

// ---- ranks without replacement (also in ops._draw_ranks and sample_points_cuda.cu: keep the three identical) ----

// The first m entries of a Fisher-Yates shuffle of 0..n-1, driven by uniforms u[0..m-1] in [0, 1).
// pos/val (m entries each) record the swaps of the virtual array; the latest record of a position wins.
void draw_ranks(int64_t n, const double* u, int64_t m, int64_t* out, int64_t* pos, int64_t* val) {
  for (int64_t j = 0; j < m; ++j) {
    const int64_t span = n - j;
    const int64_t r = j + std::min<int64_t>(static_cast<int64_t>(std::floor(u[j] * static_cast<double>(span))),
                                            span - 1);
    int64_t vr = r, vj = j;
    for (int64_t t = 0; t < j; ++t) {
      if (pos[t] == r) vr = val[t];
      if (pos[t] == j) vj = val[t];
    }
    out[j] = vr;
    pos[j] = r;
    val[j] = vj;
  }
}

// ---- exact squared Euclidean distance to the nearest pixel of another component (or outside the image) ----

// d2 (B*H*W) receives, for every pixel, the squared distance to the nearest pixel with a different id; pixels
// outside the image count as different. Column pass: distance along the column; row pass: lower envelope of the
// parabolas (x - x')^2 + g(x')^2 over the pixel's row run, closed by zero parabolas just outside the run (the
// nearest different pixel in any other column lies behind the run's end, so the run is all that matters).
void distance_transform(const int32_t* comp, int64_t B, int64_t H, int64_t W, int32_t* d2) {
  const bool parallel = B * H * W >= kParallelPixels;
  // column pass, parallel over column blocks: g = min(down count, up count)
  at::parallel_for(0, W, parallel ? 256 : W, [&](int64_t x0, int64_t x1) {
    std::vector<int32_t> up(x1 - x0);
    for (int64_t b = 0; b < B; ++b) {
      const int32_t* c = comp + b * H * W;
      int32_t* g = d2 + b * H * W;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = x0; x < x1; ++x)
          g[y * W + x] = (y > 0 && c[y * W + x] == c[(y - 1) * W + x]) ? g[(y - 1) * W + x] + 1 : 1;
      for (int64_t y = H - 1; y >= 0; --y)
        for (int64_t x = x0; x < x1; ++x) {
          const int32_t u = (y < H - 1 && c[y * W + x] == c[(y + 1) * W + x]) ? up[x - x0] + 1 : 1;
          up[x - x0] = u;
          g[y * W + x] = std::min(g[y * W + x], u);
        }
    }
  });
  // row pass, parallel over rows
  at::parallel_for(0, B * H, parallel ? 16 : B * H, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> v(W + 2), f(W + 2);
    std::vector<double> z(W + 3);
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t* c = comp + r * W;
      int32_t* g = d2 + r * W;
      for (int64_t cs = 0; cs < W;) {
        int64_t ce = cs + 1;
        while (ce < W && c[ce] == c[cs]) ++ce;
        // parabolas at x' = cs-1 (f=0), cs..ce-1 (f=g^2), ce (f=0)
        auto fval = [&](int64_t q) -> int64_t {
          return (q < cs || q >= ce) ? 0 : static_cast<int64_t>(g[q]) * g[q];
        };
        int64_t k = 0;
        v[0] = cs - 1;
        f[0] = 0;
        z[0] = -std::numeric_limits<double>::infinity();
        z[1] = std::numeric_limits<double>::infinity();
        for (int64_t q = cs; q <= ce; ++q) {
          const int64_t fq = fval(q);
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
          z[k + 1] = std::numeric_limits<double>::infinity();
        }
        k = 0;
        for (int64_t x = cs; x < ce; ++x) {
          while (z[k + 1] < static_cast<double>(x)) ++k;
          g[x] = static_cast<int32_t>((x - v[k]) * (x - v[k]) + f[k]);
        }
        cs = ce;
      }
    }
  });
}

// ---- runs ----

struct Run {
  int32_t slot;         // candidate index
  int64_t start, len;   // flat pixel index and length of a run of equal ids in one row
};

// End of the run of row[c]'s value that starts at c, comparing 16 bytes (4 ids) per step while they all match.
inline int64_t run_end(const int32_t* row, int64_t c, int64_t W) {
  const uint64_t pattern = static_cast<uint32_t>(row[c]) * 0x100000001ull;
  int64_t e = c + 1;
  for (uint64_t word[2]; e + 4 <= W; e += 4) {
    std::memcpy(word, row + e, 16);
    if ((word[0] != pattern) | (word[1] != pattern)) break;
  }
  while (e < W && row[e] == row[c]) ++e;
  return e;
}

// ---- the op ----

void check_inputs(const at::Tensor& components, const at::Tensor& candidates, const at::Tensor& uniforms,
                  int64_t num_components, int64_t num_points, bool interior) {
  TORCH_CHECK(components.dim() == 2 || components.dim() == 3,
              "sample_points: expected components of shape (H, W) or (B, H, W), got ", components.sizes());
  TORCH_CHECK(components.scalar_type() == at::kInt, "sample_points: expected int32 components, got ",
              components.scalar_type());
  TORCH_CHECK(candidates.dim() == 1 && candidates.scalar_type() == at::kLong,
              "sample_points: expected int64 candidates of shape (P,), got ", candidates.scalar_type(), " ",
              candidates.sizes());
  TORCH_CHECK(num_points >= 1, "sample_points: num_points must be >= 1, got ", num_points);
  const int64_t K = num_points, R = interior ? K - 1 : K, P = candidates.size(0);
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.dim() == 2 && uniforms.size(0) == P &&
                  uniforms.size(1) == R,
              "sample_points: expected float64 uniforms of shape (", P, ", ", R, "), got ", uniforms.scalar_type(),
              " ", uniforms.sizes());
  TORCH_CHECK(num_components >= 0, "sample_points: num_components must be >= 0");
  const int64_t H = components.size(-2), W = components.size(-1);
  if (interior)
    TORCH_CHECK(H < 32768 && W < 32768, "sample_points: interior mode needs H, W < 32768, got ", H, "x", W);
  TORCH_CHECK(candidates.device() == components.device() && uniforms.device() == components.device(),
              "sample_points: components, candidates and uniforms must be on the same device");
}

// slot_of[id] = the candidate index of each id (-1: not a candidate); raises unless the ids are distinct and in
// [0, num_components). Both ops check with it (CUDA: when its summary of the candidates shows a problem).
std::vector<int32_t> candidate_slots(const int64_t* cand, int64_t P, int64_t num_components) {
  std::vector<int32_t> slot_of(num_components, -1);
  for (int64_t s = 0; s < P; ++s) {
    TORCH_CHECK(cand[s] >= 0 && cand[s] < num_components, "sample_points: candidate id ", cand[s],
                " outside [0, ", num_components, ")");
    TORCH_CHECK(slot_of[cand[s]] < 0, "sample_points: candidate id ", cand[s], " appears twice");
    slot_of[cand[s]] = static_cast<int32_t>(s);
  }
  return slot_of;
}

void check_component_ids(bool below, int64_t num_components) {
  TORCH_CHECK(below, "sample_points: components holds ids >= num_components (", num_components,
              "); pass the comp_area returned with these components");
}

at::Tensor sample_points_cpu(const at::Tensor& components, const at::Tensor& candidates, const at::Tensor& uniforms,
                             int64_t num_components, int64_t num_points, bool interior) {
  check_inputs(components, candidates, uniforms, num_components, num_points, interior);
  const int64_t K = num_points, R = interior ? K - 1 : K, P = candidates.size(0);
  const int64_t H = components.size(-2), W = components.size(-1);
  const int64_t B = components.dim() == 3 ? components.size(0) : 1;
  at::Tensor out = at::empty({P, K}, candidates.options());
  int64_t* o = out.data_ptr<int64_t>();
  std::fill(o, o + P * K, -1);
  if (P == 0) return out;

  const at::Tensor comp_t = components.contiguous(), cand_t = candidates.contiguous(), u_t = uniforms.contiguous();
  const int32_t* comp = comp_t.data_ptr<int32_t>();
  const int64_t* cand = cand_t.data_ptr<int64_t>();
  const double* u = u_t.data_ptr<double>();
  const int64_t rows = B * H;

  const std::vector<int32_t> slot_of = candidate_slots(cand, P, num_components);

  const int64_t S =
      std::clamp<int64_t>((rows * W + kPixelsPerStrip - 1) / kPixelsPerStrip, 1, std::max<int64_t>(rows, 1));
  const int64_t grain = rows * W >= kParallelPixels ? 1 : S;
  std::atomic<bool> bad_id{false};

  // interior: the farthest pixel from the boundary of each candidate (strict > keeps the first in raster order)
  std::vector<int64_t> first(P, std::numeric_limits<int64_t>::max());
  if (interior && rows * W > 0) {
    std::unique_ptr<int32_t[]> d2_buf(new int32_t[rows * W]);
    int32_t* d2 = d2_buf.get();
    distance_transform(comp, B, H, W, d2);
    std::vector<int32_t> best_d(S * P, -1);
    std::vector<int64_t> best_i(S * P, -1);
    at::parallel_for(0, S, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        int32_t* bd = best_d.data() + k * P;
        int64_t* bi = best_i.data() + k * P;
        for (int64_t i = rows * k / S * W; i < rows * (k + 1) / S * W; ++i) {
          const int32_t id = comp[i];
          if (id < 0 || id >= num_components) continue;
          const int32_t s = slot_of[id];
          if (s >= 0 && d2[i] > bd[s]) {
            bd[s] = d2[i];
            bi[s] = i;
          }
        }
      }
    });
    for (int64_t s = 0; s < P; ++s) {
      int32_t best = -1;
      for (int64_t k = 0; k < S; ++k)
        if (best_d[k * P + s] > best) {
          best = best_d[k * P + s];
          first[s] = best_i[k * P + s];
        }
    }
  }

  // one pass over the map: the runs of candidate pixels in each row, in raster order (strips concatenate in order)
  std::vector<std::vector<Run>> strip_runs(S);
  at::parallel_for(0, S, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t r = rows * k / S; r < rows * (k + 1) / S; ++r) {
        const int32_t* row = comp + r * W;
        for (int64_t c = 0; c < W;) {
          const int32_t id = row[c];
          const int64_t e = run_end(row, c, W);
          if (id >= num_components) bad_id = true;
          else if (id >= 0 && slot_of[id] >= 0) strip_runs[k].push_back({slot_of[id], r * W + c, e - c});
          c = e;
        }
      }
    }
  });
  check_component_ids(!bad_id, num_components);
  // group the runs by candidate (a counting sort keeps each candidate's runs in raster order)
  std::vector<int64_t> begin(P + 1, 0);
  for (const auto& runs : strip_runs)
    for (const Run& run : runs) ++begin[run.slot + 1];
  std::partial_sum(begin.begin(), begin.end(), begin.begin());
  std::vector<Run> runs(begin[P]);
  std::vector<int64_t> fill(begin.begin(), begin.end() - 1);
  for (const auto& strip : strip_runs)
    for (const Run& run : strip) runs[fill[run.slot]++] = run;

  // per candidate with enough pixels: R distinct ranks in raster order -> pixels (interior: the first point is fixed
  // and the others skip it)
  std::vector<int64_t> rank(R), order(R), pos(R), val(R);
  for (int64_t s = 0; s < P; ++s) {
    const Run* r0 = runs.data() + begin[s];
    const Run* r1 = runs.data() + begin[s + 1];
    int64_t total = 0, skip = -1;
    for (const Run* run = r0; run < r1; ++run) total += run->len;
    if (total < K) continue;
    if (interior) {
      o[s * K] = first[s];
      skip = 0;
      for (const Run* run = r0; run < r1; ++run) skip += std::clamp<int64_t>(first[s] - run->start, 0, run->len);
    }
    draw_ranks(interior ? total - 1 : total, u + s * R, R, rank.data(), pos.data(), val.data());
    for (int64_t j = 0; j < R; ++j)
      if (interior && rank[j] >= skip) ++rank[j];
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return rank[a] < rank[b]; });
    int64_t seen = 0, t = 0;
    for (const Run* run = r0; run < r1 && t < R; ++run) {
      for (; t < R && rank[order[t]] < seen + run->len; ++t)
        o[s * K + (interior ? 1 : 0) + order[t]] = run->start + rank[order[t]] - seen;
      seen += run->len;
    }
  }
  return out;
}

}  // namespace

CLOUDS_CPU_IMPL(m) {
  m.impl("sample_points", &sample_points_cpu);
}

#ifdef WITH_CUDA
// ---- CUDA: kernels in sample_points_cuda.cu (raw CUDA, quick to compile); tensors handled here ----

namespace clouds_cuda {
void sp_distance(const int32_t* comp, int32_t* d2, int64_t B, int64_t H, int64_t W, int64_t* v, int64_t* f,
                 double* z, cudaStream_t stream);
void sp_argmax(const int32_t* comp, const int32_t* d2, int64_t n, int64_t num_components, int64_t* best,
               cudaStream_t stream);
void sp_points(const int32_t* sorted_id, const int64_t* sorted_idx, int64_t n, const int64_t* cand, const double* u,
               int64_t P, int64_t K, int64_t R, int64_t num_components, const int64_t* best, int64_t* scratch,
               int64_t* out, cudaStream_t stream);
}  // namespace clouds_cuda

namespace {

// A stable sort by id lists each component's pixels in raster order: rank r of id c is sorted_index[start(c) + r].
at::Tensor sample_points_cuda(const at::Tensor& components, const at::Tensor& candidates, const at::Tensor& uniforms,
                              int64_t num_components, int64_t num_points, bool interior) {
  check_inputs(components, candidates, uniforms, num_components, num_points, interior);
  const int64_t K = num_points, R = interior ? K - 1 : K, P = candidates.size(0);
  const int64_t H = components.size(-2), W = components.size(-1), n = components.numel();
  const int64_t B = components.dim() == 3 ? components.size(0) : 1;
  const c10::cuda::CUDAGuard guard(components.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({P, K}, candidates.options());
  out.fill_(-1);
  if (P == 0) return out;
  const at::Tensor comp = components.contiguous().view({-1});
  const at::Tensor cand = candidates.contiguous(), u = uniforms.contiguous();
  // The CPU op's checks, in one host sync: the smallest and largest candidate, whether two are equal, the largest id
  // in the map. On a problem, the CPU's own check runs on a host copy of the candidates for its message.
  const at::Tensor sorted = std::get<0>(cand.sort());
  std::vector<at::Tensor> summary = {sorted.select(0, 0), sorted.select(0, P - 1),
                                     sorted.slice(0, 1).eq(sorted.slice(0, 0, P - 1)).any().to(at::kLong)};
  if (n > 0) summary.push_back(comp.max().to(at::kLong));
  const at::Tensor host = at::stack(summary).cpu();
  const int64_t* h = host.data_ptr<int64_t>();
  if (h[0] < 0 || h[1] >= num_components || h[2]) candidate_slots(cand.cpu().data_ptr<int64_t>(), P, num_components);
  if (n == 0) return out;
  check_component_ids(h[3] < num_components, num_components);
  const auto [sorted_id, sorted_idx] = at::sort(comp, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor best;
  if (interior) {
    at::Tensor d2 = at::empty({n}, comp.options());
    at::Tensor v = at::empty({B * H, W + 3}, cand.options()), f = at::empty({B * H, W + 3}, cand.options());
    at::Tensor z = at::empty({B * H, W + 3}, u.options());
    clouds_cuda::sp_distance(comp.data_ptr<int32_t>(), d2.data_ptr<int32_t>(), B, H, W, v.data_ptr<int64_t>(),
                             f.data_ptr<int64_t>(), z.data_ptr<double>(), stream);
    best = at::zeros({num_components}, cand.options());
    clouds_cuda::sp_argmax(comp.data_ptr<int32_t>(), d2.data_ptr<int32_t>(), n, num_components,
                           best.data_ptr<int64_t>(), stream);
  }
  at::Tensor scratch = at::empty({P, 3 * std::max<int64_t>(R, 1)}, cand.options());
  clouds_cuda::sp_points(sorted_id.data_ptr<int32_t>(), sorted_idx.data_ptr<int64_t>(), n, cand.data_ptr<int64_t>(),
                         u.data_ptr<double>(), P, K, R, num_components,
                         interior ? best.data_ptr<int64_t>() : nullptr, scratch.data_ptr<int64_t>(),
                         out.data_ptr<int64_t>(), stream);
  return out;
}

}  // namespace

CLOUDS_CUDA_IMPL(m) {
  m.impl("sample_points", &sample_points_cuda);
}
#endif
