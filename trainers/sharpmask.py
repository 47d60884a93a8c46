"""DeepMask, then SharpMask (Pinheiro et al., NIPS 2015 / ECCV 2016) on the trainer harness: the paper's two phases.

    python trainers/sharpmask.py --config conf/sharpmask/deepmask_cpu.yaml     # phase 1: trunk + mask + score heads
    python trainers/sharpmask.py --config conf/sharpmask/sharpmask_cpu.yaml    # phase 2: refinement modules only
        (init.from=models:/maskflow-deepmask/<N> to pin the DeepMask version)

Data: ``mask_patch/1`` windows (:mod:`maskflow.stages.mask_patches`), one ``patch`` x ``patch`` window per sample
with its label (+1: an object centred at the canonical scale; -1: not) and, for positives, the centred object's mask.
Augmentation (training only, from the harness's per-batch generator): horizontal flip (window and mask together) and
a small photometric jitter (brightness, contrast, saturation factors drawn per window).

Losses (DeepMask eq. 1, summed over the batch and divided by its size): the per-pixel logistic (soft-margin) loss
``log(1 + exp(-m_ij f_ij))`` averaged over the mask's pixels, on positive windows only (the ``(1 + y_k) / 2``
factor), as ``mask``; plus ``loss.score_weight`` (the paper's lambda = 1/32) times the logistic loss
``log(1 + exp(-y_k f_score))`` of every window, as ``score``. The mask target is the window's mask resampled to the
output's side (DeepMask: ``mask_size * mask_upsample``, area-averaged and binarised; SharpMask: the patch). With
``model.refine`` (phase 2) the loss is the mask term only, of the refined mask (SharpMask section 4: the trunk and
DeepMask heads frozen by ``freeze`` and initialised from the DeepMask model by ``init.from``; the harness does
both). Step metrics: ``mask_iou`` (positives) and ``score_accuracy``.

Validation (per window): ``mask_iou`` — IoU at the patch's resolution of the predicted mask (logits upsampled
bilinearly, > 0) with the target, on positives (NaN on negatives, which the harness leaves out of the mean);
``coarse_iou`` — the same for DeepMask's mask head (equal to ``mask_iou`` without ``refine``: SharpMask's gain over
the DeepMask it starts from); ``score_accuracy`` — the score's sign against the label, every window.
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
from maskflow.models.sharpmask_config import SharpMaskConfig
from maskflow.train.config import TrainJobConfig
from maskflow.train.plugin import ModelPlugin, StepOutput

if TYPE_CHECKING:  # torch loads in the workers, and on the driver only once the config has parsed
    import numpy as np
    import torch

PATCH, MASK, INFO = "patch.png", "mask.png", "patch.json"  # maskflow.stages.mask_patches' fields (torch-free here)


@dataclass
class SharpMaskLossConfig:
    # DeepMask eq. 1: lambda = 1/32 on the score term against the per-pixel-mean mask term. (The released Torch
    # trainer instead alternates the heads batch by batch and scales the mask gradient by the batch size.)
    score_weight: float = 1.0 / 32
    mask_weight: float = 1.0

    def validate(self) -> None:
        require(self.score_weight >= 0, "score_weight", "must be >= 0")
        require(self.mask_weight > 0, "mask_weight", "must be positive")


@dataclass
class SharpMaskAugmentConfig:
    hflip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.1  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.1  # blend with the window's mean grey by a factor from [1 - c, 1 + c]
    saturation: float = 0.1  # blend with the window's grey by a factor from [1 - s, 1 + s]

    def validate(self) -> None:
        require(0 <= self.hflip <= 1, "hflip", "must be a probability")
        require(all(0 <= v < 1 for v in (self.brightness, self.contrast, self.saturation)), "brightness",
                "photometric jitter factors must be in [0, 1)")


@dataclass
class SharpMaskTrainConfig(TrainJobConfig):
    model: SharpMaskConfig = field(default_factory=SharpMaskConfig)
    loss: SharpMaskLossConfig = field(default_factory=SharpMaskLossConfig)
    augment: SharpMaskAugmentConfig = field(default_factory=SharpMaskAugmentConfig)


def decode_windows(batch: dict, patch: int) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """Raw ``mask_patch`` rows -> ``(images (N, P, P, 3) uint8, masks (N, P, P) bool, labels (N,) float32 +-1)``
    (an all-false mask for negatives)."""
    import numpy as np

    from maskflow.data import schema

    images, masks, labels = [], [], []
    masks_raw = batch.get(MASK)
    for i, (png, info) in enumerate(zip(batch[PATCH], batch[INFO])):
        image = schema.load_png(bytes(png))
        if image.shape != (patch, patch, 3):
            raise ValueError(f"window {batch['__key__'][i]} is {image.shape[:2]}, the model's patch is {patch}: "
                             "make the windows with patches.patch equal to model.patch")
        meta = schema.loads(bytes(info))
        raw = None if masks_raw is None else masks_raw[i]
        # negatives have no mask entry: Ray Data fills the column with None or NaN there
        has_mask = isinstance(raw, (bytes, bytearray, memoryview, np.ndarray)) and len(raw) > 0
        mask = schema.load_png(bytes(raw)) > 0 if has_mask else np.zeros((patch, patch), bool)
        images.append(image)
        masks.append(mask)
        labels.append(1.0 if meta["label"] > 0 else -1.0)
    return np.stack(images), np.stack(masks), np.asarray(labels, np.float32)


def augment(images: "torch.Tensor", masks: "torch.Tensor", cfg: SharpMaskAugmentConfig,
            rng: "np.random.Generator") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Flip and photometric jitter of a batch ``(N, 3, P, P)`` in [0, 1] with its masks ``(N, 1, P, P)``; one draw
    per window, all from ``rng``."""
    import torch

    n = len(images)
    flip = torch.from_numpy(rng.random(n) < cfg.hflip)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)

    def factors(amount: float) -> "torch.Tensor":
        return torch.from_numpy(rng.uniform(1 - amount, 1 + amount, n).astype("float32"))[:, None, None, None]

    grey = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    images = grey + (images - grey) * factors(cfg.saturation)  # saturation
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    images = mean + (images - mean) * factors(cfg.contrast)  # contrast
    images = images * factors(cfg.brightness)  # brightness
    return images.clamp(0, 1), masks


def soft_margin_mask_loss(logits: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
    """Per-window mean over pixels of ``log(1 + exp(-m f))`` (``m = 2 * target - 1``): ``(N,)``."""
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").flatten(1).mean(1)


def target_at(masks: "torch.Tensor", side: int) -> "torch.Tensor":
    """Masks ``(N, 1, P, P)`` {0, 1} resampled to ``side`` (area average, binarised at 0.5)."""
    import torch.nn.functional as F

    if masks.shape[-1] == side:
        return masks
    return (F.interpolate(masks, size=(side, side), mode="area") > 0.5).float()


def window_iou(logits: "torch.Tensor", masks: "torch.Tensor") -> "torch.Tensor":
    """IoU ``(N,)`` at the masks' resolution of ``logits > 0`` (upsampled bilinearly) with masks ``(N, 1, P, P)``."""
    import torch.nn.functional as F

    if logits.shape[-1] != masks.shape[-1]:
        logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    pred, gt = logits > 0, masks > 0.5
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return inter / union.clamp_min(1.0)


class SharpMaskPlugin(ModelPlugin):
    """DeepMask (``model.refine: false``) or SharpMask (``true``) on ``mask_patch`` windows."""

    name = "sharpmask"
    cfg: SharpMaskTrainConfig

    def build_model(self):
        from maskflow.models.sharpmask import SharpMask

        return SharpMask(self.cfg.model)

    def collate(self, batch: dict, rng: "np.random.Generator | None") -> dict:
        """``{"image": (N, 3, P, P) float in [0, 1], "mask": (N, 1, P, P) float {0, 1}, "label": (N,) +-1}``;
        augmented when ``rng`` is given (training)."""
        import torch

        images, masks, labels = decode_windows(batch, self.cfg.model.patch)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        m = torch.from_numpy(masks)[:, None].float()
        if rng is not None:
            x, m = augment(x, m, self.cfg.augment, rng)
        return {"image": x.contiguous(), "mask": m.contiguous(), "label": torch.from_numpy(labels)}

    def losses(self, model, batch: dict, device) -> StepOutput:
        import torch.nn.functional as F

        images, masks, labels = (batch[k].to(device, non_blocking=True) for k in ("image", "mask", "label"))
        out = model(images)
        positive = (labels > 0).float()
        per_window = soft_margin_mask_loss(out.mask_logits, target_at(masks, out.mask_logits.shape[-1]))
        losses = {"mask": self.cfg.loss.mask_weight * (per_window * positive).sum() / len(labels)}
        if not self.cfg.model.refine:  # phase 2 trains the refinement on the mask term alone
            score = F.binary_cross_entropy_with_logits(out.score_logits.float(), (labels > 0).float())
            losses["score"] = self.cfg.loss.score_weight * score
        with_mask = positive > 0
        iou = window_iou(out.mask_logits.detach(), masks)[with_mask]
        metrics = {"score_accuracy": ((out.score_logits.detach() > 0) == (labels > 0)).float().mean()}
        if len(iou):
            metrics["mask_iou"] = iou.mean()
        return StepOutput(losses, metrics)

    def validation_step(self, model, batch: dict, device) -> dict:
        import torch

        images, masks, labels = (batch[k].to(device) for k in ("image", "mask", "label"))
        out = model(images)
        positive = labels > 0
        nan = torch.tensor(float("nan"), device=device)
        return {
            "mask_iou": torch.where(positive, window_iou(out.mask_logits, masks), nan).cpu(),
            "coarse_iou": torch.where(positive, window_iou(out.coarse_logits, masks), nan).cpu(),
            "score_accuracy": ((out.score_logits > 0) == positive).float().cpu(),
        }


def main(argv=None):
    from maskflow import runtime

    cfg = config.parse_cli(SharpMaskTrainConfig, argv, description=__doc__)
    runtime.setup_logging()
    from maskflow.train.fit import fit  # torch and Ray load only once the config has parsed

    result = fit(SharpMaskPlugin(cfg))
    print(f"run {result.run_name}: model {result.model_uri}"
          + (f", registered as {cfg.registry.model_name} v{result.model_version} @candidate"
             if result.model_version else ""))
    return result


if __name__ == "__main__":
    config.main_guard(main)
