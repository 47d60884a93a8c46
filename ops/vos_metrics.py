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
* matching within the disk is exact and batched: one k-d tree query over the (sparse) boundary pixels of all T
  frames, equivalent to counting boundary pixels inside the other boundary's disk dilation;
* statistics of a per-frame series ``X`` (DAVIS's ``db_statistics``): mean = ``nanmean(X)``, recall =
  ``nanmean(X > 0.5)``, decay = ``nanmean(bin_0) - nanmean(bin_3)``. ``nan > 0.5`` is False, so a frame without a
  value (nan) counts in the recall's denominator as a failure, while the mean and the decay leave it out. The
  decay's four quartile bins (overlapping by one frame) are ``X[ids[i] : ids[i+1] + 1]``,
  ``ids = round(linspace(1, T, 5) + 1e-10) - 1``. Indices are int64: the reference casts them to uint8 and so
  breaks for sequences longer than 256 frames; here any length works.

The official benchmark leaves out the first frame (given) and the last frame of every sequence; pass
``exclude_first_last=True`` to :func:`evaluate_sequence` for that protocol (the default scores every frame given).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

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


def _as_bool_thw(masks: Any, name: str) -> np.ndarray:
    """(T, H, W) or (H, W) array/tensor -> bool numpy array (T, H, W)."""
    a = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must be (T, H, W) or (H, W), got shape {a.shape}")
    return a if a.dtype == np.bool_ else a != 0


def _pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_bool_thw(pred, "pred"), _as_bool_thw(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ in shape")
    return p, g


def _count(x: np.ndarray) -> np.ndarray:
    return np.count_nonzero(x.reshape(x.shape[0], -1), axis=1).astype(np.float64)


def region_similarity(pred: Any, gt: Any, void: Any = None) -> np.ndarray:
    """Per-frame J (IoU) of ``(T, H, W)`` masks: a float64 ``(T,)`` array; empty-vs-empty frames score 1.

    ``void`` (optional, ``(T, H, W)``): pixels left out of both masks (DAVIS 2017's void label).
    """
    p, g = _pair(pred, gt)
    if void is not None:
        keep = ~_as_bool_thw(void, "void")
        p, g = p & keep, g & keep
    inter, union = _count(p & g), _count(p | g)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def boundary_radius(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """Dilation radius in pixels: ``bound_th`` if ``>= 1`` else ``ceil(bound_th * image diagonal)`` (DAVIS)."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(height, width)))


def boundary_map(masks: Any) -> np.ndarray:
    """One-pixel boundaries of ``(T, H, W)`` masks (DAVIS ``seg2bmap`` at the mask's own size): bool (T, H, W)."""
    s = _as_bool_thw(masks, "masks")
    e = np.zeros_like(s)
    so = np.zeros_like(s)
    se = np.zeros_like(s)
    e[:, :, :-1] = s[:, :, 1:]
    so[:, :-1, :] = s[:, 1:, :]
    se[:, :-1, :-1] = s[:, 1:, 1:]
    b = (s ^ e) | (s ^ so) | (s ^ se)
    b[:, -1, :] = s[:, -1, :] ^ e[:, -1, :]
    b[:, :, -1] = s[:, :, -1] ^ so[:, :, -1]
    b[:, -1, -1] = False
    return b


def _matched(src: np.ndarray, ref: np.ndarray, radius: int) -> np.ndarray:
    """Per frame, how many ``src`` boundary pixels lie inside ``ref`` dilated by the disk of ``radius``.

    Equal to ``(src & binary_dilation(ref, disk(radius))).sum()`` per frame (a pixel is inside the dilation iff
    some ``ref`` pixel is within Euclidean distance ``radius``), computed as one k-d tree query over the sparse
    boundary pixels of all frames at once: the frame index is a third coordinate scaled far beyond ``radius``
    and the image diagonal, so no match can cross frames.
    """
    from scipy.spatial import cKDTree

    t = src.shape[0]
    ps = np.argwhere(src)  # (n, 3): frame, y, x
    pr = np.argwhere(ref)
    if ps.shape[0] == 0 or pr.shape[0] == 0:
        return np.zeros(t, dtype=np.float64)
    far = float(4 * (radius + src.shape[1] + src.shape[2] + 1))
    scale = np.array([far, 1.0, 1.0])
    tree = cKDTree(pr * scale)
    dist, _ = tree.query(ps * scale, k=1, distance_upper_bound=radius + 0.5)
    hit = dist <= radius + 1e-9  # squared distances are integers: sqrt(r^2 + 1) > r + 1e-9
    return np.bincount(ps[hit, 0], minlength=t).astype(np.float64)


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
    n_p, n_g = _count(bp), _count(bg)
    p_match, g_match = _matched(bp, bg, radius), _matched(bg, bp, radius)
    prec = np.where(n_p > 0, p_match / np.maximum(n_p, 1), 1.0)  # no predicted boundary: P = 1
    rec = np.where(n_g > 0, g_match / np.maximum(n_g, 1), 1.0)  # no ground-truth boundary: R = 1
    # one side empty, the other not: DAVIS sets the "impossible" term to 0
    prec = np.where((n_p > 0) & (n_g == 0), 0.0, prec)
    rec = np.where((n_p == 0) & (n_g > 0), 0.0, rec)
    denom = prec + rec
    f = np.where(denom > 0, 2 * prec * rec / np.where(denom > 0, denom, 1.0), 0.0)
    return {"F": f, "precision": prec, "recall": rec}


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
    """``{"mean", "recall", "decay"}`` of a per-frame series (DAVIS ``db_statistics``).

    A nan frame is left out of the mean and the decay but counts as a failure in the recall (``nan > threshold`` is
    False over all ``T`` frames, as in DAVIS's ``nanmean(X > 0.5)``): a method cannot raise its recall by leaving
    frames unscored. All frames nan: mean and decay nan, recall 0; no frames: all nan.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return {"mean": float("nan"), "recall": float("nan"), "decay": float("nan")}
    ok = ~np.isnan(x)
    return {
        "mean": float(x[ok].mean()) if ok.any() else float("nan"),
        "recall": float((x > threshold).mean()),  # nan > threshold is False: a failure, over all T frames
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
