"""ops/warp.py, ops/hstn.py, ops/sfnet.py: conventions (pixel coords, backward warp, align_corners=True),
HSTN converter/penalties/sampler, SFNet correlation/argmax operators/losses. CPU, small sizes, < 30 s."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops.hstn import bending_energy, hstn_flow, hstn_penalty, hstn_sample, smoothness_l2
from ops.sfnet import (
    argmax_flow,
    combine_levels,
    correlation_4d,
    flow_consistency_loss,
    flow_warp,
    hard_argmax,
    kernel_soft_argmax,
    mask_consistency_loss,
    sfnet_flows,
    sfnet_loss,
    smoothness_loss,
    soft_argmax,
)
from ops.warp import (
    affine_to_flow,
    base_grid,
    compose,
    compose_affine,
    epe,
    normalized_to_pixel,
    pixel_to_normalized,
    theta_from_normalized,
    theta_to_normalized,
    valid_mask,
    warp,
)

D = torch.float64


def rand_theta(n, gen, scale=0.05, shift=1.5, dtype=D):
    A = torch.eye(2, dtype=dtype) + scale * (2 * torch.rand(n, 2, 2, generator=gen, dtype=dtype) - 1)
    t = shift * (2 * torch.rand(n, 2, 1, generator=gen, dtype=dtype) - 1)
    return torch.cat((A, t), 2)


def inverse_theta(theta):
    A, t = theta[:, :, :2], theta[:, :, 2:]
    Ai = torch.linalg.inv(A)
    return torch.cat((Ai, -Ai @ t), 2)


def linear_image(H, W, n=1, dtype=D):
    """I(x, y) = 0.3 x - 0.7 y + 2 (bilinear interpolation reproduces it exactly), (n, 1, H, W)."""
    g = base_grid(H, W, dtype=dtype)
    return (0.3 * g[:, :1] - 0.7 * g[:, 1:] + 2.0).expand(n, 1, H, W).clone()


# ---------------------------------------------------------------- conventions (ops/warp.py)


def test_pixel_normalized_align_corners_true():
    H, W = 5, 9
    px = torch.tensor([[0.0, W - 1.0, (W - 1) / 2], [0.0, H - 1.0, (H - 1) / 2]], dtype=D)  # (2, 3): x row, y row
    n = pixel_to_normalized(px, H, W, dim=0)
    # first/last pixel centres are exactly -1/+1 (align_corners=True), the middle is 0
    assert torch.allclose(n, torch.tensor([[-1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]], dtype=D))
    assert torch.allclose(normalized_to_pixel(n, H, W, dim=0), px)
    g = base_grid(H, W, dtype=D)
    assert g.shape == (1, 2, H, W) and g[0, 0, 2, 7] == 7 and g[0, 1, 2, 7] == 2  # channel 0 = x (column)


def test_zero_flow_is_identity_and_integer_shift_is_exact_roll():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 11, 13, generator=gen, dtype=D)
    assert torch.allclose(warp(x, torch.zeros(2, 2, 11, 13, dtype=D)), x, atol=1e-12)
    dx, dy = 2, -3
    flow = torch.zeros(2, 2, 11, 13, dtype=D)
    flow[:, 0], flow[:, 1] = dx, dy
    out = warp(x, flow)  # out(p) = x(p + flow(p)) = x[y + dy, x + dx]
    ref = torch.roll(x, shifts=(-dy, -dx), dims=(-2, -1))
    interior = (slice(None), slice(None), slice(max(0, -dy), 11 - max(0, dy)), slice(max(0, -dx), 13 - max(0, dx)))
    assert torch.allclose(out[interior], ref[interior], atol=1e-12)
    assert out[interior].numel() == 2 * 3 * 8 * 11
    # outside the image: zero padding
    assert out[..., :, 13 - dx:].abs().max() < 1e-12 and out[..., :-dy, :].abs().max() < 1e-12
    # float32 too (the training dtype)
    out32 = warp(x.float(), flow.float())
    assert torch.allclose(out32[interior], ref.float()[interior], atol=1e-5)


def test_identity_affine_gives_zero_field_and_translation_constant_field():
    eye = torch.eye(2, 3, dtype=D).expand(3, 2, 3)
    assert torch.allclose(affine_to_flow(eye, 7, 9), torch.zeros(3, 2, 7, 9, dtype=D), atol=1e-12)
    theta = torch.tensor([[[1.0, 0.0, 2.5], [0.0, 1.0, -1.25]]], dtype=D)
    f = affine_to_flow(theta, 7, 9)
    assert torch.allclose(f[:, 0], torch.full((1, 7, 9), 2.5, dtype=D))
    assert torch.allclose(f[:, 1], torch.full((1, 7, 9), -1.25, dtype=D))
    # eq. 5 at one pixel: (u, v) = [[a-1, b, c], [d, e-1, f]] (x, y, 1)
    theta = torch.tensor([[[1.1, 0.2, 3.0], [-0.3, 0.9, 1.0]]], dtype=D)
    f = affine_to_flow(theta, 7, 9)
    x, y = 5, 4
    assert torch.isclose(f[0, 0, y, x], torch.tensor(0.1 * x + 0.2 * y + 3.0, dtype=D))
    assert torch.isclose(f[0, 1, y, x], torch.tensor(-0.3 * x - 0.1 * y + 1.0, dtype=D))


def test_affine_flow_matches_torch_affine_grid_align_corners_true():
    gen = torch.Generator().manual_seed(1)
    H, W = 12, 17
    theta = rand_theta(2, gen, scale=0.2, shift=2.0)
    x = torch.rand(2, 3, H, W, generator=gen, dtype=D)
    theta_n = theta_to_normalized(theta, H, W)
    ref = F.grid_sample(x, F.affine_grid(theta_n, (2, 3, H, W), align_corners=True), align_corners=True)
    assert torch.allclose(warp(x, affine_to_flow(theta, H, W)), ref, atol=1e-10)
    assert torch.allclose(affine_to_flow(theta_n, H, W, normalized=True), affine_to_flow(theta, H, W), atol=1e-10)
    assert torch.allclose(theta_from_normalized(theta_n, H, W), theta, atol=1e-12)


def test_compose_affine_fields_equals_affine_of_product():
    # compose(a, b) = flow of phi_a(phi_b(p)); for affine fields = affine_to_flow(A @ B) where phi_B(p) is inside
    gen = torch.Generator().manual_seed(2)
    H, W = 24, 20
    A, B = rand_theta(3, gen), rand_theta(3, gen)
    fa, fb = affine_to_flow(A, H, W), affine_to_flow(B, H, W)
    got = compose(fa, fb)
    want = affine_to_flow(compose_affine(A, B), H, W)
    region = valid_mask(fb).bool().expand_as(got)
    assert region.float().mean() > 0.7
    assert torch.allclose(got[region], want[region], atol=1e-10)
    # the order matters: A∘B != B∘A
    assert (affine_to_flow(compose_affine(B, A), H, W) - want).abs().max() > 1e-3
    # image order: warp(warp(x, a), b) == warp(x, compose(a, b)) (x linear => bilinear is exact), interior
    x = linear_image(H, W, 3)
    lhs, rhs = warp(warp(x, fa), fb), warp(x, got)
    assert torch.allclose(lhs[..., 6:-6, 6:-6], rhs[..., 6:-6, 6:-6], atol=1e-10)


def test_epe_hand_computed():
    flow = torch.zeros(1, 2, 1, 2, dtype=D)
    gt = torch.zeros(1, 2, 1, 2, dtype=D)
    flow[0, :, 0, 0] = torch.tensor([3.0, 4.0], dtype=D)  # error 5 at pixel 0, 0 at pixel 1
    assert torch.isclose(epe(flow, gt), torch.tensor(2.5, dtype=D))
    assert torch.isclose(epe(flow, gt, torch.tensor([[[[1.0, 0.0]]]])), torch.tensor(5.0, dtype=D))
    assert torch.isclose(epe(flow, gt, torch.tensor([[[0.0, 1.0]]])), torch.tensor(0.0, dtype=D))


def test_valid_mask():
    flow = torch.zeros(1, 2, 4, 5, dtype=D)
    flow[:, 0] = 1.5
    v = valid_mask(flow)[0, 0]
    assert torch.equal(v[:, :3], torch.ones(4, 3, dtype=D)) and torch.equal(v[:, 3:], torch.zeros(4, 2, dtype=D))


# ---------------------------------------------------------------- HSTN (ops/hstn.py)


def test_bending_energy_zero_for_affine_positive_otherwise():
    gen = torch.Generator().manual_seed(3)
    theta = rand_theta(4, gen, scale=0.5, shift=5.0, dtype=torch.float32)
    f = affine_to_flow(theta, 32, 32)
    assert bending_energy(f) <= 1e-6
    assert smoothness_l2(f) > 0  # first order does penalise a non-constant affine field
    g = base_grid(32, 32)
    quad = torch.cat((0.01 * g[:, :1] ** 2, 0.02 * g[:, :1] * g[:, 1:]), 1)  # f_xx = 0.02, f_xy = 0.02
    be = bending_energy(quad.double())
    assert torch.isclose(be, torch.tensor(0.02**2 + 2 * 0.02**2, dtype=D))
    assert bending_energy(torch.rand(2, 2, 8, 8, generator=gen)) > 1e-3
    const = torch.ones(1, 2, 6, 6)
    assert smoothness_l2(const) == 0 and bending_energy(const) == 0
    lin = base_grid(6, 6).repeat(1, 1, 1, 1) * torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)  # f_x = 2 on channel 0
    assert torch.isclose(smoothness_l2(lin), torch.tensor(4.0))
    assert torch.isclose(hstn_penalty(quad.double(), alpha=0.01, beta=1.0),
                         0.01 * be + smoothness_l2(quad.double()))


def test_hstn_sample_composition():
    gen = torch.Generator().manual_seed(4)
    H, W = 20, 24
    theta = rand_theta(2, gen)
    w = 0.8 * (2 * torch.rand(2, 2, H, W, generator=gen, dtype=D) - 1)
    total = hstn_flow(theta, w)
    fa = affine_to_flow(theta, H, W)
    # the analytic composition equals compose(affine field, w) where p + w(p) is inside
    region = valid_mask(w).bool().expand_as(total)
    assert torch.allclose(total[region], compose(fa, w)[region], atol=1e-10)
    # sampling with it == warp by the affine field, then by w (HSTN's pipeline), for a linear image, interior
    x = linear_image(H, W, 2)
    assert torch.allclose(hstn_sample(x, theta, w)[..., 4:-4, 4:-4], warp(warp(x, fa), w)[..., 4:-4, 4:-4],
                          atol=1e-10)
    # zero residual == affine-only (STN) warp; "sum" mode is the literal Hx + w
    assert torch.allclose(hstn_sample(x, theta, torch.zeros_like(w)), warp(x, fa), atol=1e-12)
    assert torch.allclose(hstn_sample(x, theta), warp(x, fa), atol=1e-12)
    assert torch.allclose(hstn_flow(theta, w, mode="sum"), fa + w)


# ---------------------------------------------------------------- SFNet (ops/sfnet.py)


def test_correlation_identical_maps_peaks_at_zero_displacement():
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(2, 32, 6, 7, generator=gen)
    c = correlation_4d(f, f)
    assert c.shape == (2, 6, 7, 6, 7)
    diag = torch.einsum("nyxyx->nyx", c)
    assert torch.allclose(diag, torch.ones_like(diag), atol=1e-5)  # L2-normalised features
    assert c.max() <= 1 + 1e-5
    assert torch.equal(hard_argmax(c), torch.zeros(2, 2, 6, 7))
    # batched matmul == explicit dot products of normalised features (clipped at 0 by default: tests/test_ops_sfnet.py)
    fn = F.normalize(f, dim=1)
    dot = (fn[1, :, 2, 3] * fn[1, :, 4, 5]).sum()
    assert torch.allclose(correlation_4d(f, f, relu=False)[1, 2, 3, 4, 5], dot, atol=1e-6)
    assert torch.allclose(c[1, 2, 3, 4, 5], dot.clamp_min(0), atol=1e-6)
    c2 = correlation_4d(f, torch.randn(2, 32, 6, 7, generator=gen))
    assert torch.allclose(combine_levels(c, c2), c * c2)


def test_soft_and_kernel_argmax_on_one_hot_return_the_location():
    N, H, W, H2, W2 = 2, 4, 5, 4, 5
    gen = torch.Generator().manual_seed(6)
    tx = torch.randint(0, W2, (N, H, W), generator=gen)
    ty = torch.randint(0, H2, (N, H, W), generator=gen)
    corr = torch.zeros(N, H, W, H2 * W2, dtype=D)
    corr.scatter_(-1, (ty * W2 + tx).unsqueeze(-1), 1.0)
    corr = corr.view(N, H, W, H2, W2)
    g = base_grid(H, W, dtype=D)
    want = torch.stack((tx, ty), 1).to(D) - g  # flow = q - p in target cells
    for fn in (soft_argmax, kernel_soft_argmax, hard_argmax):
        assert torch.allclose(fn(corr), want, atol=1e-9), fn.__name__
    assert torch.equal(argmax_flow(corr, "hard"), hard_argmax(corr))
    with pytest.raises(ValueError):
        argmax_flow(corr, "nope")


def test_kernel_soft_argmax_tends_to_hard_argmax():
    gen = torch.Generator().manual_seed(7)
    corr = torch.rand(2, 20, 20, 20, 20, generator=gen, dtype=D)
    hard = hard_argmax(corr)
    errs = [epe(kernel_soft_argmax(corr, beta=b), hard).item() for b in (50.0, 500.0, 1e4)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.05
    # the kernel localises: with beta=50 kernel soft argmax is closer to the hard argmax than plain soft argmax
    assert epe(kernel_soft_argmax(corr), hard) < epe(soft_argmax(corr), hard)


def test_argmax_flow_units_for_different_grid_sizes():
    # source 3x3, target 5x5: source cell p maps to 2p in target cells (align_corners=True); identity match -> 0
    corr = torch.zeros(1, 3, 3, 5, 5, dtype=D)
    for y in range(3):
        for x in range(3):
            corr[0, y, x, 2 * y, 2 * x] = 1.0
    assert torch.allclose(soft_argmax(corr), torch.zeros(1, 2, 3, 3, dtype=D), atol=1e-9)


def test_flow_consistency_zero_for_inverse_affine_pair_and_convention_matters():
    gen = torch.Generator().manual_seed(8)
    H, W = 20, 20
    A = rand_theta(2, gen, scale=0.1, shift=1.5)
    fs, ft = affine_to_flow(A, H, W), affine_to_flow(inverse_theta(A), H, W)
    ms, mt = valid_mask(fs), valid_mask(ft)  # foreground restricted to where the cycle stays inside
    assert ms.mean() > 0.6 and mt.mean() > 0.6
    assert flow_consistency_loss(fs, ft, ms, mt) < 1e-16
    # the same pair sampled with grid_sample's default align_corners=False (SFNet's code under today's torch)
    grid = pixel_to_normalized(base_grid(H, W, dtype=D) + fs, H, W).permute(0, 2, 3, 1)
    wrong = F.grid_sample(ft, grid, align_corners=False)
    assert (((fs + wrong) * ms) ** 2).sum() / ms.sum() > 1e-3  # vs < 1e-16 above
    # a non-inverse pair is penalised
    assert flow_consistency_loss(fs, fs, ms, ms) > 0.1


def test_mask_consistency_zero_for_mask_warped_by_its_own_flow():
    H, W = 16, 16
    ms = torch.zeros(2, 1, H, W, dtype=D)
    ms[0, :, 4:10, 5:9] = 1
    ms[1, :, 6:12, 3:11] = 1
    fs = torch.zeros(2, 2, H, W, dtype=D)
    fs[:, 0], fs[:, 1] = 3.0, -2.0  # source p matches target p + (3, -2)
    ft = -fs
    mt = flow_warp(ms, ft)  # M^t(q) = M^s(q + F^t(q))  (the GT target mask)
    assert mt.sum() == ms.sum()  # object stays inside
    assert mask_consistency_loss(fs, ft, ms, mt) < 1e-20
    assert flow_consistency_loss(fs, ft, ms, mt) < 1e-20
    assert mask_consistency_loss(torch.zeros_like(fs), torch.zeros_like(ft), ms, mt) > 0.01
    # smooth-for-constant flow, and the weighted total
    assert smoothness_loss(fs, ft, ms, mt) == 0
    gen = torch.Generator().manual_seed(9)
    rs, rt = torch.randn(2, 2, H, W, generator=gen, dtype=D), torch.randn(2, 2, H, W, generator=gen, dtype=D)
    parts = sfnet_loss(rs, rt, ms, mt[:, 0])  # (N, H, W) masks are accepted too
    assert parts["smooth"] > 0
    assert torch.isclose(parts["loss"], 3 * parts["mask"] + 16 * parts["flow"] + 0.5 * parts["smooth"])


def test_sfnet_flows_from_features_end_to_end():
    # target features = source features shifted by an integer offset -> all argmax variants recover it inside
    gen = torch.Generator().manual_seed(10)
    f = torch.randn(1, 16, 12, 12, generator=gen, dtype=D)
    shift = torch.zeros(1, 2, 12, 12, dtype=D)
    shift[:, 0], shift[:, 1] = 2.0, 1.0
    ft = warp(f, -shift)  # ft(q) = f(q - s): source p matches target p + s
    fs_flow, ft_flow = sfnet_flows(correlation_4d(f, ft), method="hard")
    inner = (slice(None), slice(None), slice(1, 12), slice(2, 12))
    assert torch.allclose(ft_flow[inner], -shift[inner])
    inner_s = (slice(None), slice(None), slice(0, 11), slice(0, 10))
    assert torch.allclose(fs_flow[inner_s], shift[inner_s])


# ---------------------------------------------------------------- gradients (float64)


def test_gradcheck():
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(1, 2, 5, 6, generator=gen, dtype=D, requires_grad=True)
    flow = (0.7 * torch.randn(1, 2, 5, 6, generator=gen, dtype=D) + 0.31).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: warp(a, b), (x, flow))
    assert torch.autograd.gradcheck(bending_energy, (torch.randn(2, 2, 5, 6, generator=gen, dtype=D,
                                                                 requires_grad=True),))
    assert torch.autograd.gradcheck(smoothness_l2, (torch.randn(1, 2, 4, 5, generator=gen, dtype=D,
                                                                requires_grad=True),))
    corr = torch.rand(1, 3, 3, 4, 4, generator=gen, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: kernel_soft_argmax(c, beta=5.0, sigma=1.5), (corr,))
    assert torch.autograd.gradcheck(lambda c: soft_argmax(c, beta=5.0), (corr,))
    fa = torch.randn(1, 4, 3, 3, generator=gen, dtype=D, requires_grad=True)
    fb = torch.randn(1, 4, 2, 3, generator=gen, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(correlation_4d, (fa, fb))
    theta = rand_theta(1, gen).requires_grad_()
    w = (0.3 * torch.randn(1, 2, 5, 6, generator=gen, dtype=D)).requires_grad_()
    img = torch.rand(1, 1, 5, 6, generator=gen, dtype=D)
    assert torch.autograd.gradcheck(lambda t, r: hstn_sample(img, t, r), (theta, w))
    ms = (torch.rand(1, 1, 5, 6, generator=gen, dtype=D) > 0.4).to(D)
    fs = (0.6 * torch.randn(1, 2, 5, 6, generator=gen, dtype=D) + 0.13).requires_grad_()
    ft = (0.6 * torch.randn(1, 2, 5, 6, generator=gen, dtype=D) - 0.17).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: sfnet_loss(a, b, ms, ms)["loss"], (fs, ft))
