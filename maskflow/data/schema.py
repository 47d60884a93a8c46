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
                     ``iscrowd`` 0/1, ``segmentation`` RLE dict, and ``track_id`` int >= 1 in video data sets
                     (the object's identity within its video). Frames of videos also carry ``video_id`` int and
                     ``frame_index`` int (0-based position in the video).

``proposals`` samples (proposals job, ``pipelines/proposals.py``) — an ``image`` sample plus
    ``<key>.proposals.json``: ``boxes`` k x [x,y,w,h] float, ``scores`` k floats (descending),
                     ``segmentations`` k RLE dicts, ``iou`` k x G floats (mask IoU of each proposal against each
                     ground-truth annotation, in the order of ``json.annotations``; crowd regions included, G may be 0),
                     ``model`` str (the weights' URI), ``height``/``width`` ints.

``digit_prediction`` samples (HSTN digit predictions, :mod:`maskflow.stages.hstn_predict`), key = the input's key
    ``<key>.image.png``        the input canvas, as the ``cluttered_digit`` sample had it
    ``<key>.json``             the input sample's meta, unchanged (``label`` is the ground truth)
    ``<key>.prediction.json``  ``label`` int (argmax), ``probabilities`` list of floats (softmax, one per class),
                               ``model`` str (the weights' URI)

``flow_prediction`` samples (dense flow predictions for pairs: :mod:`maskflow.stages.hstn_predict`, SFNet's), key =
the pair's
    ``<key>.source.png`` / ``<key>.target.png`` / ``<key>.flow_t2s.npy`` / ``<key>.pair.json``  the ``pair``
                               sample's entries, unchanged (``flow_t2s`` is the ground truth); optional, also copied
                               from the pair: ``source_mask.png``, ``target_mask.png``, ``flow_s2t.npy``
    ``<key>.pred_flow_t2s.npy``  float32 ``(2, H, W)``: the predicted target pixel -> source location, in pixels of
                               the pair's own resolution (``ops.warp``'s convention: channel 0 = dx, backward warp);
                               optional ``pred_flow_s2t.npy``: the predicted source pixel -> target location
    ``<key>.prediction.json``  ``model`` str (the weights' URI, or ``opencv:<method>`` for a classical baseline),
                               ``image_size`` int (the side the method worked at; the pair's when 0), ``seconds``
                               float (the method's time for this pair, decoding excluded)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

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
    track_id: NotRequired[int]  # video data sets only


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


# --------------------------------------------------------------------------------------------- declared schemas
#
# Every sample kind is declared once as a :class:`SampleSchema` next to the stage that writes it (its module
# docstring says what each field means, its units and conventions). The stage harness checks every sample a stage
# writes against its schema and records the schema's name in the manifest; a trainer reads the same object to decode
# samples and to refuse shards of another kind.

ENCODINGS = ("bytes", "json", "png", "npy")


@dataclass(frozen=True)
class Field:
    suffix: str  # the tar entry's suffix: "<key>.<suffix>"
    encoding: str  # bytes (left as is) | json | png (decoded to a uint8/uint16 array) | npy (numpy.save, no pickle)
    doc: str = ""
    optional: bool = False

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"field {self.suffix!r}: encoding must be one of {ENCODINGS}")


@dataclass(frozen=True)
class SampleSchema:
    name: str  # e.g. "ffd_crop/1": kind and version (bump the version when a field changes meaning)
    fields: tuple[Field, ...]

    @property
    def suffixes(self) -> tuple[str, ...]:
        return tuple(f.suffix for f in self.fields)

    def problems(self, sample: dict) -> list[str]:
        """What is wrong with a sample about to be written (missing required or undeclared fields)."""
        present = set(sample) - {"__key__"}
        declared = {f.suffix for f in self.fields}
        out = [f"missing field {f.suffix!r}" for f in self.fields if not f.optional and f.suffix not in present]
        out += [f"undeclared field {s!r}" for s in sorted(present - declared)]
        return out

    def decode(self, sample: dict) -> dict:
        """Raw shard entries (bytes) to values: JSON parsed, PNG / NPY to numpy arrays, bytes kept."""
        out = {"__key__": sample.get("__key__")}
        for f in self.fields:
            if f.suffix in sample:
                out[f.suffix] = decode_value(sample[f.suffix], f.encoding)
        return out


def decode_value(value: Any, encoding: str) -> Any:
    if encoding == "json":
        return loads(value) if isinstance(value, (bytes, bytearray, str)) else value
    if encoding == "png":
        return load_png(bytes(value))
    if encoding == "npy":
        return load_npy(bytes(value))
    return value


def check_manifest_schema(manifest: dict, expected: SampleSchema, what: str) -> None:
    """Fail fast (one line naming the config key) when a stage output holds another kind of sample."""
    from maskflow.config import ConfigError

    found = manifest.get("schema")
    if found is not None and found != expected.name:
        raise ConfigError(f"{what}: holds {found} samples, expected {expected.name}")


# --------------------------------------------------------------------------------------------- codecs


def png(array) -> bytes:
    """H x W (grey, uint8 or uint16) or H x W x 3 (RGB uint8) array -> lossless PNG bytes (deterministic)."""
    import io

    import numpy as np
    from PIL import Image

    array = np.ascontiguousarray(array)
    buf = io.BytesIO()
    image = Image.fromarray(array)  # uint16 -> mode "I;16": a 16-bit grey PNG
    # zlib level 1: 2.6x faster than PIL's default 6 on photos (27 vs 70 ms for a 560 x 540 RGB image, 80% of a
    # sample's time in the stages) for 2% more bytes; masks barely differ in time.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def load_png(data: bytes):
    """PNG bytes -> numpy array (uint8 grey/RGB; 16-bit grey PNGs -> uint16)."""
    import io

    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    array = np.array(image)
    return array.astype(np.uint16) if image.mode.startswith("I") else array


def npy(array, dtype=None) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=dtype if dtype is not None else np.float32), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes):
    import io

    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


IMAGE_SCHEMA = SampleSchema("image/1", (
    Field(IMAGE, "bytes", "encoded image (JPEG or PNG), as the data set had it"),
    Field(META, "json", "ImageMeta: image id, size, source, annotations with RLE masks"),
))
PROPOSALS_SCHEMA = SampleSchema("proposals/1", IMAGE_SCHEMA.fields + (
    Field(PROPOSALS, "json", "boxes, scores, RLE masks, IoU vs every ground-truth annotation, model URI"),
))

PREDICTION = "prediction.json"
DIGIT_PREDICTION_SCHEMA = SampleSchema("digit_prediction/1", (
    Field("image.png", "png", "the input canvas"),
    Field(META, "json", "the input cluttered_digit sample's meta, unchanged (label = ground truth)"),
    Field(PREDICTION, "json", "label (argmax), probabilities (softmax per class), model URI"),
))
FLOW_PREDICTION_SCHEMA = SampleSchema("flow_prediction/1", (
    Field("source.png", "png", "the pair's RGB source"),
    Field("target.png", "png", "the pair's RGB target"),
    Field("flow_t2s.npy", "npy", "ground truth float32 (2, H, W): target pixel -> source location, px"),
    Field("pair.json", "json", "the pair's meta, unchanged"),
    Field("pred_flow_t2s.npy", "npy", "predicted float32 (2, H, W) at the pair's resolution, px"),
    Field(PREDICTION, "json", "model URI (or opencv:<method>), working image_size, seconds per pair"),
    Field("source_mask.png", "png", "the pair's source foreground, 255/0", optional=True),
    Field("target_mask.png", "png", "the pair's target foreground, 255/0", optional=True),
    Field("flow_s2t.npy", "npy", "ground truth float32 (2, H, W): source pixel -> target location, px", optional=True),
    Field("pred_flow_s2t.npy", "npy", "predicted float32 (2, H, W) source -> target, px", optional=True),
))
