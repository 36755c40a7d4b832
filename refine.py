"""Sec. 3.3: SAM refinement of the teacher's pseudo labels (reference §5).

The EMA teacher's argmax map is split into per-class 4-connected components; every component larger than 5000 px
is prompted with 5 random positive points; SAM (MobileSAM ViT-T in the official configs) returns 3 candidate masks
per prompt and the one with the highest predicted IoU is kept; pixels claimed by two or more masks are dropped; the
per-class union of the masks is the refined pseudo label.

Usage (offline refinement of saved teacher labels; training calls `pseudo_label_target` online):
    python refine.py --images DIR --labels DIR --out DIR --sam vit_t --checkpoint weights/mobile_sam.pt
    python refine.py --images DIR --labels DIR --out DIR --sam toy --min-area 300       # ToyCity, no weights
    python refine.py --score-labels DIR --truth GEN/truth     # pseudo-label quality vs ToyCity's hidden labels

A "point predictor" is any object with `set_image(image uint8 (H,W,3))` and
`predict_points(points (P,K,2) xy, multimask=True) -> (masks bool (P,M,H,W), scores (P,M))`:
`SamPointPredictor` wraps segment_anything / mobile_sam; `toysam.ToyPointPredictor` (toysam.py) is an offline
stand-in for ToyCity.
"""
import argparse
import dataclasses
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import ops

IGNORE_INDEX = 255
NUM_CLASSES = 19  # train ids 0..18 (their names and colours: data.CLASSES, data.PALETTE)
PANEL_TITLE_ROWS = 16  # rows of the title band above the images of a `panel` (and of each legend row below)
SAM_CHECKPOINTS = {  # official SAM / MobileSAM release files (reference §5.1 uses vit_t and vit_h from ./weights/)
    "vit_h": "sam_vit_h_4b8939.pth from https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth from https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth from https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_t": "mobile_sam.pt from https://github.com/ChaoningZhang/MobileSAM (weights/mobile_sam.pt)",
}
PREDICTORS = ("vit_t", "vit_h", "vit_l", "vit_b", "toy")
DEFAULT_CHECKPOINTS = {  # where the official code reads them (reference §5.1: ./weights/)
    "vit_t": "weights/mobile_sam.pt", "vit_h": "weights/sam_vit_h_4b8939.pth",
    "vit_l": "weights/sam_vit_l_0b3195.pth", "vit_b": "weights/sam_vit_b_01ec64.pth",
}
SAM_PACKAGES = {  # predictor -> (module, pip package)
    "vit_t": ("mobile_sam", "mobilesam-mirror"), "vit_h": ("segment_anything", "segment-anything"),
    "vit_l": ("segment_anything", "segment-anything"), "vit_b": ("segment_anything", "segment-anything"),
}


def predictor_problems(name: str, checkpoint=None, flag: str = "--checkpoint") -> list:
    """What stops `build_predictor(name, checkpoint)` from working, without building anything: a list of messages
    (empty = fine), each naming the fix with the caller's own flag for the checkpoint."""
    import importlib.util

    if name == "toy" or name not in SAM_PACKAGES:
        return []
    problems = []
    module, package = SAM_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        problems.append(f"SAM {name} needs the {module} package: pip install {package}")
    path = Path(checkpoint or DEFAULT_CHECKPOINTS[name])
    if not path.is_file():
        source = SAM_CHECKPOINTS[name].split(" from ")[-1]
        problems.append(f"SAM {name} checkpoint {path} does not exist: download {source} to "
                        f"{DEFAULT_CHECKPOINTS[name]}, "
                        f"or pass {flag} /path/to/{Path(DEFAULT_CHECKPOINTS[name]).name}")
    return problems


# ---- config ----

@dataclass
class RefineConfig:
    """Settings of the refinement. Field `min_area` is the flag `--min-area` of refine.py; its metadata holds the
    keyword arguments of `add_argument` ("help" required, "choices"), so the --help text sits beside the official
    name."""
    min_area: int = field(default=5000, metadata={  # official SAM.SIZE_THRESHOLD (strict: area > min_area)
        "help": "prompt components with more than this many pixels (official SAM.SIZE_THRESHOLD; scale it with the "
                "image area, e.g. ~300 for 192x192 ToyCity images)"})
    num_points: int = field(default=5, metadata={  # official SAM.NUM_POINTS (all positive)
        "help": "positive points per prompted component (official SAM.NUM_POINTS)"})
    # official SAM.SELECTION_MODE; "interior" = points far from the component border
    mode: str = field(default="random", metadata={
        "choices": ("random", "interior"),
        "help": "where the points are drawn: anywhere in the component (official) or far from its border"})
    erosion: bool = field(default=False, metadata={  # official SAM.EROSION
        "help": "draw the points from the eroded component (official SAM.EROSION)"})
    erosion_size: int = field(default=3, metadata={  # official SAM.EROSION_SIZE (square structuring element)
        "help": "square erosion size in pixels (official SAM.EROSION_SIZE)"})
    rm_intersection: bool = field(default=True, metadata={  # official SAM.RM_INTERSECTION
        "help": "drop pixels claimed by two or more masks (official SAM.RM_INTERSECTION)"})
    # official: scipy.ndimage.label default structure (cross = 4-connectivity)
    connectivity: int = field(default=4, metadata={
        "choices": (4, 8),
        "help": "pixel connectivity of the per-class components (official: 4, scipy.ndimage.label)"})
    # official "drop": pixels in no mask are negatives for all masks; "ignore": left out
    uncovered: str = field(default="drop", metadata={
        "choices": ("drop", "ignore"),
        "help": "pixels in no mask: 'drop' = negatives for every mask in training (official), 'ignore' = left out; "
                "in the written PNGs they are 255 either way"})

    def __post_init__(self):
        if self.mode not in ("random", "interior"):
            raise ValueError(f"mode must be 'random' or 'interior', got {self.mode!r}")
        if self.uncovered not in ("drop", "ignore"):
            raise ValueError(f"uncovered must be 'drop' or 'ignore', got {self.uncovered!r}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")
        if self.num_points < 1 or self.erosion_size < 1 or self.min_area < 0:
            raise ValueError(f"expected num_points >= 1, erosion_size >= 1, min_area >= 0; got {self.num_points}, "
                             f"{self.erosion_size}, {self.min_area}")


# ---- point predictors ----

class SamPointPredictor:
    """Point-prompted SAM (segment_anything or mobile_sam) on any image size, prompts batched.

    Args:
        model: a `Sam` module (segment_anything's or mobile_sam's).
        predictor_cls: the matching `SamPredictor` class (default: segment_anything's).
        chunk_size: prompts per `predict_torch` call (bounds memory).
        torch_image: resize the image with torch on the model's device (set_torch_image) instead of SAM's numpy/PIL
            path; None = when the model is on a GPU.
    """

    def __init__(self, model, predictor_cls=None, chunk_size: int = 64, torch_image=None):
        if predictor_cls is None:
            from segment_anything import SamPredictor as predictor_cls
        self.predictor = predictor_cls(model)
        self.chunk_size, self.torch_image = chunk_size, torch_image

    def set_image(self, image):
        """image: uint8 RGB (H, W, 3) numpy or tensor, or a (3, H, W) tensor, on any device. Runs the image encoder
        once. A model on the CPU takes segment_anything's own numpy path (PIL resize), bit-identical to
        `SamPredictor.set_image`; a model on a GPU takes the torch path (set_torch_image after apply_image_torch) on
        the model's device, so the image never visits the host (when it is already there)."""
        pred = self.predictor
        if not (pred.device.type != "cpu" if self.torch_image is None else self.torch_image):
            pred.set_image(hwc_numpy(image))
            return
        image = torch.as_tensor(image).to(pred.device, non_blocking=True)
        if image.dim() != 3 or image.dtype != torch.uint8 or 3 not in (image.shape[0], image.shape[-1]):
            raise ValueError(f"expected a uint8 RGB image (H, W, 3) or (3, H, W), got {image.dtype} "
                             f"{tuple(image.shape)}")
        if image.shape[0] != 3 or image.shape[-1] == 3:
            image = image.permute(2, 0, 1)                                     # (H, W, 3) -> (3, H, W)
        size = tuple(image.shape[-2:])
        # ResizeLongestSide.apply_image_torch on the device: antialiased bilinear (torch's port of PIL's filter),
        # rounded back to the uint8 grid that apply_image's PIL resize returns (it may differ from PIL by one grey
        # level at some pixels). Written out because segment_anything's apply_image_torch reads the size from the
        # batch and channel dims (shape[0], shape[1]); mobile_sam's copy reads shape[2], shape[3] as here.
        t = pred.transform
        x = F.interpolate(image[None].float(), t.get_preprocess_shape(*size, t.target_length), mode="bilinear",
                          align_corners=False, antialias=True).round_().clamp_(0, 255)  # (1, 3, h', w')
        pred.set_torch_image(x, size)

    @torch.no_grad()
    def predict_points(self, points, multimask: bool = True):
        """points: (P, K, 2) xy in image pixels, all positive -> masks bool (P, M, H, W), scores float (P, M)."""
        pred = self.predictor
        # official bug (reference §9.9): original_size hard-coded to (768, 768); we use the size seen by set_image
        h, w = pred.original_size
        points = torch.as_tensor(points, dtype=torch.float32, device=pred.device)
        coords = pred.transform.apply_coords_torch(points, (h, w))  # image pixels -> encoder input frame
        masks, scores = [], []
        for start in range(0, len(coords), self.chunk_size):
            c = coords[start:start + self.chunk_size]                  # (p, K, 2), §5.2: all points positive
            m, s = _predict_positive_points(pred, c, multimask)        # (p, M, H, W), (p, M)
            masks.append(m)
            scores.append(s.float())
        if not masks:
            m = 3 if multimask else 1
            return torch.zeros(0, m, h, w, dtype=torch.bool, device=pred.device), torch.zeros(0, m, device=pred.device)
        return torch.cat(masks), torch.cat(scores)                     # on the model's device


def _predict_positive_points(pred, coords, multimask):
    """SamPredictor.predict_torch(coords, all-positive labels, multimask_output=multimask)[:2], the same numbers
    without its host synchronizations: segment_anything's prompt encoder adds the label embeddings through boolean
    masks (`emb[labels == 1] += w`: two synchronizations per label value and chunk on a GPU). With positive points
    and SAM's padding point (label -1) the rows are known: the points get point_embeddings[1], the padding point
    not_a_point_embed. coords (p, K, 2) in the encoder's input frame -> masks bool (p, M, H, W), scores (p, M)."""
    if not pred.is_image_set:
        raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
    model, enc = pred.model, pred.model.prompt_encoder
    p = coords.shape[0]
    points = torch.cat([coords + 0.5, torch.zeros((p, 1, 2), device=coords.device)], 1)  # + the padding point
    emb = enc.pe_layer.forward_with_coords(points, enc.input_image_size)                  # (p, K+1, C)
    sparse = torch.cat([emb[:, :-1] + enc.point_embeddings[1].weight,                   # label 1: the points
                        enc.not_a_point_embed.weight.expand(p, 1, -1)], 1)              # label -1: 0 + embed
    dense = enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(p, -1, *enc.image_embedding_size)
    low_res, scores = model.mask_decoder(image_embeddings=pred.features, image_pe=enc.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=multimask)
    masks = model.postprocess_masks(low_res, pred.input_size, pred.original_size)
    return masks > model.mask_threshold, scores


def hwc_numpy(image) -> np.ndarray:
    """uint8 (H, W, 3) numpy image from a numpy array or tensor, (H, W, 3) or (3, H, W) (data.py samples)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.permute(1, 2, 0)                                      # (3, H, W) -> (H, W, 3)
        image = image.numpy()
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3) or (3, H, W), got {image.dtype} {image.shape}")
    return image


def build_predictor(name: str, checkpoint=None, device: str = "cpu", chunk_size: int = 64):
    """Registry: "vit_t" (MobileSAM's TinyViT SAM, official default), "vit_h" / "vit_l" / "vit_b" (segment_anything),
    "toy". `checkpoint` defaults to DEFAULT_CHECKPOINTS[name]; a missing package raises ImportError, a missing file
    FileNotFoundError, both with the messages of `predictor_problems`."""
    if name == "toy":  # the offline stand-in, beside toycity.py (imported here only when asked for)
        from toyworld.sam import ToyPointPredictor
        return ToyPointPredictor()
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; expected one of {PREDICTORS}")
    checkpoint = Path(checkpoint or DEFAULT_CHECKPOINTS[name])
    problems = predictor_problems(name, checkpoint)
    if problems:
        kind = ImportError if any("pip install" in p for p in problems) else FileNotFoundError
        raise kind("; ".join(problems))
    if name == "vit_t":  # MobileSAM (PyPI mobilesam-mirror): segment_anything's API around a TinyViT image encoder
        from mobile_sam import SamPredictor, sam_model_registry
    else:
        from segment_anything import SamPredictor, sam_model_registry
    model = sam_model_registry[name](checkpoint=None)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return SamPointPredictor(model.to(device).eval(), SamPredictor, chunk_size=chunk_size)


# ---- refinement ----

def erode_components(components: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Square binary erosion of every component at once, on the component map (-1 = background).

    A pixel survives when its size x size window (scipy's origin for even sizes) lies inside the image and inside
    its own component, i.e. the window's min and max id both equal its id (scipy binary_erosion, border_value=0).
    """
    ids = components.double()[None, None]                                     # (1, 1, H, W); exact up to 2**53
    pad = (size // 2, size - 1 - size // 2, size // 2, size - 1 - size // 2)  # left, right, top, bottom
    ids = F.pad(ids, pad, value=-1.0)                                          # outside the image = background
    hi = F.max_pool2d(ids, size, stride=1)[0, 0]
    lo = -F.max_pool2d(-ids, size, stride=1)[0, 0]
    keep = (hi == lo) & (components >= 0)
    return torch.where(keep, components, torch.full_like(components, -1))


def teacher_masks(label: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """§4.2: one binary mask per class present in the label map (ascending), ignore excluded."""
    classes = label.unique()
    classes = classes[classes != ignore_index]
    return classes, label[None] == classes[:, None, None]                      # (K,), (K, H, W)


def refine_pseudo_label(image, label, predictor, cfg: RefineConfig = None, generator=None):
    """Sec. 3.3 / §5.2-5.3: refine one teacher label map with a point predictor.

    Args:
        image: uint8 RGB (H, W, 3) numpy or tensor, or a (3, H, W) tensor: the clean image the teacher saw (a
            tensor on SAM's device lets a GPU SamPointPredictor skip the host).
        label: int (H, W) teacher argmax in {0..18} (255 = ignore, excluded from components), numpy or a tensor on
            any device: components, points and the merge run on its device (csrc/ CUDA ops for a CUDA label).
        predictor: a point predictor (see module docstring).
        cfg: RefineConfig (official defaults).
        generator: CPU torch.Generator for the random points (its uniforms are moved to the label's device, so a
            seed gives the same points on every device).
    Returns:
        classes int64 (K,) ascending, masks bool (K, H, W), on the label's device. Without any prompted component:
        the unrefined teacher masks (one per class present).
    """
    classes, masks, _ = _refine(image, label, predictor, cfg or RefineConfig(), generator)
    return classes, masks


def _refine(image, label, predictor, cfg: RefineConfig, generator):
    """refine_pseudo_label plus a flag: False when it fell back to the teacher masks."""
    # the label's device is the device of the whole refinement: components, points (uniforms drawn from the CPU
    # generator, then moved: the same points on every device), SAM's masks (on SAM's device), the merge, the result
    label = label.long() if isinstance(label, torch.Tensor) else torch.as_tensor(np.asarray(label)).long()
    # §5.2.1: per-class connected components (4-connectivity, like scipy.ndimage.label's default)
    components, comp_class, comp_area = ops.connected_components(label, connectivity=cfg.connectivity,
                                                                 ignore_index=IGNORE_INDEX)
    # the class and area of every component, on the host in one transfer: which components get prompts and of which
    # class is then decided there (the only synchronization of the refinement besides the component count)
    comp_class, comp_area = torch.stack([comp_class, comp_area]).cpu()
    if cfg.erosion:  # §5.2.2: points from the eroded component; the area threshold uses the full area
        components = erode_components(components, cfg.erosion_size)
    # §5.2.2: num_points random positive points per component with area > min_area (and enough pixels left)
    points, comp_ids = ops.sample_points(components, comp_area, num_points=cfg.num_points, min_area=cfg.min_area,
                                         mode=cfg.mode, generator=generator,
                                         exact_area=not cfg.erosion)  # (P, K, 2) xy on the label's device, (P,) host
    if len(comp_ids) == 0:  # §5.2.4: no prompt -> fall back to the unrefined teacher pseudo label
        return (*teacher_masks(label), False)
    # §5.3.1-2: one batched call, 3 candidates per prompt, keep the highest predicted IoU
    predictor.set_image(image)
    masks, scores = predictor.predict_points(points, multimask=True)          # (P, M, H, W), (P, M)
    best = scores.argmax(1).to(masks.device)
    selected = masks[torch.arange(len(best), device=masks.device), best].bool()  # (P, H, W), on SAM's device
    if cfg.rm_intersection:  # §5.3.3: pixels claimed by two or more masks leave all of them
        selected &= (selected.sum(0, dtype=torch.int16) < 2)[None]
    # official bug (reference §9.7): classes were re-assigned from per-class component counts that included
    # components without points, shifting masks to wrong classes; each prompt carries its own component id here
    classes, which = comp_class[comp_ids.long()].unique(return_inverse=True)  # on the host: ascending (K,), row
    which = which.to(selected.device, non_blocking=True)                     # of each prompt's class
    out = torch.zeros(len(classes), selected[0].numel(), dtype=torch.int16, device=selected.device)
    out = out.index_add_(0, which, selected.flatten(1).to(torch.int16)) > 0  # §5.3.4: per-class union (K, H*W)
    return (classes.to(label.device, non_blocking=True), out.view(-1, *selected.shape[1:]).to(label.device), True)


def pseudo_label_target(image, label, predictor, cfg: RefineConfig = None, generator=None) -> dict:
    """Criterion target {"labels" int64 (K,), "masks" bool (K,H,W), "valid" bool (H,W)}, on the label's device
    (same arguments as refine_pseudo_label).

    "valid" (the union of the masks) is present only when cfg.uncovered == "ignore" and SAM refined the image;
    the official behaviour ("drop") leaves uncovered pixels as negatives for every mask.
    """
    cfg = cfg or RefineConfig()
    classes, masks, refined = _refine(image, label, predictor, cfg, generator)
    target = {"labels": classes, "masks": masks}
    if cfg.uncovered == "ignore" and refined:
        target["valid"] = masks.any(0)  # not official: uncovered pixels are left out of the mask losses
    return target


def label_map(classes, masks, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-class masks -> int64 (H, W) train-id map on the masks' device; uncovered pixels = ignore_index; overlaps:
    the later class."""
    classes, masks = torch.as_tensor(classes), torch.as_tensor(masks)
    out = torch.full(masks.shape[1:], ignore_index, dtype=torch.int64, device=masks.device)
    if len(classes) == 0:
        return out
    last = len(classes) - 1 - masks.flip(0).to(torch.uint8).argmax(0)     # (H, W) last mask holding each pixel
    return torch.where(masks.any(0), classes.to(masks.device).long()[last], out)


# ---- pseudo-label quality against a hidden truth (ToyCity, issue 18) ----

def label_confusion(pred, truth, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX):
    """Pixel counts of a pseudo label against the true label, on the tensors' device, without a host sync.

    Args:
        pred: integer (...) pseudo-label map (teacher argmax or refined): train ids, ignore_index = dropped (no label).
        truth: integer (...) same shape: the true train ids; ignore_index pixels are not scored.
        Any integer dtype, numpy or tensors on any (one) device.
    Returns:
        int64 (C, C + 1) on pred's device: rows = true class, columns 0..C-1 = predicted class, column C = "dropped"
        (the prediction left the pixel at ignore_index). Only pixels whose truth is a class in [0, C) are counted, so
        the sum is the number of scored pixels. A prediction outside [0, C) that is not ignore_index also counts as
        dropped (it names no class; this keeps the function free of a validity check, i.e. of a sync). Matrices add:
        the sum over images is the folder's.
    """
    pred, truth = torch.as_tensor(pred), torch.as_tensor(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pseudo label shape {tuple(pred.shape)} != truth shape {tuple(truth.shape)}")
    if pred.is_floating_point() or truth.is_floating_point():
        raise ValueError(f"integer label maps expected, got {pred.dtype} pseudo label and {truth.dtype} truth "
                         f"(take the argmax over classes first)")
    C = num_classes
    pred, truth = pred.reshape(-1).long(), truth.to(pred.device).reshape(-1).long()
    column = torch.where((pred >= 0) & (pred < C), pred, C)                   # (N,) predicted class or C = dropped
    scored = (truth >= 0) & (truth < C)                                        # truth ignore_index (or junk): skipped
    index = torch.where(scored, truth * (C + 1) + column, C * (C + 1))         # the last bin collects skipped pixels
    counts = torch.zeros(C * (C + 1) + 1, dtype=torch.int64, device=pred.device)
    counts.index_add_(0, index, torch.ones_like(index))
    return counts[:-1].view(C, C + 1)


def label_quality(confusion, class_names=None) -> dict:
    """Scores of a label_confusion matrix (C, C + 1), as fractions in [0, 1] (one host transfer).

    Dropped pixels (the last column) are never rewarded: refinement that drops what it is unsure of must not look
    better for it. Hence two views:
        mIoU: mean over the classes with at least one true pixel (evaluate.py's convention: classes absent from the
            truth are left out, even when predicted) of TP / (true + predicted - TP), where a dropped pixel counts as
            a miss of its true class (strict: dropping lowers recall).
        mIoU_kept: the same on the kept pixels only (dropped pixels left out of the truth too): the quality of what
            the label does say. Classes whose true pixels were all dropped are left out.
        acc: correct / kept pixels (pixel accuracy over the labelled pixels).
        dropped: dropped / scored pixels (the share left at ignore; 0 for a teacher argmax).
        IoU: {class name: IoU (strict, as mIoU)}; NaN for a class neither true nor predicted, 0 for a class predicted
            but absent from the truth (as evaluate.compute_metrics).
        pixels: scored pixels (true class in [0, C)); kept = pixels * (1 - dropped).
    No scored pixel: every score is NaN.
    """
    conf = torch.as_tensor(confusion).detach().cpu().to(torch.float64)
    C = conf.shape[0]
    if conf.shape != (C, C + 1):
        raise ValueError(f"expected a (C, C + 1) label_confusion matrix, got {tuple(conf.shape)}")
    names = class_names or tuple(str(c) for c in range(C))  # data.CLASSES for the 19 train ids
    nan = float("nan")

    def mean_iou(kept, n_true):  # kept (C, C) counts; n_true (C,) true pixels (with or without the dropped ones)
        tp = kept.diag()
        iou = tp / (n_true + kept.sum(0) - tp)                                 # 0/0 = NaN: neither true nor predicted
        present = n_true > 0
        return iou, (float(iou[present].mean()) if present.any() else nan)

    kept = conf[:, :C]
    iou, miou = mean_iou(kept, conf.sum(1))                                    # strict: a dropped pixel is a miss
    _, miou_kept = mean_iou(kept, kept.sum(1))                                 # kept: dropped pixels left out
    total, n_kept = float(conf.sum()), float(kept.sum())
    return {"mIoU": miou, "mIoU_kept": miou_kept,
            "acc": float(kept.diag().sum()) / n_kept if n_kept else nan,
            "dropped": float(conf[:, C].sum()) / total if total else nan,
            "IoU": {name: float(v) for name, v in zip(names, iou)}, "pixels": int(total)}


# ---- CLI ----

def _save_png(path: Path, array: np.ndarray):
    from runtools import files  # the CLI only (atomic writes)
    files.save_png(array, path)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SCORE_FILE = "label_quality.json"  # written by --score-labels DIR into DIR
VALID_IDS = np.zeros(256, bool)
VALID_IDS[:NUM_CLASSES] = VALID_IDS[IGNORE_INDEX] = True  # train ids {0..18} and ignore


def _find_label(labels_dir: Path, stem: str):
    """The teacher label of image <stem>: <stem>.png or <stem>_labelTrainIds.png in labels_dir, or None."""
    for name in (f"{stem}.png", f"{stem}_labelTrainIds.png"):
        if (labels_dir / name).is_file():
            return labels_dir / name
    return None


GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _read_image(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB, read as data.read_image reads it (refine.py copies on its own): RGB,
    greyscale, palette, CMYK as PIL converts them; 16-bit greyscale scaled by 255 / 65535 (PIL's convert would clip
    it to white); an alpha channel dropped only when every pixel is opaque; anything else is a ValueError."""
    from PIL import Image
    with Image.open(path) as im:
        mode = im.mode
        if mode in GREY16_MODES:
            grey = np.asarray(im).astype(np.int64)
            if grey.size and (grey.min() < 0 or grey.max() > 65535):
                raise ValueError(f"image {path} has PIL mode {mode} with values outside 16 bits; save it as 8-bit RGB")
            return np.repeat(((grey * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=-1)
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            rgba = np.asarray(im.convert("RGBA"))
            if (rgba[..., 3] < 255).any():
                raise ValueError(f"image {path} has transparent pixels (PIL mode {mode}): their colour is undefined; "
                                 f"flatten it onto a background and save it as RGB")
            return np.array(rgba[..., :3])
        if mode not in ("RGB", "L", "1", "P", "CMYK", "YCbCr"):
            raise ValueError(f"image {path} has PIL mode {mode}; expected RGB, greyscale or palette (8 or 16 bits)")
        return np.array(im.convert("RGB"))


def _read_label(path: Path, image_shape) -> np.ndarray:
    """A teacher label PNG as int64 (H, W); ValueError unless it is a single-channel map of train ids {0..18, 255}
    of the image's size (8-bit L or P, or 16-bit holding train ids)."""
    from PIL import Image
    with Image.open(path) as im:
        mode, label = im.mode, np.asarray(im)
    if mode not in ("L", "P", *GREY16_MODES):
        raise ValueError(f"label {path} has PIL mode {mode}; expected a single-channel 8-bit train-id PNG")
    bad = (label < 0) | (label > 255)
    bad[~bad] = ~VALID_IDS[label[~bad].astype(np.uint8)]
    if bad.any():
        raise ValueError(f"label {path} holds values {np.unique(label[bad])[:10].tolist()} outside the train ids "
                         f"{{0..18, 255}}: raw label ids? Convert a dataset first with `python data.py convert "
                         f"DATASET ROOT` and pass its *_labelTrainIds.png folder as --labels")
    if label.shape != tuple(image_shape):
        raise ValueError(f"label {path} is {label.shape[0]}x{label.shape[1]} but its image is "
                         f"{image_shape[0]}x{image_shape[1]} (HxW); they must be equal")
    return label.astype(np.int64)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def panel(images, titles, label_maps, class_names, palette) -> np.ndarray:
    """Side-by-side RGB images with a title above each and a class-colour legend below (the one pseudo-label panel:
    refine.py's `_vis.png` and training's pseudo_labels.png).

    Args:
        images: list of uint8 (H, W, 3) arrays of one height, or a list of such rows (one grid; equal row widths).
        titles: one string per image (of the first row).
        label_maps: the train-id maps (H, W) whose classes the legend lists (ascending).
        class_names, palette: the names and uint8 (N, 3) colours of the train ids (data.CLASSES, data.PALETTE).
    Returns:
        uint8 (T + H + L, sum of widths, 3): a title band of T rows, the images (rows T..T+H), a legend of L rows;
        the legend ends with black = "dropped / ignored (255)".
    """
    from PIL import Image, ImageDraw
    rows_of_images = images if isinstance(images[0], (list, tuple)) else [images]
    strip = np.concatenate([np.concatenate(row, axis=1) for row in rows_of_images], axis=0)
    images = rows_of_images[0]
    h, width = strip.shape[:2]
    font, line = _font(12), PANEL_TITLE_ROWS
    classes = sorted(set(np.unique(np.concatenate([m.reshape(-1) for m in label_maps])).tolist()) - {IGNORE_INDEX})
    entries = [(tuple(palette[c].tolist()), class_names[c]) for c in classes if c < len(palette)]
    entries.append(((0, 0, 0), "dropped / ignored (255)"))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows, x = [[]], 0
    for colour, text in entries:  # wrap the legend into rows of the panel's width
        w = 14 + int(probe.textlength(text, font=font)) + 10
        if rows[-1] and x + w > width:
            rows.append([])
            x = 0
        rows[-1].append((x, colour, text))
        x += w
    canvas = Image.new("RGB", (width, line + h + line * len(rows) + 4), (255, 255, 255))
    canvas.paste(Image.fromarray(strip), (0, line))
    draw = ImageDraw.Draw(canvas)
    x0 = 0
    for image, title in zip(images, titles):
        w = image.shape[1]
        draw.text((x0 + (w - probe.textlength(title, font=font)) / 2, 1), title, fill=(0, 0, 0), font=font)
        x0 += w
    for r, row in enumerate(rows):
        y = line + h + 2 + r * line
        for x, colour, text in row:
            draw.rectangle([x + 1, y + 2, x + 11, y + 12], fill=colour, outline=(128, 128, 128))
            draw.text((x + 14, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def parse_args(argv=None):
    """argparse for refine.py -> (args, RefineConfig): the run's own flags, then one flag per RefineConfig field (help
    text and choices from the field's metadata: runtools/cli.py); booleans are `--flag/--no-flag`."""
    from runtools import cli  # the CLI only: refine's functions need nothing but ops.py
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", help="folder of RGB images (png/jpg), e.g. generate.py's DIR/images "
                                         "(required to refine)")
    parser.add_argument("--labels", help="folder of teacher train-id PNGs, <stem>.png or <stem>_labelTrainIds.png "
                                         "(values 0..18, 255 = ignore) (required to refine)")
    parser.add_argument("--out", help="output folder: <stem>.png refined train ids, <stem>_vis.png panels, "
                                      "refine_config.json (required to refine)")
    parser.add_argument("--score-labels", metavar="DIR", default=None,
                        help="score mode, instead of refining: compare the train-id PNGs of DIR (teacher or refined "
                             "pseudo labels, <stem>.png; *_vis.png skipped) with --truth; prints per-class IoU, "
                             f"mIoU, acc and the dropped share, writes DIR/{SCORE_FILE}")
    parser.add_argument("--truth", metavar="DIR", default=None,
                        help="with --score-labels: folder of the true train-id PNGs, <stem>.png or "
                             "<stem>_labelTrainIds.png (e.g. generate.py --backend toy's OUT/truth)")
    parser.add_argument("--sam", default="vit_t", choices=PREDICTORS,
                        help="point predictor: vit_t = MobileSAM (official), vit_h/vit_l/vit_b = SAM, toy = offline "
                             "ToyCity stand-in (no weights)")
    parser.add_argument("--checkpoint", default=None,
                        help="SAM / MobileSAM weights file; None = the official path of --sam: "
                        + ", ".join(f"{k}: {v}" for k, v in DEFAULT_CHECKPOINTS.items()))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="points of image <stem> use seed ^ crc32(stem)")
    flag = argparse.BooleanOptionalAction
    parser.add_argument("--overwrite", action=flag, default=False, help="replace the outputs of an --out folder made "
                        "with other settings (otherwise refused); without it a rerun with the same settings resumes. "
                        f"With --score-labels: replace an existing {SCORE_FILE}")
    parser.add_argument("--progress", action=flag, default=True, help="progress bar")
    parser.add_argument("--debug", action=flag, default=False, help="show the Python traceback of an error")
    cli.add_dataclass_flags(parser, RefineConfig)
    args = parser.parse_args(argv)
    if args.score_labels is None:
        missing = [f"--{k}" for k in ("images", "labels", "out") if getattr(args, k) is None]
        if missing or args.truth is not None:
            parser.error(f"the following arguments are required: {', '.join(missing)} (to score labels instead: "
                         f"--score-labels DIR --truth DIR)" if missing else
                         "--truth goes with --score-labels DIR (score mode); to refine, drop --truth")
    elif args.truth is None or any(getattr(args, k) is not None for k in ("images", "labels", "out")):
        parser.error("--score-labels DIR needs --truth DIR and takes no --images, --labels or --out (it scores "
                     "existing labels, it does not refine)")
    cfg = RefineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RefineConfig)})
    return args, cfg


def run_config(args, cfg: RefineConfig) -> dict:
    """What the outputs of a folder depend on (written to refine_config.json; a rerun must match it)."""
    checkpoint = None if args.sam == "toy" else str(Path(args.checkpoint or DEFAULT_CHECKPOINTS[args.sam]).absolute())
    return {**dataclasses.asdict(cfg), "sam": args.sam, "checkpoint": checkpoint, "seed": args.seed}


def _outputs(out: Path) -> list:
    """The files of a refine.py output folder (what --overwrite removes)."""
    names = [out / "refine_config.json", out / SCORE_FILE, *out.glob("*.png")]  # a score of old labels is stale
    return [p for p in names if p.is_file()]


def preflight(args, cfg: RefineConfig):
    """Every problem with the inputs, each naming the flag that fixes it -> (pairs [(image, label)], problems)."""
    images_dir, labels_dir, out = Path(args.images), Path(args.labels), Path(args.out)
    problems, pairs = [], []
    images = []
    if not images_dir.is_dir():
        problems.append(f"--images {images_dir} is not a folder; pass the folder of RGB images")
    else:
        images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            problems.append(f"--images {images_dir} holds no .png/.jpg image")
    if not labels_dir.is_dir():
        problems.append(f"--labels {labels_dir} is not a folder; pass the folder of teacher train-id PNGs")
    elif images:
        pairs = [(p, _find_label(labels_dir, p.stem)) for p in images]
        missing = [p.stem for p, label in pairs if label is None]
        if missing:
            problems.append(f"--labels {labels_dir} has no label for {len(missing)} of {len(pairs)} images, e.g. "
                            f"{labels_dir / (missing[0] + '.png')} or "
                            f"{labels_dir / (missing[0] + '_labelTrainIds.png')} (teacher train-id PNG)")
    if args.sam != "toy":
        problems += predictor_problems(args.sam, args.checkpoint, flag="--checkpoint")
    inside = [f"{flag} {d}" for flag, d in (("--images", images_dir), ("--labels", labels_dir))
              if out.resolve() == d.resolve() or d.resolve() in out.resolve().parents
              or out.resolve() in d.resolve().parents]
    if inside:  # --overwrite or not: the inputs are never written over
        problems.append(f"--out {out} is, holds or is inside the input folder {' and '.join(inside)}; pass an --out "
                        f"folder of its own, outside the inputs")
    elif out.exists() and not out.is_dir():
        problems.append(f"--out {out} is a file; pass a folder")
    elif out.is_dir():
        problems += _folder_problems(out, run_config(args, cfg), args.overwrite)
    return pairs, problems


def _folder_problems(out: Path, config: dict, overwrite: bool) -> list:
    """A non-empty --out must be a refine.py folder made with the same settings (or --overwrite, for our folders)."""
    saved_path = out / "refine_config.json"
    if not saved_path.is_file():
        if any(out.iterdir()):
            return [f"--out {out} is not empty and holds no refine_config.json (not a refine.py folder); pass a new "
                    f"or empty --out folder"]
        return []
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        saved = {}
    changed = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in config.items() if saved.get(k) != v]
    if changed and not overwrite:
        return [f"--out {out} was made with other settings: {', '.join(changed)}. Rerun with those settings to "
                f"resume, pass another --out, or add --overwrite to delete its {len(_outputs(out))} files and start "
                f"over"]
    return []


def _run(argv):
    from tqdm import tqdm

    import data  # the CLI only: the class names and colours of the panels
    from runtools import files

    args, cfg = parse_args(argv)
    if args.score_labels is not None:
        return score_labels(args)
    pairs, problems = preflight(args, cfg)
    if problems:
        raise ValueError(f"{len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = run_config(args, cfg)
    saved = out / "refine_config.json"
    if saved.is_file() and json.loads(saved.read_text(encoding="utf-8")) != config:  # --overwrite (preflight)
        for path in _outputs(out):
            path.unlink()
    files.write_json(config, saved)  # before any output
    predictor = None
    summary = {"refined": 0, "skipped": 0, "fallback": 0, "coverage": [], "out": str(out)}
    for image_path, label_path in tqdm(pairs, desc="refine", disable=not args.progress):
        stem = image_path.stem
        if (out / f"{stem}.png").is_file() and (out / f"{stem}_vis.png").is_file():
            summary["skipped"] += 1  # resume
            continue
        image = _read_image(image_path)                          # uint8 (H, W, 3) RGB, or a message naming the mode
        label = _read_label(label_path, image.shape[:2])       # train ids or a message naming data.py convert
        predictor = predictor or build_predictor(args.sam, args.checkpoint, args.device)
        gen = torch.Generator().manual_seed(args.seed ^ zlib.crc32(stem.encode()))
        classes, masks, was_refined = _refine(image, label, predictor, cfg, gen)
        refined = label_map(classes, masks).numpy().astype(np.uint8)
        summary["fallback"] += int(not was_refined)
        summary["coverage"].append(float((refined != IGNORE_INDEX).mean()))
        vis = panel([image, data.colorize(label), data.colorize(refined)], ["image", "teacher", "refined"],
                    [label, refined], data.CLASSES, data.PALETTE)
        _save_png(out / f"{stem}_vis.png", vis)
        _save_png(out / f"{stem}.png", refined)  # written last: its presence marks the image as done
        summary["refined"] += 1
    cov = summary.pop("coverage")
    summary["mean_coverage"] = float(np.mean(cov)) if cov else None
    print(json.dumps(summary))
    return summary


# ---- CLI: scoring pseudo labels against the truth ----

def _label_stem(path: Path) -> str:
    name = path.name[:-len(".png")]
    return name[:-len("_labelTrainIds")] if name.endswith("_labelTrainIds") else name


def _png_size(path: Path):
    from PIL import Image
    with Image.open(path) as im:
        return im.height, im.width


def score_preflight(args) -> tuple:
    """Every problem with --score-labels / --truth, each naming its flag -> (pairs [(label, truth)], problems)."""
    labels_dir, truth_dir = Path(args.score_labels), Path(args.truth)
    problems, labels = [], []
    if not labels_dir.is_dir():
        problems.append(f"--score-labels {labels_dir} is not a folder; expected a folder of train-id PNGs "
                        f"<stem>.png (e.g. refine.py's --out, or teacher labels)")
    else:
        labels = sorted(p for p in labels_dir.glob("*.png") if not p.name.endswith("_vis.png"))
        if not labels:
            problems.append(f"--score-labels {labels_dir} holds no <stem>.png label (only *_vis.png panels or "
                            f"nothing); pass the folder of train-id PNGs")
    if not truth_dir.is_dir():
        problems.append(f"--truth {truth_dir} is not a folder; expected the true train-id PNGs <stem>.png (generate.py "
                        f"--backend toy writes them to OUT/truth)")
    if problems:
        return [], problems
    pairs = [(p, _find_label(truth_dir, _label_stem(p))) for p in labels]
    missing = [p for p, t in pairs if t is None]
    if len(missing) == len(pairs):
        return [], [f"no label of --score-labels {labels_dir} has a truth in --truth {truth_dir}: expected "
                    f"{truth_dir / (_label_stem(labels[0]) + '.png')} for {labels[0].name} (same stems); found "
                    f"{len(list(truth_dir.glob('*.png')))} PNGs there. Pass the --truth folder of these images"]
    if missing:
        problems.append(f"{len(missing)} of {len(pairs)} labels of --score-labels {labels_dir} have no truth in "
                        f"--truth {truth_dir}, e.g. {truth_dir / (_label_stem(missing[0]) + '.png')} for "
                        f"{missing[0].name}; score a folder whose every label has its truth (move the others out)")
    sizes = [(p, t, _png_size(p), _png_size(t)) for p, t in pairs if t is not None]
    wrong = [(p, t, a, b) for p, t, a, b in sizes if a != b]
    if wrong:
        p, t, a, b = wrong[0]
        problems.append(f"{len(wrong)} label(s) differ in size from their truth, e.g. {p} is {a[0]}x{a[1]} but {t} "
                        f"is {b[0]}x{b[1]} (HxW); --score-labels and --truth must hold labels of the same images at "
                        f"the same size")
    out = labels_dir / SCORE_FILE
    if out.exists() and not args.overwrite:
        problems.append(f"{out} exists (an earlier score); add --overwrite to replace it")
    return pairs, problems


def format_quality(quality: dict) -> str:
    """Per-class IoU (classes true or predicted) then mIoU, mIoU_kept, acc, dropped share, in %."""
    pct = lambda v: "-" if v != v else f"{100 * v:6.2f}"  # noqa: E731  (NaN -> "-")
    lines = [f"{'class':<14} IoU %"] + [f"{name:<14} {pct(v)}" for name, v in quality["IoU"].items() if v == v]
    lines.append(f"mIoU {pct(quality['mIoU'])} (dropped = miss) | mIoU_kept {pct(quality['mIoU_kept'])} | "
                 f"acc {pct(quality['acc'])} (of kept pixels) | dropped {pct(quality['dropped'])} "
                 f"(of {quality['pixels']} scored pixels)")
    return "\n".join(lines)


def score_labels(args) -> dict:
    """--score-labels DIR --truth DIR: the summed label_confusion of every pair -> label_quality, printed and written
    to DIR/label_quality.json (atomically; an existing one only with --overwrite)."""
    from tqdm import tqdm

    import data  # the CLI only: the class names
    from runtools import files
    pairs, problems = score_preflight(args)
    if problems:
        raise ValueError(f"{len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES + 1, dtype=torch.int64)
    for label_path, truth_path in tqdm(pairs, desc="score", disable=not args.progress):
        truth = _read_label(truth_path, _png_size(truth_path))
        conf += label_confusion(_read_label(label_path, truth.shape), truth)
    quality = label_quality(conf, data.CLASSES)
    clean = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731  (JSON has no NaN)
    record = {"labels": str(Path(args.score_labels).absolute()), "truth": str(Path(args.truth).absolute()),
              "images": len(pairs), **{k: clean(v) for k, v in quality.items() if k != "IoU"},
              "IoU": {k: clean(v) for k, v in quality["IoU"].items()}, "confusion": conf.tolist(),
              "confusion_note": "rows true class, columns predicted class, last column dropped (255)"}
    out = Path(args.score_labels) / SCORE_FILE
    files.write_json(record, out, allow_nan=False)
    print(format_quality(quality))
    return {**record, "out": str(out)}


def main(argv=None) -> dict:
    """CLI entry: one message and exit code 2 for bad inputs; the traceback only with --debug."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except (ValueError, OSError, ImportError, RuntimeError) as err:
        if "--debug" in argv:
            raise
        print(f"refine.py: error: {err}\n(add --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
