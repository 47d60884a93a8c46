"""Window geometry of DeepMask / SharpMask's fully convolutional inference (Pinheiro et al., NIPS 2015 section 3.3;
ECCV 2016 section 4): windows on a stride grid of a padded, scaled image, their boxes in the original image, the
skip features under a window, and masks pasted back into the image.

Coordinates are continuous pixel coordinates (pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``). A scaled image
of ``h x w`` made from an ``H x W`` image has scale ``(w / W, h / H)``; it is padded by ``pad`` pixels on the top
and left, so window ``(a, b)`` of side ``patch`` at stride ``stride`` covers padded pixels
``[stride * b, stride * b + patch) x [stride * a, stride * a + patch)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["window_boxes", "gather_windows", "paste_windows", "window_tight_boxes"]


def window_boxes(rows: torch.Tensor, cols: torch.Tensor, patch: int, stride: int, pad: int, scale_x: float,
                 scale_y: float) -> torch.Tensor:
    """``(K, 4)`` ``[x1, y1, x2, y2]`` boxes, in the original image, of windows ``(rows, cols)`` of a padded scaled
    image (see the module docstring)."""
    x1 = (cols.to(torch.float32) * stride - pad) / scale_x
    y1 = (rows.to(torch.float32) * stride - pad) / scale_y
    return torch.stack([x1, y1, x1 + patch / scale_x, y1 + patch / scale_y], dim=1)


def gather_windows(feature: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, step: int, size: int
                   ) -> torch.Tensor:
    """The ``size x size`` cells of ``feature (C, Hf, Wf)`` under each window: window ``k`` starts at cell
    ``(rows[k] * step, cols[k] * step)``. Returns ``(K, C, size, size)`` (one advanced-indexing gather)."""
    offsets = torch.arange(size, device=feature.device)
    r = rows.to(feature.device)[:, None] * step + offsets  # (K, size)
    c = cols.to(feature.device)[:, None] * step + offsets
    return feature[:, r[:, :, None], c[:, None, :]].permute(1, 0, 2, 3)


def paste_windows(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, chunk: int = 16,
                  out: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """Window masks ``(K, h, w)`` (each spanning its box ``(K, 4)`` ``[x1, y1, x2, y2]``) pasted into the
    ``height x width`` image: ``(K, height, width)``, bilinear, zero outside each box (image pixel centre ``p`` reads
    the mask at ``(p - x1) / (x2 - x1) * w``: :func:`ops.ffd.paste_crops`' map).

    ``chunk`` windows at a time are sampled, in float32, over the part of the image their boxes cover only (windows
    close together in a chunk keep that part small). With ``out`` (a zeroed ``(N, height, width)`` tensor of any
    float dtype, e.g. float16 to halve the memory of 1000 full-image masks), window ``k`` is written into
    ``out[index[k]]`` (``index`` default ``0..K-1``) and only there, inside the covered part; else a new float32
    tensor is returned."""
    if masks.ndim != 3 or boxes.shape != (len(masks), 4):
        raise ValueError(f"masks must be (K, h, w) and boxes (K, 4), got {tuple(masks.shape)}, {tuple(boxes.shape)}")
    if out is None:
        out = masks.new_zeros((len(masks), height, width), dtype=torch.float32)
    index = torch.arange(len(masks), device=out.device) if index is None else index.to(out.device)
    boxes = boxes.to(device=masks.device, dtype=torch.float32)
    for start in range(0, len(masks), chunk):
        part = slice(start, start + chunk)
        b = boxes[part]
        x_lo, y_lo = max(0, math.floor(float(b[:, 0].min()))), max(0, math.floor(float(b[:, 1].min())))
        x_hi, y_hi = min(width, math.ceil(float(b[:, 2].max()))), min(height, math.ceil(float(b[:, 3].max())))
        if x_hi <= x_lo or y_hi <= y_lo:
            continue  # every box of the chunk lies outside the image
        xs = torch.arange(x_lo, x_hi, device=masks.device, dtype=torch.float32) + 0.5
        ys = torch.arange(y_lo, y_hi, device=masks.device, dtype=torch.float32) + 0.5
        gx = 2 * (xs[None, :] - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) - 1  # (k, w') normalised window coordinates
        gy = 2 * (ys[None, :] - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) - 1  # (k, h')
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (k, h', w', 2)
        sampled = F.grid_sample(masks[part, None].float(), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)[:, 0]
        out[index[part], y_lo:y_hi, x_lo:x_hi] = sampled.to(out.dtype)
    return out


def window_tight_boxes(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                       threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``([x1, y1, x2, y2] (K, 4), non-empty (K,) bool)``: the tight boxes, in the image and clipped to it, of window
    masks ``(K, h, w) > threshold`` whose windows span ``boxes`` (window pixel ``j`` covers ``[x1 + j * s,
    x1 + (j + 1) * s)``, ``s = (x2 - x1) / w``); the window box clipped where a mask is empty or falls outside the
    image. Read at the window's resolution: within a window pixel of the pasted mask's own tight box."""
    on = masks > threshold
    K, h, w = on.shape
    cols, rows = on.any(dim=1), on.any(dim=2)  # (K, w), (K, h)
    nonempty = rows.any(dim=1)
    xr, yr = torch.arange(w, device=masks.device), torch.arange(h, device=masks.device)
    c0, c1 = torch.where(cols, xr, w).amin(dim=1), torch.where(cols, xr + 1, 0).amax(dim=1)
    r0, r1 = torch.where(rows, yr, h).amin(dim=1), torch.where(rows, yr + 1, 0).amax(dim=1)
    b = boxes.to(torch.float32)
    sx, sy = (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h
    tight = torch.stack([b[:, 0] + c0 * sx, b[:, 1] + r0 * sy, b[:, 0] + c1 * sx, b[:, 1] + r1 * sy], dim=1)
    tight = torch.where(nonempty[:, None], tight, b)
    limit = torch.tensor([width, height, width, height], dtype=torch.float32, device=b.device)
    clipped = torch.minimum(tight.clamp_min(0), limit)
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, nonempty & inside
