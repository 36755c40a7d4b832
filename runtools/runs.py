"""Run bookkeeping of train.py: the preflight, resume and config checks, last.pt save/restore, metrics.jsonl and
log.txt, Ctrl-C / SIGTERM, the PNG plots and the periodic evaluation (reference §1.3-1.4, §9). The training method
itself (Sec. 3.3 of the paper) is in train.py, which imports this file; this file never imports train.py.

Usage: not a script; `from runtools import runs` (train.py does). A running phase's state is train.RunState (duck-typed here).
"""
import errno
import itertools
import json
import math
import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import checkpoints
import data
import evaluate
import refine
from runtools import files

# ---- errors: what main prints, and its exit code ----


class Problems(Exception):
    """What stops a run from starting, as one message (main prints it and exits 2; --debug shows the traceback)."""

    def __init__(self, problems, quiet=False):
        self.problems, self.quiet = list(problems), quiet  # quiet: main prints nothing (another rank's problems)
        n = len(self.problems)
        lines = [f"train.py cannot start: {n} problem{'s' * (n > 1)} (fix each, then rerun the same command)"]
        lines += [f"  {i}. " + p.replace("\n", "\n     ") for i, p in enumerate(self.problems, 1)]
        super().__init__("\n".join(lines))


class TrainError(RuntimeError):
    """A run stopped on bad state (non-finite outputs or loss, an unreadable checkpoint); the message says what to
    do. main prints it and exits 1 (--debug: traceback)."""


class Interrupted(Exception):
    """A stop signal: last.pt was saved (or kept). main prints the message and exits with `code`: 130 after SIGINT
    (Ctrl-C), 143 after SIGTERM, SIGUSR1 or SIGHUP (see StopFlag and README "Stopping, preemption, exit codes")."""

    def __init__(self, msg, signum=None):
        super().__init__(msg)
        self.signum = signum
        self.code = exit_code(signum)


def first_line(err) -> str:
    return str(err).split("\n")[0]


# ---- distributed ----


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device
    started: bool  # we initialized the process group (and destroy it at the end)
    control: Optional[object] = None  # a gloo group for host-side collectives (stop flag, barriers); None: default


def barrier(env):
    """Every rank waits here (over the gloo control group: no GPU synchronization); nothing with one rank."""
    if env.world > 1:
        dist.barrier(group=env.control)


def setup_distributed(device_name: str) -> Env:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK/MASTER_*; NCCL on GPUs, gloo on CPU ($CLOUDS_DIST_BACKEND overrides);
    with NCCL, a gloo group beside it (Env.control) carries the stop flag and the barriers without GPU syncs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_name)
        except RuntimeError as e:
            raise Problems([f"--device {device_name}: {first_line(e)}; pass auto, cpu, cuda or cuda:N"]) from None
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        problem = cuda_problem(device_name, device)
        if problem:
            raise Problems([problem])
        torch.cuda.set_device(device)
    started, control = False, None
    if world > 1 and not dist.is_initialized():  # CLOUDS_DIST_BACKEND=gloo: several ranks on one GPU (NCCL refuses)
        dist.init_process_group(os.environ.get("CLOUDS_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo"))
        started = True
    if world > 1 and dist.get_backend() != "gloo":  # stop flags and barriers on the CPU, beside NCCL
        control = dist.new_group(backend="gloo")
    return Env(rank, world, device, started, control)


def cuda_problem(flag_value: str, device: torch.device) -> Optional[str]:
    """Why `device` (a cuda device) cannot be used, in one line naming --device; None when it can."""
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (f", built for CUDA {torch.version.cuda}" if torch.version.cuda else
                                                " without CUDA")
        return (f"--device {flag_value}: no CUDA GPU is visible to this process ({build}; check nvidia-smi, the "
                f"driver and CUDA_VISIBLE_DEVICES); pass --device cpu, or --device auto to use a GPU when there is one")
    if device.index is not None and device.index >= torch.cuda.device_count():
        return (f"--device {flag_value}: this process sees {torch.cuda.device_count()} GPU(s) (cuda:0.."
                f"cuda:{torch.cuda.device_count() - 1}); pass one of them, or fewer --nproc_per_node under torchrun")
    return None


# ---- the lock of --out: one run at a time ----

LOCK_NAME = "train.lock"


def _lock_record() -> dict:
    """Who holds a lock: this process, its host, when, and (under torchrun) which job."""
    job = [os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300], "job": "|".join(job)}


def _read_lock(fd) -> dict:
    """The record in an open lock file (read through `fd`: opening and closing the file again would drop a POSIX
    lock this process holds on it)."""
    try:
        text = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        record = json.loads(text or "{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process (or an unreadable record): assume alive
    return True


def _try_lock(fd, exclusive: bool) -> Optional[bool]:
    """Non-blocking POSIX record lock on the whole file: True = got it, False = another process holds it, None = the
    file system has no locks (some NFS setups). POSIX locks (unlike flock) are not inherited by forked DataLoader
    workers, so the kernel drops them the moment the owner dies."""
    import fcntl

    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _owner_text(record: dict) -> str:
    if not record:
        return "another process (it has not written its pid yet)"
    return (f"pid {record.get('pid')} on host {record.get('host')} (started {record.get('started')}: "
            f"{record.get('command', '?')})")


def lock_message(out, record: dict) -> str:
    return (f"--out {out} is in use by another run: {_owner_text(record)}. Two runs in one --out would interleave "
            f"log.txt and metrics.jsonl and race on last.pt. Wait for it to end (or stop it), or choose another --out. "
            f"{Path(out) / LOCK_NAME} is released when that run exits, even when it is killed")


def lock_owner(out) -> Optional[dict]:
    """The record of the live run holding OUT/train.lock, or None (no lock, a stale one, or one of this torchrun job).
    Only looks (the preflight's check); OutLock.acquire is what excludes."""
    path = Path(out) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        free = _try_lock(fd, exclusive=False)  # a shared lock: refused while a run holds the exclusive one
        record = _read_lock(fd)
        if free is None:  # no locks on this file system: the pid decides, on this host
            free = record.get("host") == socket.gethostname() and not _pid_alive(record.get("pid"))
    finally:
        os.close(fd)  # drops the shared lock
    if free or record.get("job") == _lock_record()["job"] != "||":
        return None
    return record


class OutLock:
    """OUT/train.lock, held by rank 0 for the whole run: an exclusive POSIX lock (the kernel drops it when the process
    dies, SIGKILL included) on a file holding the owner's pid, host, start time and command. A second run on the same
    --out fails at once naming the owner; the file of a run that died is taken over with a note. Where the file
    system has no locks (some NFS setups) the pid decides instead (a lock from another host is then removed by hand).
    """

    def __init__(self, out):
        self.out, self.path, self.fd = Path(out), Path(out) / LOCK_NAME, None

    def acquire(self, wait: float = 1.0) -> Optional[str]:
        """Take the lock, or raise Problems naming its owner. Returns a note when a dead run's lock was taken over.
        `wait`: seconds of retrying first (another process may be looking at the lock for a moment: lock_owner)."""
        self.out.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, files.file_mode())
            got = _try_lock(fd, exclusive=True)
            previous = _read_lock(fd)
            if got is None:  # no locks: the pid decides (racy, but the best there is)
                got = not previous or previous.get("host") == socket.gethostname() and not _pid_alive(
                    previous.get("pid"))
            try:  # the previous owner may have removed the file after we opened it: then lock the new one
                same = got and os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            if got:
                continue
            if time.monotonic() > deadline:
                raise Problems([lock_message(self.out, previous)])
            time.sleep(0.05)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_lock_record()) + "\n").encode(), 0)
        os.fsync(fd)
        if previous.get("pid") is not None:
            return (f"took over {self.path} from a run that is no longer running: {_owner_text(previous)}; it "
                    f"stopped without cleaning up (killed, or its machine went down)")
        return None

    def release(self):
        """Remove the lock file and drop the lock (at the end of a run, however it ends but SIGKILL)."""
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


# ---- checkpoints of the trainer state (last.pt) ----


def load_weights(model, path):
    """Initial weights: our checkpoint (head, + backbone if it was trained) or an official model_final.pth."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path} does not exist: pass the warmup model_final.pt (ours) or an "
                                f"official model_final.pth, or use --phase all to run the warmup first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # pickled Python objects: not ours; load_official reads and checks it
        ckpt = None
    if isinstance(ckpt, dict) and ckpt.get("version") == 1 and "model" in ckpt:
        state = ckpt["model"]
        model.sem_seg_head.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("sem_seg_head.")})
        checkpoints.load_backbone_state(model, state, str(path))  # CLIP: backbone.clip_model.*; ViT: + adapter
        return ckpt
    checkpoints.load_official(path, model)
    return None


def save_state(path, state, iteration):
    """last.pt: the model (head, + backbone when trained) plus everything resume needs. Written atomically."""
    trainer = {"phase": state.phase, "iteration": iteration, "optimizer": state.optimizer.state_dict(),
               "scheduler": state.scheduler.state_dict(),
               "teacher": state.teacher.state_dict() if state.teacher is not None else None,
               "torch_rng": torch.get_rng_state(), "config": asdict(state.cfg)}
    checkpoints.save_checkpoint(path, state.model, trainer=trainer)


def restore_state(path, state) -> int:
    """Load last.pt into the running model, optimizer, schedule and teacher; returns the completed iterations. The
    data stream and the per-iteration generators are functions of (seed, iteration), so nothing else is needed."""
    try:
        ckpt = load_weights(state.model, path)
    except Exception as e:  # a cut-off or foreign file; read_trainer already checked it in the preflight
        raise TrainError(f"could not resume from {path} ({type(e).__name__}: {first_line(e)}); move it away or "
                         f"start over with --overwrite") from e
    trainer = (ckpt or {}).get("trainer")
    if not trainer or trainer.get("phase") != state.phase:
        raise TrainError(f"{path} holds no {state.phase} trainer state (found phase "
                           f"{(trainer or {}).get('phase')}); resume from the matching --out folder or drop --resume")
    fresh = [{k: g[k] for k in ("lr", "weight_decay")} for g in state.optimizer.param_groups]  # this run's config
    schedule = dict(vars(state.scheduler.lr_lambdas[0]))
    saved = [len(g["params"]) for g in trainer["optimizer"]["param_groups"]]
    now = [len(g["params"]) for g in state.optimizer.param_groups]
    if saved != now:  # what trains changed (--allow-config-change)
        raise TrainError(f"{path} holds an optimizer over other tensors ({len(saved)} groups, {sum(saved)} tensors) "
                         f"than this run trains ({len(now)} groups, {sum(now)} tensors): --train-backbone, "
                         f"--freeze-backbone-joint, --tuning or --backbone changed. "
                         f"Resume with the old values, or start over with --overwrite")
    state.optimizer.load_state_dict(trainer["optimizer"])
    state.scheduler.load_state_dict(trainer["scheduler"])  # restores the saved LRSchedule fields too
    # This run's hyperparameters take effect from the resumed iteration (the preflight refused any change without
    # --allow-config-change); unchanged ones give back exactly the saved values.
    sched = state.scheduler
    sched.lr_lambdas[0].__dict__.update(schedule)
    sched.base_lrs = [g["lr"] for g in fresh]
    for group, new, base in zip(state.optimizer.param_groups, fresh, sched.base_lrs):
        group.update(weight_decay=new["weight_decay"], initial_lr=base, lr=base * sched.lr_lambdas[0](sched.last_epoch))
    sched._last_lr = [g["lr"] for g in state.optimizer.param_groups]  # what get_last_lr() (the logged LR) reports
    if state.teacher is not None:
        state.teacher.load_state_dict(trainer["teacher"])
    torch.set_rng_state(trainer["torch_rng"])
    return int(trainer["iteration"])


# ---- guards: a non-finite step stops before the optimizer step ----


def check_outputs(state, outputs, it):
    """Raise TrainError when pred_logits / pred_masks (final or auxiliary) hold NaN or Inf: one device sync, and every
    rank stops together (MIN all-reduce)."""
    named = [("", outputs)] + [(f"aux_outputs[{i}].", a) for i, a in enumerate(outputs.get("aux_outputs", []))]
    tensors = [(p + k, o[k]) for p, o in named for k in ("pred_logits", "pred_masks")]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).float()  # (n,)
    if state.world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    finite = finite.cpu()  # the one synchronization
    if finite.min() < 1:
        bad = [n for (n, _), f in zip(tensors, finite.tolist()) if f < 1]
        cfg = state.cfg
        raise TrainError(f"non-finite model outputs at {state.phase} iteration {it} ({', '.join(bad[:4])}"
                         f"{', ...' if len(bad) > 4 else ''}): stopped before the matcher and the optimizer step; the "
                         f"last good checkpoint is {last_good(state)}. Try a lower --lr (now {cfg.lr})"
                         + (", --no-backbone-bf16" if cfg.backbone_bf16 else "")
                         + ", or check the input images; then rerun with --resume.")


def checked_values(state, it, loss, losses, grad_norm) -> dict:
    """The logged numbers of an iteration in ONE host transfer: the loss, its final-layer terms, the gradient norm,
    and whether the loss and the norm are finite on every rank (MIN all-reduce: all ranks stop together, or the others
    would hang in the next all-reduce). Raises TrainError on a non-finite value; train_step calls it BEFORE the
    optimizer step."""
    terms = ("loss_ce", "loss_mask", "loss_dice")
    values = torch.stack([loss.detach(), *(losses[k].detach() for k in terms), grad_norm.detach()]).float()
    finite = torch.isfinite(values[0::4]).float()  # (loss, gradient norm); a slice: no host index tensor
    if state.world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    host = torch.cat([values, finite]).cpu().tolist()
    value, (loss_ok, grad_ok) = dict(zip(("loss", *terms, "grad_norm"), host[:5])), host[5:]
    if loss_ok < 1:
        raise TrainError(f"non-finite loss at {state.phase} iteration {it}: total {value['loss']}, final-layer terms "
                         f"{ {k: value[k] for k in terms} }. Stopped before the optimizer step; the last good "
                         f"checkpoint ({last_good(state)}) is kept. Lower --lr or check the inputs, then rerun "
                         f"with --resume.")
    if grad_ok < 1:
        raise TrainError(f"non-finite gradient norm at {state.phase} iteration {it} (loss {value['loss']:.4f}). "
                         f"Stopped before the optimizer step; the last good checkpoint ({last_good(state)}) is "
                         f"kept. Lower --lr, then rerun with --resume.")
    return value


def os_error_message(e: OSError, out=None) -> str:
    """One line for an OSError: the cause, the file and, on a full disk, the free space there; a hint about --out when
    the file is in it."""
    if isinstance(e, checkpoints.WriteError) or not e.strerror:
        return str(e)
    msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    folder = Path(e.filename).parent if e.filename else None
    if e.errno == errno.ENOSPC and folder is not None:
        import shutil

        try:
            msg += f" ({shutil.disk_usage(folder).free / 2 ** 20:,.1f} MB free there); free some space"
        except OSError:
            pass
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and out and folder is not None and (
            Path(out).resolve() in (folder.resolve(), *folder.resolve().parents)):
        msg += "; pass a writable --out"
    return msg


def last_good(state) -> str:
    saved = state.saved
    return f"{state.last}, iteration {saved}" if saved is not None else f"none yet: {state.last} is not written"


# ---- logs: metrics.jsonl (+ TensorBoard) and log.txt ----


class MetricsLog:
    """metrics.jsonl (one JSON object per logged iteration or evaluation) and, optionally, TensorBoard scalars."""

    def __init__(self, path, enabled=True, tensorboard=False, keep_until=None, say=None):
        self.path, self.enabled, self.writer = Path(path), enabled, None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and self.path.is_file():  # resume: drop what the interrupted run logged later
            lines = [json.dumps(r) for r in read_metrics(self.path, say) if r.get("iter", 0) <= keep_until]
            files.write_text("".join(ln + "\n" for ln in lines), self.path)
        elif keep_until is None:
            self.path.unlink(missing_ok=True)
        if tensorboard:
            self.writer = summary_writer_cls()(str(self.path.parent / "tensorboard"))

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iter":
                    self.writer.add_scalar(f"{record['phase']}/{key}", value, record["iter"])
            for name, m in record.get("eval", {}).items():
                self.writer.add_scalar(f"{record['phase']}/mIoU/{name}", m["mIoU"], record["iter"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_metrics(path, say=None) -> list:
    """The records of a metrics.jsonl; a line that is not JSON (cut off by a crash) is skipped with a warning."""
    records, say = [], say or _warn
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            say(f"[train] warning: {path} line {i} is not valid JSON (cut off by a crash?); skipped: {line[:60]!r}",
                err=True)
    return records


def _warn(msg, err=True):
    print(msg, file=sys.stderr, flush=True)


def summary_writer_cls():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or drop --tensorboard; metrics.jsonl is always written)") from e
    return SummaryWriter


class RunLog:
    """Prints and appends to OUT/log.txt (rank 0): the config summary, notes, warnings, eval tables, stops."""

    def __init__(self, path, enabled=True):
        self.path = Path(path) if enabled else None
        self.enabled = enabled

    def __call__(self, msg, err=False, echo=True):
        if not self.enabled:
            return
        if echo:
            print(msg, file=sys.stderr if err else sys.stdout, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


# ---- signals: a clean stop saves last.pt, every rank waits for it, then the job exits 130 / 143 ----

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP") if hasattr(signal, n))
REPEAT_GRACE = 5.0  # s: repeats of the first signal this soon are copies (torchrun forwards what it receives)


def exit_code(signum) -> int:
    """The exit code of a run stopped by `signum`: 130 for SIGINT (Ctrl-C) or None, 143 for the others (SIGTERM, and
    SIGUSR1 / SIGHUP, which schedulers send before a preemption or time limit)."""
    return 130 if signum in (None, signal.SIGINT) else 143


class StopFlag:
    """The stop signals of a run (SIGINT, SIGTERM, SIGUSR1, SIGHUP; one a process ignores stays ignored, e.g. SIGHUP
    under nohup). A context manager around the whole run; main thread only.

    While `armed` (inside a phase's iteration loop) the first signal only sets the flag: the current iteration (or
    evaluation, which polls it) finishes, rank 0 saves last.pt, every rank waits for that save, and the run raises
    Interrupted (exit 130 for SIGINT, 143 otherwise). Repeats within REPEAT_GRACE seconds are ignored: torchrun
    forwards the signal it receives to workers that already got it from the terminal or the scheduler. A SIGINT after
    that aborts without saving (KeyboardInterrupt; last.pt keeps its previous save). When not armed (preflight, model
    build, between phases: nothing to save) a signal stops at once (KeyboardInterrupt). Once the stop is saved
    (`finish`), further signals are ignored, or with `linger` (a process about to exit: train.py as a script) end it
    with the same exit code, so a rank that torchrun signals while it shuts down still reports 130 / 143."""

    def __init__(self, linger=False):
        self.signum, self.since, self.armed, self.finished, self.linger = None, None, False, False, linger
        self._old, self.pid = {}, os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked DataLoader worker: the main process handles the signal
            return
        if self.finished:  # last.pt is saved and every rank waited for it: exit as the stop said
            if self.linger:
                code = exit_code(self.signum)
                print(f"[train] {signal.Signals(signum).name} while exiting after the stop: exit {code} now",
                      file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(code)
            return
        if self.signum is None:
            self.signum, self.since = signum, time.monotonic()
            if not self.armed:
                raise KeyboardInterrupt
            print(f"\n[train] {signal.Signals(signum).name}: finishing this iteration, then saving last.pt (exit "
                  f"{exit_code(signum)}; a second Ctrl-C after {REPEAT_GRACE:.0f} s aborts without saving)",
                  file=sys.stderr, flush=True)
        elif signum == signal.SIGINT and time.monotonic() - self.since > REPEAT_GRACE:
            raise KeyboardInterrupt

    def finish(self):
        """The stop is saved (or nothing was to be saved): from now on signals only end the process (see class)."""
        self.finished = True

    def __exit__(self, *exc):
        if self.finished and self.linger:
            return  # the handlers stay until the process exits
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def should_stop(stop, env) -> bool:
    """Whether a signal arrived on any rank (all ranks stop after the same iteration, or the others would hang). A
    MAX all-reduce of a CPU tensor over the gloo control group: no GPU synchronization."""
    flag = stop.signum is not None
    if env.world > 1:
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control)
        flag = bool(t[0] > 0)
    return flag


# ---- plots ----


class StepClock:
    """Per-stage seconds of one iteration: time_teacher, time_refine (joint), time_student (the rest), time_iter and
    cpu_iter (process CPU seconds). Host time, after waiting for the device's queued kernels only with --profile
    (accurate stages at the cost of a synchronization each; without it the loop never waits for the GPU to time
    itself)."""

    def __init__(self, device, profile: bool):
        self.device, self.profile = device, profile
        self.times = {"time_teacher": 0.0, "time_refine": 0.0}
        self.start = self.last = self._now()
        self.cpu = time.process_time()

    def _now(self) -> float:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str):
        now = self._now()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now

    def stop(self) -> dict:
        self.lap("time_student")
        return {**self.times, "time_iter": self.last - self.start, "cpu_iter": time.process_time() - self.cpu}


def record_pseudo_labels(state, samples, teacher_labels, targets):
    """What the run keeps of the generated samples' pseudo labels, without a host transfer:
    - where a sample carries its hidden true label (ToyCity, sample["truth"]), the label_confusion of the teacher's
      label and of the refined one against it, summed into state.pseudo_conf until the next log step;
    - rank 0, with --plots: the 4 latest (image uint8 (h, w, 3), teacher label, refined label) for pseudo_labels.png
      (the labels stay on the device; plot_pseudo_labels copies them when it draws, at a save)."""
    keep = state.rank == 0 and state.cfg.plots
    if not samples or (state.pseudo_conf is None and not keep):
        return
    refined = [refine.label_map(t["labels"], t["masks"]) for t in targets]
    if state.pseudo_conf is not None:
        for s, teacher, ref in zip(samples, teacher_labels, refined):
            if "truth" in s:
                truth = s["truth"].to(state.device, non_blocking=True)
                state.pseudo_conf[0] += refine.label_confusion(teacher, truth)
                state.pseudo_conf[1] += refine.label_confusion(ref.to(state.device), truth)
    if keep:
        records = [(s["image"].permute(1, 2, 0).numpy(), teacher, ref)
                   for s, teacher, ref in zip(samples, teacher_labels, refined)]
        state.records = (records + (state.records or []))[:4]


def pseudo_label_quality(state) -> dict:
    """At a log step: the quality of the window's pseudo labels against the hidden truth (summed over the ranks),
    as flat metrics.jsonl keys, then the counts restart. {} without hidden truth or without a scored pixel.
    pseudo_teacher_mIoU / _acc: the teacher's argmax; pseudo_refined_mIoU (a dropped pixel counts as a miss), _acc (of
    the pixels refinement kept) and pseudo_dropped (the share it left at ignore). Every rank must call it."""
    if state.pseudo_conf is None:
        return {}
    conf = state.pseudo_conf.clone()
    if state.world > 1:
        dist.all_reduce(conf)
    state.pseudo_conf.zero_()
    conf = conf.cpu()  # one transfer per log step for both
    teacher, refined = refine.label_quality(conf[0]), refine.label_quality(conf[1])
    if not teacher["pixels"]:
        return {}
    return {"pseudo_teacher_mIoU": teacher["mIoU"], "pseudo_teacher_acc": teacher["acc"],
            "pseudo_refined_mIoU": refined["mIoU"], "pseudo_refined_acc": refined["acc"],
            "pseudo_dropped": refined["dropped"]}


def plot_curves(metrics_path, png_path):
    """Loss, mIoU per evaluation set and, when the generated images have hidden truth (ToyCity), the pseudo labels'
    quality (teacher vs refined mIoU, the share refinement dropped) against the iteration, from metrics.jsonl."""
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path, say=lambda *a, **k: None)  # torn lines were reported at resume
    pseudo = [r for r in records if "pseudo_teacher_mIoU" in r]
    fig = Figure(figsize=(15 if pseudo else 10, 4))
    ax_loss, ax_miou, *ax_pseudo = fig.subplots(1, 3 if pseudo else 2)
    train = [r for r in records if "loss" in r]
    marker = "o" if len(train) < 3 else None  # a line of one point draws nothing
    ax_loss.plot([r["iter"] for r in train], [r["loss"] for r in train], label="total", marker=marker)
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        ax_loss.plot([r["iter"] for r in train], [r.get(key, math.nan) for r in train], label=key, lw=0.8,
                     marker=marker)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training loss")
    ax_loss.legend()
    evals = [r for r in records if "eval" in r]
    for name in (evals[0]["eval"] if evals else {}):
        ax_miou.plot([r["iter"] for r in evals], [100 * r["eval"][name]["mIoU"] for r in evals], "o-", label=name)
    ax_miou.set(xlabel="iteration", ylabel="mIoU (%)", title="evaluation")
    if evals:
        ax_miou.legend()
    if pseudo:
        ax, its, marker = ax_pseudo[0], [r["iter"] for r in pseudo], "o" if len(pseudo) < 3 else None
        for key, label in (("pseudo_teacher_mIoU", "teacher mIoU"), ("pseudo_refined_mIoU", "refined mIoU"),
                           ("pseudo_dropped", "dropped by refinement")):
            ax.plot(its, [100 * r[key] for r in pseudo], label=label, marker=marker)
        ax.set(xlabel="iteration", ylabel="%", title="pseudo labels vs hidden truth")
        ax.legend()
    fig.tight_layout()
    files.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=90))


def plot_pseudo_labels(records, png_path):
    """Generated samples, one row each: image | teacher argmax | refined pseudo label, with a legend of the classes
    that appear (refine.panel, the panel of refine.py's CLI too); black = no class (ignored, or dropped by the
    refinement rules, docs/official_code.md §5.3)."""
    # the labels are kept on the training device (no copy per iteration); they reach the host here, at a save
    records = [(np.asarray(image), _host(teacher), _host(refined)) for image, teacher, refined in records]
    width = max(image.shape[1] for image, _, _ in records)
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255)  # noqa: E731
    rows = [[pad(image), pad(data.colorize(teacher)), pad(data.colorize(refined))] for image, teacher, refined in
            records]
    grid = refine.panel(rows, ["generated image", "teacher", "refined"],
                        [m for _, t, r in records for m in (t, r)], data.CLASSES, data.PALETTE)
    files.save_png(grid, png_path)


def _host(x) -> np.ndarray:
    """A numpy copy of a tensor on any device (or of an array)."""
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def write_plots(cfg, state, paths):
    if not cfg.plots:
        return
    if paths["metrics"].is_file():
        plot_curves(paths["metrics"], paths["curves"])
    if state.records:
        plot_pseudo_labels(state.records, paths["pseudo_labels"])


# ---- evaluation during training ----


def build_eval_sets(cfg) -> dict:
    """The test sets (reference §1.4) with the §8.1 test resize; the first eval_max images when eval_max > 0."""
    sets = {}
    for name in cfg.eval_sets if cfg.eval_every else ():
        ds = data.build_dataset(name, cfg.data_root, transform=data.TestTransform(cfg.test_short_side))
        if cfg.eval_max:
            ds = data.SegDataset(ds.name, ds.items[:cfg.eval_max], ds.transform)
        sets[name] = ds
    return sets


class EvalLoader:
    """One DataLoader over every evaluation set (this rank's images of each, set after set), built once per run with
    persistent workers: an evaluation during training no longer starts len(sets) x --workers processes. `per_set()`
    gives one iterator per set, in order, for evaluate.evaluate_model(loader=...)."""

    def __init__(self, sets: dict, workers: int = 0, pin_memory: bool = False):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        parts = {n: torch.utils.data.Subset(ds, range(rank, len(ds), world)) for n, ds in sets.items()}
        self.counts = {n: len(p) for n, p in parts.items()}
        self.loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(list(parts.values())) if parts
                                                  else [], batch_size=None, num_workers=workers,
                                                  pin_memory=pin_memory, persistent_workers=workers > 0)

    def per_set(self) -> dict:
        samples = iter(self.loader)
        return {n: itertools.islice(samples, c) for n, c in self.counts.items()}


def evaluate_sets(model, sets, device, progress, workers=0, cfg=None, loader=None, stop=None) -> dict:
    """{set: {"mIoU", "mIoU16", "mAcc", "aAcc", "protocol"}} (fractions); every rank must call it (confusions are
    summed). `workers` DataLoader processes read and resize the images (--workers), off the training process; `loader`
    (an EvalLoader) reuses them. `cfg` (TrainConfig) gives --eval-protocol, --slide-window/--slide-stride and
    --test-short-side (default: whole image). `stop()` is polled every few images (evaluate.evaluate_model): True
    raises evaluate.Stopped. cuDNN autotuning is off here (test images come in many sizes)."""
    protocol, window, stride, short = ("whole", 512, 341, 1024) if cfg is None else \
        (cfg.eval_protocol, cfg.slide_window, cfg.slide_stride, cfg.test_short_side)
    out, benchmark = {}, torch.backends.cudnn.benchmark
    loaders = (loader or EvalLoader(sets, workers, torch.device(device).type == "cuda")).per_set()
    torch.backends.cudnn.benchmark = False
    try:
        for name, ds in sets.items():
            m = evaluate.evaluate_model(model, ds, device=device, progress=progress, loader=loaders[name], stop=stop,
                                        protocol=protocol, window=window, stride=stride)
            out[name] = {k: m[k] for k in ("mIoU", "mIoU16", "mAcc", "aAcc")}
            out[name]["protocol"] = evaluate.protocol_name(protocol, short, window, stride)
            out[name]["IoU"] = {c: None if math.isnan(v) else v for c, v in zip(data.CLASSES, m["IoU"].tolist())}
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return out


# ---- the start of a run, the end of an iteration ----


def log_start(say, cfg, info: dict, notes=()):
    """log.txt's first lines: the run summary, the notes (--recipe) and warnings, and with --allow-config-change the
    changed settings, which are also appended to the config record's history (config.json)."""
    say(f"[train] {cfg.source} -> {cfg.out}: phase {cfg.phase}, preset {cfg.preset}, iterations "
        f"{cfg.iters_warmup} warmup / {cfg.iters_joint} joint, batch {cfg.batch_size}, crop {cfg.crop_size}, lr "
        f"{cfg.lr} ({cfg.schedule}), {info['n_source']} source images, {info['n_generated']} generated (p_gen "
        f"{info['p_gen']:.3f}), SAM {cfg.sam}, eval {', '.join(cfg.eval_sets) if cfg.eval_every else 'off'}")
    for line in (*notes, *info["warnings"]):
        say(f"[train] {line}", err=line.startswith("warning"))
    if info["changes"]:
        changed = {k: [o, n] for k, (o, n) in info["changes"].items()}
        at = {ph: r["iteration"] for ph, r in info["resume"].items()}
        info["config"]["history"].append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_at": at,
                                          "changed": changed})
        say("[train] --allow-config-change: from the resumed iteration "
            + ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changed.items()), err=True)


def after_iteration(state, env, inputs, log, say, stop, done, max_iter, paths, save=True) -> Optional[dict]:
    """After `done` iterations: evaluate (every --eval-every and at the end), save last.pt (every --save-every, at each
    snapshot, at the end and on a stop signal) plus a model_NNNNNNN.pt snapshot every --ckpt-every. After a signal
    (also one that arrives during the evaluation, which polls it): rank 0 saves last.pt, every rank waits for that,
    then Interrupted. Returns the evaluation's results, None when there was none. save=False: evaluate only (the
    evaluation a stop skipped, redone at --resume)."""
    cfg, phase, main_rank, results, stopping = state.cfg, state.phase, env.rank == 0, None, False
    if cfg.eval_every and (done % cfg.eval_every == 0 or done == max_iter):
        try:
            results = evaluate_sets(state.model, inputs["eval_sets"], env.device, cfg.progress and main_rank,
                                    cfg.workers, cfg, loader=inputs.get("eval_loader"),
                                    stop=lambda: should_stop(stop, env))
        except evaluate.Stopped:  # every rank got it at the same image (the polls are collective)
            stopping = True
        if results is not None:
            log.write({"phase": phase, "iter": done, "eval": results})
            if main_rank:
                described = evaluate.protocol_name(cfg.eval_protocol, cfg.test_short_side, cfg.slide_window,
                                                   cfg.slide_stride)
                say(f"[{phase} {done}] " + ", ".join(f"{n} {100 * m['mIoU']:.2f}" for n, m in results.items())
                    + f" mIoU ({described})")
    stopping = stopping or should_stop(stop, env)
    if save and (done % cfg.save_every == 0 or done % cfg.ckpt_every == 0 or done == max_iter or stopping):
        if main_rank:
            try:
                save_state(paths["last"], state, done)
                if done % cfg.ckpt_every == 0:  # official PeriodicCheckpointer snapshot (weights only)
                    checkpoints.save_checkpoint(paths["last"].parent / f"model_{done:07d}.pt", state.model)
            except OSError as e:  # a full disk, a folder turned read-only: stop with the path and the free space
                raise TrainError(f"{e}. Stopped at {phase} iteration {done}; the last good checkpoint is "
                                 f"{last_good(state)}. Free some space (or fix the folder), then rerun with "
                                 f"--resume") from e
            write_plots(cfg, state, paths)
        state.saved = done
    if stopping:
        barrier(env)  # every rank waits until rank 0's last.pt is in place (torchrun stops all when one exits)
        stop.finish()
        name = signal.Signals(stop.signum).name if stop.signum else "a stop signal"
        if main_rank:
            msg = f"{name}: saved {paths['last']} at iteration {done}; resume with --resume" if save else \
                f"{name}: {paths['last']} (iteration {done}) is kept; resume with --resume"
            say(f"[train] {msg}", echo=False)  # main prints it
        else:  # only rank 0 writes: the others say what they did
            msg = f"{name}: rank {env.rank} stopped after iteration {done} (rank 0 writes {paths['last']})"
        raise Interrupted(msg, stop.signum)
    return results


def missed_evaluation(cfg, metrics_path, start, max_iter) -> bool:
    """Whether iteration `start` (a resumed run's) was due an evaluation that metrics.jsonl lacks: a stop signal
    during that evaluation skipped it; the resumed run does it first."""
    due = cfg.eval_every and (start % cfg.eval_every == 0 or start == max_iter)
    if not due or not Path(metrics_path).is_file():
        return False
    return not any(r.get("iter") == start and "eval" in r for r in read_metrics(metrics_path, lambda *a, **k: None))



def exit_on_error(prog: str, cfg, job):
    """Run job() -> its result; a run that stops exits with train.py's codes (its main's docstring) and one message:
    2 for Problems (cannot start), the signal's code for Interrupted, 1 for TrainError and OSError. cfg.debug
    re-raises instead (the traceback)."""
    try:
        return job()
    except (Problems, TrainError, Interrupted) as e:
        if cfg.debug:
            raise
        code = 2 if isinstance(e, Problems) else e.code if isinstance(e, Interrupted) else 1
        # one message per job: another rank's problems print on that rank only; a TrainError (every rank raises the
        # same one) in full on rank 0, as one line on the others; each rank says how it stopped
        rank = os.environ.get("RANK", "0")
        if isinstance(e, TrainError) and rank != "0":
            print(f"{prog}: rank {rank}: {first_line(e)}", file=sys.stderr, flush=True)
        elif not getattr(e, "quiet", False):
            print(e if isinstance(e, Problems) else f"{prog}: {e}" + (f" (exit {code})" if code != 1 else ""),
                  file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    except OSError as e:  # e.g. a full disk under log.txt, metrics.jsonl or a plot: one line, exit 1
        if cfg.debug:
            raise
        print(f"{prog}: {os_error_message(e, cfg.out)}. Then rerun the same command (with --resume once the run has "
              f"started)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None

def any_rank(env, flag: bool) -> bool:
    """Whether `flag` is True on any rank (a MAX all-reduce over the control group; every rank must call it)."""
    if env.world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control)
    return bool(t[0] > 0)
