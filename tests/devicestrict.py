"""A CPU stand-in for an accelerator: tensors that behave like GPU tensors, and a counter of host synchronizations.

The GPU path cannot run here, but most of what kills or slows it can be seen on the CPU if "device" tensors are told
apart from host tensors. `device_mode()` does that with a tensor subclass and a TorchFunctionMode:

- The device is `DEVICE = torch.device("cpu", 0)` (a CPU device WITH an index; a host tensor's device is plain
  "cpu"). Factories called with `device=DEVICE` (or an equal device), `.to(DEVICE)` and `.to(device_tensor)` give a
  `DeviceTensor`; every op with a DeviceTensor input gives DeviceTensors; `.device` of one reports DEVICE, so code
  that creates tensors "on x.device" stays on the device. `module.to(DEVICE)` moves parameters and buffers (the
  parameters become DeviceTensors flagged as parameters; gradients read through `.grad` are DeviceTensors too).
  `torch.Generator(device=DEVICE)` makes a generator whose `.device` is DEVICE (draws land on the device).
- Host transfers: `.cpu()` and `.to("cpu")` give plain tensors and count as one synchronization each (device ->
  host). A host -> device copy counts as one too unless `non_blocking=True` (a pinned, asynchronous copy; it is
  counted apart as "async h2d"), and so do `torch.tensor(data, device=DEVICE)` / `torch.as_tensor(data, ...)` of host
  data (a pageable copy followed by a stream synchronization on CUDA).
- Ops that synchronize on CUDA because their output size or value lives on the host count as one each: `nonzero`,
  `unique`, `masked_select`, `bincount`, `repeat_interleave` with a tensor, boolean-mask indexing (and masked
  assignment of a tensor), `torch.equal` / `allclose`, one-argument `torch.where`, host index tensors.
- Implicit host conversions of a device tensor (`.item()`, `.tolist()`, `bool()`, `float()`, `int()`, `__index__`,
  `__format__`, `__repr__`) RAISE `HostSyncError` when `strict=True` (the default): on a GPU each one is a hidden
  synchronization, so the code must say `.cpu()` first. With `strict=False` they are counted instead (for measuring
  code that still has them). `.numpy()` and `np.asarray(t)` of a device tensor always raise, as on CUDA.
- An op that mixes a device tensor with a host tensor of one or more dimensions raises (CUDA: "Expected all tensors
  to be on the same device"), except indexing with host index tensors (allowed on CUDA: counted) and copy_.

Every counted synchronization is recorded as (kind, call site) while `mode.counting` is True; `mode.summary()`
groups them. torch.cuda.set_sync_debug_mode("warn") measures the real number on a GPU (bench/gpu_check.sh).

Usage:
    with device_mode() as mode:          # strict
        model.to(DEVICE); ...            # run code; a hidden sync raises HostSyncError naming the call site
    python tests/devicestrict.py         # the sync count of one joint iteration at batch 8 (see count_joint_syncs)
    python tests/devicestrict.py --device cuda   # the same on a GPU, counted by torch.cuda.set_sync_debug_mode
"""
import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

DEVICE = torch.device("cpu", 0)
ROOT = Path(__file__).resolve().parents[1]
_HERE = str(Path(__file__).resolve())


class HostSyncError(RuntimeError):
    """An implicit host conversion of a device tensor (a hidden synchronization on a GPU)."""


class DeviceMismatchError(RuntimeError):
    """A device tensor and a host tensor in one op (an error on a GPU)."""


class DeviceTensor(torch.Tensor):
    """A CPU tensor that stands for a tensor on the accelerator (see the module docstring)."""


class DeviceGenerator(torch.Generator):
    """torch.Generator whose `.device` is DEVICE when it was made for DEVICE (it draws on the CPU)."""

    def __new__(cls, device="cpu"):
        d = torch.device(device)
        self = super().__new__(cls, device="cpu" if d.type == "cpu" else d)
        self._device = d
        return self

    @property
    def device(self):
        return self._device


def repo_site(frame) -> str:
    """file:line (function) of the innermost frame in this repository, outside this file and torch; prefixed with
    "[package] " when the innermost frame outside torch is another package's (e.g. segment_anything)."""
    package = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name != _HERE and "/torch/" not in name and "warnings" not in Path(name).name:
            if "site-packages" in name:
                package = package or name.split("site-packages/")[-1].split("/")[0]
            else:
                try:
                    rel = Path(name).resolve().relative_to(ROOT)
                except ValueError:
                    rel = None
                if rel is not None:
                    return (f"[{package}] " if package else "") + f"{rel}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return f"[{package}]" if package else "?"


def _is_dev(x):
    return isinstance(x, DeviceTensor)


def _is_device(d) -> bool:
    """Whether a device argument (torch.device, str, int) names DEVICE."""
    if d is None or isinstance(d, int):
        return False
    try:
        d = torch.device(d)
    except (TypeError, RuntimeError):
        return False
    return d.type == "cpu" and d.index == 0


def _is_host(d) -> bool:
    try:
        d = torch.device(d)
    except (TypeError, RuntimeError):
        return False
    return d.type == "cpu" and d.index is None


def _plain(t):
    return t.as_subclass(torch.Tensor) if _is_dev(t) else t


def _wrap(obj):
    if isinstance(obj, torch.Tensor):
        return obj if _is_dev(obj) else obj.as_subclass(DeviceTensor)
    if isinstance(obj, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in obj):
        out = [_wrap(o) for o in obj]
        return type(obj)(out) if not hasattr(obj, "_fields") else type(obj)(*out)  # namedtuples (torch.return_types)
    return obj


def _computes(func) -> bool:
    """Whether func is a computation (not a private helper, an attribute access or a copy protocol)."""
    name = getattr(func, "__name__", "")
    return not (name.startswith("_") and not name.endswith("__")) and name not in NOT_OPS


NOT_OPS = {"__get__", "__set__", "__delete__", "__setstate__", "__reduce_ex__", "__deepcopy__", "set_", "data_ptr",
           "untyped_storage", "is_set_to", "swap_tensors"}
T = torch.Tensor
IMPLICIT = {T.item: "item()", T.tolist: "tolist()", T.__bool__: "bool()", T.__float__: "float()",
            T.__int__: "int()", T.__index__: "__index__", T.__format__: "__format__", T.__repr__: "repr()",
            T.__str__: "str()", T.__complex__: "complex()"}
NUMPY = {T.numpy: "numpy()", T.__array__: "__array__"}
SYNC_OPS = {torch.nonzero: "nonzero", T.nonzero: "nonzero", torch.argwhere: "nonzero", torch.unique: "unique",
            T.unique: "unique", torch.unique_consecutive: "unique", T.unique_consecutive: "unique",
            torch.masked_select: "masked_select", T.masked_select: "masked_select", torch.bincount: "bincount",
            T.bincount: "bincount", torch.equal: "equal", T.equal: "equal", torch.allclose: "allclose",
            T.allclose: "allclose", T.is_nonzero: "is_nonzero", T.__contains__: "in", torch.histc: "histc"}
# our CUDA kernels that read a size back inside C++ (csrc/connected_components.cpp: the number of components)
INTERNAL_SYNCS = {"clouds::connected_components": "connected_components (C++)"}
INDEXING = {T.__getitem__, T.__setitem__, T.index_put_, T.index_put, torch.index_put}
FACTORIES_FROM_DATA = {torch.tensor, torch.as_tensor, T.new_tensor, torch.asarray}


class DeviceMode(TorchFunctionMode):
    """See the module docstring. `syncs` holds (kind, site) of every counted synchronization while `counting`."""

    def __init__(self, strict=True):
        super().__init__()
        self.strict, self.counting, self.syncs = strict, True, []

    # ---- records ----

    def _site(self):
        return repo_site(sys._getframe(2))

    def ours(self) -> int:
        """Synchronizations made by this repository's code (not inside another package such as segment_anything)."""
        return sum(n for (_, site), n in self.summary().items() if not site.startswith("["))

    def count(self, kind):
        if self.counting:
            self.syncs.append((kind, self._site()))

    def reset(self):
        self.syncs = []

    def summary(self) -> Counter:
        """(kind, site) -> number of synchronizations (asynchronous copies left out)."""
        return Counter(s for s in self.syncs if not s[0].startswith("async"))

    @property
    def total(self) -> int:
        return sum(self.summary().values())

    def report(self) -> str:
        lines = [f"{n:4d}  {kind:22s} {site}" for (kind, site), n in Counter(self.syncs).most_common()]
        return (f"{self.total} synchronizations, {self.ours()} of them in this repository's code (async copies "
                f"listed, not counted)\n" + "\n".join(lines))

    # ---- dispatch ----

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        dev = any(_is_dev(x) for x in tensors)
        self_dev = bool(args) and _is_dev(args[0])

        if func == T.device.__get__ and self_dev:
            return DEVICE
        if func in NUMPY and self_dev:
            raise HostSyncError(f"{NUMPY[func]} of a device tensor at {self._site()}: can't convert a device "
                                f"tensor to numpy (call .cpu() first)")
        if func in IMPLICIT and self_dev:
            if self.strict:
                raise HostSyncError(f"implicit host conversion {IMPLICIT[func]} of a device tensor at "
                                    f"{self._site()}: a hidden synchronization on a GPU; call .cpu() first")
            self.count(IMPLICIT[func])
            return func(_plain(args[0]), *args[1:], **kwargs)
        if func == T.__reduce_ex__ and self_dev:  # torch.save: a plain tensor in the file (CUDA: a D2H copy)
            self.count("torch.save")
            return func(_plain(args[0]), *args[1:], **kwargs)
        if func == T.__deepcopy__ and self_dev:  # copy.deepcopy (the EMA teacher): a device copy
            src, memo = args[0], args[1]
            if id(src) not in memo:
                copy = func(_plain(src).detach(), {}).as_subclass(DeviceTensor).requires_grad_(src.requires_grad)
                memo[id(src)] = torch.nn.Parameter(copy, src.requires_grad) if getattr(src, "_is_param", False) \
                    else copy
            return memo[id(src)]
        if func == T.grad.__get__ and self_dev:
            g = func(*args, **kwargs)
            return None if g is None else _wrap(g)
        if func in (T.cpu, T.to, T.cuda, T.type_as):
            return self._transfer(func, args, kwargs, self_dev)
        if func == T.copy_ and tensors:
            out = func(*args, **kwargs)
            if _is_dev(args[0]) != _is_dev(args[1]):
                self.count("copy_ d2h" if not _is_dev(args[0]) else "copy_ h2d")
            return out

        device_kw = kwargs.get("device")
        if func in FACTORIES_FROM_DATA:
            method = func == T.new_tensor
            data = (args[1] if len(args) > 1 else kwargs.get("data")) if method else \
                (args[0] if args else kwargs.get("data"))
            target = device_kw if device_kw is not None else (DEVICE if method and self_dev else None)
            if target is not None and _is_device(target):
                if not _is_dev(data):  # host data: a pageable copy + stream synchronization on CUDA
                    self.count(f"{func.__name__}(device=)")
                kw = {**kwargs, "device": "cpu"} if device_kw is not None else kwargs
                return _wrap(func(*(_plain(a) for a in args), **kw))
            if _is_dev(data) and target is not None and _is_host(target):
                self.count(f"{func.__name__}(device=cpu)")
                return func(*(_plain(a) for a in args), **kwargs)
        elif device_kw is not None:
            if _is_device(device_kw):
                return _wrap(func(*(_plain(a) for a in args), **{**kwargs, "device": "cpu"}))
            if _is_host(device_kw) and dev:  # e.g. zeros_like(device_tensor, device="cpu"): a new host tensor
                return func(*(_plain(a) for a in args), **kwargs)
        gen = kwargs.get("generator")
        if isinstance(gen, DeviceGenerator) and _is_device(gen.device) and not dev:
            return _wrap(func(*args, **kwargs))

        if not dev:
            return func(*args, **kwargs)

        # ---- ops on device tensors ----
        if getattr(func, "_qualified_op_name", None) in INTERNAL_SYNCS:
            self.count(INTERNAL_SYNCS[func._qualified_op_name])
        if func in SYNC_OPS:
            self.count(SYNC_OPS[func])
        elif func in (torch.where, T.where) and len(args) + len(kwargs) == 1:
            self.count("where(cond)")
        elif func in (torch.repeat_interleave, T.repeat_interleave) and "output_size" not in kwargs and (
                len(args) > 1 and isinstance(args[1], torch.Tensor) or len(args) == 1):
            self.count("repeat_interleave")
        elif func in INDEXING:
            self._indexing(func, args, kwargs)
        host = [x for x in tensors if not _is_dev(x) and x.dim() > 0]
        if host and func not in INDEXING and _computes(func):
            what = getattr(func, "__name__", str(func))
            raise DeviceMismatchError(f"{what} mixes a device tensor with a host tensor of shape "
                                      f"{tuple(host[0].shape)} at {self._site()}: on a GPU this is an error "
                                      f"(tensors on different devices); move the host tensor first")
        return func(*args, **kwargs)

    def _indexing(self, func, args, kwargs):
        """Boolean masks (a nonzero) and host index tensors (a blocking copy) synchronize."""
        index = args[1] if len(args) > 1 else kwargs.get("indices")
        parts = index if isinstance(index, (tuple, list)) else (index,)
        idx = [p for p in parts if isinstance(p, torch.Tensor)]
        value = args[2] if len(args) > 2 else None
        scalar_value = not isinstance(value, torch.Tensor) or value.dim() == 0
        if any(p.dtype == torch.bool for p in idx):
            # x[mask] reads need the number of True entries; x[mask] = scalar is a masked_fill (no sync)
            if not (func == T.__setitem__ and len(idx) == 1 and scalar_value):
                self.count("bool mask index")
        elif any(not _is_dev(p) and p.dim() > 0 for p in idx):
            self.count("host index tensor")

    def _transfer(self, func, args, kwargs, self_dev):
        src = args[0]
        if func == T.cpu:
            if self_dev:
                self.count("cpu()")
                return _plain(src).cpu(*args[1:], **kwargs)
            return func(*args, **kwargs)
        if func == T.cuda:
            raise DeviceMismatchError(f".cuda() at {self._site()}: use .to(device) (the tests run on {DEVICE})")
        if func == T.type_as:
            other = args[1]
            out = func(_plain(src), _plain(other))
            return self._moved(src, out, _is_dev(other), False)
        rest = args[1:]
        target_dev = None
        if rest and isinstance(rest[0], torch.Tensor):  # .to(other)
            target_dev = _is_dev(rest[0])
            out = func(_plain(src), _plain(rest[0]), *rest[1:], **kwargs)
            return self._moved(src, out, target_dev, kwargs.get("non_blocking", False))
        device, _, non_blocking, _ = torch._C._nn._parse_to(*rest, **{k: v for k, v in kwargs.items()
                                                                     if k != "copy"})
        if device is not None:
            target_dev = _is_device(device)
            if not target_dev and not _is_host(device):
                raise DeviceMismatchError(f".to({device}) at {self._site()}: the tests run on {DEVICE}")
        rest = tuple("cpu" if isinstance(a, (torch.device, str)) and _is_device(a) else a for a in rest)
        if "device" in kwargs and _is_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        out = func(_plain(src), *rest, **kwargs)
        return self._moved(src, out, self_dev if target_dev is None else target_dev, non_blocking)

    def _moved(self, src, out, to_device, non_blocking):
        if to_device and not _is_dev(src):
            self.count("async h2d" if non_blocking else "to(device) h2d")
        elif not to_device and _is_dev(src):
            self.count("to(cpu) d2h")
        return _wrap(out) if to_device else _plain(out)


def _grouping(group):
    """torch's grouping of tensors by (device, dtype) reads the C++ device (cpu); a group of device tensors is
    keyed by DEVICE instead, as a group of CUDA tensors is by its GPU (clip_grad_norm_ moves the norm there)."""
    def grouped(tensorlistlist, with_indices=False):
        out = group(tensorlistlist, with_indices)
        return {((DEVICE if any(_is_dev(t) for tl in value[0] for t in tl if t is not None) else device), dtype):
                value for (device, dtype), value in out.items()}
    return grouped


@contextlib.contextmanager
def device_mode(strict=True):
    """Run the body with DEVICE tensors strict (or, strict=False, counted): yields the DeviceMode."""
    import torch.nn.utils.clip_grad as clip_grad
    import torch.utils._foreach_utils as foreach_utils

    mode = DeviceMode(strict)
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    saved = {(torch, "Generator"): torch.Generator,
             (foreach_utils, "_group_tensors_by_device_and_dtype"): foreach_utils._group_tensors_by_device_and_dtype,
             (clip_grad, "_group_tensors_by_device_and_dtype"): clip_grad._group_tensors_by_device_and_dtype}
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # module.to(DEVICE): new Parameter objects
    torch.Generator = DeviceGenerator
    for module in (foreach_utils, clip_grad):
        module._group_tensors_by_device_and_dtype = _grouping(saved[(module, "_group_tensors_by_device_and_dtype")])
    try:
        with mode:
            yield mode
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


# ---- the sync count of one joint iteration ----

def tiny_sam_predictor(device):
    """refine.SamPointPredictor around a random-init segment_anything Sam (img_size 256) on `device`, taking the
    GPU path (images resized by torch on the device), as a real SAM on a GPU does."""
    import refine
    from test_refine import tiny_sam

    return refine.SamPointPredictor(tiny_sam().to(device), torch_image=True)


def joint_argv(toy_root, gen_dir, out, batch_size=8, iters=3, *extra):
    """A joint phase at batch `batch_size` on ToyCity (tiny preset, 64 px crops, half the samples generated)."""
    weights = Path(out).parent / "warm.pt"
    if not weights.is_file():
        import checkpoints
        import clouds
        torch.manual_seed(0)
        checkpoints.save_checkpoint(weights, clouds.build_model("tiny", train_backbone=True))
    return ["--preset", "tiny", "--train-backbone", "--crop-size", "64", "--batch-size", str(batch_size),
            "--workers", "0", "--test-short-side", "64", "--log-every", "1", "--no-progress", "--seed", "0",
            "--data-root", str(toy_root), "--out", str(out), "--phase", "joint", "--synthetic", str(gen_dir),
            "--weights", str(weights), "--sam", "vit_b", "--sam-checkpoint", str(weights), "--sam-min-area", "20",
            "--p-gen", "0.5", "--iters-joint", str(iters), "--device", str(DEVICE), *extra]


@contextlib.contextmanager
def cuda_sync_warnings(mode):
    """On a GPU: torch.cuda.set_sync_debug_mode("warn") while mode.counting, every warning recorded in mode.syncs
    as ("cuda sync", call site) (the stack is walked when the warning is shown)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            mode.count("cuda sync")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def count_joint_syncs(toy_root, gen_dir, out, batch_size=8, dec_layers=9, strict=False, measure=1, device=None):
    """Synchronizations of joint iteration `measure` (from its EMA step to the end of its after_iteration; no
    evaluation or save in it) at `batch_size`, with the official 9 decoder layers (10 predictions) on the tiny
    preset. Returns (mode, stats of that iteration). SAM is a tiny random segment_anything Sam on the device.
    device=None: the CPU emulation (device_mode); "cuda": a real GPU, counted by torch.cuda.set_sync_debug_mode."""
    import clouds
    import refine
    from runtools import runs
    import train

    saved_preset, saved = dict(clouds.PRESETS["tiny"]), {}
    clouds.PRESETS["tiny"] = {**saved_preset, "dec_layers": dec_layers}
    patches = {(refine, "build_predictor"): lambda name, checkpoint=None, device="cpu", **kw:
               tiny_sam_predictor(device),
               (refine, "predictor_problems"): lambda *a, **k: []}
    result, cuda = {}, device is not None and str(device).startswith("cuda")
    with (device_mode(strict) if not cuda else contextlib.nullcontext(DeviceMode(False))) as mode, \
            (cuda_sync_warnings(mode) if cuda else contextlib.nullcontext()):
        mode.counting = False
        teacher_step, after = train.teacher_step, runs.after_iteration

        def start(teacher, student, it, *args):
            if it == measure:
                mode.reset()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
            mode.counting = it == measure
            return teacher_step(teacher, student, it, *args)

        def end(state, env, inputs, log, say, stop, done, *args):
            try:
                return after(state, env, inputs, log, say, stop, done, *args)
            finally:
                if done == measure + 1:
                    mode.counting = False
                    if cuda:
                        torch.cuda.set_sync_debug_mode(0)
                    result["syncs"] = list(mode.syncs)

        step = train.train_step

        def step_spy(state, batch, it):
            stats = step(state, batch, it)
            if it == measure:
                result["stats"] = stats
            return stats

        patches.update({(train, "teacher_step"): start, (runs, "after_iteration"): end,
                        (train, "train_step"): step_spy})
        for (module, name), value in patches.items():
            saved[(module, name)] = getattr(module, name)
            setattr(module, name, value)
        try:
            argv = joint_argv(toy_root, gen_dir, out, batch_size, measure + 2, "--eval-every", "0", "--no-plots",
                              "--save-every", "1000")
            if cuda:
                argv[argv.index("--device") + 1] = str(device)
            train.main(argv)
        finally:
            for (module, name), value in saved.items():
                setattr(module, name, value)
            clouds.PRESETS["tiny"] = saved_preset
    mode.syncs = result.get("syncs", [])
    return mode, result.get("stats")


def main():
    """Print the sync count of one joint iteration at batch 8 (ToyCity written to a temp folder)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="host synchronizations of one joint iteration (CPU emulation)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--strict", action="store_true", help="raise on implicit conversions instead of counting")
    parser.add_argument("--device", default="emulated",
                        help="emulated (device tensors on the CPU) or cuda[:N] (a GPU, torch.cuda.set_sync_debug_mode)")
    parser.add_argument("--data-root", default=None, help="a datasets root with gta5/ (default: ToyCity, written)")
    parser.add_argument("--synthetic", default=None, help="generated images (default: toy ones, written)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import data
    import generate
    from toyworld import city

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, gen = Path(args.data_root or tmp / "toy"), Path(args.synthetic or tmp / "gen")
        if not args.data_root:
            city.build(root, seed=0, num_images=3, workers=1, progress=False)
            data.convert("gta", root, nproc=1, progress=False)
        if not args.synthetic:
            generate.main(["--backend", "toy", "--out", str(gen), "--num-images", "4", "--height", "64", "--width",
                           "64", "--no-progress"])
        mode, stats = count_joint_syncs(root, gen, tmp / "run" / "out", args.batch_size,
                                        strict=args.strict, device=None if args.device == "emulated" else args.device)
    print(f"joint iteration at batch {args.batch_size} on {args.device} ({stats['n_gen'] if stats else '?'} "
          f"generated): " + mode.report())


if __name__ == "__main__":
    main()
