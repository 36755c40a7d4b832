"""Fast ops for CLOUDS: connected components and point prompts (Sec. 3.3, reference §5.2), Mask2Former semantic
inference (reference §3.4) and multi-scale deformable attention (Sec. 3.1, forward and backward), as a C++/CUDA
extension with a pure-PyTorch reference for each op.

Each public op takes impl="auto"|"ext"|"ref". "ext" runs csrc/ (compiled on first use with
torch.utils.cpp_extension + ninja, cached under TORCH_EXTENSIONS_DIR); "ref" runs the `*_ref` function, which is the
op's specification; "auto" uses the extension and falls back to the reference, with one warning, if it cannot be
built. The environment variable CLOUDS_OPS_IMPL=ref (or ext) decides what "auto" means.

Usage:
    import ops
    components, comp_class, comp_area = ops.connected_components(label)          # label (H, W) train ids
    points, comp_ids = ops.sample_points(components, comp_area, generator=0)      # (P, 5, 2) xy, (P,)
    labels = ops.masks_to_semantic(pred_logits, pred_masks, (H, W))               # (B, H, W)
    out = ops.ms_deform_attn(value, shapes, locations, weights)                   # (B, Lq, nH*Dh), differentiable
    python ops.py [--cuda]          # build the extension and check it against the references
"""
import argparse
import contextlib
import os
import re
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CSRC = Path(__file__).resolve().parent / "csrc"
IMPLS = ("auto", "ext", "ref")
MODES = ("random", "interior")


# ---- config ----


@dataclass
class OpsConfig:
    """Defaults of the prompt pipeline (reference §5.2) and of the self-check in main()."""
    connectivity: int = field(default=4, metadata={  # official: scipy.ndimage.label's default (4-connectivity)
        "help": "pixel connectivity of the components", "choices": (4, 8)})
    ignore_index: int = field(default=255, metadata={"help": "label in no component"})  # official IGNORE_VALUE
    num_points: int = field(default=5, metadata={"help": "point prompts per component"})  # official SAM.NUM_POINTS
    min_area: int = field(default=5000, metadata={  # official SAM.SIZE_THRESHOLD (kept when area > min_area)
        "help": "components with more pixels than this get points (the self-check uses min_area / 100)"})
    mode: str = field(default="random", metadata={"help": "point selection", "choices": MODES})  # SAM.SELECTION_MODE
    size: int = field(default=256, metadata={"help": "self-check map size (not official)"})
    cuda: bool = field(default=False, metadata={"help": "build the CUDA sources too (not official)"})

    def __post_init__(self):
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


# ---- extension loader (stylegan3 get_plugin style: compile on first use, never at import) ----

_loaded = {}          # with_cuda -> path of the loaded library
_emulated = {}        # emulation build (True, "address", "thread") -> path of the loaded library
_auto_error = None    # why "auto" fell back to the references (warned once)


def load_extension(with_cuda=None, verbose=False, emulation=False):
    """Build (first call; cached on disk afterwards) and load csrc/ as torch.ops.clouds.*; returns the library path.

    with_cuda=None returns the build already loaded, else adds the .cu sources when torch.cuda.is_available(); True
    forces them (they compile without a GPU with a CUDA torch; CUDA_HOME defaults to /usr/local/cuda and
    TORCH_CUDA_ARCH_LIST to 9.0 when no GPU is visible). TORCH_LIBRARY registers the namespace once per process, so
    one process loads one build (names clouds_ops_cpu / clouds_ops_cuda).

    emulation=True loads the CUDA emulation instead (no GPU or CUDA toolkit needed; Linux, GCC or Clang; see
    _load_emulation): the .cu kernels as host C++, each CUDA thread a fiber, and the CUDA wrappers of csrc/<op>.cpp
    on CPU tensors as torch.ops.clouds_emu.<op>, beside either normal build in the same process (build clouds_ops_emu).
    emulation="address" or "thread" builds it with AddressSanitizer or ThreadSanitizer (csrc/emulation/sanitize.py).
    """
    if emulation:
        return _load_emulation(emulation, verbose)
    if with_cuda is None and _loaded:
        return next(iter(_loaded.values()))
    with_cuda = torch.cuda.is_available() if with_cuda is None else bool(with_cuda)
    if with_cuda in _loaded:
        return _loaded[with_cuda]
    if _loaded:
        raise RuntimeError(f"the {'CUDA' if not with_cuda else 'CPU-only'} build of the clouds ops is already loaded "
                           "in this process and TORCH_LIBRARY(clouds) can be registered only once; load the other "
                           "build in a fresh process")
    # <op>.cpp: CPU kernel (+ CUDA wrappers under WITH_CUDA); <op>_cuda.cu: raw CUDA kernels (no torch headers)
    sources = sorted(CSRC.glob("*.cpp")) + (sorted(CSRC.glob("*.cu")) if with_cuda else [])
    if with_cuda:
        if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"   # else torch derives /usr/local from an nvcc wrapper
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # no GPU to read the architecture from
    from torch.utils import cpp_extension
    if with_cuda and os.environ.get("CUDA_HOME") and cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # it read the environment when first imported
    name = "clouds_ops_cuda" if with_cuda else "clouds_ops_cpu"
    _status(f"Setting up clouds ops ({name}, first build ~{'2 min' if with_cuda else '30 s'})... ", end="")
    t0 = time.time()
    try:
        path = cpp_extension.load(name=name, sources=[str(s) for s in sources],
                                  extra_cflags=["-O3", "-fopenmp"] + (["-DWITH_CUDA"] if with_cuda else []),
                                  extra_cuda_cflags=["-O3"], extra_ldflags=["-fopenmp"], with_cuda=with_cuda,
                                  is_python_module=False, verbose=verbose)
    except BaseException:
        _status("Failed!")
        raise
    _status(f"Done ({time.time() - t0:.1f} s).")
    _register_fakes()
    _loaded[with_cuda] = Path(path)
    return _loaded[with_cuda]


def _load_emulation(emulation=True, verbose=False):
    """Build (first call) and load the CUDA emulation of csrc/ (csrc/emulation/); returns the library path.

    Sources: csrc/*.cpp, csrc/*.cu (compiled as C++ against the stand-in headers in csrc/emulation/, which come first on
    the include path) and csrc/emulation/*.cpp (the fiber scheduler), with -DWITH_CUDA -DCLOUDS_EMULATION. Ops:
    torch.ops.clouds_emu.<op> (the CUDA code path on CPU tensors), set_schedule(seed, resident_blocks=8) (seed 0: the
    threads of each block in order; else a seeded random interleaving) and schedule_stats(). Cached as clouds_ops_emu,
    clouds_ops_emu_asan (emulation="address") or clouds_ops_emu_tsan ("thread"); a sanitizer build needs its runtime
    preloaded (LD_PRELOAD), which csrc/emulation/sanitize.py arranges. One emulation build per process.
    """
    suffix = {True: "", "address": "_asan", "thread": "_tsan"}
    if emulation not in suffix:
        raise ValueError(f"emulation must be True, 'address' or 'thread', got {emulation!r}")
    if emulation in _emulated:
        return _emulated[emulation]
    if _emulated:
        raise RuntimeError(f"the {next(iter(_emulated))!r} emulation build is already loaded in this process and "
                           "TORCH_LIBRARY(clouds_emu) can be registered only once; load another one in a fresh process")
    name = "clouds_ops_emu" + suffix[emulation]
    sanitize = [] if emulation is True else [f"-fsanitize={emulation}", "-fno-omit-frame-pointer", "-g"]
    sources = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.cu")) + sorted((CSRC / "emulation").glob("*.cpp"))
    from torch.utils import cpp_extension
    print(f"Setting up the CUDA emulation ({name}, first build ~1 min)... ", end="", flush=True)
    t0 = time.time()
    try:
        path = cpp_extension.load(
            name=name, sources=[str(s) for s in sources], extra_include_paths=[str(CSRC / "emulation")],
            extra_cflags=["-x", "c++", "-O1" if sanitize else "-O2", "-ffp-contract=off", "-DWITH_CUDA",
                          "-DCLOUDS_EMULATION"] + sanitize,  # -x c++: the .cu files are C++ here
            extra_ldflags=sanitize, with_cuda=False, is_python_module=False, verbose=verbose)
    except BaseException:
        print("Failed!", flush=True)
        raise
    print(f"Done ({time.time() - t0:.1f} s).", flush=True)
    _emulated[emulation] = Path(path)
    return _emulated[emulation]


def _register_fakes():
    """Shape-only (meta) kernels so torch.compile / opcheck can trace the ops."""
    @torch.library.register_fake("clouds::connected_components")
    def _(labels, connectivity, ignore_index):
        n = torch.library.get_ctx().new_dynamic_size()
        return (labels.new_empty(labels.shape, dtype=torch.int32), labels.new_empty((n,), dtype=torch.int64),
                labels.new_empty((n,), dtype=torch.int64))

    @torch.library.register_fake("clouds::sample_points")
    def _(components, candidates, uniforms, num_components, num_points, interior):
        return candidates.new_empty((candidates.shape[0], num_points), dtype=torch.int64)

    @torch.library.register_fake("clouds::masks_to_semantic")
    def _(class_prob, mask_logits, height, width, return_scores):
        B, C = class_prob.shape[0], class_prob.shape[2]
        if return_scores:
            return mask_logits.new_empty((B, C, height, width), dtype=torch.float32)
        return mask_logits.new_empty((B, height, width), dtype=torch.int64)

    @torch.library.register_fake("clouds::ms_deform_attn")
    def _(value, shapes, locations, weights):
        return value.new_empty((value.shape[0], locations.shape[1], value.shape[2] * value.shape[3]))

    @torch.library.register_fake("clouds::ms_deform_attn_backward")
    def _(grad_output, value, shapes, locations, weights):
        return torch.empty_like(value), torch.empty_like(locations), torch.empty_like(weights)


def _use_ext(impl):
    """True to run the extension, False for the reference (see the module docstring)."""
    global _auto_error
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("CLOUDS_OPS_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"CLOUDS_OPS_IMPL must be one of {IMPLS}, got {impl!r}")
    if impl == "ref":
        return False
    if impl == "ext":
        load_extension()
        return True
    if _auto_error is not None:
        return False
    try:
        load_extension()
        return True
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:  # the build, not a kernel
        _auto_error = e
        if _main_rank():
            warnings.warn(f"clouds ops: the C++/CUDA extension could not be built ({type(e).__name__}: "
                          f"{first_error(e)}); using the pure-PyTorch references (slower). Set CLOUDS_OPS_IMPL=ext "
                          f"to see the full error.", stacklevel=3)
        return False


# ---- CPU threads (issue 18) ----

THREADS_ENV = "CLOUDS_CPU_THREADS"


@contextlib.contextmanager
def cpu_threads(threads: int = 0):
    """Run the block with `threads` intra-op threads (torch.set_num_threads: the OpenMP team of ATen ops, MKL, oneDNN
    and the csrc/ kernels), then restore the previous count. Yields the count in effect.

    0 keeps torch's default (one thread per core). Small tensors (the toy recipe: 1) gain little from a second thread
    and lose much when other jobs share the cores: every op is an OpenMP fork/join, and when the scheduler has
    descheduled one thread of the team, the others spin in libgomp's barrier until it runs again (a toy warmup beside
    other jobs spent 80% of its CPU time there, 8.3 s per iteration against 0.32 s quiet; BENCHMARKS.md "Load").
    The environment variable CLOUDS_CPU_THREADS overrides `threads`: a count, or "default" (torch's own setting,
    as before issue 18; bench/bench_load.py measures both)."""
    env = os.environ.get(THREADS_ENV, "")
    if env:
        if env != "default" and not env.isdigit():
            raise ValueError(f"{THREADS_ENV} must be a thread count or 'default', got {env!r}")
        threads = 0 if env == "default" else int(env)
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = torch's default), got {threads}")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if threads:
            torch.set_num_threads(before)


# ---- which implementation runs, and why (train.py's preflight and log.txt) ----

OPS = ("connected_components", "sample_points", "masks_to_semantic", "ms_deform_attn")


def _main_rank() -> bool:
    """False in torchrun's ranks 1..N-1: build messages and warnings print once per job, not once per rank."""
    return os.environ.get("RANK", "0") == "0"


def _status(msg, end="\n"):
    if _main_rank():
        print(msg, end=end, flush=True)


def first_error(err) -> str:
    """The line of a failed build's output to read first (the compiler's first error), from a cpp_extension error
    (its message holds ninja's output) or any text; the last line when no line says error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    patterns = (r":\d+(:\d+)?: (fatal )?error", r"\(\d+\): (catastrophic )?error", r"\bfatal\b",
                r"\berror\b(?!s? generated)", r"not found|No such file|mismatch")
    commands = re.compile(r"^(\[\d+/\d+\] )?\S*(c\+\+|g\+\+|gcc|clang\+?\+?|nvcc|ninja|ld) .* -[co] ")
    for pattern in patterns:
        hit = next((ln for ln in lines if re.search(pattern, ln, re.I) and not commands.match(ln)), None)
        if hit:
            return hit[:400]
    return lines[-1][:400] if lines else ""


def build_problem(with_cuda=None):
    """None when csrc/ builds (or is built) and loads (it stays loaded), else the compiler's first error."""
    try:
        load_extension(with_cuda)
        return None
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
        return first_error(e)


def cuda_home():
    """The CUDA toolkit load_extension compiles with: $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda, else the one
    torch finds from nvcc on PATH (None: none)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if os.path.isdir("/usr/local/cuda"):
        return "/usr/local/cuda"
    from torch.utils import cpp_extension
    return cpp_extension.CUDA_HOME


def nvcc_problem():
    """None when nvcc is there and its CUDA major version is torch's (torch.version.cuda), else what is wrong and
    how to fix it. torch refuses to build an extension across CUDA major versions (a cluster's CUDA 12 module with
    the cu130 torch of requirements.txt)."""
    home, want = cuda_home(), (torch.version.cuda or "")
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    fix = (f"load a CUDA {want} toolkit (e.g. `module load cuda/{want}`) or set CUDA_HOME to one, or install the torch "
           f"build of your toolkit (README: Clusters with an older NVIDIA driver)")
    if not nvcc or not os.path.isfile(nvcc):
        return f"nvcc not found (CUDA_HOME {home or 'unset'}): csrc/ cannot build for CUDA; {fix}"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{nvcc} --version failed ({e}); {fix}"
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found and want and found.group(1) != want.split(".")[0]:
        return (f"nvcc {nvcc} is CUDA {found.group(1)}.{found.group(2)} but torch {torch.__version__} was built "
                f"with CUDA {want}: the major versions must match to build csrc/; {fix}")
    return None


def fallback(reason: str):
    """Make impl="auto" use the pure-PyTorch references from now on, without trying to build (train.py
    --allow-ops-fallback after a failed build)."""
    global _auto_error
    _auto_error = RuntimeError(reason)


def resolved_impls() -> dict:
    """{op: what impl="auto" runs in this process, and why}: the extension (built now if needed) or the reference."""
    if _use_ext("auto"):
        how = f"extension {load_extension().name}"
    elif os.environ.get("CLOUDS_OPS_IMPL", "auto") == "ref":
        how = "pure-PyTorch reference (CLOUDS_OPS_IMPL=ref)"
    else:
        how = f"pure-PyTorch reference (the extension did not build: {first_error(_auto_error)})"
    return {op: how + (" for float32/float64" if op == "ms_deform_attn" and "extension" in how else "")
            for op in OPS}


# ---- connected components (reference §5.2.1) ----


def connected_components(labels, connectivity=4, ignore_index=255, impl="auto"):
    """Maximal 4- or 8-connected regions of equal label, all classes in one pass.

    Args:
        labels: integer tensor (or array) (H, W) or a batch (B, H, W); uint8/int32/int64 run as they are, other
            integer types are converted.
        connectivity: 4 (official: scipy.ndimage.label's default cross) or 8.
        ignore_index: label of pixels that belong to no component (None: every pixel belongs to one).
    Returns:
        components int32 like labels: ids 0..N-1 numbered in raster order of each component's first pixel, -1 on
            ignored pixels. In a batch, ids are global: image b's ids form the contiguous range after image b-1's
            (see component_offsets).
        comp_class int64 (N,): the label of each component. comp_area int64 (N,): its pixel count.
    """
    labels = _check_labels(labels, connectivity)
    if _use_ext(impl):
        return torch.ops.clouds.connected_components(labels, connectivity, ignore_index)
    return connected_components_ref(labels, connectivity, ignore_index)


def _check_labels(labels, connectivity):
    labels = torch.as_tensor(labels)
    if labels.dim() not in (2, 3):
        raise ValueError(f"labels must be (H, W) or (B, H, W), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}; round and cast it first")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if labels.dtype in (torch.bool, torch.int8, torch.int16):
        labels = labels.to(torch.int32)
    elif labels.dtype not in (torch.uint8, torch.int32, torch.int64):
        labels = labels.to(torch.int64)
    return labels


def graph_roots(n, src, dst):
    """Connected components of a graph with n nodes and edges src[i]-dst[i] (int64 tensors): (n,) root of each node,
    the smallest node of its component. Each round hooks the larger root of every edge under the smaller one, then
    pointer jumping flattens the trees."""
    parent = torch.arange(n, device=src.device)
    while True:
        while True:                                                          # pointer jumping to the roots
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand
        ra, rb = parent[src], parent[dst]
        differ = ra != rb
        if not differ.any():
            return parent
        src, dst, ra, rb = src[differ], dst[differ], ra[differ], rb[differ]
        parent.scatter_reduce_(0, torch.maximum(ra, rb), torch.minimum(ra, rb), reduce="amin")


def connected_components_ref(labels, connectivity=4, ignore_index=255):
    """Specification of connected_components: union-find by pointer jumping on the pixel graph, in PyTorch.

    Every pixel points to a smaller pixel of its component; edges join equal-label neighbours (left and up, plus
    up-left and up-right for 8-connectivity; never across images of a batch). Each round hooks the larger root of
    every edge under the smaller one, so a component's root is its first pixel in raster order.
    """
    labels = _check_labels(labels, connectivity)
    device, shape = labels.device, labels.shape
    H, W = shape[-2:]
    lab = labels.reshape(-1, W).long()                                        # (B*H, W)
    R, n = lab.shape[0], lab.numel()
    valid = lab != ignore_index if ignore_index is not None else torch.ones_like(lab, dtype=torch.bool)
    idx = torch.arange(n, device=device).view(R, W)
    row_ok = (torch.arange(R, device=device) % H != 0)[1:, None]             # row r may link to row r-1
    pairs = [(idx[:, 1:], idx[:, :-1], valid[:, 1:])]                        # (pixel, left neighbour, ok)
    pairs.append((idx[1:], idx[:-1], valid[1:] & row_ok))                    # up
    if connectivity == 8:
        pairs.append((idx[1:, 1:], idx[:-1, :-1], valid[1:, 1:] & row_ok))   # up-left
        pairs.append((idx[1:, :-1], idx[:-1, 1:], valid[1:, :-1] & row_ok))  # up-right
    flat = lab.reshape(-1)
    src = torch.cat([a[ok].reshape(-1) for a, b, ok in pairs])
    dst = torch.cat([b[ok].reshape(-1) for a, b, ok in pairs])
    same = flat[src] == flat[dst]
    parent = graph_roots(n, src[same], dst[same])
    vflat = valid.reshape(-1)
    is_root = vflat & (parent == torch.arange(n, device=device))
    ids = torch.cumsum(is_root, 0) - 1                                       # raster order of the roots
    components = torch.where(vflat, ids[parent], -1).to(torch.int32).view(shape)
    comp_class = flat[is_root]
    comp_area = torch.bincount(components[components >= 0].long(), minlength=comp_class.numel())
    return components, comp_class, comp_area


def component_offsets(components):
    """(B+1,) int64 offsets of a batch from connected_components: image b holds ids offsets[b]..offsets[b+1]-1.

    The image of a component id c is torch.searchsorted(offsets, c, right=True) - 1.
    """
    components = torch.as_tensor(components)
    if components.dim() == 2:
        components = components[None]
    if components.numel() == 0:
        return torch.zeros(components.shape[0] + 1, dtype=torch.long, device=components.device)
    top = torch.cummax(components.flatten(1).amax(1).long().clamp(min=-1) + 1, 0).values  # (B,) end of image b
    return torch.cat([top.new_zeros(1), top])


# ---- point prompts (reference §5.2.2) ----


def sample_points(components, comp_area, num_points=5, min_area=5000, mode="random", generator=None, impl="auto",
                  exact_area=False):
    """Positive point prompts for every component with area > min_area, without a per-component mask.

    Args:
        components: int32 (H, W) or (B, H, W) ids from connected_components (-1 = none); it may have been eroded.
        comp_area: int64 (N,) areas from connected_components (the threshold uses them, official §5.2.1).
        num_points: points per component. min_area: keep components with area > min_area (strict, official).
        mode: "random": num_points distinct pixels, uniform without replacement (official). "interior": the first
            point is the pixel farthest from the component's boundary (exact Euclidean distance to the nearest pixel
            of another id or outside the image; ties -> first in raster order), the others random as above.
        generator: torch.Generator, an int seed, or None (torch's default RNG). Drawn as float64 uniforms
            (P, num_points [- 1 for interior]), P = number of components with area > min_area, so the ext and ref
            paths consume the generator alike and return the same points.
        exact_area: comp_area counts each component's pixels in `components` exactly (not eroded). With comp_area
            on the host (components on a GPU), which components get points is then known on the host: no
            synchronization at all.
    Returns:
        points int64 (P', num_points, 2) in (x, y) pixel order within the image, on the components' device;
        comp_ids int64 (P',) ascending, on comp_area's device: the component of each row. Components with fewer than
        num_points pixels left in `components` get no row (official bug §9.7 miscounted them; comp_ids always names
        the component).
    """
    components, comp_area, candidates, uniforms = _prepare_points(components, comp_area, num_points, min_area, mode,
                                                                  generator)
    args = (components, candidates.to(components.device, non_blocking=True), uniforms, comp_area.numel(), num_points,
            mode == "interior")
    idx = torch.ops.clouds.sample_points(*args) if _use_ext(impl) else _sample_pixels_ref(*args)
    return _points_from_pixels(idx, candidates, components.shape, comp_area if exact_area else None, num_points)


def sample_points_ref(components, comp_area, num_points=5, min_area=5000, mode="random", generator=None):
    """Specification of sample_points (same arguments and results); see _sample_pixels_ref."""
    components, comp_area, candidates, uniforms = _prepare_points(components, comp_area, num_points, min_area, mode,
                                                                  generator)
    idx = _sample_pixels_ref(components, candidates.to(components.device), uniforms, comp_area.numel(), num_points,
                             mode == "interior")
    return _points_from_pixels(idx, candidates, components.shape)


def _prepare_points(components, comp_area, num_points, min_area, mode, generator):
    components, comp_area = torch.as_tensor(components), torch.as_tensor(comp_area)
    if components.dim() not in (2, 3) or components.is_floating_point():
        raise ValueError(f"components must be integer ids (H, W) or (B, H, W), got {components.dtype} "
                         f"{tuple(components.shape)}")
    if comp_area.dim() != 1:
        raise ValueError(f"comp_area must be (N,), got shape {tuple(comp_area.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if int(num_points) < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    components = components.to(torch.int32)
    candidates = torch.nonzero(comp_area > min_area).flatten()  # Sec. 3.3: area > 5000; on comp_area's device
    rand_device = generator.device if generator is not None else "cpu"
    uniforms = torch.rand((candidates.numel(), num_points - (mode == "interior")), generator=generator,
                          dtype=torch.float64, device=rand_device).to(components.device, non_blocking=True)
    return components, comp_area, candidates, uniforms


def _points_from_pixels(idx, candidates, shape, exact_area=None, num_points=None):
    """Rows of idx with points (-1 rows: components with too few pixels) -> xy points, and their component ids on
    the candidates' device. Those rows are read from the device (one synchronization on a GPU) unless `exact_area`
    (the pixel count of every component, beside the candidates) tells them."""
    H, W = shape[-2:]
    if exact_area is not None:
        keep = torch.nonzero(exact_area[candidates] >= num_points).flatten()   # where the candidates are
    else:
        keep = torch.nonzero(idx[:, 0] >= 0).flatten()                         # one synchronization on a GPU
    idx = idx[keep.to(idx.device, non_blocking=True)]
    points = torch.stack([idx % W, (idx // W) % H], -1)                        # (P, K, 2) xy
    return points, candidates[keep.to(candidates.device)]


def _draw_ranks(n, u):
    """The first m = u.shape[1] entries of a Fisher-Yates shuffle of 0..n-1 per row (n (P,), u (P, m) float64).

    Mirrors draw_ranks in csrc/sample_points.cpp (and the CUDA copy) operation for operation.
    """
    P, m = u.shape
    out = torch.empty((P, m), dtype=torch.int64, device=u.device)
    pos, val = torch.empty_like(out), torch.empty_like(out)
    for j in range(m):
        span = n - j
        r = j + torch.minimum(torch.floor(u[:, j] * span).long(), span - 1)
        vr, vj = r.clone(), torch.full_like(r, j)
        for t in range(j):                                                    # later swaps override earlier ones
            vr = torch.where(pos[:, t] == r, val[:, t], vr)
            vj = torch.where(pos[:, t] == j, val[:, t], vj)
        out[:, j], pos[:, j], val[:, j] = vr, r, vj
    return out


def _sample_pixels_ref(components, candidates, uniforms, num_components, num_points, interior):
    """Specification of torch.ops.clouds.sample_points: int64 (P, num_points) flat pixel indices, -1 rows for
    components with fewer than num_points pixels. A component's pixels are ranked in raster order (a stable sort by
    id); ranks come from _draw_ranks."""
    flat = components.reshape(-1).long()
    P, K = candidates.numel(), num_points
    out = torch.full((P, K), -1, dtype=torch.int64, device=flat.device)
    if P == 0:
        return out
    if flat.numel() and flat.max() >= num_components:
        raise ValueError(f"components holds ids >= num_components ({num_components}); pass the comp_area returned "
                         "with these components")
    counts = torch.bincount(flat[flat >= 0], minlength=num_components)
    order = torch.argsort(flat, stable=True)                                  # pixels by id, raster order inside
    start = (flat < 0).sum() + torch.cumsum(counts, 0) - counts               # first slot of each id in `order`
    n, first_slot = counts[candidates], start[candidates]
    ok = n >= K
    n, first_slot, u = n[ok], first_slot[ok], uniforms[ok]
    if interior:
        first = _farthest_pixels(components, candidates[ok])                  # (P',) flat index
        skip = torch.stack([torch.searchsorted(order[s:s + c], f) for s, c, f in
                            zip(first_slot.tolist(), n.tolist(), first)]) if len(first) else first
        ranks = _draw_ranks(n - 1, u)
        ranks = ranks + (ranks >= skip[:, None]).long()
        out[ok] = torch.cat([first[:, None], order[first_slot[:, None] + ranks]], 1)
    else:
        out[ok] = order[first_slot[:, None] + _draw_ranks(n, u)]
    return out


def _farthest_pixels(components, ids):
    """Flat index of each component's pixel with the largest exact Euclidean distance to the nearest pixel of
    another id or outside the image (scipy EDT on its bounding box padded by one), first in raster order on ties."""
    from scipy import ndimage
    comp = components.cpu().numpy()
    comp3 = comp.reshape(-1, *comp.shape[-2:])                                # (B, H, W)
    H, W = comp3.shape[1:]
    boxes = ndimage.find_objects(comp3 + 1)                                   # index c+1 -> slices of id c
    out = []
    for c in ids.tolist():
        sb, sy, sx = boxes[c]
        mask = np.pad(comp3[sb.start, sy, sx] == c, 1)
        dist = ndimage.distance_transform_edt(mask)
        y, x = np.unravel_index(np.argmax(dist), dist.shape)
        out.append((sb.start * H + sy.start + y - 1) * W + sx.start + x - 1)
    return torch.tensor(out, dtype=torch.int64, device=components.device)


# ---- semantic inference (reference §3.4) ----


def masks_to_semantic(class_logits, mask_logits, size, return_scores=False, impl="auto"):
    """Mask2Former semantic inference without materializing the (B, Q, H, W) masks.

    Args:
        class_logits: (B, Q, C+1) with the no-object class last. mask_logits: (B, Q, h, w). size: (H, W) output.
        return_scores: return the (B, C, H, W) float32 scores instead of the labels.
    Returns:
        int64 (B, H, W) argmax over C of sum_q softmax(class_logits)[q, c] * sigmoid(upsampled mask_logits)[q]
        (the first max on ties), or the scores. Inference only: inputs requiring grad raise unless impl="ref".
    """
    size = _check_semantic(class_logits, mask_logits, size)
    if not _use_ext(impl):
        return masks_to_semantic_ref(class_logits, mask_logits, size, return_scores)
    if torch.is_grad_enabled() and (class_logits.requires_grad or mask_logits.requires_grad):
        raise RuntimeError("masks_to_semantic is inference-only (its kernels have no backward): call it under "
                           "torch.no_grad(), or use impl='ref' (masks_to_semantic_ref) for gradients")
    prob = class_logits.float().softmax(-1)[..., :-1].contiguous()             # §3.4: drop no-object (B, Q, C)   
    return torch.ops.clouds.masks_to_semantic(prob, mask_logits.float().contiguous(), size[0], size[1], return_scores)


def _check_semantic(class_logits, mask_logits, size):
    if class_logits.dim() != 3 or mask_logits.dim() != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(f"expected class_logits (B, Q, C+1) and mask_logits (B, Q, h, w) with the same B, Q; got "
                         f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}")
    if class_logits.shape[2] < 2:
        raise ValueError(f"class_logits needs at least one class plus no-object, got {class_logits.shape[2]} columns")
    if len(size) != 2:
        raise ValueError(f"size must be (H, W), got {size}")
    return int(size[0]), int(size[1])


def masks_to_semantic_ref(class_logits, mask_logits, size, return_scores=False):
    """Specification of masks_to_semantic (reference §3.4), differentiable; holds (B, Q, H, W) twice."""
    dtype = torch.float64 if mask_logits.dtype == torch.float64 else torch.float32
    masks = F.interpolate(mask_logits.to(dtype), size=tuple(size), mode="bilinear", align_corners=False)
    masks = masks.sigmoid()                                                   # (B, Q, H, W)
    prob = class_logits.to(dtype).softmax(-1)[..., :-1]                      # (B, Q, C) no-object dropped
    scores = torch.einsum("bqc,bqhw->bchw", prob, masks)                      # (B, C, H, W)
    return scores if return_scores else scores.argmax(1)


# ---- multi-scale deformable attention (Deformable-DETR, the pixel decoder's encoder, Sec. 3.1) ----


def ms_deform_attn(value, shapes, locations, weights, impl="auto"):
    """Multi-scale deformable attention core: per query and head, a weighted sum of bilinear samples of each level.

    Args:
        value: (B, S, nH, Dh), S = sum(h * w for h, w in shapes), the levels flattened row-major in that order.
        shapes: nL pairs (h, w). locations: (B, Lq, nH, nL, nP, 2) xy in [0, 1] (pixel centres at (i + 0.5) / w).
        weights: (B, Lq, nH, nL, nP) attention weights (softmax over nL * nP in the model).
    Returns:
        (B, Lq, nH * Dh): sum over levels and points of weight * bilinear sample (zeros outside, align_corners=False,
        as grid_sample), differentiable w.r.t. value, locations and weights. The extension runs float32 and float64
        (the fused kernel never holds the (B*nH, Dh, Lq, nP) samples of each level); other dtypes use the reference.
    """
    shapes = _check_deform(value, shapes, locations, weights)
    if value.dtype not in (torch.float32, torch.float64) or not _use_ext(impl):
        return ms_deform_attn_ref(value, shapes, locations, weights)
    flat = [n for hw in shapes for n in hw]                                  # [h0, w0, h1, w1, ...]
    return _MSDeformAttn.apply(value, flat, locations, weights)


def _check_deform(value, shapes, locations, weights):
    shapes = [(int(h), int(w)) for h, w in shapes]
    if value.dim() != 4 or locations.dim() != 6 or weights.dim() != 5:
        raise ValueError(f"expected value (B, S, nH, Dh), locations (B, Lq, nH, nL, nP, 2), weights (B, Lq, nH, nL, "
                         f"nP); got {tuple(value.shape)}, {tuple(locations.shape)}, {tuple(weights.shape)}")
    B, S, nH, _ = value.shape
    if (locations.shape[0] != B or locations.shape[2] != nH or locations.shape[3] != len(shapes)
            or locations.shape[5] != 2 or weights.shape != locations.shape[:5]):
        raise ValueError(f"locations {tuple(locations.shape)} and weights {tuple(weights.shape)} must be (B, Lq, nH, "
                         f"nL, nP, 2) and (B, Lq, nH, nL, nP) with B={B}, nH={nH} (from value) and nL={len(shapes)} "
                         "(len(shapes))")
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(f"value has S={S} tokens but shapes {shapes} sum to {sum(h * w for h, w in shapes)}")
    if not (value.dtype == locations.dtype == weights.dtype):
        raise ValueError(f"value, locations and weights must share one dtype, got {value.dtype}, {locations.dtype}, "
                         f"{weights.dtype}; cast them first")
    return shapes


class _MSDeformAttn(torch.autograd.Function):
    """torch.ops.clouds.ms_deform_attn with its fused backward (value, locations and weights gradients)."""

    @staticmethod
    def forward(ctx, value, shapes, locations, weights):
        value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
        ctx.save_for_backward(value, locations, weights)
        ctx.shapes = shapes
        return torch.ops.clouds.ms_deform_attn(value, shapes, locations, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        value, locations, weights = ctx.saved_tensors
        grads = torch.ops.clouds.ms_deform_attn_backward(grad_output.contiguous(), value, ctx.shapes, locations,
                                                         weights)
        need = ctx.needs_input_grad
        return grads[0] if need[0] else None, None, grads[1] if need[2] else None, grads[2] if need[3] else None


def ms_deform_attn_ref(value, shapes, locations, weights):
    """Specification of ms_deform_attn (same arguments and result): F.grid_sample per level, plain PyTorch."""
    B, _, nH, Dh = value.shape
    _, Lq, _, nL, nP, _ = locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample coordinates in [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(B * nH, Dh, h, w)  # (B*nH, Dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*nH, Lq, nP, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    w = weights.transpose(1, 2).reshape(B * nH, 1, Lq, nL * nP)  # (B*nH, 1, Lq, nL*nP)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1)  # (B*nH, Dh, Lq)
    return out.view(B, nH * Dh, Lq).transpose(1, 2)  # (B, Lq, nH*Dh)


# ---- self-check ----


def main(argv=None):
    """Build the extension and compare each op with its reference on a random map; returns {op: bool}."""
    from runtools import cli  # the CLI only: the ops need no project file
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_dataclass_flags(parser, OpsConfig)  # help from the field metadata; bools as --flag/--no-flag
    cfg = OpsConfig(**vars(parser.parse_args(argv)))
    load_extension(with_cuda=cfg.cuda or None)
    g = torch.Generator().manual_seed(0)
    blobs = F.interpolate(torch.rand(1, 6, cfg.size // 8, cfg.size // 8, generator=g), size=(cfg.size, cfg.size),
                          mode="bilinear").argmax(1)[0].to(torch.uint8)
    blobs[torch.rand(blobs.shape, generator=g) < 0.01] = cfg.ignore_index
    ext = connected_components(blobs, cfg.connectivity, cfg.ignore_index, impl="ext")
    ref = connected_components_ref(blobs, cfg.connectivity, cfg.ignore_index)
    result = {"connected_components": all(torch.equal(a, b) for a, b in zip(ext, ref))}
    kw = dict(num_points=cfg.num_points, min_area=cfg.min_area // 100, mode=cfg.mode)
    pe = sample_points(ext[0], ext[2], generator=1, impl="ext", **kw)
    pr = sample_points_ref(ext[0], ext[2], generator=1, **kw)
    result["sample_points"] = all(torch.equal(a, b) for a, b in zip(pe, pr))
    cl, ml = torch.randn(2, 10, 6, generator=g), torch.randn(2, 10, cfg.size // 4, cfg.size // 4, generator=g)
    se = masks_to_semantic(cl, ml, (cfg.size, cfg.size), return_scores=True, impl="ext")
    result["masks_to_semantic"] = torch.allclose(se, masks_to_semantic_ref(cl, ml, (cfg.size, cfg.size), True),
                                                 atol=1e-5)
    shapes = [(cfg.size // 32, cfg.size // 32), (cfg.size // 16, cfg.size // 16), (cfg.size // 8, cfg.size // 8)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 8, 32, generator=g)
    loc, attn = torch.rand(2, 100, 8, 3, 4, 2, generator=g), torch.rand(2, 100, 8, 3, 4, generator=g)
    result["ms_deform_attn"] = torch.allclose(ms_deform_attn(value, shapes, loc, attn, impl="ext"),
                                              ms_deform_attn_ref(value, shapes, loc, attn), atol=1e-5)
    for k, v in result.items():
        print(f"{k:22s} {'ok' if v else 'MISMATCH'}")
    return result


if __name__ == "__main__":
    main()
