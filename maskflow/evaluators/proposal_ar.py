"""Segment-proposal recall (COCO AR@k), the metric of FFD-Net (Zhang & He, ICCV 2017, sec. 4.1), over stored
``proposals/1`` samples (:mod:`maskflow.stages.proposals`).

Uses each sample's stored ``proposals.json["iou"]`` (k x G, ground truths in ``json.annotations`` order) and the
annotations' ``iscrowd`` flags; no mask is decoded here. See :func:`ops.metrics.proposal_recall` for the metric
(= pycocotools' COCOeval, class-agnostic): each image is matched once, and the matched counts are pooled over images,
so the per-image table and the pooled AR come from the same pass.

:class:`ProposalAR` is the evaluator (headline ``AR_100``: MLflow metric names allow no ``@``);
:func:`evaluate_proposal_samples` the same numbers as a function; :class:`EvaluateProposalsConfig` and
:func:`evaluate_proposals` the ``pipelines/evaluate_proposals.py`` job on the evaluation harness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from maskflow.config import Uri, require
from maskflow.data.schema import META, PROPOSALS, PROPOSALS_SCHEMA, loads
from maskflow.evaluate import EvalResult, Evaluator
from maskflow.runtime import Common
from ops.metrics import IOU_THRESHOLDS, proposal_recall

__all__ = ["ProposalAR", "evaluate_proposal_samples", "format_table", "EvaluateProposalsConfig",
           "evaluate_proposals"]


def _parsed(value: Any) -> dict:
    return loads(value) if isinstance(value, (bytes, bytearray, str)) else value


def _image_arrays(sample: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(iou k x G sorted by descending score, crowd flags G, the sort order) of one sample."""
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
    return iou[order], crowd, order


class ProposalAR(Evaluator):
    """COCO AR@k of class-agnostic segment proposals, pooled over images, with recall-vs-IoU curves.

    Options: ``max_proposals`` (the k of AR@k, default 10, 100, 1000). Headline metric ``AR_100``, or AR at the
    largest k when 100 is not among them. Per image (``items.csv``): ground truths (non-crowd, crowd), proposals,
    AR@k, and the mean over ground truths of the best proposal's IoU.

    AR@k is reported only for the k the proposals can tell apart: with at most ``m`` proposals per image, AR@k for
    every k >= m is the same number, so only the smallest such k (and the headline) is kept and the summary says
    why the others are missing (a job that kept 100 proposals reports no AR@1000).

    Beside a baseline (:meth:`compare`: refined against unrefined proposals of the same images, in proposal order)
    it draws both sets of curves in one figure and adds FFD-Net's IoU-bin table (sec. 4.2.1): per bin of a
    proposal's initial best IoU, [0.5, 0.6) ... [0.9, 1.0], its mean best IoU before and after.
    """

    name = "proposal_ar"
    metric = "AR_100"
    higher_is_better = True
    schema = PROPOSALS_SCHEMA.name

    def __init__(self, max_proposals: Iterable[int] = (10, 100, 1000)):
        ks = [int(k) for k in max_proposals]
        if not ks or min(ks) < 1:
            raise ValueError(f"max_proposals must be positive, got {list(max_proposals)}")
        self.max_proposals = sorted(set(ks))
        if 100 not in self.max_proposals:
            self.metric = f"AR_{self.max_proposals[-1]}"
        self.result: dict | None = None  # the last summary, as proposal_recall returns it (+ num_proposals_mean)
        self.reset()

    def reset(self) -> None:
        self._matched = np.zeros((IOU_THRESHOLDS.shape[0], len(self.max_proposals)), dtype=np.int64)  # (T, K)
        self._num_gt = 0
        self._num_proposals: list[int] = []
        self._rows: list[dict] = []
        self._best_iou: dict[str, np.ndarray] = {}  # key -> each proposal's best non-crowd IoU, in stored order

    def process(self, samples: list[dict]) -> None:
        for sample in samples:
            iou, crowd, order = _image_arrays(sample)
            image = proposal_recall([iou], [crowd], max_proposals=self.max_proposals, thresholds=IOU_THRESHOLDS)
            num_gt = image["num_gt"]
            if num_gt:  # recall = matched / num_gt exactly, so the matched counts are recovered exactly
                recall = np.stack([image["recall"][k] for k in self.max_proposals], axis=1)
                self._matched += np.rint(recall * num_gt).astype(np.int64)
            self._num_gt += num_gt
            self._num_proposals.append(iou.shape[0])
            meta = _parsed(sample[META])
            non_crowd = iou[:, ~crowd]
            best = np.zeros(iou.shape[0])
            if non_crowd.size:
                best[order] = non_crowd.max(axis=1)
            self._best_iou[str(sample.get("__key__"))] = best.astype(np.float32)
            self._rows.append({
                "key": sample.get("__key__"), "image_id": meta.get("image_id"), "file_name": meta.get("file_name"),
                "num_gt": num_gt, "num_crowd": int(crowd.sum()), "num_proposals": int(iou.shape[0]),
                **{f"AR_{k}": image[f"AR@{k}"] for k in self.max_proposals},
                "mean_best_iou": float(non_crowd.max(axis=0).mean()) if non_crowd.size else float("nan"),
            })

    def recall_result(self) -> dict:
        """The pooled numbers in :func:`ops.metrics.proposal_recall`'s form, plus ``num_proposals_mean``."""
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = self._matched / self._num_gt if self._num_gt else np.full(self._matched.shape, np.nan)
        result: dict = {f"AR@{k}": float(recall[:, j].mean()) if self._num_gt else float("nan")
                        for j, k in enumerate(self.max_proposals)}
        result["recall"] = {k: recall[:, j].copy() for j, k in enumerate(self.max_proposals)}
        result["thresholds"] = IOU_THRESHOLDS.copy()
        result["num_gt"] = self._num_gt
        result["num_images"] = len(self._num_proposals)
        result["num_proposals_mean"] = float(np.mean(self._num_proposals)) if self._num_proposals else 0.0
        return result

    def reported_ks(self) -> list[int]:
        """The k of AR@k worth reporting: those below the most proposals any image has, the smallest k at or above
        it, and the headline's k (see the class docstring)."""
        most = max(self._num_proposals, default=0)
        headline = int(self.metric.split("_")[1])
        ks, covered = [], False
        for k in self.max_proposals:
            if not covered or k == headline:
                ks.append(k)
            covered = covered or k >= most
        return ks

    def summarize(self) -> EvalResult:
        from maskflow.viz import recall_curves_figure

        full = self.result = self.recall_result()
        ks = self.reported_ks()
        result = {**full, "recall": {k: full["recall"][k] for k in ks}}
        for k in self.max_proposals:
            if k not in ks:
                result.pop(f"AR@{k}")
        metrics = {f"AR_{k}": result[f"AR@{k}"] for k in ks}
        metrics.update(num_images=result["num_images"], num_gt=result["num_gt"],
                       num_proposals_mean=result["num_proposals_mean"],
                       num_proposals_max=float(max(self._num_proposals, default=0)))
        table = format_table(result)
        dropped = [k for k in self.max_proposals if k not in ks]
        if dropped:
            table += (f"\n(AR@{', AR@'.join(map(str, dropped))} not reported: at most "
                      f"{max(self._num_proposals, default=0)} proposals per image, so they equal AR@{ks[-1]})")
        # recall vs IoU threshold as step series: step = threshold in hundredths (50, 55, ..., 95)
        series = {f"recall_{k}_vs_iou": [(int(round(float(t) * 100)), float(r))
                                         for t, r in zip(result["thresholds"], result["recall"][k])] for k in ks}
        return EvalResult(metrics=metrics, rows=list(self._rows),
                          figures={"recall_curves.png": recall_curves_figure(result)},
                          text={"ar_table.txt": table}, series=series)

    def has_gain(self, metric: str) -> bool:
        return metric.startswith("AR_")  # not of the counts of images, ground truths, proposals

    def compare(self, result: EvalResult, baseline: Evaluator, baseline_result: EvalResult,
                labels: tuple[str, str]) -> EvalResult:
        from maskflow.viz import recall_curves_figure

        out = super().compare(result, baseline, baseline_result, labels)
        label, base_label = labels
        assert isinstance(baseline, ProposalAR) and self.result is not None and baseline.result is not None
        curves = {}
        for name, ev in ((label, self), (base_label, baseline)):
            ks = ev.reported_ks()
            curves[name] = {**ev.result, "recall": {k: ev.result["recall"][k] for k in ks}}
        out.figures = {"recall_curves.png": recall_curves_figure(curves, f"{label} vs. {base_label}")}
        bins = iou_bin_table(baseline._best_iou, self._best_iou)
        out.text = {"ar_table.txt": f"{label}\n{result.text['ar_table.txt']}\n\n{base_label}\n"
                                    f"{baseline_result.text['ar_table.txt']}",
                    "iou_bins.txt": format_iou_bins(bins, labels)}
        for row in bins:
            if row["proposals"]:
                lo = int(round(row["low"] * 100))
                out.metrics[f"iou_bin_{lo}/gain"] = row["gain"]
        return out

    def predicted_by(self, sample: dict) -> str | None:
        return _parsed(sample[PROPOSALS]).get("model")


IOU_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)  # FFD-Net's initial-IoU bins (sec. 4.2.1), the last one closed


def iou_bin_table(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> list[dict]:
    """Per bin of initial best IoU: proposals, mean best IoU before and after, and the relative gain. Proposals are
    paired by image key and position (a refiner keeps its input's order); images or positions only one side has
    are left out."""
    paired_before, paired_after = [], []
    for key, b in before.items():
        a = after.get(key)
        if a is None:
            continue
        n = min(len(a), len(b))
        paired_before.append(b[:n])
        paired_after.append(a[:n])
    b = np.concatenate(paired_before) if paired_before else np.zeros(0)
    a = np.concatenate(paired_after) if paired_after else np.zeros(0)
    rows = []
    for lo, hi in zip(IOU_BINS[:-1], IOU_BINS[1:]):
        sel = (b >= lo) & (b < hi)
        n = int(sel.sum())
        mb = float(b[sel].mean()) if n else float("nan")
        ma = float(a[sel].mean()) if n else float("nan")
        rows.append({"low": lo, "high": min(hi, 1.0), "proposals": n, "before": mb, "after": ma,
                     "gain": (ma - mb) / mb if n else float("nan")})
    return rows


def format_iou_bins(rows: list[dict], labels: tuple[str, str]) -> str:
    label, base_label = labels
    lines = [f"{'initial IoU':<12} {'proposals':>9} {base_label[:10]:>10} {label[:10]:>10} {'gain':>8}"]
    for r in rows:
        close = "]" if r["high"] >= 1.0 else ")"
        lines.append(f"[{r['low']:.1f}, {r['high']:.1f}{close:<3} {r['proposals']:>9} {r['before']:>10.3f} "
                     f"{r['after']:>10.3f} {100 * r['gain']:>7.2f}%")
    return "\n".join(lines)


def evaluate_proposal_samples(samples: Iterable[dict], max_proposals: Iterable[int] = (10, 100, 1000)) -> dict:
    """COCO AR@k of the proposals in ``samples`` (dicts with ``"json"`` and ``"proposals.json"``, bytes or parsed).

    Returns :func:`ops.metrics.proposal_recall`'s dict plus ``num_proposals_mean`` (mean proposals per image).
    """
    evaluator = ProposalAR(max_proposals)
    for sample in samples:
        evaluator.process([sample])
    return evaluator.recall_result()


def format_table(result: dict) -> str:
    """Fixed-width two-line table, e.g. ``AR@10  AR@100  AR@1000`` over the values with 3 decimals."""
    ks = sorted(int(k) for k in result["recall"])
    heads = [f"AR@{k}" for k in ks]
    widths = [max(len(h), 5) for h in heads]
    head = "  ".join(h.rjust(w) for h, w in zip(heads, widths))
    vals = "  ".join(f"{result[h]:.3f}".rjust(w) for h, w in zip(heads, widths))
    return f"{head}\n{vals}"


# --------------------------------------------------------------------------------------------- the proposals job


@dataclass
class ModelRef:
    name: str = ""  # registered model the proposals came from ("" = none: metrics stay on the run)
    version: str = ""  # its version; the metrics are attached to it for promotion

    def validate(self) -> None:
        require(bool(self.name) == bool(self.version), "version" if self.name else "name",
                "model.name and model.version go together (or use pipelines/evaluate.py model=models:/name@alias)")


@dataclass
class EvaluateProposalsConfig(Common):
    """``pipelines/evaluate_proposals.py``'s config: :class:`maskflow.evaluate.EvaluateConfig` with
    ``evaluator=proposal_ar``, in the keys that command has always taken."""

    proposals: Uri = ""  # a proposals stage output (directory with manifest.json)
    max_proposals: list[int] = field(default_factory=lambda: [10, 100, 1000])
    model: ModelRef = field(default_factory=ModelRef)

    def validate(self) -> None:
        require(bool(self.proposals), "proposals", "required: the proposals shards' directory URI")
        require(bool(self.max_proposals) and all(k > 0 for k in self.max_proposals), "max_proposals",
                "must be positive")


def evaluate_proposals(cfg: EvaluateProposalsConfig) -> dict:
    """AR@k of a proposals output on the evaluation harness (:func:`maskflow.evaluate.evaluate_job`), attached to
    the model version when one is named. Returns :func:`evaluate_proposal_samples`'s dict (AR@k for the reported k
    only: :meth:`ProposalAR.reported_ks`) plus ``run_id`` and the harness's return value under ``"evaluation"``."""
    from maskflow.evaluate import EvaluateConfig, evaluate_job

    job = EvaluateConfig(ray=cfg.ray, storage=cfg.storage, tracking=cfg.tracking, evaluator=ProposalAR.name,
                         predictions=cfg.proposals, options={"max_proposals": list(cfg.max_proposals)},
                         model=f"models:/{cfg.model.name}/{cfg.model.version}" if cfg.model.name else "")
    job.validate()
    evaluator = ProposalAR(cfg.max_proposals)
    evaluation = evaluate_job(job, evaluator)
    # AR@k only for the k the kept proposals tell apart (as the evaluation run reports them): a demo keeping 100
    # proposals an image would otherwise print an AR@1000 that is its AR@100
    full, ks = evaluator.result, evaluator.reported_ks()
    result = {k: v for k, v in full.items() if not (k.startswith("AR@") and int(k[3:]) not in ks)}
    result["recall"] = {k: full["recall"][k] for k in ks}
    return {**result, "run_id": evaluation["run_id"], "evaluation": evaluation}
