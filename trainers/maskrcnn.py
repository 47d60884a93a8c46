"""Class-agnostic Mask R-CNN (the proposal generator of DMM-Net and FFD-Net) on the trainer harness.

    python trainers/maskrcnn.py --config conf/maskrcnn/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python trainers/maskrcnn.py --config conf/maskrcnn/r50_fpn.yaml

Trains from ``image`` shards (see :mod:`maskflow.data.schema`); the model is torchvision's Mask R-CNN with one
foreground class, backbone from config (ResNet-50-FPN as in DMM-Net, or a CPU-sized one).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskflow import config
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


@dataclass
class MaskRCNNTrainConfig(TrainJobConfig):
    model: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


class MaskRCNNPlugin(ModelPlugin):
    name = "maskrcnn"

    def build_model(self):
        from maskflow.models.maskrcnn import build_maskrcnn

        return build_maskrcnn(self.cfg.model)

    def collate(self, batch: dict, rng) -> tuple[list[torch.Tensor], list[dict]]:
        from maskflow.models.maskrcnn import image_to_tensor, targets_from_meta

        images, targets = [], []
        for image_bytes, meta_bytes in zip(batch[schema.IMAGE], batch[schema.META]):
            image = image_to_tensor(decode_image(bytes(image_bytes)))
            target = targets_from_meta(schema.loads(bytes(meta_bytes)))
            if rng is not None and rng.random() < self.cfg.augment.hflip:
                image, target = hflip(image, target)
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
