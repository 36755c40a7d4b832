"""train.py as a command: the preflight (every problem in one message, exit 2), runs that cannot be lost (--out
protection, SIGINT, --resume config checks, torn metrics, corrupt checkpoints), NaN outputs caught before the
matcher, the toy recipe, help texts and the offline CLIP cache check.

Training runs use the random-init `tiny` preset, 64 px crops, batch 2, warmup only, no evaluation: seconds each.
"""
import json
import os
import shutil
import signal

import pytest
import torch

import clouds
import criterion
from runtools import preflight
import train
from runtools import train_config

TINY = ["--preset", "tiny", "--train-backbone", "--crop-size", "64", "--batch-size", "2", "--workers", "0",
        "--test-short-side", "64", "--log-every", "1", "--no-progress", "--seed", "0", "--no-plots"]


def warmup_args(toy_root, out, *extra):
    return [*TINY, "--data-root", str(toy_root), "--out", str(out), "--phase", "warmup", "--eval-every", "0",
            "--schedule", "poly", *extra]


def run_exit(argv):
    """train.main(argv) that must exit: returns the exit code."""
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    return exit_.value.code


def snapshot(folder):
    """{relative path: (bytes, mtime_ns)} of every file under folder."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(toy_root, tmp_path_factory):
    """A finished 2-iteration warmup run (lr 1e-3, poly schedule)."""
    out = tmp_path_factory.mktemp("finished")
    train.main(warmup_args(toy_root, out, "--iters-warmup", "2", "--lr", "1e-3"))
    yield out
    shutil.rmtree(out, ignore_errors=True)  # pytest.ini: the suite keeps its disk use small


# ---- the preflight ----


def test_preflight_lists_every_problem_at_once(tmp_path, capsys):
    """Nothing prepared: the headline command gives ONE message with every missing piece, each with its fix, exit 2,
    no traceback, and nothing is written."""
    out = tmp_path / "out"
    code = run_exit(["--source", "gta", "--data-root", str(tmp_path / "datasets"), "--synthetic",
                     str(tmp_path / "gen"), "--sam-checkpoint", str(tmp_path / "mobile_sam.pt"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "cannot start: 7 problems" in err, err
    for piece in ("source dataset gta", "evaluation set cityscapes", "evaluation set bdd", "evaluation set mapillary",
                  "--eval-sets bdd mapillary", "--eval-every 0", "python generate.py --out", "mobile_sam.pt",
                  "--sam-checkpoint", "hf download laion/CLIP-convnext_large_d_320", "--clip-weights"):
        assert piece in err, piece
    assert "--checkpoint " not in err and "huggingface-cli" not in err  # refine.py's flag; a CLI no longer shipped
    assert not out.exists()


def test_usage_errors_exit_2_with_choices(capsys):
    assert run_exit(["--eval-sets", "kitti"]) == 2
    assert "invalid choice: 'kitti'" in capsys.readouterr().err
    assert run_exit(["--batch-size", "0"]) == 2  # a TrainConfig ValueError becomes an argparse error
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert run_exit(["--resume", "--overwrite"]) == 2


def test_every_flag_has_help_choices_and_default():
    parser = train_config.build_parser()
    actions = [a for a in parser._actions if a.dest != "help"]
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    by_dest = {a.dest: a for a in actions}
    assert list(by_dest["sam"].choices) == list(train_config.SAMS) and "tiny" in by_dest["preset"].choices
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "--save-every SAVE_EVERY OUT/last.pt every N iterations" in text and "(default: 1000)" in text
    assert "{vit_t,vit_h,vit_l,vit_b,toy,none}" in text and "{none,toy}" in text


# ---- runs that cannot be lost ----


def test_out_with_a_run_is_not_overwritten(finished, toy_root, capsys):
    before = snapshot(finished)
    assert {"config.json", "last.pt", "metrics.jsonl", "log.txt", "model_final.pt"} <= set(before)
    assert run_exit(warmup_args(toy_root, finished, "--iters-warmup", "2", "--lr", "1e-3")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(finished) == before  # every byte and every mtime


def test_sigint_saves_last_pt_and_resume_matches_straight_run(toy_root, tmp_path, monkeypatch, capsys):
    """SIGINT during iteration 1 (of 4): the iteration finishes, last.pt is saved at 2, exit 130; a torn last line of
    metrics.jsonl is then skipped with a warning; --resume ends with the same weights, optimizer and schedule as an
    uninterrupted run."""
    args = ["--iters-warmup", "4", "--lr", "1e-3"]
    train.main(warmup_args(toy_root, tmp_path / "straight", *args))

    step = train.train_step

    def spy(ctx, batch, it):
        if it == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-iteration, before the optimizer step
        return step(ctx, batch, it)

    monkeypatch.setattr(train, "train_step", spy)
    out = tmp_path / "resumed"
    assert run_exit(warmup_args(toy_root, out, *args)) == 130
    err = capsys.readouterr().err
    assert f"SIGINT: saved {out / 'last.pt'} at iteration 2; resume with --resume" in err
    assert load(out / "last.pt")["trainer"]["iteration"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is removed again
    monkeypatch.setattr(train, "train_step", step)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"phase": "warmup", "iter": 3, "lo')  # a write cut off by a crash
    result = train.main(warmup_args(toy_root, out, *args, "--resume"))
    captured = capsys.readouterr()
    assert "metrics.jsonl line 3 is not valid JSON" in captured.err and "skipped" in captured.err
    assert "resuming warmup from iteration 2" in captured.out
    assert result["phases"]["warmup"]["start"] == 2
    a, b = load(tmp_path / "straight" / "last.pt"), load(out / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["trainer"]["scheduler"] == b["trainer"]["scheduler"]
    for sa, sb in zip(a["trainer"]["optimizer"]["state"].values(), b["trainer"]["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["iter"] for r in records(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert "resuming warmup from iteration 2" in (out / "log.txt").read_text()


def test_resume_names_a_change_of_what_trains(finished, toy_root, tmp_path, capsys):
    """A config.json saved before --freeze-backbone-joint existed reads as the old behaviour (False): turning it on is
    a change the preflight names. A resume that trains other tensors (--no-train-backbone, allowed) stops with one
    message naming the flags (exit 1), not the optimizer's traceback, and leaves last.pt as it was."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "metrics.jsonl"):
        (out / name).write_bytes((finished / name).read_bytes())
    config = json.loads((finished / "config.json").read_text())
    del config["freeze_backbone_joint"]  # as written before the field existed
    (out / "config.json").write_text(json.dumps(config))
    assert run_exit(warmup_args(toy_root, out, "--iters-warmup", "3", "--lr", "1e-3", "--resume",
                                "--freeze-backbone-joint")) == 2
    assert "freeze_backbone_joint False -> True" in capsys.readouterr().err
    before = snapshot(out)
    assert run_exit([*warmup_args(toy_root, out, "--iters-warmup", "3", "--lr", "1e-3", "--resume",
                                  "--allow-config-change"), "--no-train-backbone"]) == 1
    err = capsys.readouterr().err
    assert "--train-backbone, --freeze-backbone-joint, --tuning or --backbone changed" in err and "Traceback" not in err
    assert (out / "last.pt").read_bytes() == before["last.pt"][0]

def test_resume_refuses_a_changed_lr_then_applies_it(finished, toy_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "last.pt", "metrics.jsonl"):
        (out / name).write_bytes((finished / name).read_bytes())
    before = snapshot(out)
    changed = warmup_args(toy_root, out, "--iters-warmup", "4", "--lr", "2e-3", "--schedule", "constant", "--resume")
    assert run_exit(changed) == 2
    err = capsys.readouterr().err
    assert "lr 0.001 -> 0.002" in err and "iters_warmup 2 -> 4" in err and "schedule 'poly' -> 'constant'" in err
    assert "--allow-config-change" in err and snapshot(out) == before

    train.main([*changed, "--allow-config-change"])
    recs = [r for r in records(out / "metrics.jsonl") if "loss" in r]
    # iterations 1-2 ran at 1e-3 under poly(2); 3-4 at the new constant 2e-3 (the LR logged after each step)
    assert [r["iter"] for r in recs] == [1, 2, 3, 4] and [r["lr"] for r in recs[2:]] == [2e-3, 2e-3]
    groups = load(out / "last.pt")["trainer"]["optimizer"]["param_groups"]
    assert sorted({g["lr"] for g in groups}) == [2e-3 * 0.1, 2e-3]  # head; backbone x --backbone-multiplier 0.1
    history = json.loads((out / "config.json").read_text())["history"]
    assert history[-1]["changed"]["lr"] == [1e-3, 2e-3] and history[-1]["resumed_at"] == {"warmup": 2}
    assert "--allow-config-change" in (out / "log.txt").read_text()


def test_corrupt_checkpoint_is_named(finished, toy_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes((finished / "config.json").read_bytes())
    (out / "last.pt").write_bytes((finished / "last.pt").read_bytes()[:5000])  # cut off
    assert run_exit(warmup_args(toy_root, out, "--iters-warmup", "2", "--lr", "1e-3", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'last.pt'} is unreadable" in err and "Traceback" not in err


def test_nan_outputs_are_caught_before_the_matcher(toy_root, tmp_path, monkeypatch, capsys):
    forward, calls, matched = train._Student.forward, [], []

    def poisoned(self, images):
        out = forward(self, images)
        if self.training:  # freeze_unused's dry pass runs in eval mode
            calls.append(1)
            if len(calls) == 3:  # iteration 2
                out["aux_outputs"][1]["pred_masks"] = out["aux_outputs"][1]["pred_masks"] * float("nan")
        return out

    matcher = criterion.HungarianMatcher.__call__

    def spy(self, outputs, targets, generator=None):
        matched.append(bool(torch.isfinite(outputs["pred_masks"]).all()))
        return matcher(self, outputs, targets, generator)

    monkeypatch.setattr(train._Student, "forward", poisoned)
    monkeypatch.setattr(criterion.HungarianMatcher, "__call__", spy)
    assert run_exit(warmup_args(toy_root, tmp_path, "--iters-warmup", "4", "--save-every", "2")) == 1
    err = capsys.readouterr().err
    assert "non-finite model outputs at warmup iteration 2 (aux_outputs[1].pred_masks)" in err
    assert f"{tmp_path / 'last.pt'}, iteration 2" in err and "--lr" in err and "--resume" in err
    assert matched and all(matched)  # the matcher never saw the NaN
    assert load(tmp_path / "last.pt")["trainer"]["iteration"] == 2


# ---- the toy recipe and warnings ----


def test_recipe_toy_sets_the_demo_values_and_explicit_flags_win():
    cfg, notes = train_config.parse_args(["--recipe", "toy", "--lr", "1e-3", "--iters-joint", "7"])
    for key, value in train_config.TOY.items():
        if key != "lr":
            assert getattr(cfg, key) == value, key
    assert (cfg.lr, cfg.iters_joint, cfg.iters_warmup, cfg.data_root, cfg.sam) == (1e-3, 7, 300, "datasets_toy", "toy")
    assert cfg.sam_min_area == 312  # 5000 px on 768^2 -> the same share of 192^2
    assert "--preset tiny" in notes[0] and "--train-backbone," in notes[0] and "--lr" not in notes[0]
    assert train_config.parse_args([])[1] == [] and train_config.parse_args([])[0].lr == 1e-5


def test_random_frozen_backbone_warns():
    assert "RANDOM-INIT" in preflight.run_warnings(train_config.parse_config(["--preset", "tiny"]))[0]
    assert preflight.run_warnings(train_config.parse_config(["--preset", "tiny", "--train-backbone"])) == []
    assert preflight.run_warnings(train_config.parse_config(["--recipe", "toy"])) == []


def test_clip_cache_check_is_offline(tmp_path, monkeypatch):
    """The official tag is found in a Hugging Face cache laid out as huggingface_hub writes it; nothing is fetched."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = train_config.parse_config([])
    (problem,) = preflight.clip_problems(cfg)
    assert "hf download laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup open_clip_pytorch_model.bin" \
        in problem and str(tmp_path) in problem
    repo = tmp_path / "models--laion--CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert preflight.clip_problems(cfg) == []
    rn50 = preflight.clip_problems(train_config.parse_config(["--preset", "rn50"]))
    assert "hf download timm/resnet50_clip.openai" in rn50[0]
    assert preflight.clip_problems(train_config.parse_config(["--clip-weights", str(repo / "refs" / "main")])) == []
