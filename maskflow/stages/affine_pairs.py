"""Affine-pairs stage: synthetic (source, target) training pairs with ground-truth dense flow, from single images.

SFNet (Lee et al., CVPR 2019, sec. 4.2) trains on pairs made from one image and a random affine warp of it, the
foreground mask (union of *all* labelled instances, category ignored) warped with the same parameters, augmented by
horizontal flips and colour jitter. HSTN (Shu et al., "Hierarchical Spatial Transformer Network", 2018, sec. 4.2)
aligns planar face images warped by a random linear transformation plus an elastic deformation:
``pairs.elastic_amplitude > 0`` adds one on top of the affine (``conf/affine_pairs/hstn_faces.yaml``).

Input is a stage output of ``image`` samples (``input.shards``); one output shard per input shard. An image whose
annotations rasterise to an empty union is rejected (``"image has no foreground"``), once for all its pairs.

Several pairs per image: ``pairs.per_image = n`` makes ``n`` pairs of every image, each an independent draw of the
warp (and jitter), so a training epoch over the output sees ``n`` different warps of each image rather than one fixed
pair. With ``n = 1`` (the default) the output is exactly that of the stage before the setting existed.

Geometry: :mod:`ops.geometry` (``M`` = ``affine_s2t`` maps a source pixel to its target location, flip included;
optional elastic ``D`` on the target grid; ``phi_t2s(p) = M^-1 (p + D(p))``; ``flow_s2t`` its inverse, numerical
with elastic, with the max inverse residual recorded), in the conventions of :mod:`ops.warp`: pixel centres at
integer ``(x, y)``, flows ``(2, H, W)`` in pixels, channel 0 = dx, backward warping ``warp(x, F)(p) = x(p + F(p))``.
Source and target share the source's size.

* ``target = warp(source, flow_t2s)`` (bilinear, zeros outside the source); the residual of the elastic inverse is
  ~3e-4 px on Penn-Fudan at amplitude 8 / spacing 32. The other round trip, ``compose(flow_s2t, flow_t2s)``, reads
  the non-affine ``flow_s2t`` bilinearly between pixels: ~0.15 px max there (exact for affine pairs).
* Valid region: target pixels whose source location is inside the source, ``ops.warp.valid_mask(flow_t2s)``
  (outside it the target image and mask are 0). Likewise ``valid_mask(flow_s2t)`` on the source.
* Masks are warped like the image (bilinear on {0, 1}) and thresholded at 0.5.
* Colour jitter (target only, after the warp; torchvision's ``adjust_brightness``, ``adjust_contrast``,
  ``adjust_saturation`` in that order, each factor uniform in ``[1 - j, 1 + j]``): the geometry check
  ``warp(source, flow_t2s) == target`` holds exactly (to uint8 rounding) only with jitter off.
* Keypoints: when the image meta has ``keypoints`` (a list of ``[x, y]`` source pixels, e.g. the dlib face
  landmarks of ``maskflow.data.convert.dlib_faces_to_coco``), each is carried to the target by ``flow_s2t``.

Reproducibility: every random draw of pair ``k`` of an image comes from ``np.random.default_rng([seed, image_id,
k])`` — ``[seed, image_id]`` for ``k = 0`` — in a fixed order (affine, flip, jitter, then elastic), so (dataset,
image id, ``pairs.seed``, ``k``) and the settings determine the sample's bytes; switching elastic or jitter on/off
does not change the affine draws, and pair 0 of a ``per_image = n`` run is byte for byte the pair of a
``per_image = 1`` run (only its key differs).

``pair`` samples (this stage, ``pipelines/affine_pairs.py``), key = the input image's key when ``per_image = 1``,
else ``<image key>_<k:03d>`` for ``k = 0 .. per_image - 1``:
    ``<key>.source.png``       RGB 8-bit PNG, the source image (the input image decoded, re-encoded losslessly)
    ``<key>.target.png``       RGB 8-bit PNG, the target (warped, then colour-jittered)
    ``<key>.source_mask.png``  grey 8-bit PNG, 255 = foreground (union of all instances), 0 = background
    ``<key>.target_mask.png``  grey 8-bit PNG, the source mask warped by ``flow_t2s``, thresholded at 0.5
    ``<key>.flow_t2s.npy``     float32 ``(2, H, W)`` (``numpy.save``): target pixel -> source location, pixels
    ``<key>.flow_s2t.npy``     float32 ``(2, H, W)``: source pixel -> target location, pixels
    ``<key>.pair.json``        ``image_id`` int, ``source`` str (dataset), ``file_name`` str, ``seed`` int,
                               ``pair_index`` int (only for ``k >= 1``: absent means pair 0),
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

from typing import Iterator

import numpy as np
import torch

from maskflow.data import schema
from maskflow.data.validate import decode_image
from maskflow.stage import Plan, Reject, Stage, WorkUnit, plan_shard_units
from maskflow.stages.affine_pairs_config import (  # noqa: F401  (re-exported)
    AffinePairsConfig, AffinePairsInputConfig, PairSettings)
from maskflow.stages.inputs import unit_raw_image_samples
from ops import warp
from ops.geometry import draw_affine, draw_elastic, pair_flows, sample_points
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


# --------------------------------------------------------------------------------------------- one sample


def jitter(image: torch.Tensor, factors: dict) -> torch.Tensor:
    """SFNet's colour jitter on a uint8 CHW image (brightness, contrast, saturation, in that order)."""
    from torchvision.transforms import functional as TF

    image = TF.adjust_brightness(image, factors["brightness"])
    image = TF.adjust_contrast(image, factors["contrast"])
    return TF.adjust_saturation(image, factors["saturation"])


def pair_key(image_key: str, index: int, per_image: int) -> str:
    """The key of pair ``index`` of an image: the image's key alone when it has one pair (``per_image = 1``)."""
    return image_key if per_image == 1 else f"{image_key}_{index:03d}"


def pair_rng(seed: int, image_id: int, index: int) -> np.random.Generator:
    """The generator of pair ``index`` of an image. Pair 0 keeps the entropy ``[seed, image_id]`` the stage used
    before ``per_image`` existed (stated, not left to numpy's padding of short seeds), so its bytes are unchanged."""
    return np.random.default_rng([int(seed), int(image_id)] + ([int(index)] if index else []))


def _foreground(key: str, image_bytes: bytes, meta: dict, source: str) -> tuple[torch.Tensor, np.ndarray] | Reject:
    """The decoded image (3, H, W) uint8 and the union of its instance masks (H, W) bool, or the image's reject."""
    try:
        image = decode_image(image_bytes)
    except ValueError as e:
        return Reject(key, str(e), source=source)
    height, width = int(image.shape[-2]), int(image.shape[-1])
    rles = [a["segmentation"] for a in meta.get("annotations", [])]
    fg = decode_masks(rles, height, width).any(0) if rles else np.zeros((height, width), bool)
    if not fg.any():
        return Reject(key, NO_FOREGROUND, source=source)
    return image, fg


def _pair_sample(key: str, image: torch.Tensor, fg: np.ndarray, meta: dict, s: PairSettings, index: int,
                 source: str) -> dict:
    height, width = int(image.shape[-2]), int(image.shape[-1])
    rng = pair_rng(s.seed, meta["image_id"], index)
    M, params = draw_affine(rng, height, width, rotation_deg=s.rotation_deg, scale_min=s.scale_min,
                            scale_max=s.scale_max, shear_deg=s.shear_deg, translation=s.translation,
                            flip_prob=s.flip_prob)
    factors = {n: float(rng.uniform(1 - getattr(s, n), 1 + getattr(s, n)))
               for n in ("brightness", "contrast", "saturation")}
    D = draw_elastic(rng, s.elastic_amplitude, s.elastic_spacing, height, width) if s.elastic_amplitude > 0 else None
    flow_t2s, flow_s2t, residual = pair_flows(M, D, height, width)

    stacked = torch.cat((image.float(), torch.from_numpy(fg).float()[None]), 0)[None]  # (1, 4, H, W)
    warped = warp.warp(stacked, flow_t2s)[0]
    target = warped[:3].round().clamp(0, 255).to(torch.uint8)
    if any(f != 1.0 for f in factors.values()):
        target = jitter(target, factors)
    target_mask = (warped[3] > 0.5).numpy()

    pair = {
        "image_id": int(meta["image_id"]),
        "source": meta.get("source", source),
        "file_name": meta.get("file_name", ""),
        "seed": int(s.seed),
        "height": height,
        "width": width,
        "affine_s2t": M[:2].tolist(),
        "affine_t2s": np.linalg.inv(M)[:2].tolist(),
        "params": params,
        "jitter": factors,
        "elastic": None if D is None else {"amplitude_px": s.elastic_amplitude, "spacing_px": s.elastic_spacing,
                                           "inverse_max_residual_px": residual},
    }
    if index:
        pair["pair_index"] = int(index)
    if meta.get("keypoints"):
        src = np.asarray(meta["keypoints"], np.float64).reshape(-1, 2)
        dst = sample_points(flow_s2t, src)
        inside = (dst[:, 0] >= 0) & (dst[:, 0] <= width - 1) & (dst[:, 1] >= 0) & (dst[:, 1] <= height - 1)
        pair["keypoints"] = {"source": src.tolist(), "target": dst.tolist(), "inside": inside.tolist()}
    return {
        "__key__": key,
        SOURCE: schema.png(image.permute(1, 2, 0).numpy()),
        TARGET: schema.png(target.permute(1, 2, 0).numpy()),
        SOURCE_MASK: schema.png(fg.astype(np.uint8) * 255),
        TARGET_MASK: schema.png(target_mask.astype(np.uint8) * 255),
        FLOW_T2S: schema.npy(flow_t2s[0].numpy()),
        FLOW_S2T: schema.npy(flow_s2t[0].numpy()),
        PAIR: pair,
    }


def make_pairs(key: str, image_bytes: bytes, meta: dict, s: PairSettings, source: str = "") -> list[dict] | Reject:
    """The ``s.per_image`` pair samples of one ``image`` sample (or its one reject). Pure: same inputs -> same
    bytes. The image and its foreground are decoded once for all its pairs."""
    decoded = _foreground(key, image_bytes, meta, source)
    if isinstance(decoded, Reject):
        return decoded
    image, fg = decoded
    return [_pair_sample(pair_key(key, k, s.per_image), image, fg, meta, s, k, source) for k in range(s.per_image)]


def make_pair(key: str, image_bytes: bytes, meta: dict, s: PairSettings, source: str = "",
              index: int = 0) -> dict | Reject:
    """Pair ``index`` of one ``image`` sample, keyed ``key`` as given (or the image's reject)."""
    decoded = _foreground(key, image_bytes, meta, source)
    return decoded if isinstance(decoded, Reject) else _pair_sample(key, *decoded, meta, s, index, source)


class AffinePairsStage(Stage):
    name = "affine_pairs"
    schema = SCHEMA

    def plan(self) -> Plan:
        return plan_shard_units(self.cfg.input.shards, self.options, "input.shards")

    def fingerprint_config(self):
        pairs = dict(vars(self.cfg.pairs))
        if pairs["per_image"] == 1:  # the output of one pair per image predates the setting: its fingerprint stays
            del pairs["per_image"]
        return {"pairs": pairs}

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject]:
        torch.set_num_threads(max(1, int(self.cfg.compute.cpus_per_worker)))
        for sample in unit_raw_image_samples(unit, self.options):
            if isinstance(sample, Reject):
                yield sample
                continue
            pairs = make_pairs(sample["__key__"], sample[schema.IMAGE], schema.loads(sample[schema.META]),
                               self.cfg.pairs, source=unit.source)
            yield from [pairs] if isinstance(pairs, Reject) else pairs

    def contact_sheet(self, samples: list[dict]):
        return pair_sheet(samples)


def pair_sheet(samples: list[dict], rows: int = 4):
    """Per sample: source with its mask | target with its mask | flow_t2s colour-coded."""
    from maskflow import viz

    tiles = []
    for s in samples[:rows]:
        tiles.append(viz.overlay_masks(schema.load_png(s[SOURCE]), schema.load_png(s[SOURCE_MASK])[None] > 0))
        tiles.append(viz.overlay_masks(schema.load_png(s[TARGET]), schema.load_png(s[TARGET_MASK])[None] > 0))
        tiles.append(viz.flow_to_rgb(schema.load_npy(s[FLOW_T2S])))
    return viz.grid(tiles, columns=3)
