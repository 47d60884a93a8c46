"""Deep Variational Instance Segmentation (DVIS, NeurIPS 2020) losses and discretisation, batched PyTorch.

The network predicts one real-valued label map ``f`` per image, shape ``(N, 1, H, W)``; instances are encoded by
*values* (one value per instance), background by ``f <= 0``. Conventions below, with the paper's equation numbers
(Sec. 3.3 and 4):

* :func:`huber` — ``L_h(v) = v^2 / (2 theta)`` if ``|v| < theta`` else ``|v| - theta / 2``, ``theta = 0.1``. The
  paper writes it for ``v >= 0`` only (every use has a non-negative argument); we take ``|v|`` so it is the usual
  symmetric Huber (C^1, derivative ``clamp(v / theta, -1, 1)``).
* :func:`binary_loss` (eq. 3) — per pixel ``L_h(ReLU(f))`` on background (``GT = 0``: penalises ``f > 0``) and
  ``L_h(ReLU(m1 - f))`` on foreground (``GT > 0``: penalises ``f < m1``), ``m1 = 2``; mean over (non-ignored) pixels.
* :func:`permutation_invariant_loss` (eqs. 4-5) — for a pixel pair with ``f_d = |f(p1) - f(p2)|``:
  ``L_h(f_d)`` if the ids are equal, ``L_h(ReLU(m2 - f_d))`` if they differ, ``m2 = 1``. The ReLU is ours: the
  paper states "there is no loss if the difference ... is more than 1", which a bare ``L_h(m2 - f_d)`` would
  violate (negative loss). Pairs are the stratified offsets of :func:`pair_offsets`; each *unordered* pair is
  counted once; the loss is the **mean over all valid sampled pairs in the batch** (the discretised integral of
  eq. 2 divided by the number of sampled pairs; the number depends only on the ids, never on ``f``). By default only
  pairs whose two pixels are both foreground are used (Sec. 4: "it suffices to only consider the pixel pairs
  locating on instances"; background is the binary loss' job); ``foreground_only=False`` uses every pair, the
  background then being one more instance. It is computed offset by offset on shifted slices — never
  materialising pixel pairs — and by default through a custom autograd function that keeps ``O(N H W)`` memory
  whatever the number of offsets (the backward recomputes per offset).
* :func:`mumford_shah_cauchy` (eq. 7) — ``log((f(x,y) - f(x,y+1))^2 + (f(x,y) - f(x+1,y))^2 + 1)``: forward
  differences, zero difference past the last row/column (Neumann boundary), mean over pixels. Eq. 7 uses no image
  term (it regularises ``f`` only), so no image argument is taken; an optional per-pixel ``weight`` is.
* :func:`quantization_loss` — ``|f - round(f)|`` (distance to the nearest integer), mean over pixels.
* :func:`mean_shift_1d` — exact flat-kernel mean-shift on 1-D values via sort + prefix sums + ``searchsorted``
  (``O(S log P)`` per iteration for ``S`` seeds), bin seeding, sklearn-style mode merging, nearest-mode assignment.
  ``bandwidth`` is the window's full width (half-width ``bandwidth / 2``); see its docstring for why.
* :func:`discretize` — label map -> instance ids: pixels with ``f < background_max`` are background (0); the rest
  are mean-shifted at ``bandwidths[0] = 0.9``, then each segment is re-clustered at ``bandwidths[1] = 0.4`` and split
  when that gives several modes (the "refine" reading of Sec. 4; the paper itself keeps the two label maps as two
  candidate sets for its verification stage — :func:`discretize_candidates` returns those). Segments smaller than
  ``min_size`` pixels become 0. No connected components by default (an instance occluded into several pieces has
  one value, Fig. 2); ``connected=True`` splits every segment into 8-connected components (scipy, on CPU).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "huber",
    "binary_loss",
    "pair_offsets",
    "permutation_invariant_loss",
    "permutation_invariant_loss_naive",
    "mumford_shah_cauchy",
    "quantization_loss",
    "mean_shift_1d",
    "mean_shift_1d_naive",
    "discretize",
    "discretize_candidates",
]

Ignore = Union[None, int, torch.Tensor]


# --------------------------------------------------------------------------------------------------- losses


def huber(x: torch.Tensor, theta: float = 0.1) -> torch.Tensor:
    """``x^2 / (2 theta)`` where ``|x| < theta``, else ``|x| - theta / 2`` (elementwise)."""
    ax = x.abs()
    return torch.where(ax < theta, x * x / (2.0 * theta), ax - 0.5 * theta)


def _huber_grad(x: torch.Tensor, theta: float) -> torch.Tensor:
    return (x / theta).clamp(-1.0, 1.0)


def _valid_mask(ids: torch.Tensor, ignore: Ignore) -> Optional[torch.Tensor]:
    """(N, H, W) bool of pixels that count, or None (all)."""
    if ignore is None:
        return None
    if isinstance(ignore, torch.Tensor):
        return ~ignore.to(device=ids.device, dtype=torch.bool).reshape(ids.shape)
    return ids != int(ignore)


def binary_loss(pred: torch.Tensor, fg: torch.Tensor, m1: float = 2.0, theta: float = 0.1,
                ignore: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 3, mean over pixels: background (``fg`` False) pays ``L_h(ReLU(f))`` (i.e. only ``f > 0`` is penalised),
    foreground pays ``L_h(ReLU(m1 - f))`` (only ``f < m1``). ``pred`` and ``fg`` are ``(N, 1, H, W)``; ``ignore`` an
    optional bool mask of the same size (True = excluded from the loss and from the mean)."""
    fg = fg.to(torch.bool).reshape(pred.shape)
    per_pixel = huber(torch.where(fg, F.relu(m1 - pred), F.relu(pred)), theta)
    if ignore is None:
        return per_pixel.mean()
    keep = ~ignore.to(torch.bool).reshape(pred.shape)
    return (per_pixel * keep).sum() / keep.sum().clamp_min(1)


def pair_offsets(window: int = 129, dense_radius: int = 8, dilation: int = 8, symmetric: bool = False,
                 norm: str = "chebyshev") -> torch.Tensor:
    """The stratified pair offsets of Sec. 4 (``w = 129, c = 8, r = 8``), a deterministic ``(K, 2)`` long tensor of
    ``(dy, dx)``, sorted lexicographically, without duplicates and without ``(0, 0)``:

    * every offset with ``|(dy, dx)| <= dense_radius`` (``norm``: "chebyshev" — a ``17 x 17`` square for c = 8 —
      or "euclidean"), and
    * every offset with ``dy, dx`` both multiples of ``dilation`` and ``max(|dy|, |dx|) <= (window - 1) // 2``
      (the dilated grid of a dilated convolution, out to the window's half-width 64).

    ``symmetric=False`` (default) keeps one offset of each ``{o, -o}`` pair — the one with ``dy > 0`` or
    ``dy == 0, dx > 0`` — so each unordered pixel pair is visited once (284 offsets for the defaults);
    ``symmetric=True`` returns both (568)."""
    half = (window - 1) // 2
    r = torch.arange(-half, half + 1)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    if norm == "chebyshev":
        dense = torch.maximum(dy.abs(), dx.abs()) <= dense_radius
    elif norm == "euclidean":
        dense = dy * dy + dx * dx <= dense_radius * dense_radius
    else:
        raise ValueError(f"norm must be 'chebyshev' or 'euclidean', not {norm!r}")
    dilated = (dy % dilation == 0) & (dx % dilation == 0) if dilation > 0 else torch.zeros_like(dense)
    keep = (dense | dilated) & ~((dy == 0) & (dx == 0))
    if not symmetric:
        keep &= (dy > 0) | ((dy == 0) & (dx > 0))
    return torch.stack([dy[keep], dx[keep]], dim=1)  # row-major order = lexicographic (dy, dx)


def _slices(dy: int, dx: int, H: int, W: int):
    """Slices (a, b) with a[y, x] = p and b[y, x] = p + (dy, dx), both inside the image. None if empty."""
    if abs(dy) >= H or abs(dx) >= W:
        return None
    ya, yb = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
    xa, xb = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    return (ya, xa), (yb, xb)


def _pair_value_and_grad(d: torch.Tensor, same: torch.Tensor, m2: float, theta: float, need_grad: bool):
    ad = d.abs()
    u = torch.where(same, ad, F.relu(m2 - ad))
    val = huber(u, theta)
    if not need_grad:
        return val, None
    # same: dL/dd = h'(|d|) sign(d) = clamp(d/theta); different: dL/dd = -h'(u) sign(d) (0 once |d| >= m2).
    g_same = _huber_grad(d, theta)
    g_diff = -_huber_grad(u, theta) * torch.sign(d)
    return val, torch.where(same, g_same, g_diff)


def _pair_masks(ids: torch.Tensor, valid: Optional[torch.Tensor], sa, sb):
    ia, ib = ids[:, sa[0], sa[1]], ids[:, sb[0], sb[1]]
    same = ia == ib
    v = None if valid is None else valid[:, sa[0], sa[1]] & valid[:, sb[0], sb[1]]
    return same, v


def _offset_pairs(f, ids, valid, offsets):
    """Per offset whose shifted window is non-empty: (slices a, slices b, same-id mask, valid-pair mask or None,
    f[a] - f[b]) — one offset at a time, never all pairs at once."""
    H, W = f.shape[-2:]
    for dy, dx in offsets:
        s = _slices(dy, dx, H, W)
        if s is None:
            continue
        sa, sb = s
        same, v = _pair_masks(ids, valid, sa, sb)
        yield sa, sb, same, v, f[:, sa[0], sa[1]] - f[:, sb[0], sb[1]]


def _pair_sum(f, ids, valid, offsets, m2, theta):
    """(sum over offsets and valid pairs of eq. 5, number of valid pairs) — both 0-d tensors, no host syncs."""
    total = f.new_zeros(())
    count = torch.zeros((), dtype=torch.long, device=f.device)
    for _, _, same, v, d in _offset_pairs(f, ids, valid, offsets):
        val, _ = _pair_value_and_grad(d, same, m2, theta, False)
        if v is None:
            total = total + val.sum()
            count = count + val.numel()
        else:
            total = total + (val * v).sum()
            count = count + v.sum()
    return total, count


class _PairLoss(torch.autograd.Function):
    """Sum over offsets of sum over valid pairs of eq. 5; saves only f and the ids (O(NHW) memory)."""

    @staticmethod
    def forward(ctx, f, ids, valid, offsets, m2, theta):
        total, count = _pair_sum(f, ids, valid, offsets, m2, theta)
        ctx.mark_non_differentiable(count)
        ctx.save_for_backward(f, ids, valid if valid is not None else torch.empty(0))
        ctx.has_valid = valid is not None
        ctx.offsets, ctx.m2, ctx.theta = offsets, m2, theta
        return total, count

    @staticmethod
    def backward(ctx, gout, _gcount=None):
        f, ids, valid = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        grad = torch.zeros_like(f)
        # Recomputed per offset rather than saved: keeps the memory O(NHW) instead of O(NHW x offsets).
        for sa, sb, same, v, d in _offset_pairs(f, ids, valid, ctx.offsets):
            _, g = _pair_value_and_grad(d, same, ctx.m2, ctx.theta, True)
            if v is not None:
                g = g * v
            grad[:, sa[0], sa[1]] += g
            grad[:, sb[0], sb[1]] -= g
        return grad * gout, None, None, None, None, None


def _prepare(pred: torch.Tensor, instance_ids: torch.Tensor, ignore: Ignore, foreground_only: bool):
    if pred.dim() == 4:
        if pred.shape[1] != 1:
            raise ValueError(f"pred must be (N, 1, H, W), got {tuple(pred.shape)}")
        f = pred[:, 0]
    elif pred.dim() == 3:
        f = pred
    else:
        raise ValueError(f"pred must be (N, 1, H, W) or (N, H, W), got {tuple(pred.shape)}")
    ids = instance_ids.reshape(f.shape).to(device=f.device)
    valid = _valid_mask(ids, ignore)
    if foreground_only:
        fgm = ids > 0
        valid = fgm if valid is None else valid & fgm
    return f, ids, valid


def permutation_invariant_loss(pred: torch.Tensor, instance_ids: torch.Tensor,
                               offsets: Optional[torch.Tensor] = None, m2: float = 1.0, theta: float = 0.1,
                               ignore: Ignore = None, foreground_only: bool = True, reduction: str = "mean",
                               memory_efficient: bool = True) -> torch.Tensor:
    """Eqs. 4-5 over the pixel pairs ``(p, p + o)`` for ``o`` in ``offsets`` (default :func:`pair_offsets`).

    ``pred`` ``(N, 1, H, W)`` float, ``instance_ids`` ``(N, H, W)`` int (0 = background). ``ignore``: an id value
    (e.g. 255) or an ``(N, H, W)`` bool mask (True = ignored); a pair with an ignored pixel is dropped.
    ``reduction``: "mean" (over all valid pairs of the batch; 0 when there are none) or "sum". Pass ``offsets``
    with one of each ``{o, -o}`` (as :func:`pair_offsets` does) to count each unordered pair once; the value only
    depends on whether ids are equal, so it is exactly invariant to any relabelling of the ids (of the positive ids
    when ``foreground_only``, since 0 is then special)."""
    if offsets is None:
        offsets = pair_offsets()
    offs = [(int(a), int(b)) for a, b in torch.as_tensor(offsets).reshape(-1, 2).tolist()]
    f, ids, valid = _prepare(pred, instance_ids, ignore, foreground_only)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if memory_efficient:
        total, count = _PairLoss.apply(f, ids, valid, offs, float(m2), float(theta))
    else:
        total, count = _pair_sum(f, ids, valid, offs, float(m2), float(theta))
    if reduction == "sum":
        return total
    return total / count.clamp_min(1).to(total.dtype)


def permutation_invariant_loss_naive(pred: torch.Tensor, instance_ids: torch.Tensor,
                                     offsets: Optional[torch.Tensor] = None, window: Optional[int] = None,
                                     m2: float = 1.0, theta: float = 0.1, ignore: Ignore = None,
                                     foreground_only: bool = True, reduction: str = "mean",
                                     anchor_rows: Optional[Sequence[int]] = None, chunk: int = 2_000_000
                                     ) -> torch.Tensor:
    """Reference (tests/benchmark only): explicit enumeration of pixel pairs. For every anchor pixel ``p`` (flat
    index) and every pixel ``q`` of the image with flat index ``> p`` (each unordered pair once), the pair is kept
    when ``q - p`` lies in the window (``max(|dy|, |dx|) <= (window - 1) // 2``; ``window=None``: no limit) and, if
    ``offsets`` is given, when ``q - p`` or ``p - q`` is one of them. Pairs are built as index arrays (chunks of
    anchors), gathered, and eqs. 4-5 evaluated with plain autograd. ``anchor_rows`` restricts anchors to those rows
    (for timing on a subset)."""
    f, ids, valid = _prepare(pred, instance_ids, ignore, foreground_only)
    N, H, W = f.shape
    P = H * W
    dev = f.device
    ff, fi = f.reshape(N, P), ids.reshape(N, P)
    fv = None if valid is None else valid.reshape(N, P)
    half = None if window is None else (window - 1) // 2
    allowed = None
    if offsets is not None:
        o = torch.as_tensor(offsets).reshape(-1, 2)
        o = torch.cat([o, -o])
        span_y, span_x = H, W
        allowed = torch.zeros(2 * span_y + 1, 2 * span_x + 1, dtype=torch.bool, device=dev)
        o = o[(o[:, 0].abs() <= span_y) & (o[:, 1].abs() <= span_x)]
        allowed[o[:, 0] + span_y, o[:, 1] + span_x] = True
    rows = range(H) if anchor_rows is None else anchor_rows
    anchors = torch.cat([torch.arange(r * W, (r + 1) * W, device=dev) for r in rows]) if len(rows) else \
        torch.zeros(0, dtype=torch.long, device=dev)
    q_all = torch.arange(P, device=dev)
    qy, qx = q_all // W, q_all % W
    step = max(1, chunk // P)
    total = f.new_zeros(())
    count = 0
    for i in range(0, anchors.numel(), step):
        p = anchors[i:i + step]
        dy = qy[None, :] - (p // W)[:, None]
        dx = qx[None, :] - (p % W)[:, None]
        keep = q_all[None, :] > p[:, None]
        if half is not None:
            keep &= (dy.abs() <= half) & (dx.abs() <= half)
        if allowed is not None:
            keep &= allowed[dy + H, dx + W]
        pi, qi = keep.nonzero(as_tuple=True)
        pi, qi = p[pi], qi
        d = ff[:, pi] - ff[:, qi]
        same = fi[:, pi] == fi[:, qi]
        val, _ = _pair_value_and_grad(d, same, m2, theta, False)
        if fv is not None:
            v = fv[:, pi] & fv[:, qi]
            val = val * v
            count += int(v.sum())
        else:
            count += val.numel()
        total = total + val.sum()
    if reduction == "sum":
        return total
    return total / max(count, 1)


def mumford_shah_cauchy(pred: torch.Tensor, weight: Optional[torch.Tensor] = None, c: float = 1.0) -> torch.Tensor:
    """Eq. 7: ``log(((f(x,y) - f(x,y+1))^2 + (f(x,y) - f(x+1,y))^2) / c^2 + 1)`` (paper: ``c = 1``), forward
    differences with zero difference past the last row/column, mean over pixels (weighted mean if ``weight``,
    broadcastable to ``pred``, is given). ``pred`` is ``(..., H, W)``."""
    gx = F.pad(pred[..., :, 1:] - pred[..., :, :-1], (0, 1))  # f(x, y+1) - f(x, y): along columns
    gy = F.pad(pred[..., 1:, :] - pred[..., :-1, :], (0, 0, 0, 1))
    per_pixel = torch.log1p((gx * gx + gy * gy) / (c * c))
    if weight is None:
        return per_pixel.mean()
    w = torch.broadcast_to(weight.to(per_pixel.dtype), per_pixel.shape)
    return (per_pixel * w).sum() / w.sum().clamp_min(1e-12)


def quantization_loss(pred: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``|f - round(f)|`` (distance to the nearest integer, in [0, 0.5]), mean over pixels (or over ``mask``)."""
    per_pixel = (pred - torch.round(pred).detach()).abs()
    if mask is None:
        return per_pixel.mean()
    m = torch.broadcast_to(mask.to(torch.bool), per_pixel.shape)
    return (per_pixel * m).sum() / m.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------- mean-shift


def mean_shift_1d(values: torch.Tensor, bandwidth: float, iters: int = 100, tol: float = 1e-4,
                  radius: Optional[float] = None, bin_size: Optional[float] = None, min_bin_freq: int = 1
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat-kernel mean-shift of 1-D ``values`` ``(P,)`` (sklearn's ``MeanShift`` mechanics with bin seeding).

    ``bandwidth`` is the kernel's full **width**: the window is ``[x - h, x + h]`` with ``h = radius`` (default
    ``bandwidth / 2``). Reading DVIS' bandwidth 0.9 as a width is what makes its argument hold ("because m2 is fixed
    to 1, bandwidth 0.9 separates objects"): two equal clusters 1 apart, read as a radius 0.9, have their strongest
    mode at their midpoint (the flat/Epanechnikov density is unimodal there) and merge; pass ``radius=bandwidth``
    for sklearn's reading.

    Seeds: centres of the occupied bins of width ``bin_size`` (default ``h / 4``) with at least ``min_bin_freq``
    values. Each seed ``x`` moves to the mean of the values in ``[x - h, x + h]``, computed exactly from the sorted
    values' prefix sums and two ``searchsorted`` (all seeds at once), until every seed moves less than ``tol * h``
    or ``iters`` iterations. Converged modes are merged greedily by support (a mode within ``h`` of a stronger kept
    one is dropped). Every value is then assigned to its nearest mode.

    Returns ``(labels (P,) long, modes (K,) sorted ascending)``, ``labels[i]`` indexing ``modes``."""
    v = values.reshape(-1)
    if v.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=v.device), v.new_zeros(0)
    work = v.double()
    h = float(radius) if radius is not None else float(bandwidth) / 2.0
    sv, _ = torch.sort(work)
    cs = torch.cat([work.new_zeros(1), torch.cumsum(sv, 0)])
    bs = float(bin_size) if bin_size is not None else h / 4.0
    b = torch.round(work / bs).long()
    b0 = b.min()
    counts = torch.bincount(b - b0)
    occupied = counts > 0
    sel = counts >= min_bin_freq
    if not bool(sel.any()):
        sel = occupied
    x = (torch.nonzero(sel).reshape(-1) + b0).to(work.dtype) * bs
    n = torch.ones_like(x)
    for _ in range(iters):
        lo = torch.searchsorted(sv, x - h, right=False)
        hi = torch.searchsorted(sv, x + h, right=True)
        n = (hi - lo).to(work.dtype)
        new = torch.where(n > 0, (cs[hi] - cs[lo]) / n.clamp_min(1), x)
        shift = (new - x).abs().max()
        x = new
        if float(shift) < tol * h:
            break
    lo = torch.searchsorted(sv, x - h, right=False)
    hi = torch.searchsorted(sv, x + h, right=True)
    support = (hi - lo).cpu().numpy()
    xs = x.cpu().numpy()
    order = np.lexsort((xs, -support))  # strongest first, ties by position (deterministic)
    kept: list = []
    for i in order:  # over modes (tens), not pixels
        if all(abs(xs[i] - k) >= h for k in kept):
            kept.append(xs[i])
    modes = torch.tensor(sorted(kept), dtype=work.dtype, device=v.device)
    mids = (modes[1:] + modes[:-1]) / 2
    labels = torch.searchsorted(mids, work.contiguous(), right=False)
    return labels, modes.to(v.dtype if v.is_floating_point() else torch.float64)


def mean_shift_1d_naive(values: torch.Tensor, bandwidth: float, iters: int = 100, tol: float = 1e-4,
                        radius: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference O(P^2)-per-iteration flat-kernel mean-shift: every value is a seed, every iteration compares every
    seed with every value (a dense ``(P, P)`` matrix); same kernel, merging and assignment as :func:`mean_shift_1d`."""
    v = values.reshape(-1).double()
    h = float(radius) if radius is not None else float(bandwidth) / 2.0
    x = v.clone()
    for _ in range(iters):
        w = ((x[:, None] - v[None, :]).abs() <= h).to(v.dtype)
        new = (w @ v) / w.sum(1)
        shift = (new - x).abs().max()
        x = new
        if float(shift) < tol * h:
            break
    support = ((x[:, None] - v[None, :]).abs() <= h).sum(1)
    ux, inv = torch.unique(torch.round(x / (tol * h)), return_inverse=True)
    sup = torch.zeros(ux.numel(), dtype=support.dtype).scatter_reduce(0, inv, support, "amax")
    xs = (ux * tol * h).numpy()
    order = np.lexsort((xs, -sup.numpy()))
    kept: list = []
    for i in order:
        if all(abs(xs[i] - k) >= h for k in kept):
            kept.append(xs[i])
    modes = torch.tensor(sorted(kept), dtype=torch.float64)
    labels = torch.searchsorted((modes[1:] + modes[:-1]) / 2, v, right=False)
    return labels, modes


# --------------------------------------------------------------------------------------------------- discretisation


def _relabel_and_filter(seg: torch.Tensor, min_size: int) -> torch.Tensor:
    """seg (H, W) long, 0 = background: drop segments < min_size pixels, renumber the rest 1..K (by first pixel
    in row-major order, deterministic)."""
    flat = seg.reshape(-1)
    if flat.numel() == 0:
        return seg.clone()
    K = int(flat.max()) + 1
    counts = torch.bincount(flat, minlength=K)
    keep = counts >= max(min_size, 1)
    keep[0] = False
    first = torch.full((K,), flat.numel(), dtype=torch.long, device=flat.device)
    first.scatter_reduce_(0, flat, torch.arange(flat.numel(), device=flat.device), "amin")
    first = torch.where(keep, first, torch.full_like(first, flat.numel() + 1))
    rank = torch.empty_like(first)
    rank[torch.argsort(first, stable=True)] = torch.arange(1, K + 1, device=flat.device)
    new = torch.where(keep, rank, torch.zeros_like(rank))
    return new[flat].reshape(seg.shape)


def _connected(seg: torch.Tensor) -> torch.Tensor:
    from scipy import ndimage

    s = seg.cpu().numpy()
    out = np.zeros_like(s)
    nxt = 1
    for k in np.unique(s):
        if k == 0:
            continue
        lab, n = ndimage.label(s == k, structure=np.ones((3, 3), bool))
        out[lab > 0] = lab[lab > 0] + nxt - 1
        nxt += n
    return torch.from_numpy(out).to(seg.device)


def discretize_candidates(label_map: torch.Tensor, bandwidths: Sequence[float] = (0.9, 0.4),
                          background_max: float = 0.5, min_size: int = 20) -> list:
    """The paper's literal Sec. 4: one instance-id map per bandwidth (mean-shift of the foreground values at each
    bandwidth independently), each size-filtered; the union of their segments is the candidate set."""
    f = torch.as_tensor(label_map).double()
    fg = f >= background_max
    out = []
    for bw in bandwidths:
        seg = torch.zeros(f.shape, dtype=torch.long, device=f.device)
        if fg.any():
            lab, _ = mean_shift_1d(f[fg], bw)
            seg[fg] = lab + 1
        out.append(_relabel_and_filter(seg, min_size))
    return out


def discretize(label_map: torch.Tensor, bandwidths: Sequence[float] = (0.9, 0.4), min_size: int = 20,
               background_max: float = 0.5, refine: bool = True, connected: bool = False) -> torch.Tensor:
    """Real-valued ``(H, W)`` label map -> ``(H, W)`` long instance ids (0 = background / dropped, 1..K).

    Pixels with ``f < background_max`` are background (the binary loss puts background at ``f <= 0`` and
    instances at ``f >= m1 = 2``; ids-as-values maps have instances at ``>= 1``). The rest are mean-shifted at
    ``bandwidths[0]``; with ``refine`` each resulting segment is mean-shifted again at each later bandwidth and
    split when that finds several modes. Optionally (``connected``) each segment is split into 8-connected
    components. Finally segments with fewer than ``min_size`` pixels are set to 0 and the rest renumbered 1..K in
    order of their first pixel (row-major)."""
    f = torch.as_tensor(label_map).double()
    fg = f >= background_max
    seg = torch.zeros(f.shape, dtype=torch.long, device=f.device)
    if fg.any():
        vals = f[fg]
        lab, _ = mean_shift_1d(vals, bandwidths[0])
        if refine:
            for bw in bandwidths[1:]:
                new = torch.zeros_like(lab)
                nxt = 0
                for k in torch.unique(lab).tolist():  # over segments, not pixels
                    sel = lab == k
                    sub, _ = mean_shift_1d(vals[sel], bw)
                    new[sel] = sub + nxt
                    nxt += int(sub.max()) + 1
                lab = new
        seg[fg] = lab + 1
    if connected:
        seg = _connected(seg)
    return _relabel_and_filter(seg, min_size)
