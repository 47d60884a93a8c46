"""Read and write COCO instances JSON through :mod:`maskflow.storage` (local paths or s3:// alike).

:func:`image_records` indexes a COCO dict with pycocotools and returns one record per image (with its raw
annotations) plus the rejects: images without a usable size/file name and annotations that point at no image.
"""

from __future__ import annotations

import contextlib
import io
import json
import numbers
from typing import Any

from maskflow import storage
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def check_coco_dict(coco: Any, what: str = "COCO json") -> dict:
    """Raise ValueError (one line) unless ``coco`` looks like a COCO instances dict."""
    if not isinstance(coco, dict):
        raise ValueError(f"{what}: top level is a {type(coco).__name__}, not a COCO instances dict")
    for key in ("images", "annotations"):
        if key not in coco:
            raise ValueError(f"{what}: no {key!r} list (not a COCO instances dict)")
        if not isinstance(coco[key], list):
            raise ValueError(f"{what}: {key!r} is a {type(coco[key]).__name__}, not a list")
    if "categories" in coco and not isinstance(coco["categories"], list):
        raise ValueError(f"{what}: 'categories' is not a list")
    for ann in coco["annotations"]:
        if not isinstance(ann, dict):
            raise ValueError(f"{what}: an annotation is a {type(ann).__name__}, not a dict")
        if "segments_info" in ann:
            raise ValueError(f"{what}: this is a COCO panoptic json (annotations with segments_info), not instances")
    for img in coco["images"]:
        if not isinstance(img, dict):
            raise ValueError(f"{what}: an image entry is a {type(img).__name__}, not a dict")
    return coco


def load_coco_json(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> dict:
    """Read and parse a COCO instances JSON; ValueError with a one-line reason if it is not one."""
    data = storage.read_bytes(uri, options)
    try:
        coco = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{uri}: not valid JSON: {_first_line(str(e))}") from None
    return check_coco_dict(coco, uri)


def write_coco_json(coco: dict, uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> None:
    """Write a COCO dict as compact JSON (atomic: readers see all of it or nothing)."""
    storage.write_bytes(uri, json.dumps(coco, separators=(",", ":"), ensure_ascii=False).encode("utf-8"), options)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _image_problem(img: dict) -> str | None:
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        return "image without file_name"
    for key in ("height", "width"):
        if not _is_int(img.get(key)) or img[key] <= 0:
            return f"image without a positive integer {key}"
    return None


def image_records(coco: dict, images_uri: str) -> tuple[list[dict], list[dict]]:
    """``(records, rejects)``: one record per usable image, sorted by image_id, with its raw annotations.

    A record is ``{"image_id", "file_name", "file_uri", "height", "width", "annotations"}`` plus ``video_id``,
    ``frame_index`` and ``keypoints`` (a list of ``[x, y]`` pixels) when the image has them. A reject is
    ``{"kind": "image"|"annotation", "key", "reason"}``.
    """
    from pycocotools.coco import COCO

    check_coco_dict(coco)
    rejects: list[dict] = []
    images: list[dict] = []
    seen: set[int] = set()
    rejected_ids: set[int] = set()
    for i, img in enumerate(coco["images"]):
        img_id = img.get("id")
        if not _is_int(img_id):
            rejects.append({"kind": "image", "key": f"img-#{i}", "reason": "image without an integer id"})
            continue
        key = f"img-{int(img_id)}"
        if int(img_id) in seen:
            rejects.append({"kind": "image", "key": key, "reason": f"duplicate image id {int(img_id)}"})
            continue
        seen.add(int(img_id))
        problem = _image_problem(img)
        if problem:
            rejects.append({"kind": "image", "key": key, "reason": problem})
            rejected_ids.add(int(img_id))
            continue
        images.append(img)

    annotations: list[dict] = []
    for i, ann in enumerate(coco["annotations"]):
        key = f"ann-{ann['id']}" if _is_int(ann.get("id")) else f"ann-#{i}"
        img_id = ann.get("image_id")
        if not _is_int(img_id):
            rejects.append({"kind": "annotation", "key": key, "reason": "annotation without an integer image_id"})
        elif int(img_id) in rejected_ids:
            rejects.append({"kind": "annotation", "key": key, "reason": f"annotation for rejected image id {img_id}"})
        else:
            annotations.append(ann)

    index = COCO()
    index.dataset = {**coco, "images": images, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        index.createIndex()

    for img_id in index.imgToAnns:
        if img_id not in index.imgs:
            for ann in index.imgToAnns[img_id]:
                key = f"ann-{ann['id']}" if _is_int(ann.get("id")) else "ann-?"
                rejects.append({"kind": "annotation", "key": key, "reason": f"annotation for unknown image id {img_id}"})

    records: list[dict] = []
    for img_id in sorted(index.imgs):
        img = index.imgs[img_id]
        rec = {
            "image_id": int(img_id),
            "file_name": img["file_name"],
            "file_uri": storage.join(images_uri, img["file_name"]),
            "height": int(img["height"]),
            "width": int(img["width"]),
            "annotations": list(index.imgToAnns.get(img_id, [])),
        }
        for extra in ("video_id", "frame_index", "keypoints"):
            if extra in img:
                rec[extra] = img[extra]
        records.append(rec)
    return records, rejects
