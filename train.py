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
    python train.py --demo                                      # offline CPU ablation on ToyCity (< 10 min, 2 cores)
"""
import argparse
import copy
import inspect
import json
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import threading
import time
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import checkpoints
import clouds
import data
import evaluate
import refine

# ---- config ----


@dataclass(frozen=True)
class SourcePreset:
    """Solver settings of one training source (reference §1.4, ConvNeXt-L configs)."""
    split: Optional[str]       # dataset split used for training
    iters_warmup: int          # warmup MAX_ITER
    iters_joint: int           # joint MAX_ITER
    lr: float                  # BASE_LR
    schedule: str              # "constant" (WarmupMultiStepLR, STEPS beyond MAX_ITER) or "poly" (WarmupPolyLR 0.9)
    eval_every: int            # TEST.EVAL_PERIOD
    target_factor: float       # DATASETS.TARGET_FACTOR, the generated images' repeat factor
    eval_sets: tuple           # DATASETS.TEST


SOURCES = {
    "gta": SourcePreset(None, 40000, 40000, 1e-5, "constant", 4000, 2.0, ("cityscapes", "bdd", "mapillary")),
    "synthia": SourcePreset(None, 30000, 30000, 1e-5, "poly", 1500, 0.7, ("cityscapes", "bdd", "mapillary")),
    "cityscapes": SourcePreset("train", 5000, 10000, 1e-4, "constant", 500, 0.2,
                               ("acdc_night", "acdc_rain", "acdc_snow", "acdc_fog", "cityscapes")),
}
PHASES = ("warmup", "joint", "all")
SAMS = ("vit_t", "vit_h", "vit_l", "vit_b", "toy", "none")
SCHEDULES = ("constant", "poly")
EVAL_SETS = tuple(n for n in data.DATASETS if n != "generated")

# The toy recipe: one source of truth for `--recipe toy` and `--demo`. Toy scale: ToyCity GTA is 263x478 (real / 4);
# generated toy images are 192x192. Random init: higher LR than the official 1e-5, no 0.1x backbone multiplier.
DEMO_ROOT = "datasets_toy"
DEMO_TARGETS = ("cityscapes", "bdd", "mapillary", "acdc_fog", "acdc_night", "acdc_rain", "acdc_snow")
DEMO = dict(
    preset="tiny", train_backbone=True, crop_size=192, scale_min=0.5, scale_max=2.0, test_short_side=256,
    batch_size=4, lr=5e-4, backbone_multiplier=1.0, schedule="constant", workers=0, log_every=20,
    eval_sets=DEMO_TARGETS, eval_max=25, ema_every=10)
DEMO_ITERS = {"warmup": 400, "joint": 200}
# Sec. 3.3 toy scale: the official 5000 px threshold on 768x768 crops is 0.85% of the crop; the same share of a
# 192x192 toy image is 312 px
TOY_MIN_AREA = round(5000 * (DEMO["crop_size"] / 768) ** 2)
RECIPES = {
    "none": {},
    "toy": {**DEMO, "data_root": DEMO_ROOT, "iters_warmup": DEMO_ITERS["warmup"], "iters_joint": DEMO_ITERS["joint"],
            "eval_every": DEMO_ITERS["joint"], "sam": "toy", "sam_min_area": TOY_MIN_AREA},
}
# Fields that change the optimization: --resume refuses a change of any of them without --allow-config-change. Paths
# are not compared (a moved dataset is the same data; its size is); nor is the number of ranks (StreamSampler).
OPTIM_FIELDS = ("source", "phase", "preset", "train_backbone", "backbone_bf16", "classifier",
                "iters_warmup", "iters_joint", "lr", "schedule", "poly_power", "batch_size", "weight_decay",
                "weight_decay_norm", "weight_decay_embed", "backbone_multiplier", "clip_grad", "crop_size",
                "scale_min", "scale_max", "target_factor", "source_factor", "p_gen", "n_source", "n_generated",
                "ema_alpha", "ema_every", "sam", "sam_min_area", "sam_num_points", "sam_mode", "sam_uncovered",
                "seed")


@dataclass
class TrainConfig:
    # what to train
    source: str = "gta"                   # gta | synthia | cityscapes (reference §1.4); None fields below come from it
    phase: str = "all"                    # warmup | joint | all (warmup, then joint from the warmup weights)
    preset: str = "convnext_large"        # clouds.build_model preset: convnext_large (official) | rn50 | rn101 | tiny
    data_root: str = "datasets"           # official: every dataset list starts with datasets/
    synthetic: str = ""                   # generate.py output folder (joint phase); official sd_llama70b_v2
    out: str = "runs/clouds"              # official OUTPUT_DIR
    weights: str = ""                     # initial weights: our checkpoint or an official model_final.pth
    clip_weights: str = ""                # local open_clip weights file (offline); "" = the preset's pretrained tag
    train_backbone: bool = False          # official: frozen CLIP; True only for the random-init `tiny` preset
    backbone_bf16: bool = False           # bf16 autocast for the frozen backbone (reference §12; official fp32)
    classifier: str = "linear"            # official decoder: Linear(256, 20); "text": the paper's CLIP text classifier
    # solver (reference §1.4-1.5)
    iters_warmup: Optional[int] = None    # official MAX_ITER (gta 40k, synthia 30k, cityscapes 5k)
    iters_joint: Optional[int] = None     # official MAX_ITER (gta 40k, synthia 30k, cityscapes 10k)
    lr: Optional[float] = None            # official BASE_LR (1e-5; cityscapes 1e-4)
    schedule: Optional[str] = None        # constant | poly (official: poly for synthia only)
    poly_power: float = 0.9               # official SOLVER.POLY_LR_POWER
    batch_size: int = 8                   # official SOLVER.IMS_PER_BATCH (total over all ranks)
    weight_decay: float = 0.05            # official SOLVER.WEIGHT_DECAY (AdamW, betas/eps torch defaults)
    weight_decay_norm: float = 0.0        # official SOLVER.WEIGHT_DECAY_NORM
    weight_decay_embed: float = 0.0       # official SOLVER.WEIGHT_DECAY_EMBED (nn.Embedding parameters)
    backbone_multiplier: float = 0.1      # official SOLVER.BACKBONE_MULTIPLIER (only matters with --train-backbone)
    clip_grad: float = 0.01               # official CLIP_GRADIENTS full_model, L2 norm 0.01
    # data (reference §1.6-1.7, §8.1)
    crop_size: int = 768                  # official FixedSizeCrop 768x768
    scale_min: float = 0.5                # official ResizeScale min_scale
    scale_max: float = 2.0                # official ResizeScale max_scale
    target_factor: Optional[float] = None  # official DATASETS.TARGET_FACTOR (gta 2.0, synthia 0.7, cityscapes 0.2)
    source_factor: float = 1.0            # official DATASETS.SOURCE_FACTOR
    p_gen: Optional[float] = None         # share of generated samples; None = from the repeat factors (§1.6)
    workers: int = 4                      # official DATALOADER.NUM_WORKERS
    # self-training (reference §4, §5)
    ema_alpha: float = 0.999              # official SAM.ALPHA_EMA
    ema_every: int = 100                  # official ITERATION_UPDATE
    sam: str = "vit_t"                    # official SAM.MOBILE=True: MobileSAM; vit_h|vit_l|vit_b|toy|none
    sam_checkpoint: str = ""              # "" = the official weights/ file of --sam (refine.DEFAULT_CHECKPOINTS)
    sam_min_area: int = 5000              # official SAM.SIZE_THRESHOLD (strict >)
    sam_num_points: int = 5               # official SAM.NUM_POINTS
    sam_mode: str = "random"              # official SAM.SELECTION_MODE
    sam_uncovered: str = "drop"           # official: pixels in no SAM mask are negatives ("ignore" leaves them out)
    # evaluation and logging
    eval_every: Optional[int] = None      # official TEST.EVAL_PERIOD (also at the end); 0 = no evaluation
    eval_sets: tuple[str, ...] = ()       # official DATASETS.TEST; () = the source's test sets
    eval_max: int = 0                     # evaluate on the first N images of each set (0 = all)
    test_short_side: int = 1024           # official MapperTest ResizeShortestEdge(1024)
    ckpt_every: Optional[int] = None      # snapshots model_NNNNNNN.pt; official CHECKPOINT_PERIOD = 5 x EVAL_PERIOD
    save_every: int = 1000                # OUT/last.pt every N iterations (also at the end and on Ctrl-C / SIGTERM)
    log_every: int = 20                   # official detectron2 PeriodicWriter period
    seed: int = 0                         # official SEED -1 (random); ours: data and RNG are functions of the seed
    device: str = "auto"                  # auto (cuda:LOCAL_RANK if available) | cpu | cuda | cuda:N
    resume: bool = False                  # continue from OUT/last.pt (model, optimizer, schedule, teacher, iteration)
    overwrite: bool = False               # start over in an --out that already holds a run (its files are replaced)
    allow_config_change: bool = False     # with --resume: apply changed lr/schedule/iterations/... (logged)
    recipe: str = "none"                  # toy: the ToyCity settings of --demo (explicit flags win; printed)
    debug: bool = False                   # show Python tracebacks instead of one-message errors
    tensorboard: bool = False             # also write TensorBoard scalars (needs `pip install tensorboard`)
    plots: bool = True                    # loss/mIoU curves and the pseudo-label grid as PNGs
    progress: bool = True                 # tqdm bars
    demo: bool = False                    # run the offline ToyCity ablation instead (run_demo; rewrites its runs)
    demo_out: str = "runs/demo"           # demo output folder
    # speed (ours)
    tf32: bool = True                     # TF32 matmuls/convs on CUDA; on: the official torch 1.9 default (§9.13)
    profile: bool = False                 # CUDA-synchronized time_teacher/refine/student (extra syncs); off: host times

    def __post_init__(self):
        def allowed(name, value, valid):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")
        allowed("source", self.source, SOURCES)
        allowed("phase", self.phase, PHASES)
        allowed("preset", self.preset, clouds.PRESETS)
        allowed("sam", self.sam, SAMS)
        allowed("classifier", self.classifier, ("linear", "text"))
        allowed("recipe", self.recipe, RECIPES)
        preset = SOURCES[self.source]
        for name in ("iters_warmup", "iters_joint", "lr", "schedule", "eval_every", "target_factor"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(preset, name))
        self.eval_sets = tuple(self.eval_sets) or preset.eval_sets
        if self.ckpt_every is None:
            self.ckpt_every = 5 * self.eval_every if self.eval_every else 5000  # official 5 x EVAL_PERIOD
        allowed("schedule", self.schedule, SCHEDULES)
        for name in self.eval_sets:
            allowed("evaluation set", name, EVAL_SETS)
        for name in ("iters_warmup", "iters_joint", "eval_every", "eval_max", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "crop_size", "ema_every", "ckpt_every", "save_every", "log_every",
                     "test_short_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.ema_alpha <= 1 and 0 < self.scale_min <= self.scale_max):
            raise ValueError(f"need lr > 0, 0 <= ema_alpha <= 1 and 0 < scale_min <= scale_max; got lr={self.lr}, "
                             f"ema_alpha={self.ema_alpha}, scale {self.scale_min}..{self.scale_max}")
        if self.p_gen is not None and not 0 <= self.p_gen <= 1:
            raise ValueError(f"--p-gen must be in [0, 1], got {self.p_gen}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")


CHOICES = {"source": SOURCES, "phase": PHASES, "preset": clouds.PRESETS, "sam": SAMS, "schedule": SCHEDULES,
           "classifier": ("linear", "text"), "sam_mode": ("random", "interior"), "sam_uncovered": ("drop", "ignore"),
           "recipe": RECIPES, "eval_sets": EVAL_SETS}


def build_parser(explicit_only: bool = False) -> argparse.ArgumentParser:
    """argparse generated from TrainConfig: --field-name VALUE, --flag/--no-flag for booleans, nargs for tuples,
    choices for the registries. explicit_only: every default is SUPPRESS, so parsing returns the flags given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    # the help text of a field is its source comment
    comments = dict(re.findall(r"^    (\w+): [^#\n]*# (.*)$", inspect.getsource(TrainConfig), re.M))
    for f in fields(TrainConfig):
        tp, flag, help_ = hints[f.name], "--" + f.name.replace("_", "-"), comments.get(f.name, "")
        default = argparse.SUPPRESS if explicit_only else f.default
        choices = list(CHOICES[f.name]) if f.name in CHOICES else None
        if typing.get_origin(tp) is typing.Union:  # Optional[X] -> X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(flag, nargs="*", type=typing.get_args(tp)[0], default=default, help=help_,
                                choices=choices)
        else:
            parser.add_argument(flag, type=tp, default=default, help=help_, choices=choices)
    return parser


def parse_args(argv=None):
    """argv -> (TrainConfig, notes). `--recipe NAME` fills the fields not given on the command line (explicit flags
    win); the notes say what it set. Usage errors (bad choices, TrainConfig's ValueErrors) exit 2 via argparse."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    explicit = vars(build_parser(explicit_only=True).parse_args(argv))
    recipe = {k: v for k, v in RECIPES[args["recipe"]].items() if k not in explicit}
    try:
        cfg = TrainConfig(**{**args, **recipe})
    except ValueError as e:
        parser.error(str(e))
    notes = []
    if recipe:
        notes.append(f"--recipe {cfg.recipe} set " + ", ".join(_as_flag(k, v) for k, v in recipe.items())
                     + " (flags given on the command line win)")
    return cfg, notes


def parse_config(argv=None) -> TrainConfig:
    return parse_args(argv)[0]


def _as_flag(name, value) -> str:
    """The command-line spelling of a field value: --train-backbone, --no-plots, --eval-sets a b, --lr 0.0005."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} " + (" ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value))


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
    lr * backbone_multiplier. `modules` maps a name ("head", "backbone") to a module; frozen parameters are skipped."""
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
    """The trainable part: the head (plus the backbone when it trains). `forward` runs the full model with this head.
    Only this module goes into DistributedDataParallel; the frozen backbone, the EMA teacher and SAM never do."""

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


def load_weights(model, path):
    """Initial weights: our checkpoint (head, + backbone if it was trained) or an official model_final.pth."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path} does not exist: pass the warmup model_final.pt (ours) or an "
                                f"official model_final.pth, or use --phase all to run the warmup first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # pickled Python objects: not ours; load_official reads and checks it
        ckpt = None
    if isinstance(ckpt, dict) and ckpt.get("version") == 1 and "model" in ckpt:
        state = ckpt["model"]
        model.sem_seg_head.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("sem_seg_head.")})
        backbone = {k[20:]: v for k, v in state.items() if k.startswith("backbone.clip_model.")}
        if backbone:
            model.backbone.clip_model.load_state_dict(backbone)
        return ckpt
    checkpoints.load_official(path, model)
    return None


# ---- one training iteration ----


def pseudo_targets(model, teacher, samples, predictor, refine_cfg, device, keep_records=False, profile=False):
    """Reference §4.4 steps 3-4 for the generated samples: the teacher's semantic argmax on the clean flipped images
    (shared backbone, no confidence threshold), then SAM refinement, or with --sam none the dense teacher masks (§4.2).

    Everything stays on `device` (SAM's masks on the predictor's); targets are on `device`. Returns (targets,
    records, teacher seconds, refinement seconds); records = (image uint8 numpy (h, w, 3), teacher label, refined
    label int64 (h, w) tensors on the device) when keep_records. The seconds are CUDA-synchronized only when
    `profile` (otherwise host time: kernels still queued are not counted).
    """
    t0 = _sync(device, profile)
    images = pad_batch([s["image"].to(device, non_blocking=True) for s in samples], 0)  # (G, 3, H, W) on the device
    labels = model.predict(images, head=teacher)  # (G, H, W) int64, stays on the device
    t1 = _sync(device, profile)
    targets, records = [], []
    for s, image, label in zip(samples, images, labels):
        h, w = s["image"].shape[-2:]
        image, label = image[:, :h, :w], label[:h, :w]  # (3, h, w) uint8 clean flipped image, (h, w) on the device
        if predictor is None:
            t = clouds.targets_from_label(label)
        else:  # Sec. 3.3: SAM refinement; the points come from a CPU generator seeded per sample (rank-independent)
            generator = torch.Generator().manual_seed(s["refine_seed"])
            t = refine.pseudo_label_target(image, label, predictor, refine_cfg, generator)  # on the device
        targets.append(t)
        if keep_records:  # device tensors; plot_pseudo_labels (data.colorize) copies them to the host when it draws
            records.append((s["image"].permute(1, 2, 0).numpy(), label, refine.label_map(t["labels"], t["masks"])))
    return targets, records, t1 - t0, _sync(device, profile) - t1


def _pad_target(t, size):
    """Pad a target's masks (K, h, w) to the batch size (H, W) with False; the padding is outside the image, so it is
    marked not `valid` (left out of the mask losses)."""
    if tuple(t["masks"].shape[-2:]) == tuple(size):
        return t
    valid = t.get("valid", torch.ones(t["masks"].shape[-2:], dtype=torch.bool, device=t["masks"].device))
    return {"labels": t["labels"], "masks": pad_batch([t["masks"]], False, size)[0],
            "valid": pad_batch([valid], False, size)[0]}


def _sync(device, profile=True):
    """time.perf_counter(), after waiting for the device's queued kernels when `profile` (--profile): accurate
    per-stage times at the cost of a synchronization; without it the loop never waits for the GPU to time itself."""
    if profile and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_step(ctx, batch, it):
    """One iteration on this rank's share of the global batch -> stats. A non-finite loss or gradient norm raises
    BEFORE the optimizer step, so the weights and last.pt stay at the last good state."""
    model, device, cfg = ctx["model"], ctx["device"], ctx["cfg"]
    t0, cpu0 = _sync(device, cfg.profile), time.process_time()
    # §4.4 step 2: the student sees image_aug (flip + jitter) for generated samples, the augmented crop for source ones
    # (pinned samples on CUDA: asynchronous copies, padded on the device)
    images = pad_batch([(s["image_aug"] if s["generated"] else s["image"]).to(device, non_blocking=True)
                        for s in batch], 0)
    size = tuple(images.shape[-2:])
    gen = [s for s in batch if s["generated"]]
    t_teacher = t_refine = 0.0
    pseudo = iter(())
    if gen:  # §4.4 steps 3-5: the generated samples' targets are replaced by their pseudo labels
        keep = ctx["rank"] == 0 and cfg.plots
        targets_gen, records, t_teacher, t_refine = pseudo_targets(model, ctx["teacher"], gen, ctx["predictor"],
                                                                   ctx["refine_cfg"], device, keep, cfg.profile)
        pseudo = iter(targets_gen)
        ctx["records"] = (records + (ctx["records"] or []))[:4]  # the 4 latest, for the pseudo-label PNG
    t1 = _sync(device, cfg.profile)
    targets = []
    for s in batch:  # source padding is label 255: negatives for every mask, like the official black padding (§9.16)
        t = _pad_target(next(pseudo), size) if s["generated"] else \
            clouds.targets_from_label(pad_batch([s["label"].to(device, non_blocking=True)], data.IGNORE_INDEX, size)[0])
        targets.append({k: v.to(device) for k, v in t.items()})  # already there (kept for CPU-only predictors)
    outputs = ctx["student"](images)
    check_outputs(ctx, outputs, it)  # before the matcher: scipy's Hungarian solver dies on NaN costs
    losses = model.criterion(outputs, targets, generator=ctx["generator"])  # §4.3: one call over the mixed batch
    loss = sum(losses.values())
    finite = torch.tensor(float(torch.isfinite(loss)), device=device)
    if ctx["world"] > 1:  # all ranks stop together, or the others would hang in the next all-reduce
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        terms = {k: v.item() for k, v in losses.items() if k in ("loss_ce", "loss_mask", "loss_dice")}
        raise TrainError(f"non-finite loss at {ctx['phase']} iteration {it}: total {loss.item()}, final-layer terms "
                         f"{terms}. Stopped before the optimizer step; the last good checkpoint ({_last_good(ctx)}) "
                         f"is kept. Lower --lr or check the inputs, then rerun with --resume.")
    ctx["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx["params"], cfg.clip_grad)  # official: full model, L2 0.01
    if not torch.isfinite(grad_norm):
        raise TrainError(f"non-finite gradient norm at {ctx['phase']} iteration {it} (loss {loss.item():.4f}). "
                         f"Stopped before the optimizer step; the last good checkpoint ({_last_good(ctx)}) is kept. "
                         f"Lower --lr, then rerun with --resume.")
    ctx["optimizer"].step()
    ctx["scheduler"].step()
    t2 = _sync(device, cfg.profile)
    terms = {k: v.item() for k, v in losses.items() if k in ("loss_ce", "loss_mask", "loss_dice")}
    return {"loss": loss.item(), **terms, "n_gen": len(gen), "grad_norm": float(grad_norm),
            "time_teacher": t_teacher, "time_refine": t_refine, "time_student": t2 - t1, "time_iter": t2 - t0,
            "cpu_iter": time.process_time() - cpu0}


def check_outputs(ctx, outputs, it):
    """Raise TrainError when pred_logits / pred_masks (final or auxiliary) hold NaN or Inf: one device sync, and every
    rank stops together (MIN all-reduce)."""
    named = [("", outputs)] + [(f"aux_outputs[{i}].", a) for i, a in enumerate(outputs.get("aux_outputs", []))]
    tensors = [(p + k, o[k]) for p, o in named for k in ("pred_logits", "pred_masks")]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).float()  # (n,)
    if ctx["world"] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.min().item() < 1:
        bad = [n for (n, _), f in zip(tensors, finite.tolist()) if f < 1]
        cfg = ctx["cfg"]
        raise TrainError(f"non-finite model outputs at {ctx['phase']} iteration {it} ({', '.join(bad[:4])}"
                         f"{', ...' if len(bad) > 4 else ''}): stopped before the matcher and the optimizer step; the "
                         f"last good checkpoint is {_last_good(ctx)}. Try a lower --lr (now {cfg.lr})"
                         + (", --no-backbone-bf16" if cfg.backbone_bf16 else "")
                         + ", or check the input images; then rerun with --resume.")


def _last_good(ctx) -> str:
    saved = ctx.get("saved")
    return f"{ctx['last']}, iteration {saved}" if saved is not None else f"none yet: {ctx['last']} is not written"


# ---- checkpoints, metrics, plots ----


def _seed(*keys) -> int:
    """A 63-bit seed derived from integer keys (numpy SeedSequence: well mixed, stable across platforms)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def save_state(path, ctx, iteration):
    """last.pt: the model (head, + backbone when trained) plus everything resume needs. Written atomically."""
    trainer = {"phase": ctx["phase"], "iteration": iteration, "optimizer": ctx["optimizer"].state_dict(),
               "scheduler": ctx["scheduler"].state_dict(),
               "teacher": ctx["teacher"].state_dict() if ctx["teacher"] is not None else None,
               "torch_rng": torch.get_rng_state(), "config": asdict(ctx["cfg"])}
    checkpoints.save_checkpoint(path, ctx["model"], trainer=trainer)


def restore_state(path, ctx) -> int:
    """Load last.pt into the running model, optimizer, schedule and teacher; returns the completed iterations. The
    data stream and the per-iteration generators are functions of (seed, iteration), so nothing else is needed."""
    try:
        ckpt = load_weights(ctx["model"], path)
    except Exception as e:  # a cut-off or foreign file; read_trainer already checked it in the preflight
        raise TrainError(f"could not resume from {path} ({type(e).__name__}: {_first_line(e)}); move it away or "
                         f"start over with --overwrite") from e
    trainer = (ckpt or {}).get("trainer")
    if not trainer or trainer.get("phase") != ctx["phase"]:
        raise TrainError(f"{path} holds no {ctx['phase']} trainer state (found phase "
                           f"{(trainer or {}).get('phase')}); resume from the matching --out folder or drop --resume")
    fresh = [{k: g[k] for k in ("lr", "weight_decay")} for g in ctx["optimizer"].param_groups]  # this run's config
    schedule = dict(vars(ctx["scheduler"].lr_lambdas[0]))
    ctx["optimizer"].load_state_dict(trainer["optimizer"])
    ctx["scheduler"].load_state_dict(trainer["scheduler"])  # restores the saved LRSchedule fields too
    # This run's hyperparameters take effect from the resumed iteration (the preflight refused any change without
    # --allow-config-change); unchanged ones give back exactly the saved values.
    sched = ctx["scheduler"]
    sched.lr_lambdas[0].__dict__.update(schedule)
    sched.base_lrs = [g["lr"] for g in fresh]
    for group, new, base in zip(ctx["optimizer"].param_groups, fresh, sched.base_lrs):
        group.update(weight_decay=new["weight_decay"], initial_lr=base, lr=base * sched.lr_lambdas[0](sched.last_epoch))
    sched._last_lr = [g["lr"] for g in ctx["optimizer"].param_groups]  # what get_last_lr() (the logged LR) reports
    if ctx["teacher"] is not None:
        ctx["teacher"].load_state_dict(trainer["teacher"])
    torch.set_rng_state(trainer["torch_rng"])
    return int(trainer["iteration"])


def _atomic(path, write):
    """Call write(tmp) on a temp file beside `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


class MetricsLog:
    """metrics.jsonl (one JSON object per logged iteration or evaluation) and, optionally, TensorBoard scalars."""

    def __init__(self, path, enabled=True, tensorboard=False, keep_until=None, say=None):
        self.path, self.enabled, self.writer = Path(path), enabled, None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and self.path.is_file():  # resume: drop what the interrupted run logged later
            lines = [json.dumps(r) for r in read_metrics(self.path, say) if r.get("iter", 0) <= keep_until]
            _atomic(self.path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in lines)))
        elif keep_until is None:
            self.path.unlink(missing_ok=True)
        if tensorboard:
            self.writer = _summary_writer_cls()(str(self.path.parent / "tensorboard"))

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iter":
                    self.writer.add_scalar(f"{record['phase']}/{key}", value, record["iter"])
            for name, m in record.get("eval", {}).items():
                self.writer.add_scalar(f"{record['phase']}/mIoU/{name}", m["mIoU"], record["iter"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_metrics(path, say=None) -> list:
    """The records of a metrics.jsonl; a line that is not JSON (cut off by a crash) is skipped with a warning."""
    records, say = [], say or _warn
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            say(f"[train] warning: {path} line {i} is not valid JSON (cut off by a crash?); skipped: {line[:60]!r}",
                err=True)
    return records


def _warn(msg, err=True):
    print(msg, file=sys.stderr, flush=True)


def _summary_writer_cls():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or drop --tensorboard; metrics.jsonl is always written)") from e
    return SummaryWriter


def plot_curves(metrics_path, png_path):
    """Loss (left) and mIoU per evaluation set (right) against the iteration, from metrics.jsonl."""
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path, say=lambda *a, **k: None)  # torn lines were reported at resume
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_miou = fig.subplots(1, 2)
    train = [r for r in records if "loss" in r]
    ax_loss.plot([r["iter"] for r in train], [r["loss"] for r in train], label="total")
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        ax_loss.plot([r["iter"] for r in train], [r.get(key, math.nan) for r in train], label=key, lw=0.8)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training loss")
    ax_loss.legend()
    evals = [r for r in records if "eval" in r]
    for name in (evals[0]["eval"] if evals else {}):
        ax_miou.plot([r["iter"] for r in evals], [100 * r["eval"][name]["mIoU"] for r in evals], "o-", label=name)
    ax_miou.set(xlabel="iteration", ylabel="mIoU (%)", title="evaluation")
    if evals:
        ax_miou.legend()
    fig.tight_layout()
    _atomic(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def plot_pseudo_labels(records, png_path):
    """Grid of generated samples: image | teacher argmax | refined pseudo label, with a legend of the class colours
    that appear; black = no class (ignored, or dropped by the refinement rules, reference §5.3)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(9, 3 * len(records) + 1.2))
    axes = np.asarray(fig.subplots(len(records), 3, squeeze=False))
    for row, (image, teacher, refined) in zip(axes, records):
        for ax, img, title in zip(row, (image, data.colorize(teacher), data.colorize(refined)),
                                  ("generated image", "teacher", "refined")):
            ax.imshow(img)
            ax.set_title(title)
            ax.axis("off")
    present = sorted({int(c) for _, t, r in records for c in np.unique(np.concatenate([t.ravel(), r.ravel()]))
                      if c < len(data.CLASSES)})
    handles = [Patch(color=data.PALETTE[c] / 255, label=data.CLASSES[c]) for c in present]
    handles.append(Patch(facecolor="black", label="black: ignored / dropped by refinement"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 1.2 / (3 * len(records) + 1.2), 1, 1))
    _atomic(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


# ---- evaluation ----


def build_eval_sets(cfg) -> dict:
    """The test sets (reference §1.4) with the §8.1 test resize; the first eval_max images when eval_max > 0."""
    sets = {}
    for name in cfg.eval_sets if cfg.eval_every else ():
        ds = data.build_dataset(name, cfg.data_root, transform=data.TestTransform(cfg.test_short_side))
        if cfg.eval_max:
            ds = data.SegDataset(ds.name, ds.items[:cfg.eval_max], ds.transform)
        sets[name] = ds
    return sets


def evaluate_sets(model, sets, device, progress, workers=0) -> dict:
    """{set: {"mIoU", "mIoU16", "mAcc", "aAcc"}} (fractions); every rank must call it (confusions are summed).
    `workers` DataLoader processes read and resize the images (--workers), off the training process."""
    out = {}
    for name, ds in sets.items():
        m = evaluate.evaluate_model(model, ds, device=device, progress=progress, num_workers=workers)
        out[name] = {k: m[k] for k in ("mIoU", "mIoU16", "mAcc", "aAcc")}
        out[name]["IoU"] = {c: None if math.isnan(v) else v for c, v in zip(data.CLASSES, m["IoU"].tolist())}
    return out


# ---- distributed ----


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device
    started: bool  # we initialized the process group (and destroy it at the end)


def setup_distributed(device_name: str) -> Env:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK/MASTER_*; NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_name)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    return Env(rank, world, device, started)


# ---- phases ----


class Problems(Exception):
    """What stops a run from starting, as one message (main prints it and exits 2; --debug shows the traceback)."""

    def __init__(self, problems):
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"train.py cannot start: {n} problem{'s' * (n > 1)} (fix each, then rerun the same command)"]
        lines += [f"  {i}. " + p.replace("\n", "\n     ") for i, p in enumerate(self.problems, 1)]
        super().__init__("\n".join(lines))


class TrainError(RuntimeError):
    """A run stopped on bad state (non-finite outputs or loss, an unreadable checkpoint); the message says what to
    do. main prints it and exits 1 (--debug: traceback)."""


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: last.pt was saved (or kept); main prints the message and exits 130."""


RUN_FILES = ("config.json", "last.pt", "metrics.jsonl")


def _phase_dirs(cfg) -> dict:
    out = Path(cfg.out)
    return {"warmup": out / "warmup", "joint": out / "joint"} if cfg.phase == "all" else {cfg.phase: out}


def _first_line(err) -> str:
    return str(err).split("\n")[0]


def _dataset_problem(name, root, split, what, fix) -> tuple:
    """(problem message or None, number of files)."""
    try:
        return None, len(data.list_files(name, root, split))
    except (FileNotFoundError, ValueError) as e:
        return f"{what}: {e}\n{fix}", 0


def clip_problems(cfg) -> list:
    """The CLIP weights build_model will read: --clip-weights FILE, or the preset's open_clip tag in the Hugging Face
    cache (checked offline with huggingface_hub.try_to_load_from_cache; nothing is downloaded)."""
    if cfg.clip_weights:
        if Path(cfg.clip_weights).is_file():
            return []
        return [f"--clip-weights {cfg.clip_weights} does not exist: pass the open_clip weights file "
                f"(open_clip_pytorch_model.bin), or drop --clip-weights to use the Hugging Face cache"]
    mc = clouds.ModelConfig(**clouds.PRESETS[cfg.preset])
    if mc.pretrained is None:  # random init (tiny): nothing to load; warned about in run_warnings
        return []
    import open_clip
    from huggingface_hub import constants, try_to_load_from_cache

    hub = (open_clip.get_pretrained_cfg(mc.clip_model, mc.pretrained) or {}).get("hf_hub", "")
    repo, filename = os.path.split(hub)  # open_clip: "org/repo/" = the default file names
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if repo and any(isinstance(try_to_load_from_cache(repo, f), str) for f in names):
        return []
    file = names[-1]
    return [f"CLIP weights of --preset {cfg.preset} (open_clip {mc.clip_model}, pretrained {mc.pretrained!r}) are not "
            f"in the Hugging Face cache {constants.HF_HUB_CACHE}: on a machine with internet run\n"
            f"  hf download {repo} {file}\n(set HF_HOME to share the cache), or pass --clip-weights /path/{file}"]


def run_warnings(cfg) -> list:
    mc = clouds.ModelConfig(**clouds.PRESETS[cfg.preset])
    if mc.pretrained is None and not cfg.clip_weights and not cfg.train_backbone:
        return [f"warning: --preset {cfg.preset} has a RANDOM-INIT CLIP backbone and it stays frozen "
                f"(--no-train-backbone): the head trains on random features (lr {cfg.lr}). Pass --train-backbone, "
                f"or --recipe toy for the ToyCity settings."]
    return []


def read_trainer(path) -> dict:
    """The trainer state of a last.pt (phase, iteration, ...); an unreadable file raises TrainError naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        trainer = ckpt["trainer"]
        return {"phase": trainer["phase"], "iteration": int(trainer["iteration"])}
    except Exception as e:  # torch.load of a cut-off file: RuntimeError, EOFError, UnpicklingError, KeyError ...
        raise TrainError(f"checkpoint {path} is unreadable ({type(e).__name__}: {_first_line(e)}); it was probably "
                         f"cut off by a crash or a full disk. Delete or move it and rerun with --resume (the phase "
                         f"restarts from iteration 0), or start over with --overwrite") from e


def config_changes(old: dict, new: dict) -> dict:
    """{field: (old, new)} for the OPTIM_FIELDS that differ between the saved config.json and this run."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (JSON has lists)
    return {k: (old[k], norm(new[k])) for k in OPTIM_FIELDS if k in old and k in new and old[k] != norm(new[k])}


def preflight(cfg, env) -> dict:
    """Check everything the run needs before any model is built: the source and its converted labels, every
    evaluation set, the generated folder, the CLIP weights, the SAM package and checkpoint, --weights, the state of
    --out. Raises Problems listing EVERY problem, each with the flag or command that fixes it. Returns what it learned:
    {"n_source", "n_generated", "p_gen", "config" (the record for config.json), "changes", "resume", "warnings"}."""
    phases = ("warmup", "joint") if cfg.phase == "all" else (cfg.phase,)
    problems, root = [], cfg.data_root
    split = SOURCES[cfg.source].split
    p, n_source = _dataset_problem(cfg.source, root, split, f"source dataset {cfg.source} (--source)",
                                   f"fix: put it under --data-root (now {root}) in the layout above, or pass "
                                   f"--data-root DIR")
    problems += [p] if p else []
    for name in cfg.eval_sets if cfg.eval_every else ():
        others = [n for n in cfg.eval_sets if n != name]
        drop = f"--eval-sets {' '.join(others)}" if others else "--eval-every 0"
        p, _ = _dataset_problem(name, root, None, f"evaluation set {name} (--eval-sets)",
                                f"fix: add it under --data-root, or drop it: {drop} (or --eval-every 0 for no "
                                f"evaluation)")
        problems += [p] if p else []
    n_gen, p_gen, joint = 0, 0.0, "joint" in phases and cfg.p_gen != 0
    if joint and not cfg.synthetic:
        problems.append("joint training needs the generated images: pass --synthetic DIR (make them with "
                        "`python generate.py --out DIR`), or --p-gen 0 to train on the source alone, or "
                        "--phase warmup")
    elif joint:
        p, n_gen = _dataset_problem("generated", cfg.synthetic, None, "generated images (--synthetic)",
                                    f"fix: `python generate.py --out {cfg.synthetic}` (or --backend toy for ToyCity), "
                                    f"or pass --synthetic DIR, or --p-gen 0")
        problems += [p] if p else []
        if not p:
            p_gen = cfg.p_gen if cfg.p_gen is not None else mixing_rate(n_source, n_gen, cfg.target_factor,
                                                                        cfg.source_factor)
    if joint and cfg.sam not in ("toy", "none"):
        problems += [m + " (or --sam none: unrefined teacher labels)" for m in
                     refine.predictor_problems(cfg.sam, _sam_checkpoint(cfg), flag="--sam-checkpoint")]
    problems += clip_problems(cfg)
    if cfg.weights and not Path(cfg.weights).is_file():
        problems.append(f"--weights {cfg.weights} does not exist: pass the warmup model_final.pt (ours) or an "
                        f"official model_final.pth, or use --phase all to run the warmup first")
    dirs = _phase_dirs(cfg)
    lasts = {ph: d / "last.pt" for ph, d in dirs.items() if (d / "last.pt").is_file()}
    if cfg.phase == "joint" and not cfg.weights and not (cfg.resume and lasts):
        problems.append("--phase joint starts from the warmup weights: pass --weights WARMUP_OUT/model_final.pt, "
                        "or use --phase all to run the warmup first")
    if cfg.tensorboard:
        try:
            _summary_writer_cls()
        except ImportError as e:
            problems.append(str(e))
    if cfg.batch_size % env.world:
        problems.append(f"--batch-size {cfg.batch_size} (total) must be divisible by the {env.world} ranks")
    # the state of --out: a run there is never replaced without --resume or --overwrite
    out = Path(cfg.out)
    found = sorted(str(f) for d in {out, *dirs.values()} for f in (d / n for n in RUN_FILES) if f.is_file())
    record = {**asdict(cfg), "p_gen": p_gen, "n_source": n_source, "n_generated": n_gen, "world_size": env.world}
    changes, resume, old = {}, {}, {}
    if found and not (cfg.resume or cfg.overwrite):
        problems.append(f"--out {out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                        f"--overwrite to start over (its files are replaced), or choose another --out")
    if cfg.resume:
        for ph, path in lasts.items():
            try:
                resume[ph] = read_trainer(path)
            except TrainError as e:
                problems.append(str(e))
        for ph, r in resume.items():
            if r["phase"] != ph:
                problems.append(f"{lasts[ph]} holds {r['phase']} state, not {ph}: resume from the matching --out "
                                f"(and --phase), or start over with --overwrite")
        if (out / "config.json").is_file():
            try:
                old = json.loads((out / "config.json").read_text())
            except json.JSONDecodeError as e:
                problems.append(f"{out / 'config.json'} is not valid JSON ({e}); fix or delete it, or start over "
                                f"with --overwrite")
        if not any(p.startswith("source dataset") or p.startswith("generated images") for p in problems):
            changes = config_changes(old, record)
        if changes and not cfg.allow_config_change:
            problems.append(f"--resume with settings that change the optimization ({out / 'config.json'} -> this "
                            f"command): " + ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changes.items())
                            + ". Pass --allow-config-change to apply them from the resumed iteration (logged in "
                              "log.txt and config.json), or rerun with the old values")
    if problems:
        raise Problems(problems)
    record["history"] = old.get("history", []) if cfg.resume else []
    return {"n_source": n_source, "n_generated": n_gen, "p_gen": p_gen, "config": record, "changes": changes,
            "resume": resume, "warnings": run_warnings(cfg)}


def _sam_checkpoint(cfg) -> Optional[str]:
    """--sam-checkpoint, or the official path of --sam (refine.DEFAULT_CHECKPOINTS, reference §5.1: ./weights/)."""
    return cfg.sam_checkpoint or refine.DEFAULT_CHECKPOINTS.get(cfg.sam)


def prepare_inputs(cfg, env, p_gen: float = None) -> dict:
    """Open every input the preflight checked: the source, the evaluation sets, the generated images, SAM."""
    phases = ("warmup", "joint") if cfg.phase == "all" else (cfg.phase,)
    train_tf = data.TrainTransform(cfg.crop_size, (cfg.scale_min, cfg.scale_max))  # §1.7: rescale, crop, jitter, flip
    inputs = {"source": data.build_dataset(cfg.source, cfg.data_root, SOURCES[cfg.source].split, train_tf),
              "generated": None, "predictor": None, "p_gen": 0.0, "eval_sets": build_eval_sets(cfg),
              "refine_cfg": refine.RefineConfig(min_area=cfg.sam_min_area, num_points=cfg.sam_num_points,
                                                mode=cfg.sam_mode, uncovered=cfg.sam_uncovered)}
    if "joint" in phases and cfg.p_gen != 0:
        inputs["generated"] = data.build_dataset("generated", cfg.synthetic, transform=data.GeneratedTransform())
        inputs["p_gen"] = cfg.p_gen if cfg.p_gen is not None else mixing_rate(
            len(inputs["source"]), len(inputs["generated"]), cfg.target_factor, cfg.source_factor)
        if cfg.sam != "none":
            inputs["predictor"] = refine.build_predictor(cfg.sam, _sam_checkpoint(cfg), str(env.device))
    return inputs


class RunLog:
    """Prints and appends to OUT/log.txt (rank 0): the config summary, notes, warnings, eval tables, stops."""

    def __init__(self, path, enabled=True):
        self.path = Path(path) if enabled else None
        self.enabled = enabled

    def __call__(self, msg, err=False, echo=True):
        if not self.enabled:
            return
        if echo:
            print(msg, file=sys.stderr if err else sys.stdout, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


class StopFlag:
    """SIGINT / SIGTERM handler for the training loop: the first signal lets the current iteration finish, then the
    loop saves last.pt and stops; a second one aborts at once (KeyboardInterrupt). Main thread only."""

    def __init__(self):
        self.signum, self._old, self.pid = None, {}, os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked DataLoader worker: the main process handles the signal
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[train] {signal.Signals(signum).name}: finishing this iteration, then saving last.pt "
              f"(send it again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


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
    say = inputs.get("say") or RunLog(out_dir / "log.txt", main_rank)
    stop = inputs.get("stop") or StopFlag()
    if env.device.type == "cuda":  # --tf32: on, as torch 1.7-1.11 did by default (matmul TF32 off since 1.12)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    model.train()
    student = _Student(model, cfg.train_backbone).to(env.device)
    unused = freeze_unused(student, env.device)
    if unused and main_rank:  # frozen from then on, so printed once
        print(f"[train] {len(unused)} trainable tensors are never used by the forward pass and stay frozen "
              f"(e.g. {unused[0]})")
    params = [p for p in student.parameters() if p.requires_grad]
    if env.world > 1:
        # Only the trainable student is wrapped: the frozen backbone, the EMA teacher and SAM are outside DDP, so every
        # wrapped parameter gets a gradient and find_unused_parameters=False is correct. official bug (reference
        # §9.12): the whole model (EMA head, SAM, void_embedding) was wrapped with find_unused_parameters=False.
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=False)
    modules = {"head": model.sem_seg_head, **({"backbone": model.backbone} if cfg.train_backbone else {})}
    optimizer = torch.optim.AdamW(param_groups(modules, cfg, cfg.lr), lr=cfg.lr)  # betas/eps: torch defaults
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(cfg.schedule, max_iter, cfg.poly_power))
    teacher = None
    if joint:  # Sec. 3.3: the EMA teacher copies the head only; the backbone is shared (frozen in the official code)
        teacher = copy.deepcopy(model.sem_seg_head).requires_grad_(False).eval()
    ctx = {"cfg": cfg, "phase": phase, "model": model, "student": student, "teacher": teacher, "params": params,
           "optimizer": optimizer, "scheduler": scheduler, "device": env.device, "rank": env.rank, "world": env.world,
           "predictor": inputs["predictor"] if joint else None, "last": paths["last"], "records": None,
           "refine_cfg": inputs["refine_cfg"], "saved": None,
           "generator": torch.Generator(device=env.device)}
    start = restore_state(paths["last"], ctx) if cfg.resume and paths["last"].is_file() else 0
    if start:
        ctx["saved"] = start
        if main_rank:
            say(f"[train] resuming {phase} from iteration {start} ({paths['last']})")
    log = MetricsLog(paths["metrics"], main_rank, cfg.tensorboard, keep_until=start if cfg.resume else None, say=say)
    p_gen = inputs["p_gen"] if joint else 0.0
    stream = MixedStream(inputs["source"], inputs["generated"] if joint else None, p_gen, _seed(cfg.seed, int(joint)))
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size // env.world, collate_fn=_as_list,
                                         sampler=StreamSampler(start, cfg.batch_size, env.rank, env.world),
                                         num_workers=cfg.workers, pin_memory=env.device.type == "cuda")
    batches = iter(loader)
    results, window, it = {}, [], start
    bar = tqdm(range(start, max_iter), desc=phase, disable=not (cfg.progress and main_rank), dynamic_ncols=True)
    try:
        for it in bar:
            ctx["generator"].manual_seed(_seed(cfg.seed, int(joint), env.rank, it))  # criterion points: f(iteration)
            if joint:  # official: EMA step at the start of the forward, from the student after the previous step
                teacher_step(teacher, model.sem_seg_head, it, cfg.ema_alpha, cfg.ema_every)
            t0 = time.perf_counter()
            batch = next(batches)
            lr = scheduler.get_last_lr()[0]  # the LR of this iteration, logged with it (detectron2: before the step)
            stats = {"time_data": time.perf_counter() - t0, **train_step(ctx, batch, it)}
            window.append(stats)
            done = it + 1
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
            if done % cfg.log_every == 0 or done == max_iter:
                mean = {k: sum(s[k] for s in window) / len(window) for k in window[0]}
                log.write({"phase": phase, "iter": done, "lr": lr, **mean})
                window = []
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == max_iter):
                results = evaluate_sets(model, inputs["eval_sets"], env.device, cfg.progress and main_rank,
                                        cfg.workers)
                log.write({"phase": phase, "iter": done, "eval": results})
                if main_rank:
                    say(f"[{phase} {done}] " + ", ".join(f"{n} {100 * m['mIoU']:.2f}" for n, m in results.items()))
            stopping = _should_stop(stop, env)
            if done % cfg.save_every == 0 or done % cfg.ckpt_every == 0 or done == max_iter or stopping:
                if main_rank:
                    save_state(paths["last"], ctx, done)
                    if done % cfg.ckpt_every == 0:  # official PeriodicCheckpointer snapshot (weights only)
                        checkpoints.save_checkpoint(out_dir / f"model_{done:07d}.pt", model)
                    _write_plots(cfg, ctx, paths)
                ctx["saved"] = done
            if stopping:
                name = signal.Signals(stop.signum).name if stop.signum else "a stop signal"
                msg = f"{name}: saved {paths['last']} at iteration {done}; resume with --resume"
                if main_rank:
                    say(f"[train] {msg}", echo=False)  # main prints it
                raise Interrupted(msg)
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside the handler): the iteration is not finished
        kept = f"{paths['last']} (iteration {ctx['saved']}) is kept" if ctx["saved"] is not None else \
            "no last.pt was saved in this phase yet"
        msg = f"interrupted inside {phase} iteration {it}: {kept}; resume with --resume"
        if main_rank:
            say(f"[train] {msg}", echo=False)  # main prints it
        raise Interrupted(msg) from None
    finally:
        del batches
        log.close()
    if main_rank:
        checkpoints.save_checkpoint(paths["model_final"], model)  # official: student only (no teacher, no SAM)
        _write_plots(cfg, ctx, paths)
        if results:  # the per-class IoU of the phase's last evaluation
            say(f"[{phase}] per-class IoU (%) at iteration {max_iter}:\n" + evaluate.format_table(results))
    if env.world > 1:
        dist.barrier()
    return {"phase": phase, "iterations": max_iter, "start": start, "p_gen": p_gen, "eval": results,
            **{k: str(v) for k, v in paths.items() if v.is_file() or k == "model_final"}}


def _should_stop(stop, env) -> bool:
    """Whether a signal arrived on any rank (all ranks stop after the same iteration, or the others would hang)."""
    flag = stop.signum is not None
    if env.world > 1:
        t = torch.tensor(float(flag), device=env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = t.item() > 0
    return flag


def _write_plots(cfg, ctx, paths):
    if not cfg.plots:
        return
    if paths["metrics"].is_file():
        plot_curves(paths["metrics"], paths["curves"])
    if ctx["records"]:
        plot_pseudo_labels(ctx["records"], paths["pseudo_labels"])


def train(cfg: TrainConfig, notes=()) -> dict:
    """Run the configured phase(s). `--phase all`: OUT/warmup, then OUT/joint from the warmup weights. The preflight
    runs first: a run that cannot finish raises Problems before any model is built or any file is written."""
    env = setup_distributed(cfg.device)
    try:
        info = preflight(cfg, env)
        out = Path(cfg.out)
        main_rank = env.rank == 0
        if main_rank and cfg.overwrite:  # the old run's files go, so nothing stale mixes with the new run
            for d in {out, *_phase_dirs(cfg).values()}:
                for name in (*RUN_FILES, "log.txt", "model_final.pt"):
                    (d / name).unlink(missing_ok=True)
        say = RunLog(out / "log.txt", main_rank)
        say(f"[train] {cfg.source} -> {cfg.out}: phase {cfg.phase}, preset {cfg.preset}, iterations "
            f"{cfg.iters_warmup} warmup / {cfg.iters_joint} joint, batch {cfg.batch_size}, crop {cfg.crop_size}, lr "
            f"{cfg.lr} ({cfg.schedule}), {info['n_source']} source images, {info['n_generated']} generated (p_gen "
            f"{info['p_gen']:.3f}), SAM {cfg.sam}, eval {', '.join(cfg.eval_sets) if cfg.eval_every else 'off'}")
        for line in (*notes, *info["warnings"]):
            say(f"[train] {line}", err=line.startswith("warning"))
        record = info["config"]
        if info["changes"]:
            changed = {k: [o, n] for k, (o, n) in info["changes"].items()}
            at = {ph: r["iteration"] for ph, r in info["resume"].items()}
            record["history"].append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_at": at,
                                      "changed": changed})
            say("[train] --allow-config-change: from the resumed iteration "
                + ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changed.items()), err=True)
        inputs = prepare_inputs(cfg, env)
        inputs.update(say=say)
        torch.manual_seed(cfg.seed)  # identical random init on every rank (DDP also broadcasts rank 0's weights)
        overrides = {"pretrained": cfg.clip_weights} if cfg.clip_weights else {}
        model = clouds.build_model(cfg.preset, train_backbone=cfg.train_backbone, backbone_bf16=cfg.backbone_bf16,
                                   classifier=cfg.classifier, **overrides)
        if cfg.weights:
            load_weights(model, cfg.weights)
        model.to(env.device)
        if main_rank:
            write_json(record, out / "config.json")
        phases = ("warmup", "joint") if cfg.phase == "all" else (cfg.phase,)
        results = {}
        with StopFlag() as stop:
            inputs.update(stop=stop)
            try:
                for phase in phases:
                    results[phase] = run_phase(cfg, phase, model, env, inputs,
                                               out / phase if cfg.phase == "all" else out)
            except TrainError as e:
                say(f"[train] {e}", echo=False)  # main prints it
                raise
        return {"out": str(out), "config": str(out / "config.json"), "phases": results,
                "final": results[phases[-1]]["eval"]}
    finally:
        if env.started:
            dist.destroy_process_group()


# ---- the offline demo: a three-way ablation on ToyCity ----

DEMO_NUM_GENERATED = 40  # 40 x 2.0 / (40 x 2.0 + 200 toy GTA) = 28.6%, the official GTA rate (28.7%, §1.6)
DEMO_ROWS = {"warmup": "warmup (source only)", "source_only": "+ joint, source only",
             "self_training": "+ generated, self-training (no SAM)", "refine": "+ generated + refinement (toy SAM)"}


def ensure_toy_data(root, progress=True):
    """Build ToyCity under `root` and convert its raw labels to train ids, unless that was done already."""
    import toycity

    needed = [("gta", None), *[(n, None) for n in DEMO_TARGETS]]
    try:
        for name, split in needed:
            data.list_files(name, root, split)
        return False
    except FileNotFoundError:
        pass
    toycity.build(root, seed=0, progress=progress)
    for name in ("gta", "synthia", "cityscapes", "mapillary"):  # the formats that ship raw label ids
        data.convert(name, root, progress=progress)
    return True


def run_demo(cfg: TrainConfig) -> dict:
    """`python train.py --demo`: ToyCity + toy generated images, warmup on toy GTA, then three joint runs from the same
    warmup weights: (a) source only, (b) generated images with self-training (no SAM), (c) generated images with
    ToyPointPredictor refinement; every model is scored on the toy Cityscapes, BDD, Mapillary and ACDC val sets."""
    import generate

    t_start = time.perf_counter()
    out, root = Path(cfg.demo_out), Path(DEMO_ROOT)
    built = ensure_toy_data(root, cfg.progress)
    gen_dir = out / "generated"
    generate.main(["--backend", "toy", "--out", str(gen_dir), "--num-images", str(DEMO_NUM_GENERATED),
                   *([] if cfg.progress else ["--no-progress"])])
    t_data = time.perf_counter() - t_start
    # the toy recipe (RECIPES["toy"], also `--recipe toy`); the demo's own folders are rewritten on every run
    base = replace(cfg, demo=False, source="gta", resume=False, overwrite=True, **{**RECIPES["toy"],
                                                                                  "data_root": str(root)})
    min_area = base.sam_min_area
    runs = {"warmup": replace(base, phase="warmup", out=str(out / "warmup"), eval_every=DEMO_ITERS["warmup"])}
    warm = str(out / "warmup" / "model_final.pt")
    joint = replace(base, phase="joint", weights=warm, synthetic=str(gen_dir))
    runs["source_only"] = replace(joint, out=str(out / "source_only"), p_gen=0.0, sam="none")
    runs["self_training"] = replace(joint, out=str(out / "self_training"), sam="none")
    runs["refine"] = replace(joint, out=str(out / "refine"), sam="toy")
    results, timings = {}, {}
    for name, run_cfg in runs.items():
        t0 = time.perf_counter()
        print(f"[demo] {DEMO_ROWS[name]}")
        results[name] = train(run_cfg)["final"]
        timings[name] = round(time.perf_counter() - t0, 1)
    table = {DEMO_ROWS[n]: {t: 100 * r[t]["mIoU"] for t in DEMO_TARGETS} for n, r in results.items()}
    for row in table.values():
        row["mean"] = sum(row[t] for t in DEMO_TARGETS) / len(DEMO_TARGETS)
    caption = (f"Toy ablation (ToyCity, tiny random-init model, {DEMO_ITERS['warmup']} warmup + "
               f"{DEMO_ITERS['joint']} joint iterations at batch {DEMO['batch_size']}, crops {DEMO['crop_size']}; "
               f"{DEMO_NUM_GENERATED} toy generated images, p_gen 28.6%; EMA alpha {cfg.ema_alpha} every "
               f"{DEMO['ema_every']} iterations (official: every 100 of 40k); refinement min area {min_area} px; "
               f"mIoU % on the first {DEMO['eval_max']} val images of each toy target).")
    md = markdown_table(table, caption)
    print(md)
    summary = {"table": table, "caption": caption, "seconds": {"data": round(t_data, 1), **timings,
               "total": round(time.perf_counter() - t_start, 1)}, "built_toycity": built}
    _atomic(out / "ablation.md", lambda tmp: Path(tmp).write_text(md + "\n"))
    write_json(summary, out / "ablation.json")
    return summary


def markdown_table(table: dict, caption: str) -> str:
    cols = list(next(iter(table.values())))
    lines = [caption, "", "| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {row} | " + " | ".join(f"{v:.2f}" for v in vals.values()) + " |" for row, vals in table.items()]
    return "\n".join(lines)


# ---- main ----


def main(argv=None) -> dict:
    """Train (or, with --demo, run the ToyCity ablation). Returns the summary dict (final metrics, paths).

    A run that cannot start prints ONE message listing every problem and exits 2 (usage errors too, via argparse); a
    run stopped on bad state exits 1; Ctrl-C / SIGTERM saves last.pt and exits 130. --debug shows the tracebacks."""
    cfg, notes = parse_args(argv)
    try:
        return run_demo(cfg) if cfg.demo else train(cfg, notes)
    except (Problems, TrainError, Interrupted) as e:
        if cfg.debug:
            raise
        print(f"train.py: {e}" if not isinstance(e, Problems) else e, file=sys.stderr, flush=True)
        raise SystemExit(2 if isinstance(e, Problems) else 130 if isinstance(e, Interrupted) else 1) from None


if __name__ == "__main__":
    main()
