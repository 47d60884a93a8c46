"""Sample schemas: written down once, shared by the stage that writes a shard and the code that reads it.

A shard is a WebDataset tar: the entries of one sample share a key (``__key__``) and sit together, and each entry's
suffix names a field. Keys are zero-padded ids (never file names: a dot in a key breaks WebDataset's splitting).

Conventions (COCO's, everywhere in maskflow unless a docstring says otherwise):

* boxes are ``[x, y, w, h]`` in pixels of the stored image, x to the right, y down, origin at the top-left corner of
  the top-left pixel;
* masks are COCO RLE dicts ``{"size": [h, w], "counts": str}`` (pycocotools' compressed string form);
* ``image`` is the encoded bytes of the original image (JPEG or PNG, sniffed on decode), never re-encoded.

``image`` samples (ingest stage, ``pipelines/ingest.py``)
    ``<key>.image``  encoded image bytes
    ``<key>.json``   :class:`ImageMeta` as JSON: ``image_id`` int, ``file_name`` str, ``height`` int, ``width`` int,
                     ``source`` str (dataset name), ``annotations``: list of :class:`Annotation` dicts with
                     ``id`` int, ``category_id`` int, ``bbox`` [x,y,w,h] float, ``area`` float (mask pixels),
                     ``iscrowd`` 0/1, ``segmentation`` RLE dict.

``proposals`` samples (proposals job, ``pipelines/proposals.py``) — an ``image`` sample plus
    ``<key>.proposals.json``: ``boxes`` k x [x,y,w,h] float, ``scores`` k floats (descending),
                     ``segmentations`` k RLE dicts, ``iou`` k x G floats (mask IoU of each proposal against each
                     ground-truth annotation, in the order of ``json.annotations``; crowd regions included, G may be 0),
                     ``model`` str (the weights' URI), ``height``/``width`` ints.
"""

from __future__ import annotations

import json
from typing import Any, TypedDict

IMAGE = "image"
META = "json"
PROPOSALS = "proposals.json"


class RLE(TypedDict):
    size: list[int]
    counts: str


class Annotation(TypedDict):
    id: int
    category_id: int
    bbox: list[float]
    area: float
    iscrowd: int
    segmentation: RLE


class ImageMeta(TypedDict):
    image_id: int
    file_name: str
    height: int
    width: int
    source: str
    annotations: list[Annotation]


def sample_key(image_id: int) -> str:
    """The WebDataset key of an image: its id, zero-padded so lexical order is numeric order."""
    return f"{int(image_id):012d}"


def dumps(obj: Any) -> bytes:
    """Compact, deterministic JSON for shard entries (sorted keys: identical inputs give identical bytes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def loads(data: bytes | str) -> Any:
    return json.loads(data)
