"""Instance-segmentation AP: VOC-style AP^r (SDS / DVIS sec. 4-5) and COCO mask AP through pycocotools.

**AP^r** (Hariharan et al.'s region AP on PASCAL VOC / SBD, the metric of DVIS's Tables 1-2), per class c and IoU
threshold t, with VOC's detection rules applied to masks:

* all detections of class c over all images are ranked by descending score (ties: image order, then input order);
* each detection is assigned to the ground truth of class c in its image with the highest mask IoU
  (:func:`ops.masks.mask_iou`; ties -> the first); it is a true positive when that IoU ``>= t`` (VOC devkit's
  ``ovmax >= minoverlap``) and that ground truth is not yet taken by a higher-ranked detection, otherwise a false
  positive (VOC: a duplicate is a false positive even when another ground truth would qualify). A detection
  assigned to an ``ignore`` ("difficult") ground truth is neither;
* AP = VOC 2010+ all-point interpolated area under the precision envelope (``use_07_metric=True``: the VOC 2007
  11-point average); recall is over the non-ignored ground truths of class c;
* classes without any (non-ignored) ground truth have no AP (nan) and are left out of the mean; mAP^r at t is the
  mean over the remaining classes, and ``AP^r_avg`` the mean of mAP^r over the thresholds.

Matching is vectorised: the assignment (argmax IoU) does not depend on t, so at each t the true positives are the
first-ranked detection of every (image, ground truth) key among those with IoU ``>= t``.

**COCO mask AP**: :func:`coco_mask_ap` runs ``COCOeval(iouType="segm")`` and returns its 12 summary numbers by name.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Sequence

import numpy as np

from ops.masks import mask_iou

__all__ = ["VOC_IOU_THRESHOLDS", "voc_ap", "ap_r", "coco_mask_ap", "COCO_STAT_NAMES"]

VOC_IOU_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """VOC average precision of a ranked list's cumulative recall/precision (all-point, or 11-point for VOC07)."""
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if use_07_metric:
        pts = np.linspace(0.0, 1.0, 11)
        # max precision at recall >= r, 0 when r is never reached
        masked = np.where(rec[None, :] >= pts[:, None], prec[None, :], 0.0) if rec.size else np.zeros((11, 1))
        return float(masked.max(axis=1).mean())
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def _unpack(item: Any, keys: Sequence[str]) -> list:
    if isinstance(item, dict):
        return [item.get(k) for k in keys]
    item = list(item)
    return item + [None] * (len(keys) - len(item))


def ap_r(
    preds: Sequence[Any],
    gts: Sequence[Any],
    iou_thresholds: Sequence[float] = VOC_IOU_THRESHOLDS,
    use_07_metric: bool = False,
) -> dict:
    """VOC-style mask AP at each IoU threshold, per class and averaged over classes.

    ``preds[i]``: image i's detections, ``(masks, scores, classes)`` or a dict with those keys - ``masks`` a list of
    COCO RLEs (``ops.masks.encode_masks``), ``scores`` and ``classes`` length-D sequences. ``gts[i]``: ``(masks,
    classes[, ignore])`` or a dict with ``masks``, ``classes`` and optional ``ignore`` (difficult) flags.

    Returns ``{"mAP@<t>": float per threshold (e.g. "mAP@0.5"), "AP_avg": mean over thresholds, "per_class":
    {class: (T,) array}, "thresholds": (T,) array, "num_gt": {class: int}}``.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} prediction entries but {len(gts)} ground-truth entries")
    thr = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    # Per detection: image, class, score, assigned ground-truth key (global id, -1 none), IoU with it, ignored.
    det_img, det_cls, det_score, det_key, det_iou, det_ign = [], [], [], [], [], []
    num_gt: dict = {}
    gt_offset = 0
    for i, (p, g) in enumerate(zip(preds, gts)):
        p_masks, p_scores, p_cls = _unpack(p, ("masks", "scores", "classes"))
        g_masks, g_cls, g_ign = _unpack(g, ("masks", "classes", "ignore"))
        p_masks = list(p_masks or [])
        g_masks = list(g_masks or [])
        p_scores = np.asarray(p_scores if p_scores is not None else [], dtype=np.float64).reshape(-1)
        p_cls = np.asarray(p_cls if p_cls is not None else [], dtype=np.int64).reshape(-1)
        g_cls = np.asarray(g_cls if g_cls is not None else [], dtype=np.int64).reshape(-1)
        g_ign = np.zeros(len(g_masks), bool) if g_ign is None else np.asarray(g_ign, dtype=bool).reshape(-1)
        if not (len(p_masks) == len(p_scores) == len(p_cls)):
            raise ValueError(f"image {i}: {len(p_masks)} masks, {len(p_scores)} scores, {len(p_cls)} classes")
        if not (len(g_masks) == len(g_cls) == len(g_ign)):
            raise ValueError(f"image {i}: {len(g_masks)} gt masks, {len(g_cls)} classes, {len(g_ign)} flags")
        for c, cnt in zip(*np.unique(g_cls[~g_ign], return_counts=True)):
            num_gt[int(c)] = num_gt.get(int(c), 0) + int(cnt)
        for c in np.unique(g_cls[g_ign]):
            num_gt.setdefault(int(c), 0)
        d = len(p_masks)
        if d == 0:
            gt_offset += len(g_masks)
            continue
        iou = mask_iou(p_masks, g_masks)  # (D, G)
        same = p_cls[:, None] == g_cls[None, :]
        iou_c = np.where(same, iou, -1.0)
        if iou_c.shape[1]:
            j = iou_c.argmax(axis=1)
            best = iou_c[np.arange(d), j]
            has = best >= 0  # a ground truth of the class exists in this image
        else:
            j = np.zeros(d, dtype=np.int64)
            best = np.zeros(d)
            has = np.zeros(d, dtype=bool)
        det_img.append(np.full(d, i))
        det_cls.append(p_cls)
        det_score.append(p_scores)
        det_key.append(np.where(has, gt_offset + j, -1))
        det_iou.append(np.where(has, best, 0.0))
        det_ign.append(np.where(has, g_ign[j] if len(g_ign) else False, False))
        gt_offset += len(g_masks)
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    det_img, det_cls = cat(det_img, np.int64), cat(det_cls, np.int64)
    det_score, det_key = cat(det_score, np.float64), cat(det_key, np.int64)
    det_iou, det_ign = cat(det_iou, np.float64), cat(det_ign, bool)

    per_class: dict = {}
    for c in sorted(set(num_gt) | set(det_cls.tolist())):
        n_pos = num_gt.get(c, 0)
        if n_pos == 0:
            per_class[c] = np.full(thr.shape, np.nan)
            continue
        sel = np.flatnonzero(det_cls == c)
        order = sel[np.lexsort((sel, -det_score[sel]))]  # descending score, stable by (image, input) order
        key, ov, ign = det_key[order], det_iou[order], det_ign[order]
        aps = np.zeros(thr.shape)
        for ti, t in enumerate(thr):
            hit = (key >= 0) & (ov >= t)
            tp = np.zeros(order.shape[0], dtype=bool)
            hit_idx = np.flatnonzero(hit)
            if hit_idx.size:
                _, first = np.unique(key[hit_idx], return_index=True)  # first-ranked detection of each gt
                tp[hit_idx[first]] = True
            skip = hit & ign  # matched to a difficult gt at this threshold: neither TP nor FP (VOC)
            tp &= ~skip
            fp = ~tp & ~skip
            ctp, cfp = np.cumsum(tp), np.cumsum(fp)
            keep = ~skip
            rec = ctp[keep] / n_pos
            prec = ctp[keep] / np.maximum(ctp[keep] + cfp[keep], np.finfo(np.float64).eps)
            aps[ti] = voc_ap(rec, prec, use_07_metric)
        per_class[c] = aps
    valid = [v for c, v in per_class.items() if num_gt.get(c, 0) > 0]
    m = np.mean(np.stack(valid), axis=0) if valid else np.full(thr.shape, np.nan)
    out: dict = {f"mAP@{t:g}": float(v) for t, v in zip(thr, m)}
    out["AP_avg"] = float(np.mean(m)) if valid else float("nan")
    out["per_class"] = per_class
    out["thresholds"] = thr.copy()
    out["num_gt"] = dict(num_gt)
    return out


def coco_mask_ap(gt_coco: dict, detections: Sequence[dict], use_cats: bool = True, max_dets=(1, 10, 100)) -> dict:
    """COCO mask AP/AR through pycocotools' ``COCOeval(iouType="segm")``.

    ``gt_coco``: a COCO instances dict (``images``, ``annotations`` with ``segmentation`` RLE or polygons,
    ``area``, ``iscrowd``; ``categories``). ``detections``: COCO result dicts ``{"image_id", "category_id",
    "segmentation": RLE, "score"}`` (str or bytes counts). Returns the 12 summary numbers keyed by
    :data:`COCO_STAT_NAMES` (COCOeval's -1 where undefined). COCOeval's printing is swallowed.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(gt_coco)
        gt.createIndex()
        dets = []
        for d in detections:
            d = dict(d)
            seg = dict(d["segmentation"])
            if isinstance(seg.get("counts"), str):
                seg["counts"] = seg["counts"].encode("ascii")
            d["segmentation"] = seg
            dets.append(d)
        if dets:
            dt = gt.loadRes(dets)
        else:
            dt = COCO()
            dt.dataset = {"images": copy.deepcopy(gt.dataset["images"]), "annotations": [],
                          "categories": copy.deepcopy(gt.dataset.get("categories", []))}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.useCats = int(use_cats)
        ev.params.maxDets = [int(m) for m in max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats)}
