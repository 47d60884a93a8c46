"""Class-agnostic Mask R-CNN (the proposal generator of DMM-Net and FFD-Net) on the trainer harness.

    python trainers/maskrcnn.py --config conf/maskrcnn/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python trainers/maskrcnn.py --config conf/maskrcnn/r50_fpn.yaml

Trains from ``image`` shards (see :mod:`maskflow.data.schema`); the model is torchvision's Mask R-CNN with one
foreground class, backbone from config (ResNet-50-FPN as in DMM-Net, or a CPU-sized one).

Augmentation (``augment:``, all off but the flip by default; ``conf/maskrcnn/penn_fudan.yaml`` is the real-data
recipe that uses them), applied per training image in this order:

* scale jitter: the image and its masks scaled by a log-uniform factor in ``scale_range``, then cropped (zoom in) or
  zero-padded (zoom out) back to the original size at a random offset — the large-scale jitter of Ghiasi et al.
  (CVPR 2021, sec. 3) and the random crop of DeepMask/SharpMask training in one; the model's own resize to
  ``model.min_size`` comes after, so the objects' scale, not the input size, varies;
* multi-scale input (``min_sizes``): torchvision's ``GeneralizedRCNNTransform`` picks each training image's short
  side among ``min_sizes`` and ``model.min_size``; evaluation always uses ``model.min_size``;
* horizontal flip (``hflip``);
* photometric jitter (``brightness``, ``contrast``, ``saturation``, ``hue``: torchvision ``ColorJitter``'s ranges).

Boxes are re-derived from the transformed masks (tight, COCO's ``x + w`` convention) and an instance left with fewer
than ``min_mask_pixels`` pixels is dropped, so a target never describes what the image no longer shows.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskflow import config
from maskflow.config import require
from maskflow.data import schema
from maskflow.data.validate import decode_image
from maskflow.models.maskrcnn_config import MaskRCNNConfig
from maskflow.train.config import TrainJobConfig
from maskflow.train.plugin import ModelPlugin

if TYPE_CHECKING:  # torch loads in the workers, and on the driver only once the config has parsed
    import torch

DEFAULT_MODEL_NAME = "maskflow-maskrcnn"


@dataclass
class AugmentConfig:
    hflip: float = 0.5  # probability of a horizontal flip
    scale_range: tuple[float, float] = (1.0, 1.0)  # scale jitter factors (log-uniform); (1, 1): off
    min_mask_pixels: int = 16  # after scale jitter, an instance with fewer pixels is no longer a target
    min_sizes: list[int] = field(default_factory=list)  # multi-scale training short sides (besides model.min_size)
    brightness: float = 0.0  # photometric jitter, as torchvision ColorJitter: factor in [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # shift in [-hue, hue], at most 0.5

    def validate(self) -> None:
        require(0.0 <= self.hflip <= 1.0, "hflip", f"must be a probability, got {self.hflip}")
        lo, hi = self.scale_range
        require(0.0 < lo <= hi, "scale_range",
                f"must be [low, high] with 0 < low <= high, got {list(self.scale_range)}")
        require(self.min_mask_pixels >= 1, "min_mask_pixels", f"must be >= 1, got {self.min_mask_pixels}")
        require(all(s >= 32 for s in self.min_sizes), "min_sizes", f"must be >= 32 each, got {self.min_sizes}")
        for key in ("brightness", "contrast", "saturation"):
            require(0.0 <= getattr(self, key) < 1.0, key, f"must be in [0, 1), got {getattr(self, key)}")
        require(0.0 <= self.hue <= 0.5, "hue", f"must be in [0, 0.5], got {self.hue}")


@dataclass
class MaskRCNNTrainConfig(TrainJobConfig):
    model: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def boxes_of_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight (N, 4) x1y1x2y2 boxes of (N, H, W) non-empty masks, with x2 = last column + 1 (COCO's ``x + w``, what
    :func:`~maskflow.models.maskrcnn.targets_from_meta` gives)."""
    import torch
    from torchvision.ops import masks_to_boxes

    boxes = masks_to_boxes(masks.bool()) if len(masks) else torch.zeros((0, 4))
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])


def scale_jitter(image: torch.Tensor, target: dict, scale: float, offset: tuple[float, float],
                 min_mask_pixels: int = 1) -> tuple[torch.Tensor, dict]:
    """``image`` (C, H, W float) and its masks scaled by ``scale`` (bilinear / nearest-exact: both sample at pixel
    centres, so they stay aligned), then cropped (scale > 1) or zero-padded (scale < 1) back to H x W. ``offset`` in
    [0, 1]^2 places the window (y, x) along the slack; boxes come from the new masks, and instances with fewer than
    ``min_mask_pixels`` pixels left are dropped."""
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    img = F.interpolate(image[None], size=(sh, sw), mode="bilinear", align_corners=False)[0]
    masks = target["masks"]
    if len(masks):
        masks = F.interpolate(masks[None].float(), size=(sh, sw), mode="nearest-exact")[0].to(target["masks"].dtype)
    else:
        masks = masks.new_zeros((0, sh, sw))
    # position of the H x W window in the scaled image: >= 0 crops, < 0 pads (the slack is h - sh when smaller)
    y0 = round((sh - h) * offset[0]) if sh >= h else -round((h - sh) * offset[0])
    x0 = round((sw - w) * offset[1]) if sw >= w else -round((w - sw) * offset[1])
    out = img.new_zeros((image.shape[0], h, w))
    out_masks = masks.new_zeros((len(masks), h, w))
    sy, sx = max(y0, 0), max(x0, 0)  # source window start
    dy, dx = max(-y0, 0), max(-x0, 0)  # destination start
    ch, cw = min(sh - sy, h - dy), min(sw - sx, w - dx)
    out[:, dy:dy + ch, dx:dx + cw] = img[:, sy:sy + ch, sx:sx + cw]
    out_masks[:, dy:dy + ch, dx:dx + cw] = masks[:, sy:sy + ch, sx:sx + cw]
    keep = out_masks.flatten(1).sum(1) >= min_mask_pixels
    out_masks = out_masks[keep]
    target = {**target, "masks": out_masks, "labels": target["labels"][keep], "boxes": boxes_of_masks(out_masks)}
    return out.clamp_(0.0, 1.0), target


def photometric(image: torch.Tensor, factors: dict[str, float]) -> torch.Tensor:
    """``image`` (3, H, W float in [0, 1]) with brightness, contrast and saturation multiplied by their factors and
    the hue shifted by ``factors["hue"]`` (torchvision's ColorJitter operations, in its default order)."""
    from torchvision.transforms.v2 import functional as TF

    if factors.get("brightness", 1.0) != 1.0:
        image = TF.adjust_brightness(image, factors["brightness"])
    if factors.get("contrast", 1.0) != 1.0:
        image = TF.adjust_contrast(image, factors["contrast"])
    if factors.get("saturation", 1.0) != 1.0:
        image = TF.adjust_saturation(image, factors["saturation"])
    if factors.get("hue", 0.0) != 0.0:
        image = TF.adjust_hue(image, factors["hue"])
    return image


def augment(image: torch.Tensor, target: dict, cfg: AugmentConfig, rng) -> tuple[torch.Tensor, dict]:
    """One training image through the augmentations ``cfg`` switches on, every draw from ``rng`` (numpy)."""
    lo, hi = cfg.scale_range
    if hi > lo or lo != 1.0:
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        image, target = scale_jitter(image, target, scale, (float(rng.random()), float(rng.random())),
                                     cfg.min_mask_pixels)
    if rng.random() < cfg.hflip:
        image, target = hflip(image, target)
    factors = {k: float(rng.uniform(1 - getattr(cfg, k), 1 + getattr(cfg, k)))
               for k in ("brightness", "contrast", "saturation") if getattr(cfg, k) > 0}
    if cfg.hue > 0:
        factors["hue"] = float(rng.uniform(-cfg.hue, cfg.hue))
    if factors and image.shape[0] == 3:
        image = photometric(image, factors)
    return image, target


class MaskRCNNPlugin(ModelPlugin):
    name = "maskrcnn"

    def build_model(self):
        from maskflow.models.maskrcnn import build_maskrcnn

        model = build_maskrcnn(self.cfg.model)
        if self.cfg.augment.min_sizes:
            # torchvision picks a training image's short side at random among min_size, and evaluates at the last
            sizes = [s for s in self.cfg.augment.min_sizes if s != self.cfg.model.min_size]
            model.transform.min_size = (*sizes, self.cfg.model.min_size)
        return model

    def collate(self, batch: dict, rng) -> tuple[list[torch.Tensor], list[dict]]:
        from maskflow.models.maskrcnn import image_to_tensor, targets_from_meta

        images, targets = [], []
        for image_bytes, meta_bytes in zip(batch[schema.IMAGE], batch[schema.META]):
            image = image_to_tensor(decode_image(bytes(image_bytes)))
            target = targets_from_meta(schema.loads(bytes(meta_bytes)))
            if rng is not None:
                image, target = augment(image, target, self.cfg.augment, rng)
            images.append(image)
            targets.append(target)
        return images, targets

    def losses(self, model, batch, device) -> dict:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        return model(images, targets)


def main(argv=None):
    from maskflow import runtime

    cfg = config.parse_cli(MaskRCNNTrainConfig, argv, description=__doc__)
    runtime.setup_logging()
    from maskflow.train.fit import fit  # torch and Ray load only once the config has parsed

    result = fit(MaskRCNNPlugin(cfg))
    print(f"run {result.run_name}: model {result.model_uri}"
          + (f", registered as {cfg.registry.model_name} v{result.model_version} @candidate" if result.model_version else ""))
    return result


if __name__ == "__main__":
    config.main_guard(main)
