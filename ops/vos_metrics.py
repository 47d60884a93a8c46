"""DAVIS video-object-segmentation metrics: region similarity J, boundary F-measure, per-sequence statistics.

Follows the DAVIS benchmark (Perazzi et al. 2016; ``davis2017-evaluation``), as used for DMM-Net (sec. 4):

* masks are ``(T, H, W)`` arrays or tensors (any non-zero value is foreground), one binary object per call;
* **J** (region similarity) per frame is ``|P & G| / |P | G|``; a frame where both masks are empty scores 1
  (DAVIS: ``j[isclose(union, 0)] = 1``);
* **F** (boundary measure) per frame: one-pixel boundaries are taken from each mask with DAVIS's ``seg2bmap``
  (a pixel is boundary when it differs from its right, lower or lower-right neighbour); each boundary is dilated
  by a disk of radius ``r = ceil(bound_th * hypot(H, W))`` pixels (``bound_th = 0.008``; a ``bound_th >= 1`` is
  taken as the radius itself) - the disk is ``x^2 + y^2 <= r^2``, skimage's ``disk(r)``;
  precision = predicted boundary pixels inside the dilated ground-truth boundary / predicted boundary pixels,
  recall = ground-truth boundary pixels inside the dilated predicted boundary / ground-truth boundary pixels,
  ``F = 2PR / (P + R)`` (0 when ``P + R = 0``). Empty boundaries: both empty -> P = R = 1 (F = 1); only the
  prediction empty -> P = 1, R = 0; only the ground truth empty -> P = 0, R = 1 (both F = 0);
* the dilation is one batched ``conv2d`` of all T frames with the disk kernel (exact: counts are small integers);
* statistics of a per-frame series ``X`` (DAVIS's ``db_statistics``): mean = ``nanmean(X)``, recall =
  ``nanmean(X > 0.5)``, decay = ``nanmean(bin_0) - nanmean(bin_3)`` with the four (overlapping by one frame)
  quartile bins ``X[ids[i] : ids[i+1] + 1]``, ``ids = round(linspace(1, T, 5) + 1e-10) - 1``. Indices are int64:
  the reference casts them to uint8 and so breaks for sequences longer than 256 frames; here any length works.

The official benchmark leaves out the first frame (given) and the last frame of every sequence; pass
``exclude_first_last=True`` to :func:`evaluate_sequence` for that protocol (the default scores every frame given).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as tF

__all__ = [
    "region_similarity",
    "boundary_map",
    "boundary_measure",
    "boundary_radius",
    "sequence_statistics",
    "decay",
    "evaluate_sequence",
]

BOUND_TH = 0.008


def _as_bool_thw(masks: Any, name: str) -> torch.Tensor:
    """(T, H, W) or (H, W) array/tensor -> bool torch tensor (T, H, W) on CPU."""
    t = masks.detach().cpu() if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks))
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"{name} must be (T, H, W) or (H, W), got shape {tuple(t.shape)}")
    return t != 0


def _pair(pred: Any, gt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    p, g = _as_bool_thw(pred, "pred"), _as_bool_thw(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {tuple(p.shape)} and gt {tuple(g.shape)} differ in shape")
    return p, g


def region_similarity(pred: Any, gt: Any, void: Any = None) -> np.ndarray:
    """Per-frame J (IoU) of ``(T, H, W)`` masks: a float64 ``(T,)`` array; empty-vs-empty frames score 1.

    ``void`` (optional, ``(T, H, W)``): pixels left out of both masks (DAVIS 2017's void label).
    """
    p, g = _pair(pred, gt)
    if void is not None:
        keep = ~_as_bool_thw(void, "void")
        p, g = p & keep, g & keep
    inter = (p & g).flatten(1).sum(1).double()
    union = (p | g).flatten(1).sum(1).double()
    j = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return j.numpy()


def boundary_radius(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """Dilation radius in pixels: ``bound_th`` if ``>= 1`` else ``ceil(bound_th * image diagonal)`` (DAVIS)."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(height, width)))


def boundary_map(masks: Any) -> torch.Tensor:
    """One-pixel boundaries of ``(T, H, W)`` masks (DAVIS ``seg2bmap`` at the mask's own size): bool (T, H, W)."""
    s = _as_bool_thw(masks, "masks")
    e = torch.zeros_like(s)
    so = torch.zeros_like(s)
    se = torch.zeros_like(s)
    e[:, :, :-1] = s[:, :, 1:]
    so[:, :-1, :] = s[:, 1:, :]
    se[:, :-1, :-1] = s[:, 1:, 1:]
    b = (s ^ e) | (s ^ so) | (s ^ se)
    b[:, -1, :] = s[:, -1, :] ^ e[:, -1, :]
    b[:, :, -1] = s[:, :, -1] ^ so[:, :, -1]
    b[:, -1, -1] = False
    return b


def _disk(radius: int) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()


def _dilate(b: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of bool (T, H, W) by a disk of ``radius`` (zero padding, as cv2/scipy at the border)."""
    if radius <= 0:
        return b.clone()
    k = _disk(radius)[None, None]
    out = tF.conv2d(b[:, None].float(), k, padding=radius)
    return out[:, 0] > 0.5


def boundary_measure(pred: Any, gt: Any, bound_th: float = BOUND_TH, void: Any = None) -> dict:
    """Per-frame boundary F-measure of ``(T, H, W)`` masks: ``{"F", "precision", "recall"}`` float64 ``(T,)``.

    ``void`` pixels (optional) are removed from both masks before the boundaries are taken (DAVIS 2017).
    """
    p, g = _pair(pred, gt)
    if void is not None:
        keep = ~_as_bool_thw(void, "void")
        p, g = p & keep, g & keep
    radius = boundary_radius(p.shape[1], p.shape[2], bound_th)
    bp, bg = boundary_map(p), boundary_map(g)
    both = _dilate(torch.cat([bp, bg]), radius)
    dp, dg = both[: bp.shape[0]], both[bp.shape[0] :]
    n_p = bp.flatten(1).sum(1).double()
    n_g = bg.flatten(1).sum(1).double()
    p_match = (bp & dg).flatten(1).sum(1).double()
    g_match = (bg & dp).flatten(1).sum(1).double()
    prec = torch.where(n_p > 0, p_match / n_p.clamp_min(1), torch.ones_like(n_p))  # no pred boundary: P = 1
    rec = torch.where(n_g > 0, g_match / n_g.clamp_min(1), torch.ones_like(n_g))  # no gt boundary: R = 1
    # one side empty, the other not: DAVIS sets the "impossible" term to 0
    prec = torch.where((n_p > 0) & (n_g == 0), torch.zeros_like(prec), prec)
    rec = torch.where((n_p == 0) & (n_g > 0), torch.zeros_like(rec), rec)
    denom = prec + rec
    f = torch.where(denom > 0, 2 * prec * rec / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return {"F": f.numpy(), "precision": prec.numpy(), "recall": rec.numpy()}


def _quartile_ids(n: int, n_bins: int = 4) -> np.ndarray:
    return (np.round(np.linspace(1, n, n_bins + 1) + 1e-10) - 1).astype(np.int64)


def decay(values: Any, n_bins: int = 4) -> float:
    """DAVIS decay: mean of the first of ``n_bins`` quantile bins minus mean of the last (nan-aware, any length)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return float("nan")
    ids = _quartile_ids(x.size, n_bins)
    first = x[ids[0] : ids[1] + 1]
    last = x[ids[n_bins - 1] : ids[n_bins] + 1]
    with np.errstate(invalid="ignore"):
        if np.all(np.isnan(first)) or np.all(np.isnan(last)):
            return float("nan")
        return float(np.nanmean(first) - np.nanmean(last))


def sequence_statistics(values: Any, threshold: float = 0.5) -> dict:
    """``{"mean", "recall", "decay"}`` of a per-frame series (DAVIS ``db_statistics``; nan frames ignored)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    ok = ~np.isnan(x)
    if not ok.any():
        return {"mean": float("nan"), "recall": float("nan"), "decay": float("nan")}
    return {
        "mean": float(x[ok].mean()),
        "recall": float((x[ok] > threshold).mean()),
        "decay": decay(x),
    }


def evaluate_sequence(
    pred: Any,
    gt: Any,
    bound_th: float = BOUND_TH,
    void: Any = None,
    exclude_first_last: bool = False,
) -> dict:
    """J and F of one object over a sequence of ``(T, H, W)`` masks, with DAVIS statistics.

    Returns ``{"J": (T',) array, "F": (T',) array, "J_mean", "J_recall", "J_decay", "F_mean", "F_recall",
    "F_decay", "JF_mean" (G = (J_mean + F_mean) / 2), "num_frames": T'}`` where ``T' = T - 2`` with
    ``exclude_first_last`` (the official protocol) and ``T`` otherwise.
    """
    p, g = _pair(pred, gt)
    v = None if void is None else _as_bool_thw(void, "void")
    if exclude_first_last:
        if p.shape[0] < 3:
            raise ValueError("exclude_first_last needs at least 3 frames")
        p, g = p[1:-1], g[1:-1]
        v = None if v is None else v[1:-1]
    j = region_similarity(p, g, v)
    f = boundary_measure(p, g, bound_th, v)["F"]
    js, fs = sequence_statistics(j), sequence_statistics(f)
    out: dict = {"J": j, "F": f}
    for name, st in (("J", js), ("F", fs)):
        for k, val in st.items():
            out[f"{name}_{k}"] = val
    out["JF_mean"] = (js["mean"] + fs["mean"]) / 2.0
    out["num_frames"] = int(j.shape[0])
    return out
