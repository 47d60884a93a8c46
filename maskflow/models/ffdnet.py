"""FFD-Net (Zhang & He, "Deep Free-Form Deformation Network for Object-Mask Registration", ICCV 2017, sec. 3).

Input: the 1.6x crops of proposals (:mod:`maskflow.stages.ffd_crops` geometry), resized to ``crop_size`` squared — the
image crop ``(N, 3, S, S)`` float in [0, 1] and the proposal mask crop ``(N, 1, S, S)`` in [0, 1]. Output: the proposal
warped onto the object, a soft mask ``(N, 1, S, S)``. Three modules, each a submodule with a stable name:

* ``backbone`` — features at strides 2, 4, 8, 16 (sec. 3.3). ``resnet101``: conv1 relu (64 channels), res2c relu
  (256), res3b3 branch2a relu (128), res4b22 branch2a relu (256), i.e. torchvision's ``relu`` after ``bn1``,
  ``layer1``, ``layer2[3]``'s first 1x1 conv and ``layer3[22]``'s first 1x1 conv; everything above res4b22 branch2a
  is removed (the paper: "the output from these layers are not used"). ``tiny``: one conv-BN-ReLU stage per stride.
* ``pooling`` — dual mask feature pooling (sec. 3.1, :func:`ops.ffd.dual_mask_pooling`) on every level: mask-weighted
  RoI pooling in the proposal's tight box (its pixels above ``mask_threshold``) || plain RoI pooling in that box
  enlarged ``context`` (1.6) times, on the level's grid (paper: 30 x 30 for strides 2 and 4, 20 x 20 for 8 and 16).
  ``pooling: proposal`` keeps the first half only (ablation).
* ``head`` — per level an fc to ``level_fc`` (128), concatenated (512), an fc to ``fc`` (512), and the last fc to
  ``2 M^2`` control-point offsets (M = ``mesh_size``, 13); ReLU and dropout after every fc but the last; the last fc
  Gaussian with std ``init_std`` (1e-3) and zero bias, so the deformation starts near the identity (sec. 3.3: "the
  extra fc layers are initialized randomly from Gaussian distribution").

The offsets ``(N, 2, M, M)`` (channel 0 = dx, 1 = dy) drive the cubic B-spline FFD of the proposal
(:func:`ops.ffd.ffd_warp`, eq. 1-2, bilinear sampler as in STN). They are normalised by the crop's size, which is the
proposal's tight box times ``context``: the paper's "normalize the offsets by the size of the initial mask" up to that
constant factor, so the same offsets mean the same deformation at any crop resolution.

``head: direct`` (ablation: does the deformation prior help?) replaces the offsets by a residual mask on an R x R grid
(R^2 ~ 2 M^2: the same last layer), bilinearly upsampled to the crop and added to the proposal, clamped to [0, 1].

Zero last-layer weights give the proposal back in both heads (identity FFD: sampling at the pixel centres, exact up
to float rounding; zero residual: exact). The module carries
its :class:`~maskflow.models.ffdnet_config.FFDConfig` (``cfg``) and pickles as a whole for ``mlflow.pytorch``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maskflow.models.ffdnet_config import LEVEL_STRIDES, FFDConfig
from ops.ffd import dual_mask_pooling, ffd_displacement, ffd_warp, mask_boxes, weighted_roi_pool

__all__ = ["FFDNet", "TinyFFDBackbone", "ResNetFFDBackbone", "build_ffdnet", "load_ffdnet", "apply_edits",
           "mask_iou_per_sample"]

# torchvision's ImageNet statistics: the ResNet's expected input, and a fixed normalisation for the tiny backbone
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class TinyFFDBackbone(nn.Module):
    """CPU variant: stage ``l`` = a stride-2 and a stride-1 conv-BN-ReLU, ``widths[l]`` channels (strides 2/4/8/16)."""

    def __init__(self, widths: list[int]):
        super().__init__()
        stages, cin = [], 3
        for w in widths:
            stages.append(nn.Sequential(_conv_bn_relu(cin, w, 2), _conv_bn_relu(w, w, 1)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        return levels


def _bottleneck_with_branch2a(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's Bottleneck forward, also returning its first 1x1 conv's ReLU output (Caffe's ``branch2a_relu``)."""
    branch2a = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(branch2a)))
    out = block.bn3(block.conv3(out))
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(out + identity), branch2a


class ResNetFFDBackbone(nn.Module):
    """The paper's base net: ResNet-101 (torchvision, ``weights=None``) cut above res4b22 branch2a (sec. 3.3).

    Caffe's names -> torchvision's: conv1 = ``conv1/bn1/relu``, res2c = ``layer1[2]`` (the output of ``layer1``),
    res3b3 = ``layer2[3]``, res4b22 = ``layer3[22]``; ``branch2a`` is a block's first 1x1 conv. Of ``layer3[22]`` only
    that conv and its BN are kept (``res4b22_branch2a``): keeping unused layers would leave DDP with parameters that
    get no gradient."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet101

        net = resnet101(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2 = net.layer1, net.layer2
        self.layer3 = net.layer3[:22]  # res4a .. res4b21
        last = net.layer3[22]
        self.res4b22_branch2a = nn.Sequential(last.conv1, last.bn1, nn.ReLU(inplace=True))
        self.out_channels = [64, 256, net.layer2[3].conv1.out_channels, last.conv1.out_channels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        conv1 = self.relu(self.bn1(self.conv1(x)))  # stride 2
        res2c = self.layer1(self.maxpool(conv1))  # stride 4
        x = self.layer2[:3](res2c)
        x, res3b3_branch2a = _bottleneck_with_branch2a(self.layer2[3], x)  # stride 8
        res4b22_branch2a = self.res4b22_branch2a(self.layer3(x))  # stride 16
        return [conv1, res2c, res3b3_branch2a, res4b22_branch2a]


class FFDHead(nn.Module):
    """Per-level fc -> concat -> fc -> last fc; ReLU + dropout after every fc but the last."""

    def __init__(self, in_features: list[int], level_fc: int, fc: int, outputs: int, dropout: float,
                 init_std: float):
        super().__init__()
        self.levels = nn.ModuleList(nn.Sequential(nn.Linear(n, level_fc), nn.ReLU(inplace=True), nn.Dropout(dropout))
                                    for n in in_features)
        self.hidden = nn.Sequential(nn.Linear(level_fc * len(in_features), fc), nn.ReLU(inplace=True),
                                    nn.Dropout(dropout))
        self.last = nn.Linear(fc, outputs)
        nn.init.normal_(self.last.weight, std=init_std)
        nn.init.zeros_(self.last.bias)

    def forward(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        joined = torch.cat([fc(p.flatten(1)) for fc, p in zip(self.levels, pieces)], dim=1)
        return self.last(self.hidden(joined))


class FFDNet(nn.Module):
    """FFD-Net as configured by ``cfg`` (see the module docstring)."""

    def __init__(self, cfg: FFDConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = TinyFFDBackbone(cfg.backbone.widths) if cfg.backbone.arch == "tiny" else ResNetFFDBackbone()
        halves = 2 if cfg.pooling == "dual" else 1
        in_features = [halves * c * g * g for c, g in zip(self.backbone.out_channels, cfg.level_grids)]
        outputs = 2 * cfg.mesh_size ** 2 if cfg.head == "ffd" else cfg.direct_grid ** 2
        self.head = FFDHead(in_features, cfg.level_fc, cfg.fc, outputs, cfg.dropout, cfg.init_std)

    def pooled(self, levels: list[torch.Tensor], masks: torch.Tensor) -> list[torch.Tensor]:
        """One pooled piece per level of the ``(N, S, S)`` binary proposal crops."""
        cfg = self.cfg
        boxes = mask_boxes(masks, torch.arange(len(masks), device=masks.device))
        scales = [1.0 / s for s in LEVEL_STRIDES]
        if cfg.pooling == "dual":
            return dual_mask_pooling(levels, scales, boxes, masks, grid_sizes=[[g] for g in cfg.level_grids],
                                     context=cfg.context, sampling_ratio=cfg.sampling_ratio, flatten=False)
        return [weighted_roi_pool(f, boxes, masks, g, s, sampling_ratio=cfg.sampling_ratio)
                for f, s, g in zip(levels, scales, cfg.level_grids)]

    def forward(self, images: torch.Tensor, proposals: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images (N, 3, S, S)`` in [0, 1] and ``proposals (N, 1, S, S)`` (or ``(N, S, S)``) in [0, 1] ->
        ``{"mask": (N, 1, S, S) refined soft mask, "offsets": (N, 2, M, M)}`` (``head: ffd``) or
        ``{"mask", "residual": (N, 1, R, R)}`` (``head: direct``)."""
        cfg = self.cfg
        if proposals.ndim == 3:
            proposals = proposals[:, None]
        proposals = proposals.to(images.dtype)
        mean = images.new_tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGE_STD).view(1, 3, 1, 1)
        levels = self.backbone((images - mean) / std)
        binary = (proposals[:, 0] > cfg.mask_threshold).to(images.dtype)
        out = self.head(self.pooled(levels, binary))
        n, side = len(images), images.shape[-1]
        if cfg.head == "ffd":
            offsets = out.view(n, 2, cfg.mesh_size, cfg.mesh_size)
            return {"mask": ffd_warp(proposals, offsets), "offsets": offsets}
        r = cfg.direct_grid
        residual = out.view(n, 1, r, r)
        up = F.interpolate(residual, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        return {"mask": (proposals + up).clamp(0.0, 1.0), "residual": residual}

    @torch.no_grad()
    def refine(self, images: torch.Tensor, proposals: torch.Tensor,
               iterations: int = 1) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """The network applied ``iterations`` times in the same crop frame. Between passes the mask is binarised at
        ``mask_threshold``, as the binary proposals the network was trained on. Returns the last soft mask
        ``(N, 1, S, S)`` and each pass's edit (``{"offsets": ...}`` or ``{"residual": ...}``), which
        :meth:`apply_in_image` replays on the full-resolution proposals."""
        mask = proposals if proposals.ndim == 4 else proposals[:, None]
        edits = []
        for i in range(iterations):
            if i:
                mask = (mask > self.cfg.mask_threshold).to(images.dtype)
            out = self(images, mask)
            mask = out.pop("mask")
            edits.append(out)
        return mask, edits

    @torch.no_grad()
    def apply_in_image(self, masks: torch.Tensor, edits: list[dict[str, torch.Tensor]],
                       rois: torch.Tensor) -> torch.Tensor:
        """Replay the edits of :meth:`refine` on full-resolution proposals ``masks (K, H, W)`` (each in its image's
        frame; ``rois (K, 5)`` their crop boxes ``[_, x1, y1, x2, y2]``): the soft refined masks ``(K, H, W)``
        (:func:`apply_edits`). Nothing is resampled where nothing moves: zero edits give the proposals back (up to
        float rounding, ~1e-5: the same binary masks), and a refined mask keeps the generator's full-resolution
        detail (a crop of ``crop_size`` pixels would blur a large object's outline)."""
        return apply_edits(masks, edits, rois, self.cfg.crop_size, self.cfg.mask_threshold)


class _Windows:
    """Each crop box's pixels in the image (the box clipped to the image, whole pixels), batched into ``(K, 1, h, w)``
    windows padded to the largest: the warp is computed there only (a mask is zero outside its crop box, since the
    proposal lies inside its tight box, and does not move there)."""

    def __init__(self, rois: torch.Tensor, height: int, width: int):
        self.height, self.width = height, width
        box = rois[:, 1:5].double()
        x0 = box[:, 0].floor().clamp(0, width).long()
        y0 = box[:, 1].floor().clamp(0, height).long()
        x1 = torch.maximum(box[:, 2].ceil().clamp(0, width).long(), x0 + 1)
        y1 = torch.maximum(box[:, 3].ceil().clamp(0, height).long(), y0 + 1)
        self.bounds = torch.stack([x0, y0, x1, y1], 1).tolist()
        self.h, self.w = int((y1 - y0).max()), int((x1 - x0).max())
        dtype, device = rois.dtype, rois.device
        # pixel centres of every window in image coordinates, (K, w) and (K, h)
        self.xs = x0.to(device, dtype)[:, None] + torch.arange(self.w, device=device, dtype=dtype) + 0.5
        self.ys = y0.to(device, dtype)[:, None] + torch.arange(self.h, device=device, dtype=dtype) + 0.5
        self.origin = (x0.to(device, dtype), y0.to(device, dtype))
        self.box_origin, self.box_size = rois[:, 1:3], rois[:, 3:5] - rois[:, 1:3]

    def cut(self, masks: torch.Tensor) -> torch.Tensor:
        out = masks.new_zeros((len(masks), 1, self.h, self.w))
        for k, (x0, y0, x1, y1) in enumerate(self.bounds):
            out[k, 0, :y1 - y0, :x1 - x0] = masks[k, y0:y1, x0:x1]
        return out

    def paste(self, windows: torch.Tensor) -> torch.Tensor:
        out = windows.new_zeros((len(windows), self.height, self.width))
        for k, (x0, y0, x1, y1) in enumerate(self.bounds):
            out[k, y0:y1, x0:x1] = windows[k, 0, :y1 - y0, :x1 - x0]
        return out

    def crop_grid(self) -> torch.Tensor:
        """``(K, h, w, 2)`` the window pixels in their crop's normalised coordinates (``paste_crops``' inverse map)."""
        gx = 2 * (self.xs - self.box_origin[:, :1]) / self.box_size[:, :1] - 1  # (K, w)
        gy = 2 * (self.ys - self.box_origin[:, 1:]) / self.box_size[:, 1:] - 1  # (K, h)
        return torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)

    def sample(self, windows: torch.Tensor, dx_px: torch.Tensor, dy_px: torch.Tensor) -> torch.Tensor:
        """``windows(p + d(p))``: backward warp by a pixel displacement ``(K, h, w)`` per axis (zeros outside)."""
        gx = 2 * (self.xs[:, None, :] + dx_px - self.origin[0][:, None, None]) / self.w - 1
        gy = 2 * (self.ys[:, :, None] + dy_px - self.origin[1][:, None, None]) / self.h - 1
        return F.grid_sample(windows, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="zeros",
                             align_corners=False)


def apply_edits(masks: torch.Tensor, edits: list[dict[str, torch.Tensor]], rois: torch.Tensor, field_size: int,
                threshold: float = 0.5) -> torch.Tensor:
    """Image-frame masks ``(K, H, W)`` refined by FFD-Net's per-pass edits on their crop boxes ``rois (K, 5)``
    (:mod:`ops.ffd` conventions), binarised at ``threshold`` between passes: ``(K, H, W)`` soft masks.

    ``{"offsets": (K, 2, M, M)}``: the FFD is defined per unit of crop frame, not per pixel, so the same deformation
    warps the mask at the image's resolution: its dense field on a ``field_size`` crop grid, read at the image's
    pixel centres (bilinear, as :func:`ops.ffd.paste_crops`; zero — no motion — outside the crop box), times the box
    size in pixels, drives one backward warp. ``{"residual": (K, 1, R, R)}`` (the direct head): upsampled to the crop
    grid as in training, read the same way and added, clamped to [0, 1]."""
    k, h, w = masks.shape
    rois = rois.to(device=masks.device, dtype=torch.float32)
    win = _Windows(rois, h, w)
    m = win.cut(masks.to(torch.float32))
    grid = win.crop_grid()
    for i, edit in enumerate(edits):
        if i:
            m = (m > threshold).to(m.dtype)
        if "offsets" in edit:
            disp = ffd_displacement(edit["offsets"].to(m), (field_size, field_size))  # (K, 2, s, s), box units
            field = F.grid_sample(disp, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            size = win.box_size[:, :, None, None]  # box units -> pixels
            m = win.sample(m, field[:, 0] * size[:, 0], field[:, 1] * size[:, 1])
        else:
            up = F.interpolate(edit["residual"].to(m), size=(field_size, field_size), mode="bilinear",
                               align_corners=False)
            m = (m + F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=False)).clamp(0, 1)
    return win.paste(m)


def build_ffdnet(cfg: FFDConfig) -> FFDNet:
    return FFDNet(cfg)


def load_ffdnet(uri: str, arch: FFDConfig, options=None, device: str | torch.device = "cpu") -> FFDNet:
    """The FFD-Net named by ``uri`` (a registry or run URI: the logged module, which carries its own config; a trainer
    checkpoint: built from ``arch``), in eval mode on ``device``."""
    from maskflow.config import ConfigError
    from maskflow.models.loading import REGISTRY_SCHEMES, check_model_uri, load_state_dict
    from maskflow.storage import DEFAULT_OPTIONS

    check_model_uri(uri)
    if uri.startswith(REGISTRY_SCHEMES):
        import mlflow.pytorch

        model = mlflow.pytorch.load_model(uri, map_location=torch.device(device))
    else:
        model = build_ffdnet(arch)
        model.load_state_dict(load_state_dict(uri, options or DEFAULT_OPTIONS))
    if not isinstance(model, FFDNet):
        raise ConfigError(f"model.uri: {uri} holds a {type(model).__name__}, expected an FFDNet")
    return model.to(device).eval()


def mask_iou_per_sample(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU of ``pred > threshold`` and ``target > threshold`` per sample (``(N, ...)`` -> ``(N,)``; 1 where both are
    empty)."""
    p = (pred > threshold).flatten(1)
    t = (target > threshold).flatten(1)
    inter = (p & t).sum(1).float()
    union = (p | t).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
