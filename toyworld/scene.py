"""ToyCity's street layout: one scene's plan (lanes, sidewalks, blocks, a cross street or a level crossing) and
where its things stand, drawn back to front on toyparts.py's canvas. It imports only toyparts.py.
"""
import numpy as np

from toyworld.parts import (BICYCLE, BIRD, BUILDING, BUS, CAR, CROSSWALK, CURB, EGO, FENCE, LANE, LIGHT, MANHOLE, MOTORCYCLE,
                      PERSON, RAIL, ROAD, SIDEWALK, SIGN, TERRAIN, TRAIN, TRUCK, VEGETATION, WALL, _CAR_COLORS,
                      _person, _pole, _rider_back, _static, _tree, _two_wheeler, _vehicle_back, _vehicle_side, _jit)

# ---- the street ----


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

    def markings(self):
        """Lane lines, edge lines, the crosswalk and manholes: road in Cityscapes / GTA / BDD / ACDC, their own ids in
        Mapillary and SYNTHIA."""
        cv, rng, zn, edge, band = self.cv, self.rng, self.cv.z_near, self.edge, self.band
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
        rng, band = self.rng, self.band
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
                if rng.random() < self.c.park:
                    self.parkland(s, z0, z1)
                else:
                    self.frontage(s, z0, z1)
        self.skyline()

    def parkland(self, s, z0, z1):
        """A park block: trees, a hedge or a fence, buildings far behind."""
        cv, rng, c, pal, outer = self.cv, self.rng, self.c, self.pal, self.outer
        for tz in rng.uniform(z0, z1, rng.integers(1, 4)):
            if tz > self.z_vis:
                self.add(tz, _tree, cv, pal, rng, outer[s] + s * rng.uniform(1, 12), tz, rng.uniform(1.0, 1.6))
        if rng.random() < 0.4:
            self.add(z1, cv.side, self.g(VEGETATION, 0.2, 0.15), outer[s] + s * 0.3, z0, z1, 0, rng.uniform(0.8, 1.4))
        elif rng.random() < c.fence * 2:
            X = outer[s] + s * 0.2
            self.add(z1, cv.side, cv.seg(FENCE, _jit(pal[FENCE], rng), face=3, param=X), X, z0, z1, 0,
                     rng.uniform(1.0, 1.8))
        self.building(s, outer[s] + s * rng.uniform(18, 40), z0, z1, rng.uniform(6, 20), self.bcol() * 0.9, cap=False)

    def frontage(self, s, z0, z1):
        """A building block: the facade on the sidewalk or set back behind a paved strip, a wall or a fenced yard."""
        cv, rng, c, pal, outer = self.cv, self.rng, self.c, self.pal, self.outer
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

    def skyline(self):
        """Frontal facades (and a few trees) at the end of the street and across the cross street."""
        cv, rng, c, pal, band, outer = self.cv, self.rng, self.c, self.pal, self.band, self.outer
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
        self.markings()
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
