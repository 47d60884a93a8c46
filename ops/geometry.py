"""Random planar warps with exact ground-truth flows: affine matrices, smooth elastic fields and their inverses.

The geometry behind synthetic image pairs: SFNet (Lee et al., CVPR 2019, sec. 4.2) trains on an image and a random
affine warp of it; HSTN (Shu et al., "Hierarchical Spatial Transformer Network", 2018, sec. 4.2) aligns planar face
images warped by a random linear transformation plus an elastic deformation. The affine-pairs stage
(:mod:`maskflow.stages.affine_pairs`) writes such pairs to shards; a trainer can draw the same warps on the fly.
numpy + torch only, no I/O.

Conventions (:mod:`ops.warp`'s): pixel centres at integer ``(x, y)``, x right, y down; flows ``(N, 2, H, W)`` in
pixels, channel 0 = dx, channel 1 = dy; backward warping ``warp(x, F)(p) = x(p + F(p))`` with
``grid_sample(align_corners=True)``. Source and target share one ``H x W`` size.

* ``M`` (:func:`affine_matrix`, 3x3 homogeneous, float64) maps a **source** pixel to its **target** location:
  ``M = T(c + t) R(rot) Sh(shear) S(scale) T(-c) Flip`` with ``c = ((W-1)/2, (H-1)/2)`` the image centre, ``Sh`` an
  x-shear ``[[1, tan(shear)], [0, 1]]``, and ``Flip: x -> W - 1 - x`` when flipped (a flip is part of the ground
  truth: the target is mirrored relative to the source).
* Elastic (optional, :func:`draw_elastic`): ``D``, a smooth random displacement ``(1, 2, H, W)`` on the target grid
  (control displacements uniform in ``[-amplitude, amplitude]`` px every ``spacing`` px, bicubically interpolated with
  control points on both borders). ``(id + D)`` is invertible when ``|grad D| < 1``; ``amplitude <= spacing / 4``
  keeps ``|grad D| <= 0.75`` (bicubic overshoot included), which is what makes the inverse below converge.
* ``phi_t2s(p) = M^-1 (p + D(p))`` (``D = 0`` without elastic): where target pixel ``p`` comes from in the source;
  ``flow_t2s(p) = phi_t2s(p) - p``, and ``target = warp(source, flow_t2s)``.
* ``phi_s2t = phi_t2s^-1``, ``flow_s2t(p) = phi_s2t(p) - p`` on the source grid. Affine only: exact (``M``). With
  elastic: ``phi_s2t(p) = q + E`` with ``q = M p`` and ``q + E = (id + D)^-1 (q)``, found at each ``q`` by the
  fixed-point iteration ``E <- -D(q + E)`` (:func:`invert_displacement`; a contraction by ``|grad D| <= 0.75`` per
  step, so 30 steps leave ``0.75^30 ~ 2e-4`` of the initial error). :func:`pair_flows` reports the max residual
  ``|phi_t2s(phi_s2t(p)) - p|`` over source pixels that land inside the target.

Reproducibility: every function that draws takes a ``numpy.random.Generator`` and draws in a fixed order, so the
caller's seed determines the warp. :func:`draw_affine` draws rotation, scale, shear, translation (x, y), flip.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ops import warp as W

__all__ = [
    "INVERSE_ITERATIONS",
    "affine_matrix",
    "draw_affine",
    "draw_elastic",
    "invert_displacement",
    "pair_flows",
    "sample_points",
]

INVERSE_ITERATIONS = 30  # fixed-point steps of the elastic inverse (contraction factor <= 0.75 per step)


def _translate(x: float, y: float) -> np.ndarray:
    return np.array([[1.0, 0, x], [0, 1.0, y], [0, 0, 1.0]])


def affine_matrix(height: int, width: int, *, rotation_deg: float = 0.0, scale: float = 1.0, shear_deg: float = 0.0,
                  translation_px: tuple[float, float] = (0.0, 0.0), flip: bool = False) -> np.ndarray:
    """The 3x3 float64 source -> target matrix ``M = T(c + t) R Sh S T(-c) Flip`` (module docstring), pixels.

    A positive ``rotation_deg`` turns the image clockwise on screen (y points down: x turns towards y); ``scale`` > 1
    enlarges; ``shear_deg`` is the x-shear angle; ``translation_px`` = ``(tx, ty)`` moves the centre; all about the
    image centre, applied right to left (flip first).
    """
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    r, k = math.radians(rotation_deg), math.tan(math.radians(shear_deg))
    R = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    Sh = np.array([[1, k, 0], [0, 1, 0], [0, 0, 1]])
    S = np.diag([scale, scale, 1.0])
    Flip = np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]], float) if flip else np.eye(3)
    tx, ty = translation_px
    return _translate(cx + tx, cy + ty) @ R @ Sh @ S @ _translate(-cx, -cy) @ Flip


def draw_affine(rng: np.random.Generator, height: int, width: int, *, rotation_deg: float = 30.0,
                scale_min: float = 0.8, scale_max: float = 1.2, shear_deg: float = 10.0, translation: float = 0.1,
                flip_prob: float = 0.5) -> tuple[np.ndarray, dict]:
    """A random ``M`` (:func:`affine_matrix`) and its parameters, drawn from ``rng`` in this order: rotation
    uniform in ``[-rotation_deg, rotation_deg]``, isotropic scale in ``[scale_min, scale_max]``, shear angle in
    ``[-shear_deg, shear_deg]``, translation ``(tx, ty)`` in ``[-translation, translation] * (W, H)`` px, and a
    horizontal flip with probability ``flip_prob``.

    Returns ``(M, params)`` with ``params`` = ``rotation_deg``, ``scale``, ``shear_deg``, ``translation_px``
    ``[tx, ty]``, ``flip`` (plain Python values, JSON-ready).
    """
    rot = float(rng.uniform(-rotation_deg, rotation_deg))
    scale = float(rng.uniform(scale_min, scale_max))
    shear = float(rng.uniform(-shear_deg, shear_deg))
    tx, ty = rng.uniform(-translation, translation, 2) * (width, height)
    flip = bool(rng.uniform() < flip_prob)
    params = {"rotation_deg": rot, "scale": scale, "shear_deg": shear, "translation_px": [float(tx), float(ty)],
              "flip": flip}
    M = affine_matrix(height, width, rotation_deg=rot, scale=scale, shear_deg=shear, translation_px=(tx, ty),
                      flip=flip)
    return M, params


def draw_elastic(rng: np.random.Generator, amplitude: float, spacing: float, height: int, width: int) -> torch.Tensor:
    """A smooth ``(1, 2, H, W)`` float32 displacement in px: control displacements uniform in ``[-amplitude,
    amplitude]`` every ``spacing`` px (at least 2 per axis, on both borders), bicubically interpolated
    (align_corners=True). Keep ``amplitude <= spacing / 4`` for an invertible ``id + D``."""
    gh, gw = max(2, math.ceil((height - 1) / spacing) + 1), max(2, math.ceil((width - 1) / spacing) + 1)
    ctrl = torch.from_numpy(rng.uniform(-amplitude, amplitude, (1, 2, gh, gw)).astype(np.float32))
    return F.interpolate(ctrl, size=(height, width), mode="bicubic", align_corners=True)


def invert_displacement(displacement: torch.Tensor, at: torch.Tensor | None = None,
                        iterations: int = INVERSE_ITERATIONS) -> torch.Tensor:
    """``E`` with ``(id + D)^-1 (q) = q + E`` at the points ``q = p + at(p)`` (``at = 0``: ``D``'s own grid).

    ``displacement`` ``D`` and ``at`` are ``(N, 2, H, W)`` pixel fields on the same grid; the result has ``at``'s
    shape. Fixed-point iteration ``E <- -D(q + E)`` (``D`` read bilinearly, border-clamped outside its grid);
    it converges when ``|grad D| < 1`` (by the factor ``|grad D|`` per step). Evaluating at the points ``q``
    themselves, rather than inverting on ``D``'s grid and resampling, avoids an interpolation error.
    """
    at = torch.zeros_like(displacement) if at is None else at
    E = torch.zeros_like(at)
    for _ in range(iterations):
        E = -W.warp(displacement, at + E, padding_mode="border")
    return E


def _theta(M: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(M[:2], dtype=np.float32)).unsqueeze(0)


def pair_flows(M: np.ndarray, D: torch.Tensor | None, height: int,
               width: int) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """``(flow_t2s, flow_s2t, residual)`` of the warp ``phi_t2s(p) = M^-1 (p + D(p))`` (module docstring).

    Both flows are ``(1, 2, H, W)`` float32 pixels: ``flow_t2s`` on the target grid, ``flow_s2t`` on the source grid.
    ``residual`` is ``None`` for an affine warp (``D is None``; both flows exact), else the max of
    ``|phi_t2s(phi_s2t(p)) - p|`` in px over source pixels whose ``phi_s2t(p)`` is inside the target.
    """
    Minv = np.linalg.inv(M)
    flow_t2s = W.affine_to_flow(_theta(Minv), height, width)
    flow_s2t = W.affine_to_flow(_theta(M), height, width)
    if D is None:
        return flow_t2s, flow_s2t, None
    lin = torch.from_numpy(Minv[:2, :2].astype(np.float32))
    flow_t2s = flow_t2s + torch.einsum("ij,njhw->nihw", lin, D)  # M^-1 (p + D(p)) - p
    flow_s2t = flow_s2t + invert_displacement(D, flow_s2t)  # q + E, q = M p
    back = W.compose(flow_t2s, flow_s2t)  # phi_t2s(phi_s2t(p)) - p, ~0
    inside = W.valid_mask(flow_s2t)[:, 0] > 0
    err = torch.linalg.vector_norm(back, dim=1)[inside]
    return flow_t2s, flow_s2t, float(err.max()) if err.numel() else 0.0


def sample_points(flow: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """``p + flow(p)`` at ``(K, 2)`` pixel points ``(x, y)`` of a ``(1, 2, H, W)`` flow: ``(K, 2)`` float64.

    The flow is read bilinearly (align_corners=True) and border-clamped outside the grid; e.g. ``flow_s2t`` carries
    source keypoints to the target.
    """
    H, Wd = flow.shape[-2:]
    pts = torch.from_numpy(np.asarray(points, np.float32).reshape(1, -1, 1, 2))
    grid = W.pixel_to_normalized(pts, H, Wd, dim=-1)
    f = F.grid_sample(flow, grid, mode="bilinear", padding_mode="border", align_corners=W.ALIGN_CORNERS)  # (1, 2, K, 1)
    return np.asarray(points, np.float64).reshape(-1, 2) + f[0, :, :, 0].T.double().numpy()
