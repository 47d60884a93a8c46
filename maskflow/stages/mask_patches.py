"""Mask-patches stage: DeepMask / SharpMask training windows (Pinheiro et al., NIPS 2015 section 3.1 "Training";
ECCV 2016 section 4), from ``image`` samples (``input.shards``, one output shard per input shard).

A window is a square of the image resampled to ``patch`` x ``patch`` pixels. Its geometry relative to an object
(tight box of the object's mask, centre ``c``, larger side ``m``) is stated in window pixels: ``k = patch / side``
window pixels per image pixel, the object's ``offset = (c - window centre) * k`` and its ``scale = m * k /
canonical`` (``canonical = ceil(patch * 128 / 224)``, DeepMask's 128 px of 224). Distances below are given at a
160 px window, as in the paper, and scaled by ``patch / 160``.

* **positive** (label +1, ``positives_per_object`` per object): ``|offset| <= max_shift`` on each axis (16 px) and
  ``|log2 scale| <= max_scale_log2`` (2^+-0.25), drawn uniformly; the mask target is that object's mask in the
  window (only the centred object: the paper's target);
* **negative** (label -1, ``negatives_per_object`` per object, alternately): *shifted* — offset at least
  ``neg_min_shift`` (32 px) on some axis and at most ``neg_max_shift``, scale jittered as a positive's — or
  *mis-scaled* — ``|log2 scale|`` in ``[neg_min_scale_log2, neg_max_scale_log2]`` (2^+-1 .. 2^+-2), offset jittered
  as a positive's; plus ``background_per_image`` windows anywhere at a pyramid scale (side ``patch / 2**u``, u in
  ``background_scale_log2``). Every negative is *clear*: for no object of the image (crowd regions aside) is it both
  within ``neg_min_shift`` on both axes and within ``2^+-neg_min_scale_log2`` in scale; a draw that is not is redrawn
  (``tries``), then given up (counted ``negatives_unplaced``). Windows between the two definitions are never made.

Draws come from ``numpy.random.default_rng([seed, image_id])``: the same image and seed give the same windows
(whatever the shard or worker). Windows may reach past the image, where they are zero (as in inference, which pads
the image with zeros). Resampling: :func:`ops.ffd.crop_resize` (``roi_align(aligned=True)``, adaptive sampling);
masks are resampled as {0, 1} floats and binarised at ``mask_threshold``.

Counts: ``images``, ``images_other_split`` (not in ``input.split``), ``objects`` (usable), ``objects_too_small``
(larger side below ``min_object_side``), ``crowd``, ``positives``, ``negatives``, ``negatives_unplaced``. Rejected
with a reason: an image sample without its image/json, that does not decode, whose size or masks' size differ from
its meta (kind ``sample``); an annotation whose segmentation is not a valid RLE (``malformed annotation``), whose
mask is empty (``empty mask``) or whose ``bbox`` is not four finite numbers with positive width and height
(``degenerate box``) (kind ``annotation``, key ``<image key>_<annotation id>``).

``mask_patch`` samples, key ``<image key>_a<annotation index:03d>_p<n:02d>`` (positive), ``..._n<n:02d>``
(negative of that object), ``<image key>_bg_<n:02d>`` (background):
    ``<key>.patch.png``   RGB 8-bit PNG, ``patch`` x ``patch``
    ``<key>.mask.png``    grey 8-bit PNG, 255/0: the centred object's mask in the window (positives only)
    ``<key>.patch.json``  ``label`` +1/-1, ``kind`` (``positive`` | ``shifted`` | ``scaled`` | ``background``),
                          ``image_id`` int, ``file_name``/``source`` str, ``image_height``/``image_width`` int,
                          ``annotation_id`` int or null (background), ``source_box`` [x, y, w, h] the object's tight
                          mask box or null, ``window`` [x, y, side, side] image pixels, ``scale`` float or null,
                          ``offset`` [dx, dy] window pixels or null, ``patch`` int, ``canonical_size`` int,
                          ``seed`` int.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterator

import numpy as np
import torch

from maskflow.data import schema
from maskflow.stage import Count, Plan, Reject, Stage, WorkUnit, plan_shard_units
from maskflow.stages.inputs import unit_image_samples
from maskflow.stages.mask_patches_config import (  # noqa: F401  (re-exported)
    MaskPatchesConfig, MaskPatchesInputConfig, PatchSettings)
from ops.ffd import crop_resize
from ops.masks import decode_masks

PATCH = "patch.png"
MASK = "mask.png"
INFO = "patch.json"
SCHEMA = schema.SampleSchema("mask_patch/1", (
    schema.Field(PATCH, "png", "RGB window, patch x patch"),
    schema.Field(MASK, "png", "the centred object's mask in the window, 255/0 (positives only)", optional=True),
    schema.Field(INFO, "json", "label +-1, kind, image id, source box, window, scale, offset"),
))
MALFORMED_ANNOTATION = "malformed annotation"
EMPTY_MASK = "empty mask"
DEGENERATE_BOX = "degenerate box"


# --------------------------------------------------------------------------------------------- geometry


def in_split(image_id: int, split: str, val_fraction: float) -> bool:
    """Whether an image belongs to ``split`` (``all`` | ``train`` | ``val``): crc32 of its id against the fraction."""
    if split == "all":
        return True
    is_val = (zlib.crc32(str(int(image_id)).encode()) % 10000) < val_fraction * 10000
    return is_val == (split == "val")


def window_relation(window: np.ndarray, centres: np.ndarray, sides: np.ndarray, patch: int, canonical: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For a window ``[x, y, side, side]`` and objects (``centres (n, 2)``, larger ``sides (n,)``, image pixels):
    each object's ``offset (n, 2)`` from the window centre and ``log2 scale (n,)``, in window pixels."""
    x, y, side = float(window[0]), float(window[1]), float(window[2])
    k = patch / side
    offset = (np.asarray(centres, np.float64) - [x + side / 2, y + side / 2]) * k
    return offset, np.log2(np.asarray(sides, np.float64) * k / canonical)


def is_clear_negative(window: np.ndarray, centres: np.ndarray, sides: np.ndarray, s: PatchSettings) -> bool:
    """No object is near the window's centre at its canonical scale (module docstring, negatives)."""
    if len(sides) == 0:
        return True
    offset, log_scale = window_relation(window, centres, sides, s.patch, s.canonical_size)
    near = (np.abs(offset).max(axis=1) < s.at_patch(s.neg_min_shift)) & (np.abs(log_scale) < s.neg_min_scale_log2)
    return not bool(near.any())


def object_window(centre: np.ndarray, side: float, offset: np.ndarray, log_scale: float, s: PatchSettings
                  ) -> np.ndarray:
    """The window ``[x, y, w, w]`` in which an object (centre, larger side) has ``offset`` and ``2**log_scale``."""
    k = s.canonical_size * 2.0 ** log_scale / side
    w = s.patch / k
    cx, cy = np.asarray(centre, np.float64) - np.asarray(offset, np.float64) / k
    return np.array([cx - w / 2, cy - w / 2, w, w])


def _shift_beyond(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """An offset uniform over ``[-high, high]^2`` outside the ``[-low, low]^2`` square (rejection sampling)."""
    while True:
        d = rng.uniform(-high, high, 2)
        if np.abs(d).max() >= low:
            return d


def draw_windows(rng: np.random.Generator, centres: np.ndarray, sides: np.ndarray, sources: list[int],
                 height: int, width: int, s: PatchSettings) -> tuple[list[dict], int]:
    """The windows of one image: dicts with ``kind``, ``label``, ``object`` (index into ``centres`` or None),
    ``window``, ``offset``, ``log_scale``; and how many negatives could not be placed. ``sources``: the objects
    positives and object negatives are made for (every object may veto a negative)."""
    shift, shift_neg, shift_max = s.at_patch(s.max_shift), s.at_patch(s.neg_min_shift), s.at_patch(s.neg_max_shift)
    out, unplaced = [], 0
    for j in sources:
        for n in range(s.positives_per_object):
            offset, u = rng.uniform(-shift, shift, 2), rng.uniform(-s.max_scale_log2, s.max_scale_log2)
            out.append({"kind": "positive", "label": 1, "object": j, "n": n, "offset": offset, "log_scale": u,
                        "window": object_window(centres[j], sides[j], offset, u, s)})
        for n in range(s.negatives_per_object):
            kind = "shifted" if n % 2 == 0 else "scaled"
            for _ in range(s.tries):
                if kind == "shifted":
                    offset = _shift_beyond(rng, shift_neg, shift_max)
                    u = rng.uniform(-s.max_scale_log2, s.max_scale_log2)
                else:
                    offset = rng.uniform(-shift, shift, 2)
                    u = rng.uniform(s.neg_min_scale_log2, s.neg_max_scale_log2) * rng.choice([-1.0, 1.0])
                window = object_window(centres[j], sides[j], offset, u, s)
                if is_clear_negative(window, centres, sides, s):
                    out.append({"kind": kind, "label": -1, "object": j, "n": n, "offset": offset, "log_scale": u,
                                "window": window})
                    break
            else:
                unplaced += 1
    low, high = s.background_scale_log2
    for n in range(s.background_per_image):
        for _ in range(s.tries):
            side = s.patch / 2.0 ** rng.uniform(low, high)
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            window = np.array([cx - side / 2, cy - side / 2, side, side])
            if is_clear_negative(window, centres, sides, s):
                out.append({"kind": "background", "label": -1, "object": None, "n": n, "offset": None,
                            "log_scale": None, "window": window})
                break
        else:
            unplaced += 1
    return out, unplaced


# --------------------------------------------------------------------------------------------- one image


def _bbox_ok(box) -> bool:
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        return False
    return len(vals) == 4 and all(math.isfinite(v) for v in vals) and vals[2] > 0 and vals[3] > 0


def usable_annotations(key: str, meta: dict, height: int, width: int, source: str = ""
                       ) -> Iterator[tuple[dict, np.ndarray] | Reject | Count]:
    """``(annotation, its (H, W) bool mask)`` for each non-crowd annotation that is fit to make windows from; a
    :class:`Reject` (kind ``annotation``) for each that is not; ``Count("crowd")`` for crowd regions."""
    for ann in meta.get("annotations", []):
        ann_key = f"{key}_{ann.get('id') if isinstance(ann, dict) else None}"
        if not isinstance(ann, dict) or "id" not in ann or not isinstance(ann.get("segmentation"), dict):
            yield Reject(ann_key, f"{MALFORMED_ANNOTATION}: no id or no RLE segmentation", kind="annotation",
                         source=source)
            continue
        if ann.get("iscrowd"):
            yield Count("crowd")
            continue
        if not _bbox_ok(ann.get("bbox")):
            yield Reject(ann_key, f"{DEGENERATE_BOX}: {ann.get('bbox')}", kind="annotation", source=source)
            continue
        try:
            mask = decode_masks([ann["segmentation"]], height, width)[0].astype(bool)
        except Exception as e:  # noqa: BLE001 - pycocotools raises several kinds for bad counts
            yield Reject(ann_key, f"{MALFORMED_ANNOTATION}: segmentation does not decode ({type(e).__name__}: {e})",
                         kind="annotation", source=source)
            continue
        if not mask.any():
            yield Reject(ann_key, EMPTY_MASK, kind="annotation", source=source)
            continue
        yield ann, mask


def tight_box(mask: np.ndarray) -> list[float]:
    """``[x, y, w, h]`` of a non-empty bool mask (pixel-edge coordinates, as pycocotools' ``toBbox``)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]


def image_patches(key: str, image: torch.Tensor, meta: dict, s: PatchSettings, source: str = ""
                  ) -> Iterator[dict | Reject | Count]:
    """The windows (and annotation rejects, counts) of one checked image. Pure: same inputs -> same bytes."""
    H, W = int(image.shape[-2]), int(image.shape[-1])
    yield Count("images")
    anns, masks = [], []
    for item in usable_annotations(key, meta, H, W, source):
        if isinstance(item, (Reject, Count)):
            yield item
        else:
            anns.append(item[0])
            masks.append(item[1])
    boxes = np.array([tight_box(m) for m in masks], np.float64).reshape(-1, 4)
    centres = boxes[:, :2] + boxes[:, 2:] / 2
    sides = boxes[:, 2:].max(axis=1)
    sources = [j for j in range(len(anns)) if sides[j] >= s.min_object_side]
    yield Count("objects", len(sources))
    yield Count("objects_too_small", len(anns) - len(sources))
    rng = np.random.default_rng([s.seed, int(meta["image_id"])])
    windows, unplaced = draw_windows(rng, centres, sides, sources, H, W, s)
    yield Count("negatives_unplaced", unplaced)
    if not windows:
        return
    rois = torch.tensor([[0.0, w["window"][0], w["window"][1], w["window"][0] + w["window"][2],
                          w["window"][1] + w["window"][3]] for w in windows], dtype=torch.float32)
    pixels = crop_resize(image[None], rois, s.patch).round().clamp(0, 255).to(torch.uint8)
    positive = [i for i, w in enumerate(windows) if w["label"] == 1]
    target = {}
    if positive:
        planes = torch.from_numpy(np.stack([masks[windows[i]["object"]] for i in positive])).float()[:, None]
        pos_rois = rois[positive].clone()
        pos_rois[:, 0] = torch.arange(len(positive), dtype=torch.float32)
        cut = crop_resize(planes, pos_rois, s.patch)[:, 0] > s.mask_threshold
        target = {i: cut[n] for n, i in enumerate(positive)}
    yield Count("positives", len(positive))
    yield Count("negatives", len(windows) - len(positive))
    for i, w in enumerate(windows):
        j = w["object"]
        if j is None:
            name = f"{key}_bg_{w['n']:02d}"
        else:
            name = f"{key}_a{j:03d}_{'p' if w['label'] == 1 else 'n'}{w['n']:02d}"
        sample = {
            "__key__": name,
            PATCH: schema.png(pixels[i].permute(1, 2, 0).numpy()),
            INFO: {
                "label": w["label"],
                "kind": w["kind"],
                "image_id": int(meta["image_id"]),
                "file_name": meta.get("file_name", ""),
                "source": meta.get("source", ""),
                "image_height": H,
                "image_width": W,
                "annotation_id": None if j is None else int(anns[j]["id"]),
                "source_box": None if j is None else [float(v) for v in boxes[j]],
                "window": [float(v) for v in w["window"]],
                "scale": None if j is None else float(2.0 ** w["log_scale"]),
                "offset": None if j is None else [float(v) for v in w["offset"]],
                "patch": s.patch,
                "canonical_size": s.canonical_size,
                "seed": s.seed,
            },
        }
        if i in target:
            sample[MASK] = schema.png(target[i].numpy().astype(np.uint8) * 255)
        yield sample


class MaskPatchesStage(Stage):
    name = "mask_patches"
    schema = SCHEMA

    def plan(self) -> Plan:
        return plan_shard_units(self.cfg.input.shards, self.options, "input.shards", expect=schema.IMAGE_SCHEMA)

    def fingerprint_config(self):
        inp = self.cfg.input
        return {"patches": vars(self.cfg.patches), "split": inp.split, "val_fraction": inp.val_fraction}

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject | Count]:
        torch.set_num_threads(max(1, int(self.cfg.compute.cpus_per_worker)))
        inp = self.cfg.input
        for item in unit_image_samples(unit, self.options):
            if isinstance(item, Reject):
                yield item
                continue
            raw, image, meta = item
            if not in_split(meta["image_id"], inp.split, inp.val_fraction):
                yield Count("images_other_split")
                continue
            yield from image_patches(raw["__key__"], image, meta, self.cfg.patches, unit.source)

    def contact_sheet(self, samples: list[dict]):
        return patch_sheet(samples)


def patch_sheet(samples: list[dict]):
    """Positives with their mask drawn, then negatives as they are (up to 8 each)."""
    from maskflow import viz

    pos = [s for s in samples if MASK in s][:8]
    neg = [s for s in samples if MASK not in s][:8]
    tiles = [viz.overlay_masks(schema.load_png(s[PATCH]), schema.load_png(s[MASK])[None] > 0) for s in pos]
    tiles += [schema.load_png(s[PATCH]) for s in neg]
    return viz.grid(tiles, columns=8) if tiles else None
