"""The configs of the HSTN networks (:mod:`maskflow.models.hstn`) and of their penalties.

Shu et al., "Hierarchical Spatial Transformer Network" (sections 3.2 and 4): an affine generator (the Affine-STN
localisation network), a converter (affine -> motion field), a bilinear sampler and a U-Net flow generator on the
affinely warped input. One classifier config covers the three models of the paper's cluttered-MNIST comparison
(``variant``: the plain CNN, Affine-STN, HSTN, all with the same CNN back end); one alignment config covers the
planar-alignment networks (``variant``: Affine-STN, HSTN).

Apart from the network code and free of torch at import, so a job reports a config error before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from maskflow.config import require


@dataclass
class AffineGeneratorConfig:
    """The localisation network: ``[conv channels@kernel x kernel -> ReLU -> 2x2 max-pool] x blocks -> fc -> ReLU
    -> fc 6`` (paper: 3 blocks of 20@5x5, fc 50), the last layer initialised to the identity transform."""

    channels: int = 20
    kernel: int = 5
    blocks: int = 3
    fc: int = 50

    def validate(self) -> None:
        require(self.channels >= 1, "channels", "must be >= 1")
        require(self.kernel >= 1 and self.kernel % 2 == 1, "kernel", "must be an odd number >= 1 (same padding)")
        require(self.blocks >= 1, "blocks", "must be >= 1")
        require(self.fc >= 1, "fc", "must be >= 1")


@dataclass
class FlowGeneratorConfig:
    """The U-Net flow generator: ``channels[0]`` at full resolution, then one stride-2 3x3 convolution per further
    entry (channels double in the paper: 16/32/64 = 2 levels), a 1x1 bottleneck, one stride-2 transposed
    convolution per level back up (channels halve) with a skip connection from the same resolution, and a last 3x3
    convolution to the 2 flow channels, zero-initialised (the residual flow is exactly 0 at the start)."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])

    @property
    def levels(self) -> int:
        """Stride-2 downsamplings (the input side must be divisible by ``2 ** levels``)."""
        return len(self.channels) - 1

    def validate(self) -> None:
        require(len(self.channels) >= 2, "channels", "needs at least 2 entries (full resolution + one level)")
        require(all(c >= 1 for c in self.channels), "channels", "must be positive")


@dataclass
class BackendConfig:
    """The paper's CNN classifier (also the plain-CNN baseline): ``[conv channels@3x3 -> ReLU -> 2x2 max-pool ->
    dropout] x blocks -> fc -> ReLU -> fc num_classes`` (paper: 3 blocks of 32, dropout 0.5, fc 256, 10 classes)."""

    channels: int = 32
    blocks: int = 3
    fc: int = 256
    dropout: float = 0.5

    def validate(self) -> None:
        require(self.channels >= 1, "channels", "must be >= 1")
        require(self.blocks >= 1, "blocks", "must be >= 1")
        require(self.fc >= 1, "fc", "must be >= 1")
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


FieldMode = Literal["compose", "sum"]


@dataclass
class HSTNClassifierConfig:
    """A cluttered-digit classifier: ``cnn`` (back end only), ``affine_stn`` (affine generator + sampler + back end)
    or ``hstn`` (affine generator, converter, flow generator on the affinely warped image, sampler, back end)."""

    variant: Literal["cnn", "affine_stn", "hstn"] = "hstn"
    image_size: int = 40  # square input side in pixels (the imported cluttered MNIST: 40; the paper's set: 60)
    in_channels: int = 1  # grey canvases
    num_classes: int = 10
    # total field of the affine theta and the residual flow w: "compose" = phi_A(p + w(p)) exactly (the flow
    # generator sees the affinely warped image), "sum" = the paper's literal Hx + w (ops.hstn.hstn_flow)
    field_mode: FieldMode = "compose"
    affine: AffineGeneratorConfig = field(default_factory=AffineGeneratorConfig)
    flow: FlowGeneratorConfig = field(default_factory=FlowGeneratorConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)

    def validate(self) -> None:
        require(self.image_size >= 8, "image_size", "must be >= 8")
        require(self.in_channels >= 1, "in_channels", "must be >= 1")
        require(self.num_classes >= 2, "num_classes", "must be >= 2")
        _check_divisible(self.image_size, self.variant, self.flow, self.affine, self.backend)


@dataclass
class HSTNAlignConfig:
    """A planar-alignment network: input ``source || target`` (both RGB, resized to ``image_size``), output the
    source warped onto the target and the motion field ``flow_t2s`` (target pixel -> source location, pixels of the
    ``image_size`` grid). ``affine_stn``: affine generator only; ``hstn``: plus the flow generator, which sees the
    affinely warped source beside the target."""

    variant: Literal["affine_stn", "hstn"] = "hstn"
    image_size: int = 64  # pairs are resized to image_size x image_size (flows rescaled per axis)
    in_channels: int = 3  # per image (RGB)
    field_mode: FieldMode = "compose"
    affine: AffineGeneratorConfig = field(default_factory=AffineGeneratorConfig)
    flow: FlowGeneratorConfig = field(default_factory=lambda: FlowGeneratorConfig([16, 32, 64, 128]))

    def validate(self) -> None:
        require(self.image_size >= 8, "image_size", "must be >= 8")
        require(self.in_channels >= 1, "in_channels", "must be >= 1")
        _check_divisible(self.image_size, self.variant, self.flow, self.affine, None)


def _check_divisible(size: int, variant: str, flow: FlowGeneratorConfig, affine: AffineGeneratorConfig,
                     backend: BackendConfig | None) -> None:
    if variant == "hstn":
        require(size % (2 ** flow.levels) == 0, "flow.channels",
                f"{flow.levels} levels need image_size divisible by {2 ** flow.levels}, got {size}")
    if variant != "cnn":
        require(size >= 2 ** affine.blocks, "affine.blocks", f"{affine.blocks} max-pools shrink {size} px to nothing")
    if backend is not None:
        require(size >= 2 ** backend.blocks, "backend.blocks",
                f"{backend.blocks} max-pools shrink {size} px to nothing")


@dataclass
class HSTNLossConfig:
    """Weights of the HSTN terms (eq. 7 on the residual flow w: ``alpha * bending + beta * smoothness``; section 4.1
    uses alpha = 0.01, beta = 1); the task term (cross-entropy, or the L2 photometric error) has weight 1.

    ``penalty_units`` says in which units the weights are meant: the paper does not say whether w is in pixels or
    in the [-1, 1] coordinates of a TF/Lasagne sampler. ``ops.hstn`` penalises pixel flows with mean squared
    differences; with ``normalized`` the weights are converted to pixels, ``alpha * (2 / (S - 1)) ** 2`` and
    ``beta * (2 / (S - 1)) ** 2`` for an ``S``-pixel side (both penalties are quadratic in w), which equals the
    paper's penalties on normalised flows exactly."""

    alpha: float = 0.01  # bending energy weight
    beta: float = 1.0  # smoothness weight
    penalty_units: Literal["pixels", "normalized"] = "pixels"

    def validate(self) -> None:
        require(self.alpha >= 0, "alpha", "must be >= 0")
        require(self.beta >= 0, "beta", "must be >= 0")

    def penalty_weights(self, side: int) -> tuple[float, float]:
        """(alpha, beta) for pixel flows on a ``side``-pixel grid."""
        if self.penalty_units == "pixels":
            return self.alpha, self.beta
        k = (2.0 / (side - 1)) ** 2
        return self.alpha * k, self.beta * k


@dataclass
class EPEConfig:
    """Where the alignment EPE is measured (section 4.2: "only on the central part of each image"): the central
    box of ``central_fraction`` of each side, intersected with the target's valid region (pixels whose ground-truth
    source location is inside the source)."""

    central_fraction: float = 0.5

    def validate(self) -> None:
        require(0 < self.central_fraction <= 1, "central_fraction", "must be in (0, 1]")
