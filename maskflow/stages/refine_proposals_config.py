"""The config of the refinement job (:mod:`maskflow.stages.refine_proposals`; its docstring describes each setting).

Apart from the stage, and free of torch at import, so the job reports a config error before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maskflow.config import Uri, require
from maskflow.models.ffdnet_config import FFDConfig
from maskflow.stage import StageJobConfig


@dataclass
class RefineInputConfig:
    proposals: Uri = ""  # a proposals/1 stage output of any generator (ground truth not needed)

    def validate(self) -> None:
        require(bool(self.proposals), "proposals", "required: a proposals stage output (input.proposals)")


@dataclass
class RefinerModelConfig:
    uri: Uri = ""  # an ffdnet model: models:/name@alias | models:/name/N | runs:/<id>/model | a checkpoint
    arch: FFDConfig = field(default_factory=FFDConfig)  # for checkpoints (registered models carry their own)

    def validate(self) -> None:
        require(bool(self.uri), "uri", "required: the FFD-Net (models:/name@alias, runs:/.., a checkpoint)")


@dataclass
class RefineSettings:
    top_k: int = 100  # proposals refined per image, best scores first (paper: 1000; the rest pass through)
    iterations: int = 1  # passes of the network over each crop (the paper: 1)
    batch_size: int = 64  # crops per forward pass (crops of several images share one)
    mask_threshold: float = 0.5  # the pasted-back soft mask is binarised above this

    def validate(self) -> None:
        require(1 <= self.top_k <= 1000, "top_k", f"must be in 1..1000, got {self.top_k}")
        require(self.iterations >= 1, "iterations", f"must be at least 1, got {self.iterations}")
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        require(0 < self.mask_threshold < 1, "mask_threshold", f"must be in (0, 1), got {self.mask_threshold}")


@dataclass
class RefineProposalsConfig(StageJobConfig):
    input: RefineInputConfig = field(default_factory=RefineInputConfig)
    model: RefinerModelConfig = field(default_factory=RefinerModelConfig)
    refine: RefineSettings = field(default_factory=RefineSettings)
