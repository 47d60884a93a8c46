"""Check and normalise what a data set gives us, before any of it reaches a shard.

:func:`clean_annotation` turns one raw COCO annotation (polygons, uncompressed RLE or compressed RLE) into a
:class:`maskflow.data.schema.Annotation` whose mask is compressed RLE with ``str`` counts, whose ``bbox`` is the tight
box of that mask and whose ``area`` is its pixel count, or says in a few words why it cannot.
:func:`decode_image` decodes image bytes to a uint8 CHW RGB tensor or raises ``ValueError("corrupt image: ...")``.

Everything here works on whole masks at once through ``pycocotools.mask`` (no per-pixel Python loops).
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from maskflow.data.schema import RLE, Annotation
from ops.masks import decode_masks, encode_masks

BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image before it is called outside

# Reasons, spelt once so tests and logs can match them.
POLYGON_TOO_SHORT = "polygon with fewer than 3 points"
BOX_OUTSIDE = "box outside the image"
ZERO_AREA = "zero-area mask"
MISSING_SEGMENTATION = "missing segmentation"
MALFORMED = "malformed segmentation"


# --------------------------------------------------------------------------------------------- masks <-> RLE


def rle_to_str(rle: dict) -> RLE:
    """A pycocotools RLE (bytes counts) as the schema's JSON-friendly form (str counts, list size)."""
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts)}


def rle_to_bytes(rle: dict) -> dict:
    """The schema's RLE (str counts) as pycocotools wants it (bytes counts)."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def encode_mask(mask: np.ndarray) -> RLE:
    """One H x W mask as compressed RLE (str counts)."""
    return encode_masks(np.asarray(mask)[None])[0]


def decode_rle(rle: dict) -> np.ndarray:
    """An RLE dict (str or bytes counts) to an H x W bool mask."""
    return decode_masks([rle])[0].astype(bool)


def annotations_from_masks(
    masks: np.ndarray, ann_ids: list[int], category_ids: list[int], extra: list[dict] | None = None
) -> list[Annotation]:
    """Schema annotations for N x H x W masks (empty masks must be filtered out by the caller)."""
    rles = encode_masks(masks)
    if not rles:
        return []
    raw = [rle_to_bytes(r) for r in rles]
    areas = mask_utils.area(raw)
    boxes = mask_utils.toBbox(raw)
    out: list[Annotation] = []
    for i, rle in enumerate(rles):
        ann: dict = {
            "id": int(ann_ids[i]),
            "category_id": int(category_ids[i]),
            "bbox": [float(v) for v in boxes[i]],
            "area": float(areas[i]),
            "iscrowd": 0,
            "segmentation": rle,
        }
        if extra:
            ann.update(extra[i])
        out.append(ann)  # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------------------------- annotations


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _counts_from_string(s: str) -> list[int] | None:
    """Decode pycocotools' compressed counts string (LEB128-like, delta coded) to run lengths; None if malformed.

    A loop over the characters of the string (a few hundred), not over pixels: it lets us check the runs add up to
    the image size before pycocotools' C decoder (which trusts them) ever sees the string.
    """
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = ord(s[p]) - 48
            if c < 0 or c > 63:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            return None
        counts.append(x)
    return counts


def _check_box(box: Any, height: int, width: int) -> str | None:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        return "malformed bbox"
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return BOX_OUTSIDE
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return BOX_OUTSIDE
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return BOX_OUTSIDE
    return None


def _rle_from_segmentation(seg: Any, height: int, width: int) -> tuple[dict | None, str | None]:
    """One pycocotools RLE (bytes counts) for a polygon list / uncompressed / compressed RLE, or a reason."""
    if seg is None or (isinstance(seg, (list, dict)) and len(seg) == 0):
        return None, MISSING_SEGMENTATION
    if isinstance(seg, list):
        polygons = []
        for poly in seg:
            if not isinstance(poly, (list, tuple)) or not all(_is_number(v) for v in poly):
                return None, f"{MALFORMED}: polygon is not a flat list of numbers"
            if len(poly) < 6:
                return None, POLYGON_TOO_SHORT
            if len(poly) % 2:
                return None, f"{MALFORMED}: polygon with an odd number of coordinates"
            polygons.append([float(v) for v in poly])
        xy = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons])
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        reason = _check_box([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], height, width)
        if reason == BOX_OUTSIDE and (hi[0] - lo[0] > 0 and hi[1] - lo[1] > 0):
            return None, BOX_OUTSIDE
        # frPyObjects takes a list whose first item has 4 numbers for boxes: never pass it a mixed list.
        rles = mask_utils.frPyObjects(polygons, height, width)
        return mask_utils.merge(rles), None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(_is_int(v) and v > 0 for v in size)
        ):
            return None, f"{MALFORMED}: RLE size must be [height, width]"
        if [int(size[0]), int(size[1])] != [height, width]:
            return None, f"RLE size {[int(size[0]), int(size[1])]} differs from image size {[height, width]}"
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                return None, f"{MALFORMED}: RLE counts must be non-negative integers"
            total = sum(int(v) for v in counts)
            if total != height * width:
                return None, f"{MALFORMED}: RLE counts sum to {total}, expected {height * width}"
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": [int(v) for v in counts]}, height, width)
            return rle, None
        if isinstance(counts, bytes):
            try:
                counts = counts.decode("ascii")
            except UnicodeDecodeError:
                return None, f"{MALFORMED}: RLE counts are not ASCII"
        if isinstance(counts, str):
            runs = _counts_from_string(counts)
            if runs is None:
                return None, f"{MALFORMED}: undecodable RLE counts string"
            if sum(runs) != height * width:
                return None, f"{MALFORMED}: RLE counts sum to {sum(runs)}, expected {height * width}"
            return {"size": [height, width], "counts": counts.encode("ascii")}, None
        return None, f"{MALFORMED}: RLE without counts"
    return None, f"{MALFORMED}: expected a polygon list or an RLE dict"


def clean_annotation(ann: dict, height: int, width: int) -> tuple[Annotation | None, str | None]:
    """``(annotation, None)`` in the schema's form, or ``(None, reason)`` with a short, specific reason."""
    if not isinstance(ann, dict):
        return None, "annotation is not a dict"
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
        return None, f"bad image size {height}x{width}"
    height, width = int(height), int(width)
    if not _is_int(ann.get("id")):
        return None, "missing or non-integer id"
    if not _is_int(ann.get("category_id")):
        return None, "missing or non-integer category_id"
    if "segmentation" not in ann:
        return None, MISSING_SEGMENTATION
    if ann.get("bbox") is not None:
        reason = _check_box(ann["bbox"], height, width)
        if reason:
            return None, reason
    rle, reason = _rle_from_segmentation(ann["segmentation"], height, width)
    if rle is None:
        return None, reason
    area = float(mask_utils.area(rle))
    if area <= 0:
        return None, ZERO_AREA
    box = mask_utils.toBbox(rle)
    clean = {
        "id": int(ann["id"]),
        "category_id": int(ann["category_id"]),
        "bbox": [float(v) for v in box],
        "area": area,
        "iscrowd": 1 if ann.get("iscrowd") else 0,
        "segmentation": rle_to_str(rle),
    }
    if "track_id" in ann:  # video data sets: the object's identity within its video, stable across frames
        if not _is_int(ann["track_id"]) or ann["track_id"] < 1:
            return None, "track_id must be a positive integer"
        clean["track_id"] = int(ann["track_id"])
    return clean, None


# --------------------------------------------------------------------------------------------- images


CORRUPT_IMAGE = "corrupt image"
# What decode_image says about an image it cannot use, in our words (never a library's message, file or address).
NOT_AN_IMAGE = f"{CORRUPT_IMAGE}: not a PNG, JPEG, WebP or GIF file"
TRUNCATED_IMAGE = f"{CORRUPT_IMAGE}: truncated data"
DAMAGED_HEADER = f"{CORRUPT_IMAGE}: damaged header"
DAMAGED_PIXELS = f"{CORRUPT_IMAGE}: damaged pixel data"
EMPTY_IMAGE = f"{CORRUPT_IMAGE}: empty file"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what decode_image opens (PIL format names)
_SAFE_DETAIL = re.compile(r"[A-Za-z0-9 ,;:'()=+\-]{1,60}")


def _detail(e: BaseException) -> str:
    """`` (short library detail)`` when its first line is plain words (no path, address, source file); else ''."""
    text = str(e).strip().splitlines()[0].strip() if str(e).strip() else ""
    return f" ({text})" if _SAFE_DETAIL.fullmatch(text) else ""


def _image_problem(e: BaseException, stage: str) -> str:
    """Our reason for an exception PIL raised while opening (``stage="header"``) or decoding (``"pixels"``)."""
    from PIL import Image

    text = str(e).lower()
    if isinstance(e, Image.UnidentifiedImageError):
        return NOT_AN_IMAGE
    if isinstance(e, (Image.DecompressionBombError, MemoryError)):
        return f"{CORRUPT_IMAGE}: too large to decode"
    if isinstance(e, EOFError) or "truncated" in text:
        return TRUNCATED_IMAGE
    return (DAMAGED_HEADER if stage == "header" else DAMAGED_PIXELS) + _detail(e)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_problem(data: bytes) -> str | None:
    """Why a PNG's chunks do not add up (None: they do). Every chunk's CRC-32 is checked (PIL checks only those
    before the pixel data), so a flipped bit anywhere in the file is a reject rather than damaged pixels."""
    import zlib

    view, p, n = memoryview(data), len(PNG_MAGIC), len(data)
    while True:
        if p + 12 > n:
            return TRUNCATED_IMAGE
        length = int.from_bytes(view[p:p + 4], "big")
        kind = bytes(view[p + 4:p + 8])
        if not kind.isalpha() or length > 2**31 - 1:
            return f"{DAMAGED_HEADER} (bad PNG chunk)"
        end = p + 12 + length
        if end > n:
            return TRUNCATED_IMAGE
        if zlib.crc32(view[p + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return f"{DAMAGED_PIXELS if kind == b'IDAT' else DAMAGED_HEADER} (PNG checksum mismatch)"
        if kind == b"IEND":
            return None
        p = end


def decode_image(data: bytes):
    """Encoded PNG/JPEG (or WebP/GIF) bytes to a uint8 CHW RGB tensor; ``ValueError("corrupt image: ...")`` on any
    failure, with a short reason in our words.

    Decoded with PIL, which raises on damaged data (torchvision's libpng path can crash the whole process on a PNG
    whose header is fine but whose pixel data is damaged). Truncated data is an error (PIL's
    ``LOAD_TRUNCATED_IMAGES`` stays off), as is an image over PIL's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) and a PNG any of whose chunk checksums fails. 16-bit grey PNGs are scaled to 8 bits.
    """
    import io

    import torch
    from PIL import Image

    if not data:
        raise ValueError(EMPTY_IMAGE)
    data = bytes(data)
    problem = _png_problem(data) if data.startswith(PNG_MAGIC) else None
    if problem:
        raise ValueError(problem)
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Exception as e:  # noqa: BLE001 - any failure to parse the header is a reject, never a crash
        raise ValueError(_image_problem(e, "header")) from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ValueError(f"{CORRUPT_IMAGE}: empty image ({width}x{height} pixels)")
        if width * height > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"{CORRUPT_IMAGE}: too large to decode ({width}x{height} pixels)")
        try:
            img.load()  # decodes everything now: damage raises here, not later in a worker
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                grey = (np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
                rgb = np.repeat(grey[None], 3, axis=0)
            else:
                rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB")).transpose(2, 0, 1)
        except Exception as e:  # noqa: BLE001 - damaged pixel data is a reject, never a crash
            raise ValueError(_image_problem(e, "pixels")) from None
    finally:
        img.close()
    if rgb.dtype != np.uint8 or rgb.shape != (3, height, width):
        raise ValueError(f"{CORRUPT_IMAGE}: decoded to {tuple(rgb.shape)} {rgb.dtype}")
    return torch.from_numpy(np.array(rgb, order="C"))  # a fresh, writable CHW copy
