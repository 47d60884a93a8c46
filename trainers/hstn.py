"""HSTN (Shu et al., "Hierarchical Spatial Transformer Network") on the trainer harness: cluttered-digit
classification (section 4.1) and planar alignment (section 4.2).

    python trainers/hstn.py --config conf/hstn/cls_affine_stn_cpu.yaml            # Affine-STN first (registered)
    python trainers/hstn.py --config conf/hstn/cls_cpu.yaml \
        init.from=models:/maskflow-hstn-cls-affine-stn@candidate                  # HSTN, affine generator from it
    python trainers/hstn.py --config conf/hstn/align_cpu.yaml

``task: classify`` (:class:`HSTNClassifierPlugin`, kind ``hstn_cls``) reads ``cluttered_digit/1`` samples
(:mod:`maskflow.stages.cluttered_digits`); ``model.variant`` picks the plain CNN, Affine-STN or HSTN, all with the
paper's CNN back end. Loss: cross-entropy, plus for HSTN eq. 7's ``alpha * bending + beta * smoothness`` on the
residual flow w (section 4.1: alpha = 0.01, beta = 1), each weighted term a key of its own. Step metric: accuracy;
validation: per-sample ``accuracy`` (0/1) and ``cross_entropy``.

``task: align`` (:class:`HSTNAlignPlugin`, kind ``hstn_align``) reads ``pair/1`` samples
(:mod:`maskflow.stages.affine_pairs`, made with ``pairs.elastic_amplitude > 0`` and ``pairs.flip_prob = 0``).
Each pair is resized to ``model.image_size`` squared (bilinear, ``align_corners=True``, antialiased; flows resampled
the same way and rescaled per axis by ``(S - 1) / (W - 1)`` and ``(S - 1) / (H - 1)``). The network sees
``source || target`` and predicts ``flow_t2s``; it learns without ground truth (section 4.2): the L2 photometric
error between the warped source and the target over the target's valid region (the pixels the pair stage filled
from the source; elsewhere the target is black by construction), plus the same penalties on w. Validation: per-pair
``epe``, the end-point error in pixels of the pair's own resolution (the prediction upsampled and rescaled back) over
the central region, against the pair's ground-truth ``flow_t2s``; and ``photometric``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskflow import config
from maskflow.data import schema
from maskflow.models.hstn_config import EPEConfig, HSTNAlignConfig, HSTNClassifierConfig, HSTNLossConfig
from maskflow.models.hstn_data import DIGIT_IMAGE, PAIR_FLOW_T2S, PAIR_SOURCE, PAIR_TARGET
from maskflow.train.config import TrainJobConfig
from maskflow.train.plugin import ModelPlugin, StepOutput

if TYPE_CHECKING:  # torch loads in the workers, and on the driver only once the config has parsed
    import numpy as np
    import torch


@dataclass
class HSTNClassifierTrainConfig(TrainJobConfig):
    task: Literal["classify"] = "classify"
    model: HSTNClassifierConfig = field(default_factory=HSTNClassifierConfig)
    loss: HSTNLossConfig = field(default_factory=HSTNLossConfig)


@dataclass
class HSTNAlignTrainConfig(TrainJobConfig):
    task: Literal["align"] = "align"
    model: HSTNAlignConfig = field(default_factory=HSTNAlignConfig)
    loss: HSTNLossConfig = field(default_factory=HSTNLossConfig)
    epe: EPEConfig = field(default_factory=EPEConfig)


def _penalties(loss_cfg: HSTNLossConfig, residual_flow, side: int) -> dict:
    """Eq. 7's weighted terms on the residual flow (pixels of the ``side``-pixel grid); none without a flow."""
    if residual_flow is None:
        return {}
    from ops.hstn import bending_energy, smoothness_l2

    alpha, beta = loss_cfg.penalty_weights(side)
    return {"bending": alpha * bending_energy(residual_flow), "smoothness": beta * smoothness_l2(residual_flow)}


# --------------------------------------------------------------------------------------------- classification


class HSTNClassifierPlugin(ModelPlugin):
    """Cluttered-digit classification: CNN, Affine-STN or HSTN (``model.variant``)."""

    name = "hstn_cls"
    cfg: HSTNClassifierTrainConfig

    def build_model(self):
        from maskflow.models.hstn import HSTNClassifier

        return HSTNClassifier(self.cfg.model)

    def collate(self, batch: dict, rng: "np.random.Generator | None") -> dict:
        """``{"image": (N, 1, S, S) float in [0, 1], "label": (N,) int64}`` (no augmentation: the clutter and the
        distortions are the data)."""
        from maskflow.models.hstn_data import digit_batch

        return digit_batch(batch[DIGIT_IMAGE], batch[schema.META], self.cfg.model.image_size)

    def losses(self, model, batch: dict, device) -> StepOutput:
        import torch.nn.functional as F

        images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        out = model(images)
        losses = {"cross_entropy": F.cross_entropy(out.logits, labels)}
        losses.update(_penalties(self.cfg.loss, out.residual_flow, images.shape[-1]))
        accuracy = (out.logits.detach().argmax(1) == labels).float().mean()
        return StepOutput(losses, {"accuracy": accuracy})

    def validation_step(self, model, batch: dict, device) -> dict:
        import torch.nn.functional as F

        images, labels = batch["image"].to(device), batch["label"].to(device)
        logits = model(images).logits.float()
        return {"accuracy": (logits.argmax(1) == labels).float(),
                "cross_entropy": F.cross_entropy(logits, labels, reduction="none")}


# --------------------------------------------------------------------------------------------- alignment


class HSTNAlignPlugin(ModelPlugin):
    """Unsupervised planar alignment: Affine-STN or HSTN (``model.variant``)."""

    name = "hstn_align"
    cfg: HSTNAlignTrainConfig

    def build_model(self):
        from maskflow.models.hstn import HSTNAligner

        return HSTNAligner(self.cfg.model)

    def collate(self, batch: dict, rng: "np.random.Generator | None") -> dict:
        """Pairs resized to ``model.image_size`` (:func:`maskflow.models.hstn_data.pair_batch`); no augmentation:
        the pair stage drew the warps."""
        from maskflow.models.hstn_data import decode_pair, pair_batch

        size = self.cfg.model.image_size
        return pair_batch([decode_pair(s, t, f, size)
                           for s, t, f in zip(batch[PAIR_SOURCE], batch[PAIR_TARGET], batch[PAIR_FLOW_T2S])])

    def losses(self, model, batch: dict, device) -> StepOutput:
        from ops.warp import epe

        source, target, valid = (batch[k].to(device, non_blocking=True) for k in ("source", "target", "valid"))
        out = model(source, target)
        losses = {"photometric": masked_l2(out.warped, target, valid).mean()}
        losses.update(_penalties(self.cfg.loss, out.residual_flow, source.shape[-1]))
        # EPE on the network's grid against the resized ground truth (logged only: training never sees it)
        gt = batch["flow_t2s"].to(device, non_blocking=True)
        return StepOutput(losses, {"epe_grid": epe(out.flow.detach().float(), gt, mask=valid)})

    def validation_step(self, model, batch: dict, device) -> dict:
        import torch

        from maskflow.evaluators.flow_epe import pair_epe
        from maskflow.models.hstn_data import upsample_flows

        source, target, valid = (batch[k].to(device) for k in ("source", "target", "valid"))
        out = model(source, target)
        full = [pred.unsqueeze(0) for pred in upsample_flows(out.flow.float().cpu(), batch["sizes"])]
        errors = torch.stack([pair_epe(pred, gt.unsqueeze(0), self.cfg.epe.central_fraction)[0]
                              for pred, gt in zip(full, batch["flow_t2s_full"])])
        return {"epe": errors, "photometric": masked_l2(out.warped.float(), target, valid).cpu()}


def masked_l2(warped: "torch.Tensor", target: "torch.Tensor", valid: "torch.Tensor") -> "torch.Tensor":
    """Per-pair mean squared difference over the valid pixels and the channels: (N,) (0 where none is valid)."""
    squared = (warped - target).pow(2) * valid
    return squared.sum(dim=(1, 2, 3)) / (valid.sum(dim=(1, 2, 3)) * warped.shape[1]).clamp_min(1.0)


# --------------------------------------------------------------------------------------------- job

PLUGINS = {"classify": (HSTNClassifierTrainConfig, HSTNClassifierPlugin),
           "align": (HSTNAlignTrainConfig, HSTNAlignPlugin)}


def parse_config(argv: list[str] | None = None) -> HSTNClassifierTrainConfig | HSTNAlignTrainConfig:
    """The job's config: its ``task`` (``classify`` | ``align``, in the YAML or as ``task=...``) picks the schema the
    YAML and the overrides are built against."""
    def schema_of(task: str) -> type:
        if task not in PLUGINS:
            raise config.ConfigError(f"task: must be one of {sorted(PLUGINS)}, got {task!r}")
        return PLUGINS[task][0]

    return config.parse_cli_dispatch("task", schema_of, argv, __doc__)[1]


def main(argv=None):
    from maskflow import runtime
    from maskflow.train.fit import fit

    cfg = parse_config(argv)
    runtime.setup_logging()
    result = fit(PLUGINS[cfg.task][1](cfg))
    print(f"run {result.run_name}: model {result.model_uri}"
          + (f", registered as {cfg.registry.model_name} v{result.model_version} @candidate"
             if result.model_version else ""))
    return result


if __name__ == "__main__":
    config.main_guard(main)
