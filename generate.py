"""Sec. 3.2: generated training images, Stable Diffusion sampling from LLM-written prompts (reference §6).

CLOUDS trains on ~5000 Stable Diffusion 2 images (768x768, EulerDiscrete, 50 steps, guidance 7.5) made from 100
prompts written by a large chat LLM, cycled (image j uses prompts[j mod 100]). This script does the same, but
reproducibly: image j is sampled with seed `base_seed + j`, so any image can be regenerated alone, runs resume, and
shards can split the work.

Usage:
    python generate.py --out datasets/generated/sd2 --num-images 5000             # one GPU
    torchrun --nproc_per_node 4 generate.py --out datasets/generated/sd2           # 4 GPUs, indices sharded
    python generate.py --out /tmp/toy --num-images 50 --backend toy                # offline ToyCity renderer
    python generate.py --out DIR --llm /path/to/chat-model --llm-num 100           # write DIR/prompts.txt first

Layout: DIR/images/im_{j}_p{k}.png (k = j mod number of prompts), DIR/manifest.jsonl (one JSON line per image),
DIR/config.json (the resolved config). The toy backend also writes DIR/truth/im_{j}_p{k}.png, the image's true label
(uint8 train ids, 255 = ignore): never read for training, only to score pseudo labels
(`python refine.py --score-labels LABELS --truth DIR/truth`, data.py's sample["truth"]).

Sharding: with S = num_parts * WORLD_SIZE shards, shard r = part * WORLD_SIZE + RANK renders the indices
j in [0, num_images) with j % S == r (interleaved, so every shard cycles through all prompts). Each shard appends to
DIR/manifest.part{r}.jsonl; at the end of every run, manifest.jsonl is rebuilt from all parts (one line per existing
image, sorted by index). `--merge-only` rebuilds it without generating.

Honest folders: config.json records the settings the images depend on (prompt-file content hash, backend, model,
size, steps, guidance, precision, base seed); a rerun with other settings is refused unless `--overwrite`, which
deletes the old images and manifests first. However a run ends, manifest.jsonl lists exactly images/*.png.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from runtools import cli, files

HERE = Path(__file__).resolve().parent
DEFAULT_PROMPTS = HERE / "prompts" / "clouds_prompts.txt"
OPENERS = ("A photo of", "A picture of", "A snapshot of")  # §6.1: every official prompt starts with one of these
BACKENDS = ("diffusers", "toy")


# ---- config ----

@dataclass
class GenerateConfig:
    """generate.py's settings. Field `num_images` is the flag `--num-images`; its metadata holds the keyword arguments
    of `add_argument` ("help" required, "choices", "required"), so the --help text sits beside the default."""
    out: str = field(default="", metadata={
        "required": True, "help": "output folder: images/im_{j}_p{k}.png, manifest.jsonl, config.json (required)"})
    prompts: str = field(default=str(DEFAULT_PROMPTS), metadata={  # official: prompt_llama70b.txt; ours: original text
        "help": "prompt file, one per line (# comments); image j uses prompt j mod number of prompts"})
    num_images: int = field(default=5000, metadata={  # official --num-images default (50 images per prompt)
        "help": "images in the whole folder, over all shards (official 5000: 50 per prompt)"})
    backend: str = field(default="diffusers", metadata={  # "diffusers" (Stable Diffusion) or "toy" (offline ToyCity)
        "choices": BACKENDS,
        "help": "diffusers = Stable Diffusion (official); toy = offline ToyCity renderer (no weights)"})
    model: str = field(default="stabilityai/stable-diffusion-2", metadata={  # official model (768-v)
        "help": "diffusers model: a hub id or a local folder (official stable-diffusion-2, 768-v)"})
    steps: int = field(default=50, metadata={  # official num_inference_steps
        "help": "denoising steps (official num_inference_steps)"})
    guidance: float = field(default=7.5, metadata={  # official guidance_scale
        "help": "classifier-free guidance scale (official)"})
    height: Optional[int] = field(default=None, metadata={  # official 768 (diffusers); toy default 192
        "help": "image height; None = 768 (diffusers, official) or 192 (toy)"})
    width: Optional[int] = field(default=None, metadata={  # official 768 (diffusers); toy default 192
        "help": "image width; None = 768 (diffusers, official) or 192 (toy)"})
    batch_size: int = field(default=1, metadata={  # official: one image per pipeline call
        "help": "images per pipeline call (the images do not depend on it)"})
    base_seed: int = field(default=0, metadata={  # official: no seed (not reproducible); image j uses base_seed + j
        "help": "image j is sampled with seed base_seed + j (official: unseeded)"})
    part: int = field(default=0, metadata={  # this job's part (official --part), combined with torchrun RANK
        "help": "this job's part, combined with torchrun's RANK (official --part)"})
    num_parts: int = field(default=1, metadata={  # official: one job per --part
        "help": "independent jobs sharing the index range"})
    device: Optional[str] = field(default=None, metadata={  # default: cuda if available, else cpu
        "help": "torch device; None = cuda:LOCAL_RANK if available, else cpu"})
    fp16: Optional[bool] = field(default=None, metadata={  # official: fp16 on CUDA; default fp16 on cuda, fp32 on cpu
        "help": "half precision; None = fp16 on cuda, fp32 on cpu"})
    llm: Optional[str] = field(default=None, metadata={  # writes new prompts before any image
        "help": "local causal LM (folder or hub id) that first writes OUT/prompts.txt (replaces --prompts)"})
    llm_num: int = field(default=100, metadata={  # official: 100 prompts
        "help": "prompts the LLM writes (official 100)"})
    merge_only: bool = field(default=False, metadata={
        "help": "only rebuild manifest.jsonl from the part files"})
    progress: bool = field(default=True, metadata={  # tqdm bar
        "help": "progress bar"})
    overwrite: bool = field(default=False, metadata={  # replace a folder made with other settings (else refused)
        "help": "delete the images and manifests of an --out folder made with other settings and start over "
                "(otherwise refused); with shards, run it once first (e.g. --num-images 0)"})
    debug: bool = field(default=False, metadata={
        "help": "show the Python traceback of an error"})

    def __post_init__(self):
        problems = []
        if self.backend not in BACKENDS:
            problems.append(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        for flag, value, low in (("--num-images", self.num_images, 0), ("--batch-size", self.batch_size, 1),
                                 ("--llm-num", self.llm_num, 1), ("--steps", self.steps, 1),
                                 ("--num-parts", self.num_parts, 1)):
            if value < low:
                problems.append(f"{flag} must be >= {low}, got {value}")
        if not 0 <= self.part < max(self.num_parts, 1):
            problems.append(f"--part must be in [0, --num-parts), got --part {self.part} --num-parts {self.num_parts}")
        default = 768 if self.backend == "diffusers" else 192  # §6.2: 768x768; ToyCity renders small images
        self.height = self.height or default
        self.width = self.width or default
        if self.backend == "diffusers" and (self.height % 8 or self.width % 8):
            problems.append(f"Stable Diffusion needs --height and --width divisible by 8, got "
                            f"{self.height}x{self.width}")
        if problems:
            raise ValueError(_problems(problems))


def _problems(problems: list) -> str:
    """One message listing every problem."""
    return f"{len(problems)} problem(s):\n  - " + "\n  - ".join(problems)


def parse_args(argv=None) -> GenerateConfig:
    """argparse generated from the GenerateConfig fields (`num_images` -> `--num-images`, help text and choices from
    each field's metadata); booleans are `--flag/--no-flag`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_dataclass_flags(parser, GenerateConfig)
    return GenerateConfig(**vars(parser.parse_args(argv)))


# ---- prompts ----

def read_prompts(path) -> list:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist; pass --prompts FILE (one prompt per line)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt (only blank lines or # comments); "
                         f"expected one prompt per line, e.g. 'A photo of a busy road in the rain'")
    return prompts


# Instruction given to the local LLM (the official one is not published; reference §6.1 TODO).
LLM_INSTRUCTION = (
    "Write {n} different one-sentence descriptions of photographs of urban street scenes, one per line, with no "
    "numbering. Each line must start with exactly one of: \"A photo of\", \"A picture of\", \"A snapshot of\". "
    "Mention things seen from a street: roads, sidewalks, buildings, walls, fences, poles, traffic lights, traffic "
    "signs, trees, grass, sky, pedestrians, cyclists, cars, trucks, buses, trains, motorcycles and bicycles. Vary the "
    "weather (sunny, rain, snow, fog, wind), the time of day (morning, noon, dusk, night), the season and the city or "
    "country. Keep each line under 25 words."
)
PROMPT_MIN_CHARS, PROMPT_MAX_CHARS = 20, 200


def _dedupe_key(prompt: str) -> str:
    """Case-, punctuation- and whitespace-insensitive key ("...shade." == "...Shade")."""
    kept = "".join(ch for ch in prompt.lower() if ch not in string.punctuation)
    return " ".join(kept.split())


def parse_llm_prompts(text: str, existing=()) -> list:
    """Turn raw LLM output into valid, new, unique prompts (in order of appearance).

    A line is kept when, after stripping list markers ("1.", "2)", "-", "*") and quotes, it starts with one of
    OPENERS, has PROMPT_MIN_CHARS..PROMPT_MAX_CHARS characters, is printable ASCII, and its dedupe key is not in
    `existing` nor earlier in `text`.
    """
    seen = {_dedupe_key(p) for p in existing}
    kept = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:\d+\s*[.):-]|[-*\u2022])\s*", "", line).strip().strip("\"'").strip()
        if not line.startswith(OPENERS):
            continue
        if not PROMPT_MIN_CHARS <= len(line) <= PROMPT_MAX_CHARS:
            continue
        if not all(ch in string.printable and ch not in "\t\n\r\x0b\x0c" for ch in line):
            continue
        key = _dedupe_key(line)
        if key in seen or key == _dedupe_key(next(o for o in OPENERS if line.startswith(o))):
            continue
        seen.add(key)
        kept.append(line)
    return kept


def load_llm(name: str, device: str = "cpu"):
    """AutoModelForCausalLM + AutoTokenizer from a local folder or hub id (local files only when HF_HUB_OFFLINE)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"could not load the prompt-writing LLM {name!r} (offline={offline}). Expected a local folder with "
            f"config.json, weights and tokenizer files, or a hub id that is cached or downloadable. On a connected "
            f"machine run `hf download {name} --local-dir /path/to/llm`, then pass --llm /path/to/llm; "
            f"or drop --llm and use --prompts FILE.") from err
    if len(tokenizer) < 100:  # transformers 5 can silently build an empty tokenizer (environment.md §4)
        raise RuntimeError(f"the tokenizer of {name!r} has only {len(tokenizer)} tokens; its vocabulary files are "
                           f"missing (expected vocab/merges or tokenizer.json in the model folder)")
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def write_llm_prompts(name: str, num: int, out_dir, device: str = "cpu", seed: int = 0, max_rounds: int = 10) -> list:
    """Sec. 3.2: ask a local causal LM for `num` prompts; validated, deduplicated, saved to out_dir/prompts.txt."""
    model, tokenizer = load_llm(name, device)
    torch.manual_seed(seed)
    prompts = []
    for _ in range(max_rounds):
        request = LLM_INSTRUCTION.format(n=num - len(prompts))
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(request + "\n", return_tensors="pt")["input_ids"]
        ids = ids.to(device)
        out = model.generate(ids, do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=48 * (num - len(prompts)),
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        prompts += parse_llm_prompts(text, existing=prompts)
        if len(prompts) >= num:
            break
    if len(prompts) < num:
        raise RuntimeError(f"the LLM {name!r} wrote {len(prompts)} valid unique prompts in {max_rounds} rounds, "
                           f"expected {num}; use a stronger chat model or lower --llm-num")
    prompts = prompts[:num]
    _write_text(Path(out_dir) / "prompts.txt", "\n".join(prompts) + "\n")
    return prompts


# ---- backends ----

def load_pipeline(cfg: GenerateConfig):
    """Sec. 3.2 / §6.2: StableDiffusionPipeline with EulerDiscreteScheduler from the model's own scheduler config."""
    try:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    except ImportError as err:
        raise ImportError("the diffusers backend needs `pip install diffusers transformers`") from err
    device = _device(cfg)
    dtype = torch.float16 if (cfg.fp16 if cfg.fp16 is not None else device.type == "cuda") else torch.float32
    try:
        scheduler = EulerDiscreteScheduler.from_pretrained(cfg.model, subfolder="scheduler")  # official (v-prediction)
        pipe = StableDiffusionPipeline.from_pretrained(cfg.model, scheduler=scheduler, dtype=dtype)
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"could not load Stable Diffusion weights from {cfg.model!r}. Expected a cached hub id or a local "
            f"diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/). Offline, copy "
            f"them from a connected machine: `hf download {cfg.model} --local-dir "
            f"/path/to/stable-diffusion-2`, then pass --model /path/to/stable-diffusion-2. For an offline smoke "
            f"test use --backend toy.") from err
    return pipe.to(device)


def _device(cfg: GenerateConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def render_batch(cfg: GenerateConfig, pipe, prompts: list, seeds: list) -> tuple:
    """(images, truths) for the prompts: images uint8 (H, W, 3); image i depends only on (prompts[i], seeds[i]).
    truths: the toy renderer's true labels, uint8 (H, W) train ids (255 = ignore), one per image; None for Stable
    Diffusion (its images have no known labels)."""
    if cfg.backend == "toy":
        from toyworld import city
        pairs = [city.render_with_label(p, s, size=(cfg.height, cfg.width)) for p, s in zip(prompts, seeds)]
        return [image for image, _ in pairs], [truth for _, truth in pairs]
    device = pipe.device
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]  # one generator per image
    out = pipe(prompt=prompts, height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps,
               guidance_scale=cfg.guidance, generator=gens, output_type="np")
    return [np.round(im * 255).clip(0, 255).astype(np.uint8) for im in out.images], None  # (H, W, 3) in [0, 1]


# ---- files and manifest ----

def _write_text(path: Path, text: str):
    files.write_text(text, path)


def _write_png(path: Path, image: np.ndarray):
    files.save_png(image, path)


# ToyCity's true labels, beside the images but outside images/ (data.TRUTH_DIR): data.py never lists them as images
# nor as labels; SegDataset hands them out as sample["truth"] to score pseudo labels (refine.label_confusion).
TRUTH_DIR = "truth"


def image_name(j: int, n_prompts: int) -> str:
    return f"im_{j}_p{j % n_prompts}.png"  # official naming (reference §6.2)


def _record(cfg: GenerateConfig, j: int, prompts: list, scheduler: str) -> dict:
    """The manifest line of image j (everything needed to regenerate it alone)."""
    return {"index": j, "prompt": prompts[j % len(prompts)], "seed": cfg.base_seed + j,
            "model": cfg.model if cfg.backend == "diffusers" else "toycity", "scheduler": scheduler,
            "steps": cfg.steps, "guidance": cfg.guidance, "height": cfg.height, "width": cfg.width,
            "backend": cfg.backend, "file": f"images/{image_name(j, len(prompts))}"}


def _read_jsonl(path: Path) -> list:
    """Records of a JSONL file; a torn last line (interrupted append) is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "index" in rec and "file" in rec:
            records.append(rec)
    return records


def _manifest_records(out: Path) -> dict:
    """index -> record over manifest.jsonl and every manifest.part*.jsonl (a later line for an index wins)."""
    by_index = {}
    for src in [out / "manifest.jsonl"] + sorted(out.glob("manifest.part*.jsonl")):
        if src.is_file():
            for rec in _read_jsonl(src):
                by_index[rec["index"]] = rec
    return by_index


def merge_manifest(out) -> int:
    """Rebuild out/manifest.jsonl: one line per existing image file, sorted by index. Returns the number of lines.

    Every rank of a torchrun job merges when it ends; an OS lock on out/.manifest.lock (released by the kernel if
    the process dies) makes the merges take turns, so an earlier rank's view never replaces a later, fuller one."""
    out = Path(out)
    with _manifest_lock(out):
        by_index = _manifest_records(out)
        lines = [json.dumps(by_index[j]) for j in sorted(by_index) if (out / by_index[j]["file"]).is_file()]
        _write_text(out / "manifest.jsonl", "".join(line + "\n" for line in lines))
    return len(lines)


@contextlib.contextmanager
def _manifest_lock(out: Path):
    """An exclusive flock on out/.manifest.lock for the body (no lock where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(out / ".manifest.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shard() -> tuple:
    """(rank, world) of this process from torchrun's RANK / WORLD_SIZE (0, 1 without torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---- folder settings ----

def settings(cfg: GenerateConfig, prompts: list) -> dict:
    """What the images of a folder depend on: a rerun into the folder must match (config.json "settings")."""
    s = {"backend": cfg.backend, "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
         "num_prompts": len(prompts), "height": cfg.height, "width": cfg.width, "base_seed": cfg.base_seed}
    if cfg.backend == "diffusers":  # the toy renderer ignores these
        fp16 = cfg.fp16 if cfg.fp16 is not None else _device(cfg).type == "cuda"
        s.update(model=cfg.model, steps=cfg.steps, guidance=cfg.guidance, precision="fp16" if fp16 else "fp32")
    return s


def _outputs(out: Path) -> list:
    """The files generate.py writes in a folder (what --overwrite deletes; an LLM's prompts.txt is kept)."""
    files = [out / "config.json", out / "manifest.jsonl", *out.glob("manifest.part*.jsonl"),
             *(out / "images").glob("*.png"), *(out / TRUTH_DIR).glob("*.png")]
    return [p for p in files if p.is_file()]


def folder_problems(out: Path, wanted: dict, overwrite: bool) -> list:
    """A folder holding images must have been made with the same settings (or --overwrite)."""
    if overwrite:
        return []
    config = out / "config.json"
    if config.is_file():
        try:
            saved = json.loads(config.read_text(encoding="utf-8")).get("settings", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            saved = {}
        changed = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in wanted.items() if saved.get(k) != v]
        if changed:
            return [f"--out {out} was made with other settings: {', '.join(changed)}. Rerun with those settings "
                    f"to resume, pass another --out, or add --overwrite to delete its {len(_outputs(out))} files "
                    f"and start over"]
    elif any((out / "images").glob("*.png")):
        return [f"--out {out} holds images/*.png but no config.json (not made by generate.py, or by an older "
                f"version); pass another --out, or add --overwrite to delete them"]
    return []


def preflight(cfg: GenerateConfig):
    """Every problem with the inputs, each naming its flag -> (prompts or None, problems)."""
    problems, prompts, out = [], None, Path(cfg.out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} is a file; pass a folder")
    if cfg.merge_only:
        return None, problems
    if cfg.llm and (out / "prompts.txt").is_file():  # resume: keep the prompts the LLM wrote the first time
        source, flag = out / "prompts.txt", "--llm (OUT/prompts.txt)"
    elif cfg.llm:
        source = None
    else:
        source, flag = cfg.prompts, "--prompts"
    if source is not None:
        try:
            prompts = read_prompts(source)
        except ValueError as err:
            problems.append(f"{flag}: {err}")
    if cfg.backend == "diffusers":
        import importlib.util
        missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            problems.append(f"--backend diffusers needs `pip install {' '.join(missing)}` (or use --backend toy)")
    if out.is_dir() and not problems:
        wanted = settings(cfg, prompts if prompts is not None else [])
        if prompts is None:  # new LLM prompts: any earlier images came from other prompts
            wanted["prompts_sha256"] = "(new LLM prompts)"
        problems += folder_problems(out, wanted, cfg.overwrite)
    return prompts, problems


# ---- generation loop ----

def generate(cfg: GenerateConfig, pipe=None) -> dict:
    """Render this shard's missing images, append their manifest lines, then merge the manifest.

    `pipe` (optional) is a ready StableDiffusionPipeline for the diffusers backend; by default it is loaded from
    cfg.model when the first missing image needs it. A folder made with other settings is refused (ValueError)
    unless cfg.overwrite, which deletes its images and manifests first. However the run ends (done, error,
    Ctrl-C), manifest.jsonl lists exactly the images/*.png files (what data.build_dataset("generated", out) loads).
    """
    from tqdm import tqdm

    if not cfg.out:
        raise ValueError("expected an output folder: --out DIR")
    prompts, problems = preflight(cfg)
    if problems:
        raise ValueError(_problems(problems))
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    device = _device(cfg)
    if device.type == "cuda":  # torchrun: this rank's GPU is the current one (diffusers, generators, kernels)
        torch.cuda.set_device(device)
    if cfg.merge_only:
        return {"written": 0, "skipped": 0, "manifest": merge_manifest(out), "out": str(out)}
    if cfg.overwrite and folder_problems(out, settings(cfg, prompts or []), False):
        for path in _outputs(out):  # other settings: start over
            path.unlink()
    if prompts is None:  # with several shards, run this once first (e.g. --num-images 0), then shard
        prompts = write_llm_prompts(cfg.llm, cfg.llm_num, out, device=str(_device(cfg)))
    rank, world = shard()
    shards, me = cfg.num_parts * world, cfg.part * world + rank
    run = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("overwrite", "debug")}
    _write_text(out / "config.json", json.dumps({**run, "num_prompts": len(prompts), "num_shards": shards,
                                                  "settings": settings(cfg, prompts)}, indent=2) + "\n")

    mine = [j for j in range(cfg.num_images) if j % shards == me]  # interleaved sharding (module docstring)
    todo = [j for j in mine if not (out / "images" / image_name(j, len(prompts))).is_file()
            or (cfg.backend == "toy" and not (out / TRUTH_DIR / image_name(j, len(prompts))).is_file())]
    if cfg.backend == "toy":
        (out / TRUTH_DIR).mkdir(exist_ok=True)
    part_file = out / f"manifest.part{me}.jsonl"
    if todo and cfg.backend == "diffusers":
        pipe = pipe if pipe is not None else load_pipeline(cfg)
        pipe.set_progress_bar_config(disable=True)  # our bar counts images, not denoising steps
    scheduler = "none" if cfg.backend == "toy" else \
        type(pipe.scheduler).__name__ if pipe is not None else "EulerDiscreteScheduler"

    if part_file.is_file() and part_file.stat().st_size:  # a killed run may have left a torn last line
        with open(part_file, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    try:
        with open(part_file, "a", encoding="utf-8") as manifest:
            bar = tqdm(total=len(todo), desc=f"generate shard {me}/{shards}", disable=not cfg.progress)
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start:start + cfg.batch_size]
                texts = [prompts[j % len(prompts)] for j in batch]  # §6.2: prompts cycled, prompt k = j mod n
                images, truths = render_batch(cfg, pipe, texts, [cfg.base_seed + j for j in batch])
                for i, (j, image) in enumerate(zip(batch, images)):
                    if truths is not None:  # before the image, whose presence marks image j as done
                        _write_png(out / TRUTH_DIR / image_name(j, len(prompts)), truths[i])
                    _write_png(out / "images" / image_name(j, len(prompts)), image)
                    manifest.write(json.dumps(_record(cfg, j, prompts, scheduler)) + "\n")  # after the image exists
                    manifest.flush()
                bar.update(len(batch))
            bar.close()
    finally:  # also on an error or Ctrl-C: the manifest and the files agree
        _record_unlisted(cfg, out, mine, prompts, scheduler, part_file)
        n_lines = merge_manifest(out)
    return {"written": len(todo), "skipped": len(mine) - len(todo), "manifest": n_lines, "shard": me,
            "num_shards": shards, "out": str(out)}


def _record_unlisted(cfg, out: Path, mine: list, prompts: list, scheduler: str, part_file: Path):
    """Manifest lines for this shard's images that exist without one (killed between the image and its line)."""
    recorded = set(_manifest_records(out))
    unlisted = [j for j in mine if j not in recorded and (out / "images" / image_name(j, len(prompts))).is_file()]
    if unlisted:
        with open(part_file, "a", encoding="utf-8") as manifest:
            manifest.writelines(json.dumps(_record(cfg, j, prompts, scheduler)) + "\n" for j in unlisted)


def main(argv=None) -> dict:
    """CLI entry: one message and exit code 2 for bad inputs; the traceback only with --debug."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        summary = generate(parse_args(argv))
    except (ValueError, OSError, ImportError, RuntimeError) as err:
        if "--debug" in argv:
            raise
        print(f"generate.py: error: {err}\n(add --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
