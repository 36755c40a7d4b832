"""Benchmark: the time to load one source training sample at the real GTA size (issue 15, finding 7).

A GTA sample is a 1914x1052 PNG image and its train-id label; data.TrainTransform rescales it by s ~ U(0.5, 2),
takes a 768x768 crop, jitters and flips it (official ResizeScale -> FixedSizeCrop -> SSD jitter -> flip, §1.7).
Baseline ("before"): the code before issue 15, copied here: decode, label to int64, rescale the WHOLE image and label,
then crop; label uint8 -> int64 -> uint8 -> int64. Ours: data.build_dataset("gta", ...).get(i, rng), which
resizes only the crop's source region (PIL resize with a box) and keeps the label uint8. Both run in this process
on the same files and the same random draws; the outputs are compared pixel by pixel.

Prints per-sample CPU time (process_time, median over the draws), wall time, the ratio, the decode-only floor, how
many samples are identical and the largest difference, the peak RSS and the load average.

Usage:
    python bench/bench_loading.py                 # 24 draws over 4 ToyCity GTA images at 1052x1914
    python bench/bench_loading.py --draws 8 --work /tmp/x
"""
import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402


def before(image_path, label_path, rng, crop=768, scale=(0.5, 2.0), jitter=True):
    """The sample path before issue 15 (SegDataset.get + TrainTransform as they were), for the baseline."""
    image = data.read_image(image_path)
    label = data.read_label(label_path)
    sample = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
              "label": torch.from_numpy(label.astype(np.int64))}
    img = np.ascontiguousarray(sample["image"].permute(1, 2, 0).numpy())
    lbl = sample["label"].numpy().astype(np.uint8)
    s = rng.uniform(*scale)
    size = (max(1, round(lbl.shape[0] * s)), max(1, round(lbl.shape[1] * s)))
    img, lbl = data.resize_image(img, size), data.resize_label(lbl, size)
    c, u = crop, rng.uniform(0.0, 1.0)
    y0, x0 = round(max(size[0] - c, 0) * u), round(max(size[1] - c, 0) * u)
    img, lbl = img[y0:y0 + c, x0:x0 + c], lbl[y0:y0 + c, x0:x0 + c]
    out_img = np.full((c, c, 3), 0, np.uint8)
    out_lbl = np.full((c, c), data.IGNORE_INDEX, np.uint8)
    out_img[:img.shape[0], :img.shape[1]], out_lbl[:lbl.shape[0], :lbl.shape[1]] = img, lbl
    if jitter:
        out_img = data.color_jitter_ssd(out_img, rng)
    if rng.random() < 0.5:
        out_img, out_lbl = out_img[:, ::-1], out_lbl[:, ::-1]
    return {"image": torch.from_numpy(np.ascontiguousarray(out_img.transpose(2, 0, 1))),
            "label": torch.from_numpy(out_lbl.astype(np.int64))}


def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - t0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=24, help="samples timed per path (cycling over the images)")
    parser.add_argument("--work", default="runs/bench_loading", help="ToyCity GTA images are written here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker has 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import real_scale

    datasets, _ = real_scale.write_data(Path(args.work), tiny=False, num_gta=4, num_generated=0)
    ds = data.build_dataset("gta", datasets, transform=data.TrainTransform())
    rows = {"before": [], "ours": [], "decode": []}
    identical, max_diff, diff_share, label_same, resize_diff, resize_share = 0, 0, 0.0, 0, 0, 0.0
    for k in range(args.draws + 1):  # the first round warms the caches up and is not counted
        i = k % len(ds)
        image_path, label_path = ds.items[i]
        old, c_old, t_old = timed(lambda: before(image_path, label_path, np.random.default_rng([7, k])))
        new, c_new, t_new = timed(lambda: ds.get(i, np.random.default_rng([7, k])))
        _, c_dec, t_dec = timed(lambda: (data.read_image(image_path), data.read_label(label_path)))
        if k == 0:
            continue
        for name, c, t in (("before", c_old, t_old), ("ours", c_new, t_new), ("decode", c_dec, t_dec)):
            rows[name].append((c, t))
        rescaled = before(image_path, label_path, np.random.default_rng([7, k]), jitter=False)
        ours = data.TrainTransform(jitter=False)(data.SegDataset("gta", [ds.items[i]]).get(0),
                                                 np.random.default_rng([7, k]))
        resize_diff = max(resize_diff, int((rescaled["image"].int() - ours["image"].int()).abs().max()))
        resize_share = max(resize_share, float((rescaled["image"] != ours["image"]).float().mean()))
        d = (old["image"].int() - new["image"].int()).abs()
        identical += bool(torch.equal(old["image"], new["image"]) and torch.equal(old["label"], new["label"].long()))
        label_same += bool(torch.equal(old["label"], new["label"].long()))
        max_diff, diff_share = max(max_diff, int(d.max())), max(diff_share, float((d > 0).float().mean()))
    med = {n: (1000 * statistics.median(c for c, _ in r), 1000 * statistics.median(t for _, t in r))
           for n, r in rows.items()}
    load = os.getloadavg()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [f"GTA sample 1052x1914 -> 768 crop, {args.draws} draws over {len(ds)} images, {args.threads} torch "
             f"thread(s); load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; peak RSS {rss:.0f} MB",
             "| path | CPU ms / sample (median) | wall ms / sample (median) |", "|---|---:|---:|",
             f"| before: rescale the whole image, then crop | {med['before'][0]:.0f} | {med['before'][1]:.0f} |",
             f"| ours: rescale the crop's region only | {med['ours'][0]:.0f} | {med['ours'][1]:.0f} |",
             f"| decode only (PNG image + label) | {med['decode'][0]:.0f} | {med['decode'][1]:.0f} |",
             f"speed-up (CPU time): {med['before'][0] / med['ours'][0]:.2f}x; identical samples: {identical} of "
             f"{args.draws} (labels: {label_same}); rescaled crops before the jitter differ by at most {resize_diff} "
             f"grey level(s) at up to {100 * resize_share:.2f}% of their values; after the jitter (which amplifies "
             f"them) by at most {max_diff} at up to {100 * diff_share:.3f}%"]
    print("\n".join(lines))
    return {"median_ms": med, "identical": identical, "labels_identical": label_same, "draws": args.draws,
            "max_diff": max_diff, "diff_share": diff_share, "resize_diff": resize_diff, "resize_share": resize_share,
            "loadavg": load}


if __name__ == "__main__":
    main()
