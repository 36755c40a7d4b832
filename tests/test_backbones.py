"""backbones.py (issue 19): ViT backbones of the real timm classes at tiny size (random init), the Rein-style adapter
and LoRA against float64 references written from their definitions, the ViT-L parameter counts on the meta device,
weights from a local file and from the Hugging Face cache (patch 14 -> 16), and the EMA teacher of a tuned adapter."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import backbones
import clouds
from runtools import preflight
import train
from runtools import train_config

TINY = ("dinov2_tiny", "dinov2_tiny_reg4", "eva02_tiny")


def tiny_backbone(name, tuning="frozen", seed=0, **kwargs):
    torch.manual_seed(seed)  # the ViT is built first: the same seed gives the same ViT weights for every tuning
    bb = backbones.ViTBackbone(name, None, tuning, num_queries=20, query_dim=64, **kwargs)
    with torch.no_grad():  # DINOv2's LayerScale starts at 1e-5 (trained values are ~0.1-1): let the blocks act
        for n, p in bb.vit.named_parameters():
            if n.endswith(".gamma"):
                p.fill_(1.0)
    return bb


def randomize_adapter(bb, seed=1):
    """Give the zero-initialized adapter tensors (Rein out_proj, LoRA B) random values, so the adapter acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if n in bb.adapter_names():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


# ---- parameter counts (ViT-L, meta device) ----


def test_rein_adapter_has_2990081_parameters_at_vit_l():
    """Rein's published count, from our definition: A 24*100*16 + B 24*16*1024 + scale 1 + two shared 1024x1024
    linears (with bias) + query projection 1024 -> 256 + merge 768 -> 256."""
    by_hand = 24 * 100 * 16 + 24 * 16 * 1024 + 1 + 2 * (1024 * 1024 + 1024) + (1024 * 256 + 256) + (768 * 256 + 256)
    assert by_hand == 2_990_081 == backbones.rein_parameter_count()
    with torch.device("meta"):
        rein = backbones.Rein(1024, 24, num_tokens=100, rank=16, query_dim=256)
    assert sum(p.numel() for p in rein.parameters()) == 2_990_081
    counts = backbones.count_parameters("dinov2_l", "rein")  # the ViT-L backbone as registered, on the meta device
    assert counts["trainable"] == counts["adapter"] == 2_990_081


def test_vit_l_totals_and_lora_counts_by_hand():
    """DINOv2-L at patch 16 (512 grid): patch embed 3*16*16*1024 + 1024, class token, 1025 position embeddings, 24
    blocks of (2 LayerNorms, qkv, proj, 2 LayerScales, fc1, fc2), final norm. LoRA r=16 on qkv: 24 r (1024 + 3072)
    for the fused qkv (DINOv2), 24 * 3 r (1024 + 1024) for EVA02's separate q/k/v projections."""
    C = 1024
    block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
    total = (3 * 16 * 16 * C + C) + C + (1 + 32 * 32) * C + 24 * block + 2 * C
    frozen = backbones.count_parameters("dinov2_l", "frozen")
    assert frozen == {"total": total, "trainable": 0, "adapter": 0} and total == 304_198_656
    lora = backbones.count_parameters("dinov2_l", "lora")
    assert lora["trainable"] == 24 * 16 * (C + 3 * C) == 1_572_864 and lora["total"] == total + 1_572_864
    assert backbones.count_parameters("eva02_l", "lora")["trainable"] == 24 * 3 * 16 * 2 * C == 2_359_296
    assert backbones.count_parameters("dinov2_l", "lora", lora_targets="attn")["trainable"] == 24 * 16 * (
        (C + 3 * C) + (C + C))  # + attn.proj (1024 -> 1024)


# ---- features: shapes, strides, the timm reference ----


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("tuning", backbones.TUNINGS)
def test_feature_shapes_and_strides(name, tuning):
    bb = tiny_backbone(name, tuning)
    x = torch.randn(2, 3, 64, 96)
    f = bb(x)
    assert [tuple(f[f"res{i}"].shape) for i in (2, 3, 4, 5)] == [(2, 32, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert bb.channels == [32] * 4
    if tuning == "rein":
        assert tuple(f["queries"].shape) == (2, 20, 64)
    else:
        assert "queries" not in f


@pytest.mark.parametrize("name", TINY)
def test_features_are_timm_intermediates_resized(name):
    """res4 is block 2's output (x1), res2/res3 its bilinear x4/x2, res5 the 2x2 mean (x0.5): against timm's own
    forward_intermediates (class and register tokens removed there too). Catches a wrong block, a prefix token left in
    the map, a transposed grid."""
    bb = tiny_backbone(name)
    x = torch.randn(1, 3, 64, 96)
    ref = bb.vit.forward_intermediates(x, indices=list(bb.layers), norm=False, output_fmt="NCHW",
                                       intermediates_only=True)  # 4 x (1, C, 4, 6)
    f = bb(x)
    torch.testing.assert_close(f["res4"], ref[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f["res5"], F.avg_pool2d(ref[3], 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f["res2"], F.interpolate(ref[0], scale_factor=4, mode="bilinear"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f["res3"], F.interpolate(ref[1], scale_factor=2, mode="bilinear"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("tuning", ["rein", "lora"])
def test_fresh_adapter_is_the_identity_and_a_trained_one_is_not(name, tuning):
    frozen, tuned = tiny_backbone(name), tiny_backbone(name, tuning)
    x = torch.randn(1, 3, 64, 64)
    a, b = frozen(x), tuned(x)
    assert all(torch.equal(a[k], b[k]) for k in a)  # Rein's out_proj and LoRA's B start at zero
    randomize_adapter(tuned)
    b = tuned(x)
    assert all((a[k] - b[k]).abs().max() > 1e-3 for k in a)  # the adapter reaches every level


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("tuning", backbones.TUNINGS)
def test_only_the_adapter_trains(name, tuning):
    """requires_grad exactly on the adapter; a backward pass fills the gradient of every adapter tensor and of no
    ViT weight; frozen features carry no graph."""
    bb = tiny_backbone(name, tuning)
    randomize_adapter(bb)
    adapter = set(bb.adapter_names())
    assert {n for n, p in bb.named_parameters() if p.requires_grad} == adapter
    assert (len(adapter) > 0) == (tuning != "frozen")
    f = bb(torch.randn(1, 3, 64, 64))
    if tuning == "frozen":
        assert all(not v.requires_grad for v in f.values())
        return
    sum(v.square().mean() for v in f.values()).backward()
    for n, p in bb.named_parameters():
        if n in adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


# ---- Rein and LoRA against float64 references of their definitions ----


def rein_reference(rein, layer, Fp):
    """The definition, written out with einsum: T = A_i B_i; S = softmax over the m tokens of F T^T / sqrt(C);
    dF = f_out(S f_tok(T) + F); F + scale * dF. Fp: (B, N, C) patch tokens only."""
    A, B = rein.tokens_a[layer], rein.tokens_b[layer]
    T = torch.einsum("mr,rc->mc", A, B)
    S = torch.exp(torch.einsum("bnc,mc->bnm", Fp, T) / math.sqrt(Fp.shape[-1]))
    S = S / S.sum(-1, keepdim=True)
    ftok = torch.einsum("mc,dc->md", T, rein.token_proj.weight) + rein.token_proj.bias
    inner = torch.einsum("bnm,md->bnd", S, ftok) + Fp
    dF = torch.einsum("bnc,dc->bnd", inner, rein.out_proj.weight) + rein.out_proj.bias
    return Fp + rein.scale * dF


@pytest.mark.parametrize("name", TINY)
def test_rein_backbone_is_timm_with_a_refinement_after_every_block(name):
    """timm's own block loop (forward_intermediates) with the reference refinement of the PATCH tokens hooked after
    every block gives the Rein backbone's features. Catches a refined class/register token, a skipped block, a
    refinement after the features are taken."""
    bb = tiny_backbone(name, "rein")
    randomize_adapter(bb)
    P = bb.prefix

    def hook(i):
        def refine(module, args, out):
            return torch.cat([out[:, :P], rein_reference(bb.rein, i, out[:, P:])], 1)
        return refine

    x = torch.randn(1, 3, 64, 96)
    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(bb.vit.blocks)]
    with torch.no_grad():
        ref = bb.vit.forward_intermediates(x, indices=list(bb.layers), norm=False, output_fmt="NCHW",
                                           intermediates_only=True)
    for h in handles:
        h.remove()
    with torch.no_grad():
        f = bb(x)
    torch.testing.assert_close(f["res4"], ref[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f["res5"], F.avg_pool2d(ref[3], 2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f["res3"], F.interpolate(ref[1], scale_factor=2, mode="bilinear"), rtol=1e-4, atol=1e-4)


def test_rein_matches_its_definition_in_float64():
    torch.manual_seed(0)
    rein = backbones.Rein(dim=8, depth=3, num_tokens=5, rank=2, query_dim=4).double()
    randomize_adapter(type("A", (), {"named_parameters": rein.named_parameters,
                                     "adapter_names": lambda s: ["out_proj.weight", "out_proj.bias"]})())
    with torch.no_grad():
        rein.scale.fill_(0.7)
    x = torch.randn(2, 1 + 6, 8, dtype=torch.float64)  # 1 class token + 6 patches
    out = rein(x, 1, 1)
    torch.testing.assert_close(out[:, 1:], rein_reference(rein, 1, x[:, 1:]), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, :1], x[:, :1])  # the class token is never refined
    # queries: Q_i = f_q(T_i); Q = f_merge([Q_last, max_i Q_i, mean_i Q_i])
    Qi = torch.stack([rein.query_proj(rein.tokens_a[i] @ rein.tokens_b[i]) for i in range(3)])  # (3, 5, 4)
    ref_q = rein.query_merge(torch.cat([Qi[2], Qi.max(0).values, Qi.sum(0) / 3], -1))
    torch.testing.assert_close(rein.queries(), ref_q, rtol=1e-12, atol=1e-12)


def test_lora_linear_is_the_merged_weight():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 9).double()
    lora = backbones.LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    merged = base.weight + (6.0 / 3) * lora.lora_b @ lora.lora_a
    torch.testing.assert_close(lora(x), x @ merged.t() + base.bias, rtol=1e-12, atol=1e-12)
    assert lora.weight is base.weight and set(dict(lora.named_parameters())) == {"weight", "bias", "lora_a", "lora_b"}


@pytest.mark.parametrize("name,targets", [("dinov2_tiny", "qkv"), ("eva02_tiny", "qkv"), ("dinov2_tiny", "all"),
                                          ("eva02_tiny", "attn")])
def test_lora_backbone_equals_the_vit_with_merged_weights(name, targets):
    """Every wrapped Linear of every block acts: folding B A into the weights of a plain copy of the ViT gives the same
    features. Catches a LoRA layer that is never called (e.g. timm bypassing the module) or a missing block."""
    bb = tiny_backbone(name, "lora", lora_targets=targets)
    randomize_adapter(bb)
    plain = tiny_backbone(name)
    wrapped = {n: m for n, m in bb.vit.named_modules() if isinstance(m, backbones.LoRALinear)}
    expected = {"qkv": 1 if name == "dinov2_tiny" else 3, "attn": 4, "all": 4}[targets]  # per block (+ fc1, fc2)
    assert len(wrapped) == 4 * expected
    with torch.no_grad():
        for n, m in wrapped.items():
            plain.vit.get_submodule(n).weight.add_(m.scaling * m.lora_b @ m.lora_a)
    x = torch.randn(1, 3, 64, 64)
    a, b = bb(x), plain(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


# ---- the model: Rein tokens as the decoder queries; config errors ----


def test_rein_tokens_are_the_decoder_queries():
    torch.manual_seed(0)
    model = clouds.build_model("tiny", backbone="dinov2_tiny", tuning="rein")
    x = torch.randint(0, 256, (1, 3, 64, 64)).float()
    out = model(x)
    with torch.no_grad():
        model.backbone.rein.query_merge.bias.add_(1.0)  # the queries change -> the predictions change
    assert (model(x)["pred_logits"] - out["pred_logits"]).abs().max() > 1e-4
    with torch.no_grad():
        model.sem_seg_head.predictor.query_feat.weight.add_(1.0)  # unused with Rein queries
    out2 = model(x)
    with torch.no_grad():
        model.sem_seg_head.predictor.query_feat.weight.sub_(1.0)
    assert torch.equal(model(x)["pred_logits"], out2["pred_logits"])


def test_model_config_errors():
    with pytest.raises(ValueError, match="adapts a ViT backbone"):
        clouds.ModelConfig(tuning="rein")
    with pytest.raises(ValueError, match="choose one"):
        clouds.ModelConfig(backbone="dinov2_l", tuning="lora", train_backbone=True)
    with pytest.raises(ValueError, match="unknown backbone 'vit_g'"):
        clouds.build_model("tiny", backbone="vit_g")
    with pytest.raises(ValueError, match="expected None .* a local weights file, or a Hugging Face repo id"):
        backbones.ViTBackbone("dinov2_tiny", "laion2b_s29b_b131k_ft_soup")  # a CLIP tag is no ViT weight source
    model = clouds.build_model("convnext_large", backbone="dinov2_tiny")  # the ViT's own normalization
    assert model.cfg.pretrained is None and model.pixel_mean.flatten().tolist() == pytest.approx(
        [0.485 * 255, 0.456 * 255, 0.406 * 255])


# ---- weights: a local file and the Hugging Face cache (patch 14 -> 16) ----


def patch14_state(timm_name, **kw):
    """The state dict of a tiny random-init model of `timm_name` at its native patch 14 (a stand-in for the release)."""
    import timm

    torch.manual_seed(3)
    return timm.create_model(timm_name, pretrained=False, num_classes=0, embed_dim=32, depth=4, num_heads=2,
                             **kw).state_dict()


def test_local_weights_file_loads_at_patch_16(tmp_path):
    """The file's 14x14 patch embedding is resampled to 16x16 (timm's resample_patch_embed) and the 37x37 position
    grid to 32x32; every block weight loads as is."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    sd = patch14_state("vit_large_patch14_dinov2")
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(sd, path)
    bb = backbones.ViTBackbone("dinov2_tiny", str(path))
    got = bb.vit.state_dict()
    assert tuple(sd["patch_embed.proj.weight"].shape[-2:]) == (14, 14)
    torch.testing.assert_close(got["patch_embed.proj.weight"], resample_patch_embed(sd["patch_embed.proj.weight"],
                                                                                    (16, 16)))
    torch.testing.assert_close(got["pos_embed"], resample_abs_pos_embed(sd["pos_embed"], (32, 32), (37, 37)))
    for k in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.bias", "blocks.2.ls1.gamma", "norm.weight"):
        assert torch.equal(got[k], sd[k]), k
    with pytest.raises(RuntimeError, match="not found"):
        backbones.ViTBackbone("dinov2_tiny", str(tmp_path / "missing.safetensors"))


def test_open_clip_file_of_eva02_clip_loads(tmp_path, monkeypatch):
    """eva02_l_clip reads open_clip's own file: keys under visual.trunk., the projection head dropped."""
    spec = backbones.BACKBONES["eva02_l_clip"]
    monkeypatch.setitem(backbones.BACKBONES, "eva02_l_clip", backbones.BackboneSpec(
        spec.timm_name, spec.hub, spec.files, (0, 1, 2, 3), dict(embed_dim=32, depth=4, num_heads=2), spec.what))
    sd = patch14_state("eva02_large_patch14_clip_336")
    trunk = {f"visual.trunk.{k}": v for k, v in sd.items()}
    trunk["visual.trunk.head.weight"], trunk["visual.trunk.head.bias"] = torch.randn(768, 32), torch.randn(768)
    trunk["text.token_embedding.weight"] = torch.randn(10, 8)  # the text tower is not read
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(trunk, path)
    bb = backbones.ViTBackbone("eva02_l_clip", str(path), "rein", num_queries=20, query_dim=64)
    assert torch.equal(bb.vit.state_dict()["blocks.1.attn.q_proj.weight"], sd["blocks.1.attn.q_proj.weight"])
    assert bb.pixel_mean[0] == pytest.approx(0.48145466 * 255)  # CLIP normalization
    assert tuple(bb(torch.randn(1, 3, 64, 64))["res5"].shape) == (1, 32, 2, 2)


def fake_hub_cache(cache, repo, filename, state):
    """The Hugging Face cache layout (models--org--name/snapshots/REV/FILE, refs/main = REV)."""
    d = cache / f"models--{repo.replace('/', '--')}"
    (d / "snapshots" / "0000").mkdir(parents=True)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text("0000")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "snapshots" / "0000" / filename))


def test_weights_by_name_from_the_hub_cache_and_the_preflight(tmp_path, monkeypatch):
    """dinov2_l by name: missing from the cache -> the preflight names `hf download REPO model.safetensors` and
    --backbone-weights, and building raises the same hint; once the file is in the cache both pass and the weights
    load (here a tiny stand-in under the real repo name)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = backbones.BACKBONES["dinov2_l"]
    monkeypatch.setitem(backbones.BACKBONES, "dinov2_l", backbones.BackboneSpec(
        spec.timm_name, spec.hub, spec.files, (0, 1, 2, 3), dict(embed_dim=32, depth=4, num_heads=2), spec.what))
    cfg = train_config.TrainConfig(backbone="dinov2_l")
    problems = preflight.clip_problems(cfg)
    assert len(problems) == 1
    assert "hf download timm/vit_large_patch14_dinov2.lvd142m model.safetensors" in problems[0]
    assert "--backbone-weights /path/model.safetensors" in problems[0] and "laion" not in problems[0]
    with pytest.raises(RuntimeError, match="hf download timm/vit_large_patch14_dinov2.lvd142m"):
        clouds.build_model("tiny", backbone="dinov2_l")
    sd = patch14_state("vit_large_patch14_dinov2")
    fake_hub_cache(tmp_path / "hub", spec.hub, "model.safetensors", sd)
    assert preflight.clip_problems(cfg) == []
    model = clouds.build_model("tiny", backbone="dinov2_l", tuning="lora")
    assert model.cfg.pretrained == "timm/vit_large_patch14_dinov2.lvd142m"
    assert torch.equal(model.backbone.vit.state_dict()["blocks.2.attn.qkv.weight"], sd["blocks.2.attn.qkv.weight"])
    assert preflight.clip_problems(train_config.TrainConfig(backbone="dinov2_l", backbone_weights="/nope.pt")) == [
        "--backbone-weights /nope.pt does not exist: pass the DINOv2 ViT-L/14 (LVD-142M) weights file "
        "(model.safetensors), or drop --backbone-weights to use the Hugging Face cache"]


# ---- the EMA teacher of a tuned adapter ----


def test_ema_teacher_averages_the_adapter_and_shares_the_frozen_vit():
    """EMASource holds the head and the tuned tensors (the student's own); its deepcopy (the teacher) holds copies of
    those only. teacher_step: T <- a T + (1 - a) S on the adapter too; the teacher predicts with ITS adapter."""
    torch.manual_seed(0)
    model = clouds.build_model("tiny", backbone="eva02_tiny", tuning="lora")
    source = train.EMASource(model)
    adapter = set(model.backbone.adapter_names())
    assert set(source.names) == adapter and all(a is b for a, b in zip(source.tuned, (
        p for n, p in model.backbone.named_parameters() if n in adapter)))
    teacher = copy.deepcopy(source).requires_grad_(False).eval()
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in model.sem_seg_head.parameters()) \
        + sum(p.numel() for n, p in model.backbone.named_parameters() if n in adapter)  # no ViT weight copied
    train.teacher_step(teacher, source, 0, 0.75, 1)  # it 0: the copy
    before = [t.detach().clone() for t in teacher.tuned]
    randomize_adapter(model.backbone, seed=5)  # the student moves
    train.teacher_step(teacher, source, 1, 0.75, 1)
    for t, b, s in zip(teacher.tuned, before, source.tuned):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s.detach())
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    via_teacher = model.predict(x, return_scores=True, **train.teacher_inputs(teacher))
    twin = copy.deepcopy(model)  # the reference: a model whose head and adapter ARE the teacher's
    twin.sem_seg_head.load_state_dict(teacher.head.state_dict())
    with torch.no_grad():
        for n, t in teacher.backbone_params().items():
            twin.backbone.get_parameter(n).copy_(t)
    assert torch.equal(via_teacher, twin.predict(x, return_scores=True))
    assert not torch.equal(via_teacher, model.predict(x, return_scores=True, head=teacher.head))
