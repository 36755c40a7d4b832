"""Speed and memory of clouds.py on this machine (CPU unless CUDA is available).

Cases (each in a fresh subprocess, so peak RSS belongs to that case alone):
  tiny_frozen / tiny_trainable: `tiny` preset, batch 2, 256x256: no_grad forward, and one full train step
      (forward + loss + backward + AdamW step), train_backbone False / True;
  convnext_large_768: `convnext_large` with random weights (pretrained=None), one 768x768 image, no_grad forward;
  head_768: the `convnext_large` head alone (sem_seg_head, random init) on random backbone features of a 768x768 crop
      (res2..res5: 192/384/768/1536 channels at strides 4/8/16/32), batch 2: no_grad forward and forward + backward
      (to the head parameters and the input features), with the reference MSDeformAttn (ops.ms_deform_attn_ref,
      CLOUDS_OPS_IMPL=ref) and with the fused op, on the same inputs; the ratio, the max abs difference of the
      outputs and of the feature gradients, and each path's peak RSS.
Usage: python bench/bench_model.py [--repeats 5] [--threads N] [--skip-large] [--only head_768]
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

CASES = ("tiny_frozen", "tiny_trainable", "convnext_large_768", "head_768")


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


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0), so peak_mb() measures what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def head_loss(out):
    """A scalar of every prediction (final and auxiliary), so the backward reaches all of the head."""
    preds = [out] + out["aux_outputs"]
    return sum(p["pred_logits"].square().mean() + p["pred_masks"].square().mean() for p in preds)


def pixel_decoder_outputs(head, feats):
    """The pixel decoder's outputs (mask features, 3 encoder levels) and the feature gradients of their mean square.

    No threshold sits between the features and these outputs (the transformer decoder's masked attention thresholds
    sigmoid(mask) at 0.5, which turns 1e-7 differences into flipped attention entries), so they show the op's error.
    """
    inputs = {k: v.clone().requires_grad_() for k, v in feats.items()}
    mask_features, outs = head.pixel_decoder(inputs)
    sum(t.square().mean() for t in [mask_features] + outs).backward()
    return [mask_features.detach()] + [t.detach() for t in outs], [inputs[k].grad for k in sorted(inputs)]


def run_head(repeats, batch=2, crop=768):
    import torch

    import clouds
    import ops

    torch.manual_seed(0)
    head = clouds.CLOUDSHead(clouds.ModelConfig(pretrained=None), [192, 384, 768, 1536])  # convnext_large head
    head.train()
    g = torch.Generator().manual_seed(1)
    feats = {f"res{i + 2}": torch.randn(batch, c, crop // s, crop // s, generator=g)
             for i, (c, s) in enumerate(zip((192, 384, 768, 1536), (4, 8, 16, 32)))}
    ops.load_extension()
    res = {"case": "head_768", "threads": torch.get_num_threads(), "batch": batch, "crop": crop}
    results, decoder = {}, {}
    for path in ("ref", "ext"):
        os.environ["CLOUDS_OPS_IMPL"] = path                        # what impl="auto" runs (ops._use_ext)
        inputs = {k: v.clone().requires_grad_() for k, v in feats.items()}

        def forward():
            with torch.no_grad():
                head(inputs)

        def train_step():
            head.zero_grad(set_to_none=True)
            for v in inputs.values():
                v.grad = None
            head_loss(head(inputs)).backward()

        reset_peak()
        res[f"{path}_forward_s"], res[f"{path}_forward_min_s"] = timed(forward, repeats)
        res[f"{path}_fwd_bwd_s"], res[f"{path}_fwd_bwd_min_s"] = timed(train_step, repeats)
        res[f"{path}_peak_rss_mb"] = round(peak_mb())
        with torch.no_grad():
            out = head(inputs)
        results[path] = (out["pred_logits"], out["pred_masks"], [inputs[k].grad.clone() for k in sorted(inputs)],
                         [p.grad.clone() for p in head.parameters()])
        decoder[path] = pixel_decoder_outputs(head, feats)
    (do_r, dg_r), (do_e, dg_e) = decoder["ref"], decoder["ext"]
    res["pixel_decoder_max_abs_diff_outputs"] = max((a - b).abs().max().item() for a, b in zip(do_r, do_e))
    res["pixel_decoder_max_abs_output"] = max(a.abs().max().item() for a in do_r)
    res["pixel_decoder_max_abs_diff_feature_grads"] = max((a - b).abs().max().item() for a, b in zip(dg_r, dg_e))
    res["pixel_decoder_max_abs_feature_grad"] = max(a.abs().max().item() for a in dg_r)
    (lr, mr, gr, pr), (le, me, ge, pe) = results["ref"], results["ext"]
    res["max_abs_diff_logits"] = (lr - le).abs().max().item()
    res["max_abs_diff_masks"] = (mr - me).abs().max().item()
    res["max_abs_diff_feature_grads"] = max((a - b).abs().max().item() for a, b in zip(gr, ge))
    res["max_abs_feature_grad"] = max(a.abs().max().item() for a in gr)
    res["max_abs_diff_param_grads"] = max((a - b).abs().max().item() for a, b in zip(pr, pe))
    res["forward_speedup"] = res["ref_forward_s"] / res["ext_forward_s"]
    res["fwd_bwd_speedup"] = res["ref_fwd_bwd_s"] / res["ext_fwd_bwd_s"]
    return res


def run_case(name, repeats):
    import torch

    import clouds
    import criterion

    if name == "head_768":
        return run_head(repeats)

    torch.manual_seed(0)
    if name.startswith("tiny"):
        model = clouds.build_model("tiny", train_backbone=name == "tiny_trainable")
        images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
        labels = torch.randint(0, 19, (2, 256, 256))
        targets = [criterion.targets_from_label(lab) for lab in labels]
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
    parser.add_argument("--only", choices=CASES, action="append", help="run only these cases (repeatable)")
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
        if (args.skip_large and case in ("convnext_large_768", "head_768")) or (args.only and case not in args.only):
            continue
        out = subprocess.run([sys.executable, __file__, "--case", case, "--repeats", str(args.repeats), "--threads",
                              str(args.threads)],
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(res)
        if case == "head_768":
            for path, what in (("ref", "reference MSDeformAttn (grid_sample)"), ("ext", "fused MSDeformAttn")):
                print(f"{case:20s} {what:38s} forward {res[path + '_forward_s']:.3f} s (min "
                      f"{res[path + '_forward_min_s']:.3f})  forward+backward {res[path + '_fwd_bwd_s']:.3f} s (min "
                      f"{res[path + '_fwd_bwd_min_s']:.3f})  peak RSS {res[path + '_peak_rss_mb']} MB")
            print(f"{case:20s} speed-up forward {res['forward_speedup']:.2f}x, forward+backward "
                  f"{res['fwd_bwd_speedup']:.2f}x; max abs diff: logits {res['max_abs_diff_logits']:.2e}, masks "
                  f"{res['max_abs_diff_masks']:.2e}, feature grads {res['max_abs_diff_feature_grads']:.2e} (max "
                  f"|grad| {res['max_abs_feature_grad']:.2e}), parameter grads {res['max_abs_diff_param_grads']:.2e}"
                  f"  ({res['threads']} threads, batch {res['batch']}, {res['crop']}x{res['crop']})")
            print(f"{case:20s} pixel decoder alone (no mask threshold): max abs diff outputs "
                  f"{res['pixel_decoder_max_abs_diff_outputs']:.2e} (max |out| {res['pixel_decoder_max_abs_output']:.2f}),"
                  f" feature grads {res['pixel_decoder_max_abs_diff_feature_grads']:.2e} (max |grad| "
                  f"{res['pixel_decoder_max_abs_feature_grad']:.2e})")
            continue
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
