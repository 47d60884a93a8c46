"""DeepMask and SharpMask (Pinheiro, Collobert & Dollar, NIPS 2015; Pinheiro, Lin, Collobert & Dollar, "Learning to
Refine Object Segments", ECCV 2016), as a proposal generator.

Submodules, each with a stable name so the two training phases exchange weights by key (``init.from``) and the
second freezes the first's parts by prefix (``freeze``):

* ``trunk`` — a residual network to stride 16 (:class:`SmallTrunk`, or ResNet-50 to conv4 as in "DeepMask-ours"),
  returning its features at strides 2, 4, 8 and 16 (the latter three are SharpMask's skip connections);
* ``head`` — DeepMask's shared layers: a 1x1 convolution + ReLU, then the fc over the whole ``patch / 16`` code,
  written as a convolution with that kernel (so over a larger image it slides at stride 16: section 3.3);
* ``mask_head`` — DeepMask's mask: a linear layer (1x1 convolution) to ``mask_size ** 2`` logits, bilinearly
  upsampled ``mask_upsample`` times (section 3.1; paper 56 -> 112);
* ``score_head`` — DeepMask's objectness: dropout, fc, ReLU, dropout, fc 1 (1x1 convolutions);
* ``refine`` (``refine: true``) — SharpMask's top-down refinement (section 3): the code through a "vertical" layer to
  a ``k_m x c x c`` mask code, then one module per skip level (strides 16, 8, 4, 2): the skip feature through a 3x3
  convolution + ReLU to ``k_s / 2**i`` channels, the mask code through a 3x3 convolution, the two added (the
  paper's convolution of the concatenation, split in two: the efficient form of its section 3.2), ReLU, 2x nearest
  upsampling, channels halved per module (never below ``refine_min_channels``); a last 3x3 convolution gives
  logits at the full patch resolution.

**Training** (``model(patches)`` with a ``(N, 3, P, P)`` float tensor in [0, 1]): :class:`SharpMaskOutput` with
``mask_logits`` ``(N, 1, S, S)`` (DeepMask: ``S = mask_size * mask_upsample``; SharpMask: ``S = P``),
``score_logits`` ``(N,)`` and ``coarse_logits`` (DeepMask's mask, also with ``refine``, for comparison).

**Inference** (eval mode, ``model(images)`` with a list of ``(3, H, W)`` float images in [0, 1]): per image, the
image pyramid of ``inference`` (scales ``2 ** -2.5 .. 2 ** 0.5``), each scale padded by half a patch of zeros
(the value training windows have outside the image) and run once through the trunk and the heads as convolutions:
every window at stride 16 gets a score; the ``top_k`` windows over all scales (score threshold, optional NMS on
window boxes) get masks — DeepMask's from their code, SharpMask's from their code and the skip features under the
window (:func:`ops.sharpmask.gather_windows`: the paper's refinement of the selected windows only) — pasted into the
image (:func:`ops.sharpmask.paste_windows`). Output per image, torchvision-detection style (the proposal
generators' contract): ``boxes`` ``(K, 4)`` ``[x1, y1, x2, y2]`` (the tight box of the mask at 0.5, read at the
window's resolution, clipped to the image; the window's box, clipped, where the mask is empty), ``scores``
``(K,)`` (sigmoid), ``labels`` (ones), ``masks`` ``(K, 1, H, W)`` probabilities (``inference.mask_dtype``; pasted
straight into that tensor, a window's part of the image at a time), ``windows`` ``(K, 4)`` the window boxes; sorted
by score.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from maskflow.models.sharpmask_config import STRIDE, SharpMaskConfig, TrunkConfig
from ops.sharpmask import gather_windows, paste_windows, window_boxes, window_tight_boxes

__all__ = ["SharpMask", "SharpMaskOutput", "SmallTrunk", "ResNet50Trunk", "Refinement"]

# ImageNet statistics: the normalisation torchvision's ResNets (the paper's trunk) expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SKIP_STRIDES = (2, 4, 8, 16)


class SharpMaskOutput(NamedTuple):
    mask_logits: torch.Tensor  # (N, 1, S, S)
    score_logits: torch.Tensor  # (N,)
    coarse_logits: torch.Tensor  # (N, 1, mask_size * mask_upsample, ...): DeepMask's mask


class SmallTrunk(nn.Module):
    """4 residual stages (torchvision ``BasicBlock``), each opening with a stride-2 block: features at strides
    2, 4, 8, 16."""

    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        stages, cin = [], 3
        for channels, blocks in zip(cfg.channels, cfg.blocks):
            down = nn.Sequential(nn.Conv2d(cin, channels, 1, stride=2, bias=False), nn.BatchNorm2d(channels))
            layers = [BasicBlock(cin, channels, stride=2, downsample=down)]
            layers += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = channels
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ResNet50Trunk(nn.Module):
    """torchvision's ResNet-50 up to ``layer3`` (conv4: stride 16, 1024 channels), built without weights (none can
    be downloaded here; initialise from a trained model with ``init.from``). Features at strides 2 (the stem's ReLU),
    4 (layer1), 8 (layer2), 16 (layer3)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        r = resnet50(weights=None)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu)
        self.layer1 = nn.Sequential(r.maxpool, r.layer1)
        self.layer2, self.layer3 = r.layer2, r.layer3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s2 = self.stem(x)
        s4 = self.layer1(s2)
        s8 = self.layer2(s4)
        return [s2, s4, s8, self.layer3(s8)]


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class RefinementModule(nn.Module):
    """``M' = up2(ReLU(conv(M) + conv(ReLU(conv(F)))))`` (SharpMask section 3.2)."""

    def __init__(self, skip_in: int, skip_out: int, mask_in: int, mask_out: int):
        super().__init__()
        self.skip = nn.Sequential(_conv3x3(skip_in, skip_out), nn.ReLU(inplace=True))
        self.from_skip = _conv3x3(skip_out, mask_out)
        self.from_mask = _conv3x3(mask_in, mask_out)

    def forward(self, mask_code: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.from_mask(mask_code) + self.from_skip(self.skip(skip)))
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Refinement(nn.Module):
    """The vertical layer (code -> ``k_m x c x c``), 4 modules (skips at strides 16, 8, 4, 2; channels of module
    ``i``: skip ``k_s / 2**i``, mask ``k_m / 2**i`` -> ``k_m / 2**(i+1)``, never below ``refine_min_channels``) and
    the last 3x3 convolution to 1 channel."""

    def __init__(self, cfg: SharpMaskConfig):
        super().__init__()
        self.k_m, self.side = cfg.k_m, cfg.code_size
        self.vertical = nn.Conv2d(cfg.fc, cfg.k_m * self.side * self.side, 1)
        skips = cfg.trunk.skip_channels[::-1]  # strides 16, 8, 4, 2
        modules, mask_in = [], cfg.k_m
        for i, skip_in in enumerate(skips):
            mask_out = max(cfg.k_m // 2 ** (i + 1), cfg.refine_min_channels)
            modules.append(RefinementModule(skip_in, max(cfg.k_s // 2 ** i, cfg.refine_min_channels), mask_in,
                                            mask_out))
            mask_in = mask_out
        self.blocks = nn.ModuleList(modules)
        self.final = _conv3x3(mask_in, 1)
        # The last bias starts at the prior of a foreground pixel (~10% of a positive window), so the first steps
        # need not drive every layer towards "all background" to get there.
        nn.init.constant_(self.final.bias, math.log(0.1 / 0.9))

    def forward(self, code: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """``code (K, fc, 1, 1)``, ``skips`` coarse to fine (strides 16, 8, 4, 2) -> logits ``(K, 1, P, P)``."""
        m = F.relu(self.vertical(code)).view(len(code), self.k_m, self.side, self.side)
        for module, skip in zip(self.blocks, skips):
            m = module(m, skip)
        return self.final(m)


class SharpMask(nn.Module):
    """DeepMask (``cfg.refine`` False) or SharpMask; see the module docstring."""

    def __init__(self, cfg: SharpMaskConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = SmallTrunk(cfg.trunk) if cfg.trunk.arch == "small" else ResNet50Trunk()
        top = cfg.trunk.skip_channels[-1]
        self.head = nn.Sequential(nn.Conv2d(top, cfg.reduce_channels, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(cfg.reduce_channels, cfg.fc, cfg.code_size))
        self.mask_head = nn.Conv2d(cfg.fc, cfg.mask_size * cfg.mask_size, 1)
        self.score_head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Conv2d(cfg.fc, cfg.score_hidden, 1),
                                        nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
                                        nn.Conv2d(cfg.score_hidden, 1, 1))
        self.refine = Refinement(cfg) if cfg.refine else None
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    # -- the pieces
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Trunk features at strides 2, 4, 8, 16 of images in [0, 1]."""
        return self.trunk((x - self.mean) / self.std)

    def coarse_mask(self, code: torch.Tensor) -> torch.Tensor:
        """DeepMask's mask logits of codes ``(K, fc, 1, 1)``: ``(K, 1, m * up, m * up)``."""
        m = self.cfg.mask_size
        logits = self.mask_head(code).view(len(code), 1, m, m)
        if self.cfg.mask_upsample > 1:
            logits = F.interpolate(logits, scale_factor=self.cfg.mask_upsample, mode="bilinear", align_corners=False)
        return logits

    def forward(self, x):
        if isinstance(x, (list, tuple)):
            if self.training:
                raise ValueError("a list of images is inference: call model.eval() first (training takes a "
                                 "(N, 3, P, P) batch of windows)")
            return [self.propose(image) for image in x]
        return self.forward_windows(x)

    def forward_windows(self, x: torch.Tensor) -> SharpMaskOutput:
        P = self.cfg.patch
        if x.ndim != 4 or tuple(x.shape[-2:]) != (P, P):
            raise ValueError(f"expected a (N, 3, {P}, {P}) batch of windows, got {tuple(x.shape)}")
        feats = self.features(x)
        code = self.head(feats[-1])  # (N, fc, 1, 1)
        score = self.score_head(code).flatten()
        coarse = self.coarse_mask(code)
        mask = self.refine(code, feats[::-1]) if self.refine is not None else coarse
        return SharpMaskOutput(mask, score, coarse)

    # -- proposals
    def configure_for_proposals(self, top_k: int, score_thresh: float, nms_thresh: float | None) -> None:
        """The proposals job's settings: keep ``top_k`` windows per image with a score above ``score_thresh``
        (sigmoid), suppressing windows whose boxes overlap a better one by IoU > ``nms_thresh`` (>= 1: none; None:
        the model's own ``inference.nms_thresh``, 1.0 as the paper ranks windows: the best windows of an object sit
        at neighbouring shifts and scales, and suppressing them at 0.5 cost 60 % of AR@100 on Penn-Fudan)."""
        inf = self.cfg.inference
        inf.top_k, inf.score_thresh = int(top_k), float(score_thresh)
        if nms_thresh is not None:
            inf.nms_thresh = float(nms_thresh)

    def _scale_level(self, image: torch.Tensor, scale: float) -> dict:
        """One pyramid level: the padded scaled image through the trunk and the heads (all windows scored)."""
        P, (H, W) = self.cfg.patch, image.shape[-2:]
        h, w = max(1, round(H * scale)), max(1, round(W * scale))
        scaled = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=scale < 1)
        pad = P // 2
        Hp, Wp = math.ceil((h + 2 * pad) / STRIDE) * STRIDE, math.ceil((w + 2 * pad) / STRIDE) * STRIDE
        padded = F.pad(scaled, (pad, Wp - w - pad, pad, Hp - h - pad))  # zeros: what windows see past the image
        feats = self.features(padded)
        code = self.head(feats[-1])[0]  # (fc, Hw, Ww)
        scores = torch.sigmoid(self.score_head(code[None])[0, 0])  # (Hw, Ww)
        return {"feats": [f[0] for f in feats], "code": code, "scores": scores, "pad": pad,
                "scale_x": w / W, "scale_y": h / H}

    def _window_masks(self, level: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Mask probabilities ``(k, S, S)`` of windows ``(rows, cols)`` of one level."""
        code = level["code"][:, rows, cols].T[:, :, None, None]  # (k, fc, 1, 1)
        if self.refine is None:
            logits = self.coarse_mask(code)
        else:
            P = self.cfg.patch
            skips = [gather_windows(level["feats"][i], rows, cols, STRIDE // t, P // t)
                     for i, t in reversed(list(enumerate(SKIP_STRIDES)))]
            logits = self.refine(code, skips)
        return torch.sigmoid(logits[:, 0].float())

    @torch.no_grad()
    def propose(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Proposals of one ``(3, H, W)`` image in [0, 1] (module docstring, "Inference")."""
        from torchvision.ops import nms

        inf, P = self.cfg.inference, self.cfg.patch
        H, W = int(image.shape[-2]), int(image.shape[-1])
        levels, scores, where, boxes = [], [], [], []
        for li, scale in enumerate(inf.scales):
            level = self._scale_level(image, scale)
            levels.append(level)
            s = level["scores"]
            rows, cols = torch.meshgrid(torch.arange(s.shape[0], device=s.device),
                                        torch.arange(s.shape[1], device=s.device), indexing="ij")
            rows, cols = rows.reshape(-1), cols.reshape(-1)
            scores.append(s.reshape(-1))
            where.append(torch.stack([torch.full_like(rows, li), rows, cols], dim=1))
            boxes.append(window_boxes(rows, cols, P, STRIDE, level["pad"], level["scale_x"], level["scale_y"]))
        scores, where, boxes = torch.cat(scores).float(), torch.cat(where), torch.cat(boxes)
        keep = torch.nonzero(scores >= inf.score_thresh).flatten()
        keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
        if inf.nms_thresh < 1 and len(keep):
            keep = keep[nms(boxes[keep], scores[keep], inf.nms_thresh)]
        keep = keep[:inf.top_k]
        K = len(keep)
        dtype = torch.float16 if inf.mask_dtype == "float16" else torch.float32
        masks = torch.zeros((K, 1, H, W), dtype=dtype, device=image.device)
        tight = torch.zeros((K, 4), dtype=torch.float32, device=image.device)
        sel, window = where[keep], boxes[keep]
        for li, level in enumerate(levels):
            mine = torch.nonzero(sel[:, 0] == li).flatten()
            if not len(mine):
                continue
            # row-major order within a level: windows of a chunk lie close together (a small pasting region)
            mine = mine[torch.argsort(sel[mine, 1] * 100000 + sel[mine, 2])]
            for start in range(0, len(mine), inf.mask_chunk):
                part = mine[start:start + inf.mask_chunk]
                probs = self._window_masks(level, sel[part, 1], sel[part, 2])
                paste_windows(probs, window[part], H, W, out=masks[:, 0], index=part)
                tight[part] = window_tight_boxes(probs, window[part], H, W)[0]
        return {"boxes": tight, "scores": scores[keep], "labels": torch.ones(K, dtype=torch.int64, device=image.device),
                "masks": masks, "windows": window}
