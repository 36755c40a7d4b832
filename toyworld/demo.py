"""The offline demo: a three-way ablation of the joint phase (Sec. 3.3 of the paper) on ToyCity, on the CPU.

Warmup on toy GTA, then three joint runs from the same warmup weights: (a) source only, (b) generated images with
self-training (no SAM), (c) generated images with toy-SAM refinement; every model is scored on the toy Cityscapes, BDD,
Mapillary and ACDC val sets. The settings are train.py's toy recipe (runtools/train_config.py RECIPES["toy"], also
`python train.py --recipe toy`).

Usage:
    python -m toyworld.demo                       # one seed (< 10 min on 2 cores); train.py's flags apply
    python -m toyworld.demo --seeds 3             # the ablation 3 times: mean ± std per cell
    python -m toyworld.demo --demo-out runs/demo2 --no-progress
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import data
import generate
import ops
import train
from runtools import runs, train_config
from runtools.train_config import RECIPES, TOY, TOY_ITERS, TOY_ROOT, TOY_TARGETS
from toyworld import city

DEMO_NUM_GENERATED = 40  # 40 x 2.0 / (40 x 2.0 + 200 toy GTA) = 28.6%, the official GTA rate (28.7%, docs/official_code.md)
DEMO_ROWS = {"warmup": "warmup (source only)", "source_only": "+ joint, source only",
             "self_training": "+ generated, self-training (no SAM)", "refine": "+ generated + refinement (toy SAM)"}


def ensure_toy_data(root, progress=True):
    """Build ToyCity under `root` and convert its raw labels to train ids, unless that was done already."""
    needed = [("gta", None), *[(n, None) for n in TOY_TARGETS]]
    try:
        for name, split in needed:
            data.list_files(name, root, split)
        return False
    except FileNotFoundError:
        pass
    city.build(root, seed=0, progress=progress)
    for name in ("gta", "synthia", "cityscapes", "mapillary"):  # the formats that ship raw label ids
        data.convert(name, root, progress=progress)
    return True


def run_ablation(cfg, out: Path, gen_dir: Path) -> tuple:
    """Warmup, then the three joint runs from its weights, into out/<row>/ -> ({row: final eval}, {row: seconds})."""
    base = replace(cfg, source="gta", resume=False, overwrite=True, **{**RECIPES["toy"], "data_root": TOY_ROOT})
    configs = {"warmup": replace(base, phase="warmup", out=str(out / "warmup"), eval_every=TOY_ITERS["warmup"])}
    joint = replace(base, phase="joint", weights=str(out / "warmup" / "model_final.pt"), synthetic=str(gen_dir))
    configs["source_only"] = replace(joint, out=str(out / "source_only"), p_gen=0.0, sam="none")
    configs["self_training"] = replace(joint, out=str(out / "self_training"), sam="none")
    configs["refine"] = replace(joint, out=str(out / "refine"), sam="toy")
    results, seconds = {}, {}
    for name, run_cfg in configs.items():
        t0 = time.perf_counter()
        print(f"[demo] seed {cfg.seed}: {DEMO_ROWS[name]}")
        results[name] = train.train(run_cfg)["final"]
        seconds[name] = round(time.perf_counter() - t0, 1)
    return results, seconds


def run_demo(cfg, out, seeds: int = 1) -> dict:
    """ToyCity + toy generated images, then the ablation once per seed (cfg.seed, cfg.seed + 1, ...; out/seed_S/ when
    seeds > 1); writes out/ablation.md and out/ablation.json (mean ± std over the seeds per cell)."""
    t_start = time.perf_counter()
    out = Path(out)
    built = ensure_toy_data(TOY_ROOT, cfg.progress)
    gen_dir = out / "generated"
    generate.main(["--backend", "toy", "--out", str(gen_dir), "--num-images", str(DEMO_NUM_GENERATED),
                   *([] if cfg.progress else ["--no-progress"])])
    seconds = {"data": round(time.perf_counter() - t_start, 1)}
    per_seed = []
    for k in range(seeds):
        seed = cfg.seed + k
        results, secs = run_ablation(replace(cfg, seed=seed), out if seeds == 1 else out / f"seed_{seed}", gen_dir)
        per_seed.append({DEMO_ROWS[n]: {t: 100 * r[t]["mIoU"] for t in TOY_TARGETS} for n, r in results.items()})
        seconds.update({f"{n}" if seeds == 1 else f"{n} (seed {seed})": s for n, s in secs.items()})
    table = {row: {} for row in per_seed[0]}
    for row in table:
        for col in (*TOY_TARGETS, "mean"):
            values = [np.mean([s[row][t] for t in TOY_TARGETS]) if col == "mean" else s[row][col] for s in per_seed]
            table[row][col] = (float(np.mean(values)), float(np.std(values, ddof=1)) if seeds > 1 else None)
    spread = f"mean ± std over {seeds} seeds ({cfg.seed}..{cfg.seed + seeds - 1})" if seeds > 1 else \
        f"one seed ({cfg.seed}); --seeds 3 gives the spread"
    caption = (f"Toy ablation (ToyCity, tiny random-init model, {TOY_ITERS['warmup']} warmup + "
               f"{TOY_ITERS['joint']} joint iterations at batch {TOY['batch_size']}, crops {TOY['crop_size']}; "
               f"{DEMO_NUM_GENERATED} toy generated images, p_gen 28.6%; EMA alpha {cfg.ema_alpha} every "
               f"{TOY['ema_every']} iterations (official: every 100 of 40k); refinement min area "
               f"{RECIPES['toy']['sam_min_area']} px; mIoU % on the first {TOY['eval_max']} val images of each toy "
               f"target, whole image at short side {TOY['test_short_side']}; {spread}).")
    md = markdown_table(table, caption)
    print(md)
    seconds["total"] = round(time.perf_counter() - t_start, 1)
    summary = {"table": table, "per_seed": per_seed, "caption": caption, "seconds": seconds, "built_toycity": built}
    runs.atomic(out / "ablation.md", lambda tmp: Path(tmp).write_text(md + "\n"))
    runs.write_json(summary, out / "ablation.json")
    return summary


def markdown_table(table: dict, caption: str) -> str:
    """{row: {column: (mean, std or None)}} -> a markdown table under its caption."""
    cols = list(next(iter(table.values())))
    cell = lambda m, s: f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"  # noqa: E731
    lines = [caption, "", "| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {row} | " + " | ".join(cell(*v) for v in vals.values()) + " |" for row, vals in table.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    """`python -m toyworld.demo [--demo-out DIR] [--seeds N] [train.py flags]`: the same messages and exit codes as
    train.py."""
    parser = argparse.ArgumentParser(prog="python -m toyworld.demo", description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--demo-out", default="runs/demo", help="output folder (its runs are rewritten every time)")
    parser.add_argument("--seeds", type=int, default=1, help="run the ablation this many times (seeds --seed, "
                                                             "--seed + 1, ...) and report mean ± std")
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\ntrain.py's flags apply too (python train.py --help).")
        raise SystemExit(0)
    if own.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {own.seeds}")
    cfg, _ = train_config.parse_args(rest)
    with ops.cpu_threads(TOY["cpu_threads"]):  # the toy recipe's threads for every stage (issue 18)
        return runs.exit_on_error("demo", cfg, lambda: run_demo(cfg, own.demo_out, own.seeds))


if __name__ == "__main__":
    main()
