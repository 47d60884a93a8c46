"""Instance-maps stage: DVIS training and AP^r evaluation samples (004_248feeae1047f7de.txt, sections 4-5).

DVIS regresses one real-valued label per pixel: 0 on background, a distinct positive value per instance, compared
permutation-invariantly, so the ground truth is an instance label map whose numbering carries no meaning, plus a
semantic class map for the classification head. Each ``image`` sample (``input.shards``, one output shard per input
shard) becomes one ``instance_map`` sample, resized as the paper's experiments do (``resize.mode``):

* ``square``: to ``size`` x ``size`` (YOLACT-550 style, aspect not kept);
* ``min_edge``: the shorter side to ``size``, aspect kept (``max_size`` caps the longer side; DVIS-700 style);
* ``none``: the stored size.

Painting and resizing (vectorised over pixels; one Python step per instance):

* instances are painted in decreasing mask area, so a smaller instance lying on a larger one stays visible where
  COCO masks overlap; crowd regions (``iscrowd``) get no instance label and the semantic value :data:`IGNORE`;
* the image is resized bilinearly with antialiasing; the label maps with nearest-neighbour sampling at pixel centres
  (``nearest-exact``), so labels are never blended;
* an instance left with no pixel after resizing is dropped (counted ``instances_vanished``) and the labels are
  renumbered 1..K in painting order.

An image without instances is kept (all background is a valid DVIS target: the binary loss still applies) and
counted ``images_without_instances``. Rejected with a reason: a sample without its image or meta, an image that
does not decode or whose size differs from its meta, a mask whose size differs from its image.

``instance_map`` samples (key = the input image's key)
    ``<key>.image.png``      RGB 8-bit PNG, the resized image (``height`` x ``width``)
    ``<key>.instances.png``  16-bit grey PNG (uint16): 0 background (and crowd), 1..K instances, any order
    ``<key>.semantic.png``   16-bit grey PNG (uint16): 0 background, the COCO ``category_id`` of the instance at
                             each pixel, :data:`IGNORE` (65535) on crowd regions
    ``<key>.json``           ``image_id`` int, ``file_name`` str, ``source`` str, ``height``/``width`` int (stored
                             size), ``original_height``/``original_width`` int, ``scale`` [sy, sx] floats (stored /
                             original: a stored pixel centre ``(x, y)`` is original ``((x + 0.5) / sx - 0.5,
                             (y + 0.5) / sy - 0.5)``), ``instances``: list (label order) of ``label`` int,
                             ``annotation_id`` int, ``category_id`` int, ``area`` int (stored pixels), ``bbox``
                             [x, y, w, h] (stored pixels, tight box of the label's pixels); ``crowd_pixels`` int.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from maskflow.data import schema
from maskflow.stage import Count, Plan, Reject, Stage, WorkUnit, plan_shard_units
from maskflow.stages.instance_maps_config import (  # noqa: F401  (re-exported)
    InstanceMapsConfig, InstanceMapsInputConfig, ResizeConfig)
from maskflow.stages.inputs import unit_image_samples
from ops.masks import decode_masks

IMAGE = "image.png"
INSTANCES = "instances.png"
SEMANTIC = "semantic.png"
META = schema.META
IGNORE = 65535  # semantic value of crowd regions (no instance, not background either)

SCHEMA = schema.SampleSchema("instance_map/1", (
    schema.Field(IMAGE, "png", "RGB image, resized"),
    schema.Field(INSTANCES, "png", "uint16 instance labels: 0 background, 1..K"),
    schema.Field(SEMANTIC, "png", "uint16 category ids, 0 background, 65535 crowd"),
    schema.Field(META, "json", "ids, sizes, scale, instances (label -> annotation, category, area, bbox)"),
))


def target_size(height: int, width: int, cfg: ResizeConfig) -> tuple[int, int]:
    if cfg.mode == "none":
        return height, width
    if cfg.mode == "square":
        return cfg.size, cfg.size
    scale = cfg.size / min(height, width)
    if cfg.max_size is not None and max(height, width) * scale > cfg.max_size:
        scale = cfg.max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def paint(meta: dict, height: int, width: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Full-resolution ``(instances uint16, semantic uint16, painted annotations in label order)``."""
    anns = meta.get("annotations", [])
    instances = np.zeros((height, width), np.uint16)
    semantic = np.zeros((height, width), np.uint16)
    if not anns:
        return instances, semantic, []
    masks = decode_masks([a["segmentation"] for a in anns], height, width).astype(bool)
    crowd = np.zeros((height, width), bool)
    things = []
    for ann, mask in zip(anns, masks):
        if ann.get("iscrowd"):
            crowd |= mask
        else:
            things.append((ann, mask))
    things.sort(key=lambda am: -int(am[1].sum()))  # stable: equal areas keep the annotation order
    for label, (ann, mask) in enumerate(things, 1):
        instances[mask] = label
        semantic[mask] = int(ann["category_id"])
    semantic[crowd & (instances == 0)] = IGNORE
    return instances, semantic, [ann for ann, _ in things]


def resize_maps(image: torch.Tensor, instances: np.ndarray, semantic: np.ndarray,
                size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    if tuple(image.shape[-2:]) == size:
        return image, instances, semantic
    from torchvision.transforms import functional as TF

    image = TF.resize(image, list(size), antialias=True)
    # One nearest-exact resample of both maps (int32 carries uint16 exactly through interpolate's float path).
    maps = torch.from_numpy(np.stack([instances, semantic]).astype(np.int32))[None].float()
    maps = F.interpolate(maps, size=size, mode="nearest-exact")[0].round().to(torch.int32).numpy()
    return image, maps[0].astype(np.uint16), maps[1].astype(np.uint16)


def compact_labels(instances: np.ndarray, painted: list[dict]) -> tuple[np.ndarray, list[dict], int]:
    """Drop labels with no pixel, renumber the rest 1..K (painting order kept); their per-label stats."""
    n = len(painted)
    areas = np.bincount(instances.ravel(), minlength=n + 1)[: n + 1]
    keep = [k for k in range(1, n + 1) if areas[k] > 0]
    lut = np.zeros(n + 1, np.uint16)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.uint16)
    relabelled = lut[instances]
    boxes = ndimage.find_objects(relabelled, max_label=len(keep))  # tight slices per label, in one C pass
    stats = []
    for new, (old, (ys, xs)) in enumerate(zip(keep, boxes), 1):
        ann = painted[old - 1]
        stats.append({"label": new, "annotation_id": int(ann["id"]), "category_id": int(ann["category_id"]),
                      "area": int(areas[old]),
                      "bbox": [xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start]})
    return relabelled, stats, n - len(keep)


def make_instance_map(key: str, image: torch.Tensor, meta: dict, cfg: ResizeConfig
                      ) -> tuple[dict, dict[str, int]]:
    """The ``instance_map`` sample of one decoded image sample, and its counts. Pure: same inputs -> same bytes."""
    H, W = int(image.shape[-2]), int(image.shape[-1])
    instances, semantic, painted = paint(meta, H, W)
    size = target_size(H, W, cfg)
    image, instances, semantic = resize_maps(image, instances, semantic, size)
    instances, stats, vanished = compact_labels(instances, painted)
    h, w = size
    out_meta = {
        "image_id": int(meta["image_id"]),
        "file_name": meta.get("file_name", ""),
        "source": meta.get("source", ""),
        "height": h,
        "width": w,
        "original_height": H,
        "original_width": W,
        "scale": [h / H, w / W],
        "instances": stats,
        "crowd_pixels": int((semantic == IGNORE).sum()),
    }
    sample = {"__key__": key, IMAGE: schema.png(image.permute(1, 2, 0).numpy()), INSTANCES: schema.png(instances),
              SEMANTIC: schema.png(semantic), META: out_meta}
    counts = {"instances": len(stats), "instances_vanished": vanished, "images_without_instances": int(not stats)}
    return sample, counts


class InstanceMapsStage(Stage):
    name = "instance_maps"
    schema = SCHEMA

    def plan(self) -> Plan:
        return plan_shard_units(self.cfg.input.shards, self.options, "input.shards")

    def fingerprint_config(self):
        return {"resize": vars(self.cfg.resize)}

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject | Count]:
        torch.set_num_threads(max(1, int(self.cfg.compute.cpus_per_worker)))
        for item in unit_image_samples(unit, self.options):
            if isinstance(item, Reject):
                yield item
                continue
            raw, image, meta = item
            sample, counts = make_instance_map(raw["__key__"], image, meta, self.cfg.resize)
            for name, value in counts.items():
                yield Count(name, value)
            yield sample

    def contact_sheet(self, samples: list[dict]):
        return instance_map_sheet(samples)


def instance_map_sheet(samples: list[dict]):
    """Per sample: the image | its instance labels in colours."""
    from maskflow import viz

    tiles = []
    for s in samples[:6]:
        tiles.append(viz.to_rgb(schema.load_png(s[IMAGE])))
        tiles.append(viz.label_map_to_rgb(schema.load_png(s[INSTANCES]).astype(np.int64)))
    return viz.grid(tiles, columns=4)
