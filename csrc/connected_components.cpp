// Connected components of equal label on the CPU: every class in one pass (reference §5.2.1, which runs
// scipy.ndimage.label once per class). Spec: ops.connected_components_ref.
//
// Algorithm (run-based union-find over strips of rows, in parallel when the work is large):
//  1. each strip splits its rows into runs of equal label; a run is a union-find node, and runs touching in
//     consecutive rows with the same label are united, always linking the larger root to the smaller;
//  2. the rows where two strips meet are united sequentially (a few thousand runs at most);
//  3. roots are the runs with parent == self; since run indices grow in raster order and unions keep the smaller
//     root, each component's root is its first run, and numbering roots in index order gives the raster-order ids
//     (per-strip root counts + a prefix sum make this parallel);
//  4. each run's pixels get their component id; areas are the summed run lengths.
// A batch (B, H, W) is one tall image in which rows r with r % H == 0 are never linked to the row above, so ids are
// global and image b's components come after image b-1's.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#ifdef WITH_CUDA
#include <ATen/ops/cumsum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "registration.h"

namespace {

// The image is cut into strips of rows of ~kPixelsPerStrip pixels, labelled independently then merged. They run in
// parallel only for large work (kParallelPixels pixels or about kParallelRuns runs): a street map of 1024x2048 takes
// ~0.5 ms on one core, less than what a fork/join can cost on a busy machine (a descheduled thread stalls every
// parallel region by a time slice); a noisy map with 400k runs takes ~15 ms and gains from it.
constexpr int64_t kPixelsPerStrip = 1 << 20;
constexpr int64_t kParallelPixels = 1 << 23;
constexpr int64_t kParallelRuns = 1 << 17;

// ---- runs and union-find over runs ----

// End of the run of row[c]'s value that starts at c, comparing 16 bytes per step while they all match.
template <typename T>
inline int64_t run_end(const T* row, int64_t c, int64_t W) {
  const T v = row[c];
  int64_t e = c + 1;
  if (e == W || row[e] != v) return e;                               // single pixels are common in noisy maps
  constexpr int64_t step = 16 / sizeof(T);
  T rep[step];
  std::fill(rep, rep + step, v);
  uint64_t pattern[2], word[2];
  std::memcpy(pattern, rep, 16);
  for (; e + step <= W; e += step) {
    std::memcpy(word, row + e, 16);
    if ((word[0] != pattern[0]) | (word[1] != pattern[1])) break;
  }
  while (e < W && row[e] == v) ++e;
  return e;
}

// out[begin, end) = value. Short runs are the common case: 16 values are stored at once and may spill past `end`;
// the caller writes the runs of a strip in increasing order up to its end, so whatever spilled is overwritten by
// the next write, and `limit` (the strip's end) is never crossed.
inline void fill_run(int32_t* out, int64_t begin, int64_t end, int64_t limit, int32_t value) {
  if (begin == end) return;
  if (begin + 16 <= limit) {
    int32_t block[16];
    std::fill(block, block + 16, value);
    std::memcpy(out + begin, block, sizeof(block));
    if (end - begin <= 16) return;
    begin += 16;
  }
  std::fill(out + begin, out + end, value);
}

inline int32_t find_root(int32_t* parent, int32_t a) {
  while (parent[a] != a) {
    parent[a] = parent[parent[a]];  // path halving
    a = parent[a];
  }
  return a;
}

// Unite the sets of a and b keeping the smaller root; returns the root that stopped being one, or -1.
inline int32_t unite(int32_t* parent, int32_t a, int32_t b) {
  a = find_root(parent, a);
  b = find_root(parent, b);
  if (a == b) return -1;
  if (a < b) std::swap(a, b);
  parent[a] = b;
  return a;
}

// Unite the runs [b, b_end) of one row with the same-label runs [a, a_end) of the row above that touch them
// (share a column for 4-connectivity, or a corner too for 8). Columns are start/end minus the row's base index;
// label[run] is the run's label.
template <typename T, typename OnMerge>
void link_rows(const T* label, const int32_t* start, const int32_t* end, int32_t* parent, int32_t a, int32_t a_end,
               int64_t above_base, int32_t b, int32_t b_end, int64_t base, int64_t diag, OnMerge on_merge) {
  for (; b < b_end; ++b) {
    const int64_t lo = start[b] - base - diag, hi = end[b] - base + diag;  // above runs touching [lo, hi)
    while (a < a_end && end[a] - above_base <= lo) ++a;
    const T l = label[b];
    for (int32_t k = a; k < a_end && start[k] - above_base < hi; ++k) {
      if (label[k] != l) continue;
      if (parent[b] == b) {                                           // b still alone: hang it under k's root
        parent[b] = find_root(parent, k);
        on_merge(b);
      } else {
        const int32_t dead = unite(parent, b, k);
        if (dead >= 0) on_merge(dead);
      }
    }
  }
}

// Number of runs in the image, extrapolated from every 32nd row.
template <typename T>
int64_t estimate_runs(const T* lab, int64_t rows, int64_t W) {
  int64_t runs = 0, sampled = 0;
  for (int64_t r = 0; r < rows; r += 32, ++sampled)
    for (int64_t c = 0; c < W; c = run_end(lab + r * W, c, W)) ++runs;
  return runs * rows / std::max<int64_t>(sampled, 1);
}

struct Strip {
  int64_t row0 = 0, row1 = 0;          // rows [row0, row1) of the (B*H, W) image
  int32_t base = 0, end = 0;           // its runs are [base, end); base = row0 * W keeps raster order across strips
  int32_t first_row_end = 0;           // runs of its first row: [base, first_row_end)
  int32_t last_row_begin = 0;          // runs of its last row: [last_row_begin, end)
  int64_t roots = 0, offset = 0;       // number of components rooted here, and the id of the first one
  std::vector<int32_t> outward;        // runs whose parent lies in an earlier strip (after step 2)
  std::vector<std::pair<int64_t, int64_t>> foreign;  // (id, pixels) for components rooted in an earlier strip
};

// ---- the kernel ----

template <typename T>
void label_runs(const T* lab, int64_t rows, int64_t H, int64_t W, int64_t diag, bool has_ign, T ign,
                int32_t* out, at::Tensor& comp_class, at::Tensor& comp_area) {
  const int64_t total = rows * W;
  // Run storage: strip k writes its runs from index row0*W on, so at most `total` entries are ever used; new[]
  // leaves the memory untouched, so only pages that hold runs are committed.
  std::unique_ptr<int32_t[]> start_buf(new int32_t[total]), end_buf(new int32_t[total]), parent_buf(new int32_t[total]);
  std::unique_ptr<T[]> label_buf(new T[total]);
  int32_t* start = start_buf.get();
  int32_t* end = end_buf.get();
  int32_t* parent = parent_buf.get();
  T* label = label_buf.get();

  const int64_t S = std::clamp<int64_t>((total + kPixelsPerStrip - 1) / kPixelsPerStrip, 1, rows);
  const int64_t grain = (total >= kParallelPixels || estimate_runs(lab, rows, W) >= kParallelRuns) ? 1 : S;
  std::vector<Strip> strips(S);
  for (int64_t k = 0; k < S; ++k) {
    strips[k].row0 = rows * k / S;
    strips[k].row1 = rows * (k + 1) / S;
  }

  // 1. runs and unions inside each strip
  at::parallel_for(0, S, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      Strip& st = strips[k];
      int32_t n = static_cast<int32_t>(st.row0 * W);
      st.base = n;
      int32_t prev_begin = n, prev_end = n;
      int64_t merges = 0;
      for (int64_t r = st.row0; r < st.row1; ++r) {
        const T* row = lab + r * W;
        const int64_t rb = r * W;
        const int32_t cur_begin = n;
        for (int64_t c = 0; c < W;) {
          const T l = row[c];
          const int64_t e = run_end(row, c, W);
          if (!(has_ign && l == ign)) {
            start[n] = static_cast<int32_t>(rb + c);
            end[n] = static_cast<int32_t>(rb + e);
            parent[n] = n;
            label[n] = l;
            ++n;
          }
          c = e;
        }
        if (r > st.row0 && r % H != 0)
          link_rows(label, start, end, parent, prev_begin, prev_end, rb - W, cur_begin, n, rb, diag,
                    [&](int32_t) { ++merges; });
        if (r == st.row0) st.first_row_end = n;
        prev_begin = cur_begin;
        prev_end = n;
      }
      st.last_row_begin = prev_begin;
      st.end = n;
      st.roots = (n - st.base) - merges;
    }
  });

  // 2. unite across strip borders (sequential; only the two rows at each border)
  auto strip_of = [&](int32_t run) {
    int64_t k = S - 1;
    while (strips[k].base > run) --k;
    return k;
  };
  for (int64_t k = 1; k < S; ++k) {
    const Strip& up = strips[k - 1];
    Strip& st = strips[k];
    if (st.row0 % H == 0) continue;  // an image boundary inside the batch
    link_rows(label, start, end, parent, up.last_row_begin, up.end, (st.row0 - 1) * W, st.base, st.first_row_end,
              st.row0 * W, diag, [&](int32_t dead) { --strips[strip_of(dead)].roots; });
  }

  // 3. ids in raster order: a prefix sum of the roots per strip
  int64_t num = 0;
  for (auto& st : strips) {
    st.offset = num;
    num += st.roots;
  }
  comp_class = at::empty({num}, at::kLong);
  comp_area = at::zeros({num}, at::kLong);
  int64_t* cls = comp_class.data_ptr<int64_t>();
  int64_t* area = comp_area.data_ptr<int64_t>();

  // 3a. per strip: a root gets code -(id+1); an inner run gets its root's code, or the index of the run of its own
  //     strip that points outward (resolved in 3b). Reads and writes stay inside the strip.
  at::parallel_for(0, S, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      Strip& st = strips[k];
      int64_t id = st.offset;
      for (int32_t g = st.base; g < st.end; ++g) {
        const int32_t p = parent[g];
        if (p == g) {
          cls[id] = static_cast<int64_t>(label[g]);
          parent[g] = static_cast<int32_t>(-(id + 1));
          ++id;
        } else if (p < st.base) {
          st.outward.push_back(g);
        } else {
          const int32_t v = parent[p];  // p < g: already rewritten
          parent[g] = v < 0 ? v : (v < st.base ? p : v);
        }
      }
    }
  });
  // 3b. outward runs, strip by strip: their targets in earlier strips are final by now
  for (auto& st : strips) {
    for (int32_t t : st.outward) {
      const int32_t v = parent[parent[t]];
      parent[t] = v < 0 ? v : parent[v];
    }
  }

  // 4. write ids (-1 between runs: ignored pixels) and accumulate areas
  at::parallel_for(0, S, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      Strip& st = strips[k];
      int64_t cursor = st.row0 * W;
      const int64_t own_end = st.offset + st.roots, limit = st.row1 * W;
      for (int32_t g = st.base; g < st.end; ++g) {
        const int32_t v = parent[g];
        const int64_t id = -static_cast<int64_t>(v < 0 ? v : parent[v]) - 1;
        fill_run(out, cursor, start[g], limit, -1);
        fill_run(out, start[g], end[g], limit, static_cast<int32_t>(id));
        const int64_t len = end[g] - start[g];
        if (id >= st.offset && id < own_end) {
          area[id] += len;
        } else if (!st.foreign.empty() && st.foreign.back().first == id) {
          st.foreign.back().second += len;
        } else {
          st.foreign.emplace_back(id, len);
        }
        cursor = end[g];
      }
      fill_run(out, cursor, limit, limit, -1);
    }
  });
  for (const auto& st : strips)
    for (const auto& [id, len] : st.foreign) area[id] += len;
}

template <typename T>
bool representable(int64_t v) {
  return v >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
         v <= static_cast<int64_t>(std::numeric_limits<T>::max());
}

template <typename T>
T ignore_value(std::optional<int64_t> ignore_index, bool& has_ign) {
  has_ign = ignore_index.has_value() && representable<T>(*ignore_index);
  return has_ign ? static_cast<T>(*ignore_index) : T(0);
}

void check_labels(const at::Tensor& labels, int64_t connectivity) {
  TORCH_CHECK(labels.dim() == 2 || labels.dim() == 3,
              "connected_components: expected labels of shape (H, W) or (B, H, W), got ", labels.sizes());
  TORCH_CHECK(connectivity == 4 || connectivity == 8,
              "connected_components: connectivity must be 4 or 8, got ", connectivity);
  const auto dt = labels.scalar_type();
  TORCH_CHECK(dt == at::kByte || dt == at::kInt || dt == at::kLong,
              "connected_components: expected uint8, int32 or int64 labels, got ", dt,
              "; convert with labels.to(torch.int32)");
  TORCH_CHECK(labels.numel() < std::numeric_limits<int32_t>::max(),
              "connected_components: at most 2^31 - 1 pixels per call, got ", labels.numel());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> connected_components_cpu(const at::Tensor& labels,
                                                                        int64_t connectivity,
                                                                        std::optional<int64_t> ignore_index) {
  check_labels(labels, connectivity);
  const int64_t H = labels.size(-2), W = labels.size(-1);
  const at::Tensor lab = labels.contiguous();
  at::Tensor components = at::empty(labels.sizes(), labels.options().dtype(at::kInt));
  at::Tensor cls = at::empty({0}, labels.options().dtype(at::kLong)), area = cls;
  if (labels.numel() == 0) return {components, cls, area};
  const int64_t rows = labels.numel() / W, diag = connectivity == 8 ? 1 : 0;
  int32_t* out = components.data_ptr<int32_t>();
  bool has_ign;
  if (labels.scalar_type() == at::kByte) {
    const auto ign = ignore_value<uint8_t>(ignore_index, has_ign);
    label_runs<uint8_t>(lab.data_ptr<uint8_t>(), rows, H, W, diag, has_ign, ign, out, cls, area);
  } else if (labels.scalar_type() == at::kInt) {
    const auto ign = ignore_value<int32_t>(ignore_index, has_ign);
    label_runs<int32_t>(lab.data_ptr<int32_t>(), rows, H, W, diag, has_ign, ign, out, cls, area);
  } else {
    const auto ign = ignore_value<int64_t>(ignore_index, has_ign);
    label_runs<int64_t>(lab.data_ptr<int64_t>(), rows, H, W, diag, has_ign, ign, out, cls, area);
  }
  return {components, cls, area};
}

}  // namespace

CLOUDS_CPU_IMPL(m) {
  m.impl("connected_components", &connected_components_cpu);
}

#ifdef WITH_CUDA
// ---- CUDA: kernels in connected_components_cuda.cu (raw CUDA, quick to compile); tensors handled here ----

namespace clouds_cuda {
template <typename T>
void cc_union_find(const T* lab, int32_t* parent, int32_t* is_root, int64_t n, int64_t H, int64_t W, bool has_ign,
                   T ign, bool diag, cudaStream_t stream);
template <typename T>
void cc_label(const T* lab, int32_t* parent, const int32_t* rank, int64_t n, int64_t* cls, int64_t* area,
              cudaStream_t stream);
}  // namespace clouds_cuda

namespace {

template <typename T>
void cuda_label(const at::Tensor& lab, int64_t H, int64_t W, bool diag, std::optional<int64_t> ignore_index,
                at::Tensor& components, at::Tensor& cls, at::Tensor& area) {
  const int64_t n = lab.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  bool has_ign;
  const T ign = ignore_value<T>(ignore_index, has_ign);
  at::Tensor is_root = at::empty({n}, lab.options().dtype(at::kInt));
  clouds_cuda::cc_union_find<T>(lab.data_ptr<T>(), components.data_ptr<int32_t>(), is_root.data_ptr<int32_t>(), n,
                                H, W, has_ign, ign, diag, stream);
  const at::Tensor rank = at::cumsum(is_root, 0, at::kInt);           // raster-order number of each root, from 1
  const int64_t num = rank.select(0, n - 1).item<int64_t>();           // the only host sync
  cls = at::empty({num}, lab.options().dtype(at::kLong));
  area = at::zeros({num}, lab.options().dtype(at::kLong));
  clouds_cuda::cc_label<T>(lab.data_ptr<T>(), components.data_ptr<int32_t>(), rank.data_ptr<int32_t>(), n,
                           cls.data_ptr<int64_t>(), area.data_ptr<int64_t>(), stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> connected_components_cuda(const at::Tensor& labels,
                                                                         int64_t connectivity,
                                                                         std::optional<int64_t> ignore_index) {
  check_labels(labels, connectivity);
  const c10::cuda::CUDAGuard guard(labels.device());
  const at::Tensor lab = labels.contiguous();
  at::Tensor components = at::empty(labels.sizes(), labels.options().dtype(at::kInt));
  at::Tensor cls = at::empty({0}, labels.options().dtype(at::kLong)), area = cls;
  if (labels.numel() == 0) return {components, cls, area};
  const int64_t H = labels.size(-2), W = labels.size(-1);
  const bool diag = connectivity == 8;
  if (labels.scalar_type() == at::kByte) cuda_label<uint8_t>(lab, H, W, diag, ignore_index, components, cls, area);
  else if (labels.scalar_type() == at::kInt) cuda_label<int32_t>(lab, H, W, diag, ignore_index, components, cls, area);
  else cuda_label<int64_t>(lab, H, W, diag, ignore_index, components, cls, area);
  return {components, cls, area};
}

}  // namespace

CLOUDS_CUDA_IMPL(m) {
  m.impl("connected_components", &connected_components_cuda);
}
#endif
