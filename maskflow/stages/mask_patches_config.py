"""The config of the mask-patches stage (:mod:`maskflow.stages.mask_patches`; its docstring describes each setting).

Apart from the stage, and free of torch at import, so the job reports a config error before torch loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from maskflow.config import Uri, require
from maskflow.stage import StageJobConfig

REFERENCE_PATCH = 160  # the patch side the paper's jitter is given at (SharpMask's 160 x 160 input)


@dataclass
class MaskPatchesInputConfig:
    shards: Uri = ""  # a stage output of image samples
    # Which images: all, or one side of a deterministic split by image id (crc32 of the id against val_fraction),
    # so training and validation windows of one image shard never share an image.
    split: Literal["all", "train", "val"] = "all"
    val_fraction: float = 0.2

    def validate(self) -> None:
        require(bool(self.shards), "shards", "required: a stage output of image samples (input.shards)")
        require(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")


@dataclass
class PatchSettings:
    patch: int = 96  # window side in pixels (the model's patch)
    object_size: int | None = None  # canonical object side in the window; None: ceil(patch * 128 / 224)
    positives_per_object: int = 3
    negatives_per_object: int = 3  # alternately shifted and mis-scaled
    background_per_image: int = 3  # windows anywhere at a pyramid scale, with no object near canonical
    # jitter, in pixels of a 160 px window (the paper's figures; scaled by patch / 160)
    max_shift: float = 16.0  # positives: object centre within +-max_shift of the window centre (each axis)
    max_scale_log2: float = 0.25  # positives: larger side = canonical * 2**u, |u| <= this
    neg_min_shift: float = 32.0  # negatives: shifted at least this far (on one axis at least) from every object...
    neg_max_shift: float = 80.0  # ...(shifted negatives: at most this far)
    neg_min_scale_log2: float = 1.0  # ...or mis-scaled by 2**u, |u| >= this, for every object
    neg_max_scale_log2: float = 2.0  # (mis-scaled negatives: |u| at most this)
    background_scale_log2: tuple[float, float] = (-2.5, 0.5)  # background windows: side = patch / 2**u, u in this
    min_object_side: float = 4.0  # objects whose larger side (pixels) is smaller are not used as positives
    tries: int = 20  # draws for a negative that is clear of every object before giving up (counted)
    mask_threshold: float = 0.5  # resampled {0, 1} masks are binarised at this
    seed: int = 0  # with the image id: the window draws of that image

    def validate(self) -> None:
        require(32 <= self.patch <= 1024, "patch", "must be in [32, 1024]")
        require(self.object_size is None or 4 <= self.object_size <= self.patch, "object_size",
                "must be in [4, patch]")
        require(self.positives_per_object >= 0 and self.negatives_per_object >= 0 and self.background_per_image >= 0,
                "positives_per_object", "window counts must be >= 0")
        require(self.max_shift >= 0 and self.max_scale_log2 >= 0, "max_shift", "jitter must be >= 0")
        require(self.neg_min_shift > self.max_shift, "neg_min_shift", "must exceed max_shift (positives' jitter)")
        require(self.neg_max_shift >= self.neg_min_shift, "neg_max_shift", "must be >= neg_min_shift")
        require(self.neg_min_scale_log2 > self.max_scale_log2, "neg_min_scale_log2",
                "must exceed max_scale_log2 (positives' jitter)")
        require(self.neg_max_scale_log2 >= self.neg_min_scale_log2, "neg_max_scale_log2",
                "must be >= neg_min_scale_log2")
        require(self.background_scale_log2[0] <= self.background_scale_log2[1], "background_scale_log2",
                "must be [low, high] with low <= high")
        require(self.min_object_side > 0, "min_object_side", "must be positive")
        require(self.tries >= 1, "tries", "must be at least 1")
        require(0 < self.mask_threshold < 1, "mask_threshold", "must be in (0, 1)")

    @property
    def canonical_size(self) -> int:
        return self.object_size or math.ceil(self.patch * 128 / 224)

    def at_patch(self, pixels_at_160: float) -> float:
        """A distance given at a 160 px window, in pixels of this window."""
        return pixels_at_160 * self.patch / REFERENCE_PATCH


@dataclass
class MaskPatchesConfig(StageJobConfig):
    input: MaskPatchesInputConfig = field(default_factory=MaskPatchesInputConfig)
    patches: PatchSettings = field(default_factory=PatchSettings)
