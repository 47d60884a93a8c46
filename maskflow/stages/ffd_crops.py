"""FFD-crops stage: FFD-Net's training examples (Zhang & He, ICCV 2017, section 3.3 "Training Examples").

From ``proposals`` samples (``input.proposals``: one or more proposal-stage outputs, from any generator — Mask R-CNN
or SharpMask write the same schema) and their ground truth, every proposal whose mask IoU with its best
ground-truth instance is greater than ``crops.min_iou`` (0.5 in the paper) becomes one sample: the image, the
proposal mask and that ground-truth mask cropped with the proposal's tight box enlarged ``crops.enlarge`` (1.6x)
in height and width about its centre, resized to ``crops.size`` x ``crops.size``. The crop box, image id, proposal
index and IoU are kept so a refined mask can be pasted back (:func:`ops.ffd.paste_crops`) for AR evaluation. One output
shard per input shard.

Geometry (COCO's continuous pixel coordinates: pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``):

* tight box: the proposal mask's ``[x, y, w, h]`` (pycocotools ``toBbox``), not the detector's box;
* crop box: same centre, ``w * enlarge`` by ``h * enlarge``; it may reach past the image, where the crop is zero;
* resampling: :func:`ops.ffd.crop_resize` (``roi_align(aligned=True)`` with adaptive sampling: each output cell
  averages about ``box / size`` samples a side, so large boxes are area-averaged, not aliased); masks are resampled
  as {0, 1} floats and thresholded at ``crops.mask_threshold``;
* paste-back is the inverse map (:func:`ops.ffd.paste_crops`): image pixel centre ``p`` reads the crop at
  ``(p - box origin) / box size * size``.

Ground truth: non-crowd annotations only (a crowd region is no instance to register a proposal to). IoU is
recomputed from the masks (pycocotools), not trusted from the input. Counts, per job: ``images``, ``proposals``
(``= proposals_kept + proposals_below_iou`` + proposal rejects), ``images_without_gt``. Rejected with a reason:
an image sample that is missing from its shard, lacks its image/json/proposals, does not decode, or whose masks do not
fit the image (kind ``sample``); a proposal with an empty mask or a degenerate box (kind ``proposal``, key
``<image key>_<input>_<index>``).

``ffd_crop`` samples, key ``<image key>_<input>_<proposal index:04d>`` (``input``: the position of the
proposals' stage output in ``input.proposals``, so two generators' crops of one image never share a key):
    ``<key>.image.png``     RGB 8-bit PNG, ``size`` x ``size``: the image in the crop box
    ``<key>.proposal.png``  grey 8-bit PNG, 255/0: the proposal mask in the crop box
    ``<key>.gt.png``        grey 8-bit PNG, 255/0: the best-matching ground-truth mask in the crop box
    ``<key>.crop.json``     ``image_id`` int, ``file_name`` str, ``source`` str, ``image_height``/``image_width``
                            int, ``input`` int, ``proposal_index`` int (position in the input's score order),
                            ``score`` float,
                            ``model`` str (the proposal generator's weights URI), ``annotation_id`` int (the best
                            ground truth), ``category_id`` int, ``iou`` float, ``tight_box`` and ``crop_box``
                            ``[x, y, w, h]`` float image pixels, ``size`` int, ``enlarge`` float.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from pycocotools import mask as mask_utils

from maskflow.data import schema
from maskflow.data.validate import rle_to_bytes
from maskflow.stage import Count, Plan, Reject, Stage, WorkUnit, plan_shard_units
from maskflow.stages.ffd_crops_config import (  # noqa: F401  (re-exported)
    CropSettings, FFDCropsConfig, FFDCropsInputConfig)
from maskflow.stages.inputs import read_proposals, unit_image_samples
from ops.ffd import crop_resize
from ops.masks import decode_masks, mask_iou

IMAGE = "image.png"
PROPOSAL = "proposal.png"
GT = "gt.png"
CROP = "crop.json"
SCHEMA = schema.SampleSchema("ffd_crop/1", (
    schema.Field(IMAGE, "png", "RGB image crop, size x size"),
    schema.Field(PROPOSAL, "png", "proposal mask crop, 255/0"),
    schema.Field(GT, "png", "best ground-truth mask crop, 255/0"),
    schema.Field(CROP, "json", "ids, IoU, score, tight and crop boxes for paste-back"),
))
EMPTY_PROPOSAL = "empty proposal mask"
DEGENERATE_BOX = "degenerate proposal box"
MASK_CHUNK = 32  # proposal masks decoded at full resolution at a time (bounds memory on large images)


# --------------------------------------------------------------------------------------------- geometry


def crop_boxes(tight: np.ndarray, enlarge: float) -> np.ndarray:
    """(K, 4) ``[x, y, w, h]`` tight boxes -> crop boxes of the same centre, ``enlarge`` times the size."""
    tight = np.asarray(tight, np.float64).reshape(-1, 4)
    centre = tight[:, :2] + tight[:, 2:] / 2
    size = tight[:, 2:] * enlarge
    return np.concatenate([centre - size / 2, size], axis=1)


def crop_rois(boxes: np.ndarray, plane_index: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(K, 4) ``[x, y, w, h]`` crop boxes of planes ``plane_index`` -> the ``(K, 5)`` ``[plane, x1, y1, x2, y2]``
    float32 rows of :func:`ops.ffd.crop_resize` / :func:`ops.ffd.paste_crops`."""
    b = torch.as_tensor(np.asarray(boxes, np.float64).reshape(-1, 4), dtype=torch.float32)
    plane = torch.as_tensor(plane_index).to(torch.float32).reshape(-1, 1)
    return torch.cat([plane, b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


# --------------------------------------------------------------------------------------------- one image


def _box_ok(box) -> bool:
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0


def image_crops(key: str, image: torch.Tensor, meta: dict, props: dict, s: CropSettings, origin: int = 0,
                source: str = "") -> Iterator[dict | Reject | Count]:
    """The crops (and proposal rejects, counts) of one image with checked proposals (:func:`read_proposals`);
    ``origin`` is the position of its proposals' input. Pure: same inputs -> same bytes."""
    H, W = int(image.shape[-2]), int(image.shape[-1])
    yield Count("images")
    segs = props["segmentations"]
    yield Count("proposals", len(segs))
    if not segs:
        return
    raw = [rle_to_bytes(r) for r in segs]
    areas = mask_utils.area(raw)
    tight = mask_utils.toBbox(raw).reshape(-1, 4)
    usable = []
    for i, (area, box) in enumerate(zip(areas, props["boxes"])):
        if area <= 0:
            yield Reject(f"{key}_{origin}_{i:04d}", EMPTY_PROPOSAL, kind="proposal", source=source)
        elif not _box_ok(box):
            yield Reject(f"{key}_{origin}_{i:04d}", f"{DEGENERATE_BOX}: {box}", kind="proposal", source=source)
        else:
            usable.append(i)
    gts = [a for a in meta.get("annotations", []) if not a.get("iscrowd")]
    if not gts:
        yield Count("images_without_gt")
        yield Count("proposals_below_iou", len(usable))
        return
    iou = mask_iou([segs[i] for i in usable], [a["segmentation"] for a in gts], [0] * len(gts))  # (u, G)
    best_gt, best_iou = iou.argmax(1), iou.max(1)
    kept = [j for j in range(len(usable)) if best_iou[j] > s.min_iou]
    yield Count("proposals_below_iou", len(usable) - len(kept))
    yield Count("proposals_kept", len(kept))
    if not kept:
        return

    idx = np.array([usable[j] for j in kept])
    gt_of = best_gt[kept]
    boxes = crop_boxes(tight[idx], s.enlarge)
    same_image = torch.zeros(len(idx), dtype=torch.long)
    pixels = crop_resize(image[None], crop_rois(boxes, same_image), s.size).round().clamp(0, 255).to(torch.uint8)
    gt_planes = torch.from_numpy(decode_masks([a["segmentation"] for a in gts], H, W)).float()[:, None]
    gt_crops = crop_resize(gt_planes, crop_rois(boxes, gt_of), s.size)[:, 0] > s.mask_threshold
    prop_crops = torch.empty((len(idx), s.size, s.size), dtype=torch.bool)
    for start in range(0, len(idx), MASK_CHUNK):
        part = slice(start, start + MASK_CHUNK)
        planes = torch.from_numpy(decode_masks([segs[i] for i in idx[part]], H, W)).float()[:, None]
        rois = crop_rois(boxes[part], torch.arange(len(planes)))
        prop_crops[part] = crop_resize(planes, rois, s.size)[:, 0] > s.mask_threshold
    scores = props["scores"]
    for n, (i, g) in enumerate(zip(idx.tolist(), gt_of.tolist())):
        gt = gts[g]
        yield {
            "__key__": f"{key}_{origin}_{i:04d}",
            IMAGE: schema.png(pixels[n].permute(1, 2, 0).numpy()),
            PROPOSAL: schema.png(prop_crops[n].numpy().astype(np.uint8) * 255),
            GT: schema.png(gt_crops[n].numpy().astype(np.uint8) * 255),
            CROP: {
                "image_id": int(meta["image_id"]),
                "file_name": meta.get("file_name", ""),
                "source": meta.get("source", ""),
                "image_height": H,
                "image_width": W,
                "input": origin,
                "proposal_index": i,
                "score": float(scores[i]),
                "model": str(props.get("model", "")),
                "annotation_id": int(gt["id"]),
                "category_id": int(gt["category_id"]),
                "iou": round(float(best_iou[kept[n]]), 6),
                "tight_box": [float(v) for v in tight[i]],
                "crop_box": [float(v) for v in boxes[n]],
                "size": s.size,
                "enlarge": s.enlarge,
            },
        }


class FFDCropsStage(Stage):
    name = "ffd_crops"
    schema = SCHEMA

    def plan(self) -> Plan:
        return plan_shard_units(self.cfg.input.proposals, self.options, "input.proposals",
                                expect=schema.PROPOSALS_SCHEMA)

    def fingerprint_config(self):
        return {"crops": vars(self.cfg.crops)}

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject | Count]:
        torch.set_num_threads(max(1, int(self.cfg.compute.cpus_per_worker)))
        (shard,) = unit.items
        for item in unit_image_samples(unit, self.options):
            if isinstance(item, Reject):
                yield item
                continue
            raw, image, meta = item
            props, problem = read_proposals(raw, *image.shape[-2:])
            if problem:
                yield Reject(raw["__key__"], problem, source=unit.source)
                continue
            yield from image_crops(raw["__key__"], image, meta, props, self.cfg.crops, shard.origin, unit.source)

    def contact_sheet(self, samples: list[dict]):
        return crop_sheet(samples)


def crop_sheet(samples: list[dict]):
    """Per crop: the image with the proposal drawn | with its ground truth drawn."""
    from maskflow import viz

    tiles = []
    for s in samples[:8]:
        image = schema.load_png(s[IMAGE])
        tiles.append(viz.overlay_masks(image, schema.load_png(s[PROPOSAL])[None] > 0))
        tiles.append(viz.overlay_masks(image, schema.load_png(s[GT])[None] > 0))
    return viz.grid(tiles, columns=4)
