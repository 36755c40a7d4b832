"""Golden outputs of the official CLOUDS head: our clouds.py head, matcher, criterion and inference against
tests/data/official_head_tiny.pt, made by the official code (yasserben/CLOUDS + detectron2, float32, CPU).

The file (described key by key in /work/shared/golden/README.md) holds a tiny non-square head (5 classes, 32 channels,
2 encoder / 3 decoder layers, 10 queries, a 64x96 image), its state_dict, input features, every head output, the
attention masks, the semantic scores, the matcher indices, the point coordinates the official criterion drew, every
loss term, and the gradients of the total loss. Tolerances (README "Tolerances observed"): atol 1e-5 on head outputs
and scores, rtol 1e-5 on losses computed with the stored points, about 1e-4 relative on gradients.

Every measured difference is recorded in DIFFS and printed at the end of the module: `pytest -s tests/test_golden.py`.
"""
from pathlib import Path

import pytest
import torch

import checkpoints
import clouds
import criterion as criterion_module  # `criterion` names the stored points below
import ops

GOLDEN = Path(__file__).resolve().parent / "data/official_head_tiny.pt"  # copy of /work/shared/golden/
IN_CHANNELS = [8, 16, 24, 32]  # res2..res5 of the golden features
ATOL_OUT, RTOL_LOSS, RTOL_GRAD = 1e-5, 1e-5, 1e-4  # golden README: suggested float32 tolerances
DIFFS = {}  # name -> (max abs diff, max rel diff), printed by `report_diffs`


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread (as in test_clouds.py); the golden spread 1 vs 2 threads is ~1e-6 (README)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def report_diffs():
    yield
    if DIFFS:
        print("\n\ngolden differences (ours vs official): max abs, max rel = max abs / max |official|")
        for name, (a, r) in DIFFS.items():
            print(f"  {name:40s} {a:9.2e} {r:9.2e}")


def compare(name, ours, ref, atol=0.0, rtol=0.0):
    """Assert |ours - ref| <= atol + rtol * max|ref| elementwise, recording max abs and max-relative differences."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)}, official {tuple(ref.shape)}"
    ours, ref = ours.detach().double(), ref.detach().double()
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    rel = err / scale if scale else err
    DIFFS[name] = (err, rel)
    assert err <= atol + rtol * scale, (f"{name}: max abs diff {err:.3g} (max rel {rel:.3g}) exceeds atol {atol:g} + "
                                        f"rtol {rtol:g} * max|official| {scale:.3g}")


# ---- fixtures: the golden file, our head with its weights, our forward outputs ----


@pytest.fixture(scope="module")
def G():
    return torch.load(GOLDEN, weights_only=False)


def golden_config(G):
    """Our ModelConfig from the official config keys of the file (each line: our field = official setting)."""
    c = G["config"]
    assert c["MODEL.SEM_SEG_HEAD.CONVS_DIM"] == c["MODEL.SEM_SEG_HEAD.MASK_DIM"] == c["MODEL.MASK_FORMER.HIDDEN_DIM"]
    assert c["pixel_decoder.num_feature_levels"] == 3 and not c["MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ"]
    # clouds.py has no dropout and is post-norm only
    assert c["MODEL.MASK_FORMER.DROPOUT"] == 0.0 and not c["MODEL.MASK_FORMER.PRE_NORM"]
    return dict(
        num_classes=c["MODEL.SEM_SEG_HEAD.NUM_CLASSES"],
        hidden_dim=c["MODEL.MASK_FORMER.HIDDEN_DIM"],  # = CONVS_DIM = MASK_DIM (clouds.py ties them)
        enc_layers=c["MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS"],
        enc_heads=c["pixel_decoder.transformer_nheads (= MODEL.MASK_FORMER.NHEADS)"],
        enc_points=c["pixel_decoder.enc_n_points (hard-coded)"],
        enc_ffn=c["pixel_decoder.transformer_dim_feedforward (hard-coded in official MSDeformAttnPixelDecoder)"],
        dec_layers=c["MODEL.MASK_FORMER.DEC_LAYERS"] - 1,  # official DEC_LAYERS counts the raw-query prediction
        dec_heads=c["MODEL.MASK_FORMER.NHEADS"],
        dec_ffn=c["MODEL.MASK_FORMER.DIM_FEEDFORWARD"],
        num_queries=c["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES"],
        no_object_weight=c["MODEL.MASK_FORMER.NO_OBJECT_WEIGHT"],
        class_weight=c["MODEL.MASK_FORMER.CLASS_WEIGHT"],
        mask_weight=c["MODEL.MASK_FORMER.MASK_WEIGHT"],
        dice_weight=c["MODEL.MASK_FORMER.DICE_WEIGHT"],
        train_num_points=c["MODEL.MASK_FORMER.TRAIN_NUM_POINTS"],
        oversample_ratio=c["MODEL.MASK_FORMER.OVERSAMPLE_RATIO"],
        importance_sample_ratio=c["MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO"],
        deep_supervision=c["MODEL.MASK_FORMER.DEEP_SUPERVISION"],
    )


@pytest.fixture(scope="module")
def model(G):
    """CLOUDS built from the golden config; its head rebuilt for the golden 8/16/24/32-channel features and loaded
    through the strict loader of load_official. The (unused) backbone is the random-init tiny CLIP."""
    cfg = golden_config(G)
    assert cfg == dict(num_classes=5, hidden_dim=32, enc_layers=2, enc_heads=4, enc_points=4, enc_ffn=1024,
                       dec_layers=3, dec_heads=4, dec_ffn=64, num_queries=10, no_object_weight=0.1, class_weight=2.0,
                       mask_weight=5.0, dice_weight=5.0, train_num_points=3136, oversample_ratio=3.0,
                       importance_sample_ratio=0.75, deep_supervision=True)  # the README's configuration
    torch.manual_seed(0)
    m = clouds.build_model("tiny", **cfg)
    m.sem_seg_head = clouds.CLOUDSHead(m.cfg, IN_CHANNELS)
    checkpoints._load_head_strict(m.sem_seg_head, checkpoints._prefixed(G["state_dict"], "sem_seg_head."), str(GOLDEN))
    return m.eval()


def run_head(head, features):
    """Our head on `features`, split as the official one is: pixel decoder, then predictor. The attention masks are
    captured from every `predict_heads` call (before the "fully blocked row -> attend everywhere" rule)."""
    attn = []
    predict_heads = head.predictor.predict_heads

    def spy(output, mask_features, target_size):
        logits, masks, m = predict_heads(output, mask_features, target_size)
        attn.append(m[::head.predictor.heads])  # (B, Q, h*w): head 0 of each image (batch-major repeat_interleave)
        return logits, masks, m

    head.predictor.predict_heads = spy  # instance attribute: shadows the method for this call only
    try:
        mask_features, multi_scale = head.pixel_decoder(features)
        out = head.predictor(multi_scale, mask_features)
    finally:
        del head.predictor.predict_heads
    return mask_features, multi_scale, out, attn


@pytest.fixture(scope="module")
def ours(G, model):
    with torch.no_grad():
        return run_head(model.sem_seg_head, G["features"])


# ---- stored point coordinates injected into our matcher and criterion ----


@pytest.fixture
def stored_points(G, monkeypatch):
    """Make our matcher and criterion use the official points (README "Simplest way to reproduce the losses").

    The matcher draws its (1, P, 2) points through `criterion._rand` (one call per image with targets); the criterion
    gets its (N, P, 2) points from `criterion.sample_uncertain_points`. Both are replaced by iterators over the stored
    points in the order the official criterion used them ([final, aux 0, aux 1, aux 2], image by image); each call
    checks the shape it asked for. The importance sampling itself is pinned by
    `test_points_follow_official_rng_protocol`.
    Yields `all_used(criterion_too=True)`: asserts that every stored matcher (and criterion) point set was used.
    """
    matcher = iter([p for pred in G["points"]["matcher"] for p in pred])  # (P, 2) per prediction and image
    criterion = iter(G["points"]["criterion"])  # (N, P, 2) per prediction

    def fake_rand(shape, generator, device, dtype):
        p = next(matcher)
        assert tuple(shape) == (1, *p.shape), f"matcher asked for {tuple(shape)}, stored {(1, *p.shape)}"
        return p[None].to(device=device, dtype=dtype)

    def fake_sample(logits, num_points, oversample_ratio, importance_ratio, generator=None):
        p = next(criterion)
        assert p.shape == (logits.shape[0], num_points, 2), f"criterion asked for {logits.shape[0]} x {num_points}"
        return p.to(logits)

    monkeypatch.setattr(criterion_module, "_rand", fake_rand)
    monkeypatch.setattr(criterion_module, "sample_uncertain_points", fake_sample)

    def all_used(criterion_too=True):
        assert next(matcher, None) is None, "stored matcher points left unused"
        assert not criterion_too or next(criterion, None) is None, "stored criterion points left unused"
    return all_used


def golden_outputs(G):
    return {"pred_logits": G["pred_logits"], "pred_masks": G["pred_masks"], "aux_outputs": G["aux_outputs"]}


# ---- head ----


def test_state_dict_loads_strictly(G, model):
    head = model.sem_seg_head
    sd = checkpoints._prefixed(G["state_dict"], "sem_seg_head.")
    assert len(sd) == len(G["state_dict"]) == 120
    assert list(head.state_dict()) == list(sd)  # same names in the same order as the official module tree
    assert all(torch.equal(head.state_dict()[k], v) for k, v in sd.items())
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in head.parameters()) == 203_174
    broken = dict(sd)
    broken["predictor.class_embed.weight"] = broken["predictor.class_embed.weight"][:-1]  # 4 classes + no-object
    with pytest.raises(RuntimeError, match=r"1 shape-mismatched \['predictor.class_embed.weight: file \(5, 32\)"):
        checkpoints._load_head_strict(clouds.CLOUDSHead(model.cfg, IN_CHANNELS), broken, "golden")


def test_pixel_decoder_outputs(G, ours):
    mask_features, multi_scale, _, _ = ours
    compare("mask_features", mask_features, G["mask_features"], ATOL_OUT)
    assert len(multi_scale) == len(G["multi_scale_features"]) == 3
    for i, (a, b) in enumerate(zip(multi_scale, G["multi_scale_features"])):  # strides 32, 16, 8
        compare(f"multi_scale_features[{i}]", a, b, ATOL_OUT)
    # official transformer_encoder_features = the coarsest encoder output; ours is multi_scale[0]
    compare("transformer_encoder_features", multi_scale[0], G["transformer_encoder_features"], ATOL_OUT)


def test_predictions_and_each_aux_output(G, ours):
    out = ours[2]
    compare("pred_logits", out["pred_logits"], G["pred_logits"], ATOL_OUT)
    compare("pred_masks", out["pred_masks"], G["pred_masks"], ATOL_OUT)
    assert len(out["aux_outputs"]) == len(G["aux_outputs"]) == 3
    for i, (a, b) in enumerate(zip(out["aux_outputs"], G["aux_outputs"])):  # 0 = raw queries, then layers 1, 2
        compare(f"aux_outputs[{i}].pred_logits", a["pred_logits"], b["pred_logits"], ATOL_OUT)
        compare(f"aux_outputs[{i}].pred_masks", a["pred_masks"], b["pred_masks"], ATOL_OUT)


def test_attention_masks(G, ours):
    attn = ours[3]
    assert [tuple(a.shape) for a in attn] == [tuple(a.shape) for a in G["attn_masks"]]  # levels 2x3, 4x6, 8x12, 2x3
    for i, (a, b) in enumerate(zip(attn, G["attn_masks"])):
        flips = (a != b).sum().item()
        DIFFS[f"attn_masks[{i}] flipped entries"] = (flips, flips / b.numel())
        assert flips == 0, f"attention mask {i}: {flips} of {b.numel()} entries differ from the official mask"
        assert b.any() and not b.all()  # the masks do block something, and not everything


def test_semantic_inference(G, ours):
    out = ours[2]
    size = tuple(G["semantic_size"])
    with torch.no_grad():
        scores = ops.masks_to_semantic(out["pred_logits"], out["pred_masks"], size, return_scores=True)
        labels = clouds.semantic_inference(out["pred_logits"], out["pred_masks"], size)
    compare("semantic scores", scores, G["semantic"], ATOL_OUT)
    ref = G["semantic_labels"]
    top2 = G["semantic"].topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # labels can only differ where the official top-2 gap is float noise
    flips = (labels != ref).sum().item()
    DIFFS["semantic labels differing"] = (flips, flips / ref.numel())
    assert clear.float().mean() > 0.99 and torch.equal(labels[clear], ref[clear]), f"{flips} labels differ"


# ---- matcher and criterion (stored predictions and points) ----


def test_matcher_indices_exact(G, model, stored_points):
    out = golden_outputs(G)
    preds = [out] + out["aux_outputs"]  # the order the criterion calls the matcher in
    for i, (pred, ref) in enumerate(zip(preds, G["matcher_indices"])):
        got = model.criterion.matcher(pred, G["targets"])
        for b, ((q, k), (rq, rk)) in enumerate(zip(got, ref)):
            assert q.tolist() == rq.tolist() and k.tolist() == rk.tolist(), (
                f"prediction {i} image {b}: ours {q.tolist()} -> {k.tolist()}, "
                f"official {rq.tolist()} -> {rk.tolist()}")
    stored_points(criterion_too=False)


def test_losses_weighted_and_unweighted(G, model, stored_points):
    assert model.criterion.weights == {k: G["loss_weights"][k] for k in ("loss_ce", "loss_mask", "loss_dice")}
    losses = model.criterion(golden_outputs(G), G["targets"])
    stored_points()
    assert set(losses) == set(G["losses_weighted"]) and len(losses) == 12
    for k, ref in G["losses_weighted"].items():
        compare(f"weighted {k}", losses[k], ref, rtol=RTOL_LOSS)
        unweighted = losses[k] / model.criterion.weights[k.rstrip("_0123")]
        compare(f"unweighted {k}", unweighted, G["losses"][k], rtol=RTOL_LOSS)
        assert G["loss_weights"][k] * G["losses"][k] == pytest.approx(ref.item(), rel=1e-6)  # the file is consistent
    compare("loss_total", sum(losses.values()), G["loss_total"], rtol=RTOL_LOSS)


def test_gradients_of_loss_total(G, model, stored_points):
    head = model.sem_seg_head.train()  # train mode equals eval mode here (dropout 0, GroupNorm): README
    features = {k: v.clone().requires_grad_() for k, v in G["features"].items()}
    head.zero_grad()
    try:
        losses = model.criterion(head(features), G["targets"])
        total = sum(losses.values())
        total.backward()
    finally:
        head.eval()
    stored_points()
    compare("loss_total (our head)", total, G["loss_total"], rtol=RTOL_LOSS)
    params = dict(head.named_parameters())
    assert len(G["param_grads"]) == 10
    for name, ref in G["param_grads"].items():
        compare(f"grad {name.removeprefix('sem_seg_head.')}", params[name.removeprefix("sem_seg_head.")].grad, ref,
                rtol=RTOL_GRAD)
    for k, ref in G["feature_grads"].items():
        compare(f"grad features[{k}]", features[k].grad, ref, rtol=RTOL_GRAD)
    head.zero_grad()


# ---- point sampling from torch's RNG (README "Reproducing the points from torch's RNG") ----


def test_points_follow_official_rng_protocol(G, model, monkeypatch):
    """With torch.manual_seed(1234) and no generator, our criterion draws the official points bit for bit: matcher
    (1, P, 2) per image, then the (N, 3P, 2) candidates, the 0.75 P most uncertain kept in topk order, (N, P/4, 2)."""
    drawn, kept = [], []
    rand, sample = criterion_module._rand, criterion_module.sample_uncertain_points

    def spy_rand(shape, generator, device, dtype):
        drawn.append(rand(shape, generator, device, dtype))
        return drawn[-1]

    def spy_sample(*args, **kwargs):
        kept.append(sample(*args, **kwargs))
        return kept[-1]

    monkeypatch.setattr(criterion_module, "_rand", spy_rand)
    monkeypatch.setattr(criterion_module, "sample_uncertain_points", spy_sample)
    with torch.random.fork_rng():
        torch.manual_seed(G["config"]["seed_loss_rng"])
        losses = model.criterion(golden_outputs(G), G["targets"])
    P = model.criterion.num_points
    matcher = [p[0] for p in drawn if tuple(p.shape) == (1, P, 2)]
    assert len(matcher) == 8 and len(drawn) == 16  # 4 predictions x (2 matcher draws + candidates + rest)
    assert all(torch.equal(a, b) for a, b in zip(matcher, [p for pred in G["points"]["matcher"] for p in pred]))
    assert len(kept) == 4
    for i, (a, b) in enumerate(zip(kept, G["points"]["criterion"])):
        assert torch.equal(a, b), f"prediction {i}: {(a != b).any(-1).sum().item()} of {b.shape[:2]} points differ"
    for k, ref in G["losses_weighted"].items():
        compare(f"weighted {k} (torch RNG points)", losses[k], ref, rtol=RTOL_LOSS)


def test_matcher_indices_with_12544_points(G, model):
    """The default 12544 matcher points (official TRAIN_NUM_POINTS) with the RNG protocol, matcher calls only."""
    matcher = criterion_module.HungarianMatcher(model.criterion.matcher.cost_class, model.criterion.matcher.cost_mask,
                                             model.criterion.matcher.cost_dice, num_points=12544)
    out = golden_outputs(G)
    with torch.random.fork_rng():
        torch.manual_seed(G["config"]["seed_loss_rng"])
        got = [matcher(pred, G["targets"]) for pred in [out] + out["aux_outputs"]]
    as_list = lambda idx: [[(q.tolist(), k.tolist()) for q, k in per_pred] for per_pred in idx]  # noqa: E731
    assert as_list(got) == as_list(G["matcher_indices_12544"])
    assert as_list(got)[2] != as_list(G["matcher_indices"])[2]  # README: aux 1 differs from the 3136-point matching
