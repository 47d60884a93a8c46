"""Shared dense-flow primitives (HSTN converter/sampler, SFNet warping operator), batched PyTorch.

THE project-wide conventions (every flow/affine function in ``ops/`` follows them; ``tests/test_ops_flow.py``
pins them):

* **Pixel coordinates.** ``x`` is the column (right), ``y`` the row (down); pixel ``(x, y)`` has its *centre* at
  the integer coordinate ``(x, y)``, so a ``H x W`` map spans ``x in [0, W-1]``, ``y in [0, H-1]``.
* **Flows** are ``(N, 2, H, W)`` tensors in **pixels** of the map they live on: channel 0 = ``dx``,
  channel 1 = ``dy``.
* **Flow direction: backward warping.** ``warp(x, flow)(p) = x(p + flow(p))`` — the output pixel ``p`` *pulls*
  its value from ``p + flow(p)`` in the input (bilinear). This is SFNet's ``W(M; F)(p) = M(p + F(p))`` and
  HSTN's eq. 6 sampler ("backward mapping").  The coordinate map of a flow is ``phi(p) = p + flow(p)``.
* **Normalised coordinates / align_corners.** ``grid_sample`` / ``affine_grid`` are always called with
  ``align_corners=True``: ``x_n = 2 x / (W - 1) - 1`` so -1 and +1 are the *centres* of the first and last pixels
  (not their outer edges). With this choice an integer flow moves pixels by exactly that many pixels and a
  zero flow is the identity exactly, at every resolution. (SFNet's released code assumed this torch-1.0
  behaviour; calling ``grid_sample`` with today's default ``align_corners=False`` on grids built this way
  rescales every flow by ``(W-1)/W`` and shifts it by half a pixel — never mix the two.)  A size-1 axis maps
  to normalised 0.
* **Outside the image**: ``warp`` uses ``padding_mode="zeros"`` by default (masks/images: outside is
  background); ``compose`` samples flows with ``"border"``. :func:`valid_mask` tells where ``p + flow(p)`` is
  inside the image.
* **Affine parameters** ``theta`` are ``(N, 2, 3)`` ``[[a, b, c], [d, e, f]]`` in **pixel** coordinates and map an
  *output* pixel to the *input* location it samples from: ``phi(p) = A p + t``.  HSTN eq. 5:
  ``flow(p) = [[a-1, b, c], [d, e-1, f]] @ [x, y, 1]``.  ``theta_to_normalized`` / ``theta_from_normalized``
  convert to/from torch's ``affine_grid`` convention (normalised coords, ``align_corners=True``), so
  ``warp(x, affine_to_flow(theta))`` equals
  ``grid_sample(x, affine_grid(theta_to_normalized(theta), ..., align_corners=True), align_corners=True)``.
* **Composition.** ``compose(a, b)`` is the flow whose coordinate map is ``phi_a(phi_b(p))`` ("apply ``phi_b``,
  then ``phi_a``"): ``compose(a, b)(p) = b(p) + a(p + b(p)) = b + warp(a, b)``.  On images this is
  ``warp(warp(x, a), b) == warp(x, compose(a, b))`` (warp by ``a`` first, then by ``b``).  For affine fields
  ``compose(affine_to_flow(A), affine_to_flow(B)) == affine_to_flow(A @ B)`` (3x3 homogeneous product) wherever
  ``phi_B(p)`` is inside the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ALIGN_CORNERS",
    "pixel_to_normalized",
    "normalized_to_pixel",
    "base_grid",
    "flow_to_grid",
    "warp",
    "valid_mask",
    "affine_to_flow",
    "theta_to_normalized",
    "theta_from_normalized",
    "compose",
    "compose_affine",
    "epe",
]

ALIGN_CORNERS = True  # the one grid_sample/affine_grid convention of the project (see module docstring)


def _scale(size: int) -> float:
    """d(normalised)/d(pixel) along an axis of ``size`` pixels under align_corners=True (0 for size 1)."""
    return 2.0 / (size - 1) if size > 1 else 0.0


def pixel_to_normalized(coords: torch.Tensor, H: int, W: int, dim: int = 1) -> torch.Tensor:
    """Pixel coordinates (x, y along ``dim``) -> normalised [-1, 1] (align_corners=True)."""
    x, y = coords.unbind(dim)
    return torch.stack((x * _scale(W) - 1.0, y * _scale(H) - 1.0), dim)


def normalized_to_pixel(coords: torch.Tensor, H: int, W: int, dim: int = 1) -> torch.Tensor:
    """Normalised [-1, 1] coordinates (x, y along ``dim``) -> pixels (align_corners=True)."""
    x, y = coords.unbind(dim)
    return torch.stack(((x + 1.0) * (W - 1) / 2.0, (y + 1.0) * (H - 1) / 2.0), dim)


def base_grid(H: int, W: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 2, H, W) pixel coordinates of every pixel centre: channel 0 = x (column), channel 1 = y (row)."""
    ys, xs = torch.meshgrid(
        torch.arange(H, device=device, dtype=dtype), torch.arange(W, device=device, dtype=dtype), indexing="ij"
    )
    return torch.stack((xs, ys), 0).unsqueeze(0)


def _check_flow(flow: torch.Tensor) -> None:
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be (N, 2, H, W), got {tuple(flow.shape)}")


def flow_to_grid(flow: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) pixel flow -> (N, H, W, 2) normalised sampling grid of ``p + flow(p)`` for grid_sample."""
    _check_flow(flow)
    H, W = flow.shape[-2:]
    coords = base_grid(H, W, device=flow.device, dtype=flow.dtype) + flow
    return pixel_to_normalized(coords, H, W, dim=1).permute(0, 2, 3, 1)


def warp(x: torch.Tensor, flow: torch.Tensor, *, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Backward warp: ``out(p) = x(p + flow(p))``, bilinear (HSTN eq. 6 / SFNet's W(x; F)).

    x: (N, C, H, W); flow: (N, 2, H, W) in pixels of x's grid (N may be 1 in either to broadcast).
    Differentiable w.r.t. x and flow. ``padding_mode``: "zeros" | "border" | "reflection".
    """
    _check_flow(flow)
    if x.dim() != 4 or x.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"x must be (N, C, H, W) on the flow's grid, got {tuple(x.shape)} / {tuple(flow.shape)}")
    if x.shape[0] != flow.shape[0]:
        n = max(x.shape[0], flow.shape[0])
        x, flow = x.expand(n, *x.shape[1:]), flow.expand(n, *flow.shape[1:])
    grid = flow_to_grid(flow.to(x.dtype))
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=ALIGN_CORNERS)


def valid_mask(flow: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) float: 1 where ``p + flow(p)`` lies inside ``[0, W-1] x [0, H-1]`` (no padding involved)."""
    _check_flow(flow)
    H, W = flow.shape[-2:]
    c = base_grid(H, W, device=flow.device, dtype=flow.dtype) + flow
    eps = 1e-6
    ok = (c[:, 0] >= -eps) & (c[:, 0] <= W - 1 + eps) & (c[:, 1] >= -eps) & (c[:, 1] <= H - 1 + eps)
    return ok.unsqueeze(1).to(flow.dtype)


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    if theta.dim() != 3 or theta.shape[-2:] != (2, 3):
        raise ValueError(f"theta must be (N, 2, 3), got {tuple(theta.shape)}")
    last = torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device).expand(theta.shape[0], 1, 3)
    return torch.cat((theta, last), 1)


def _pixel_to_norm_matrix(H: int, W: int, like: torch.Tensor) -> torch.Tensor:
    """3x3 P with [x_n, y_n, 1] = P [x, y, 1] (align_corners=True)."""
    sx, sy = _scale(W), _scale(H)
    return torch.tensor([[sx, 0.0, -1.0], [0.0, sy, -1.0], [0.0, 0.0, 1.0]], dtype=like.dtype, device=like.device)


def theta_to_normalized(theta: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Pixel-coordinate theta (N, 2, 3) -> torch ``affine_grid`` theta (normalised, align_corners=True)."""
    if H < 2 or W < 2:
        raise ValueError("theta conversion needs H, W >= 2")
    P = _pixel_to_norm_matrix(H, W, theta)
    return (P @ _homogeneous(theta) @ torch.linalg.inv(P))[:, :2]


def theta_from_normalized(theta_n: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """torch ``affine_grid`` theta (normalised, align_corners=True) -> pixel-coordinate theta (N, 2, 3)."""
    if H < 2 or W < 2:
        raise ValueError("theta conversion needs H, W >= 2")
    P = _pixel_to_norm_matrix(H, W, theta_n)
    return (torch.linalg.inv(P) @ _homogeneous(theta_n) @ P)[:, :2]


def affine_to_flow(theta: torch.Tensor, H: int, W: int, *, normalized: bool = False) -> torch.Tensor:
    """HSTN eq. 5 converter: ``flow(p) = [[a-1, b, c], [d, e-1, f]] [x, y, 1]^T`` -> (N, 2, H, W) pixels.

    theta: (N, 2, 3), pixel coordinates (default) or, with ``normalized=True``, torch's affine_grid convention
    (align_corners=True), converted first.  Differentiable w.r.t. theta.
    """
    if normalized:
        theta = theta_from_normalized(theta, H, W)
    _homogeneous(theta)  # shape check
    g = base_grid(H, W, device=theta.device, dtype=theta.dtype).flatten(2)  # (1, 2, HW)
    ones = torch.ones_like(g[:, :1])
    eye = torch.eye(2, 3, dtype=theta.dtype, device=theta.device)
    flow = (theta - eye) @ torch.cat((g, ones), 1)  # (N, 2, HW)
    return flow.view(theta.shape[0], 2, H, W)


def compose_affine(theta_a: torch.Tensor, theta_b: torch.Tensor) -> torch.Tensor:
    """Pixel theta of ``phi_a(phi_b(p))`` = A @ B in homogeneous form, (N, 2, 3)."""
    return (_homogeneous(theta_a) @ _homogeneous(theta_b))[:, :2]


def compose(flow_a: torch.Tensor, flow_b: torch.Tensor, *, padding_mode: str = "border") -> torch.Tensor:
    """Flow of ``phi_a(phi_b(p))`` ("apply b, then a" on coordinates): ``b(p) + a(p + b(p))``.

    Equivalently ``warp(x, compose(a, b)) == warp(warp(x, a), b)`` (warp images by a first, then by b).
    ``a`` is sampled bilinearly at ``p + b(p)`` (exact for affine ``a`` inside the image; outside, ``padding_mode``
    decides, "border" by default).
    """
    return flow_b + warp(flow_a, flow_b, padding_mode=padding_mode)


def epe(flow: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean end-point error ``||flow(p) - gt(p)||_2`` over the pixels where ``mask`` > 0 (all when None).

    mask: (N, 1, H, W) or (N, H, W), binary or soft weights; the mean is weighted: ``sum(m e) / sum(m)``
    over the whole batch (0 when the region is empty).
    """
    _check_flow(flow)
    err = torch.linalg.vector_norm(flow - gt, dim=1)  # (N, H, W)
    if mask is None:
        return err.mean()
    m = (mask[:, 0] if mask.dim() == 4 else mask).to(err.dtype).expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(torch.finfo(err.dtype).tiny)
