"""Affine-pairs stage: synthetic (source, target) training pairs with ground-truth dense flow, from single images.

SFNet (003_4623d347ef58f6a0.txt sec. 4.2) trains on pairs made from one image and a random affine warp of it, the
foreground mask (union of *all* labelled instances, category ignored) warped with the same parameters, augmented by
horizontal flips and colour jitter. HSTN (002_4a8c6362d89f6ac7.txt sec. 4.2) aligns planar images warped by a random
linear transformation plus an elastic deformation: ``pairs.elastic_amplitude > 0`` adds one on top of the affine.

Input is a stage output of ``image`` samples (``input.shards``); one output shard per input shard. An image whose
annotations rasterise to an empty union is rejected (``"image has no foreground"``).

Geometry (the conventions of :mod:`ops.warp`: pixel centres at integer ``(x, y)``, flows ``(2, H, W)`` in pixels,
channel 0 = dx, backward warping ``warp(x, F)(p) = x(p + F(p))``). Source and target share the source's size.

* ``M`` (``affine_s2t``) maps a source pixel to its target location: ``M = T(c + t) R(rot) Sh(shear) S(scale) T(-c)
  Flip``, ``c`` the image centre, ``Flip: x -> W - 1 - x`` when flipped (so a flip is part of the ground truth).
* Elastic (optional): ``D``, a smooth random displacement on the target grid (random control displacements in
  ``[-amplitude, amplitude]`` px every ``elastic_spacing`` px, bicubically interpolated).
* ``phi_t2s(p) = M^-1 (p + D(p))`` (``D = 0`` without elastic): where target pixel ``p`` comes from in the source;
  ``flow_t2s(p) = phi_t2s(p) - p`` and ``target = warp(source, flow_t2s)`` (bilinear, zeros outside the source).
* ``phi_s2t = phi_t2s^-1``, ``flow_s2t(p) = phi_s2t(p) - p`` on the source grid. Affine only: exact (``M``). With
  elastic: ``phi_s2t(p) = q + E``, ``q = M p``, where ``q + E = (id + D)^-1 (q)`` is found at each ``q`` by the
  fixed-point iteration ``E <- -D(q + E)`` (a contraction: the config keeps ``|grad D| <= 0.75``); the max residual
  ``|phi_t2s(phi_s2t(p)) - p|`` over source pixels that land inside the target is recorded in ``pair.json``
  (~3e-4 px on Penn-Fudan at amplitude 8 / spacing 32). The other round trip, ``compose(flow_s2t, flow_t2s)``,
  reads the non-affine ``flow_s2t`` bilinearly between pixels: ~0.15 px max there (exact for affine pairs).
* Valid region: target pixels whose source location is inside the source, ``ops.warp.valid_mask(flow_t2s)``
  (outside it the target image and mask are 0). Likewise ``valid_mask(flow_s2t)`` on the source.
* Masks are warped like the image (bilinear on {0, 1}) and thresholded at 0.5.
* Colour jitter (target only, after the warp; torchvision's ``adjust_brightness``, ``adjust_contrast``,
  ``adjust_saturation`` in that order, each factor uniform in ``[1 - j, 1 + j]``): the geometry check
  ``warp(source, flow_t2s) == target`` holds exactly (to uint8 rounding) only with jitter off.

Reproducibility: every random draw of a sample comes from ``np.random.default_rng([seed, image_id])`` in a fixed
order (affine, flip, jitter, then elastic), so (dataset, image id, ``pairs.seed``) and the settings determine the
sample's bytes; switching elastic or jitter on/off does not change the affine draws.

``pair`` samples (this stage, ``pipelines/affine_pairs.py``), key = the input image's key:
    ``<key>.source.png``       RGB 8-bit PNG, the source image (the input image decoded, re-encoded losslessly)
    ``<key>.target.png``       RGB 8-bit PNG, the target (warped, then colour-jittered)
    ``<key>.source_mask.png``  grey 8-bit PNG, 255 = foreground (union of all instances), 0 = background
    ``<key>.target_mask.png``  grey 8-bit PNG, the source mask warped by ``flow_t2s``, thresholded at 0.5
    ``<key>.flow_t2s.npy``     float32 ``(2, H, W)`` (``numpy.save``): target pixel -> source location, pixels
    ``<key>.flow_s2t.npy``     float32 ``(2, H, W)``: source pixel -> target location, pixels
    ``<key>.pair.json``        ``image_id`` int, ``source`` str (dataset), ``file_name`` str, ``seed`` int,
                               ``height``/``width`` int, ``affine_s2t``/``affine_t2s`` 2x3 float (pixel coordinates,
                               flip included, elastic excluded), ``params``: ``rotation_deg``, ``scale``,
                               ``shear_deg``, ``translation_px`` [tx, ty], ``flip`` bool; ``jitter``: ``brightness``,
                               ``contrast``, ``saturation`` factors (1 = unchanged); ``elastic``: null or
                               ``amplitude_px``, ``spacing_px``, ``inverse_max_residual_px``; ``keypoints`` (only when
                               the image meta has ``keypoints``, a list of [x, y] source pixels): ``source`` k x [x, y],
                               ``target`` k x [x, y] (``phi_s2t`` of each), ``inside`` k bools (target point in the
                               image).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from maskflow.data import schema
from maskflow.data.validate import decode_image
from maskflow.stage import Plan, Reject, Stage, WorkUnit, plan_shard_units
from maskflow.stages.affine_pairs_config import (  # noqa: F401  (re-exported)
    AffinePairsConfig, AffinePairsInputConfig, PairSettings)
from maskflow.stages.inputs import unit_raw_image_samples
from ops import warp as W
from ops.masks import decode_masks

SOURCE = "source.png"
TARGET = "target.png"
SOURCE_MASK = "source_mask.png"
TARGET_MASK = "target_mask.png"
FLOW_T2S = "flow_t2s.npy"
FLOW_S2T = "flow_s2t.npy"
PAIR = "pair.json"
SCHEMA = schema.SampleSchema("pair/1", (
    schema.Field(SOURCE, "png", "RGB source image"),
    schema.Field(TARGET, "png", "RGB target image (warped, jittered)"),
    schema.Field(SOURCE_MASK, "png", "foreground of the source, 255/0"),
    schema.Field(TARGET_MASK, "png", "foreground of the target, 255/0"),
    schema.Field(FLOW_T2S, "npy", "float32 (2, H, W): target pixel -> source location, px"),
    schema.Field(FLOW_S2T, "npy", "float32 (2, H, W): source pixel -> target location, px"),
    schema.Field(PAIR, "json", "geometry, parameters, keypoints (module docstring)"),
))
FIELDS = SCHEMA.suffixes
NO_FOREGROUND = "image has no foreground"
INVERSE_ITERATIONS = 30  # fixed-point steps of the elastic inverse (contraction factor <= 0.75 per step)


# --------------------------------------------------------------------------------------------- geometry


def draw_affine(rng: np.random.Generator, s: PairSettings, height: int, width: int) -> tuple[np.ndarray, dict]:
    """The 3x3 source -> target matrix ``M`` (flip included) and its parameters, drawn from ``rng``."""
    rot = float(rng.uniform(-s.rotation_deg, s.rotation_deg))
    scale = float(rng.uniform(s.scale_min, s.scale_max))
    shear = float(rng.uniform(-s.shear_deg, s.shear_deg))
    tx, ty = rng.uniform(-s.translation, s.translation, 2) * (width, height)
    flip = bool(rng.uniform() < s.flip_prob)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    r, k = math.radians(rot), math.tan(math.radians(shear))
    R = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    Sh = np.array([[1, k, 0], [0, 1, 0], [0, 0, 1]])
    S = np.diag([scale, scale, 1.0])
    F = np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]], float) if flip else np.eye(3)
    M = _translate(cx + tx, cy + ty) @ R @ Sh @ S @ _translate(-cx, -cy) @ F
    params = {"rotation_deg": rot, "scale": scale, "shear_deg": shear, "translation_px": [float(tx), float(ty)],
              "flip": flip}
    return M, params


def _translate(x: float, y: float) -> np.ndarray:
    return np.array([[1.0, 0, x], [0, 1.0, y], [0, 0, 1.0]])


def draw_elastic(rng: np.random.Generator, amplitude: float, spacing: float, height: int, width: int) -> torch.Tensor:
    """A smooth (1, 2, H, W) displacement: control displacements in [-amplitude, amplitude] every ``spacing`` px,
    bicubically interpolated (control points at both image borders)."""
    gh, gw = max(2, math.ceil((height - 1) / spacing) + 1), max(2, math.ceil((width - 1) / spacing) + 1)
    ctrl = torch.from_numpy(rng.uniform(-amplitude, amplitude, (1, 2, gh, gw)).astype(np.float32))
    return torch.nn.functional.interpolate(ctrl, size=(height, width), mode="bicubic", align_corners=True)


def _theta(M: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(M[:2], dtype=np.float32)).unsqueeze(0)


def pair_flows(M: np.ndarray, D: torch.Tensor | None, height: int,
               width: int) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(flow_t2s, flow_s2t, max inverse residual in px or None): both (1, 2, H, W) float32 (module docstring)."""
    Minv = np.linalg.inv(M)
    flow_t2s = W.affine_to_flow(_theta(Minv), height, width)
    flow_s2t = W.affine_to_flow(_theta(M), height, width)
    if D is None:
        return flow_t2s, flow_s2t, None
    lin = torch.from_numpy(Minv[:2, :2].astype(np.float32))
    flow_t2s = flow_t2s + torch.einsum("ij,njhw->nihw", lin, D)  # M^-1 (p + D(p)) - p
    # phi_s2t(p) = q + E with q = M p and E = -D(q + E): iterated at the points q themselves (source grid), so no
    # resampling of E; D is read bilinearly (border-clamped outside the target, where pixels are invalid anyway).
    affine_s2t, E = flow_s2t, torch.zeros_like(flow_s2t)
    for _ in range(INVERSE_ITERATIONS):
        E = -W.warp(D, affine_s2t + E, padding_mode="border")
    flow_s2t = affine_s2t + E
    back = W.compose(flow_t2s, flow_s2t)  # phi_t2s(phi_s2t(p)) - p, ~0
    inside = W.valid_mask(flow_s2t)[:, 0] > 0
    err = torch.linalg.vector_norm(back, dim=1)[inside]
    return flow_t2s, flow_s2t, float(err.max()) if err.numel() else 0.0


def sample_points(flow: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """``p + flow(p)`` at (k, 2) pixel points, bilinear (border padding)."""
    H, Wd = flow.shape[-2:]
    pts = torch.from_numpy(np.asarray(points, np.float32).reshape(1, -1, 1, 2))
    grid = W.pixel_to_normalized(pts, H, Wd, dim=-1)
    f = torch.nn.functional.grid_sample(flow, grid, mode="bilinear", padding_mode="border",
                                        align_corners=W.ALIGN_CORNERS)  # (1, 2, k, 1)
    return np.asarray(points, np.float64).reshape(-1, 2) + f[0, :, :, 0].T.double().numpy()


def jitter(image: torch.Tensor, factors: dict) -> torch.Tensor:
    """SFNet's colour jitter on a uint8 CHW image (brightness, contrast, saturation, in that order)."""
    from torchvision.transforms import functional as TF

    image = TF.adjust_brightness(image, factors["brightness"])
    image = TF.adjust_contrast(image, factors["contrast"])
    return TF.adjust_saturation(image, factors["saturation"])


# --------------------------------------------------------------------------------------------- encoding

png, npy, load_png, load_npy = schema.png, schema.npy, schema.load_png, schema.load_npy


# --------------------------------------------------------------------------------------------- one sample


def make_pair(key: str, image_bytes: bytes, meta: dict, s: PairSettings, source: str = "") -> dict | Reject:
    """The pair sample of one decoded ``image`` sample (or its reject). Pure: same inputs -> same bytes."""
    try:
        image = decode_image(image_bytes)  # (3, H, W) uint8
    except ValueError as e:
        return Reject(key, str(e), source=source)
    H, Wd = int(image.shape[-2]), int(image.shape[-1])
    rles = [a["segmentation"] for a in meta.get("annotations", [])]
    fg = decode_masks(rles, H, Wd).any(0) if rles else np.zeros((H, Wd), bool)
    if not fg.any():
        return Reject(key, NO_FOREGROUND, source=source)

    rng = np.random.default_rng([int(s.seed), int(meta["image_id"])])
    M, params = draw_affine(rng, s, H, Wd)
    factors = {n: float(rng.uniform(1 - getattr(s, n), 1 + getattr(s, n)))
               for n in ("brightness", "contrast", "saturation")}
    D = draw_elastic(rng, s.elastic_amplitude, s.elastic_spacing, H, Wd) if s.elastic_amplitude > 0 else None
    flow_t2s, flow_s2t, residual = pair_flows(M, D, H, Wd)

    stacked = torch.cat((image.float(), torch.from_numpy(fg).float()[None]), 0)[None]  # (1, 4, H, W)
    warped = W.warp(stacked, flow_t2s)[0]
    target = warped[:3].round().clamp(0, 255).to(torch.uint8)
    if any(f != 1.0 for f in factors.values()):
        target = jitter(target, factors)
    target_mask = (warped[3] > 0.5).numpy()

    pair = {
        "image_id": int(meta["image_id"]),
        "source": meta.get("source", source),
        "file_name": meta.get("file_name", ""),
        "seed": int(s.seed),
        "height": H,
        "width": Wd,
        "affine_s2t": M[:2].tolist(),
        "affine_t2s": np.linalg.inv(M)[:2].tolist(),
        "params": params,
        "jitter": factors,
        "elastic": None if D is None else {"amplitude_px": s.elastic_amplitude, "spacing_px": s.elastic_spacing,
                                           "inverse_max_residual_px": residual},
    }
    if meta.get("keypoints"):
        src = np.asarray(meta["keypoints"], np.float64).reshape(-1, 2)
        dst = sample_points(flow_s2t, src)
        inside = (dst[:, 0] >= 0) & (dst[:, 0] <= Wd - 1) & (dst[:, 1] >= 0) & (dst[:, 1] <= H - 1)
        pair["keypoints"] = {"source": src.tolist(), "target": dst.tolist(), "inside": inside.tolist()}
    return {
        "__key__": key,
        SOURCE: png(image.permute(1, 2, 0).numpy()),
        TARGET: png(target.permute(1, 2, 0).numpy()),
        SOURCE_MASK: png(fg.astype(np.uint8) * 255),
        TARGET_MASK: png(target_mask.astype(np.uint8) * 255),
        FLOW_T2S: npy(flow_t2s[0].numpy()),
        FLOW_S2T: npy(flow_s2t[0].numpy()),
        PAIR: pair,
    }


class AffinePairsStage(Stage):
    name = "affine_pairs"
    schema = SCHEMA

    def plan(self) -> Plan:
        return plan_shard_units(self.cfg.input.shards, self.options, "input.shards")

    def fingerprint_config(self):
        return {"pairs": vars(self.cfg.pairs)}

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject]:
        torch.set_num_threads(max(1, int(self.cfg.compute.cpus_per_worker)))
        for sample in unit_raw_image_samples(unit, self.options):
            if isinstance(sample, Reject):
                yield sample
            else:
                yield make_pair(sample["__key__"], sample[schema.IMAGE], schema.loads(sample[schema.META]),
                                self.cfg.pairs, source=unit.source)

    def contact_sheet(self, samples: list[dict]):
        return pair_sheet(samples)


def pair_sheet(samples: list[dict], rows: int = 4):
    """Per sample: source with its mask | target with its mask | flow_t2s colour-coded."""
    from maskflow import viz

    tiles = []
    for s in samples[:rows]:
        tiles.append(viz.overlay_masks(load_png(s[SOURCE]), load_png(s[SOURCE_MASK])[None] > 0))
        tiles.append(viz.overlay_masks(load_png(s[TARGET]), load_png(s[TARGET_MASK])[None] > 0))
        tiles.append(viz.flow_to_rgb(load_npy(s[FLOW_T2S])))
    return viz.grid(tiles, columns=3)
