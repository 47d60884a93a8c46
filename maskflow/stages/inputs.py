"""Reading ``image`` / ``proposals`` samples back from shards, with the checks every consuming stage makes.

A stage that reads another stage's output cannot trust it blindly (a shard may have been copied badly, or written by
another version): each sample must have its image and meta, the image must decode to the size its meta states, and
every instance mask must have that size too. A sample that fails becomes a :class:`~maskflow.stage.Reject` with the
reason, and the job goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from maskflow.data import schema
from maskflow.data.validate import decode_image
from maskflow.stage import LACKS_IMAGE_OR_META, Reject, WorkUnit, iter_unit_shards
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

if TYPE_CHECKING:
    import torch


def mask_size_problem(meta: dict, height: int, width: int) -> str | None:
    """Why the meta's masks do not fit an ``height`` x ``width`` image (None: they do)."""
    for ann in meta.get("annotations", []):
        size = list(ann.get("segmentation", {}).get("size", []))
        if size != [height, width]:
            return f"mask size {size} differs from image size {[height, width]} (annotation {ann.get('id')})"
    return None


def proposals_problem(props: dict, height: int, width: int) -> str | None:
    """Why a ``proposals.json`` entry is unusable for an ``height`` x ``width`` image (None: it is usable)."""
    if not isinstance(props, dict):
        return "malformed proposals: not a dict"
    segs, boxes, scores = props.get("segmentations"), props.get("boxes"), props.get("scores")
    if not (isinstance(segs, list) and isinstance(boxes, list) and isinstance(scores, list)):
        return "malformed proposals: segmentations, boxes and scores must be lists"
    if not len(segs) == len(boxes) == len(scores):
        return f"malformed proposals: {len(segs)} masks, {len(boxes)} boxes, {len(scores)} scores"
    for seg in segs:
        if not isinstance(seg, dict) or list(seg.get("size", [])) != [height, width]:
            return f"proposal mask size {seg.get('size') if isinstance(seg, dict) else None} differs from image " \
                   f"size {[height, width]}"
    return None


LACKS_PROPOSALS = "sample lacks its proposals.json entry"


def read_proposals(sample: dict, height: int, width: int) -> tuple[dict | None, str | None]:
    """``(proposals, None)`` from a raw ``proposals`` sample, or ``(None, reason)``."""
    if schema.PROPOSALS not in sample:
        return None, LACKS_PROPOSALS
    try:
        props = schema.loads(sample[schema.PROPOSALS])
    except ValueError as e:
        return None, f"malformed proposals: {e}"
    problem = proposals_problem(props, height, width)
    return (None, problem) if problem else (props, None)


def open_image_sample(sample: dict, source: str = "") -> tuple[torch.Tensor, dict] | Reject:
    """``(image (3, H, W) uint8, meta)`` of a raw ``image`` sample, or its reject."""
    key = sample["__key__"]
    if schema.IMAGE not in sample or schema.META not in sample:
        return Reject(key, LACKS_IMAGE_OR_META, source=source)
    try:
        meta = schema.loads(sample[schema.META])
    except ValueError as e:
        return Reject(key, f"malformed sample json: {e}", source=source)
    if not isinstance(meta, dict) or not isinstance(meta.get("annotations", []), list):
        return Reject(key, "malformed sample json: not an image meta dict", source=source)
    try:
        image = decode_image(sample[schema.IMAGE])
    except ValueError as e:
        return Reject(key, str(e), source=source)
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if (meta.get("height"), meta.get("width")) != (height, width):
        return Reject(key, f"image is {height}x{width} but its meta says {meta.get('height')}x{meta.get('width')}",
                      source=source)
    problem = mask_size_problem(meta, height, width)
    if problem:
        return Reject(key, problem, source=source)
    return image, meta


def unit_raw_image_samples(unit: WorkUnit, options: StorageOptions = DEFAULT_OPTIONS) -> Iterator[dict | Reject]:
    """Raw samples (entries still bytes) of a unit planned by ``plan_shard_units`` that have an image and a meta;
    rejects for the rest. For stages that decode the image their own way."""
    for sample in iter_unit_shards(unit, options):
        if isinstance(sample, Reject):
            yield sample
        elif schema.IMAGE not in sample or schema.META not in sample:
            yield Reject(sample["__key__"], LACKS_IMAGE_OR_META, source=unit.source)
        else:
            yield sample


def unit_image_samples(unit: WorkUnit, options: StorageOptions = DEFAULT_OPTIONS
                       ) -> Iterator[tuple[dict, torch.Tensor, dict] | Reject]:
    """``(raw sample, image, meta)`` for each good sample of a unit planned by ``plan_shard_units``; rejects for the
    rest (including samples its input shard's manifest lists but the shard lacks)."""
    for sample in iter_unit_shards(unit, options):
        if isinstance(sample, Reject):
            yield sample
            continue
        opened = open_image_sample(sample, unit.source)
        yield opened if isinstance(opened, Reject) else (sample, *opened)
