"""Free-form deformation (FFD) of masks and dual mask feature pooling, after FFD-Net (ICCV 2017), sec. 3.1-3.3.

Batched PyTorch, CPU or GPU, differentiable end to end, no per-pixel Python loops.

Conventions
-----------

* **Layouts.** Images, masks and feature maps are ``(N, C, H, W)``; row ``y`` down, column ``x`` right. A control
  mesh of offsets is ``(N, 2, My, Mx)`` with channel 0 = ``dx`` (along the width) and channel 1 = ``dy`` (along the
  height); a dense displacement field is ``(N, 2, H, W)`` in the same ``(dx, dy)`` order. Sampling grids are
  ``(N, H, W, 2)`` in ``(x, y)`` order, normalised to ``[-1, 1]`` (``torch.nn.functional.grid_sample``'s layout).
* **Frame and units.** A mask is warped inside its *frame*: the ``H x W`` array it lives in (in FFD-Net, the crop
  of the 1.6x enlarged box). Offsets are **normalised by the mask (frame) size**: an offset ``(dx, dy)`` moves a
  point by ``dx * W`` pixels along ``x`` and ``dy * H`` pixels along ``y`` (sec. 3.2: "we normalize the offsets by
  the size of the initial mask"), so the same offsets mean the same deformation at any resolution. In grid_sample's
  normalised coordinates, where the frame spans 2 units, that is ``2 * dx`` and ``2 * dy``.
  :func:`ffd_displacement` returns the interpolated offsets times its ``scale`` argument: ``scale=1`` keeps
  offset units, ``scale=(W, H)`` gives pixels, ``scale=2`` gives normalised grid units.
* **align_corners=False** throughout: pixel ``x`` is the unit square ``[x, x+1)`` with its centre at ``x + 0.5``,
  the frame's outer edges are ``-1`` and ``+1`` in normalised units (pixel centre ``x`` sits at ``(2x+1)/W - 1``).
  This makes the mapping resolution independent (the same offsets warp a 64 px and a 512 px mask identically up
  to sampling), and matches roi_align's ``aligned=True`` pixel model used by the pooling below. On the input's own
  grid this is the project's one warp convention (:mod:`ops.warp`, which builds grids with align_corners=True):
  both compute ``out(p) = in(p + d(p))`` at pixel centres, and a test holds them equal.
* **Direction.** Backward warp, as in spatial transformers: ``output(p) = input(p + d(p))`` where ``d`` is the
  dense displacement at the *output* location ``p``. A positive ``dx`` therefore moves the content **left**
  (each output pixel fetches from further right). Samples falling outside the input read 0 (``padding_mode="zeros"``:
  background for masks).
* **Control mesh geometry** (uniform cubic B-spline FFD, eq. 1). With ``M`` control points along an axis, the
  frame is split into ``M - 3`` uniform cells of spacing ``delta = size / (M - 3)`` pixels; control point ``k``
  (0-based) sits at pixel coordinate ``(k - 1) * delta``, i.e. at normalised ``-1 + 2 (k - 1) / (M - 3)``: one
  point beyond each edge, so every location of the frame has its full 4 x 4 support. A location with continuous
  pixel coordinate ``x + 0.5`` (pixel centre) has mesh coordinate ``t = (x + 0.5) / delta``, cell
  ``i = floor(t)``, fraction ``u = t - i``, and is influenced by control points ``i .. i+3`` with weights
  ``B0(u) .. B3(u)``. The paper's 13 x 13 mesh (sec. 3.3) gives 10 x 10 cells.
* **Efficient evaluation.** The basis is separable (eq. 3's note), so the dense field is
  ``W_y @ offsets @ W_x^T`` with the small dense B-spline matrices ``W_y (H, My)`` and ``W_x (W, Mx)``
  (:func:`bspline_weights`): two tiny matmuls, and autograd's backward is the transposed product (eq. 3's
  "convolution with stride delta").

Pooling (sec. 3.1)
------------------

Boxes are ``(K, 5)`` rows ``[batch_idx, x1, y1, x2, y2]`` in continuous image pixel coordinates (pixel ``x``
covers ``[x, x+1)``; a mask's tight box is ``[xmin, ymin, xmax+1, ymax+1]`` over its foreground pixel indices:
:func:`mask_boxes`). Pooling is torchvision's ``roi_align(aligned=True)`` averaging ``sampling_ratio`` x
``sampling_ratio`` bilinear samples per cell. :func:`weighted_roi_pool` multiplies each output cell by the
fraction of the cell covered by the mask, obtained by roi_align-ing the mask itself with the same box and grid
(an average of bilinear samples: the exact area fraction as sampling gets dense). :func:`dual_mask_pooling`
concatenates, per level and grid size, the mask-weighted pooling in the tight box and the plain pooling in the box
enlarged ``context`` (1.6) times about its centre (not clipped: roi_align reads 0 beyond the image).

Crops (sec. 3.3, "Training Examples")
-------------------------------------

FFD-Net registers a mask inside the 1.6x enlarged box of a proposal, resampled to a fixed size. With the same box
layout, :func:`crop_resize` cuts each box out of an image/mask stack and resizes it (``roi_align(aligned=True)``
with adaptive sampling: each output cell averages about ``box / size`` samples a side, so large boxes are
area-averaged, not aliased), and :func:`paste_crops` is its inverse map: image pixel centre ``p`` reads the crop at
``(p - box origin) / box size * size`` (bilinear, zero outside the box) — how a refined mask goes back into the image.
"""

from __future__ import annotations

import functools
import numbers
from typing import Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "bspline_basis",
    "bspline_weights",
    "ffd_displacement",
    "ffd_displacement_naive",
    "ffd_grid",
    "ffd_warp",
    "mask_boxes",
    "enlarge_boxes",
    "mask_coverage",
    "weighted_roi_pool",
    "dual_mask_pooling",
    "crop_resize",
    "paste_crops",
]

ScaleLike = Union[float, Sequence[float], torch.Tensor]


# --------------------------------------------------------------------------------------------- B-splines


def bspline_basis(u: torch.Tensor) -> torch.Tensor:
    """The four uniform cubic B-spline basis functions of eq. 1 at fractions ``u`` in [0, 1]: ``(..., 4)``."""
    u2 = u * u
    u3 = u2 * u
    b0 = (1 - u) ** 3 / 6
    b1 = (3 * u3 - 6 * u2 + 4) / 6
    b2 = (-3 * u3 + 3 * u2 + 3 * u + 1) / 6
    b3 = u3 / 6
    return torch.stack([b0, b1, b2, b3], dim=-1)


def _cells(out_size: int, mesh_size: int, dtype: torch.dtype, device: torch.device | str | None = None):
    """Cell index ``i`` (first of the 4 supporting control points) and fraction ``u`` of each pixel centre."""
    if mesh_size < 4:
        raise ValueError(f"mesh_size must be >= 4 (cubic B-spline support), got {mesh_size}")
    if out_size < 1:
        raise ValueError(f"out_size must be >= 1, got {out_size}")
    t = (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * ((mesh_size - 3) / out_size)
    i = torch.floor(t).clamp_(0, mesh_size - 4)  # t < M-3 always; clamp guards rounding only
    u = (t - i).to(dtype)
    return i.long(), u


@functools.lru_cache(maxsize=128)
def _bspline_weights_cached(out_size: int, mesh_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    i, u = _cells(out_size, mesh_size, torch.float64)
    b = bspline_basis(u)  # (out, 4)
    w = torch.zeros(out_size, mesh_size, dtype=torch.float64)
    cols = i[:, None] + torch.arange(4)[None, :]
    w.scatter_(1, cols, b)
    return w.to(device=device, dtype=dtype)


def bspline_weights(out_size: int, mesh_size: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``(out_size, mesh_size)`` interpolation matrix of the uniform cubic B-spline along one axis.

    Row ``x`` holds the weights of the ``mesh_size`` control points at pixel centre ``x`` (4 non-zeros,
    ``B0..B3(u)``; rows sum to 1, entries >= 0). Built in float64 and cached per ``(size, mesh, device, dtype)``;
    the returned tensor is shared: do not modify it in place.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _bspline_weights_cached(int(out_size), int(mesh_size), device, dtype)


# --------------------------------------------------------------------------------------------- displacement


def _check_offsets(offsets: torch.Tensor) -> None:
    if offsets.ndim != 4 or offsets.shape[1] != 2:
        raise ValueError(f"offsets must be (N, 2, My, Mx), got {tuple(offsets.shape)}")


def _scale_tensor(scale: ScaleLike, ref: torch.Tensor) -> torch.Tensor | float:
    """``scale`` as something broadcastable to ``(N, 2, H, W)``: a float, ``(sx, sy)``, or ``(N, 2)`` / ``(N, 1)``."""
    if isinstance(scale, (int, float)):
        return float(scale)
    s = torch.as_tensor(scale, dtype=ref.dtype, device=ref.device)
    if s.ndim == 0:
        return s
    if s.ndim == 1:
        if s.numel() != 2:
            raise ValueError(f"scale as a sequence must be (sx, sy), got {tuple(s.shape)}")
        return s.view(1, 2, 1, 1)
    if s.ndim == 2 and s.shape[1] in (1, 2):
        return s.view(s.shape[0], s.shape[1], 1, 1)
    raise ValueError(f"scale must be a float, (sx, sy), (N, 2) or (N, 1), got shape {tuple(s.shape)}")


def ffd_displacement(offsets: torch.Tensor, out_hw: tuple[int, int], scale: ScaleLike = 1.0) -> torch.Tensor:
    """Dense displacement ``(N, 2, H, W)`` of control-point offsets ``(N, 2, My, Mx)`` (eq. 2, minus the identity).

    Evaluated as ``W_y @ offsets @ W_x^T`` (separable basis). The result is in the offsets' units times
    ``scale``: ``scale=(W, H)`` turns offsets normalised by the mask size into pixels, ``scale=2`` into
    grid_sample's normalised units; a ``(N, 2)`` tensor scales each sample (e.g. per-mask sizes).
    """
    _check_offsets(offsets)
    h, w = int(out_hw[0]), int(out_hw[1])
    my, mx = offsets.shape[-2:]
    wy = bspline_weights(h, my, offsets.device, offsets.dtype)
    wx = bspline_weights(w, mx, offsets.device, offsets.dtype)
    disp = torch.matmul(torch.matmul(wy, offsets), wx.t())
    s = _scale_tensor(scale, offsets)
    return disp if (isinstance(s, float) and s == 1.0) else disp * s


def ffd_displacement_naive(offsets: torch.Tensor, out_hw: tuple[int, int], scale: ScaleLike = 1.0,
                           method: str = "eq1") -> torch.Tensor:
    """Reference evaluation of the same field, for tests and the benchmark only.

    * ``method="eq1"``: eq. 1 literally, per pixel: ``i = floor(t)``, ``u = t - i``, gather the 4 x 4 supporting
      control points and sum ``B_l(v) B_m(u) phi[i+l, j+m]`` (16 Python iterations, vectorised over pixels).
    * ``method="loop"``: loop over the ``My * Mx`` control points, adding each one's (outer-product) basis
      function times its offset to the field.
    """
    _check_offsets(offsets)
    h, w = int(out_hw[0]), int(out_hw[1])
    n, _, my, mx = offsets.shape
    if method == "eq1":
        iy, v = _cells(h, my, offsets.dtype, offsets.device)  # rows
        ix, u = _cells(w, mx, offsets.dtype, offsets.device)  # columns
        by = bspline_basis(v)  # (H, 4)
        bx = bspline_basis(u)  # (W, 4)
        flat = offsets.reshape(n, 2, my * mx)
        out = offsets.new_zeros(n, 2, h, w)
        for l in range(4):
            for m in range(4):
                idx = ((iy + l)[:, None] * mx + (ix + m)[None, :]).reshape(-1)  # (H*W,)
                phi = flat[:, :, idx].reshape(n, 2, h, w)
                out = out + (by[:, l][:, None] * bx[:, m][None, :]) * phi
    elif method == "loop":
        wy = _bspline_weights_cached(h, my, torch.device("cpu"), torch.float64).to(offsets.device, offsets.dtype)
        wx = _bspline_weights_cached(w, mx, torch.device("cpu"), torch.float64).to(offsets.device, offsets.dtype)
        out = offsets.new_zeros(n, 2, h, w)
        for a in range(my):
            for b in range(mx):
                basis = wy[:, a][:, None] * wx[:, b][None, :]  # (H, W)
                out = out + offsets[:, :, a, b][:, :, None, None] * basis
    else:
        raise ValueError(f"method must be 'eq1' or 'loop', got {method!r}")
    s = _scale_tensor(scale, offsets)
    return out if (isinstance(s, float) and s == 1.0) else out * s


# --------------------------------------------------------------------------------------------- warping


def _identity_grid(h: int, w: int, device, dtype) -> torch.Tensor:
    """``(1, H, W, 2)`` normalised pixel-centre coordinates (align_corners=False)."""
    ys = (torch.arange(h, device=device, dtype=dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device, dtype=dtype) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).unsqueeze(0)


def ffd_grid(offsets: torch.Tensor, out_hw: tuple[int, int], naive: bool = False) -> torch.Tensor:
    """Sampling grid ``(N, H, W, 2)`` for ``grid_sample(..., align_corners=False)``: identity + displacement.

    ``offsets`` are normalised by the frame size (see module docstring), so the grid displacement is
    ``2 * offsets`` interpolated. ``naive=True`` uses :func:`ffd_displacement_naive` (tests, benchmark).
    """
    h, w = int(out_hw[0]), int(out_hw[1])
    disp = (ffd_displacement_naive if naive else ffd_displacement)(offsets, (h, w), scale=2.0)
    return _identity_grid(h, w, offsets.device, offsets.dtype) + disp.permute(0, 2, 3, 1)


def ffd_warp(inputs: torch.Tensor, offsets: torch.Tensor, out_hw: tuple[int, int] | None = None,
             mode: str = "bilinear", padding_mode: str = "zeros", naive: bool = False) -> torch.Tensor:
    """Backward-warp ``inputs (N, C, H, W)`` (masks, images, features) by the FFD of ``offsets (N, 2, My, Mx)``.

    ``output(p) = input(p + d(p))`` with ``d`` in units of the frame size (``d_px = d * (W, H)``), bilinear
    (``mode``) sampling via ``grid_sample(align_corners=False)``; out-of-frame samples read 0. ``out_hw``
    defaults to the input size (the deformation is defined on the frame, so any output resolution samples the
    same warped frame). Differentiable wrt both ``inputs`` and ``offsets``. The result has ``inputs``' dtype;
    ``offsets`` are cast to it.
    """
    if inputs.ndim != 4:
        raise ValueError(f"inputs must be (N, C, H, W), got {tuple(inputs.shape)}")
    _check_offsets(offsets)
    if offsets.shape[0] != inputs.shape[0]:
        raise ValueError(f"batch mismatch: inputs N={inputs.shape[0]}, offsets N={offsets.shape[0]}")
    if not inputs.is_floating_point():
        inputs = inputs.float()
    out_hw = tuple(inputs.shape[-2:]) if out_hw is None else out_hw
    grid = ffd_grid(offsets.to(inputs.dtype), out_hw, naive=naive)
    return F.grid_sample(inputs, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


# --------------------------------------------------------------------------------------------- pooling


def mask_boxes(masks: torch.Tensor, batch_idx: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Tight boxes ``(K, 5)`` ``[batch_idx, x1, y1, x2+1, y2+1]`` (float) of full-image masks ``(K, H, W)``.

    An empty mask gets a zero-size box at the origin. ``batch_idx`` defaults to 0 for every mask.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got {tuple(masks.shape)}")
    k, h, w = masks.shape
    fg = masks != 0
    rows, cols = fg.any(dim=2), fg.any(dim=1)  # (K, H), (K, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ar_h, h).amin(dim=1)
    y2 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    x1 = torch.where(cols, ar_w, w).amin(dim=1)
    x2 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    empty = ~rows.any(dim=1)
    box = torch.stack([x1, y1, x2, y2], dim=1).float()
    box[empty] = 0.0
    bi = torch.zeros(k, device=masks.device) if batch_idx is None else torch.as_tensor(
        batch_idx, dtype=torch.float32, device=masks.device)
    return torch.cat([bi.float().view(k, 1), box], dim=1)


def enlarge_boxes(boxes: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale ``(K, 5)`` boxes' width and height by ``factor`` about their centres (batch index kept)."""
    cx = (boxes[:, 1] + boxes[:, 3]) / 2
    cy = (boxes[:, 2] + boxes[:, 4]) / 2
    hw = (boxes[:, 3] - boxes[:, 1]) * (factor / 2)
    hh = (boxes[:, 4] - boxes[:, 2]) * (factor / 2)
    return torch.stack([boxes[:, 0], cx - hw, cy - hh, cx + hw, cy + hh], dim=1)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, numbers.Integral) else (int(size[0]), int(size[1]))


def _check_boxes(boxes: torch.Tensor) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be (K, 5) [batch_idx, x1, y1, x2, y2], got {tuple(boxes.shape)}")


def mask_coverage(boxes: torch.Tensor, masks: torch.Tensor, output_size: int | Sequence[int],
                  mask_frame: str = "image", sampling_ratio: int = 2) -> torch.Tensor:
    """Fraction of each of the ``output_size`` cells of each box covered by its mask: ``(K, 1, gh, gw)`` in [0, 1].

    ``mask_frame="image"``: ``masks (K, H_img, W_img)`` in image pixels, mask ``k`` belongs to box ``k``.
    ``mask_frame="box"``: ``masks (K, h, w)`` spanning exactly box ``k`` (a Mask R-CNN style box-local mask);
    the coverage is then independent of the box coordinates.
    """
    from torchvision.ops import roi_align

    _check_boxes(boxes)
    if masks.ndim != 3 or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"masks must be (K, h, w) with K={boxes.shape[0]}, got {tuple(masks.shape)}")
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    m = (masks != 0).to(dtype).unsqueeze(1) if not masks.is_floating_point() else masks.to(dtype).unsqueeze(1)
    k = boxes.shape[0]
    idx = torch.arange(k, device=boxes.device, dtype=dtype)
    if mask_frame == "image":
        rois = torch.cat([idx[:, None], boxes[:, 1:].to(dtype)], dim=1)
    elif mask_frame == "box":
        h, w = masks.shape[-2:]
        z = torch.zeros(k, device=boxes.device, dtype=dtype)
        rois = torch.stack([idx, z, z, z + w, z + h], dim=1)
    else:
        raise ValueError(f"mask_frame must be 'image' or 'box', got {mask_frame!r}")
    cov = roi_align(m, rois, _pair(output_size), spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=True)
    return cov.clamp_(0.0, 1.0)


def weighted_roi_pool(features: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
                      output_size: int | Sequence[int], spatial_scale: float, mask_frame: str = "image",
                      sampling_ratio: int = 2) -> torch.Tensor:
    """Mask-weighted RoI pooling (sec. 3.1): ``(K, C, gh, gw)``.

    ``roi_align(features, boxes, output_size, spatial_scale, aligned=True)`` in each (tight) box, each cell
    multiplied by the fraction of the cell covered by the mask (:func:`mask_coverage`). ``features (N, C, H, W)``
    at ``spatial_scale`` (feature px per image px, e.g. 1/4); ``boxes (K, 5)`` in image pixels; a full mask gives
    plain RoI pooling, an empty mask zeros. Differentiable wrt ``features`` (coverage carries no gradient to boxes).
    """
    from torchvision.ops import roi_align

    _check_boxes(boxes)
    size = _pair(output_size)
    rois = boxes.to(features.dtype)
    pooled = roi_align(features, rois, size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                       aligned=True)
    cov = mask_coverage(rois, masks.to(features.device), size, mask_frame=mask_frame,
                        sampling_ratio=sampling_ratio)
    return pooled * cov


def dual_mask_pooling(feature_levels: Sequence[torch.Tensor], spatial_scales: Sequence[float], boxes: torch.Tensor,
                      masks: torch.Tensor, grid_sizes: Sequence[int] | Sequence[Sequence[int]] = (30, 20),
                      context: float = 1.6, mask_frame: str = "image", sampling_ratio: int = 2,
                      flatten: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """Dual mask feature pooling (sec. 3.1) over several feature levels.

    For each level ``l`` (``(N, C_l, H_l, W_l)`` at ``spatial_scales[l]``) and each grid size ``g`` it applies to,
    computes ``[weighted_roi_pool in the tight box, roi_align in the box enlarged context x]`` and concatenates
    the two on channels: a piece ``(K, 2 C_l, g, g)``. ``grid_sizes`` is either a sequence of ints, each applied
    to every level (L levels x G grids = L*G pieces, level-major), or one sequence of ints per level (the paper:
    ``[[30], [30], [20], [20]]`` for conv1/res2c/res3b3/res4b22).

    Returns ``(K, sum_pieces 2 C_l g^2)`` (each piece flattened C-major, in piece order) if ``flatten``, else
    the list of pieces.
    """
    from torchvision.ops import roi_align

    if len(feature_levels) != len(spatial_scales):
        raise ValueError(f"{len(feature_levels)} feature levels but {len(spatial_scales)} spatial scales")
    _check_boxes(boxes)
    if len(grid_sizes) and not isinstance(grid_sizes[0], numbers.Integral):
        if len(grid_sizes) != len(feature_levels):
            raise ValueError(f"per-level grid_sizes needs {len(feature_levels)} entries, got {len(grid_sizes)}")
        per_level = [list(g) for g in grid_sizes]
    else:
        per_level = [list(grid_sizes)] * len(feature_levels)
    if any(int(g) <= 0 for grids in per_level for g in grids):
        raise ValueError(f"grid sizes must be positive, got {grid_sizes}")
    if context < 1.0:
        raise ValueError(f"context must be >= 1 (an enlargement of the tight box), got {context}")
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be > 0, got {sampling_ratio}")
    big = enlarge_boxes(boxes.float() if not boxes.is_floating_point() else boxes, context)
    pieces = []
    for feats, scale, grids in zip(feature_levels, spatial_scales, per_level):
        for g in grids:
            tight = weighted_roi_pool(feats, boxes, masks, g, scale, mask_frame=mask_frame,
                                      sampling_ratio=sampling_ratio)
            ctx = roi_align(feats, big.to(feats.dtype), (g, g), spatial_scale=scale, sampling_ratio=sampling_ratio,
                            aligned=True)
            pieces.append(torch.cat([tight, ctx], dim=1))
    if not flatten:
        return pieces
    return torch.cat([p.flatten(1) for p in pieces], dim=1)


# --------------------------------------------------------------------------------------------- crops


def crop_resize(planes: torch.Tensor, boxes: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Cut box ``k`` out of plane ``boxes[k, 0]`` of ``planes (N, C, H, W)`` and resize it: ``(K, C, h, w)``.

    ``boxes`` ``(K, 5)`` ``[plane_idx, x1, y1, x2, y2]`` in continuous pixel coordinates (the module's box layout;
    boxes may reach past the planes, which read 0 there); ``size`` an int or ``(h, w)``. Resampled with
    ``roi_align(aligned=True, sampling_ratio=-1)``: adaptive, so a box larger than the crop is area-averaged.
    Integer planes (uint8 images, bool masks) are resampled as float32; float planes keep their dtype.
    """
    from torchvision.ops import roi_align

    _check_boxes(boxes)
    x = planes if planes.is_floating_point() else planes.float()
    return roi_align(x, boxes.to(device=x.device, dtype=x.dtype), output_size=_pair(size), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)


def paste_crops(crops: torch.Tensor, boxes: torch.Tensor, height: int, width: int, chunk: int = 16) -> torch.Tensor:
    """Crops ``(K, h, w)`` (e.g. a refined mask per box) back into the ``height x width`` image: ``(K, H, W)``,
    bilinear, zero outside each box. The inverse of :func:`crop_resize`'s sampling.

    ``boxes`` ``(K, 5)`` as for :func:`crop_resize` (the plane index is not used) or ``(K, 4)`` ``[x1, y1, x2, y2]``.
    Float crops keep their dtype (others become float32). Boxes go ``chunk`` at a time, which bounds the
    ``(chunk, H, W, 2)`` sampling grid on large images.
    """
    if crops.ndim != 3:
        raise ValueError(f"crops must be (K, h, w), got {tuple(crops.shape)}")
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 5) or boxes.shape[0] != crops.shape[0]:
        raise ValueError(f"boxes must be (K, 4) or (K, 5) with K={crops.shape[0]}, got {tuple(boxes.shape)}")
    crops = crops if crops.is_floating_point() else crops.float()
    xyxy = boxes[:, -4:].to(device=crops.device, dtype=crops.dtype)
    origin, extent = xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]
    xs = torch.arange(width, device=crops.device, dtype=crops.dtype) + 0.5  # pixel centres, continuous coordinates
    ys = torch.arange(height, device=crops.device, dtype=crops.dtype) + 0.5
    out = crops.new_zeros((len(crops), height, width))
    for start in range(0, len(crops), chunk):
        part = slice(start, start + chunk)
        gx = 2 * (xs[None, :] - origin[part, 0:1]) / extent[part, 0:1] - 1  # (k, W) normalised crop coordinates
        gy = 2 * (ys[None, :] - origin[part, 1:2]) / extent[part, 1:2] - 1  # (k, H)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (k, H, W, 2)
        out[part] = F.grid_sample(crops[part, None], grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)[:, 0]
    return out
