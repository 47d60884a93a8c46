"""SFNet (Lee et al., CVPR 2019) and its affine-regression baseline on the trainer harness.

    python trainers/sfnet.py --config conf/sfnet/cpu.yaml [key=value ...]
    python trainers/sfnet.py --config conf/sfnet/affine_baseline_cpu.yaml

Trains from ``pair/1`` shards (:mod:`maskflow.stages.affine_pairs`: source, target, foreground masks, exact flows
both ways), resized to ``model.image_size`` square. ``model.variant`` picks the plugin:

* ``sfnet`` — :class:`SFNetPlugin` (kind ``sfnet``): the paper's loss (eq. 4), three weighted terms
  ``loss_mask``, ``loss_flow``, ``loss_smooth`` from :mod:`ops.sfnet` on the G x G masks (eq. 7, 8-9, 10). The
  paper's weights (3, 16, 0.5) were grid-searched with flows in grid_sample units on the G-point grid
  (``linspace(-1, 1, G)``: one cell = 2/(G-1) units); :mod:`ops.sfnet`'s flows are in cells, F_cell = F_norm (G-1)/2.
  The mask term is unit-free, the flow term a squared norm (x ((G-1)/2)^2 in cells), the smoothness term an L1 of
  differences (x (G-1)/2), so the same objective needs ``lambda'_flow = lambda_flow (2/(G-1))^2`` and
  ``lambda'_smooth = lambda_smooth 2/(G-1)`` (``ops.sfnet.sfnet_loss_weights``; at G = 16: 3, 0.2844, 0.0667).
  ``loss.lambda_*`` hold the paper's values; the conversion is made here, in code. Step metrics (logged, not
  optimised): the unweighted terms and the EPE of F^t against the ground truth on the target foreground, in cells.
* ``affine_baseline`` — :class:`AffineRegressionPlugin` (kind ``sfnet_affine_baseline``): CNNGeometric's supervised
  objective on the same pairs, stated as a flow loss: the mean squared end-point error, in cells, of the predicted
  F^t (the flow of the regressed affine) against the pair's ground-truth ``flow_t2s`` sampled on the G x G grid, over
  the target foreground (CNNGeometric's "grid loss" is this on a uniform grid of points; here on the object, as
  SFNet's losses are). ``loss.lambda_*`` are not used.

Validation (both): per pair ``pck_10``, ``pck_05``, ``mask_iou``, ``lt_acc``, ``epe``
(:func:`maskflow.evaluators.correspondence.correspondence_metrics`), in pixels of the ``image_size`` square pair, with
K = 20 pseudo-keypoints from ``default_rng([input.keypoint_seed, image_id])``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskflow import config
from maskflow.config import require
from maskflow.models.sfnet_config import SFNetConfig
from maskflow.train.config import TrainJobConfig
from maskflow.train.plugin import ModelPlugin, StepOutput

if TYPE_CHECKING:  # torch loads in the workers, and on the driver only once the config has parsed
    import numpy as np
    import torch

# pair/1 entries (maskflow.stages.affine_pairs; not imported here: it loads torch)
SOURCE, TARGET = "source.png", "target.png"
SOURCE_MASK, TARGET_MASK = "source_mask.png", "target_mask.png"
FLOW_T2S, FLOW_S2T, PAIR = "flow_t2s.npy", "flow_s2t.npy", "pair.json"
PAIR_FIELDS = (SOURCE, TARGET, SOURCE_MASK, TARGET_MASK, FLOW_T2S, FLOW_S2T, PAIR)


@dataclass
class SFNetLossConfig:
    """Eq. 4's weights as the paper states them (sec. 4.1), converted to ``flow_units`` in code."""

    lambda_mask: float = 3.0
    lambda_flow: float = 16.0
    lambda_smooth: float = 0.5
    # The units of ops.sfnet's flows, which the paper's weights (grid_sample units) are converted to. Cells are the
    # only ones: the key is there so a config says what its lambdas are not.
    flow_units: Literal["cells"] = "cells"

    def validate(self) -> None:
        for key in ("lambda_mask", "lambda_flow", "lambda_smooth"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")


@dataclass
class PairInputConfig:
    """How ``pair/1`` samples become a batch (besides ``model.image_size``)."""

    mask_threshold: float = 0.1  # G x G masks: foreground fraction above this (the released code binarises at 0.1)
    keypoints: int = 20  # pseudo-keypoints per validation pair (MODELS.md section 5)
    keypoint_seed: int = 0  # their generator: default_rng([keypoint_seed, image_id])

    def validate(self) -> None:
        require(0 <= self.mask_threshold < 1, "mask_threshold", f"must be in [0, 1), got {self.mask_threshold}")
        require(self.keypoints >= 1, "keypoints", f"must be >= 1, got {self.keypoints}")


@dataclass
class SFNetTrainConfig(TrainJobConfig):
    model: SFNetConfig = field(default_factory=SFNetConfig)
    loss: SFNetLossConfig = field(default_factory=SFNetLossConfig)
    input: PairInputConfig = field(default_factory=PairInputConfig)


# --------------------------------------------------------------------------------------------- batches


def decode_pair_rows(batch: dict) -> list[dict]:
    """A Ray Data numpy batch of raw ``pair/1`` rows -> decoded samples (numpy arrays, parsed ``pair.json``)."""
    from maskflow.data import schema

    missing = [f for f in PAIR_FIELDS if f not in batch]
    if missing:
        raise ValueError(f"data: batch lacks pair/1 entries {missing} (columns: {sorted(batch)}): not pair shards?")
    n = len(batch[SOURCE])
    rows = []
    for i in range(n):
        rows.append({
            SOURCE: schema.load_png(bytes(batch[SOURCE][i])), TARGET: schema.load_png(bytes(batch[TARGET][i])),
            SOURCE_MASK: schema.load_png(bytes(batch[SOURCE_MASK][i])) > 0,
            TARGET_MASK: schema.load_png(bytes(batch[TARGET_MASK][i])) > 0,
            FLOW_T2S: schema.load_npy(bytes(batch[FLOW_T2S][i])), FLOW_S2T: schema.load_npy(bytes(batch[FLOW_S2T][i])),
            PAIR: schema.loads(bytes(batch[PAIR][i])),
        })
    return rows


def pair_batch(rows: list[dict], model_cfg: SFNetConfig, input_cfg: PairInputConfig) -> dict[str, "torch.Tensor"]:
    """Decoded pairs -> the model batch, everything resized to the ``S x S`` input (align_corners=True):

    ``source``/``target`` (N, 3, S, S) float in [0, 1]; ``source_mask``/``target_mask`` (N, 1, G, G) {0, 1} (the
    losses' masks); ``flow_t2s`` (N, 2, S, S) ground truth in pixels of the S x S pair; ``source_mask_full`` /
    ``target_mask_full`` (N, S, S) bool; ``keypoints_source``/``keypoints_target`` (N, K, 2) pixels of the S x S pair
    with ``keypoints_valid`` (N, K); ``image_id`` (N,).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from maskflow.evaluators.correspondence import pad_keypoints, pseudo_keypoints
    from maskflow.models.sfnet import mask_to_grid, resize_flow, resize_image

    size, grid = model_cfg.image_size, model_cfg.grid
    out: dict[str, list] = {k: [] for k in ("source", "target", "source_mask", "target_mask", "flow_t2s",
                                            "source_mask_full", "target_mask_full")}
    keypoint_sets, image_ids = [], []
    for row in rows:  # pairs differ in size: one resize each (per pair, never per pixel)
        h, w = row[SOURCE_MASK].shape
        out["source"].append(resize_image(row[SOURCE], size))
        out["target"].append(resize_image(row[TARGET], size))
        masks = torch.from_numpy(np.stack([row[SOURCE_MASK], row[TARGET_MASK]]))[:, None].float()  # (2, 1, H, W)
        coarse = mask_to_grid(masks, grid, grid, input_cfg.mask_threshold)
        out["source_mask"].append(coarse[0])
        out["target_mask"].append(coarse[1])
        full = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=True)[:, 0] > 0.5
        out["source_mask_full"].append(full[0])
        out["target_mask_full"].append(full[1])
        out["flow_t2s"].append(resize_flow(torch.from_numpy(row[FLOW_T2S])[None], size, size)[0])
        image_id = int(row[PAIR]["image_id"])
        src, tgt = pseudo_keypoints(row[SOURCE_MASK], row[FLOW_S2T], image_id, input_cfg.keypoint_seed,
                                    input_cfg.keypoints)
        to_input = np.array([(size - 1) / max(w - 1, 1), (size - 1) / max(h - 1, 1)])  # px of H x W -> of S x S
        keypoint_sets.append((src * to_input, tgt * to_input))
        image_ids.append(image_id)
    batch = {k: torch.stack(v) for k, v in out.items()}
    batch["keypoints_source"], batch["keypoints_target"], batch["keypoints_valid"] = pad_keypoints(keypoint_sets)
    batch["image_id"] = torch.tensor(image_ids, dtype=torch.int64)
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- plugins


class _PairPlugin(ModelPlugin):
    """What SFNet and its baseline share: data, model building, validation."""

    def build_model(self):
        from maskflow.models.sfnet import build_sfnet

        return build_sfnet(self.cfg.model)

    def collate(self, batch: dict, rng: "np.random.Generator | None") -> dict:
        # No augmentation here: the pairs stage draws the geometry and the colour jitter (several pairs per image
        # with pairs.per_image), so rng is unused.
        return pair_batch(decode_pair_rows(batch), self.cfg.model, self.cfg.input)

    def ground_truth_cells(self, batch: dict) -> "torch.Tensor":
        """The ground-truth F^t on the G x G grid, in cells."""
        from maskflow.models.sfnet import resize_flow

        g = self.cfg.model.grid
        return resize_flow(batch["flow_t2s"], g, g)

    def validation_step(self, model, batch: dict, device) -> dict:
        from maskflow.evaluators.correspondence import correspondence_metrics
        from maskflow.models.sfnet import resize_flow

        b = to_device(batch, device)
        out = model(b["source"], b["target"])
        size = self.cfg.model.image_size
        return correspondence_metrics(
            resize_flow(out.flow_s2t, size, size), resize_flow(out.flow_t2s, size, size), b["flow_t2s"],
            b["source_mask_full"], b["target_mask_full"], batch["keypoints_source"], batch["keypoints_target"],
            batch["keypoints_valid"])


def foreground_epe(flow: "torch.Tensor", gt: "torch.Tensor", mask: "torch.Tensor", squared: bool = False):
    """Mean (squared) end-point error over each pair's foreground, then over the batch."""
    err = (flow - gt).pow(2).sum(1, keepdim=True)
    if not squared:
        err = err.sqrt()
    return ((err * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp_min(1.0)).mean()


class SFNetPlugin(_PairPlugin):
    name = "sfnet"

    def loss_weights(self) -> tuple[float, float, float]:
        """The paper's (lambda_mask, lambda_flow, lambda_smooth) in ``loss.flow_units`` (module docstring)."""
        from ops.sfnet import sfnet_loss_weights

        lo = self.cfg.loss
        return sfnet_loss_weights(lo.lambda_mask, lo.lambda_flow, lo.lambda_smooth, self.cfg.model.grid)

    def losses(self, model, batch: dict, device) -> StepOutput:
        from ops import sfnet as sf

        b = to_device(batch, device)
        out = model(b["source"], b["target"])
        ms, mt = b["source_mask"], b["target_mask"]
        mask = sf.mask_consistency_loss(out.flow_s2t, out.flow_t2s, ms, mt)
        flow = sf.flow_consistency_loss(out.flow_s2t, out.flow_t2s, ms, mt)
        smooth = sf.smoothness_loss(out.flow_s2t, out.flow_t2s, ms, mt)
        w_mask, w_flow, w_smooth = self.loss_weights()
        return StepOutput(
            losses={"loss_mask": w_mask * mask, "loss_flow": w_flow * flow, "loss_smooth": w_smooth * smooth},
            metrics={"mask": mask.detach(), "flow": flow.detach(), "smooth": smooth.detach(),
                     "epe_cells": foreground_epe(out.flow_t2s.detach(), self.ground_truth_cells(b), mt)})


class AffineRegressionPlugin(_PairPlugin):
    name = "sfnet_affine_baseline"

    def losses(self, model, batch: dict, device) -> StepOutput:
        b = to_device(batch, device)
        out = model(b["source"], b["target"])
        gt = self.ground_truth_cells(b)
        loss = foreground_epe(out.flow_t2s, gt, b["target_mask"], squared=True)
        return StepOutput(losses={"loss_flow": loss},
                          metrics={"epe_cells": foreground_epe(out.flow_t2s.detach(), gt, b["target_mask"])})


PLUGINS = {"sfnet": SFNetPlugin, "affine_baseline": AffineRegressionPlugin}


def plugin_for(cfg: SFNetTrainConfig) -> _PairPlugin:
    return PLUGINS[cfg.model.variant](cfg)


def main(argv=None):
    from maskflow import runtime

    cfg = config.parse_cli(SFNetTrainConfig, argv, description=__doc__)
    runtime.setup_logging()
    from maskflow.train.fit import fit  # torch and Ray load only once the config has parsed

    result = fit(plugin_for(cfg))
    registered = f", registered as {cfg.registry.model_name} v{result.model_version} @candidate" \
        if result.model_version else ""
    print(f"run {result.run_name}: model {result.model_uri}{registered}")
    return result


if __name__ == "__main__":
    config.main_guard(main)
