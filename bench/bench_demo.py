"""Stage breakdown of the offline demo (`python -m toyworld.demo`): wall and CPU seconds per stage.

Runs toyworld.demo.main in this process with timers wrapped around its stages (ToyCity build and label conversion,
toy generation, the JIT build of csrc/, and inside each train.train call: preflight, input preparation, model build,
the training iterations, evaluation, checkpoints and plots). CPU seconds are this process's user + system time plus
that of its finished children (the compiler of the JIT build), so other jobs on the machine do not inflate them.
Nested stages are also counted in their parent's total; "self" is the parent's time outside its children.

Usage:
    python bench/bench_demo.py [--demo-out /tmp/demo_bench] [--cprofile FILE] [-- demo flags]
    TORCH_EXTENSIONS_DIR=$(mktemp -d) python bench/bench_demo.py   # include the JIT build of csrc/
    python bench/bench_demo.py --fresh-data                         # include the ToyCity build (new datasets_toy/)
"""
import argparse
import cProfile
import functools
import json
import os
import pstats
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_seconds() -> float:
    """User + system seconds of this process and its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Stages:
    """Inclusive (wall, CPU) seconds and calls per stage path ("warmup/eval"), in the order first seen."""

    def __init__(self):
        self.total, self.stack, self.run = {}, [], "setup"
        self.threads = set()  # intra-op threads in force when each train run started

    def wrap(self, owner, attr, label):
        """Replace owner.attr by a timed wrapper counted under `label` (nested under the open stages)."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            path = "/".join([*self.stack, label])
            self.stack.append(label)
            w0, c0 = time.perf_counter(), cpu_seconds()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                w, c, n = self.total.get(path, (0.0, 0.0, 0))
                self.total[path] = (w + time.perf_counter() - w0, c + cpu_seconds() - c0, n + 1)
        setattr(owner, attr, timed)

    def rows(self, wall_all, cpu_all) -> list:
        """[(path, wall, cpu, calls)] plus a "self" row for each parent and the untimed remainder."""
        out = []
        for path, (w, c, n) in self.total.items():
            out.append((path, w, c, n))
            depth = path.count("/") + 1
            kids = [v for p, v in self.total.items() if p.startswith(path + "/") and p.count("/") == depth]
            if kids:
                out.append((path + "/(self)", w - sum(k[0] for k in kids), c - sum(k[1] for k in kids), n))
        tops = [v for p, v in self.total.items() if "/" not in p]
        out.append(("(outside the stages)", wall_all - sum(v[0] for v in tops), cpu_all - sum(v[1] for v in tops), 1))
        out.append(("total", wall_all, cpu_all, 1))
        return out


def instrument(stages: Stages):
    """Wrap the demo's stages. Train runs are labelled by their --out folder name (warmup, source_only, ...)."""
    import data
    import generate
    import ops
    import train
    from runtools import preflight, runs
    from toyworld import city
    stages.wrap(city, "build", "toycity_build")
    stages.wrap(data, "convert", "label_convert")
    stages.wrap(generate, "main", "generate")
    stages.wrap(ops, "load_extension", "jit_build_and_load")
    stages.wrap(preflight, "preflight", "preflight")
    stages.wrap(train, "prepare_inputs", "prepare_inputs")
    stages.wrap(train, "train_step", "iterations")
    stages.wrap(runs, "evaluate_sets", "eval")
    stages.wrap(runs, "save_state", "checkpoints")
    stages.wrap(runs, "write_plots", "plots")
    train_fn = train.train

    def labelled(cfg, *args, **kwargs):
        import torch
        stages.threads.add(torch.get_num_threads())  # the demo's --cpu-threads, not the default
        stages.wrap(train, "_train", Path(cfg.out).name)  # re-wrapped per run: its own label
        try:
            return train_fn(cfg, *args, **kwargs)
        finally:
            train._train = train._train.__wrapped__
    train.train = labelled


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo-out", default="/tmp/demo_bench")
    parser.add_argument("--fresh-data", action="store_true", help="delete datasets_toy/ first (time the ToyCity build)")
    parser.add_argument("--cprofile", default="", help="also write cProfile stats here and print the top functions")
    parser.add_argument("--json", default="", help="write the breakdown as JSON here")
    args, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    from runtools.train_config import TOY_ROOT
    if args.fresh_data:
        shutil.rmtree(TOY_ROOT, ignore_errors=True)
    stages = Stages()
    instrument(stages)
    from toyworld import demo
    profiler = cProfile.Profile() if args.cprofile else None
    w0, c0 = time.perf_counter(), cpu_seconds()
    if profiler:
        profiler.enable()
    demo.main(["--demo-out", args.demo_out, "--no-progress", *rest])
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    rows = stages.rows(wall, cpu)
    import torch
    threads = "/".join(str(n) for n in sorted(stages.threads)) or "?"
    print(f"\n[bench_demo] torch {torch.__version__}, the runs used {threads} intra-op thread(s), "
          f"{os.cpu_count()} cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"| stage | calls | wall s | CPU s |\n|---|---:|---:|---:|")
    for path, w, c, n in rows:
        print(f"| {path} | {n} | {w:.1f} | {c:.1f} |")
    if profiler:
        profiler.dump_stats(args.cprofile)
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
    result = {"wall": wall, "cpu": cpu, "stages": {p: {"wall": w, "cpu": c, "calls": n} for p, w, c, n in rows}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
