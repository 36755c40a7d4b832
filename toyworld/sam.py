"""A toy SAM for ToyCity: an offline, class-agnostic, point-promptable segmenter (the stand-in for SAM, Sec. 3.3).

It has SAM's point-predictor interface (refine.py's module docstring), so `refine.refine_pseudo_label` and training
run unchanged without SAM weights: `set_image(image uint8 (H,W,3))` once, then
`predict_points(points (P,K,2) xy, multimask=True) -> (masks bool (P,M,H,W), scores (P,M))`.
`refine.build_predictor("toy")` imports it lazily. Part of the offline world next to city.py; it imports ops (connected components,
union-find) and refine (hwc_numpy).

Usage:
    from toyworld.sam import ToyPointPredictor
    predictor = ToyPointPredictor(); predictor.set_image(image); masks, scores = predictor.predict_points(points)
"""
import hashlib
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

import ops
import refine  # hwc_numpy (refine imports this file only inside build_predictor("toy"))

# ---- helpers ----

def _neighbour_pairs(regions: torch.Tensor):
    """Region ids of all horizontally and vertically adjacent pixel pairs: (a, b), each (h*(w-1) + (h-1)*w,)."""
    a = torch.cat([regions[:, :-1].reshape(-1), regions[:-1].reshape(-1)])
    b = torch.cat([regions[:, 1:].reshape(-1), regions[1:].reshape(-1)])
    return a, b


# ---- the toy predictor ----

class ToyPointPredictor:
    """Offline, class-agnostic, promptable segmenter for ToyCity: a stand-in for SAM in tests and demos.

    Like SAM it works at a low resolution (long side `work_size`; SAM's low-res masks are 256x256) and upsamples its
    masks. set_image builds a region hierarchy once: starting from 4-connected pixels of equal fine colour cell
    (ops.connected_components), adjacent regions are merged while their difference is below a threshold, in
    Boruvka rounds (every region merges along its most similar neighbour). The difference of two regions is the
    smaller of their mean-colour difference and the mean colour gradient along their shared boundary (so texture
    and smooth shading both merge). Three increasing thresholds give three levels, the three candidates of SAM's
    multimask output. A prompt's mask on a level is the union of the regions holding at least `min_votes` of its
    points (at least the best-voted one; a stray point on a neighbouring object does not pull it in), plus
    one-vote regions next to it that are smaller than `extra_frac` of it (a car's window), plus the regions it
    encloses that are smaller than `hole_frac` of it (windows in a wall, lane marks in a road). Score (SAM's
    predicted IoU): the share of the points inside the mask minus `level_penalty` per level (finer is preferred).
    Boundaries come from the image, which is what lets refinement sharpen a blurry teacher, as SAM does. Unlike
    SAM, it has no notion of objects: parts of different colours that do not enclose each other stay apart.
    """

    def __init__(self, thresholds=(24.0, 40.0, 64.0), work_size: int = 256, contrast: float = 35.0,
                 cell: float = 8.0, min_votes: int = 2, extra_frac: float = 0.5, hole_frac: float = 0.2,
                 level_penalty: float = 0.5, cache_size: int = 96):
        self.thresholds, self.work_size, self.contrast, self.cell = thresholds, work_size, contrast, cell
        self.min_votes, self.extra_frac, self.hole_frac = min_votes, extra_frac, hole_frac
        self.level_penalty = level_penalty
        # set_image is a pure function of the pixels and self-training shows the same generated images again and
        # again (the demo: 40 images x 2 flips): the region levels of the last `cache_size` images are kept (~1 MB each)
        self.cache_size, self._cache = cache_size, OrderedDict()

    def set_image(self, image: np.ndarray):
        """image: uint8 (H, W, 3) RGB. Builds the three region levels at the working resolution (or takes them from
        the cache of recently seen images)."""
        image = np.ascontiguousarray(refine.hwc_numpy(image))
        key = (image.shape, hashlib.blake2b(image.data, digest_size=16).digest())
        if key in self._cache:
            self._cache.move_to_end(key)
            self.size, self.levels = self._cache[key]
            return
        self._build(image)
        if self.cache_size > 0:
            self._cache[key] = (self.size, self.levels)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _build(self, image: np.ndarray):
        """The three region levels of `image` (uint8 (H, W, 3)) at the working resolution."""
        img = torch.tensor(image).permute(2, 0, 1)[None].float()               # (1, 3, H, W)
        self.size = tuple(img.shape[-2:])
        scale = min(1.0, self.work_size / max(self.size))
        if scale < 1:
            img = F.interpolate(img, size=(round(self.size[0] * scale), round(self.size[1] * scale)), mode="area")
        spread = (img - img.median()).abs().median()                             # robust contrast (MAD)
        img = img[0] * (self.contrast / spread.clamp(min=2.0))                   # dark / foggy images: stretch
        img = img - img.amin((1, 2), keepdim=True)                               # (3, h, w), >= 0
        pad = F.pad(img[None], (1, 1, 1, 1), mode="replicate")[0]               # (3, h+2, w+2)
        grad = torch.maximum((pad[:, 1:-1, 2:] - pad[:, 1:-1, :-2]).abs().amax(0),   # central differences,
                             (pad[:, 2:, 1:-1] - pad[:, :-2, 1:-1]).abs().amax(0))   # max over channels (h, w)
        ga, gb = _neighbour_pairs(grad.double())
        pair_grad = torch.maximum(ga, gb)                                        # gradient at each pixel pair
        cells = (img / self.cell).long()                                         # (3, h, w) fine colour cells
        code = (cells[0] * 4096 + cells[1]) * 4096 + cells[2]
        regions, _, _ = ops.connected_components(torch.unique(code, return_inverse=True)[1], 4, ignore_index=None)
        regions = regions.long()                                                 # (h, w) initial regions
        pixels = img.reshape(3, -1).T.double()                                   # (h*w, 3)
        self.levels = []
        for threshold in self.thresholds:
            regions = self._merge(regions, pixels, pair_grad, threshold)
            self.levels.append(self._level(regions))

    @staticmethod
    def _merge(regions, pixels, pair_grad, threshold):
        """Boruvka rounds: merge adjacent regions along their most similar neighbour while it is below threshold."""
        while True:
            n = int(regions.max()) + 1
            flat = regions.reshape(-1)
            area = torch.bincount(flat, minlength=n).double()
            mean = torch.zeros(n, 3, dtype=torch.float64).index_add_(0, flat, pixels) / area[:, None]  # (N, 3)
            pa, pb = _neighbour_pairs(regions)
            lo, hi = torch.minimum(pa, pb), torch.maximum(pa, pb)
            cross = lo != hi                                                     # pixel pairs on a boundary
            pairs, inverse = torch.unique(lo[cross] * n + hi[cross], return_inverse=True)
            a, b = pairs // n, pairs % n                                         # (E,) adjacent region pairs
            length = torch.bincount(inverse, minlength=len(pairs)).double()
            boundary = torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, inverse, pair_grad[cross]) / length
            weight = torch.minimum((mean[a] - mean[b]).abs().amax(1), boundary)  # (E,)
            best = torch.full((n,), float("inf"), dtype=torch.float64)
            best.scatter_reduce_(0, a, weight, reduce="amin").scatter_reduce_(0, b, weight, reduce="amin")
            pick = (weight < threshold) & ((weight == best[a]) | (weight == best[b]))
            if not pick.any():
                return regions
            root = ops.graph_roots(n, a[pick], b[pick])
            regions = torch.unique(root[regions], return_inverse=True)[1]       # compact ids (h, w)

    @staticmethod
    def _level(regions):
        """Region map plus what prompts need: areas, directed adjacency, border flags, degrees."""
        n = int(regions.max()) + 1
        pa, pb = _neighbour_pairs(regions)
        lo, hi = torch.minimum(pa, pb), torch.maximum(pa, pb)
        pairs = torch.unique(lo[lo != hi] * n + hi[lo != hi])
        a, b = pairs // n, pairs % n
        border = torch.zeros(n, dtype=torch.bool)
        border[torch.cat([regions[0], regions[-1], regions[:, 0], regions[:, -1]])] = True
        return {"regions": regions, "n": n, "area": torch.bincount(regions.reshape(-1), minlength=n).double(),
                "src": torch.cat([a, b]), "dst": torch.cat([b, a]), "border": border,
                "degree": torch.bincount(torch.cat([a, b]), minlength=n)}

    @torch.no_grad()
    def predict_points(self, points, multimask: bool = True):
        """points (P, K, 2) xy -> masks bool (P, 3, H, W) (1 mask with multimask=False), scores (P, 3)."""
        points = torch.as_tensor(points, dtype=torch.int64).cpu()
        p, k = points.shape[:2]
        (H, W), (h, w) = self.size, self.levels[0]["regions"].shape
        xs = ((points[..., 0] + 0.5) * w / W).long().clamp(0, w - 1)           # (P, K) working-resolution pixels
        ys = ((points[..., 1] + 0.5) * h / H).long().clamp(0, h - 1)
        masks, scores = [], []
        for i, lv in enumerate(self.levels):
            hit = lv["regions"][ys, xs]                                          # (P, K) region under each point
            votes = torch.zeros(p, lv["n"]).scatter_add_(1, hit, torch.ones(p, k))  # (P, N)
            keep = votes >= votes.amax(1, keepdim=True).clamp(max=self.min_votes)   # (P, N) regions in the mask
            for extra in ("parts", "holes"):
                near = torch.zeros(p, lv["n"]).index_add_(1, lv["src"], keep[:, lv["dst"]].float())  # neighbours in
                area = (keep.double() @ lv["area"])[:, None]                     # (P, 1)
                if extra == "parts":   # one-vote regions touching the mask, smaller than extra_frac of it
                    add = (votes > 0) & (near > 0) & (lv["area"] <= self.extra_frac * area)
                else:                  # regions enclosed by the mask (all neighbours in it, off the border)
                    add = (near == lv["degree"]) & (lv["degree"] > 0) & ~lv["border"] & \
                          (lv["area"] <= self.hole_frac * area)
                keep |= add
            masks.append(keep[:, lv["regions"]])                                 # (P, h, w)
            scores.append((votes * keep).sum(1) / k - self.level_penalty * i)   # share of points inside
        masks, scores = torch.stack(masks, 1), torch.stack(scores, 1)            # (P, M, h, w), (P, M)
        if not multimask:
            best = scores.argmax(1)
            masks, scores = masks[torch.arange(p), best][:, None], scores[torch.arange(p), best][:, None]
        yi = ((torch.arange(H) + 0.5) * h / H).long()                          # nearest upsampling indices
        xi = ((torch.arange(W) + 0.5) * w / W).long()
        return masks[:, :, yi[:, None], xi[None, :]], scores                   # (P, M, H, W)
