"""Dense-correspondence evaluation (SFNet, Lee et al., CVPR 2019, sec. 4): PCK@0.05 / @0.1, mask-transfer IoU,
LT-ACC and EPE, per pair, over ``flow_prediction/1`` shards; the same values are what the SFNet plugin validates on.

Protocol on synthetic pairs (MODELS.md section 5, "Evaluation"; every quantity in pixels of one image size, flows
follow :mod:`ops.warp`: channel 0 = dx, backward warp, align_corners=True):

* **pseudo-keypoints** (:func:`pseudo_keypoints`): K = 20 source-foreground pixels, their ground-truth targets
  ``p + flow_s2t(p)``. They are drawn with ``np.random.default_rng([seed, image_id])`` among the foreground pixels
  whose target lies inside the target image (so every pair with such pixels has K points, rather than drawing K and
  keeping those that land inside: same expectation, less variance);
* **PCK@alpha** (``pck_10``, ``pck_05``): a keypoint transferred by the predicted ``flow_s2t``
  (:func:`ops.correspondence_metrics.transfer_keypoints`) is correct within ``alpha * max(h, w)`` of the target
  mask's box (``[x, y, w, h]``, whole pixels);
* **mask IoU / LT-ACC** (``mask_iou``, ``lt_acc``): the source mask warped onto the target with the predicted
  ``flow_t2s`` (nearest neighbour, :func:`ops.correspondence_metrics.warp_labels`) against the target mask: IoU of
  the foreground, and the fraction of all pixels whose label (foreground/background) is right;
* **EPE** (``epe``): mean ``||flow_t2s - gt_flow_t2s||`` over the target foreground (:func:`ops.warp.epe`, per pair);
* **real landmarks** (pairs whose ``pair.json`` has ``keypoints``, e.g. the dlib faces): ``pck_landmarks_10`` /
  ``pck_landmarks_05`` on the landmarks that stay inside the target, normalised by their own tight box in the target
  (the PF-PASCAL protocol for annotated keypoints).

Every value is per pair; a pair without a valid keypoint scores NaN in the PCK columns and is left out of their
means (the harness and the evaluator average with ``nanmean``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from maskflow.config import JobFailed
from maskflow.data import schema
from maskflow.evaluate import EvalResult, Evaluator
from ops import correspondence_metrics as cm

__all__ = ["CorrespondenceEvaluator", "correspondence_metrics", "pseudo_keypoints", "pad_keypoints", "mask_boxes",
           "landmark_pck", "keypoint_figure"]

PCK_ALPHAS = {"pck_10": 0.1, "pck_05": 0.05}
LANDMARK_PCK = {"pck_landmarks_10": 0.1, "pck_landmarks_05": 0.05}
PSEUDO_KEYPOINTS = 20


# --------------------------------------------------------------------------------------------- per-pair metrics


def pseudo_keypoints(source_mask: np.ndarray, flow_s2t: np.ndarray, image_id: int, seed: int = 0,
                     count: int = PSEUDO_KEYPOINTS) -> tuple[np.ndarray, np.ndarray]:
    """``(source, target)`` ``(k, 2)`` float64 pixel points, ``k <= count`` (module docstring): source-foreground
    pixels of an ``(H, W)`` mask and their targets through the ground-truth ``(2, H, W)`` ``flow_s2t``."""
    height, width = source_mask.shape
    ys, xs = np.nonzero(source_mask)
    tx, ty = xs + flow_s2t[0, ys, xs], ys + flow_s2t[1, ys, xs]
    inside = np.flatnonzero((tx >= 0) & (tx <= width - 1) & (ty >= 0) & (ty <= height - 1))
    rng = np.random.default_rng([int(seed), int(image_id)])
    pick = rng.choice(inside, size=min(count, len(inside)), replace=False) if len(inside) else inside
    source = np.stack([xs[pick], ys[pick]], 1).astype(np.float64)
    target = np.stack([tx[pick], ty[pick]], 1).astype(np.float64)
    return source, target


def pad_keypoints(sets: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ``(source, target)`` point sets -> ``(N, K, 2)`` source, target (padding -1) and ``(N, K)`` valid."""
    k = max((len(s) for s, _ in sets), default=0)
    source = torch.full((len(sets), k, 2), -1.0, dtype=torch.float64)
    target = source.clone()
    valid = torch.zeros(len(sets), k, dtype=torch.bool)
    for i, (s, t) in enumerate(sets):
        source[i, :len(s)], target[i, :len(t)], valid[i, :len(s)] = torch.from_numpy(s), torch.from_numpy(t), True
    return source, target, valid


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` boolean masks -> ``(N, 4)`` tight ``[x, y, w, h]`` boxes in whole pixels (zeros when empty)."""
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)
    h_idx = torch.arange(masks.shape[1], device=masks.device)
    w_idx = torch.arange(masks.shape[2], device=masks.device)
    y0 = torch.where(rows, h_idx, masks.shape[1]).amin(1)
    y1 = torch.where(rows, h_idx, -1).amax(1)
    x0 = torch.where(cols, w_idx, masks.shape[2]).amin(1)
    x1 = torch.where(cols, w_idx, -1).amax(1)
    box = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], 1).to(torch.float64)
    return torch.where(rows.any(1, keepdim=True), box, torch.zeros_like(box))


def correspondence_metrics(pred_flow_s2t: torch.Tensor, pred_flow_t2s: torch.Tensor, gt_flow_t2s: torch.Tensor,
                           source_mask: torch.Tensor, target_mask: torch.Tensor, keypoints_source: torch.Tensor,
                           keypoints_target: torch.Tensor, keypoints_valid: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-pair ``pck_10``, ``pck_05``, ``mask_iou``, ``lt_acc``, ``epe`` (module docstring), as ``(N,)`` arrays.

    Flows ``(N, 2, H, W)`` in pixels of the ``H x W`` pair (predicted F^s on the source grid, predicted and
    ground-truth F^t on the target grid); masks ``(N, H, W)`` boolean; keypoints ``(N, K, 2)`` pixels with an
    ``(N, K)`` valid mask (:func:`pad_keypoints`).
    """
    pred_flow_s2t, pred_flow_t2s = pred_flow_s2t.detach().double().cpu(), pred_flow_t2s.detach().double().cpu()
    gt_flow_t2s = gt_flow_t2s.detach().double().cpu()
    source_mask, target_mask = source_mask.detach().bool().cpu(), target_mask.detach().bool().cpu()
    out: dict[str, np.ndarray] = {}
    if keypoints_source.shape[1]:
        moved = cm.transfer_keypoints(pred_flow_s2t, keypoints_source.double())
        box = mask_boxes(target_mask)
        for name, alpha in PCK_ALPHAS.items():
            out[name] = cm.pck(moved, keypoints_target, alpha, "bbox", bbox=box, valid=keypoints_valid,
                               reduction="none")
    else:
        out.update({name: np.full(len(source_mask), np.nan) for name in PCK_ALPHAS})
    transferred = cm.warp_labels(source_mask.long(), pred_flow_t2s)  # (N, H, W) labels on the target
    out["mask_iou"] = cm.mask_iou_transfer(transferred, target_mask, reduction="none")
    out["lt_acc"] = cm.lt_acc(transferred, target_mask.long().numpy(), reduction="none")
    # ops.warp.epe pools a batch; the same weighted mean per pair:
    error = torch.linalg.vector_norm(pred_flow_t2s - gt_flow_t2s, dim=1)
    fg = target_mask.double()
    area = fg.sum((1, 2))
    out["epe"] = torch.where(area > 0, (error * fg).sum((1, 2)) / area.clamp_min(1), torch.nan).numpy()
    return out


def landmark_pck(pred_flow_s2t: torch.Tensor, keypoints: dict) -> dict[str, float]:
    """``pck_landmarks_*`` of one pair from its ``pair.json`` ``keypoints`` (``source``, ``target``, ``inside``) and
    its predicted ``(2, H, W)`` (or ``(1, 2, H, W)``) pixel ``flow_s2t``; NaN when no landmark stays inside."""
    source = np.asarray(keypoints["source"], np.float64).reshape(-1, 2)
    target = np.asarray(keypoints["target"], np.float64).reshape(-1, 2)
    inside = np.asarray(keypoints["inside"], bool).reshape(-1)
    flow = pred_flow_s2t.detach().double().cpu().reshape(1, 2, *pred_flow_s2t.shape[-2:])
    if not inside.any():
        return {name: float("nan") for name in LANDMARK_PCK}
    moved = cm.transfer_keypoints(flow, torch.from_numpy(source)[None]).numpy()
    return {name: float(cm.pck(moved, target[None], alpha, "bbox", valid=inside[None], reduction="none")[0])
            for name, alpha in LANDMARK_PCK.items()}


def nanmean(values: Any) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


# --------------------------------------------------------------------------------------------- the evaluator

NEEDED = ("source.png", "target.png", "source_mask.png", "target_mask.png", "flow_t2s.npy", "flow_s2t.npy",
          "pair.json", "pred_flow_s2t.npy", "pred_flow_t2s.npy")
FIGURE_PAIRS = 4


class CorrespondenceEvaluator(Evaluator):
    """PCK, mask-transfer IoU, LT-ACC and EPE of ``flow_prediction/1`` samples that carry both predicted flows and
    the pair's masks (:mod:`maskflow.stages.sfnet_predict`), each pair at its own resolution (module docstring).

    Options: ``keypoints`` (pseudo-keypoints per pair, 20), ``keypoint_seed`` (their generator's seed, 0),
    ``figure_pairs`` (pairs drawn in ``keypoints.png``, 4).
    """

    name = "correspondence"
    metric = "pck_10"
    higher_is_better = True
    schema = schema.FLOW_PREDICTION_SCHEMA.name

    def __init__(self, keypoints: int = PSEUDO_KEYPOINTS, keypoint_seed: int = 0, figure_pairs: int = FIGURE_PAIRS):
        self.keypoints, self.keypoint_seed, self.figure_pairs = int(keypoints), int(keypoint_seed), int(figure_pairs)
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict] = []
        self._shown: list[dict] = []

    def predicted_by(self, sample: dict) -> str | None:
        return schema.decode_value(sample[schema.PREDICTION], "json").get("model") \
            if schema.PREDICTION in sample else None

    def process(self, samples: list[dict]) -> None:
        for sample in samples:
            self.rows.append(self._score(sample))

    def _score(self, sample: dict) -> dict:
        missing = [e for e in NEEDED if e not in sample]
        if missing:
            raise JobFailed(f"predictions: sample {sample.get('__key__')} lacks {', '.join(missing)}: the "
                             "correspondence evaluator needs both predicted flows and the pair's masks and flows "
                             "(flow_prediction samples of maskflow.stages.sfnet_predict)")
        d = {e: schema.decode_value(sample[e], e.rsplit(".", 1)[-1]) for e in NEEDED}
        pair = d["pair.json"]
        source_mask, target_mask = d["source_mask.png"] > 0, d["target_mask.png"] > 0
        src, tgt = pseudo_keypoints(source_mask, d["flow_s2t.npy"], int(pair["image_id"]), self.keypoint_seed,
                                    self.keypoints)
        kps = pad_keypoints([(src, tgt)])
        pred_s2t = torch.from_numpy(d["pred_flow_s2t.npy"])[None]
        pred_t2s = torch.from_numpy(d["pred_flow_t2s.npy"])[None]
        values = correspondence_metrics(pred_s2t, pred_t2s, torch.from_numpy(d["flow_t2s.npy"])[None],
                                        torch.from_numpy(source_mask)[None], torch.from_numpy(target_mask)[None],
                                        *kps)
        prediction = schema.decode_value(sample.get(schema.PREDICTION, b"{}"), "json")
        row = {"key": sample["__key__"], "image_id": pair.get("image_id"), "source": pair.get("source", ""),
               "height": int(source_mask.shape[0]), "width": int(source_mask.shape[1]), "keypoints": len(src),
               **{k: float(v[0]) for k, v in values.items()}}
        if pair.get("keypoints"):
            row.update(landmark_pck(pred_s2t, pair["keypoints"]))
            row["landmarks"] = int(np.sum(pair["keypoints"]["inside"]))
        row.update(seconds=float(prediction.get("seconds", float("nan"))), model=prediction.get("model", ""))
        if len(self._shown) < self.figure_pairs:
            moved = cm.transfer_keypoints(pred_s2t[0].double(), torch.from_numpy(src)).numpy()
            self._shown.append({"source": sample["source.png"], "target": sample["target.png"], "points": src,
                                "truth": tgt, "moved": moved, "pck_10": row["pck_10"], "key": row["key"]})
        return row

    def summarize(self) -> EvalResult:
        columns = list(PCK_ALPHAS) + ["mask_iou", "lt_acc", "epe"]
        metrics = {c: nanmean([r[c] for r in self.rows]) for c in columns}
        metrics["pairs"] = float(len(self.rows))
        landmark_rows = [r for r in self.rows if "landmarks" in r]
        if landmark_rows:
            metrics.update({c: nanmean([r[c] for r in landmark_rows]) for c in LANDMARK_PCK})
            metrics["landmark_pairs"] = float(len(landmark_rows))
        seconds = [r["seconds"] for r in self.rows]
        if np.isfinite(np.asarray(seconds, dtype=np.float64)).any():
            metrics["seconds_per_pair"] = nanmean(seconds)
        lines = [f"{len(self.rows)} pairs; PCK@0.1 {metrics['pck_10']:.4f}, PCK@0.05 {metrics['pck_05']:.4f} "
                 f"(pseudo-keypoints, target mask box); mask IoU {metrics['mask_iou']:.4f}; LT-ACC "
                 f"{metrics['lt_acc']:.4f}; EPE {metrics['epe']:.3f} px (target foreground)"]
        if landmark_rows:
            lines.append(f"{len(landmark_rows)} pairs with landmarks: PCK@0.1 {metrics['pck_landmarks_10']:.4f}, "
                         f"PCK@0.05 {metrics['pck_landmarks_05']:.4f} (landmark box)")
        figures = {"keypoints.png": keypoint_figure(self._shown)} if self._shown else {}
        return EvalResult(metrics=metrics, rows=list(self.rows), figures=figures,
                          text={"summary.md": "\n".join(lines) + "\n"})


def keypoint_figure(pairs: list[dict]):
    """One row per pair: the source with its pseudo-keypoints | the target with their true locations (green) and
    where the predicted flow moved them (red, joined to the truth)."""
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2 * len(pairs)), layout="constrained")
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    for (left, right), item in zip(axes, pairs):
        left.imshow(schema.load_png(bytes(item["source"])))
        left.scatter(item["points"][:, 0], item["points"][:, 1], s=12, c="yellow", edgecolors="black", linewidths=0.5)
        left.set_title(f"{item['key']}: source, {len(item['points'])} keypoints", fontsize=9)
        right.imshow(schema.load_png(bytes(item["target"])))
        right.add_collection(LineCollection(np.stack([item["truth"], item["moved"]], 1), colors="white",
                                            linewidths=0.8))
        right.scatter(item["truth"][:, 0], item["truth"][:, 1], s=12, c="lime", label="truth")
        right.scatter(item["moved"][:, 0], item["moved"][:, 1], s=12, c="red", label="predicted")
        right.set_title(f"target: PCK@0.1 {item['pck_10']:.2f}", fontsize=9)
        right.legend(loc="lower right", fontsize=7)
        for ax in (left, right):
            ax.set_axis_off()
    return fig
