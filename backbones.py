"""ViT backbones for the CLOUDS head (beyond the paper, issue 19): DINOv2-L and EVA02-L from timm, frozen or tuned with
a Rein-style adapter or LoRA, giving the four feature maps (strides 4/8/16/32) the Mask2Former head of clouds.py reads.

CLOUDS itself only uses a frozen CLIP ConvNeXt (clouds.CLIPBackbone, still the default). The strongest single-source
GTA -> Cityscapes/BDD/Mapillary results since then come from vision foundation models with parameter-efficient tuning
(Rein 64.3 avg, SoMA, RecycleLoRA: DINOv2-L). This file puts those backbones under the same head and training recipe.

- The ViT runs at patch 16 (its 14x14 patch embedding is resampled to 16x16 when the weights load: timm's FlexiViT
  pseudo-inverse resize; position embeddings are stored at 512/16 and interpolated to any input size), so the block
  outputs sit at stride 16. The outputs of blocks 7/11/15/23 (0-based, ViT-L) are resized x4/x2/x1/x0.5 (bilinear,
  no parameters) to res2..res5 at strides 4/8/16/32.
- Rein-style adapter (`Rein`, written here from the Rein paper's description): after every block, the patch tokens
  (class and register tokens excluded) attend to that layer's learnable low-rank tokens T_i = A_i B_i (m tokens);
  two linear maps shared across the layers and a learnable scale turn the attention into a residual update. The tokens
  also make the decoder's m queries. ViT-L, m = 100, rank 16: 2,990,081 trainable parameters (`rein_parameter_count`).
- LoRA (`LoRALinear`): W x + (alpha / r) B A x on the qkv projections (optionally also attn.proj and the MLP).
- Tuning `frozen`: no gradient into the ViT (official CLOUDS treatment of its backbone).

Only clouds.py imports this file, inside CLOUDS.__init__ when `ModelConfig.backbone` is not "clip"; it needs timm
(installed with open_clip_torch) and nothing of the project.

Usage:
    model = clouds.build_model("convnext_large", backbone="dinov2_l", tuning="rein")   # weights from the HF cache
    python backbones.py --count                          # trainable / total backbone parameters (meta device)
"""
import argparse
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ---- registry ----

PATCH = 16  # Rein: patch 14 converted to 16, so that the block outputs sit at stride 16 (H, W multiples of 32)
IMG_SIZE = 512  # grid of the stored position embeddings (512 / 16 = 32; Rein's crop); resampled to each input
TUNINGS = ("frozen", "rein", "lora")
LORA_TARGETS = ("qkv", "attn", "all")  # qkv projections | + attn.proj | every Linear of the blocks (+ MLP)


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: a timm architecture (+ pretrained tag) and where its weights live."""
    timm_name: str                     # timm model name with its pretrained tag
    hub: str | None                    # Hugging Face repo of the weights (None: random init only, tests)
    files: tuple = ("model.safetensors", "pytorch_model.bin")  # the repo's weight files (preferred first)
    layers: tuple = (7, 11, 15, 23)    # blocks whose outputs become res2..res5 (Rein, ViT-L)
    kwargs: dict = field(default_factory=dict)  # timm overrides (tiny test configurations)
    what: str = ""


_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TINY = dict(embed_dim=32, depth=4, num_heads=2)  # random-init test configurations of the same timm classes
BACKBONES = {
    "dinov2_l": BackboneSpec("vit_large_patch14_dinov2.lvd142m", "timm/vit_large_patch14_dinov2.lvd142m",
                             what="DINOv2 ViT-L/14 (LVD-142M)"),
    "dinov2_l_reg4": BackboneSpec("vit_large_patch14_reg4_dinov2.lvd142m",
                                  "timm/vit_large_patch14_reg4_dinov2.lvd142m",
                                  what="DINOv2 ViT-L/14 with 4 registers (LVD-142M)"),
    "eva02_l": BackboneSpec("eva02_large_patch14_224.mim_m38m", "timm/eva02_large_patch14_224.mim_m38m",
                            what="EVA02-L/14 MIM (Merged-38M)"),
    # the image tower of open_clip EVA02-L-14-336 / merged2b_s6b_b61k, read from open_clip's own file (timm strips its
    # `visual.trunk.` prefix); the text tower is not built
    "eva02_l_clip": BackboneSpec("eva02_large_patch14_clip_336.merged2b",
                                 "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k", _OPEN_CLIP_FILES,
                                 what="EVA02-CLIP-L/14-336 image tower (open_clip merged2b_s6b_b61k)"),
    "dinov2_tiny": BackboneSpec("vit_large_patch14_dinov2.lvd142m", None, layers=(0, 1, 2, 3), kwargs=_TINY,
                                what="tiny random-init DINOv2-class ViT (tests)"),
    "dinov2_tiny_reg4": BackboneSpec("vit_large_patch14_reg4_dinov2.lvd142m", None, layers=(0, 1, 2, 3),
                                     kwargs=_TINY, what="tiny random-init DINOv2-class ViT with 4 registers (tests)"),
    "eva02_tiny": BackboneSpec("eva02_large_patch14_224.mim_m38m", None, layers=(0, 1, 2, 3), kwargs=_TINY,
                               what="tiny random-init EVA02-class ViT (tests)"),
}


_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def weights_source(pretrained) -> str:
    """How `pretrained` names the weights: "none" (random init), "file" (a local path), "hub" (a Hugging Face repo
    id such as timm/vit_large_patch14_dinov2.lvd142m) or "invalid" (e.g. a bare open_clip tag)."""
    if pretrained is None:
        return "none"
    if Path(pretrained).suffix in _WEIGHT_SUFFIXES or Path(pretrained).exists():
        return "file"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", pretrained):
        return "hub"
    return "file" if os.sep in pretrained else "invalid"


def download_hint(name, spec=None) -> str:
    """The command that fetches a backbone's weights into the Hugging Face cache, and the local-file alternative."""
    spec = spec or BACKBONES[name]
    return (f"on a machine with internet run\n  hf download {spec.hub} {spec.files[0]}\n(set HF_HOME to share the "
            f"cache), or pass --backbone-weights /path/{spec.files[0]}")


def create_vit(name, pretrained):
    """The timm model of registry entry `name` at patch 16 with dynamic input size, no classifier.

    pretrained: None (random init), a local weights file (timm's own file or open_clip's), or a Hugging Face repo id
    (read through the hub cache; HF_HUB_OFFLINE=1 never downloads). timm's checkpoint filter resamples the 14x14
    patch embedding to 16x16 and the position embeddings to the 32x32 grid.
    """
    try:
        import timm
    except ImportError as e:
        raise ImportError("backbones.py needs timm: pip install timm (open_clip_torch installs it)") from e
    spec = BACKBONES[name]
    kwargs = dict(num_classes=0, patch_size=PATCH, img_size=IMG_SIZE, dynamic_img_size=True, **spec.kwargs)
    if pretrained is None:
        return timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    source = weights_source(pretrained)
    if source == "file":
        if not Path(pretrained).is_file():
            raise RuntimeError(f"weights file for backbone '{name}' not found: {pretrained}")
        overlay = dict(file=str(pretrained))
    elif source == "hub":
        overlay = dict(hf_hub_id=pretrained, hf_hub_filename=spec.files[-1])  # timm tries the .safetensors twin first
    else:
        raise ValueError(f"pretrained={pretrained!r} for backbone '{name}': expected None (random init), a local "
                         f"weights file, or a Hugging Face repo id such as {spec.hub or 'timm/<model>'}")
    try:
        return timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, OSError, ValueError) as e:  # OSError: hub cache misses (LocalEntryNotFoundError)
        where = f"file {pretrained}" if "file" in overlay else f"Hugging Face repo '{pretrained}'"
        raise RuntimeError(f"Could not load the {spec.what or name} weights of backbone '{name}' from {where} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without internet, "
                           + download_hint(name, spec)) from e


# ---- Rein-style adapter ----


class Rein(nn.Module):
    """Rein-style refinement of every block's patch tokens (Rein, CVPR 2024; written here from the paper's description).

    Layer i owns m learnable tokens of rank r, T_i = A_i B_i (A_i (m, r), B_i (r, C)). Patch features F (N, C) of
    block i's output (class/register tokens excluded) attend to them and receive a residual update:
        S = softmax_m(F T_i^T / sqrt(C))                    (N, m) feature-to-token similarity
        dF = f_out(S f_tok(T_i) + F)                        (N, C) f_tok, f_out: Linear(C, C) shared by all layers
        F <- F + scale * dF                                 scale: one learnable scalar
    f_out starts at zero, so a fresh adapter returns the frozen features exactly (like LoRA's B = 0).
    Queries for the decoder: Q_i = f_q(T_i) (m, D) per layer, Q = f_merge([Q_last, max_i Q_i, mean_i Q_i]) (m, D).
    Parameters (rein_parameter_count): L m r + L r C + 1 + 2 (C^2 + C) + (C D + D) + (3 D^2 + D).
    """

    def __init__(self, dim, depth, num_tokens=100, rank=16, query_dim=256):
        super().__init__()
        self.dim = dim
        self.tokens_a = nn.Parameter(torch.empty(depth, num_tokens, rank))  # A_i
        self.tokens_b = nn.Parameter(torch.empty(depth, rank, dim))  # B_i
        for a, b in zip(self.tokens_a, self.tokens_b):
            nn.init.xavier_uniform_(a), nn.init.xavier_uniform_(b)
        self.token_proj = nn.Linear(dim, dim)  # f_tok: tokens -> feature updates
        self.out_proj = nn.Linear(dim, dim)  # f_out, zero: the adapter starts as the identity
        nn.init.zeros_(self.out_proj.weight), nn.init.zeros_(self.out_proj.bias)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.query_proj = nn.Linear(dim, query_dim)  # f_q: tokens -> decoder queries
        self.query_merge = nn.Linear(3 * query_dim, query_dim)  # f_merge over (last, max, mean)

    def tokens(self, layer):
        return self.tokens_a[layer] @ self.tokens_b[layer]  # (m, C)

    def forward(self, x, layer, skip):
        """x (B, skip + N, C) block output -> same shape, the N patch tokens refined, the `skip` prefix untouched."""
        f = x[:, skip:]  # (B, N, C)
        t = self.tokens(layer)  # (m, C)
        attn = torch.softmax(f @ t.t() / math.sqrt(self.dim), dim=-1)  # (B, N, m)
        delta = self.out_proj(attn @ self.token_proj(t) + f)  # (B, N, C)
        return torch.cat([x[:, :skip], f + self.scale * delta], dim=1)

    def queries(self):
        """The decoder's content queries (m, D) from all layers' tokens."""
        q = self.query_proj(self.tokens_a @ self.tokens_b)  # (L, m, D)
        return self.query_merge(torch.cat([q[-1], q.amax(0), q.mean(0)], dim=-1))  # (m, D)


def rein_parameter_count(dim=1024, depth=24, num_tokens=100, rank=16, query_dim=256) -> int:
    """Closed form of Rein's trainable parameters (ViT-L defaults: 2,990,081):
    A 24*100*16 = 38,400; B 24*16*1024 = 393,216; scale 1; f_tok and f_out 2*(1024^2 + 1024) = 2,099,200;
    f_q 1024*256 + 256 = 262,400; f_merge 768*256 + 256 = 196,864."""
    return (depth * num_tokens * rank + depth * rank * dim + 1 + 2 * (dim * dim + dim)
            + (dim * query_dim + query_dim) + (3 * query_dim * query_dim + query_dim))


# ---- LoRA ----


class LoRALinear(nn.Linear):
    """y = W x + b + (alpha / r) B (A x) with W, b frozen (the wrapped Linear's own tensors: state-dict keys unchanged)
    and A (r, in) Kaiming-uniform, B (out, r) zero, so a fresh LoRA returns the frozen outputs exactly (LoRA paper)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.lora_a = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_b = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling


def add_lora(vit, rank, alpha, targets="qkv") -> list:
    """Replace the target Linears of every block by LoRALinear; returns their module names."""
    if targets not in LORA_TARGETS:
        raise ValueError(f"lora_targets must be one of {', '.join(LORA_TARGETS)}, got {targets!r}")
    qkv = ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj")
    chosen = {"qkv": qkv, "attn": qkv + ("attn.proj",)}.get(targets)
    names = []
    for i, blk in enumerate(vit.blocks):
        attn = blk.attn
        if getattr(attn, "qkv", None) is not None and getattr(attn, "q_bias", None) is not None:
            # timm's fused qkv with separate q/v biases calls F.linear on qkv.weight, bypassing the module
            raise ValueError("LoRA cannot wrap a fused qkv with separate q/v biases (timm EVA qkv_fused=True)")
        for name, module in list(blk.named_modules()):
            if isinstance(module, nn.Linear) and (chosen is None or name in chosen):
                parent, _, leaf = name.rpartition(".")
                setattr(blk.get_submodule(parent) if parent else blk, leaf, LoRALinear(module, rank, alpha))
                names.append(f"blocks.{i}.{name}")
    return names


# ---- backbone ----


class ViTBackbone(nn.Module):
    """Multi-scale features {"res2".."res5"} (strides 4/8/16/32, C channels each) of a timm ViT, plus "queries"
    (B, m, D) with the Rein adapter. Input: normalized (B, 3, H, W), H and W multiples of 32.

    tuning: "frozen" (no gradient into the ViT), "rein" or "lora" (only the adapter trains; the ViT stays in eval
    mode). trainable=True (`--train-backbone`) trains every ViT weight instead (random-init tests).
    """

    def __init__(self, name, pretrained=None, tuning="frozen", trainable=False, bf16=False, num_queries=100,
                 query_dim=256, rein_rank=16, lora_rank=16, lora_alpha=16.0, lora_targets="qkv"):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
        if tuning not in TUNINGS:
            raise ValueError(f"unknown tuning {tuning!r}; valid: {', '.join(TUNINGS)}")
        spec = BACKBONES[name]
        self.vit = create_vit(name, pretrained)
        self.eva = type(self.vit).__name__ == "Eva"  # blocks take the rotary embedding
        self.tuning, self.trainable, self.bf16 = tuning, trainable, bf16
        self.layers = tuple(spec.layers)
        depth, dim = len(self.vit.blocks), self.vit.embed_dim
        if max(self.layers) >= depth:
            raise ValueError(f"backbone '{name}' has {depth} blocks; feature layers {self.layers} do not exist")
        self.prefix = self.vit.num_prefix_tokens  # class (+ register) tokens: never refined, never in the maps
        self.channels = [dim] * 4
        cfg = self.vit.pretrained_cfg
        self.pixel_mean = tuple(255 * m for m in cfg["mean"])  # the ViT's own normalization (RGB, 0-255)
        self.pixel_std = tuple(255 * s for s in cfg["std"])
        self.vit.requires_grad_(trainable)
        self.rein = Rein(dim, self.layers[-1] + 1, num_queries, rein_rank, query_dim) if tuning == "rein" else None
        self.lora = add_lora(self.vit, lora_rank, lora_alpha, lora_targets) if tuning == "lora" else []
        if not trainable:
            self.vit.eval()

    def adapter_names(self) -> list:
        """State-dict keys of the adapter (Rein or LoRA tensors): what trains and what a checkpoint must hold."""
        return [n for n, _ in self.named_parameters() if n.startswith("rein.") or n.endswith((".lora_a", ".lora_b"))]

    def train(self, mode=True):
        super().train(mode)
        if not self.trainable:
            self.vit.eval()  # frozen weights run in eval mode (no drop path), as the frozen CLIP does
        return self

    def freeze(self):
        """From now on the ViT's weights are frozen (the joint phase after a warmup that trained them)."""
        self.trainable = False
        self.vit.requires_grad_(False)
        return self.train(self.training)

    def forward(self, x):
        B, _, H, W = x.shape
        tunes = self.trainable or self.tuning != "frozen"
        with torch.set_grad_enabled(tunes and torch.is_grad_enabled()), \
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            v = self.vit
            h = v.patch_embed(x)  # (B, H/16, W/16, C): dynamic_img_size gives NHWC
            gh, gw = h.shape[1:3]
            if self.eva:
                h, rope = v._pos_embed(h)  # (B, prefix + N, C), rotary embedding of the grid
            else:
                h, rope = v.patch_drop(v._pos_embed(h)), None
            h = v.norm_pre(h)
            maps = []
            for i, blk in enumerate(v.blocks[:self.layers[-1] + 1]):
                h = blk(h, rope=rope) if self.eva else blk(h)
                if self.rein is not None:
                    h = self.rein(h, i, self.prefix)
                if i in self.layers:
                    maps.append(h[:, self.prefix:].transpose(1, 2).reshape(B, -1, gh, gw))  # (B, C, H/16, W/16)
            queries = self.rein.queries() if self.rein is not None else None
        # Rein: strides 16 -> 4, 8, 16, 32 by resizing x4, x2, x1, x0.5 (bilinear; x0.5 = the 2x2 mean)
        feats = {f"res{i + 2}": F.interpolate(m.float(), size=(H // s, W // s), mode="bilinear", align_corners=False)
                 for i, (m, s) in enumerate(zip(maps, (4, 8, 16, 32)))}  # (B, C, H/s, W/s)
        if queries is not None:
            feats["queries"] = queries.float()[None].expand(B, -1, -1)  # (B, m, D)
        return feats


# ---- parameter counts ----


def count_parameters(name, tuning="frozen", device="meta", **kwargs) -> dict:
    """{"total", "trainable", "adapter"} parameter counts of a backbone (built on the meta device: no memory, no
    weights). kwargs go to ViTBackbone (rein_rank, lora_rank, lora_targets, num_queries, query_dim)."""
    with torch.device(device):
        bb = ViTBackbone(name, None, tuning, **kwargs)
    adapter = set(bb.adapter_names())
    trainable = sum(p.numel() for n, p in bb.named_parameters() if n in adapter or p.requires_grad)
    return {"total": sum(p.numel() for p in bb.parameters()), "trainable": trainable,
            "adapter": sum(p.numel() for n, p in bb.named_parameters() if n in adapter)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="ViT backbones of clouds.py: registry and parameter counts")
    parser.add_argument("--count", action="store_true", help="print trainable / total parameters per backbone x "
                                                             "tuning (meta device, no weights needed)")
    parser.add_argument("--backbones", nargs="+", default=["dinov2_l", "dinov2_l_reg4", "eva02_l", "eva02_l_clip"],
                        choices=list(BACKBONES))
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-targets", default="qkv", choices=LORA_TARGETS)
    args = parser.parse_args(argv)
    if not args.count:
        for name, spec in BACKBONES.items():
            print(f"{name:18s} {spec.what} (timm {spec.timm_name}; weights {spec.hub or 'random init'})")
        return {}
    out = {}
    print(f"| backbone | tuning | backbone total | trainable |\n|---|---|---:|---:|")
    for name in args.backbones:
        for tuning in TUNINGS:
            c = count_parameters(name, tuning, lora_rank=args.lora_rank, lora_targets=args.lora_targets)
            out[(name, tuning)] = c
            print(f"| {name} | {tuning} | {c['total']:,} | {c['trainable']:,} |")
    return out


if __name__ == "__main__":
    main()
