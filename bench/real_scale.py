"""Benchmark: the official configuration at real size through `train.main` (issue 11 "Real scale").

ConvNeXt-L CLIP (`convnext_large`, random weights from a local file passed with --clip-weights, as a user passes the
downloaded open_clip file), MobileSAM `vit_t` (random weights from a file passed with --sam-checkpoint), 768 crops,
the official p_gen of GTA (28.7%, reference §1.6), both phases, a few iterations each, on ToyCity rendered at real
resolution: GTA-layout images at 1052x1914 (raw palette labels, converted with data.convert) and 768x768 "generated"
images in generate.py's output layout. Each mode runs in its own process (so its peak memory is its own):
  fp32: backbone in fp32 (and --no-tf32 on CUDA);  fast: --backbone-bf16 (and --tf32 on CUDA).
Each run draws the plots, saves last.pt and evaluates 2 Cityscapes-layout images at 1024x2048 at the end of each
phase; then the last run is resumed for one more joint iteration (--resume: the path a preempted job takes).
Prints seconds per iteration (median after the first), the teacher / refinement / student split (--profile: CUDA-
synchronized), the peak memory (CPU: the process's peak RSS, VmHWM; CUDA: torch.cuda.max_memory_allocated) and the
hours of a full 40k warmup + 40k joint GTA run this implies on this machine; writes a JSON and a markdown table.

Usage:
    python bench/real_scale.py                                   # CPU, batch 2, 3 iterations per phase
    python bench/real_scale.py --device cuda                     # batch 8 (the official IMS_PER_BATCH)
    python bench/real_scale.py --tiny                            # seconds-long smoke run (tiny preset, toy SAM)
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

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

OFFICIAL_P_GEN = 0.287       # reference §1.6: GTA 24,904 images vs 5000 generated x TARGET_FACTOR 2.0
FULL_ITERS = (40000, 40000)  # reference §1.4: GTA warmup and joint MAX_ITER
# Cityscapes train id -> labelId (the raw ids GTA5's palette PNGs hold; data.convert maps them back)
TRAIN_TO_LABEL_ID = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33], np.uint8)
SIZES = {False: {"gta": (1052, 1914), "generated": (768, 768), "crop": 768, "city": (1024, 2048)},  # real sizes
         True: {"gta": (132, 240), "generated": (96, 96), "crop": 64, "city": (64, 128)}}          # --tiny
EVAL_IMAGES = 2  # Cityscapes-layout val images, evaluated at the end of each phase (at 1024x2048, §8.1)


# ---- inputs: ToyCity at real resolution, random-init weights files ----

def write_data(root: Path, tiny: bool, num_gta: int = 4, num_generated: int = 4):
    """GTA5 layout (images/NNNNN.png, labels/NNNNN.png as Cityscapes-labelId palette PNGs, then data.convert) and a
    generate.py-style folder (images/im_{j}_p0.png); existing files are kept."""
    import data
    from runtools import files
    from toyworld import city

    size = SIZES[tiny]
    gta = root / "datasets" / "gta5"
    (gta / "images").mkdir(parents=True, exist_ok=True)
    (gta / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(num_gta):
        image_path, label_path = gta / "images" / f"{i + 1:05d}.png", gta / "labels" / f"{i + 1:05d}.png"
        if image_path.is_file() and label_path.is_file():
            continue
        image, label = city.render_scene("gta", seed=i, size=size["gta"])        # (H, W, 3), (H, W) train ids
        raw = np.where(label < 19, TRAIN_TO_LABEL_ID[np.minimum(label, 18)], 0).astype(np.uint8)  # 255 -> 0 (void)
        label_path.write_bytes(city._encode(raw, palette=city._GTA_PALETTE))  # P mode, like GTA5's labels
        Image.fromarray(image).save(image_path)
    data.convert("gta", str(root / "datasets"), nproc=1, progress=False)
    cs = root / "datasets" / "cityscapes"
    for i in range(EVAL_IMAGES):  # the evaluation set: Cityscapes layout, train ids written directly
        stem = f"toycity_000000_{i:06d}"
        image_path = cs / "leftImg8bit" / "val" / "toycity" / f"{stem}_leftImg8bit.png"
        label_path = cs / "gtFine" / "val" / "toycity" / f"{stem}_gtFine_labelTrainIds.png"
        if image_path.is_file() and label_path.is_file():
            continue
        image, label = city.render_scene("cityscapes", seed=100 + i, size=size["city"])
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(image_path)
        files.save_png(label, label_path)
    gen = root / "generated" / "images"
    gen.mkdir(parents=True, exist_ok=True)
    for j in range(num_generated):
        path = gen / f"im_{j}_p0.png"
        if not path.is_file():
            image = city.render(f"a photo of a street, scene {j}", seed=j, size=size["generated"])
            Image.fromarray(image).save(path)
    return root / "datasets", root / "generated"


def write_weights(root: Path, tiny: bool) -> dict:
    """Random-init open_clip convnext_large_d_320 and MobileSAM vit_t state dicts, saved as a user's downloads."""
    import torch

    if tiny:
        return {}
    files = {"clip": root / "weights" / "convnext_large_d_320_random.pt",
             "sam": root / "weights" / "mobile_sam_random.pt"}
    files["clip"].parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if not files["clip"].is_file():
        import open_clip
        model = open_clip.create_model("convnext_large_d_320", pretrained=None)
        torch.save(model.state_dict(), files["clip"])
        del model
    if not files["sam"].is_file():
        from mobile_sam import sam_model_registry
        torch.save(sam_model_registry["vit_t"](checkpoint=None).state_dict(), files["sam"])
    return files


# ---- one mode in its own process ----

def train_argv(args, mode: str, datasets: Path, generated: Path, weights: dict, out: Path) -> list:
    crop = SIZES[args.tiny]["crop"]
    # plots on, a save (last.pt) and an evaluation of EVAL_IMAGES Cityscapes-layout images at the end of each phase
    argv = ["--source", "gta", "--data-root", str(datasets), "--synthetic", str(generated), "--out", str(out),
            "--crop-size", str(crop), "--batch-size", str(args.batch_size), "--iters-warmup", str(args.iters),
            "--iters-joint", str(args.iters), "--eval-every", str(args.iters), "--eval-sets", "cityscapes",
            "--eval-max", str(EVAL_IMAGES), "--test-short-side", str(SIZES[args.tiny]["city"][0]), "--log-every",
            "1", "--workers", str(args.workers), "--p-gen", str(args.p_gen), "--device", args.device, "--profile",
            "--no-progress", "--overwrite", "--backbone-bf16" if mode == "fast" else "--no-backbone-bf16",
            "--tf32" if mode == "fast" else "--no-tf32"]
    if args.tiny:  # the official 5000 px threshold scaled to the crop, like the demo (demo.run_demo)
        return argv + ["--preset", "tiny", "--sam", "toy", "--sam-min-area", str(round(5000 * (crop / 768) ** 2))]
    return argv + ["--preset", "convnext_large", "--clip-weights", str(weights["clip"]), "--sam", "vit_t",
                   "--sam-checkpoint", str(weights["sam"])]


def peak_memory_gb(device: str) -> dict:
    import torch

    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}  # Linux: KiB
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_gb"] = int(line.split()[1]) / 2 ** 20
    if device.startswith("cuda"):
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["cuda_max_reserved_gb"] = torch.cuda.max_memory_reserved() / 2 ** 30
    return out


def summarize(records: list) -> dict:
    """Per-phase medians after the first iteration (one-time costs: the JIT build, allocator warmup, SAM init)."""
    recs = records[1:] or records
    med = {k: statistics.median(r[k] for r in recs) for k in ("time_iter", "cpu_iter", "time_data", "time_teacher",
                                                                "time_refine", "time_student")}
    med["n_gen"] = sum(r["n_gen"] for r in recs)
    # teacher + refinement seconds per generated sample (both grow with the number of generated samples); from the
    # first iteration too when the later ones drew no generated sample (then it includes one-time costs)
    gen = [r for r in recs if r["n_gen"]] or [r for r in records if r["n_gen"]]
    med["pseudo_from_first"] = bool(gen) and not any(r["n_gen"] for r in recs)
    med["pseudo_per_gen"] = (sum(r["time_teacher"] + r["time_refine"] for r in gen) / sum(r["n_gen"] for r in gen)
                             if gen else None)
    med["iters"] = len(records)
    return med


def child(args, mode: str, datasets: Path, generated: Path, weights: dict) -> dict:
    import torch
    import train

    resume = mode == "resume"  # the last mode's run again with --resume and one more joint iteration
    mode = args.modes[-1] if resume else mode
    out = Path(args.work) / f"run_{args.device.replace(':', '')}_b{args.batch_size}_{mode}"
    argv = train_argv(args, mode, datasets, generated, weights, out)
    if resume:
        argv = [a for a in argv if a != "--overwrite"] + ["--resume", "--allow-config-change", "--iters-joint",
                                                          str(args.iters + 1)]
    t0 = time.perf_counter()
    summary = train.main(argv)
    wall = time.perf_counter() - t0
    if resume:
        joint = summary["phases"]["joint"]
        return {"resumed_from": joint["start"], "iterations": joint["iterations"], "wall_s": wall,
                "eval": {k: v["mIoU"] for k, v in joint["eval"].items()}}
    phases = {}
    for phase in ("warmup", "joint"):
        recs = [json.loads(ln) for ln in (out / phase / "metrics.jsonl").read_text().splitlines() if ln]
        phases[phase] = summarize([r for r in recs if "loss" in r])
    joint = phases["joint"]
    # a joint iteration of the full run: the student part plus the expected teacher + SAM cost of its
    # p_gen x batch generated samples (a few iterations draw too few generated samples for their median)
    student_part = joint["time_iter"] - joint["time_teacher"] - joint["time_refine"] + joint["time_data"]
    per_gen = joint["pseudo_per_gen"] or 0.0
    joint_iter = student_part + args.p_gen * args.batch_size * per_gen
    warm_iter = phases["warmup"]["time_iter"] + phases["warmup"]["time_data"]
    hours = (FULL_ITERS[0] * warm_iter + FULL_ITERS[1] * joint_iter) / 3600
    return {"device": args.device, "batch_size": args.batch_size, "mode": mode, "phases": phases,
            "expected_joint_iter_s": joint_iter, "estimate_hours_40k_40k": hours, "wall_s": wall,
            "torch": torch.__version__, **peak_memory_gb(args.device)}


# ---- report ----

def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    model = Path("/proc/cpuinfo")
    if model.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in model.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores; {gpu}; torch {torch.__version__}"


def markdown(results: list, caption: str) -> str:
    lines = [caption, "", "| device | batch | mode | phase | s/iter | CPU s/iter | data | teacher | refine | student | "
             "peak memory GB | 40k+40k estimate (h) |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        mem = r.get("cuda_max_allocated_gb", r["peak_rss_gb"])
        mem = f"{mem:.1f} ({'CUDA allocated' if 'cuda_max_allocated_gb' in r else 'RSS'})"
        for phase, p in r["phases"].items():
            split = [f"{p[k]:.2f}" if phase == "joint" else "-" for k in ("time_teacher", "time_refine")]
            hours = f"{r['estimate_hours_40k_40k']:.0f}" if phase == "joint" else ""
            lines.append(f"| {r['device']} | {r['batch_size']} | {r['mode']} | {phase} | {p['time_iter']:.2f} | "
                         f"{p['cpu_iter']:.2f} | {p['time_data']:.2f} | {' | '.join(split)} | "
                         f"{p['time_student']:.2f} | {mem} | {hours} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 2 on the CPU, 8 (official) on CUDA")
    parser.add_argument("--iters", type=int, default=3, help="iterations per phase (the first is not counted)")
    parser.add_argument("--modes", nargs="+", default=["fp32", "fast"], choices=["fp32", "fast"])
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 CPU, 4 CUDA)")
    parser.add_argument("--p-gen", type=float, default=OFFICIAL_P_GEN, help="share of generated samples (§1.6)")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: tiny preset, toy SAM, small images")
    parser.add_argument("--work", default="runs/real_scale", help="data, weights and runs are written here")
    parser.add_argument("--json", default=None, help="results file (default: WORK/real_scale[_tiny]_DEVICE.json)")
    parser.add_argument("--resume-check", action=argparse.BooleanOptionalAction, default=True,
                        help="rerun the last mode with --resume and one more joint iteration")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (8 if cuda else 2)
    args.workers = (4 if cuda else 0) if args.workers is None else args.workers
    if args.iters < 1 or args.batch_size < 1:
        raise ValueError(f"--iters and --batch-size must be >= 1, got {args.iters}, {args.batch_size}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work) / ("tiny" if args.tiny else "real")
    if args.child:  # internal: one mode in this process
        datasets, generated = work / "datasets", work / "generated"
        weights = {k: work / "weights" / v for k, v in (("clip", "convnext_large_d_320_random.pt"),
                                                        ("sam", "mobile_sam_random.pt"))}
        print("REAL_SCALE_RESULT " + json.dumps(child(args, args.child, datasets, generated, weights)))
        return {}
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {args.device}: no CUDA device is visible; run with --device cpu")
    t0 = time.perf_counter()
    write_data(work, args.tiny)
    write_weights(work, args.tiny)
    t_inputs = time.perf_counter() - t0
    results = []
    for mode in args.modes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--device", args.device,
               "--batch-size", str(args.batch_size), "--iters", str(args.iters), "--workers", str(args.workers),
               "--p-gen", str(args.p_gen), "--work", args.work, *(["--tiny"] if args.tiny else [])]
        print(f"[real_scale] {mode}: {' '.join(cmd)}", flush=True)
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("REAL_SCALE_RESULT ")]
        if run.returncode or not lines:
            raise RuntimeError(f"real_scale {mode} run failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
        results.append(json.loads(lines[-1].split(" ", 1)[1]))
        print(f"[real_scale] {mode} done in {results[-1]['wall_s']:.0f} s: {json.dumps(results[-1])}", flush=True)
    resumed = None
    if args.resume_check:  # the last run again: --resume, one more joint iteration (its evaluation included)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "resume", "--device", args.device,
               "--batch-size", str(args.batch_size), "--iters", str(args.iters), "--workers", str(args.workers),
               "--p-gen", str(args.p_gen), "--work", args.work, "--modes", *args.modes,
               *(["--tiny"] if args.tiny else [])]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("REAL_SCALE_RESULT ")]
        if run.returncode or not lines:
            raise RuntimeError(f"real_scale resume run failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
        resumed = json.loads(lines[-1].split(" ", 1)[1])
        print(f"[real_scale] resume: joint resumed from iteration {resumed['resumed_from']}, ran to "
              f"{resumed['iterations']} in {resumed['wall_s']:.0f} s (mIoU {resumed['eval']})", flush=True)
    load = os.getloadavg()
    caption = (f"Real scale ({'tiny smoke mode' if args.tiny else 'convnext_large + MobileSAM vit_t, random weights'}"
               f", crops {SIZES[args.tiny]['crop']}, GTA images {SIZES[args.tiny]['gta'][0]}x"
               f"{SIZES[args.tiny]['gta'][1]}, p_gen {args.p_gen}, {args.iters} iterations per phase, medians after "
               f"the first; seconds per iteration, --profile). Machine: {machine()}; load average "
               f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}. Estimate: 40k warmup + 40k joint iterations at these "
               f"medians (joint: student + p_gen x batch x teacher+SAM seconds per generated sample).")
    table = markdown(results, caption)
    print(table)
    summary = {"results": results, "caption": caption, "table": table, "inputs_s": t_inputs, "loadavg": load,
               "resume": resumed}
    path = Path(args.json or Path(args.work) / f"real_scale{'_tiny' if args.tiny else ''}_"
                f"{args.device.replace(':', '')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    summary["json"] = str(path)
    return summary


if __name__ == "__main__":
    main()
