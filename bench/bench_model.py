"""Speed and memory of clouds.py on this machine (CPU unless CUDA is available).

Cases (each in a fresh subprocess, so peak RSS belongs to that case alone):
  tiny_frozen / tiny_trainable: `tiny` preset, batch 2, 256x256: no_grad forward, and one full train step
      (forward + loss + backward + AdamW step), train_backbone False / True;
  convnext_large_768: `convnext_large` with random weights (pretrained=None), one 768x768 image, no_grad forward.
Usage: python bench/bench_model.py [--repeats 5] [--threads N] [--skip-large]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("tiny_frozen", "tiny_trainable", "convnext_large_768")


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def run_case(name, repeats):
    import torch

    import clouds

    torch.manual_seed(0)
    if name.startswith("tiny"):
        model = clouds.build_model("tiny", train_backbone=name == "tiny_trainable")
        images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
        labels = torch.randint(0, 19, (2, 256, 256))
        targets = [clouds.targets_from_label(lab) for lab in labels]
    else:
        model = clouds.build_model("convnext_large", pretrained=None)
        images = torch.randint(0, 256, (1, 3, 768, 768), dtype=torch.uint8)
    rss_built = rss_mb()
    model.eval()

    def forward():
        with torch.no_grad():
            model(images)

    res = {"case": name, "threads": torch.get_num_threads(), "rss_after_build_mb": round(rss_built)}
    res["forward_s"], res["forward_min_s"] = timed(forward, repeats)
    res["peak_rss_forward_mb"] = round(peak_mb())
    if name.startswith("tiny"):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

        def step():
            loss = sum(model.loss(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        res["train_step_s"], res["train_step_min_s"] = timed(step, repeats)
        res["peak_rss_train_mb"] = round(peak_mb())
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-large", action="store_true", help="skip convnext_large at 768x768 (~1.7 GB, slow)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args(argv)
    if args.case:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        print(json.dumps(run_case(args.case, args.repeats)))
        return None
    print(f"load average before: {os.getloadavg()}, cpus: {os.cpu_count()}")
    results = []
    for case in CASES:
        if args.skip_large and case == "convnext_large_768":
            continue
        out = subprocess.run([sys.executable, __file__, "--case", case, "--repeats", str(args.repeats), "--threads",
                              str(args.threads)],
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(res)
        line = f"{case:20s} forward {res['forward_s']:.3f} s (min {res['forward_min_s']:.3f})"
        if "train_step_s" in res:
            line += f"  train step {res['train_step_s']:.3f} s (min {res['train_step_min_s']:.3f})"
            line += f"  peak RSS {res['peak_rss_train_mb']} MB"
        else:
            line += f"  peak RSS {res['peak_rss_forward_mb']} MB"
        print(line + f"  (after build {res['rss_after_build_mb']} MB, {res['threads']} threads)")
    print(f"load average after: {os.getloadavg()}")
    return results


if __name__ == "__main__":
    main()
