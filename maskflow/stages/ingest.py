"""Ingest stage: a COCO instances dataset (local or s3://) becomes ``image`` samples in WebDataset shards.

Every input is validated in the worker: the image must exist and decode to the size the annotation file states;
each annotation must rasterise to a non-empty mask inside the image (see :mod:`maskflow.data.validate`). A bad image
rejects its sample; a bad annotation rejects only itself (kind ``annotation``), the image keeps its other instances.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from maskflow import storage
from maskflow.config import Uri, require
from maskflow.data import schema
from maskflow.data.coco import image_records, load_coco_json
from maskflow.data.validate import clean_annotation, decode_image
from maskflow.stage import Count, Plan, Reject, Stage, StageJobConfig, WorkUnit, batched
from maskflow.storage import StorageOptions


@dataclass
class CocoInputConfig:
    annotations: Uri = ""  # COCO instances json (local path or s3://)
    images: Uri = ""  # directory the json's file_name entries are relative to
    name: str = "coco"  # dataset name recorded in each sample's `source`

    def validate(self) -> None:
        require(bool(self.annotations), "annotations", "required: a COCO instances json URI")
        require(bool(self.images), "images", "required: the images directory URI")


@dataclass
class IngestConfig(StageJobConfig):
    input: CocoInputConfig = field(default_factory=CocoInputConfig)


def image_sample(record: dict, source: str, options: StorageOptions) -> Iterator[dict | Reject | Count]:
    """Validate one COCO image record and yield its sample (or its reject), plus annotation rejects and counts."""
    key = schema.sample_key(record["image_id"])
    try:
        data = storage.read_bytes(record["file_uri"], options)
    except FileNotFoundError:
        yield Reject(key, f"missing image file: {record['file_name']}", source=source)
        return
    try:
        image = decode_image(data)
    except ValueError as e:
        yield Reject(key, f"{e} ({record['file_name']})", source=source)
        return
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if (height, width) != (record["height"], record["width"]):
        yield Reject(key, f"image is {height}x{width} but the annotation file says {record['height']}x{record['width']}",
                     source=source)
        return
    annotations = []
    for ann in record["annotations"]:
        clean, reason = clean_annotation(ann, height, width)
        if clean is None:
            yield Reject(f"ann-{ann.get('id')}", f"{reason} (image {record['image_id']})", kind="annotation",
                         source=source)
        else:
            annotations.append(clean)
    meta: schema.ImageMeta = {
        "image_id": int(record["image_id"]),
        "file_name": record["file_name"],
        "height": height,
        "width": width,
        "source": source,
        "annotations": annotations,
    }
    for extra in ("video_id", "frame_index", "keypoints"):  # keypoints: [x, y] pixels, e.g. face landmarks
        if extra in record:
            meta[extra] = record[extra]  # type: ignore[literal-required]
    yield Count("annotations", len(annotations))
    yield {"__key__": key, schema.IMAGE: data, schema.META: meta}


def plan_coco_units(cfg: CocoInputConfig, samples_per_shard: int, options: StorageOptions) -> Plan:
    """Records of a COCO dataset grouped into deterministic units of ``samples_per_shard`` images."""
    storage.check_uri(cfg.annotations, for_write=False, options=options, what="input.annotations")
    storage.check_uri(cfg.images, for_write=False, options=options, what="input.images")
    try:
        coco = load_coco_json(cfg.annotations, options)
    except FileNotFoundError:
        raise storage.StorageError(f"input.annotations: no such file: {cfg.annotations}") from None
    except ValueError as e:
        raise storage.StorageError(f"input.annotations: {e}") from None
    records, rejects = image_records(coco, cfg.images)
    units = [WorkUnit(i, chunk, source=cfg.name) for i, chunk in enumerate(batched(records, samples_per_shard))]
    return Plan(units, [Reject(r["key"], r["reason"], kind=r.get("kind", "sample"), source=cfg.name) for r in rejects])


class IngestStage(Stage):
    name = "ingest"
    schema = schema.IMAGE_SCHEMA

    def plan(self) -> Plan:
        return plan_coco_units(self.cfg.input, self.cfg.output.samples_per_shard, self.options)

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject | Count]:
        for record in unit.items:
            yield from image_sample(record, unit.source, self.options)

    def fingerprint_config(self):
        return {"input": vars(self.cfg.input), "samples_per_shard": self.cfg.output.samples_per_shard}

    def contact_sheet(self, samples: list[dict]):
        return image_sample_sheet(samples)


def image_sample_sheet(samples: list[dict], masks_of=None):
    """Images with their instance masks (or ``masks_of(sample)``'s RLEs) drawn on, tiled."""
    from maskflow import viz
    from ops.masks import decode_masks

    tiles = []
    for s in samples:
        meta = s[schema.META]
        rles = masks_of(s) if masks_of else [a["segmentation"] for a in meta["annotations"]]
        masks = decode_masks(rles, meta["height"], meta["width"])
        tiles.append(viz.overlay_masks(decode_image(s[schema.IMAGE]), masks))
    return viz.grid(tiles)
