"""Issue 11 "Real scale": the device-resident refinement path (CUDA cases skipped without a GPU), its CPU outputs
against a saved run of the code before the change, timing without synchronizations, and bench/real_scale.py's
tiny smoke mode."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import clouds
import refine
import train
from runtools import runs
from runtools import train_config
from test_refine import tiny_sam

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "data" / "refine_golden.npz"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


def golden():
    g = np.load(GOLDEN)
    return g, g["image"], g["label"].astype(np.int64)


def unpack(bits, width):
    return torch.from_numpy(np.unpackbits(bits, axis=-1)[..., :width].astype(bool))


# ---- CPU: the device-generic code gives the old outputs ----

@pytest.mark.parametrize("uncovered", ["drop", "ignore"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_cpu_refinement_matches_the_saved_run_of_the_old_code(uncovered, as_tensor):
    """tests/data/refine_golden.npz: refine.py of commit 435d839 (labels moved to the CPU, numpy image) on a ToyCity
    scene with a tiny random Sam; the new code must give the same targets bit for bit, from numpy or tensor inputs
    ((3, H, W) image tensor and int64 label tensor, as train.pseudo_targets now passes them)."""
    g, image, label = golden()
    w = label.shape[1]
    if as_tensor:
        image, label = torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label)
    pred = refine.SamPointPredictor(tiny_sam(), chunk_size=4)
    t = refine.pseudo_label_target(image, label, pred, refine.RefineConfig(min_area=150, uncovered=uncovered),
                                   torch.Generator().manual_seed(7))
    assert t["labels"].tolist() == g[f"{uncovered}_labels"].tolist() and len(t["labels"]) >= 4
    expected = unpack(g[f"{uncovered}_masks"], w)
    assert expected.any() and not expected.all()               # a non-trivial refinement was saved
    assert torch.equal(t["masks"], expected)
    assert set(t) == ({"labels", "masks", "valid"} if uncovered == "ignore" else {"labels", "masks"})
    if uncovered == "ignore":
        assert torch.equal(t["valid"], unpack(g["ignore_valid"], w))
    assert np.array_equal(refine.label_map(t["labels"], t["masks"]).numpy(), g[f"{uncovered}_map"])


def test_label_map_later_class_wins_like_a_loop():
    """label_map (now one argmax, device-generic) against the old per-class loop, with overlaps and empty input."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 17, 23, generator=gen) < 0.3
    classes = torch.tensor([1, 4, 7, 12, 18])
    ref = torch.full((17, 23), 255, dtype=torch.int64)
    for c, m in zip(classes.tolist(), masks):
        ref[m] = c
    out = refine.label_map(classes, masks)
    assert out.dtype == torch.int64 and torch.equal(out, ref)
    assert (masks.sum(0) > 1).any() and (out == 255).any()   # the case has overlaps and uncovered pixels
    assert torch.equal(refine.label_map(classes[:0], masks[:0]), torch.full((17, 23), 255))


def test_sam_torch_image_path_agrees_with_the_numpy_path():
    """The GPU branch of SamPointPredictor.set_image (apply_image_torch + set_torch_image), forced on the CPU: same
    encoder input frame, so nearly the same masks as SAM's own PIL path (torch's antialiased resize may differ by
    one grey level), from an (H, W, 3) array or a (3, H, W) tensor."""
    _, image, _ = golden()
    sam = tiny_sam()
    points = torch.tensor([[[10, 20], [40, 50], [100, 30]], [[5, 90], [60, 60], [127, 95]]])
    ref = refine.SamPointPredictor(sam)
    ref.set_image(image)
    m_ref, s_ref = ref.predict_points(points)
    fast = refine.SamPointPredictor(sam, torch_image=True)
    for img in (image, torch.from_numpy(image).permute(2, 0, 1)):
        fast.set_image(img)
        assert fast.predictor.original_size == (96, 128) and fast.predictor.input_size == (192, 256)
        m, s = fast.predict_points(points)
        assert m.shape == m_ref.shape and (m == m_ref).float().mean() > 0.99
        torch.testing.assert_close(s, s_ref, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="uint8 RGB"):
        fast.set_image(torch.zeros(96, 128, 3))


def test_sync_only_under_profile(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    runs.StepClock(torch.device("cuda", 0), profile=False).stop()
    assert calls == []                                            # default: no synchronization for timing
    runs.StepClock(torch.device("cuda", 0), profile=True).lap("time_teacher")
    assert calls == [torch.device("cuda", 0)] * 2                 # start, lap
    runs.StepClock(torch.device("cpu"), profile=True).stop()
    assert len(calls) == 2
    cfg = train_config.TrainConfig()
    assert cfg.tf32 is True and cfg.profile is False              # stated defaults
    assert train_config.parse_config(["--no-tf32", "--profile"]).tf32 is False


# ---- CUDA: the refinement path never leaves the device ----

def _no_host_copies(monkeypatch):
    def fail(self, *args, **kwargs):
        raise AssertionError(f"a {tuple(self.shape)} {self.dtype} tensor left the device")
    monkeypatch.setattr(torch.Tensor, "cpu", fail)
    monkeypatch.setattr(torch.Tensor, "numpy", fail)


def _cuda_inputs():
    _, image, label = golden()
    return (torch.from_numpy(image).permute(2, 0, 1).cuda(), torch.from_numpy(label).cuda(),
            refine.SamPointPredictor(tiny_sam().cuda(), chunk_size=4))


@CUDA
def test_cuda_pseudo_label_target_stays_on_the_device(monkeypatch):
    image, label, pred = _cuda_inputs()
    cfg = refine.RefineConfig(min_area=150, uncovered="ignore")
    refine.pseudo_label_target(image, label, pred, cfg, torch.Generator().manual_seed(7))  # warm up (JIT build)
    _no_host_copies(monkeypatch)
    t = refine.pseudo_label_target(image, label, pred, cfg, torch.Generator().manual_seed(7))
    monkeypatch.undo()
    assert {v.device.type for v in t.values()} == {"cuda"} and len(t["labels"]) >= 4
    # the same points as on the CPU (CPU generator); the masks may differ only through the torch resize
    g = np.load(GOLDEN)
    assert t["labels"].cpu().tolist() == g["ignore_labels"].tolist()
    assert (t["masks"].cpu() == unpack(g["ignore_masks"], label.shape[1])).float().mean() > 0.98


@CUDA
def test_cuda_refinement_trace_has_no_large_device_to_host_copy(tmp_path):
    """Profiler trace of one refinement: every device-to-host memcpy is a scalar-sized one (the counts that
    nonzero / boolean indexing read back), none of an image, label or mask."""
    from torch.profiler import ProfilerActivity, profile

    image, label, pred = _cuda_inputs()
    cfg = refine.RefineConfig(min_area=150)
    refine.pseudo_label_target(image, label, pred, cfg, torch.Generator().manual_seed(7))  # warm up (JIT, cuDNN)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        refine.pseudo_label_target(image, label, pred, cfg, torch.Generator().manual_seed(7))
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    memcpy = [e for e in events if e.get("cat") == "gpu_memcpy"]
    assert memcpy, "the trace holds no memcpy at all (the uniforms' host-to-device copy is expected)"
    dtoh = [e.get("args", {}).get("bytes", 0) for e in memcpy if "DtoH" in e.get("name", "")]
    assert max(dtoh, default=0) <= 4096, f"device-to-host copies of {sorted(dtoh)[-5:]} bytes"


@CUDA
def test_cuda_pseudo_targets_stay_on_the_device(monkeypatch):
    """train.pseudo_targets: teacher argmax, components, points, SAM and the merge without a host round trip."""
    _, image, _ = golden()
    torch.manual_seed(0)
    model = clouds.build_model("tiny").cuda().eval()
    samples = [{"image": torch.from_numpy(image).permute(2, 0, 1), "refine_seed": 3}]
    pred = refine.SamPointPredictor(tiny_sam().cuda())
    cfg = refine.RefineConfig(min_area=20)
    train.pseudo_targets(model, model.sem_seg_head, samples, pred, cfg, torch.device("cuda"))  # warm up
    original_cpu = torch.Tensor.cpu  # the sample itself is on the host, as the DataLoader returns it
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: original_cpu(self, *a, **k) if
                        self.device.type == "cpu" else pytest.fail(f"{tuple(self.shape)} left the device"))
    _, targets = train.pseudo_targets(model, model.sem_seg_head, samples, pred, cfg, torch.device("cuda"))
    monkeypatch.undo()
    assert len(targets) == 1 and {v.device.type for v in targets[0].values()} == {"cuda"}


# ---- bench/real_scale.py ----

def test_real_scale_tiny_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import real_scale
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = real_scale.main(["--tiny", "--iters", "2", "--modes", "fp32", "--p-gen", "1.0", "--work", str(tmp_path)])
    (res,) = out["results"]
    assert set(res["phases"]) == {"warmup", "joint"} and res["batch_size"] == 2 and res["device"] == "cpu"
    joint = res["phases"]["joint"]
    assert joint["n_gen"] == 2 and joint["time_refine"] > 0 and joint["pseudo_per_gen"] > 0   # p_gen 1: all generated
    assert res["estimate_hours_40k_40k"] > 0 and res["peak_rss_gb"] > 0.1
    saved = json.loads(Path(out["json"]).read_text())
    assert saved["results"][0]["mode"] == "fp32"
    assert out["table"].count("| cpu | 2 | fp32 |") == 2
    # the data were written in the real layouts: GTA5 palette labels converted to train ids, generated images
    assert len(list((tmp_path / "tiny" / "datasets" / "gta5" / "labels").glob("*_labelTrainIds.png"))) == 4
    assert len(list((tmp_path / "tiny" / "generated" / "images").glob("im_*_p0.png"))) == 4
    # issue 15: plots on, a save and an evaluation in each phase, then a resume of one more joint iteration
    run = tmp_path / "run_cpu_b2_fp32"
    for name in ("last.pt", "curves.png", "pseudo_labels.png"):
        assert (run / "joint" / name).is_file(), name
    assert out["resume"]["resumed_from"] == 2 and out["resume"]["iterations"] == 3
    assert 0 <= out["resume"]["eval"]["cityscapes"] <= 1
