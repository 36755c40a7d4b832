"""Warmup and joint self-training of CLOUDS (Sec. 3.3 and 4.1 of the paper; reference §1, §4, §5).

Phase A, warmup: supervised Mask2Former training on the labelled source (GTA5, SYNTHIA or Cityscapes).
Phase B, joint training: start from the warmup weights. Every batch slot is a source crop with its ground truth, or,
with probability p_gen, a generated image. The pseudo label of a generated image is the semantic argmax of an EMA
copy of the head (the teacher) on the clean image, refined online by point-prompted SAM (refine.py). One criterion
call covers the mixed batch. `--phase all` (the default) runs both phases; joint training starts from the warmup
weights (the official configs needed a hand-edited MODEL.WEIGHTS path, reference §1.3).

Usage:
    python train.py --source gta --data-root datasets --synthetic datasets/stable_diffusion/sd_clouds --out runs/gta
    python train.py --recipe toy --synthetic datasets_toy/generated --out runs/toy  # the same code path on ToyCity
    torchrun --nproc_per_node 2 train.py --source gta ...     # DDP; --batch-size is the total over the ranks
    python train.py --source gta --synthetic DIR --backbone dinov2_l --tuning rein   # beyond the paper (backbones.py)
"""
import copy
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import checkpoints
import clouds
import criterion
import data
import evaluate
import ops
from runtools import preflight
import refine
from runtools import files, runs
from runtools.runs import Interrupted, Problems, TrainError
from runtools.train_config import SOURCES, TrainConfig, parse_args


# ---- data: a stream of mixed samples, a pure function of (seed, k) ----


def mixing_rate(n_source: int, n_generated: int, target_factor: float, source_factor: float = 1.0) -> float:
    """Reference §1.6: expected share of generated samples under detectron2's repeat-factor sampler,
    n_gen * r_gen / (n_gen * r_gen + n_src * r_src); GTA 24,904 vs 5000 x 2.0 -> 28.7%."""
    gen, src = n_generated * target_factor, n_source * source_factor
    return gen / (gen + src) if gen + src > 0 else 0.0


def stream_choice(seed: int, k: int, p_gen: float, n_source: int, n_generated: int):
    """Global sample k of the training stream -> (generated?, index into its pool, numpy Generator for the rest).

    official code: a RepeatFactorTrainingSampler shuffles repeated indices into an infinite stream; drawing each slot
    independently (generated with probability p_gen, then a uniform index) has the same expected mix (§1.6), and
    makes sample k a pure function of (seed, k), which is what exact resume and rank-independent batches need.
    """
    rng = np.random.default_rng([seed, k])
    generated = n_generated > 0 and rng.random() < p_gen
    index = int(rng.integers(n_generated if generated else n_source))
    return generated, index, rng


class MixedStream(torch.utils.data.Dataset):
    """Map-style view of the infinite training stream: item k is global sample k (see stream_choice)."""

    def __init__(self, source, generated, p_gen: float, seed: int):
        self.source, self.generated, self.p_gen, self.seed = source, generated, p_gen, seed

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, k):
        n_gen = len(self.generated) if self.generated is not None and self.p_gen > 0 else 0
        generated, index, rng = stream_choice(self.seed, k, self.p_gen, len(self.source), n_gen)
        refine_seed = int(rng.integers(2 ** 62))  # seeds the refiner's random points for this sample
        sample = (self.generated if generated else self.source).get(index, rng)  # transform driven by rng
        return {**sample, "generated": generated, "k": k, "refine_seed": refine_seed}


class StreamSampler(torch.utils.data.Sampler):
    """Global batch i holds stream items i*B .. i*B+B-1; rank r takes the slots r::world of it. A single process with
    the same global batch therefore sees the same samples as a DDP run, and a resumed run the same as a straight one."""

    def __init__(self, start_iter: int, batch_size: int, rank: int = 0, world: int = 1):
        self.start, self.batch, self.rank, self.world = start_iter, batch_size, rank, world

    def __iter__(self):
        i = self.start
        while True:
            yield from (i * self.batch + j for j in range(self.rank, self.batch, self.world))
            i += 1


def _as_list(batch):
    return batch


def pad_batch(tensors, fill, size=None):
    """Stack (C, h, w) or (h, w) tensors into one batch padded bottom/right to `size` (default: the largest h, w
    rounded up to 32, the model's size divisibility) with `fill`."""
    H, W = size or [-(-max(t.shape[-i] for t in tensors) // 32) * 32 for i in (2, 1)]
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], H, W), fill)
    for b, t in enumerate(tensors):
        out[b, ..., :t.shape[-2], :t.shape[-1]] = t
    return out


# ---- model, optimizer, schedule, EMA teacher ----

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.modules.batchnorm._BatchNorm,
              nn.modules.instancenorm._InstanceNorm)


def param_groups(modules: dict, cfg: TrainConfig, lr: float) -> list:
    """AdamW groups as detectron2/Mask2Former build them (reference §1.5): weight decay 0 for every parameter of a
    normalization layer and of an nn.Embedding (query_feat, query_embed, the decoder level_embed), 0.05 otherwise
    (the MSDeformAttn encoder level_embed is an nn.Parameter, so it decays); backbone parameters get
    lr * backbone_multiplier. `modules` maps a name ("head", "backbone", "adapter") to a module; frozen parameters are
    skipped; an "adapter" (Rein / LoRA, issue 19; ours) trains at the head's lr."""
    groups, seen = {}, set()
    for name, root in modules.items():
        mult = cfg.backbone_multiplier if name == "backbone" else 1.0
        for module in root.modules():
            for p in module.parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                if isinstance(module, NORM_TYPES):
                    wd = cfg.weight_decay_norm
                elif isinstance(module, nn.Embedding):
                    wd = cfg.weight_decay_embed
                else:
                    wd = cfg.weight_decay
                groups.setdefault((wd, mult), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": lr * mult} for (wd, mult), ps in groups.items()]


class LRSchedule:
    """LR factor at iteration `it` (picklable, unlike a lambda): official WarmupMultiStepLR with STEPS beyond MAX_ITER
    is constant (reference §9.15); WarmupPolyLR (SYNTHIA) is (1 - it / max_iter) ** 0.9, ending at 0; no warmup."""

    def __init__(self, schedule: str, max_iter: int, power: float = 0.9):
        self.schedule, self.max_iter, self.power = schedule, max_iter, power

    def __call__(self, it):
        if self.schedule == "constant":
            return 1.0
        return max(1.0 - it / max(self.max_iter, 1), 0.0) ** self.power


class EMASource(nn.Module):
    """What the Sec. 3.3 EMA teacher averages when a ViT backbone tunes (issue 19, --tuning rein|lora): the head and
    the tuned backbone parameters (the student's own tensors, not copies). The frozen ViT weights are not in it: the
    teacher (a deepcopy of this module) runs the shared backbone with its copies of the tuned parameters substituted
    (CLOUDS.predict(backbone_params=...)), so the ~300M frozen weights are never duplicated."""

    def __init__(self, model):
        super().__init__()
        self.head = model.sem_seg_head
        tuned = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in tuned]
        self.tuned = nn.ParameterList([p for _, p in tuned])

    def backbone_params(self) -> dict:
        return dict(zip(self.names, self.tuned))


def teacher_inputs(teacher) -> dict:
    """CLOUDS.predict keyword arguments that run the EMA teacher: its head (+ its tuned backbone parameters)."""
    if isinstance(teacher, EMASource):
        return {"head": teacher.head, "backbone_params": teacher.backbone_params()}
    return {"head": teacher}


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float):
    """theta_t <- alpha * theta_t + (1 - alpha) * theta_s on parameters (official: no BN buffers; copied here)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def teacher_step(teacher: nn.Module, student: nn.Module, it: int, alpha: float, every: int) -> bool:
    """Sec. 3.3 EMA teacher, official schedule (reference §4.1), at the start of joint iteration `it`: at it == 0 the
    teacher is set to the student (the warmup weights); whenever it % every == 0 (official ITERATION_UPDATE = 100,
    including 0, where it changes nothing) it takes one EMA step with alpha = 0.999. The warmup weights keep a
    share alpha ** floor((N - 1) / every) after N iterations: 67% after GTA's 40k. Returns True on an EMA step."""
    if it == 0:
        teacher.load_state_dict(student.state_dict())
    if it % every == 0:
        ema_update(teacher, student, alpha)
        return True
    return False


class _Student(nn.Module):
    """The trainable part: the head (plus the backbone when it trains or tunes an adapter: then only the adapter
    requires grad). `forward` runs the full model with this head. Only this module goes into DistributedDataParallel;
    a frozen backbone, the EMA teacher and SAM never do."""

    def __init__(self, model, train_backbone: bool):
        super().__init__()
        self.head = model.sem_seg_head
        if train_backbone:
            self.backbone = model.backbone
        self._model = [model]  # a list, so the full model is not registered as a submodule

    def forward(self, images):
        return self._model[0](images, head=self.head)


def freeze_unused(student: nn.Module, device) -> list:
    """Give requires_grad=False to trainable parameters that a forward pass never reaches (e.g. the CLIP text tower
    and projection of a trainable backbone), so they are neither in the optimizer nor expected by DDP. Returns
    their names."""
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    was_training = student.training
    student.eval()  # eval: a dry pass must not move BatchNorm statistics
    out = student(torch.zeros(1, 3, 64, 64, device=device))
    loss = out["pred_logits"].sum() + out["pred_masks"].sum()
    loss = loss + sum(a["pred_logits"].sum() + a["pred_masks"].sum() for a in out.get("aux_outputs", []))
    loss.backward()
    student.train(was_training)
    unused = [n for n, p in params if p.grad is None]
    for n, p in params:
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    return unused


@dataclass
class RunState:
    """The state of one running phase: what train_step, the guards (runs.check_outputs) and the checkpoints
    (runs.save_state / restore_state) share. Built by build_state; the loop updates `saved` and `records`."""
    cfg: TrainConfig
    phase: str                                   # "warmup" | "joint"
    model: nn.Module                             # the full clouds.CLOUDS (shared backbone + student head)
    student: nn.Module                           # _Student (DistributedDataParallel when world > 1)
    teacher: Optional[nn.Module]                 # Sec. 3.3 EMA copy of the head (EMASource copy); None in warmup
    params: list                                 # the trainable parameters, clipped together (official full_model)
    optimizer: torch.optim.Optimizer             # AdamW (param_groups)
    scheduler: torch.optim.lr_scheduler.LambdaLR  # LRSchedule
    device: torch.device
    rank: int
    world: int                                   # number of DDP ranks
    predictor: Optional[object]                  # SAM (refine.build_predictor), joint phase only; None = --sam none
    refine_cfg: refine.RefineConfig              # §5 refinement rules (--sam-min-area, ...)
    generator: torch.Generator                   # the criterion's point sampling, reseeded every iteration
    last: Path                                   # OUT/last.pt of this phase
    saved: Optional[int] = None                  # iteration of the latest last.pt of this phase; None: not written
    records: Optional[list] = None               # the 4 latest (image, teacher, refined) labels for the PNG
    pseudo_conf: Optional[torch.Tensor] = None   # (2, C, C + 1) teacher / refined label_confusion vs the hidden truth
    ema_source: Optional[nn.Module] = None       # what the teacher averages: None = the head; EMASource (--tuning)


# ---- one training iteration ----


def train_step(state, batch, it):
    """One iteration on this rank's share of the global batch (Fig. 2, Sec. 3.3) -> the logged stats.

    Warmup (state.teacher is None) runs steps 2, 4 and 5 on source crops only. Joint training, in the official order:
      1. EMA teacher (Sec. 3.3): at it == 0 the teacher copies the student (the warmup weights); every `ema_every`
         iterations it takes one step theta_t <- alpha theta_t + (1 - alpha) theta_s (alpha 0.999), from the student
         as the previous optimizer step left it.
      2. Student input: each batch slot is a source crop (rescaled, cropped, jittered, flipped) or, with probability
         p_gen, a generated image (flipped, then jittered for the student only).
      3. Pseudo labels for the generated slots (pseudo_targets): the teacher's semantic argmax on the clean flipped
         image (shared backbone, no confidence threshold), refined by point-prompted SAM (refine.py: per-class
         4-connected components above --sam-min-area, 5 random points each, the best of SAM's 3 masks, pixels claimed
         by two masks dropped); with --sam none, the teacher's dense masks.
      4. One Mask2Former set criterion over the mixed batch: source ground truth and pseudo labels alike (criterion.py:
         Hungarian matching, class cross-entropy, mask BCE and dice on sampled points, deep supervision).
      5. Backward, clip the gradient norm of every trainable parameter together (official: L2, 0.01), AdamW step, LR
         schedule step.
    A non-finite output, loss or gradient norm raises TrainError before the optimizer step (runs.check_outputs,
    runs.checked_values), so the weights and last.pt stay at the last good state."""
    model, device, cfg = state.model, state.device, state.cfg
    clock = runs.StepClock(device, cfg.profile)  # per-stage seconds for the log (CUDA-synchronized with --profile)
    if state.teacher is not None:  # 1.
        teacher_step(state.teacher, model.sem_seg_head if state.ema_source is None else state.ema_source, it,
                     cfg.ema_alpha, cfg.ema_every)
    # 2. pinned samples on CUDA: asynchronous copies, padded on the device
    images = pad_batch([(s["image_aug"] if s["generated"] else s["image"]).to(device, non_blocking=True)
                        for s in batch], 0)
    gen = [s for s in batch if s["generated"]]
    teacher_labels, pseudo = pseudo_targets(model, state.teacher, gen, state.predictor, state.refine_cfg, device,
                                            clock) if gen else ([], [])  # 3.
    runs.record_pseudo_labels(state, gen, teacher_labels, pseudo)  # pseudo_labels.png; quality vs hidden truth
    targets = mixed_targets(batch, iter(pseudo), tuple(images.shape[-2:]), device)  # 4.
    outputs = state.student(images)
    runs.check_outputs(state, outputs, it)  # before the matcher: scipy's Hungarian solver dies on NaN costs
    losses = model.criterion(outputs, targets, generator=state.generator)
    loss = sum(losses.values())
    state.optimizer.zero_grad(set_to_none=True)  # 5.
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.params, cfg.clip_grad)
    values = runs.checked_values(state, it, loss, losses, grad_norm)  # one host transfer; raises when non-finite
    state.optimizer.step()
    state.scheduler.step()
    return {**values, "n_gen": len(gen), **clock.stop()}


def pseudo_targets(model, teacher, samples, predictor, refine_cfg, device, clock=None) -> tuple:
    """Step 3 of train_step for the generated samples -> (teacher labels int64 (h, w), targets {"labels", "masks"}),
    all on `device` (SAM's masks on the predictor's). The refinement points come from a CPU generator seeded per
    sample, so a sample's pseudo label does not depend on the rank that draws it."""
    images = pad_batch([s["image"].to(device, non_blocking=True) for s in samples], 0)  # (G, 3, H, W)
    labels = model.predict(images, **teacher_inputs(teacher))  # (G, H, W) int64, stays on the device
    crops = [(image[:, :h, :w], label[:h, :w]) for s, image, label in zip(samples, images, labels)
             for h, w in [s["image"].shape[-2:]]]  # the clean flipped image (3, h, w) uint8 and its label (h, w)
    clock and clock.lap("time_teacher")
    if predictor is None:  # --sam none: the dense teacher masks (one host transfer for all of them)
        targets = criterion.targets_from_labels([label for _, label in crops])
    else:
        targets = [refine.pseudo_label_target(image, label, predictor, refine_cfg,
                                              torch.Generator().manual_seed(s["refine_seed"]))
                   for s, (image, label) in zip(samples, crops)]
    clock and clock.lap("time_refine")
    return [label for _, label in crops], targets


def mixed_targets(batch, pseudo, size, device) -> list:
    """Step 4's targets in batch order: the next pseudo label for a generated slot, the ground truth's masks for a
    source slot, all padded to the batch's (H, W). Source padding is label 255: negatives for every mask, like the
    official black padding (docs/official_code.md); the class lists of all source labels reach the host in one
    transfer (criterion.targets_from_labels)."""
    labels = [pad_batch([s["label"].to(device, non_blocking=True)], data.IGNORE_INDEX, size)[0]
              for s in batch if not s["generated"]]
    source = iter(criterion.targets_from_labels(labels))
    return [_pad_target(next(pseudo), size) if s["generated"] else next(source) for s in batch]


def _pad_target(t, size):
    """Pad a target's masks (K, h, w) to the batch size (H, W) with False; the padding is outside the image, so it is
    marked not `valid` (left out of the mask losses)."""
    if tuple(t["masks"].shape[-2:]) == tuple(size):
        return t
    valid = t.get("valid", torch.ones(t["masks"].shape[-2:], dtype=torch.bool, device=t["masks"].device))
    return {"labels": t["labels"], "masks": pad_batch([t["masks"]], False, size)[0],
            "valid": pad_batch([valid], False, size)[0]}


def _seed(*keys) -> int:
    """A 63-bit seed derived from integer keys (numpy SeedSequence: well mixed, stable across platforms)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))



def prepare_inputs(cfg, env, p_gen: float = None) -> dict:
    """Open every input the preflight checked: the source, the evaluation sets, the generated images, SAM."""
    phases = ("warmup", "joint") if cfg.phase == "all" else (cfg.phase,)
    train_tf = data.TrainTransform(cfg.crop_size, (cfg.scale_min, cfg.scale_max))  # §1.7: rescale, crop, jitter, flip
    inputs = {"source": data.build_dataset(cfg.source, cfg.data_root, SOURCES[cfg.source].split, train_tf),
              "generated": None, "predictor": None, "p_gen": 0.0, "eval_sets": runs.build_eval_sets(cfg),
              "eval_loader": None,
              "refine_cfg": refine.RefineConfig(min_area=cfg.sam_min_area, num_points=cfg.sam_num_points,
                                                mode=cfg.sam_mode, uncovered=cfg.sam_uncovered)}
    if inputs["eval_sets"]:  # one set of reader processes for every evaluation of the run
        inputs["eval_loader"] = runs.EvalLoader(inputs["eval_sets"], cfg.workers, env.device.type == "cuda")
    if "joint" in phases and cfg.p_gen != 0:
        inputs["generated"] = data.build_dataset("generated", cfg.synthetic, transform=data.GeneratedTransform())
        inputs["p_gen"] = resolved_p_gen(cfg, len(inputs["source"]), len(inputs["generated"]))
        if cfg.sam != "none":
            inputs["predictor"] = refine.build_predictor(cfg.sam, preflight.sam_checkpoint(cfg), str(env.device))
    return inputs


# ---- the phase loop ----


def build_state(cfg, phase, model, env, inputs, last, max_iter) -> RunState:
    """The student (DDP-wrapped on several ranks), AdamW with the detectron2 groups, the LR schedule and, for the joint
    phase, the EMA teacher and SAM: the RunState of a fresh phase (runs.restore_state loads last.pt into it)."""
    joint = phase == "joint"
    trains_backbone = cfg.train_backbone and not (joint and cfg.freeze_backbone_joint)
    if cfg.train_backbone and not trains_backbone:  # --freeze-backbone-joint: the warmup trained it, now frozen
        model.backbone.freeze()
    model.train()
    tunes = cfg.tuning != "frozen"  # issue 19: a Rein / LoRA adapter in the backbone trains
    student = _Student(model, trains_backbone or tunes).to(env.device)
    unused = freeze_unused(student, env.device)
    if unused and env.rank == 0:  # frozen from then on, so printed once
        print(f"[train] {len(unused)} trainable tensors are never used by the forward pass and stay frozen "
              f"(e.g. {unused[0]})")
    params = [p for p in student.parameters() if p.requires_grad]
    if env.world > 1:
        # Only the trainable student is wrapped: the frozen backbone, the EMA teacher and SAM are outside DDP, so every
        # wrapped parameter gets a gradient and find_unused_parameters=False is correct. official bug (reference
        # §9.12): the whole model (EMA head, SAM, void_embedding) was wrapped with find_unused_parameters=False.
        # what stays off the device (the CLIP text tower of a trained backbone: clouds.CLIPBackbone._apply) is
        # frozen and never broadcast (NCCL only takes device tensors)
        off = [n for n, t in (*student.named_parameters(), *student.named_buffers()) if t.device != env.device]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(student, off)
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=False)
    modules = {"head": model.sem_seg_head, **({"backbone": model.backbone} if trains_backbone else {}),
               **({"adapter": model.backbone} if tunes else {})}
    # betas/eps: torch defaults. fused: one kernel for every tensor on CUDA and the CPU (the official code, through
    # detectron2, gets the per-tensor loop on the CPU and foreach on CUDA); the same update up to float rounding
    optimizer = torch.optim.AdamW(param_groups(modules, cfg, cfg.lr), lr=cfg.lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(cfg.schedule, max_iter, cfg.poly_power))
    teacher = source = None
    if joint:  # Sec. 3.3: the EMA teacher copies the head only; the backbone is shared (frozen officially)
        source = EMASource(model) if tunes else None  # a tuned adapter is averaged too (issue 19)
        teacher = copy.deepcopy(model.sem_seg_head if source is None else source).requires_grad_(False).eval()
    # ToyCity's generated images carry their hidden true labels (never targets): pseudo-label quality is measured
    truths = joint and any(t is not None for t in getattr(inputs["generated"], "truths", ()) or ())
    conf = torch.zeros(2, refine.NUM_CLASSES, refine.NUM_CLASSES + 1, dtype=torch.int64, device=env.device) \
        if truths else None
    return RunState(cfg=cfg, phase=phase, model=model, student=student, teacher=teacher, params=params,
                    optimizer=optimizer, scheduler=scheduler, device=env.device, rank=env.rank, world=env.world,
                    predictor=inputs["predictor"] if joint else None, refine_cfg=inputs["refine_cfg"],
                    generator=torch.Generator(device=env.device), last=last, ema_source=source,
                    pseudo_conf=conf)


def run_phase(cfg, phase, model, env, inputs, out_dir) -> dict:
    """Train one phase into out_dir (last.pt, model_NNNNNNN.pt snapshots, model_final.pt, metrics.jsonl, PNGs).
    Returns a summary dict. Ctrl-C / SIGTERM (inputs["stop"]) saves last.pt and raises Interrupted."""
    joint = phase == "joint"
    max_iter = cfg.iters_joint if joint else cfg.iters_warmup
    out_dir = Path(out_dir)
    paths = {k: out_dir / v for k, v in (("last", "last.pt"), ("model_final", "model_final.pt"),
                                         ("metrics", "metrics.jsonl"), ("curves", "curves.png"),
                                         ("pseudo_labels", "pseudo_labels.png"))}
    main_rank = env.rank == 0
    say = inputs.get("say") or runs.RunLog(out_dir / "log.txt", main_rank)
    if env.device.type == "cuda":  # --tf32: on, as torch 1.7-1.11 did by default (matmul TF32 off since 1.12)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = True  # fixed crops: the fastest convolution kernels, found once per shape
    state = build_state(cfg, phase, model, env, inputs, paths["last"], max_iter)
    start = runs.restore_state(paths["last"], state) if cfg.resume and paths["last"].is_file() else 0
    if start >= max_iter > 0:  # a finished phase (--phase all resumed in the joint phase): nothing to run again
        state.saved = start
        if main_rank:
            nxt = "; going on with joint" if phase == "warmup" and cfg.phase == "all" else ""
            say(f"[train] {phase} is complete ({paths['last']} holds iteration {start} of {max_iter}): skipped{nxt}")
        if main_rank and not paths["model_final"].is_file():  # killed between last.pt and model_final.pt
            checkpoints.save_checkpoint(paths["model_final"], model)
        evals = [r["eval"] for r in runs.read_metrics(paths["metrics"]) if "eval" in r] \
            if paths["metrics"].is_file() else []
        if env.world > 1:
            dist.barrier()
        return {"phase": phase, "iterations": max_iter, "start": start, "p_gen": inputs["p_gen"] if joint else 0.0,
                "eval": evals[-1] if evals else {},
                **{k: str(v) for k, v in paths.items() if v.is_file() or k == "model_final"}}
    if start:
        state.saved = start
        if main_rank:
            say(f"[train] resuming {phase} from iteration {start} ({paths['last']})")
    log = runs.MetricsLog(paths["metrics"], main_rank, cfg.tensorboard, keep_until=start if cfg.resume else None,
                          say=say)
    p_gen = inputs["p_gen"] if joint else 0.0
    stream = MixedStream(inputs["source"], inputs["generated"] if joint else None, p_gen, _seed(cfg.seed, int(joint)))
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size // env.world, collate_fn=_as_list,
                                         sampler=StreamSampler(start, cfg.batch_size, env.rank, env.world),
                                         num_workers=cfg.workers, pin_memory=env.device.type == "cuda")
    results = phase_loop(state, loader, env, inputs, log, say, start, max_iter, paths)
    if main_rank:
        checkpoints.save_checkpoint(paths["model_final"], model)  # official: student only (no teacher, no SAM)
        if results:  # the per-class IoU of the phase's last evaluation
            say(f"[{phase}] per-class IoU (%) at iteration {max_iter}:\n" + evaluate.format_table(results))
    runs.barrier(env)
    return {"phase": phase, "iterations": max_iter, "start": start, "p_gen": p_gen, "eval": results,
            **{k: str(v) for k, v in paths.items() if v.is_file() or k == "model_final"}}


def phase_loop(state, loader, env, inputs, log, say, start, max_iter, paths) -> dict:
    """Iterations start .. max_iter - 1: train_step, then the periodic log, evaluation and checkpoints
    (runs.after_iteration). Returns the last evaluation's results ({} without one)."""
    cfg, phase, joint, main_rank = state.cfg, state.phase, state.phase == "joint", env.rank == 0
    stop = inputs.get("stop") or runs.StopFlag()
    batches = iter(loader)
    results, window, it = {}, [], start
    bar = tqdm(range(start, max_iter), desc=phase, disable=not (cfg.progress and main_rank), dynamic_ncols=True)
    try:
        stop.armed = True  # a signal from here on lets the iteration finish, then saves last.pt
        if start and runs.missed_evaluation(cfg, paths["metrics"], start, max_iter):  # a stop cut it short
            results = runs.after_iteration(state, env, inputs, log, say, stop, start, max_iter, paths,
                                           save=False) or results
        for it in bar:
            state.generator.manual_seed(_seed(cfg.seed, int(joint), env.rank, it))  # criterion points: f(iteration)
            t0 = time.perf_counter()
            batch = next(batches)
            # the LR of this iteration, logged with it (detectron2: before the step)
            lr = state.scheduler.get_last_lr()[0]
            stats = {"time_data": time.perf_counter() - t0, **train_step(state, batch, it)}
            window.append(stats)
            done = it + 1
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
            if done % cfg.log_every == 0 or done == max_iter:
                mean = {k: sum(s[k] for s in window) / len(window) for k in window[0]}
                log.write({"phase": phase, "iter": done, "lr": lr, **mean, **runs.pseudo_label_quality(state)})
                window = []
            results = runs.after_iteration(state, env, inputs, log, say, stop, done, max_iter, paths) or results
    except data.DataError as e:  # a bad file found when first drawn (the preflight's --check-images may sample)
        raise TrainError(f"{data.error_message(e)}\nStopped at {phase} iteration {it}; the last good checkpoint is "
                         f"{runs.last_good(state)}. Fix or replace the file, then rerun with --resume (and "
                         f"--check-images to open every input file first)") from None
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside the handler): the iteration is not finished
        kept = f"{paths['last']} (iteration {state.saved}) is kept" if state.saved is not None else \
            "no last.pt was saved in this phase yet"
        msg = f"interrupted inside {phase} iteration {it}: {kept}; resume with --resume"
        if main_rank:
            say(f"[train] {msg}", echo=False)  # main prints it
        raise Interrupted(msg, signal.SIGINT) from None
    finally:
        stop.armed = False
        del batches
        log.close()
    return results


# ---- train(), main ----


def resolved_p_gen(cfg, n_source: int, n_generated: int) -> float:
    """--p-gen, or (None) the official repeat-factor share of generated samples (mixing_rate, §1.6)."""
    return cfg.p_gen if cfg.p_gen is not None else mixing_rate(n_source, n_generated, cfg.target_factor,
                                                               cfg.source_factor)


def train(cfg: TrainConfig, notes=(), linger=False) -> dict:
    """Run the configured phase(s). `--phase all`: OUT/warmup, then OUT/joint from the warmup weights. The preflight
    runs first, on every rank: a run that cannot finish raises Problems (on every rank) before any model is built or
    any file is written. Rank 0 then holds OUT/train.lock (runs.OutLock) until the run ends: a second run on the same
    --out fails at once. Stop signals: runs.StopFlag (`linger`: this process exits right after; main's docstring)."""
    env, lock = None, None
    with runs.StopFlag(linger) as stop, ops.cpu_threads(cfg.cpu_threads):  # issue 18: --recipe toy runs 1 thread
        try:
            env = runs.setup_distributed(cfg.device)
            lock = runs.OutLock(Path(cfg.out)) if env.rank == 0 else None
            return _train(cfg, notes, env, stop, lock)
        except KeyboardInterrupt:  # a signal outside the iteration loop (preparing, between phases): nothing to save
            signum = stop.signum or signal.SIGINT
            raise Interrupted(f"{signal.Signals(signum).name} outside the training loop (while preparing the run or "
                              f"between phases): nothing was being trained; --resume continues from the last saved "
                              f"state", signum) from None
        finally:
            if lock is not None:
                lock.release()
            if env is not None and env.started:
                dist.destroy_process_group()


def _train(cfg, notes, env, stop, lock) -> dict:
    main_rank = env.rank == 0
    # The preflight runs on every rank (datasets may sit on node-local disks); the ranks then agree on the verdict
    # BEFORE rank 0 writes anything, so a slow rank never finds rank 0's new files in --out ("already holds a run").
    try:
        info = preflight.preflight(cfg, env, SOURCES[cfg.source].split,
                                   p_gen_of=lambda n_src, n_gen: resolved_p_gen(cfg, n_src, n_gen))
        problems = None
    except Problems as e:
        info, problems = None, e
    if runs.any_rank(env, problems is not None):  # a rank without problems of its own stays quiet (main)
        raise problems or Problems(["another rank cannot start (its message lists why); fix that, then rerun"],
                                   quiet=True)
    # ---- from here on rank 0 writes into --out: the lock, the --overwrite deletions, then log.txt, config.json ----
    out = Path(cfg.out)
    try:  # one run at a time in --out (only rank 0 holds the lock); every rank stops if it is taken
        took_over, taken = (lock.acquire() if lock is not None else None), None
    except Problems as e:
        took_over, taken = None, e
    if runs.any_rank(env, taken is not None):
        raise taken or Problems(["rank 0 could not lock --out (its message says why)"], quiet=True)
    if main_rank and cfg.overwrite:  # the old run's files go, so nothing stale mixes with the new run
        for d in {out, *preflight.phase_dirs(cfg).values()}:
            for name in (*preflight.RUN_FILES, "log.txt", "model_final.pt"):
                (d / name).unlink(missing_ok=True)
    say = runs.RunLog(out / "log.txt", main_rank)
    runs.log_start(say, cfg, info, notes)
    if took_over:
        say(f"[train] note: {took_over}")
    inputs = prepare_inputs(cfg, env)
    inputs.update(say=say, stop=stop)
    if main_rank:  # which implementation each op resolved to (a silent fallback is a 40k-iteration slowdown)
        say("[train] ops: " + ", ".join(f"{op} {impl}" for op, impl in ops.resolved_impls().items()))
    torch.manual_seed(cfg.seed)  # identical random init on every rank (DDP also broadcasts rank 0's weights)
    weights = cfg.clip_weights or cfg.backbone_weights
    overrides = {"pretrained": weights} if weights else {}
    model = clouds.build_model(cfg.preset, train_backbone=cfg.train_backbone, backbone_bf16=cfg.backbone_bf16,
                               classifier=cfg.classifier, backbone=cfg.backbone, tuning=cfg.tuning,
                               rein_rank=cfg.rein_rank, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                               lora_targets=cfg.lora_targets, **overrides)
    if cfg.weights:
        runs.load_weights(model, cfg.weights)
    model.to(env.device)
    if main_rank:
        files.write_json(info["config"], out / "config.json")
    phases = ("warmup", "joint") if cfg.phase == "all" else (cfg.phase,)
    results = {}
    try:
        for phase in phases:
            results[phase] = run_phase(cfg, phase, model, env, inputs, out / phase if cfg.phase == "all" else out)
    except TrainError as e:
        try:
            say(f"[train] {e}", echo=False)  # main prints it
        except OSError:  # a full disk may refuse the log line too; the message still reaches main
            pass
        raise
    if main_rank:
        say(done_message(cfg, out, results))
    return {"out": str(out), "config": str(out / "config.json"), "phases": results,
            "final": results[phases[-1]]["eval"]}


def done_message(cfg, out: Path, results: dict) -> str:
    """The last line of a run: where its files are, and the command that evaluates the final model."""
    what = {"model_final": "model_final.pt (the trained model)", "last": "last.pt (for --resume)",
            "metrics": "metrics.jsonl", "curves": "curves.png", "pseudo_labels": "pseudo_labels.png"}
    present = {k for r in results.values() for k in what if k in r and Path(r[k]).is_file()}
    files = ", ".join(v for k, v in what.items() if k in present)
    where = (f"{out}/ holds config.json and log.txt; " + " and ".join(f"{out / ph}/" for ph in results)
             + f" hold {files}") if cfg.phase == "all" else f"{out}/ holds config.json, log.txt, {files}"
    final = Path(results[list(results)[-1]]["model_final"])
    short = f" --short-side {cfg.test_short_side}" if cfg.test_short_side != 1024 else ""
    return (f"[train] done: {where}. Evaluate the final model with\n"
            f"  python evaluate.py --weights {final} --datasets {' '.join(cfg.eval_sets)} --data-root "
            f"{cfg.data_root}{short}")


def main(argv=None) -> dict:
    """`python train.py [flags]`: train -> the summary dict (final metrics, paths).

    Exit codes (README "Stopping, preemption, exit codes"):
      0    done;
      1    stopped on bad state (non-finite outputs, loss or gradients; an unreadable checkpoint): the message says
           what to do; last.pt holds the last good state;
      2    cannot start: ONE message listing every problem (usage errors too, via argparse); nothing was written;
      130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM, SIGUSR1 or SIGHUP: the current iteration (or evaluation)
           finished, rank 0 saved last.pt and every rank waited for it; rerun with --resume. (A second Ctrl-C more
           than 5 s after the first aborts without saving, also 130; last.pt keeps its previous save.)
    Run as a script (argv None), a stopped process keeps its exit code even if torchrun signals it again while it
    exits. --debug shows the tracebacks (runs.exit_on_error)."""
    cfg, notes = parse_args(argv)
    return runs.exit_on_error("train.py", cfg, lambda: train(cfg, notes, linger=argv is None))


if __name__ == "__main__":
    main()
