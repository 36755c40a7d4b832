"""Nothing is lost, round 2 (issue 20): outputs never land in input folders; one train.py run per --out (a lock with
the owner's pid and host, checked with two real processes); image readers that convert or reject every PIL mode;
the --check-images preflight; one-line messages for a full disk, a read-only --out, --device cuda without a GPU and
bad labels; resume notes (another world size, a finished warmup); file modes; the last "done" line.

Training runs use the random-init `tiny` preset, 64 px crops, batch 2, no evaluation: seconds each.
"""
import collections
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import evaluate
import generate
from runtools import files, preflight
import refine
import train
from runtools import train_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--train-backbone", "--crop-size", "64", "--batch-size", "2", "--workers", "0",
        "--test-short-side", "64", "--log-every", "1", "--no-progress", "--seed", "0", "--no-plots"]


def warmup_args(root, out, *extra):
    return [*TINY, "--data-root", str(root), "--out", str(out), "--phase", "warmup", "--eval-every", "0",
            "--schedule", "poly", *extra]


def run_exit(main, argv, capsys):
    """main(argv) that must exit -> (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code, capsys.readouterr().err


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def rgb_image(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def gta_root(toy_root, tmp_path):
    """A datasets root of our own holding a copy of ToyCity's gta5 (3 images), to spoil files in."""
    root = tmp_path / "datasets"
    shutil.copytree(toy_root / "gta5", root / "gta5")
    return root


@pytest.fixture(scope="module")
def finished(toy_root, tmp_path_factory):
    """A finished 2-iteration warmup run, made under umask 027; -> (out, its stdout)."""
    out = tmp_path_factory.mktemp("finished")
    old = os.umask(0o027)
    try:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            train.main(warmup_args(toy_root, out, "--iters-warmup", "2", "--lr", "1e-3"))
    finally:
        os.umask(old)
    yield out, buf.getvalue()
    shutil.rmtree(out, ignore_errors=True)  # pytest.ini: the suite keeps its disk use small


# ---- 1. an output folder is never (in) an input folder ----


def test_evaluate_save_pred_in_the_images_folder_is_refused_even_with_overwrite(tmp_path, capsys):
    """Case 1: `--images X --save-pred X --overwrite` replaced every input image by a label map."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        files.save_png(rgb_image(seed=i), photos / f"p{i}.png")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not read: the preflight refuses first")
    before = snapshot(tmp_path)
    for save_pred in (photos, photos / "pred", tmp_path):  # is, is inside, holds the input folder
        for extra in ([], ["--overwrite"]):
            code, err = run_exit(evaluate.main, ["--weights", str(weights), "--images", str(photos), "--save-pred",
                                                 str(save_pred), "--no-progress", *extra], capsys)
            assert code == 2 and "Traceback" not in err
            assert f"--save-pred {save_pred} is, holds or is inside the input folder --images {photos}" in err
            assert "prediction files" not in err and "--overwrite" not in err  # the inputs are not predictions
    assert snapshot(tmp_path) == before


def test_refine_out_in_an_input_folder_is_refused(tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    files.save_png(rgb_image(), images / "a.png")
    files.save_png(np.zeros((20, 30), np.uint8), labels / "a.png")
    before = snapshot(tmp_path)
    for out, flag in ((images / "refined", "--images"), (tmp_path, "--images"), (labels, "--labels")):
        code, err = run_exit(refine.main, ["--images", str(images), "--labels", str(labels), "--out", str(out),
                                           "--sam", "toy", "--no-progress", "--overwrite"], capsys)
        assert code == 2 and f"--out {out} is, holds or is inside the input folder" in err and flag in err
    assert snapshot(tmp_path) == before


def test_train_out_in_an_input_folder_is_refused(finished, toy_root, gta_root, tmp_path, capsys):
    """An --out inside a dataset folder or equal to --synthetic is refused (--overwrite would delete generate.py's
    config.json there); so is an --overwrite that deletes the --weights file."""
    gen = tmp_path / "gen"
    generate.main(["--backend", "toy", "--out", str(gen), "--num-images", "2", "--no-progress"])
    before = snapshot(tmp_path)
    code, err = run_exit(train.main, warmup_args(gta_root, gta_root / "gta5" / "runs", "--overwrite"), capsys)
    assert code == 2 and "is, holds or is inside the gta dataset folder (--data-root)" in err
    code, err = run_exit(train.main, warmup_args(gta_root, gen, "--phase", "all", "--synthetic", str(gen),
                                                 "--sam", "none", "--overwrite"), capsys)
    assert code == 2 and f"is, holds or is inside the generated images (--synthetic) {gen}" in err
    assert snapshot(tmp_path) == before
    out, _ = finished
    code, err = run_exit(train.main, warmup_args(toy_root, out, "--phase", "joint", "--p-gen", "0", "--weights",
                                                 str(out / "model_final.pt"), "--overwrite"), capsys)
    assert code == 2 and f"--overwrite would delete --weights {out / 'model_final.pt'}" in err


# ---- 2. one run per --out ----


def test_two_runs_on_one_out_at_once_and_a_stale_lock(toy_root, tmp_path, monkeypatch, capsys):
    """Case 2: two train.py processes started together on one --out both ran and exited 0. Now exactly one runs; the
    other exits 2 at once naming the owner's pid and host. The owner is then SIGKILLed (its lock file stays); the
    next run takes the stale lock over with a note, and removes the file when it ends."""
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "train.py"), *warmup_args(toy_root, out, "--iters-warmup", "100000",
                                                                 "--save-every", "100000")]
    env = {**os.environ, "CLOUDS_OPS_IMPL": "ref"}  # no extension build in the subprocesses
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        loser = next(p for p in procs if p.poll() is not None)
        owner = next(p for p in procs if p is not loser)
        err = loser.communicate()[1]
        assert loser.returncode == 2 and "Traceback" not in err, err
        assert f"--out {out} is in use by another run: pid {owner.pid} on host {socket.gethostname()}" in err
        time.sleep(1)
        assert owner.poll() is None  # the owner is still training
        assert json.loads((out / "train.lock").read_text())["pid"] == owner.pid
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL: no clean-up, the lock file stays
            p.communicate()
    assert json.loads((out / "train.lock").read_text())["pid"] == owner.pid
    monkeypatch.setenv("CLOUDS_OPS_IMPL", "ref")
    train.main(warmup_args(toy_root, out, "--iters-warmup", "1", "--overwrite"))
    printed = capsys.readouterr().out
    assert f"took over {out / 'train.lock'} from a run that is no longer running: pid {owner.pid} on host" in printed
    assert not (out / "train.lock").exists()


def test_lock_released_and_seen_by_the_preflight(finished, tmp_path):
    out, _ = finished
    assert not (out / "train.lock").exists()  # a finished run leaves no lock
    lock = train.runs.OutLock(tmp_path / "x")
    assert lock.acquire() is None
    try:
        code = subprocess.run([sys.executable, "-c", "import sys; from runtools import runs; print(runs.lock_owner(sys.argv[1]))",
                               str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
        assert f"'pid': {os.getpid()}" in code.stdout, code.stderr
    finally:
        lock.release()
    assert not (tmp_path / "x" / "train.lock").exists()


# ---- 3. prediction files written twice ----


def test_images_whose_predictions_would_clash_are_refused(tmp_path, capsys):
    """Case 3: x.png and x.jpg, and an input named y_color.png, silently overwrote predictions ("wrote 4")."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("x.png", "y.png", "y_color.png", "z.png"):
        files.save_png(rgb_image(), photos / name)
    Image.fromarray(rgb_image()).save(photos / "x.jpg")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    code, err = run_exit(evaluate.main, ["--weights", str(weights), "--images", str(photos), "--save-pred",
                                         str(tmp_path / "pred"), "--no-progress"], capsys)
    msg = " ".join(err.split())
    assert code == 2 and "4 prediction file(s) would each be written for several images" in msg, msg
    assert "x.png for x.jpg and x.png" in msg and "y_color.png for y.png and y_color.png" in msg
    assert "z.png" not in msg and not (tmp_path / "pred").exists()
    assert set(evaluate.output_clashes([photos / "a.png", photos / "b.jpg", photos / "a_overlay.png"])) == {
        "a_overlay.png"}


# ---- 4. image modes ----


def _modes(tmp_path):
    """{name: (file, expected uint8 (H, W, 3) or None = rejected)}; the expectations are computed independently of
    data.py (float64 arithmetic, the palette looked up by hand)."""
    rng = np.random.default_rng(1)
    rgb = rgb_image(12, 16, 2)
    grey16 = rng.integers(0, 65536, (12, 16), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (12, 16, 3), dtype=np.uint16)
    files = {}
    cv2.imwrite(str(tmp_path / "grey16.png"), grey16)  # PIL opens it as I;16 (convert("RGB") made it all white)
    g = np.round(grey16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    files["grey16"] = (tmp_path / "grey16.png", np.repeat(g[..., None], 3, -1))
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # 48-bit RGB: PIL keeps the high byte
    files["rgb16"] = (tmp_path / "rgb16.png", (rgb16 >> 8).astype(np.uint8))
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=7)
    pal.save(tmp_path / "pal.png")
    table = np.array(pal.getpalette(), np.uint8).reshape(-1, 3)
    files["palette"] = (tmp_path / "pal.png", table[np.array(pal)])
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey8.png")
    files["grey8"] = (tmp_path / "grey8.png", np.repeat(rgb[..., :1], 3, -1))
    opaque = np.concatenate([rgb, np.full((12, 16, 1), 255, np.uint8)], -1)
    Image.fromarray(opaque).save(tmp_path / "rgba_opaque.png")
    files["rgba_opaque"] = (tmp_path / "rgba_opaque.png", rgb)
    Image.fromarray(np.stack([rgb[..., 1], np.full((12, 16), 255, np.uint8)], -1)).save(tmp_path / "la.png")
    files["la_opaque"] = (tmp_path / "la.png", np.repeat(rgb[..., 1:2], 3, -1))
    seethrough = opaque.copy()
    seethrough[0, 0, 3] = 0
    Image.fromarray(seethrough).save(tmp_path / "rgba_transparent.png")
    files["rgba_transparent"] = (tmp_path / "rgba_transparent.png", None)
    Image.fromarray(rng.random((12, 16)).astype(np.float32)).save(tmp_path / "float.png", format="TIFF")
    files["float"] = (tmp_path / "float.png", None)
    return files


@pytest.mark.parametrize("reader", ["data", "refine"])
def test_every_image_mode_is_converted_or_rejected(tmp_path, reader):
    """Case 4: a 16-bit greyscale PNG read as all white. data.read_image (training, the generated folder, evaluate's
    own images) and refine.py's copy read each mode against an independent expectation, or reject it by name."""
    read, error = (data.read_image, RuntimeError) if reader == "data" else (refine._read_image, ValueError)
    for name, (path, expected) in _modes(tmp_path).items():
        if expected is None:
            with pytest.raises(error, match=f"image {path} has"):
                read(path)
            continue
        got = read(path)
        assert got.dtype == np.uint8 and got.shape == expected.shape, name
        assert np.array_equal(got, expected), (name, np.abs(got.astype(int) - expected).max())


def test_16bit_images_in_training_and_inference(tmp_path, capsys):
    """The generated folder (training) and evaluate.py --images read a 16-bit greyscale PNG as grey, not white, and
    evaluate.py says how it read it."""
    files = _modes(tmp_path)
    gen = tmp_path / "gen" / "images"
    gen.mkdir(parents=True)
    shutil.copy(files["grey16"][0], gen / "im_0_p0.png")
    sample = data.build_dataset("generated", tmp_path / "gen").get(0)
    assert torch.equal(sample["image"], torch.from_numpy(files["grey16"][1]).permute(2, 0, 1))

    class Spy:
        def __init__(self):
            self.seen = []

        def eval(self):
            return self

        def predict(self, x):
            self.seen.append(x.clone())
            return torch.zeros(1, *x.shape[-2:], dtype=torch.int64)

    spy = Spy()
    evaluate.predict_images(spy, [gen / "im_0_p0.png"], tmp_path / "pred", short_side=12, progress=False)
    assert torch.equal(spy.seen[0][0], torch.from_numpy(files["grey16"][1]).permute(2, 0, 1))
    assert "read 1 image(s) as 16-bit greyscale (I;16), scaled to 8 bits" in capsys.readouterr().out


def test_refine_cli_reads_16bit_images(tmp_path, monkeypatch):
    """refine.py (its own reader: it copies on its own) hands SAM the grey image, not a white one."""
    modes = _modes(tmp_path)
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    shutil.copy(modes["grey16"][0], images / "g.png")
    files.save_png(np.zeros((12, 16), np.uint8), labels / "g.png")
    seen = []

    def spy(image, label, predictor, cfg, generator):
        seen.append(np.array(image))
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, *label.shape, dtype=torch.bool), False

    monkeypatch.setattr(refine, "_refine", spy)
    refine.main(["--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "out"), "--sam", "toy",
                 "--no-progress"])
    assert np.array_equal(seen[0], modes["grey16"][1])


def test_16bit_labels(tmp_path):
    label = np.array([[0, 18, 255], [3, 4, 5]], np.uint16)
    cv2.imwrite(str(tmp_path / "ok.png"), label)
    assert np.array_equal(data.read_label(tmp_path / "ok.png"), label.astype(np.uint8))
    label[0, 0] = 300
    cv2.imwrite(str(tmp_path / "bad.png"), label)
    with pytest.raises(data.DataError, match=r"values \[300\] outside the train ids"):
        data.read_label(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"values \[300\] outside the train ids"):
        refine._read_label(tmp_path / "bad.png", (2, 3))


# ---- 5. the input files are opened before the warmup ----


def _spoil(gta_root, gen):
    """A raw-id label among the source labels and a truncated generated image."""
    label = gta_root / "gta5" / "labels" / "00002_labelTrainIds.png"
    shutil.copy(gta_root / "gta5" / "labels" / "00002.png", label)  # raw label ids (car = 26)
    image = gen / "images" / "im_1_p1.png"
    image.write_bytes(image.read_bytes()[:300])
    return label, image


def test_bad_files_are_found_before_the_warmup(gta_root, tmp_path, capsys):
    """Case 5: a bad generated image was found at joint iteration 0, after the whole warmup; a bad source label when
    first drawn. Now the preflight opens them: exit 2 before anything is written, both files named."""
    gen = tmp_path / "gen"
    generate.main(["--backend", "toy", "--out", str(gen), "--num-images", "3", "--no-progress"])
    label, image = _spoil(gta_root, gen)
    out = tmp_path / "run"
    argv = warmup_args(gta_root, out, "--phase", "all", "--synthetic", str(gen), "--sam", "none",
                       "--iters-warmup", "100000", "--iters-joint", "100000")
    code, err = run_exit(train.main, argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert "--check-images: 2 of the 6 input files checked cannot be used (checked all 6)" in err, err
    assert f"label {label} holds values" in err and f"could not read image {image}" in err
    assert "delete it and rerun generate.py" in err and "--no-check-images" in err
    assert not out.exists()


def test_check_images_samples_within_its_budget(toy_root, monkeypatch):
    cfg = train_config.parse_config(warmup_args(toy_root, "unused"))
    monkeypatch.setattr(preflight, "CHECK_MIN_SECONDS", 0.0)
    monkeypatch.setattr(preflight, "CHECK_SHARE", 0.0)
    problems, notes = preflight.check_images(cfg, None, 0.0)
    assert problems == [] and notes[0].startswith("checked a random 1 of 3 input files (source labels and image "
                                                  "headers) in ") and "--check-images opens them all" in notes[0]
    cfg = train_config.parse_config(warmup_args(toy_root, "unused", "--check-images"))
    assert preflight.check_images(cfg, None, 0.0)[1][0].startswith("checked all 3 input files")


# ---- 6. one message, not a traceback ----


def test_bad_label_found_during_training_is_one_message(gta_root, tmp_path, capsys):
    """Case 6: a label outside the train ids stopped the run with a traceback (from a DataLoader worker: its traceback
    text inside the message). With --no-check-images it is found when drawn: one message, exit 1."""
    for lbl in (gta_root / "gta5" / "labels").glob("*_labelTrainIds.png"):
        shutil.copy(lbl.with_name(lbl.name.replace("_labelTrainIds", "")), lbl)
    code, err = run_exit(train.main, warmup_args(gta_root, tmp_path / "run", "--iters-warmup", "2",
                                                 "--no-check-images", "--workers", "1"), capsys)
    assert code == 1 and "Traceback" not in err and "DataLoader worker" not in err, err
    assert f"train.py: label {gta_root / 'gta5' / 'labels'}" in err and "outside the train ids" in err
    assert "Stopped at warmup iteration 0; the last good checkpoint is none yet" in err


def test_worker_wrapped_data_error_is_unwrapped():
    from torch._utils import ExceptionWrapper

    try:
        raise data.DataError("label x.png holds values [26]\nsecond line")
    except data.DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(data.DataError) as err:
        wrapped.reraise()
    assert "Traceback" in str(err.value)
    assert data.error_message(err.value) == "label x.png holds values [26]\nsecond line"


def test_disk_full_during_a_checkpoint_save(toy_root, tmp_path, monkeypatch, capsys):
    """Case 6: a full disk during torch.save printed torch's "unexpected pos" in a traceback. Now: the path, the cause
    and the free space in one message, exit 1; the previous last.pt is kept and no temp file is left."""
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        partial = b"PK\x03\x04" + bytes(4000)  # what fitted on the disk
        f.write(partial) if hasattr(f, "write") else Path(f).write_bytes(partial)  # a file object or a path
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3038400 vs 3038288")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2 ** 30, 2 ** 30 - 2 ** 12, 2 ** 12))
    out = tmp_path / "run"
    code, err = run_exit(train.main, warmup_args(toy_root, out, "--iters-warmup", "4", "--save-every", "2"), capsys)
    assert code == 1 and "Traceback" not in err and "unexpected pos" not in err, err
    assert f"could not write {out / 'last.pt'}: no space left on device (0.0 MB free in {out}; it needs ~" in err
    assert f"the last good checkpoint is {out / 'last.pt'}, iteration 2" in err and "--resume" in err
    assert load(out / "last.pt")["trainer"]["iteration"] == 2
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_under_the_metrics_log(toy_root, tmp_path, monkeypatch, capsys):
    """A full disk while appending to metrics.jsonl (not a checkpoint): one line with the file and the free space."""
    import errno

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(train.runs.MetricsLog, "write", full)
    out = tmp_path / "run"
    code, err = run_exit(train.main, warmup_args(toy_root, out, "--iters-warmup", "1"), capsys)
    assert code == 1 and "Traceback" not in err, err
    assert f"train.py: No space left on device: {out / 'metrics.jsonl'} (" in err and "MB free there)" in err
    assert "rerun the same command (with --resume once the run has started)" in err


@contextlib.contextmanager
def tmpfs(path, options):
    """A tmpfs mounted at `path` (callers are marked NEEDS_TMPFS, or check MOUNT_ERROR)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # lazy: never left mounted, even if busy


def _tmpfs_mount_error():
    """None where this process can mount a tmpfs (root, and a container that allows it), else why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    with tempfile.TemporaryDirectory() as d:
        try:
            with tmpfs(Path(d), "size=1m"):
                return None
        except subprocess.CalledProcessError as e:
            return f"mounting a tmpfs is not allowed here: {(e.stderr or b'').decode().strip() or e.returncode}"


MOUNT_ERROR = _tmpfs_mount_error()  # probed once, at collection


NEEDS_TMPFS = pytest.mark.skipif(MOUNT_ERROR is not None, reason=str(MOUNT_ERROR))


@NEEDS_TMPFS
def test_disk_full_for_real(toy_root, tmp_path, capsys):
    """The same on a real 100 MB file system (the tiny run's last.pt is 56 MB: the second save cannot fit)."""
    with tmpfs(tmp_path / "small", "size=100m") as small:
        out = small / "run"
        code, err = run_exit(train.main, warmup_args(toy_root, out, "--iters-warmup", "4", "--save-every", "2"),
                             capsys)
        assert code == 1 and "Traceback" not in err, err
        assert f"could not write {out / 'last.pt'}: no space left on device (" in err and "it needs ~" in err
        assert load(out / "last.pt")["trainer"]["iteration"] == 2
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(os.geteuid() == 0 and MOUNT_ERROR is not None,
                    reason=f"as root only a read-only mount makes --out unwritable: {MOUNT_ERROR}")
def test_read_only_out_is_a_preflight_problem(toy_root, tmp_path, capsys):
    """Case 6: a read-only --out gave a traceback at the first write."""
    if os.geteuid() == 0:
        context = tmpfs(tmp_path / "ro", "ro,size=1m")
        why = "is on a read-only file system"
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        context, why = contextlib.nullcontext(tmp_path / "ro"), "is not writable by this user"
    with context as ro:
        code, err = run_exit(train.main, warmup_args(toy_root, ro / "run", "--iters-warmup", "1"), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"--out {ro / 'run'} cannot be written: {ro} {why}; pass an --out on a writable disk" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu(toy_root, tmp_path, capsys):
    code, err = run_exit(train.main, warmup_args(toy_root, tmp_path / "run", "--device", "cuda"), capsys)
    assert code == 2 and "Traceback" not in err
    assert "--device cuda: no CUDA GPU is visible to this process" in err and "--device cpu" in err
    assert not (tmp_path / "run").exists()


# ---- 7. resume notes, file modes, the last line ----


def test_resume_with_another_world_size_says_so(finished, tmp_path, toy_root, capsys):
    """Case 7: a 2-process run resumed with 1 process was accepted silently. (The run is made 2-process by its
    config.json's world_size, which is what the preflight compares.)"""
    src, _ = finished
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "metrics.jsonl"):
        shutil.copy(src / name, out / name)
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "world_size": 2}))
    train.main(warmup_args(toy_root, out, "--iters-warmup", "3", "--lr", "1e-3", "--resume",
                           "--allow-config-change"))
    printed = " ".join(capsys.readouterr().out.split())
    assert "note: resuming a run of 2 processes with 1: --batch-size 2 is the global batch, so it stays" in printed
    assert "each process now takes 2 samples instead of 1" in printed


def test_resumed_phase_all_skips_a_finished_warmup(toy_root, tmp_path, capsys):
    """Case 7: a resumed --phase all run printed "resuming warmup from iteration 2" for a finished warmup."""
    out = tmp_path / "run"
    common = ["--phase", "all", "--p-gen", "0", "--iters-warmup", "2"]
    train.main(warmup_args(toy_root, out, *common, "--iters-joint", "1"))
    warm = snapshot(out / "warmup")
    capsys.readouterr()
    train.main(warmup_args(toy_root, out, *common, "--iters-joint", "2", "--resume", "--allow-config-change"))
    printed = capsys.readouterr().out
    assert "resuming warmup" not in printed
    assert (f"[train] warmup is complete ({out / 'warmup' / 'last.pt'} holds iteration 2 of 2): skipped; going on "
            f"with joint") in printed
    assert "resuming joint from iteration 1" in printed
    assert snapshot(out / "warmup") == warm  # nothing of the finished warmup is written again
    assert load(out / "joint" / "last.pt")["trainer"]["iteration"] == 2


def test_files_get_the_mode_of_logs_and_the_run_ends_with_done(finished, toy_root, tmp_path):
    """Case 7: checkpoints and generated images were 0600 while logs were world-readable; training output ended
    without saying where the files are."""
    out, printed = finished
    for name in ("config.json", "last.pt", "model_final.pt", "log.txt", "metrics.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name  # made under umask 027
    last = printed.strip().splitlines()
    assert last[-2] == (f"[train] done: {out}/ holds config.json, log.txt, model_final.pt (the trained model), "
                        f"last.pt (for --resume), metrics.jsonl. Evaluate the final model with")
    assert last[-1] == (f"  python evaluate.py --weights {out / 'model_final.pt'} --datasets cityscapes bdd mapillary "
                        f"--data-root {toy_root} --short-side 64")
    old = os.umask(0o027)
    try:
        generate.main(["--backend", "toy", "--out", str(tmp_path / "gen"), "--num-images", "1", "--no-progress"])
        images = tmp_path / "gen" / "images"
        labels = tmp_path / "labels"
        labels.mkdir()
        files.save_png(np.zeros((192, 192), np.uint8), labels / "im_0_p0.png")
        refine.main(["--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "ref"), "--sam", "toy",
                     "--no-progress"])
    finally:
        os.umask(old)
    for path in (images / "im_0_p0.png", tmp_path / "gen" / "manifest.jsonl", tmp_path / "gen" / "config.json",
                 tmp_path / "ref" / "im_0_p0.png", tmp_path / "ref" / "refine_config.json"):
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_no_script_prints_huggingface_cli():
    """Case 7: `huggingface-cli` is gone from huggingface_hub; every message says `hf`."""
    for path in ROOT.glob("*.py"):
        assert "huggingface-cli" not in path.read_text(), path
