"""The config of the affine pairs stage (:mod:`maskflow.stages.affine_pairs`; its
docstring describes each setting).

Apart from the stage, and free of torch at import, so the job reports a config error before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maskflow.config import Uri, require
from maskflow.stage import StageJobConfig

MAX_PAIRS_PER_IMAGE = 999


@dataclass
class AffinePairsInputConfig:
    shards: Uri = ""  # a stage output of image samples (directory with manifest.json)

    def validate(self) -> None:
        require(bool(self.shards), "shards", "required: a stage output of image samples (input.shards)")


@dataclass
class PairSettings:
    seed: int = 0
    per_image: int = 1  # pairs made of each image, each an independent draw (keys <image key>_<k:03d> when > 1)
    rotation_deg: float = 30.0  # rotation uniform in [-r, r] degrees
    scale_min: float = 0.8  # isotropic scale uniform in [scale_min, scale_max]
    scale_max: float = 1.2
    shear_deg: float = 10.0  # x-shear angle uniform in [-s, s] degrees
    translation: float = 0.1  # translation uniform in [-t, t] x (W, H)
    flip_prob: float = 0.5  # horizontal flip of the target
    brightness: float = 0.2  # colour jitter of the target: factors uniform in [1 - j, 1 + j]; 0 = off
    contrast: float = 0.2
    saturation: float = 0.2
    elastic_amplitude: float = 0.0  # px, max control displacement; 0 = no elastic deformation (HSTN sec. 4.2)
    elastic_spacing: float = 32.0  # px between control points (smoothness)

    def validate(self) -> None:
        require(1 <= self.per_image <= MAX_PAIRS_PER_IMAGE, "per_image",
                f"must be in [1, {MAX_PAIRS_PER_IMAGE}] (the pair index is 3 digits of the key)")
        require(0 <= self.rotation_deg <= 180, "rotation_deg", "must be in [0, 180]")
        require(0 < self.scale_min <= self.scale_max, "scale_min", "need 0 < scale_min <= scale_max")
        require(0 <= self.shear_deg < 60, "shear_deg", "must be in [0, 60)")
        require(0 <= self.translation <= 1, "translation", "must be in [0, 1] (fraction of the image size)")
        require(0 <= self.flip_prob <= 1, "flip_prob", "must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            require(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        require(self.elastic_spacing >= 4, "elastic_spacing", "must be at least 4 px")
        require(0 <= self.elastic_amplitude <= self.elastic_spacing / 4, "elastic_amplitude",
                "must be in [0, elastic_spacing / 4] (keeps the deformation invertible)")


@dataclass
class AffinePairsConfig(StageJobConfig):
    input: AffinePairsInputConfig = field(default_factory=AffinePairsInputConfig)
    pairs: PairSettings = field(default_factory=PairSettings)
