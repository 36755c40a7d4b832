"""Run the CUDA kernels (csrc/*_cuda.cu) under AddressSanitizer or ThreadSanitizer, through the emulation (no GPU).

Usage:
    python csrc/emulation/sanitize.py address           # out-of-bounds / use-after-free accesses (stops at the first)
    python csrc/emulation/sanitize.py thread            # data races between the CUDA threads of a launch
    python csrc/emulation/sanitize.py thread --ops ms_deform_attn --schedules 0,1

It builds ops.load_extension(emulation="address" | "thread") (cached as clouds_ops_emu_asan / _tsan; ~1-2 min the
first time), runs itself again with the sanitizer's runtime preloaded, and calls every CUDA op on small inputs (edge
shapes included) under each schedule (0: in order; others: seeded random interleavings), checking each result against
the CPU op. ThreadSanitizer sees each CUDA thread as a fiber that synchronizes only through atomics (and
__syncthreads), as on a GPU, so any unordered pair of plain accesses to one word, one of them a write, is reported.
Prints the reports and their count; exit 0 when there is none and every result matched, 1 otherwise, 2 on a usage
error.
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPS = ("connected_components", "sample_points", "masks_to_semantic", "ms_deform_attn")
RUNTIME = {"address": "libasan.so", "thread": "libtsan.so"}
OPTIONS = {"address": ("ASAN_OPTIONS", "detect_leaks=0"),  # CPython and torch keep memory until exit
           "thread": ("TSAN_OPTIONS", "halt_on_error=0 report_signal_unsafe=0 ignore_noninstrumented_modules=1")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sanitizer", choices=sorted(RUNTIME), help="AddressSanitizer or ThreadSanitizer")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--schedules", default="0,1,2", help="comma-separated schedule seeds (0: in order)")
    args = parser.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {','.join(OPS)}")
    try:
        args.schedules = [int(s) for s in args.schedules.split(",") if s]
    except ValueError:
        parser.error(f"--schedules must be comma-separated integers, got {args.schedules!r}")
    return args


# ---- the child: the ops under the sanitizer ----


def blobs(shape, classes=3, seed=0, cell=6, ignore=0.05):
    """Smooth random regions of `classes` labels (uint8) with a few ignored (255) pixels, (H, W) or (B, H, W)."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    H, W = shape[-2:]
    B = shape[0] if len(shape) == 3 else 1
    noise = torch.rand(B, classes, H // cell + 2, W // cell + 2, generator=g)
    lab = F.interpolate(noise, size=(H, W), mode="bilinear", align_corners=False).argmax(1).to(torch.uint8)
    lab[torch.rand(lab.shape, generator=g) < ignore] = 255
    return lab.view(shape)


def cases(op):
    """(name, args) pairs of the raw op torch.ops.<namespace>.<op>."""
    import torch
    if op == "connected_components":
        seam = blobs((2, 12, 23), seed=4)
        seam[0, -1] = seam[1, 0] = 1
        for name, lab in (("blobs 37x53", blobs((37, 53), seed=1)), ("noise 24x40", blobs((24, 40), 4, 2, cell=1)),
                          ("batch seam", seam), ("one pixel", torch.tensor([[3]], dtype=torch.uint8)),
                          ("all ignored", torch.full((5, 9), 255, dtype=torch.uint8)),
                          ("int64 21x300", blobs((21, 300), seed=3, cell=30).long())):
            for connectivity in (4, 8):
                yield f"{name}, {connectivity}-conn", (lab, connectivity, 255)
    elif op == "sample_points":
        comp, _, area = torch.ops.clouds.connected_components(blobs((2, 30, 45), seed=5), 4, 255)
        comp[comp == 3] = -1                                                  # a candidate without pixels
        cand = torch.nonzero(area > 8).flatten()
        u = torch.rand(len(cand), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        yield "random, K=5", (comp, cand, u, len(area), 5, False)
        yield "interior, K=5", (comp, cand, u[:, :4].contiguous(), len(area), 5, True)
        yield "one pixel, interior", (torch.zeros((1, 1), dtype=torch.int32), torch.tensor([0]),
                                      torch.rand(1, 0, dtype=torch.float64), 1, 1, True)
    elif op == "masks_to_semantic":
        g = torch.Generator().manual_seed(0)
        prob = torch.rand(2, 10, 5, generator=g).softmax(-1)
        masks = torch.randn(2, 10, 7, 9, generator=g) * 4
        yield "scores", (prob, masks, 31, 45, True)
        yield "labels", (prob, masks, 31, 45, False)
    else:
        g = torch.Generator().manual_seed(0)
        shapes = [(7, 5), (3, 4), (1, 2)]
        for dtype in (torch.float32, torch.float64):
            value = torch.randn(2, sum(h * w for h, w in shapes), 3, 5, generator=g, dtype=dtype)
            loc = torch.rand(2, 13, 3, 3, 2, 2, generator=g, dtype=dtype) * 1.4 - 0.2
            weights = torch.rand(2, 13, 3, 3, 2, generator=g, dtype=dtype)
            grad = torch.randn(2, 13, 15, generator=g, dtype=dtype)
            flat = [n for hw in shapes for n in hw]
            yield f"forward {dtype}", ("ms_deform_attn", value, flat, loc, weights)
            yield f"backward {dtype}", ("ms_deform_attn_backward", grad, value, flat, loc, weights)
            yield f"backward {dtype}, nP = 0", ("ms_deform_attn_backward", grad, value, flat,
                                                loc[..., :0, :].contiguous(), weights[..., :0].contiguous())


def same(a, b):
    import torch
    if isinstance(a, (tuple, list)):
        return all(same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and (torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, atol=1e-5)))


def child(args):
    os.environ.pop("LD_PRELOAD", None)  # the compilers a build starts must not run under the sanitizer
    sys.path.insert(0, str(ROOT))
    import torch

    import ops
    ops.load_extension()
    ops.load_extension(emulation=args.sanitizer)
    cpu, emu = torch.ops.clouds, torch.ops.clouds_emu
    mismatches = runs = 0
    for op in args.ops:
        for name, call in cases(op):
            fn, call = (call[0], call[1:]) if isinstance(call[0], str) else (op, call)
            want = getattr(cpu, fn)(*call)
            for seed in args.schedules:
                emu.set_schedule(seed, 8)
                print(f"[sanitize] {fn} ({name}), schedule {seed}", flush=True)
                runs += 1
                if not same(getattr(emu, fn)(*call), want):
                    mismatches += 1
                    print(f"[sanitize] MISMATCH with the CPU op: {fn} ({name}), schedule {seed}", flush=True)
    print(f"[sanitize] {runs} runs, {mismatches} mismatches", flush=True)
    return 1 if mismatches else 0


# ---- the parent: build, run the child with the runtime preloaded, count the reports ----


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("CLOUDS_SANITIZE_CHILD"):
        return child(args)
    cxx = os.environ.get("CXX", "c++")
    runtime = subprocess.run([cxx, f"-print-file-name={RUNTIME[args.sanitizer]}"], capture_output=True,
                             text=True).stdout.strip()
    if not os.path.isabs(runtime) or not os.path.exists(runtime):
        print(f"sanitize.py: {cxx} has no {RUNTIME[args.sanitizer]} (found {runtime!r}); install the compiler's "
              f"sanitizer runtime (Debian: libgcc-12-dev ships both) or set CXX", file=sys.stderr)
        return 2
    var, options = OPTIONS[args.sanitizer]
    env = dict(os.environ, CLOUDS_SANITIZE_CHILD="1", LD_PRELOAD=runtime, OMP_NUM_THREADS="1",
               **{var: f"{options} {os.environ.get(var, '')}".strip()})
    proc = subprocess.Popen([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    output = []
    for line in proc.stdout:
        sys.stdout.write(line)
        output.append(line)
    proc.wait()
    text = "".join(output)
    name = {"address": "AddressSanitizer", "thread": "ThreadSanitizer"}[args.sanitizer]
    reports = re.findall(rf"^SUMMARY: {name}: (.*)$", text, re.M)  # one line per report
    finished = re.search(r"^\[sanitize\] (\d+) runs, (\d+) mismatches", text, re.M)
    print(f"\nsanitize.py: {name}: {len(reports)} report(s)" + (f" (first: {reports[0]})" if reports else "") + "; "
          + (f"{finished.group(1)} runs, {finished.group(2)} mismatches with the CPU ops" if finished
             else f"the run stopped early (exit code {proc.returncode})"))
    return 0 if not reports and finished and finished.group(2) == "0" and proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
