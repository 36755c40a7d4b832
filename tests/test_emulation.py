"""The CUDA kernels (csrc/*_cuda.cu) executed without a GPU.

ops.load_extension(emulation=True) compiles the unchanged .cu files as host C++ (csrc/emulation/) and registers the CUDA
code path of every op for CPU tensors as torch.ops.clouds_emu.<op>; each CUDA thread is a fiber, and the threads of a
launch run in order (schedule 0) or in a seeded random interleaving that switches at every atomic, volatile access and
warp collective. Every test compares with the CPU op (torch.ops.clouds.<op>) on the same inputs. `pytest -k emul` runs
them all; CLOUDS_EMUL_REPORT=FILE writes every comparison (op, case, schedule, max difference) to FILE as JSON.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
from test_ops import DEFORM_CASES, IGNORE, blobby, deform_inputs, noisy, semantic_inputs, toycity_label

import ops

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulation's fibers need Linux")

SCHEDULES = (0, 1, 2, 3, 4)  # 0: each block's threads in order; others: random interleavings of 8 resident blocks
RESIDENT = 8
RECORD = []  # every comparison: {"op", "case", "schedule", "max_diff"}


@pytest.fixture(scope="module")
def emu():
    ops.load_extension()
    ops.load_extension(emulation=True)
    yield torch.ops.clouds_emu
    if os.environ.get("CLOUDS_EMUL_REPORT"):
        with open(os.environ["CLOUDS_EMUL_REPORT"], "w") as f:
            json.dump(RECORD, f, indent=0)


def record(op, case, schedule, diff=0.0):
    RECORD.append({"op": op, "case": case, "schedule": schedule, "max_diff": float(diff)})


def schedule(emu, seed):
    emu.set_schedule(seed, RESIDENT)


# ---- connected components ----


def serpentine(H, W):
    """Class 1 snakes through the map row by row (one component of ~H*W/2 pixels: the longest union-find chains),
    class 0 fills the gaps."""
    lab = torch.zeros(H, W, dtype=torch.uint8)
    lab[::2] = 1
    lab[1::4, -1] = 1
    lab[3::4, 0] = 1
    return lab


def seam_batch():
    """Two images whose touching rows (image 0's last, image 1's first) have the same label: never one component."""
    batch = torch.stack([blobby((20, 37), seed=11), blobby((20, 37), seed=12)])
    batch[0, -1] = 2
    batch[1, 0] = 2
    return batch


COMPONENT_CASES = [  # name, labels, ignore_index
    ("blobby 37x53", blobby((37, 53), seed=1), IGNORE),
    ("noisy 64x96", noisy((64, 96), seed=2), IGNORE),
    ("one pixel", torch.tensor([[3]], dtype=torch.uint8), IGNORE),
    ("one row 1x29", blobby((1, 29), seed=3), IGNORE),
    ("one column 31x1", blobby((31, 1), seed=4), IGNORE),
    ("2x2", noisy((2, 2), seed=5), IGNORE),
    ("odd 45x67 int32", blobby((45, 67), seed=6).to(torch.int32), IGNORE),
    ("int64, negative labels, no ignore", noisy((30, 33), seed=5).long() - 1, None),
    ("batch of 5, one all ignored", torch.stack([blobby((33, 41), seed=s) for s in range(3)]
                                                + [torch.full((33, 41), IGNORE, dtype=torch.uint8),
                                                   blobby((33, 41), seed=9)]), IGNORE),
    ("batch seam", seam_batch(), IGNORE),
    ("all ignored 9x11", torch.full((9, 11), IGNORE, dtype=torch.uint8), IGNORE),
    ("empty 0x5", torch.zeros((0, 5), dtype=torch.uint8), IGNORE),
    ("empty batch 3x0x7", torch.zeros((3, 0, 7), dtype=torch.uint8), IGNORE),
    ("one giant serpentine 61x64", serpentine(61, 64), IGNORE),
    ("one uniform component 40x300", torch.zeros((40, 300), dtype=torch.uint8), IGNORE),
]


@pytest.mark.parametrize("connectivity", [4, 8])
def test_emul_components_equal_cpu(emu, connectivity):
    for name, lab, ignore in COMPONENT_CASES:
        want = torch.ops.clouds.connected_components(lab, connectivity, ignore)
        for seed in SCHEDULES:
            schedule(emu, seed)
            got = emu.connected_components(lab, connectivity, ignore)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), f"{name}, schedule {seed}"
            record("connected_components", f"{name}, {connectivity}-conn", seed)
            if seed and lab.numel() > 1:                                      # the random schedules interleave
                assert emu.schedule_stats()[2] > 0


def test_emul_schedules_are_seeded(emu):
    """The same seed gives the same interleaving (switch count), another seed another one, in order none."""
    lab = blobby((37, 53), seed=1)
    counts = []
    for seed in (0, 7, 7, 8):
        schedule(emu, seed)
        emu.connected_components(lab, 4, IGNORE)
        counts.append(emu.schedule_stats())
    assert counts[0][2] == 0 and counts[1] == counts[2] and counts[1][2] != counts[3][2]
    assert counts[0][:2] == counts[1][:2] == [4, 4 * 2048]                   # 4 launches of 8 blocks of 256
    assert counts[0][3] == counts[1][3] == 2 * 2048                           # __activemask, __match_any_sync


def test_emul_components_full_size(emu):
    """A 1024x2048 street map (large uniform regions: long union-find chains) in order, a 256x512 crop of it in a
    random interleaving (a row is two blocks wide, so vertical unions cross blocks)."""
    lab = toycity_label(0, size=(1024, 2048))
    for seed, view in ((0, lab), (1, lab[300:556, 700:1212])):
        for connectivity in (4, 8) if seed else (4,):
            want = torch.ops.clouds.connected_components(view.contiguous(), connectivity, IGNORE)
            schedule(emu, seed)
            got = emu.connected_components(view.contiguous(), connectivity, IGNORE)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            record("connected_components", f"toycity {tuple(view.shape)}, {connectivity}-conn", seed)


# ---- point prompts ----


def point_inputs():
    lab = torch.stack([blobby((45, 70), seed=s) for s in range(2)])
    comp, _, area = torch.ops.clouds.connected_components(lab, 4, IGNORE)
    gone, few = torch.nonzero(area > 10).flatten()[[0, 5]].tolist()
    eroded = comp.clone()
    eroded[comp == gone] = -1                                                 # a candidate with no pixel left
    eroded[torch.nonzero(comp == few)[3:].unbind(1)] = -1                     # one with 3 pixels left
    one = torch.zeros((1, 1), dtype=torch.int32)
    return [("2x45x70", comp, area, 10), ("2x45x70 eroded", eroded, area, 10),
            ("one pixel", one, torch.ones(1, dtype=torch.long), 0),
            ("all -1", torch.full((6, 7), -1, dtype=torch.int32), area[:3], 0),
            ("no candidate", comp, area, 10 ** 6)]


def point_args(comp, area, min_area, num_points, interior, seed=0):
    cand = torch.nonzero(area > min_area).flatten()
    u = torch.rand(len(cand), num_points - interior, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return comp, cand, u, len(area), num_points, interior


@pytest.mark.parametrize("mode", ops.MODES)
def test_emul_points_equal_cpu(emu, mode):
    for name, comp, area, min_area in point_inputs():
        for num_points in (1, 3, 5):
            args = point_args(comp, area, min_area, num_points, mode == "interior")
            want = torch.ops.clouds.sample_points(*args)
            for seed in SCHEDULES:
                schedule(emu, seed)
                assert torch.equal(emu.sample_points(*args), want), f"{name}, K={num_points}, schedule {seed}"
                record("sample_points", f"{name}, {mode}, K={num_points}", seed)


def test_emul_points_full_size(emu):
    """Both modes on a 1024x2048 street map: the interior mode's distance transform at full size."""
    comp, _, area = torch.ops.clouds.connected_components(toycity_label(1, size=(1024, 2048)), 4, IGNORE)
    schedule(emu, 0)
    for interior in (False, True):
        args = point_args(comp, area, 5000, 5, interior, seed=3)
        assert len(args[1]) > 5 and torch.equal(emu.sample_points(*args), torch.ops.clouds.sample_points(*args))
        record("sample_points", f"toycity 1024x2048, {'interior' if interior else 'random'}", 0)


def first_line(call):
    with pytest.raises(RuntimeError) as e:
        call()
    return str(e.value).splitlines()[0]


def test_emul_points_reject_what_cpu_rejects(emu):
    """F3: the CUDA op checks candidate ids (range, duplicates) and the map's ids like the CPU op, same messages."""
    comp, _, area = torch.ops.clouds.connected_components(blobby((30, 40), seed=2), 4, IGNORE)
    N, u = len(area), torch.rand(3, 2, dtype=torch.float64)
    schedule(emu, 0)
    for cand, n in ([-1, 0, 1], N), ([0, N, 1], N), ([2, 5, 2], N), ([0, 1, 2], N - 1):
        args = (comp, torch.tensor(cand), u, n, 2, False)
        message = first_line(lambda: torch.ops.clouds.sample_points(*args))
        assert first_line(lambda: emu.sample_points(*args)) == message
        assert ("outside" in message) or ("twice" in message) or ("num_components" in message)


# ---- semantic inference ----

SEMANTIC_CASES = [  # B, Q, C, h, w, H, W
    (2, 10, 5, 7, 9, 31, 45),       # odd upsampling, batch 2
    (1, 100, 19, 16, 32, 64, 128),  # the real Q and C
    (2, 7, 3, 40, 30, 13, 11),      # downsampling
    (1, 5, 4, 1, 1, 5, 7),          # 1x1 masks
    (1, 3, 40, 3, 50, 20, 17),      # more classes than one register block
    (1, 4, 3, 5, 5, 1, 1),          # one output pixel
]


@pytest.mark.parametrize("B,Q,C,h,w,H,W", SEMANTIC_CASES)
def test_emul_semantic_equal_cpu(emu, B, Q, C, h, w, H, W):
    class_logits, mask_logits = semantic_inputs(B, Q, C, h, w)
    prob = class_logits.softmax(-1)[..., :-1].contiguous()
    want = torch.ops.clouds.masks_to_semantic(prob, mask_logits, H, W, True)
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5                                  # not a tie
    for seed in SCHEDULES[:2]:                                                # no switch points in this kernel
        schedule(emu, seed)
        scores = emu.masks_to_semantic(prob, mask_logits, H, W, True)
        diff = (scores - want).abs().max().item()
        assert diff <= 1e-5, diff                                             # host expf vs the CPU's polynomial
        labels = emu.masks_to_semantic(prob, mask_logits, H, W, False)
        assert torch.equal(labels[clear], want.argmax(1)[clear])
        record("masks_to_semantic", f"{(B, Q, C, h, w, H, W)}", seed, diff)


# ---- multi-scale deformable attention ----


def deform_both(fn, value, shapes, loc, weights, grad):
    flat = [n for hw in shapes for n in hw]
    return (fn.ms_deform_attn(value, flat, loc, weights),) + tuple(fn.ms_deform_attn_backward(grad, value, flat, loc,
                                                                                               weights))


def max_rel_diff(got, want):
    return max((a - b).abs().max().item() / max(1.0, b.abs().max().item()) if b.numel() else 0.0
               for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emul_deform_attn_equal_cpu(emu, dtype):
    """Forward and backward (the backward's atomicAdd order changes with the schedule: float32 sums differ in the
    last bits)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    cases = DEFORM_CASES + [(1, 2, 3, 1, [(1, 1), (2, 1)], 5),              # one-pixel and one-column levels
                            (1, 8, 32, 4, [(12, 17), (6, 9), (3, 5)], 300)]  # the head's nH, Dh, nP
    for B, nH, Dh, nP, shapes, Lq in cases:
        inputs = deform_inputs(B, nH, Dh, shapes, Lq, nP, dtype=dtype)
        want = deform_both(torch.ops.clouds, inputs[0], shapes, *inputs[1:])
        for seed in SCHEDULES if Lq < 100 else SCHEDULES[:2]:
            schedule(emu, seed)
            diff = max_rel_diff(deform_both(emu, inputs[0], shapes, *inputs[1:]), want)
            assert diff <= tol, (B, nH, Dh, nP, shapes, Lq, seed, diff)
            record(f"ms_deform_attn fwd+bwd {str(dtype)[6:]}", f"{(B, nH, Dh, nP, shapes, Lq)}", seed, diff)


def fma_cell_changes(n):
    """Pixel centres l = (i + 0.5) / n (float32, as clouds.py's reference points) whose bilinear cell changes when the
    source coordinate ((2l - 1 + 1) * n - 1) / 2 contracts to an FMA, as torch's CUDA grid_sample does under nvcc."""
    l = ((torch.arange(n) + 0.5) / n).numpy()
    a = (l * np.float32(2) - np.float32(1)) + np.float32(1)
    rounded = (a * np.float32(n) - np.float32(1)) / np.float32(2)
    fused = np.float32(a.astype(np.float64) * n - 1.0) / np.float32(2)      # one rounding of a * n - 1
    return np.flatnonzero(np.floor(rounded) != np.floor(fused))


def test_emul_deform_attn_same_cells_as_cpu(emu):
    """F1: at pixel centres the location gradient jumps between bilinear cells; the CUDA kernel rounds the source
    coordinate as the CPU kernel does (not as nvcc's FMA contraction of grid_sample's formula), so it picks the same
    cell at every centre, including those where the FMA would pick the neighbouring one."""
    h, w = 58, 248                                                            # grid sizes where the FMA differs
    assert len(fma_cell_changes(h)) > 0 and len(fma_cell_changes(w)) > 0
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    loc = torch.stack([x.flatten(), y.flatten()], -1).view(1, h * w, 1, 1, 1, 2)
    value = torch.randn(1, h * w, 1, 2, generator=g)
    weights, grad = torch.ones(1, h * w, 1, 1, 1), torch.randn(1, h * w, 2, generator=g)
    schedule(emu, 0)
    want = deform_both(torch.ops.clouds, value, [(h, w)], loc, weights, grad)
    got = deform_both(emu, value, [(h, w)], loc, weights, grad)
    diff = max_rel_diff(got[2:3], want[2:3])                                  # a wrong cell: O(w) differences
    assert diff <= 1e-6, diff
    record("ms_deform_attn cells at pixel centres", f"{h}x{w} float32", 0, diff)


def test_emul_empty_launches(emu):
    """F2: every launcher returns without launching when it has no threads (an empty grid is an invalid launch
    configuration on a GPU): zero points or levels, no query, no candidate, an empty map or output."""
    value, loc, weights, grad = deform_inputs(2, 3, 4, [(3, 5), (2, 2)], 6, 2)
    cases = {"nP = 0": (value, [(3, 5), (2, 2)], loc[:, :, :, :, :0], weights[..., :0], grad),
             "nL = 0": (value[:, :0], [], loc[:, :, :, :0], weights[:, :, :, :0], grad),
             "Lq = 0": (value, [(3, 5), (2, 2)], loc[:, :0], weights[:, :0], grad[:, :0]),
             "B = 0": (value[:0], [(3, 5), (2, 2)], loc[:0], weights[:0], grad[:0])}
    schedule(emu, 0)
    for name, (v, shapes, l, w, g) in cases.items():
        args = (v.contiguous(), shapes, l.contiguous(), w.contiguous(), g.contiguous())
        want = deform_both(torch.ops.clouds, *args)
        assert all(torch.equal(a, b) for a, b in zip(deform_both(emu, *args), want)), name
        record("ms_deform_attn fwd+bwd float32", f"empty: {name}", 0)
    prob, masks = semantic_inputs(2, 3, 4, 5, 5)
    prob = prob.softmax(-1)[..., :-1].contiguous()
    assert emu.masks_to_semantic(prob, masks, 0, 7, False).shape == (2, 0, 7)
    comp = torch.zeros((0, 6), dtype=torch.int32)
    args = (comp, torch.tensor([0]), torch.rand(1, 2, dtype=torch.float64), 1, 3, True)
    assert torch.equal(emu.sample_points(*args), torch.ops.clouds.sample_points(*args))


# ---- the emulated GPU itself ----


def expected_warp(values, block, op):
    """What each thread of csrc/emulation/emulation_ops.cpp's warp_kernel must write (-1: returned; None: undefined)."""
    v, n, out = values.tolist(), len(values), []
    for t in range(n):
        if v[t] < 0:
            out.append(-1)
            continue
        base = t - (t % block) + (t % block) // 32 * 32                      # lane 0 of t's warp
        lanes = [u for u in range(base, min(base + 32, t - t % block + block))]
        active = [u for u in lanes if u < n and v[u] >= 0]
        mask = sum(1 << (u - base) for u in active)
        if op == 0:
            r = sum(1 << (u - base) for u in active if v[u] == v[t])
        elif op == 1:
            r = sum(1 << (u - base) for u in active if v[u] & 1)
        else:
            src = base + ((t - base) + 1) % 32
            r = v[src] if src in active else None
        out.append(None if r is None else mask << 32 | r)
    return out


@pytest.mark.parametrize("seed", SCHEDULES)
def test_emul_probe_warp_collectives(emu, seed):
    """__activemask, __match_any_sync, __ballot_sync and __shfl_sync across the fibers of one warp: every lane of the
    mask arrives before any leaves, lanes that returned are not active (3 warps per block, the last one partial)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 4, (250,), generator=g, dtype=torch.int32)
    values[torch.rand(250, generator=g) < 0.2] = -1                           # these threads return first
    schedule(emu, seed)
    for op in (0, 1, 2):
        got = [a if a == -1 else a % 2 ** 64 for a in emu.probe_warp(values, 80, op).tolist()]  # int64 -> uint64
        want = expected_warp(values, 80, op)
        assert all(w is None or a == w for a, w in zip(got, want)), op
    with pytest.raises(RuntimeError, match="unspecified launch failure"):     # a full mask after lanes returned
        emu.probe_warp(values, 80, 3)
    full = values[:192].abs()                                                 # ... is fine when none returned
    assert [a % 2 ** 64 for a in emu.probe_warp(full, 64, 3).tolist()] == expected_warp(full, 64, 0)


@pytest.mark.parametrize("seed", SCHEDULES)
def test_emul_probe_barrier(emu, seed):
    values = torch.randint(1, 1000, (4 * 96,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    schedule(emu, seed)
    got = emu.probe_barrier(values, 96)
    assert torch.equal(got, values.view(4, 96).roll(-1, 1).flatten().long())  # each read after every write


def test_emul_probe_launch_configurations(emu):
    emu.probe_launch(1, 1)
    emu.probe_launch(3, 1024)
    for grid, block in ((0, 32), (1, 0), (1, 1025)):
        with pytest.raises(RuntimeError, match="invalid configuration argument"):
            emu.probe_launch(grid, block)
    emu.probe_launch(2, 64)                                                   # the error was cleared
