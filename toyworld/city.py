"""ToyCity: an offline procedural world of street scenes with dense labels, the data every test and the offline demo use.

CLOUDS (Sec. 4) trains on GTA5, SYNTHIA or Cityscapes and tests on Cityscapes, BDD100K, Mapillary Vistas and ACDC; its
self-training half (Sec. 3.3) pseudo-labels Stable Diffusion images made from text prompts. None of that is reachable
offline, so this module renders toy stand-ins. Each domain has its own STYLE (palette, texture, noise, blur, lighting,
weather) and CONTENT statistics (object frequencies, layout, camera), so a model trained on a toy source really loses
accuracy on the toy targets. Each domain is written in its real dataset's folder layout and RAW label format (reference
§7.2-7.3), so data.py's conversion and loading run exactly as on real data. `render(prompt, seed)` is the offline
stand-in for Stable Diffusion (generate.py --backend toy).

A scene is drawn once as a map of "segments" (one id per coloured part: a car body, a window, a lane dash) with PIL;
a table gives each segment its class, colour, texture and depth, and numpy turns the map into the label and the image.
This file holds the domains (label formats, content and style configs), the public rendering API, the dataset writer and
the CLI; the rest of the world sits beside it and imports no project file above it: toyparts.py (classes, colours, the
camera canvas, the things on a street), toyscene.py (the street layout), toypaint.py (segment map -> image).

Usage:
    python -m toyworld.city --out datasets_toy [--seed 0] [--num-images N] [--workers W]
"""
import argparse
import io
import os
import re
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from runtools import cli, files
from toyworld.paint import _domain_palette, _paint
from toyworld.parts import (BICYCLE, BUS, CAR, IGNORE, LIGHT, MOTORCYCLE, PERSON, SIGN, SKY, TRAIN, TRUCK,
                            VEGETATION, _BASE, _Canvas)
from toyworld.scene import _Street

# ---- domains and raw label formats ----

DOMAINS = ("gta", "synthia", "cityscapes", "bdd", "mapillary", "acdc_fog", "acdc_night", "acdc_rain", "acdc_snow")

# Raw id of each internal class (index) in each label format.
RAW_IDS = {
    # Cityscapes labelIds (GTA5 uses the same ids): ...; lane/crosswalk/manhole 7 road, curb 8, ego 1, static 4,
    # rail track 10, bird 5 dynamic
    "cityscapes": np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33,
                            7, 8, 7, 7, 1, 4, 10, 5, 25, 17], np.uint8),
    # SYNTHIA-RAND-CITYSCAPES: lane and crosswalk markings are its class 22 "lanemarking" (ignored by the converter)
    "synthia": np.array([3, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11,
                         22, 4, 3, 22, 0, 0, 0, 0, 17, 7], np.uint8),
    # Mapillary Vistas v1.2: 24 lane marking, 2 curb, 41 manhole, 23 crosswalk marking (ignored), 64 ego vehicle,
    # 51 trash can, 12 rail track, 0 bird, 21 motorcyclist, 47 utility pole
    "mapillary": np.array([13, 15, 17, 6, 3, 45, 48, 50, 30, 29, 27, 19, 20, 55, 61, 54, 58, 57, 52,
                           24, 2, 41, 23, 64, 51, 12, 0, 21, 47], np.uint8),
    # train ids as BDD100K and ACDC ship them
    "trainid": np.array([*range(19), 0, 1, 0, 0, 255, 255, 255, 255, 12, 5], np.uint8),
}


def _lut(pairs):
    lut = np.full(256, IGNORE, np.uint8)
    for raw, train in pairs:
        lut[raw] = train
    return lut


# Raw id -> train id, as the converters map them (reference §7.3); used to derive render_scene's label.
TO_TRAIN = {
    "cityscapes": _lut(zip(RAW_IDS["cityscapes"][:19], range(19))),
    "synthia": _lut(zip(RAW_IDS["synthia"][:19], range(19))),
    "mapillary": _lut([(13, 0), (24, 0), (41, 0), (2, 1), (15, 1), (17, 2), (6, 3), (3, 4), (45, 5), (47, 5), (48, 6),
                       (50, 7), (30, 8), (29, 9), (27, 10), (19, 11), (20, 12), (21, 12), (22, 12), (55, 13), (61, 14),
                       (54, 15), (58, 16), (57, 17), (52, 18)]),
    "trainid": _lut(zip(range(19), range(19))),
}
FORMAT = {"gta": "cityscapes", "synthia": "synthia", "cityscapes": "cityscapes", "bdd": "trainid",
          "mapillary": "mapillary", **{f"acdc_{c}": "trainid" for c in ("fog", "night", "rain", "snow")}}

# Cityscapes label colours of ids 0..33 (the palette GTA5's P-mode label PNGs carry).
_CS_COLORS = [(0, 0, 0)] * 5 + [(111, 74, 0), (81, 0, 81), (128, 64, 128), (244, 35, 232), (250, 170, 160),
              (230, 150, 140), (70, 70, 70), (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100),
              (150, 120, 90), (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
              (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
              (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
_GTA_PALETTE = [v for c in _CS_COLORS for v in c] + [0] * 3 * (256 - len(_CS_COLORS))
_MAPILLARY_PALETTE = np.random.default_rng(66).integers(0, 256, 768).tolist()  # 66 Mapillary colours (toy values)

# ---- domain configs ----


@dataclass
class Content:
    """What a domain's scenes contain: (lo, hi) are uniform ranges, counts are Poisson means, lengths in metres."""
    horizon: tuple = (0.42, 0.50)     # horizon row / image height
    cam_height: tuple = (1.3, 1.7)    # camera height above the road
    focal: tuple = (0.75, 0.95)       # focal length / image width
    lanes: tuple = (2, 4)             # number of lanes (inclusive)
    sidewalk: tuple = (2.5, 5.0)      # sidewalk width
    plaza: float = 0.0                # P(wide pedestrian plaza instead of sidewalks)
    crossing: float = 0.5             # P(a cross street)
    rail: float = 0.15                # P(a train: level crossing or tram)
    park: float = 0.2                 # P(a roadside block is a park instead of a building)
    wall: float = 0.15                # P(a wall along a block)
    fence: float = 0.2                # P(a fence along a block)
    storeys: tuple = (2, 7)
    trees: float = 3.0                # street trees per side
    poles: float = 2.5                # poles per side
    cars: float = 5.0
    trucks: float = 0.6
    buses: float = 0.3
    persons: float = 4.0
    riders: float = 1.0
    bikes: float = 0.6                # parked bicycles / motorcycles
    statics: float = 1.0              # bins, benches, bollards (void)
    birds: float = 0.0                # P(birds in the sky, void)
    ego: float = 0.0                  # P(ego-vehicle hood at the bottom)
    taxi: float = 0.03                # P(a car is a yellow taxi)


@dataclass
class Style:
    """How a domain looks: palette, texture, lighting, weather mixture, camera artefacts."""
    palette_key: str = "canonical"    # domains sharing a key share the class colour perturbation
    palette_shift: float = 12.0       # std of the per-domain class colour perturbation (0..255)
    jitter: float = 8.0               # std of the per-image class colour jitter
    saturation: float = 1.0
    contrast: float = 1.0
    gamma: float = 1.0
    tint: tuple = (1.0, 1.0, 1.0)     # per-channel gain
    texture: float = 1.0              # texture amplitude
    noise: float = 2.0                # sensor noise std (0..255)
    blur: float = 0.0                 # Gaussian blur radius in pixels
    shadow: float = 0.35              # cast-shadow darkening on sunny days
    overcast: float = 0.3             # P(grey sky) on clear days
    vignette: float = 0.0
    variety: float = 0.2              # per-image randomness of the global look
    weather: tuple = (("clear", 1.0),)  # (weather, probability): clear, dusk, night, fog, rain, snow
    foliage: tuple = (1.0, 1.0, 1.0)  # vegetation colour gain (autumn)


# Real image sizes / 4 (reference §7.2), except SYNTHIA (760x1280 -> 190x320) and Mapillary's mixed sizes.
SIZES = {"gta": (263, 478), "synthia": (190, 320), "cityscapes": (256, 512), "bdd": (180, 320),
         **{f"acdc_{c}": (270, 480) for c in ("fog", "night", "rain", "snow")}, "sd": (192, 192)}
MAPILLARY_SIZES = ((612, 816), (816, 612), (480, 640), (640, 480), (300, 400), (768, 1024), (1024, 768), (225, 400))
_ACDC_CONTENT = Content(horizon=(0.40, 0.48), focal=(0.7, 0.85), lanes=(1, 3), park=0.45, trees=4.0, cars=3.0,
                        persons=2.0, riders=0.6, trucks=0.4, rail=0.1, storeys=(1, 5), poles=3.0)
CONTENT = {
    "gta": Content(horizon=(0.38, 0.50), cam_height=(1.3, 2.0), lanes=(2, 5), park=0.35, trees=5.0, cars=7.0,
                   trucks=1.0, buses=0.4, persons=2.5, riders=0.8, rail=0.25, wall=0.25, fence=0.35, storeys=(1, 12),
                   bikes=0.5),
    "synthia": Content(horizon=(0.05, 0.33), cam_height=(3.0, 9.0), focal=(0.6, 0.8), lanes=(1, 3), sidewalk=(3, 7),
                       plaza=0.6, persons=22.0, riders=2.5, bikes=1.2, cars=3.0, trucks=0.6, buses=0.4, rail=0.3,
                       trees=3.0, park=0.15, wall=0.2, fence=0.2),
    "cityscapes": Content(horizon=(0.43, 0.47), cam_height=(1.2, 1.3), focal=(0.85, 0.95), lanes=(2, 3), cars=6.0,
                          persons=5.0, riders=1.5, bikes=1.2, trucks=0.3, buses=0.2, rail=0.1, ego=1.0, storeys=(3, 6)),
    "bdd": Content(horizon=(0.40, 0.55), cam_height=(1.2, 1.6), focal=(0.55, 0.75), lanes=(2, 6), cars=8.0,
                   trucks=1.2, persons=2.0, riders=0.5, ego=0.6, rail=0.05, trees=2.0, park=0.3, storeys=(1, 10)),
    "mapillary": Content(horizon=(0.30, 0.60), cam_height=(1.2, 3.0), focal=(0.5, 1.1), lanes=(1, 4), plaza=0.15,
                         persons=5.0, riders=1.5, bikes=1.0, cars=5.0, trucks=0.7, buses=0.4, rail=0.12, ego=0.2,
                         birds=0.3, park=0.3, storeys=(1, 15)),
    **{f"acdc_{c}": _ACDC_CONTENT for c in ("fog", "night", "rain", "snow")},
    "sd": Content(horizon=(0.40, 0.55), focal=(0.6, 0.9), cars=4.0, persons=3.0),
}
_ACDC_STYLE = Style(palette_key="cityscapes", saturation=0.95, noise=3.0, blur=0.5, texture=0.8, overcast=0.6)
STYLE = {
    "gta": Style(palette_key="gta", palette_shift=14, saturation=1.25, contrast=1.15, gamma=0.95,
                 tint=(1.05, 1.0, 0.92), noise=1.0, shadow=0.45, overcast=0.15,
                 weather=(("clear", 0.8), ("dusk", 0.1), ("rain", 0.05), ("night", 0.05))),
    "synthia": Style(palette_key="synthia", palette_shift=18, jitter=12, saturation=0.8, contrast=0.9, gamma=1.05,
                     tint=(0.95, 1.0, 1.06), texture=0.3, noise=3.0, shadow=0.15,
                     weather=(("clear", 0.75), ("dusk", 0.1), ("night", 0.05), ("rain", 0.05), ("fog", 0.05))),
    "cityscapes": Style(palette_key="cityscapes", saturation=0.75, contrast=0.95, tint=(0.96, 1.02, 0.98),
                        texture=0.8, noise=2.5, blur=0.6, shadow=0.25, overcast=0.6),
    "bdd": Style(palette_key="bdd", saturation=0.9, contrast=1.05, tint=(1.0, 0.98, 1.03), noise=4.0, blur=0.8,
                 vignette=0.25, weather=(("clear", 0.55), ("night", 0.25), ("dusk", 0.1), ("rain", 0.1))),
    "mapillary": Style(palette_key="mapillary", palette_shift=16, jitter=14, noise=3.0, blur=0.5, variety=1.0,
                       weather=(("clear", 0.6), ("dusk", 0.1), ("rain", 0.1), ("night", 0.1), ("fog", 0.05),
                                ("snow", 0.05))),
    **{f"acdc_{c}": replace(_ACDC_STYLE, weather=((c, 1.0),)) for c in ("fog", "night", "rain", "snow")},
    "sd": Style(palette_key="sd", saturation=1.15, contrast=1.1, texture=0.8, noise=1.0, blur=0.7, vignette=0.2,
                variety=0.6, shadow=0.4),
}
# Default images per (domain, split) that build() writes; about 30-40 s on 2 cores.
SPLITS = {"gta": (("train", 200),), "synthia": (("train", 200),), "cityscapes": (("train", 100), ("val", 50)),
          "bdd": (("val", 50),), "mapillary": (("val", 50),),
          **{f"acdc_{c}": (("val", 25),) for c in ("fog", "night", "rain", "snow")}}

# ---- public rendering API ----

def _render(rng, content, style, size, mins=None):
    """One scene -> (image uint8 (H, W, 3), internal class map uint8 (H, W), instance ids uint16 (H, W))."""
    H, W = size
    if H < 16 or W < 16:
        raise ValueError(f"image size must be at least 16x16, got {size}; pass size=(height, width).")
    names, probs = zip(*style.weather)
    weather = str(rng.choice(names, p=np.asarray(probs) / sum(probs)))
    sunny = weather == "clear" and rng.random() >= style.overcast
    pal = _domain_palette(style.palette_key, style.palette_shift) + rng.normal(0, style.jitter, _BASE.shape)
    if style.variety >= 1.0:  # Mapillary: every image from another camera / city
        pal += rng.normal(0, 15, _BASE.shape)
    pal[VEGETATION] *= np.asarray(style.foliage, np.float32)
    pal = np.clip(pal, 0, 255).astype(np.float32)
    hor = H * rng.uniform(*content.horizon)
    cv = _Canvas(H, W, hor, W / 2 + rng.normal(0, 0.04) * W, W * rng.uniform(*content.focal),
                 rng.uniform(*content.cam_height))
    cv.seg(SKY, pal[SKY], 1e4, fine=0.0, blotch=0.0)  # segment 0 = sky, the background
    _Street(cv, rng, content, pal, mins or {}, sunny).draw()
    image = _paint(cv, rng, style, weather, sunny)
    seg = np.asarray(cv.im, dtype=np.int32)
    table = np.asarray(cv.table, np.float32)
    return image, table[:, 0].astype(np.uint8)[seg], table[:, 12].astype(np.uint16)[seg]


def _scene(domain, seed, size=None):
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    rng = np.random.default_rng(seed)
    pick, short = rng.integers(len(MAPILLARY_SIZES)), rng.random() < 0.2  # drawn always: same scene at any size
    if size is None:
        size = MAPILLARY_SIZES[pick] if domain == "mapillary" else \
            (SIZES[domain][0] - (domain == "gta" and short), SIZES[domain][1])  # GTA: 1 in 5 is 1046 rows
    return _render(rng, CONTENT[domain], STYLE[domain], tuple(size))


def render_scene(domain: str, seed: int, size=None):
    """A labelled street scene of one domain.

    Args:
        domain: one of DOMAINS. seed: int (the same seed gives the same scene). size: (H, W) or None for the
            domain's default (GTA 263x478 or 262x478, SYNTHIA 190x320, Cityscapes 256x512, BDD 180x320, ACDC 270x480,
            Mapillary drawn from MAPILLARY_SIZES by the seed).
    Returns:
        image uint8 (H, W, 3) RGB; label uint8 (H, W) train ids in {0..18, 255}, exactly what data.py's converter
        makes of the raw label build() writes (e.g. SYNTHIA lane markings and Mapillary crosswalks are 255).
    """
    image, internal, _ = _scene(domain, seed, size)
    fmt = FORMAT[domain]
    return image, TO_TRAIN[fmt][RAW_IDS[fmt][internal]]


# Prompt words -> (content changes, style changes, guaranteed classes). Later rules override earlier ones.
_PROMPT_RULES = (
    (("sunny", "daylight", "heat", "summer", "clear", "bright", "noon"), {}, {"weather": (("clear", 1.0),),
                                                                          "overcast": 0.0}, {}),
    (("autumn", "fall"), {}, {"foliage": (1.6, 0.8, 0.45)}, {}),
    (("spring",), {"trees": 5.0}, {"foliage": (0.9, 1.2, 0.9)}, {}),
    (("rain", "rainy", "puddle", "storm", "drizzle", "wet", "umbrella"), {}, {"weather": (("rain", 1.0),)}, {}),
    (("winter", "snow", "snowy", "blizzard"), {}, {"weather": (("snow", 1.0),)}, {}),
    (("fog", "foggy", "mist", "misty", "haze", "hazy", "smog"), {}, {"weather": (("fog", 1.0),)}, {}),
    (("dusk", "sunset", "sunrise", "dawn", "twilight", "early morning"), {}, {"weather": (("dusk", 1.0),)}, {}),
    (("night", "midnight", "moon", "evening", "dark"), {}, {"weather": (("night", 1.0),)}, {}),
    (("car", "cars", "taxi", "traffic", "busy road", "jam", "parking"), {"cars": 10.0}, {}, {CAR: 2}),
    (("taxi", "cab"), {"taxi": 0.6}, {}, {}),
    (("truck", "lorry", "delivery", "construction"), {"trucks": 2.0}, {}, {TRUCK: 1}),
    (("bus", "buses"), {"buses": 1.5}, {}, {BUS: 1}),
    (("train", "tram", "railway", "subway", "metro", "trolley"), {"rail": 1.0}, {}, {TRAIN: 1}),
    (("person", "man", "woman", "pedestrian", "child", "performer", "musician", "selfie", "tourist"),
     {"persons": 6.0}, {}, {PERSON: 2}),
    (("crowd", "crowded", "pedestrians", "people", "protest", "market", "festival", "parade", "busy street"),
     {"persons": 25.0}, {}, {PERSON: 12}),
    (("bike", "bicycle", "cyclist", "bike lane"), {"riders": 3.0, "bikes": 2.0}, {}, {BICYCLE: 2}),
    (("motorcycle", "motorbike", "scooter", "moped"), {"riders": 2.0}, {}, {MOTORCYCLE: 2}),
    (("traffic light", "intersection", "crossing", "crosswalk"), {"crossing": 1.0}, {}, {LIGHT: 2}),
    (("sign", "signs"), {}, {}, {SIGN: 2}),
    (("tree", "trees", "park", "garden", "green", "forest"), {"trees": 8.0, "park": 0.6}, {}, {VEGETATION: 2}),
    (("skyscraper", "skyline", "tower", "downtown", "building", "buildings"), {"storeys": (8, 30)}, {}, {}),
    (("construction", "roadwork", "road work"), {"fence": 0.8, "wall": 0.5, "statics": 4.0}, {}, {}),
    (("highway", "freeway", "motorway"), {"lanes": (4, 6), "persons": 0.0, "riders": 0.0, "cars": 12.0,
                                          "trucks": 3.0, "sidewalk": (0.5, 1.5), "park": 0.6, "storeys": (1, 4)}, {}, {}),
    (("countryside", "field", "rural", "village", "farm", "horse"), {"park": 0.9, "cars": 1.0, "persons": 1.0,
                                                                    "storeys": (1, 3)}, {}, {}),
    (("plaza", "square", "pedestrian zone"), {"plaza": 1.0}, {}, {}),
)


def _prompt_config(prompt):
    text, content, style, mins = prompt.lower(), {}, {}, {}
    for words, c, s, m in _PROMPT_RULES:
        if any(re.search(rf"\b{w}(s|es)?\b", text) for w in words):
            content.update(c)
            style.update(s)
            for k, v in m.items():
                mins[k] = max(mins.get(k, 0), v)
    return replace(CONTENT["sd"], **content), replace(STYLE["sd"], **style), mins


def render_with_label(prompt: str, seed: int, size=(192, 192)):
    """render() and its label. Returns image uint8 (H, W, 3) and train ids uint8 (H, W) in {0..18, 255}."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    content, style, mins = _prompt_config(prompt)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2 ** 63, zlib.crc32(prompt.encode())]))
    image, internal, _ = _render(rng, content, style, tuple(size), mins)
    return image, TO_TRAIN["trainid"][RAW_IDS["trainid"][internal]]


def render(prompt: str, seed: int, size=(192, 192)) -> np.ndarray:
    """An unlabelled scene whose content and style follow words in the prompt (night, dusk, snow, fog, rain, autumn,
    truck, bus, taxi, train, crowd, bicycle, motorcycle, traffic light, sign, park, skyscraper, construction, highway,
    countryside, plaza, ...): the offline stand-in for Stable Diffusion (768x768 real -> 192x192 toy).

    Args: prompt: str; seed: int; size: (H, W). Returns: uint8 (H, W, 3) RGB; the same arguments give the same image.
    """
    return render_with_label(prompt, seed, size)[0]


# ---- dataset writer ----

@dataclass
class BuildConfig:
    """`python -m toyworld.city` options; each field's `help` is its --flag's help text."""
    out: str = field(default="datasets_toy", metadata={
        "help": "datasets root to write (gta5/, synthia/, cityscapes/, bdd10k/, mapillary_vistas/, acdc/)"})
    seed: int = field(default=0, metadata={
        "help": "base seed; each image's seed derives from (seed, domain, split, index)"})
    num_images: int = field(default=None, metadata={  # None = the defaults in SPLITS
        "help": "images per split; None = the defaults (" + ", ".join(
            f"{d} {'/'.join(str(n) for _, n in s)}" for d, s in SPLITS.items()) + ")"})
    workers: int = field(default=None, metadata={"help": "processes; None = all CPUs"})  # None = os.cpu_count()
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})


def _image_seed(seed, domain, split, index):
    """Each image's seed depends only on (seed, domain, split, index), so files never depend on worker order."""
    state = np.random.SeedSequence([seed % 2 ** 63, zlib.crc32(f"{domain}/{split}".encode()), index]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def _paths(out, domain, split, index, image_seed):
    """(image path, {kind: label path}) in the real dataset's layout (reference §7.2)."""
    names = np.random.default_rng([image_seed % 2 ** 63, 1])
    if domain == "gta":
        return out / f"gta5/images/{index + 1:05d}.png", {"raw": out / f"gta5/labels/{index + 1:05d}.png"}
    if domain == "synthia":
        return out / f"synthia/RGB/{index + 1:07d}.png", {"raw": out / f"synthia/GT/LABELS/{index + 1:07d}.png"}
    if domain == "cityscapes":
        city = (("aachen", "bremen", "zurich") if split == "train" else ("frankfurt", "lindau", "munster"))[index % 3]
        stem = f"{city}/{city}_000000_{index:06d}"
        return (out / f"cityscapes/leftImg8bit/{split}/{stem}_leftImg8bit.png",
                {"raw": out / f"cityscapes/gtFine/{split}/{stem}_gtFine_labelIds.png"})
    if domain == "bdd":
        a, b = names.integers(0, 2 ** 32, 2)
        return (out / f"bdd10k/images/10k/{split}/{a:08x}-{b:08x}.jpg",
                {"train": out / f"bdd10k/labels/sem_seg/masks/{split}/{a:08x}-{b:08x}.png"})
    if domain == "mapillary":
        key = "".join(names.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"), 22))
        folder = "validation" if split == "val" else "training"
        return (out / f"mapillary_vistas/{folder}/images/{key}.jpg",
                {"raw": out / f"mapillary_vistas/{folder}/labels/{key}.png"})
    cond = domain[len("acdc_"):]
    seq = f"GOPR{ {'fog': 475, 'night': 355, 'rain': 400, 'snow': 122}[cond] + index % 3:04d}"
    stem = f"{seq}/{seq}_frame_{index:06d}"
    return (out / f"acdc/rgb_anon/{cond}/{split}/{stem}_rgb_anon.png",
            {"train": out / f"acdc/gt/{cond}/{split}/{stem}_gt_labelTrainIds.png",
             "raw": out / f"acdc/gt/{cond}/{split}/{stem}_gt_labelIds.png"})


def _encode(array, fmt="PNG", palette=None, quality=90):
    im = Image.fromarray(array)
    if palette is not None:
        im.putpalette(palette)  # L -> P mode, like GTA5's and Mapillary's label PNGs
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


def _write(path, data: bytes):
    files.atomic_write(path, lambda f: f.write(data))


def _write_item(job):
    """Render one image and write it with its raw label(s). Returns (domain, written)."""
    out, domain, split, index, seed = job
    image_seed = _image_seed(seed, domain, split, index)
    image_path, labels = _paths(Path(out), domain, split, index, image_seed)
    if image_path.is_file() and all(p.is_file() for p in labels.values()):
        return domain, False  # resume: the image is written last, so it existing means the item is complete
    image, internal, inst = _scene(domain, image_seed)
    raw = RAW_IDS[FORMAT[domain]][internal]
    if domain == "synthia":  # 16-bit, 3 channels; cv2 writes BGR, so R (the class) is the last array channel
        import cv2
        bgr = np.stack([np.zeros_like(inst), inst, raw.astype(np.uint16)], -1)
        _write(labels["raw"], cv2.imencode(".png", bgr)[1].tobytes())
    elif domain == "gta":
        _write(labels["raw"], _encode(raw, palette=_GTA_PALETTE))
    elif domain == "mapillary":
        _write(labels["raw"], _encode(raw, palette=_MAPILLARY_PALETTE))
    else:
        if "train" in labels:
            _write(labels["train"], _encode(TO_TRAIN["trainid"][RAW_IDS["trainid"][internal]]))
        if "raw" in labels:  # Cityscapes labelIds (ACDC ships them beside its train ids)
            _write(labels["raw"], _encode(RAW_IDS["cityscapes"][internal]))
    jpeg = image_path.suffix == ".jpg"
    _write(image_path, _encode(image, "JPEG" if jpeg else "PNG", quality=85 if domain == "bdd" else 90))
    return domain, True


def build(out, seed: int = 0, num_images: int = None, workers: int = None, progress: bool = True) -> dict:
    """Write every domain in its real layout and raw label format under `out`.

    Args:
        out: datasets root. seed: base seed (each image's seed derives from (seed, domain, split, index)).
        num_images: images per split (None = SPLITS defaults). workers: processes (None = os.cpu_count()).
        progress: tqdm bar.
    Returns:
        {domain: number of images now present}. The same call writes byte-identical files; existing ones are kept.
    """
    if num_images is not None and num_images < 0:
        raise ValueError(f"num_images must be >= 0 or None, got {num_images}")
    workers = workers or os.cpu_count() or 1
    jobs = [(str(out), d, split, i, seed) for d in DOMAINS for split, n in SPLITS[d]
            for i in range(n if num_images is None else num_images)]
    from tqdm import tqdm
    counts = dict.fromkeys(DOMAINS, 0)
    with tqdm(total=len(jobs), desc="toycity", unit="img", disable=not progress) as bar:
        if workers == 1 or len(jobs) <= 1:
            for domain, _ in map(_write_item, jobs):
                counts[domain] += 1
                bar.update()
        else:
            import multiprocessing
            with multiprocessing.Pool(min(workers, len(jobs))) as pool:  # terminates the workers on error
                for domain, _ in pool.imap_unordered(_write_item, jobs, chunksize=4):
                    counts[domain] += 1
                    bar.update()
    return counts


def _parser() -> argparse.ArgumentParser:
    """The CLI from BuildConfig's fields: --kebab-case flags, help from each field's metadata, bools as --x/--no-x."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_dataclass_flags(parser, BuildConfig)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return parser


def main(argv=None) -> dict:
    """`python -m toyworld.city --out DIR`: write every domain; returns {domain: images}. Bad inputs: one message on stderr
    and exit code 2 (the traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    try:
        args = vars(parser.parse_args(argv))
        del args["debug"]
        cfg = BuildConfig(**args)
        limits = (("num-images", cfg.num_images, 0), ("workers", cfg.workers, 1))
        problems = [f"--{flag} must be >= {low}, got {value}" for flag, value, low in limits
                    if value is not None and value < low]
        if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
            problems.append(f"--out {cfg.out} is a file; pass a folder")
        if problems:
            raise ValueError(f"{len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
        counts = build(cfg.out, cfg.seed, cfg.num_images, cfg.workers, cfg.progress)
    except (ValueError, OSError, RuntimeError) as err:
        if "--debug" in argv:
            raise
        print(f"toyworld.city: error: {err}\n(add --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    print(", ".join(f"{d}: {n}" for d, n in counts.items()))
    return counts


if __name__ == "__main__":
    main()
