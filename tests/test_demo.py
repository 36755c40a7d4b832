"""toyworld/demo.py: the ablation table's spread over seeds (hand-computed), and its command line."""
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
