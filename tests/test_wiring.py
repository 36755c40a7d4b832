"""train.py wiring of the joint phase (reference §4): who sees which image, the EMA schedule, LR, clipping, DDP.

Everything runs `train.main([...])` end to end on the ToyCity fixture and watches it through spies installed from the
outside (monkeypatched module attributes and torch's global optimizer hooks), so the tests survive refactors of
train.py's internals. Each test names the one-line bug it is there to catch (tests/mutate.py plants them).

The SSD colour jitter is replaced by an inversion (255 - x): `image_aug` is then recognisably different from the clean
flipped `image`, and the generated images on disk have a known content to compare `image` with.
"""
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import checkpoints
import clouds
import criterion
import data
import generate
from toyworld import sam as toysam
import train

TINY = ["--preset", "tiny", "--train-backbone", "--crop-size", "64", "--batch-size", "2", "--workers", "0",
        "--test-short-side", "64", "--log-every", "1", "--no-progress", "--no-plots", "--seed", "0"]
ALPHA = 0.7        # not 0.5: alpha and 1 - alpha must differ; not 0.999: the teacher must move measurably
LR = 1e-3          # large enough for the EMA and the schedule to show in float32
CLIP = 0.05        # not the default 0.01: the clip call must receive --clip-grad
RUNS = {"every1": dict(ema_every=1, iters=2), "every2": dict(ema_every=2, iters=3)}  # EMA steps at 0,1 / 0,2


def _invert(img, rng, *args, **kwargs):
    """Stand-in for data.color_jitter_ssd: deterministic and far from the identity."""
    return (255 - img).astype(np.uint8)


@pytest.fixture(scope="module")
def inputs(toy_root, tmp_path_factory):
    """Toy generated images (64x64) and 'warmup' weights: a random-init tiny model saved as our checkpoint."""
    gen = tmp_path_factory.mktemp("wiring_generated")
    generate.main(["--backend", "toy", "--out", str(gen), "--num-images", "4", "--height", "64", "--width", "64",
                   "--no-progress"])
    torch.manual_seed(123)
    weights = tmp_path_factory.mktemp("wiring_weights") / "warm.pt"
    checkpoints.save_checkpoint(weights, clouds.build_model("tiny", train_backbone=True))
    return toy_root, gen, weights


def joint_argv(toy_root, gen, weights, out, *extra):
    return [*TINY, "--data-root", str(toy_root), "--out", str(out), "--phase", "joint", "--synthetic", str(gen),
            "--weights", str(weights), "--sam", "toy", "--sam-min-area", "20", "--p-gen", "0.5", "--eval-every", "0",
            *extra]


class Spies:
    """Records one training run: batches, teacher/SAM/student inputs, LRs, clip calls, gradients and snapshots."""

    def __init__(self, monkeypatch):
        self.models, self.teachers, self.steps = [], [], []
        self.batches, self.teacher_calls, self.sam_images, self.student_calls = [], [], [], []
        self.clip_calls, self.snapshots = [], []
        self.in_step = False
        mp = monkeypatch
        mp.setattr(data, "color_jitter_ssd", _invert)

        build_model = clouds.build_model

        def build_spy(*args, **kwargs):
            model = build_model(*args, **kwargs)
            self.models.append(model)
            return model
        mp.setattr(train.clouds, "build_model", build_spy)

        teacher_step = train.teacher_step

        def teacher_spy(teacher, student, it, *args, **kwargs):
            self.teachers.append(teacher)
            return teacher_step(teacher, student, it, *args, **kwargs)
        mp.setattr(train, "teacher_step", teacher_spy)

        train_step = train.train_step

        def step_spy(ctx, batch, it):
            self.batches.append(batch)
            self.in_step = True
            try:
                return train_step(ctx, batch, it)
            finally:
                self.in_step = False
        mp.setattr(train, "train_step", step_spy)

        predict = clouds.CLOUDS.predict

        def predict_spy(model, images, head=None, **kwargs):
            if self.in_step:
                self.teacher_calls.append((len(self.batches) - 1, images.detach().cpu().clone(), head))
            return predict(model, images, head=head, **kwargs)
        mp.setattr(clouds.CLOUDS, "predict", predict_spy)

        forward = clouds.CLOUDS.forward

        def forward_spy(model, images, head=None):
            if self.in_step and torch.is_grad_enabled():
                self.student_calls.append((len(self.batches) - 1, images.detach().cpu().clone(), head))
            return forward(model, images, head=head)
        mp.setattr(clouds.CLOUDS, "forward", forward_spy)

        set_image = toysam.ToyPointPredictor.set_image

        def set_image_spy(predictor, image):
            if isinstance(image, torch.Tensor):  # the predictor contract takes (3, H, W) tensors or (H, W, 3) arrays
                image = image.permute(1, 2, 0).cpu() if image.shape[0] == 3 else image.cpu()
            self.sam_images.append((len(self.batches) - 1, np.array(image, copy=True)))
            return set_image(predictor, image)
        mp.setattr(toysam.ToyPointPredictor, "set_image", set_image_spy)

        clip = torch.nn.utils.clip_grad_norm_

        def clip_spy(parameters, max_norm, *args, **kwargs):
            parameters = list(parameters)
            norm = clip(parameters, max_norm, *args, **kwargs)
            self.clip_calls.append({"max_norm": max_norm, "norm": float(norm)})
            return norm
        mp.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)

    def pre_step(self, optimizer, args, kwargs):
        grads = [p.grad.double() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.steps.append({"lr": [g["lr"] for g in optimizer.param_groups],
                           "initial_lr": [g["initial_lr"] for g in optimizer.param_groups],
                           "grad_norm": float(torch.cat([g.flatten() for g in grads]).norm())})

    def post_step(self, optimizer, args, kwargs):
        head = self.models[-1].sem_seg_head
        self.snapshots.append({k: v.detach().double().clone() for k, v in head.state_dict().items()})


def run_with_spies(monkeypatch, argv):
    spies = Spies(monkeypatch)
    hooks = [register_optimizer_step_pre_hook(spies.pre_step),
             register_optimizer_step_post_hook(spies.post_step)]
    try:
        spies.result = train.main(argv)
    finally:
        for h in hooks:
            h.remove()
    return spies


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """Two joint runs (EMA every 1 and every 2 iterations; poly LR; --clip-grad 0.05), recorded by Spies."""
    toy_root, gen, weights = inputs
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, r in RUNS.items():
            d = tmp_path_factory.mktemp(f"wiring_{name}")
            argv = joint_argv(toy_root, gen, weights, d, "--iters-joint", str(r["iters"]), "--ema-every",
                              str(r["ema_every"]), "--ema-alpha", str(ALPHA), "--lr", str(LR), "--schedule", "poly",
                              "--clip-grad", str(CLIP))
            spies = run_with_spies(mp, argv)
            mp.undo()
            spies.out = d
            out[name] = spies
    yield out
    for spies in out.values():
        shutil.rmtree(spies.out, ignore_errors=True)  # pytest.ini: the suite keeps its disk use small


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- §4.3: the teacher and SAM see the clean flipped image, the student the jittered copy ----


def test_generated_samples_have_known_content(runs):
    """`image` is the file on disk (possibly flipped), `image_aug` its inversion (the jitter stand-in)."""
    n_gen = 0
    for spies in runs.values():
        for batch in spies.batches:
            for s in batch:
                if not s["generated"]:
                    continue
                n_gen += 1
                disk = torch.from_numpy(np.array(Image.open(s["path"]).convert("RGB"))).permute(2, 0, 1)
                assert torch.equal(s["image"], disk) or torch.equal(s["image"], disk.flip(-1)), s["path"]
                assert torch.equal(s["image_aug"], 255 - s["image"]), s["path"]
    assert n_gen >= 3  # the mixed batches really hold generated samples


def test_teacher_and_sam_get_the_clean_image_student_the_jittered_one(runs):
    """Fails if the teacher (model.predict(images, head=teacher)) or SAM (set_image) get anything but `image`, or the
    student anything but `image_aug` for generated samples and the augmented crop `image` for source samples."""
    seen = {"gen": 0, "src": 0}
    for spies in runs.values():
        teacher = spies.teachers[0]
        assert all(t is teacher for t in spies.teachers)
        student_head = spies.models[-1].sem_seg_head
        assert teacher is not student_head
        teacher_calls = {i: (images, head) for i, images, head in spies.teacher_calls}
        sam = {}
        for i, image in spies.sam_images:
            sam.setdefault(i, []).append(image)
        assert len(spies.student_calls) == len(spies.batches)
        for i, images, head in spies.student_calls:
            batch = spies.batches[i]
            assert head is None or head is student_head, "the student must run the student head"
            gen = [s for s in batch if s["generated"]]
            for b, s in enumerate(batch):
                h, w = s["image"].shape[-2:]
                expected = s["image_aug"] if s["generated"] else s["image"]
                assert torch.equal(images[b, :, :h, :w], expected.float()), f"student input, slot {b}"
                seen["gen" if s["generated"] else "src"] += 1
            if not gen:
                assert i not in teacher_calls and i not in sam
                continue
            t_images, t_head = teacher_calls[i]
            assert t_head is teacher, "the pseudo labels must come from the EMA teacher head"
            assert len(t_images) == len(gen) and len(sam[i]) == len(gen)
            for b, s in enumerate(gen):
                h, w = s["image"].shape[-2:]
                assert torch.equal(t_images[b, :, :h, :w], s["image"].to(t_images.dtype)), f"teacher input {b}"
                assert np.array_equal(sam[i][b], s["image"].permute(1, 2, 0).numpy()), f"SAM input {b}"
    assert seen["gen"] > 0 and seen["src"] > 0


# ---- §4.1: the EMA teacher on the official schedule ----


@pytest.mark.parametrize("name", list(RUNS))
def test_saved_teacher_is_the_closed_form_ema_of_the_student(runs, inputs, name):
    """teacher_step at the start of iteration it: it == 0 copies the student (the warmup weights), then every
    `--ema-every` iterations T <- a T + (1 - a) S, S = the student after the previous optimizer step. Float64 closed
    form of the spied student snapshots vs last.pt's teacher. Catches: EMA only at iteration 0, alpha <-> 1 - alpha,
    the EMA taken after the step (from the current student), a wrong --ema-every."""
    spies, every, iters = runs[name], RUNS[name]["ema_every"], RUNS[name]["iters"]
    warm = {k[len("sem_seg_head."):]: v.double() for k, v in _load(inputs[2])["model"].items()
            if k.startswith("sem_seg_head.")}
    assert len(spies.snapshots) == iters
    params = {n for n, _ in spies.models[-1].sem_seg_head.named_parameters()}
    students = [warm, *spies.snapshots]  # students[it] = the student at the start of iteration it
    teacher = None
    for it in range(iters):
        if it == 0:
            teacher = dict(students[0])
        if it % every == 0:
            s = students[it]
            teacher = {k: ALPHA * v + (1 - ALPHA) * s[k] if k in params else s[k].clone() for k, v in teacher.items()}
    saved = _load(spies.out / "last.pt")["trainer"]["teacher"]
    assert saved.keys() == teacher.keys()
    moved = max(float((teacher[k] - warm[k]).abs().max()) for k in params)
    assert moved > 1e-4  # the expected teacher is far (> 100 x the tolerance) from the warmup weights
    for k, v in teacher.items():
        torch.testing.assert_close(saved[k].double(), v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")


# ---- solver: poly LR as logged and as used, gradient clipping ----


@pytest.mark.parametrize("name", list(RUNS))
def test_logged_lr_is_the_lr_used_by_that_iteration(runs, name):
    """Poly schedule (1 - it / max_iter) ** 0.9 * base (backbone group: base * 0.1) in the optimizer at step `it`, and
    the metrics.jsonl record of iteration it + 1 logs that same value."""
    spies, iters = runs[name], RUNS[name]["iters"]
    assert len(spies.steps) == iters
    for it, step in enumerate(spies.steps):
        factor = (1 - it / iters) ** 0.9
        assert {round(b / LR, 9) for b in step["initial_lr"]} == {1.0, 0.1}  # head, backbone (--train-backbone)
        assert step["lr"] == pytest.approx([base * factor for base in step["initial_lr"]], rel=1e-12)
    assert spies.steps[0]["initial_lr"][0] == LR  # group 0 is the head
    logged = [r for r in map(json.loads, (spies.out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert [r["iter"] for r in logged] == list(range(1, iters + 1))
    for r in logged:
        assert r["lr"] == pytest.approx(spies.steps[r["iter"] - 1]["lr"][0], rel=1e-12), r


def test_gradients_are_clipped_at_clip_grad(runs):
    """The clip call receives --clip-grad, and the gradients the optimizer steps with have total L2 norm <= clip (the
    raw norm is far above it, so == clip)."""
    for spies in runs.values():
        assert len(spies.clip_calls) == len(spies.steps)
        for call, step in zip(spies.clip_calls, spies.steps):
            assert call["max_norm"] == CLIP
            assert call["norm"] > 2 * CLIP  # raw norm: clipping really acts
            assert step["grad_norm"] <= CLIP * (1 + 1e-5)
            assert step["grad_norm"] == pytest.approx(CLIP, rel=1e-4)


def test_pixel_normalization_is_clip_rgb():
    """official MODEL.PIXEL_MEAN/STD = 255 x the CLIP mean/std, RGB order: an image equal to the mean normalizes to 0
    and one at mean + std to 1. Catches R and B swapped."""
    mean = [255 * m for m in (0.48145466, 0.4578275, 0.40821073)]  # CLIP's OPENAI_DATASET_MEAN
    std = [255 * s for s in (0.26862954, 0.26130258, 0.27577711)]  # CLIP's OPENAI_DATASET_STD
    assert clouds.PIXEL_MEAN == pytest.approx(mean, abs=1e-4) and clouds.PIXEL_STD == pytest.approx(std, abs=1e-4)
    model = clouds.build_model("tiny")
    x = torch.tensor(mean).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert model.normalize(x).abs().max() < 1e-5
    assert torch.allclose(model.normalize(x + torch.tensor(std).view(1, 3, 1, 1)), torch.ones(1, 3, 2, 2), atol=1e-5)


# ---- DDP: 2 gloo ranks == 1 process on the same global batch, first-step gradients ----


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixed_rand(shape, generator, device, dtype):
    """Criterion points that depend only on the number of points, not on how many masks share the call (nor on the
    rank's generator), so the single-process and the per-rank criterion sample the same points for each mask."""
    g = torch.Generator().manual_seed(shape[-2])
    return torch.rand(shape[-2:], generator=g).expand(shape).to(device=device, dtype=dtype)


def _one_mask_per_image(forward):
    """Keep the first target mask of every image. Mask2Former's CE is a weighted mean over each batch's queries (DDP
    averages the ranks' means); with the same number of matched queries per image, the mean of the ranks' means is the
    mean over the global batch, so the gradients must agree to float precision."""
    def criterion(self, outputs, targets, generator=None):
        assert all(len(t["labels"]) >= 1 for t in targets)
        targets = [{**t, "labels": t["labels"][:1], "masks": t["masks"][:1]} for t in targets]
        return forward(self, outputs, targets, generator)
    return criterion


def _save_first_grads(clip, path):
    """Wrap clip_grad_norm_: save the gradients it receives (after DDP's all-reduce, before clipping) once."""
    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        if not os.path.exists(path):
            torch.save([p.grad.detach().clone() for p in parameters], path)
        return clip(parameters, max_norm, *args, **kwargs)
    return spy


def _ddp_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    criterion._rand = _fixed_rand
    criterion.SetCriterion.forward = _one_mask_per_image(criterion.SetCriterion.forward)
    torch.nn.utils.clip_grad_norm_ = _save_first_grads(torch.nn.utils.clip_grad_norm_,
                                                       os.path.join(out, f"grads_rank{rank}.pt"))
    train.main(argv)


def test_ddp_first_step_gradients_match_single_process(inputs, tmp_path, monkeypatch):
    """2 gloo ranks x 1 sample vs 1 process x 2 samples (a mixed batch: rank r takes slot r of the same global batch):
    the all-reduced gradients of the first step equal the single-process ones. Measured: relative L2 difference
    ~1e-7 (float32 reduction order; the previous session saw 6e-7); asserted < 1e-5. A rank that scales its loss by
    the world size doubles them (relative difference 1.0)."""
    import torch.multiprocessing as mp

    toy_root, gen, weights = inputs
    argv = lambda out: joint_argv(toy_root, gen, weights, out, "--iters-joint", "1", "--p-gen", "0.5")
    mp.spawn(_ddp_worker, nprocs=2, join=True, args=(2, _free_port(), argv(tmp_path / "ddp"), str(tmp_path)))
    monkeypatch.setattr(criterion, "_rand", _fixed_rand)
    monkeypatch.setattr(criterion.SetCriterion, "forward", _one_mask_per_image(criterion.SetCriterion.forward))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        _save_first_grads(torch.nn.utils.clip_grad_norm_, str(tmp_path / "grads_single.pt")))
    train.main(argv(tmp_path / "single"))

    record = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["n_gen"] == 1  # the global batch is mixed: one source crop, one generated image
    r0, r1, single = (_load(tmp_path / f"grads_{n}.pt") for n in ("rank0", "rank1", "single"))
    assert len(r0) == len(r1) == len(single) > 0
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)  # DDP: every rank holds the same averaged gradient
    g_ddp, g_single = (torch.cat([g.double().flatten() for g in gs]) for gs in (r0, single))
    rel = float((g_ddp - g_single).norm() / g_single.norm())
    worst = max(float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
                for a, b in zip(r0, single) if b.norm() > 0)
    print(f"DDP vs single process, first-step gradients: {rel:.2e} relative (worst tensor {worst:.2e})")
    assert rel < 1e-5
