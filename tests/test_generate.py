"""Tests of generate.py: prompts, LLM output parsing, a tiny random-init SD pipeline, resume and sharding (toy)."""
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate

FIELDS = {"index", "prompt", "seed", "model", "scheduler", "steps", "guidance", "height", "width", "backend", "file"}


# ---- prompts ----

def test_default_prompt_file():
    prompts = generate.read_prompts(generate.DEFAULT_PROMPTS)
    assert len(prompts) == 100
    assert all(p.startswith(("A photo of ", "A picture of ", "A snapshot of ")) for p in prompts)
    keys = {" ".join("".join(ch for ch in p.lower() if ch.isalnum() or ch == " ").split()) for p in prompts}
    assert len(keys) == 100  # no duplicates, even up to case and punctuation
    assert all(p.isascii() and 20 <= len(p) <= 200 for p in prompts)


def test_read_prompts_skips_comments_and_rejects_empty(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n\nA photo of a road in the rain\n   \n# another\nA snapshot of a bus at night\n")
    assert generate.read_prompts(f) == ["A photo of a road in the rain", "A snapshot of a bus at night"]
    f.write_text("# only comments\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        generate.read_prompts(f)
    with pytest.raises(ValueError, match="does not exist"):
        generate.read_prompts(tmp_path / "missing.txt")


def test_parse_llm_prompts():
    text = "\n".join([
        "Sure! Here are some prompts:",                                     # chatter: no opener
        "1. A photo of a busy road in daylight with sunny weather.",       # numbered
        "2) A picture of a bus stop in the snow",                          # other numbering style
        "- \"A snapshot of a taxi in the rain\"",                           # bullet + quotes
        "A photo of a busy road, in daylight with sunny weather",          # duplicate up to punctuation
        "a photo of a lowercase opener street scene",                       # wrong case of the opener
        "A photo of",                                                       # opener only / too short
        "A picture of a caf\u00e9 terrace on a sunny street corner",         # not ASCII
        "A snapshot of " + "very " * 60 + "long road",                      # too long
        "* A picture of an old tram crossing a bridge at dusk",             # star bullet
        "A picture of a bus stop in the snow!",                             # duplicate (case/punctuation)
        "A snapshot of a cyclist on a road in fog",                         # already in `existing`
    ])
    got = generate.parse_llm_prompts(text, existing=["A snapshot of a cyclist on a road in fog."])
    assert got == ["A photo of a busy road in daylight with sunny weather.", "A picture of a bus stop in the snow",
                   "A snapshot of a taxi in the rain", "A picture of an old tram crossing a bridge at dusk"]


def test_llm_load_error_offline(tmp_path):
    with pytest.raises(RuntimeError, match="hf download") as err:
        generate.load_llm(str(tmp_path / "no-such-llm"))
    assert "--llm /path/to/llm" in str(err.value) and err.value.__cause__ is not None


# ---- diffusers backend: tiny random-init Stable Diffusion ----

def clip_tokenizer():
    """CLIP BPE tokenizer built offline from open_clip's bundled vocabulary (environment.md §4)."""
    import open_clip.tokenizer as oct
    import transformers
    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(oct.bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


def tiny_pipeline():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=49408, max_position_embeddings=77))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", steps_offset=1)  # SD 2 (768-v) style
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408  # transformers 5 can silently build an empty tokenizer
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def read_manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_tiny_stable_diffusion_end_to_end(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "sd")
    args = ["--steps", "2", "--height", "64", "--width", "64", "--num-images", "2", "--no-progress"]
    summary = generate.main(["--out", str(tmp_path / "a"), "--model", str(tmp_path / "sd")] + args)  # from_pretrained
    assert summary["written"] == 2 and summary["skipped"] == 0
    prompts = generate.read_prompts(generate.DEFAULT_PROMPTS)
    files = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert files == ["im_0_p0.png", "im_1_p1.png"]
    records = read_manifest(tmp_path / "a")
    assert [r["index"] for r in records] == [0, 1] and all(set(r) == FIELDS for r in records)
    assert records[1]["prompt"] == prompts[1] and records[1]["seed"] == 1
    assert records[0]["scheduler"] == "EulerDiscreteScheduler" and records[0]["backend"] == "diffusers"
    # the same weights passed as an object, the same seeds -> identical pixels
    cfg = generate.GenerateConfig(out=str(tmp_path / "b"), num_images=2, steps=2, height=64, width=64, progress=False)
    generate.generate(cfg, pipe=pipe)
    a = [np.asarray(Image.open(tmp_path / "a" / "images" / f)) for f in files]
    b = [np.asarray(Image.open(tmp_path / "b" / "images" / f)) for f in files]
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])  # different seeds and prompts
    # a re-run skips everything
    again = generate.main(["--out", str(tmp_path / "a"), "--model", str(tmp_path / "sd")] + args)
    assert again["written"] == 0 and again["skipped"] == 2 and len(read_manifest(tmp_path / "a")) == 2


def test_missing_model_offline_error(tmp_path):
    with pytest.raises(RuntimeError, match="--model /path/to/stable-diffusion-2") as err:
        generate.main(["--out", str(tmp_path), "--model", "nobody/no-such-diffusion-model", "--num-images", "1",
                       "--no-progress", "--debug"])
    assert "hf download nobody/no-such-diffusion-model" in str(err.value)
    assert err.value.__cause__ is not None


# ---- toy backend: resume and sharding ----

def snapshot(out, folder="images"):
    return {p.name: p.read_bytes() for p in sorted((out / folder).iterdir())}


def toy_args(out, n=7):
    return ["--out", str(out), "--backend", "toy", "--num-images", str(n), "--height", "40", "--width", "56",
            "--base-seed", "3", "--no-progress"]


def check_manifest(out, n):
    records = read_manifest(out)
    assert [r["index"] for r in records] == list(range(n))
    assert all(set(r) == FIELDS and (out / r["file"]).is_file() and r["seed"] == 3 + r["index"] for r in records)
    prompts = generate.read_prompts(generate.DEFAULT_PROMPTS)
    assert all(r["prompt"] == prompts[r["index"] % 100] and r["backend"] == "toy" for r in records)


def test_toy_resume_and_sharding_give_identical_files(tmp_path, monkeypatch):
    from toyworld import city
    n = 7
    full = generate.main(toy_args(tmp_path / "full", n))
    assert full["written"] == n
    ref = snapshot(tmp_path / "full")
    assert sorted(ref) == sorted(f"im_{j}_p{j}.png" for j in range(n))
    check_manifest(tmp_path / "full", n)

    # two parts (--part / --num-parts) into one folder
    for part in (0, 1):
        s = generate.main(toy_args(tmp_path / "parts", n) + ["--part", str(part), "--num-parts", "2"])
        assert s["written"] == len(range(part, n, 2))
    assert snapshot(tmp_path / "parts") == ref
    check_manifest(tmp_path / "parts", n)

    # torchrun-style ranks x parts: 2 parts x world 2 = 4 interleaved shards
    for part in (0, 1):
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            s = generate.main(toy_args(tmp_path / "ranks", n) + ["--part", str(part), "--num-parts", "2"])
            assert s["shard"] == part * 2 + rank and s["written"] == len(range(part * 2 + rank, n, 4))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert snapshot(tmp_path / "ranks") == ref
    check_manifest(tmp_path / "ranks", n)

    # interrupted after 3 images (plus a torn manifest line), then resumed
    render, calls = city.render_with_label, []

    def flaky(prompt, seed, size=(192, 192)):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(seed)
        return render(prompt, seed, size=size)

    monkeypatch.setattr(city, "render_with_label", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate.main(toy_args(tmp_path / "resumed", n))
    monkeypatch.setattr(city, "render_with_label", render)
    assert len(list((tmp_path / "resumed" / "images").iterdir())) == 3
    with open(tmp_path / "resumed" / "manifest.part0.jsonl", "a") as f:
        f.write('{"index": 5, "prompt": "A photo of')  # torn line of a killed process
    s = generate.main(toy_args(tmp_path / "resumed", n))
    assert s["written"] == n - 3 and s["skipped"] == 3
    assert snapshot(tmp_path / "resumed") == ref
    assert snapshot(tmp_path / "resumed", generate.TRUTH_DIR) == snapshot(tmp_path / "full", generate.TRUTH_DIR)
    check_manifest(tmp_path / "resumed", n)
    assert not list((tmp_path / "resumed").rglob("*.tmp"))

    # the merged manifest can always be rebuilt from the part files
    (tmp_path / "parts" / "manifest.jsonl").unlink()
    assert generate.main(toy_args(tmp_path / "parts", n) + ["--merge-only"])["manifest"] == n
    check_manifest(tmp_path / "parts", n)


# ---- CLI: one message, honest folders ----

def fail(argv, capsys):
    """generate.main must refuse: exit code 2, one message on stderr, no traceback -> the message."""
    with pytest.raises(SystemExit) as err:
        generate.main(argv)
    msg = capsys.readouterr().err
    assert err.value.code == 2 and "Traceback" not in msg, msg
    return msg


def all_bytes(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_cli_lists_every_problem_with_its_flag(tmp_path, capsys):
    msg = fail(toy_args(tmp_path / "a") + ["--batch-size", "0", "--part", "2", "--num-parts", "2"], capsys)
    assert "2 problem(s)" in msg and "--batch-size must be >= 1, got 0" in msg and "--part" in msg
    msg = fail(toy_args(tmp_path / "a") + ["--prompts", str(tmp_path / "none.txt")], capsys)
    assert "--prompts" in msg and "none.txt does not exist" in msg
    assert not (tmp_path / "a").exists()  # nothing created for a refused run
    with pytest.raises(SystemExit) as err:  # argparse: usage error listing the choices
        generate.main(toy_args(tmp_path / "a") + ["--backend", "sdxl"])
    assert err.value.code == 2 and "'diffusers', 'toy'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--batch-size"):  # --debug: the exception itself
        generate.main(toy_args(tmp_path / "a") + ["--batch-size", "0", "--debug"])


def test_refuses_other_settings_and_overwrite_replaces(tmp_path, capsys):
    out = tmp_path / "g"
    generate.main(toy_args(out, 4))
    before = all_bytes(out)
    prompts = tmp_path / "p.txt"
    prompts.write_text("A photo of a quiet street in the snow\nA photo of a bus at night\n")
    for extra, what in [(["--base-seed", "4"], "base_seed=3 (now 4)"), (["--height", "48"], "height=40 (now 48)"),
                        (["--prompts", str(prompts)], "prompts_sha256=")]:
        msg = fail(toy_args(out, 4) + extra, capsys)
        assert what in msg and "--overwrite" in msg and "--out" in msg
        assert all_bytes(out) == before  # nothing overwritten or lost
    s = generate.main(toy_args(out, 6))  # same settings, more images: resumes
    assert s["written"] == 2 and s["skipped"] == 4
    s = generate.main(toy_args(out, 3) + ["--prompts", str(prompts), "--overwrite"])
    assert s["written"] == 3
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["im_0_p0.png", "im_1_p1.png", "im_2_p0.png"]  # the 6 old images are gone
    assert sorted(r["file"] for r in read_manifest(out)) == [f"images/{n}" for n in names]
    assert len(generate._read_jsonl(out / "manifest.part0.jsonl")) == 3  # old part lines are gone too
    (tmp_path / "foreign" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "foreign" / "images" / "x.png")
    assert "no config.json" in fail(toy_args(tmp_path / "foreign", 2), capsys)


def test_toy_writes_the_hidden_truth_that_training_never_reads(tmp_path, capsys):
    """Issue 18: DIR/truth/<stem>.png is each toy image's true label (what the pseudo labels are scored against). The
    generated dataset lists only images/ (never truth/ as an image), its "label" stays all ignore, and the truth
    travels as sample["truth"], flipped with the clean image the teacher sees."""
    import data
    from toyworld import city
    out, n = tmp_path / "g", 4
    generate.main(toy_args(out, n))
    prompts = generate.read_prompts(generate.DEFAULT_PROMPTS)
    for j in range(n):
        with Image.open(out / generate.TRUTH_DIR / f"im_{j}_p{j}.png") as im:
            assert im.mode == "L"
            truth = np.asarray(im)
        image, expected = city.render_with_label(prompts[j], 3 + j, size=(40, 56))
        assert np.array_equal(truth, expected) and (truth != 255).any()
        assert np.array_equal(np.asarray(Image.open(out / "images" / f"im_{j}_p{j}.png")), image)
    assert not list(out.rglob("*.tmp"))
    assert generate.TRUTH_DIR == data.TRUTH_DIR

    ds = data.build_dataset("generated", out, transform=data.GeneratedTransform())
    assert [p.parent.name for p, label in ds.items] == ["images"] * n and all(lb is None for _, lb in ds.items)
    flips = set()
    for j in range(n):
        for seed in range(3):
            s = ds.get(j, np.random.default_rng(seed))
            truth = torch.from_numpy(np.array(Image.open(out / generate.TRUTH_DIR / f"{s['name']}.png")))
            raw = torch.from_numpy(np.array(Image.open(s["path"]))).permute(2, 0, 1)
            flipped = torch.equal(s["image"], raw.flip(-1)) and not torch.equal(raw, raw.flip(-1))
            assert torch.equal(s["image"], raw.flip(-1) if flipped else raw)
            assert torch.equal(s["truth"], truth.flip(-1) if flipped else truth)  # same geometry as "image"
            assert s["truth"].dtype == torch.uint8 and (s["label"] == 255).all()   # training's label: all ignore
            flips.add(flipped)
    assert flips == {True, False}

    (out / generate.TRUTH_DIR / "im_1_p1.png").unlink()  # a folder with a lost truth file: regenerated
    assert generate.main(toy_args(out, n))["written"] == 1 and (out / generate.TRUTH_DIR / "im_1_p1.png").is_file()
    generate.main(toy_args(out, 2) + ["--base-seed", "5", "--overwrite"])  # --overwrite removes the old truths
    assert sorted(p.name for p in (out / generate.TRUTH_DIR).iterdir()) == ["im_0_p0.png", "im_1_p1.png"]
    shutil.rmtree(out / generate.TRUTH_DIR)  # a folder without truth/ (Stable Diffusion): no "truth" key
    assert "truth" not in data.build_dataset("generated", out, transform=data.GeneratedTransform())[0]


def test_interrupted_folder_manifest_lists_exactly_the_files(tmp_path, monkeypatch):
    """However a run ends, what training loads (images/*.png) is what the manifest lists."""
    import data
    from toyworld import city
    out, render = tmp_path / "g", city.render
    monkeypatch.setattr(generate, "_write_png", lambda path, image, real=generate._write_png: (
        real(path, image),
        None if path.relative_to(out).as_posix() != "images/im_2_p2.png" else (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):  # killed after writing image 2, before its manifest line
        generate.main(toy_args(out, 5))
    monkeypatch.undo()
    listed = sorted(r["file"] for r in read_manifest(out))
    loaded = sorted(f"images/{Path(p).name}" for p, _ in data.build_dataset("generated", out).items)
    assert listed == loaded == ["images/im_0_p0.png", "images/im_1_p1.png", "images/im_2_p2.png"]
    assert city.render is render
    generate.main(toy_args(out, 5))
    assert sorted(r["file"] for r in read_manifest(out)) == \
        sorted(f"images/{Path(p).name}" for p, _ in data.build_dataset("generated", out).items) and \
        len(read_manifest(out)) == 5


def test_help_has_text_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{diffusers,toy}" in text and "(default: 5000)" in text and "(default: 7.5)" in text
    assert "--overwrite" in text and "--debug" in text


def test_torchrun_rank_uses_its_gpu_and_merges_take_turns(tmp_path, monkeypatch):
    """Issue 15: under torchrun each rank makes cuda:LOCAL_RANK the current device (without it, kernels and
    generators of every rank start on cuda:0); the manifest merges of the ranks hold an OS lock, so they take turns."""
    import fcntl
    import threading

    devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: devices.append(torch.device(d)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    generate.main(toy_args(tmp_path / "gpu", 2))
    assert devices == [torch.device("cuda", 1)]
    monkeypatch.undo()

    out = tmp_path / "gpu"
    with open(out / ".manifest.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another rank is merging
        merged = []
        worker = threading.Thread(target=lambda: merged.append(generate.merge_manifest(out)))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not merged  # it waits its turn
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(10)
    assert merged == [2]
