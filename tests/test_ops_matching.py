"""ops.matching: DMM-Net's differentiable matching layer (Alg. 1) against scipy's Hungarian solver, on real masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ops.matching import (
    batched_mask_iou,
    lp_objective,
    match,
    match_greedy,
    match_hungarian,
    match_pgd,
    matched_masks,
    matching_cost,
    pairwise_mask_iou,
    project_dykstra,
    row_assignment,
)

from tests.conftest import SHARED_DATA, require_shared_data  # noqa: E402

PEDMASKS = SHARED_DATA / "penn_fudan_ped" / "PedMasks"
DAVIS = SHARED_DATA / "davis2016_subset" / "Annotations" / "480p"


_need = require_shared_data


def _feasibility(X, rows=None, cols=None):
    """(max |row sum - 1| over valid rows, max column-sum excess over valid cols, min entry, max |padded entry|)."""
    b, n, m = X.shape
    rows = torch.ones(b, n, dtype=torch.bool) if rows is None else rows
    cols = torch.ones(b, m, dtype=torch.bool) if cols is None else cols
    valid = rows[:, :, None] & cols[:, None, :]
    row_err = (X.sum(-1) - 1).abs()[rows].max().item()
    col_exc = (X.sum(-2) - 1).clamp(min=0)[cols].max().item()
    pad = X[~valid].abs().max().item() if (~valid).any() else 0.0
    return row_err, col_exc, X.min().item(), pad


# ------------------------------------------------------------------------------------------- real-mask problems
def _perturb(mask: np.ndarray, rng: np.random.Generator, kind: int) -> np.ndarray:
    from scipy import ndimage

    if kind == 0:  # shift
        dy, dx = rng.integers(-12, 13, size=2)
        return np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
    if kind == 1:  # dilate
        return ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 8)))
    if kind == 2:  # erode
        return ndimage.binary_erosion(mask, iterations=int(rng.integers(1, 6)))
    if kind == 3:  # random pixel drop-out
        return mask & (rng.random(mask.shape) > rng.uniform(0.1, 0.5))
    dy, dx = rng.integers(-25, 26, size=2)  # large shift + dilation
    return ndimage.binary_dilation(np.roll(mask, (int(dy), int(dx)), axis=(0, 1)), iterations=3)


def _problem(gt: np.ndarray, sources: np.ndarray, rng: np.random.Generator, copies: int = 5):
    """Templates = ground-truth masks; proposals = `copies` perturbed copies of each source mask, shuffled.
    Returns (templates, proposals, source index of each proposal)."""
    props, src = [], []
    for s, mask in enumerate(sources):
        for k in range(copies):
            props.append(_perturb(mask, rng, k))
            src.append(s)
    order = rng.permutation(len(props))
    return gt, np.stack(props)[order], np.asarray(src)[order]


@pytest.fixture(scope="module")
def real_problems():
    """Penn-Fudan images with >= 2 pedestrians (half resolution; proposals perturb the same frame's instances) and
    DAVIS 2016 frames (quarter resolution; templates = blackswan + car-shadow masks at frame t pasted on one canvas
    as two instances, proposals perturb the masks of frame t + 2, i.e. propagated objects)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    problems = []
    for path in sorted(_need(PEDMASKS).glob("*_mask.png")):
        lab = np.asarray(Image.open(path))[::2, ::2]
        ids = [i for i in np.unique(lab) if i != 0]
        if len(ids) < 2:
            continue
        gt = np.stack([lab == i for i in ids])
        problems.append(_problem(gt, gt, rng))
    _need(DAVIS)
    seqs = ["blackswan", "car-shadow"]
    frames = sorted(p.name for p in (DAVIS / seqs[1]).glob("*.png"))
    for t in range(0, len(frames) - 2):
        cur = np.stack([np.asarray(Image.open(DAVIS / s / frames[t]))[::4, ::4] > 0 for s in seqs])
        nxt = np.stack([np.asarray(Image.open(DAVIS / s / frames[t + 2]))[::4, ::4] > 0 for s in seqs])
        problems.append(_problem(cur, nxt, rng))
    return problems


def test_real_problems_are_nontrivial(real_problems):
    rows = sum(len(t) for t, _, _ in real_problems)
    assert rows >= 200
    assert all(len(t) >= 2 for t, _, _ in real_problems)
    # IoUs come from ops.masks (RLE) and agree with a dense computation
    t, p, _ = real_problems[0]
    iou = pairwise_mask_iou(t, p)
    inter = (t[:, None] & p[None]).sum((-2, -1))
    union = (t[:, None] | p[None]).sum((-2, -1))
    np.testing.assert_allclose(iou, inter / np.maximum(union, 1), atol=1e-12)


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_pgd_argmax_matches_hungarian_on_real_masks(real_problems, lam):
    iou, rows, cols = batched_mask_iou([(t, p) for t, p, _ in real_problems], dtype=torch.float64)
    if lam == 1.0:
        cost = -iou  # eq. (1) with lam = 1
    else:  # eq. (1), lam = 0.3, random features: each proposal inherits its source instance's feature + noise
        g = torch.Generator().manual_seed(0)
        d = 32
        tf = torch.randn(iou.shape[0], iou.shape[1], d, generator=g, dtype=torch.float64)
        pf = torch.randn(iou.shape[0], iou.shape[2], d, generator=g, dtype=torch.float64)
        for b, (_, _, src) in enumerate(real_problems):
            pf[b, : len(src)] = tf[b, torch.from_numpy(src)] + 0.7 * pf[b, : len(src)]
        cost = matching_cost(tf, pf, iou, lam=lam)
    pad = ~(rows[:, :, None] & cols[:, None, :])
    cost = cost.masked_fill(pad, float("nan"))  # padded entries must never be read
    X = match_pgd(cost, mask_rows=rows, mask_cols=cols)  # defaults: N_grad 40, N_proj 5, lr 0.1
    H = match_hungarian(cost, rows, cols)
    assert torch.isfinite(X).all() and (X[pad] == 0).all()
    ours, opt = row_assignment(X, rows)[rows], row_assignment(H, rows)[rows]
    agreement = (ours == opt).double().mean().item()
    print(f"lam={lam}: PGD row argmax = Hungarian on {agreement:.2%} of {ours.numel()} rows")
    assert ours.numel() >= 200
    assert agreement >= 0.99
    # the exact optimum is a valid matching on the real data, and max-masking keeps exactly the argmax entries
    assert torch.equal(H.sum(-1)[rows], torch.ones(int(rows.sum()), dtype=H.dtype))
    Xm = match_pgd(cost, mask_rows=rows, mask_cols=cols, max_mask=True)
    assert torch.equal(row_assignment(Xm, rows), row_assignment(X, rows))
    assert ((Xm > 0).sum(-1)[rows] == 1).all()


# ----------------------------------------------------------------------------------------------- feasibility
def test_pgd_feasible_random_and_padded():
    g = torch.Generator().manual_seed(0)
    b, n, m = 6, 5, 12
    cost = -torch.rand(b, n, m, generator=g, dtype=torch.float64)
    rows = torch.ones(b, n, dtype=torch.bool)
    cols = torch.ones(b, m, dtype=torch.bool)
    sizes = [(5, 12), (3, 7), (1, 1), (4, 4), (2, 12), (5, 6)]
    for k, (nb, mb) in enumerate(sizes):
        rows[k, nb:] = False
        cols[k, torch.randperm(m, generator=g)[: m - mb]] = False  # non-contiguous column padding
    cost = cost.masked_fill(~(rows[:, :, None] & cols[:, None, :]), float("inf"))
    # near-exact inner projection: the averaged projected iterates are feasible
    X = match_pgd(cost, n_grad=40, n_proj=300, mask_rows=rows, mask_cols=cols)
    row_err, col_exc, xmin, pad = _feasibility(X, rows, cols)
    assert row_err < 1e-3 and col_exc < 1e-3 and xmin >= -1e-9 and pad == 0.0
    # each padded problem alone gives the same answer as inside the batch
    for k, (nb, mb) in enumerate(sizes):
        sub = cost[k : k + 1][:, rows[k]][:, :, cols[k]]
        alone = match_pgd(sub, n_grad=40, n_proj=300)
        torch.testing.assert_close(X[k][rows[k]][:, cols[k]], alone[0], atol=1e-10, rtol=0)
    # paper defaults (N_proj = 5): only approximately feasible; X >= 0 exactly (ReLU is the last projection)
    X5 = match_pgd(cost, mask_rows=rows, mask_cols=cols)
    row_err5, col_exc5, xmin5, pad5 = _feasibility(X5, rows, cols)
    assert xmin5 >= 0 and pad5 == 0.0 and row_err5 < 0.5 and col_exc5 < 0.5


def test_project_dykstra_is_the_projection():
    g = torch.Generator().manual_seed(1)
    Y = 0.5 * torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    P = project_dykstra(Y, n_proj=2000)
    row_err, col_exc, xmin, _ = _feasibility(P)
    assert row_err < 1e-9 and col_exc < 1e-9 and xmin >= 0
    # optimality (variational inequality): <Y - P, Z - P> <= 0 for feasible Z (vertices = partial permutations)
    for _ in range(50):
        Z = torch.zeros_like(Y)
        for b in range(3):
            Z[b, torch.arange(4), torch.randperm(9, generator=g)[:4]] = 1.0
        assert (((Y - P) * (Z - P)).sum((-2, -1)) <= 1e-7).all()
    # a feasible point is a fixed point
    Z = torch.zeros(1, 3, 5, dtype=torch.float64)
    Z[0, [0, 1, 2], [4, 0, 2]] = 1
    torch.testing.assert_close(project_dykstra(Z, n_proj=3), Z)


def test_pgd_converges_to_lp_optimum():
    g = torch.Generator().manual_seed(2)
    cost = -torch.rand(16, 4, 10, generator=g, dtype=torch.float64)
    H = match_hungarian(cost)
    X = match_pgd(cost, n_grad=400, n_proj=50, lr=0.5)
    gap = (lp_objective(cost, X) - lp_objective(cost, H)) / lp_objective(cost, H).abs()
    assert gap.abs().max().item() < 0.02
    assert (row_assignment(X) == row_assignment(H)).double().mean().item() >= 0.95


# -------------------------------------------------------------------- the reference code's defect (NOTES.md)
def _defective_pgd(cost, n_grad=40, n_proj=5, lr=0.1):
    """The released reference code's variant (test-only): Dykstra corrections q1..q3 are NOT reset between outer
    steps and the returned average is over the PRE-projection iterates X^{i-1} - lr * C."""
    b, n, m = cost.shape
    x = torch.full_like(cost, 1.0 / m)
    q1, q2, q3 = torch.zeros_like(cost), torch.zeros_like(cost), torch.zeros_like(cost)
    total = torch.zeros_like(cost)
    for _ in range(n_grad):
        x = x - lr * cost
        total = total + x
        y = x
        for _ in range(n_proj):
            z = y + q1
            y1 = z - (z.sum(-1, keepdim=True) - 1) / m
            q1 = z - y1
            z = y1 + q2
            y2 = z - F.relu(z.sum(-2, keepdim=True) - 1) / n
            q2 = z - y2
            z = y2 + q3
            y = F.relu(z)
            q3 = z - y
        x = y
    return total / n_grad


# A 3x3 cost with a unique optimum (rows -> columns 1, 2, 0; the next permutation costs 0.2 more), found by a seeded
# search over random 3x3 costs on a 0.05 grid for a case where the reference code's variant deviates.
DEFECT_3X3 = [[-0.15, -0.9, -0.5], [-0.4, -0.2, -0.7], [-0.3, -0.8, -0.15]]


def test_defective_variant_deviates_on_3x3():
    cost = torch.tensor(DEFECT_3X3, dtype=torch.float64)[None]
    H = match_hungarian(cost)
    assert row_assignment(H).tolist() == [[1, 2, 0]]
    opt = lp_objective(cost, H).item()
    # paper settings (N_grad 40, N_proj 5, lr 0.1): the defective variant's row argmax misses the optimum; ours not
    X = match_pgd(cost)
    D = _defective_pgd(cost)
    assert torch.equal(row_assignment(X), row_assignment(H))
    assert not torch.equal(row_assignment(D), row_assignment(H))
    for kw in ({}, {"n_grad": 200, "n_proj": 50}, {"n_grad": 400, "n_proj": 50, "lr": 0.5}):
        X = match_pgd(cost, **kw)
        D = _defective_pgd(cost, **kw)
        dist_ours = (X - H).norm().item()  # distance to the LP optimum X* (= the permutation: unique optimum)
        dist_defect = (D - H).norm().item()
        gap_ours = abs(lp_objective(cost, X).item() - opt)
        print(kw, f"|X-X*| ours {dist_ours:.3f} defective {dist_defect:.3f}; ours gap {gap_ours:.4f};"
              f" feasibility ours {_feasibility(X)[:2]} defective {_feasibility(D)[:2]}")
        assert dist_ours < dist_defect, kw
        if kw:  # near-exact projections: our averaged iterates are feasible, the defective average is not
            assert _feasibility(X)[0] < 1e-3 and _feasibility(X)[1] < 1e-3
            assert _feasibility(D)[0] > 0.05


# -------------------------------------------------------------------------------------------------- gradient
def test_gradcheck_pgd_wrt_cost():
    g = torch.Generator().manual_seed(3)
    cost = (-torch.rand(2, 2, 4, generator=g, dtype=torch.float64)).requires_grad_()
    rows = torch.tensor([[True, True], [True, False]])
    cols = torch.tensor([[True, True, True, True], [True, True, True, False]])
    fn = lambda c: match_pgd(c, n_grad=3, n_proj=2, lr=0.5, mask_rows=rows, mask_cols=cols)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (cost,), eps=1e-6, atol=1e-5)
    fn_max = lambda c: match_pgd(c, n_grad=3, n_proj=2, lr=0.5, max_mask=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn_max, (cost,), eps=1e-6, atol=1e-5)
    # end to end: features -> eq. (1) -> PGD -> eq. (8) masks
    tf = torch.randn(1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    pf = torch.randn(1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    iou = torch.rand(1, 2, 4, generator=g, dtype=torch.float64)
    props = torch.rand(1, 4, 3, 3, generator=g, dtype=torch.float64)

    def fn_e2e(a, b):
        return matched_masks(match_pgd(matching_cost(a, b, iou), n_grad=3, n_proj=2, lr=0.5), props)

    assert torch.autograd.gradcheck(fn_e2e, (tf, pf), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------- baselines
def test_greedy_not_better_than_hungarian():
    g = torch.Generator().manual_seed(4)
    cost = -torch.rand(200, 5, 9, generator=g, dtype=torch.float64)
    H, G = match_hungarian(cost), match_greedy(cost)
    for A in (H, G):
        assert set(A.unique().tolist()) <= {0.0, 1.0}
        assert (A.sum(-1) == 1).all() and (A.sum(-2) <= 1).all()
    oh, og = lp_objective(cost, H), lp_objective(cost, G)
    assert (oh <= og + 1e-12).all()
    assert (oh < og - 1e-9).any()  # greedy is strictly suboptimal somewhere
    # a known case: greedy takes the global minimum 0 and pays 10 for the other row; optimum is 1 + 1
    c = torch.tensor([[[0.0, 1.0], [1.0, 10.0]]])
    assert lp_objective(c, match_greedy(c)).item() == 10.0
    assert lp_objective(c, match_hungarian(c)).item() == 2.0
    # the dispatcher, with padding and PGD-only keywords ignored by the baselines
    rows = torch.tensor([[True, False]])
    cols = torch.tensor([[False, True]])
    for method in ("hungarian", "greedy", "pgd"):
        X = match(c, method=method, mask_rows=rows, mask_cols=cols, n_grad=10)
        assert X[0, 0, 1].item() == pytest.approx(1.0, abs=1e-6) and X.sum().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        match(c, method="sinkhorn")
    with pytest.raises(ValueError):  # tall problem: the LP (eq. 3) is infeasible
        match_pgd(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError):
        match_hungarian(torch.zeros(1, 2, 2), mask_rows=torch.ones(1, 2, dtype=torch.bool),
                        mask_cols=torch.tensor([[True, False]]))


# ------------------------------------------------------------------------------------------- cost and masks
def test_matching_cost_eq1():
    tf = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    pf = torch.tensor([[[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]]])
    iou = torch.tensor([[[0.5, 0.2, 0.0], [0.0, 0.4, 1.0]]])
    c = matching_cost(tf, pf, iou, lam=0.3)
    s = 2 ** -0.5
    cos = torch.tensor([[[1.0, s, 0.0], [0.0, s, -1.0]]])
    torch.testing.assert_close(c, -0.7 * cos - 0.3 * iou)
    torch.testing.assert_close(matching_cost(tf, pf, iou, lam=1.0), -iou)
    assert c[0, 0, 0] < c[0, 0, 2]  # the better match costs less
    with pytest.raises(ValueError):
        matching_cost(tf, pf, iou, lam=1.5)


def test_matched_masks_eq8():
    g = torch.Generator().manual_seed(5)
    props = (torch.rand(2, 4, 6, 7, generator=g) > 0.5).to(torch.uint8)
    X = torch.zeros(2, 3, 4)
    X[0, [0, 1, 2], [2, 0, 3]] = 1
    X[1, [0, 1, 2], [1, 3, 0]] = 1
    out = matched_masks(X, props)
    assert out.shape == (2, 3, 6, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], props[0, [2, 0, 3]].float())
    torch.testing.assert_close(out[1], props[1, [1, 3, 0]].float())
    W = torch.rand(2, 3, 4, generator=g)
    torch.testing.assert_close(matched_masks(W, props)[1, 2], (W[1, 2, :, None, None] * props[1].float()).sum(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(6)
    cost = -torch.rand(8, 4, 11, generator=g)
    rows = torch.rand(8, 4, generator=g) > 0.2
    cols = torch.ones(8, 11, dtype=torch.bool)
    X = match_pgd(cost, mask_rows=rows, mask_cols=cols)
    Xc = match_pgd(cost.cuda(), mask_rows=rows.cuda(), mask_cols=cols.cuda())
    torch.testing.assert_close(Xc.cpu(), X, atol=1e-5, rtol=0)
    assert torch.equal(match_greedy(cost.cuda(), rows.cuda(), cols.cuda()).cpu(), match_greedy(cost, rows, cols))
    assert torch.equal(match_hungarian(cost.cuda(), rows.cuda(), cols.cuda()).cpu(), match_hungarian(cost, rows, cols))
