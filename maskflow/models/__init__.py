"""Models: the class-agnostic Mask R-CNN proposal generator (:mod:`maskflow.models.maskrcnn`)."""

from maskflow.models.maskrcnn import (
    MaskRCNNConfig,
    build_maskrcnn,
    image_to_tensor,
    proposals_from_output,
    targets_from_meta,
)

__all__ = ["MaskRCNNConfig", "build_maskrcnn", "image_to_tensor", "proposals_from_output", "targets_from_meta"]
