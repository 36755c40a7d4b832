"""Cost of the ViT backbones of backbones.py (issue 19) beside the official CLIP ConvNeXt-L, and of the EMA teacher
of a tuned adapter.

Cases (random init; on the CPU each in a fresh subprocess, so its peak RSS is its own):
  <backbone>/<tuning>: the backbone alone on `--batch` x 3 x `--size`^2: `frozen` = one no_grad forward (what CLOUDS
      runs: its backbone is frozen); `rein` / `lora` = forward + backward into the adapter (what a tuned step adds).
      Per case: CPU seconds per iteration (time.process_time, median of --repeats after a warm-up), wall seconds, peak
      memory (CPU: peak RSS of the process, weights included; CUDA: torch.cuda.max_memory_allocated) and the ratio to
      the ConvNeXt-L frozen forward of the same run.
  teacher: on the tiny config (tiny head, dinov2_tiny), what the EMA teacher of a Rein / LoRA adapter costs against the
      head-only teacher of a frozen backbone: the teacher's predict (own adapter substituted through
      torch.func.functional_call) vs the same predict with the student's adapter, one ema_update, and the teacher's
      parameter bytes; plus the ViT-L numbers of the extra copy (adapter parameters x 4 bytes).

Usage:
    python bench/bench_backbones.py                            # CPU, 224 x 224, batch 1 (the machine load is printed)
    python bench/bench_backbones.py --device cuda --batch 8 --size 768   # bench/gpu_check.sh's row per backbone
    python bench/bench_backbones.py --tiny --no-isolate        # tiny random-init stand-ins (gpu_check --dry-run)
"""
import argparse
import copy
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

BACKBONES = ("convnext_large", "dinov2_l", "eva02_l")
TINY = {"convnext_large": "tiny", "dinov2_l": "dinov2_tiny", "dinov2_l_reg4": "dinov2_tiny_reg4",
        "eva02_l": "eva02_tiny", "eva02_l_clip": "eva02_tiny"}


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0), so peak_mb() measures what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_backbone(name, tuning, tiny, device):
    """The backbone module of clouds.build_model (random init): CLIP ConvNeXt-L (`convnext_large`) or a ViT."""
    import torch

    import clouds

    torch.manual_seed(0)
    with torch.device(device):  # random init on the device itself (ViT-L: 300M parameters)
        if name == "convnext_large":
            model = clouds.build_model(TINY[name] if tiny else "convnext_large", pretrained=None)
        else:
            model = clouds.build_model("tiny" if tiny else "convnext_large", backbone=TINY[name] if tiny else name,
                                       tuning=tuning, pretrained=None)
    return model.backbone.to(device), model.pixel_mean.to(device), model.pixel_std.to(device)


def run_case(name, tuning, size, batch, repeats, device, tiny, bf16=False):
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    backbone, _, _ = build_backbone(name, tuning, tiny, device)
    backbone.bf16 = bf16
    x = torch.randn(batch, 3, size, size, device=device)
    params = [p for p in backbone.parameters() if p.requires_grad]
    cuda = device.startswith("cuda")

    def step():
        if tuning == "frozen":
            with torch.no_grad():
                feats = backbone(x)
        else:
            feats = backbone(x)
            sum(v.float().square().mean() for v in feats.values()).backward()
            for p in params:
                p.grad = None
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_mb()
    return {"case": f"{name}/{tuning}" + (f" [{TINY[name]}]" if tiny else ""), "cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall),
            "peak_mb": round(peak), "peak_kind": "cuda allocated" if cuda else "process RSS",
            "params_m": round(sum(p.numel() for p in backbone.parameters()) / 1e6, 1),
            "trainable": sum(p.numel() for p in params)}


def run_teacher(repeats, device):
    """The EMA teacher of a tuned adapter (train.EMASource) against the head-only teacher, tiny config."""
    import torch

    import backbones
    import clouds
    import train

    out = {}
    x = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8, device=device)

    def cpu_time(fn):  # the minimum of the repeats: the least disturbed by a loaded machine
        fn()
        times = []
        for _ in range(repeats):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return min(times)

    for tuning in ("frozen", "rein", "lora"):
        torch.manual_seed(0)
        model = clouds.build_model("tiny", backbone="dinov2_tiny", tuning=tuning).to(device).eval()
        source = train.EMASource(model) if tuning != "frozen" else model.sem_seg_head
        teacher = copy.deepcopy(source).requires_grad_(False).eval()
        predict_t = cpu_time(lambda: model.predict(x, **train.teacher_inputs(teacher)))
        predict_head = cpu_time(lambda: model.predict(x, head=teacher.head if tuning != "frozen" else teacher))
        ema = cpu_time(lambda: train.ema_update(teacher, source, 0.999))
        out[tuning] = {"teacher_predict_cpu_s": predict_t, "same_predict_student_adapter_cpu_s": predict_head,
                       "ema_update_cpu_s": ema,
                       "teacher_param_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters())}
    out["vit_l_extra_teacher_bytes"] = {"rein": 4 * backbones.rein_parameter_count(),
                                        "lora_qkv_r16": 4 * 24 * 16 * 4 * 1024}
    return out


def child(args):
    if args.case == "teacher":
        res = run_teacher(args.repeats, args.device)
    else:
        name, tuning = args.case.split("/")
        res = run_case(name, tuning, args.size, args.batch, args.repeats, args.device, args.tiny, args.bf16)
    print("RESULT " + json.dumps(res))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(TINY))
    p.add_argument("--tunings", nargs="+", default=["frozen", "rein", "lora"], choices=["frozen", "rein", "lora"])
    p.add_argument("--size", type=int, default=224, help="square input size (a multiple of 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true", help="tiny random-init stand-ins of every backbone (dry runs)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in the backbone (backbone_bf16)")
    p.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=True,
                   help="also the EMA teacher case (tiny config)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="each case in a fresh subprocess (CPU peak RSS per case)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        return child(args)
    cases = [f"{b}/{t}" for b in args.backbones for t in (["frozen"] if b == "convnext_large" else args.tunings)]
    cases += ["teacher"] if args.teacher else []
    load = open("/proc/loadavg").read().split()[:3]
    print(f"# bench_backbones: device {args.device}, batch {args.batch} x 3 x {args.size}^2, {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}, {'tiny stand-ins' if args.tiny else 'real sizes, random init'}"
          f"{', bf16' if args.bf16 else ''}; load average at start {' '.join(load)}")
    results = {}
    for case in cases:
        cmd = [sys.executable, __file__, "--case", case, "--size", str(args.size), "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads)]
        cmd += ["--tiny"] * args.tiny + ["--bf16"] * args.bf16
        if args.isolate:
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
            if run.returncode or not line:
                print(f"{case}: FAILED (exit {run.returncode})\n{run.stderr[-2000:]}")
                results[case] = None
                continue
            results[case] = json.loads(line[-1][7:])
        else:
            try:
                results[case] = run_teacher(args.repeats, args.device) if case == "teacher" else run_case(
                    *case.split("/"), args.size, args.batch, args.repeats, args.device, args.tiny, args.bf16)
            except RuntimeError as e:  # e.g. CUDA out of memory: report it, go on with the next case
                print(f"{case}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                results[case] = None
    base = (results.get("convnext_large/frozen") or {}).get("cpu_s" if args.device == "cpu" else "wall_s")
    time_key = "cpu_s" if args.device == "cpu" else "wall_s"
    print(f"\n| backbone / tuning | params (M) | trainable | {'CPU s/iter' if args.device == 'cpu' else 'wall s/iter'}"
          f" | wall s/iter | vs ConvNeXt-L forward | peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, r in results.items():
        if case == "teacher" or r is None:
            continue
        ratio = f"{r[time_key] / base:.2f}x" if base else "-"
        print(f"| {r['case']} | {r['params_m']} | {r['trainable']:,} | {r[time_key]:.3f} | {r['wall_s']:.3f} | {ratio} | "
              f"{r['peak_mb']} ({r['peak_kind']}) |")
    if results.get("teacher"):
        t = results["teacher"]
        print("\nEMA teacher, tiny config (dinov2_tiny, tiny head, batch 2 x 128^2), CPU s (min of the repeats):")
        print("| tuning | teacher predict | same predict, student adapter | ema_update | teacher params (bytes) |")
        print("|---|---:|---:|---:|---:|")
        for tuning in ("frozen", "rein", "lora"):
            r = t[tuning]
            print(f"| {tuning} | {r['teacher_predict_cpu_s']:.4f} | {r['same_predict_student_adapter_cpu_s']:.4f} | "
                  f"{r['ema_update_cpu_s']:.5f} | {r['teacher_param_bytes']:,} |")
        v = t["vit_l_extra_teacher_bytes"]
        print(f"ViT-L: the teacher's extra copy is {v['rein'] / 2 ** 20:.1f} MiB (Rein) / {v['lora_qkv_r16'] / 2 ** 20:.1f}"
              f" MiB (LoRA r16 qkv); the ~1.2 GB of frozen ViT weights are shared")
    print(f"load average at end {' '.join(open('/proc/loadavg').read().split()[:3])}")
    if any(r is None for r in results.values()):
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
