"""HSTN (hierarchical spatial transformer network) operators, section 3.2: converter + sampler of an affine
field composed with a residual optical flow, and the eq. 7 penalties.

Conventions are those of :mod:`ops.warp` (pixel coordinates, flows (N, 2, H, W) in pixels, channel 0 = dx,
backward warping ``out(p) = in(p + flow(p))``, ``grid_sample(align_corners=True)``, pixel-coordinate theta).

* :func:`bending_energy` — thin-plate bending energy from central second differences,
  ``mean(f_xx^2) + 2 mean(f_xy^2) + mean(f_yy^2)`` summed over the two flow components, averaged over the
  pixels where each difference is defined and over the batch. Exactly zero (up to rounding) for any affine
  field, which is the property eq. 7 relies on ("penalizes only nonlinear transformation").
* :func:`smoothness_l2` — first-order penalty ``mean(f_x^2) + mean(f_y^2)`` (forward differences), summed over
  components. Non-zero for any non-constant field, affine included.
* :func:`hstn_penalty` — eq. 7 ``alpha * bending + beta * smoothness`` (alpha=0.01, beta=1 as in section 4).
* :func:`hstn_flow` / :func:`hstn_sample` — the total motion field and the sampled image. The flow generator
  sees the image already warped by the affine field, so the exact total field is the *composition*
  ``phi_A(phi_w(p)) = A (p + w(p)) + t`` i.e. ``compose(affine_to_flow(theta), w)`` — computed analytically
  here (no resampling of the affine field, no border effect). ``mode="sum"`` gives the paper's literal
  ``Hx + w`` (its first-order approximation; the two differ by ``(A - I) w``).
"""

from __future__ import annotations

import torch

from ops.warp import _check_flow, affine_to_flow, base_grid, warp

__all__ = ["second_differences", "bending_energy", "smoothness_l2", "hstn_penalty", "hstn_flow", "hstn_sample"]


def second_differences(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f_xx, f_yy, f_xy) of an (N, C, H, W) field: central differences (interior), mixed over 2x2 cells."""
    fxx = flow[..., :, 2:] - 2 * flow[..., :, 1:-1] + flow[..., :, :-2]
    fyy = flow[..., 2:, :] - 2 * flow[..., 1:-1, :] + flow[..., :-2, :]
    fxy = flow[..., 1:, 1:] - flow[..., 1:, :-1] - flow[..., :-1, 1:] + flow[..., :-1, :-1]
    return fxx, fyy, fxy


def bending_energy(flow: torch.Tensor) -> torch.Tensor:
    """Thin-plate bending energy of a (N, 2, H, W) field: sum over components of
    ``mean f_xx^2 + 2 mean f_xy^2 + mean f_yy^2``. Needs H, W >= 3. 0 for affine fields."""
    _check_flow(flow)
    if min(flow.shape[-2:]) < 3:
        raise ValueError("bending_energy needs H, W >= 3")
    fxx, fyy, fxy = second_differences(flow)
    per = lambda d: d.pow(2).mean(dim=(0, 2, 3)).sum()  # noqa: E731  mean over batch+pixels, sum components
    return per(fxx) + per(fyy) + 2 * per(fxy)


def smoothness_l2(flow: torch.Tensor) -> torch.Tensor:
    """First-order smoothness ``mean f_x^2 + mean f_y^2`` (forward differences), summed over components."""
    _check_flow(flow)
    fx = flow[..., :, 1:] - flow[..., :, :-1]
    fy = flow[..., 1:, :] - flow[..., :-1, :]
    return fx.pow(2).mean(dim=(0, 2, 3)).sum() + fy.pow(2).mean(dim=(0, 2, 3)).sum()


def hstn_penalty(flow: torch.Tensor, alpha: float = 0.01, beta: float = 1.0) -> torch.Tensor:
    """HSTN eq. 7 on the residual flow: ``alpha * bending_energy + beta * smoothness_l2``."""
    return alpha * bending_energy(flow) + beta * smoothness_l2(flow)


def hstn_flow(theta: torch.Tensor, residual_flow: torch.Tensor | None, H: int | None = None, W: int | None = None,
              *, mode: str = "compose") -> torch.Tensor:
    """Total motion field (N, 2, H, W) of the affine theta (pixel coords, (N, 2, 3)) and the residual flow.

    mode="compose" (default): coordinate map ``phi_A(p + w(p))`` — warp by the affine field, then by w, exactly
    (``== ops.warp.compose(affine_to_flow(theta), w)`` inside the image). mode="sum": ``affine_to_flow + w``.
    """
    if residual_flow is None:
        if H is None or W is None:
            raise ValueError("give H, W when residual_flow is None")
        return affine_to_flow(theta, H, W)
    _check_flow(residual_flow)
    H, W = residual_flow.shape[-2:]
    if mode == "sum":
        return affine_to_flow(theta, H, W) + residual_flow
    if mode != "compose":
        raise ValueError(f"mode must be 'compose' or 'sum', got {mode!r}")
    q = base_grid(H, W, device=residual_flow.device, dtype=residual_flow.dtype) + residual_flow  # p + w(p)
    N = max(theta.shape[0], q.shape[0])
    A, t = theta[:, :, :2], theta[:, :, 2:]
    mapped = (A @ q.expand(N, -1, -1, -1).flatten(2)) + t  # (N, 2, HW)
    return mapped.view(N, 2, H, W) - base_grid(H, W, device=q.device, dtype=q.dtype)


def hstn_sample(image: torch.Tensor, theta: torch.Tensor, residual_flow: torch.Tensor | None = None, *,
                mode: str = "compose", padding_mode: str = "zeros") -> torch.Tensor:
    """HSTN sampler (eq. 6): bilinear backward sampling of ``image`` (N, C, H, W) with the total field of
    :func:`hstn_flow`. With ``residual_flow=None`` it is the affine-only (STN) warp."""
    H, W = image.shape[-2:]
    total = hstn_flow(theta.to(image.dtype), residual_flow, H, W, mode=mode)
    return warp(image, total, padding_mode=padding_mode)
