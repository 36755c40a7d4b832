"""Datasets, label conversion and augmentations of CLOUDS (reference §1.7, §7, §8.1).

The 19 Cityscapes train-id classes, the dataset layouts the official code reads, the DAFormer/HRDA label-conversion
tables, and the official augmentations (detectron2 ResizeScale -> FixedSizeCrop -> PointRend SSD colour jitter ->
RandomFlip for training; ResizeShortestEdge(1024) for testing), written on numpy + PIL like detectron2's transforms.

Usage:
    python data.py convert gta /data/datasets --nproc 8      # writes *_labelTrainIds.png beside the raw labels
    python data.py info cityscapes /data/datasets --split val
    ds = build_dataset("gta", "/data/datasets", transform=TrainTransform())
    sample = ds.get(0, np.random.default_rng(0))  # {"image" (3,768,768) uint8, "label" (768,768) uint8, ...}
"""
import argparse
import functools
import os
import sys
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from runtools import files

# ---- classes ----

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")  # §7.1
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255
PALETTE = np.array([  # the standard Cityscapes colours (cityscapesScripts labels.py), (19, 3) RGB
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)
SYNTHIA16 = tuple(c for c in range(NUM_CLASSES) if c not in (9, 14, 16))  # §7.3: no terrain, truck, train in SYNTHIA

_COLOR_LUT = np.zeros((256, 3), np.uint8)
_COLOR_LUT[:NUM_CLASSES] = PALETTE
_VALID_LUT = np.zeros(256, bool)  # True for the values a train-id label may hold: 0..18 and 255
_VALID_LUT[:NUM_CLASSES] = _VALID_LUT[IGNORE_INDEX] = True


def colorize(label):
    """Colour a train-id map. Args: label (H, W) int numpy array or tensor. Returns: uint8 (H, W, 3) RGB;
    255 and any other non-class value are black."""
    label = label.cpu().numpy() if torch.is_tensor(label) else np.asarray(label)
    return _COLOR_LUT[np.clip(label, 0, 255).astype(np.uint8)]


# ---- label conversion tables (§7.3, tools/convert_datasets from DAFormer/HRDA) ----

# Cityscapes label id -> train id. GTA5 labels hold Cityscapes label ids, so GTA uses the same table.
CITYSCAPES_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                       26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
GTA_TO_TRAIN = CITYSCAPES_TO_TRAIN
# SYNTHIA id (last channel of the 16-bit GT/LABELS PNG) -> train id. 16 (terrain), 18 (truck), 20 (train) are in the
# official table but "not present in synthia".
SYNTHIA_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
                    18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
# Mapillary Vistas v1.2 id -> train id (road <- road, lane marking, manhole; sidewalk <- curb, sidewalk; pole <- pole,
# utility pole; rider <- bicyclist, motorcyclist, other rider; train <- on rails).
MAPILLARY_TO_TRAIN = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8, 29: 9,
                      27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18}


@functools.lru_cache(maxsize=None)
def lookup_table(dataset: str) -> np.ndarray:
    """uint8 lookup table raw id -> train id (everything unlisted -> 255); 65536 entries for 16-bit SYNTHIA."""
    mapping, size = {"gta": (GTA_TO_TRAIN, 256), "cityscapes": (CITYSCAPES_TO_TRAIN, 256),
                     "synthia": (SYNTHIA_TO_TRAIN, 65536), "mapillary": (MAPILLARY_TO_TRAIN, 256)}[dataset]
    lut = np.full(size, IGNORE_INDEX, np.uint8)
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


# ---- dataset layouts (§7.2) ----

@dataclass(frozen=True)
class Layout:
    """Where one dataset's images and labels live under the datasets root ({split} is filled in)."""
    folders: tuple          # dataset folder; the first is the documented name, the others accepted aliases
    images: str             # image folder inside the dataset folder
    image_suffix: str       # a file name ending that marks an image
    labels: str = ""        # label folder inside the dataset folder ("" = no labels)
    label_suffix: str = ""  # replaces image_suffix to give the train-id label's name
    raw_suffix: str = ""    # the raw label's name ending that `convert` reads ("" = ships train ids)
    sub: str = ""           # sub-folder level(s) between the split folder and the files; non-empty = search recursively
    splits: tuple = (("train", "train"),)  # (split name, folder part)


# ACDC: the official list shows acdc/rgb_anon/<cond>/val/*_rgb_anon.png, the real release has GOPRxxxx sequence
# sub-folders; the recursive search accepts both.
_ACDC = {c: Layout(("acdc",), f"rgb_anon/{c}/{{split}}", "_rgb_anon.png", f"gt/{c}/{{split}}", "_gt_labelTrainIds.png",
                   sub="<sequence>/", splits=(("train", "train"), ("val", "val")))
         for c in ("fog", "night", "rain", "snow")}
# The folder names are the ones the official CODE reads (§7.2). The official datasets/README says `gta/` and `bdd100k/`
# (§9.10); official bug: the two disagree. We document the code's names and also accept the README's as aliases.
DATASETS = {
    "gta": Layout(("gta5", "gta"), "images", ".png", "labels", "_labelTrainIds.png", ".png"),
    "synthia": Layout(("synthia",), "RGB", ".png", "GT/LABELS", "_labelTrainIds.png", ".png"),
    # official bug (reference §9.5): the val GT dir was gtFine/cityscapes_panoptic_val, which finds no labels in a
    # standard layout; we read gtFine/<split> for both splits.
    "cityscapes": Layout(("cityscapes",), "leftImg8bit/{split}", "_leftImg8bit.png", "gtFine/{split}",
                         "_gtFine_labelTrainIds.png", "_gtFine_labelIds.png", sub="<city>/",
                         splits=(("train", "train"), ("val", "val"))),
    "bdd": Layout(("bdd10k", "bdd100k"), "images/10k/{split}", ".jpg", "labels/sem_seg/masks/{split}", ".png",
                  splits=(("train", "train"), ("val", "val"))),
    "mapillary": Layout(("mapillary_vistas",), "{split}/images", ".jpg", "{split}/labels", "_labelTrainIds.png", ".png",
                        splits=(("train", "training"), ("val", "validation"))),
    **{f"acdc_{c}": layout for c, layout in _ACDC.items()},
    # generate.py's output folder itself is the root: <folder>/images/*.png (or <folder>/*.png); no labels.
    "generated": Layout((".",), "images", ".png"),
}
# generate.py --backend toy writes each image's true label to <folder>/truth/<stem>.png (generate.TRUTH_DIR). It is
# never a training label: SegDataset hands it out as sample["truth"], only to measure pseudo-label quality.
TRUTH_DIR = "truth"
GTA_EXCLUDED = frozenset([15188, 17705, *range(20801, 20861)])  # §7.2: the official list leaves out these 62 images


def default_split(name: str) -> str:
    """The split the official code uses a dataset for: all images of gta/synthia/generated ("train"), the val split of
    the test sets (cityscapes, bdd, mapillary, acdc_*). Cityscapes as a training source needs split="train"."""
    _check_name(name)
    return "train" if name in ("gta", "synthia", "generated") else "val"


def _check_name(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def layout_help(name: str, root, split: str = None) -> str:
    """The expected files of a dataset under `root`, as lines for error messages."""
    lay, root = DATASETS[name], Path(root).expanduser().absolute()
    split = split or default_split(name)
    part = dict(lay.splits).get(split, split)
    base = f"{root}/" if name == "generated" else f"{root}/{lay.folders[0]}/"
    lines = [f"  {base}{lay.images.format(split=part)}/{lay.sub}<stem>{lay.image_suffix}"]
    if name == "generated":
        lines.append(f"  (or {root}/<stem>.png; generated images have no labels; ToyCity's "
                     f"{root}/{TRUTH_DIR}/<stem>.png are hidden true labels, read only as sample['truth'] for metrics)")
    else:
        lines.append(f"  {base}{lay.labels.format(split=part)}/{lay.sub}<stem>{lay.label_suffix}"
                     + (f"   <- python data.py convert {name} {root}" if lay.raw_suffix else "   (ships train ids)"))
    if len(lay.folders) > 1:
        lines.append(f"  ({'/, '.join(lay.folders[1:])}/ is accepted instead of {lay.folders[0]}/)")
    return f"expected layout for {name!r} (split {split!r}):\n" + "\n".join(lines)


def _find_folder(name, root):
    lay = DATASETS[name]
    for folder in lay.folders:
        if (root / folder).is_dir():
            return root / folder
    tried = " or ".join(str(root / f) for f in lay.folders)
    raise FileNotFoundError(f"dataset {name!r} not found: no folder {tried}.\n{layout_help(name, root)}")


def _glob(folder: Path, suffix: str, recursive: bool):
    files = folder.rglob(f"*{suffix}") if recursive else folder.glob(f"*{suffix}")
    return sorted(p for p in files if p.is_file() and not p.name.startswith("."))


def list_truths(root, items: list) -> list:
    """The hidden true label of each generated image (items from list_files("generated", root)): the path
    <root>/truth/<stem>.png, or None where that file does not exist (also for every item when there is no truth/)."""
    truth_dir = Path(root).expanduser().absolute() / TRUTH_DIR
    if not truth_dir.is_dir():
        return [None] * len(items)
    return [truth_dir / f"{Path(image).stem}.png" if (truth_dir / f"{Path(image).stem}.png").is_file() else None
            for image, _ in items]


def list_files(name: str, root, split: str = None) -> list:
    """Sorted (image path, label path or None) pairs of a dataset; raises FileNotFoundError with the layout."""
    _check_name(name)
    lay, root = DATASETS[name], Path(root).expanduser().absolute()
    split = split or default_split(name)
    if split not in dict(lay.splits):
        raise ValueError(f"dataset {name!r} has no split {split!r}; valid: {', '.join(dict(lay.splits))}")
    part = dict(lay.splits)[split]
    if name == "generated":
        if not root.is_dir():
            raise FileNotFoundError(f"generated-image folder {root} does not exist.\n{layout_help(name, root)}")
        image_dir = root / "images" if (root / "images").is_dir() else root
        images = _glob(image_dir, ".png", recursive=False)  # not recursive: truth/*.png are never images
        if not images:
            raise FileNotFoundError(f"no *.png in {image_dir}.\n{layout_help(name, root)}")
        return [(p, None) for p in images]

    folder = _find_folder(name, root)
    image_dir = folder / lay.images.format(split=part)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist.\n{layout_help(name, root, split)}")
    images = _glob(image_dir, lay.image_suffix, recursive=bool(lay.sub))
    if name == "gta":
        images = [p for p in images if not (p.stem.isdigit() and int(p.stem) in GTA_EXCLUDED)]
    if not images:
        raise FileNotFoundError(f"no {lay.sub}*{lay.image_suffix} files in {image_dir}.\n"
                                f"{layout_help(name, root, split)}")
    label_dir = folder / lay.labels.format(split=part)
    items, missing = [], []
    for img in images:
        rel = img.relative_to(image_dir)
        stem = rel.name[:-len(lay.image_suffix)]
        label = label_dir / rel.parent / f"{stem}{lay.label_suffix}"
        items.append((img, label))
        if not label.is_file():
            missing.append((img, label, label_dir / rel.parent / f"{stem}{lay.raw_suffix}"))
    if missing:
        img, label, raw = missing[0]
        hint = ""
        if lay.raw_suffix and raw.is_file():
            hint = (f"The raw label {raw} exists but is not converted: run `python data.py convert {name} "
                    f"{root}`.\n")
        elif not label_dir.is_dir():
            hint = f"The label folder {label_dir} does not exist.\n"
        raise FileNotFoundError(f"{len(missing)} of {len(images)} {name} images have no label; first missing label: "
                                f"{label} (for image {img}).\n{hint}{layout_help(name, root, split)}")
    return items


# ---- reading ----

class DataError(RuntimeError):
    """An input file that cannot be used as it is (unreadable or truncated, an unsupported image mode, transparent
    pixels, label values outside the train ids, an image/label size mismatch). The message names the file and the fix.
    Raised from a DataLoader worker it comes back wrapped in the worker's traceback text: `error_message` unwraps it."""


def error_message(err) -> str:
    """The message of a DataError, also when a DataLoader worker re-raised it with its traceback in the text."""
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    text = str(err)
    return text.rsplit(marker, 1)[-1].strip() if marker in text else text


# What the readers do with each PIL mode (read_image's docstring lists the same). 16-bit PNGs open as "I;16*" (grey)
# or, for RGB(A), as 8-bit "RGB(A)" holding the high byte of each 16-bit value (PIL's own conversion).
GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
MODE_NAMES = {"RGB": "8-bit RGB", "L": "8-bit greyscale", "1": "1-bit black and white", "P": "palette",
              "CMYK": "CMYK", "YCbCr": "YCbCr", **{m: "16-bit greyscale" for m in GREY16_MODES},
              **{m: "with an alpha channel" for m in ALPHA_MODES}}


def describe_mode(mode: str) -> str:
    """How read_image reads an image of PIL mode `mode`, for notes: "16-bit greyscale (I;16), scaled to 8 bits"."""
    how = {"RGB": "as is", "L": "grey copied to R, G, B", "1": "0/255 copied to R, G, B", "P": "through its palette",
           "CMYK": "PIL's CMYK->RGB", "YCbCr": "PIL's YCbCr->RGB"}
    if mode in GREY16_MODES:
        return f"16-bit greyscale ({mode}), scaled to 8 bits (v * 255 / 65535) and copied to R, G, B"
    if mode in ALPHA_MODES:
        return f"{mode} with an opaque alpha channel, alpha dropped"
    return f"{MODE_NAMES.get(mode, mode)} ({mode}), {how.get(mode, 'converted')}"


def _has_alpha(im) -> bool:
    return im.mode in ALPHA_MODES or "transparency" in im.info  # tRNS: palette / colour-key transparency


def _image_to_rgb(im, path) -> np.ndarray:
    """An opened PIL image -> uint8 (H, W, 3) RGB, or DataError naming the mode (see read_image)."""
    mode = im.mode
    if mode in GREY16_MODES:  # PIL's convert("RGB") clips these at 255: a 16-bit PNG would read as all white
        grey = np.asarray(im).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise DataError(f"image {path} has PIL mode {mode} with values {grey.min()}..{grey.max()}, outside 16 "
                            f"bits: not an image format we read. Save it as an 8-bit RGB PNG or JPEG.")
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return np.repeat(grey[..., None], 3, axis=-1)
    if _has_alpha(im):
        rgba = np.asarray(im.convert("RGBA"))
        see_through = rgba[..., 3] < 255
        if see_through.any():
            raise DataError(f"image {path} has transparent pixels (PIL mode {mode}, {see_through.mean():.1%} of the "
                            f"pixels have alpha < 255): their colour is undefined, so it is not guessed. Flatten it "
                            f"onto the background you mean (e.g. Image.alpha_composite(Image.new('RGBA', im.size, "
                            f"'black'), im).convert('RGB')) and save it as RGB.")
        return np.array(rgba[..., :3])
    if mode in ("RGB", "L", "1", "P", "CMYK", "YCbCr"):
        return np.array(im.convert("RGB") if mode != "RGB" else im)
    raise DataError(f"image {path} has PIL mode {mode} ({MODE_NAMES.get(mode, 'not an RGB or greyscale image')}); "
                    f"expected 8- or 16-bit RGB, greyscale or palette. Save it as an 8-bit RGB PNG or JPEG.")


def read_image(path) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB. Modes: RGB as is; 16-bit RGB(A) PNGs through PIL, which keeps the
    high byte; greyscale (L, 1) and 16-bit greyscale (I;16, scaled by 255 / 65535) copied to R, G, B; palette (P),
    CMYK and YCbCr converted by PIL; an alpha channel (RGBA, LA, PA, tRNS) dropped when every pixel is opaque.
    Rejected with a DataError naming the file and its mode: transparent pixels, 32-bit and float images, anything
    else. A corrupt or truncated file also raises DataError."""
    try:
        with Image.open(path) as im:
            return _image_to_rgb(im, path)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified/truncated (OSError), broken PNG chunks (Syntax)
        raise DataError(f"could not read image {path}: {e}. The file is corrupt or truncated; "
                        f"re-extract it from the dataset archive (or regenerate it).") from e


def check_image(path, decode: bool = False) -> tuple:
    """Cheap check of an image file without training-time decoding: header, mode (as read_image), PNG chunk CRCs
    (catches truncation). `decode` reads it fully (read_image). Returns (H, W, mode); raises DataError."""
    if decode:
        with Image.open(path) as im:
            mode = im.mode
        return (*read_image(path).shape[:2], mode)
    try:
        with Image.open(path) as im:
            size, mode = (im.height, im.width), im.mode
            if _has_alpha(im) or mode not in MODE_NAMES:
                _image_to_rgb(im, path)  # decodes: opacity can only be seen in the pixels
            else:
                im.verify()  # PNG: reads every chunk and checks its CRC, without inflating the pixels
        return (*size, mode)
    except (FileNotFoundError, DataError):
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"could not read image {path}: {e}. The file is corrupt or truncated; "
                        f"re-extract it from the dataset archive (or regenerate it).") from e


def read_label(path) -> np.ndarray:
    """Read a train-id label PNG as uint8 (H, W) with values in {0..18, 255}; errors (DataError) name the file.
    Modes L and P (the palette indices are the ids) are read as they are; 16-bit (I;16) labels are accepted when
    every value is a train id; colour, alpha and other modes are rejected."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            label = np.array(im) if mode in ("L", "P", *GREY16_MODES) else None
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"could not read label {path}: {e}. The file is corrupt or truncated; "
                        f"re-extract or re-convert it.") from e
    if label is None:
        raise DataError(f"label {path} has PIL mode {mode}; expected a single-channel train-id PNG (mode L or P, "
                        f"or 16-bit holding train ids). A colour label? Use the *_labelTrainIds.png files.")
    if label.dtype != np.uint8:  # 16-bit: its values must already be train ids
        wide = label.astype(np.int64)
        bad = (wide < 0) | (wide > 255)
        if bad.any():
            raise DataError(f"label {path} (PIL mode {mode}) holds values {np.unique(wide[bad])[:10].tolist()} "
                            f"outside the train ids {{0..18, 255}}: is it a raw label-id file? Convert with "
                            f"`python data.py convert ...`.")
        label = wide.astype(np.uint8)
    bad = ~_VALID_LUT[label]
    if bad.any():
        raise DataError(f"label {path} holds values {np.unique(label[bad])[:10].tolist()} outside the train ids "
                        f"{{0..18, 255}}: is it a raw label-id file? Convert with `python data.py convert ...`.")
    return label


def nested(a, b) -> bool:
    """Whether folders a and b are the same, or one is inside the other (resolved: symlinks and `..` followed)."""
    a, b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


class SegDataset(torch.utils.data.Dataset):
    """Image/label pairs of one dataset. A sample is {"image": uint8 (3, H, W) RGB, "label": uint8 (H, W) in
    {0..18, 255} (all 255 without labels), "name": image stem, "path": image path}, passed through
    `transform(sample, rng)` when a transform is set.

    `truths` (generated images of ToyCity: list_truths) adds "truth": uint8 (H, W) train ids, the image's hidden true
    label, to the samples whose truth file exists, moved by the transform exactly as "label" is. It is for measuring
    pseudo labels only: training reads "label", which stays all 255 for generated images."""

    def __init__(self, name: str, items: list, transform=None, truths: list = None):
        self.name, self.items, self.transform = name, items, transform
        self.truths = truths if truths is not None else [None] * len(items)
        if len(self.truths) != len(items):
            raise ValueError(f"expected one truth path (or None) per item, got {len(self.truths)} for {len(items)}")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.get(i)

    def load_label(self, i) -> np.ndarray:
        """The label of item i at native size, uint8 (H, W) (all 255 without labels; reads the image for its size)."""
        image_path, label_path = self.items[i]
        if label_path is not None:
            return read_label(label_path)
        with Image.open(image_path) as im:
            return np.full((im.height, im.width), IGNORE_INDEX, np.uint8)

    def get(self, i: int, rng: np.random.Generator = None) -> dict:
        """Sample i; `rng` drives the transform (default: a generator seeded from i, so item i is reproducible)."""
        i = range(len(self))[i]  # negative indices, IndexError when out of range
        image_path, label_path = self.items[i]
        image = read_image(image_path)
        if label_path is None:
            label = np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        else:
            label = read_label(label_path)
            if label.shape != image.shape[:2]:
                raise DataError(f"size mismatch: image {image_path} is {image.shape[0]}x{image.shape[1]} but label "
                                   f"{label_path} is {label.shape[0]}x{label.shape[1]} (HxW); they must be equal.")
        # (3, H, W) as a view of the decoded (H, W, 3) array: the transforms take it back without a copy
        sample = {"image": torch.from_numpy(image).permute(2, 0, 1), "label": torch.from_numpy(label),  # uint8
                  "name": Path(image_path).stem, "path": str(image_path)}
        if self.truths[i] is not None:  # the hidden truth of a generated image: metrics only, never a target
            truth = read_label(self.truths[i])
            if truth.shape != image.shape[:2]:
                raise DataError(f"size mismatch: image {image_path} is {image.shape[0]}x{image.shape[1]} but its "
                                f"truth {self.truths[i]} is {truth.shape[0]}x{truth.shape[1]} (HxW); regenerate both "
                                f"with generate.py (same --out and settings, after deleting them).")
            sample["truth"] = torch.from_numpy(truth)
        if self.transform is not None:
            sample = self.transform(sample, np.random.default_rng(i) if rng is None else rng)
        return sample


def build_dataset(name: str, root, split: str = None, transform=None) -> SegDataset:
    """Build a dataset of the registry `DATASETS`.

    Args:
        name: gta, synthia, cityscapes, bdd, mapillary, acdc_fog, acdc_night, acdc_rain, acdc_snow or generated.
        root: the datasets root (holding gta5/, synthia/, cityscapes/, bdd10k/, mapillary_vistas/, acdc/); for
            `generated` the generation folder (holding images/*.png).
        split: "train" or "val" (default `default_split(name)`).
        transform: called as transform(sample, rng) with a numpy Generator, or None.
    For `generated`, samples also carry "truth" where <root>/truth/<stem>.png exists (SegDataset; metrics only).
    """
    items = list_files(name, root, split)
    return SegDataset(name, items, transform, list_truths(root, items) if name == "generated" else None)


# ---- transforms (§1.7 training, §8.1 test) ----

def _to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (H, W, 3) -> (3, H, W)


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)


def resize_image(image: np.ndarray, size) -> np.ndarray:
    """uint8 (H, W, 3) -> (h, w, 3) with PIL bilinear, as detectron2's ResizeTransform does for uint8 images (PIL
    bilinear is antialiased when shrinking; torch's interpolate(bilinear, antialias=True) agrees within 1)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_label(label: np.ndarray, size) -> np.ndarray:
    """uint8 (H, W) -> (h, w) with PIL nearest (detectron2's label resize): each output pixel copies the input pixel
    under its centre, index floor((i + 0.5) * H / h) (torch's "nearest-exact"), so no new values appear."""
    h, w = size
    if label.shape == (h, w):
        return label
    return np.array(Image.fromarray(label.astype(np.uint8)).resize((w, h), Image.NEAREST))


def resize_region(image: np.ndarray, size, box) -> np.ndarray:
    """The part `box` = (left, top, right, bottom) (source pixels, floats) of a uint8 image (H, W, 3) resized to
    `size` (h, w) with PIL bilinear (antialiased when shrinking): a crop of a rescaled image at the cost of the crop."""
    h, w = size
    if image.shape[:2] == (h, w) and box == (0, 0, w, h):
        return image
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR, box=box))


def nearest_positions(n_in: int, n_out: int, start: int, count: int) -> np.ndarray:
    """Source indices of output pixels start .. start+count-1 when PIL resizes n_in -> n_out pixels with NEAREST
    (resize_label): PIL runs a double sum from 0.5 * n_in / n_out in steps of n_in / n_out and truncates it;
    numpy's cumsum adds in the same order, so a crop of the resized label is exact."""
    step = n_in / n_out
    steps = np.full(start + count, step)
    steps[0] = step * 0.5
    return np.minimum(np.cumsum(steps)[start:].astype(np.int64), n_in - 1)


def _affine_u8(x, alpha=1.0, beta=0.0):
    # float32 affine, clip to [0, 255], truncate to uint8 (the detectron2 transform's rounding)
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def color_jitter_ssd(img: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                     contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """SSD photometric distortion (detectron2 PointRend ColorAugSSDTransform; §1.7). Defaults are its defaults.

    Args: img uint8 (H, W, 3) RGB; rng drives every draw. Returns a new uint8 (H, W, 3) RGB image.
    The official transform flips RGB to BGR and converts with COLOR_BGR2HSV; brightness and contrast act per channel,
    and RGB2HSV on RGB equals BGR2HSV on BGR, so working in RGB gives the same result.
    """
    import cv2

    def contrast(x):
        return _affine_u8(x, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else x

    def saturation(x):
        if not rng.integers(2):
            return x
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _affine_u8(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    def hue(x):
        if not rng.integers(2):
            return x
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # OpenCV uint8 hue is 0..179
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta + 1)) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    img = np.ascontiguousarray(img)
    if rng.integers(2):
        img = _affine_u8(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    steps = (contrast, saturation, hue) if rng.integers(2) else (saturation, hue, contrast)
    for step in steps:
        img = step(img)
    return img


@dataclass
class TrainTransform:
    """Source-image augmentation, in the official order: ResizeScale -> FixedSizeCrop -> SSD jitter -> flip (§1.7)."""
    crop_size: int = 768                 # official FixedSizeCrop((768, 768)), hard-coded (§9.9)
    scale_range: tuple = (0.5, 2.0)      # official ResizeScale min/max scale, hard-coded (§9.9)
    jitter: bool = True                  # official INPUT.COLOR_AUG_SSD True
    flip: bool = True                    # official RandomFlip (horizontal, p=0.5)
    pad_value: int = 0                   # official FixedSizeCrop pad_value (black, before normalization; §9.16)
    ignore_index: int = IGNORE_INDEX     # official seg_pad_value

    def __post_init__(self):
        if self.crop_size < 1 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"need crop_size >= 1 and 0 < min scale <= max scale, got {self.crop_size}, "
                             f"{self.scale_range}")

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        img = _to_hwc(sample["image"])
        # ResizeScale: factor min(s*Ht/H, s*Wt/W) with the target = the native size, i.e. a rescale by s
        s = rng.uniform(*self.scale_range)
        H, W = img.shape[:2]
        size = (max(1, round(H * s)), max(1, round(W * s)))
        # FixedSizeCrop: random crop of min(c, H) x min(c, W), padded bottom/right to c x c.
        # official code (detectron2 quirk): ONE u ~ U(0, 1) scales both the y and the x offset range.
        c, u = self.crop_size, rng.uniform(0.0, 1.0)
        y0, x0 = round(max(size[0] - c, 0) * u), round(max(size[1] - c, 0) * u)
        # only the crop of the rescaled image and label is computed (official: rescale everything, then crop). Label:
        # exactly PIL's nearest pixels of the whole rescale. Image: PIL's bilinear on the crop's source box, which
        # rounds its fixed-point filter weights slightly differently from the whole rescale: 1 grey level at ~0.3% of
        # a GTA crop's values (bench/bench_loading.py), up to 2 on noise (tests/test_data.py)
        h, w = min(c, size[0]), min(c, size[1])
        box = (x0 * W / size[1], y0 * H / size[0], (x0 + w) * W / size[1], (y0 + h) * H / size[0])
        img = resize_region(img, (h, w), box)
        rows, cols = nearest_positions(H, size[0], y0, h)[:, None], nearest_positions(W, size[1], x0, w)[None, :]
        out_img = np.full((c, c, 3), self.pad_value, np.uint8)
        out_img[:img.shape[0], :img.shape[1]] = img
        maps = {k: sample[k].numpy().astype(np.uint8, copy=False) for k in ("label", "truth") if k in sample}
        for k, m in maps.items():  # the label, and a generated image's hidden truth (metrics only): same geometry
            out = np.full((c, c), self.ignore_index, np.uint8)
            out[:h, :w] = m[rows, cols]
            maps[k] = out
        # official order: the jitter also shifts the padded pixels, and the flip moves the pad to the left
        if self.jitter:
            out_img = color_jitter_ssd(out_img, rng)
        if self.flip and rng.random() < 0.5:
            out_img, maps = out_img[:, ::-1], {k: m[:, ::-1] for k, m in maps.items()}
        return {**sample, "image": _to_chw(out_img),
                **{k: torch.from_numpy(np.ascontiguousarray(m)) for k, m in maps.items()}}


@dataclass
class GeneratedTransform:
    """Generated-image augmentation (§1.7): flip only, no rescale or crop; `image` = the clean flipped image (teacher
    and SAM input), `image_aug` = the same flip plus SSD jitter (student input). A sample's "truth" (the hidden true
    label, metrics only) is flipped with `image`, so it stays aligned with what the teacher and SAM see."""
    flip: bool = True    # official RandomFlip
    jitter: bool = True  # official ColorAugSSDTransform on the student copy only

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        img = _to_hwc(sample["image"])
        maps = {k: sample[k] for k in ("label", "truth") if k in sample}
        if self.flip and rng.random() < 0.5:
            img, maps = img[:, ::-1], {k: m.flip(-1) for k, m in maps.items()}
        aug = color_jitter_ssd(img, rng) if self.jitter else img
        return {**sample, "image": _to_chw(img), "image_aug": _to_chw(aug),
                **{k: m.contiguous() for k, m in maps.items()}}


def shortest_edge_size(height: int, width: int, short_side: int = 1024) -> tuple:
    """detectron2 ResizeShortestEdge(short_side, max_size=inf) output (h, w): e.g. 720x1280 -> 1024x1820."""
    scale = short_side / min(height, width)
    h, w = (short_side, scale * width) if height < width else (scale * height, short_side)
    return int(h + 0.5), int(w + 0.5)


@dataclass
class TestTransform:
    """Test-time resize (§8.1): short side -> `short_side`, image bilinear, label nearest, no crop."""
    __test__ = False  # not a pytest test class
    short_side: int = 1024  # official MapperTest ResizeShortestEdge(1024)

    def __call__(self, sample: dict, rng: np.random.Generator = None) -> dict:
        h, w = sample["label"].shape
        size = shortest_edge_size(h, w, self.short_side)
        if size == (h, w):
            return sample
        img = resize_image(_to_hwc(sample["image"]), size)
        maps = {k: torch.from_numpy(resize_label(sample[k].numpy().astype(np.uint8, copy=False), size))
                for k in ("label", "truth") if k in sample}                  # a hidden truth moves with the label
        return {**sample, "image": _to_chw(img), **maps}


# ---- conversion to train ids (§7.3) ----

def _read_raw_label(dataset: str, path: Path) -> np.ndarray:
    if dataset == "synthia":
        import cv2
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # 16-bit, BGR order: the last channel is R, the class id
        if raw is None or raw.ndim != 3:
            raise RuntimeError(f"could not read SYNTHIA label {path} as a multi-channel 16-bit PNG (got "
                               f"{None if raw is None else raw.shape}); the file is corrupt or not a SYNTHIA label.")
        return raw[..., -1]
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise RuntimeError(f"raw label {path} has PIL mode {im.mode}; expected a single-channel id PNG "
                                   f"(mode L or P).")
            return np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise RuntimeError(f"could not read raw label {path}: {e}. The file is corrupt or truncated.") from e


def _convert_one(job) -> str:
    dataset, src, dst = job
    files.save_png(lookup_table(dataset)[_read_raw_label(dataset, Path(src))], dst)
    return dst


def convert(dataset: str, root, nproc: int = None, progress: bool = True) -> int:
    """Write `<stem>_labelTrainIds.png` (8-bit, train ids) beside each raw label of gta, synthia, cityscapes or
    mapillary (all splits). Idempotent: `_labelTrainIds` files are never sources, and outputs newer than their source
    are skipped. Returns the number of files written."""
    _check_name(dataset)
    lay, root = DATASETS[dataset], Path(root).expanduser().absolute()
    if not lay.raw_suffix:
        raise ValueError(f"{dataset!r} ships train-id labels; no conversion is needed "
                         f"(convertible: {', '.join(n for n, l in DATASETS.items() if l.raw_suffix)}).")
    # official code: Cityscapes train ids came from the *_polygons.json through cityscapesScripts json2labelImg; we map
    # *_gtFine_labelIds.png (drawn from the same polygons) through the id table, which gives the same train ids.
    folder, jobs, sources = _find_folder(dataset, root), [], 0
    for _, part in lay.splits:
        for src in _glob(folder / lay.labels.format(split=part), lay.raw_suffix, recursive=bool(lay.sub)):
            if src.name.endswith("_labelTrainIds.png"):
                continue
            sources += 1
            dst = src.with_name(src.name[:-len(lay.raw_suffix)] + lay.label_suffix)
            if not (dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime):
                jobs.append((dataset, str(src), str(dst)))
    if not sources:
        raise FileNotFoundError(f"no raw {dataset} labels (*{lay.raw_suffix}) found under {folder}.\n"
                                f"{layout_help(dataset, root)}")
    nproc = min(nproc or os.cpu_count() or 1, max(len(jobs), 1))
    bar = tqdm(total=len(jobs), desc=f"convert {dataset}", disable=not progress)
    if nproc <= 1:
        for job in jobs:
            _convert_one(job)
            bar.update()
    else:
        with Pool(nproc) as pool:
            for _ in pool.imap_unordered(_convert_one, jobs, chunksize=8):
                bar.update()
    bar.close()
    return len(jobs)


# ---- command line ----

def _parser():
    """`data.py [--debug] {convert,info} ...`; booleans are `--flag/--no-flag` (--debug also after the command)."""
    fmt, flag = argparse.ArgumentDefaultsHelpFormatter, argparse.BooleanOptionalAction
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=fmt)
    parser.add_argument("--debug", action=flag, default=False, help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="write *_labelTrainIds.png beside the raw labels", formatter_class=fmt)
    conv.add_argument("dataset", choices=[n for n, l in DATASETS.items() if l.raw_suffix] + ["bdd"]
                      + [n for n in DATASETS if n.startswith("acdc")],
                      help="dataset whose raw label ids to convert (bdd and acdc_* ship train ids: nothing to do)")
    conv.add_argument("root", help="datasets root (holding gta5/, synthia/, cityscapes/, mapillary_vistas/)")
    conv.add_argument("--nproc", type=int, default=None, help="worker processes; None = all CPUs")
    conv.add_argument("--progress", action=flag, default=True, help="progress bar")
    conv.add_argument("--debug", action=flag, default=argparse.SUPPRESS, help="as above")
    info = sub.add_parser("info", help="check a dataset's layout and print its size", formatter_class=fmt)
    info.add_argument("dataset", choices=list(DATASETS), help="dataset name")
    info.add_argument("root", help="datasets root (for generated: generate.py's --out folder)")
    info.add_argument("--split", default=None, choices=("train", "val"), help="None = the official split "
                      "(train for gta, synthia, generated; val for the test sets)")
    info.add_argument("--debug", action=flag, default=argparse.SUPPRESS, help="as above")
    return parser


def _command(argv):
    args = _parser().parse_args(argv)
    problems = []
    if not Path(args.root).expanduser().is_dir():
        problems.append(f"ROOT {args.root} is not a folder: pass the datasets root, `python data.py {args.command} "
                        f"{args.dataset} /path/to/datasets`")
    if args.command == "convert" and args.nproc is not None and args.nproc < 1:
        problems.append(f"--nproc must be >= 1, got {args.nproc}")
    if problems:
        raise ValueError(f"{len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    if args.command == "convert":
        n = convert(args.dataset, args.root, args.nproc, progress=args.progress)
        print(f"{args.dataset}: wrote {n} *_labelTrainIds.png files under {Path(args.root).absolute()}")
        return n
    ds = build_dataset(args.dataset, args.root, args.split)
    sample = ds[0]
    print(f"{args.dataset} ({args.split or default_split(args.dataset)}): {len(ds)} images; first "
          f"{sample['name']} {tuple(sample['image'].shape)}")
    return len(ds)


def main(argv=None):
    """`convert <dataset> <root> [--nproc N]` returns the number of files written; `info` returns the dataset size.
    Bad inputs: one message on stderr and exit code 2 (the traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _command(argv)
    except (ValueError, OSError, RuntimeError) as err:
        if "--debug" in argv:
            raise
        print(f"data.py: error: {err}\n(add --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
