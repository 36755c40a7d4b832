// The schema of every clouds op, in one place. Kernels: csrc/<op>.cpp (CPU) and csrc/<op>_cuda.cu (CUDA).
// Python calls them as torch.ops.clouds.<op> through ops.py, which documents the public API and holds the
// pure-PyTorch references that specify each op.
#include <torch/library.h>

TORCH_LIBRARY(clouds, m) {
  // Connected components of equal label, all classes in one pass (reference §5.2.1).
  // labels (H, W) or (B, H, W) uint8/int32/int64 -> components int32 of the same shape (ids in raster order of each
  // component's first pixel, global across the batch, -1 on ignore_index), comp_class int64 (N,), comp_area int64 (N,).
  m.def("connected_components(Tensor labels, int connectivity, int? ignore_index) -> (Tensor, Tensor, Tensor)");
  // Point prompts per component (reference §5.2.2). components int32 (H, W) or (B, H, W); candidates int64 (P,)
  // distinct ids < num_components; uniforms float64 (P, R) in [0, 1) with R = num_points (random) or num_points - 1
  // (interior). Returns int64 (P, num_points) flat pixel indices into components, a row of -1 where the component
  // has fewer than num_points pixels.
  m.def("sample_points(Tensor components, Tensor candidates, Tensor uniforms, int num_components, int num_points, "
        "bool interior) -> Tensor");
  // Mask2Former semantic inference fused per output row (reference §3.4). class_prob float32 (B, Q, C) (softmax with
  // the no-object column dropped), mask_logits float32 (B, Q, h, w) -> int64 labels (B, H, W) or float32 scores
  // (B, C, H, W). Never holds (B, Q, H, W).
  m.def("masks_to_semantic(Tensor class_prob, Tensor mask_logits, int height, int width, bool return_scores) "
        "-> Tensor");
}
