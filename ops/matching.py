"""Differentiable template-to-proposal mask matching (DMM-Net, Zeng et al., ICCV 2019, section 3) and baselines.

Shapes and conventions
----------------------
* Everything is batched: ``cost`` is ``(B, n, m)`` — ``n`` templates (rows) against ``m`` proposals (columns).
  Problems of different ``(n_b, m_b)`` share one padded tensor; ``mask_rows`` ``(B, n)`` / ``mask_cols`` ``(B, m)``
  (bool, ``True`` = real) say which rows/columns exist. Padded rows/columns take part in no constraint, their cost
  values are never read (they may be ``inf``/``nan``) and every returned assignment is exactly 0 there.
* **Sign convention: lower cost = better match.** :func:`matching_cost` is eq. (1),
  ``C_ij = (lam - 1) * cos(f(p_j), f(r_i)) - lam * IoU(p_j, r_i)``, in ``[-1, 1 - lam]``; a perfect match (cos = 1,
  IoU = 1) costs ``-1``. ``lam = 1`` gives ``-IoU``.
* An assignment ``X`` is ``(B, n, m)``; the matching problem is the LP relaxation (eq. 3)
  ``min Tr(C X^T)  s.t.  X 1_m = 1_n,  X^T 1_n <= 1_m,  X >= 0``, which needs ``n_b <= m_b`` (wide matrices) to be
  feasible; every solver here raises ``ValueError`` otherwise.

Solvers (same call signature, dispatched by :func:`match`)
----------------------------------------------------------
* :func:`match_pgd` — Algorithm 1: projected gradient descent, each projection done by ``n_proj`` cycles of Dykstra's
  algorithm over C1 (row sums = 1, eq. 5), C2 (column sums <= 1, eq. 6, each column corrected only where its sum
  exceeds 1) and C3 (``X >= 0``, ReLU, eq. 7). The Dykstra corrections ``q1, q2, q3`` are **reset to 0 at every outer
  step** (Alg. 1 line 5) and the output is the mean of the **projected** iterates ``X^1..X^N`` (line 12) — unlike
  the released reference code (see ``/work/shared/NOTES.md``). ``X^0`` is uniform, ``1 / m_b`` on valid entries
  (feasible whenever ``n_b <= m_b``). Fully differentiable w.r.t. ``cost`` (and ``x0``); batched, CPU or GPU; the
  only Python loops are over the ``n_grad`` x ``n_proj`` iterations.
* :func:`match_hungarian` — exact optimum via ``scipy.optimize.linear_sum_assignment`` per problem (a 0/1 tensor,
  no gradient).
* :func:`match_greedy` — repeatedly take the global minimum among unused rows/columns (one vectorised step per
  assigned row over the whole batch; a 0/1 tensor, no gradient).

Helpers: :func:`matched_masks` (eq. 8), :func:`lp_objective` (``Tr(C X^T)`` per problem), :func:`row_assignment`
(row argmax, ``-1`` for padded rows), :func:`pairwise_mask_iou` (template x proposal IoU via :mod:`ops.masks`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ops.masks import encode_masks, mask_iou

__all__ = [
    "matching_cost",
    "project_dykstra",
    "match_pgd",
    "match_hungarian",
    "match_greedy",
    "match",
    "matched_masks",
    "lp_objective",
    "row_assignment",
    "pairwise_mask_iou",
    "batched_mask_iou",
]

_PGD_ONLY = {"n_grad", "n_proj", "lr", "max_mask", "x0"}


# ----------------------------------------------------------------------------------------------------------- cost
def matching_cost(
    template_feats: torch.Tensor, proposal_feats: torch.Tensor, iou: torch.Tensor, lam: float = 0.3
) -> torch.Tensor:
    """Eq. (1): ``C[b, i, j] = (lam - 1) * cos(f(p_j), f(r_i)) - lam * IoU(p_j, r_i)``; lower = better match.

    ``template_feats`` ``(B, n, D)``, ``proposal_feats`` ``(B, m, D)``, ``iou`` ``(B, n, m)`` (templates x
    proposals, in [0, 1]). ``0 <= lam <= 1`` (the paper uses 0.3 on DAVIS/YouTube-VOS, 0.9 on SegTrack v2;
    ``lam = 1`` is pure ``-IoU``). Differentiable w.r.t. the features (and ``iou`` if it carries a gradient).
    Zero feature vectors have cosine 0 (norms clamped at 1e-8).
    """
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if template_feats.ndim != 3 or proposal_feats.ndim != 3 or iou.ndim != 3:
        raise ValueError("matching_cost expects (B, n, D), (B, m, D) and (B, n, m) tensors")
    t = F.normalize(template_feats, dim=-1, eps=1e-8)
    p = F.normalize(proposal_feats, dim=-1, eps=1e-8)
    cos = torch.einsum("bnd,bmd->bnm", t, p)
    if iou.shape != cos.shape:
        raise ValueError(f"iou has shape {tuple(iou.shape)}, expected {tuple(cos.shape)}")
    return (lam - 1.0) * cos - lam * iou.to(cos.dtype)


def pairwise_mask_iou(templates: Any, proposals: Any) -> np.ndarray:
    """``(n, m)`` float64 IoU of ``n`` template masks against ``m`` proposal masks (both ``(N, H, W)`` binary), via
    the RLE path of :mod:`ops.masks` (``encode_masks`` + ``mask_iou``). Not differentiable."""
    t_rles = encode_masks(templates)
    p_rles = encode_masks(proposals)
    return mask_iou(t_rles, p_rles).reshape(len(t_rles), len(p_rles))


def batched_mask_iou(
    pairs: Sequence[tuple[Any, Any]], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad per-problem IoU matrices into one batch: ``pairs`` is ``[(templates_b, proposals_b), ...]``; returns
    ``(iou (B, n_max, m_max), mask_rows (B, n_max), mask_cols (B, m_max))`` with zeros in the padding."""
    mats = [pairwise_mask_iou(t, p) for t, p in pairs]
    b = len(mats)
    n = max((x.shape[0] for x in mats), default=0)
    m = max((x.shape[1] for x in mats), default=0)
    iou = torch.zeros(b, n, m, dtype=dtype)
    rows = torch.zeros(b, n, dtype=torch.bool)
    cols = torch.zeros(b, m, dtype=torch.bool)
    for k, x in enumerate(mats):
        iou[k, : x.shape[0], : x.shape[1]] = torch.from_numpy(x).to(dtype)
        rows[k, : x.shape[0]] = True
        cols[k, : x.shape[1]] = True
    return iou, rows, cols


# ------------------------------------------------------------------------------------------------------- masking
def _validity(
    shape: torch.Size, device: torch.device, mask_rows: torch.Tensor | None, mask_cols: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid (B, n, m) bool, n_b (B,), m_b (B,)) from optional row/column masks; raises if any n_b > m_b."""
    if len(shape) != 3:
        raise ValueError(f"cost / X must be (B, n, m), got shape {tuple(shape)}")
    b, n, m = shape
    rows = torch.ones(b, n, dtype=torch.bool, device=device) if mask_rows is None else mask_rows.to(device).bool()
    cols = torch.ones(b, m, dtype=torch.bool, device=device) if mask_cols is None else mask_cols.to(device).bool()
    if rows.shape != (b, n) or cols.shape != (b, m):
        raise ValueError(
            f"mask_rows {tuple(rows.shape)} / mask_cols {tuple(cols.shape)} do not fit cost {tuple(shape)}"
        )
    n_b = rows.sum(-1)
    m_b = cols.sum(-1)
    if mask_rows is None and mask_cols is None:
        if n > m:
            raise ValueError(f"the matching LP needs n <= m (a wide cost matrix), got n={n}, m={m}")
    elif bool((n_b > m_b).any()):
        bad = torch.nonzero(n_b > m_b).flatten().tolist()
        raise ValueError(f"the matching LP needs n_b <= m_b; problems {bad} have more valid rows than columns")
    valid = rows[:, :, None] & cols[:, None, :]
    return valid, n_b, m_b


# ---------------------------------------------------------------------------------------------------- projection
def _project(
    y: torch.Tensor, v: torch.Tensor, inv_n: torch.Tensor, inv_m: torch.Tensor, n_proj: int
) -> torch.Tensor:
    """Dykstra's cyclic projection of ``y`` onto C1 ∩ C2 ∩ C3 restricted to the valid entries ``v`` (float 0/1).
    Fresh corrections (q = 0) at every call; ``y`` must be 0 on invalid entries (it stays so). Each cycle starts
    from the previous cycle's ``Y3`` (Alg. 1's line 10, blank in the paper's text, read as ``Y0 = Y3``: standard
    Dykstra)."""
    q1 = torch.zeros_like(y)
    q2 = torch.zeros_like(y)
    q3 = torch.zeros_like(y)
    for _ in range(n_proj):
        # C1, eq. (5): X - (1/m)(X 1 - 1) 1^T over the valid columns of each valid row
        z = y + q1
        y1 = z - v * (((z * v).sum(-1, keepdim=True) - 1.0) * inv_m)
        q1 = z - y1
        # C2, eq. (6), per column: subtract (1/n)(1^T X - 1) only from columns whose sum exceeds 1
        z = y1 + q2
        y2 = z - v * (F.relu((z * v).sum(-2, keepdim=True) - 1.0) * inv_n)
        q2 = z - y2
        # C3, eq. (7): ReLU (invalid entries are 0 in z, hence stay 0)
        z = y2 + q3
        y = F.relu(z)
        q3 = z - y
    return y


def project_dykstra(
    X: torch.Tensor,
    n_proj: int = 5,
    row_mask: torch.Tensor | None = None,
    col_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate Euclidean projection of ``X`` ``(B, n, m)`` onto {X 1 = 1, X^T 1 <= 1, X >= 0} (valid entries only)
    by ``n_proj`` Dykstra cycles P1 -> P2 -> P3 (eqs. 5-7) with corrections starting at 0. Padded entries come back
    as 0. Differentiable (piecewise linear)."""
    if n_proj < 1:
        raise ValueError("n_proj must be >= 1")
    valid, n_b, m_b = _validity(X.shape, X.device, row_mask, col_mask)
    v = valid.to(X.dtype)
    inv_n = (1.0 / n_b.clamp(min=1).to(X.dtype))[:, None, None]
    inv_m = (1.0 / m_b.clamp(min=1).to(X.dtype))[:, None, None]
    y = torch.where(valid, X, torch.zeros((), dtype=X.dtype, device=X.device))
    return _project(y, v, inv_n, inv_m, n_proj) * v


# ------------------------------------------------------------------------------------------------------- solvers
def _max_mask(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sec. 4.1 masking ``X~ = X^ * 1[X^ = row max]`` (the indicator carries no gradient; the kept values do)."""
    keep = (x == x.max(dim=-1, keepdim=True).values) & (v > 0)
    return x * keep.to(x.dtype)


def match_pgd(
    cost: torch.Tensor,
    n_grad: int = 40,
    n_proj: int = 5,
    lr: float = 0.1,
    mask_rows: torch.Tensor | None = None,
    mask_cols: torch.Tensor | None = None,
    max_mask: bool = False,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Algorithm 1 (defaults: N_grad = 40, N_proj = 5, alpha = 0.1, as in sec. 4.1).

    ``X^0 = x0`` or, by default, ``1 / m_b`` on every valid entry. For ``i = 1..n_grad``:
    ``X^i = Proj(X^{i-1} - lr * C)`` with :func:`project_dykstra` (``n_proj`` cycles, corrections reset each ``i``).
    Returns ``X^ = mean(X^1..X^n_grad)`` ``(B, n, m)`` (the projected iterates; ``X^0`` is not included), or with
    ``max_mask=True`` ``X^ * 1[X^ = row max]``. Padded rows/columns are 0. Differentiable w.r.t. ``cost``/``x0``.
    Feasibility of the output is approximate (within the Dykstra error after ``n_proj`` cycles).
    """
    if n_grad < 1 or n_proj < 1:
        raise ValueError("n_grad and n_proj must be >= 1")
    if not cost.is_floating_point():
        raise TypeError("cost must be a floating-point tensor")
    valid, n_b, m_b = _validity(cost.shape, cost.device, mask_rows, mask_cols)
    zero = torch.zeros((), dtype=cost.dtype, device=cost.device)
    v = valid.to(cost.dtype)
    inv_n = (1.0 / n_b.clamp(min=1).to(cost.dtype))[:, None, None]
    inv_m = (1.0 / m_b.clamp(min=1).to(cost.dtype))[:, None, None]
    step = lr * torch.where(valid, cost, zero)  # padded cost entries (possibly inf/nan) are never read
    if x0 is None:
        x = v * inv_m
    else:
        if x0.shape != cost.shape:
            raise ValueError(f"x0 has shape {tuple(x0.shape)}, expected {tuple(cost.shape)}")
        x = torch.where(valid, x0.to(cost.dtype), zero)
    total = torch.zeros_like(x)
    for _ in range(n_grad):
        x = _project(x - step, v, inv_n, inv_m, n_proj)
        total = total + x
    out = total * (v / n_grad)
    return _max_mask(out, v) if max_mask else out


def match_hungarian(
    cost: torch.Tensor, mask_rows: torch.Tensor | None = None, mask_cols: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact solution of eq. (2) per problem with ``scipy.optimize.linear_sum_assignment`` on the valid sub-matrix
    (wide, ``n_b <= m_b``: every valid row gets one distinct column). Returns a 0/1 tensor like ``cost``, no grad."""
    from scipy.optimize import linear_sum_assignment

    valid, _, _ = _validity(cost.shape, cost.device, mask_rows, mask_cols)
    c = cost.detach().to("cpu", torch.float64).numpy()
    rows_v = valid.any(-1).cpu().numpy()
    cols_v = valid.any(-2).cpu().numpy()
    out = np.zeros(c.shape, dtype=np.float64)
    for b in range(c.shape[0]):
        ri = np.flatnonzero(rows_v[b])
        ci = np.flatnonzero(cols_v[b])
        if ri.size == 0:
            continue
        r, k = linear_sum_assignment(c[b][np.ix_(ri, ci)])
        out[b, ri[r], ci[k]] = 1.0
    return torch.from_numpy(out).to(device=cost.device, dtype=cost.dtype)


def match_greedy(
    cost: torch.Tensor, mask_rows: torch.Tensor | None = None, mask_cols: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy matching: repeatedly take the smallest cost among unused rows and columns (ties: lowest flat index).
    One vectorised step over the whole batch per assigned row (``n`` steps). Returns a 0/1 tensor, no grad."""
    valid, _, _ = _validity(cost.shape, cost.device, mask_rows, mask_cols)
    b, n, m = cost.shape
    fin = torch.finfo(cost.dtype)
    inf = torch.tensor(float("inf"), dtype=cost.dtype, device=cost.device)
    # valid entries stay finite (nan / +inf -> dtype max, -inf -> dtype min) so that "+inf" alone marks used/padded
    c = torch.nan_to_num(cost.detach().clone(), nan=fin.max, posinf=fin.max, neginf=fin.min)
    c = torch.where(valid, c, inf)
    out = torch.zeros_like(c)
    ar = torch.arange(b, device=cost.device)
    for _ in range(min(n, m)):
        flat = c.flatten(1)
        val, idx = flat.min(-1)
        ok = torch.isfinite(val)
        i = idx // m
        j = idx % m
        out[ar[ok], i[ok], j[ok]] = 1.0
        c[ar[ok], i[ok], :] = inf
        c[ar[ok], :, j[ok]] = inf
    return out


def match(cost: torch.Tensor, method: str = "pgd", **kw: Any) -> torch.Tensor:
    """Dispatch to :func:`match_pgd` (``"pgd"``), :func:`match_hungarian` (``"hungarian"``) or
    :func:`match_greedy` (``"greedy"``). PGD-only keywords (``n_grad, n_proj, lr, max_mask, x0``) are ignored by the
    baselines, so one config can switch method; other unknown keywords raise ``TypeError``."""
    if method == "pgd":
        return match_pgd(cost, **kw)
    solvers = {"hungarian": match_hungarian, "greedy": match_greedy}
    if method not in solvers:
        raise ValueError(f"unknown matching method {method!r}; expected 'pgd', 'hungarian' or 'greedy'")
    base = {k: val for k, val in kw.items() if k not in _PGD_ONLY}
    return solvers[method](cost, **base)


# ------------------------------------------------------------------------------------------------------- helpers
def matched_masks(X: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """Eq. (8): contract ``X`` ``(B, n, m)`` with ``proposals`` ``(B, m, H, W)`` over ``m`` -> ``(B, n, H, W)``
    (``P^[b, i] = sum_j X[b, i, j] * P~[b, j]``). Proposals are cast to ``X``'s dtype; differentiable in both."""
    if X.ndim != 3 or proposals.ndim != 4 or X.shape[0] != proposals.shape[0] or X.shape[2] != proposals.shape[1]:
        raise ValueError(
            f"matched_masks expects (B, n, m) and (B, m, H, W), got {tuple(X.shape)}, {tuple(proposals.shape)}"
        )
    return torch.einsum("bnm,bmhw->bnhw", X, proposals.to(X.dtype))


def lp_objective(
    cost: torch.Tensor,
    X: torch.Tensor,
    mask_rows: torch.Tensor | None = None,
    mask_cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Tr(C X^T) = sum_ij C_ij X_ij`` per problem, ``(B,)``; padded entries (given by the masks) contribute 0."""
    if cost.shape != X.shape:
        raise ValueError(f"cost {tuple(cost.shape)} and X {tuple(X.shape)} differ")
    if mask_rows is None and mask_cols is None:
        return (cost * X).sum((-2, -1))
    b, n, m = cost.shape
    rows = torch.ones(b, n, dtype=torch.bool, device=cost.device) if mask_rows is None else mask_rows.bool()
    cols = torch.ones(b, m, dtype=torch.bool, device=cost.device) if mask_cols is None else mask_cols.bool()
    valid = rows[:, :, None] & cols[:, None, :]
    zero = torch.zeros((), dtype=cost.dtype, device=cost.device)
    return torch.where(valid, cost * X, zero).sum((-2, -1))


def row_assignment(X: torch.Tensor, mask_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, n)`` int64 column index of each row's maximum (the hard assignment read off a relaxed ``X``), ``-1`` for
    padded rows (``mask_rows`` False) and for all-zero rows."""
    idx = X.argmax(-1)
    keep = X.amax(-1) > 0
    if mask_rows is not None:
        keep = keep & mask_rows.bool()
    return torch.where(keep, idx, torch.full_like(idx, -1))
