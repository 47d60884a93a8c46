"""SFNet (Lee et al., "SFNet: Learning Object-aware Semantic Correspondence", CVPR 2019) and its affine-regression
baseline (CNNGeometric, Rocco et al., CVPR 2017), on a frozen backbone.

:class:`SFNet` (sec. 3 and 4.1): a siamese backbone gives features at two depths (the paper: ResNet-101 conv4-23 and
conv5-3; the CPU variant: the tiny Mask R-CNN body's layer2 and layer3); residual adaptation layers refine each level
(:class:`ResidualAdaptation`, two conv-BN-ReLU blocks as the released code, 5x5 on the shallow level, 3x3 on the deep
one), the deep level is upsampled x2 (bilinear, align_corners=True); per level a cosine correlation
(:func:`ops.sfnet.correlation_4d`), clipped at zero as the released code does (``relu_correlation``: two negative
cosines must not make a positive score), the two levels multiplied (:func:`ops.sfnet.combine_levels`), and the kernel
soft argmax taken both ways (:func:`ops.sfnet.sfnet_flows`).

:class:`AffineRegressionNet`: the same frozen backbone; the deep level's correlation (ReLU, L2-normalised over the
source positions, CNNGeometric's "feature correlation + normalisation") -> two conv-BN-ReLU -> a linear layer -> the
six parameters of an affine (zero weights and the identity as bias at init), turned into the same two flows.

Outputs (both models): :class:`FlowPair` ``(flow_s2t, flow_t2s)`` on the ``G x G`` grid of the shallow level, **in
cells** (:mod:`ops.sfnet`'s convention, :mod:`ops.warp`'s directions): ``flow_s2t`` is SFNet's F^s, on the source
grid, a source cell ``p`` matches target location ``p + F^s(p)``; ``flow_t2s`` is F^t, on the target grid, used to
warp source-side maps onto the target (``warp(M^s, F^t)``). :func:`resize_flow` brings a flow to an image of
``H x W`` pixels: bilinear resize with align_corners=True, then dx x (W-1)/(G-1), dy x (H-1)/(G-1) (cell ``i`` sits on
pixel ``i (W-1)/(G-1)``), as the paper upsamples its 20 x 20 flows at test time.

Inputs are float RGB in [0, 1], ``(N, 3, S, S)`` with ``S = cfg.image_size``; the model normalises with ImageNet's
mean and std itself, as torchvision's detection transform does for the Mask R-CNN whose backbone it reuses.

Frozen backbone: the trainer's ``freeze: [backbone]`` turns its gradients off and keeps it in eval mode (its
BatchNorm statistics do not move); when none of its parameters wants a gradient the backbone runs without building
a graph. The correlation and argmax run in float32 under autocast (a softmax at beta = 50 over fp16 scores loses
the sub-cell precision the losses depend on).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from maskflow.config import ConfigError
from maskflow.models.sfnet_config import (  # noqa: F401  (re-exported: the model's config lives beside it)
    _RESNET_WEIGHTS, STRIDES, AdaptationConfig, AffineHeadConfig, FeatureBackboneConfig, SFNetConfig)
from ops import sfnet as sf
from ops import warp as W

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FlowPair(NamedTuple):
    """F^s and F^t, ``(N, 2, G, G)`` in cells (module docstring)."""

    flow_s2t: torch.Tensor
    flow_t2s: torch.Tensor


# --------------------------------------------------------------------------------------------- backbone


class FeatureBackbone(nn.Module):
    """The trunk of a Mask R-CNN body up to ``cfg.deep``, returning ``{"shallow": ..., "deep": ...}``.

    Its children carry the body's own names (``stem``/``layer1``... for tiny, ``conv1``/``bn1``/``layer1``... for
    ResNets), so its state-dict keys are the detector's ``backbone.body.*`` keys without ``body.``.
    """

    def __init__(self, cfg: FeatureBackboneConfig):
        super().__init__()
        trunk = _backbone_trunk(cfg)
        self.levels = {cfg.shallow: "shallow", cfg.deep: "deep"}
        for name, module in trunk.named_children():  # keep the modules up to the deep level, in order
            self.add_module(name, module)
            if name == cfg.deep:
                break

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = OrderedDict()
        for name, module in self.named_children():
            x = module(x)
            if name in self.levels:
                out[self.levels[name]] = x
        return out


def _backbone_trunk(cfg: FeatureBackboneConfig) -> nn.Module:
    if cfg.arch == "tiny":
        from maskflow.models.maskrcnn import TinyBackbone

        return TinyBackbone(cfg.width)
    from torchvision.models import resnet

    weights = None
    if cfg.weights is not None:
        from maskflow.models.maskrcnn_config import resolve_weights

        weights = resolve_weights(cfg.weights, _RESNET_WEIGHTS[cfg.arch], "model.backbone.weights", cfg.arch)
        try:
            weights.get_state_dict(progress=False, check_hash=True)  # fetch into torch's cache, or fail clearly
        except Exception as e:  # noqa: BLE001 - URLError, socket and HTTP errors all mean "not reachable"
            raise ConfigError(
                f"model.backbone.weights: cannot download {cfg.weights} ({type(e).__name__}: {e}); without network "
                "access initialise the backbone from a registered model instead (init.from=models:/... with "
                "init.prefix_map={'backbone.body.': 'backbone.'}, model.backbone.weights=null)") from None
    return getattr(resnet, cfg.arch)(weights=weights)


class ResidualAdaptation(nn.Module):
    """SFNet's adaptation layers for one level: ``x <- x + ReLU(BN(conv_k(x)))``, ``blocks`` times (channels kept)."""

    def __init__(self, channels: int, kernel_size: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False),
                          nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
            for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class _FrozenBackboneNet(nn.Module):
    """What both networks share: input normalisation and the siamese backbone pass over source and target."""

    def __init__(self, cfg: SFNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = FeatureBackbone(cfg.backbone)
        # not persistent: constants, not weights (init.from / strict loading must not expect them)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def grid(self) -> int:
        return self.cfg.grid

    def features(self, source: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone levels of ``cat(source, target)`` (one batched pass: the two branches share weights)."""
        s = self.cfg.image_size
        if source.shape != target.shape or source.dim() != 4 or source.shape[1:] != (3, s, s):
            raise ValueError(f"source and target must both be (N, 3, {s}, {s}) float images in [0, 1], got "
                             f"{tuple(source.shape)} and {tuple(target.shape)}")
        x = (torch.cat((source, target)) - self.pixel_mean) / self.pixel_std
        trainable = any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return self.backbone(x)


def _float32_region(x: torch.Tensor):
    """Autocast off around the matching head (a no-op outside autocast)."""
    return torch.autocast(x.device.type, enabled=False)


# --------------------------------------------------------------------------------------------- SFNet


class SFNet(_FrozenBackboneNet):
    """The paper's network (module docstring): ``forward(source, target) -> FlowPair`` in cells."""

    def __init__(self, cfg: SFNetConfig):
        super().__init__(cfg)
        b, a = cfg.backbone, cfg.adaptation
        self.adapt_shallow = ResidualAdaptation(b.channels(b.shallow), a.kernel_shallow, a.blocks)
        self.adapt_deep = ResidualAdaptation(b.channels(b.deep), a.kernel_deep, a.blocks)

    def correlation(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The combined 4D correlation ``(N, G, G, G, G)``: ``c[n, y, x, v, u]`` between source cell (x, y) and
        target cell (u, v)."""
        n = source.shape[0]
        feats = self.features(source, target)
        shallow = self.adapt_shallow(feats["shallow"])
        deep = self.adapt_deep(feats["deep"])
        deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=True)
        with _float32_region(shallow):
            shallow, deep = shallow.float(), deep.float()
            relu = self.cfg.relu_correlation
            c_shallow = sf.correlation_4d(shallow[:n], shallow[n:], relu=relu)
            c_deep = sf.correlation_4d(deep[:n], deep[n:], relu=relu)
            return sf.combine_levels(c_shallow, c_deep)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> FlowPair:
        corr = self.correlation(source, target)
        with _float32_region(corr):
            flow_s2t, flow_t2s = sf.sfnet_flows(corr, self.cfg.argmax, self.cfg.beta, self.cfg.sigma_cells)
        return FlowPair(flow_s2t, flow_t2s)


# --------------------------------------------------------------------------------------------- baseline


IDENTITY_THETA = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


class AffineRegressionNet(_FrozenBackboneNet):
    """CNNGeometric-style affine regression (module docstring): ``forward(source, target) -> FlowPair`` in cells.

    :meth:`theta` is the ``(N, 2, 3)`` affine in torch's normalised coordinates (``affine_grid``,
    align_corners=True) mapping a **target** point to the **source** point it comes from (as CNNGeometric's
    sampling grid): ``F^t`` is its flow, ``F^s`` the flow of its inverse. Both are exact at any resolution.
    """

    def __init__(self, cfg: SFNetConfig):
        super().__init__(cfg)
        deep_cells = -(-cfg.image_size // STRIDES[cfg.backbone.deep])  # ceil
        (c1, c2), (k1, k2) = cfg.affine.channels, cfg.affine.kernel_sizes
        self.regressor = nn.Sequential(
            nn.Conv2d(deep_cells * deep_cells, c1, k1, padding=k1 // 2, bias=False), nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, k2, padding=k2 // 2, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        self.theta_head = nn.Linear(c2 * deep_cells * deep_cells, 6)
        nn.init.zeros_(self.theta_head.weight)  # identity at init: the untrained baseline predicts zero flow
        with torch.no_grad():
            self.theta_head.bias.copy_(torch.tensor(IDENTITY_THETA))

    def theta(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = source.shape[0]
        deep = self.features(source, target)["deep"]
        with _float32_region(deep):
            deep = deep.float()
            # (N, h, w, h', w'): source cell x target cell, cosine clipped at zero
            corr = sf.correlation_4d(deep[:n], deep[n:], relu=True)
            # CNNGeometric: per target position, the scores of every source position as channels, L2-normalised.
            corr = F.normalize(corr.flatten(1, 2), dim=1)  # (N, h*w, h', w')
        return self.theta_head(self.regressor(corr)).view(n, 2, 3).float()

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> FlowPair:
        theta_t2s = self.theta(source, target)
        return affine_flows(theta_t2s, self.grid, self.grid)


def affine_flows(theta_t2s: torch.Tensor, height: int, width: int) -> FlowPair:
    """``(flow_s2t, flow_t2s)`` on an ``height x width`` grid, in its cells, from a normalised target->source affine
    (align_corners=True, the grid spanning [-1, 1])."""
    full = torch.cat((theta_t2s, theta_t2s.new_tensor([0.0, 0.0, 1.0]).expand(len(theta_t2s), 1, 3)), 1)
    theta_s2t = torch.linalg.inv(full)[:, :2]
    return FlowPair(W.affine_to_flow(theta_s2t, height, width, normalized=True),
                    W.affine_to_flow(theta_t2s, height, width, normalized=True))


# --------------------------------------------------------------------------------------------- factory, units


def build_sfnet(cfg: SFNetConfig) -> SFNet | AffineRegressionNet:
    """The network ``cfg.variant`` names (``sfnet`` or ``affine_baseline``)."""
    return SFNet(cfg) if cfg.variant == "sfnet" else AffineRegressionNet(cfg)


def resize_flow(flow: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A ``(N, 2, h, w)`` flow in units of its own grid (cells, or pixels of an ``h x w`` image) -> the same flow on
    a ``height x width`` grid, in that grid's units: bilinear resize with align_corners=True (point ``i`` of ``w``
    sits at ``i (width-1)/(w-1)``), then dx x (width-1)/(w-1), dy x (height-1)/(h-1). Cells -> pixels for
    inference (the paper's bilinear upsampling of its 20 x 20 flows), and pixels -> cells of a ground-truth flow
    (exact for affine flows)."""
    h, w = flow.shape[-2:]
    scale = flow.new_tensor([(width - 1) / max(w - 1, 1), (height - 1) / max(h - 1, 1)]).view(1, 2, 1, 1)
    if (h, w) != (height, width):
        flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=True)
    return flow * scale


# --------------------------------------------------------------------------------------------- inputs


def resize_image(image, size: int) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 RGB array -> ``(3, size, size)`` float32 in [0, 1], bilinear with align_corners=True
    (pixel ``i`` of ``W`` lands on ``i (size-1)/(W-1)``, the mapping :func:`resize_flow` and keypoints use)."""
    x = torch.as_tensor(image).permute(2, 0, 1)[None].float().div_(255.0)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)[0].clamp_(0.0, 1.0)


def mask_to_grid(mask: torch.Tensor, height: int, width: int, threshold: float) -> torch.Tensor:
    """A ``(N, 1, H, W)`` {0, 1} mask -> ``(N, 1, height, width)`` float {0, 1} on a coarse grid: the fraction of
    foreground in a box about one cell wide around each cell centre (the pixel nearest the align_corners=True
    position), above ``threshold`` (the released SFNet code binarises its resized masks at 0.1). Box sums come from
    an integral image, read only at the cell centres."""
    H, W = mask.shape[-2:]

    def bounds(size: int, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
        spacing = (size - 1) / max(cells - 1, 1)
        centre = torch.round(torch.arange(cells, dtype=torch.float64) * spacing).long()
        radius = int(spacing / 2)
        return (centre - radius).clamp_min(0), (centre + radius).clamp_max(size - 1) + 1  # [lo, hi)

    y0, y1 = bounds(H, height)
    x0, x1 = bounds(W, width)
    integral = F.pad(mask.double().cumsum(-2).cumsum(-1), (1, 0, 1, 0))  # (N, 1, H+1, W+1), zero first row/col
    rows_hi, rows_lo = integral[..., y1, :], integral[..., y0, :]  # (N, 1, height, W+1)
    box = rows_hi[..., x1] - rows_hi[..., x0] - rows_lo[..., x1] + rows_lo[..., x0]  # (N, 1, height, width)
    area = ((y1 - y0)[:, None] * (x1 - x0)[None, :]).to(box.dtype)
    return (box / area > threshold).float()


# --------------------------------------------------------------------------------------------- loading


def load_sfnet(uri: str, arch: SFNetConfig, options=None, device: str | torch.device = "cpu") \
        -> SFNet | AffineRegressionNet:
    """The network named by ``uri`` in eval mode on ``device``: a registered model or run (``models:/``, ``runs:/``;
    it carries its own architecture), or a trainer checkpoint (``.pt`` file or checkpoint directory, local or
    ``s3://``) built with ``arch``."""
    from maskflow.models.loading import check_model_uri, load_state_dict
    from maskflow.storage import DEFAULT_OPTIONS

    check_model_uri(uri)
    if uri.startswith(("models:/", "runs:/")):
        import mlflow.pytorch

        model = mlflow.pytorch.load_model(uri, map_location=torch.device(device))
        if not isinstance(model, (SFNet, AffineRegressionNet)):
            raise ConfigError(f"model.uri: {uri} holds a {type(model).__name__}, not an SFNet or its affine baseline")
    elif uri.startswith("torchvision:"):
        raise ConfigError(f"model.uri: {uri}: torchvision has no SFNet weights (give a registered model or a "
                          "checkpoint)")
    else:
        model = build_sfnet(arch)
        model.load_state_dict(load_state_dict(uri, options or DEFAULT_OPTIONS))
    return model.to(device).eval()
