"""Class-agnostic segment-proposal recall (COCO AR), as in the FFD-Net paper's section 4.1.

AR@k is the recall of the ground-truth objects by the top-k proposals of each image, averaged over the IoU
thresholds 0.50:0.05:0.95. :func:`proposal_recall` reproduces pycocotools' ``COCOeval`` exactly for
``iouType='segm'``, ``params.useCats = 0``, ``params.maxDets = max_proposals``, area range ``'all'``:

* per image and threshold ``t`` (used as ``min(t, 1 - 1e-10)``, as COCOeval does), proposals are taken in order
  (descending score) and each one is matched to the still-unmatched non-crowd ground truth of highest IoU
  ``>= t`` (ties go to the later ground truth, as in ``evaluateImg``);
* crowd ground truths may absorb any number of proposals but only when no non-crowd one qualifies, so they never
  change a non-crowd match: they are dropped before matching and left out of the counts;
* recall at ``(k, t)`` = matched non-crowd ground truths among the top-k proposals of all images / all non-crowd
  ground truths (COCOeval's ``eval['recall']``), and matching the top k alone equals truncating the matching of
  the top ``max(k)`` (the greedy pass is a prefix process), so one pass per image serves every k.

The one difference from COCOeval: with no non-crowd ground truth at all, recall and AR are ``nan`` (COCOeval
reports ``-1``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = ["IOU_THRESHOLDS", "proposal_recall", "recall_vs_iou"]

# The ten COCO thresholds 0.50, 0.55, ..., 0.95. Bit-for-bit COCOeval's Params.iouThrs (np.linspace), not
# np.round(np.arange(0.5, 0.951, 0.05), 2): linspace's 0.9 is 0.8999999999999999, one ulp below 0.9, so a stored IoU of
# 0.8999999999999999 passes COCOeval's threshold and would fail the rounded one.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)

_MAX_THR = 1.0 - 1e-10  # COCOeval matches with iou >= min(t, 1 - 1e-10)


def _greedy_hits(iou: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """``(T, D)`` bool: proposal d matched a ground truth at threshold t (COCOeval's greedy matching).

    ``iou`` is ``(D, G)`` over non-crowd ground truths only, rows in score order. One Python step per proposal that
    reaches the lowest threshold with some ground truth, each step numpy over ``(T, G)``: O(D*G) to filter plus
    O(D' * T * G) for the D' candidate proposals; stops early once every ground truth is matched at every t.
    """
    T = thr.shape[0]
    D, G = iou.shape
    hits = np.zeros((T, D), dtype=bool)
    if D == 0 or G == 0:
        return hits
    rev = iou[:, ::-1]  # reversed columns: argmax's first maximum = COCOeval's last maximum
    candidates = np.flatnonzero(rev.max(axis=1) >= thr.min())
    matched = np.zeros((T, G), dtype=bool)  # in reversed column order too; only counts leave this function
    col_thr = thr[:, None]
    for d in candidates:
        row = rev[d]
        ok = (row >= col_thr) & ~matched  # (T, G)
        any_t = ok.any(axis=1)
        if not any_t.any():
            continue
        t_idx = np.flatnonzero(any_t)
        best = np.where(ok[t_idx], row, -np.inf).argmax(axis=1)
        matched[t_idx, best] = True
        hits[t_idx, d] = True
        if matched.all():
            break
    return hits


def proposal_recall(
    ious: Sequence[np.ndarray],
    gt_crowd: Sequence[np.ndarray],
    max_proposals: Iterable[int] = (10, 100, 1000),
    thresholds: np.ndarray = IOU_THRESHOLDS,
) -> dict:
    """Class-agnostic recall of ground truths by the top-k proposals, pooled over images, and AR@k.

    ``ious[i]`` is image i's ``(k_i, G_i)`` proposal-vs-ground-truth IoU (rows by descending score, crowd columns
    computed with crowd semantics or not: crowd columns are not used); ``gt_crowd[i]`` is ``G_i`` crowd flags.
    Returns ``{"AR@k": float per k, "recall": {k: (T,) array}, "thresholds": (T,) array, "num_gt": non-crowd
    ground truths, "num_images": int}``; AR@k is the mean of ``recall[k]`` (``nan`` when ``num_gt == 0``).
    """
    ks = [int(k) for k in max_proposals]
    if not ks or min(ks) < 1:
        raise ValueError(f"max_proposals must be positive ints, got {ks}")
    if len(ious) != len(gt_crowd):
        raise ValueError(f"{len(ious)} IoU matrices but {len(gt_crowd)} crowd-flag arrays")
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    thr_eff = np.minimum(thr, _MAX_THR)
    kmax = max(ks)
    k_arr = np.asarray(ks)
    tp = np.zeros((thr.shape[0], len(ks)), dtype=np.int64)  # matched non-crowd ground truths at (t, k)
    num_gt = 0
    for iou, crowd in zip(ious, gt_crowd):
        crowd = np.asarray(crowd, dtype=bool).reshape(-1)
        G = crowd.shape[0]
        iou = np.asarray(iou, dtype=np.float64)
        if iou.ndim != 2 and iou.size == 0:  # [] from JSON: no proposals
            iou = iou.reshape(0, G)
        if iou.ndim != 2 or iou.shape[1] != G:
            raise ValueError(f"IoU matrix of shape {iou.shape} against {G} ground truths")
        keep = ~crowd
        num_gt += int(keep.sum())
        hits = _greedy_hits(iou[:kmax, keep], thr_eff)
        if hits.shape[1] == 0:
            continue
        cum = np.cumsum(hits, axis=1)  # (T, D)
        upto = np.minimum(k_arr, hits.shape[1]) - 1
        tp += cum[:, upto]
    with np.errstate(invalid="ignore", divide="ignore"):
        rec = tp / num_gt if num_gt else np.full(tp.shape, np.nan)
    out: dict = {}
    for j, k in enumerate(ks):
        out[f"AR@{k}"] = float(rec[:, j].mean()) if num_gt else float("nan")
    out["recall"] = {k: rec[:, j].copy() for j, k in enumerate(ks)}
    out["thresholds"] = thr.copy()
    out["num_gt"] = num_gt
    out["num_images"] = len(ious)
    return out


def recall_vs_iou(
    ious: Sequence[np.ndarray],
    gt_crowd: Sequence[np.ndarray],
    k: int,
    thresholds: np.ndarray = np.linspace(0.5, 1.0, 11),
) -> np.ndarray:
    """Recall of the top-k proposals at each IoU threshold (the paper's recall-vs-IoU curves): a ``(T,)`` array."""
    return proposal_recall(ious, gt_crowd, max_proposals=(k,), thresholds=thresholds)["recall"][int(k)]
