"""Tests of ops.py: the C++ extension and the pure-PyTorch references against scipy, brute force and float64."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import ops

ROOT = Path(__file__).resolve().parents[1]
IGNORE = 255
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


# ---- inputs ----


def blobby(shape, classes=4, seed=0, ignore_frac=0.05, cell=6):
    """Smooth random regions of `classes` labels (uint8), a few ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    H, W = shape[-2:]
    lead = shape[:-2]
    noise = torch.rand((int(np.prod(lead)) if lead else 1, classes, H // cell + 2, W // cell + 2), generator=g)
    lab = F.interpolate(noise, size=(H, W), mode="bilinear", align_corners=False).argmax(1).to(torch.uint8)
    lab[torch.rand(lab.shape, generator=g) < ignore_frac] = IGNORE
    return lab.view(shape)


def noisy(shape, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, classes, shape, generator=g).to(torch.uint8)
    lab[torch.rand(shape, generator=g) < 0.1] = IGNORE
    return lab


def toycity_label(seed, domain="cityscapes", size=None):
    city = pytest.importorskip("toyworld.city")
    return torch.as_tensor(city.render_scene(domain, seed, size=size)[1])


# ---- connected components ----


def assert_components(labels, out, connectivity, ignore_index=IGNORE):
    """Partition equal to scipy.ndimage.label per class, raster-order ids, classes and areas."""
    comp, cls, area = (t.numpy() for t in out)
    lab = labels.numpy()
    assert comp.dtype == np.int32 and comp.shape == lab.shape and cls.dtype == area.dtype == np.int64
    assert (comp[lab == ignore_index] == -1).all() and (comp[lab != ignore_index] >= 0).all()
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    n_total = 0
    for c in np.unique(lab[lab != ignore_index]):
        mask = lab == c
        theirs, n = ndimage.label(mask, structure)
        pairs = np.unique(np.stack([comp[mask], theirs[mask]]), axis=1)  # a bijection: n distinct pairs
        assert pairs.shape[1] == n and len(np.unique(pairs[0])) == n
        assert (cls[comp[mask]] == c).all()
        n_total += n
    assert len(cls) == len(area) == n_total
    ids, first = np.unique(comp.ravel(), return_index=True)
    ids, first = ids[ids >= 0], first[ids >= 0]
    assert (ids == np.arange(n_total)).all() and (np.diff(first) > 0).all()  # numbered by first pixel
    assert (area == np.bincount(comp[comp >= 0], minlength=n_total)).all()


@pytest.mark.parametrize("impl", ["ext", "ref"])
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("make", [blobby, noisy])
def test_components_match_scipy(make, connectivity, impl):
    for seed, shape in enumerate([(37, 53), (64, 96), (1, 1), (1, 29), (31, 1), (2, 2)]):
        lab = make(shape, seed=seed)
        assert_components(lab, ops.connected_components(lab, connectivity, IGNORE, impl=impl), connectivity)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_toycity_and_ref(connectivity):
    for seed, domain in enumerate(["cityscapes", "gta", "mapillary"]):
        lab = toycity_label(seed, domain)
        ext = ops.connected_components(lab, connectivity, impl="ext")
        assert_components(lab, ext, connectivity)
        if seed == 0:
            ref = ops.connected_components_ref(lab, connectivity)
            assert all(torch.equal(a, b) for a, b in zip(ext, ref))


@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_across_strips(connectivity):
    """Maps over 2^20 pixels are split into strips of rows labelled in parallel and merged (4 strips here)."""
    lab = blobby((1700, 1900), classes=5, seed=8, ignore_frac=0.02, cell=60)
    lab[:, 950] = 3                                                          # a component through every strip
    assert_components(lab, ops.connected_components(lab, connectivity, impl="ext"), connectivity)
    lab = noisy((1100, 1000), seed=3)                                        # ~700k runs: strips run in parallel
    assert_components(lab, ops.connected_components(lab, connectivity, impl="ext"), connectivity)
    batch = torch.stack([blobby((700, 600), classes=3, seed=s, cell=50) for s in range(3)])  # strip edge inside image 1
    out = ops.connected_components(batch, connectivity, impl="ext")
    for b, off in enumerate(ops.component_offsets(out[0])[:-1].tolist()):
        single = ops.connected_components(batch[b], connectivity, impl="ext")
        assert torch.equal(out[0][b], torch.where(single[0] >= 0, single[0] + off, -1))
        assert torch.equal(out[2][off:off + len(single[2])], single[2])


def test_components_parallel_batch():
    """From 2^23 pixels the strips run in parallel: a 9.1 Mpx batch must equal its images labelled one by one."""
    batch = torch.stack([blobby((700, 1300), classes=3, seed=s, cell=50) for s in range(10)])
    comp, cls, area = ops.connected_components(batch, 4, impl="ext")
    offsets = ops.component_offsets(comp).tolist()
    for b in range(len(batch)):
        single = ops.connected_components(batch[b], 4, impl="ext")
        assert torch.equal(comp[b], torch.where(single[0] >= 0, single[0] + offsets[b], -1))
        assert torch.equal(area[offsets[b]:offsets[b + 1]], single[2]) and torch.equal(cls[offsets[b]:offsets[b + 1]],
                                                                                       single[1])
    for mode in ops.MODES:
        ext = ops.sample_points(comp, area, 4, 30000, mode, generator=7, impl="ext")
        ref = ops.sample_points_ref(comp, area, 4, 30000, mode, generator=7)
        assert len(ext[1]) > 10 and torch.equal(ext[0], ref[0]) and torch.equal(ext[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.int16, torch.bool])
def test_components_dtypes(dtype):
    lab = blobby((40, 45), seed=3)
    if dtype == torch.bool:
        lab = lab == 1
        out = ops.connected_components(lab, 4, ignore_index=None, impl="ext")
        assert_components(lab.to(torch.uint8), out, 4, ignore_index=-7)
        return
    out = ops.connected_components(lab.to(dtype), 4, IGNORE, impl="ext")
    assert all(torch.equal(a, b) for a, b in zip(out, ops.connected_components(lab, 4, IGNORE, impl="ext")))
    assert_components(lab, out, 4)


def test_components_negative_labels_and_no_ignore():
    lab = noisy((30, 33), seed=5).long() - 1                                 # labels -1, 0, 1 and 254
    for ignore in (None, -1):
        out = ops.connected_components(lab, 8, ignore_index=ignore, impl="ext")
        ref = ops.connected_components_ref(lab, 8, ignore_index=ignore)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
        assert_components(lab, out, 8, ignore_index=-12345 if ignore is None else ignore)


def test_components_non_contiguous_and_edge_cases():
    base = blobby((50, 70), seed=7)
    for view in (base.t(), base[::2, ::3], base[5:40, 10:11]):
        assert not view.is_contiguous() or view.shape[1] == 1
        assert_components(view, ops.connected_components(view, 4, impl="ext"), 4)
        assert all(torch.equal(a, b) for a, b in zip(ops.connected_components(view, 4, impl="ext"),
                                                      ops.connected_components(view.contiguous(), 4, impl="ext")))
    comp, cls, area = ops.connected_components(torch.full((9, 11), IGNORE, dtype=torch.uint8), impl="ext")
    assert (comp == -1).all() and cls.numel() == 0 and area.numel() == 0
    comp, cls, area = ops.connected_components(torch.zeros((0, 5), dtype=torch.uint8), impl="ext")
    assert comp.shape == (0, 5) and cls.numel() == 0
    with pytest.raises(ValueError):
        ops.connected_components(base.float())
    with pytest.raises(ValueError):
        ops.connected_components(base, connectivity=6)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_batch(connectivity):
    lab = torch.stack([blobby((33, 41), seed=s) for s in range(3)] + [torch.full((33, 41), IGNORE, dtype=torch.uint8)] +
                      [blobby((33, 41), seed=9)])
    comp, cls, area = ops.connected_components(lab, connectivity, impl="ext")
    ref = ops.connected_components_ref(lab, connectivity)
    assert torch.equal(comp, ref[0]) and torch.equal(cls, ref[1]) and torch.equal(area, ref[2])
    offsets = ops.component_offsets(comp)
    start = 0
    for b in range(lab.shape[0]):                                             # = the single images, shifted
        single = ops.connected_components(lab[b], connectivity, impl="ext")
        shifted = torch.where(single[0] >= 0, single[0] + start, -1)
        assert torch.equal(comp[b], shifted) and offsets[b] == start
        assert torch.equal(cls[start:start + len(single[1])], single[1])
        start += len(single[1])
    assert offsets[-1] == start == len(cls)


# ---- point prompts ----


def rect_map():
    """Components of known area on an ignored background: 4x5 = 20 px (class 1), 3x7 = 21 px (class 2), ..."""
    lab = torch.full((24, 30), IGNORE, dtype=torch.uint8)
    lab[1:5, 1:6] = 1           # area 20
    lab[8:11, 2:9] = 2          # area 21
    lab[14:22, 10:28] = 3       # area 144
    lab[1:4, 20:23] = 4         # area 9
    return lab


def test_points_inside_distinct_strict_threshold():
    comp, cls, area = ops.connected_components(rect_map(), impl="ext")
    for mode in ops.MODES:
        points, ids = ops.sample_points(comp, area, num_points=5, min_area=20, mode=mode, generator=0, impl="ext")
        assert ids.tolist() == torch.nonzero(area > 20).flatten().tolist()   # 20 px excluded, 21 px kept
        assert points.shape == (len(ids), 5, 2) and points.dtype == ids.dtype == torch.int64
        for p, c in zip(points, ids):
            assert (comp[p[:, 1], p[:, 0]] == c).all()
            assert len({tuple(xy) for xy in p.tolist()}) == 5
    points, ids = ops.sample_points(comp, area, num_points=5, min_area=19, generator=0, impl="ext")
    assert cls[ids].tolist() == [1, 2, 3]


def test_points_reproducible_and_seeded():
    lab = blobby((60, 80), seed=2, ignore_frac=0.0)
    comp, _, area = ops.connected_components(lab, impl="ext")
    kw = dict(num_points=5, min_area=30, impl="ext")
    a = ops.sample_points(comp, area, generator=torch.Generator().manual_seed(5), **kw)
    b = ops.sample_points(comp, area, generator=5, **kw)
    c = ops.sample_points(comp, area, generator=6, **kw)
    assert len(a[1]) > 2 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    torch.manual_seed(11)
    d = ops.sample_points(comp, area, **kw)
    torch.manual_seed(11)
    assert torch.equal(d[0], ops.sample_points(comp, area, **kw)[0])


@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("num_points", [1, 3, 5])
def test_points_ext_equals_ref(mode, num_points):
    lab = torch.stack([blobby((45, 70), seed=s) for s in range(2)])
    comp, _, area = ops.connected_components(lab, impl="ext")
    gone, gone2, few = torch.nonzero(area > 10).flatten()[[0, 3, 5]].tolist()
    eroded = comp.clone()
    eroded[(comp == gone) | (comp == gone2)] = -1                            # components with no pixels left
    eroded[torch.nonzero(comp == few)[3:].unbind(1)] = -1                    # 3 pixels left
    for c in (comp, eroded):
        ext = ops.sample_points(c, area, num_points, 10, mode, generator=3, impl="ext")
        ref = ops.sample_points_ref(c, area, num_points, 10, mode, generator=3)
        assert torch.equal(ext[0], ref[0]) and torch.equal(ext[1], ref[1])
    ids = ext[1].tolist()
    assert gone not in ids and gone2 not in ids and (few in ids) == (num_points <= 3)
    off = ops.component_offsets(comp)
    img = torch.searchsorted(off, ext[1], right=True) - 1
    assert (eroded[img[:, None], ext[0][..., 1], ext[0][..., 0]] == ext[1][:, None]).all()


def test_points_across_strips():
    lab = blobby((1500, 1400), classes=4, seed=6, ignore_frac=0.0, cell=50)
    comp, _, area = ops.connected_components(lab, impl="ext")
    for mode in ops.MODES:
        ext = ops.sample_points(comp, area, 5, 20000, mode, generator=2, impl="ext")
        ref = ops.sample_points_ref(comp, area, 5, 20000, mode, generator=2)
        assert len(ext[1]) > 3 and torch.equal(ext[0], ref[0]) and torch.equal(ext[1], ref[1])


def test_points_interior_is_farthest():
    lab = torch.stack([toycity_label(0)[:96, :160], blobby((96, 160), seed=4, ignore_frac=0.0)])
    comp, _, area = ops.connected_components(lab, impl="ext")
    points, ids = ops.sample_points(comp, area, num_points=4, min_area=40, mode="interior", generator=1, impl="ext")
    assert len(ids) > 5
    off = ops.component_offsets(comp)
    for p, c in zip(points, ids.tolist()):
        b = int(torch.searchsorted(off, torch.tensor(c), right=True)) - 1
        mask = (comp[b] == c).numpy()
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]   # image border counts as boundary
        best = np.flatnonzero(dist == dist[mask].max())
        x, y = p[0].tolist()
        assert y * mask.shape[1] + x == best[0]                              # farthest, first in raster order
        assert len({tuple(xy) for xy in p.tolist()}) == 4


def test_points_uniform_over_pixels():
    lab = torch.full((6, 8), IGNORE, dtype=torch.uint8)
    lab[1:4, 2:6] = 0                                                        # 12 pixels
    comp, _, area = ops.connected_components(lab, impl="ext")
    g = torch.Generator().manual_seed(0)
    for mode, k in (("random", 3), ("interior", 3)):
        counts = torch.zeros(lab.shape, dtype=torch.long)
        for _ in range(240):
            points, ids = ops.sample_points(comp, area, num_points=k, min_area=5, mode=mode, generator=g, impl="ext")
            counts[points[0, 1:, 1], points[0, 1:, 0]] += 1                  # the random points
        picked = counts[comp == 0].float()
        expected = 240 * (k - 1) / (12 - (mode == "interior"))
        if mode == "random":
            assert (picked > 0.5 * expected).all() and (picked < 1.5 * expected).all()
        else:
            first = points[0, 0]
            assert counts[first[1], first[0]] == 0                           # never the first point again
            assert (picked > 0).sum() == 11


def test_points_errors():
    comp, _, area = ops.connected_components(rect_map(), impl="ext")
    with pytest.raises(ValueError):
        ops.sample_points(comp, area, mode="center")
    with pytest.raises(ValueError):
        ops.sample_points(comp, area, num_points=0)
    with pytest.raises(RuntimeError):
        ops.sample_points(comp, area[:2], min_area=0, impl="ext")           # ids beyond comp_area


# ---- semantic inference ----


def semantic_inputs(B, Q, C, h, w, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Q, C + 1, generator=g) * 2, torch.randn(B, Q, h, w, generator=g) * scale


def assert_semantic(class_logits, mask_logits, size):
    ref = ops.masks_to_semantic_ref(class_logits, mask_logits, size, return_scores=True)
    scores = ops.masks_to_semantic(class_logits, mask_logits, size, return_scores=True, impl="ext")
    labels = ops.masks_to_semantic(class_logits, mask_logits, size, impl="ext")
    assert scores.dtype == torch.float32 and labels.dtype == torch.int64 and labels.shape == ref.argmax(1).shape
    assert torch.allclose(scores, ref, atol=1e-5, rtol=0)
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5                                  # not an exact tie
    assert torch.equal(labels[clear], ref.argmax(1)[clear])


@pytest.mark.parametrize("B,Q,C,h,w,H,W", [
    (2, 10, 5, 7, 9, 31, 45),       # odd upsampling
    (1, 100, 19, 16, 32, 64, 128),  # the real Q and C, x4
    (2, 7, 3, 40, 30, 13, 11),      # downsampling
    (1, 5, 4, 1, 1, 5, 7),          # 1x1 masks
    (1, 6, 2, 5, 6, 5, 6),          # same size
    (1, 3, 40, 3, 50, 20, 17),      # more classes than one register block, mixed up/down
])
def test_semantic_matches_reference(B, Q, C, h, w, H, W):
    assert_semantic(*semantic_inputs(B, Q, C, h, w), (H, W))


def test_semantic_non_contiguous_and_half():
    class_logits, mask_logits = semantic_inputs(2, 8, 4, 12, 10)
    assert_semantic(class_logits.transpose(0, 1).contiguous().transpose(0, 1), mask_logits.transpose(2, 3), (20, 30))
    half = ops.masks_to_semantic(class_logits.half(), mask_logits.half(), (20, 30), return_scores=True, impl="ext")
    ref = ops.masks_to_semantic_ref(class_logits.half().float(), mask_logits.half().float(), (20, 30), True)
    assert half.dtype == torch.float32 and torch.allclose(half, ref, atol=1e-5)


def test_semantic_reference_float64():
    """The reference is §3.4: bilinear (align_corners=False) written out in numpy float64, sigmoid, softmax."""
    class_logits, mask_logits = semantic_inputs(2, 6, 4, 5, 7, scale=3.0)
    class_logits, mask_logits = class_logits.double(), mask_logits.double()
    H, W = 13, 6

    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    (y0, y1, ly), (x0, x1, lx) = axis(5, H), axis(7, W)
    m = mask_logits.numpy()
    rows = m[:, :, y0] * (1 - ly)[:, None] + m[:, :, y1] * ly[:, None]
    up = rows[..., x0] * (1 - lx) + rows[..., x1] * lx                        # (B, Q, H, W)
    prob = np.exp(class_logits.numpy())
    prob = (prob / prob.sum(-1, keepdims=True))[..., :-1]
    expected = np.einsum("bqc,bqhw->bchw", prob, 1 / (1 + np.exp(-up)))
    ref = ops.masks_to_semantic_ref(class_logits, mask_logits, (H, W), return_scores=True)
    assert ref.dtype == torch.float64 and np.allclose(ref.numpy(), expected, atol=1e-12)
    labels = ops.masks_to_semantic_ref(class_logits, mask_logits, (H, W))
    assert torch.equal(labels, torch.as_tensor(expected).argmax(1))


def test_semantic_inference_only():
    class_logits, mask_logits = semantic_inputs(1, 4, 3, 6, 6)
    mask_logits.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.masks_to_semantic(class_logits, mask_logits, (12, 12), impl="ext")
    with torch.no_grad():
        ops.masks_to_semantic(class_logits, mask_logits, (12, 12), impl="ext")
    ops.masks_to_semantic(class_logits, mask_logits, (12, 12), return_scores=True, impl="ref").sum().backward()
    assert mask_logits.grad is not None and mask_logits.grad.abs().sum() > 0


# ---- multi-scale deformable attention ----


def deform_inputs(B, nH, Dh, shapes, Lq, nP, dtype=torch.float32, seed=0, spread=0.25):
    """value (B, S, nH, Dh), locations (B, Lq, nH, nL, nP, 2), weights (B, Lq, nH, nL, nP) and an output gradient.

    Locations are uniform in [-spread, 1 + spread] (some outside the map); the first queries of every level sit on
    the borders and pixel centres: x or y exactly 0, 1, 0.5/w (the first centre), 1 - 0.5/w, -0.5/w and 1 + 0.5/w
    (one pixel outside), and mid-cell 1/w.
    """
    g = torch.Generator().manual_seed(seed)
    S, nL = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, nH, Dh, generator=g, dtype=torch.float64).to(dtype)
    loc = (torch.rand(B, Lq, nH, nL, nP, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread).to(dtype)
    for l, (h, w) in enumerate(shapes):
        for axis, n in ((0, w), (1, h)):
            special = torch.tensor([0.0, 1.0, 0.5 / n, 1 - 0.5 / n, -0.5 / n, 1 + 0.5 / n, 1.0 / n], dtype=dtype)
            k = min(len(special), Lq)
            loc[:, :k, :, l, 0, axis] = special[:k, None]
    weights = torch.rand(B, Lq, nH, nL, nP, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, Lq, nH * Dh, generator=g, dtype=torch.float64).to(dtype)
    return value, loc, weights, grad


def deform_run(fn, value, shapes, loc, weights, grad):
    """(output, d value, d locations, d weights) of fn for the output gradient `grad`."""
    inputs = [t.detach().requires_grad_() for t in (value, loc, weights)]
    out = fn(inputs[0], shapes, inputs[1], inputs[2])
    return (out.detach(),) + torch.autograd.grad(out, inputs, grad)


def assert_deform_close(got, want, rel):
    for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        tol = rel * max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= tol, f"{name}: max abs diff {(a - b).abs().max().item():.3g} > {tol:.3g}"


DEFORM_CASES = [  # B, nH, Dh, nP, shapes (odd, non-square; x and y swapped would read other pixels), Lq
    (1, 1, 3, 2, [(5, 7)], 9),
    (2, 3, 5, 2, [(7, 5), (3, 4), (1, 2)], 13),
    (2, 8, 32, 4, [(3, 5), (6, 9), (12, 17)], 40),
]


@pytest.mark.parametrize("B, nH, Dh, nP, shapes, Lq", DEFORM_CASES)
def test_deform_attn_matches_reference(B, nH, Dh, nP, shapes, Lq):
    value, loc, weights, grad = deform_inputs(B, nH, Dh, shapes, Lq, nP)
    ext = deform_run(lambda *a: ops.ms_deform_attn(*a, impl="ext"), value, shapes, loc, weights, grad)
    ref = deform_run(ops.ms_deform_attn_ref, value, shapes, loc, weights, grad)
    assert_deform_close(ext, ref, 1e-5)                                      # float32 vs float32 grid_sample
    assert ext[0].abs().max() > 0 and ext[2].abs().max() > 0                 # not trivially zero
    f64 = [t.double() for t in (value, loc, weights, grad)]
    ext64 = deform_run(lambda *a: ops.ms_deform_attn(*a, impl="ext"), f64[0], shapes, *f64[1:])
    ref64 = deform_run(ops.ms_deform_attn_ref, f64[0], shapes, *f64[1:])
    assert_deform_close(ext64, ref64, 1e-12)


def test_deform_attn_hand_computed():
    """One point on a 2x3 map: x = 0.5 -> pixel x 1.0, y = 0.5 -> pixel y 0.5: the mean of rows 0 and 1 at x=1."""
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)              # map [[0, 1, 2], [3, 4, 5]]
    loc = torch.tensor([0.5, 0.5], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    w = torch.full((1, 1, 1, 1, 1), 2.0, dtype=torch.float64)
    out = ops.ms_deform_attn(value, [(2, 3)], loc, w, impl="ext")
    assert out.item() == pytest.approx(2.0 * (1 + 4) / 2)
    gv, gl, gw = torch.ops.clouds.ms_deform_attn_backward(torch.ones(1, 1, 1, dtype=torch.float64), value, [2, 3],
                                                          loc, w)
    assert gv.flatten().tolist() == pytest.approx([0, 1, 0, 0, 1, 0])       # w * (1 - fx) * (1 - fy) at x=1, y=0,1
    assert gw.item() == pytest.approx(2.5)
    # d/dx (pixel x = 3 * loc_x - 0.5 = 1.0, floor 1): right minus left neighbour = 1, times w * width 3
    # d/dy: row 1 minus row 0 = 3, times w * height 2
    assert gl.flatten().tolist() == pytest.approx([2.0 * 3 * 1, 2.0 * 2 * 3])


def test_deform_attn_gradcheck():
    value, loc, weights, _ = deform_inputs(2, 2, 3, [(3, 4), (2, 3)], 5, 2, dtype=torch.float64, seed=3, spread=0.1)
    loc[:, :, :, :, 0] = torch.rand(loc[:, :, :, :, 0].shape, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(4))  # no point exactly on a cell edge
    args = [t.requires_grad_() for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(lambda v, l, w: ops.ms_deform_attn(v, [(3, 4), (2, 3)], l, w, impl="ext"), args,
                                    eps=1e-6, atol=1e-7)


def test_deform_attn_non_contiguous_and_dispatch(monkeypatch):
    clouds = pytest.importorskip("clouds")
    B, nH, Dh, nP, shapes, Lq = 2, 3, 4, 2, [(5, 3), (2, 7)], 6
    value, loc, weights, grad = deform_inputs(B, nH, Dh, shapes, Lq, nP, seed=5)
    v_nc = value.transpose(1, 2).contiguous().transpose(1, 2)                   # (B, S, nH, Dh), strided
    l_nc = torch.stack([loc, loc], -2).select(-2, 1)                          # (B, Lq, nH, nL, nP, 2), strided
    w_nc = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (v_nc.is_contiguous() or l_nc.is_contiguous() or w_nc.is_contiguous())
    ref = deform_run(ops.ms_deform_attn_ref, value, shapes, loc, weights, grad)
    ext = deform_run(lambda *a: ops.ms_deform_attn(*a, impl="ext"), v_nc, shapes, l_nc, w_nc, grad)
    assert_deform_close(ext, ref, 1e-5)
    assert_deform_close(deform_run(clouds.ms_deform_attn, value, shapes, loc, weights, grad), ext, 0)
    half = ops.ms_deform_attn(value.bfloat16(), shapes, loc.bfloat16(), weights.bfloat16())  # bf16 -> reference
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), ref[0], atol=0.1)
    monkeypatch.setenv("CLOUDS_OPS_IMPL", "ref")
    calls = []
    monkeypatch.setattr(ops, "ms_deform_attn_ref", lambda *a: calls.append(1) or ref[0])
    ops.ms_deform_attn(value, shapes, loc, weights)
    assert calls == [1]
    empty = ops.ms_deform_attn(value, shapes, loc[:, :0], weights[:, :0], impl="ext")
    assert empty.shape == (B, 0, nH * Dh)


def test_deform_attn_errors():
    value, loc, weights, _ = deform_inputs(1, 2, 3, [(3, 4)], 5, 2)
    with pytest.raises(ValueError, match="sum to"):
        ops.ms_deform_attn(value, [(3, 5)], loc, weights)
    with pytest.raises(ValueError, match="nL=2"):
        ops.ms_deform_attn(value, [(3, 4), (1, 1)], loc, weights)
    with pytest.raises(ValueError, match="one dtype"):
        ops.ms_deform_attn(value, [(3, 4)], loc.double(), weights)
    ops.load_extension()
    with pytest.raises(RuntimeError, match="level sizes sum"):
        torch.ops.clouds.ms_deform_attn(value, [3, 5], loc, weights)


# ---- dispatch, opcheck ----


def test_impl_selection(monkeypatch):
    with pytest.raises(ValueError):
        ops.connected_components(rect_map(), impl="fast")
    monkeypatch.setenv("CLOUDS_OPS_IMPL", "ref")
    assert ops._use_ext("auto") is False and ops._use_ext("ext") is True
    monkeypatch.setenv("CLOUDS_OPS_IMPL", "gpu")
    with pytest.raises(ValueError):
        ops._use_ext("auto")


def test_opcheck():
    ops.load_extension()
    lab = blobby((20, 23), seed=1)
    torch.library.opcheck(torch.ops.clouds.connected_components.default, (lab, 4, IGNORE))
    comp, _, area = ops.connected_components(lab, impl="ext")
    cand = torch.nonzero(area > 3).flatten()
    uniforms = torch.rand(len(cand), 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.clouds.sample_points.default, (comp, cand, uniforms, len(area), 4, False))
    torch.library.opcheck(torch.ops.clouds.sample_points.default, (comp, cand, uniforms[:, :3], len(area), 4, True))
    class_logits, mask_logits = semantic_inputs(2, 5, 3, 6, 7)
    prob = class_logits.softmax(-1)[..., :-1].contiguous()
    for scores in (False, True):
        torch.library.opcheck(torch.ops.clouds.masks_to_semantic.default, (prob, mask_logits, 11, 9, scores))
    for dtype in (torch.float32, torch.float64):
        value, loc, weights, grad = deform_inputs(2, 3, 4, [(3, 5), (2, 2)], 7, 2, dtype=dtype)
        torch.library.opcheck(torch.ops.clouds.ms_deform_attn.default, (value, [3, 5, 2, 2], loc, weights))
        torch.library.opcheck(torch.ops.clouds.ms_deform_attn_backward.default,
                              (grad, value, [3, 5, 2, 2], loc, weights))


# ---- CUDA ----


@needs_cuda
@pytest.mark.parametrize("connectivity", [4, 8])
def test_cuda_components_equal_cpu(connectivity):
    for lab in (blobby((512, 1024), classes=19, seed=0, cell=16), noisy((3, 61, 77), seed=1), toycity_label(2)):
        cpu = ops.connected_components(lab, connectivity, impl="ext")
        gpu = ops.connected_components(lab.cuda(), connectivity, impl="ext")
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))


@needs_cuda
@pytest.mark.parametrize("mode", ops.MODES)
def test_cuda_points_equal_cpu(mode):
    lab = torch.stack([blobby((120, 160), seed=s) for s in range(2)])
    comp, _, area = ops.connected_components(lab, impl="ext")
    cpu = ops.sample_points(comp, area, 5, 50, mode, generator=4, impl="ext")
    gpu = ops.sample_points(comp.cuda(), area.cuda(), 5, 50, mode, generator=4, impl="ext")
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


@needs_cuda
def test_cuda_semantic_close_to_cpu():
    class_logits, mask_logits = semantic_inputs(2, 100, 19, 32, 64)
    cpu = ops.masks_to_semantic(class_logits, mask_logits, (128, 256), return_scores=True, impl="ext")
    gpu = ops.masks_to_semantic(class_logits.cuda(), mask_logits.cuda(), (128, 256), return_scores=True, impl="ext")
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)
    labels = ops.masks_to_semantic(class_logits.cuda(), mask_logits.cuda(), (128, 256), impl="ext").cpu()
    top2 = cpu.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    assert torch.equal(labels[clear], cpu.argmax(1)[clear])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_deform_attn_close_to_cpu(dtype):
    shapes = [(12, 17), (6, 9), (3, 5)]
    value, loc, weights, grad = deform_inputs(2, 8, 32, shapes, 300, 4, dtype=dtype)
    fn = lambda *a: ops.ms_deform_attn(*a, impl="ext")                       # noqa: E731
    cpu = deform_run(fn, value, shapes, loc, weights, grad)
    gpu = deform_run(fn, value.cuda(), shapes, loc.cuda(), weights.cuda(), grad.cuda())
    assert_deform_close([t.cpu() for t in gpu], cpu, 1e-5 if dtype == torch.float32 else 1e-12)


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") or os.path.exists(os.path.join(home, "bin", "nvcc"))


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch cannot build CUDA sources")
@pytest.mark.skipif(not _nvcc(), reason="nvcc not found (set CUDA_HOME)")
def test_cuda_sources_compile():
    """Builds the CPU+CUDA variant (no GPU needed) in a fresh process: one TORCH_LIBRARY per process."""
    code = ("import ops, torch\n"
            "path = ops.load_extension(with_cuda=True)\n"
            "names = ('connected_components', 'sample_points', 'masks_to_semantic', 'ms_deform_attn',\n"
            "         'ms_deform_attn_backward')\n"
            "assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f'clouds::{n}', k)\n"
            "           for n in names for k in ('CPU', 'CUDA'))\n"
            "print(path)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lib = Path(run.stdout.strip().splitlines()[-1])
    assert lib.is_file() and lib.name.startswith("clouds_ops_cuda")
    objects = {p.name for p in lib.parent.glob("*.cuda.o")}
    assert {f"{n}_cuda.cuda.o" for n in ("connected_components", "sample_points", "masks_to_semantic",
                                         "ms_deform_attn")} <= objects
