"""Mask2Former matcher and set criterion (the paper's Sec. 3.1 losses; reference §3.3), as CLOUDS trains them.

The Hungarian matcher assigns queries to target masks per image (cost 2 * class + 5 * BCE + 5 * Dice on 12,544 shared
uniform points); the set criterion sums CE (no-object weight 0.1) and point-sampled BCE + Dice (3x oversampled
candidates, 0.75 importance-sampled) over the final and the auxiliary predictions (9 in the official config).
clouds.py builds both from its ModelConfig (`CLOUDS.criterion`, `CLOUDS.loss`).
Imports no project file: criterion.py can be copied alone.

Usage:
    matcher = HungarianMatcher(num_points=12544)
    criterion = SetCriterion(19, matcher)
    losses = criterion(outputs, [targets_from_label(label)])   # dict of weighted terms; total = sum(losses.values())
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---- point sampling ----


def point_sample(x, coords):
    """Bilinear samples of x (N, C, H, W) at coords (N, P, 2) xy in [0, 1] (align_corners=False, zeros outside)."""
    return F.grid_sample(x, 2 * coords[:, :, None] - 1, align_corners=False).squeeze(3)  # (N, C, P)


def _rand(shape, generator, device, dtype):
    """Uniform [0, 1) draws, reproducible through a CPU or device `generator` (float32 draw, then cast)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device=device, dtype=dtype)


def sample_uncertain_points(logits, num_points, oversample_ratio, importance_ratio, generator=None):
    """Point coords (N, P, 2) for logits (N, 1, h, w): the int(importance_ratio*P) most uncertain (-|logit|) of
    int(oversample_ratio*P) random candidates, plus P - that many uniform points (draw order: candidates, then rest)."""
    N = logits.shape[0]
    n_unc = int(importance_ratio * num_points)
    cand = _rand((N, int(num_points * oversample_ratio), 2), generator, logits.device, logits.dtype)
    uncertainty = -point_sample(logits, cand)[:, 0].abs()  # (N, n_cand)
    idx = uncertainty.topk(n_unc, dim=1).indices  # (N, n_unc)
    pts = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))  # (N, n_unc, 2)
    rest = _rand((N, num_points - n_unc, 2), generator, logits.device, logits.dtype)
    return torch.cat([pts, rest], dim=1)  # (N, P, 2)


def _sample_valid(valid, coords):
    """Binary weights (N, P): 1 where the point falls inside `valid` (H, W) bool."""
    v = point_sample(valid[None, None].to(coords), coords.reshape(1, -1, 2))  # (1, 1, N*P)
    return (v.view(coords.shape[:2]) > 0.5).to(coords.dtype)


# ---- targets ----


def targets_from_label(label, num_classes=19, ignore_index=255):
    """Semantic label map (H, W) int -> {"labels" int64 (K,), "masks" bool (K, H, W)}, one mask per present class.

    Pixels labelled `ignore_index` are in no mask (negatives for every matched mask, as in the official code).
    """
    return targets_from_labels([torch.as_tensor(label)], num_classes, ignore_index)[0]


def targets_from_labels(labels, num_classes=19, ignore_index=255) -> list:
    """targets_from_label of each label map (H, W) in `labels` (tensors on one device), with ONE device-to-host
    transfer for all of them (which classes each map holds) and one asynchronous copy back, instead of a `unique`
    per map: the class lists decide the target shapes, so the host must see them once."""
    if not labels:
        return []
    device = labels[0].device
    C = num_classes
    present = torch.zeros(len(labels), C + 2, dtype=torch.bool, device=device)  # classes, ignore, invalid values
    for b, label in enumerate(labels):
        lab = label.reshape(-1).long()
        bins = torch.where((lab >= 0) & (lab < C), lab, torch.where(lab == ignore_index, C, C + 1))
        present[b].scatter_(0, bins, True)
    present = present.cpu()  # the one synchronization
    for label, p in zip(labels, present):
        if p[C + 1]:
            found = torch.unique(label.cpu().long())
            raise ValueError(f"label values must be in [0, {C - 1}] or {ignore_index}, found "
                             f"{found[found != ignore_index].tolist()}")
    classes = [torch.nonzero(p[:C]).flatten() for p in present]  # host
    flat, out, start = torch.cat(classes).to(device, non_blocking=True), [], 0
    for label, c in zip(labels, classes):
        cls = flat[start:start + len(c)]
        start += len(c)
        out.append({"labels": cls, "masks": label[None] == cls[:, None, None]})
    return out


# ---- matcher ----


class HungarianMatcher:
    """One-to-one query/target assignment per image (Sec. 3.1; Mask2Former matcher).

    Cost = 2 * (-p(class)) + 5 * BCE + 5 * Dice, the mask terms on `num_points` uniform random points shared by all
    masks of the image (one (1, P, 2) draw per image that has targets, in image order); solved with scipy's
    linear_sum_assignment. Returns per image (query indices, target indices), int64. Points outside a target's
    optional `valid` map are left out of the mask costs (our addition for refine's uncovered="ignore"; not official).
    """

    def __init__(self, cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=12544):
        self.cost_class, self.cost_mask, self.cost_dice, self.num_points = cost_class, cost_mask, cost_dice, num_points

    @torch.no_grad()
    def __call__(self, outputs, targets, generator=None):
        """Per image (query indices, target indices), int64 on the predictions' device. The cost matrices of all
        images go to the host in ONE transfer (scipy solves them there); the indices come back in one asynchronous
        copy."""
        from scipy.optimize import linear_sum_assignment

        costs, shapes = [], []
        for b, t in enumerate(targets):
            K = len(t["labels"])
            if K == 0:
                shapes.append((0, 0))
                continue
            dtype = torch.float64 if outputs["pred_masks"].dtype == torch.float64 else torch.float32  # no autocast
            logits, pred = outputs["pred_logits"][b].to(dtype), outputs["pred_masks"][b].to(dtype)  # (Q,C+1),(Q,h,w)
            Q = pred.shape[0]
            cost_class = -logits.softmax(-1)[:, t["labels"]]  # (Q, K)
            coords = _rand((1, self.num_points, 2), generator, pred.device, dtype)
            tgt = point_sample(t["masks"][:, None].to(pred), coords.expand(K, -1, -1))[:, 0]  # (K, P)
            x = point_sample(pred[:, None], coords.expand(Q, -1, -1))[:, 0]  # (Q, P)
            w = _sample_valid(t["valid"], coords)[0] if "valid" in t else torch.ones_like(coords[0, :, 0])  # (P,)
            tgt = tgt * w
            pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none") * w  # (Q, P)
            neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * w
            cost_mask = (pos @ tgt.t() + neg @ (w - tgt).t()) / w.sum().clamp(min=1)  # (Q, K)
            p = x.sigmoid() * w
            cost_dice = 1 - (2 * p @ tgt.t() + 1) / (p.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)  # (Q, K)
            C = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            costs.append(C.reshape(-1))
            shapes.append((Q, K))
        device = outputs["pred_masks"].device
        host = torch.cat(costs).cpu().numpy() if costs else None  # the one synchronization
        pairs, start = [], 0
        for Q, K in shapes:
            q, k = linear_sum_assignment(host[start:start + Q * K].reshape(Q, K)) if K else ((), ())
            pairs.append((q, k))
            start += Q * K
        if not pairs:
            return []
        flat = torch.as_tensor(np.concatenate([np.concatenate([q, k]) for q, k in pairs]).astype(np.int64))
        flat = flat.to(device, non_blocking=True)  # asynchronous: the indices stay on the device from here on
        indices, start = [], 0
        for q, _ in pairs:
            n = len(q)
            indices.append((flat[start:start + n], flat[start + n:start + 2 * n]))
            start += 2 * n
        return indices


# ---- criterion ----


class SetCriterion(nn.Module):
    """Mask2Former set loss (Sec. 3.1): CE over all queries (no-object weight 0.1) + point-sampled BCE and Dice on
    matched pairs, normalized by the number of target masks, summed over the final and all auxiliary predictions.

    Returns a dict of WEIGHTED terms (`loss_ce`, `loss_mask`, `loss_dice`, and `_{i}` suffixed aux terms); their sum
    is the training loss. A target may carry `valid` (H, W) bool: mask points outside it are left out (our addition,
    not official: without `valid` every pixel outside the target masks is a negative, ignore pixels included).
    """

    def __init__(self, num_classes, matcher, class_weight=2.0, mask_weight=5.0, dice_weight=5.0, eos_coef=0.1,
                 num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75, deep_supervision=True):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.num_points, self.oversample_ratio, self.importance = num_points, oversample_ratio, importance_sample_ratio
        self.deep_supervision = deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)  # official key `criterion.empty_weight`

    def loss_labels(self, outputs, targets, indices):
        logits = outputs["pred_logits"]  # (B, Q, C+1)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        for b, ((q, k), t) in enumerate(zip(indices, targets)):
            target_classes[b, q.to(logits.device)] = t["labels"][k.to(t["labels"].device)].to(logits.device)
        # weighted mean over all B*Q queries (unmatched -> no-object)
        return F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))

    def loss_masks(self, outputs, targets, indices, num_masks, generator=None):
        pred = outputs["pred_masks"]  # (B, Q, h, w)
        b_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(pred.device)
        q_idx = torch.cat([q for q, _ in indices]).to(pred.device)
        src = pred[b_idx, q_idx][:, None]  # (N, 1, h, w)
        if len(src) == 0:
            zero = pred.sum() * 0.0
            return zero, zero
        with torch.no_grad():
            coords = sample_uncertain_points(src, self.num_points, self.oversample_ratio, self.importance, generator)
            labels, weights, start = [], [], 0
            for (_, k), t in zip(indices, targets):
                c = coords[start:start + len(k)]  # (n, P, 2)
                start += len(k)
                if len(k) == 0:
                    continue
                masks = t["masks"][k.to(t["masks"].device)].to(device=pred.device, dtype=pred.dtype)  # (n, H, W)
                labels.append(point_sample(masks[:, None], c)[:, 0])  # (n, P) soft at boundaries
                weights.append(_sample_valid(t["valid"], c) if "valid" in t else torch.ones_like(labels[-1]))
            labels, weights = torch.cat(labels), torch.cat(weights)  # (N, P)
        x = point_sample(src, coords)[:, 0]  # (N, P)
        bce = F.binary_cross_entropy_with_logits(x, labels, reduction="none")
        loss_mask = ((bce * weights).sum(1) / weights.sum(1).clamp(min=1)).sum() / num_masks
        p, t = x.sigmoid() * weights, labels * weights
        loss_dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum() / num_masks
        return loss_mask, loss_dice

    def forward(self, outputs, targets, generator=None):
        # num_masks: total target masks (known on the host), averaged over ranks, clamped >= 1; with several ranks
        # a device tensor filled in place (no host copy) and all-reduced without waiting for it
        num_masks = float(sum(len(t["labels"]) for t in targets))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            total = torch.full((), num_masks, device=outputs["pred_logits"].device)
            torch.distributed.all_reduce(total)
            num_masks = (total / torch.distributed.get_world_size()).clamp(min=1)
        else:
            num_masks = max(num_masks, 1.0)
        preds = [("", outputs)]
        if self.deep_supervision:
            preds += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        losses = {}
        for suffix, out in preds:
            indices = self.matcher(out, targets, generator)
            loss_mask, loss_dice = self.loss_masks(out, targets, indices, num_masks, generator)
            terms = {"loss_ce": self.loss_labels(out, targets, indices), "loss_mask": loss_mask, "loss_dice": loss_dice}
            losses.update({name + suffix: self.weights[name] * v for name, v in terms.items()})
        return losses

