"""CLOUDS segmentation model: frozen CLIP backbone + Mask2Former head, matcher, losses, inference.

Implements the model box of the paper's Fig. 2 (CLOUDS, CVPR 2024, Sec. 3.1) as the released code configures it:
a frozen open_clip ConvNeXt-L image encoder, an MSDeformAttn pixel decoder, a 9-layer masked-attention transformer
decoder with a Linear(256, 20) class head, the Hungarian matcher + point-sampled set criterion, and semantic inference.
Module names follow the official checkpoints, so `checkpoints.load_official` loads a released `model_final.pth`
strictly (checkpoints.py: saving, loading, and the parameter-count CLI). The matcher and criterion live in
criterion.py (`criterion.targets_from_label`, `criterion.SetCriterion`, ...).

Usage:
    model = build_model("convnext_large")            # or "rn50", "rn101", "tiny"; pretrained=None for random init
    pred = model.predict(images_uint8_bchw)          # int64 (B, H, W) train ids
    build_model("convnext_large", backbone="dinov2_l", tuning="rein")  # beyond the paper: a ViT (backbones.py)
"""
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ops
from criterion import HungarianMatcher, SetCriterion

# ---- config ----

PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)  # official MODEL.PIXEL_MEAN (CLIP mean, RGB, 0-255)
PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)  # official MODEL.PIXEL_STD
SIZE_DIVISIBILITY = 32  # official MASK_FORMER.SIZE_DIVISIBILITY
TINY_CLIP = "clouds_tiny"  # a random-init open_clip ConvNeXt-atto CLIP for tests and the offline demo
TINY_CLIP_CFG = dict(
    embed_dim=64,
    vision_cfg=dict(timm_model_name="convnext_atto", timm_model_pretrained=False, timm_pool="", timm_proj="mlp",
                    timm_drop=0.0, timm_drop_path=0.0, image_size=64),  # trunk channels 40/80/160/320
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)


@dataclass
class ModelConfig:
    clip_model: str = "convnext_large_d_320"  # official MODEL.CLOUDS.CLIP_MODEL_NAME
    pretrained: str | None = "laion2b_s29b_b131k_ft_soup"  # official CLIP_PRETRAINED_WEIGHTS; tag, local file, or None
    train_backbone: bool = False  # official: CLIP frozen (requires_grad False, eval, no_grad); True only for `tiny`
    backbone_bf16: bool = False  # §12: bf16 autocast for the frozen backbone (official runs fp32)
    num_classes: int = 19  # official SEM_SEG_HEAD.NUM_CLASSES
    hidden_dim: int = 256  # official CONVS_DIM = MASK_DIM = MASK_FORMER.HIDDEN_DIM
    enc_layers: int = 6  # official SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
    enc_heads: int = 8  # official deformable N_HEADS
    enc_points: int = 4  # official deformable N_POINTS
    enc_ffn: int = 1024  # official MSDeformAttn encoder FFN width
    dec_layers: int = 9  # official MASK_FORMER.DEC_LAYERS = 10 (9 layers + the prediction on the raw queries)
    dec_heads: int = 8  # official MASK_FORMER.NHEADS
    dec_ffn: int = 2048  # official MASK_FORMER.DIM_FEEDFORWARD
    num_queries: int = 100  # official MASK_FORMER.NUM_OBJECT_QUERIES
    classifier: str = "linear"  # official decoder: Linear(256, C+1); "text" = the paper's CLIP text classifier (§2.2)
    no_object_weight: float = 0.1  # official MASK_FORMER.NO_OBJECT_WEIGHT
    class_weight: float = 2.0  # official MASK_FORMER.CLASS_WEIGHT
    mask_weight: float = 5.0  # official MASK_FORMER.MASK_WEIGHT
    dice_weight: float = 5.0  # official MASK_FORMER.DICE_WEIGHT
    train_num_points: int = 12544  # official MASK_FORMER.TRAIN_NUM_POINTS (112^2)
    oversample_ratio: float = 3.0  # official MASK_FORMER.OVERSAMPLE_RATIO
    importance_sample_ratio: float = 0.75  # official MASK_FORMER.IMPORTANCE_SAMPLE_RATIO
    deep_supervision: bool = True  # official MASK_FORMER.DEEP_SUPERVISION
    # beyond the paper (issue 19): a ViT from backbones.py instead of CLIP, frozen or tuned (Rein-style / LoRA)
    backbone: str = "clip"  # "clip": open_clip `clip_model` (official); else a backbones.BACKBONES name (dinov2_l, ...)
    tuning: str = "frozen"  # ViT backbones: frozen | rein | lora (only the adapter trains)
    rein_rank: int = 16  # Rein: rank of each layer's tokens (its token count is num_queries: they are the queries)
    lora_rank: int = 16  # LoRA rank r
    lora_alpha: float = 16.0  # LoRA scaling alpha / r
    lora_targets: str = "qkv"  # qkv | attn (qkv + attn.proj) | all (every Linear of the blocks)

    def __post_init__(self):
        if self.classifier not in ("linear", "text"):
            raise ValueError(f"classifier must be 'linear' or 'text', got {self.classifier!r}")
        if self.tuning not in ("frozen", "rein", "lora"):
            raise ValueError(f"tuning must be 'frozen', 'rein' or 'lora', got {self.tuning!r}")
        if self.backbone == "clip" and self.tuning != "frozen":
            raise ValueError(f"tuning {self.tuning!r} adapts a ViT backbone: pick one with backbone='dinov2_l' (or "
                             f"another backbones.BACKBONES name); the CLIP backbone is frozen or fully trained")
        if self.tuning != "frozen" and self.train_backbone:
            raise ValueError(f"train_backbone trains every backbone weight and tuning {self.tuning!r} only an "
                             f"adapter: choose one")
        if self.backbone != "clip" and self.classifier == "text":
            raise ValueError("classifier 'text' needs the CLIP text tower: use backbone='clip'")
        for name in ("hidden_dim", "enc_layers", "enc_heads", "enc_points", "dec_layers", "dec_heads", "num_queries",
                     "num_classes", "train_num_points", "rein_rank", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_dim % 32 or self.hidden_dim % self.enc_heads or self.hidden_dim % self.dec_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by 32 (GroupNorm groups) and by "
                             f"enc_heads={self.enc_heads} and dec_heads={self.dec_heads}")


PRESETS = {
    "convnext_large": {},  # configs/*/clouds_*convnext*.yaml: every released result
    "rn50": dict(clip_model="RN50", pretrained="openai"),  # *_r50.yaml
    "rn101": dict(clip_model="RN101", pretrained="openai"),  # *_r101.yaml
    "tiny": dict(clip_model=TINY_CLIP, pretrained=None, hidden_dim=64, enc_heads=4, dec_heads=4, enc_layers=2,
                 enc_ffn=256, dec_ffn=256, dec_layers=3, num_queries=20, train_num_points=3136),  # tests / demo
}

# ---- backbone ----


def _create_clip(name, pretrained):
    """open_clip model `name` with weights `pretrained` (a tag, a local file, or None = random init)."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("clouds.py needs open_clip: pip install open_clip_torch") from e
    is_path = pretrained is not None and (os.sep in pretrained or Path(pretrained).suffix in (".bin", ".pt", ".pth",
                                                                                                ".safetensors"))
    if is_path and not Path(pretrained).is_file():
        raise RuntimeError(f"CLIP weights file for model '{name}' not found: {pretrained}")
    if name == TINY_CLIP:
        model = open_clip.CLIP(**TINY_CLIP_CFG)
        if pretrained is not None:
            open_clip.load_checkpoint(model, pretrained)
        return model
    # OpenAI ResNets were trained with QuickGELU; the 'openai' tag sets it, a random/local build must ask for it.
    quick_gelu = name.startswith("RN") and pretrained != "openai"
    try:
        return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu)
    except (RuntimeError, OSError) as e:  # OSError covers FileNotFoundError and hub connection errors
        hub = ""
        if pretrained is not None and not is_path:
            hub_id = (open_clip.get_pretrained_cfg(name, pretrained) or {}).get("hf_hub", "")
            hub = f" (Hugging Face repo '{hub_id.rstrip('/')}')" if hub_id else ""
        raise RuntimeError(
            f"Could not load CLIP weights for model '{name}', pretrained='{pretrained}'{hub}. Without internet, "
            f"download open_clip_pytorch_model.bin for this model and tag on a connected machine and pass the local "
            f"file: --clip-weights /path/open_clip_pytorch_model.bin (i.e. build_model(..., pretrained='/path/...')); "
            f"pretrained=None builds random weights (tests only). Set HF_HUB_OFFLINE=1 to fail fast.") from e


class CLIPBackbone(nn.Module):
    """Dense multi-scale features of an open_clip image encoder (Sec. 3.1: frozen CLIP encoder).

    ConvNeXt (timm trunk): stem + stages[0..3]; ModifiedResNet (RN50/RN101): conv1-3 stem, avgpool, layer1..4.
    Input: normalized (B, 3, H, W) float, H and W multiples of 32. Output: {"res2".."res5"} at strides 4/8/16/32.
    """

    def __init__(self, name, pretrained, trainable=False, bf16=False):
        super().__init__()
        self.clip_model = _create_clip(name, pretrained)  # key prefix `backbone.clip_model.` as in the official files
        self.trainable, self.bf16 = trainable, bf16
        visual = self.clip_model.visual
        if hasattr(visual, "trunk") and hasattr(visual.trunk, "stages"):
            self.kind = "convnext"
            self.channels = [f["num_chs"] for f in visual.trunk.feature_info][-4:]
        elif hasattr(visual, "layer4"):
            self.kind = "resnet"
            self.channels = [getattr(visual, f"layer{i}")[-1].conv3.out_channels for i in range(1, 5)]
        else:
            raise ValueError(f"CLIP model '{name}' has no ConvNeXt trunk or ResNet layers; only open_clip ConvNeXt "
                             f"and RN* models give dense multi-scale features")
        # official: every CLIP parameter frozen (requires_grad False, eval(), no_grad). With train_backbone (only
        # sensible for the random-init `tiny`) exactly the modules that make the features train; the text tower and
        # the pooling/projection heads stay frozen (they get no gradient).
        self.clip_model.requires_grad_(False)
        if trainable:
            used = [visual.trunk.stem, visual.trunk.stages] if self.kind == "convnext" else [
                getattr(visual, n) for n in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "layer1", "layer2",
                                             "layer3", "layer4")]
            for m in used:
                m.requires_grad_(True)
        else:
            self.clip_model.eval()

    def _apply(self, fn, recurse=True):
        """Module.to(device) / .cuda() move the image tower only. The text tower runs once, at build time (the
        `text` classifier's embeddings), and would hold ~0.5 GB (ConvNeXt-L's) on every GPU for nothing; it stays
        where it is (its weights still load and save with the model). Casts that keep the device apply to all."""
        probe = fn(torch.zeros(()))
        if recurse and probe.device != torch.device("cpu"):
            self.clip_model.visual._apply(fn)
            return self
        return super()._apply(fn, recurse)

    def train(self, mode=True):
        super().train(mode)
        if not self.trainable:
            self.clip_model.eval()  # official: frozen CLIP always runs in eval mode (BN stats, drop path)
        return self

    def freeze(self):
        """From now on frozen as the official CLIP is (the joint phase after a warmup that trained it)."""
        self.trainable = False
        self.clip_model.requires_grad_(False)
        return self.train(self.training)

    def forward(self, x):
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()), \
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            v = self.clip_model.visual
            if self.kind == "convnext":
                h, feats = v.trunk.stem(x), []  # stem: stride 4
                for stage in v.trunk.stages:
                    h = stage(h)
                    feats.append(h)
            else:
                h = v.act1(v.bn1(v.conv1(x)))  # stride 2
                h = v.avgpool(v.act3(v.bn3(v.conv3(v.act2(v.bn2(v.conv2(h)))))))  # (B, 64w, H/4, W/4)
                feats = []
                for layer in (v.layer1, v.layer2, v.layer3, v.layer4):
                    h = layer(h)
                    feats.append(h)
        return {f"res{i + 2}": f.float() for i, f in enumerate(feats)}  # (B, C_i, H/2^(i+2), W/2^(i+2))


# Sec. 3.1 / §2.2: the paper's CLIP text classifier (official configs never use it: paper vs code).
CLASS_SYNONYMS = (
    ("road", "railroad"), ("sidewalk", "pavement"),
    ("building", "buildings", "edifice", "edifices", "house", "ceiling"),
    ("wall", "walls", "brick wall", "stone wall", "tile wall", "wood wall"), ("fence", "fences"), ("pole", "poles"),
    ("traffic light", "traffic lights"), ("traffic sign", "stop sign"),
    ("vegetation", "tree", "trees", "palm tree", "bushes"),
    ("terrain", "river", "sand", "sea", "snow", "water", "mountain", "grass", "dirt", "rock"), ("sky", "clouds"),
    ("person",), ("rider",), ("car", "cars"), ("truck", "trucks"), ("bus", "buses"),
    ("train", "trains", "locomotive", "locomotives", "freight train"), ("motorcycle", "motorcycles"),
    ("bicycle", "bicycles", "bike", "bikes"),
)
VILD_TEMPLATES = (
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
    "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.", "a photo of a large {}.",
    "This is a photo of a small {}.", "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.", "There is a large {} in the scene.",
)


@torch.no_grad()
def text_embeddings(clip_model, synonyms=CLASS_SYNONYMS, templates=VILD_TEMPLATES, batch_size=128, progress=True):
    """Unit text vectors per synonym: encode synonym x template, normalize, average templates, normalize.

    Returns (embeddings (S, D) float, synonym_class int64 (S,)); S = 60 synonyms for the 19 classes (the reference
    §2.2 table; its text says 62). Computed once per model build: 60 x 14 = 840 prompts through the text tower.
    """
    import open_clip  # bundled BPE vocabulary: works offline
    from tqdm import tqdm

    names = [s for syns in synonyms for s in syns]
    texts = [t.format(s) for s in names for t in templates]
    was_training = clip_model.training
    clip_model.eval()
    device = next(clip_model.parameters()).device
    starts = tqdm(range(0, len(texts), batch_size), desc="CLIP text classifier", disable=not progress, leave=False)
    emb = torch.cat([clip_model.encode_text(open_clip.tokenize(texts[i:i + batch_size]).to(device)).float()
                     for i in starts])  # (S*T, D)
    clip_model.train(was_training)
    emb = F.normalize(F.normalize(emb, dim=-1).view(len(names), len(templates), -1).mean(1), dim=-1)  # (S, D)
    cls = torch.tensor([c for c, syns in enumerate(synonyms) for _ in syns])  # (S,)
    return emb, cls


class TextClassifier(nn.Module):
    """FC-CLIP style in-vocabulary classifier: cos(MLP(query), text vector) * min(exp(logit_scale), 100),
    max over each class's synonyms, plus a learnable void embedding as the last (no-object) logit.

    We implement the query-embedding branch only; FC-CLIP's extra mask-pooled pixel-feature term is left out.
    """

    def __init__(self, hidden_dim, embeddings, synonym_class, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.mlp = MLP(hidden_dim, hidden_dim, embeddings.shape[1], 3)  # 256 -> 256 -> D
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.void_embedding = nn.Embedding(1, embeddings.shape[1])
        # persistent so our checkpoints restore exactly the vectors the head was trained with
        self.register_buffer("text_embeddings", embeddings)  # (S, D)
        self.register_buffer("synonym_class", synonym_class)  # (S,)

    def forward(self, x):  # x: (B, Q, hidden)
        e = F.normalize(self.mlp(x), dim=-1)  # (B, Q, D)
        scale = self.logit_scale.exp().clamp(max=100)
        sims = scale * e @ self.text_embeddings.t()  # (B, Q, S)
        idx = self.synonym_class.expand_as(sims)
        cls = sims.new_full((*sims.shape[:2], self.num_classes), -torch.inf)
        cls = cls.scatter_reduce(-1, idx, sims, "amax", include_self=False)  # (B, Q, C) max over synonyms
        void = scale * e @ F.normalize(self.void_embedding.weight, dim=-1).t()  # (B, Q, 1)
        return torch.cat([cls, void], dim=-1)  # (B, Q, C+1)


# ---- pixel decoder ----


def position_embedding_sine(h, w, num_feats, device, temperature=10000.0, scale=2 * math.pi):
    """DETR sine encoding, normalize=True (y / (h + eps) * 2pi, no padding mask): (2*num_feats, h, w), y then x."""
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + 1e-6) * scale  # (h,)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + 1e-6) * scale  # (w,)
    dim_t = temperature ** (2 * (torch.arange(num_feats, dtype=torch.float32, device=device) // 2) / num_feats)
    py, px = y[:, None] / dim_t, x[:, None] / dim_t  # (h, F), (w, F)
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)  # (h, F): sin, cos interleaved
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)  # (w, F)
    pos = torch.cat([py[:, None].expand(h, w, num_feats), px[None].expand(h, w, num_feats)], dim=-1)  # (h, w, 2F)
    return pos.permute(2, 0, 1)  # (2F, h, w)


def ms_deform_attn(value, shapes, locations, weights, impl="auto"):
    """Multi-scale deformable attention core (Deformable-DETR): ops.ms_deform_attn (fused C++/CUDA forward and
    backward; ops.ms_deform_attn_ref is the grid_sample specification).

    value (B, S, nH, Dh) with S = sum(h*w) over `shapes`; locations (B, Lq, nH, nL, nP, 2) xy in [0, 1];
    weights (B, Lq, nH, nL, nP). Bilinear sampling, zeros outside, align_corners=False. Returns (B, Lq, nH*Dh).
    """
    return ops.ms_deform_attn(value, shapes, locations, weights, impl=impl)


def level_sizes(shapes, like):
    """(nL, 2) float (w, h) of each level, on the device of `like`: filled in place from host integers (a
    torch.tensor(..., device=cuda) would be a blocking host-to-device copy in every attention layer)."""
    out = torch.empty(len(shapes), 2, dtype=like.dtype, device=like.device)
    for lvl, (h, w) in enumerate(shapes):
        out[lvl, 0], out[lvl, 1] = w, h
    return out


class MSDeformAttn(nn.Module):
    def __init__(self, dim, n_levels, n_heads, n_points):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)  # layout (head, level, point, xy)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def reset_parameters(self):
        # Deformable-DETR init: zero offset weights, bias = a directional grid (head h points at angle 2*pi*h/nH,
        # point k at distance k+1), uniform attention (zeros), xavier projections.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)  # (nH, 2)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1) * torch.arange(1, self.n_points + 1).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight), nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight), nn.init.zeros_(lin.bias)

    def forward(self, query, reference, value, shapes):
        # query (B, Lq, C); reference (Lq, 2) xy in [0, 1]; value (B, S, C)
        B, Lq, C = query.shape
        nH, nL, nP = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value).view(B, value.shape[1], nH, C // nH)  # (B, S, nH, Dh)
        offsets = self.sampling_offsets(query).view(B, Lq, nH, nL, nP, 2)
        attn = self.attention_weights(query).view(B, Lq, nH, nL * nP).softmax(-1).view(B, Lq, nH, nL, nP)
        normalizer = level_sizes(shapes, query)  # (nL, 2)
        loc = reference[None, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn(v, shapes, loc, attn))  # (B, Lq, C)


class DeformableEncoderLayer(nn.Module):
    def __init__(self, dim, ffn, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, reference, shapes):  # post-norm
        src = self.norm1(src + self.self_attn(src + pos, reference, src, shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableTransformer(nn.Module):
    """MSDeformAttn encoder over the flattened levels (res5, res4, res3)."""

    def __init__(self, dim, ffn, num_layers, n_levels, n_heads, n_points):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(n_levels, dim))  # raw Parameter: key has no `.weight`
        self.encoder = nn.Module()  # a plain container, so the keys read `encoder.layers.{i}` as in the official files
        self.encoder.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, ffn, n_levels, n_heads, n_points) for _ in range(num_layers))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs):  # srcs: list of (B, C, h_l, w_l), low to high resolution
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        dev = srcs[0].device
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, C)
        pos = torch.cat([(position_embedding_sine(h, w, s.shape[1] // 2, dev).flatten(1).t() + self.level_embed[l])
                         for l, ((h, w), s) in enumerate(zip(shapes, srcs))])  # (S, C)
        ref = []
        for h, w in shapes:  # reference points at pixel centres, normalized (valid ratios are 1: no padding mask)
            y, x = torch.meshgrid(torch.arange(h, device=dev) + 0.5, torch.arange(w, device=dev) + 0.5, indexing="ij")
            ref.append(torch.stack([x.flatten() / w, y.flatten() / h], -1))  # (h*w, 2) xy
        ref = torch.cat(ref).to(src.dtype)  # (S, 2)
        for layer in self.encoder.layers:
            src = layer(src, pos[None], ref, shapes)
        return src, shapes


class ConvNorm(nn.Conv2d):
    """Conv2d whose GroupNorm is a child named `norm` (official detectron2 Conv2d keys), optional ReLU."""

    def __init__(self, cin, cout, kernel, groups_norm=32, relu=False):
        super().__init__(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(groups_norm, cout)
        self.relu = relu
        nn.init.kaiming_uniform_(self.weight, a=1)  # c2_xavier_fill

    def forward(self, x):
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class MSDeformAttnPixelDecoder(nn.Module):
    """Sec. 3.1 pixel decoder: MSDeformAttn encoder on res3..res5 + one FPN level on res2 -> mask features (stride 4).

    Input: {"res2".."res5"}; output: (mask_features (B, D, H/4, W/4), [encoder outputs at strides 32, 16, 8]).
    """

    def __init__(self, in_channels, dim=256, enc_layers=6, enc_heads=8, enc_points=4, enc_ffn=1024):
        super().__init__()
        self.input_proj = nn.ModuleList()  # index 0 = res5 (stride 32), 1 = res4, 2 = res3
        for cin in in_channels[1:][::-1]:
            proj = nn.Sequential(nn.Conv2d(cin, dim, 1), nn.GroupNorm(32, dim))
            nn.init.xavier_uniform_(proj[0].weight), nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.transformer = DeformableTransformer(dim, enc_ffn, enc_layers, 3, enc_heads, enc_points)
        self.mask_features = nn.Conv2d(dim, dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1), nn.init.zeros_(self.mask_features.bias)
        self.adapter_1 = ConvNorm(in_channels[0], dim, 1)  # lateral conv on res2
        self.layer_1 = ConvNorm(dim, dim, 3, relu=True)  # output conv

    def forward(self, features):
        with torch.autocast(features["res2"].device.type, enabled=False):  # official: pixel decoder runs in fp32
            srcs = [proj(features[k].float()) for proj, k in zip(self.input_proj, ("res5", "res4", "res3"))]
            y, shapes = self.transformer(srcs)  # (B, S, C)
            B, _, C = y.shape
            outs = [t.transpose(1, 2).reshape(B, C, h, w)  # (B, C, h_l, w_l)
                    for t, (h, w) in zip(y.split([h * w for h, w in shapes], 1), shapes)]
            lateral = self.adapter_1(features["res2"].float())  # (B, C, H/4, W/4)
            up = F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            fpn = self.layer_1(lateral + up)
            return self.mask_features(fpn), outs  # (B, C, H/4, W/4), strides [32, 16, 8]


# ---- transformer decoder ----


class SelfAttentionLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, query_pos):
        q = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, memory, mask, pos, query_pos):
        out = self.multihead_attn(tgt + query_pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        return self.norm(tgt + out)


class FFNLayer(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt):
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    def __init__(self, din, hidden, dout, num_layers):
        super().__init__()
        dims = [din] + [hidden] * (num_layers - 1) + [dout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Sec. 3.1 decoder (Mask2Former): learnable queries, masked cross-attn -> self-attn -> FFN per layer, post-norm.

    Layer i attends to level i % 3 (strides 32, 16, 8); a prediction (class logits + mask logits) is made on the raw
    queries and after every layer, and the previous prediction masks the next cross-attention.
    """

    def __init__(self, num_classes, dim=256, heads=8, ffn=2048, num_layers=9, num_queries=100, class_head=None):
        super().__init__()
        self.heads, self.num_levels = heads, 3
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(dim, heads) for _ in range(num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(dim, heads) for _ in range(num_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(dim, ffn) for _ in range(num_layers))
        for layer in self.modules():
            if isinstance(layer, (SelfAttentionLayer, CrossAttentionLayer, FFNLayer)):
                for p in layer.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)
        self.decoder_norm = nn.LayerNorm(dim)
        self.query_feat = nn.Embedding(num_queries, dim)  # query content
        self.query_embed = nn.Embedding(num_queries, dim)  # query position
        self.level_embed = nn.Embedding(self.num_levels, dim)
        # official: Linear(256, C+1) (no input_proj keys: in_channels == hidden_dim)
        self.class_embed = class_head if class_head is not None else nn.Linear(dim, num_classes + 1)
        self.mask_embed = MLP(dim, dim, dim, 3)

    def predict_heads(self, output, mask_features, target_size):
        x = self.decoder_norm(output)  # (B, Q, C)
        logits = self.class_embed(x)  # (B, Q, C+1)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)  # (B, Q, H/4, W/4)
        # Sec. 3.1 masked attention: attend only where the previous mask has sigmoid >= 0.5 at the next level
        m = F.interpolate(masks, size=target_size, mode="bilinear", align_corners=False)
        m = (m.sigmoid().flatten(2) < 0.5).detach()  # (B, Q, h*w), True = blocked
        m = m.repeat_interleave(self.heads, dim=0)  # (B*nH, Q, h*w), batch-major as nn.MultiheadAttention expects
        return logits, masks, m

    def forward(self, features, mask_features, queries=None):
        # features: 3 x (B, C, h_l, w_l) at strides 32, 16, 8; mask_features (B, C, H/4, W/4); queries (B, Q, C): the
        # backbone's content queries (Rein tokens, issue 19) in place of query_feat
        B = mask_features.shape[0]
        sizes = [f.shape[-2:] for f in features]
        src = [f.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, f in enumerate(features)]  # (B,hw,C)
        pos = [position_embedding_sine(h, w, f.shape[1] // 2, f.device).flatten(1).t()[None]
               for (h, w), f in zip(sizes, features)]  # (1, hw, C)
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)  # (B, Q, C)
        output = self.query_feat.weight[None].expand(B, -1, -1) if queries is None else queries
        logits, masks, attn_mask = self.predict_heads(output, mask_features, sizes[0])
        preds = [(logits, masks)]
        for i in range(len(self.transformer_cross_attention_layers)):
            lvl = i % self.num_levels
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)  # fully blocked query -> attend everywhere
            output = self.transformer_cross_attention_layers[i](output, src[lvl], attn_mask, pos[lvl], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            logits, masks, attn_mask = self.predict_heads(output, mask_features, sizes[(i + 1) % self.num_levels])
            preds.append((logits, masks))
        return {"pred_logits": preds[-1][0], "pred_masks": preds[-1][1],
                "aux_outputs": [{"pred_logits": lg, "pred_masks": mk} for lg, mk in preds[:-1]]}


class CLOUDSHead(nn.Module):
    """`sem_seg_head`: pixel decoder + transformer decoder (the part that trains, and the part the EMA teacher copies)."""

    def __init__(self, cfg, in_channels, class_head=None):
        super().__init__()
        d = cfg.hidden_dim
        self.pixel_decoder = MSDeformAttnPixelDecoder(in_channels, d, cfg.enc_layers, cfg.enc_heads, cfg.enc_points,
                                                      cfg.enc_ffn)
        self.predictor = MultiScaleMaskedTransformerDecoder(cfg.num_classes, d, cfg.dec_heads, cfg.dec_ffn,
                                                            cfg.dec_layers, cfg.num_queries, class_head)

    def forward(self, features):
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.predictor(multi_scale, mask_features, features.get("queries"))


# ---- inference ----


def semantic_inference(pred_logits, pred_masks, size):
    """Sec. 3.1 / §3.4: argmax_c sum_q softmax(class)[q, c] * sigmoid(mask)[q] with no-object dropped.

    pred_logits (B, Q, C+1), pred_masks (B, Q, h, w) logits, size (H, W) -> int64 (B, H, W) (masks upsampled
    bilinearly, align_corners=False). Goes through `ops.masks_to_semantic`.
    """
    return ops.masks_to_semantic(pred_logits, pred_masks, size)


# ---- model ----


class CLOUDS(nn.Module):
    """Frozen CLIP backbone (or a ViT of backbones.py) + Mask2Former head (+ the criterion). Images are RGB 0..255,
    (B, 3, H, W)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "clip":
            self.backbone = CLIPBackbone(cfg.clip_model, cfg.pretrained, cfg.train_backbone, cfg.backbone_bf16)
        else:  # issue 19: a ViT (+ Rein / LoRA); lazy, so the default model copies with ops.py and criterion.py only
            import backbones

            self.backbone = backbones.ViTBackbone(
                cfg.backbone, cfg.pretrained, cfg.tuning, cfg.train_backbone, cfg.backbone_bf16, cfg.num_queries,
                cfg.hidden_dim, cfg.rein_rank, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        class_head = None
        if cfg.classifier == "text":  # paper's classifier; every released config uses the linear one
            emb, syn_cls = text_embeddings(self.backbone.clip_model)
            class_head = TextClassifier(cfg.hidden_dim, emb, syn_cls, cfg.num_classes)
        self.sem_seg_head = CLOUDSHead(cfg, self.backbone.channels, class_head)
        matcher = HungarianMatcher(cfg.class_weight, cfg.mask_weight, cfg.dice_weight, cfg.train_num_points)
        self.criterion = SetCriterion(cfg.num_classes, matcher, cfg.class_weight, cfg.mask_weight, cfg.dice_weight,
                                      cfg.no_object_weight, cfg.train_num_points, cfg.oversample_ratio,
                                      cfg.importance_sample_ratio, cfg.deep_supervision)
        mean, std = getattr(self.backbone, "pixel_mean", PIXEL_MEAN), getattr(self.backbone, "pixel_std", PIXEL_STD)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) RGB 0..255, got {tuple(images.shape)}")
        return (images.to(self.pixel_mean.device).float() - self.pixel_mean) / self.pixel_std

    def features(self, images):
        """Backbone features {"res2".."res5"} of images (B, 3, H, W) 0..255 with H, W multiples of 32."""
        H, W = images.shape[-2:]
        if H % SIZE_DIVISIBILITY or W % SIZE_DIVISIBILITY:
            raise ValueError(f"image size {H}x{W} is not a multiple of {SIZE_DIVISIBILITY}: pad the batch "
                             f"(training crops are 768x768) or use CLOUDS.predict, which pads and crops")
        return self.backbone(self.normalize(images))

    def forward(self, images, head=None):
        """-> {"pred_logits" (B, Q, C+1), "pred_masks" (B, Q, H/4, W/4), "aux_outputs": [9 x same]}.
        `head` (e.g. the EMA teacher's copy of `sem_seg_head`) runs on the shared backbone features."""
        return (self.sem_seg_head if head is None else head)(self.features(images))

    def loss(self, images, targets, generator=None):
        """Dict of weighted loss terms for images (B, 3, H, W) and targets from `targets_from_label`."""
        return self.criterion(self(images), targets, generator)

    @torch.no_grad()
    def predict(self, images, head=None, return_scores=False, backbone_params=None):
        """Semantic prediction at the input size: int64 (B, H, W) (or float scores (B, C, H, W)) for any H, W.

        Normalizes, pads bottom/right to a multiple of 32 with 0 in normalized space (official), upsamples the masks
        to the padded size and crops. The official postprocess crops then resizes to the requested output size; we
        always predict at the input resolution, so the crop is all that is needed. `backbone_params` ({name: tensor}
        of the backbone) replace those parameters for this call: the EMA teacher's copy of a tuned adapter.
        """
        H, W = images.shape[-2:]
        x = self.normalize(images)
        x = F.pad(x, (0, -W % SIZE_DIVISIBILITY, 0, -H % SIZE_DIVISIBILITY))  # (B, 3, H', W')
        feats = self.backbone(x) if backbone_params is None else \
            torch.func.functional_call(self.backbone, backbone_params, (x,))
        out = (self.sem_seg_head if head is None else head)(feats)
        res = ops.masks_to_semantic(out["pred_logits"], out["pred_masks"], tuple(x.shape[-2:]),
                                    return_scores=return_scores)
        return res[..., :H, :W]


# ---- builder ----


def build_model(preset="convnext_large", **overrides):
    """Build CLOUDS from a preset (`convnext_large`, `rn50`, `rn101`, `tiny`) with ModelConfig field overrides.

    `pretrained=None` builds a random-init backbone (tests, parameter counts); a local file path works offline.
    `backbone="dinov2_l"` (backbones.BACKBONES) keeps the preset's head on a ViT; its `pretrained` defaults to the
    registry's Hugging Face repo (read from the cache) instead of the preset's CLIP tag.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    valid = [f.name for f in fields(ModelConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {', '.join(valid)}")
    cfg = {**PRESETS[preset], **overrides}
    if cfg.get("backbone", "clip") != "clip" and "pretrained" not in overrides:
        import backbones  # lazy, as in CLOUDS.__init__

        if cfg["backbone"] not in backbones.BACKBONES:
            raise ValueError(f"unknown backbone {cfg['backbone']!r}; valid: clip, {', '.join(backbones.BACKBONES)}")
        cfg["pretrained"] = backbones.BACKBONES[cfg["backbone"]].hub
    return CLOUDS(ModelConfig(**cfg))


def head_parameter_count(model):
    """Number of parameters of `sem_seg_head` (official: 20,253,908 ConvNeXt-L, 20,499,668 RN50/RN101)."""
    return sum(p.numel() for p in model.sem_seg_head.parameters())

