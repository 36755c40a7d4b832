"""ToyCity's appearance: a segment map -> RGB (colour, texture, facades, sky, shadows, weather, colour grading, camera
artefacts), with each domain's palette. Domain styles (city.Style) say how much of each; this file says how.
It imports only toyparts.py.
"""
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from toyworld.parts import CROSSWALK, CURB, LANE, MANHOLE, RAIL, ROAD, SIDEWALK, SKY, TERRAIN, VEGETATION, WALL, _BASE


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
    colour grading, blur and sensor noise. Returns uint8 (H, W, 3). The steps draw from `rng` in this order."""
    seg = np.asarray(cv.im, dtype=np.int32)                            # (H, W)
    T = np.asarray(cv.table, np.float32)                               # (N, 13)
    cls = T[:, 0].astype(np.uint8)[seg]
    rgb, blotch = _textured(cv, rng, st, seg, T)
    night = weather in ("night", "dusk")
    emit = T[:, 9:12][seg] if night else None                          # (H, W, 3) light sources
    if weather in _SKIES or not sunny:
        hor_c, zen_c = (np.asarray(c, np.float32) for c in _SKIES.get(weather, _SKIES["overcast"]))
    else:  # clear: the (jittered) palette's sky colour at the zenith, paler at the horizon
        zen_c = T[0, 1:4]
        hor_c = 0.45 * zen_c + 0.55 * np.array((235, 238, 240), np.float32)
    facade_depth = _facades(cv, rng, seg, T, rgb, emit, zen_c)
    rgb = _sky_and_shadows(cv, rng, st, cls, rgb, hor_c, zen_c, weather, sunny)
    if night:
        rgb = _night(cv, rng, cls, rgb, emit, weather)
    elif weather == "rain":
        rgb = _rain(cv, rng, cls, rgb, hor_c)
    elif weather == "snow":
        rgb = _snow(cv, rng, cls, rgb, blotch)
    elif weather == "fog":
        rgb = _fog(cv, rng, seg, T, rgb, hor_c, facade_depth)
    return _grade(cv, rng, st, rgb, weather)


def _textured(cv, rng, st, seg, T):
    """Per-segment colour times (1 + texture): fine per-pixel noise plus blotches. Returns rgb float32 (H, W, 3) and
    the blotch noise (H, W) (snow reuses it)."""
    H, W = cv.H, cv.W
    rgb = T[:, 1:4][seg]                                               # (H, W, 3)
    fine = rng.standard_normal((H, W), dtype=np.float32)
    blotch = _smooth_noise(rng, H, W, max(3, H // 40))
    rgb *= (1 + st.texture * (T[:, 4][seg] * fine + T[:, 5][seg] * blotch))[..., None]
    return rgb, blotch


def _facades(cv, rng, seg, T, rgb, emit, zen_c):
    """Windows in world coordinates (side facade: u = depth; frontal: u = lateral X; a third lit at night, in `emit`)
    and fence lattices, painted into `rgb` in place. Returns (rows, cols, depth) of the facade pixels, or None."""
    face = T[:, 7].astype(np.int8)[seg]
    fy, fx = np.nonzero(face)
    if not len(fy):
        return None
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
    if emit is not None:  # night or dusk: a third of the windows are lit
        lit = win & ((cu.astype(np.int64) * 73856093 ^ cy.astype(np.int64) * 19349663) % 100 < 35)
        emit[fy[lit], fx[lit]] = (255, 200, 120)
    see = (fk == 3) & ~(((u / 0.25) % 1 < 0.3) | ((Y / 0.25) % 1 < 0.3) | ((u / 2.5) % 1 < 0.05) | (Y % 1.9 < 0.08))
    rgb[fy[see], fx[see]] *= 0.45  # gaps of the fence mesh
    return fy, fx, zz


def _sky_and_shadows(cv, rng, st, cls, rgb, hor_c, zen_c, weather, sunny):
    """Sky: gradient from the horizon up, with clouds; then the cast shadows darken the scene."""
    H, W = cv.H, cv.W
    sy, sx = np.nonzero(cls == SKY)
    t = (np.clip((cv.hor - sy) / max(cv.hor, 1.0), 0, 1) ** 0.6)[:, None]
    cloud = np.clip((_smooth_noise(rng, H, W, max(4, H // 10))[sy, sx] - rng.uniform(0.3, 1.2)) * 0.6, 0, 0.8)[:, None]
    rgb[sy, sx] = (hor_c * (1 - t) + zen_c * t) * (1 - cloud) + cloud * (60 if weather == "night" else 240)
    shadow = np.asarray(cv.shadow, np.float32) * ((st.shadow if sunny else 0.3) / 255)
    rgb *= (1 - shadow)[..., None]
    return rgb


# ---- weather and time of day ----

def _night(cv, rng, cls, rgb, emit, weather):
    """Night or dusk: darker except the sky, light sources with two glow scales, a warm cast at dusk."""
    H = cv.H
    sky = (cls == SKY)[..., None]
    k = rng.uniform(0.1, 0.2) if weather == "night" else rng.uniform(0.55, 0.75)
    rgb = np.where(sky, rgb, rgb * k)
    e = emit * (1.0 if weather == "night" else 0.3)
    rgb += e + _blur(e, max(1.5, H / 60)) * 1.5 + _blur(e, max(3, H / 15)) * (2.0 if weather == "night" else 1.0)
    if weather == "dusk":
        rgb *= np.array((1.12, 0.93, 0.8), np.float32)
    return rgb


def _rain(cv, rng, cls, rgb, hor_c):
    """Rain: darker, wet ground, puddles mirroring the sky, rain streaks."""
    H, W = cv.H, cv.W
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
    return rgb


def _snow(cv, rng, cls, rgb, blotch):
    """Snow: patchy cover on the ground and vegetation, falling flakes."""
    H, W = cv.H, cv.W
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
    return rgb * (1 - flakes) + 250 * flakes


def _fog(cv, rng, seg, T, rgb, hor_c, facade_depth):
    """Fog, Koschmieder: transmission exp(-3 z / visibility), z from the ground plane, each segment's depth, facades."""
    yy = np.arange(cv.H, dtype=np.float32)[:, None]
    z = np.where(T[:, 6][seg] < 0, cv.cam_h * cv.f / np.maximum(yy - cv.hor, 0.5), T[:, 6][seg])  # (H, W) metres
    if facade_depth is not None:
        fy, fx, zz = facade_depth
        z[fy, fx] = zz
    tr = np.exp(-3 * z / rng.uniform(35, 110))[..., None]
    return rgb * tr + (1 - tr) * hor_c * rng.uniform(0.85, 1.05)


# ---- camera ----

def _grade(cv, rng, st, rgb, weather):
    """Colour grading as one 3x3 matrix (saturation, contrast, tint, brightness), gamma, vignette, blur, sensor noise.
    Returns uint8 (H, W, 3)."""
    H, W = cv.H, cv.W
    yy, xx = np.arange(H, dtype=np.float32)[:, None], np.arange(W, dtype=np.float32)[None, :]
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
