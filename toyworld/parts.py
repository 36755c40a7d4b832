"""ToyCity's parts: the classes, their canonical colours, the camera canvas, and the things on a street.

city.py draws a scene once as a map of "segments" (one id per coloured part: a car body, a window, a lane dash) on a
`_Canvas`, a pinhole camera over a flat road; this file holds the canvas and the sprites drawn on it (vehicles, people,
two-wheelers, poles with lights and signs, trees, street furniture). scene.py lays them out along a street, paint.py
turns the segment map into an image. It imports no project file.
"""
import numpy as np
from PIL import Image, ImageDraw

# ---- classes (the 19 train ids of data.CLASSES, in order; then internal extras) and colours ----

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS,
 TRAIN, MOTORCYCLE, BICYCLE) = range(19)
# Internal extras: drawn like classes, written with the raw id each dataset gives them (some map to ignore).
LANE, CURB, MANHOLE, CROSSWALK, EGO, STATIC, RAIL, BIRD, MOTO_RIDER, UTILITY_POLE = range(19, 29)
IGNORE = 255

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
