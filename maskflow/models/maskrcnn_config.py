"""The architecture config of the class-agnostic Mask R-CNN (see :mod:`maskflow.models.maskrcnn`).

Kept apart from the model code, and free of torch at import, so a job parses and checks its config in a fraction of a
second before torch loads (only ``weights`` / ``weights_backbone`` import torchvision, to check the enum exists).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from maskflow.config import ConfigError, require

BACKBONES = ("resnet50_fpn", "resnet18_fpn", "tiny_fpn")
NUM_FPN_LEVELS = 5  # strides 4, 8, 16, 32 + the max-pooled stride-64 level

# the Mask R-CNN weights enum that "DEFAULT" names for each backbone (None: torchvision has no detection weights)
_DETECTION_WEIGHTS = {"resnet50_fpn": "MaskRCNN_ResNet50_FPN_Weights", "resnet18_fpn": None, "tiny_fpn": None}
_BACKBONE_WEIGHTS = {"resnet50_fpn": "ResNet50_Weights", "resnet18_fpn": "ResNet18_Weights", "tiny_fpn": None}
# architecture of torchvision's maskrcnn_resnet50_fpn (what COCO weights fit)
_TORCHVISION_HEADS = {"fpn_channels": 256, "representation_size": 1024, "mask_head_channels": 256,
                      "mask_head_layers": 4}


@dataclass
class MaskRCNNConfig:
    """Architecture and inference settings of the proposal model (``model:`` section of a trainer/job config)."""

    backbone: Literal["resnet50_fpn", "resnet18_fpn", "tiny_fpn"] = "resnet50_fpn"
    width: int = 32  # tiny_fpn: channels of the first stage (doubled at each of the next three)
    fpn_channels: int = 256
    # torchvision weights enum name, resolved with torchvision.models.get_weight ("DEFAULT": the backbone's default)
    weights: str | None = None  # whole Mask R-CNN (COCO); predictors are re-initialised (class-agnostic)
    weights_backbone: str | None = None  # ImageNet backbone only (ignored when ``weights`` is set)
    trainable_backbone_layers: int = 3  # resnet backbones with pretrained weights: 0..5 trainable stages
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per FPN level
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.0  # keep everything, as DMM-Net's proposal generator
    box_nms_thresh: float = 0.5
    representation_size: int = 1024  # box head MLP width
    mask_head_channels: int = 256
    mask_head_layers: int = 4

    def validate(self) -> None:
        require(self.backbone in BACKBONES, "backbone", f"must be one of {list(BACKBONES)}, got {self.backbone!r}")
        require(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        require(self.fpn_channels >= 1, "fpn_channels", f"must be >= 1, got {self.fpn_channels}")
        require(0 <= self.trainable_backbone_layers <= 5, "trainable_backbone_layers",
                f"must be in [0, 5], got {self.trainable_backbone_layers}")
        require(self.min_size >= 32, "min_size", f"must be >= 32, got {self.min_size}")
        require(self.max_size >= self.min_size, "max_size",
                f"must be >= min_size ({self.min_size}), got {self.max_size}")
        require(len(self.anchor_sizes) == NUM_FPN_LEVELS, "anchor_sizes",
                f"needs one size per FPN level ({NUM_FPN_LEVELS}), got {len(self.anchor_sizes)}")
        require(all(s > 0 for s in self.anchor_sizes), "anchor_sizes", f"must be positive, got {self.anchor_sizes}")
        require(len(self.aspect_ratios) >= 1 and all(r > 0 for r in self.aspect_ratios), "aspect_ratios",
                f"must be a non-empty list of positive numbers, got {self.aspect_ratios}")
        for key in ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
                    "rpn_post_nms_top_n_test", "rpn_batch_size_per_image", "box_batch_size_per_image",
                    "box_detections_per_img", "representation_size", "mask_head_channels", "mask_head_layers"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(0.0 <= self.box_score_thresh < 1.0, "box_score_thresh", f"must be in [0, 1), got {self.box_score_thresh}")
        require(0.0 < self.box_nms_thresh <= 1.0, "box_nms_thresh", f"must be in (0, 1], got {self.box_nms_thresh}")
        if self.weights is not None:
            enum = resolve_weights(self.weights, _DETECTION_WEIGHTS[self.backbone], "weights", self.backbone)
            require(type(enum).__name__ == _DETECTION_WEIGHTS[self.backbone], "weights",
                    f"{self.weights!r} does not fit backbone {self.backbone!r} "
                    f"(expected {_DETECTION_WEIGHTS[self.backbone]}.*)")
            for key, value in _TORCHVISION_HEADS.items():
                require(getattr(self, key) == value, key,
                        f"must be {value} to load {self.weights!r} (torchvision's architecture), got {getattr(self, key)}")
            require(len(self.aspect_ratios) == 3, "aspect_ratios",
                    f"must hold 3 ratios to load {self.weights!r} (the RPN head has 3 anchors per location)")
        if self.weights_backbone is not None:
            enum = resolve_weights(self.weights_backbone, _BACKBONE_WEIGHTS[self.backbone], "weights_backbone",
                                   self.backbone)
            require(type(enum).__name__ == _BACKBONE_WEIGHTS[self.backbone], "weights_backbone",
                    f"{self.weights_backbone!r} does not fit backbone {self.backbone!r} "
                    f"(expected {_BACKBONE_WEIGHTS[self.backbone]}.*)")


def resolve_weights(name: str, default_enum: str | None, key: str = "weights", backbone: str = "") -> Any:
    """A torchvision ``WeightsEnum`` member from its name (``"Enum.MEMBER"``, or ``"DEFAULT"`` / a bare member name
    for ``default_enum``); :class:`ConfigError` naming ``key`` when it does not exist. Resolving downloads nothing."""
    from torchvision.models import get_weight

    full = name
    if "." not in name:
        require(default_enum is not None, key,
                f"backbone {backbone!r} has no torchvision {key.replace('_', ' ')}; got {name!r}")
        full = f"{default_enum}.{name}"
    try:
        return get_weight(full)
    except (ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"{key}: unknown torchvision weights {name!r} ({type(e).__name__}: {e}); "
                          f"expected e.g. 'MaskRCNN_ResNet50_FPN_Weights.COCO_V1' or 'DEFAULT'") from None
