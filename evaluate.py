"""Evaluation of CLOUDS (reference §8): confusion matrix, mIoU over the classes present in the GT, per-class tables.

Protocol (§8.1): short side resized to 1024 (image bilinear, GT nearest), batch 1, one whole-image forward (the model
pads to a multiple of 32 itself), no sliding window or test-time augmentation; metrics against the resized GT.
`--eval-protocol slide` instead averages the class scores of --slide-window windows every --slide-stride pixels (the
Rein / mmseg convention; issue 19); every printed or saved number names its protocol (protocol_name).
Metrics are fractions in [0, 1] internally (dicts, JSON) and printed as percentages.

Usage:
    python evaluate.py --weights runs/gta/model_final.pt --datasets cityscapes bdd mapillary --data-root datasets
    python evaluate.py --weights clouds_gta.pth --official --data-root datasets --out r.json   # official checkpoint
    python evaluate.py --pred-dir preds/ --dataset bdd --data-root datasets      # score train-id PNGs <stem>.png
    python evaluate.py --weights W --images my_photos/ --save-pred out/          # your own images, no GT
"""
import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
from runtools import cli, files

# ---- config ----

TEST_DATASETS = tuple(d for d in data.DATASETS if d != "generated")
PROTOCOLS = ("whole", "slide")  # CLOUDS (§8.1): whole image | Rein family: sliding windows


@dataclass
class EvalConfig:
    """evaluate.py's settings. Field `short_side` is the flag `--short-side`; its metadata holds the keyword arguments
    of argparse: "help" (required) and "alias" (a second spelling), so the --help text sits beside the default."""
    data_root: str = field(default="datasets", metadata={  # official: every list path starts with datasets/
        "help": "datasets root (holding cityscapes/, bdd10k/, mapillary_vistas/, acdc/, ...)"})
    # §1.4: the GTA/SYNTHIA test sets (Cityscapes: acdc_* too)
    datasets: tuple = field(default=("cityscapes", "bdd", "mapillary"), metadata={
        "alias": "--dataset", "nargs": "+", "metavar": "NAME", "help": "test datasets, one or more of: " + ", ".join(TEST_DATASETS)})
    weights: str = field(default="", metadata={  # our checkpoint (checkpoints.save_checkpoint), or official (--official)
        "help": "checkpoint to evaluate: ours (train.py model_final.pt) or an official one with --official"})
    official: bool = field(default=False, metadata={  # load an official detectron2 checkpoint: checkpoints.load_official
        "help": "--weights is an official detectron2 CLOUDS checkpoint"})
    preset: str = field(default="", metadata={  # --official: clouds preset to build first ("" = from the keys)
        "help": "--official: model preset (convnext_large, rn50, rn101, tiny); '' = inferred from the file"})
    clip_weights: str = field(default="", metadata={
        "help": "local open_clip weights, for a backbone the checkpoint does not hold"})
    backbone_weights: str = field(default="", metadata={  # issue 19: the frozen ViT of a Rein / LoRA checkpoint
        "help": "local weights of a ViT backbone the checkpoint does not hold (it holds only a Rein / LoRA adapter)"})
    pred_dir: str = field(default="", metadata={  # score saved predictions instead of a model
        "help": "score a folder of train-id PNGs <image stem>.png instead of a model (one --dataset)"})
    images: str = field(default="", metadata={  # the user's own images (no GT) -> --save-pred
        "help": "predict a folder of your own images (no ground truth): writes <stem>.png (train ids), "
                "<stem>_color.png and <stem>_overlay.png at each image's size into --save-pred"})
    split: str = field(default="", metadata={  # "" = data.default_split: val for the test sets
        "help": "dataset split; '' = the official one (val for the test sets)"})
    short_side: int = field(default=1024, metadata={  # official MapperTest ResizeShortestEdge(1024, max_size=inf)
        "help": "test-time short side in pixels (official 1024, ResizeShortestEdge)"})
    eval_protocol: str = field(default="whole", metadata={  # official: whole image (§8.1)
        "help": "whole: one forward per image (CLOUDS, official) | slide: --slide-window windows every --slide-stride "
                "px, class scores averaged (Rein / mmseg)"})
    slide_window: int = field(default=512, metadata={"help": "--eval-protocol slide: square window in px (Rein 512)"})
    slide_stride: int = field(default=341, metadata={"help": "--eval-protocol slide: stride in px (Rein 341)"})
    save_pred: str = field(default="", metadata={
        "help": "write the predictions here: <dir>/<dataset>/<stem>.png and <stem>_color.png (with --images: "
                "<dir>/<stem>.png, _color.png, _overlay.png)"})
    out: str = field(default="", metadata={
        "help": "write the metrics as JSON to this file"})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N or auto (cuda when available)"})
    workers: int = field(default=2, metadata={
        "help": "DataLoader workers for reading and resizing"})
    progress: bool = field(default=True, metadata={  # tqdm bars
        "help": "progress bars"})
    overwrite: bool = field(default=False, metadata={
        "help": "--images: replace prediction files already in --save-pred (otherwise refused)"})
    debug: bool = field(default=False, metadata={
        "help": "show the Python traceback of an error"})
    tf32: bool = field(default=True, metadata={  # the same flags as train.py --tf32 (its default)
        "help": "TF32 matmuls/convolutions on CUDA, as in training (train.py --tf32, on by default)"})

    def __post_init__(self):
        self.datasets = tuple(self.datasets)
        problems = []
        unknown = [d for d in self.datasets if d not in data.DATASETS or d == "generated"]
        if unknown:
            problems.append(f"unknown test dataset(s) {unknown} in --datasets; valid: {', '.join(TEST_DATASETS)}")
        if bool(self.weights) == bool(self.pred_dir):
            problems.append("give exactly one of --weights (evaluate a model) or --pred-dir (score saved PNGs)")
        if self.pred_dir and len(self.datasets) != 1:
            problems.append(f"--pred-dir scores one dataset; got --datasets {' '.join(self.datasets)}")
        if self.images and not self.save_pred:
            problems.append("--images needs --save-pred DIR (where the predictions go)")
        if self.images and self.pred_dir:
            problems.append("--images predicts with --weights; it cannot be combined with --pred-dir")
        if self.official and not self.weights:
            problems.append("--official needs --weights pointing to the official checkpoint")
        if self.preset and not self.official:
            problems.append("--preset is for --official checkpoints (ours store their config)")
        if self.short_side < 1:
            problems.append(f"--short-side must be >= 1, got {self.short_side}")
        if self.eval_protocol not in PROTOCOLS:
            problems.append(f"--eval-protocol must be one of {', '.join(PROTOCOLS)}, got {self.eval_protocol!r}")
        if not 1 <= self.slide_stride <= self.slide_window:
            problems.append(f"need 1 <= --slide-stride <= --slide-window (no gaps), got stride {self.slide_stride}, "
                            f"window {self.slide_window}")
        if problems:
            raise ValueError(_problems(problems))


def _problems(problems: list) -> str:
    """One message listing every problem."""
    return f"{len(problems)} problem(s):\n  - " + "\n  - ".join(problems)


def parse_args(argv=None) -> EvalConfig:
    """argparse generated from EvalConfig's fields (help text from each field's metadata; `--dataset` is an alias of
    `--datasets`); booleans are `--flag/--no-flag`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_dataclass_flags(parser, EvalConfig)
    return EvalConfig(**vars(parser.parse_args(argv)))


# ---- metrics (§8.2) ----

def confusion_matrix(pred, gt, num_classes: int = data.NUM_CLASSES, ignore_index: int = data.IGNORE_INDEX):
    """Confusion matrix of one prediction, on the tensors' device.

    Args:
        pred: integer (...) class map with values in [0, num_classes) wherever gt is not ignored.
        gt: integer (...) same shape, values in [0, num_classes) or ignore_index (skipped).
    Returns:
        int64 (C, C), rows = GT class, columns = predicted class. Matrices add: the sum over images is the dataset's.
    """
    pred, gt = torch.as_tensor(pred), torch.as_tensor(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != GT shape {tuple(gt.shape)}")
    if pred.is_floating_point() or gt.is_floating_point():
        raise ValueError(f"integer class maps expected, got {pred.dtype} prediction and {gt.dtype} GT "
                         f"(take the argmax over classes first)")
    pred, gt = pred.reshape(-1).long(), gt.to(pred.device).reshape(-1).long()
    valid = gt != ignore_index
    pred, gt = pred[valid], gt[valid]
    for what, x in (("GT", gt), ("prediction", pred)):
        bad = (x < 0) | (x >= num_classes)
        if bad.any():
            raise ValueError(f"{what} values {torch.unique(x[bad])[:10].tolist()} on non-ignored pixels are outside "
                             f"[0, {num_classes}) (ignore index {ignore_index})")
    return torch.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def compute_metrics(conf) -> dict:
    """Metrics of a confusion matrix (rows GT, columns prediction), as fractions in [0, 1].

    Returns a dict with
        IoU: float64 (C,) TP / (TP + FP + FN); NaN where a class has neither GT nor predictions, 0 where it has
            predictions but no GT (detectron2 reports NaN there; mIoU is the same either way);
        mIoU: mean IoU over the classes with at least one GT pixel (official ClassicalSemSegEvaluator: classes absent
            from the GT are left out, even when predicted);
        mIoU16: the same over the 16 SYNTHIA classes (data.SYNTHIA16; NaN unless C == 19);
        mAcc: mean per-class pixel accuracy over the GT-present classes; aAcc: overall pixel accuracy;
        fwIoU: IoU weighted by each class's share of the GT pixels.
    """
    conf = torch.as_tensor(conf).detach().cpu().to(torch.float64)
    tp, n_gt, n_pred = conf.diag(), conf.sum(1), conf.sum(0)
    iou = tp / (n_gt + n_pred - tp)  # 0/0 = NaN for classes never seen nor predicted
    present = n_gt > 0
    mask16 = torch.zeros_like(present)
    if len(present) == data.NUM_CLASSES:
        mask16[list(data.SYNTHIA16)] = True
    mean = lambda x: float(x.mean()) if x.numel() else math.nan  # noqa: E731
    return {"IoU": iou, "mIoU": mean(iou[present]), "mIoU16": mean(iou[present & mask16]),
            "mAcc": mean((tp / n_gt)[present]), "aAcc": float(tp.sum() / conf.sum()) if conf.sum() else math.nan,
            "fwIoU": float((n_gt / n_gt.sum() * iou)[present].sum()) if present.any() else math.nan}


def format_table(results: dict, classes=data.CLASSES) -> str:
    """Markdown table in %: rows = classes, mIoU, mIoU16; columns = datasets (+ their average when > 1).

    official bug (reference §9.11): the official per-class summary found each class by substring, so "IoU.bus" showed
    vegetation's IoU ("bushes"); we index IoU by class id.
    """
    names = list(results)
    avg = len(names) > 1
    fmt = lambda v: "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"  # noqa: E731

    def row(title, values):
        values = [math.nan if v is None else float(v) for v in values]
        if avg:
            defined = [v for v in values if not math.isnan(v)]
            values.append(sum(defined) / len(defined) if defined else math.nan)
        return f"| {title} | " + " | ".join(fmt(v) for v in values) + " |"

    lines = ["| class | " + " | ".join(names + ["average"] * avg) + " |",
             "|---|" + "---:|" * (len(names) + avg)]
    for c, cls in enumerate(classes):
        lines.append(row(cls, [_iou_list(results[n])[c] for n in names]))
    lines.append(row("**mIoU**", [results[n]["mIoU"] for n in names]))
    lines.append(row("mIoU16", [results[n].get("mIoU16", math.nan) for n in names]))
    protocols = sorted({results[n]["protocol"] for n in names if results[n].get("protocol")})
    if protocols:  # issue 19: every reported number names its protocol
        lines.append(f"\nprotocol: {'; '.join(protocols)}")
    return "\n".join(lines)


def _iou_list(metrics):
    iou = metrics["IoU"]
    if isinstance(iou, dict):  # read back from our JSON
        return [iou.get(c) for c in data.CLASSES]
    return [float(v) for v in torch.as_tensor(iou)]


def to_json(results: dict) -> dict:
    """JSON-ready copy: IoU as {class: value}, conf as nested lists, NaN -> null."""
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    out = {}
    for name, m in results.items():
        out[name] = {k: clean(v) for k, v in m.items() if isinstance(v, float)}
        out[name]["IoU"] = {c: clean(v) for c, v in zip(data.CLASSES, _iou_list(m))}
        if m.get("protocol"):
            out[name]["protocol"] = m["protocol"]
        if "conf" in m:
            out[name]["conf"] = torch.as_tensor(m["conf"]).tolist()
    return out




# ---- model evaluation (§8.1) ----


def protocol_name(protocol="whole", short_side=1024, window=512, stride=341) -> str:
    """The evaluation protocol, as printed beside every number: CLOUDS scores the whole image at short side 1024
    (§8.1); the Rein family averages sliding windows (Rein: 512 windows, stride 341)."""
    if protocol == "whole":
        return f"whole image, short side {short_side}"
    return f"slide {window}x{window} stride {stride}, short side {short_side}"


def _window_starts(size, window, stride) -> list:
    """Window offsets along one axis: every `stride` px, the last one flush with the end (mmseg's grid); one window
    at 0 when it covers the axis."""
    if size <= window:
        return [0]
    n = -(-(size - window) // stride) + 1  # ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(n)]


@torch.no_grad()
def slide_predict(model, images, window=512, stride=341, return_scores=False):
    """Sliding-window inference (the Rein / mmseg `slide` test mode): class scores of model.predict on every window
    (square, `window` px, every `stride` px, the last flush with the border; a window larger than the image is the
    image), summed and divided by the number of windows covering each pixel; argmax over classes.

    Args:
        model: has .predict(images, return_scores=True) -> float (B, C, h, w) for any h, w.
        images: uint8 or float (B, 3, H, W) RGB 0..255.
    Returns: int64 (B, H, W) labels, or the averaged float scores (B, C, H, W) with return_scores.
    """
    B, _, H, W = images.shape
    total, count = None, torch.zeros(H, W, device=images.device)
    for y in _window_starts(H, window, stride):
        for x in _window_starts(W, window, stride):
            s = model.predict(images[..., y:y + window, x:x + window], return_scores=True)  # (B, C, h, w)
            if total is None:
                total = s.new_zeros(B, s.shape[1], H, W)
            total[..., y:y + window, x:x + window] += s
            count[y:y + window, x:x + window] += 1
    scores = total / count  # (B, C, H, W)
    return scores if return_scores else scores.argmax(1)

def _dist_info():
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(conf):
    torch.distributed.all_reduce(conf)  # sum over ranks (NCCL needs conf on the GPU: it lives on `device`)
    return conf


def save_prediction(pred, save_dir, name) -> None:
    """Write <save_dir>/<name>.png (train ids, 8-bit) and <name>_color.png (Cityscapes colours)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    pred = torch.as_tensor(pred).cpu().numpy().astype(np.uint8)
    files.save_png(pred, save_dir / f"{name}.png")
    files.save_png(data.colorize(pred), save_dir / f"{name}_color.png")


class Stopped(Exception):
    """evaluate_model's `stop()` returned True (a stop signal during an evaluation inside training)."""


STOP_POLL = 1  # images between two stop polls of evaluate_model (a poll: a small CPU all-reduce in DDP)


def _confusion_counts(pred, gt, num_classes: int = data.NUM_CLASSES, ignore_index: int = data.IGNORE_INDEX):
    """confusion_matrix without its checks and without a host synchronization: int64 (C*C + 1,) on the tensors'
    device, the flattened matrix and then the number of non-ignored pixels with a label or prediction outside
    [0, C) (evaluate_model checks that count once, at the end)."""
    C = num_classes
    pred, gt = pred.reshape(-1).long(), gt.to(pred.device).reshape(-1).long()
    valid = gt != ignore_index
    ok = valid & (gt >= 0) & (gt < C) & (pred >= 0) & (pred < C)
    index = torch.where(ok, gt * C + pred, torch.where(valid, C * C, C * C + 1))  # C*C: bad, C*C+1: ignored
    return torch.zeros(C * C + 2, dtype=torch.int64, device=pred.device).index_add_(
        0, index, torch.ones_like(index))[:C * C + 1]


@torch.inference_mode()
def evaluate_model(model, dataset, device="cpu", progress: bool = True, save_dir=None, num_workers: int = 0,
                   protocol: str = "whole", window: int = 512, stride: int = 341, loader=None, stop=None) -> dict:
    """Score `model.predict` on a dataset whose transform already resizes to the test size (data.TestTransform).

    Args:
        model: has .predict(images uint8 (1, 3, H, W)) -> int64 (1, H, W) train ids, .eval(), .to().
        dataset: data.SegDataset; each sample's label is the GT at the evaluated resolution.
        save_dir: when set, predictions are written there by save_prediction.
        protocol: "whole" (one forward, §8.1) or "slide" (slide_predict with `window` and `stride`).
        loader: an iterable of this rank's samples to use instead of a new DataLoader (runs.EvalLoader keeps its
            workers between evaluations).
        stop: a callable polled every STOP_POLL images (at the same images on every rank, so it may be a
            collective); True raises Stopped.
    Returns: compute_metrics(conf) plus "conf" (int64 (19, 19), summed over ranks when torch.distributed is up:
        rank r scores the indices r::world). No host synchronization per image: the counts stay on `device`.
    """
    rank, world = _dist_info()
    indices = list(range(rank, len(dataset), world))
    common = len(dataset) // world  # every rank scores at least this many images: the polls happen on all of them
    cuda = torch.device(device).type == "cuda"
    if loader is None:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=None,
                                             num_workers=num_workers, pin_memory=cuda)  # pinned: asynchronous copies
    was_training = getattr(model, "training", False)
    model.eval()
    counts = torch.zeros(data.NUM_CLASSES ** 2 + 1, dtype=torch.int64, device=device)
    desc = f"eval {getattr(dataset, 'name', '')}"
    try:
        for i, sample in enumerate(tqdm(loader, total=len(indices), desc=desc, disable=not progress or rank > 0)):
            if stop is not None and i % STOP_POLL == 0 and i < common and stop():
                raise Stopped(f"stopped at image {i} of {desc}")
            label = sample["label"].to(device, non_blocking=True)
            image = sample["image"][None].to(device, non_blocking=True)
            pred = model.predict(image) if protocol == "whole" else \
                slide_predict(model, image, window, stride)  # §8.1: batch 1, whole image (or windows), (1, H, W)
            if tuple(pred.shape) != (1, *label.shape):
                raise RuntimeError(f"model.predict returned {tuple(pred.shape)} for {sample['path']}; expected "
                                   f"(1, {label.shape[0]}, {label.shape[1]})")
            counts += _confusion_counts(pred[0], label)
            if save_dir is not None:
                save_prediction(pred[0], save_dir, sample["name"])
    finally:
        if was_training:
            model.train()
    bad = int(counts[-1:].cpu()[0])  # checked once per set (validated labels and an argmax make it 0)
    if bad:
        raise ValueError(f"{bad} pixels of {desc} have a label or prediction outside [0, {data.NUM_CLASSES}) "
                         f"(ignore index {data.IGNORE_INDEX})")
    conf = counts[:-1].reshape(data.NUM_CLASSES, data.NUM_CLASSES)
    if world > 1:
        conf = _all_reduce(conf)
    conf = conf.cpu()
    return {**compute_metrics(conf), "conf": conf}


def load_model(cfg: EvalConfig):
    """Our checkpoint through checkpoints.load_checkpoint, or an official one through checkpoints.load_official (into
    clouds.build_model(preset) when a preset is given; otherwise the preset is inferred and the backbone read from
    the file, which needs no CLIP download)."""
    import checkpoints  # lazy: the model (and its heavy imports) only for the model path
    import clouds

    weights = cfg.clip_weights or cfg.backbone_weights
    extra = {"pretrained": weights} if weights else {}
    if not cfg.official:
        return checkpoints.load_checkpoint(cfg.weights, **extra)[0]
    model = clouds.build_model(cfg.preset, **extra) if cfg.preset else None
    model, report = checkpoints.load_official(cfg.weights, model)
    if isinstance(report, dict):  # the skipped-key lists are long
        report = {k: v for k, v in report.items() if not isinstance(v, (list, tuple))}
    print(f"loaded official checkpoint {cfg.weights}: {report}")
    return model


# ---- scoring saved predictions ----

def _read_prediction(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            mode = im.mode
            pred = np.array(im) if mode in ("L", "P", "I", "I;16") else None
    except (OSError, SyntaxError, ValueError) as e:
        raise RuntimeError(f"could not read prediction {path}: {e}") from e
    if pred is None:
        raise ValueError(f"prediction {path} has PIL mode {mode}; expected a single-channel train-id PNG "
                         f"(a colourized *_color.png is not scorable)")
    return pred


def evaluate_predictions(pred_dir, name: str, root, split: str = None, short_side: int = 1024,
                         progress: bool = True) -> dict:
    """Score <pred_dir>/<image stem>.png (train ids) against a dataset's GT.

    A prediction must have the GT's native size or the §8.1 test size (short side `short_side`, GT resized with
    nearest); any other size is an error (predictions are never resized, since that would change the scores).
    """
    pred_dir = Path(pred_dir)
    ds = data.build_dataset(name, root, split)
    paths = [pred_dir / f"{Path(img).stem}.png" for img, _ in ds.items]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} predictions missing in {pred_dir.absolute()}, e.g. "
                                f"{', '.join(str(p) for p in missing[:3])}; expected one <image stem>.png per image "
                                f"of {name}.")
    conf = torch.zeros(data.NUM_CLASSES, data.NUM_CLASSES, dtype=torch.int64)
    for i, path in enumerate(tqdm(paths, desc=f"score {name}", disable=not progress)):
        gt, pred = ds.load_label(i), _read_prediction(path)
        if pred.shape != gt.shape:
            size = data.shortest_edge_size(*gt.shape, short_side)
            if pred.shape != size:
                raise ValueError(f"prediction {path} is {pred.shape[0]}x{pred.shape[1]}; expected the GT size "
                                 f"{gt.shape[0]}x{gt.shape[1]} or the test size {size[0]}x{size[1]} (short side "
                                 f"{short_side}); predictions are not resized.")
            gt = data.resize_label(gt, size)
        conf += confusion_matrix(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt))
    return {**compute_metrics(conf), "conf": conf}


# ---- inference on a folder of images (no ground truth) ----

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OUTPUT_SUFFIXES = (".png", "_color.png", "_overlay.png")  # train ids, Cityscapes colours, image blended with colours


def list_images(folder) -> list:
    """Sorted image files (png/jpg, not hidden) directly in `folder`."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def overlay(image: np.ndarray, pred: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): the image blended with the colour map of `pred` (ignore pixels keep the image)."""
    colour = data.colorize(pred).astype(np.float32)
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colour
    mixed[pred >= data.NUM_CLASSES] = image[pred >= data.NUM_CLASSES]
    return np.round(mixed).clip(0, 255).astype(np.uint8)


@torch.inference_mode()
def predict_images(model, paths, save_dir, device="cpu", short_side: int = 1024, progress: bool = True) -> int:
    """Predict each image at the §8.1 test size (short side `short_side`), resize the prediction back to the image
    (nearest), and write <save_dir>/<stem>.png (train ids), <stem>_color.png and <stem>_overlay.png atomically.
    Returns the number of images written."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    converted = {}  # mode -> image names read through a conversion (data.read_image: 16-bit, palette, grey, ...)
    for path in tqdm(paths, desc="predict", disable=not progress):
        image = data.read_image(path)                                          # (H, W, 3) uint8
        with Image.open(path) as im:
            if im.mode != "RGB":
                converted.setdefault(im.mode, []).append(Path(path).name)
        size = data.shortest_edge_size(*image.shape[:2], short_side)
        x = torch.from_numpy(data.resize_image(image, size)).permute(2, 0, 1)[None].to(device)  # (1, 3, h, w)
        pred = model.predict(x)[0].cpu().numpy().astype(np.uint8)              # (h, w) train ids
        pred = data.resize_label(pred, image.shape[:2])                        # (H, W), nearest
        stem = Path(path).stem
        files.save_png(pred, save_dir / f"{stem}.png")
        files.save_png(data.colorize(pred), save_dir / f"{stem}_color.png")
        files.save_png(overlay(image, pred), save_dir / f"{stem}_overlay.png")
    for mode, names in converted.items():
        print(f"read {len(names)} image(s) as {data.describe_mode(mode)}: {', '.join(names[:5])}"
              + (", ..." if len(names) > 5 else ""))
    return len(paths)


# ---- command line ----

def output_clashes(paths) -> dict:
    """{output file name: [the images that would write it]} for the names predict_images would write twice: x.png and
    x.jpg both give x.png; an image named x_color.png writes x_color.png, which is also x.png's colour map."""
    writers = {}
    for p in paths:
        for suffix in OUTPUT_SUFFIXES:
            writers.setdefault(f"{Path(p).stem}{suffix}", []).append(Path(p))
    return {name: ps for name, ps in writers.items() if len(ps) > 1}


def _clash_problem(folder, clashes: dict) -> str:
    shown = "; ".join(f"{name} for {', '.join(p.name for p in ps[:-1])} and {ps[-1].name}"
                      for name, ps in list(clashes.items())[:6])
    return (f"--images {folder}: {len(clashes)} prediction file(s) would each be written for several images, the last "
            f"one silently replacing the others: {shown}{'; ...' if len(clashes) > 6 else ''}. Rename the images so "
            f"that no two share a stem and no stem ends in _color or _overlay, or predict them into separate "
            f"--save-pred folders")


def preflight(cfg: EvalConfig) -> list:
    """Every problem with the inputs, each naming the flag that fixes it (files, folders, dataset layouts). An output
    folder that is, holds or is inside an input folder is refused, --overwrite or not."""
    problems = []
    if cfg.weights and not Path(cfg.weights).is_file():
        problems.append(f"--weights {cfg.weights} does not exist; pass a checkpoint file (train.py writes "
                        f"OUT/model_final.pt)")
    if cfg.pred_dir and not Path(cfg.pred_dir).is_dir():
        problems.append(f"--pred-dir {cfg.pred_dir} is not a folder of <image stem>.png predictions")
    if cfg.images:
        if not Path(cfg.images).is_dir():
            problems.append(f"--images {cfg.images} is not a folder")
        elif not list_images(cfg.images):
            problems.append(f"--images {cfg.images} holds no .png/.jpg image")
        elif data.nested(cfg.save_pred, cfg.images):  # --overwrite or not: the inputs are never written over
            problems.append(f"--save-pred {cfg.save_pred} is, holds or is inside the input folder --images "
                            f"{cfg.images}: the predictions would be written among (or over) your images. Pass a "
                            f"--save-pred folder outside --images")
        else:
            clashes = output_clashes(list_images(cfg.images))
            if clashes:
                problems.append(_clash_problem(cfg.images, clashes))
            elif Path(cfg.save_pred).is_dir() and not cfg.overwrite:
                taken = [Path(cfg.save_pred) / f"{p.stem}{s}" for p in list_images(cfg.images)
                         for s in OUTPUT_SUFFIXES]
                taken = [p for p in taken if p.exists()]
                if taken:
                    problems.append(f"--save-pred {cfg.save_pred} already holds {len(taken)} prediction files (e.g. "
                                    f"{taken[0].name}); pass another --save-pred or add --overwrite")
        return problems
    if not Path(cfg.data_root).is_dir():
        return problems + [f"--data-root {cfg.data_root} is not a folder; pass the datasets root"]
    for name in cfg.datasets:
        try:
            data.list_files(name, cfg.data_root, cfg.split or None)
        except (FileNotFoundError, ValueError) as err:
            problems.append(f"--datasets {name} (--data-root {cfg.data_root}): " + str(err).replace("\n", "\n    "))
            continue
        inputs = [Path(cfg.data_root) / f for f in data.DATASETS[name].folders if (Path(cfg.data_root) / f).is_dir()]
        if cfg.save_pred and any(data.nested(Path(cfg.save_pred) / name, f) for f in inputs):
            problems.append(f"--save-pred {cfg.save_pred} would write {Path(cfg.save_pred) / name}, which is, holds or "
                            f"is inside the dataset folder {inputs[0]}; pass a --save-pred folder outside the datasets")
    return problems


def set_tf32(device, tf32: bool):
    """On CUDA, TF32 matmuls and cuDNN convolutions on or off, as train.py sets them (--tf32, on by default): the
    same speed and the same last digits as the evaluations during training."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def _run(argv) -> dict:
    cfg = parse_args(argv)
    problems = preflight(cfg)
    if problems:
        raise ValueError(_problems(problems))
    rank, _ = _dist_info()
    results = {}
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    set_tf32(device, cfg.tf32)
    if cfg.images:
        n = predict_images(load_model(cfg).to(device), list_images(cfg.images), cfg.save_pred, device,
                           cfg.short_side, cfg.progress)
        print(f"wrote {n} x (<stem>.png, <stem>_color.png, <stem>_overlay.png) to {Path(cfg.save_pred).absolute()}")
        return {"images": n, "save_pred": cfg.save_pred}
    if cfg.pred_dir:
        name = cfg.datasets[0]
        results[name] = evaluate_predictions(cfg.pred_dir, name, cfg.data_root, cfg.split or None, cfg.short_side,
                                             cfg.progress)
    else:
        model = load_model(cfg).to(device)
        # official code: Cityscapes was scored by cityscapesScripts on labelIds at full resolution; its short side is
        # already 1024, and the 19 train ids map one-to-one to the evaluated label ids, so the confusion is the same.
        for name in cfg.datasets:
            ds = data.build_dataset(name, cfg.data_root, cfg.split or None, data.TestTransform(cfg.short_side))
            save_dir = Path(cfg.save_pred) / name if cfg.save_pred else None
            results[name] = evaluate_model(model, ds, device, cfg.progress, save_dir, cfg.workers,
                                           cfg.eval_protocol, cfg.slide_window, cfg.slide_stride)
            results[name]["protocol"] = protocol_name(cfg.eval_protocol, cfg.short_side, cfg.slide_window,
                                                      cfg.slide_stride)
    if rank == 0:
        print(format_table(results))
        if cfg.out:
            files.write_json(to_json(results), cfg.out, allow_nan=False)
    return results


def main(argv=None) -> dict:
    """Evaluate a model (or score saved predictions, or predict --images); print the table; return {dataset: metrics}
    ({"images": n, "save_pred": dir} for --images). Bad inputs: one message, exit code 2 (traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except (ValueError, OSError, ImportError, RuntimeError) as err:
        if "--debug" in argv:
            raise
        # data.error_message: a bad file found in a DataLoader worker comes back wrapped in the worker's traceback
        print(f"evaluate.py: error: {data.error_message(err)}\n(add --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
