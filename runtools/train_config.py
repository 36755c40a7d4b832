"""The training configuration of train.py: TrainConfig (every flag, its default = the official value, its --help),
the per-source solver presets (reference §1.4), the `--recipe toy` settings, and the command-line parser.

Kept apart from train.py so the training loop reads in one sitting; train.py re-exports every name, so
`train.TrainConfig`, `train.SOURCES`, `train.parse_args`, ... keep working.
"""
import argparse
from dataclasses import dataclass, field
from typing import Optional

import backbones
import clouds
import data
from runtools import cli

DESCRIPTION = "Warmup and joint self-training of CLOUDS (Sec. 3.3 and 4.1 of the paper; reference §1, §4, §5)."
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
BACKBONE_CHOICES = ("clip", *backbones.BACKBONES)  # clip: the --preset's open_clip model (official)
PROTOCOLS = ("whole", "slide")  # evaluation: CLOUDS' whole image | the Rein family's sliding windows
EVAL_SETS = tuple(n for n in data.DATASETS if n != "generated")

# The toy recipe: one source of truth for `--recipe toy` and the demo (toyworld/demo.py). Toy scale: ToyCity GTA is 263x478 (real / 4);
# generated toy images are 192x192. Random init: higher LR than the official 1e-5, no 0.1x backbone multiplier.
TOY_ROOT = "datasets_toy"
TOY_TARGETS = ("cityscapes", "bdd", "mapillary", "acdc_fog", "acdc_night", "acdc_rain", "acdc_snow")
TOY = dict(
    preset="tiny", train_backbone=True, crop_size=192, scale_min=0.5, scale_max=2.0, test_short_side=256,
    batch_size=4, lr=5e-4, backbone_multiplier=1.0, schedule="constant", workers=0, log_every=20,
    eval_sets=TOY_TARGETS, eval_max=25, ema_every=10, cpu_threads=1,  # 1 thread: issue 18 (ops.cpu_threads)
    freeze_backbone_joint=True)  # the warmup plays CLIP's pretraining; the joint phase freezes it as Sec. 3.1 does
TOY_ITERS = {"warmup": 300, "joint": 200}  # 300: issue 18, the demo under 600 CPU-s (was 400)
# Sec. 3.3 toy scale: the official 5000 px threshold on 768x768 crops is 0.85% of the crop; the same share of a
# 192x192 toy image is 312 px
TOY_MIN_AREA = round(5000 * (TOY["crop_size"] / 768) ** 2)
RECIPES = {
    "none": {},
    "toy": {**TOY, "data_root": TOY_ROOT, "iters_warmup": TOY_ITERS["warmup"], "iters_joint": TOY_ITERS["joint"],
            "eval_every": TOY_ITERS["joint"], "sam": "toy", "sam_min_area": TOY_MIN_AREA},
}


def _field(default, help_: str):
    """A TrainConfig field with its --help text in the metadata (build_parser reads it)."""
    return field(default=default, metadata={"help": help_})


@dataclass
class TrainConfig:
    """Every setting of a run; the command-line flags are generated from these fields (build_parser)."""
    # what to train
    source: str = _field("gta", "gta | synthia | cityscapes (reference §1.4); None fields below come from it")
    phase: str = _field("all", "warmup | joint | all (warmup, then joint from the warmup weights)")
    preset: str = _field("convnext_large", "clouds.build_model preset: convnext_large (official) | rn50 | rn101 | tiny")
    data_root: str = _field("datasets", "official: every dataset list starts with datasets/")
    synthetic: str = _field("", "generate.py output folder (joint phase); official sd_llama70b_v2")
    out: str = _field("runs/clouds", "official OUTPUT_DIR")
    weights: str = _field("", "initial weights: our checkpoint or an official model_final.pth")
    clip_weights: str = _field("", 'local open_clip weights file (offline); "" = the preset\'s pretrained tag')
    train_backbone: bool = _field(False, "official: frozen CLIP; True only for the random-init `tiny` preset")
    freeze_backbone_joint: bool = _field(False, "with --train-backbone: the joint phase keeps the backbone the warmup "
                                                "trained frozen, as the paper keeps CLIP frozen (--recipe toy); "
                                                "without it: no effect")
    backbone_bf16: bool = _field(False, "bf16 autocast for the frozen backbone (reference §12; official fp32)")
    classifier: str = _field("linear", 'official decoder: Linear(256, 20); "text": the paper\'s CLIP text classifier')
    # beyond the paper (issue 19): the preset's head on a ViT, frozen or with a Rein-style adapter / LoRA
    backbone: str = _field("clip", "clip: the --preset's open_clip model (official) | dinov2_l | dinov2_l_reg4 | "
                                   "eva02_l | eva02_l_clip (ViT-L at patch 16; *_tiny: random-init tests)")
    tuning: str = _field("frozen", "ViT --backbone: frozen | rein (Rein-style adapter, its tokens are the queries) | "
                                   "lora (only the adapter trains, lr x 1)")
    backbone_weights: str = _field("", 'local weights file of --backbone (timm\'s model.safetensors, or open_clip\'s '
                                       'file for eva02_l_clip); "" = the Hugging Face cache')
    rein_rank: int = _field(16, "Rein: rank of each layer's tokens (Rein: 16)")
    lora_rank: int = _field(16, "LoRA rank r")
    lora_alpha: float = _field(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_targets: str = _field("qkv", "LoRA on: qkv | attn (qkv + attn.proj) | all (every Linear of the blocks)")
    # solver (reference §1.4-1.5)
    iters_warmup: Optional[int] = _field(None, "official MAX_ITER (gta 40k, synthia 30k, cityscapes 5k)")
    iters_joint: Optional[int] = _field(None, "official MAX_ITER (gta 40k, synthia 30k, cityscapes 10k)")
    lr: Optional[float] = _field(None, "official BASE_LR (1e-5; cityscapes 1e-4)")
    schedule: Optional[str] = _field(None, "constant | poly (official: poly for synthia only)")
    poly_power: float = _field(0.9, "official SOLVER.POLY_LR_POWER")
    batch_size: int = _field(8, "official SOLVER.IMS_PER_BATCH (total over all ranks)")
    weight_decay: float = _field(0.05, "official SOLVER.WEIGHT_DECAY (AdamW, betas/eps torch defaults)")
    weight_decay_norm: float = _field(0.0, "official SOLVER.WEIGHT_DECAY_NORM")
    weight_decay_embed: float = _field(0.0, "official SOLVER.WEIGHT_DECAY_EMBED (nn.Embedding parameters)")
    backbone_multiplier: float = _field(0.1, "official SOLVER.BACKBONE_MULTIPLIER (only matters with --train-backbone)")
    clip_grad: float = _field(0.01, "official CLIP_GRADIENTS full_model, L2 norm 0.01")
    # data (reference §1.6-1.7, §8.1)
    crop_size: int = _field(768, "official FixedSizeCrop 768x768")
    scale_min: float = _field(0.5, "official ResizeScale min_scale")
    scale_max: float = _field(2.0, "official ResizeScale max_scale")
    target_factor: Optional[float] = _field(None,
                                            "official DATASETS.TARGET_FACTOR (gta 2.0, synthia 0.7, cityscapes 0.2)")
    source_factor: float = _field(1.0, "official DATASETS.SOURCE_FACTOR")
    p_gen: Optional[float] = _field(None, "share of generated samples; None = from the repeat factors (§1.6)")
    workers: int = _field(4, "official DATALOADER.NUM_WORKERS")
    check_images: Optional[bool] = _field(None, "open the input files before the run (generated images, source and "
                                          "evaluation labels, image headers): default all when that takes < 1%% of "
                                          "the run's data loading (at least 1 s), else a random sample; "
                                          "--check-images: all; --no-check-images: none")
    # self-training (reference §4, §5)
    ema_alpha: float = _field(0.999, "official SAM.ALPHA_EMA")
    ema_every: int = _field(100, "official ITERATION_UPDATE")
    sam: str = _field("vit_t", "official SAM.MOBILE=True: MobileSAM; vit_h|vit_l|vit_b|toy|none")
    sam_checkpoint: str = _field("", '"" = the official weights/ file of --sam (refine.DEFAULT_CHECKPOINTS)')
    sam_min_area: int = _field(5000, "official SAM.SIZE_THRESHOLD (strict >)")
    sam_num_points: int = _field(5, "official SAM.NUM_POINTS")
    sam_mode: str = _field("random", "official SAM.SELECTION_MODE")
    sam_uncovered: str = _field("drop", 'official: pixels in no SAM mask are negatives ("ignore" leaves them out)')
    # evaluation and logging
    eval_every: Optional[int] = _field(None, "official TEST.EVAL_PERIOD (also at the end); 0 = no evaluation")
    eval_sets: tuple[str, ...] = _field((), "official DATASETS.TEST; () = the source's test sets")
    eval_max: int = _field(0, "evaluate on the first N images of each set (0 = all)")
    test_short_side: int = _field(1024, "official MapperTest ResizeShortestEdge(1024)")
    eval_protocol: str = _field("whole", "whole: one forward per image (CLOUDS, official) | slide: --slide-window "
                                         "windows every --slide-stride px, scores averaged (Rein / mmseg)")
    slide_window: int = _field(512, "--eval-protocol slide: square window in px (Rein: 512)")
    slide_stride: int = _field(341, "--eval-protocol slide: stride in px (Rein: 341)")
    ckpt_every: Optional[int] = _field(None, "snapshots model_NNNNNNN.pt; official CHECKPOINT_PERIOD = 5 x EVAL_PERIOD")
    save_every: int = _field(1000, "OUT/last.pt every N iterations (also at the end and on Ctrl-C / SIGTERM)")
    log_every: int = _field(20, "official detectron2 PeriodicWriter period")
    seed: int = _field(0, "official SEED -1 (random); ours: data and RNG are functions of the seed")
    device: str = _field("auto", "auto (cuda:LOCAL_RANK if available) | cpu | cuda | cuda:N")
    resume: bool = _field(False, "continue from OUT/last.pt (model, optimizer, schedule, teacher, iteration)")
    overwrite: bool = _field(False, "start over in an --out that already holds a run (its files are replaced)")
    allow_config_change: bool = _field(False, "with --resume: apply changed lr/schedule/iterations/... (logged)")
    recipe: str = _field("none", "toy: the ToyCity settings of the demo, python -m toyworld.demo (explicit flags win; printed)")
    debug: bool = _field(False, "show Python tracebacks instead of one-message errors")
    tensorboard: bool = _field(False, "also write TensorBoard scalars (needs `pip install tensorboard`)")
    plots: bool = _field(True, "loss/mIoU curves and the pseudo-label grid as PNGs")
    progress: bool = _field(True, "tqdm bars")
    # speed (ours)
    tf32: bool = _field(True, "TF32 matmuls/convs on CUDA; on: the official torch 1.9 default (§9.13)")
    profile: bool = _field(False, "CUDA-synchronized time_teacher/refine/student (extra syncs); off: host times")
    cpu_threads: int = _field(0, "intra-op CPU threads (ops.cpu_threads); 0 = torch's default, one per core")
    allow_ops_fallback: bool = _field(False, "on CUDA, train with the pure-PyTorch ops when csrc/ does not build "
                                             "(several times slower); off: stop before training with the build error")


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
        allowed("backbone", self.backbone, BACKBONE_CHOICES)
        allowed("tuning", self.tuning, backbones.TUNINGS)
        allowed("lora target set", self.lora_targets, backbones.LORA_TARGETS)
        allowed("evaluation protocol", self.eval_protocol, PROTOCOLS)
        if self.tuning != "frozen" and self.backbone == "clip":
            raise ValueError(f"--tuning {self.tuning} adapts a ViT: add --backbone "
                             f"{'|'.join(b for b in BACKBONE_CHOICES if b != 'clip')}")
        if self.tuning != "frozen" and self.train_backbone:
            raise ValueError(f"--train-backbone trains every backbone weight and --tuning {self.tuning} only an "
                             f"adapter: pass --no-train-backbone (--recipe toy turns it on)")
        if self.backbone == "clip" and self.backbone_weights:
            raise ValueError("--backbone-weights is the weights file of a ViT --backbone; the CLIP backbone's is "
                             "--clip-weights")
        if self.backbone != "clip" and self.clip_weights:
            raise ValueError(f"--clip-weights is the open_clip file of the CLIP backbone; for --backbone "
                             f"{self.backbone} pass --backbone-weights")
        if not 1 <= self.slide_stride <= self.slide_window:
            raise ValueError(f"need 1 <= --slide-stride <= --slide-window (no gaps between windows), got stride "
                             f"{self.slide_stride}, window {self.slide_window}")
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
        for name in ("iters_warmup", "iters_joint", "eval_every", "eval_max", "workers", "cpu_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "crop_size", "ema_every", "ckpt_every", "save_every", "log_every",
                     "test_short_side", "rein_rank", "lora_rank"):
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
           "recipe": RECIPES, "eval_sets": EVAL_SETS, "backbone": BACKBONE_CHOICES, "tuning": backbones.TUNINGS,
           "lora_targets": backbones.LORA_TARGETS, "eval_protocol": PROTOCOLS}


def build_parser(explicit_only: bool = False) -> argparse.ArgumentParser:
    """argparse generated from TrainConfig (runtools/cli.py): --field-name VALUE, --flag/--no-flag for booleans,
    nargs for tuples, CHOICES for the registries. explicit_only: every default is SUPPRESS, so parsing returns the
    flags given."""
    return cli.dataclass_parser(TrainConfig, DESCRIPTION, CHOICES, explicit_only)


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
        notes.append(f"--recipe {cfg.recipe} set " + ", ".join(cli.as_flag(k, v) for k, v in recipe.items())
                     + " (flags given on the command line win)")
    return cfg, notes


def parse_config(argv=None) -> TrainConfig:
    return parse_args(argv)[0]
