"""PF-PASCAL pair lists (Ham et al., "Proposal Flow", TPAMI 2018), in the layout NCNet / WeakAlign distribute and
SFNet (Lee et al., CVPR 2019, sec. 4.3) evaluates on: one CSV row per image pair.

Read through :mod:`maskflow.storage`, so the list may be a local path or an ``s3://`` URI. The keypoints come out in
the conventions of :mod:`ops.correspondence_metrics` (``(K, 2)`` ``(x, y)`` pixels), ready for
``ops.correspondence_metrics.stack_pair_keypoints`` and ``pck``.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from maskflow import storage
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

REQUIRED_COLUMNS = ("source_image", "target_image", "class")
KEYPOINT_COLUMNS = ("XA", "YA", "XB", "YB")


def read_pf_pascal_pairs(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> list[dict]:
    """The rows of a PF-PASCAL pair list.

    Columns: ``source_image, target_image, class`` (1..20, PASCAL VOC order), then either ``XA, YA, XB, YB`` (test
    pairs: ';'-separated keypoint coordinates, A = source, B = target, same count and order in all four) or ``flip``
    (train/val pairs, no keypoints). Returns one dict per row: ``source_image``, ``target_image``, ``class`` (int),
    and ``source_kps`` / ``target_kps`` ``(K, 2)`` float64 ``(x, y)`` arrays when present, ``flip`` (bool) when
    present. A missing column or keypoint lists of different lengths is a ``ValueError`` naming the file (and row).
    """
    reader = csv.DictReader(io.StringIO(storage.read_text(uri, options), newline=""))
    columns = set(reader.fieldnames or ())
    if not set(REQUIRED_COLUMNS) <= columns:
        raise ValueError(f"{uri}: expected columns {list(REQUIRED_COLUMNS)}, got {reader.fieldnames}")
    has_keypoints = set(KEYPOINT_COLUMNS) <= columns
    pairs: list[dict] = []
    for row_number, row in enumerate(reader, start=2):  # the header is line 1
        pair: dict = {"source_image": row["source_image"], "target_image": row["target_image"],
                      "class": int(row["class"])}
        if has_keypoints:
            xa, ya, xb, yb = (np.array(row[c].split(";"), dtype=np.float64) for c in KEYPOINT_COLUMNS)
            if not (len(xa) == len(ya) == len(xb) == len(yb)):
                raise ValueError(f"{uri}: row {row_number} has keypoint lists of different lengths")
            pair["source_kps"] = np.stack([xa, ya], axis=1)
            pair["target_kps"] = np.stack([xb, yb], axis=1)
        if "flip" in columns:
            pair["flip"] = bool(int(row["flip"]))
        pairs.append(pair)
    return pairs
