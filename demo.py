"""The offline demo: a three-way ablation of the joint phase (Sec. 3.3 of the paper) on ToyCity, on the CPU.

Warmup on toy GTA, then three joint runs from the same warmup weights: (a) source only, (b) generated images with
self-training (no SAM), (c) generated images with toy-SAM refinement; every model is scored on the toy Cityscapes, BDD,
Mapillary and ACDC val sets. The settings are train.py's toy recipe (train.RECIPES["toy"], also `--recipe toy`).

Usage:
    python demo.py                  # the same as `python train.py --demo` (< 10 min on 2 cores); train.py's flags apply
    python demo.py --demo-out runs/demo2 --no-progress
"""
import sys
import time
from dataclasses import replace
from pathlib import Path

import data
import generate
import runs
import toycity
import train
from train import DEMO, DEMO_ITERS, DEMO_ROOT, DEMO_TARGETS, RECIPES, TrainConfig

DEMO_NUM_GENERATED = 40  # 40 x 2.0 / (40 x 2.0 + 200 toy GTA) = 28.6%, the official GTA rate (28.7%, §1.6)
DEMO_ROWS = {"warmup": "warmup (source only)", "source_only": "+ joint, source only",
             "self_training": "+ generated, self-training (no SAM)", "refine": "+ generated + refinement (toy SAM)"}


def ensure_toy_data(root, progress=True):
    """Build ToyCity under `root` and convert its raw labels to train ids, unless that was done already."""
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
    """`python demo.py` (or `python train.py --demo`): ToyCity + toy generated images, warmup on toy GTA, then three
    joint runs from the same warmup weights: (a) source only, (b) generated images with self-training (no SAM), (c)
    generated images with ToyPointPredictor refinement; every model is scored on the toy Cityscapes, BDD, Mapillary
    and ACDC val sets."""
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
    configs = {"warmup": replace(base, phase="warmup", out=str(out / "warmup"), eval_every=DEMO_ITERS["warmup"])}
    warm = str(out / "warmup" / "model_final.pt")
    joint = replace(base, phase="joint", weights=warm, synthetic=str(gen_dir))
    configs["source_only"] = replace(joint, out=str(out / "source_only"), p_gen=0.0, sam="none")
    configs["self_training"] = replace(joint, out=str(out / "self_training"), sam="none")
    configs["refine"] = replace(joint, out=str(out / "refine"), sam="toy")
    results, timings = {}, {}
    for name, run_cfg in configs.items():
        t0 = time.perf_counter()
        print(f"[demo] {DEMO_ROWS[name]}")
        results[name] = train.train(run_cfg)["final"]
        timings[name] = round(time.perf_counter() - t0, 1)
    table = {DEMO_ROWS[n]: {t: 100 * r[t]["mIoU"] for t in DEMO_TARGETS} for n, r in results.items()}
    for row in table.values():
        row["mean"] = sum(row[t] for t in DEMO_TARGETS) / len(DEMO_TARGETS)
    caption = (f"Toy ablation (ToyCity, tiny random-init model, {DEMO_ITERS['warmup']} warmup + "
               f"{DEMO_ITERS['joint']} joint iterations at batch {DEMO['batch_size']}, crops {DEMO['crop_size']}; "
               f"{DEMO_NUM_GENERATED} toy generated images, p_gen 28.6%; EMA alpha {cfg.ema_alpha} every "
               f"{DEMO['ema_every']} iterations (official: every 100 of 40k); refinement min area {min_area} px; "
               f"mIoU % on the first {DEMO['eval_max']} val images of each toy target, whole image at short side "
               f"{DEMO['test_short_side']}).")
    md = markdown_table(table, caption)
    print(md)
    summary = {"table": table, "caption": caption, "seconds": {"data": round(t_data, 1), **timings,
               "total": round(time.perf_counter() - t_start, 1)}, "built_toycity": built}
    runs.atomic(out / "ablation.md", lambda tmp: Path(tmp).write_text(md + "\n"))
    runs.write_json(summary, out / "ablation.json")
    return summary


def markdown_table(table: dict, caption: str) -> str:
    cols = list(next(iter(table.values())))
    lines = [caption, "", "| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {row} | " + " | ".join(f"{v:.2f}" for v in vals.values()) + " |" for row, vals in table.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    """`python demo.py [train.py flags]`: train.main with --demo (the same messages and exit codes)."""
    return train.main(["--demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
