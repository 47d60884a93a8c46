"""The config of the DeepMask / SharpMask proposal generator (:mod:`maskflow.models.sharpmask`).

Pinheiro et al., "Learning to Refine Object Segments" (SharpMask, ECCV 2016), on the DeepMask trunk and heads of
"Learning to Segment Object Candidates" (NIPS 2015, section 3; "DeepMask-ours": a ResNet trunk, head C). Defaults
are the CPU variant of ../shared/MODELS.md section 7: a 96 x 96 patch, a 4-stage residual trunk of 16/32/64/128
channels at strides 2/4/8/16 (a 6 x 6 code), 1x1 -> 64, a shared fc of 256, a 28 x 28 mask, a 256 -> 512 -> 1
score; SharpMask's refinement with k_m = k_s = 16 and 4 modules 6 -> 12 -> 24 -> 48 -> 96 fed by the trunk's
features at strides 16/8/4/2. ``trunk.arch: resnet50`` with ``patch: 160`` and the widths of conf/sharpmask/paper.yaml
is the paper's network (ResNet-50 to conv4, 10 x 10 x 1024 -> 128 -> 512, 56 x 56 mask, k_m = 32).

``refine: false`` is DeepMask (phase 1 of the paper's schedule), ``refine: true`` adds the refinement modules
(phase 2, trained with the rest frozen, initialised from the DeepMask model). ``inference`` holds the settings of
the fully convolutional pyramid inference (section 3.3 of DeepMask / 4 of SharpMask).

Apart from the network code and free of torch at import, so a job reports a config error before torch loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from maskflow.config import require

STRIDE = 16  # the trunk's output stride, hence the window stride of the fully convolutional inference


@dataclass
class TrunkConfig:
    """``small``: 4 residual stages (torchvision ``BasicBlock``), each starting with a stride-2 block, ``channels``
    wide, ``blocks`` blocks each (strides 2/4/8/16). ``resnet50``: torchvision's ResNet-50 up to ``layer3``
    (conv4, stride 16, 1024 channels), built with ``weights=None`` (no download; skips: the stem's ReLU at stride
    2, layer1/2/3 at 4/8/16)."""

    arch: Literal["small", "resnet50"] = "small"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # small only
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # small only

    def validate(self) -> None:
        if self.arch == "small":
            require(len(self.channels) == 4, "channels", "needs 4 stages (strides 2/4/8/16)")
            require(all(c >= 1 for c in self.channels), "channels", "must be positive")
            require(len(self.blocks) == 4 and all(b >= 1 for b in self.blocks), "blocks",
                    "needs 4 entries, each >= 1")

    @property
    def skip_channels(self) -> list[int]:
        """Channels of the features at strides 2, 4, 8, 16."""
        return list(self.channels) if self.arch == "small" else [64, 256, 512, 1024]


@dataclass
class InferenceConfig:
    """Fully convolutional inference over an image pyramid (DeepMask section 3.3): the image is scaled by
    ``2 ** e`` for ``e`` from ``min_scale_log2`` to ``max_scale_log2`` in steps of ``scale_step_log2`` (relative to
    the canonical object size: at scale ``s`` the network finds objects of ``object_size / s`` pixels), padded by
    half a patch of zeros on every side so windows may be centred on the border, and every window at stride 16 is
    scored. The ``top_k`` best windows (score above ``score_thresh``, optionally thinned by non-maximum suppression
    on their boxes at ``nms_thresh``; 1.0 = none, the paper's ranking) get masks, pasted into the image."""

    min_scale_log2: float = -2.5
    max_scale_log2: float = 0.5
    scale_step_log2: float = 0.5
    top_k: int = 100
    score_thresh: float = 0.0  # on the sigmoid of the score
    nms_thresh: float = 1.0  # IoU of window boxes; >= 1: no suppression
    mask_chunk: int = 64  # windows whose masks are computed and pasted at a time (bounds memory)
    mask_dtype: Literal["float16", "float32"] = "float16"  # of the returned (N, 1, H, W) masks: 1000 x 400 x 600
    # probabilities are 0.5 GB in float16

    def validate(self) -> None:
        require(self.scale_step_log2 > 0, "scale_step_log2", "must be positive")
        require(self.max_scale_log2 >= self.min_scale_log2, "max_scale_log2", "must be >= min_scale_log2")
        require(self.top_k >= 1, "top_k", "must be at least 1")
        require(0 <= self.score_thresh < 1, "score_thresh", "must be in [0, 1)")
        require(self.nms_thresh > 0, "nms_thresh", "must be positive (>= 1: no suppression)")
        require(self.mask_chunk >= 1, "mask_chunk", "must be at least 1")

    @property
    def scales(self) -> list[float]:
        n = int(math.floor((self.max_scale_log2 - self.min_scale_log2) / self.scale_step_log2 + 1e-9)) + 1
        return [2.0 ** (self.min_scale_log2 + i * self.scale_step_log2) for i in range(n)]


@dataclass
class SharpMaskConfig:
    patch: int = 96  # input window side (paper: 160); a multiple of 16
    object_size: int | None = None  # canonical object side in the patch; None: ceil(patch * 128 / 224)
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    reduce_channels: int = 64  # the 1x1 convolution after the trunk (paper: 128)
    fc: int = 256  # the shared fc, a convolution over the whole code (paper: 512)
    mask_size: int = 28  # DeepMask's mask head output side (paper: 56)
    mask_upsample: int = 2  # DeepMask's bilinear upsampling of its mask logits (paper: 56 -> 112)
    score_hidden: int = 512  # score head: dropout, fc score_hidden, ReLU, dropout, fc 1 (paper: 1024)
    dropout: float = 0.5
    refine: bool = False  # False: DeepMask; True: SharpMask's refinement modules on top
    k_m: int = 16  # channels of the first mask code (paper: 32), halved per module
    k_s: int = 16  # channels of the first skip projection (paper: 32), halved per module
    # ...but never below this (a deviation for the CPU variant; paper.yaml: 2 = the formula): a module output of 2
    # ReLU channels (the CPU variant's third, k_m / 8) dies within the first steps, and with it the mask code's
    # path to the output; training then sits at "all background" for epochs or for good
    refine_min_channels: int = 8
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def validate(self) -> None:
        require(self.patch >= 32 and self.patch % STRIDE == 0, "patch", f"must be a multiple of {STRIDE}, >= 32")
        require(self.object_size is None or 4 <= self.object_size <= self.patch, "object_size",
                "must be in [4, patch]")
        require(self.reduce_channels >= 1 and self.fc >= 1 and self.score_hidden >= 1, "fc",
                "reduce_channels, fc and score_hidden must be positive")
        require(self.mask_size >= 2, "mask_size", "must be >= 2")
        require(self.mask_upsample >= 1, "mask_upsample", "must be >= 1")
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        require(self.k_m >= 8 and self.k_s >= 8, "k_m", "k_m and k_s must be >= 8 (halved over 4 modules)")
        require(self.refine_min_channels >= 1, "refine_min_channels", "must be >= 1")

    @property
    def code_size(self) -> int:
        """Side of the trunk's output over one patch (the fc's kernel): patch / 16."""
        return self.patch // STRIDE

    @property
    def canonical_size(self) -> int:
        """The object side a positive window is scaled to (DeepMask: 128 px of a 224 patch)."""
        return self.object_size or math.ceil(self.patch * 128 / 224)

    @property
    def output_size(self) -> int:
        """Side of the training forward's mask logits: the patch (SharpMask) or mask_size * mask_upsample."""
        return self.patch if self.refine else self.mask_size * self.mask_upsample
