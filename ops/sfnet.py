"""SFNet operators (Lee et al., "SFNet: Learning Object-aware Semantic Correspondence", CVPR 2019, sections 3.1-3.2,
4.1): 4D correlation, kernel soft argmax, and the mask/flow/smoothness losses — batched PyTorch, no per-position
Python loop.

Conventions (:mod:`ops.warp`'s, pinned by ``tests/test_ops_flow.py``):

* A correlation ``corr`` is ``(N, H, W, H', W')``: ``corr[n, y, x, v, u] = c((x, y), (u, v))`` between source
  cell ``p = (x, y)`` of an ``H x W`` map and target cell ``q = (u, v)`` of an ``H' x W'`` map (eq. 1).
* Every argmax variant returns a **flow** ``(N, 2, H, W)`` (channel 0 = dx, channel 1 = dy) **in target
  feature-map cells**: ``F(p) = phi(p) - p`` (eq. 5), where ``phi(p)`` is the matched target coordinate (eq. 2)
  and ``p`` is expressed in target cells by the align_corners=True rule ``x * (W'-1)/(W-1)`` — i.e. ``p``
  itself when both maps have the same size (SFNet's 20x20 case). Multiply by the stride (or resize with
  align_corners=True) to get image pixels.
* The flow is a *backward* flow for warping: ``W(M^t; F^s)(p) = M^t(p + F^s(p))`` (eq. 6) via
  :func:`ops.warp.warp` (``grid_sample(align_corners=True)``, zero padding). SFNet's released code assumed
  align_corners=True (torch 1.0 behaviour); this module keeps that convention explicitly, so an inverse pair of
  flows has zero flow-consistency loss.
* Masks are ``(N, 1, H, W)`` or ``(N, H, W)`` in [0, 1] **on the flow's grid** (resize them first).

Correlation clipped at zero (``correlation_4d(..., relu=True)``, the default). The paper multiplies the two levels'
correlations (eq. 1 and sec. 3.1) and is silent on their sign; the authors' released code (cvlab-yonsei/SFNet,
``matching_layer``) applies a ReLU to each level's cosine correlation before the product, and the paper's numbers
come from that code. Without the clip two negative cosines (features that disagree at both depths) multiply to a
positive score that can beat a true match: in a seeded comparison with the released code on a 20 x 20 grid the
flows from the same features differed by up to 16 cells. ``relu=False`` keeps the unclipped product.

Loss units (:func:`sfnet_loss_weights`). The paper's weights (3, 16, 0.5) were tuned with the released code, whose
flows are in grid_sample units on the ``G``-point grid (``linspace(-1, 1, G)``, one cell = ``2 / (G - 1)``); the
flows here are in cells. Convert the weights with :func:`sfnet_loss_weights` before applying them to the
cell-unit losses, or flow consistency weighs ``((G - 1) / 2)^2`` (90.25 at G = 20) and smoothness ``(G - 1) / 2``
(9.5) times too much.

Kernel soft argmax (eq. 2-3): per source cell, L2-normalise the 2D slice ``c_p`` -> ``n_p``; take the discrete
argmax ``q*`` of ``n_p`` (no gradient through it); ``k_p(q) = exp(-|q - q*|^2 / (2 sigma^2))`` (peak 1,
sigma in target cells); ``m_p = softmax_q(beta * k_p * n_p)``; ``phi(p) = sum_q m_p(q) q``. Defaults beta=50,
sigma=5 (section 4.1). :func:`soft_argmax` is the same without the kernel, :func:`hard_argmax` the discrete
argmax (integer flow, no gradient); :func:`argmax_flow` dispatches among the three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.warp import _check_flow, warp

__all__ = [
    "correlation_4d",
    "combine_levels",
    "kernel_soft_argmax",
    "soft_argmax",
    "hard_argmax",
    "argmax_flow",
    "transpose_correlation",
    "sfnet_flows",
    "flow_warp",
    "mask_consistency_loss",
    "flow_consistency_loss",
    "smoothness_loss",
    "sfnet_loss",
    "sfnet_loss_weights",
]

_EPS = 1e-12


def correlation_4d(fa: torch.Tensor, fb: torch.Tensor, *, normalize: bool = True, relu: bool = True) -> torch.Tensor:
    """Eq. 1: ``c(p, q) = f_a(p)^T f_b(q)`` with each C-dim feature L2-normalised first (``normalize=True``), then
    clipped at zero (``relu=True``, the released code's ``matching_layer``: see the module docstring).

    fa: (N, C, H, W), fb: (N, C, H', W') -> (N, H, W, H', W'). One batched matmul.
    """
    if fa.dim() != 4 or fb.dim() != 4 or fa.shape[:2] != fb.shape[:2]:
        raise ValueError(f"need (N, C, H, W) maps with equal N, C; got {tuple(fa.shape)}, {tuple(fb.shape)}")
    if normalize:
        fa, fb = F.normalize(fa, dim=1, eps=_EPS), F.normalize(fb, dim=1, eps=_EPS)
    N, C, H, W = fa.shape
    H2, W2 = fb.shape[-2:]
    corr = fa.flatten(2).transpose(1, 2) @ fb.flatten(2)  # (N, HW, H'W')
    if relu:
        corr = F.relu(corr)
    return corr.view(N, H, W, H2, W2)


def combine_levels(c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """Combine two levels' correlations (same shape, e.g. conv4-23 and upsampled conv5-3) by element-wise product.

    Give it clipped correlations (:func:`correlation_4d`'s default ``relu=True``), as the released code does: the
    product of two unclipped negative cosines would score as a match."""
    if c1.shape != c2.shape:
        raise ValueError(f"correlations must have the same shape, got {tuple(c1.shape)}, {tuple(c2.shape)}")
    return c1 * c2


def transpose_correlation(corr: torch.Tensor) -> torch.Tensor:
    """c(p, q) -> c(q, p): (N, H, W, H', W') -> (N, H', W', H, W) (target-to-source matching)."""
    return corr.permute(0, 3, 4, 1, 2)


def _prepare(corr: torch.Tensor):
    if corr.dim() != 5:
        raise ValueError(f"corr must be (N, H, W, H', W'), got {tuple(corr.shape)}")
    N, H, W, H2, W2 = corr.shape
    ys, xs = torch.meshgrid(torch.arange(H2, device=corr.device, dtype=corr.dtype),
                            torch.arange(W2, device=corr.device, dtype=corr.dtype), indexing="ij")
    return corr.reshape(N, H * W, H2 * W2), xs.reshape(-1), ys.reshape(-1)


def _to_flow(phi_x: torch.Tensor, phi_y: torch.Tensor, shape) -> torch.Tensor:
    """Matched target coordinates (N, HW) -> flow (N, 2, H, W) in target cells (p mapped align_corners=True)."""
    N, H, W, H2, W2 = shape
    sx = (W2 - 1) / (W - 1) if W > 1 else 0.0
    sy = (H2 - 1) / (H - 1) if H > 1 else 0.0
    ys, xs = torch.meshgrid(torch.arange(H, device=phi_x.device, dtype=phi_x.dtype),
                            torch.arange(W, device=phi_x.device, dtype=phi_x.dtype), indexing="ij")
    fx = phi_x.view(N, H, W) - xs * sx
    fy = phi_y.view(N, H, W) - ys * sy
    return torch.stack((fx, fy), 1)


def kernel_soft_argmax(corr: torch.Tensor, beta: float = 50.0, sigma: float = 5.0, *,
                       normalize: bool = True) -> torch.Tensor:
    """Eq. 2-3 kernel soft argmax of (N, H, W, H', W') -> flow (N, 2, H, W) in target cells (module docstring).

    The argmax locating the Gaussian is taken on detached scores (no gradient, as in the paper's footnote);
    gradients flow through the normalised scores and the softmax.
    """
    c, gx, gy = _prepare(corr)
    n = F.normalize(c, dim=-1, eps=_EPS) if normalize else c
    idx = n.detach().argmax(-1, keepdim=True)  # (N, HW, 1)
    H2, W2 = corr.shape[-2:]
    qx, qy = (idx % W2).to(c.dtype), torch.div(idx, W2, rounding_mode="floor").to(c.dtype)
    # separable Gaussian: exp(-(dx^2+dy^2)/2s^2) = exp(-dx^2/2s^2) exp(-dy^2/2s^2); peak 1 at q*; scaled by beta
    ax = torch.arange(W2, device=c.device, dtype=c.dtype)
    ay = torch.arange(H2, device=c.device, dtype=c.dtype)
    kx = torch.exp(-((ax - qx) ** 2) / (2.0 * sigma**2))  # (N, HW, W')
    ky = torch.exp(-((ay - qy) ** 2) / (2.0 * sigma**2)) * beta  # (N, HW, H')
    k = (ky.unsqueeze(-1) * kx.unsqueeze(-2)).flatten(-2)  # (N, HW, H'W') = beta * k_p(q)
    m = torch.softmax(k * n, dim=-1)
    phi = m @ torch.stack((gx, gy), 1)  # (N, HW, 2)
    return _to_flow(phi[..., 0], phi[..., 1], corr.shape)


def soft_argmax(corr: torch.Tensor, beta: float = 50.0, *, normalize: bool = True) -> torch.Tensor:
    """Plain soft argmax (eq. 2-3 without the kernel): softmax(beta * n_p) weighted mean of coordinates."""
    c, gx, gy = _prepare(corr)
    n = F.normalize(c, dim=-1, eps=_EPS) if normalize else c
    m = torch.softmax(beta * n, dim=-1)
    return _to_flow(m @ gx, m @ gy, corr.shape)


def hard_argmax(corr: torch.Tensor) -> torch.Tensor:
    """Discrete argmax (first maximum on ties) -> integer-valued flow (N, 2, H, W) in target cells; no gradient."""
    c, _, _ = _prepare(corr)
    idx = c.detach().argmax(-1)
    W2 = corr.shape[-1]
    dtype = corr.dtype if corr.is_floating_point() else torch.float32
    return _to_flow((idx % W2).to(dtype), torch.div(idx, W2, rounding_mode="floor").to(dtype), corr.shape)


def argmax_flow(corr: torch.Tensor, method: str = "kernel", beta: float = 50.0, sigma: float = 5.0) -> torch.Tensor:
    """One interface for the three operators of the ablation (Table 4): method "kernel" | "soft" | "hard"."""
    if method == "kernel":
        return kernel_soft_argmax(corr, beta, sigma)
    if method == "soft":
        return soft_argmax(corr, beta)
    if method == "hard":
        return hard_argmax(corr)
    raise ValueError(f"method must be 'kernel', 'soft' or 'hard', got {method!r}")


def sfnet_flows(corr: torch.Tensor, method: str = "kernel", beta: float = 50.0,
                sigma: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(F^s, F^t) from one source-to-target correlation: F^s from ``corr``, F^t from its transpose."""
    return argmax_flow(corr, method, beta, sigma), argmax_flow(transpose_correlation(corr), method, beta, sigma)


def flow_warp(x: torch.Tensor, flow: torch.Tensor, *, padding_mode: str = "zeros") -> torch.Tensor:
    """SFNet's W(x; F)(p) = x(p + F(p)) — :func:`ops.warp.warp` (bilinear, align_corners=True)."""
    return warp(x, flow, padding_mode=padding_mode)


def _mask4(mask: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(1) if mask.dim() == 3 else mask
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"mask must be (N, 1, H, W) or (N, H, W) on the flow's grid {tuple(flow.shape[-2:])}, "
                         f"got {tuple(mask.shape)}")
    return m.to(flow.dtype)


def mask_consistency_loss(flow_s: torch.Tensor, flow_t: torch.Tensor, mask_s: torch.Tensor,
                          mask_t: torch.Tensor) -> torch.Tensor:
    """Eq. 7: ``sum_{i in s,t} mean_p (M^i - M_hat^i)^2`` with ``M_hat^s = W(M^t; F^s)``, ``M_hat^t = W(M^s; F^t)``.
    |N^i| = number of pixels (H*W); averaged over the batch."""
    _check_flow(flow_s), _check_flow(flow_t)
    ms, mt = _mask4(mask_s, flow_s), _mask4(mask_t, flow_t)
    ls = (ms - warp(mt, flow_s)).pow(2).mean()
    lt = (mt - warp(ms, flow_t)).pow(2).mean()
    return ls + lt


def _fg_count(m: torch.Tensor) -> torch.Tensor:
    return m.sum(dim=(1, 2, 3)).clamp_min(1.0)  # (N,): |N_F| per sample, >= 1


def flow_consistency_loss(flow_s: torch.Tensor, flow_t: torch.Tensor, mask_s: torch.Tensor, mask_t: torch.Tensor,
                          *, padding_mode: str = "zeros") -> torch.Tensor:
    """Eq. 8-9 forward-backward cycle: ``sum_i 1/|N_F^i| sum_p ||(F^i + F_hat^i) * M^i||_2^2`` with
    ``F_hat^s = W(F^t; F^s)`` (eq. 9), ``F_hat^t = W(F^s; F^t)``; |N_F^i| = foreground pixels of sample i;
    averaged over the batch. ``padding_mode`` for sampling the other flow outside the map ("zeros" as
    grid_sample's default in the released code)."""
    _check_flow(flow_s), _check_flow(flow_t)
    ms, mt = _mask4(mask_s, flow_s), _mask4(mask_t, flow_t)

    def one(f, g, m):
        cyc = (f + warp(g, f, padding_mode=padding_mode)) * m
        return (cyc.pow(2).sum(dim=(1, 2, 3)) / _fg_count(m)).mean()

    return one(flow_s, flow_t, ms) + one(flow_t, flow_s, mt)


def smoothness_loss(flow_s: torch.Tensor, flow_t: torch.Tensor, mask_s: torch.Tensor,
                    mask_t: torch.Tensor) -> torch.Tensor:
    """Eq. 10: ``sum_i 1/|N_F^i| sum_p ||grad F^i(p) * M^i(p)||_1``, grad = forward differences in x and y of
    both components (4 terms, L1), masked by M at p; averaged over the batch."""
    _check_flow(flow_s), _check_flow(flow_t)
    ms, mt = _mask4(mask_s, flow_s), _mask4(mask_t, flow_t)

    def one(f, m):
        gx = (f[..., :, 1:] - f[..., :, :-1]) * m[..., :, :-1]
        gy = (f[..., 1:, :] - f[..., :-1, :]) * m[..., :-1, :]
        total = gx.abs().sum(dim=(1, 2, 3)) + gy.abs().sum(dim=(1, 2, 3))
        return (total / _fg_count(m)).mean()

    return one(flow_s, ms) + one(flow_t, mt)


def sfnet_loss_weights(lambda_mask: float, lambda_flow: float, lambda_smooth: float,
                       grid: int) -> tuple[float, float, float]:
    """The paper's loss weights (eq. 4; sec. 4.1: 3, 16, 0.5) converted for flows in cells on a ``grid x grid`` map.

    The paper's weights go with flows in grid_sample units on the ``G``-point grid of the released code
    (``linspace(-1, 1, G)``: one cell = ``2 / (G - 1)`` units), so ``F_cell = F_norm * (G - 1) / 2``. The mask
    term is unit-free; flow consistency is a squared L2 norm of flows (``L_flow,cell = ((G - 1) / 2)^2 L_flow,norm``);
    smoothness an L1 norm of flow differences (``L_smooth,cell = (G - 1) / 2 * L_smooth,norm``). Equal objectives
    therefore need::

        w_mask = lambda_mask,  w_flow = lambda_flow * (2 / (G - 1))^2,  w_smooth = lambda_smooth * 2 / (G - 1)

    e.g. G = 20: (3, 16 / 90.25, 0.5 / 9.5) = (3, 0.1773, 0.0526); G = 16: (3, 0.2844, 0.0667). Returns
    ``(w_mask, w_flow, w_smooth)`` for :func:`mask_consistency_loss`, :func:`flow_consistency_loss`,
    :func:`smoothness_loss` (or :func:`sfnet_loss`'s ``lambda_*``) on flows in cells.
    """
    if int(grid) != grid or grid < 2:
        raise ValueError(f"grid must be an integer >= 2 (points per side of the flow grid), got {grid}")
    cell = 2.0 / (int(grid) - 1)  # one cell in grid_sample units
    return float(lambda_mask), float(lambda_flow) * cell**2, float(lambda_smooth) * cell


def sfnet_loss(flow_s: torch.Tensor, flow_t: torch.Tensor, mask_s: torch.Tensor, mask_t: torch.Tensor, *,
               lambda_mask: float = 3.0, lambda_flow: float = 16.0, lambda_smooth: float = 0.5) -> dict:
    """Eq. 4: ``lambda_mask L_mask + lambda_flow L_flow + lambda_smooth L_smooth`` on flows in cells. Returns
    {"loss", "mask", "flow", "smooth"} (scalar tensors; only "loss" is the objective, the others are its
    unweighted terms, for logging).

    The defaults are section 4.1's numbers as printed, which belong to flows in grid_sample units: for the paper's
    objective on cell flows pass ``sfnet_loss_weights(3, 16, 0.5, G)`` (module docstring).
    """
    lm = mask_consistency_loss(flow_s, flow_t, mask_s, mask_t)
    lf = flow_consistency_loss(flow_s, flow_t, mask_s, mask_t)
    ls = smoothness_loss(flow_s, flow_t, mask_s, mask_t)
    return {"loss": lambda_mask * lm + lambda_flow * lf + lambda_smooth * ls, "mask": lm, "flow": lf, "smooth": ls}
