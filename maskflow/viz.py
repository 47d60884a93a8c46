"""Pictures of samples, because people check data by looking at it: every stage logs a contact sheet to MLflow;
and the plots evaluations log.

The sample pictures take and return ``H x W x 3`` uint8 numpy arrays (RGB) and are vectorised (no per-pixel loops).
The plots (:func:`recall_curves_figure`) return a ``matplotlib.figure.Figure`` built without pyplot (no global figure
state, safe in any thread, nothing to close); :func:`plot_recall_curves` saves one as a PNG.
"""

from __future__ import annotations

import io

import numpy as np

PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
    [240, 50, 230], [210, 245, 60], [250, 190, 190], [0, 128, 128], [230, 190, 255], [170, 110, 40], [128, 0, 0],
], dtype=np.uint8)


def to_rgb(image) -> np.ndarray:
    """uint8 HxWx3 from HxW, HxWx1, HxWx3, or a CHW torch tensor / array."""
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[..., :3]


def overlay_masks(image, masks, alpha: float = 0.5, outline: bool = True) -> np.ndarray:
    """Colour each (N, H, W) mask onto the image, with a 1-pixel outline."""
    out = to_rgb(image).astype(np.float32)
    masks = np.asarray(masks).astype(bool)
    for k, m in enumerate(masks):
        colour = PALETTE[k % len(PALETTE)].astype(np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * colour
        if outline:
            edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
            out[edge] = colour
    return out.astype(np.uint8)


def label_map_to_rgb(labels) -> np.ndarray:
    """An integer label map (0 = background) in palette colours."""
    labels = np.asarray(labels).astype(np.int64)
    out = PALETTE[(labels - 1) % len(PALETTE)]
    out[labels <= 0] = 0
    return out


def flow_to_rgb(flow, max_magnitude: float | None = None) -> np.ndarray:
    """A (2, H, W) flow (dx, dy) as the usual colour wheel: hue = direction, saturation = magnitude."""
    import matplotlib.colors

    f = flow.detach().cpu().numpy() if hasattr(flow, "detach") else np.asarray(flow)
    dx, dy = f[0], f[1]
    mag = np.hypot(dx, dy)
    scale = max_magnitude or max(float(mag.max()), 1e-6)
    hsv = np.stack([(np.arctan2(dy, dx) / (2 * np.pi)) % 1.0, np.clip(mag / scale, 0, 1), np.ones_like(mag)], -1)
    return (matplotlib.colors.hsv_to_rgb(hsv) * 255).astype(np.uint8)


def draw_points(image, points, radius: int = 2, colour=(255, 255, 0)) -> np.ndarray:
    """Square dots at (x, y) pixel points."""
    out = to_rgb(image).copy()
    h, w = out.shape[:2]
    for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        xi, yi = int(round(x)), int(round(y))
        out[max(0, yi - radius):min(h, yi + radius + 1), max(0, xi - radius):min(w, xi + radius + 1)] = colour
    return out


def grid(tiles: list, columns: int = 4, size: int | None = 160, pad: int = 4) -> np.ndarray:
    """Tile pictures into one sheet; each tile is resized (nearest) to fit ``size`` x ``size`` if given."""
    tiles = [to_rgb(t) for t in tiles]
    if not tiles:
        return np.zeros((size or 16, size or 16, 3), np.uint8)
    if size:
        tiles = [_fit(t, size) for t in tiles]
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    sheet = np.full((rows * (th + pad) + pad, min(columns, len(tiles)) * (tw + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        sheet[y:y + t.shape[0], x:x + t.shape[1]] = t
    return sheet


def _fit(tile: np.ndarray, size: int) -> np.ndarray:
    h, w = tile.shape[:2]
    scale = size / max(h, w)
    ys = np.minimum((np.arange(max(1, round(h * scale))) / scale).astype(int), h - 1)
    xs = np.minimum((np.arange(max(1, round(w * scale))) / scale).astype(int), w - 1)
    return tile[ys][:, xs]


def png_bytes(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_rgb(image)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- evaluation plots


def recall_curves_figure(result: dict, title: str = ""):
    """Two panels like Fig. 5 of FFD-Net (Zhang & He, ICCV 2017, sec. 4.2.1): (a) AR vs number of proposals,
    (b) recall vs IoU threshold for each k. ``result`` is :func:`ops.metrics.proposal_recall`'s dict (``recall``
    {k: (T,)}, ``thresholds`` (T,), ``AR@k``), or ``{label: such a dict}`` to draw several sets of proposals of the
    same images in the same panels (refined against unrefined: one colour per label, one line style per k).
    Returns a ``matplotlib.figure.Figure``."""
    from matplotlib.figure import Figure

    results = {"": result} if "recall" in result else dict(result)
    fig = Figure(figsize=(10, 4))
    ax_a, ax_b = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    thr = np.zeros(1)
    for i, (label, res) in enumerate(results.items()):
        colour = f"C{i}"
        ks = sorted(int(k) for k in res["recall"])
        thr = np.asarray(res["thresholds"], dtype=np.float64)
        ars = [res.get(f"AR@{k}", float(np.mean(res["recall"][k]))) for k in ks]
        ax_a.plot(ks, ars, marker="o", color=colour, label=label or None)
        for j, k in enumerate(ks):
            name = f"{label}, {k} proposals" if label else f"{k} proposals"
            ax_b.plot(thr, np.asarray(res["recall"][k]), marker=".", color=colour if label else f"C{j}",
                      linestyle=styles[j % len(styles)] if label else "-", label=name)
        if len(ks) > 1 and ks[0] > 0:
            ax_a.set_xscale("log")
    ax_a.set_xlabel("number of proposals")
    ax_a.set_ylabel(f"average recall (IoU {thr.min():.2f}-{thr.max():.2f})")
    ax_a.set_ylim(0.0, 1.0)
    ax_a.grid(True, alpha=0.3)
    ax_a.set_title("(a) AR vs. number of proposals")
    if len(results) > 1:
        ax_a.legend()
    ax_b.set_xlabel("IoU threshold")
    ax_b.set_ylabel("recall")
    ax_b.set_ylim(0.0, 1.0)
    ax_b.grid(True, alpha=0.3)
    ax_b.legend(fontsize="small")
    ax_b.set_title("(b) recall vs. IoU threshold")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_recall_curves(result: dict, path: str, title: str = "") -> str:
    """:func:`recall_curves_figure` saved as a PNG at the local ``path`` (parent folders made); returns ``path``."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    recall_curves_figure(result, title).savefig(path, format="png", dpi=100)
    return path
