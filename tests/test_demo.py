"""toyworld/demo.py: the ablation table's spread over seeds (hand-computed), and its command line."""
import json
import math

import pytest

from toyworld import demo


def test_spread_is_the_mean_and_sample_std_over_seeds():
    per_seed = [{"row": {"a": 10.0, "b": 1.0}}, {"row": {"a": 12.0, "b": 1.0}}, {"row": {"a": 17.0, "b": 4.0}}]
    table = demo.spread(per_seed)
    # a: mean 13; deviations -3, -1, 4 -> squares 9 + 1 + 16 = 26; / (3 - 1) = 13 -> std sqrt(13)
    assert table["row"]["a"] == pytest.approx((13.0, math.sqrt(13)))
    # b: mean 2; deviations -1, -1, 2 -> 1 + 1 + 4 = 6; / 2 = 3 -> std sqrt(3)
    assert table["row"]["b"] == pytest.approx((2.0, math.sqrt(3)))
    assert demo.spread(per_seed[:1])["row"]["a"] == (10.0, None)  # one seed: no spread


def test_markdown_table_prints_the_spread():
    md = demo.markdown_table({"warmup": {"x": (13.0, math.sqrt(13)), "mean": (2.0, None)}}, "caption")
    assert md.splitlines()[0] == "caption"
    assert md.splitlines()[-1] == "| warmup | 13.00 ± 3.61 | 2.00 |"


def test_seeds_below_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--seeds", "0"])
    assert e.value.code == 2 and "--seeds must be at least 1, got 0" in capsys.readouterr().err


def test_trains_seed_flag_is_not_read_as_seeds(monkeypatch):
    """`--seed 2` is train.py's seed (one ablation from seed 2), not an abbreviation of the demo's --seeds."""
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg, out, seeds: calls.append((cfg.seed, str(out), seeds)))
    demo.main(["--seed", "2", "--demo-out", "x"])
    assert calls == [(2, "x", 1)]


def test_the_table_has_the_sets_evaluated(monkeypatch, tmp_path):
    """`--eval-sets cityscapes bdd` (a quicker demo): the table's columns are those two sets and their mean (it used
    to look up all 7 toy targets, KeyError 'mapillary'); with --p-gen 0 the caption says so and there is no
    pseudo-label table."""
    miou = {"warmup": (0.10, 0.20), "source_only": (0.30, 0.15), "self_training": (0.25, 0.25), "refine": (0.40, 0.10)}
    results = {n: {"cityscapes": {"mIoU": a}, "bdd": {"mIoU": b}} for n, (a, b) in miou.items()}
    monkeypatch.setattr(demo, "ensure_toy_data", lambda root, progress: False)
    monkeypatch.setattr(demo.generate, "main", lambda argv: None)
    monkeypatch.setattr(demo, "run_ablation", lambda cfg, out, gen: (results, {}, {n: 1.0 for n in results}))
    summary = demo.main(["--demo-out", str(tmp_path), "--eval-sets", "cityscapes", "bdd", "--p-gen", "0",
                         "--no-progress"])
    row = summary["table"][demo.DEMO_ROWS["refine"]]
    assert list(row) == ["cityscapes", "bdd", "mean"]
    assert row["cityscapes"] == pytest.approx((40.0, None)) and row["mean"] == pytest.approx((25.0, None))
    assert summary["table"][demo.DEMO_ROWS["warmup"]]["mean"] == pytest.approx((15.0, None))
    md = (tmp_path / "ablation.md").read_text()
    assert "| + generated + refinement (toy SAM) | 40.00 | 10.00 | 25.00 |" in md and "teacher mIoU" not in md
    assert json.loads((tmp_path / "ablation.json").read_text())["pseudo_labels"] == {}
    assert "p_gen 0.0% (--p-gen)" in md  # the flag given, not the official share
