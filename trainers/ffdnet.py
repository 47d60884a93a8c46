"""FFD-Net (Zhang & He, ICCV 2017, sec. 3.3) on the trainer harness.

    python trainers/ffdnet.py --config conf/ffdnet/cpu.yaml [key=value ...]
    python trainers/ffdnet.py --config conf/ffdnet/mesh7_cpu.yaml            # ablations: same budget, one key each
    ray job submit --working-dir . -- python trainers/ffdnet.py --config conf/ffdnet/paper.yaml

Trains from ``ffd_crop/1`` shards (:mod:`maskflow.stages.ffd_crops`: the 1.6x crops of proposals with IoU > 0.5, from
any generator), resized to ``model.crop_size`` when the crops were made at another size. Loss (sec. 3.3, "Learning
Details"): the L2 between the warped (soft) proposal and the ground-truth crop, the mean over pixels, ``{"l2": ...}``.
Step metrics (logged, never optimised): the IoU with the ground truth of the refined mask (at 0.5) and of the
unrefined proposal. Augmentation: a horizontal flip of image, proposal and ground truth together (``augment.hflip``).

Validation, per crop: ``iou_refined``, ``iou_unrefined``, ``iou_gain`` (refined - unrefined) and ``l2``; the run keeps
the model of best ``iou_refined`` (``validation.metric``, mode max).

The paper trains image-centric (1 image, 128 segments per batch, shared features); per-crop samples recompute the
backbone per crop: the same inputs at a different cost.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskflow import config
from maskflow.config import require
from maskflow.models.ffdnet_config import FFDConfig
from maskflow.train.config import TrainJobConfig
from maskflow.train.plugin import ModelPlugin, StepOutput

if TYPE_CHECKING:  # torch loads in the workers, and on the driver only once the config has parsed
    import numpy as np
    import torch

# ffd_crop/1 entries (maskflow.stages.ffd_crops; not imported here: it loads torch)
IMAGE, PROPOSAL, GT, CROP = "image.png", "proposal.png", "gt.png", "crop.json"
VALIDATION_KEYS = ("iou_refined", "iou_unrefined", "iou_gain", "l2")


@dataclass
class FFDAugmentConfig:
    hflip: float = 0.5  # probability of a horizontal flip of a crop (image, proposal and ground truth together)

    def validate(self) -> None:
        require(0 <= self.hflip <= 1, "hflip", f"must be in [0, 1], got {self.hflip}")


@dataclass
class FFDNetTrainConfig(TrainJobConfig):
    model: FFDConfig = field(default_factory=FFDConfig)
    augment: FFDAugmentConfig = field(default_factory=FFDAugmentConfig)

    def validate(self) -> None:
        super().validate()
        require(self.validation.metric in ("",) + VALIDATION_KEYS, "validation.metric",
                f"must be one of {', '.join(VALIDATION_KEYS)} (or empty: the loss), got {self.validation.metric!r}")


def crop_batch(batch: dict, size: int, enlarge: float, rng: "np.random.Generator | None" = None,
               hflip: float = 0.0) -> dict[str, "torch.Tensor"]:
    """A Ray Data numpy batch of raw ``ffd_crop/1`` rows -> ``{"image": (N, 3, S, S) float in [0, 1], "proposal",
    "gt": (N, 1, S, S) {0, 1}}`` at ``S = size`` (bilinear, antialiased image; masks resampled and thresholded at 0.5),
    each crop flipped horizontally with probability ``hflip`` when ``rng`` is given. The crops must have been made
    with ``enlarge`` (the model's ``crop_enlarge``: the refinement job crops that way)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from maskflow.data import schema

    missing = [f for f in (IMAGE, PROPOSAL, GT, CROP) if f not in batch]
    if missing:
        raise ValueError(f"data: batch lacks ffd_crop/1 entries {missing} (columns: {sorted(batch)}): not ffd crops?")
    made_with = {float(schema.loads(bytes(c)).get("enlarge", float("nan"))) for c in batch[CROP]}
    if made_with != {float(enlarge)}:
        raise ValueError(f"data: crops made with crops.enlarge {sorted(made_with)} but model.crop_enlarge is "
                         f"{enlarge}: the refinement job would crop differently from training")
    images = torch.from_numpy(np.stack([schema.load_png(bytes(b)) for b in batch[IMAGE]])).permute(0, 3, 1, 2)
    masks = torch.from_numpy(np.stack([np.stack([schema.load_png(bytes(p)), schema.load_png(bytes(g))])
                                       for p, g in zip(batch[PROPOSAL], batch[GT])]))  # (N, 2, s, s)
    images = images.float() / 255.0
    masks = (masks > 0).float()
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        masks = (F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True) > 0.5).float()
    if rng is not None and hflip > 0:
        flip = torch.from_numpy(rng.random(len(images)) < hflip)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)
    return {"image": images.contiguous(), "proposal": masks[:, :1].contiguous(), "gt": masks[:, 1:].contiguous()}


def l2_loss(refined: "torch.Tensor", gt: "torch.Tensor") -> "torch.Tensor":
    """The paper's L2 between the refined soft mask and the ground truth, the mean over pixels: ``(N,)``."""
    return (refined - gt).pow(2).flatten(1).mean(1)


class FFDNetPlugin(ModelPlugin):
    """FFD-Net on ``ffd_crop/1`` shards (kind ``ffdnet``)."""

    name = "ffdnet"
    cfg: FFDNetTrainConfig

    def build_model(self):
        from maskflow.models.ffdnet import build_ffdnet

        return build_ffdnet(self.cfg.model)

    def collate(self, batch: dict, rng: "np.random.Generator | None") -> dict:
        m = self.cfg.model
        return crop_batch(batch, m.crop_size, m.crop_enlarge, rng, self.cfg.augment.hflip)

    def losses(self, model, batch: dict, device) -> StepOutput:
        from maskflow.models.ffdnet import mask_iou_per_sample

        image, proposal, gt = (batch[k].to(device, non_blocking=True) for k in ("image", "proposal", "gt"))
        refined = model(image, proposal)["mask"]
        loss = l2_loss(refined, gt).mean()
        with_gt = {"iou_refined": mask_iou_per_sample(refined.detach(), gt).mean(),
                   "iou_unrefined": mask_iou_per_sample(proposal, gt).mean()}
        return StepOutput({"l2": loss}, with_gt)

    def validation_step(self, model, batch: dict, device) -> dict:
        from maskflow.models.ffdnet import mask_iou_per_sample

        image, proposal, gt = (batch[k].to(device) for k in ("image", "proposal", "gt"))
        refined = model(image, proposal)["mask"].float()
        refined_iou, unrefined_iou = mask_iou_per_sample(refined, gt), mask_iou_per_sample(proposal, gt)
        return {"iou_refined": refined_iou, "iou_unrefined": unrefined_iou, "iou_gain": refined_iou - unrefined_iou,
                "l2": l2_loss(refined, gt)}


def parse_config(argv: list[str] | None = None) -> FFDNetTrainConfig:
    return config.parse_cli(FFDNetTrainConfig, argv, description=__doc__)


def main(argv=None):
    from maskflow import runtime

    cfg = parse_config(argv)
    runtime.setup_logging()
    from maskflow.train.fit import fit  # torch and Ray load only once the config has parsed

    result = fit(FFDNetPlugin(cfg))
    print(f"run {result.run_name}: model {result.model_uri}"
          + (f", registered as {cfg.registry.model_name} v{result.model_version} @candidate"
             if result.model_version else ""))
    return result


if __name__ == "__main__":
    config.main_guard(main)
