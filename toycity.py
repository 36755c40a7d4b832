"""ToyCity: an offline procedural world of street scenes with dense labels, the data every test and the offline demo use.

CLOUDS (Sec. 4) trains on GTA5, SYNTHIA or Cityscapes and tests on Cityscapes, BDD100K, Mapillary Vistas and ACDC; its
self-training half (Sec. 3.1) pseudo-labels Stable Diffusion images made from text prompts. None of that is reachable
offline, so this module renders toy stand-ins. Each domain has its own STYLE (palette, texture, noise, blur, lighting,
weather) and CONTENT statistics (object frequencies, layout, camera), so a model trained on a toy source really loses
accuracy on the toy targets. Each domain is written in its real dataset's folder layout and RAW label format (reference
§7.2-7.3), so data.py's conversion and loading run exactly as on real data. `render(prompt, seed)` is the offline
stand-in for Stable Diffusion (generate.py --backend toy).

A scene is drawn once as a map of "segments" (one id per coloured part: a car body, a window, a lane dash) with PIL;
a table gives each segment its class, colour, texture and depth, and numpy turns the map into the label and the image.

Usage:
    python toycity.py --out datasets_toy [--seed 0] [--num-images N] [--workers W]
"""
import argparse
import io
import os
import re
import sys
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# ---- classes and raw label formats ----

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS,
 TRAIN, MOTORCYCLE, BICYCLE) = range(19)
# Internal extras: drawn like classes, written with the raw id each dataset gives them (some map to ignore).
LANE, CURB, MANHOLE, CROSSWALK, EGO, STATIC, RAIL, BIRD, MOTO_RIDER, UTILITY_POLE = range(19, 29)
IGNORE = 255
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

# Canonical colours of the internal classes; each domain perturbs them (_domain_palette), each image jitters them.
_BASE = np.array([
    (88, 88, 92), (158, 152, 146), (150, 128, 110), (165, 158, 140), (125, 112, 92), (105, 108, 112), (45, 48, 45),
    (40, 90, 180), (62, 112, 44), (128, 140, 76), (125, 170, 225), (80, 70, 90), (90, 60, 60), (150, 30, 30),
    (200, 200, 195), (215, 160, 40), (175, 178, 188), (60, 60, 70), (45, 45, 50),
    (235, 235, 230), (185, 180, 172), (60, 60, 62), (240, 240, 236), (25, 25, 30), (70, 90, 70), (110, 100, 90),
    (30, 30, 30), (70, 50, 50), (100, 90, 80)], np.float32)
_CAR_COLORS = np.array([(235, 235, 235), (175, 178, 182), (25, 25, 28), (95, 98, 102), (160, 25, 25), (30, 55, 140),
                        (20, 30, 60), (40, 90, 50), (200, 185, 150), (230, 190, 30)], np.float32)
_CLOTHES = np.array([(30, 30, 35), (50, 60, 90), (120, 30, 30), (200, 200, 200), (90, 80, 60), (30, 70, 50),
                     (150, 120, 90), (60, 60, 60), (190, 150, 40), (110, 60, 120)], np.float32)

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

# ---- scene geometry: segments drawn on an id map ----


class _Canvas:
    """A pinhole camera over a flat road (x right, Y up, z forward) and an int32 map of segment ids. Each drawn part
    is a segment; `table` holds its class, colour, texture amplitudes, depth, facade pattern, emission, instance."""

    def __init__(self, H, W, hor, cx, f, cam_h):
        self.H, self.W, self.hor, self.cx, self.f, self.cam_h = H, W, hor, cx, f, cam_h
        self.im = Image.new("I", (W, H), 0)
        self.draw = ImageDraw.Draw(self.im)
        self.shadow = Image.new("L", (W, H), 0)
        self.sdraw = ImageDraw.Draw(self.shadow)
        self.table, self.instances = [], 0
        self.z_near = 0.8 * cam_h * f / (H - hor)  # the bottom row sees the road at z_near / 0.8

    def seg(self, cls, rgb, z=-1.0, fine=0.04, blotch=0.05, face=0, param=0.0, emit=(0, 0, 0), inst=0):
        """Register a segment. z=-1: on the ground (depth from the row); face 1/2/3: side facade at X=param, frontal
        facade at z=param, fence at X=param (window / lattice patterns)."""
        self.table.append((cls, *np.clip(rgb, 0, 255), fine, blotch, z, face, param, *emit, inst))
        return len(self.table) - 1

    def thing(self):
        self.instances += 1
        return self.instances

    def proj(self, X, Y, z):
        s = self.f / max(z, 0.05)
        return (self.cx + X * s, self.hor + (self.cam_h - Y) * s)

    def poly(self, seg, pts, layer=None):
        (layer or self.draw).polygon([self.proj(*p) for p in pts], fill=seg)

    def ground(self, seg, X0, X1, z0, z1, layer=None):
        z0 = max(z0, self.z_near)
        if z1 > z0:
            self.poly(seg, [(X0, 0, z0), (X1, 0, z0), (X1, 0, z1), (X0, 0, z1)], layer)

    def side(self, seg, X, z0, z1, Y0, Y1):
        """A vertical plane along the road (facade, wall, fence) at lateral position X."""
        z0 = max(z0, self.z_near)
        if z1 > z0:
            self.poly(seg, [(X, Y0, z0), (X, Y0, z1), (X, Y1, z1), (X, Y1, z0)])

    def box(self, seg, X0, X1, Y0, Y1, z):
        (x0, y1), (x1, y0) = self.proj(X0, Y0, z), self.proj(X1, Y1, z)
        # at least one pixel wide and tall, so thin parts (poles, wheels) never vanish
        x0, y0 = int(np.floor(x0 + 0.5)), int(np.floor(y0 + 0.5))
        x1, y1 = max(x0, int(np.floor(x1 + 0.5)) - 1), max(y0, int(np.floor(y1 + 0.5)) - 1)
        if x1 >= -1 and x0 <= self.W and y1 >= -1 and y0 <= self.H:
            self.draw.rectangle([x0, y0, x1, y1], fill=seg)

    def fpoly(self, seg, pts, z):
        """A polygon in the frontal plane at depth z, pts = [(X, Y), ...]."""
        self.poly(seg, [(X, Y, z) for X, Y in pts])

    def oval(self, seg, X, Y, rx, ry, z, ring=0.0):
        (x0, y0), (x1, y1) = self.proj(X - rx, Y + ry, z), self.proj(X + rx, Y - ry, z)
        width = max(1, int(round(ring * self.f / z))) if ring else 0
        if x1 - x0 >= 1 and y1 - y0 >= 1:
            self.draw.ellipse([x0, y0, x1, y1], fill=None if ring else seg, outline=seg if ring else None,
                              width=width or 1)
        else:
            self.draw.point([((x0 + x1) / 2, (y0 + y1) / 2)], fill=seg)

    def line(self, seg, X0, Y0, X1, Y1, z, w):
        self.draw.line([self.proj(X0, Y0, z), self.proj(X1, Y1, z)], fill=seg, width=max(1, int(round(w * self.f / z))))


def _jit(rgb, rng, s=12.0):
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, s, 3), 0, 255)


def _vehicle_back(cv, pal, rng, X, z, kind, col, front=False):
    """A car, truck, bus or tram seen from behind (or from the front), with its rear face at depth z."""
    w, h = {CAR: (1.8, 1.5), TRUCK: (2.5, 3.6), BUS: (2.55, 3.2), TRAIN: (2.7, 3.7)}[kind]
    w, h, inst = w * rng.uniform(0.92, 1.08), h * rng.uniform(0.92, 1.08), cv.thing()
    dark, glass = cv.seg(kind, (28, 28, 30), z, inst=inst), cv.seg(kind, _jit((55, 65, 80), rng), z, fine=0.02, inst=inst)
    body = cv.seg(kind, col, z, fine=0.02, blotch=0.03, inst=inst)
    for sx in (-1, 1):
        cv.box(dark, X + sx * (w / 2 - 0.25) - 0.16, X + sx * (w / 2 - 0.25) + 0.16, 0, 0.45, z)
    cv.sdraw.polygon([cv.proj(X - w / 2 - 0.1, 0, z - 0.4), cv.proj(X + w / 2 + 0.1, 0, z - 0.4),
                      cv.proj(X + w / 2, 0, z), cv.proj(X - w / 2, 0, z)], fill=200)  # contact shadow
    if kind == CAR:
        cv.box(body, X - w / 2, X + w / 2, 0.25, 0.58 * h, z)
        cv.fpoly(cv.seg(kind, col * 0.92, z, inst=inst), [(X - w / 2 + 0.05, 0.58 * h), (X + w / 2 - 0.05, 0.58 * h),
                                                          (X + w / 2 - 0.22, h), (X - w / 2 + 0.22, h)], z)
        cv.fpoly(glass, [(X - w / 2 + 0.15, 0.62 * h), (X + w / 2 - 0.15, 0.62 * h),
                         (X + w / 2 - 0.28, 0.95 * h), (X - w / 2 + 0.28, 0.95 * h)], z)
    else:
        cv.box(body, X - w / 2, X + w / 2, 0.35, h, z)
        if kind == TRUCK and not front:
            cv.box(cv.seg(kind, col * 0.8, z, inst=inst), X - 0.03, X + 0.03, 0.5, h - 0.1, z)  # cargo door seam
        else:
            cv.box(glass, X - w / 2 + 0.15, X + w / 2 - 0.15, 0.55 * h if front else 0.7 * h, 0.92 * h, z)
        if kind in (BUS, TRAIN) and front:
            cv.box(cv.seg(kind, (230, 150, 30), z, emit=(255, 160, 40), inst=inst),
                   X - 0.6, X + 0.6, 0.93 * h, 0.98 * h, z)  # destination display
    lamp = ((235, 235, 215), (255, 250, 225)) if front else ((170, 25, 20), (255, 40, 30))
    lamp = cv.seg(kind, lamp[0], z, emit=lamp[1], inst=inst)
    for sx in (-1, 1):
        cv.box(lamp, X + sx * (w / 2 - 0.22) - 0.13, X + sx * (w / 2 - 0.22) + 0.13, 0.42 * min(h, 2), 0.5 * min(h, 2), z)
    cv.box(cv.seg(kind, (215, 215, 205), z, inst=inst), X - 0.25, X + 0.25, 0.3, 0.42, z)  # number plate


def _vehicle_side(cv, pal, rng, X, z, kind, col, d):
    """A car, truck, bus or train crossing the view (side view, facing direction d = +-1)."""
    inst = cv.thing()
    dark = cv.seg(kind, (25, 25, 28), z, inst=inst)
    body = cv.seg(kind, col, z, fine=0.02, blotch=0.03, inst=inst)
    glass = cv.seg(kind, _jit((60, 70, 85), rng), z, fine=0.02, inst=inst)
    if kind == CAR:
        L = 4.4 * rng.uniform(0.9, 1.1)
        cv.fpoly(body, [(X - L / 2, 0.3), (X + L / 2, 0.3), (X + L / 2, 0.95), (X - L / 2, 0.95)], z)
        cv.fpoly(body, [(X - d * (L / 2 - 0.3), 0.95), (X + d * (L / 2 - 1.0), 0.95), (X + d * 0.4, 1.45),
                        (X - d * 1.3, 1.45)], z)  # cabin, windscreen towards d
        cv.fpoly(glass, [(X - d * (L / 2 - 0.5), 1.0), (X + d * (L / 2 - 1.25), 1.0), (X + d * 0.3, 1.38),
                         (X - d * 1.2, 1.38)], z)
        wheels, r = (X - L / 2 + 0.85, X + L / 2 - 0.85), 0.33
    elif kind == TRAIN:
        n, L = rng.integers(2, 5), 18.0
        X0 = X - n * (L + 1) / 2
        for i in range(n):
            a = X0 + i * (L + 1)
            cv.box(body, a, a + L, 0.5, 3.8, z)
            cv.box(cv.seg(kind, col * 0.7, z, inst=inst), a, a + L, 0.5, 0.8, z)
            for k in range(int(L // 2.5)):
                cv.box(glass, a + 0.8 + k * 2.5, a + 2.2 + k * 2.5, 1.9, 2.9, z)
            if i < n - 1:
                cv.box(dark, a + L, a + L + 1, 1.0, 3.3, z)
        wheels, r = [X0 + i * (L + 1) + o for i in range(n) for o in (2.5, L - 2.5)], 0.45
    else:
        L, h = (8.0, 3.6) if kind == TRUCK else (12.0, 3.1)
        L *= rng.uniform(0.85, 1.15)
        cv.box(body, X - L / 2, X + L / 2, 0.35, h, z)
        if kind == BUS:
            for k in range(int((L - 1) // 2)):
                cv.box(glass, X - L / 2 + 0.6 + k * 2, X - L / 2 + 2.2 + k * 2, 1.4, 2.6, z)
        else:  # truck: a cab in front of the cargo box
            cab = X + d * (L / 2 - 1.1)
            cv.box(cv.seg(kind, _jit(col * 0.7 + 60, rng), z, inst=inst), cab - 1.1, cab + 1.1, 0.35, 3.0, z)
            cv.box(glass, cab + d * 0.3 - 0.5, cab + d * 0.3 + 0.5, 1.8, 2.7, z)
        wheels, r = (X - L / 2 + 1.6, X + L / 2 - 1.8), 0.5
    for wx in wheels:
        cv.oval(dark, wx, r, r, r, z)


def _person(cv, rng, X, z, cls=PERSON, h=None, sitting=None):
    """A pedestrian facing the camera or away; `sitting` = (hip X, hip Y, hand X, hand Y, foot X) for a rider."""
    h = h or float(np.clip(rng.normal(1.72, 0.09), 1.45, 1.95))
    inst = cv.thing()
    shirt, pants = _jit(_CLOTHES[rng.integers(10)], rng), _jit(_CLOTHES[rng.integers(10)], rng)
    skin = _jit((200, 160, 130) if rng.random() < 0.7 else (120, 85, 60), rng, 8)
    seg = {k: cv.seg(cls, c, z, inst=inst) for k, c in (("shirt", shirt), ("pants", pants), ("skin", skin),
                                                        ("hair", _jit((40, 30, 25), rng, 15)))}
    if sitting is None:
        stride = rng.uniform(0.0, 0.18)
        for sx in (-1, 1):
            cv.fpoly(seg["pants"], [(X + sx * 0.02, 0.5 * h), (X + sx * 0.17, 0.5 * h), (X + sx * (0.12 + stride), 0),
                                    (X + sx * (stride - 0.02), 0)], z)
            cv.fpoly(seg["shirt"], [(X + sx * 0.19, 0.81 * h), (X + sx * 0.26, 0.79 * h), (X + sx * 0.25, 0.5 * h),
                                    (X + sx * 0.19, 0.5 * h)], z)
        cv.fpoly(seg["shirt"], [(X - 0.21, 0.82 * h), (X + 0.21, 0.82 * h), (X + 0.17, 0.48 * h), (X - 0.17, 0.48 * h)], z)
        head_x, head_y = X, 0.925 * h
    else:  # rider: hip on the saddle, hands on the handlebar, feet on the pedals
        hx, hy, ax, ay, fx = sitting
        sh_x, sh_y = hx + 0.45 * (ax - hx), hy + 0.55
        cv.fpoly(seg["pants"], [(hx - 0.1, hy + 0.05), (hx + 0.12, hy + 0.05), (fx + 0.08, 0.3), (fx - 0.08, 0.3)], z)
        cv.fpoly(seg["shirt"], [(hx - 0.16, hy), (hx + 0.14, hy), (sh_x + 0.16, sh_y), (sh_x - 0.16, sh_y)], z)
        cv.line(seg["shirt"], sh_x, sh_y - 0.05, ax, ay, z, 0.09)
        head_x, head_y = sh_x + 0.04 * np.sign(ax - hx), sh_y + 0.17
    cv.oval(seg["skin"], head_x, head_y, 0.1, 0.12, z)
    cv.oval(seg["hair"], head_x, head_y + 0.06, 0.1, 0.065, z)


def _two_wheeler(cv, rng, X, z, kind, d, rider):
    """A bicycle or motorcycle in side view (direction d), optionally ridden."""
    inst, col = cv.thing(), _jit(_CAR_COLORS[rng.integers(10)] if kind == MOTORCYCLE else (40, 40, 45), rng, 20)
    frame, dark = cv.seg(kind, col, z, inst=inst), cv.seg(kind, (22, 22, 24), z, inst=inst)
    if kind == BICYCLE:
        r, a = 0.34, 0.52
        for wx in (X - a, X + a):
            cv.oval(dark, wx, r, r, r, z, ring=0.06)
        crank, seat, head = (X - d * 0.05, r), (X - d * 0.2, 0.92), (X + d * 0.32, 0.95)
        for p, q in ((X - d * a, r), crank), (crank, seat), (crank, head), (seat, head), ((X + d * a, r), head):
            cv.line(frame, *p, *q, z, 0.05)
        cv.line(dark, head[0], head[1], head[0] + d * 0.05, 1.08, z, 0.05)
        sitting = (seat[0], seat[1] + 0.02, head[0] + d * 0.05, 1.06, crank[0])
    else:
        r, a = 0.32, 0.72
        for wx in (X - a, X + a):
            cv.oval(dark, wx, r, r, r, z)
        cv.fpoly(frame, [(X - d * 0.65, 0.45), (X + d * 0.5, 0.45), (X + d * 0.62, 0.8), (X + d * 0.15, 0.95),
                         (X - d * 0.55, 0.92), (X - d * 0.8, 0.7)], z)
        cv.line(dark, X + d * 0.55, 0.8, X + d * 0.5, 1.12, z, 0.06)
        cv.oval(cv.seg(kind, (230, 230, 210), z, emit=(255, 250, 220), inst=inst), X + d * 0.66, 0.8, 0.07, 0.07, z)
        sitting = (X - d * 0.15, 0.95, X + d * 0.5, 1.1, X + d * 0.05)
    if rider:
        _person(cv, rng, X, z, cls=RIDER if kind == BICYCLE else MOTO_RIDER, sitting=sitting)


def _rider_back(cv, rng, X, z, kind):
    """A rider on a bicycle or motorcycle seen from behind."""
    inst, half = cv.thing(), 0.05 if kind == BICYCLE else 0.08
    dark = cv.seg(kind, (22, 22, 24), z, inst=inst)
    cv.box(dark, X - half, X + half, 0, 0.68, z)  # the rear wheel, edge-on
    if kind == MOTORCYCLE:
        cv.box(cv.seg(kind, _jit(_CAR_COLORS[rng.integers(10)], rng), z, inst=inst), X - 0.3, X + 0.3, 0.4, 0.95, z)
        cv.box(cv.seg(kind, (170, 25, 20), z, emit=(255, 40, 30), inst=inst), X - 0.08, X + 0.08, 0.75, 0.85, z)
    cv.line(dark, X - 0.32, 1.05, X + 0.32, 1.05, z, 0.04)
    _person(cv, rng, X, z - 0.3, cls=RIDER if kind == BICYCLE else MOTO_RIDER, sitting=(X, 0.9, X + 0.3, 1.05, X))


def _pole(cv, pal, rng, X, z, s, light, sign, lamp, h=None):
    """A pole on the sidewalk (road on side -s) carrying a street lamp, a traffic light and / or signs."""
    h = h or rng.uniform(3.5, 7.5)
    cls = UTILITY_POLE if (not light and not sign and rng.random() < 0.3) else POLE
    pole = cv.seg(cls, _jit(pal[cls], rng), z, fine=0.03)
    cv.box(pole, X - 0.09, X + 0.09, 0, h, z)
    if lamp:
        cv.line(pole, X, h, X - s * 1.4, h + 0.25, z, 0.08)
        cv.box(cv.seg(POLE, (230, 225, 200), z, emit=(255, 230, 170)), X - s * 1.4 - 0.25, X - s * 1.4 + 0.25,
               h + 0.1, h + 0.3, z)
    if light:
        on_arm = rng.random() < 0.5
        lx, ly = (X - s * rng.uniform(2.0, 4.5), h - 1.0) if on_arm else (X - s * 0.3, min(h, 3.6) - 1.0)
        if on_arm:
            cv.line(pole, X, h - 0.1, lx, h - 0.1, z, 0.09)
        cv.box(cv.seg(LIGHT, _jit(pal[LIGHT], rng, 6), z), lx - 0.17, lx + 0.17, ly, ly + 0.9, z)
        state = rng.integers(3)
        for k, (c, e) in enumerate((((200, 30, 20), (255, 40, 20)), ((220, 160, 20), (255, 180, 30)),
                                    ((30, 190, 80), (60, 255, 120)))):
            lit = k == 2 - state
            cv.oval(cv.seg(LIGHT, c if lit else np.array(c) * 0.3, z, emit=e if lit else (0, 0, 0)),
                    lx, ly + 0.75 - 0.3 * k, 0.09, 0.09, z)
    if sign:
        sy, kind = rng.uniform(2.0, 2.9), rng.integers(4)
        sx = X - s * 0.25
        colours = [((40, 80, 175), (235, 235, 235)), ((200, 30, 30), (235, 235, 235)), ((235, 235, 235), (200, 30, 30)),
                   ((230, 190, 30), (30, 30, 30))][kind]
        outer, inner = (cv.seg(SIGN, _jit(c, rng, 8), z, fine=0.02) for c in colours)
        if kind == 0:
            cv.box(outer, sx - 0.35, sx + 0.35, sy, sy + 0.7, z)
            cv.box(inner, sx - 0.12, sx + 0.12, sy + 0.15, sy + 0.55, z)
        elif kind == 1:
            cv.oval(outer, sx, sy + 0.33, 0.33, 0.33, z)
            cv.box(inner, sx - 0.22, sx + 0.22, sy + 0.28, sy + 0.38, z)
        else:
            pts = [(sx - 0.4, sy), (sx + 0.4, sy), (sx, sy + 0.7)] if kind == 2 else \
                [(sx, sy), (sx + 0.38, sy + 0.38), (sx, sy + 0.76), (sx - 0.38, sy + 0.38)]
            cv.fpoly(outer, pts, z)
            cv.oval(inner, sx, sy + 0.3, 0.1, 0.12, z)


def _tree(cv, pal, rng, X, z, scale=1.0):
    trunk = cv.seg(VEGETATION, _jit((85, 65, 45), rng), z, fine=0.08)
    cv.box(trunk, X - 0.15 * scale, X + 0.15 * scale, 0, 3.0 * scale, z)
    for _ in range(rng.integers(3, 6)):
        c = pal[VEGETATION] * rng.uniform(0.7, 1.2)
        r = rng.uniform(1.2, 2.2) * scale
        cv.oval(cv.seg(VEGETATION, c, z, fine=0.18, blotch=0.15), X + rng.normal(0, 0.8) * scale,
                (4.3 + rng.normal(0, 0.6)) * scale, r, r * rng.uniform(0.8, 1.1), z)


def _static(cv, rng, X, z):
    """Street furniture (void in every dataset): a bin, a bench or a bollard."""
    seg, kind = cv.seg(STATIC, _jit(_BASE[STATIC], rng, 25), z), rng.integers(3)
    if kind == 0:
        cv.box(seg, X - 0.3, X + 0.3, 0, 1.0, z)
    elif kind == 1:
        cv.box(seg, X - 0.8, X + 0.8, 0.4, 0.5, z)
        cv.box(seg, X - 0.8, X + 0.8, 0.6, 0.9, z)
        cv.box(seg, X - 0.7, X - 0.6, 0, 0.4, z)
        cv.box(seg, X + 0.6, X + 0.7, 0, 0.4, z)
    else:
        cv.box(seg, X - 0.08, X + 0.08, 0, 0.9, z)


class _Street:
    """One street scene. The plan (lanes, sidewalks, a cross street or a level crossing) is drawn first as ground
    layers; upright things are queued as sprites and drawn back to front (painter's algorithm). Facades are split into
    short chunks keyed by their far end, so nearer things always cover them. Lateral sides: s = -1 left, +1 right."""

    def __init__(self, cv, rng, content, pal, mins, sunny):
        self.cv, self.rng, self.c, self.pal, self.mins, self.sunny, self.sprites = cv, rng, content, pal, mins, sunny, []
        c = content
        self.z_vis = cv.z_near / 0.8  # depth of the bottom row
        self.lanes, self.lane_w = int(rng.integers(c.lanes[0], c.lanes[1] + 1)), rng.uniform(2.9, 3.6)
        self.two_way = self.lanes >= 2 and rng.random() < 0.7  # right-hand traffic: oncoming lanes on the left
        cam_lane = rng.integers(self.lanes // 2 if self.two_way else 0, self.lanes)
        self.XL = -(cam_lane + 0.5) * self.lane_w + rng.normal(0, 0.3)
        self.XR = self.XL + self.lanes * self.lane_w
        self.park = {s: 2.2 * (rng.random() < 0.4) for s in (-1, 1)}  # parking strips
        self.edge = {-1: self.XL - self.park[-1], 1: self.XR + self.park[1]}  # curbs
        self.plaza = rng.random() < c.plaza
        self.sw = {s: rng.uniform(*c.sidewalk) * (rng.uniform(2.5, 5.0) if self.plaza else 1.0) for s in (-1, 1)}
        self.outer = {s: self.edge[s] + s * self.sw[s] for s in (-1, 1)}  # sidewalk / block boundary
        self.z_end = rng.uniform(90, 220)
        self.rail = rng.random() < c.rail or mins.get(TRAIN, 0) > 0
        self.cross = "rail" if self.rail and rng.random() < 0.5 else \
            "road" if rng.random() < c.crossing or mins.get(LIGHT) else None
        self.zc = self.depth(max(14.0, 2.5 * self.z_vis), 45.0)
        self.wc = rng.uniform(9, 15) if self.cross == "road" else 5.0
        zc, wc = self.zc, self.wc  # band: depths of the cross street (with its sidewalks) or the rail bed
        self.band = (zc - wc / 2 - 3, zc + wc / 2 + 3) if self.cross == "road" else \
            (zc - wc / 2, zc + wc / 2) if self.cross else None

    def add(self, key, fn, *args, **kw):
        self.sprites.append((key, len(self.sprites), fn, args, kw))

    def depth(self, lo, hi):
        """A depth in [lo, hi], kept valid when a high camera pushes the bottom row far away."""
        return self.rng.uniform(lo, max(hi, lo + 10))

    def g(self, cls, fine=0.05, blotch=0.08):
        return self.cv.seg(cls, _jit(self.pal[cls], self.rng, 6), fine=fine, blotch=blotch)

    def in_band(self, z):
        return self.band is not None and self.band[0] < z < self.band[1]

    def on_walk(self, near=False):
        """A random spot on a sidewalk (or plaza)."""
        s = self.rng.choice([-1, 1])
        z = self.depth(max(self.z_vis * 1.1, 4), 15) if near else self.depth(self.z_vis * 1.1, 55)
        return self.edge[s] + s * self.rng.uniform(0.5, max(0.6, self.sw[s] - 0.4)), z

    def ground(self):
        cv, rng, zn, edge, band, zc, wc = self.cv, self.rng, self.cv.z_near, self.edge, self.band, self.zc, self.wc
        terrain, walk, curb, road = self.g(TERRAIN, 0.15, 0.2), self.g(SIDEWALK, 0.06, 0.06), self.g(CURB, 0.03), \
            self.g(ROAD, 0.08, 0.08)
        self.walk = walk
        cv.ground(terrain, -600, 600, zn, 2000)
        for s in (-1, 1):
            cv.ground(walk, edge[s], self.outer[s], zn, self.z_end)
            cv.ground(curb, edge[s], edge[s] + s * 0.25, zn, self.z_end)
            if not self.plaza and rng.random() < 0.35:  # tree lawn between curb and sidewalk
                cv.ground(terrain, edge[s] + s * 0.4, edge[s] + s * min(self.sw[s] - 1.0, rng.uniform(0.8, 1.8)),
                          zn, self.z_end)
        for _ in range(rng.integers(1, 4) if self.plaza else 0):  # planted patches on a plaza
            s = rng.choice([-1, 1])
            x, z0 = edge[s] + s * rng.uniform(1, self.sw[s] - 4), self.depth(self.z_vis, 40)
            cv.ground(terrain, x, x + s * rng.uniform(2, 4), z0, z0 + rng.uniform(3, 10))
        if self.cross:
            cv.ground(walk if self.cross == "road" else self.g(RAIL, 0.2, 0.15), -600, 600, band[0], band[1])
        cv.ground(road, edge[-1], edge[1], zn, self.z_end)
        if self.cross == "road":
            cv.ground(road, -600, 600, zc - wc / 2, zc + wc / 2)
        if self.cross == "rail":  # rails: void on the rail bed, road where they cross the road
            steel = cv.seg(RAIL, (150, 150, 155), fine=0.02), cv.seg(ROAD, (150, 150, 155), fine=0.02)
            for zr in (zc - 0.75, zc + 0.75):
                cv.ground(steel[0], -600, 600, zr - 0.05, zr + 0.05)
                cv.ground(steel[1], edge[-1], edge[1], zr - 0.05, zr + 0.05)
        # markings: road in Cityscapes / GTA / BDD / ACDC, their own ids in Mapillary and SYNTHIA
        paint = self.g(LANE, 0.03, 0.02)
        yellow = cv.seg(LANE, (215, 175, 45), fine=0.03) if self.two_way and rng.random() < 0.5 else paint
        for k in range(1, self.lanes):
            X, solid = self.XL + k * self.lane_w, self.two_way and k == self.lanes // 2
            for z in np.arange(zn + rng.uniform(0, 9), self.z_end, 4.0 if solid else 9.0):
                if not (band and band[0] - 3 < z < band[1]):
                    cv.ground(yellow if solid else paint, X - 0.08, X + 0.08, z, z + (4.0 if solid else 3.0))
        if rng.random() < 0.6:
            for X in (self.XL + 0.25, self.XR - 0.25):
                cv.ground(paint, X - 0.07, X + 0.07, zn, band[0] if band else self.z_end)
        if self.cross == "road":
            stripes = self.g(CROSSWALK, 0.03, 0.02)
            for X in np.arange(edge[-1] + 0.4, edge[1] - 0.4, 1.1):
                cv.ground(stripes, X, X + 0.55, band[0] - 0.5, band[0] + 2.5)
        for _ in range(rng.poisson(0.8)):
            X, z, t = rng.uniform(self.XL + 0.5, self.XR - 0.5), self.depth(self.z_vis, 30), np.arange(9) * 0.7
            cv.poly(self.g(MANHOLE, 0.05, 0.0), [(X + 0.35 * np.cos(a), 0, z + 0.35 * np.sin(a)) for a in t])

    def building(self, s, Xb, z0, z1, height, col, cap=True):
        """A facade along the street at X = Xb from z0 to z1, its near end (cap) and its cast shadow."""
        cv, lit = self.cv, (1.08 if s != self.sun else 0.72) if self.sunny else 0.95
        facade = cv.seg(BUILDING, col * lit, face=1, param=Xb, fine=0.03, blotch=0.08)
        cuts = np.linspace(z0, z1, max(1, int((z1 - z0) / 6)) + 1)
        for a, b in zip(cuts[:-1], cuts[1:]):
            self.add(b, cv.side, facade, Xb, a, b, 0, height)
        if cap and z0 > cv.z_near:
            capseg = cv.seg(BUILDING, col * 0.88, z0, face=2, param=z0, fine=0.03, blotch=0.08)
            self.add(z0, cv.fpoly, capseg, [(Xb, 0), (Xb + s * 15, 0), (Xb + s * 15, height), (Xb, height)], z0)
        if self.sunny and s == self.sun:  # the sun is behind this side: its shadow falls across the street
            cv.ground(255, Xb, Xb - s * height * self.rng.uniform(0.3, 0.8), z0, z1, layer=cv.sdraw)

    def bcol(self):
        return _jit(self.pal[BUILDING] * self.rng.uniform(0.7, 1.25), self.rng, 20)

    def blocks(self):
        """Roadside blocks (buildings, parks, walls and fences in front of yards), the skyline at the end of the
        street and the buildings across the cross street."""
        cv, rng, c, pal, band, outer = self.cv, self.rng, self.c, self.pal, self.band, self.outer
        self.sun = rng.choice([-1, 1])
        for s in (-1, 1):
            z = rng.uniform(-6, 2)
            while z < self.z_end:
                z0, z1 = z, min(z + rng.uniform(8, 30), self.z_end)
                if band and z1 > band[0] and z0 < band[1]:
                    z0, z1 = (z0, band[0]) if z0 < band[0] else (band[1], z1)
                z = z1 + (rng.uniform(2, 5) if rng.random() < 0.2 else 0.0)  # an alley now and then
                z = band[1] if band and band[0] <= z < band[1] else z
                if z1 - z0 < 1:
                    continue
                if rng.random() < c.park:  # park: trees, a hedge or a fence, buildings far behind
                    for tz in rng.uniform(z0, z1, rng.integers(1, 4)):
                        if tz > self.z_vis:
                            self.add(tz, _tree, cv, pal, rng, outer[s] + s * rng.uniform(1, 12), tz,
                                     rng.uniform(1.0, 1.6))
                    if rng.random() < 0.4:
                        self.add(z1, cv.side, self.g(VEGETATION, 0.2, 0.15), outer[s] + s * 0.3, z0, z1, 0,
                                 rng.uniform(0.8, 1.4))
                    elif rng.random() < c.fence * 2:
                        X = outer[s] + s * 0.2
                        self.add(z1, cv.side, cv.seg(FENCE, _jit(pal[FENCE], rng), face=3, param=X), X, z0, z1, 0,
                                 rng.uniform(1.0, 1.8))
                    self.building(s, outer[s] + s * rng.uniform(18, 40), z0, z1, rng.uniform(6, 20), self.bcol() * 0.9,
                                  cap=False)
                    continue
                yard = rng.random() < c.wall + c.fence
                setback = rng.uniform(2, 6) if yard else 0.0 if rng.random() < 0.6 else rng.uniform(0.5, 3)
                Xb, Xw = outer[s] + s * setback, outer[s] + s * 0.15
                if setback and not yard:
                    cv.ground(self.walk, outer[s], Xb, z0, z1)
                elif yard and rng.random() < c.wall / (c.wall + c.fence):
                    self.add(z1, cv.side, cv.seg(WALL, _jit(pal[WALL], rng, 15), fine=0.05, blotch=0.15), Xw, z0, z1,
                             0, rng.uniform(1.0, 2.5))
                elif yard:
                    self.add(z1, cv.side, cv.seg(FENCE, _jit(pal[FENCE], rng), face=3, param=Xw), Xw, z0, z1, 0,
                             rng.uniform(1.1, 2.0))
                self.building(s, Xb, z0, z1, rng.integers(*c.storeys) * 3.2 + rng.uniform(0, 2.5), self.bcol())
        rows = [(self.z_end + 1.0, (-120, 120))]
        if band:
            rows += [(band[1] + 1.0, (outer[-1] - 150, outer[-1])), (band[1] + 1.0, (outer[1], outer[1] + 150))]
        for zf, (X, X_end) in rows:
            while X < X_end:
                w, h = rng.uniform(8, 25), rng.integers(*c.storeys) * 3.2 + rng.uniform(0, 6)
                if rng.random() < 0.25:
                    self.add(zf + 2, _tree, cv, pal, rng, X + w / 2, zf + 2, rng.uniform(1.3, 2.0))
                else:
                    seg = cv.seg(BUILDING, self.bcol() * 0.9, zf, face=2, param=zf, fine=0.03, blotch=0.08)
                    self.add(zf, cv.fpoly, seg, [(X, 0), (X + w, 0), (X + w, h), (X, h)], zf)
                X += w

    def furniture(self):
        """Poles with lamps, traffic lights and signs; street trees; bins and benches."""
        cv, rng, c, pal, edge, zv = self.cv, self.rng, self.c, self.pal, self.edge, self.z_vis
        n_light, n_sign = self.mins.get(LIGHT, 0), self.mins.get(SIGN, 0)
        n_near = (n_light + n_sign + 1) // 2  # prompted lights / signs: near poles on each side
        for s in (-1, 1):
            for i in range(rng.poisson(c.poles) + n_near):
                near = i < n_near
                z = self.depth(max(zv * 1.3, 6), 20) if near else self.depth(zv * 1.3, 70)
                self.add(z, _pole, cv, pal, rng, edge[s] + s * rng.uniform(0.4, 0.8), z, s,
                         light=near and n_light > 0 or rng.random() < 0.25,
                         sign=near and n_sign > 0 or rng.random() < 0.45, lamp=rng.random() < 0.45)
            if self.cross == "road":
                self.add(self.band[0], _pole, cv, pal, rng, edge[s] + s * 0.6, self.band[0], s, light=True,
                         sign=rng.random() < 0.5, lamp=False)
            for _ in range(rng.poisson(c.trees) + self.mins.get(VEGETATION, 0)):
                z = self.depth(zv * 1.5, 90)
                if not self.in_band(z):
                    X = edge[s] + s * rng.uniform(0.8, max(1.0, self.sw[s] - 0.6))
                    self.add(z, _tree, cv, pal, rng, X, z, rng.uniform(0.8, 1.3))
        for _ in range(rng.poisson(c.statics)):
            X, z = self.on_walk()
            self.add(z, _static, cv, rng, X, z)

    def traffic(self):
        """Vehicles in lanes and parking strips (rear or front view), crossing traffic and trains."""
        cv, rng, c, pal, mins = self.cv, self.rng, self.c, self.pal, self.mins
        slots = [(self.XL + (k + 0.5) * self.lane_w, self.two_way and k < self.lanes // 2) for k in range(self.lanes)]
        slots += [(self.edge[s] - s * 1.1, False) for s in (-1, 1) if self.park[s]]  # parking (cars only)
        occupied = {i: [self.band] if self.band else [] for i in range(len(slots))}

        def place(kind, near=False):
            L, n = {CAR: 4.6, TRUCK: 8.0, BUS: 12.0, TRAIN: 25.0}[kind], self.lanes + (kind == CAR) * (len(slots)
                                                                                                        - self.lanes)
            for _ in range(10):
                i = rng.integers(n)
                z = self.depth(max(self.z_vis * 1.15, 5), 15) if near else self.depth(self.z_vis * 1.05, 90)
                if all(z + L + 1.5 < a or z > b + 1.5 for a, b in occupied[i]):
                    occupied[i].append((z, z + L))
                    return slots[i][0] + rng.normal(0, 0.15), z, slots[i][1]
            return None

        def colour(kind):
            if kind == CAR:
                return _jit((230, 190, 30) if rng.random() < c.taxi else _CAR_COLORS[rng.integers(10)], rng, 12)
            if kind == TRAIN:
                return _jit(pal[TRAIN] if rng.random() < 0.6 else (190, 40, 40), rng, 15)
            return _jit(pal[kind] * rng.uniform(0.6, 1.1) if rng.random() < 0.6 else _CAR_COLORS[rng.integers(10)],
                        rng)

        self.place = place
        counts = {CAR: rng.poisson(c.cars), TRUCK: rng.poisson(c.trucks), BUS: rng.poisson(c.buses),
                  TRAIN: int(self.rail and self.cross != "rail")}  # a tram when the train is not at a crossing
        for kind in (TRAIN, BUS, TRUCK, CAR):  # prompted vehicles first, near the camera
            m = counts[TRAIN] if kind == TRAIN else mins.get(kind, 0)
            for i in range(max(counts[kind], m)):
                spot = place(kind, near=i < m)
                if spot:
                    self.add(spot[1], _vehicle_back, cv, pal, rng, spot[0], spot[1], kind, colour(kind), spot[2])
        if self.cross == "rail":
            self.add(self.zc, _vehicle_side, cv, pal, rng, rng.uniform(-15, 15), self.zc, TRAIN, colour(TRAIN),
                     rng.choice([-1, 1]))
        elif self.cross == "road":
            for _ in range(rng.poisson(1.2)):
                kind, z = rng.choice([CAR, CAR, CAR, TRUCK, BUS]), self.zc + rng.choice([-1, 1]) * self.wc / 4
                self.add(z, _vehicle_side, cv, pal, rng, rng.uniform(-40, 40), z, kind, colour(kind),
                         rng.choice([-1, 1]))

    def people(self):
        """Pedestrians on sidewalks and crosswalks (crowds gather), riders, parked bicycles and motorcycles."""
        cv, rng, c, mins = self.cv, self.rng, self.c, self.mins
        n, group = max(rng.poisson(c.persons), mins.get(PERSON, 0)), None
        for i in range(n):
            if self.cross == "road" and rng.random() < 0.2:
                X, z = rng.uniform(self.edge[-1], self.edge[1]), self.band[0] + rng.uniform(-0.3, 2.3)
            elif n > 10 and group is not None and rng.random() < 0.5:
                X, z = group[0] + rng.normal(0, 1.5), max(self.z_vis * 1.05, group[1] + rng.normal(0, 3))
            else:
                X, z = group = self.on_walk(near=i < mins.get(PERSON, 0))
            self.add(z, _person, cv, rng, X, z)
        prompted = [BICYCLE] * mins.get(BICYCLE, 0) + [MOTORCYCLE] * mins.get(MOTORCYCLE, 0)
        for i in range(rng.poisson(c.riders) + len(prompted)):
            near = i < len(prompted)
            kind = prompted[i] if near else rng.choice([BICYCLE, MOTORCYCLE], p=[0.6, 0.4])
            if rng.random() < 0.35 and not near:  # in a lane, seen from behind
                spot = self.place(CAR)
                if spot:
                    self.add(spot[1], _rider_back, cv, rng, spot[0] + rng.uniform(-0.8, 0.8), spot[1], kind)
                continue
            X, z = self.on_walk(near=near) if self.plaza or rng.random() < 0.4 else (rng.uniform(self.XL, self.XR), (
                self.depth(max(self.z_vis * 1.1, 6), 15) if near else self.depth(self.z_vis * 1.1, 50)))
            self.add(z, _two_wheeler, cv, rng, X, z, kind, rng.choice([-1, 1]), True)
        for _ in range(rng.poisson(c.bikes)):
            X, z = self.on_walk()
            self.add(z, _two_wheeler, cv, rng, X, z, rng.choice([BICYCLE, MOTORCYCLE], p=[0.65, 0.35]),
                     rng.choice([-1, 1]), False)

    def draw(self):
        cv, rng = self.cv, self.rng
        self.ground()
        self.blocks()
        self.furniture()
        self.traffic()
        self.people()
        for _, _, fn, args, kw in sorted(self.sprites, key=lambda t: (-t[0], t[1])):
            fn(*args, **kw)
        if rng.random() < self.c.birds:  # birds (void) in the sky
            bird = cv.seg(BIRD, (30, 30, 30), 50.0)
            for _ in range(rng.integers(2, 7)):
                x, y, w = rng.uniform(0, cv.W), rng.uniform(0, max(cv.hor - 10, 1)), rng.uniform(3, 8)
                cv.draw.line([(x - w, y - w / 3), (x, y), (x + w, y - w / 3)], fill=bird, width=1)
        if rng.random() < self.c.ego:  # ego-vehicle hood at the bottom (void)
            h, rx = rng.uniform(0.06, 0.14) * cv.H, cv.W * rng.uniform(0.6, 0.9)
            hood = cv.seg(EGO, _jit(_CAR_COLORS[rng.integers(10)] * 0.5, rng), 1.0, fine=0.02, blotch=0.1)
            cv.draw.ellipse([cv.W / 2 - rx, cv.H - h, cv.W / 2 + rx, cv.H + 4 * h], fill=hood)


# ---- appearance: colour, texture, light, weather ----

_SKIES = {  # (horizon colour, zenith colour) per weather
    "overcast": ((205, 208, 210), (170, 176, 184)), "dusk": ((250, 160, 90), (70, 80, 140)),
    "night": ((30, 30, 45), (4, 6, 16)), "fog": ((196, 200, 204), (186, 191, 196)),
    "rain": ((160, 165, 170), (115, 120, 128)), "snow": ((222, 224, 227), (190, 195, 202))}


def _domain_palette(key, shift):
    r = np.random.default_rng(zlib.crc32(key.encode()))
    # mostly a brightness shift per class plus a smaller hue shift, so grey asphalt stays greyish
    shift = r.normal(0, shift, (len(_BASE), 1)) + r.normal(0, 0.4 * shift, _BASE.shape)
    return np.clip(_BASE * r.uniform(0.94, 1.06, 3) + shift, 0, 255).astype(np.float32)


def _smooth_noise(rng, H, W, cell):
    """Unit-variance-ish noise with blobs of about `cell` pixels (bilinear upsampling of a coarse grid)."""
    small = rng.standard_normal((H // cell + 2, W // cell + 2), dtype=np.float32)
    return np.asarray(Image.fromarray(small).resize((W, H), Image.BILINEAR)) * 1.4


def _blur(arr, radius):
    """Gaussian blur of a float (H, W, 3) array in 0..255 through PIL."""
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), np.float32)


def _paint(cv, rng, st, weather, sunny):
    """Segment map -> RGB: per-segment colours, textures, facade windows / fence lattices, sky, shadows, weather,
    colour grading, blur and sensor noise. Returns uint8 (H, W, 3)."""
    H, W = cv.H, cv.W
    seg = np.asarray(cv.im, dtype=np.int32)                            # (H, W)
    T = np.asarray(cv.table, np.float32)                               # (N, 13)
    cls = T[:, 0].astype(np.uint8)[seg]
    rgb = T[:, 1:4][seg]                                               # (H, W, 3)
    fine = rng.standard_normal((H, W), dtype=np.float32)
    blotch = _smooth_noise(rng, H, W, max(3, H // 40))
    rgb *= (1 + st.texture * (T[:, 4][seg] * fine + T[:, 5][seg] * blotch))[..., None]
    yy, xx = np.arange(H, dtype=np.float32)[:, None], np.arange(W, dtype=np.float32)[None, :]
    night = weather in ("night", "dusk")
    emit = T[:, 9:12][seg] if night else None                          # (H, W, 3) light sources
    if weather in _SKIES or not sunny:
        hor_c, zen_c = (np.asarray(c, np.float32) for c in _SKIES.get(weather, _SKIES["overcast"]))
    else:  # clear: the (jittered) palette's sky colour at the zenith, paler at the horizon
        zen_c = T[0, 1:4]
        hor_c = 0.45 * zen_c + 0.55 * np.array((235, 238, 240), np.float32)

    # facades: windows in world coordinates (side facade: u = depth; frontal: u = lateral X), fence lattices
    face = T[:, 7].astype(np.int8)[seg]
    fy, fx = np.nonzero(face)
    zz = None
    if len(fy):
        fk, fp, dx = face[fy, fx], T[:, 8][seg[fy, fx]], fx - cv.cx
        dx = np.where(np.abs(dx) < 0.5, 0.5, dx)
        zz = np.clip(np.where(fk == 2, fp, fp * cv.f / dx), 0.3, 1e4)  # depth of each facade pixel
        u = np.where(fk == 2, dx * fp / cv.f, zz)
        Y = cv.cam_h - (fy - cv.hor) * zz / cv.f
        wu, wy = rng.uniform(2.5, 4.0), rng.uniform(3.0, 3.6)
        cu, cy = np.floor(u / wu + seg[fy, fx] * 0.37), np.floor(Y / wy)
        fu, fv = u / wu + seg[fy, fx] * 0.37 - cu, Y / wy - cy
        win = (fk < 3) & (fu < 0.5) & (fv > 0.3) & (fv < 0.8) & (Y > 0.5)
        rgb[fy[win], fx[win]] = 0.35 * rgb[fy[win], fx[win]] + 0.35 * zen_c + 10
        if night:  # a third of the windows are lit
            lit = win & ((cu.astype(np.int64) * 73856093 ^ cy.astype(np.int64) * 19349663) % 100 < 35)
            emit[fy[lit], fx[lit]] = (255, 200, 120)
        see = (fk == 3) & ~(((u / 0.25) % 1 < 0.3) | ((Y / 0.25) % 1 < 0.3) | ((u / 2.5) % 1 < 0.05) | (Y % 1.9 < 0.08))
        rgb[fy[see], fx[see]] *= 0.45  # gaps of the fence mesh

    # sky: gradient from the horizon up, with clouds
    sy, sx = np.nonzero(cls == SKY)
    t = (np.clip((cv.hor - sy) / max(cv.hor, 1.0), 0, 1) ** 0.6)[:, None]
    cloud = np.clip((_smooth_noise(rng, H, W, max(4, H // 10))[sy, sx] - rng.uniform(0.3, 1.2)) * 0.6, 0, 0.8)[:, None]
    rgb[sy, sx] = (hor_c * (1 - t) + zen_c * t) * (1 - cloud) + cloud * (60 if weather == "night" else 240)
    shadow = np.asarray(cv.shadow, np.float32) * ((st.shadow if sunny else 0.3) / 255)
    rgb *= (1 - shadow)[..., None]

    # weather and time of day
    if night:
        sky = (cls == SKY)[..., None]
        k = rng.uniform(0.1, 0.2) if weather == "night" else rng.uniform(0.55, 0.75)
        rgb = np.where(sky, rgb, rgb * k)
        e = emit * (1.0 if weather == "night" else 0.3)
        rgb += e + _blur(e, max(1.5, H / 60)) * 1.5 + _blur(e, max(3, H / 15)) * (2.0 if weather == "night" else 1.0)
        if weather == "dusk":
            rgb *= np.array((1.12, 0.93, 0.8), np.float32)
    elif weather == "rain":
        ground = np.isin(cls, (ROAD, SIDEWALK, TERRAIN, LANE, CURB, MANHOLE, CROSSWALK, RAIL))
        rgb *= 0.78
        rgb[ground] *= 0.85
        wet = ground & (_smooth_noise(rng, H, W, max(4, H // 15)) > 1.3)  # puddles mirror the sky
        rgb[wet] = 0.5 * rgb[wet] + 0.5 * hor_c
        n, slant, ln = H * W // 200, rng.uniform(-0.3, 0.3), H / 25
        layer = Image.new("L", (W, H), 0)
        d = ImageDraw.Draw(layer)
        for x, y, a in zip(rng.uniform(0, W, n), rng.uniform(0, H, n), rng.uniform(80, 200, n).astype(int)):
            d.line([(x, y), (x + slant * ln, y + ln)], fill=int(a), width=1)  # rain streaks
        rgb += 0.35 * np.asarray(layer.filter(ImageFilter.GaussianBlur(0.6)), np.float32)[..., None]
    elif weather == "snow":
        cover = np.zeros(256, np.float32)  # how much of each class the snow covers
        cover[[ROAD, LANE, MANHOLE, CROSSWALK]] = 0.6
        cover[[SIDEWALK, CURB, RAIL]], cover[TERRAIN], cover[VEGETATION], cover[WALL] = 0.8, 0.95, 0.3, 0.15
        patch = 0.4 * _smooth_noise(rng, H, W, max(4, H // 12)) + 0.1 * blotch
        a = (np.clip((cover[cls] + patch - 0.5) * 4 + 0.5, 0, 1) * (cover[cls] > 0))[..., None]
        rgb = rgb * (1 - a) + a * np.array((236, 238, 242), np.float32) * rng.uniform(0.88, 1.0)
        n = H * W // 150
        layer = Image.new("L", (W, H), 0)
        d = ImageDraw.Draw(layer)
        for x, y, r in zip(rng.uniform(0, W, n), rng.uniform(0, H, n), rng.exponential(0.6, n)):
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)  # flakes
        flakes = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.5)), np.float32)[..., None] / 255
        rgb = rgb * (1 - flakes) + 250 * flakes
    elif weather == "fog":  # Koschmieder: transmission exp(-3 z / visibility)
        z = np.where(T[:, 6][seg] < 0, cv.cam_h * cv.f / np.maximum(yy - cv.hor, 0.5), T[:, 6][seg])  # (H, W) metres
        if zz is not None:
            z[fy, fx] = zz
        tr = np.exp(-3 * z / rng.uniform(35, 110))[..., None]
        rgb = rgb * tr + (1 - tr) * hor_c * rng.uniform(0.85, 1.05)

    # colour grading as one 3x3 matrix (saturation, contrast, tint, brightness), gamma, vignette, blur, sensor noise
    v = st.variety
    sat = st.saturation * np.exp(rng.normal(0, 0.15 * v)) * (0.75 if weather in ("rain", "fog") else 1.0)
    con = st.contrast * np.exp(rng.normal(0, 0.1 * v))
    gain = np.asarray(st.tint, np.float32) * np.exp(rng.normal(0, 0.05 * v, 3)) * np.exp(rng.normal(0, 0.1 * v))
    M = gain[:, None] * con * (sat * np.eye(3) + (1 - sat) / 3)        # rows: output channel
    rgb = rgb @ M.T.astype(np.float32) + (gain * 110 * (1 - con)).astype(np.float32)
    if st.vignette:
        rgb *= (1 - st.vignette * 0.5 * (((xx - W / 2) / (W / 2)) ** 2 + ((yy - H / 2) / (H / 2)) ** 2))[..., None]
    gamma = st.gamma * np.exp(rng.normal(0, 0.1 * v))
    lut = np.clip(255 * (np.arange(256) / 255) ** gamma + 0.5, 0, 255).astype(np.uint8)
    out = lut[np.clip(rgb + 0.5, 0, 255).astype(np.uint8)]
    if st.blur > 0:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(st.blur * H / 256)))
    noise = rng.standard_normal(out.shape, dtype=np.float32) * (st.noise * (2.0 if weather == "night" else 1.0))
    return np.clip(out + noise + 0.5, 0, 255).astype(np.uint8)


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
    """`python toycity.py` options."""
    out: str = "datasets_toy"  # datasets root to write (gta5/, synthia/, cityscapes/, bdd10k/, mapillary_vistas/, acdc/)
    seed: int = 0
    num_images: int = None     # images per split; None = the defaults in SPLITS
    workers: int = None        # processes; None = os.cpu_count()
    progress: bool = True


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


def _write(path, data):
    """Atomic write: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def main(argv=None) -> dict:
    """`python toycity.py --out DIR`: write every domain; returns {domain: images}. Bad inputs: one message on stderr
    and exit code 2 (the traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    helps = {"out": "datasets root to write (gta5/, synthia/, cityscapes/, bdd10k/, mapillary_vistas/, acdc/)",
             "seed": "base seed; each image's seed derives from (seed, domain, split, index)",
             "num_images": "images per split; None = the defaults (" + ", ".join(
                 f"{d} {'/'.join(str(n) for _, n in s)}" for d, s in SPLITS.items()) + ")",
             "workers": "processes; None = all CPUs", "progress": "turn the progress bar off (progress=%(default)s)"}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(BuildConfig):
        if f.type is bool or f.type == "bool":
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                help=helps[f.name])
        else:
            kind = {"seed": int, "num_images": int, "workers": int}.get(f.name, str)
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=helps[f.name])
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
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
        print(f"toycity.py: error: {err}\n(add --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    print(", ".join(f"{d}: {n}" for d, n in counts.items()))
    return counts


if __name__ == "__main__":
    main()
