"""The preflight of train.py: everything a run needs, checked before any model is built or any file is written
(reference §1.3-1.4): the datasets and their converted labels, the generated images, the CLIP and SAM weights,
--weights, and the state of --out (a run there is never replaced without --resume or --overwrite; --resume refuses
a changed optimization setting without --allow-config-change). Every problem comes in ONE message (runs.Problems),
each with the flag or command that fixes it.

Usage: not a script; train.py calls preflight(cfg, env, split, p_gen_of) first.
"""
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

import clouds
import data
import ops
import refine
import runs

RUN_FILES = ("config.json", "last.pt", "metrics.jsonl")
# Fields that change the optimization: --resume refuses a change of any of them without --allow-config-change. Paths
# are not compared (a moved dataset is the same data; its size is); nor is the number of ranks (StreamSampler).
OPTIM_FIELDS = ("source", "phase", "preset", "train_backbone", "backbone_bf16", "classifier",
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
        raise runs.TrainError(f"checkpoint {path} is unreadable ({type(e).__name__}: {runs.first_line(e)}); it was "
                              f"probably cut off by a crash or a full disk. Delete or move it and rerun with --resume "
                              f"(the phase restarts from iteration 0), or start over with --overwrite") from e


def config_changes(old: dict, new: dict) -> dict:
    """{field: (old, new)} for the OPTIM_FIELDS that differ between the saved config.json and this run."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (JSON has lists)
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
    record["history"] = old.get("history", []) if cfg.resume else []
    return {"n_source": n_source, "n_generated": n_gen, "p_gen": p_gen, "config": record, "changes": changes,
            "resume": resume, "warnings": run_warnings(cfg) + ops_warnings}


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
    if found and not (cfg.resume or cfg.overwrite):
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


def sam_checkpoint(cfg) -> Optional[str]:
    """--sam-checkpoint, or the official path of --sam (refine.DEFAULT_CHECKPOINTS, reference §5.1: ./weights/)."""
    return cfg.sam_checkpoint or refine.DEFAULT_CHECKPOINTS.get(cfg.sam)
