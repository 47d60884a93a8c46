"""Semantic-correspondence metrics (SFNet, sec. 4): PCK on PF-PASCAL, keypoint transfer by a flow, LT-ACC and IoU.

Conventions:

* keypoints are ``(..., K, 2)`` arrays ``(x, y)`` in pixels, x right, y down, the centre of pixel ``(row i, col j)``
  at ``(j, i)`` (so a W-wide image spans x in [0, W-1] - ``grid_sample(align_corners=True)``'s convention);
  a keypoint is valid where ``valid`` is true (default: where both coordinates are finite and not the -1 padding
  of PF-PASCAL loaders, i.e. both >= 0);
* **PCK** (PF-PASCAL convention, Ham et al. / NCNet / WeakAlign): keypoint k of pair n is correct when
  ``||pred - gt||_2 <= alpha * max(h, w)``, where ``(h, w)`` is either the image size (``normaliser="image"``)
  or the object box (``normaliser="bbox"``); with ``normaliser="bbox"`` and no ``bbox`` given, the box is the
  tight box of the pair's valid ground-truth keypoints (the PF-PASCAL test_pairs.csv protocol: ``L_pck =
  max(max(x) - min(x), max(y) - min(y))`` of the target keypoints). PCK of a pair = correct / valid keypoints;
  the reported PCK is the mean over pairs with at least one valid keypoint (``reduction="none"`` gives the pairs);
* **flows** are ``(2, H, W)`` (or ``(N, 2, H, W)``) displacement fields in pixels, channel 0 = dx, channel 1 = dy,
  defined on the grid of the image the points come from: :func:`transfer_keypoints` maps a point ``p`` of image
  A to ``p + flow(p)`` in image B, so to transfer source keypoints to the target pass the source->target flow
  sampled on the source grid. The flow is sampled bilinearly at sub-pixel positions, border values outside;
* **label transfer** (SIFT-flow / Proposal-Flow protocol used by SFNet): a target-grid label map is obtained by
  :func:`warp_labels` (backward warping, nearest neighbour: the label at ``p`` is the source label at
  ``p + flow(p)`` with the target->source flow on the target grid); ``lt_acc`` is the fraction of valid pixels
  whose transferred label equals the ground truth, ``mask_iou_transfer`` the IoU of the transferred foreground
  (non-zero) with the ground-truth foreground (1 when both are empty). Both are per pair, then averaged.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as tF

__all__ = [
    "pck",
    "transfer_keypoints",
    "warp_labels",
    "lt_acc",
    "mask_iou_transfer",
    "stack_pair_keypoints",
]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _default_valid(kps: np.ndarray) -> np.ndarray:
    return np.all(np.isfinite(kps) & (kps >= 0), axis=-1)


def pck(
    pred_kps: Any,
    gt_kps: Any,
    alpha: float = 0.1,
    normaliser: str = "bbox",
    image_size: Any = None,
    bbox: Any = None,
    valid: Any = None,
    reduction: str = "mean",
) -> float | np.ndarray:
    """Percentage of correct keypoints of ``(N, K, 2)`` predictions against ``(N, K, 2)`` ground truths.

    ``normaliser="image"``: ``image_size`` is ``(h, w)`` or ``(N, 2)`` rows ``(h, w)`` of the image the ground
    truth lives in. ``normaliser="bbox"``: ``bbox`` is ``[x, y, w, h]`` or ``(N, 4)`` (the project's box layout);
    ``None`` uses the tight box of each pair's valid ground-truth keypoints. ``valid`` is ``(N, K)`` bool.
    ``reduction``: ``"mean"`` (float over pairs with a valid keypoint; nan if none), ``"none"`` (``(N,)`` per-pair
    PCK, nan for pairs without a valid keypoint) or ``"sum"`` (pooled: correct / valid keypoints over all pairs).
    """
    pred = _np(pred_kps).astype(np.float64)
    gt = _np(gt_kps).astype(np.float64)
    if pred.ndim == 2:
        pred, gt = pred[None], gt[None]
    if pred.shape != gt.shape or pred.shape[-1] != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be (N, K, 2)")
    n = gt.shape[0]
    val = _default_valid(gt) if valid is None else _np(valid).astype(bool).reshape(n, -1)
    if val.shape != gt.shape[:2]:
        raise ValueError(f"valid has shape {val.shape}, expected {gt.shape[:2]}")
    if normaliser == "image":
        if image_size is None:
            raise ValueError('normaliser="image" needs image_size (h, w)')
        hw = np.broadcast_to(_np(image_size).astype(np.float64).reshape(-1, 2), (n, 2))
        ref = hw.max(axis=1)
    elif normaliser == "bbox":
        if bbox is not None:
            box = np.broadcast_to(_np(bbox).astype(np.float64).reshape(-1, 4), (n, 4))
            ref = np.maximum(box[:, 2], box[:, 3])
        else:
            hi = np.where(val[..., None], gt, -np.inf).max(axis=1)  # (N, 2)
            lo = np.where(val[..., None], gt, np.inf).min(axis=1)
            ext = np.where(np.isfinite(hi) & np.isfinite(lo), hi - lo, 0.0)  # (w, h) of the keypoint box
            ref = ext.max(axis=1)
    else:
        raise ValueError(f'normaliser must be "image" or "bbox", got {normaliser!r}')
    dist = np.linalg.norm(pred - gt, axis=-1)  # (N, K)
    correct = (dist <= alpha * ref[:, None]) & val
    n_valid = val.sum(axis=1)
    if reduction == "sum":
        tot = n_valid.sum()
        return float(correct.sum() / tot) if tot else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        per_pair = np.where(n_valid > 0, correct.sum(axis=1) / np.maximum(n_valid, 1), np.nan)
    if reduction == "none":
        return per_pair
    if reduction != "mean":
        raise ValueError(f"reduction must be mean, none or sum, got {reduction!r}")
    ok = n_valid > 0
    return float(per_pair[ok].mean()) if ok.any() else float("nan")


def _sample(field: torch.Tensor, xy: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample ``(N, C, H, W)`` at pixel positions ``(N, K, 2)`` -> ``(N, K, C)`` (align_corners=True, border)."""
    h, w = field.shape[-2:]
    gx = 2.0 * xy[..., 0] / max(w - 1, 1) - 1.0
    gy = 2.0 * xy[..., 1] / max(h - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1)[:, :, None, :]  # (N, K, 1, 2)
    out = tF.grid_sample(field, grid.to(field.dtype), mode=mode, padding_mode="border", align_corners=True)
    return out[..., 0].transpose(1, 2)


def transfer_keypoints(flow: Any, kps: Any) -> Any:
    """Move keypoints by a flow: ``kps + flow(kps)``, the flow sampled bilinearly at each (sub-pixel) keypoint.

    ``flow`` ``(2, H, W)`` with ``kps`` ``(K, 2)``, or batched ``(N, 2, H, W)`` with ``(N, K, 2)``; the flow lives on
    the grid of the keypoints' image (see the module doc). Returns the type of ``kps`` (numpy or torch;
    differentiable through torch inputs).
    """
    is_torch = isinstance(kps, torch.Tensor)
    f = flow if isinstance(flow, torch.Tensor) else torch.as_tensor(np.asarray(flow, dtype=np.float64))
    p = kps if is_torch else torch.as_tensor(np.asarray(kps, dtype=np.float64))
    single = f.ndim == 3
    if single:
        f, p = f[None], p[None]
    if f.ndim != 4 or f.shape[1] != 2 or p.ndim != 3 or p.shape[-1] != 2 or p.shape[0] != f.shape[0]:
        raise ValueError(f"flow (N, 2, H, W) / kps (N, K, 2) expected, got {tuple(f.shape)} / {tuple(p.shape)}")
    dt = torch.promote_types(f.dtype, p.dtype) if f.is_floating_point() else p.dtype
    f, p = f.to(dt), p.to(dt)
    out = p + _sample(f, p, "bilinear")
    if single:
        out = out[0]
    return out if is_torch else out.numpy()


def warp_labels(labels: Any, flow: Any) -> np.ndarray:
    """Backward-warp an integer label map (or mask) ``(H_s, W_s)`` by a ``(2, H_t, W_t)`` flow on the target grid.

    ``out[y, x] = labels[round(y + dy), round(x + dx)]`` (nearest neighbour, positions clamped to the image):
    the source labels transferred onto the target. Batched ``(N, H_s, W_s)`` with ``(N, 2, H_t, W_t)`` works too.
    """
    lab = torch.as_tensor(_np(labels).astype(np.int64))
    f = torch.as_tensor(_np(flow).astype(np.float64))
    single = f.ndim == 3
    if single:
        lab, f = lab[None], f[None]
    n, _, ht, wt = f.shape
    hs, ws = lab.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(ht, dtype=f.dtype), torch.arange(wt, dtype=f.dtype), indexing="ij")
    sx = torch.round(xs + f[:, 0]).clamp(0, ws - 1).long()
    sy = torch.round(ys + f[:, 1]).clamp(0, hs - 1).long()
    out = torch.gather(lab.reshape(n, -1), 1, (sy * ws + sx).reshape(n, -1)).reshape(n, ht, wt)
    out = out.numpy()
    return out[0] if single else out


def _label_batch(x: Any) -> np.ndarray:
    a = _np(x)
    return a[None] if a.ndim == 2 else a


def lt_acc(transferred_labels: Any, gt_labels: Any, valid: Any = None, reduction: str = "mean") -> Any:
    """Label-transfer accuracy: fraction of valid pixels whose transferred label equals the ground truth.

    ``(H, W)`` or ``(N, H, W)`` label maps; ``valid`` the pixels to count (default all). Per pair, then the mean
    over pairs (``reduction="none"`` gives the ``(N,)`` array; nan for a pair with no valid pixel).
    """
    t, g = _label_batch(transferred_labels), _label_batch(gt_labels)
    if t.shape != g.shape:
        raise ValueError(f"transferred {t.shape} and gt {g.shape} differ in shape")
    v = np.ones(t.shape, dtype=bool) if valid is None else np.broadcast_to(_label_batch(valid).astype(bool), t.shape)
    n_valid = v.reshape(len(t), -1).sum(1)
    hit = ((t == g) & v).reshape(len(t), -1).sum(1)
    per = np.where(n_valid > 0, hit / np.maximum(n_valid, 1), np.nan)
    return _reduce(per, reduction)


def mask_iou_transfer(transferred_mask: Any, gt_mask: Any, valid: Any = None, reduction: str = "mean") -> Any:
    """IoU of the transferred foreground (non-zero) with the ground-truth foreground, per pair then mean.

    Both empty (within ``valid``) scores 1. ``(H, W)`` or ``(N, H, W)``; ``reduction`` as in :func:`lt_acc`.
    """
    t, g = _label_batch(transferred_mask) != 0, _label_batch(gt_mask) != 0
    if t.shape != g.shape:
        raise ValueError(f"transferred {t.shape} and gt {g.shape} differ in shape")
    if valid is not None:
        v = np.broadcast_to(_label_batch(valid).astype(bool), t.shape)
        t, g = t & v, g & v
    inter = (t & g).reshape(len(t), -1).sum(1)
    union = (t | g).reshape(len(t), -1).sum(1)
    per = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return _reduce(per, reduction)


def _reduce(per: np.ndarray, reduction: str) -> Any:
    if reduction == "none":
        return per
    if reduction != "mean":
        raise ValueError(f"reduction must be mean or none, got {reduction!r}")
    ok = ~np.isnan(per)
    return float(per[ok].mean()) if ok.any() else float("nan")


def stack_pair_keypoints(pairs: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad the pairs' keypoints to ``(N, K_max, 2)`` (source, target; padding -1) and a ``(N, K_max)`` valid mask.

    ``pairs``: dicts with ``source_kps`` / ``target_kps`` ``(K, 2)`` arrays, e.g. from
    ``maskflow.data.pf_pascal.read_pf_pascal_pairs``."""
    k = max((len(p["source_kps"]) for p in pairs), default=0)
    n = len(pairs)
    src = np.full((n, k, 2), -1.0)
    tgt = np.full((n, k, 2), -1.0)
    valid = np.zeros((n, k), dtype=bool)
    for i, p in enumerate(pairs):
        m = len(p["source_kps"])
        src[i, :m], tgt[i, :m], valid[i, :m] = p["source_kps"], p["target_kps"], True
    return src, tgt, valid
