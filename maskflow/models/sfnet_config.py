"""The architecture config of SFNet and of its affine-regression baseline (see :mod:`maskflow.models.sfnet`).

Kept apart from the model code, and free of torch at import, so a job parses and checks its config before torch loads
(only ``backbone.weights`` imports torchvision, to check that the enum exists; nothing is downloaded here).

Grid and units: the correspondence grid ``G x G`` is the shallow feature level's (``ceil(image_size / stride)``);
the models' flows are in cells of that grid (:mod:`ops.sfnet`), one cell = ``(S - 1) / (G - 1)`` pixels of the
``S x S`` input under ``align_corners=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from maskflow.config import require

# Output stride of each stage of both backbone families (TinyBackbone and torchvision's ResNet).
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
ARCHS = ("tiny", "resnet18", "resnet50", "resnet101")
_RESNET_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights"}
_RESNET_STAGE1_CHANNELS = {"resnet18": 64, "resnet50": 256, "resnet101": 256}

# SFNet (Lee et al., CVPR 2019, sec. 4.1): sigma = 5 cells on its 20 x 20 grid.
PAPER_SIGMA_CELLS = 5.0
PAPER_GRID = 20


@dataclass
class FeatureBackboneConfig:
    """The frozen feature extractor, at two depths.

    ``tiny`` is the body of the project's CPU-sized Mask R-CNN (``MaskRCNNConfig.backbone: tiny_fpn``, same
    ``width``); ``resnet*`` are torchvision's ResNets (the body of ``resnet50_fpn`` / ``resnet18_fpn``). Module names
    are the Mask R-CNN body's, under ``backbone.``, so ``init.from: models:/maskflow-maskrcnn@champion`` with
    ``prefix_map: {"backbone.body.": "backbone."}`` copies a trained detector's backbone. ``weights`` (ResNets only)
    loads torchvision's ImageNet weights instead (the paper's choice; they must be downloadable).
    """

    arch: Literal["tiny", "resnet18", "resnet50", "resnet101"] = "tiny"
    width: int = 16  # tiny: channels of the first stage (doubled at each of the next three)
    weights: str | None = None  # resnet*: a torchvision enum, e.g. ResNet101_Weights.IMAGENET1K_V2
    # The paper's "conv4-23 / conv5-3" pair (ResNet-101: layer3, layer4); the CPU variant uses layer2 / layer3 of
    # tiny (the same "stride s, and 2s upsampled" pair at half the strides). ``deep`` must be the stage after
    # ``shallow``.
    shallow: Literal["layer1", "layer2", "layer3"] = "layer2"
    deep: Literal["layer2", "layer3", "layer4"] = "layer3"

    def validate(self) -> None:
        require(self.arch in ARCHS, "arch", f"must be one of {list(ARCHS)}, got {self.arch!r}")
        require(self.width >= 2, "width", f"must be >= 2, got {self.width}")
        require(STRIDES[self.deep] == 2 * STRIDES[self.shallow], "deep",
                f"must be the stage after shallow ({self.shallow}), got {self.deep}")
        if self.weights is not None:
            require(self.arch != "tiny", "weights", "the tiny backbone has no torchvision weights: initialise it "
                    "from a registered Mask R-CNN with init.from")
            from maskflow.models.maskrcnn_config import resolve_weights

            enum = resolve_weights(self.weights, _RESNET_WEIGHTS[self.arch], "weights", self.arch)
            require(type(enum).__name__ == _RESNET_WEIGHTS[self.arch], "weights",
                    f"{self.weights!r} does not fit {self.arch} (expected {_RESNET_WEIGHTS[self.arch]}.*)")

    def channels(self, level: str) -> int:
        """Feature channels of a stage (``layer1``..``layer4``)."""
        stage1 = self.width if self.arch == "tiny" else _RESNET_STAGE1_CHANNELS[self.arch]
        return stage1 * 2 ** (int(level[-1]) - 1)


@dataclass
class AdaptationConfig:
    """SFNet's residual adaptation layers (sec. 4.1), per level: ``x + ReLU(BN(conv(x)))``, ``blocks`` times."""

    blocks: int = 2  # the released code (cvlab-yonsei/SFNet) stacks two per level; the paper's text reads as one
    kernel_shallow: int = 5  # on conv4-23 in the paper
    kernel_deep: int = 3  # on conv5-3

    def validate(self) -> None:
        require(self.blocks >= 0, "blocks", f"must be >= 0, got {self.blocks}")
        for key in ("kernel_shallow", "kernel_deep"):
            k = getattr(self, key)
            require(k >= 1 and k % 2 == 1, key, f"must be an odd size >= 1 (same padding), got {k}")


@dataclass
class AffineHeadConfig:
    """The baseline's regressor (CNNGeometric, Rocco et al., CVPR 2017, sec. 3): correlation of the deep level
    (ReLU, L2-normalised over source positions) -> conv-BN-ReLU x2 -> linear -> 6 affine parameters."""

    channels: tuple[int, int] = (128, 64)
    kernel_sizes: tuple[int, int] = (5, 3)  # same padding (the deep level is only 8 x 8 at 128 px)

    def validate(self) -> None:
        require(all(c >= 1 for c in self.channels), "channels", f"must be >= 1, got {list(self.channels)}")
        require(all(k >= 1 and k % 2 == 1 for k in self.kernel_sizes), "kernel_sizes",
                f"must be odd sizes >= 1, got {list(self.kernel_sizes)}")


@dataclass
class SFNetConfig:
    """``variant: sfnet`` — the paper's network: frozen backbone, adaptation layers, per-level cosine correlation
    (clipped at zero, as the released code), product of the levels, argmax both ways; ``variant:
    affine_baseline`` — the CNNGeometric-style affine regressor on the same backbone, whose affine is turned into the
    same two flows, so both are trained on the same pairs and evaluated identically."""

    variant: Literal["sfnet", "affine_baseline"] = "sfnet"
    backbone: FeatureBackboneConfig = field(default_factory=FeatureBackboneConfig)
    image_size: int = 128  # px, square input (the paper: 320)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    relu_correlation: bool = True  # clip each level's cosine correlation at zero before the product
    argmax: Literal["kernel", "soft", "hard"] = "kernel"  # Table 4's "KS", "S", "H"
    beta: float = 50.0  # softmax temperature
    sigma: float | None = None  # Gaussian kernel std in cells; None: the paper's 5 cells of 20, i.e. 5 (G - 1) / 19
    affine: AffineHeadConfig = field(default_factory=AffineHeadConfig)

    def validate(self) -> None:
        require(self.image_size >= 2 * STRIDES[self.backbone.deep], "image_size",
                f"must be >= {2 * STRIDES[self.backbone.deep]} (two cells of the deep level), got {self.image_size}")
        require(self.beta > 0, "beta", f"must be positive, got {self.beta}")
        require(self.sigma is None or self.sigma > 0, "sigma", f"must be positive, got {self.sigma}")

    @property
    def grid(self) -> int:
        """G: cells per side of the correlation grid (the shallow level at ``image_size``)."""
        return math.ceil(self.image_size / STRIDES[self.backbone.shallow])

    @property
    def sigma_cells(self) -> float:
        return self.sigma if self.sigma is not None else PAPER_SIGMA_CELLS * (self.grid - 1) / (PAPER_GRID - 1)
