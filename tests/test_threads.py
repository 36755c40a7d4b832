"""The CPU thread setting of issue 18 (ops.cpu_threads): the toy recipe runs one intra-op thread, applied by the entry
points (train.py, the demo) for the whole run and restored afterwards; CLOUDS_CPU_THREADS overrides it. No timings
here (bench/bench_load.py measures what it buys): these pin where the setting is applied."""
import pytest
import torch

import ops
import train
from runtools.train_config import RECIPES, TOY
from toyworld import demo


@pytest.fixture
def two_threads(monkeypatch):
    """torch at 2 intra-op threads (the default on the 2-core CI machine), whatever an earlier test left."""
    monkeypatch.delenv(ops.THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_cpu_threads_sets_and_restores(two_threads, monkeypatch):
    with ops.cpu_threads(1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with ops.cpu_threads(0) as n:  # 0: torch's default, untouched
        assert n == 2
    monkeypatch.setenv(ops.THREADS_ENV, "default")  # the setting before issue 18 (bench_load.py's "before")
    with ops.cpu_threads(1) as n:
        assert n == 2
    monkeypatch.setenv(ops.THREADS_ENV, "1")
    with ops.cpu_threads(0) as n:
        assert n == 1
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(ops.THREADS_ENV, "two")
    with pytest.raises(ValueError, match="CLOUDS_CPU_THREADS"):
        with ops.cpu_threads(1):
            pass


def test_the_toy_recipe_runs_one_thread():
    assert TOY["cpu_threads"] == 1 and RECIPES["toy"]["cpu_threads"] == 1


def _record_threads(monkeypatch, module, name, result):
    seen = []

    def fake(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return result
    monkeypatch.setattr(module, name, fake)
    return seen


@pytest.mark.parametrize("argv, expected", [(["--recipe", "toy"], 1), ([], 2), (["--cpu-threads", "1"], 1)])
def test_train_runs_with_the_configured_threads(two_threads, monkeypatch, tmp_path, argv, expected):
    seen = _record_threads(monkeypatch, train, "_train", {"final": {}})
    train.main([*argv, "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert seen == [expected], f"train ran with {seen} threads, want {expected} ({argv})"
    assert torch.get_num_threads() == 2, "the thread count is restored when train returns"


def test_the_old_setting_is_selectable(two_threads, monkeypatch, tmp_path):
    monkeypatch.setenv(ops.THREADS_ENV, "default")
    seen = _record_threads(monkeypatch, train, "_train", {"final": {}})
    train.main(["--recipe", "toy", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert seen == [2]


def test_the_demo_runs_every_stage_with_the_toy_threads(two_threads, monkeypatch, tmp_path):
    seen = _record_threads(monkeypatch, demo, "run_demo", {})
    demo.main(["--demo-out", str(tmp_path / "demo")])
    assert seen == [TOY["cpu_threads"]]
    assert torch.get_num_threads() == 2
