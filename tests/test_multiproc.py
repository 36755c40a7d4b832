"""Several processes on the CPU (gloo), as on a cluster (issue 15): torchrun with 2 ranks running `train.py` as a
script (through tests/rank_hooks.py, which records each rank's output and slows iterations so a signal lands where
the test wants it), and a killed extension build.

- stop signals (finding 3): SIGTERM to the process group, to the workers only, to torchrun only during an
  evaluation: rank 0 saves last.pt once, every rank waits for it and exits 143, no other rank claims a save;
- DDP end to end with plots, evaluation and a save every iteration, then --resume;
- the preflight race (finding 6): rank 1's preflight is slow; rank 0 writes nothing into --out before it ended;
- a build killed half-way leaves no lock behind (finding 2): the next build, waiting on it, completes.
"""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import generate

ROOT = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).resolve().parent / "rank_hooks.py"
TINY = ["--preset", "tiny", "--train-backbone", "--crop-size", "64", "--batch-size", "2", "--workers", "0",
        "--test-short-side", "64", "--log-every", "1", "--no-progress", "--seed", "0", "--device", "cpu"]


def torchrun(hooks: Path, argv, **env):
    """torchrun --nproc_per_node 2 tests/rank_hooks.py ARGV in its own process group (a job step's processes)."""
    hooks.mkdir(parents=True, exist_ok=True)
    environ = {**os.environ, "HOOKS_DIR": str(hooks), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")),
               **{k: str(v) for k, v in env.items()}}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.1", str(HOOKS), *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(path: Path, proc, timeout=120):
    start = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited {proc.returncode} before {path.name}:\n{proc.stdout.read()}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError(f"no {path.name} after {timeout} s")
        time.sleep(0.05)


def finish(proc, timeout=120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return out


def log(hooks: Path, rank: int) -> str:
    return (hooks / f"out_{rank}.log").read_text()


@pytest.fixture(scope="module")
def data_root(toy_root, tmp_path_factory):
    """toy GTA as the source and a 12-image toy Cityscapes val set (the 3 images copied under new names)."""
    root = tmp_path_factory.mktemp("multiproc_data")
    (root / "gta5").symlink_to(toy_root / "gta5")
    src = toy_root / "cityscapes"
    for image in sorted((src / "leftImg8bit" / "val").rglob("*_leftImg8bit.png")):
        city = image.parent.name
        stem = image.name[:-len("_leftImg8bit.png")]
        label = src / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png"
        for k in range(4):
            for folder, source, suffix in (("leftImg8bit", image, "_leftImg8bit.png"),
                                           ("gtFine", label, "_gtFine_labelTrainIds.png")):
                target = root / "cityscapes" / folder / "val" / city / f"{stem}x{k}{suffix}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target)
    return root


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiproc_generated")
    generate.main(["--backend", "toy", "--out", str(out), "--num-images", "4", "--height", "64", "--width", "64",
                   "--no-progress"])
    return out


# ---- stop signals ----


@pytest.mark.parametrize("target", ["group", "workers", "torchrun_during_evaluation"])
def test_stop_signal_saves_once_and_every_rank_exits_143(target, data_root, tmp_path):
    """SIGTERM to the whole job step (a scheduler's preemption: torchrun forwards it to workers that already got
    it), to the workers only, or to torchrun only (it forwards it once) while an evaluation runs: the iteration (or
    the evaluation, which polls the flag) ends, rank 0 saves last.pt at that iteration, rank 1 waits for it, both
    exit 143 and only rank 0 says it saved."""
    hooks, out = tmp_path / "hooks", tmp_path / "out"
    during_eval = target.startswith("torchrun")
    argv = [*TINY, "--data-root", str(data_root), "--out", str(out), "--phase", "warmup", "--iters-warmup", "60",
            "--eval-every", "3" if during_eval else "0", "--eval-sets", "cityscapes", "--save-every", "1000"]
    proc = torchrun(hooks, argv, HOOKS_SLOW=0.4 if during_eval else 0.3,
                    HOOKS_SLOW_SAVE=2 if target == "workers" else 0)
    wait_for(hooks / ("eval_0" if during_eval else "done_0_2"), proc)
    if during_eval:
        time.sleep(0.5)  # inside the first image of 6 per rank (0.4 s each)
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    elif target == "workers":
        for rank in (0, 1):
            os.kill(int((hooks / f"pid_{rank}").read_text()), signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    output = finish(proc)
    rank0, rank1 = log(hooks, 0), log(hooks, 1)
    saved = [line for line in rank0.splitlines() if "SIGTERM: saved" in line]
    assert len(saved) == 1 and saved[0].endswith("; resume with --resume (exit 143)"), rank0[-3000:]
    done = int(saved[0].split(" at iteration ")[1].split(";")[0])
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["trainer"]["iteration"] == done
    assert f"SIGTERM: rank 1 stopped after iteration {done}" in rank1 and "saved" not in rank1, rank1[-3000:]
    assert "(exit 143)" in rank1
    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert f'"iter": {done},' in metrics[-1]
    if during_eval:  # stopped at the next image's poll, not after the whole evaluation (6 images per rank)
        read = [len((hooks / f"evalimg_{rank}").read_text().splitlines()) for rank in (0, 1)]
        assert done == 3 and '"eval"' not in "".join(metrics) and max(read) < 6, (read, metrics)
    if target == "workers":  # torchrun saw both workers fail with the documented code; a slow save (2 s) held rank 1
        assert float((hooks / "stopped_1").read_text()) >= float((hooks / "saved_0").read_text())
        assert output.count("exitcode  : 143") + output.count("exitcode: 143") >= 2, output[-3000:]


# ---- DDP end to end ----


def test_ddp_with_plots_evaluation_and_saves_then_resume(data_root, gen_dir, tmp_path):
    """2 ranks, warmup + joint with the default plots, an evaluation and a save after every iteration (toy SAM),
    then --resume with one more joint iteration: every file appears, the resumed run starts at iteration 2."""
    hooks, out = tmp_path / "hooks", tmp_path / "out"
    argv = [*TINY, "--data-root", str(data_root), "--out", str(out), "--phase", "all", "--iters-warmup", "1",
            "--iters-joint", "2", "--eval-every", "1", "--eval-sets", "cityscapes", "--eval-max", "2",
            "--save-every", "1", "--synthetic", str(gen_dir), "--sam", "toy", "--sam-min-area", "20",
            "--p-gen", "0.5"]
    proc = torchrun(hooks, argv)
    output = finish(proc)
    assert proc.returncode == 0, output[-2000:] + log(hooks, 0)[-3000:] + log(hooks, 1)[-3000:]
    for name in ("last.pt", "model_final.pt", "curves.png", "pseudo_labels.png", "metrics.jsonl"):
        assert (out / "joint" / name).is_file(), name
    proc = torchrun(tmp_path / "hooks2", [*argv, "--iters-joint", "3", "--resume", "--allow-config-change"])
    output = finish(proc)
    assert proc.returncode == 0, output[-2000:] + log(tmp_path / "hooks2", 0)[-3000:]
    assert "resuming joint from iteration 2" in log(tmp_path / "hooks2", 0)
    last = torch.load(out / "joint" / "last.pt", map_location="cpu", weights_only=True)
    assert last["trainer"]["iteration"] == 3
    evals = [line for line in (out / "joint" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [int(line.split('"iter": ')[1].split(",")[0]) for line in evals] == [1, 2, 3]


# ---- the preflight race ----


def test_rank0_writes_nothing_before_every_rank_checked_out(data_root, tmp_path):
    """Rank 1's preflight takes 4 s longer. Before issue 15 rank 0 wrote config.json meanwhile and rank 1 refused
    "--out already holds a run"; now rank 0 writes log.txt and config.json only after every rank's verdict."""
    hooks, out = tmp_path / "hooks", tmp_path / "out"
    argv = [*TINY, "--data-root", str(data_root), "--out", str(out), "--phase", "warmup", "--iters-warmup", "1",
            "--eval-every", "0"]
    proc = torchrun(hooks, argv, HOOKS_DELAY_RANK1_PREFLIGHT=4)
    output = finish(proc)
    assert proc.returncode == 0, output[-2000:] + log(hooks, 1)[-3000:]
    checked = float((hooks / "preflight_1").read_text())
    for name in ("log.txt", "config.json"):
        created = min(p.stat().st_mtime for p in [out / name])
        assert created >= checked, f"{name} written {checked - created:.2f} s before rank 1 had checked --out"
    assert "already holds a run" not in log(hooks, 1)


def test_a_problem_on_rank_1_alone_stops_rank_0_before_it_writes(data_root, tmp_path):
    """Rank 1 alone finds a problem (a dataset missing on its node), 2 s after rank 0 passed its own preflight. Rank 0
    waits for the ranks' verdict and stops quietly: it never takes --out's lock. Deciding on its own verdict, it would
    lock --out and wait at a collective that rank 1 never joins."""
    hooks, out = tmp_path / "hooks", tmp_path / "out"
    argv = [*TINY, "--data-root", str(data_root), "--out", str(out), "--phase", "warmup", "--iters-warmup", "1",
            "--eval-every", "0"]
    proc = torchrun(hooks, argv, HOOKS_DELAY_RANK1_PREFLIGHT=2, HOOKS_RANK1_PROBLEM="gta5 is missing on node 1")
    output = finish(proc)
    assert proc.returncode != 0, output[-2000:]
    assert "gta5 is missing on node 1" in log(hooks, 1) and (hooks / "preflight_0").exists()
    assert not (hooks / "locked_0").exists(), "rank 0 took the lock before rank 1's verdict\n" + log(hooks, 0)[-3000:]
    assert "Traceback" not in log(hooks, 0), log(hooks, 0)[-3000:]
    assert not (out / "log.txt").exists() and not (out / "config.json").exists()


# ---- a killed build ----


def test_killed_build_leaves_no_lock(tmp_path):
    """A JIT build killed while it holds cpp_extension's lock (a compiler that hangs, then SIGKILL, as an OOM killer
    or a scheduler would) does not block the next build: the lock is an OS lock the kernel drops with its holder,
    and a second process already waiting on it builds and loads the extension."""
    source = tmp_path / "probe.cpp"
    source.write_text("int clouds_probe() { return 42; }\n")
    slow_cxx = tmp_path / "slow_cxx"
    slow_cxx.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for a in "$@"; do [ "$a" = "-c" ] && {{ touch {tmp_path}/compiling; sleep 600; }}; done
        exec c++ "$@"
        """))
    slow_cxx.chmod(0o755)
    build = textwrap.dedent(f"""\
        import sys
        from torch.utils import cpp_extension
        cpp_extension.load(name="clouds_probe", sources=[{str(source)!r}], is_python_module=False)
        print("built", flush=True)
        """)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    first = subprocess.Popen([sys.executable, "-c", build], env={**env, "CXX": str(slow_cxx)},
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "compiling").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() else "slow"
        time.sleep(0.05)
    second = subprocess.Popen([sys.executable, "-c", build], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    assert second.poll() is None  # it waits for the lock the first build holds
    os.killpg(first.pid, signal.SIGKILL)  # the build and its compiler die mid-way
    first.wait()
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0 and "built" in out, out
