"""evaluate.py: metrics against hand-computed and brute-force values, tables, --pred-dir and the model path (§8)."""
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate

# ---- metrics ----


def test_confusion_matrix_hand_case():
    gt = torch.tensor([[0, 0, 1], [1, 255, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    conf = evaluate.confusion_matrix(pred, gt, num_classes=3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]  # rows GT, columns prediction; 255 skipped


def test_metrics_hand_case():
    conf = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    m = evaluate.compute_metrics(conf)
    iou = [1 / 2, 2 / 3, 1.0]  # TP / (GT + pred - TP)
    assert m["IoU"].dtype == torch.float64 and torch.allclose(m["IoU"], torch.tensor(iou, dtype=torch.float64))
    assert m["mIoU"] == pytest.approx(sum(iou) / 3)
    assert m["aAcc"] == pytest.approx(4 / 5)
    assert m["mAcc"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert m["fwIoU"] == pytest.approx((2 * 1 / 2 + 2 * 2 / 3 + 1 * 1) / 5)
    assert math.isnan(m["mIoU16"])  # only defined for the 19 classes


def test_class_absent_from_gt():
    # class 2 predicted but never in the GT; class 3 neither in GT nor predicted
    gt = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    m = evaluate.compute_metrics(evaluate.confusion_matrix(pred, gt, num_classes=4))
    assert m["IoU"][2] == 0 and math.isnan(m["IoU"][3])
    assert m["mIoU"] == pytest.approx((1 / 2 + 1) / 2)  # classes 2 and 3 left out (official rule)


def test_perfect_all_wrong_and_miou16():
    gt = torch.arange(19).repeat(3)
    assert evaluate.compute_metrics(evaluate.confusion_matrix(gt, gt))["mIoU"] == 1.0
    m = evaluate.compute_metrics(evaluate.confusion_matrix((gt + 1) % 19, gt))
    assert m["mIoU"] == 0.0 and m["aAcc"] == 0.0 and m["mIoU16"] == 0.0
    pred = gt.clone()
    for c, wrong in ((9, 14), (14, 16), (16, 9)):  # the classes SYNTHIA lacks are all wrong, the 16 others perfect
        pred[gt == c] = wrong
    m = evaluate.compute_metrics(evaluate.confusion_matrix(pred, gt))
    assert m["mIoU16"] == pytest.approx(1.0)
    assert m["mIoU"] == pytest.approx(16 / 19)
    pred[gt == 9] = 0  # road: 3 TP + 3 FP -> IoU 1/2, inside SYNTHIA16
    m = evaluate.compute_metrics(evaluate.confusion_matrix(pred, gt))
    assert m["mIoU16"] == pytest.approx(15.5 / 16) and m["mIoU"] == pytest.approx(15.5 / 19)


def _brute_force(pred, gt, c=19):
    conf = np.zeros((c, c), np.int64)
    for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist()):
        if g != 255:
            conf[g, p] += 1
    iou = []
    for k in range(c):
        tp, fp, fn = conf[k, k], conf[:, k].sum() - conf[k, k], conf[k, :].sum() - conf[k, k]
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else float("nan"))
    present = [k for k in range(c) if conf[k].sum() > 0]
    return conf, float(np.mean([iou[k] for k in present]))


def test_random_against_brute_force_and_accumulation():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 19, (2, 30, 40), generator=g)
    gt[torch.rand(gt.shape, generator=g) < 0.2] = 255
    gt[gt == 5] = 255  # one class never in the GT
    pred = torch.randint(0, 19, (2, 30, 40), generator=g)
    ref_conf, ref_miou = _brute_force(pred.numpy(), gt.numpy())
    total = evaluate.confusion_matrix(pred[0], gt[0]) + evaluate.confusion_matrix(pred[1], gt[1])
    assert total.tolist() == ref_conf.tolist() == evaluate.confusion_matrix(pred, gt).tolist()
    assert evaluate.compute_metrics(total)["mIoU"] == pytest.approx(ref_miou)
    assert evaluate.compute_metrics(total)["IoU"][5] == 0  # predicted but absent from the GT


def test_confusion_matrix_bad_inputs():
    gt = torch.tensor([[0, 255], [1, 2]])
    with pytest.raises(ValueError, match=r"prediction values \[19, 255\]"):
        evaluate.confusion_matrix(torch.tensor([[19, 0], [255, 1]]), gt)
    evaluate.confusion_matrix(torch.tensor([[0, 77], [1, 2]]), gt)  # anything goes on ignored pixels
    with pytest.raises(ValueError, match=r"prediction values \[-1\]"):
        evaluate.confusion_matrix(torch.tensor([[-1, 0], [1, 2]]), gt)
    with pytest.raises(ValueError, match=r"GT values \[30\]"):
        evaluate.confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[30, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"shape \(2, 3\) != GT shape \(2, 2\)"):
        evaluate.confusion_matrix(torch.zeros(2, 3, dtype=torch.long), gt)
    with pytest.raises(ValueError, match="integer class maps"):
        evaluate.confusion_matrix(torch.zeros(2, 2), gt)


def test_format_table_indexes_by_class_id():
    iou_a = torch.full((19,), float("nan"), dtype=torch.float64)
    iou_a[15] = 0.25  # bus
    iou_a[8] = 0.75  # vegetation ("bushes" once matched "bus" by substring)
    iou_b = torch.zeros(19, dtype=torch.float64)
    iou_b[15] = 0.5
    results = {"bdd": {"IoU": iou_a, "mIoU": 0.5, "mIoU16": 0.4}, "mapillary": {"IoU": iou_b, "mIoU": 0.3,
                                                                               "mIoU16": float("nan")}}
    table = evaluate.format_table(results)
    lines = table.splitlines()
    assert lines[0] == "| class | bdd | mapillary | average |"
    assert "| bus | 25.00 | 50.00 | 37.50 |" in lines
    assert "| vegetation | 75.00 | 0.00 | 37.50 |" in lines
    assert "| road | - | 0.00 | 0.00 |" in lines
    assert "| **mIoU** | 50.00 | 30.00 | 40.00 |" in lines and "| mIoU16 | 40.00 | - | 40.00 |" in lines
    assert len(lines) == 2 + 19 + 2
    single = evaluate.format_table({"bdd": results["bdd"]}).splitlines()
    assert single[0] == "| class | bdd |" and "| bus | 25.00 |" in single


# ---- self-made datasets ----

H, W = 16, 24


def _write(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_acdc(root, n=3, seed=0):
    """acdc/…/fog/val with PNG images whose R channel encodes the label (10 * id; 250 for ignore)."""
    rng = np.random.default_rng(seed)
    labels = {}
    for k in range(n):
        lab = rng.choice(np.array(list(range(19)) + [255]), size=(H, W)).astype(np.uint8)
        lab[:, :3] = k  # bands so that resizing keeps some area per class
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        img[..., 0] = np.where(lab == 255, 250, lab.astype(np.int64) * 10)
        stem = f"GOPR0475_frame_{k:06d}"
        _write(img, root / f"acdc/rgb_anon/fog/val/GOPR0475/{stem}_rgb_anon.png")
        _write(lab, root / f"acdc/gt/fog/val/GOPR0475/{stem}_gt_labelTrainIds.png")
        labels[f"{stem}_rgb_anon"] = lab
    return labels


def make_bdd(root, n=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = {}
    for k in range(n):
        lab = rng.choice(np.array(list(range(19)) + [255]), size=(H, W)).astype(np.uint8)
        _write(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), root / f"bdd10k/images/10k/val/b{k}.jpg")
        _write(lab, root / f"bdd10k/labels/sem_seg/masks/val/b{k}.png")
        labels[f"b{k}"] = lab
    return labels


class FakeModel:
    """Reads the class from the R channel: what make_acdc wrote, so it is right wherever R was not blended."""

    def __init__(self):
        self.training, self.shapes = True, []

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def to(self, device):
        return self

    def predict(self, images):
        assert images.dtype == torch.uint8 and images.shape[:2] == (1, 3)
        self.shapes.append(tuple(images.shape))
        return ((images[:, 0].long() + 5) // 10).clamp(0, 18)  # (1, H, W)


# ---- --pred-dir ----

def test_pred_dir_end_to_end(tmp_path):
    labels = make_bdd(tmp_path)
    rng = np.random.default_rng(1)
    preds = {}
    for stem, lab in labels.items():
        pred = np.where(rng.random(lab.shape) < 0.7, np.where(lab == 255, 0, lab), rng.integers(0, 19, lab.shape))
        preds[stem] = pred.astype(np.uint8)
        _write(preds[stem], tmp_path / f"preds/{stem}.png")
    out = tmp_path / "res/bdd.json"
    res = evaluate.main(["--pred-dir", str(tmp_path / "preds"), "--dataset", "bdd", "--data-root", str(tmp_path),
                         "--out", str(out), "--no-progress"])
    stems = sorted(labels)
    ref_conf, ref_miou = _brute_force(np.stack([preds[s] for s in stems]).astype(np.int64),
                                      np.stack([labels[s] for s in stems]).astype(np.int64))
    assert res["bdd"]["conf"].tolist() == ref_conf.tolist()
    assert res["bdd"]["mIoU"] == pytest.approx(ref_miou)
    saved = json.loads(out.read_text())
    assert saved["bdd"]["mIoU"] == pytest.approx(ref_miou) and set(saved["bdd"]["IoU"]) == set(data.CLASSES)
    assert saved["bdd"]["conf"] == ref_conf.tolist()


def test_pred_dir_test_size_and_errors(tmp_path):
    labels = make_bdd(tmp_path, n=2)
    size = data.shortest_edge_size(H, W, 32)  # (32, 48)
    for stem, lab in labels.items():  # perfect predictions at the test size
        gt = data.resize_label(lab, size)
        _write(np.where(gt == 255, 0, gt).astype(np.uint8), tmp_path / f"preds/{stem}.png")
    args = ["--pred-dir", str(tmp_path / "preds"), "--dataset", "bdd", "--data-root", str(tmp_path), "--no-progress"]
    assert evaluate.main(args + ["--short-side", "32"])["bdd"]["mIoU"] == 1.0
    with pytest.raises(ValueError, match=r"is 32x48; expected the GT size 16x24 or the test size 64x96"):
        evaluate.main(args + ["--short-side", "64", "--debug"])
    (tmp_path / "preds/b1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 predictions missing .*b1.png"):
        evaluate.main(args + ["--debug"])


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of --weights"):
        evaluate.main(["--data-root", str(tmp_path), "--debug"])
    with pytest.raises(ValueError, match="unknown test dataset"):
        evaluate.main(["--weights", "x", "--datasets", "kitti", "--debug"])
    with pytest.raises(ValueError, match="scores one dataset"):
        evaluate.main(["--pred-dir", "p", "--datasets", "bdd", "mapillary", "--debug"])


# ---- model path ----

@pytest.fixture
def fake_clouds(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the weights files the tests name exist (main checks them first)
    for name in ("ck.pt", "model_final.pth"):
        (tmp_path / name).write_bytes(b"")
    calls = []
    model = FakeModel()

    def load_checkpoint(path, **kw):
        calls.append(("load_checkpoint", path, kw))
        return model, {}

    def build_model(preset, **kw):
        calls.append(("build_model", preset, kw))
        return model

    def load_official(path, m=None):
        calls.append(("load_official", path, m))
        return model, {"preset": "convnext_large", "skipped": ["void_embedding.weight"]}

    mod = types.SimpleNamespace(load_checkpoint=load_checkpoint, build_model=build_model, load_official=load_official)
    monkeypatch.setitem(sys.modules, "clouds", mod)
    monkeypatch.setitem(sys.modules, "checkpoints", mod)  # evaluate.load_model loads through checkpoints.py
    return model, calls


def test_model_path_end_to_end(tmp_path, fake_clouds, capsys):
    model, calls = fake_clouds
    make_acdc(tmp_path)
    out, pred_dir = tmp_path / "r.json", tmp_path / "pred"
    res = evaluate.main(["--weights", "ck.pt", "--datasets", "acdc_fog", "--data-root", str(tmp_path),
                         "--short-side", "16", "--device", "cpu", "--workers", "0", "--save-pred", str(pred_dir),
                         "--out", str(out), "--no-progress"])
    assert calls == [("load_checkpoint", "ck.pt", {})]
    assert res["acdc_fog"]["mIoU"] == 1.0 and res["acdc_fog"]["aAcc"] == 1.0  # native size: R channel is exact
    assert model.shapes == [(1, 3, H, W)] * 3  # batch 1, whole image
    assert "| **mIoU** | 100.00 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["acdc_fog"]["mIoU"] == 1.0
    stem = "GOPR0475_frame_000000_rgb_anon"
    assert (pred_dir / f"acdc_fog/{stem}.png").is_file() and (pred_dir / f"acdc_fog/{stem}_color.png").is_file()
    rescored = evaluate.main(["--pred-dir", str(pred_dir / "acdc_fog"), "--dataset", "acdc_fog", "--data-root",
                              str(tmp_path), "--no-progress"])
    assert torch.equal(rescored["acdc_fog"]["conf"], res["acdc_fog"]["conf"])


def test_model_path_resized_against_brute_force(tmp_path, fake_clouds):
    model, _ = fake_clouds
    make_acdc(tmp_path)
    ds = data.build_dataset("acdc_fog", tmp_path, transform=data.TestTransform(40))
    metrics = evaluate.evaluate_model(model, ds, progress=False)
    assert model.shapes[0] == (1, 3, 40, 60) and model.training  # the training mode is restored
    preds, gts = [], []
    for i in range(len(ds)):  # reference: the fake's rule applied by hand to the resized samples
        s = ds[i]
        preds.append(np.clip((s["image"][0].numpy().astype(np.int64) + 5) // 10, 0, 18))
        gts.append(s["label"].numpy())
    ref_conf, ref_miou = _brute_force(np.stack(preds), np.stack(gts))
    assert metrics["conf"].tolist() == ref_conf.tolist()
    assert metrics["mIoU"] == pytest.approx(ref_miou)


def test_official_path(tmp_path, fake_clouds):
    model, calls = fake_clouds
    make_acdc(tmp_path, n=1)
    args = ["--weights", "model_final.pth", "--official", "--datasets", "acdc_fog", "--data-root", str(tmp_path),
            "--short-side", "16", "--device", "cpu", "--no-progress"]
    evaluate.main(args)
    assert calls == [("load_official", "model_final.pth", None)]  # preset inferred from the file
    calls.clear()
    evaluate.main(args + ["--preset", "rn50", "--clip-weights", "/w/rn50.pt"])
    assert calls == [("build_model", "rn50", {"pretrained": "/w/rn50.pt"}),
                     ("load_official", "model_final.pth", model)]


def test_distributed_ranks_split_and_sum(tmp_path, fake_clouds, monkeypatch):
    model, _ = fake_clouds
    make_acdc(tmp_path, n=5)
    ds = data.build_dataset("acdc_fog", tmp_path, transform=data.TestTransform(16))
    full = evaluate.evaluate_model(model, ds, progress=False)["conf"]
    parts = []
    for rank in range(2):
        model.shapes.clear()
        monkeypatch.setattr(evaluate, "_dist_info", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(evaluate, "_all_reduce", lambda conf: parts.append(conf.clone()) or conf)
        evaluate.evaluate_model(model, ds, progress=False)
        assert len(model.shapes) == (3 if rank == 0 else 2)  # indices rank::2
    assert torch.equal(parts[0] + parts[1], full)


def test_real_tiny_model_contract(tmp_path, monkeypatch):
    """evaluate_model against the real clouds.CLOUDS.predict (random-init `tiny` preset, pure-PyTorch ops)."""
    clouds = pytest.importorskip("clouds", reason="clouds.py is another helper's file")
    monkeypatch.setenv("CLOUDS_OPS_IMPL", "ref")  # no JIT build in this test
    labels = make_acdc(tmp_path, n=2)
    torch.manual_seed(0)
    model = clouds.build_model("tiny")
    ds = data.build_dataset("acdc_fog", tmp_path, transform=data.TestTransform(40))  # 40x60: not a multiple of 32
    m = evaluate.evaluate_model(model, ds, progress=False, save_dir=tmp_path / "pred")
    valid = sum(int((data.resize_label(lab, (40, 60)) != 255).sum()) for lab in labels.values())
    assert int(m["conf"].sum()) == valid and 0.0 <= m["mIoU"] <= 1.0
    pred = np.array(Image.open(tmp_path / "pred/GOPR0475_frame_000000_rgb_anon.png"))
    assert pred.shape == (40, 60) and pred.max() < 19


# ---- command line: one message, --images ----

def fail(argv, capsys):
    """evaluate.main must refuse: exit code 2, one message on stderr, no traceback -> the message."""
    with pytest.raises(SystemExit) as err:
        evaluate.main(argv)
    msg = capsys.readouterr().err
    assert err.value.code == 2 and "Traceback" not in msg, msg
    return msg


def test_cli_lists_every_problem_with_its_flag(tmp_path, capsys):
    msg = fail(["--datasets", "kitti", "--short-side", "0"], capsys)
    assert "3 problem(s)" in msg and "--datasets" in msg and "kitti" in msg and "--weights" in msg
    assert "--short-side must be >= 1, got 0" in msg
    make_bdd(tmp_path, n=1)
    msg = fail(["--weights", str(tmp_path / "none.pt"), "--datasets", "bdd", "mapillary", "--data-root",
                str(tmp_path)], capsys)
    assert "2 problem(s)" in msg and "--weights" in msg and "none.pt does not exist" in msg
    assert "--datasets mapillary" in msg and "mapillary_vistas" in msg and "--datasets bdd" not in msg
    msg = fail(["--weights", str(tmp_path / "none.pt"), "--images", str(tmp_path / "photos")], capsys)
    assert "--save-pred" in msg
    msg = fail(["--pred-dir", str(tmp_path / "nopred"), "--dataset", "bdd", "--data-root", str(tmp_path)], capsys)
    assert "--pred-dir" in msg and "nopred" in msg


def test_help_has_text_and_defaults(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1024)" in text and "acdc_snow" in text and "--images" in text and "--overwrite" in text
    assert "--debug" in text and "(default: auto)" in text


def test_images_inference_with_a_tiny_checkpoint(tmp_path, monkeypatch, capsys):
    """--weights W --images DIR --save-pred OUT: per image a train-id PNG, a colour PNG and an overlay, at the
    image's own size, against the model's own prediction; a rerun is refused unless --overwrite."""
    clouds = pytest.importorskip("clouds", reason="clouds.py is another helper's file")
    checkpoints = pytest.importorskip("checkpoints", reason="checkpoints.py is another helper's file")
    monkeypatch.setenv("CLOUDS_OPS_IMPL", "ref")
    torch.manual_seed(0)
    model = clouds.build_model("tiny")
    checkpoints.save_checkpoint(tmp_path / "tiny.pt", model)
    rng = np.random.default_rng(0)
    sizes = {"a": (40, 60), "b": (50, 33)}  # landscape and portrait, not multiples of 32
    for stem, (h, w) in sizes.items():
        _write(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), tmp_path / f"photos/{stem}.png")
    out = tmp_path / "pred"
    args = ["--weights", str(tmp_path / "tiny.pt"), "--images", str(tmp_path / "photos"), "--save-pred", str(out),
            "--short-side", "32", "--device", "cpu", "--no-progress"]
    assert evaluate.main(args)["images"] == 2
    model.eval()
    for stem, (h, w) in sizes.items():
        image = np.array(Image.open(tmp_path / f"photos/{stem}.png"))
        pred = np.array(Image.open(out / f"{stem}.png"))
        assert pred.shape == (h, w) and pred.max() < 19
        colour = np.array(Image.open(out / f"{stem}_color.png"))
        over = np.array(Image.open(out / f"{stem}_overlay.png"))
        assert colour.shape == over.shape == (h, w, 3) and np.array_equal(colour, data.colorize(pred))
        ref = (image.astype(np.float64) + colour) / 2  # independent: the 50/50 blend in float64
        assert np.abs(over.astype(np.float64) - ref).max() <= 0.5 + 1e-9
        size = data.shortest_edge_size(h, w, 32)  # reference: the model on the resized image, resized back
        x = torch.from_numpy(data.resize_image(image, size)).permute(2, 0, 1)[None]
        with torch.inference_mode():
            expected = data.resize_label(model.predict(x)[0].numpy().astype(np.uint8), (h, w))
        assert np.array_equal(pred, expected)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    msg = fail(args, capsys)
    assert "--save-pred" in msg and "--overwrite" in msg and "6 prediction files" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten
    assert evaluate.main(args + ["--overwrite"])["images"] == 2
    assert not list(out.glob(".*"))  # no temp files left
