"""The config of the FFD crops stage (:mod:`maskflow.stages.ffd_crops`; its
docstring describes each setting).

Apart from the stage, and free of torch at import, so the job reports a config error before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maskflow.config import Uri, require
from maskflow.stage import StageJobConfig


@dataclass
class FFDCropsInputConfig:
    proposals: list[Uri] = field(default_factory=list)  # proposal-stage outputs (any generator), read in order

    def validate(self) -> None:
        require(bool(self.proposals), "proposals", "required: one or more proposal-stage outputs (input.proposals)")


@dataclass
class CropSettings:
    min_iou: float = 0.5  # keep proposals whose best ground-truth IoU is greater than this
    enlarge: float = 1.6  # crop box = tight box scaled by this in height and width
    size: int = 128  # output side in pixels
    mask_threshold: float = 0.5  # resampled {0, 1} masks are binarised at this

    def validate(self) -> None:
        require(0 <= self.min_iou < 1, "min_iou", "must be in [0, 1)")
        require(self.enlarge >= 1, "enlarge", "must be >= 1")
        require(8 <= self.size <= 1024, "size", "must be in [8, 1024]")
        require(0 < self.mask_threshold < 1, "mask_threshold", "must be in (0, 1)")


@dataclass
class FFDCropsConfig(StageJobConfig):
    input: FFDCropsInputConfig = field(default_factory=FFDCropsInputConfig)
    crops: CropSettings = field(default_factory=CropSettings)
