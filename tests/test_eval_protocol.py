"""--eval-protocol whole|slide (issue 19): sliding-window inference against whole-image inference and a brute-force
reference; every reported number names its protocol."""
import json

import numpy as np
import pytest
import torch

import clouds
import data
import evaluate


class PixelwiseModel:
    """predict(return_scores=True): class scores that depend on each pixel alone (a 1x1 'network'), so any correct
    sliding window gives exactly the whole-image scores, whatever the overlaps."""

    def __init__(self, num_classes=5):
        torch.manual_seed(0)
        self.w = torch.randn(num_classes, 3)
        self.calls = []

    def predict(self, images, return_scores=False):
        self.calls.append(tuple(images.shape[-2:]))
        s = torch.einsum("cd,bdhw->bchw", self.w, images.float() / 255).sigmoid()  # (B, C, H, W)
        return s if return_scores else s.argmax(1)


class ContextModel(PixelwiseModel):
    """Scores that also depend on the window: + the window's mean colour and its size, so windows disagree."""

    def predict(self, images, return_scores=False):
        s = super().predict(images, True) + images.float().mean((2, 3))[:, :1, None, None] / 255 \
            + images.shape[-1] / 100
        return s if return_scores else s.argmax(1)


def brute_force_slide(model, image, window, stride):
    """Reference in float64 from the mmseg formula: h_grids = max(H - window + stride - 1, 0) // stride + 1 rows, row i
    covers [y1, y2) with y2 = min(i * stride + window, H), y1 = max(y2 - window, 0) (same for columns); each pixel's
    score is the mean over the windows that cover it, accumulated pixel by pixel."""
    _, _, H, W = image.shape
    grids = [max(n - window + stride - 1, 0) // stride + 1 for n in (H, W)]
    sums, counts = {}, np.zeros((H, W))
    for i in range(grids[0]):
        for j in range(grids[1]):
            y2, x2 = min(i * stride + window, H), min(j * stride + window, W)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            s = model.predict(image[..., y1:y2, x1:x2], return_scores=True)[0].double()  # (C, h, w)
            for y in range(y1, y2):
                for x in range(x1, x2):
                    sums[y, x] = sums.get((y, x), 0) + s[:, y - y1, x - x1]
                    counts[y, x] += 1
    out = torch.stack([torch.stack([sums[y, x] / counts[y, x] for x in range(W)], -1) for y in range(H)], -2)
    return out[None]  # (1, C, H, W)


def test_window_starts_follow_the_mmseg_grid():
    assert evaluate._window_starts(1024, 512, 341) == [0, 341, 512]  # Rein at short side 1024 (h_grids = 3)
    assert evaluate._window_starts(2048, 512, 341) == [0, 341, 682, 1023, 1364, 1536]  # h_grids = 6, last flush
    assert evaluate._window_starts(512, 512, 341) == [0] and evaluate._window_starts(300, 512, 341) == [0]
    assert evaluate._window_starts(513, 512, 341) == [0, 1]


@pytest.mark.parametrize("size,window,stride", [((40, 70), 32, 16), ((37, 53), 20, 7), ((30, 30), 64, 64)])
def test_slide_matches_the_brute_force_reference(size, window, stride):
    torch.manual_seed(1)
    image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
    model = ContextModel()
    got = evaluate.slide_predict(model, image, window, stride, return_scores=True)
    ref = brute_force_slide(ContextModel(), image, window, stride)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(evaluate.slide_predict(model, image, window, stride), got.argmax(1))


def test_pixelwise_model_slide_equals_whole_with_overlaps():
    torch.manual_seed(2)
    image = torch.randint(0, 256, (2, 3, 45, 77), dtype=torch.uint8)
    model = PixelwiseModel()
    got = evaluate.slide_predict(model, image, 24, 10, return_scores=True)
    assert len(model.calls) == 4 * 7 and set(model.calls) == {(24, 24)}  # ceil(21/10)+1 rows, ceil(53/10)+1 cols
    torch.testing.assert_close(got, model.predict(image, return_scores=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backbone", ["clip", "dinov2_tiny"])
def test_slide_equals_whole_when_the_window_covers_the_image(backbone):
    """The real tiny model (CLIP ConvNeXt-atto, or the DINOv2-class ViT with Rein): one window that covers the image
    is the whole-image forward. The max difference of the scores is printed (issue 19's closing note)."""
    torch.manual_seed(0)
    extra = {} if backbone == "clip" else {"backbone": backbone, "tuning": "rein"}
    model = clouds.build_model("tiny", **extra).eval()
    image = torch.randint(0, 256, (1, 3, 72, 100), dtype=torch.uint8)  # not a multiple of 32: predict pads
    whole = model.predict(image, return_scores=True)
    for window in (100, 128):  # exactly the long side, and larger
        slide = evaluate.slide_predict(model, image, window, 64, return_scores=True)
        diff = (slide - whole).abs().max().item()
        print(f"\n{backbone}: slide window {window} vs whole, max |score difference| = {diff:.3g}")
        assert diff == 0.0
        assert torch.equal(evaluate.slide_predict(model, image, window, 64), model.predict(image))


def test_slide_protocol_through_evaluate_model_and_main(tmp_path, toy_root, capsys):
    """evaluate.main --eval-protocol slide: the table and the JSON name the protocol; a window covering the test image
    gives the whole-image confusion matrix; a small window another one."""
    torch.manual_seed(0)
    model = clouds.build_model("tiny", backbone="dinov2_tiny", tuning="lora")
    import checkpoints

    checkpoints.save_checkpoint(tmp_path / "m.pt", model)
    base = ["--weights", str(tmp_path / "m.pt"), "--datasets", "cityscapes", "--data-root", str(toy_root),
            "--short-side", "64", "--device", "cpu", "--workers", "0", "--no-progress"]
    whole = evaluate.main(base + ["--out", str(tmp_path / "whole.json")])
    assert whole["cityscapes"]["protocol"] == "whole image, short side 64"
    assert "protocol: whole image, short side 64" in capsys.readouterr().out
    covering = evaluate.main(base + ["--eval-protocol", "slide", "--slide-window", "256", "--slide-stride", "128",
                                     "--out", str(tmp_path / "slide.json")])
    assert torch.equal(covering["cityscapes"]["conf"], whole["cityscapes"]["conf"])
    saved = json.loads((tmp_path / "slide.json").read_text())["cityscapes"]
    assert saved["protocol"] == "slide 256x256 stride 128, short side 64"
    assert "protocol: slide 256x256 stride 128, short side 64" in capsys.readouterr().out
    small = evaluate.main(base + ["--eval-protocol", "slide", "--slide-window", "48", "--slide-stride", "40"])
    assert not torch.equal(small["cityscapes"]["conf"], whole["cityscapes"]["conf"])
    assert int(small["cityscapes"]["conf"].sum()) == int(whole["cityscapes"]["conf"].sum())  # same pixels scored


def test_protocol_flag_errors(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--weights", "x", "--eval-protocol", "tiles", "--slide-stride", "600"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--eval-protocol must be one of whole, slide" in err and "--slide-stride" in err


def test_format_table_names_the_protocol():
    iou = torch.zeros(19, dtype=torch.float64)
    table = evaluate.format_table({"bdd": {"IoU": iou, "mIoU": 0.0, "mIoU16": 0.0,
                                           "protocol": evaluate.protocol_name("slide", 512, 512, 341)}})
    assert table.splitlines()[-1] == "protocol: slide 512x512 stride 341, short side 512"
    assert evaluate.protocol_name() == "whole image, short side 1024"
    assert data.NUM_CLASSES == 19
