"""Small mask builders shared by the metric and op tests."""

import numpy as np


def rect_mask(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def shift_masks(masks: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift (N, H, W) masks by (dy, dx) pixels with zero fill."""
    out = np.zeros_like(masks)
    h, w = masks.shape[1:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = masks[:, ys, xs]
    return out
