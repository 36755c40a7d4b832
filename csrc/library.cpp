// The schema of every clouds op, in one place. Kernels: csrc/<op>.cpp (CPU) and csrc/<op>_cuda.cu (CUDA).
// Python calls them as torch.ops.clouds.<op> through ops.py, which documents the public API and holds the
// pure-PyTorch references that specify each op (torch.ops.clouds_emu.<op> in the emulation build: registration.h).
#include "registration.h"

CLOUDS_LIBRARY(m) {
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
  // Multi-scale deformable attention (Deformable-DETR core of the pixel decoder, Sec. 3.1). value (B, S, nH, Dh) with
  // S = sum of h*w over the levels; shapes = [h0, w0, h1, w1, ...] (nL levels, S in that order); locations
  // (B, Lq, nH, nL, nP, 2) xy in [0, 1]; weights (B, Lq, nH, nL, nP); one dtype, float32 or float64. Bilinear,
  // zeros outside, align_corners=False -> (B, Lq, nH*Dh). The backward returns the gradients of value, locations,
  // weights given grad_output (B, Lq, nH*Dh).
  m.def("ms_deform_attn(Tensor value, int[] shapes, Tensor locations, Tensor weights) -> Tensor");
  m.def("ms_deform_attn_backward(Tensor grad_output, Tensor value, int[] shapes, Tensor locations, Tensor weights) "
        "-> (Tensor, Tensor, Tensor)");
}
