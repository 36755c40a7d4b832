"""train.py with a ViT backbone (issue 19): one train.main run per tuning mode (frozen, rein, lora) on ToyCity with tiny
random-init ViTs of the real timm classes, the checkpoints (adapter-only on pretrained weights), the EMA teacher of the
adapter, the evaluation protocol in the logs, --help and the preflight of the headline command with --backbone."""
import json

import pytest
import torch

import backbones
import checkpoints
import clouds
import generate
import train
from runtools import train_config

TINY = ["--preset", "tiny", "--crop-size", "64", "--batch-size", "2", "--workers", "0", "--test-short-side", "64",
        "--log-every", "1", "--no-progress", "--seed", "0", "--no-plots"]
# tuning -> (backbone, extra flags); rein reads its frozen ViT from a local weights file (adapter-only checkpoints)
RUNS = {"frozen": ("dinov2_tiny", ()), "rein": ("dinov2_tiny", ("--eval-protocol", "slide", "--slide-window", "48",
                                                                   "--slide-stride", "40")),
        "lora": ("eva02_tiny", ())}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A tiny DINOv2-class ViT at patch 14, saved like a release file (the run resamples it to patch 16)."""
    import timm

    torch.manual_seed(7)
    vit = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, embed_dim=32, depth=4,
                            num_heads=2)
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save(vit.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def runs(toy_root, weights_file, tmp_path_factory):
    """--phase all: 1 warmup + 1 joint iteration (toy SAM, EMA every iteration), evaluated at the end of each."""
    gen = tmp_path_factory.mktemp("generated")
    generate.main(["--backend", "toy", "--out", str(gen), "--num-images", "4", "--height", "64", "--width", "64",
                   "--no-progress"])
    out = {}
    for tuning, (backbone, extra) in RUNS.items():
        d = tmp_path_factory.mktemp(f"run_{tuning}")
        weights = ["--backbone-weights", str(weights_file)] if tuning == "rein" else []
        result = train.main([*TINY, "--backbone", backbone, "--tuning", tuning, *weights, "--data-root", str(toy_root),
                             "--out", str(d), "--phase", "all", "--iters-warmup", "1", "--iters-joint", "1",
                             "--synthetic", str(gen), "--sam", "toy", "--sam-min-area", "20", "--p-gen", "1.0",
                             "--ema-every", "1", "--eval-every", "1", "--eval-max", "1", "--eval-sets", "cityscapes",
                             *extra])
        out[tuning] = (d, result)
    return out


def fresh_model(tuning, weights_file=None):
    """The run's initial model: train.py seeds with --seed 0 right before build_model."""
    backbone = RUNS[tuning][0]
    torch.manual_seed(0)
    return clouds.build_model("tiny", backbone=backbone, tuning=tuning,
                              **({"pretrained": str(weights_file)} if weights_file else {}))


@pytest.mark.parametrize("tuning", list(RUNS))
def test_run_trains_only_the_head_and_the_adapter(runs, weights_file, tuning):
    d, result = runs[tuning]
    final = load(d / "joint" / "model_final.pt")
    assert final["config"]["backbone"] == RUNS[tuning][0] and final["config"]["tuning"] == tuning
    init = fresh_model(tuning, weights_file if tuning == "rein" else None)
    adapter = set(init.backbone.adapter_names())
    saved = {k[len("backbone."):]: v for k, v in final["model"].items() if k.startswith("backbone.")}
    if tuning == "rein":  # pretrained ViT: the checkpoint holds the adapter only, the ViT comes from the file
        assert set(saved) == adapter and len(adapter) == 11
    else:  # random init: the whole backbone is saved; its ViT weights never moved
        assert set(saved) == set(init.backbone.state_dict())
        vit = {k: v for k, v in init.backbone.state_dict().items() if k not in adapter}
        assert all(torch.equal(saved[k], v) for k, v in vit.items())
    moved = [k for k in adapter if not torch.equal(saved[k], init.backbone.state_dict()[k])]
    assert ("rein.out_proj.weight" in moved) if tuning == "rein" else (tuning == "frozen" or any(
        k.endswith("lora_b") for k in moved))
    # the optimizer holds exactly the head's used tensors and the adapter (Rein replaces query_feat)
    opt = load(d / "joint" / "last.pt")["trainer"]["optimizer"]
    n_opt = sum(len(g["params"]) for g in opt["param_groups"])
    n_head = len(list(init.sem_seg_head.parameters())) - (tuning == "rein")
    assert n_opt == n_head + len(adapter)
    # the model reloads for evaluation (the rein one with its ViT file)
    model, _ = checkpoints.load_checkpoint(d / "joint" / "model_final.pt",
                                           **({"pretrained": str(weights_file)} if tuning == "rein" else {}))
    reloaded = model.backbone.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in saved.items())


@pytest.mark.parametrize("tuning", list(RUNS))
def test_teacher_holds_its_own_copy_of_the_adapter(runs, tuning):
    """Joint iteration 0 copies the student (= the warmup weights) into the teacher; after the joint step the student's
    adapter moved and the teacher's did not: they are separate tensors. Frozen: the teacher is the head alone."""
    d, _ = runs[tuning]
    teacher = load(d / "joint" / "last.pt")["trainer"]["teacher"]
    warm, joint = load(d / "warmup" / "model_final.pt")["model"], load(d / "joint" / "model_final.pt")["model"]
    if tuning == "frozen":
        assert set(teacher) == {k[len("sem_seg_head."):] for k in warm if k.startswith("sem_seg_head.")}
        return
    adapter = sorted(k for k in joint if k.startswith("backbone.") and (".rein." in k or ".lora_" in k))
    tuned = [teacher[f"tuned.{i}"] for i in range(len(adapter))]
    assert len([k for k in teacher if k.startswith("tuned.")]) == len(adapter)
    names = [n for n, p in fresh_model(tuning).backbone.named_parameters() if p.requires_grad]
    for name, t in zip(names, tuned):
        torch.testing.assert_close(t, warm[f"backbone.{name}"], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(t, joint[f"backbone.{n}"]) for n, t in zip(names, tuned))


def test_every_evaluation_names_its_protocol(runs):
    for tuning, (d, result) in runs.items():
        expected = "slide 48x48 stride 40, short side 64" if tuning == "rein" else "whole image, short side 64"
        assert result["final"]["cityscapes"]["protocol"] == expected
        evals = [json.loads(line) for line in (d / "joint" / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line]
        assert evals and all(e["eval"]["cityscapes"]["protocol"] == expected for e in evals)
        log = (d / "log.txt").read_text()
        assert f"mIoU ({expected})" in log and f"protocol: {expected}" in log


# ---- command line ----


def test_help_lists_backbones_tunings_and_protocols():
    text = " ".join(train_config.build_parser().format_help().split())
    assert "--backbone {" + ",".join(("clip", *backbones.BACKBONES)) + "}" in text
    assert "dinov2_l" in text and "eva02_l" in text and "--tuning {frozen,rein,lora}" in text
    assert "--eval-protocol {whole,slide}" in text and "--slide-window SLIDE_WINDOW" in text
    assert "--backbone-weights BACKBONE_WEIGHTS" in text and "--lora-rank LORA_RANK" in text


def run_exit(argv):
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    return exit_.value.code


def test_headline_command_with_dinov2_l_names_its_weights(tmp_path, capsys, monkeypatch):
    """`python train.py --source gta --synthetic out/ --backbone dinov2_l` with nothing prepared: ONE message, exit 2;
    the CLIP problem is replaced by the DINOv2-L one (hf download line and --backbone-weights)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    out = tmp_path / "out"
    code = run_exit(["--source", "gta", "--data-root", str(tmp_path / "datasets"), "--synthetic",
                     str(tmp_path / "gen"), "--sam-checkpoint", str(tmp_path / "mobile_sam.pt"), "--out", str(out),
                     "--backbone", "dinov2_l"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "cannot start: 7 problems" in err, err
    assert "hf download timm/vit_large_patch14_dinov2.lvd142m model.safetensors" in err
    assert "--backbone-weights /path/model.safetensors" in err and "DINOv2 ViT-L/14" in err
    assert "laion" not in err and "--clip-weights" not in err and not out.exists()


def test_backbone_usage_errors(capsys):
    assert run_exit(["--tuning", "rein"]) == 2
    assert "--tuning rein adapts a ViT: add --backbone" in capsys.readouterr().err
    assert run_exit(["--backbone", "dinov2_l", "--clip-weights", "x.bin"]) == 2
    assert "pass --backbone-weights" in capsys.readouterr().err
    assert run_exit(["--recipe", "toy", "--backbone", "dinov2_tiny", "--tuning", "lora"]) == 2
    assert "--no-train-backbone" in capsys.readouterr().err
    assert run_exit(["--eval-protocol", "slide", "--slide-window", "100", "--slide-stride", "200"]) == 2
    assert "--slide-stride <= --slide-window" in capsys.readouterr().err
