"""The config of the instance maps stage (:mod:`maskflow.stages.instance_maps`; its
docstring describes each setting).

Apart from the stage, and free of torch at import, so the job reports a config error before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from maskflow.config import Uri, require
from maskflow.stage import StageJobConfig


@dataclass
class InstanceMapsInputConfig:
    shards: Uri = ""  # a stage output of image samples

    def validate(self) -> None:
        require(bool(self.shards), "shards", "required: a stage output of image samples (input.shards)")


@dataclass
class ResizeConfig:
    mode: Literal["square", "min_edge", "none"] = "min_edge"
    size: int = 512  # square side, or the shorter side for min_edge
    max_size: int | None = None  # min_edge only: cap on the longer side

    def validate(self) -> None:
        require(self.size >= 8, "size", "must be at least 8 px")
        require(self.max_size is None or self.max_size >= self.size, "max_size", "must be >= size")


@dataclass
class InstanceMapsConfig(StageJobConfig):
    input: InstanceMapsInputConfig = field(default_factory=InstanceMapsInputConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig)
