// The ops only the emulation build has, beside the clouds ops in torch.ops.clouds_emu:
//   set_schedule(seed, resident_blocks=8)  the thread schedule of the launches that follow (seed 0: in order)
//   schedule_stats()                        [launches, CUDA threads, switches, warp collectives] since set_schedule
//   probe_warp / probe_barrier / probe_launch: small kernels, written as CUDA, that check the emulated GPU itself
//   (tests/test_emulation.py::test_emul_probe_*): warp collectives, __syncthreads, launch configurations.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

// Thread t < n with values[t] >= 0 (the others return first) writes out[t] = mask << 32 | result, where mask is
// __activemask() (op 0-2) or all 32 lanes (op 3: a misuse once lanes returned) and result is
// op 0, 3: __match_any_sync(mask, v); op 1: __ballot_sync(mask, v & 1); op 2: __shfl_sync(mask, v, lane + 1 mod 32).
__global__ void warp_kernel(const int32_t* values, int64_t n, int64_t op, int64_t* out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n || values[t] < 0) return;
  const int32_t v = values[t];
  const unsigned mask = op == 3 ? 0xFFFFFFFFu : __activemask();
  unsigned r;
  if (op == 0 || op == 3) r = __match_any_sync(mask, v);
  else if (op == 1) r = __ballot_sync(mask, v & 1);
  else r = static_cast<unsigned>(__shfl_sync(mask, v, static_cast<int>(threadIdx.x + 1) % 32));
  out[t] = static_cast<int64_t>(static_cast<uint64_t>(mask) << 32 | r);
}

// Every thread writes its value, waits at __syncthreads, then reads the value of the next thread of its block.
__global__ void barrier_kernel(const int32_t* values, int32_t* buf, int64_t* out) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x;
  buf[base + threadIdx.x] = values[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = buf[base + (threadIdx.x + 1) % blockDim.x];
}

__global__ void empty_kernel() {}

at::Tensor probe_warp(const at::Tensor& values, int64_t block, int64_t op) {
  TORCH_CHECK(values.scalar_type() == at::kInt && values.dim() == 1 && values.is_contiguous() && op >= 0 && op <= 3,
              "probe_warp: expected contiguous int32 values (n,) and op 0..3");
  const int64_t n = values.size(0);
  at::Tensor out = at::full({n}, -1, values.options().dtype(at::kLong));
  CLOUDS_LAUNCH(warp_kernel, static_cast<unsigned>((n + block - 1) / block), static_cast<unsigned>(block), nullptr)(
      values.data_ptr<int32_t>(), n, op, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor probe_barrier(const at::Tensor& values, int64_t block) {
  TORCH_CHECK(values.scalar_type() == at::kInt && values.dim() == 1 && values.is_contiguous() &&
                  values.size(0) % block == 0,
              "probe_barrier: expected contiguous int32 values (n,) with n a multiple of block");
  at::Tensor buf = at::zeros_like(values);
  at::Tensor out = at::full({values.size(0)}, -1, values.options().dtype(at::kLong));
  CLOUDS_LAUNCH(barrier_kernel, static_cast<unsigned>(values.size(0) / block), static_cast<unsigned>(block), nullptr)(
      values.data_ptr<int32_t>(), buf.data_ptr<int32_t>(), out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void probe_launch(int64_t grid, int64_t block) {
  CLOUDS_LAUNCH(empty_kernel, static_cast<unsigned>(grid), static_cast<unsigned>(block), nullptr)();
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<int64_t> schedule_stats() {
  std::vector<int64_t> stats(4);
  clouds_emu::get_stats(stats.data());
  return stats;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(clouds_emu, m) {
  m.def("set_schedule(int seed, int resident_blocks=8) -> ()", &clouds_emu::set_schedule);
  m.def("schedule_stats() -> int[]", &schedule_stats);
  m.def("probe_warp(Tensor values, int block, int op) -> Tensor", &probe_warp);
  m.def("probe_barrier(Tensor values, int block) -> Tensor", &probe_barrier);
  m.def("probe_launch(int grid, int block) -> ()", &probe_launch);
}
