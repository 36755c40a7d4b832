"""The GPU path's smaller defects (issue 15), checked on the CPU: a CUDA run whose csrc/ does not build stops before
training with the compiler's first error (finding 4), the resolved op implementations go into log.txt, evaluation
reuses its reader processes and sets TF32 like training, build messages print once per job (finding 7)."""
import os
import re
import textwrap
from types import SimpleNamespace

import pytest
import torch

import clouds
import data
import evaluate
import ops
from runtools import preflight
from runtools import runs
import train
from runtools import train_config

NINJA_LOG = textwrap.dedent("""\
    Error building extension 'clouds_ops_cuda': [1/6] c++ -MMD -MF library.o.d -DTORCH_EXTENSION_NAME=clouds_ops_cuda \
-O3 -fopenmp -DWITH_CUDA -c /work/csrc/library.cpp -o library.o
    [2/6] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -O3 -c /work/csrc/ms_deform_attn_cuda.cu -o \
ms_deform_attn_cuda.cuda.o
    FAILED: ms_deform_attn_cuda.cuda.o
    /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -O3 -c /work/csrc/ms_deform_attn_cuda.cu -o \
ms_deform_attn_cuda.cuda.o
    /work/csrc/ms_deform_attn_cuda.cu(42): error: identifier "sampel" is undefined
    /work/csrc/ms_deform_attn_cuda.cu(57): error: expected a ";"
    2 errors detected in the compilation of "/work/csrc/ms_deform_attn_cuda.cu".
    ninja: build stopped: subcommand failed.
    """)


def cuda_env():
    return SimpleNamespace(device=torch.device("cuda", 0), rank=0, world=1)


@pytest.fixture
def fresh_ops(monkeypatch):
    monkeypatch.setattr(ops, "_auto_error", None)
    monkeypatch.delenv("CLOUDS_OPS_IMPL", raising=False)


# ---- finding 4: a CUDA run whose extension does not build ----


def test_cuda_build_failure_is_a_problem_with_the_first_compiler_error(monkeypatch, fresh_ops):
    def fail(with_cuda=None, verbose=False):
        raise RuntimeError(NINJA_LOG)

    monkeypatch.setattr(ops, "load_extension", fail)
    monkeypatch.setattr(ops, "nvcc_problem", lambda: None)
    cfg = train_config.parse_config([])
    problems, warnings = preflight.ops_problems(cfg, cuda_env())
    (problem,) = problems
    assert 'ms_deform_attn_cuda.cu(42): error: identifier "sampel" is undefined' in problem
    assert "(57)" not in problem and "--allow-ops-fallback" in problem and not warnings
    # the flag accepts the slow path: a warning, and "auto" then runs the references without building again
    problems, warnings = preflight.ops_problems(train_config.parse_config(["--allow-ops-fallback"]), cuda_env())
    assert not problems and "--allow-ops-fallback" in warnings[0] and "sampel" in warnings[0]
    impls = ops.resolved_impls()
    assert set(impls) == set(ops.OPS) and all("reference" in v and "sampel" in v for v in impls.values())
    # a CPU run is not held up: its build is tried at first use (with a fallback warning)
    assert preflight.ops_problems(cfg, SimpleNamespace(device=torch.device("cpu"), rank=0, world=1)) == ([], [])


def test_nvcc_of_another_cuda_major_is_named(tmp_path, monkeypatch):
    home = tmp_path / "cuda-12.4"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    problem = ops.nvcc_problem()
    assert "CUDA 12.4" in problem and "CUDA 13.0" in problem and "module load cuda/13.0" in problem
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert ops.nvcc_problem() is None  # minor versions may differ (torch warns, and builds)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    assert ops.nvcc_problem().startswith("nvcc not found")


def test_first_error_of_a_real_failed_build(tmp_path, monkeypatch):
    """A source that does not compile, through cpp_extension as csrc/ is built: the first error line is the one
    reported (not the compiler command, not a later error)."""
    from torch.utils import cpp_extension

    source = tmp_path / "broken.cpp"
    source.write_text("int clouds_broken( { return 1; }\nint later_error() { return undefined_name; }\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.raises(RuntimeError) as err:
        cpp_extension.load(name="clouds_broken", sources=[str(source)], is_python_module=False)
    first = ops.first_error(err.value)
    assert re.search(r"broken\.cpp:1:\d+: error", first), first
    assert "undefined_name" not in first


def test_log_names_the_implementation_of_every_op(toy_root, tmp_path):
    train.main(["--preset", "tiny", "--train-backbone", "--crop-size", "64", "--batch-size", "2", "--workers", "0",
                "--no-progress", "--data-root", str(toy_root), "--out", str(tmp_path), "--phase", "warmup",
                "--iters-warmup", "1", "--eval-every", "0", "--no-plots"])
    line = next(ln for ln in (tmp_path / "log.txt").read_text().splitlines() if "[train] ops:" in ln)
    expected = "extension" if os.environ.get("CLOUDS_OPS_IMPL", "auto") != "ref" else "reference"
    assert all(f"{op} {expected}" in line for op in ops.OPS), line


# ---- finding 7 ----


def test_build_messages_and_fallback_warnings_once_per_job(monkeypatch, capsys, fresh_ops):
    import warnings

    def fail(with_cuda=None, verbose=False):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(ops, "load_extension", fail)
    for rank, expected in (("1", 0), ("0", 1)):  # torchrun's RANK: only rank 0 prints and warns
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(ops, "_auto_error", None)
        ops._status("Setting up clouds ops ...")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ops._use_ext("auto") is False
        assert len([w for w in caught if "no compiler" in str(w.message)]) == expected
        assert capsys.readouterr().out.count("Setting up") == expected


def test_evaluation_reuses_one_loader_and_splits_it_by_set(toy_root, monkeypatch):
    """runs.EvalLoader: one DataLoader (persistent workers) over every set; two evaluations through it build no
    other loader and give, set by set, what evaluate_model gives with its own loader."""
    sets = {name: data.build_dataset(name, toy_root, transform=data.TestTransform(64)) for name in
            ("cityscapes", "mapillary")}
    torch.manual_seed(0)
    model = clouds.build_model("tiny")
    reference = {n: evaluate.evaluate_model(model, ds, progress=False)["conf"] for n, ds in sets.items()}
    assert not torch.equal(*reference.values())  # the two sets give different confusions
    loader, built = runs.EvalLoader(sets, workers=1), []
    init = torch.utils.data.DataLoader.__init__
    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__",
                        lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    for _ in range(2):
        results = runs.evaluate_sets(model, sets, "cpu", False, workers=1, loader=loader)
        for name, conf in reference.items():
            iou = torch.tensor([float("nan") if v is None else v for v in results[name]["IoU"].values()],
                               dtype=torch.float64)
            torch.testing.assert_close(iou, evaluate.compute_metrics(conf)["IoU"], equal_nan=True)
    assert built == []


def test_standalone_evaluation_sets_tf32_as_training(tmp_path, toy_root, monkeypatch):
    """evaluate.py sets the TF32 flags train.py sets (--tf32, on by default): the same speed and last digits."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        evaluate.set_tf32("cuda:0", True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        evaluate.set_tf32("cuda", False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        evaluate.set_tf32("cpu", True)
        assert not torch.backends.cuda.matmul.allow_tf32  # the CPU leaves them alone
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    calls = []
    monkeypatch.setattr(evaluate, "set_tf32", lambda device, tf32: calls.append((device, tf32)))
    import checkpoints
    checkpoints.save_checkpoint(tmp_path / "w.pt", clouds.build_model("tiny"))
    evaluate.main(["--weights", str(tmp_path / "w.pt"), "--datasets", "cityscapes", "--data-root", str(toy_root),
                   "--short-side", "64", "--device", "cpu", "--workers", "0", "--no-progress"])
    assert calls == [("cpu", True)]


# ---- finding 3: a stop during an evaluation ----


def test_stop_during_evaluation_saves_then_resume_redoes_the_evaluation(toy_root, tmp_path, monkeypatch, capsys):
    """SIGTERM while the evaluation at iteration 2 runs: it stops at its next image (not after the whole set), last.pt
    is saved at 2 and the run exits 143; --resume evaluates iteration 2 first, then goes on."""
    import json
    import signal

    argv = ["--preset", "tiny", "--train-backbone", "--crop-size", "64", "--batch-size", "2", "--workers", "0",
            "--no-progress", "--test-short-side", "64", "--log-every", "1", "--data-root", str(toy_root), "--out",
            str(tmp_path),
            "--phase", "warmup", "--iters-warmup", "3", "--eval-every", "2", "--eval-sets", "cityscapes",
            "--no-plots"]
    predict, seen = clouds.CLOUDS.predict, []

    def spy(model, images, head=None, **kwargs):
        seen.append(len(seen))
        if len(seen) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first of 3 images is predicted
        return predict(model, images, head=head, **kwargs)

    monkeypatch.setattr(clouds.CLOUDS, "predict", spy)
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert exit_.value.code == 143 and len(seen) == 1  # the 2 other images were never predicted
    assert f"SIGTERM: saved {tmp_path / 'last.pt'} at iteration 2; resume with --resume (exit 143)" in \
        capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2] and not any("eval" in r for r in records)
    monkeypatch.setattr(clouds.CLOUDS, "predict", predict)
    train.main([*argv, "--resume"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], "eval" in r) for r in records] == [(1, False), (2, False), (2, True), (3, False), (3, True)]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # in-process: the handlers are restored


def test_repeated_signals():
    """runs.StopFlag inside the training loop (armed): the first signal only sets the flag; a repeat within
    REPEAT_GRACE s is a forwarded copy (torchrun re-sends the Ctrl-C its workers already got from the terminal) and is
    ignored; a later Ctrl-C aborts; repeated SIGTERMs never abort; after the stop is saved (finish) nothing does. Not
    armed (preparing the run), a signal stops at once."""
    import signal
    import time

    def send(sig):
        os.kill(os.getpid(), sig)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode

    with runs.StopFlag() as stop:
        stop.armed = True
        send(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        try:
            send(signal.SIGINT)  # the copy torchrun forwards, milliseconds later
        except KeyboardInterrupt:
            pytest.fail("a forwarded copy of the first Ctrl-C aborted the run")
        stop.since -= runs.REPEAT_GRACE + 1
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C, seconds later: abort
            send(signal.SIGINT)
    with runs.StopFlag() as stop:
        stop.armed = True
        send(signal.SIGTERM)
        stop.since -= runs.REPEAT_GRACE + 1
        send(signal.SIGTERM)
        assert runs.Interrupted("", stop.signum).code == 143 and runs.Interrupted("", signal.SIGINT).code == 130
        stop.finish()
        send(signal.SIGINT)
    with runs.StopFlag() as stop:
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
