"""Benchmark: does a toy run degrade gracefully when other jobs load the machine? Seconds per iteration of a short toy
warmup (the demo's settings: tiny preset, crop 192, batch 4) and of connected components, quiet vs loaded, with the
old and the new CPU thread setting, all measured in this one run.

Each measurement runs in a fresh subprocess (a thread count or an OpenMP wait policy is fixed when torch starts):
  before: the old setting: torch's default intra-op threads (one per core), CLOUDS_CPU_THREADS=default;
  after:  the code's own setting (the toy recipe's cpu_threads, applied by ops.cpu_threads as the demo does).
The load generator starts --load busy-loop processes (default 5 per core), each bounded by --load-seconds and all
killed in a finally block (also on Ctrl-C or SIGTERM). The printed ratios are against the quiet "before" run of the
same invocation; peak memory is each child's ru_maxrss.

Usage:
    python bench/bench_load.py                         # warmup + ops, before/after, quiet/loaded
    python bench/bench_load.py --only ops --load 10
    python bench/bench_load.py --child warmup --setting after   # one measurement, JSON on the last line
"""
import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("before", "after")
WORKLOADS = ("warmup", "ops")


# ---- the load generator ----


class Load:
    """`n` busy-loop processes, each exiting by itself after `seconds`; killed on exit of the with block."""

    def __init__(self, n: int, seconds: float):
        self.n, self.seconds, self.procs = n, seconds, []

    def __enter__(self):
        code = f"import time\nend = time.monotonic() + {self.seconds}\nwhile time.monotonic() < end:\n    pass\n"
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        time.sleep(0.5)  # let the scheduler see them
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # the with blocks' cleanup runs, as on Ctrl-C


# ---- one measurement (child process) ----


def child(workload: str, setting: str, iters: int, skip: int, reps: int) -> dict:
    """Run one workload with one setting in this (fresh) process; returns s/iteration and peak memory."""
    sys.path.insert(0, str(ROOT))
    if setting == "before":
        os.environ["CLOUDS_CPU_THREADS"] = "default"
    import ops
    from runtools.train_config import TOY
    with ops.cpu_threads(TOY["cpu_threads"]) as threads:  # as the demo (train.py --recipe toy: the same setting)
        res = {"workload": workload, "setting": setting, "threads": threads}
        res.update(_warmup(iters, skip) if workload == "warmup" else _ops(reps))
    res["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def _warmup(iters: int, skip: int) -> dict:
    import train
    from runtools.train_config import TOY, TOY_ROOT
    from toyworld import demo
    demo.ensure_toy_data(TOY_ROOT, progress=False)
    with tempfile.TemporaryDirectory(prefix="bench_load_") as out:
        train.main(["--recipe", "toy", "--phase", "warmup", "--iters-warmup", str(iters), "--eval-every", "0",
                    "--log-every", "1", "--no-progress", "--no-plots", "--out", out, "--workers", str(TOY["workers"])])
        recs = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r and r["iter"] > skip]
    return {"s_per_it": statistics.median(r["time_iter"] for r in recs),
            "cpu_per_it": statistics.median(r["cpu_iter"] for r in recs), "n": len(recs)}


def _ops(reps: int) -> dict:
    """Connected components of a 1024x2048 ToyCity street map and of a 768x768 crop (the generated-image size)."""
    import torch
    import ops
    from toyworld import city
    label = torch.from_numpy(city.render_scene("cityscapes", 0, size=(1024, 2048))[1])
    crop = label[128:896, 640:1408].contiguous()
    out = {}
    for name, x in (("cc_1024x2048", label), ("cc_768x768", crop)):
        ops.connected_components(x, ignore_index=255)  # warm-up (and the extension load)
        walls, cpus = [], []
        for _ in range(reps):
            w0, c0 = time.perf_counter(), time.process_time()
            ops.connected_components(x, ignore_index=255)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        out[name] = {"s_per_call": statistics.median(walls), "cpu_per_call": statistics.median(cpus)}
    return out


# ---- the driver ----


def measure(workload, setting, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", workload, "--setting", setting,
           "--iters", str(args.iters), "--skip", str(args.skip), "--reps", str(args.reps)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.load_seconds)
    if proc.returncode != 0:
        raise RuntimeError(f"{workload}/{setting} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=WORKLOADS, help="one workload (default: both)")
    parser.add_argument("--load", type=int, default=5 * (os.cpu_count() or 1), help="busy-loop processes")
    parser.add_argument("--load-seconds", type=float, default=900, help="upper bound of each busy loop (and child)")
    parser.add_argument("--iters", type=int, default=10, help="warmup iterations per measurement")
    parser.add_argument("--skip", type=int, default=2, help="first iterations left out (one-time costs)")
    parser.add_argument("--reps", type=int, default=25, help="connected-components calls per measurement")
    parser.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, default="after", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        res = child(args.child, args.setting, args.iters, args.skip, args.reps)
        print(json.dumps(res))
        return res
    signal.signal(signal.SIGTERM, _sigterm)
    results = []
    print(f"[bench_load] {os.cpu_count()} cores, load generator: {args.load} busy loops; load average at start "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    for workload in ([args.only] if args.only else WORKLOADS):
        for condition in ("quiet", "loaded"):
            for setting in SETTINGS:
                if condition == "loaded":
                    with Load(args.load, args.load_seconds):
                        res = measure(workload, setting, args)
                        res["loadavg"] = os.getloadavg()[0]
                else:
                    res = measure(workload, setting, args)
                    res["loadavg"] = os.getloadavg()[0]
                res["condition"] = condition
                results.append(res)
                print(f"[bench_load] {json.dumps(res)}", flush=True)
    print(f"\nquiet: no load generator (other jobs may run: see the load averages); loaded: + {args.load} busy loops. "
          f"s/it: median wall seconds per iteration (ops: per call)")
    print("| workload | setting | threads | quiet s/it (load) | loaded s/it (load) | loaded / quiet | vs quiet before | "
          "quiet / loaded CPU s/it | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for workload in ([args.only] if args.only else WORKLOADS):
        keys = ["warmup"] if workload == "warmup" else ["cc_1024x2048", "cc_768x768"]
        for key in keys:
            def pick(setting, condition):
                r = next(r for r in results if r["workload"] == workload and r["setting"] == setting
                         and r["condition"] == condition)
                v = r if workload == "warmup" else r[key]
                s, c = (v["s_per_it"], v["cpu_per_it"]) if workload == "warmup" else (v["s_per_call"],
                                                                                     v["cpu_per_call"])
                return s, c, r
            base = pick("before", "quiet")[0]
            for setting in SETTINGS:
                (q, qc, rq), (ld, lc, rl) = pick(setting, "quiet"), pick(setting, "loaded")
                print(f"| {key} | {setting} | {rq['threads']} | {q:.4f} ({rq['loadavg']:.1f}) | {ld:.4f} "
                      f"({rl['loadavg']:.1f}) | {ld / q:.1f}x | {ld / base:.1f}x | {qc:.4f} / {lc:.4f} | "
                      f"{max(rq['maxrss_mb'], rl['maxrss_mb']):.0f} |")
    return {"results": results}


if __name__ == "__main__":
    main()
