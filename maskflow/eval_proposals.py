"""Evaluate stored segment proposals (``proposals`` samples, see :mod:`maskflow.data.schema`) with COCO AR.

Uses each sample's stored ``proposals.json["iou"]`` (k x G, ground truths in ``json.annotations`` order) and the
annotations' ``iscrowd`` flags; no mask is decoded here. See :func:`ops.metrics.proposal_recall` for the metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from maskflow.config import Uri, require
from maskflow.data.schema import META, PROPOSALS, loads
from maskflow.runtime import Common
from ops.metrics import IOU_THRESHOLDS, proposal_recall

__all__ = ["evaluate_proposal_samples", "format_table", "EvaluateProposalsConfig", "evaluate_job"]


def _parsed(value: Any) -> dict:
    return loads(value) if isinstance(value, (bytes, bytearray, str)) else value


def _image_arrays(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(iou k x G sorted by descending score, crowd flags G) of one sample."""
    meta = _parsed(sample[META])
    props = _parsed(sample[PROPOSALS])
    anns = meta.get("annotations", [])
    crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    G = crowd.shape[0]
    scores = np.asarray(props.get("scores", []), dtype=np.float64).reshape(-1)
    iou = np.asarray(props.get("iou", []), dtype=np.float64)
    if iou.ndim != 2:
        if iou.size:
            raise ValueError(f"proposals.json iou must be k x G, got shape {iou.shape}")
        iou = iou.reshape(scores.shape[0], G) if G == 0 else iou.reshape(0, G)
    if iou.shape != (scores.shape[0], G):
        raise ValueError(
            f"image {meta.get('image_id')}: iou shape {iou.shape} but {scores.shape[0]} scores, {G} annotations"
        )
    order = np.argsort(-scores, kind="mergesort")  # stable, as COCOeval sorts detections
    return iou[order], crowd


def evaluate_proposal_samples(samples: Iterable[dict], max_proposals: Iterable[int] = (10, 100, 1000)) -> dict:
    """COCO AR@k of the proposals in ``samples`` (dicts with ``"json"`` and ``"proposals.json"``, bytes or parsed).

    Returns :func:`ops.metrics.proposal_recall`'s dict plus ``num_proposals_mean`` (mean proposals per image).
    """
    ious: list[np.ndarray] = []
    crowds: list[np.ndarray] = []
    for sample in samples:
        iou, crowd = _image_arrays(sample)
        ious.append(iou)
        crowds.append(crowd)
    result = proposal_recall(ious, crowds, max_proposals=tuple(max_proposals), thresholds=IOU_THRESHOLDS)
    result["num_proposals_mean"] = float(np.mean([m.shape[0] for m in ious])) if ious else 0.0
    return result


def format_table(result: dict) -> str:
    """Fixed-width two-line table, e.g. ``AR@10  AR@100  AR@1000`` over the values with 3 decimals."""
    ks = sorted(int(k) for k in result["recall"])
    heads = [f"AR@{k}" for k in ks]
    widths = [max(len(h), 5) for h in heads]
    head = "  ".join(h.rjust(w) for h, w in zip(heads, widths))
    vals = "  ".join(f"{result[h]:.3f}".rjust(w) for h, w in zip(heads, widths))
    return f"{head}\n{vals}"


# --------------------------------------------------------------------------------------------- the evaluation job


@dataclass
class ModelRef:
    name: str = ""  # registered model the proposals came from ("" = none: metrics stay on the run)
    version: str = ""  # its version; the metrics are attached to it for promotion


@dataclass
class EvaluateProposalsConfig(Common):
    proposals: Uri = ""  # a proposals stage output (directory with manifest.json)
    max_proposals: list[int] = field(default_factory=lambda: [10, 100, 1000])
    model: ModelRef = field(default_factory=ModelRef)

    def validate(self) -> None:
        require(bool(self.proposals), "proposals", "required: the proposals shards' directory URI")
        require(all(k > 0 for k in self.max_proposals), "max_proposals", "must be positive")


def evaluate_job(cfg: EvaluateProposalsConfig) -> dict:
    """AR@k and recall-vs-IoU of a proposals output, as an MLflow evaluation run with a plot; the metrics are
    attached to the model version when one is named (for :func:`maskflow.tracking.promote`)."""
    import os
    import tempfile

    import mlflow

    from maskflow import shards, storage, tracking
    from ops.metrics import plot_recall_curves

    options = cfg.storage.options()
    storage.check_uri(storage.join(cfg.proposals, shards.MANIFEST), for_write=False, options=options,
                      what="proposals (manifest)")
    result = evaluate_proposal_samples(shards.iter_samples(cfg.proposals, options), cfg.max_proposals)
    # MLflow metric names allow no '@': AR@100 is logged as AR_100.
    metrics = {f"AR_{k}": result[f"AR@{k}"] for k in cfg.max_proposals}
    tags = {"maskflow.proposals": cfg.proposals}
    if cfg.model.name:
        tags.update({"maskflow.model_name": cfg.model.name, "maskflow.model_version": cfg.model.version})
    with tracking.job_run(cfg.tracking, "evaluate-proposals", cfg, tags, options) as run:
        mlflow.log_metrics({**metrics, "num_images": result["num_images"], "num_gt": result["num_gt"],
                            "num_proposals_mean": result["num_proposals_mean"]})
        for k in cfg.max_proposals:
            for t, r in zip(result["thresholds"], result["recall"][k]):
                mlflow.log_metric(f"recall_{k}_vs_iou", float(r), step=int(round(float(t) * 100)))
        with tempfile.TemporaryDirectory() as d:
            plot = plot_recall_curves(result, os.path.join(d, "recall_curves.png"), title=cfg.proposals)
            mlflow.log_artifact(plot)
        mlflow.log_text(format_table(result), "ar_table.txt")
        result["run_id"] = run.info.run_id
    if cfg.model.name and cfg.model.version:
        tracking.record_evaluation(cfg.model.name, cfg.model.version, metrics, result["run_id"])
    return result
