"""clouds.py: shapes, frozen backbone, matcher vs brute force, losses vs loop references, training, checkpoints."""
import itertools
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import clouds
import criterion
import ops

KEYS_TXT = Path(__file__).resolve().parent / "data/official_head_keys.txt"  # Appendix A of official_checkpoint_keys.md


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is as fast, and ~10x faster than two when other jobs share the cores (measured:
    0.17 s vs 1.2-2.4 s per tiny train step under load 5 on 2 cores; OpenMP threads spin against each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return clouds.build_model("tiny")


@pytest.fixture(scope="module")
def convnext_large():
    return clouds.build_model("convnext_large", pretrained=None)  # ~3 s, 1.7 GB


def bilinear(img, x, y):
    """Independent bilinear sample of img (H, W) at x, y in [0, 1]: pixel centres at (i + 0.5) / size, zeros outside."""
    H, W = img.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    val = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                val += wy * wx * float(img[yy, xx])
    return val


def bce(x, t):
    return max(x, 0.0) - x * t + math.log1p(math.exp(-abs(x)))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def assert_argmax(labels, scores, margin=1e-5):
    """labels (B, H, W) == argmax of scores (B, C, H, W) wherever the top-2 gap exceeds float32 noise."""
    top2 = scores.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > margin
    assert clear.float().mean() > 0.99
    assert torch.equal(labels[clear], scores.argmax(1)[clear])


def scene(seed, size=64):
    """A ToyCity GTA-style street scene: image uint8 (3, H, W), label int64 (H, W) train ids (255 = ignore)."""
    from toyworld import city

    img, lab = city.render_scene("gta", seed, size=(size, size))
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), torch.from_numpy(lab.astype(np.int64))


# ---- model ----


@pytest.mark.parametrize("size", [(96, 160), (224, 96)])
def test_forward_shapes(tiny, size):
    out = tiny(torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8))
    H, W = size
    assert out["pred_logits"].shape == (2, 20, 20)  # tiny: 20 queries, 19 classes + no-object
    assert out["pred_masks"].shape == (2, 20, H // 4, W // 4)
    assert len(out["aux_outputs"]) == 3  # dec_layers = 3: prediction on raw queries + after layers 0, 1
    assert all(a["pred_masks"].shape == out["pred_masks"].shape for a in out["aux_outputs"])


def test_forward_rejects_unpadded_and_predict_crops(tiny):
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny(torch.zeros(1, 3, 100, 150))
    img = torch.randint(0, 256, (1, 3, 100, 150), dtype=torch.uint8)
    pred = tiny.predict(img)
    assert pred.shape == (1, 100, 150) and pred.dtype == torch.int64 and 0 <= pred.min() and pred.max() < 19
    # reference: pad bottom/right with 0 in normalized space, full-size inference, crop
    x = F.pad((img.float() - torch.tensor(clouds.PIXEL_MEAN).view(1, 3, 1, 1)) /
              torch.tensor(clouds.PIXEL_STD).view(1, 3, 1, 1), (0, 10, 0, 28))
    with torch.no_grad():
        out = tiny.sem_seg_head(tiny.backbone(x))
    scores = ops.masks_to_semantic(out["pred_logits"], out["pred_masks"], (128, 160), True, impl="ref")
    assert_argmax(pred, scores[:, :, :100, :150])


def test_backbone_frozen_head_trains():
    model = clouds.build_model("tiny")
    model.train()
    clip = model.backbone.clip_model
    assert not clip.training and all(not m.training for m in clip.modules())
    assert not any(p.requires_grad for p in clip.parameters())
    img, lab = scene(0, 64)
    losses = model.loss(img[None].float(), [criterion.targets_from_label(lab)])
    sum(losses.values()).backward()
    assert all(p.grad is None for p in clip.parameters())
    grads = {n: p.grad for n, p in model.sem_seg_head.named_parameters()}
    assert all(g is not None for g in grads.values())
    # the encoder level embedding only reaches the zero-initialized offset/attention projections: no gradient yet
    assert [n for n, g in grads.items() if g.abs().sum() == 0] == ["pixel_decoder.transformer.level_embed"]

    trainable = clouds.build_model("tiny", train_backbone=True).train()
    assert trainable.backbone.clip_model.training
    sum(trainable.loss(img[None].float(), [criterion.targets_from_label(lab)]).values()).backward()
    trunk = trainable.backbone.clip_model.visual.trunk
    used = list(trunk.stem.parameters()) + list(trunk.stages.parameters())
    assert all(p.grad is not None for p in used) and sum(p.grad.abs().sum() for p in used) > 0


def test_ms_deform_attn_matches_loop():
    torch.manual_seed(0)
    shapes, nH, Dh, Lq, nP = [(3, 4), (2, 5)], 2, 3, 4, 2
    S, nL = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(1, S, nH, Dh, dtype=torch.float64)
    loc = torch.rand(1, Lq, nH, nL, nP, 2, dtype=torch.float64) * 1.4 - 0.2  # some points fall outside
    weights = torch.rand(1, Lq, nH, nL, nP, dtype=torch.float64)
    out = clouds.ms_deform_attn(value, shapes, loc, weights)
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    for q in range(Lq):
        for h in range(nH):
            for d in range(Dh):
                ref = 0.0
                for lvl, (H, W) in enumerate(shapes):
                    img = value[0, starts[lvl]:starts[lvl + 1], h, d].view(H, W).numpy()
                    for p in range(nP):
                        x, y = loc[0, q, h, lvl, p].tolist()
                        ref += weights[0, q, h, lvl, p].item() * bilinear(img, x, y)
                assert out[0, q, h * Dh + d].item() == pytest.approx(ref, abs=1e-12)


def test_position_embedding_formula():
    pos = clouds.position_embedding_sine(3, 5, 8, "cpu")  # (16, 3, 5): 8 y-features then 8 x-features
    y, x = 1, 3
    for k in range(8):
        ang_y = (y + 1) / (3 + 1e-6) * 2 * math.pi / 10000 ** (2 * (k // 2) / 8)
        ang_x = (x + 1) / (5 + 1e-6) * 2 * math.pi / 10000 ** (2 * (k // 2) / 8)
        f = math.sin if k % 2 == 0 else math.cos
        assert pos[k, y, x].item() == pytest.approx(f(ang_y), abs=1e-6)
        assert pos[8 + k, y, x].item() == pytest.approx(f(ang_x), abs=1e-6)


def test_text_classifier():
    torch.manual_seed(0)
    model = clouds.build_model("tiny", classifier="text")
    head = model.sem_seg_head.predictor.class_embed
    out = model(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8))
    assert out["pred_logits"].shape == (2, 20, 20)
    n_syn = sum(len(s) for s in clouds.CLASS_SYNONYMS)  # reference §2.2 table: 60 (its text says 62)
    assert len(clouds.CLASS_SYNONYMS) == 19 and len(clouds.VILD_TEMPLATES) == 14
    assert head.text_embeddings.shape == (n_syn, 64)
    # one synonym recomputed by hand: encode the 14 templates, normalize, average, normalize
    import open_clip
    clip = model.backbone.clip_model
    with torch.no_grad():
        e = F.normalize(clip.encode_text(open_clip.tokenize([t.format("sky") for t in clouds.VILD_TEMPLATES])), dim=-1)
    sky_row = [s for syns in clouds.CLASS_SYNONYMS for s in syns].index("sky")
    assert torch.allclose(head.text_embeddings[sky_row], F.normalize(e.mean(0), dim=0), atol=1e-5)
    # logits: scale * cos, max over each class's synonyms, void last
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        logits = head(x)
        emb = F.normalize(head.mlp(x), dim=-1)[0]  # (3, 64)
        scale = min(math.exp(head.logit_scale.item()), 100)
        start = 0
        for c, syns in enumerate(clouds.CLASS_SYNONYMS):
            sims = scale * emb @ head.text_embeddings[start:start + len(syns)].t()
            assert torch.allclose(logits[0, :, c], sims.max(1).values, atol=1e-5)
            start += len(syns)
        void = scale * emb @ F.normalize(head.void_embedding.weight[0], dim=0)
        assert torch.allclose(logits[0, :, 19], void, atol=1e-5)
    sum(model.criterion(out, [criterion.targets_from_label(torch.randint(0, 19, (64, 96)))] * 2).values()).backward()
    assert head.logit_scale.grad is not None


# ---- matcher and losses ----


def test_targets_from_label():
    lab = torch.tensor([[0, 0, 255], [5, 255, 5]])
    t = criterion.targets_from_label(lab)
    assert t["labels"].tolist() == [0, 5]
    assert t["masks"].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [1, 0, 1]]]
    assert not t["masks"].any(0)[lab == 255].any()  # ignore pixels are in no mask
    with pytest.raises(ValueError, match="label values"):
        criterion.targets_from_label(torch.tensor([[19]]))


def test_matcher_brute_force():
    torch.manual_seed(1)
    Q, C1, P = 4, 6, 40
    outputs = {"pred_logits": torch.randn(3, Q, C1, dtype=torch.float64) * 2,
               "pred_masks": torch.randn(3, Q, 6, 8, dtype=torch.float64) * 3}
    targets = [{"labels": torch.tensor([2, 0, 4]), "masks": torch.rand(3, 24, 32) > 0.5},
               {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 24, 32, dtype=torch.bool)},
               {"labels": torch.tensor([1, 3]), "masks": torch.rand(2, 24, 32) > 0.3}]
    matcher = criterion.HungarianMatcher(num_points=P)
    indices = matcher(outputs, targets, generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    for b, t in enumerate(targets):
        K = len(t["labels"])
        if K == 0:
            assert len(indices[b][0]) == 0 and len(indices[b][1]) == 0
            continue
        pts = torch.rand((1, P, 2), generator=g).double()[0].tolist()  # one draw per image with targets
        prob = outputs["pred_logits"][b].softmax(-1)
        cost = np.zeros((Q, K))
        for q in range(Q):
            x = [bilinear(outputs["pred_masks"][b, q].numpy(), *p) for p in pts]
            for k in range(K):
                tv = [bilinear(t["masks"][k].double().numpy(), *p) for p in pts]
                c_mask = sum(bce(a, c) for a, c in zip(x, tv)) / P
                ps = [sigmoid(a) for a in x]
                c_dice = 1 - (2 * sum(a * c for a, c in zip(ps, tv)) + 1) / (sum(ps) + sum(tv) + 1)
                cost[q, k] = 5 * c_mask + 2 * -prob[q, t["labels"][k]].item() + 5 * c_dice
        best = min(itertools.permutations(range(Q), K), key=lambda perm: sum(cost[perm[k], k] for k in range(K)))
        assert sorted(zip(indices[b][0].tolist(), indices[b][1].tolist())) == sorted((best[k], k) for k in range(K))


def _loss_case():
    torch.manual_seed(2)
    B, Q, C = 3, 5, 4
    outputs = {"pred_logits": torch.randn(B, Q, C + 1, dtype=torch.float64),
               "pred_masks": torch.randn(B, Q, 6, 7, dtype=torch.float64) * 2}
    valid = torch.zeros(24, 28, dtype=torch.bool)
    valid[:, :14] = True
    targets = [{"labels": torch.tensor([1, 3]), "masks": torch.rand(2, 24, 28) > 0.5, "valid": valid},
               {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 24, 28, dtype=torch.bool)},
               {"labels": torch.tensor([0, 2, 3]), "masks": torch.rand(3, 24, 28) > 0.6}]
    indices = [(torch.tensor([4, 0]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.long),) * 2,
               (torch.tensor([1, 2, 3]), torch.tensor([2, 0, 1]))]
    return outputs, targets, indices


def test_loss_labels_reference():
    outputs, targets, indices = _loss_case()
    crit = criterion.SetCriterion(4, None, eos_coef=0.1)
    got = crit.loss_labels(outputs, targets, indices).item()
    num = den = 0.0
    for b in range(3):
        tgt = {q: targets[b]["labels"][k].item() for q, k in zip(*[i.tolist() for i in indices[b]])}
        for q in range(5):
            c = tgt.get(q, 4)  # unmatched -> no-object (index 4)
            w = float(np.float32(0.1)) if c == 4 else 1.0  # the float32 empty_weight buffer
            logp = torch.log_softmax(outputs["pred_logits"][b, q], -1)[c].item()
            num, den = num - w * logp, den + w
    assert got == pytest.approx(num / den, rel=1e-12)  # image 1 (no targets) contributes its CE too


def test_loss_masks_reference():
    outputs, targets, indices = _loss_case()
    P, num_masks = 16, 5.0
    crit = criterion.SetCriterion(4, None, num_points=P, oversample_ratio=3.0, importance_sample_ratio=0.75)
    loss_mask, loss_dice = crit.loss_masks(outputs, targets, indices, num_masks, torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    pairs = [(b, q, k) for b in range(3) for q, k in zip(*[i.tolist() for i in indices[b]])]
    N, n_unc = len(pairs), int(0.75 * P)
    cand = torch.rand((N, 3 * P, 2), generator=g).double().tolist()
    rest = torch.rand((N, P - n_unc, 2), generator=g).double().tolist()
    ref_mask = ref_dice = 0.0
    dropped = 0
    for n, (b, q, k) in enumerate(pairs):
        logit = outputs["pred_masks"][b, q].numpy()
        unc = sorted(cand[n], key=lambda p: abs(bilinear(logit, *p)))[:n_unc]  # most uncertain: smallest |logit|
        pts = unc + rest[n]
        x = [bilinear(logit, *p) for p in pts]
        t = [bilinear(targets[b]["masks"][k].double().numpy(), *p) for p in pts]
        w = [1.0 if "valid" not in targets[b] else float(bilinear(targets[b]["valid"].double().numpy(), *p) > 0.5)
             for p in pts]
        dropped += P - sum(w)
        ref_mask += sum(wi * bce(a, c) for wi, a, c in zip(w, x, t)) / max(sum(w), 1.0)
        ps = [wi * sigmoid(a) for wi, a in zip(w, x)]
        ts = [wi * c for wi, c in zip(w, t)]
        ref_dice += 1 - (2 * sum(a * c for a, c in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)
    assert dropped > 0  # the valid map did drop points for image 0's masks
    assert loss_mask.item() == pytest.approx(ref_mask / num_masks, rel=1e-10)
    assert loss_dice.item() == pytest.approx(ref_dice / num_masks, rel=1e-10)


def test_criterion_weights_deep_supervision_and_empty_batch():
    outputs, targets, indices = _loss_case()
    outputs["aux_outputs"] = [{k: v + i for k, v in outputs.items()} for i in range(1, 3)]
    crit = criterion.SetCriterion(4, lambda out, tg, gen: indices, num_points=16)
    losses = crit(outputs, targets, generator=torch.Generator().manual_seed(4))
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    num_masks = 5.0  # 2 + 0 + 3 target masks
    assert losses["loss_ce_1"].item() == pytest.approx(2 * crit.loss_labels(outputs["aux_outputs"][1], targets,
                                                                            indices).item())
    mask, dice = crit.loss_masks(outputs, targets, indices, num_masks, torch.Generator().manual_seed(4))
    assert losses["loss_mask"].item() == pytest.approx(5 * mask.item())  # the final prediction draws first
    assert losses["loss_dice"].item() == pytest.approx(5 * dice.item())

    logits = outputs["pred_logits"].clone().requires_grad_()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 24, 28, dtype=torch.bool)}] * 3
    crit = criterion.SetCriterion(4, criterion.HungarianMatcher(num_points=16), num_points=16)
    losses = crit({"pred_logits": logits, "pred_masks": outputs["pred_masks"]}, empty)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0 and losses["loss_ce"].item() > 0
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0


def test_semantic_inference_matches_reference():
    torch.manual_seed(5)
    logits, masks = torch.randn(2, 7, 6), torch.randn(2, 7, 5, 9)
    got = clouds.semantic_inference(logits, masks, (20, 36))
    assert got.dtype == torch.int64 and got.shape == (2, 20, 36)
    assert_argmax(got, ops.masks_to_semantic(logits, masks, (20, 36), return_scores=True, impl="ref"))
    up = F.interpolate(masks.double(), size=(20, 36), mode="bilinear", align_corners=False).sigmoid()
    assert_argmax(got, torch.einsum("bqc,bqhw->bchw", logits.double().softmax(-1)[..., :-1], up))  # no-object dropped


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = clouds.build_model("tiny").train()
    images, labels = zip(*[scene(s, 64) for s in range(2)])  # one batch of two 64x64 ToyCity scenes
    x, targets = torch.stack(images).float(), [criterion.targets_from_label(lab) for lab in labels]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.05)
    gen, history = torch.Generator().manual_seed(0), []
    for _ in range(30):
        loss = sum(model.loss(x, targets, generator=gen).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history  # measured here: 54.6 -> 20.4 (0.37x)


# ---- official checkpoints, parameter counts ----


def _appendix_a():
    rows = [line.split() for line in KEYS_TXT.read_text().splitlines() if line and not line.startswith("#")]
    return [(k, tuple(int(d) for d in s.strip("[]").split(","))) for k, s in rows]


def _fake_tensors(shapes, start=0):
    """{key: tensor} with tensor i = the single value start + i broadcast to its shape (an expanded 1-element storage:
    torch.save writes one number per key, so a fake 837-key ConvNeXt-L file is ~100 KB, not 1.5 GB)."""
    return {k: torch.tensor(float(start + i)).to(dtype).expand(shape)
            for i, (k, (shape, dtype)) in enumerate(shapes.items())}


def _official_file(path, backbone, head=10_000, other=True):
    """Write a detectron2-style model_final.pth: {"model": {backbone.clip_model.*, sem_seg_head.*, others}}; `head`
    is a dict of head tensors or the first value of fake ConvNeXt-L head tensors."""
    sd = {f"backbone.clip_model.{k}": v for k, v in backbone.items()}
    if not isinstance(head, dict):
        head = _fake_tensors({k: (shape, torch.float32) for k, shape in _appendix_a()}, head)
    sd.update(head)
    if other:  # official_checkpoint_keys.md §2: the two non-model keys
        sd.update({"criterion.empty_weight": torch.ones(20), "void_embedding.weight": torch.randn(1, 768)})
    torch.save({"model": sd, "iteration": 3}, path)
    return sd


@pytest.fixture(scope="module")
def clip_file_tensors(convnext_large):
    """The 543 tensors of open_clip `convnext_large_d_320` (keys.md §5) as fake file tensors, in state_dict order."""
    return _fake_tensors({k: (v.shape, v.dtype) for k, v in convnext_large.backbone.clip_model.state_dict().items()})


def test_load_official_round_trip(convnext_large, tmp_path):
    expected = _appendix_a()
    assert len(expected) == 292
    torch.manual_seed(6)
    sd = {k: torch.randn(shape) for k, shape in expected}
    sd.update({"criterion.empty_weight": torch.ones(20), "void_embedding.weight": torch.randn(1, 768)})
    torch.save({"model": sd, "iteration": 3}, tmp_path / "model_final.pth")
    model, report = checkpoints.load_official(tmp_path / "model_final.pth", model=convnext_large)
    assert report["head_keys"] == 292 and report["head_params"] == 20_253_908
    assert report["file_keys"] == 294 and report["backbone_loaded"] == 0 and report["backbone_missing"] is None
    assert report["backbone_skipped"] == []  # no backbone tensors: the model keeps its own CLIP weights
    assert report["skipped"] == ["criterion.empty_weight", "void_embedding.weight"]
    state = {f"sem_seg_head.{k}": v for k, v in model.sem_seg_head.state_dict().items()}
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected  # same keys, shapes and order
    assert all(torch.equal(state[k], sd[k]) for k, _ in expected)
    assert torch.equal(model.sem_seg_head.predictor.class_embed.weight, sd["sem_seg_head.predictor.class_embed.weight"])
    assert torch.equal(model.sem_seg_head.pixel_decoder.transformer.level_embed,
                       sd["sem_seg_head.pixel_decoder.transformer.level_embed"])

    del sd["sem_seg_head.predictor.level_embed.weight"]
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match=r"1 missing \['predictor.level_embed.weight'\]"):
        checkpoints.load_official(tmp_path / "broken.pth", model=convnext_large)


def test_load_official_strict_backbone_accounts_for_every_key(convnext_large, clip_file_tensors, tmp_path):
    clip = clip_file_tensors
    visual = [k for k in clip if k.startswith("visual.")]
    assert (len(clip), len(visual), len(clip) - len(visual)) == (543, 345, 198)  # keys.md §5: visual 345, text 198
    sd = _official_file(tmp_path / "model_final.pth", clip)
    assert len(sd) == 837  # keys.md §2: the whole ConvNeXt-L "model" dict
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete file: nothing skipped, nothing missing, no warning
        model, report = checkpoints.load_official(tmp_path / "model_final.pth", model=convnext_large)
    assert report["file_keys"] == 837 and report["head_keys"] == 292
    assert report["backbone_loaded"] == 543 and report["backbone_visual"] == 345
    assert report["backbone_skipped"] == [] and report["backbone_missing"] == 0
    assert report["skipped"] == ["criterion.empty_weight", "void_embedding.weight"]
    state = model.backbone.clip_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in clip.items())  # each tensor got its own key's value
    assert model.backbone.clip_model.logit_scale.item() == list(clip).index("logit_scale")

    # text-tower trouble is reported, not fatal: one unknown, one shape-mismatched, one absent
    text = dict(clip)
    del text["ln_final.bias"]
    text["text_projection"] = torch.zeros(768, 512)  # model: (768, 768)
    text["transformer.resblocks.16.ln_1.weight"] = torch.zeros(768)  # the model has blocks 0..15
    _official_file(tmp_path / "text.pth", text)
    with pytest.warns(UserWarning) as record:
        _, report = checkpoints.load_official(tmp_path / "text.pth", model=convnext_large)
    messages = " ".join(str(w.message) for w in record)
    assert "skipped: ['text_projection', 'transformer.resblocks.16.ln_1.weight']" in messages
    assert "not in the file and keep their previous values: ['ln_final.bias']" in messages
    assert report["backbone_loaded"] == 541 and report["backbone_visual"] == 345 and report["backbone_missing"] == 1
    assert report["backbone_skipped"] == ["text_projection", "transformer.resblocks.16.ln_1.weight"]
    counted = report["head_keys"] + report["backbone_loaded"] + len(report["backbone_skipped"]) + len(report["skipped"])
    assert counted == report["file_keys"] == 837  # every key of the file loaded or listed


@pytest.mark.parametrize("case", ["unknown", "missing", "shape"])
def test_load_official_strict_backbone_errors_name_the_key(convnext_large, clip_file_tensors, tmp_path, case):
    clip = dict(clip_file_tensors)
    if case == "unknown":
        key, expected = "visual.trunk.stages.4.blocks.0.gamma", (
            r"1 unexpected \['visual.trunk.stages.4.blocks.0.gamma'\]")  # the trunk has stages 0..3
        clip[key] = torch.zeros(1536)
    elif case == "missing":
        key, expected = "visual.trunk.stages.2.blocks.26.mlp.fc2.bias", (
            r"1 missing \['visual.trunk.stages.2.blocks.26.mlp.fc2.bias'\]")
        del clip[key]
    else:
        key, expected = "visual.head.mlp.fc2.weight", (
            r"1 shape-mismatched \['visual.head.mlp.fc2.weight: file \(768, 1024\) vs model \(768, 1536\)'\]")
        clip[key] = torch.zeros(768, 1024)
    before = convnext_large.sem_seg_head.predictor.query_feat.weight.clone()
    sd = _official_file(tmp_path / "bad.pth", clip, head=20_000)  # head values the model does not hold yet
    with pytest.raises(RuntimeError, match=expected) as info:
        checkpoints.load_official(tmp_path / "bad.pth", model=convnext_large)
    assert "0 missing" in str(info.value) or case == "missing"
    assert "preset" in str(info.value)  # says what to do
    # checked before anything loads: the head did not take the file's values
    assert torch.equal(convnext_large.sem_seg_head.predictor.query_feat.weight, before)
    assert not torch.equal(before, sd["sem_seg_head.predictor.query_feat.weight"])


def test_load_official_builds_rn50_from_file(tmp_path):
    import open_clip

    rn_shapes = {"input_proj.0.0.weight": (256, 2048, 1, 1), "input_proj.1.0.weight": (256, 1024, 1, 1),
                 "input_proj.2.0.weight": (256, 512, 1, 1), "adapter_1.weight": (256, 256, 1, 1)}  # keys.md §6.1
    head = {k: torch.randn(rn_shapes.get(k.removeprefix("sem_seg_head.pixel_decoder."), shape))
            for k, shape in _appendix_a()}
    shapes = open_clip.create_model("RN50", force_quick_gelu=True, device="meta").state_dict()  # keys only, 0.3 s
    visual = _fake_tensors({k: (v.shape, v.dtype) for k, v in shapes.items() if k.startswith("visual.")})
    assert len(shapes) == 489 and len(visual) == 339  # keys.md §6.2: 489 backbone keys, 150 of them text
    assert visual["visual.layer3.5.conv1.weight"].shape == (256, 1024, 1, 1)  # RN50: 6 layer3 blocks
    _official_file(tmp_path / "rn50.pth", visual, head, other=False)  # image tower only
    with pytest.warns(UserWarning, match="150 CLIP text-tower tensors were not in the file"):
        model, report = checkpoints.load_official(tmp_path / "rn50.pth")  # model=None: preset inferred, built here
    assert report["preset"] == "rn50" and report["backbone_loaded"] == report["backbone_visual"] == 339
    assert report["backbone_missing"] == 150 and report["file_keys"] == 292 + 339
    assert clouds.head_parameter_count(model) == 20_499_668  # official_checkpoint_keys.md §6.1
    assert torch.equal(model.backbone.clip_model.visual.layer3[5].conv1.weight,
                       visual["visual.layer3.5.conv1.weight"])
    assert model.backbone.clip_model.visual.bn1.num_batches_tracked.item() == list(visual).index(
        "visual.bn1.num_batches_tracked")  # int64 BatchNorm buffers load too
    feats = model.features(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats.values()] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6),
                                                        (1, 2048, 2, 3)]


def test_infer_preset_from_head():
    head = {"pixel_decoder.input_proj.0.0.weight": torch.zeros(256, 2048, 1, 1)}
    assert checkpoints._infer_preset(head, {"visual.layer3.22.conv1.weight": 0, "visual.layer3.6.conv1.weight": 0}) == "rn101"
    assert checkpoints._infer_preset(head, {"visual.layer3.5.conv1.weight": 0}) == "rn50"
    head = {"pixel_decoder.input_proj.0.0.weight": torch.zeros(256, 1536, 1, 1)}
    assert checkpoints._infer_preset(head, {}) == "convnext_large"


def test_head_parameter_counts(convnext_large):
    assert clouds.head_parameter_count(convnext_large) == 20_253_908  # official_checkpoint_keys.md §4.3
    # RN50 is counted through load_official/build_model above; RN101 has the same taps (256/512/1024/2048)
    rn101_head = clouds.CLOUDSHead(clouds.ModelConfig(), [256, 512, 1024, 2048])
    assert sum(p.numel() for p in rn101_head.parameters()) == 20_499_668


# ---- our checkpoints, errors ----


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(7)
    model = clouds.build_model("tiny", train_backbone=True)
    with torch.no_grad():  # make the backbone differ from any fresh random init
        next(model.backbone.clip_model.visual.trunk.parameters()).add_(1.0)
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint(path, model, step=5)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # atomic write leaves no temp file
    loaded, ckpt = checkpoints.load_checkpoint(path)
    assert ckpt["version"] == 1 and ckpt["step"] == 5 and ckpt["config"]["train_backbone"] is True
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    model.eval(), loaded.eval()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_masks"], b["pred_masks"])

    # A frozen random-init backbone cannot come back from open_clip: it is saved, and predictions survive the trip.
    frozen = clouds.build_model("tiny")
    checkpoints.save_checkpoint(tmp_path / "frozen.pt", frozen)
    reloaded, _ = checkpoints.load_checkpoint(tmp_path / "frozen.pt")
    reloaded.eval(), frozen.eval()
    with torch.no_grad():
        assert torch.equal(frozen(x)["pred_masks"], reloaded(x)["pred_masks"])
    # A frozen backbone with pretrained weights is not duplicated into the checkpoint.
    frozen.cfg.pretrained = "laion2b_s29b_b131k_ft_soup"
    checkpoints.save_checkpoint(tmp_path / "pretrained.pt", frozen)
    keys = torch.load(tmp_path / "pretrained.pt", weights_only=True)["model"].keys()
    assert all(k.startswith("sem_seg_head.") for k in keys)

    def boom(*args, **kwargs):
        raise OSError("disk full")
    torch_save, torch.save = torch.save, boom
    try:
        with pytest.raises(OSError, match="disk full"):
            checkpoints.save_checkpoint(path, frozen)
    finally:
        torch.save = torch_save
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "frozen.pt", "pretrained.pt"]  # the old file survives, no temp left
    assert checkpoints.load_checkpoint(path)[1]["step"] == 5

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="not a readable torch checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(RuntimeError, match="not a clouds checkpoint.*load_official"):
        checkpoints.load_checkpoint(tmp_path / "foreign.pt")


def test_missing_weights_error():
    with pytest.raises(RuntimeError) as info:
        clouds.build_model("convnext_large")  # HF_HUB_OFFLINE=1 (conftest): fails at once
    msg = str(info.value)
    assert "convnext_large_d_320" in msg and "laion2b_s29b_b131k_ft_soup" in msg and "--clip-weights" in msg
    assert info.value.__cause__ is not None
    with pytest.raises(RuntimeError, match="not found: /nonexistent/open_clip_pytorch_model.bin"):
        clouds.build_model("tiny", pretrained="/nonexistent/open_clip_pytorch_model.bin")


def test_builder_errors():
    with pytest.raises(ValueError, match="convnext_large, rn50, rn101, tiny"):
        clouds.build_model("vit_h")
    with pytest.raises(ValueError, match="unknown ModelConfig field.*hidden_dim"):
        clouds.build_model("tiny", hiden_dim=32)
    with pytest.raises(ValueError, match="classifier"):
        clouds.build_model("tiny", classifier="clip")
