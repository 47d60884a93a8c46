"""Batched binary-mask utilities on COCO run-length encodings (pycocotools underneath).

Conventions (those of :mod:`maskflow.data.schema`):

* a batch of dense masks is an ``(N, H, W)`` array (numpy or torch, bool or integer; any non-zero value is
  foreground), row ``y`` down, column ``x`` right;
* an RLE is a COCO compressed RLE dict ``{"size": [h, w], "counts": str}``; functions here return ``counts`` as
  ``str`` (JSON-safe) and accept ``str`` or ``bytes`` counts, and uncompressed RLE (``counts`` a list of ints);
* boxes are ``[x, y, w, h]`` float64 in pixels (the tight box of the foreground, pycocotools' ``toBbox``);
* areas are foreground pixel counts;
* IoU follows pycocotools: for a crowd ground truth the IoU of a detection ``d`` is ``|d & g| / |d|``; any IoU
  with an empty union is 0.

Every function does a single pycocotools call over the whole batch (no per-mask Python loop beyond building the
argument list).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["encode_masks", "decode_masks", "mask_iou", "rle_boxes", "rle_areas"]


def _to_fortran_hwn(masks: Any) -> np.ndarray:
    """(N, H, W) array/tensor -> Fortran-ordered uint8 (H, W, N) of 0/1, the layout ``mask.encode`` wants."""
    try:  # torch is optional here: only import-checked when a tensor arrives
        import torch

        if isinstance(masks, torch.Tensor):
            if masks.ndim != 3:
                raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
            # binarise and lay out (N, W, H) C-order on the tensor's own device, then copy once to host:
            # the (N, W, H) C-contiguous buffer is exactly the (H, W, N) Fortran-contiguous one.
            nwh = masks.detach().ne(0).transpose(1, 2).contiguous().to(torch.uint8).cpu().numpy()
            return nwh.transpose(2, 1, 0)
    except ImportError:  # pragma: no cover - torch is a project dependency
        pass
    arr = np.asarray(masks)
    if arr.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {arr.shape}")
    if arr.dtype != np.bool_:
        arr = arr != 0
    return np.asfortranarray(arr.transpose(1, 2, 0)).view(np.uint8)


def _as_str(counts: Any) -> str:
    return counts.decode("ascii") if isinstance(counts, (bytes, bytearray)) else counts


def _normalise_rles(rles: Sequence[dict]) -> list[dict]:
    """Compressed RLE dicts pycocotools accepts (str/bytes counts pass through; list counts are compressed)."""
    out = []
    for r in rles:
        if isinstance(r["counts"], list):
            h, w = r["size"]
            out.append(mask_utils.frPyObjects(r, int(h), int(w)))
        else:
            out.append(r)
    return out


def _common_size(rles: Sequence[dict], what: str) -> tuple[int, int] | None:
    if not rles:
        return None
    sizes = {(int(r["size"][0]), int(r["size"][1])) for r in rles}
    if len(sizes) != 1:
        raise ValueError(f"{what}: RLEs of different sizes {sorted(sizes)}")
    return next(iter(sizes))


def encode_masks(masks: Any) -> list[dict]:
    """Encode an ``(N, H, W)`` batch of binary masks as N COCO RLE dicts with ``str`` counts ([] for N = 0)."""
    hwn = _to_fortran_hwn(masks)
    if hwn.shape[2] == 0:
        return []
    rles = mask_utils.encode(hwn)
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": _as_str(r["counts"])} for r in rles]


def decode_masks(rles: Sequence[dict], height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode N RLEs (all of one size) to a C-contiguous ``(N, H, W)`` uint8 array of 0/1.

    ``height``/``width`` are needed only for N = 0 (an ``(0, H, W)`` array); when given with N > 0 they must match.
    """
    rles = _normalise_rles(list(rles))
    size = _common_size(rles, "decode_masks")
    if size is None:
        if height is None or width is None:
            raise ValueError("decode_masks of no RLEs needs height and width")
        return np.zeros((0, int(height), int(width)), dtype=np.uint8)
    if (height is not None and int(height) != size[0]) or (width is not None and int(width) != size[1]):
        raise ValueError(f"RLE size {list(size)} does not match height/width {[height, width]}")
    with warnings.catch_warnings():  # pycocotools' Masks.__array__ predates numpy 2's copy keyword: harmless
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        hwn = mask_utils.decode(rles)  # (H, W, N) Fortran order
    return np.ascontiguousarray(hwn.transpose(2, 0, 1))


def mask_iou(dt_rles: Sequence[dict], gt_rles: Sequence[dict], gt_iscrowd: Any = None) -> np.ndarray:
    """``(D, G)`` float64 mask IoU of each detection against each ground truth (pycocotools' crowd semantics).

    ``gt_iscrowd`` is G flags (default all 0). Either side empty gives a ``(D, 0)`` / ``(0, G)`` array.
    """
    dt = _normalise_rles(list(dt_rles))
    gt = _normalise_rles(list(gt_rles))
    crowd = np.zeros(len(gt), dtype=np.uint8) if gt_iscrowd is None else np.asarray(gt_iscrowd).astype(np.uint8)
    if crowd.shape != (len(gt),):
        raise ValueError(f"gt_iscrowd has shape {crowd.shape}, expected ({len(gt)},)")
    if not dt or not gt:
        return np.zeros((len(dt), len(gt)), dtype=np.float64)
    if _common_size(dt, "mask_iou dt") != _common_size(gt, "mask_iou gt"):
        raise ValueError("mask_iou: detections and ground truths have different sizes")
    return np.asarray(mask_utils.iou(dt, gt, crowd), dtype=np.float64).reshape(len(dt), len(gt))


def rle_boxes(rles: Sequence[dict]) -> np.ndarray:
    """``(N, 4)`` float64 tight ``[x, y, w, h]`` boxes of the RLEs (zeros for an empty mask)."""
    rles = _normalise_rles(list(rles))
    if not rles:
        return np.zeros((0, 4), dtype=np.float64)
    return np.asarray(mask_utils.toBbox(rles), dtype=np.float64).reshape(len(rles), 4)


def rle_areas(rles: Sequence[dict]) -> np.ndarray:
    """``(N,)`` int64 foreground pixel counts of the RLEs."""
    rles = _normalise_rles(list(rles))
    if not rles:
        return np.zeros((0,), dtype=np.int64)
    # pycocotools' area() sizes a uint8 array by the count: it overflows from 256 RLEs on, so go in chunks.
    chunks = [mask_utils.area(rles[i:i + 255]) for i in range(0, len(rles), 255)]
    return np.concatenate([np.asarray(c, dtype=np.int64).reshape(-1) for c in chunks])
