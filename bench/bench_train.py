"""Benchmark: seconds per training iteration of train.py on the CPU (tiny preset, ToyCity), per phase.

Runs a short warmup, then joint training without SAM and with the toy SAM, at the demo's scale by default (crops
192, batch 4, 192x192 generated images), and reports the median wall and CPU (process) seconds per iteration and the
share of a joint iteration spent in the teacher, the refinement and the student (forward + backward + step).

Usage:
    python bench/bench_train.py                        # demo scale, 20 iterations per phase (3 skipped)
    python bench/bench_train.py --crop 64 --batch 2    # the tests' scale
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toyworld import demo  # noqa: E402
import train  # noqa: E402
from runtools import train_config


def run(argv, out, skip):
    """train.main on argv; per-iteration records after the first `skip` (which hold one-time costs)."""
    train.main([*argv, "--out", str(out)])
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r and r["iter"] > skip]


def summarize(recs):
    med = {k: statistics.median(r[k] for r in recs) for k in ("time_iter", "cpu_iter", "time_teacher",
                                                                "time_refine", "time_student", "time_data")}
    total = sum(r["time_iter"] for r in recs)
    med["share"] = {part: sum(r[f"time_{part}"] for r in recs) / total for part in ("teacher", "refine", "student")}
    med["n_gen_per_batch"] = statistics.mean(r["n_gen"] for r in recs)
    return med


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=train_config.TOY_ROOT, help="ToyCity root (built if missing)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="first iterations left out (one-time costs)")
    parser.add_argument("--crop", type=int, default=train_config.TOY["crop_size"])
    parser.add_argument("--batch", type=int, default=train_config.TOY["batch_size"])
    parser.add_argument("--p-gen", type=float, default=0.287, help="official GTA share of generated samples")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    demo.ensure_toy_data(args.root, progress=False)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_train_"))
    import generate
    generate.main(["--backend", "toy", "--out", str(out / "generated"), "--num-images", "40", "--height",
                   str(args.crop), "--width", str(args.crop), "--no-progress"])
    common = ["--preset", "tiny", "--train-backbone", "--data-root", args.root, "--crop-size", str(args.crop),
              "--batch-size", str(args.batch), "--workers", "0", "--log-every", "1", "--eval-every", "0",
              "--no-progress", "--no-plots", "--lr", str(train_config.TOY["lr"])]
    min_area = str(round(5000 * (args.crop / 768) ** 2))  # the official 0.85% of the image, as in the demo
    t0 = time.perf_counter()
    results = {"warmup": summarize(run([*common, "--phase", "warmup", "--iters-warmup", str(args.iters)],
                                       out / "warmup", args.skip))}
    joint = [*common, "--phase", "joint", "--iters-joint", str(args.iters), "--weights",
             str(out / "warmup" / "model_final.pt"), "--synthetic", str(out / "generated"), "--p-gen", str(args.p_gen)]
    results["joint, no SAM"] = summarize(run([*joint, "--sam", "none"], out / "nosam", args.skip))
    results["joint, toy SAM"] = summarize(run([*joint, "--sam", "toy", "--sam-min-area", min_area], out / "toysam",
                                              args.skip))
    print(f"\ncrop {args.crop}, batch {args.batch}, p_gen {args.p_gen}, median over iterations {args.skip + 1}.."
          f"{args.iters}; load average {os.getloadavg()[0]:.2f}; {time.perf_counter() - t0:.0f} s in all")
    print("| phase | wall s/it | CPU s/it | teacher | refinement | student | generated/batch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        s = r["share"]
        print(f"| {name} | {r['time_iter']:.3f} | {r['cpu_iter']:.3f} | {100 * s['teacher']:.1f}% | "
              f"{100 * s['refine']:.1f}% | {100 * s['student']:.1f}% | {r['n_gen_per_batch']:.2f} |")
    return results


if __name__ == "__main__":
    main()
