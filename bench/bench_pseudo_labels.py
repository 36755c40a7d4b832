"""Issue 18: does SAM refinement (Sec. 3.3) improve pseudo labels, measured against ToyCity's hidden truth, and is
the toy SAM (toyworld/sam.py, `--sam toy`) a fair stand-in for it?

No trained teacher is needed: the teacher labels are the truth corrupted at three levels (blurred boundaries by a
mode filter, ragged boundaries by a random per-pixel shift, discs relabelled to a wrong class). Each is refined with
the official rules (refine.refine_pseudo_label, min_area 5000 px scaled to the image area) and the toy SAM, and both
are scored with refine.label_confusion / label_quality against generate.py's truth/ files. A fourth row refines the
truth itself (what refinement keeps of a perfect teacher).

The toy SAM's own quality: every true segment above min_area is prompted with 5 random points inside it (an oracle
prompt) and the best-scored mask is compared with the segment: mean IoU, and the share of masks that are pixel-exact
copies of the segment (a fair SAM stand-in is class-agnostic and has imperfect boundaries: not 100% exact).

Usage:
    python bench/bench_pseudo_labels.py                              # 40 ToyCity images in a temp folder
    python bench/bench_pseudo_labels.py --gen /tmp/gen --num-images 40   # a generate.py --backend toy folder
"""
import argparse
import ast
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import generate  # noqa: E402
import ops  # noqa: E402
import refine  # noqa: E402

C = data.NUM_CLASSES
# (name, mode-filter window, boundary shift radius, relabelled discs, disc radius)
LEVELS = (("mild", 5, 1, 10, 5), ("medium", 9, 2, 25, 7), ("strong", 13, 3, 40, 10))


# ---- synthetic teachers ----

def mode_filter(label: np.ndarray, k: int) -> np.ndarray:
    """The most frequent class in a k x k window (ignore pixels do not vote): rounded boundaries, thin things gone.
    A teacher argmax names a class everywhere, so the result holds no 255 (a window of ignore only -> class 0)."""
    x = torch.from_numpy(label.astype(np.int64)).clamp(max=C)                  # 255 -> C, a channel dropped below
    onehot = F.one_hot(x, C + 1)[..., :C].permute(2, 0, 1)[None].float()       # (1, C, H, W)
    votes = F.avg_pool2d(onehot, k, stride=1, padding=k // 2, count_include_pad=False)
    return votes[0].argmax(0).numpy()


def shift_boundaries(label: np.ndarray, rng: np.random.Generator, radius: int) -> np.ndarray:
    """Every pixel copies the label of a random pixel at most `radius` away (per axis): ragged boundaries."""
    h, w = label.shape
    yy = np.clip(np.arange(h)[:, None] + rng.integers(-radius, radius + 1, (h, w)), 0, h - 1)
    xx = np.clip(np.arange(w)[None, :] + rng.integers(-radius, radius + 1, (h, w)), 0, w - 1)
    return label[yy, xx]


def relabel_discs(label: np.ndarray, rng: np.random.Generator, n: int, radius: int) -> np.ndarray:
    """n discs (radius radius/2..radius) given one class absent from the disc: confident wrong blobs."""
    out, (h, w) = label.copy(), label.shape
    yy, xx = np.mgrid[:h, :w]
    for _ in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(radius // 2, radius + 1)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        out[disc] = rng.choice(np.setdiff1d(np.arange(C), out[disc]))
    return out


def teacher_label(truth: np.ndarray, level, seed: int) -> np.ndarray:
    _, k, shift, n, radius = level
    rng = np.random.default_rng(seed)
    return relabel_discs(shift_boundaries(mode_filter(truth, k), rng, shift), rng, n, radius)


# ---- toy SAM checks ----

class OncePerImage:
    """A point predictor that runs set_image only when the image changes (the levels refine the same image)."""

    def __init__(self, predictor):
        self.predictor, self.key = predictor, None

    def set_image(self, image):
        key = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
        if key != self.key:
            self.predictor.set_image(image)
            self.key = key

    def predict_points(self, points, multimask: bool = True):
        return self.predictor.predict_points(points, multimask)


def module_imports(path: Path) -> set:
    """Top-level modules a source file imports (class-agnostic check: the toy SAM must not see the renderer)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def oracle_prompts(image, truth: torch.Tensor, predictor, cfg, generator) -> list:
    """IoU of the toy SAM's best mask with each true segment (per-class 4-connected component > min_area) prompted by
    cfg.num_points random points inside it."""
    comps, _, area = ops.connected_components(truth, connectivity=4, ignore_index=data.IGNORE_INDEX)
    points, ids = ops.sample_points(comps, area, num_points=cfg.num_points, min_area=cfg.min_area, mode="random",
                                    generator=generator)
    if len(ids) == 0:
        return []
    predictor.set_image(image)
    masks, scores = predictor.predict_points(points, multimask=True)           # (P, M, H, W), (P, M)
    best = masks[torch.arange(len(ids)), scores.argmax(1)]                      # (P, H, W)
    segment = comps[None] == ids.long().to(comps.device)[:, None, None]        # (P, H, W)
    inter, union = (best & segment).flatten(1).sum(1), (best | segment).flatten(1).sum(1)
    return (inter.double() / union.double()).tolist()


# ---- the table ----

def run(gen_dir, num_images: int, predictor=None, seed: int = 0, budget_s: float = float("inf")) -> dict:
    """Score teacher and refined labels of the first num_images images of gen_dir (fewer when budget_s seconds have
    passed: the runtime stays bounded on a busy machine) -> {"images", "quality": {row: {...}}, "oracle_iou"}."""
    t0 = time.perf_counter()
    ds = data.build_dataset("generated", gen_dir, transform=data.GeneratedTransform(jitter=False))
    n = min(num_images, len(ds))
    if n == 0 or "truth" not in ds.get(0):
        raise SystemExit(f"{gen_dir} holds no generated images with truth/ labels; make them with "
                         f"`python generate.py --backend toy --out {gen_dir} --num-images {num_images}`")
    predictor = OncePerImage(predictor or refine.build_predictor("toy"))
    rows = {name: {"teacher": 0, "refined": 0, "teacher_on_kept": 0} for name in ["truth", *(lv[0] for lv in LEVELS)]}
    oracle, done = [], 0
    for i in range(n):
        if time.perf_counter() - t0 > budget_s:
            break
        s = ds.get(i, np.random.default_rng(seed + i))       # the clean (flipped) image the teacher and SAM see
        image, truth = s["image"].permute(1, 2, 0).numpy(), s["truth"].long()
        h, w = truth.shape
        cfg = refine.RefineConfig(min_area=round(5000 * h * w / 768 ** 2))   # official 5000 px at 768x768
        oracle += oracle_prompts(image, truth, predictor, cfg, torch.Generator().manual_seed(seed + i))
        for name in rows:
            level = next((lv for lv in LEVELS if lv[0] == name), None)
            teacher = truth if level is None else torch.from_numpy(teacher_label(truth.numpy(), level, seed + i))
            classes, masks = refine.refine_pseudo_label(image, teacher, predictor, cfg,
                                                        torch.Generator().manual_seed(seed + i))
            refined = refine.label_map(classes, masks)
            kept = torch.where(refined != data.IGNORE_INDEX, teacher, data.IGNORE_INDEX)
            for key, label in (("teacher", teacher), ("refined", refined), ("teacher_on_kept", kept)):
                rows[name][key] = rows[name][key] + refine.label_confusion(label, truth)
        done += 1
    quality = {name: {k: refine.label_quality(conf) for k, conf in row.items()} for name, row in rows.items()}
    return {"images": done, "quality": quality, "oracle_iou": oracle}


def format_table(result: dict) -> str:
    pct = lambda v: f"{100 * v:5.1f}"  # noqa: E731
    lines = [f"pseudo labels vs ToyCity truth, {result['images']} images (mIoU: dropped pixels are misses; acc and "
             f"mIoU_kept over the labelled pixels; teacher@kept: the teacher on the pixels the refinement kept)",
             "| teacher | teacher mIoU | teacher acc | refined mIoU | refined mIoU_kept | refined acc "
             "| refined dropped | teacher@kept mIoU_kept | teacher@kept acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, q in result["quality"].items():
        t, r, k = q["teacher"], q["refined"], q["teacher_on_kept"]
        lines.append(f"| {name} | {pct(t['mIoU'])} | {pct(t['acc'])} | {pct(r['mIoU'])} | {pct(r['mIoU_kept'])} | "
                     f"{pct(r['acc'])} | {pct(r['dropped'])} | {pct(k['mIoU_kept'])} | {pct(k['acc'])} |")
    iou = np.array(result["oracle_iou"])
    if iou.size:
        lines.append(f"toy SAM, oracle prompts ({iou.size} true segments > min_area, 5 points each): mean IoU "
                     f"{100 * iou.mean():.1f}, median {100 * np.median(iou):.1f}, pixel-exact "
                     f"{100 * (iou == 1).mean():.1f}%, >= 0.95: {100 * (iou >= 0.95).mean():.1f}%, "
                     f"< 0.5: {100 * (iou < 0.5).mean():.1f}%")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gen", default=None, help="generate.py --backend toy folder (None: 40 images in a temp dir)")
    parser.add_argument("--num-images", type=int, default=40, help="images scored (the first ones of --gen)")
    parser.add_argument("--seed", type=int, default=0, help="flip, corruption and point seed of image i: seed + i")
    parser.add_argument("--budget-s", type=float, default=90.0, help="stop scoring new images after this many "
                        "seconds (the table says how many were scored; ~2 s per image on one free core)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    imports = module_imports(Path(__file__).resolve().parents[1] / "toyworld" / "sam.py")
    print(f"toy SAM imports {sorted(imports)} (class-agnostic: no toyworld renderer, no labels; it sees the image "
          f"and the points only)")
    with tempfile.TemporaryDirectory(prefix="bench_pseudo_labels_") as tmp:
        gen = args.gen or tmp
        if args.gen is None:
            generate.main(["--out", tmp, "--backend", "toy", "--num-images", str(args.num_images), "--no-progress"])
        result = run(gen, args.num_images, seed=args.seed, budget_s=args.budget_s)
    print(format_table(result))
    print(f"{time.perf_counter() - t0:.0f} s")
    return result


if __name__ == "__main__":
    main()
