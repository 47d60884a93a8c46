"""Classical optical flow for the planar-alignment comparison (Shu et al., section 4.2, Table 2 compares HSTN with
variational optical flow, SIFT Flow and LDOF): OpenCV's DIS (Kroeger et al., ECCV 2016) and Farneback
(SCIA 2003), coarse-to-fine methods from an existing package, run on the same pairs as the networks.

:func:`opencv_flow_t2s` returns the pair's ``flow_t2s`` in :mod:`ops.warp`'s convention (``(2, H, W)`` float32
pixels, channel 0 = dx, backward: ``target(p) ~ source(p + flow(p))``). OpenCV's ``calc(I0, I1)`` estimates
``I0(p) ~ I1(p + flow(p))``, so it is called with ``I0 = target``, ``I1 = source``. Both work on 8-bit grey images.

:func:`seconds_per_pair` times any method the same way (after warm-up, one pair at a time), for the side-by-side
time column.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Literal

import numpy as np

__all__ = ["OPENCV_METHODS", "opencv_flow_t2s", "seconds_per_pair"]

OPENCV_METHODS = ("dis", "farneback")


def _grey(image: np.ndarray) -> np.ndarray:
    """HxW or HxWx3 (RGB) uint8 -> HxW uint8 grey (ITU-R 601 luma, as OpenCV's RGB2GRAY)."""
    import cv2

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {image.dtype}")
    return np.ascontiguousarray(image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))


def opencv_flow_t2s(source: np.ndarray, target: np.ndarray, method: Literal["dis", "farneback"] = "dis"
                    ) -> np.ndarray:
    """The dense flow ``flow_t2s`` (2, H, W) float32 pixels of a pair of uint8 images (HxW grey or HxWx3 RGB,
    same size), by OpenCV's DIS (preset ``medium``) or Farneback (5 levels, pyramid scale 0.5, window 15)."""
    import cv2

    source, target = _grey(source), _grey(target)
    if source.shape != target.shape:
        raise ValueError(f"source {source.shape} and target {target.shape} differ in size")
    if method == "dis":
        flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(target, source, None)
    elif method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(target, source, None, pyr_scale=0.5, levels=5, winsize=15, iterations=3,
                                            poly_n=5, poly_sigma=1.2, flags=0)
    else:
        raise ValueError(f"method must be one of {OPENCV_METHODS}, got {method!r}")
    return np.ascontiguousarray(flow.transpose(2, 0, 1), dtype=np.float32)


def seconds_per_pair(method: Callable[[Any], Any], pairs: Iterable[Any], warmup: int = 2) -> dict[str, float]:
    """Wall-clock seconds of ``method(pair)`` per pair: the first ``warmup`` calls are not counted (lazy
    initialisation, caches), the others are timed one by one. ``method`` should return only when its work is done
    (synchronise a GPU inside it). Returns ``{"mean", "median", "pairs"}``."""
    times = []
    for i, pair in enumerate(pairs):
        start = time.perf_counter()
        method(pair)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if not times:
        raise ValueError(f"need more than warmup={warmup} pairs to time")
    return {"mean": float(np.mean(times)), "median": float(np.median(times)), "pairs": float(len(times))}
