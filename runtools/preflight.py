"""The preflight of train.py: everything a run needs, checked before any model is built or any file is written
(reference §1.3-1.4): the datasets and their converted labels, the generated images, the CLIP and SAM weights,
--weights, and the state of --out (a run there is never replaced without --resume or --overwrite; --resume refuses
a changed optimization setting without --allow-config-change). Every problem comes in ONE message (runs.Problems),
each with the flag or command that fixes it.

Usage: not a script; train.py calls preflight(cfg, env, split, p_gen_of) first.
"""
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import backbones
import clouds
import data
import ops
import refine
from runtools import runs

RUN_FILES = ("config.json", "last.pt", "metrics.jsonl")
# Fields that change the optimization: --resume refuses a change of any of them without --allow-config-change. Paths
# are not compared (a moved dataset is the same data; its size is); nor is the number of ranks (StreamSampler).
OPTIM_FIELDS = ("source", "phase", "preset", "train_backbone", "freeze_backbone_joint", "backbone_bf16", "classifier",
                "backbone", "tuning", "rein_rank", "lora_rank", "lora_alpha", "lora_targets",
                "iters_warmup", "iters_joint", "lr", "schedule", "poly_power", "batch_size", "weight_decay",
                "weight_decay_norm", "weight_decay_embed", "backbone_multiplier", "clip_grad", "crop_size",
                "scale_min", "scale_max", "target_factor", "source_factor", "p_gen", "n_source", "n_generated",
                "ema_alpha", "ema_every", "sam", "sam_min_area", "sam_num_points", "sam_mode", "sam_uncovered",
                "seed")


def phase_dirs(cfg) -> dict:
    out = Path(cfg.out)
    return {"warmup": out / "warmup", "joint": out / "joint"} if cfg.phase == "all" else {cfg.phase: out}


def _dataset_problem(name, root, split, what, fix) -> tuple:
    """(problem message or None, number of files)."""
    try:
        return None, len(data.list_files(name, root, split))
    except (FileNotFoundError, ValueError) as e:
        return f"{what}: {e}\n{fix}", 0


def vit_problems(cfg) -> list:
    """The weights of a ViT --backbone (issue 19): --backbone-weights FILE, or the registry's Hugging Face repo in the
    cache (checked offline; nothing is downloaded). The problem names the `hf download` line and the flag."""
    spec = backbones.BACKBONES[cfg.backbone]
    if cfg.backbone_weights:
        if Path(cfg.backbone_weights).is_file():
            return []
        return [f"--backbone-weights {cfg.backbone_weights} does not exist: pass the {spec.what} weights file "
                f"({spec.files[0]}), or drop --backbone-weights to use the Hugging Face cache"]
    if spec.hub is None:  # a random-init test backbone: nothing to load
        return []
    from huggingface_hub import constants, try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(spec.hub, f), str) for f in spec.files):
        return []
    return [f"{spec.what} weights of --backbone {cfg.backbone} (timm {spec.timm_name}) are not in the Hugging Face "
            f"cache {constants.HF_HUB_CACHE}: " + backbones.download_hint(cfg.backbone)]


def clip_problems(cfg) -> list:
    """The CLIP weights build_model will read: --clip-weights FILE, or the preset's open_clip tag in the Hugging Face
    cache (checked offline with huggingface_hub.try_to_load_from_cache; nothing is downloaded). A ViT --backbone
    needs its own weights instead (vit_problems)."""
    if getattr(cfg, "backbone", "clip") != "clip":
        return vit_problems(cfg)
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
    random_init = mc.pretrained is None and not cfg.clip_weights if cfg.backbone == "clip" else \
        backbones.BACKBONES[cfg.backbone].hub is None and not cfg.backbone_weights
    if random_init and cfg.backbone != "clip" and not cfg.train_backbone and cfg.tuning == "frozen":
        return [f"warning: --backbone {cfg.backbone} is a RANDOM-INIT ViT and it stays frozen (--tuning frozen): the "
                f"head trains on random features. Pass --tuning rein|lora or --train-backbone."]
    if random_init and cfg.backbone == "clip" and not cfg.train_backbone:
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
        raise runs.TrainError(f"checkpoint {path} is unreadable ({type(e).__name__}: {runs.first_line(e)}); it was "
                              f"probably cut off by a crash or a full disk. Delete or move it and rerun with --resume "
                              f"(the phase restarts from iteration 0), or start over with --overwrite") from e


# OPTIM_FIELDS added after runs were saved without them: the value that reproduces what those runs did
ADDED_FIELDS = {"freeze_backbone_joint": False}


def config_changes(old: dict, new: dict) -> dict:
    """{field: (old, new)} for the OPTIM_FIELDS that differ between the saved config.json and this run."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (JSON has lists)
    old = {**{k: v for k, v in ADDED_FIELDS.items() if k not in old}, **old}
    return {k: (old[k], norm(new[k])) for k in OPTIM_FIELDS if k in old and k in new and old[k] != norm(new[k])}


def preflight(cfg, env, split: Optional[str], p_gen_of) -> dict:
    """Check everything the run needs before any model is built: the source and its converted labels, every
    evaluation set, the generated folder, the CLIP weights, the SAM package and checkpoint, --weights, the state of
    --out. Raises Problems listing EVERY problem, each with the flag or command that fixes it. `split` is the source's
    training split (train.SOURCES), `p_gen_of(n_source, n_generated)` the share of generated samples (§1.6). Returns
    what it learned: {"n_source", "n_generated", "p_gen", "config" (the record for config.json), "changes", "resume",
    "warnings"}."""
    problems, n_source, n_gen, p_gen = input_problems(cfg, split, p_gen_of)
    if cfg.batch_size % env.world:
        problems.append(f"--batch-size {cfg.batch_size} (total) must be divisible by the {env.world} ranks")
    record = {**asdict(cfg), "p_gen": p_gen, "n_source": n_source, "n_generated": n_gen, "world_size": env.world}
    changes, resume, old = out_problems(cfg, record, problems)
    ops_found, ops_warnings = ops_problems(cfg, env, others=bool(problems))
    problems += ops_found
    if problems:
        raise runs.Problems(problems)
    notes = run_warnings(cfg)
    if cfg.resume and resume and old.get("world_size", env.world) != env.world:
        notes.append(world_size_note(cfg, old["world_size"], env.world))
    if env.rank == 0 and cfg.check_images is not False:  # last: it opens files, so only once the rest is in place
        problems, checked = check_images(cfg, split, p_gen)
        if problems:
            raise runs.Problems(problems)
        notes += checked
    record["history"] = old.get("history", []) if cfg.resume else []
    return {"n_source": n_source, "n_generated": n_gen, "p_gen": p_gen, "config": record, "changes": changes,
            "resume": resume, "warnings": notes + ops_warnings}


def world_size_note(cfg, old: int, new: int) -> str:
    """Resuming with another number of processes: what stays (the global batch, the samples) and what changes."""
    return (f"note: resuming a run of {old} process{'es' * (old > 1)} with {new}: --batch-size {cfg.batch_size} is "
            f"the global batch, so it stays, and every iteration draws the same samples as before; each process now "
            f"takes {cfg.batch_size // new} samples instead of {cfg.batch_size // old} (memory per device x"
            f"{old / new:g}). To keep the per-process batch instead, resume with --batch-size "
            f"{cfg.batch_size // old * new} --allow-config-change (that changes the optimization)")


# ---- --check-images: open the input files before the run ----


def _input_files(cfg, split, joint: bool) -> list:
    """(kind, image, label or None) of every file the run will read: the source and evaluation pairs, the generated
    images."""
    items = [("source", img, lbl) for img, lbl in data.list_files(cfg.source, cfg.data_root, split)]
    for name in cfg.eval_sets if cfg.eval_every else ():
        items += [(f"evaluation set {name}", img, lbl) for img, lbl in data.list_files(name, cfg.data_root)]
    if joint:
        items += [("generated", img, None) for img, _ in data.list_files("generated", cfg.synthetic)]
    return items


def _check_item(kind, image, label) -> Optional[str]:
    """None when the run can read the pair; otherwise the problem, naming the file. Generated images are decoded (as
    training reads them); dataset images are checked without decoding (header, mode, PNG CRCs), their labels read."""
    try:
        h, w, mode = data.check_image(image, decode=label is None)
        if label is not None:
            lbl = data.read_label(label)
            if lbl.shape != (h, w):
                return (f"{kind}: size mismatch: image {image} is {h}x{w} but label {label} is "
                        f"{lbl.shape[0]}x{lbl.shape[1]} (HxW)")
        return None if mode == "RGB" else f"mode {mode}"
    except (data.DataError, OSError) as e:
        return f"{kind}: {data.error_message(e)}"


def _data_seconds(cfg, split, joint: bool, p_gen: float) -> float:
    """A lower bound of the run's time: the samples it loads x the measured time to load one (read + augment)."""
    def timed(name, root, split, transform):
        """The fastest of 3 sample loads after a warm-up one (imports, caches); a bad file is skipped, the check
        reports it."""
        ds, times = data.build_dataset(name, root, split, transform), []
        for i in range(min(len(ds), 4)):
            t0 = time.perf_counter()
            try:
                ds.get(i, np.random.default_rng(0))
            except (data.DataError, OSError):
                continue
            times.append(time.perf_counter() - t0)
        return min(times[1:] or times or [0.0])

    t_src = timed(cfg.source, cfg.data_root, split, data.TrainTransform(cfg.crop_size, (cfg.scale_min, cfg.scale_max)))
    seconds = (cfg.iters_warmup * cfg.batch_size * t_src) if cfg.phase in ("warmup", "all") else 0.0
    if joint:
        t_gen = timed("generated", cfg.synthetic, None, data.GeneratedTransform()) if p_gen > 0 else 0.0
        seconds += cfg.iters_joint * cfg.batch_size * ((1 - p_gen) * t_src + p_gen * t_gen)
    elif cfg.phase in ("joint", "all"):
        seconds += cfg.iters_joint * cfg.batch_size * t_src
    return seconds


CHECK_SHARE, CHECK_MIN_SECONDS = 0.01, 1.0  # the default check: at most 1% of the run's data loading, at least 1 s


def check_images(cfg, split, p_gen: float) -> tuple:
    """--check-images: open the files the run will read before it starts, so a bad generated image is not found at
    joint iteration 0 after hours of warmup, nor a bad label when it is first drawn. With --check-images every file;
    by default (None) all of them when that fits in 1% of the run's estimated data loading (at least 1 s), otherwise
    a random sample (seed --seed) for that long. Returns (problems, notes)."""
    phases = ("warmup", "joint") if cfg.phase == "all" else (cfg.phase,)
    joint = "joint" in phases and cfg.p_gen != 0 and bool(cfg.synthetic)
    items = _input_files(cfg, split, joint)
    order = np.random.default_rng(cfg.seed).permutation(len(items))
    budget = None if cfg.check_images else max(CHECK_SHARE * _data_seconds(cfg, split, joint, p_gen),
                                               CHECK_MIN_SECONDS)
    bad, modes, done, t0 = [], {}, 0, time.perf_counter()
    bar = tqdm(total=len(items), desc="check images", disable=not cfg.progress, leave=False)
    for i in order:
        if budget is not None and done and time.perf_counter() - t0 > budget:  # at least one file
            break
        kind, image, label = items[i]
        result = _check_item(kind, image, label)
        if result and result.startswith("mode "):
            modes.setdefault((kind, result[5:]), []).append(Path(image).name)
        elif result:
            bad.append(result)
        done += 1
        bar.update()
    bar.close()
    seconds = time.perf_counter() - t0
    what = ("source labels and image headers" + (", evaluation labels" if cfg.eval_every else "")
            + (", generated images" if joint else ""))
    scope = f"all {len(items)}" if done == len(items) else f"a random {done} of {len(items)}"
    if bad:
        shown = "\n".join(f"  {b}" for b in bad[:8]) + (f"\n  ... and {len(bad) - 8} more" if len(bad) > 8 else "")
        regenerate = (" (a generated image: delete it and rerun generate.py with the same --out and settings, which "
                      "renders it again)") if any(b.startswith("generated") for b in bad) else ""
        return [f"--check-images: {len(bad)} of the {done} input files checked cannot be used (checked {scope}):\n"
                f"{shown}\nfix or replace them{regenerate}, or pass --no-check-images to start anyway"], []
    notes = [f"checked {scope} input files ({what}) in {seconds:.1f} s: all readable"
             + ("" if done == len(items) else f"; a sample that fits in 1% of the run's estimated data loading, "
                f"--check-images opens them all (about {seconds * len(items) / done:.0f} s)")]
    notes += [f"note: {len(names)} {kind} image(s) read as {data.describe_mode(mode)} (e.g. {names[0]})"
              for (kind, mode), names in modes.items()]
    return [], notes



def ops_problems(cfg, env, others=False) -> tuple:
    """A CUDA run needs csrc/ built for CUDA: without it impl="auto" would fall back to the pure-PyTorch ops for the
    whole run (several times slower). Builds it now (cached afterwards) and reports the compiler's first error, and
    whether nvcc's CUDA major version differs from torch's. `others`: other problems were found, so only the quick
    nvcc check runs (the build waits for the rerun). --allow-ops-fallback turns the problem into a warning.
    Returns (problems, warnings)."""
    if env.device.type != "cuda" or os.environ.get("CLOUDS_OPS_IMPL", "auto") == "ref":
        return [], []
    nvcc = ops.nvcc_problem()
    problem = nvcc if others else ops.build_problem(with_cuda=True)
    if problem is None:
        return [], []
    if nvcc and nvcc != problem:
        problem = f"{problem}\n({nvcc})"
    if cfg.allow_ops_fallback:
        ops.fallback(problem)
        return [], [f"warning: csrc/ does not build for CUDA: {problem}; --allow-ops-fallback: training with the "
                    f"pure-PyTorch ops (several times slower)"]
    return [f"csrc/ (the fused CUDA ops) does not build: {problem}\nfix: see the error (DEVELOPERS.md: Building "
            f"csrc/), or pass --allow-ops-fallback to train with the pure-PyTorch ops (several times slower)"], []


def input_problems(cfg, split, p_gen_of) -> tuple:
    """The preflight's input checks -> (problems, n_source, n_generated, p_gen): the datasets, the generated images,
    SAM, CLIP, --weights, --phase joint's starting weights and --tensorboard."""
    phases = ("warmup", "joint") if cfg.phase == "all" else (cfg.phase,)
    problems, root = [], cfg.data_root
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
            p_gen = p_gen_of(n_source, n_gen)
    if joint and cfg.sam not in ("toy", "none"):
        problems += [m + " (or --sam none: unrefined teacher labels)" for m in
                     refine.predictor_problems(cfg.sam, sam_checkpoint(cfg), flag="--sam-checkpoint")]
    problems += clip_problems(cfg)
    if cfg.weights and not Path(cfg.weights).is_file():
        problems.append(f"--weights {cfg.weights} does not exist: pass the warmup model_final.pt (ours) or an "
                        f"official model_final.pth, or use --phase all to run the warmup first")
    lasts = [d / "last.pt" for d in phase_dirs(cfg).values() if (d / "last.pt").is_file()]
    if cfg.phase == "joint" and not cfg.weights and not (cfg.resume and lasts):
        problems.append("--phase joint starts from the warmup weights: pass --weights WARMUP_OUT/model_final.pt, "
                        "or use --phase all to run the warmup first")
    if cfg.tensorboard:
        try:
            runs.summary_writer_cls()
        except ImportError as e:
            problems.append(str(e))
    return problems, n_source, n_gen, p_gen


def out_problems(cfg, record: dict, problems: list) -> tuple:
    """The preflight's checks of --out (a run there is never replaced without --resume or --overwrite) and, with
    --resume, of its last.pt files and config.json. Appends to `problems`; returns (changes, resume, old config)."""
    out, dirs = Path(cfg.out), phase_dirs(cfg)
    lasts = {ph: d / "last.pt" for ph, d in dirs.items() if (d / "last.pt").is_file()}
    found = sorted(str(f) for d in {out, *dirs.values()} for f in (d / n for n in RUN_FILES) if f.is_file())
    changes, resume, old = {}, {}, {}
    owner = runs.lock_owner(out)
    problems += [runs.lock_message(out, owner)] if owner else []
    problems += writable_problems(cfg) + overlap_problems(cfg)
    if found and not (cfg.resume or cfg.overwrite or owner):
        problems.append(f"--out {out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                        f"--overwrite to start over (its files are replaced), or choose another --out")
    if not cfg.resume:
        return changes, resume, old
    for ph, path in lasts.items():
        try:
            resume[ph] = read_trainer(path)
        except runs.TrainError as e:
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
    return changes, resume, old


def writable_problems(cfg) -> list:
    """--out must be creatable and writable (a read-only disk fails here, not with a traceback at the first write)."""
    out = Path(cfg.out).expanduser().absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        return [f"--out {cfg.out}: {existing} is a file, not a folder; pass another --out"]
    if os.access(existing, os.W_OK | os.X_OK):
        return []
    read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
    why = "is on a read-only file system" if read_only else "is not writable by this user"
    return [f"--out {cfg.out} cannot be written: {existing} {why}; pass an --out on a writable disk"]


def overlap_problems(cfg) -> list:
    """An --out that is, holds or is inside an input folder (a dataset folder, --synthetic) is refused, --overwrite or
    not: --overwrite deletes config.json, log.txt, ... there (generate.py keeps its own config.json in --synthetic).
    So is an --overwrite that would delete the --weights file."""
    phases = ("warmup", "joint") if cfg.phase == "all" else (cfg.phase,)
    names = [cfg.source] + list(cfg.eval_sets if cfg.eval_every else ())
    inputs = [(f"the {name} dataset folder (--data-root)", Path(cfg.data_root) / folder) for name in dict.fromkeys(names)
              for folder in data.DATASETS[name].folders if (Path(cfg.data_root) / folder).is_dir()]
    if "joint" in phases and cfg.synthetic and Path(cfg.synthetic).is_dir():
        inputs.append(("the generated images (--synthetic)", Path(cfg.synthetic)))
    problems = [f"--out {cfg.out} is, holds or is inside {what} {folder}: the run's files would mix with (and "
                f"--overwrite would delete) the inputs. Pass an --out outside the input folders"
                for what, folder in inputs if data.nested(cfg.out, folder)]
    if cfg.weights and cfg.overwrite and Path(cfg.weights).is_file():
        deleted = {(d / n).resolve() for d in {Path(cfg.out), *phase_dirs(cfg).values()}
                   for n in (*RUN_FILES, "model_final.pt")}
        if Path(cfg.weights).resolve() in deleted:
            problems.append(f"--overwrite would delete --weights {cfg.weights} (it is a file of the run in --out "
                            f"{cfg.out}); copy it elsewhere first, or choose another --out")
    return problems


def sam_checkpoint(cfg) -> Optional[str]:
    """--sam-checkpoint, or the official path of --sam (refine.DEFAULT_CHECKPOINTS, reference §5.1: ./weights/)."""
    return cfg.sam_checkpoint or refine.DEFAULT_CHECKPOINTS.get(cfg.sam)
