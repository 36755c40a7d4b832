"""Tests of refine.py: SAM predictor seam (tiny random-init Sam), merge logic (fake predictor), ToyCity gain, CLI."""
import json
import zlib
from functools import partial

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import data
import ops
import refine
from toyworld import sam as toysam


# ---- helpers ----

def tiny_sam(img_size=256):
    """Random-init Sam from segment_anything's blocks (environment.md §3)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    patch, d = 16, 32
    torch.manual_seed(0)
    return Sam(image_encoder=ImageEncoderViT(img_size=img_size, patch_size=patch, embed_dim=32, depth=2, num_heads=2,
                                             mlp_ratio=2.0, out_chans=d, qkv_bias=True,
                                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                             window_size=4, global_attn_indexes=(1,)),
               prompt_encoder=PromptEncoder(embed_dim=d, image_embedding_size=(img_size // patch, img_size // patch),
                                            input_image_size=(img_size, img_size), mask_in_chans=8),
               mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                        transformer=TwoWayTransformer(depth=2, embedding_dim=d, mlp_dim=64,
                                                                      num_heads=2),
                                        transformer_dim=d, iou_head_depth=3, iou_head_hidden_dim=32),
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


class FakePredictor:
    """Candidates per prompt: [whole image (score .1), bbox of the points grown by `grow` px (.9), empty (.5)]."""

    def __init__(self, grow=2):
        self.grow, self.calls, self.images = grow, [], 0

    def set_image(self, image):
        self.h, self.w = image.shape[:2]
        self.images += 1

    def predict_points(self, points, multimask=True):
        assert multimask
        self.calls.append(points.clone())
        masks = torch.zeros(len(points), 3, self.h, self.w, dtype=torch.bool)
        masks[:, 0] = True
        for i, p in enumerate(points):
            x0, y0 = (p.min(0).values - self.grow).clamp(min=0).tolist()
            x1, y1 = (p.max(0).values + self.grow + 1).tolist()
            masks[i, 1, y0:y1, x0:x1] = True
        return masks, torch.tensor([[0.1, 0.9, 0.5]]).repeat(len(points), 1)


def expected_merge(label, points, grow, rm_intersection=True):
    """Independent reference: bbox masks of the recorded prompts, overlap removal, per-class union (numpy)."""
    h, w = label.shape
    sel = np.zeros((len(points), h, w), bool)
    for i, p in enumerate(points.numpy()):
        x0, y0 = np.maximum(p.min(0) - grow, 0)
        x1, y1 = p.max(0) + grow + 1
        sel[i, y0:y1, x0:x1] = True
    if rm_intersection:
        sel &= sel.sum(0) < 2
    cls = np.array([label[p[0, 1], p[0, 0]] for p in points.numpy()])  # class under the prompt's first point
    classes = np.unique(cls)
    return classes, np.stack([sel[cls == c].any(0) for c in classes])


def blocks_label():
    """40x60 map: class 0 left, class 2 top right, class 7 bottom right, a 3x3 class-5 speck, an ignore strip."""
    label = np.zeros((40, 60), np.int64)
    label[:20, 30:] = 2
    label[20:, 30:] = 7
    label[5:8, 5:8] = 5
    label[:, 58:] = 255
    return label


# ---- SamPointPredictor on a tiny random Sam ----

@pytest.mark.parametrize("size", [(100, 160), (192, 192)])
def test_sam_point_predictor_matches_segment_anything(size):
    from segment_anything import SamPredictor
    sam = tiny_sam()
    h, w = size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    points = torch.stack([torch.randint(0, w, (7, 5)), torch.randint(0, h, (7, 5))], -1)  # (7, 5, 2) xy
    pred = refine.SamPointPredictor(sam, chunk_size=3)  # 3 chunks: 3 + 3 + 1
    pred.set_image(image)
    masks, scores = pred.predict_points(points)
    assert masks.shape == (7, 3, h, w) and masks.dtype == torch.bool and scores.shape == (7, 3)
    # reference: segment_anything's own numpy path, one prompt at a time
    ref = SamPredictor(sam)
    ref.set_image(image)
    for i in range(7):
        m, s, _ = ref.predict(point_coords=points[i].numpy().astype(np.float32), point_labels=np.ones(5),
                              multimask_output=True)
        assert np.array_equal(masks[i].numpy(), m)
        np.testing.assert_allclose(scores[i].numpy(), s, rtol=1e-4, atol=1e-5)
    one = refine.SamPointPredictor(sam, chunk_size=64)
    one.set_image(image)
    m1, s1 = one.predict_points(points)
    assert torch.equal(m1, masks)
    torch.testing.assert_close(s1, scores, rtol=1e-4, atol=1e-5)
    m0, s0 = one.predict_points(torch.zeros(0, 5, 2, dtype=torch.int64))
    assert m0.shape == (0, 3, h, w) and s0.shape == (0, 3)


def test_build_predictor_loads_checkpoint_and_explains_missing(tmp_path, monkeypatch):
    import segment_anything
    sam = tiny_sam()
    ckpt = tmp_path / "tiny_sam.pth"
    torch.save(sam.state_dict(), ckpt)
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam().apply(
        lambda m: torch.nn.init.zeros_(m.weight) if isinstance(m, torch.nn.Linear) else None))
    pred = refine.build_predictor("vit_b", checkpoint=ckpt)
    image = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    pts = torch.tensor([[[10, 20], [50, 30]]])
    pred.set_image(image)
    ref = refine.SamPointPredictor(sam)
    ref.set_image(image)
    assert torch.equal(pred.predict_points(pts)[0], ref.predict_points(pts)[0])  # weights came from the file
    with pytest.raises(FileNotFoundError) as err:
        refine.build_predictor("vit_h", checkpoint=tmp_path / "missing.pth")
    assert "missing.pth does not exist" in str(err.value) and "--checkpoint" in str(err.value)
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in str(err.value)
    with pytest.raises(ValueError, match="vit_t"):
        refine.build_predictor("vit_x")


def test_mobile_sam_missing_names_the_pypi_package(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mobile_sam" else real(name, *a))
    with pytest.raises(ImportError, match="pip install mobilesam-mirror") as err:
        refine.build_predictor("vit_t", checkpoint="weights/mobile_sam.pt")
    assert "git+https" not in str(err.value)


def test_mobile_sam_vit_t_matches_its_own_predictor(tmp_path):
    """--sam vit_t builds the real TinyViT SAM (random init here) and loads the checkpoint; any image size works."""
    from mobile_sam import SamPredictor, sam_model_registry
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"](checkpoint=None).eval()
    ckpt = tmp_path / "mobile_sam.pt"
    torch.save(sam.state_dict(), ckpt)
    del sam
    pred = refine.build_predictor("vit_t", checkpoint=ckpt, chunk_size=2)
    model = pred.predictor.model
    assert type(model.image_encoder).__name__ == "TinyViT"
    saved = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # weights came from the file
    ref = SamPredictor(model)  # mobile_sam's own single-prompt numpy path
    rng = np.random.default_rng(0)
    for h, w in [(100, 160), (192, 192)]:  # the encoder (1024x1024 input) runs once per size: ~5-15 s on 2 CPUs
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        points = torch.stack([torch.randint(0, w, (3, 5)), torch.randint(0, h, (3, 5))], -1)  # (3, 5, 2) xy
        pred.set_image(image)
        masks, scores = pred.predict_points(points)                                          # 2 chunks: 2 + 1
        assert masks.shape == (3, 3, h, w) and scores.shape == (3, 3)
        ref.features, ref.original_size, ref.input_size = pred.predictor.features, (h, w), pred.predictor.input_size
        ref.is_image_set = True  # same embedding; the prompt path is what is compared
        for i in range(3):
            m, s, _ = ref.predict(point_coords=points[i].numpy().astype(np.float32), point_labels=np.ones(5),
                                  multimask_output=True)
            assert np.array_equal(masks[i].numpy(), m)
            np.testing.assert_allclose(scores[i].numpy(), s, rtol=1e-4, atol=1e-5)


def test_merge_intersection_and_class_assignment():
    label = blocks_label()
    fake = FakePredictor(grow=2)
    cfg = refine.RefineConfig(min_area=50)
    classes, masks = refine.refine_pseudo_label(np.zeros((40, 60, 3), np.uint8), label, fake, cfg,
                                                torch.Generator().manual_seed(0))
    (points,) = fake.calls
    assert len(points) == 3  # classes 0, 2, 7 (the 9-px class-5 speck is below min_area)
    for p in points:  # all points of a prompt lie in one teacher component
        assert len({label[y, x] for x, y in p.tolist()}) == 1
    exp_classes, exp_masks = expected_merge(label, points, grow=2)
    assert classes.tolist() == exp_classes.tolist() == [0, 2, 7]
    assert masks.dtype == torch.bool and np.array_equal(masks.numpy(), exp_masks)
    # without intersection removal the overlaps stay
    fake2 = FakePredictor(grow=2)
    cfg2 = refine.RefineConfig(min_area=50, rm_intersection=False)
    _, masks2 = refine.refine_pseudo_label(np.zeros((40, 60, 3), np.uint8), label, fake2, cfg2,
                                           torch.Generator().manual_seed(0))
    assert np.array_equal(masks2.numpy(), expected_merge(label, fake2.calls[0], 2, rm_intersection=False)[1])


def test_classes_whose_masks_vanish_keep_an_empty_mask():
    """§5.3.4: every selected mask is the whole image, so overlap removal empties them all; the classes stay."""
    class WholeImage(FakePredictor):
        def predict_points(self, points, multimask=True):
            masks, scores = super().predict_points(points, multimask)
            return masks, torch.tensor([[0.9, 0.1, 0.5]]).repeat(len(points), 1)   # candidate 0: whole image

    classes, masks = refine.refine_pseudo_label(np.zeros((40, 60, 3), np.uint8), blocks_label(), WholeImage(),
                                                refine.RefineConfig(min_area=50), torch.Generator().manual_seed(0))
    assert classes.tolist() == [0, 2, 7] and masks.shape == (3, 40, 60) and not masks.any()


def test_best_iou_candidate_is_selected():
    label = np.zeros((30, 30), np.int64)
    fake = FakePredictor(grow=0)
    classes, masks = refine.refine_pseudo_label(np.zeros((30, 30, 3), np.uint8), label, fake,
                                                refine.RefineConfig(min_area=10), torch.Generator().manual_seed(1))
    (points,) = fake.calls
    # candidate 1 (score .9) is the points' bbox: neither the whole image (.1) nor empty (.5)
    exp = np.zeros((30, 30), bool)
    (x0, y0), (x1, y1) = points[0].min(0).values.tolist(), points[0].max(0).values.tolist()
    exp[y0:y1 + 1, x0:x1 + 1] = True
    assert classes.tolist() == [0] and np.array_equal(masks[0].numpy(), exp)


def test_erosion_leaves_a_component_without_points():
    """Official bug §9.7: a component that loses all its points must not shift masks to other classes."""
    label = np.full((40, 60), 3, np.int64)
    label[10:12, :] = 1            # class 1: a 2-px-high strip, 120 px > min_area, empty after 3x3 erosion
    label[25:35, 5:25] = 6         # class 6: 200 px block
    fake = FakePredictor(grow=1)
    cfg = refine.RefineConfig(min_area=100, erosion=True, erosion_size=3)
    classes, masks = refine.refine_pseudo_label(np.zeros((40, 60, 3), np.uint8), label, fake, cfg,
                                                torch.Generator().manual_seed(0))
    (points,) = fake.calls
    ref = {int(label[p[0, 1], p[0, 0]]) for p in points}
    assert ref == {3, 6}            # the strip had no prompt (class 3 has two components around the strip)
    exp_classes, exp_masks = expected_merge(label, points, grow=1)
    assert classes.tolist() == exp_classes.tolist() == [3, 6]
    assert np.array_equal(masks.numpy(), exp_masks)
    for p in points:                # the points lie in the eroded component (scipy reference)
        c = label[p[0, 1], p[0, 0]]
        lab, _ = ndi.label(label == c)
        comp = lab == lab[p[0, 1], p[0, 0]]
        eroded = ndi.binary_erosion(comp, np.ones((3, 3)))
        assert all(eroded[y, x] for x, y in p.tolist())


@pytest.mark.parametrize("size", [2, 3, 4, 5])
def test_erode_components_matches_scipy(size):
    rng = np.random.default_rng(size)
    label = ndi.zoom(rng.integers(0, 4, (8, 10)), 5, order=0)[:37, :47]
    label[rng.random(label.shape) < 0.02] = 255
    comps = ops.connected_components(torch.from_numpy(label))[0].long()
    eroded = refine.erode_components(comps, size).numpy()
    ref = np.full(label.shape, -1)
    for v in range(int(comps.max()) + 1):
        ref[ndi.binary_erosion(comps.numpy() == v, np.ones((size, size)))] = v
    assert np.array_equal(eroded, ref)


def test_strict_area_threshold_and_fallback():
    label = np.zeros((20, 20), np.int64)
    label[:5, :4] = 4               # 20 px
    label[15:, 15:] = 255
    image = np.zeros((20, 20, 3), np.uint8)
    area0 = 400 - 20 - 25           # class 0 area
    fake = FakePredictor()
    classes, masks = refine.refine_pseudo_label(image, label, fake, refine.RefineConfig(min_area=area0))
    assert fake.images == 0 and fake.calls == []        # area == min_area: no prompt -> teacher masks
    assert classes.tolist() == [0, 4]
    assert np.array_equal(masks.numpy(), np.stack([label == 0, label == 4]))
    fake = FakePredictor()
    refine.refine_pseudo_label(image, label, fake, refine.RefineConfig(min_area=area0 - 1))
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 1  # min_area + 1 == area: prompted
    fake = FakePredictor()
    refine.refine_pseudo_label(image, label, fake, refine.RefineConfig(min_area=19))
    assert len(fake.calls[0]) == 2  # the 20-px class-4 block too


def test_pseudo_label_target_and_label_map():
    label = blocks_label()
    image = np.zeros((40, 60, 3), np.uint8)
    drop = refine.pseudo_label_target(image, label, FakePredictor(), refine.RefineConfig(min_area=50),
                                      torch.Generator().manual_seed(0))
    assert set(drop) == {"labels", "masks"}
    ign = refine.pseudo_label_target(image, label, FakePredictor(), refine.RefineConfig(min_area=50,
                                     uncovered="ignore"), torch.Generator().manual_seed(0))
    assert torch.equal(ign["masks"], drop["masks"]) and torch.equal(ign["valid"], drop["masks"].any(0))
    assert not ign["valid"].all()
    fallback = refine.pseudo_label_target(image, label, FakePredictor(), refine.RefineConfig(min_area=10 ** 6,
                                          uncovered="ignore"))
    assert "valid" not in fallback
    lm = refine.label_map(drop["labels"], drop["masks"]).numpy()
    ref = np.full(label.shape, 255)
    for c, m in zip(drop["labels"].tolist(), drop["masks"].numpy()):
        ref[m] = c
    assert lm.dtype == np.int64 and np.array_equal(lm, ref) and (lm == 255).any()
    with pytest.raises(ValueError, match="interior"):
        refine.RefineConfig(mode="center")


# ---- ToyCity: refinement of a weak teacher with ToyPointPredictor ----

C = 19
TOY_PROMPTS = ("A photo of a wide city road on a bright summer afternoon with cars waiting at a red traffic light",
               "A photo of a tram stop in a European city with people waiting under a grey sky",
               "A photo of a city square at sunset with a traffic sign and people walking by",
               "A photo of a school bus stopping on a tree-lined street in early autumn",
               "A photo of a coastal town road on a windy day with palm trees bending in the wind",
               "A photo of a cobblestone street in an old town with cafe tables on the sidewalk")


def mode_filter(label, k):
    """A blurry teacher: the most frequent label in a k x k window (rounded boundaries, thin things vanish)."""
    x = torch.from_numpy(np.where(label == 255, C, label).astype(np.int64))
    votes = torch.nn.functional.avg_pool2d(torch.nn.functional.one_hot(x, C + 1).permute(2, 0, 1)[None].float(), k,
                                           stride=1, padding=k // 2, count_include_pad=False)[0]
    out = votes.argmax(0).numpy()
    return np.where(out == C, 255, out)


def swap_blobs(label, rng, n, radius):
    """A confused teacher: n discs (radius radius/2..radius) relabelled to a class absent from the disc."""
    out, (h, w) = label.copy(), label.shape
    yy, xx = np.mgrid[:h, :w]
    for _ in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(radius // 2, radius + 1)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        out[disc] = rng.choice(np.setdiff1d(np.arange(C), out[disc]))
    return out


def confusion(pred, gt):
    """(C, C+1) counts, rows GT, columns prediction; the last column counts unlabelled (255) predictions."""
    v = gt != 255
    p = np.where(pred[v] == 255, C, pred[v])
    return np.bincount(gt[v].astype(np.int64) * (C + 1) + p, minlength=C * (C + 1)).reshape(C, C + 1)


def miou(conf):
    """Mean IoU over the classes present in the GT; unlabelled predictions count as misses."""
    tp = np.diag(conf[:, :C]).astype(np.float64)
    union = conf.sum(1) + conf[:, :C].sum(0) - tp
    present = conf.sum(1) > 0
    return 100 * float(np.mean(tp[present] / union[present]))


def test_toy_refinement_sharpens_a_weak_teacher():
    """Sec. 3.3 on ToyCity: a blurred teacher with small swapped blobs, refined with the official rules.

    The official refinement drops every component <= min_area and every pixel claimed twice, so it trades coverage
    for precision. The gain is measured where the refined label says something: on the pixels it covers, its mIoU
    against GT must beat the teacher's on the same pixels by >= 5 points, with >= 55% of the pixels covered.
    The strict mIoU (uncovered pixels counted as misses, all 19 classes) is printed too; it falls (small classes
    are dropped by design).
    """
    from toyworld import city
    size = 192
    cfg = refine.RefineConfig(min_area=round(5000 * size * size / 768 ** 2))  # official 5000 px at 768^2 -> 312
    assert np.pi * 6 ** 2 < cfg.min_area  # blobs are below the threshold: no prompt of their own
    predictor = toysam.ToyPointPredictor()
    cov_t, cov_r, all_t, all_r = (np.zeros((C, C + 1), np.int64) for _ in range(4))
    covered = []
    for seed, prompt in enumerate(TOY_PROMPTS):
        image, gt = city.render_with_label(prompt, seed, size=(size, size))
        teacher = swap_blobs(mode_filter(gt, 7), np.random.default_rng(seed), n=30, radius=6)
        classes, masks = refine.refine_pseudo_label(image, teacher, predictor, cfg, torch.Generator().manual_seed(seed))
        refined = refine.label_map(classes, masks).numpy()
        gt_cov = np.where(refined != 255, gt, 255)
        cov_t += confusion(teacher, gt_cov)
        cov_r += confusion(refined, gt_cov)
        all_t += confusion(teacher, gt)
        all_r += confusion(refined, gt)
        covered.append(float((refined != 255).mean()))
    gain = miou(cov_r) - miou(cov_t)
    print(f"\ncovered pixels: teacher {miou(cov_t):.1f} -> refined {miou(cov_r):.1f} mIoU ({gain:+.1f}), coverage "
          f"{np.mean(covered):.3f}; strict: teacher {miou(all_t):.1f} -> refined {miou(all_r):.1f}")
    assert gain >= 5.0
    assert np.mean(covered) >= 0.55


def test_toy_predictor_cache_returns_what_a_fresh_predictor_computes():
    """The region cache (keyed on the pixels): after other images and an eviction, every image's masks and scores
    equal a fresh predictor's; a flipped or partly changed image is not served the cached levels, and a hit moves its
    image to the back of the eviction queue. Catches a key on the shape only (or on a pixel sample), levels not
    restored on a hit, a hit that keeps its old place."""
    from toyworld import city
    images = [city.render_with_label(TOY_PROMPTS[i], i, size=(64, 96))[0] for i in range(3)]
    changed = images[0].copy()
    changed[40:, 50:] = 255 - changed[40:, 50:]   # same shape, a corner changed
    images += [images[0][:, ::-1].copy(), changed]
    points = torch.tensor([[[10, 50], [30, 20], [80, 40], [50, 10], [5, 5]]])
    built = []

    class Counted(toysam.ToyPointPredictor):
        def _build(self, image):
            built.append(image)
            return super()._build(image)
    cached = Counted(cache_size=2)
    # least recently used out: A B A(hit) C(-B) B(-A) A-flipped(-C) changed(-B) changed(hit)
    for image in [images[0], images[1], images[0], images[2], images[1], images[3], images[4], images[4]]:
        cached.set_image(image)
        fresh = toysam.ToyPointPredictor(cache_size=0)
        fresh.set_image(image)
        (m1, s1), (m2, s2) = cached.predict_points(points), fresh.predict_points(points)
        assert torch.equal(m1, m2) and torch.equal(s1, s2)
    assert len(built) == 6 and len(cached._cache) == 2 and len(fresh._cache) == 0

def test_cli_end_to_end(tmp_path, capsys):
    from toyworld import city
    from PIL import Image
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    pairs = {}
    for seed, (stem, label_name) in enumerate([("a", "a.png"), ("b", "b_labelTrainIds.png")]):
        image, gt = city.render_with_label(TOY_PROMPTS[seed], seed, size=(96, 128))
        teacher = mode_filter(gt, 5).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(teacher).save(tmp_path / "labels" / label_name)
        pairs[stem] = (image, teacher)
    args = ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "out"),
            "--sam", "toy", "--min-area", "100", "--seed", "7", "--no-progress"]
    summary = refine.main(args)
    assert summary["refined"] == 2 and summary["skipped"] == 0 and summary["fallback"] == 0
    for stem, (image, teacher) in pairs.items():
        out = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))
        classes, masks = refine.refine_pseudo_label(image, teacher, toysam.ToyPointPredictor(),
                                                    refine.RefineConfig(min_area=100),
                                                    torch.Generator().manual_seed(7 ^ zlib.crc32(stem.encode())))
        assert out.dtype == np.uint8 and np.array_equal(out, refine.label_map(classes, masks).numpy())
        assert set(np.unique(out)) <= set(range(19)) | {255}
        vis = np.asarray(Image.open(tmp_path / "out" / f"{stem}_vis.png"))
        t = refine.PANEL_TITLE_ROWS  # title band above, legend below
        assert vis.shape[1:] == (3 * 128, 3) and vis.shape[0] > t + 96 and np.array_equal(vis[t:t + 96, :128], image)
        assert np.array_equal(vis[t:t + 96, 128:256][0, 0], data.PALETTE[teacher[0, 0]])
    again = refine.main(args)
    assert again["refined"] == 0 and again["skipped"] == 2  # resume
    (tmp_path / "labels" / "a.png").unlink()
    with pytest.raises(SystemExit) as err:
        refine.main(args[:5] + [str(tmp_path / "out2")] + args[6:])
    assert err.value.code == 2 and "a_labelTrainIds.png" in capsys.readouterr().err


# ---- CLI: one message, honest folders, panels ----

def toy_folder(root, n=2, size=(96, 128)):
    """images/ + labels/ (teacher = mode-filtered ToyCity GT) of n ToyCity scenes."""
    from toyworld import city
    from PIL import Image
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        image, gt = city.render_with_label(TOY_PROMPTS[i % len(TOY_PROMPTS)], i, size=size)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(mode_filter(gt, 5).astype(np.uint8)).save(root / "labels" / f"im{i}.png")
    return ["--images", str(root / "images"), "--labels", str(root / "labels"), "--out", str(root / "out"),
            "--sam", "toy", "--min-area", "100", "--no-progress"]


def fail(main, argv, capsys):
    """Run a CLI main that must refuse: exit code 2, one message on stderr, no traceback -> the message."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    msg = capsys.readouterr().err
    assert err.value.code == 2 and "Traceback" not in msg, msg
    return msg


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cli_lists_every_problem_with_its_flag(tmp_path, capsys):
    msg = fail(refine.main, ["--images", str(tmp_path / "nope"), "--labels", str(tmp_path / "nolabels"), "--out",
                             str(tmp_path / "o"), "--sam", "vit_h", "--checkpoint", str(tmp_path / "sam.pth")], capsys)
    assert "--images" in msg and "nope" in msg and "--checkpoint" in msg and "sam.pth" in msg
    assert "--labels" in msg and "nolabels" in msg and "dl.fbaipublicfiles.com" in msg and "3 problem(s)" in msg
    args = toy_folder(tmp_path)
    (tmp_path / "labels" / "im1.png").unlink()
    msg = fail(refine.main, args[:2] + ["--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "images")]
               + args[6:], capsys)
    assert "--labels" in msg and "im1_labelTrainIds.png" in msg and "--out" in msg and "2 problem(s)" in msg
    msg = fail(refine.main, args[:6] + ["--sam", "vit_t", "--checkpoint", str(tmp_path / "m.pt")], capsys)
    assert "--checkpoint" in msg and "m.pt" in msg and "git+https" not in msg
    with pytest.raises(SystemExit) as err:  # argparse: usage error listing the choices
        refine.main(args + ["--mode", "grid"])
    msg = capsys.readouterr().err
    assert err.value.code == 2 and "'random', 'interior'" in msg
    with pytest.raises(ValueError, match="2 problem"):  # --debug: the exception itself
        refine.main(["--images", str(tmp_path / "nope"), "--labels", str(tmp_path / "x"), "--out", str(tmp_path / "o"),
                     "--sam", "toy", "--debug"])


def test_cli_rejects_raw_label_ids(tmp_path, capsys):
    from PIL import Image
    args = toy_folder(tmp_path, n=1)
    label = np.asarray(Image.open(tmp_path / "labels" / "im0.png")).copy()
    label[:4, :4] = 33  # a Cityscapes label id (bicycle), not a train id
    Image.fromarray(label).save(tmp_path / "labels" / "im0.png")
    msg = fail(refine.main, args, capsys)
    assert "[33]" in msg and "python data.py convert DATASET ROOT" in msg and "--labels" in msg
    assert not list((tmp_path / "out").glob("*.png"))  # nothing written for the bad label


def test_cli_refuses_other_settings_and_overwrite_replaces(tmp_path, capsys):
    args = toy_folder(tmp_path)
    out = tmp_path / "out"
    assert refine.main(args)["refined"] == 2
    before = snapshot(out)
    for extra, what in [(["--min-area", "50"], "min_area=100 (now 50)"), (["--seed", "3"], "seed=0 (now 3)"),
                        (["--mode", "interior"], "mode='random' (now 'interior')"),
                        (["--num-points", "3"], "num_points=5 (now 3)")]:
        msg = fail(refine.main, args + extra, capsys)
        assert what in msg and "--overwrite" in msg and "--out" in msg
        assert snapshot(out) == before  # nothing overwritten or lost
    assert refine.main(args)["skipped"] == 2  # same settings: resume
    (tmp_path / "labels" / "im1.png").unlink()
    (tmp_path / "images" / "im1.png").unlink()
    s = refine.main(args + ["--min-area", "50", "--overwrite"])
    assert s["refined"] == 1 and s["skipped"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["im0.png", "im0_vis.png", "refine_config.json"]  # old im1 gone
    assert json.loads((out / "refine_config.json").read_text())["min_area"] == 50
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("mine")
    msg = fail(refine.main, args[:4] + ["--out", str(tmp_path / "stray")] + args[6:] + ["--overwrite"], capsys)
    assert "not a refine.py folder" in msg and (tmp_path / "stray" / "notes.txt").read_text() == "mine"


def test_panel_titles_and_legend():
    a = np.full((20, 30, 3), 200, np.uint8)
    label = np.zeros((20, 30), np.int64)
    label[:, 15:] = 13
    refined = label.copy()
    refined[:5] = 255
    vis = refine.panel([a, data.colorize(label), data.colorize(refined)], ["image", "teacher", "refined"],
                       [label, refined], data.CLASSES, data.PALETTE)
    t = refine.PANEL_TITLE_ROWS
    assert vis.shape[1] == 90 and np.array_equal(vis[t:t + 20, :30], a)
    title, legend = vis[:t], vis[t + 20:]
    assert (title < 100).any()                                          # dark title text
    colours = {tuple(c) for c in legend.reshape(-1, 3).tolist()}
    assert tuple(data.PALETTE[0].tolist()) in colours and tuple(data.PALETTE[13].tolist()) in colours
    assert tuple(data.PALETTE[1].tolist()) not in colours             # only the classes present
    assert (0, 0, 0) in colours                                         # the black "dropped / ignored" swatch


def test_help_has_text_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        refine.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 5000)" in text and "{random,interior}" in text and "{vit_t,vit_h,vit_l,vit_b,toy}" in text
    assert "--overwrite" in text and "--debug" in text and "weights/mobile_sam.pt" in text


# ---- pseudo-label quality against the hidden truth (issue 18) ----

def test_label_quality_hand_computed():
    """3x4 maps, 4 classes, written out; every expected number below is counted by hand."""
    truth = torch.tensor([[0, 0, 1, 1],
                          [0, 2, 1, 255],
                          [2, 2, 1, 1]])
    pred = torch.tensor([[0, 3, 1, 1],        # (0,1): true 0 predicted 3, a class absent from the truth
                         [0, 2, 255, 1],      # (1,2): true 1 dropped; (1,3): truth ignored, not scored
                         [2, 0, 1, 255]])     # (2,1): true 2 predicted 0; (2,3): true 1 dropped
    conf = refine.label_confusion(pred, truth, num_classes=4)
    # rows true 0..3, columns predicted 0..3 then dropped; 11 scored pixels (12 minus the ignored truth pixel)
    assert conf.dtype == torch.int64 and conf.tolist() == [[2, 0, 0, 1, 0],
                                                           [0, 3, 0, 0, 2],
                                                           [1, 0, 2, 0, 0],
                                                           [0, 0, 0, 0, 0]]
    q = refine.label_quality(conf)
    # strict IoU = TP / (true incl. dropped + predicted - TP); predicted: class 0: 3, 1: 3, 2: 2, 3: 1
    #   class 0: 2 / (3 + 3 - 2) = 1/2; class 1: 3 / (5 + 3 - 3) = 3/5; class 2: 2 / (3 + 2 - 2) = 2/3;
    #   class 3: 0 / (0 + 1 - 0) = 0, but no true pixel: left out of the mean (evaluate.py's convention)
    assert q["IoU"] == pytest.approx({"0": 1 / 2, "1": 3 / 5, "2": 2 / 3, "3": 0.0})
    assert q["mIoU"] == pytest.approx((1 / 2 + 3 / 5 + 2 / 3) / 3)          # 53/90 = 0.5889
    # kept view: the 2 dropped pixels leave the truth too; class 1: 3 / (3 + 3 - 3) = 1
    assert q["mIoU_kept"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)        # 13/18 = 0.7222
    assert q["acc"] == pytest.approx(7 / 9)       # 7 correct of the 9 kept pixels (dropped ones are not "correct")
    assert q["dropped"] == pytest.approx(2 / 11) and q["pixels"] == 11
    # a teacher argmax drops nothing; numpy, uint8 and any device-free input work the same
    argmax = torch.where(pred == 255, 1, pred).numpy().astype(np.uint8)  # the 2 dropped pixels become right
    q = refine.label_quality(refine.label_confusion(argmax, truth, 4))
    assert q["dropped"] == 0 and q["acc"] == pytest.approx(9 / 11) and q["mIoU"] == q["mIoU_kept"]
    nothing = refine.label_quality(refine.label_confusion(pred, torch.full_like(truth, 255), 4))
    assert nothing["pixels"] == 0 and all(np.isnan(nothing[k]) for k in ("mIoU", "mIoU_kept", "acc", "dropped"))
    with pytest.raises(ValueError, match="shape"):
        refine.label_confusion(pred[:2], truth)
    with pytest.raises(ValueError, match="argmax"):
        refine.label_confusion(pred.float(), truth)


def brute_force_quality(pred, truth, C):
    """Pixel by pixel, with sets: the definitions of label_quality written independently."""
    scored = [(int(t), int(p)) for t, p in zip(truth.reshape(-1), pred.reshape(-1)) if 0 <= t < C]
    kept = [(t, p) for t, p in scored if 0 <= p < C]
    conf = np.zeros((C, C + 1), np.int64)
    for t, p in scored:
        conf[t, p if 0 <= p < C else C] += 1

    def miou(pixels):  # mean over the true classes of |true & predicted| / |true | predicted|
        ious = []
        for c in range(C):
            true_c = {i for i, (t, _) in enumerate(pixels) if t == c}
            if true_c:
                pred_c = {i for i, (_, p) in enumerate(pixels) if p == c}
                ious.append(len(true_c & pred_c) / len(true_c | pred_c))
        return float(np.mean(ious)) if ious else float("nan")

    return conf, {"mIoU": miou(scored), "mIoU_kept": miou(kept),
                  "acc": sum(t == p for t, p in kept) / len(kept), "dropped": 1 - len(kept) / len(scored)}


@pytest.mark.parametrize("seed", range(4))
def test_label_quality_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    C, (h, w) = int(rng.integers(2, 20)), rng.integers(1, 24, 2)
    truth = rng.integers(0, C, (h, w))
    truth[rng.random((h, w)) < 0.2] = 255
    pred = np.where(rng.random((h, w)) < 0.5, truth, rng.integers(0, C, (h, w)))   # half right, rest random
    pred[rng.random((h, w)) < 0.15] = 255                                          # dropped
    pred[rng.random((h, w)) < 0.05] = C + 3                                        # names no class: dropped too
    truth[0, 0], pred[0, 0] = 0, 1                                                 # at least one scored pixel
    conf, ref = brute_force_quality(pred, truth, C)
    got = refine.label_confusion(torch.from_numpy(pred), torch.from_numpy(truth), num_classes=C)
    assert np.array_equal(got.numpy(), conf)
    q = refine.label_quality(got)
    for key, value in ref.items():
        assert q[key] == pytest.approx(value, nan_ok=True), key
    a, b = refine.label_confusion(pred[: h // 2], truth[: h // 2], C), refine.label_confusion(pred[h // 2:],
                                                                                             truth[h // 2:], C)
    assert torch.equal(a + b, got)  # matrices add over images


def score_folders(root, pairs):
    """labels/ and truth/ of tiny PNGs: pairs {stem: (pseudo label, truth)} as uint8 arrays."""
    from PIL import Image
    for sub in ("labels", "truth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem, (label, truth) in pairs.items():
        Image.fromarray(np.asarray(label, np.uint8)).save(root / "labels" / f"{stem}.png")
        Image.fromarray(np.asarray(truth, np.uint8)).save(root / "truth" / f"{stem}.png")
    return ["--score-labels", str(root / "labels"), "--truth", str(root / "truth"), "--no-progress"]


def test_score_labels_cli(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    pairs = {f"im_{j}_p{j}": (rng.choice([0, 1, 13, 255], (5, 7)), rng.choice([0, 1, 13, 255], (5, 7)))
             for j in range(3)}
    args = score_folders(tmp_path, pairs)
    Image.fromarray(np.zeros((5, 21, 3), np.uint8)).save(tmp_path / "labels" / "im_0_p0_vis.png")  # a refine panel
    summary = refine.main(args)
    conf = sum(refine.label_confusion(label, truth) for label, truth in pairs.values())
    q = refine.label_quality(conf, data.CLASSES)
    saved = json.loads((tmp_path / "labels" / refine.SCORE_FILE).read_text())
    assert saved["images"] == 3 and saved["confusion"] == conf.tolist() and summary["out"].endswith(refine.SCORE_FILE)
    for key in ("mIoU", "mIoU_kept", "acc", "dropped", "pixels"):
        assert saved[key] == pytest.approx(q[key])
    assert saved["IoU"]["car"] == pytest.approx(q["IoU"]["car"]) and saved["IoU"]["bus"] is None  # NaN -> null
    out = capsys.readouterr().out
    assert "car" in out and "bus" not in out and f"mIoU {100 * q['mIoU']:6.2f}" in out and "dropped" in out
    assert not list(tmp_path.rglob("*.tmp"))

    before = (tmp_path / "labels" / refine.SCORE_FILE).read_bytes()
    msg = fail(refine.main, args, capsys)  # never overwritten without --overwrite
    assert refine.SCORE_FILE in msg and "--overwrite" in msg
    assert (tmp_path / "labels" / refine.SCORE_FILE).read_bytes() == before
    assert refine.main(args + ["--overwrite"])["images"] == 3

    msg = fail(refine.main, ["--score-labels", str(tmp_path / "nope"), "--truth", str(tmp_path / "nor")], capsys)
    assert "--score-labels" in msg and "nope" in msg and "--truth" in msg and "nor" in msg and "2 problem(s)" in msg
    msg = fail(refine.main, ["--score-labels", str(tmp_path / "labels"), "--truth", str(tmp_path)], capsys)
    assert "no label of --score-labels" in msg and "im_0_p0.png" in msg and "same stems" in msg
    Image.fromarray(np.zeros((6, 7), np.uint8)).save(tmp_path / "truth" / "im_1_p1.png")
    (tmp_path / "truth" / "im_2_p2.png").unlink()
    msg = fail(refine.main, args + ["--overwrite"], capsys)
    assert "1 of 3 labels" in msg and "im_2_p2.png" in msg and "5x7" in msg and "6x7" in msg
    assert "2 problem(s)" in msg
    for argv in (args[:2], args + ["--images", "x"], ["--truth", "x", "--images", "a", "--labels", "b", "--out", "c"],
                 ["--labels", "b"]):
        with pytest.raises(SystemExit) as err:  # argparse usage errors name the flags of the other mode
            refine.main(argv)
        assert err.value.code == 2 and "--score-labels" in capsys.readouterr().err


def test_bench_pseudo_labels_runs_on_a_tiny_folder(tmp_path):
    """bench/bench_pseudo_labels.py (the toy-SAM fairness table) on 2 small ToyCity images: every row is scored, the
    truth as teacher scores 100%, and the corruption levels are ordered."""
    import importlib.util
    from pathlib import Path
    import generate
    spec = importlib.util.spec_from_file_location("bench_pseudo_labels",
                                                  Path(__file__).parents[1] / "bench" / "bench_pseudo_labels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    generate.main(["--out", str(tmp_path), "--backend", "toy", "--num-images", "2", "--height", "64", "--width", "80",
                   "--no-progress"])
    result = bench.run(tmp_path, 2)
    q = result["quality"]
    assert list(q) == ["truth", "mild", "medium", "strong"] and result["images"] == 2
    assert q["truth"]["teacher"]["mIoU"] == q["truth"]["teacher"]["acc"] == 1.0 == 1 - q["truth"]["teacher"]["dropped"]
    assert q["mild"]["teacher"]["acc"] > q["strong"]["teacher"]["acc"]
    assert all(0 <= row["refined"]["dropped"] <= 1 and row["teacher"]["dropped"] == 0 for row in q.values())
    assert result["oracle_iou"] and all(0 <= v <= 1 for v in result["oracle_iou"])
    assert "| strong |" in bench.format_table(result)
