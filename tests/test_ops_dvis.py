"""ops.dvis: DVIS losses (huber, eq. 3, eqs. 4-5, eq. 7, quantization) and mean-shift discretisation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ops.dvis import (
    binary_loss,
    discretize,
    discretize_candidates,
    huber,
    mean_shift_1d,
    mean_shift_1d_naive,
    mumford_shah_cauchy,
    pair_offsets,
    permutation_invariant_loss,
    permutation_invariant_loss_naive,
    quantization_loss,
)
from tests.conftest import SHARED_DATA as DATA, require_shared_data
PED_MASKS = DATA / "penn_fudan_ped" / "PedMasks"


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors on a shared machine: one intra-op thread is faster and steadier; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _random_ids(n, h, w, k, seed=0):
    return torch.randint(0, k, (n, h, w), generator=_gen(seed))


def _blocky_ids(n, h, w, k, block=4, seed=0):
    """Piecewise-constant ids (blocks), so pairs mix same and different ids at every offset."""
    small = torch.randint(0, k, (n, 1, (h + block - 1) // block, (w + block - 1) // block), generator=_gen(seed))
    return torch.repeat_interleave(torch.repeat_interleave(small, block, 2), block, 3)[:, 0, :h, :w]


# ----------------------------------------------------------------------------------------------------- huber


def test_huber_hand_values():
    x = torch.tensor([0.0, 0.05, -0.05, 0.1, 0.5, -2.0, 1.0], dtype=torch.float64)
    # v^2/(2*0.1) below 0.1, |v| - 0.05 above
    expected = torch.tensor([0.0, 0.0125, 0.0125, 0.05, 0.45, 1.95, 0.95], dtype=torch.float64)
    torch.testing.assert_close(huber(x), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(huber(torch.tensor([0.3]), theta=1.0), torch.tensor([0.045]))


# ----------------------------------------------------------------------------------------------------- binary


def test_binary_loss_zero_for_perfect_and_hand_value_otherwise():
    fg = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    fg[..., 1:3, 1:3] = True
    perfect = torch.where(fg, torch.tensor(2.5), torch.tensor(-1.0))
    assert binary_loss(perfect, fg).item() == 0.0
    assert binary_loss(torch.where(fg, torch.tensor(2.0), torch.tensor(0.0)), fg).item() == 0.0  # boundaries
    # 4 fg pixels at 1.95 -> huber(0.05) = 0.0125 each; 12 bg pixels at 0.5 -> huber(0.5) = 0.45 each
    pred = torch.where(fg, torch.tensor(1.95, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    assert binary_loss(pred, fg).item() == pytest.approx((4 * 0.0125 + 12 * 0.45) / 16, abs=1e-12)
    # ignore mask excludes pixels from sum and mean
    ign = ~fg
    assert binary_loss(pred, fg, ignore=ign).item() == pytest.approx(0.0125, abs=1e-12)


# ----------------------------------------------------------------------------------------------------- offsets


def test_pair_offsets_default_stratified_set():
    o = pair_offsets()
    assert o.dtype == torch.long and o.shape == (284, 2)
    s = {tuple(t) for t in o.tolist()}
    assert len(s) == len(o)  # no duplicates
    assert (0, 0) not in s
    assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in s)  # one of each {o, -o}
    assert all(max(abs(dy), abs(dx)) <= 64 for dy, dx in s)
    # all of the dense 17x17 core (half of it) ...
    core = {(dy, dx) for dy in range(-8, 9) for dx in range(-8, 9) if dy > 0 or (dy == 0 and dx > 0)}
    assert core <= s
    # ... and beyond it only the dilation-8 grid, all of it out to the window
    grid = {(dy, dx) for dy in range(-64, 65, 8) for dx in range(-64, 65, 8) if dy > 0 or (dy == 0 and dx > 0)}
    assert s - core == grid - core
    assert o.tolist() == sorted(o.tolist())  # deterministic, lexicographic
    sym = pair_offsets(symmetric=True)
    ss = {tuple(t) for t in sym.tolist()}
    assert len(ss) == 568 == len(sym)
    assert ss == s | {(-dy, -dx) for dy, dx in s}
    assert torch.equal(pair_offsets(), o)
    # euclidean core: 4-neighbourhood for radius 1
    e = pair_offsets(window=3, dense_radius=1, dilation=0, norm="euclidean")
    assert e.tolist() == [[0, 1], [1, 0]]


# ----------------------------------------------------------------------------------------------------- pair loss


def test_pi_loss_exactly_invariant_to_id_permutation():
    ids = _blocky_ids(2, 20, 20, 6, block=3, seed=1)
    f = torch.randn(2, 1, 20, 20, generator=_gen(2), dtype=torch.float64) * 2
    off = pair_offsets(window=17, dense_radius=3, dilation=4)
    perm = torch.tensor([0, 4, 5, 1, 3, 2])  # background 0 fixed for foreground_only
    base = permutation_invariant_loss(f, ids, off)
    assert base.item() > 0
    assert torch.equal(permutation_invariant_loss(f, perm[ids], off), base)
    perm_all = torch.tensor([3, 0, 5, 1, 2, 4])  # every id incl. 0 when background is just another instance
    base_all = permutation_invariant_loss(f, ids, off, foreground_only=False)
    assert torch.equal(permutation_invariant_loss(f, perm_all[ids], off, foreground_only=False), base_all)
    assert torch.equal(permutation_invariant_loss(f, perm_all[ids] * 7 + 100, off, foreground_only=False), base_all)


def test_pi_loss_zero_for_perfect_map_and_positive_when_instances_share_a_value():
    ids = _blocky_ids(1, 32, 32, 5, block=5, seed=3)
    assert len(torch.unique(ids)) == 5
    for f in (ids.double(), 2.0 * ids.double() + 0.5):  # spacing 1 == m2, and 2
        for fo in (True, False):
            assert permutation_invariant_loss(f[:, None], ids, foreground_only=fo).item() == 0.0
    f = ids.double().clone()
    f[ids == 2] = 1.0  # instances 1 and 2 now share a value
    loss = permutation_invariant_loss(f[:, None], ids, reduction="sum")
    # only pairs (1, 2) cost, each huber(m2 - 0) = 0.95
    off = pair_offsets()
    n12 = 0
    for dy, dx in off.tolist():
        if dy >= 32 or abs(dx) >= 32:
            continue
        a = ids[0, : 32 - dy, max(0, -dx): 32 - max(0, dx)]
        b = ids[0, dy:, max(0, dx): 32 - max(0, -dx)]
        n12 += int((((a == 1) & (b == 2)) | ((a == 2) & (b == 1))).sum())
    assert n12 > 0
    assert loss.item() == pytest.approx(0.95 * n12, rel=1e-12)
    assert permutation_invariant_loss(f[:, None], ids).item() > 0


@pytest.mark.parametrize("foreground_only", [True, False])
def test_pi_loss_fast_equals_naive_24x24(foreground_only):
    ids = _blocky_ids(2, 24, 24, 4, block=3, seed=4)
    f = (ids.double() + 0.4 * torch.randn(2, 24, 24, generator=_gen(5), dtype=torch.float64))[:, None]
    ignore = torch.rand(2, 24, 24, generator=_gen(6)) < 0.1
    cases = [
        (pair_offsets(window=9, dense_radius=4, dilation=0), dict(window=9)),  # dense window: all pairs
        (pair_offsets(window=15, dense_radius=2, dilation=3), None),  # stratified, naive filtered by offsets
    ]
    for off, naive_kw in cases:
        for ign in (None, ignore):
            fr = f.clone().requires_grad_(True)
            fast = permutation_invariant_loss(fr, ids, off, ignore=ign, foreground_only=foreground_only)
            kw = naive_kw if naive_kw is not None else dict(offsets=off)
            fn = f.clone().requires_grad_(True)
            naive = permutation_invariant_loss_naive(fn, ids, ignore=ign, foreground_only=foreground_only, **kw)
            plain = permutation_invariant_loss(f, ids, off, ignore=ign, foreground_only=foreground_only,
                                               memory_efficient=False)
            torch.testing.assert_close(fast, naive, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(plain, naive, rtol=1e-12, atol=1e-14)
            (gf,) = torch.autograd.grad(fast, fr)
            (gn,) = torch.autograd.grad(naive, fn)
            torch.testing.assert_close(gf, gn, rtol=1e-10, atol=1e-14)
    # ignore given as an id value
    ids255 = torch.where(ignore, torch.tensor(255), ids)
    off = cases[1][0]
    torch.testing.assert_close(
        permutation_invariant_loss(f, ids255, off, ignore=255, foreground_only=foreground_only),
        permutation_invariant_loss_naive(f, ids, offsets=off, ignore=ignore, foreground_only=foreground_only),
        rtol=1e-12, atol=1e-14)


def test_gradcheck_losses_float64():
    ids = _blocky_ids(1, 7, 8, 3, block=2, seed=7)
    f = (ids.double() + 0.6 * torch.randn(1, 7, 8, generator=_gen(8), dtype=torch.float64))[:, None]
    off = pair_offsets(window=7, dense_radius=1, dilation=2)
    for fo in (True, False):
        for me in (True, False):
            assert torch.autograd.gradcheck(
                lambda x: permutation_invariant_loss(x, ids, off, foreground_only=fo, memory_efficient=me),
                (f.clone().requires_grad_(True),))
    fg = (ids > 0)[:, None]
    assert torch.autograd.gradcheck(lambda x: binary_loss(x, fg), (f.clone().requires_grad_(True),))
    assert torch.autograd.gradcheck(lambda x: mumford_shah_cauchy(x), (f.clone().requires_grad_(True),))
    # quantization: keep away from integers and half-integers (its kinks)
    q = (torch.floor(f) + 0.1 + 0.3 * torch.rand(f.shape, generator=_gen(9), dtype=torch.float64))
    q = torch.where(torch.rand(f.shape, generator=_gen(10), dtype=torch.float64) < 0.5, q, q + 0.5)
    assert torch.autograd.gradcheck(quantization_loss, (q.requires_grad_(True),))


# ----------------------------------------------------------------------------------------------------- eq. 7, quantization


def test_mumford_shah_cauchy_and_quantization_hand_values():
    assert mumford_shah_cauchy(torch.full((1, 1, 5, 6), 3.0)).item() == 0.0
    f = torch.zeros(1, 1, 5, 6, dtype=torch.float64)
    f[..., 3:] = 1.0  # vertical step: column 2 has a unit horizontal difference, everything else 0
    assert mumford_shah_cauchy(f).item() == pytest.approx(5 * math.log(2.0) / 30, rel=1e-12)
    g = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    g[0, 0, 1, 1] = 2.0  # (0,1): dy=2; (1,0): dx=2; (1,1): dx=-2, dy=-2 -> log 9
    assert mumford_shah_cauchy(g).item() == pytest.approx((2 * math.log(5) + math.log(9)) / 9, rel=1e-12)
    q = torch.tensor([0.2, 1.7, -0.4, 3.0], dtype=torch.float64)
    assert quantization_loss(q).item() == pytest.approx((0.2 + 0.3 + 0.4 + 0.0) / 4, abs=1e-12)
    assert quantization_loss(torch.arange(-3, 4).double()).item() == 0.0


# ----------------------------------------------------------------------------------------------------- mean-shift


def test_mean_shift_1d_matches_naive_and_finds_modes():
    g = _gen(11)
    centers = torch.tensor([1.0, 2.0, 3.5, 6.0], dtype=torch.float64)
    v = torch.cat([c + 0.1 * torch.randn(400, generator=g, dtype=torch.float64) for c in centers])
    lab, modes = mean_shift_1d(v, 0.9)
    labn, modesn = mean_shift_1d_naive(v, 0.9)
    assert len(modes) == 4 == len(modesn)
    torch.testing.assert_close(modes, centers, rtol=0, atol=0.03)
    torch.testing.assert_close(modes, modesn, rtol=0, atol=1e-3)
    assert torch.equal(lab, labn)
    assert torch.equal(lab, torch.arange(4).repeat_interleave(400))


def _agreement(gt: np.ndarray, pred: np.ndarray) -> float:
    c = np.zeros((gt.max() + 1, pred.max() + 1))
    np.add.at(c, (gt.ravel(), pred.ravel()), 1)
    r, k = linear_sum_assignment(-c)
    return c[r, k].sum() / gt.size


@pytest.mark.parametrize("name", ["PennPed00009_mask.png", "FudanPed00025_mask.png"])
def test_discretize_recovers_penn_fudan_instances(name):
    from PIL import Image

    path = require_shared_data(PED_MASKS / name)
    gt = np.array(Image.open(path)).astype(np.int64)
    k = len(np.unique(gt)) - 1
    assert k >= 6
    f = torch.from_numpy(gt).double() + 0.1 * torch.randn(gt.shape, generator=_gen(12), dtype=torch.float64)
    seg = discretize(f, bandwidths=(0.9, 0.4), min_size=20)
    assert seg.shape == gt.shape and seg.dtype == torch.long
    assert int(seg.max()) == k
    assert _agreement(gt, seg.numpy()) >= 0.99
    for cand in discretize_candidates(f):
        assert _agreement(gt, cand.numpy()) >= 0.99


def test_discretize_size_filter_and_refinement():
    f = torch.zeros(40, 40, dtype=torch.float64)
    f[5:20, 5:20] = 2.0
    f[22:38, 5:30] = 3.0
    f[30:33, 35:38] = 7.0  # 9-pixel segment
    f += 0.05 * torch.randn(f.shape, generator=_gen(13), dtype=torch.float64)
    kept = discretize(f, min_size=5)
    assert int(kept.max()) == 3 and int((kept == kept[31, 36]).sum()) == 9 and kept[31, 36] > 0
    dropped = discretize(f, min_size=20)
    assert int(dropped.max()) == 2 and dropped[31, 36] == 0 and int((dropped > 0).sum()) == 225 + 400
    # two instances 0.5 apart: one segment at bandwidth 0.9, split by the 0.4 refinement
    h = torch.zeros(30, 30, dtype=torch.float64)
    h[2:14, 2:28] = 2.0
    h[16:28, 2:28] = 2.4
    h += 0.05 * torch.randn(h.shape, generator=_gen(14), dtype=torch.float64)
    assert int(discretize(h, refine=False).max()) == 1
    seg = discretize(h)
    assert int(seg.max()) == 2 and _agreement((h > 0.5).long().numpy() + (h > 2.2).long().numpy(), seg.numpy()) == 1
    c09, c04 = discretize_candidates(h)
    assert int(c09.max()) == 1 and int(c04.max()) == 2
    # connected components: one value in two pieces -> one segment, or two with connected=True
    p = torch.zeros(20, 20, dtype=torch.float64)
    p[2:8, 2:8] = 3.0
    p[12:18, 12:18] = 3.0
    assert int(discretize(p).max()) == 1
    assert int(discretize(p, connected=True).max()) == 2


def test_mean_shift_bandwidth_is_window_width():
    """bandwidth 0.9 read as a width (radius 0.45) separates equal clusters m2 = 1 apart; read as a radius (sklearn)
    their midpoint is the strongest mode and they merge — why ops.dvis reads it as a width."""
    g = _gen(15)
    v = torch.cat([c + 0.1 * torch.randn(500, generator=g, dtype=torch.float64) for c in (1.0, 2.0)])
    _, modes = mean_shift_1d(v, 0.9)
    assert len(modes) == 2
    _, modes_r = mean_shift_1d(v, 0.9, radius=0.9)
    assert len(modes_r) == 1 and abs(float(modes_r[0]) - 1.5) < 0.05
    labels, modes = mean_shift_1d(torch.tensor([]), 0.9)
    assert labels.numel() == 0 and modes.numel() == 0
