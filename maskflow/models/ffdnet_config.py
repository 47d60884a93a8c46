"""The FFD-Net settings (Zhang & He, "Deep Free-Form Deformation Network for Object-Mask Registration", ICCV 2017,
sec. 3.1-3.3) as a config block; the network is :mod:`maskflow.models.ffdnet`, the operators it uses are in
:mod:`ops.ffd`.

The defaults are the paper's network (ResNet-101 cut above res4b22 branch2a, pooling grids 30 for the two shallow
levels and 20 for the two deep ones, fc 128 per level -> 512 -> 512 -> 2 x 13 x 13). ``conf/ffdnet/cpu.yaml`` holds the
CPU-sized variant (MODELS.md sec. 2). ``pooling`` and ``head`` select the ablations of issue 11 (proposal-mask pooling
only; a direct per-pixel refinement head instead of the deformation).

Free of torch at import, so a job reports a config error before torch loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from maskflow.config import require

# The four feature levels FFD-Net pools from (sec. 3.3): conv1 (stride 2), res2c (4), res3b3 branch2a (8),
# res4b22 branch2a (16). The CPU backbone has one stage per level at the same strides.
LEVEL_STRIDES = (2, 4, 8, 16)


@dataclass
class FFDBackboneConfig:
    """``resnet101``: torchvision's ResNet-101 built with ``weights=None`` (no ImageNet download on these machines;
    initialise it with ``init.from``), layers as the paper names them. ``tiny``: one stage per level, each a stride-2
    conv-BN-ReLU and a stride-1 conv-BN-ReLU, ``widths`` channels (MODELS.md: 16/32/64/64)."""

    arch: Literal["resnet101", "tiny"] = "resnet101"
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 64])  # tiny only, one per level

    def validate(self) -> None:
        require(len(self.widths) == len(LEVEL_STRIDES) and all(w >= 1 for w in self.widths), "widths",
                f"needs {len(LEVEL_STRIDES)} positive channel counts (one per level), got {self.widths}")


@dataclass
class FFDConfig:
    """The paper's FFD-Net (sec. 3.3) and the CPU variant's knobs."""

    mesh_size: int = 13  # control points per axis (My = Mx): 10 x 10 B-spline cells
    # pooling grids: [shallow, deep] = the grid of the stride-2/4 levels and of the stride-8/16 levels (paper: 30,
    # 20), or one per level (4 entries)
    grid_sizes: list[int] = field(default_factory=lambda: [30, 20])
    context: float = 1.6  # enlargement of the tight box for the context pooling
    sampling_ratio: int = 2  # roi_align samples per cell and axis
    backbone: FFDBackboneConfig = field(default_factory=FFDBackboneConfig)
    crop_size: int = 224  # side of the square crops the network sees (the paper does not state it)
    crop_enlarge: float = 1.6  # a crop's box = the proposal's tight box x this (ffd_crops' crops.enlarge, sec. 3.3)
    level_fc: int = 128  # the fc of each level's pooled features (paper: 128, concatenated to 512)
    fc: int = 512  # the hidden fc (paper: 512 x 512)
    dropout: float = 0.5  # after every fc but the last (the paper gives no rate: Caffe's default)
    init_std: float = 1e-3  # the last fc's Gaussian weights (zero bias): a near-identity deformation at the start
    # dual: mask-weighted pooling in the tight box || plain pooling in the context box (sec. 3.1); proposal: the first
    # half only (ablation)
    pooling: Literal["dual", "proposal"] = "dual"
    # ffd: the last fc regresses 2 M^2 control-point offsets and the proposal is warped; direct (ablation): it
    # regresses a residual mask on an R x R grid (R^2 ~ 2 M^2 outputs: the same head size), upsampled and added
    head: Literal["ffd", "direct"] = "ffd"
    mask_threshold: float = 0.5  # the proposal's pixels above this form its tight box

    def validate(self) -> None:
        require(self.mesh_size >= 4, "mesh_size", f"needs >= 4 control points per axis, got {self.mesh_size}")
        require(len(self.grid_sizes) in (2, len(LEVEL_STRIDES)) and all(g > 0 for g in self.grid_sizes),
                "grid_sizes", f"must be 2 ([shallow, deep]) or {len(LEVEL_STRIDES)} positive ints, got "
                f"{self.grid_sizes}")
        require(self.context >= 1.0, "context", f"must be >= 1, got {self.context}")
        require(self.sampling_ratio > 0, "sampling_ratio", f"must be > 0, got {self.sampling_ratio}")
        require(self.crop_size >= 2 * LEVEL_STRIDES[-1], "crop_size",
                f"must be >= {2 * LEVEL_STRIDES[-1]} (the stride-16 level needs 2 x 2 features), got {self.crop_size}")
        require(self.crop_enlarge >= 1.0, "crop_enlarge", f"must be >= 1, got {self.crop_enlarge}")
        require(self.level_fc >= 1, "level_fc", f"must be >= 1, got {self.level_fc}")
        require(self.fc >= 1, "fc", f"must be >= 1, got {self.fc}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.init_std >= 0, "init_std", f"must be >= 0, got {self.init_std}")
        require(0 < self.mask_threshold < 1, "mask_threshold", f"must be in (0, 1), got {self.mask_threshold}")

    @property
    def level_grids(self) -> list[int]:
        """The pooling grid of each level (stride 2, 4, 8, 16)."""
        if len(self.grid_sizes) == len(LEVEL_STRIDES):
            return list(self.grid_sizes)
        shallow, deep = self.grid_sizes
        return [shallow, shallow, deep, deep]

    @property
    def direct_grid(self) -> int:
        """The side R of the direct head's residual grid: R^2 closest to the FFD head's 2 M^2 outputs."""
        return max(1, round(math.sqrt(2) * self.mesh_size))
