"""Dense-flow end-point error (EPE) of ``flow_prediction/1`` samples: HSTN planar alignment (Shu et al.,
section 4.2, Table 2) and any other model or baseline that predicts ``flow_t2s`` for pairs.

EPE of one pair = the mean over its evaluated pixels of ``||pred(p) - gt(p)||_2`` (:func:`ops.warp.epe`), in pixels
of the pair's own resolution. The evaluated pixels are the central box of ``central_fraction`` of each side (the
paper evaluates "only on the central part of each image" to avoid the background; it gives no size, 0.5 here),
intersected with the target's valid region (pixels whose ground-truth source location is inside the source,
``ops.warp.valid_mask``; elsewhere no flow is defined). The headline ``EPE`` is the mean over pairs (each pair
counts once, whatever its size); lower is better. ``EPE_valid`` is the same over the whole valid region.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from maskflow.data import schema
from maskflow.evaluate import EvalResult, Evaluator

if TYPE_CHECKING:
    import torch

__all__ = ["central_mask", "pair_epe", "FlowEPE", "CENTRAL_FRACTION"]

CENTRAL_FRACTION = 0.5
OVERLAY_PAIRS = 4  # pairs drawn in the overlay figure


def central_mask(height: int, width: int, fraction: float = CENTRAL_FRACTION, device=None) -> "torch.Tensor":
    """(1, 1, H, W) float: 1 inside the central box whose sides are ``fraction`` of the image's (rounded to whole
    pixels, centred), 0 outside."""
    import torch

    def band(size: int):
        margin = int(round(size * (1.0 - fraction) / 2.0))
        axis = torch.zeros(size, device=device)
        axis[margin:max(margin + 1, size - margin)] = 1.0
        return axis

    return (band(height)[:, None] * band(width)[None, :])[None, None]


def pair_epe(pred: "torch.Tensor", gt: "torch.Tensor", central_fraction: float | None = CENTRAL_FRACTION
             ) -> "torch.Tensor":
    """Per-pair EPE, (N,), of (N, 2, H, W) pixel flows over the central box (``None``: everywhere) intersected with
    the ground truth's valid region; NaN for a pair with no such pixel (the harness and :class:`FlowEPE` then leave
    it out of the mean)."""
    import torch

    from ops.warp import valid_mask

    if pred.shape != gt.shape:
        raise ValueError(f"predicted flow {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    pred, gt = pred.double(), gt.double()
    region = valid_mask(gt)[:, 0]
    if central_fraction is not None:
        region = region * central_mask(*gt.shape[-2:], central_fraction, device=gt.device)[:, 0]
    err = torch.linalg.vector_norm(pred - gt, dim=1)
    pixels = region.sum(dim=(1, 2))
    return torch.where(pixels > 0, (err * region).sum(dim=(1, 2)) / pixels.clamp_min(1.0),
                       torch.full_like(pixels, float("nan")))


def _json(value: Any) -> dict:
    return schema.decode_value(value, "json")


class FlowEPE(Evaluator):
    """EPE of predicted ``flow_t2s`` against the pairs' ground truth; per-pair rows, and an overlay figure of the
    first pairs (source, target, source warped by the prediction, end-point error map)."""

    name = "flow_epe"
    metric = "EPE"
    higher_is_better = False
    schema = schema.FLOW_PREDICTION_SCHEMA.name

    def __init__(self, central_fraction: float = CENTRAL_FRACTION):
        if not 0 < central_fraction <= 1:
            raise ValueError(f"central_fraction must be in (0, 1], got {central_fraction}")
        self.central_fraction = float(central_fraction)
        self.reset()

    def predicted_by(self, sample: dict) -> str | None:
        return schema.decode_value(sample[schema.PREDICTION], "json").get("model")

    def reset(self) -> None:
        self.rows: list[dict] = []
        self._shown: list[dict] = []

    def process(self, samples: list[dict]) -> None:
        import torch

        for sample in samples:
            pair = _json(sample["pair.json"])
            prediction = _json(sample[schema.PREDICTION])
            gt = torch.from_numpy(schema.load_npy(bytes(sample["flow_t2s.npy"])))[None]
            pred = torch.from_numpy(schema.load_npy(bytes(sample["pred_flow_t2s.npy"])))[None]
            central = float(pair_epe(pred, gt, self.central_fraction)[0])
            valid = float(pair_epe(pred, gt, None)[0])
            self.rows.append({
                "key": sample["__key__"], "image_id": pair.get("image_id"), "source": pair.get("source", ""),
                "height": int(gt.shape[-2]), "width": int(gt.shape[-1]), "epe": central, "epe_valid": valid,
                "seconds": float(prediction.get("seconds", float("nan"))), "model": prediction.get("model", ""),
            })
            if len(self._shown) < OVERLAY_PAIRS:
                self._shown.append({"source": sample["source.png"], "target": sample["target.png"], "gt": gt,
                                    "pred": pred, "epe": central})

    def summarize(self) -> EvalResult:
        epe = np.array([r["epe"] for r in self.rows], dtype=np.float64)
        valid = np.array([r["epe_valid"] for r in self.rows], dtype=np.float64)
        seconds = np.array([r["seconds"] for r in self.rows], dtype=np.float64)
        metrics = {
            "EPE": _nanmean(epe),
            "EPE_valid": _nanmean(valid),
            "pairs": float(len(self.rows)),
            "pairs_without_central_valid_pixels": float(np.isnan(epe).sum()),
        }
        if np.isfinite(seconds).any():
            metrics["seconds_per_pair"] = _nanmean(seconds)
        figures = {"overlay.png": overlay_figure(self._shown, self.central_fraction)} if self._shown else {}
        text = {"summary.md": (f"EPE (central {self.central_fraction:g} of each side, px at the pairs' resolution): "
                               f"{metrics['EPE']:.4f} over {len(self.rows)} pairs; over the whole valid region: "
                               f"{metrics['EPE_valid']:.4f}\n")}
        return EvalResult(metrics=metrics, rows=list(self.rows), figures=figures, text=text)


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def overlay_figure(pairs: list[dict], central_fraction: float):
    """One row per pair: source | target | source warped by the predicted flow | end-point error map (px, the
    central box outlined)."""
    import torch
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from ops.warp import warp

    fig = Figure(figsize=(12, 3 * len(pairs)), layout="constrained")
    axes = fig.subplots(len(pairs), 4, squeeze=False)
    for row, item in zip(axes, pairs):
        source = schema.load_png(bytes(item["source"]))
        target = schema.load_png(bytes(item["target"]))
        image = torch.from_numpy(np.ascontiguousarray(source)).float()
        image = image.permute(2, 0, 1)[None] if image.dim() == 3 else image[None, None]
        warped = warp(image, item["pred"].float())[0]
        warped = warped.permute(1, 2, 0).squeeze(-1).clamp(0, 255).to(torch.uint8).numpy()
        error = torch.linalg.vector_norm(item["pred"] - item["gt"], dim=1)[0].numpy()
        for ax, picture, title in zip(row, (source, target, warped),
                                      ("source", "target", "source warped by prediction")):
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            ax.set_title(title)
        shown = row[3].imshow(error, cmap="magma", vmin=0)
        row[3].set_title(f"end-point error (px), EPE {item['epe']:.2f}")
        height, width = error.shape
        mh, mw = height * (1 - central_fraction) / 2, width * (1 - central_fraction) / 2
        row[3].add_patch(Rectangle((mw - 0.5, mh - 0.5), width - 2 * mw, height - 2 * mh, fill=False, color="cyan"))
        fig.colorbar(shown, ax=row[3], shrink=0.8)
        for ax in row:
            ax.set_axis_off()
    return fig
