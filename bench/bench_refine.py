"""Benchmark: toy-backend generation throughput and SAM-refinement throughput on ToyCity (ToyPointPredictor).

Refinement runs at 768x768 (the official generated-image size) with official settings (min_area 5000, 5 points);
the teacher is the ground truth blurred by a coarse nearest down/up-sampling (factor 16). The time is split into
components (ops.connected_components on the teacher map), points (ops.sample_points), the predictor (set_image +
predict_points, including its own internal connected components) and the rest (best-mask selection, overlap
removal, per-class union).

Usage:
    python bench/bench_refine.py                          # 50 toy images at 192^2, 8 refinements at 768^2
    python bench/bench_refine.py --gen-images 100 --refine-images 16 --size 768
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate  # noqa: E402
import refine  # noqa: E402
from toyworld import city  # noqa: E402
from toyworld import sam as toysam  # noqa: E402


class ExclusiveTimer:
    """Wraps callables; each records its time minus the time of wrapped callables it calls (exclusive time).

    A callable wrapped with top_level_only=True is timed only when no other wrapped callable is running (the
    predictor's own connected components count as predictor time).
    """

    def __init__(self):
        self.total, self.stack = defaultdict(float), []

    def wrap(self, name, fn, top_level_only=False):
        def timed(*args, **kwargs):
            if top_level_only and self.stack:
                return fn(*args, **kwargs)
            self.stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = self.stack.pop()
                self.total[name] += elapsed - nested
                if self.stack:
                    self.stack[-1] += elapsed
        return timed


def blurred_teacher(label: np.ndarray, factor: int = 16) -> np.ndarray:
    """A weak teacher: nearest down-sampling by `factor`, then nearest up-sampling (blocky boundaries)."""
    t = torch.from_numpy(label.astype(np.float32))[None, None]
    small = F.interpolate(t, scale_factor=1 / factor, mode="nearest")
    return F.interpolate(small, size=label.shape, mode="nearest")[0, 0].numpy().astype(np.int64)


def bench_generation(num_images: int, size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        s = generate.main(["--out", tmp, "--backend", "toy", "--num-images", str(num_images), "--height", str(size),
                           "--width", str(size), "--no-progress"])
        elapsed = time.perf_counter() - start
    return {"images": s["written"], "seconds": round(elapsed, 3), "images_per_s": round(s["written"] / elapsed, 2)}


def bench_refinement(num_images: int, size: int, factor: int, prompts: list) -> dict:
    timer = ExclusiveTimer()
    predictor = toysam.ToyPointPredictor()
    predictor.set_image = timer.wrap("predictor", predictor.set_image)
    predictor.predict_points = timer.wrap("predictor", predictor.predict_points)
    real_ops = refine.ops
    refine.ops = type("TimedOps", (), {})()  # per-call timing of the two ops refine.py uses
    refine.ops.connected_components = timer.wrap("components", real_ops.connected_components, top_level_only=True)
    refine.ops.sample_points = timer.wrap("points", real_ops.sample_points)
    cfg = refine.RefineConfig()  # official: min_area 5000, 5 random points
    per_image, n_prompts = [], []
    try:
        data = [city.render_with_label(prompts[i % len(prompts)], i, size=(size, size)) for i in range(num_images)]
        refine.refine_pseudo_label(data[0][0], blurred_teacher(data[0][1], factor), predictor, cfg,
                                   torch.Generator().manual_seed(0))  # warm-up (extension build / caches)
        timer.total.clear()
        for i, (image, label) in enumerate(data):
            teacher = blurred_teacher(label, factor)
            _, _, area = real_ops.connected_components(torch.from_numpy(teacher))
            n_prompts.append(int((area > cfg.min_area).sum()))
            start = time.perf_counter()
            refine.refine_pseudo_label(image, teacher, predictor, cfg, torch.Generator().manual_seed(i))
            per_image.append(time.perf_counter() - start)
    finally:
        refine.ops = real_ops
    total = sum(per_image)
    parts = {k: timer.total[k] for k in ("components", "points", "predictor")}
    parts["rest"] = total - sum(parts.values())
    return {"images": num_images, "size": size, "teacher_blur_factor": factor,
            "prompts_per_image_median": statistics.median(n_prompts),
            "ms_per_image_median": round(1000 * statistics.median(per_image), 1),
            "images_per_s": round(num_images / total, 2),
            "share": {k: round(v / total, 3) for k, v in parts.items()},
            "ms_per_image": {k: round(1000 * v / num_images, 1) for k, v in parts.items()}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gen-images", type=int, default=50)
    parser.add_argument("--gen-size", type=int, default=192)
    parser.add_argument("--refine-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--blur", type=int, default=16, help="teacher down/up-sampling factor")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = generate.read_prompts(generate.DEFAULT_PROMPTS)
    result = {"threads": torch.get_num_threads(),
              "generation_toy": bench_generation(args.gen_images, args.gen_size),
              "refinement_toy": bench_refinement(args.refine_images, args.size, args.blur, prompts)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
