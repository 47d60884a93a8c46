"""The FFD-Net settings (Zhang & He, "Deep Free-Form Deformation Network for Object-Mask Registration", ICCV 2017,
sec. 3.3) as a config block; the operators they parameterise are in :mod:`ops.ffd`.

Free of torch at import, so a job reports a config error before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maskflow.config import require


@dataclass
class FFDConfig:
    """The paper's FFD-Net settings (sec. 3.3): the control mesh and the dual mask pooling."""

    mesh_size: int = 13  # control points per axis (My = Mx): 10 x 10 B-spline cells
    grid_sizes: list[int] = field(default_factory=lambda: [30, 20])  # pooling grids
    context: float = 1.6  # enlargement of the tight box for the context pooling
    sampling_ratio: int = 2  # roi_align samples per cell and axis

    def validate(self) -> None:
        require(self.mesh_size >= 4, "mesh_size", f"needs >= 4 control points per axis, got {self.mesh_size}")
        require(len(self.grid_sizes) > 0 and all(g > 0 for g in self.grid_sizes), "grid_sizes",
                f"must be positive ints, got {self.grid_sizes}")
        require(self.context >= 1.0, "context", f"must be >= 1, got {self.context}")
        require(self.sampling_ratio > 0, "sampling_ratio", f"must be > 0, got {self.sampling_ratio}")
