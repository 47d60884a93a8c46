"""HSTN networks (Shu et al., "Hierarchical Spatial Transformer Network", section 3.2; experiments of section 4).

Four modules, each a submodule with a stable name so that weights move between variants by key prefix:

* ``affine`` — :class:`AffineGenerator`, the Affine-STN localisation network (``[conv 20@5x5 -> max-pool] x 3 -> fc
  50 -> fc 6``), identity at initialisation. Its fc regresses theta in the normalised coordinates of
  ``affine_grid(align_corners=True)`` (resolution-free, identity = ``[[1, 0, 0], [0, 1, 0]]``); the module returns
  it converted to pixel coordinates (:func:`ops.warp.theta_from_normalized`), the convention of every op.
  Affine-STN and HSTN share these keys, so HSTN's affine generator is initialised from a trained Affine-STN with
  ``init.prefix_map: {"affine.": "affine."}`` (section 4.1, item 6).
* converter — eq. 5, :func:`ops.warp.affine_to_flow`;
* sampler — eq. 6, bilinear backward warping :func:`ops.warp.warp` (zeros outside the input);
* ``flow`` — :class:`FlowGenerator`, the U-Net on the affinely warped input (3x3 convolutions, channels double
  after each stride-2 downsampling and halve after each stride-2 transposed convolution, skip connections, a 1x1
  bottleneck) whose last layer is zero-initialised, so HSTN equals Affine-STN exactly at initialisation. Its output
  ``w`` is a flow in pixels of the input grid; the total field is :func:`ops.hstn.hstn_flow` (``compose``: the
  exact ``phi_A(p + w(p))``; ``sum``: the paper's literal ``Hx + w``).

:class:`HSTNClassifier` (``variant``: ``cnn`` | ``affine_stn`` | ``hstn``) puts the paper's CNN back end
(``backend``) after the sampler: the three models of Table 1 with one code path. :class:`HSTNAligner`
(``variant``: ``affine_stn`` | ``hstn``) takes ``source || target`` (section 4.2) and returns the warped source and
its motion field ``flow_t2s`` (target pixel -> source location, pixels, channel 0 = dx): the same direction as the
``pair/1`` samples' ground truth.

Images are float tensors in [0, 1], ``(N, C, H, W)``; flows follow :mod:`ops.warp`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from maskflow.models.hstn_config import (AffineGeneratorConfig, BackendConfig, FlowGeneratorConfig, HSTNAlignConfig,
                                         HSTNClassifierConfig)
from ops.hstn import hstn_flow
from ops.warp import affine_to_flow, theta_from_normalized, warp

__all__ = ["AffineGenerator", "FlowGenerator", "ClassifierBackend", "HSTNClassifier", "HSTNAligner",
           "ClassifierOutput", "AlignOutput", "build_hstn", "load_hstn", "resize_images", "resize_flow"]


class AffineGenerator(nn.Module):
    """The Affine-STN localisation network: image ``(N, C, S, S)`` -> pixel-coordinate theta ``(N, 2, 3)``
    (output pixel -> input location, :mod:`ops.warp`'s convention), identity at initialisation."""

    def __init__(self, in_channels: int, image_size: int, cfg: AffineGeneratorConfig):
        super().__init__()
        layers, channels = [], in_channels
        for _ in range(cfg.blocks):
            layers += [nn.Conv2d(channels, cfg.channels, cfg.kernel, padding=cfg.kernel // 2), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            channels = cfg.channels
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** cfg.blocks
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, cfg.fc), nn.ReLU(inplace=True))
        self.theta = nn.Linear(cfg.fc, 6)
        # Identity at the start (section 3.2, "Linear Transformation Generator"): zero weights, identity bias.
        nn.init.zeros_(self.theta.weight)
        with torch.no_grad():
            self.theta.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta_n = self.theta(self.fc(self.features(x))).view(-1, 2, 3)
        return theta_from_normalized(theta_n, x.shape[-2], x.shape[-1])


class FlowGenerator(nn.Module):
    """U-Net flow generator: ``(N, C, S, S)`` -> residual flow ``(N, 2, S, S)`` in pixels, 0 at initialisation.

    ``S`` must be divisible by ``2 ** levels``. Widths ``channels = [c0, c1, ...]``: c0 at full resolution, c_i
    after the i-th stride-2 3x3 convolution; a 1x1 bottleneck at the coarsest level; each stride-2 3x3 transposed
    convolution goes back one level (c_i -> c_{i-1}), is concatenated with the encoder's features at that
    resolution and fused by a 3x3 convolution."""

    def __init__(self, in_channels: int, cfg: FlowGeneratorConfig):
        super().__init__()
        c = list(cfg.channels)
        self.stem = _conv_relu(in_channels, c[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c[i], c[i + 1], 3, stride=2, padding=1), nn.ReLU(inplace=True),
                          _conv_relu(c[i + 1], c[i + 1]))
            for i in range(len(c) - 1))
        self.bottleneck = nn.Sequential(nn.Conv2d(c[-1], c[-1], 1), nn.ReLU(inplace=True))
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(c[i + 1], c[i], 3, stride=2, padding=1, output_padding=1),
                          nn.ReLU(inplace=True))
            for i in reversed(range(len(c) - 1)))
        self.fuse = nn.ModuleList(_conv_relu(2 * c[i], c[i]) for i in reversed(range(len(c) - 1)))
        self.head = nn.Conv2d(c[0], 2, 3, padding=1)
        # Zero flow at the start (section 3.2, "Optical Flow Field Generator"): HSTN begins as its Affine-STN.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = self.bottleneck(skips.pop())
        for up, fuse in zip(self.up, self.fuse):
            y = fuse(torch.cat((up(y), skips.pop()), 1))
        return self.head(y)


class ClassifierBackend(nn.Module):
    """The paper's CNN: ``[conv 32@3x3 -> ReLU -> max-pool -> dropout 0.5] x 3 -> fc 256 -> ReLU -> fc 10``
    (logits; the softmax is in the loss)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, cfg: BackendConfig):
        super().__init__()
        layers, channels = [], in_channels
        for _ in range(cfg.blocks):
            layers += [nn.Conv2d(channels, cfg.channels, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                       nn.Dropout(cfg.dropout)]
            channels = cfg.channels
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** cfg.blocks
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, cfg.fc), nn.ReLU(inplace=True),
                                        nn.Linear(cfg.fc, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))


class ClassifierOutput(NamedTuple):
    logits: torch.Tensor  # (N, num_classes)
    warped: torch.Tensor  # (N, C, S, S) the image the back end saw (the input itself for ``cnn``)
    theta: torch.Tensor | None  # (N, 2, 3) pixel-coordinate affine; None for ``cnn``
    residual_flow: torch.Tensor | None  # (N, 2, S, S) w in pixels; None unless ``hstn``


class AlignOutput(NamedTuple):
    warped: torch.Tensor  # (N, C, S, S) the source warped onto the target
    flow: torch.Tensor  # (N, 2, S, S) total motion field, target pixel -> source location (pixels)
    theta: torch.Tensor  # (N, 2, 3) the affine part (pixel coordinates)
    residual_flow: torch.Tensor | None  # (N, 2, S, S) w in pixels; None for ``affine_stn``


class _SpatialTransformer(nn.Module):
    """The shared front: affine generator -> converter -> (flow generator on the affinely warped input) -> total
    field. Subclasses decide what the generators see."""

    variant: str
    field_mode: str

    def _build_generators(self, cfg, generator_channels: int, flow_channels: int) -> None:
        if cfg.variant in ("affine_stn", "hstn"):
            self.affine = AffineGenerator(generator_channels, cfg.image_size, cfg.affine)
        if cfg.variant == "hstn":
            self.flow = FlowGenerator(flow_channels, cfg.flow)

    def _field(self, image: torch.Tensor, context: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(total flow, theta, residual flow) for warping ``image``; ``context`` (the alignment target) is shown to
        both generators beside the image."""
        H, W = image.shape[-2:]
        with_context = (lambda x: torch.cat((x, context), 1)) if context is not None else (lambda x: x)
        theta = self.affine(with_context(image))
        affine_field = affine_to_flow(theta, H, W)
        if self.variant != "hstn":
            return affine_field, theta, None
        residual = self.flow(with_context(warp(image, affine_field)))
        return hstn_flow(theta, residual, mode=self.field_mode), theta, residual


class HSTNClassifier(_SpatialTransformer):
    """Cluttered-digit classifier (section 4.1): ``cnn`` | ``affine_stn`` | ``hstn`` in front of one CNN back end."""

    def __init__(self, cfg: HSTNClassifierConfig):
        super().__init__()
        self.variant, self.field_mode = cfg.variant, cfg.field_mode
        self._build_generators(cfg, cfg.in_channels, cfg.in_channels)
        self.backend = ClassifierBackend(cfg.in_channels, cfg.image_size, cfg.num_classes, cfg.backend)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        if self.variant == "cnn":
            return ClassifierOutput(self.backend(x), x, None, None)
        total, theta, residual = self._field(x, None)
        warped = warp(x, total)
        return ClassifierOutput(self.backend(warped), warped, theta, residual)


class HSTNAligner(_SpatialTransformer):
    """Planar alignment (section 4.2): ``forward(source, target)`` warps the source onto the target."""

    def __init__(self, cfg: HSTNAlignConfig):
        super().__init__()
        self.variant, self.field_mode = cfg.variant, cfg.field_mode
        self._build_generators(cfg, 2 * cfg.in_channels, 2 * cfg.in_channels)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> AlignOutput:
        total, theta, residual = self._field(source, target)
        return AlignOutput(warp(source, total), total, theta, residual)


def build_hstn(cfg: HSTNClassifierConfig | HSTNAlignConfig) -> HSTNClassifier | HSTNAligner:
    """The network a config describes (a classifier or an aligner, by the config's type)."""
    if isinstance(cfg, HSTNClassifierConfig):
        return HSTNClassifier(cfg)
    if isinstance(cfg, HSTNAlignConfig):
        return HSTNAligner(cfg)
    raise TypeError(f"not an HSTN config: {type(cfg).__name__}")


def load_hstn(uri: str, arch: HSTNClassifierConfig | HSTNAlignConfig, options=None,
              device: str | torch.device = "cpu") -> HSTNClassifier | HSTNAligner:
    """The HSTN network named by ``uri`` (a registry or run URI: the logged module, which carries its own
    architecture; a trainer checkpoint: built from ``arch``), in eval mode on ``device``."""
    from maskflow.models.loading import REGISTRY_SCHEMES, check_model_uri, load_state_dict
    from maskflow.storage import DEFAULT_OPTIONS

    check_model_uri(uri)
    if uri.startswith(REGISTRY_SCHEMES):
        import mlflow.pytorch

        model = mlflow.pytorch.load_model(uri, map_location=torch.device(device))
    else:
        model = build_hstn(arch)
        model.load_state_dict(load_state_dict(uri, options or DEFAULT_OPTIONS))
    expected = HSTNClassifier if isinstance(arch, HSTNClassifierConfig) else HSTNAligner
    if not isinstance(model, expected):
        from maskflow.config import ConfigError

        raise ConfigError(f"model.uri: {uri} holds a {type(model).__name__}, expected an {expected.__name__}")
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------- resampling


def resize_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, h, w) float images -> (N, C, height, width): bilinear with ``align_corners=True`` (the corner pixel
    centres stay put, :mod:`ops.warp`'s convention), antialiased when shrinking."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    return torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", align_corners=True,
                                           antialias=True)


def resize_flow(flow: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (N, 2, h, w) pixel flow on another grid, (N, 2, height, width) in that grid's pixels.

    With ``align_corners=True`` new pixel ``(x, y)`` sits at ``(x (w-1)/(width-1), y (h-1)/(height-1))`` of the old
    grid: the flow is read there bilinearly and each component rescaled by its axis' factor, ``dx (width-1)/(w-1)``
    and ``dy (height-1)/(h-1)`` (the pair resize of section 4.2's CPU variant, and back for evaluation)."""
    h, w = flow.shape[-2:]
    if (h, w) == (height, width):
        return flow
    resampled = torch.nn.functional.interpolate(flow, size=(height, width), mode="bilinear", align_corners=True)
    sx = (width - 1) / (w - 1) if w > 1 else 1.0
    sy = (height - 1) / (h - 1) if h > 1 else 1.0
    return resampled * torch.tensor([sx, sy], dtype=flow.dtype, device=flow.device).view(1, 2, 1, 1)
