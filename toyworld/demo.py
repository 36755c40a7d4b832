"""The offline demo: a three-way ablation of the joint phase (Sec. 3.3 of the paper) on ToyCity, on the CPU.

Warmup on toy GTA, then three joint runs from the same warmup weights: (a) source only, (b) generated images with
self-training (no SAM), (c) generated images with toy-SAM refinement; every model is scored on the toy Cityscapes, BDD,
Mapillary and ACDC val sets. The settings are train.py's toy recipe (runtools/train_config.py RECIPES["toy"], also
`python train.py --recipe toy`); train.py flags given on the command line win (e.g. --iters-warmup 20 for a smoke run).
When the generated images carry ToyCity's hidden true labels, a second table scores the teacher's and the refined
pseudo labels against them.

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
from runtools import files, runs, train_config
from runtools.train_config import TOY_ROOT, TOY_TARGETS
from toyworld import city

DEMO_NUM_GENERATED = 40  # 40 x 2.0 / (40 x 2.0 + 200 toy GTA) = 28.6%, the official GTA rate (28.7%, docs/official_code.md)
DEMO_ROWS = {"warmup": "warmup (source only)", "source_only": "+ joint, source only",
             "self_training": "+ generated, self-training (no SAM)", "refine": "+ generated + refinement (toy SAM)"}
# pseudo-label quality columns (metrics.jsonl keys, runs.pseudo_label_quality): mean over the joint run's log steps
PSEUDO_COLUMNS = {"pseudo_teacher_mIoU": "teacher mIoU", "pseudo_refined_mIoU": "refined mIoU",
                  "pseudo_teacher_acc": "teacher acc", "pseudo_refined_acc": "refined acc (kept pixels)",
                  "pseudo_dropped": "dropped"}


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
    """Warmup, then the three joint runs from its weights, into out/<row>/ -> ({row: final eval}, {row: pseudo-label
    quality, % (the runs on generated images)}, {row: seconds})."""
    base = replace(cfg, source="gta", resume=False, overwrite=True)  # cfg: the toy recipe under the flags given
    configs = {"warmup": replace(base, phase="warmup", out=str(out / "warmup"), eval_every=cfg.iters_warmup)}
    joint = replace(base, phase="joint", weights=str(out / "warmup" / "model_final.pt"), synthetic=str(gen_dir))
    configs["source_only"] = replace(joint, out=str(out / "source_only"), p_gen=0.0, sam="none")
    configs["self_training"] = replace(joint, out=str(out / "self_training"), sam="none")
    configs["refine"] = replace(joint, out=str(out / "refine"), sam="toy")
    results, quality, seconds = {}, {}, {}
    for name, run_cfg in configs.items():
        t0 = time.perf_counter()
        print(f"[demo] seed {cfg.seed}: {DEMO_ROWS[name]}")
        results[name] = train.train(run_cfg)["final"]
        seconds[name] = round(time.perf_counter() - t0, 1)
        logged = [r for r in runs.read_metrics(Path(run_cfg.out) / "metrics.jsonl") if "pseudo_teacher_mIoU" in r]
        if logged:  # weighted by generated samples per log window
            n = sum(r["n_gen"] for r in logged)
            quality[name] = {k: 100 * sum(r[k] * r["n_gen"] for r in logged) / n for k in PSEUDO_COLUMNS}
    return results, quality, seconds


def run_demo(cfg, out, seeds: int = 1) -> dict:
    """ToyCity + toy generated images, then the ablation once per seed (cfg.seed, cfg.seed + 1, ...; out/seed_S/ when
    seeds > 1); writes out/ablation.md and out/ablation.json (mean ± std over the seeds per cell)."""
    t_start = time.perf_counter()
    out = Path(out)
    built = ensure_toy_data(cfg.data_root, cfg.progress)
    gen_dir = out / "generated"
    generate.main(["--backend", "toy", "--out", str(gen_dir), "--num-images", str(DEMO_NUM_GENERATED),
                   *([] if cfg.progress else ["--no-progress"])])
    seconds = {"data": round(time.perf_counter() - t_start, 1)}
    per_seed, pseudo_per_seed = [], []
    for k in range(seeds):
        seed = cfg.seed + k
        results, quality, secs = run_ablation(replace(cfg, seed=seed), out if seeds == 1 else out / f"seed_{seed}",
                                              gen_dir)
        miou = {n: {t: 100 * r[t]["mIoU"] for t in cfg.eval_sets} for n, r in results.items()}  # --eval-sets wins
        per_seed.append({DEMO_ROWS[n]: {**m, "mean": float(np.mean(list(m.values())))} for n, m in miou.items()})
        pseudo_per_seed.append({DEMO_ROWS[n]: {PSEUDO_COLUMNS[k]: v for k, v in q.items()} for n, q in quality.items()})
        seconds.update({f"{n}" if seeds == 1 else f"{n} (seed {seed})": s for n, s in secs.items()})
    table, pseudo = spread(per_seed), spread(pseudo_per_seed)
    spread_note = f"mean ± std over {seeds} seeds ({cfg.seed}..{cfg.seed + seeds - 1})" if seeds > 1 else \
        f"one seed ({cfg.seed}); --seeds 3 gives the spread"
    p_gen = "28.6%" if cfg.p_gen is None else f"{100 * cfg.p_gen:.1f}% (--p-gen)"
    caption = (f"Toy ablation (ToyCity, tiny random-init model, {cfg.iters_warmup} warmup + {cfg.iters_joint} joint "
               f"iterations at batch {cfg.batch_size}, crops {cfg.crop_size}; {DEMO_NUM_GENERATED} toy generated "
               f"images, p_gen {p_gen}; EMA alpha {cfg.ema_alpha} every {cfg.ema_every} iterations (official: every "
               f"100 of 40k); refinement min area {cfg.sam_min_area} px; mIoU % on the first {cfg.eval_max} val images "
               f"of each toy target, whole image at short side {cfg.test_short_side}; {spread_note}).")
    pseudo_caption = ("Pseudo labels of the generated images against ToyCity's hidden true labels (%, mean over each "
                      "joint run's log steps; refined mIoU counts a dropped pixel as a miss; refined acc is over the "
                      f"pixels refinement kept; {spread_note}).")
    md = markdown_table(table, caption)
    if pseudo:  # runs on generated images logged pseudo-label quality (not with --p-gen 0)
        md += "\n\n" + markdown_table(pseudo, pseudo_caption)
    print(md)
    seconds["total"] = round(time.perf_counter() - t_start, 1)
    summary = {"table": table, "per_seed": per_seed, "pseudo_labels": pseudo, "pseudo_per_seed": pseudo_per_seed,
               "caption": caption, "seconds": seconds, "built_toycity": built}
    files.write_text(md + "\n", out / "ablation.md")
    files.write_json(summary, out / "ablation.json")
    return summary


def spread(per_seed: list) -> dict:
    """[{row: {column: value}} per seed] -> {row: {column: (mean, sample std or None for one seed)}}."""
    out = {}
    for row in per_seed[0]:
        out[row] = {}
        for col in per_seed[0][row]:
            values = [s[row][col] for s in per_seed]
            out[row][col] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None)
    return out


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
    # allow_abbrev=False: train.py's --seed must not be read as an abbreviation of --seeds
    parser = argparse.ArgumentParser(prog="python -m toyworld.demo", description=__doc__.split("\n")[0], add_help=False,
                                     allow_abbrev=False)
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
    cfg, _ = train_config.parse_args(["--recipe", "toy", "--data-root", TOY_ROOT, *rest])  # the flags given win
    with ops.cpu_threads(cfg.cpu_threads):  # the toy recipe's threads for every stage (issue 18)
        return runs.exit_on_error("demo", cfg, lambda: run_demo(cfg, own.demo_out, own.seeds))


if __name__ == "__main__":
    main()
