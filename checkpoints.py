"""CLOUDS checkpoints: our save/load format, the official detectron2 `model_final.pth` loader, head parameter counts.

The official CLOUDS release ships detectron2 files (state dict under "model", keys `sem_seg_head.*` and, for some,
`backbone.clip_model.*`); `load_official` maps them strictly onto clouds.py's modules, whose names follow those files.
Our own format (`save_checkpoint` / `load_checkpoint`) adds the ModelConfig, so a file rebuilds its model.
Needs clouds.py (and ops.py) beside it.

Usage:
    model, report = load_official("model_final.pth")  # preset inferred from the file
    save_checkpoint("model.pt", model, step=5); model, ckpt = load_checkpoint("model.pt")
    python checkpoints.py --count-params              # head parameter counts of the released configurations
"""
import argparse
import errno
import os
import pickle
import shutil
import warnings
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

import clouds
from runtools import files

# ---- reading files ----


def _torch_load(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) or not zipfile.is_zipfile(path):
            raise RuntimeError(f"{path} is not a readable torch checkpoint: {e}") from e
        warnings.warn(f"{path} holds non-tensor Python objects; loading it with weights_only=False. Only do this for "
                      f"a file you trust (e.g. an official release).")
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, ValueError) as e:
        raise RuntimeError(f"{path} is not a readable torch checkpoint: {e}") from e


def _prefixed(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_head_strict(head, state, what):
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise RuntimeError(
            f"{what} does not match the model head (prefix 'sem_seg_head.'): {len(missing)} missing "
            f"{missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}, {len(mismatched)} shape-mismatched "
            f"{mismatched[:10]}. Build the model with the matching preset (convnext_large / rn50 / rn101).")
    head.load_state_dict(state, strict=True)


# ---- official checkpoints ----


def _split_backbone(backbone, clip_sd, what):
    """Sort a file's CLIP tensors (prefix `backbone.clip_model.` removed) against the model's `clip_sd`.

    The image tower (`visual.*`) makes the features, so it must match exactly: a `visual.*` tensor missing from the
    file, unknown to the model or of another shape is a RuntimeError naming the keys. The other tensors (text tower,
    `logit_scale`) load where name and shape match; the rest are skipped and returned.
    Returns (tensors to load {key: tensor}, skipped keys sorted, model keys absent from the file sorted).
    """
    file_vis = {k for k in backbone if k.startswith("visual.")}
    model_vis = {k for k in clip_sd if k.startswith("visual.")}
    missing, unexpected = sorted(model_vis - file_vis), sorted(file_vis - model_vis)
    mismatched = [f"{k}: file {tuple(backbone[k].shape)} vs model {tuple(clip_sd[k].shape)}"
                  for k in sorted(file_vis & model_vis) if backbone[k].shape != clip_sd[k].shape]
    if missing or unexpected or mismatched:
        raise RuntimeError(
            f"{what}: the CLIP image tower (prefix 'backbone.clip_model.visual.') does not match the model's "
            f"({len(model_vis)} tensors): {len(missing)} missing {missing[:10]}, {len(unexpected)} unexpected "
            f"{unexpected[:10]}, {len(mismatched)} shape-mismatched {mismatched[:10]}. Build the model with the "
            f"checkpoint's preset (convnext_large / rn50 / rn101) or pass model=None to infer it; the released files "
            f"name the tensors as open_clip 2.20.0 + timm 0.9.5 do.")
    load = {k: v for k, v in backbone.items() if k in clip_sd and clip_sd[k].shape == v.shape}
    return load, sorted(set(backbone) - set(load)), sorted(set(clip_sd) - set(backbone))


def _infer_preset(head, backbone):
    cin = head["pixel_decoder.input_proj.0.0.weight"].shape[1]
    if cin == 1536:
        return "convnext_large"
    if cin == 2048:  # RN50 and RN101 heads are identical; RN101's layer3 has 23 blocks (RN50: 6)
        if backbone:
            return "rn101" if "visual.layer3.6.conv1.weight" in backbone else "rn50"
        warnings.warn("rn50 and rn101 heads are identical and the file has no backbone keys: assuming rn50; pass "
                      "model=build_model('rn101') for an RN101 checkpoint")
        return "rn50"
    raise ValueError(f"cannot infer the preset: res5 input channels {cin} (known: 1536 convnext_large, 2048 rn50/rn101)")


def load_official(path, model=None):
    """Load an official CLOUDS `model_final.pth` (detectron2 format, state dict under "model").

    `sem_seg_head.*` loads strictly into `model.sem_seg_head`. When the file has `backbone.clip_model.*` tensors, its
    image tower `visual.*` loads strictly into the open_clip model (a missing, unknown or shape-mismatched key is an
    error naming it); text-tower tensors load where name and shape match and are otherwise reported as skipped.
    `criterion.empty_weight`, `void_embedding.weight`, `sem_seg_head_ema.*`, `sam.*` are skipped. With model=None the
    preset is inferred from the head and the backbone comes from the file when present. Everything is checked before
    anything loads, so a failed call leaves `model` unchanged.

    Returns (model, report): report["file_keys"] = head_keys + backbone_loaded + len(backbone_skipped) + len(skipped)
    (every key of the file is counted once); backbone_visual = image-tower tensors loaded; backbone_missing =
    text-tower tensors of the model absent from the file (None without backbone tensors: the model keeps its CLIP).
    """
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise RuntimeError(f"{path}: expected a detectron2 checkpoint dict with a 'model' state dict, found "
                           f"{type(ckpt).__name__} with keys {list(ckpt)[:10] if isinstance(ckpt, dict) else []}")
    sd = ckpt["model"]
    head, backbone = _prefixed(sd, "sem_seg_head."), _prefixed(sd, "backbone.clip_model.")
    skipped = sorted(k for k in sd if not k.startswith(("sem_seg_head.", "backbone.clip_model.")))
    if "pixel_decoder.input_proj.0.0.weight" not in head:
        raise RuntimeError(f"{path}: no 'sem_seg_head.pixel_decoder.input_proj.0.0.weight'; not a CLOUDS checkpoint")
    preset = None
    if model is None:
        preset = _infer_preset(head, backbone)
        model = clouds.build_model(preset, **({"pretrained": None} if backbone else {}))
    load, clip_skipped, clip_missing = {}, [], []
    if backbone:  # checked before the head loads, so an error leaves the model as it was
        load, clip_skipped, clip_missing = _split_backbone(backbone, model.backbone.clip_model.state_dict(), str(path))
    _load_head_strict(model.sem_seg_head, head, f"{path}")
    if load:
        model.backbone.clip_model.load_state_dict(load, strict=False)  # visual.* complete; text tower may not be
    report = {"preset": preset, "file_keys": len(sd), "head_keys": len(head),
              "head_params": sum(v.numel() for v in head.values()), "backbone_loaded": len(load),
              "backbone_visual": sum(k.startswith("visual.") for k in load), "backbone_skipped": clip_skipped,
              "backbone_missing": len(clip_missing) if backbone else None, "skipped": skipped}
    if clip_skipped:
        warnings.warn(f"{len(clip_skipped)} CLIP text-tower tensors of the file do not match the model (unknown name "
                      f"or shape) and were skipped: {clip_skipped[:10]}")
    if clip_missing:
        warnings.warn(f"{len(clip_missing)} CLIP text-tower tensors were not in the file and keep their previous "
                      f"values: {clip_missing[:10]}")
    return model, report


# ---- our checkpoints ----


def saves_full_backbone(cfg: dict) -> bool:
    """A trained or random-init backbone cannot be rebuilt from its pretrained weights, so checkpoints hold all of it;
    a frozen pretrained one is not saved, and a tuned ViT (Rein / LoRA on pretrained weights) only its adapter."""
    return bool(cfg.get("train_backbone")) or cfg.get("pretrained") is None


def backbone_state(model) -> dict:
    """The `backbone.*` tensors a checkpoint of `model` holds (see saves_full_backbone). For CLIP the keys are
    `backbone.clip_model.*`, as in the official files."""
    cfg = asdict(model.cfg)
    if saves_full_backbone(cfg):
        return {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    if cfg.get("tuning", "frozen") != "frozen":
        keep = set(model.backbone.adapter_names())
        return {f"backbone.{k}": v for k, v in model.backbone.state_dict().items() if k in keep}
    return {}


def load_backbone_state(model, state: dict, what="checkpoint"):
    """Load the `backbone.*` tensors of a checkpoint's state dict: all of the backbone strictly, or (a tuned ViT on
    pretrained weights) exactly its adapter tensors; anything else is a RuntimeError naming the keys."""
    tensors = _prefixed(state, "backbone.")
    if not tensors:
        return
    adapter = set(model.backbone.adapter_names()) if hasattr(model.backbone, "adapter_names") else set()
    if not adapter or not set(tensors) <= adapter:  # the whole backbone (CLIP, or a trained / random-init ViT)
        model.backbone.load_state_dict(tensors, strict=True)
        return
    missing = sorted(adapter - set(tensors))
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} {model.cfg.tuning} adapter tensors of backbone "
                           f"'{model.cfg.backbone}' are missing ({missing[:5]}); build the model with the checkpoint's "
                           f"backbone and tuning settings (lora_rank, lora_targets, rein_rank, num_queries)")
    model.backbone.load_state_dict(tensors, strict=False)  # the frozen ViT weights came from `pretrained`


class WriteError(OSError):
    """A file could not be written (full disk, read-only folder, ...); str() is the whole message: the path, the cause
    and the free space. Whatever was at the path before is untouched (the write goes to a temp file first)."""


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list (what torch.save has to write, give or take the pickle)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def write_error(path, err, needed: int = 0, freed: int = 0) -> WriteError:
    """One message for a failed write of `path`: the cause (torch reports a full disk as "unexpected pos A vs B" or
    "file write failed", without ENOSPC) and the free space of the folder's file system."""
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free + freed
    except OSError:
        free = None
    code = getattr(err, "errno", None)
    full = code == errno.ENOSPC or (free is not None and needed and free < needed + (1 << 20))
    mb = lambda n: f"{n / 2 ** 20:,.1f} MB"  # noqa: E731
    space = f"{mb(free)} free in {folder}" if free is not None else f"free space in {folder} unknown"
    if full:
        cause = f"no space left on device ({space}" + (f"; it needs ~{mb(needed)})" if needed else ")")
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        cause = f"{os.strerror(code).lower()} ({folder})"
    else:
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} ({space})"
    result = WriteError(f"could not write {path}: {cause}; the file there before (if any) is untouched (the write "
                        f"went to a temp file, now removed)")
    result.errno = errno.ENOSPC if full else code
    return result


def save_checkpoint(path, model, **extra):
    """Write {"version": 1, "config", "model": head state (+ backbone when trained or random-init; + the adapter of a
    tuned ViT), **extra} atomically (temp file, then rename; mode 0666 minus the umask). A failed write raises
    WriteError naming the path, the cause and the free space; the file at `path` is then untouched."""
    clash = {"version", "config", "model"} & set(extra)
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} are reserved")
    state = {f"sem_seg_head.{k}": v for k, v in model.sem_seg_head.state_dict().items()}
    state.update(backbone_state(model))
    obj = {"version": 1, "config": asdict(model.cfg), "model": state, **extra}
    try:
        files.atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:  # torch.save: RuntimeError "unexpected pos ..." on a full disk
        raise write_error(path, e, _tensor_bytes(obj)) from e


def load_checkpoint(path, map_location="cpu", **overrides):
    """Rebuild a model saved by `save_checkpoint` -> (model, ckpt). `overrides` change ModelConfig fields, e.g.
    pretrained='/path/open_clip_pytorch_model.bin' for a frozen backbone whose weights are not in the file."""
    ckpt = _torch_load(path, map_location)
    if not (isinstance(ckpt, dict) and ckpt.get("version") == 1 and {"config", "model"} <= set(ckpt)):
        found = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise RuntimeError(f"{path} is not a clouds checkpoint (expected a dict with 'version': 1, 'config', 'model'; "
                           f"found {found}). For an official CLOUDS model_final.pth use load_official().")
    cfg = dict(ckpt["config"])
    valid = {f.name for f in fields(clouds.ModelConfig)}
    if set(cfg) - valid:
        raise RuntimeError(f"{path}: unknown config fields {sorted(set(cfg) - valid)} (written by another version?)")
    backbone = _prefixed(ckpt["model"], "backbone.")
    if backbone and saves_full_backbone(cfg):
        cfg["pretrained"] = None  # the backbone weights come from the file (a tuned ViT's adapter: on top of its own)
    cfg.update(overrides)
    model = clouds.CLOUDS(clouds.ModelConfig(**cfg))
    _load_head_strict(model.sem_seg_head, _prefixed(ckpt["model"], "sem_seg_head."), str(path))
    load_backbone_state(model, ckpt["model"], str(path))
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model, ckpt


# ---- main ----


def main(argv=None):
    parser = argparse.ArgumentParser(description="CLOUDS model utilities")
    parser.add_argument("--count-params", action="store_true",
                        help="print head parameter counts of the released configurations (random-init backbones)")
    parser.add_argument("--presets", nargs="+", default=["convnext_large", "rn50", "rn101"],
                        choices=list(clouds.PRESETS))
    args = parser.parse_args(argv)
    if not args.count_params:
        parser.print_help()
        return {}
    counts = {}
    for name in args.presets:
        model = clouds.build_model(name, pretrained=None)
        counts[name] = clouds.head_parameter_count(model)
        print(f"{name:15s} head parameters: {counts[name]:,}")
        del model
    return counts


if __name__ == "__main__":
    main()
