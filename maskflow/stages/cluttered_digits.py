"""Cluttered-digits stage: HSTN §4.1's cluttered MNIST, made reproducibly from real MNIST digits (or imported).

Two sources (``input.source``), one sample schema:

* ``generate``: each sample is one real 28x28 MNIST digit (from a CSV: 784 pixel columns 0..255 row-major, then the
  label 0..9; ``.gz`` accepted), randomly scaled, rotated and sheared, placed at a random position on a larger black
  canvas, plus ``fragments`` clutter pieces (``fragment_size`` squares cut from the ink of *other* digits) pasted at
  random places (pixel-wise max, so clutter may touch or cross the digit). Sample ``i`` is a pure function of
  (the CSV's valid rows, the ``generator`` settings, ``i``, ``seed``): every random draw comes from
  ``np.random.default_rng([seed, i])``, whatever the sharding or the number of workers. The
  warp is :func:`ops.warp.warp` with :func:`ops.warp.affine_to_flow`, batched over a unit.
* ``import_npz``: an existing cluttered-MNIST ``.npz`` (``X_<split>``: N x side² float in [0, 1], row-major;
  ``y_<split>``: N or N x 1 labels), every split in file order, converted to the same schema.

CSV rows (``generate``) and npz rows (``import_npz``) are validated on the driver while planning; a malformed row
(wrong number of columns, a non-numeric or non-integer value, a pixel outside 0..255 / [0, 1], a label outside 0..9)
becomes a :class:`~maskflow.stage.Reject` with its reason (kind ``digit`` for CSV rows: they are source digits, not
samples; kind ``sample`` for npz rows) in ``rejects.jsonl`` and the manifest's ``rejected_by_kind``.

``cluttered_digit`` samples (conventions of :mod:`maskflow.data.schema`: boxes ``[x, y, w, h]``, COCO RLE masks;
pixel centres at integer coordinates as in :mod:`ops.warp`)
    ``<key>.image.png``  the canvas, 8-bit greyscale PNG (``height`` x ``width``), ink bright on black
    ``<key>.json``       ``sample_id`` int (the key is ``schema.sample_key(sample_id)``), ``label`` int 0..9,
                         ``height``/``width`` ints, ``source`` str (dataset name), ``origin`` ``"generated"`` or
                         ``"imported"``, and

        generated only:  ``digit_id`` int (0-based data row of the digit in the CSV, blank lines not counted),
                         ``seed`` int,
                         ``affine`` 2x3 floats ``[[a, b, c], [d, e, f]]`` in pixels, **canvas -> digit**: canvas pixel
                         ``(x, y)`` shows digit pixel ``(a x + b y + c, d x + e y + f)`` (ops.warp's ``theta``
                         convention: output -> input; invert it for digit -> canvas),
                         ``segmentation`` RLE of the digit's mask (canvas pixels where the warped digit alone is
                         ``>= mask_threshold * 255``; clutter never enters it),
                         ``bbox`` [x, y, w, h] the tight box of that mask, ``area`` int its pixel count,
                         ``clutter`` list of ``{"digit_id", "crop": [x, y, w, h] in the digit, "at": [x, y, w, h] on
                         the canvas}``;
        imported only:   ``split`` str (npz key suffix, e.g. ``train``), ``index`` int (row in that split);
                         ``sample_id`` counts rows over all splits in file order (rejected rows keep their id).
        Absent when imported (the npz has no such information): ``digit_id``, ``seed``, ``affine``,
        ``segmentation``, ``bbox``, ``area``, ``clutter``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np

from maskflow import storage
from maskflow.config import ConfigError, Uri, require
from maskflow.data import schema
from maskflow.stage import Count, Plan, Reject, Stage, StageJobConfig, WorkUnit, batched
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

IMAGE = "image.png"  # greyscale PNG of the canvas
META = schema.META  # the sample's JSON
SCHEMA = schema.SampleSchema("cluttered_digit/1", (
    schema.Field(IMAGE, "png", "grey canvas, ink bright on black"),
    schema.Field(META, "json", "label, origin; generated: affine, digit mask RLE, box, clutter pieces"),
))

DIGIT_SIDE = 28  # MNIST digits are 28 x 28
CSV_COLUMNS = DIGIT_SIDE * DIGIT_SIDE + 1  # pixels, then the label
GENERATED_ONLY = ("digit_id", "seed", "affine", "segmentation", "bbox", "area", "clutter")
IMPORTED_ONLY = ("split", "index")


@dataclass
class DigitsInputConfig:
    source: Literal["generate", "import_npz"] = "generate"
    uri: Uri = ""  # generate: MNIST CSV (784 pixels then the label; .gz ok); import_npz: cluttered-MNIST .npz
    name: str = "mnist"  # dataset name recorded in each sample's `source`
    # import_npz: the splits to import (e.g. [train] and [valid] as two outputs for training and validation); [] =
    # all. Sample ids still count rows over every split in file order, so a sample's id is the same either way.
    splits: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(bool(self.uri), "uri", "required: the MNIST CSV (generate) or the .npz (import_npz) URI")
        require(not self.splits or self.source == "import_npz", "splits", "only for source=import_npz")


@dataclass
class GeneratorConfig:
    """How ``generate`` distorts and clutters (ignored by ``import_npz``)."""

    samples: int = 10000
    seed: int = 0
    canvas: int = 60  # square canvas side in pixels (HSTN used 60x60)
    scale: tuple[float, float] = (0.8, 1.2)  # uniform digit scale range (1 = 28 px)
    rotation_deg: float = 30.0  # uniform rotation in [-r, r] degrees
    shear: float = 0.2  # uniform horizontal shear factor in [-s, s]
    fragments: int = 6  # clutter pieces per sample
    fragment_size: int = 8  # side of each square clutter piece (pixels)
    mask_threshold: float = 0.5  # the digit's mask: warped digit >= this * 255

    def validate(self) -> None:
        require(self.samples > 0, "samples", "must be positive")
        require(DIGIT_SIDE <= self.canvas <= 4096, "canvas", f"must be in [{DIGIT_SIDE}, 4096]")
        require(0 < self.scale[0] <= self.scale[1], "scale", "must be [min, max] with 0 < min <= max")
        require(0 <= self.rotation_deg <= 180, "rotation_deg", "must be in [0, 180]")
        require(0 <= self.shear < 2, "shear", "must be in [0, 2)")
        require(self.fragments >= 0, "fragments", "must be >= 0")
        require(1 <= self.fragment_size <= DIGIT_SIDE, "fragment_size", f"must be in [1, {DIGIT_SIDE}]")
        require(0 < self.mask_threshold <= 1, "mask_threshold", "must be in (0, 1]")


@dataclass
class ClutteredDigitsConfig(StageJobConfig):
    input: DigitsInputConfig = field(default_factory=DigitsInputConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


# --------------------------------------------------------------------------------------------- reading sources


def _read(uri: str, options: StorageOptions, what: str) -> bytes:
    try:
        data = storage.read_bytes(uri, options)
    except FileNotFoundError:
        raise storage.StorageError(f"{what}: no such file: {uri}") from None
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _bad_csv_row(parts: list[str]) -> str | None:
    """Why a split CSV row is not a digit (None: it is one)."""
    if len(parts) != CSV_COLUMNS:
        return f"expected {CSV_COLUMNS} columns (784 pixels + label), got {len(parts)}"
    try:
        values = np.array(parts, dtype=np.float64)
    except ValueError:
        col = next(i for i, p in enumerate(parts) if not _is_number(p))
        return f"non-numeric value {parts[col].strip()[:20]!r} in column {col + 1}"
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
    if bad.size:
        return f"non-integer value {parts[bad[0]].strip()[:20]!r} in column {bad[0] + 1}"
    pixels, label = values[:-1], values[-1]
    bad = np.flatnonzero((pixels < 0) | (pixels > 255))
    if bad.size:
        return f"pixel value {pixels[bad[0]]:g} outside 0..255 in column {bad[0] + 1}"
    if not 0 <= label <= 9:
        return f"label {label:g} outside 0..9"
    return None


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_digits_csv(uri: str, options: StorageOptions = DEFAULT_OPTIONS, name: str = "mnist"):
    """Parse an MNIST CSV: (digits (N, 28, 28) uint8, labels (N,) int64, row ids (N,) int64, rejects, sha256).

    Row ids count data rows from 0 (blank lines skipped); malformed rows become ``Reject("csv-row-<id>", reason,
    kind="digit")`` and are left out. One Python step per row, none per pixel.
    """
    raw = _read(uri, options, "input.uri")
    sha = hashlib.sha256(raw).hexdigest()
    rows, ids, rejects = [], [], []
    row_id = -1
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        row_id += 1
        parts = line.split(",")
        reason = _bad_csv_row(parts)
        if reason:
            rejects.append(Reject(f"csv-row-{row_id}", reason, kind="digit", source=name))
        else:
            rows.append(parts)
            ids.append(row_id)
    table = np.array(rows, dtype=np.float64).reshape(len(rows), CSV_COLUMNS)
    digits = table[:, :-1].astype(np.uint8).reshape(-1, DIGIT_SIDE, DIGIT_SIDE)
    return digits, table[:, -1].astype(np.int64), np.array(ids, dtype=np.int64), rejects, sha


Split = tuple[str, np.ndarray, np.ndarray]  # (split name, X: N x side², y: N labels)


def load_npz(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> tuple[list[Split], str]:
    """The ``(split, X, y)`` triples of a cluttered-MNIST npz in file order, and the file's sha256."""
    raw = _read(uri, options, "input.uri")
    try:
        npz = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any failure means "not an npz we can read"
        raise storage.StorageError(f"input.uri: {uri} is not a readable .npz ({type(e).__name__})") from None
    splits = []
    for key in npz.files:
        if key.startswith("X_"):
            split = key[2:]
            if f"y_{split}" not in npz.files:
                raise storage.StorageError(f"input.uri: {uri} has {key} but no y_{split}")
            splits.append((split, npz[key], npz[f"y_{split}"].reshape(-1)))
    if not splits:
        raise storage.StorageError(f"input.uri: {uri} holds no X_<split> arrays (keys: {npz.files})")
    return splits, hashlib.sha256(raw).hexdigest()


def _npz_side(X: np.ndarray) -> int:
    side = int(round(np.sqrt(X.shape[1]))) if X.ndim == 2 else 0
    if side * side != (X.shape[1] if X.ndim == 2 else -1):
        raise storage.StorageError(f"input.uri: X arrays must be N x side², got shape {X.shape}")
    return side


def _npz_row_problems(X: np.ndarray, y: np.ndarray) -> dict[int, str]:
    """Rows of one split that cannot be a sample, with the reason (vectorised over the split)."""
    problems: dict[int, str] = {}
    if len(y) != len(X):
        raise storage.StorageError(f"input.uri: {len(X)} images but {len(y)} labels in one split")
    finite = np.isfinite(X).all(1)
    in_range = finite & (X.min(1, initial=0) >= 0) & (X.max(1, initial=0) <= 1)
    labels_ok = (y >= 0) & (y <= 9) & (y == np.round(y))
    for i in np.flatnonzero(~finite):
        problems[int(i)] = "non-finite pixel value"
    for i in np.flatnonzero(finite & ~in_range):
        problems.setdefault(int(i), "pixel value outside [0, 1]")
    for i in np.flatnonzero(~labels_ok):
        problems.setdefault(int(i), f"label {y[i]:g} outside 0..9")
    return problems


# --------------------------------------------------------------------------------------------- generation


def ink_boxes(digits: np.ndarray) -> np.ndarray:
    """(N, 4) int ``[x0, y0, x1, y1]`` (inclusive) of each digit's non-zero pixels; the whole digit when blank."""
    cols, rows = digits.any(1), digits.any(2)
    side = digits.shape[-1]

    def span(a):
        first = np.where(a.any(1), a.argmax(1), 0)
        last = np.where(a.any(1), side - 1 - a[:, ::-1].argmax(1), side - 1)
        return first, last

    x0, x1 = span(cols)
    y0, y1 = span(rows)
    return np.stack([x0, y0, x1, y1], 1)


def draw_params(rng: np.random.Generator, cfg: GeneratorConfig, n_digits: int, boxes: np.ndarray) -> dict:
    """All random choices of one sample, in a fixed order (changing the order changes every sample)."""
    k, f, size = cfg.fragments, cfg.fragment_size, cfg.canvas
    digit = int(rng.integers(n_digits))
    scale = rng.uniform(*cfg.scale)
    angle = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    shear = rng.uniform(-cfg.shear, cfg.shear)
    # digit -> canvas linear part: rotate(shear(scale(p))), about the digit's centre
    c, s = np.cos(angle), np.sin(angle)
    lin = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    x0, y0, x1, y1 = boxes[digit]
    centre = (DIGIT_SIDE - 1) / 2.0
    corners = np.array([[x0 - 0.5, y0 - 0.5], [x1 + 0.5, y0 - 0.5], [x0 - 0.5, y1 + 0.5], [x1 + 0.5, y1 + 0.5]])
    ext = (corners - centre) @ lin.T  # the ink's corners around the placed centre
    lo, hi = -ext.min(0), (size - 1) - ext.max(0)  # the centre keeps all the ink on the canvas
    u = rng.uniform(size=2)
    pos = np.where(lo <= hi, lo + u * (hi - lo), (size - 1) / 2.0)
    forward = np.eye(3)
    forward[:2, :2] = lin
    forward[:2, 2] = pos - lin @ np.array([centre, centre])
    theta = np.linalg.inv(forward)[:2]  # canvas -> digit (ops.warp's theta)
    # clutter: k crops of other digits' ink, pasted anywhere
    others = rng.integers(n_digits - 1, size=k)
    others = others + (others >= digit)
    ob = boxes[others]
    half = f // 2
    cx_lo, cx_hi = np.clip(ob[:, 0] - half, 0, DIGIT_SIDE - f), np.clip(ob[:, 2] - half, 0, DIGIT_SIDE - f)
    cy_lo, cy_hi = np.clip(ob[:, 1] - half, 0, DIGIT_SIDE - f), np.clip(ob[:, 3] - half, 0, DIGIT_SIDE - f)
    crop_x = cx_lo + (rng.uniform(size=k) * (cx_hi - cx_lo + 1)).astype(int)
    crop_y = cy_lo + (rng.uniform(size=k) * (cy_hi - cy_lo + 1)).astype(int)
    at = rng.integers(0, size - f + 1, size=(k, 2))
    return {"digit": digit, "theta": theta, "others": others, "crop": np.stack([crop_x, crop_y], 1), "at": at}


def render(digits: np.ndarray, params: list[dict], cfg: GeneratorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Canvases (B, H, W) uint8 and digit masks (B, H, W) bool of a batch of drawn samples (no per-pixel loops)."""
    import torch

    from ops.warp import affine_to_flow, warp

    size, f = cfg.canvas, cfg.fragment_size
    b = len(params)
    padded = torch.zeros(b, 1, size, size, dtype=torch.float32)  # the digit at the origin of a canvas-sized map
    padded[:, 0, :DIGIT_SIDE, :DIGIT_SIDE] = torch.from_numpy(digits[[p["digit"] for p in params]].astype(np.float32))
    theta = torch.from_numpy(np.stack([p["theta"] for p in params])).to(torch.float32)
    with torch.no_grad():
        warped = warp(padded, affine_to_flow(theta, size, size))[:, 0].numpy()
    digit_layer = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    masks = digit_layer >= cfg.mask_threshold * 255
    canvas = digit_layer.copy()
    k = cfg.fragments
    if k:
        d = np.arange(f)
        others = np.stack([p["others"] for p in params])  # (B, k)
        crop = np.stack([p["crop"] for p in params])  # (B, k, 2) x, y
        at = np.stack([p["at"] for p in params])
        src_y = crop[..., 1, None, None] + d[:, None]  # (B, k, f, 1)
        src_x = crop[..., 0, None, None] + d[None, :]  # (B, k, 1, f)
        pieces = digits[others[..., None, None], src_y, src_x]  # (B, k, f, f)
        dst_y = at[..., 1, None, None] + d[:, None]
        dst_x = at[..., 0, None, None] + d[None, :]
        batch = np.broadcast_to(np.arange(b)[:, None, None, None], pieces.shape)
        np.maximum.at(canvas, (batch, np.broadcast_to(dst_y, pieces.shape), np.broadcast_to(dst_x, pieces.shape)),
                      pieces)
    return canvas, masks


def png_grey(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")  # 2-D uint8: "L"
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- the stage


class ClutteredDigitsStage(Stage):
    """``input.source=generate``: units of sample ids; ``import_npz``: units of (split, row, sample id)."""

    name = "cluttered_digits"
    schema = SCHEMA

    def __init__(self, cfg: ClutteredDigitsConfig, options: StorageOptions = DEFAULT_OPTIONS):
        super().__init__(cfg, options)
        self.input_sha256 = ""  # set by plan(): the source file's checksum (part of the job fingerprint)
        self._data = None  # worker state, loaded in setup()

    # driver

    def plan(self) -> Plan:
        inp = self.cfg.input
        storage.check_uri(inp.uri, for_write=False, options=self.options, what="input.uri")
        per_shard = self.cfg.output.samples_per_shard
        if inp.source == "generate":
            digits, _, _, rejects, self.input_sha256 = load_digits_csv(inp.uri, self.options, inp.name)
            if len(digits) < 2:
                raise storage.StorageError(f"input.uri: {inp.uri} has {len(digits)} valid digit rows; need at least 2 "
                                           f"(a digit and another for clutter); {len(rejects)} rows rejected")
            ids = range(self.cfg.generator.samples)
            units = [WorkUnit(i, list(chunk), source=inp.name) for i, chunk in enumerate(batched(ids, per_shard))]
            return Plan(units, rejects)
        splits, self.input_sha256 = load_npz(inp.uri, self.options)
        unknown = sorted(set(inp.splits) - {split for split, _, _ in splits})
        if unknown:
            raise ConfigError(f"input.splits: {inp.uri} has no split {unknown[0]!r} "
                              f"(it has {', '.join(split for split, _, _ in splits)})")
        items, rejects, sample_id = [], [], 0
        for split, X, y in splits:
            _npz_side(X)
            if inp.splits and split not in inp.splits:
                sample_id += len(X)
                continue
            problems = _npz_row_problems(X, y)
            for i in range(len(X)):
                if i in problems:
                    reason = f"{split}[{i}]: {problems[i]}"
                    rejects.append(Reject(schema.sample_key(sample_id), reason, source=inp.name))
                else:
                    items.append((split, i, sample_id))
                sample_id += 1
        units = [WorkUnit(i, chunk, source=inp.name) for i, chunk in enumerate(batched(items, per_shard))]
        return Plan(units, rejects)

    def fingerprint_config(self):
        gen = vars(self.cfg.generator) if self.cfg.input.source == "generate" else {}
        return {"input": vars(self.cfg.input), "input_sha256": self.input_sha256, "generator": gen,
                "samples_per_shard": self.cfg.output.samples_per_shard}

    # worker

    def setup(self) -> None:
        inp = self.cfg.input
        if inp.source == "generate":
            digits, labels, ids, _, sha = load_digits_csv(inp.uri, self.options, inp.name)
            self._data = (digits, labels, ids, ink_boxes(digits))
        else:
            splits, sha = load_npz(inp.uri, self.options)
            self._data = {split: (X, y, _npz_side(X)) for split, X, y in splits}
        if self.input_sha256 and sha != self.input_sha256:
            raise RuntimeError(f"input.uri {inp.uri} changed since the job was planned")

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject | Count]:
        if self._data is None:
            self.setup()
        if self.cfg.input.source == "generate":
            yield from self._generate(unit)
        else:
            yield from self._import(unit)

    def _generate(self, unit: WorkUnit) -> Iterator[dict | Reject | Count]:
        from ops.masks import encode_masks, rle_areas, rle_boxes

        cfg, seed = self.cfg.generator, self.cfg.generator.seed
        digits, labels, row_ids, boxes = self._data
        params = [draw_params(np.random.default_rng([seed, int(i)]), cfg, len(digits), boxes) for i in unit.items]
        canvases, masks = render(digits, params, cfg)
        rles = encode_masks(masks)
        bboxes, areas = rle_boxes(rles), rle_areas(rles)
        f = cfg.fragment_size
        for sample_id, p, image, rle, box, area in zip(unit.items, params, canvases, rles, bboxes, areas):
            key = schema.sample_key(sample_id)
            if area == 0:
                yield Reject(key, f"digit {int(row_ids[p['digit']])} vanished below mask_threshold", source=unit.source)
                continue
            meta = {
                "sample_id": int(sample_id), "label": int(labels[p["digit"]]), "height": cfg.canvas,
                "width": cfg.canvas, "source": unit.source, "origin": "generated",
                "digit_id": int(row_ids[p["digit"]]), "seed": seed,
                "affine": [[float(v) for v in row] for row in p["theta"]],
                "segmentation": rle, "bbox": [float(v) for v in box], "area": int(area),
                "clutter": [{"digit_id": int(row_ids[o]), "crop": [int(cx), int(cy), f, f],
                             "at": [int(ax), int(ay), f, f]}
                            for o, (cx, cy), (ax, ay) in zip(p["others"], p["crop"], p["at"])],
            }
            yield Count("clutter_fragments", len(meta["clutter"]))
            yield {"__key__": key, IMAGE: png_grey(image), META: meta}

    def _import(self, unit: WorkUnit) -> Iterator[dict]:
        for split, index, sample_id in unit.items:
            X, y, side = self._data[split]
            image = np.clip(np.rint(X[index].reshape(side, side) * 255.0), 0, 255).astype(np.uint8)
            meta = {"sample_id": int(sample_id), "label": int(y[index]), "height": side, "width": side,
                    "source": unit.source, "origin": "imported", "split": split, "index": int(index)}
            yield {"__key__": schema.sample_key(sample_id), IMAGE: png_grey(image), META: meta}

    def contact_sheet(self, samples: list[dict]):
        return cluttered_digits_sheet(samples)


def draw_box(image: np.ndarray, box, colour=(255, 64, 64)) -> np.ndarray:
    """A 1-pixel rectangle just outside the pixels of ``[x, y, w, h]`` (clipped to the image; RGB uint8, a copy)."""
    out = image.copy()
    h, w = out.shape[:2]
    x0, y0 = max(0, int(round(box[0])) - 1), max(0, int(round(box[1])) - 1)
    x1 = min(w - 1, int(round(box[0] + box[2])))
    y1 = min(h - 1, int(round(box[1] + box[3])))
    out[y0, x0:x1 + 1] = out[y1, x0:x1 + 1] = colour
    out[y0:y1 + 1, x0] = out[y0:y1 + 1, x1] = colour
    return out


def cluttered_digits_sheet(samples: list[dict]) -> np.ndarray:
    """The samples' canvases with the digit box drawn (generated samples), tiled; label in the tile order."""
    from PIL import Image

    from maskflow import viz

    tiles = []
    for s in samples:
        meta = s[META] if isinstance(s[META], dict) else schema.loads(s[META])
        tile = viz.to_rgb(np.array(Image.open(io.BytesIO(s[IMAGE])).convert("L")))
        if "bbox" in meta:
            tile = draw_box(tile, meta["bbox"])
        tiles.append(tile)
    return viz.grid(tiles)
