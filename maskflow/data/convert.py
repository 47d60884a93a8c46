"""Converters of real data sets (in their original layouts) to COCO instances dicts: Penn-Fudan, YOLO-seg, VOC
SegmentationObject, DAVIS 2016 (a COCO-video dict) and dlib's face examples (face masks plus 68-point landmarks).

Each returns ``(coco_dict, images_uri)``; every ``file_name`` is relative to ``images_uri``. Ids are deterministic:
images are numbered 1..N in sorted file-name order, annotations 1..M in image order. Masks become compressed RLE
(str counts) with ``bbox`` the tight box of the mask and ``area`` its pixel count; polygon sets keep their polygons.

What cannot be used (a mask whose size differs from its image, an unreadable file, a degenerate polygon, a label
file with no image) is left out and listed in ``coco["info"]["skipped"]`` as ``{"key", "reason"}``.

:func:`holdout_split` cuts any converted dict into a training and a held-out validation dict by a seeded hash of the
file names (deterministic, independent of listing order and of the machine).

All reads go through :mod:`maskflow.storage`, so every root may be a local path or an s3:// prefix.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from maskflow import storage
from maskflow.data.validate import annotations_from_masks, clean_annotation
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

COCO80_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip  -- the class order of YOLO labels made from COCO (coco128 and friends)


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _open_image(uri: str, options: StorageOptions) -> Image.Image:
    """PIL image (header read, pixels lazily) of a URI; ValueError one line if unreadable."""
    data = storage.read_bytes(uri, options)
    try:
        img = Image.open(io.BytesIO(data))
        img.size  # noqa: B018 - forces the header parse
        return img
    except Exception as e:
        raise ValueError(f"unreadable image: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _read_label_map(uri: str, options: StorageOptions) -> np.ndarray:
    """A mask PNG as its raw values (palette indices for 'P' images, grey levels for 'L'), H x W."""
    img = _open_image(uri, options)
    if img.mode not in ("L", "P", "1", "I", "I;16"):
        img = img.convert("L")
    return np.asarray(img)


def _coco(images: list[dict], annotations: list[dict], categories: list[dict], skipped: list[dict], description: str):
    return {
        "info": {"description": description, "skipped": skipped},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _instances_from_label_map(label_map: np.ndarray, ignore: Sequence[int] = (0,)) -> tuple[np.ndarray, np.ndarray]:
    """(ids, N x H x W bool masks) of the distinct values of a label map, ``ignore`` values left out."""
    ids = np.unique(label_map)
    ids = ids[~np.isin(ids, np.asarray(ignore))]
    masks = label_map[None, :, :] == ids[:, None, None]
    return ids, masks


# --------------------------------------------------------------------------------------------- held-out split


def holdout_rank(file_name: str, seed: int) -> str:
    """The key that orders images for :func:`holdout_split`: sha1 of ``"<seed>:<file_name>"`` (hex)."""
    return hashlib.sha1(f"{seed}:{file_name}".encode("utf-8")).hexdigest()


def holdout_split(coco: dict, fraction: float, seed: int = 0) -> tuple[dict, dict]:
    """``(train, val)`` COCO dicts: the ``round(fraction * N)`` images whose :func:`holdout_rank` is lowest go to
    ``val``, the rest to ``train`` (60 Penn-Fudan images at 0.25: 45 / 15).

    Ranking by a hash of the file name rather than drawing per image makes the validation split exactly the asked
    size, the same on every machine and for any listing order, and stable when the data set grows (a new image moves
    at most one other across the boundary). Image and annotation ids are kept, so both halves stay consistent with
    the whole conversion; categories go to both; ``info.split`` records ``{name, fraction, seed, images}``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    images = sorted(coco["images"], key=lambda im: holdout_rank(str(im["file_name"]), seed))
    n_val = int(round(fraction * len(images)))
    val_ids = {im["id"] for im in images[:n_val]}

    def part(name: str, keep) -> dict:
        info = {**coco.get("info", {}), "split": {"name": name, "fraction": fraction, "seed": seed}}
        out = {**coco, "info": info,
               "images": [im for im in coco["images"] if keep(im["id"])],
               "annotations": [a for a in coco["annotations"] if keep(a["image_id"])]}
        info["split"]["images"] = len(out["images"])
        return out

    return part("train", lambda i: i not in val_ids), part("val", lambda i: i in val_ids)


# --------------------------------------------------------------------------------------------- Penn-Fudan


def penn_fudan_to_coco(root: str, options: StorageOptions = DEFAULT_OPTIONS) -> tuple[dict, str]:
    """Penn-Fudan pedestrians: ``PNGImages/*.png`` with ``PedMasks/<stem>_mask.png`` (value k = pedestrian k)."""
    images_uri = storage.join(root, "PNGImages")
    masks_uri = storage.join(root, "PedMasks")
    names = [n for n in storage.list_names(images_uri, options) if n.lower().endswith(IMAGE_EXTENSIONS)]
    mask_names = set(storage.list_names(masks_uri, options))
    images, annotations, skipped = [], [], []
    for image_id, name in enumerate(names, start=1):
        try:
            width, height = _open_image(storage.join(images_uri, name), options).size
        except ValueError as e:
            skipped.append({"key": name, "reason": str(e)})
            continue
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        mask_name = f"{_stem(name)}_mask.png"
        if mask_name not in mask_names:
            skipped.append({"key": mask_name, "reason": "no mask file for this image"})
            continue
        try:
            label_map = _read_label_map(storage.join(masks_uri, mask_name), options)
        except ValueError as e:
            skipped.append({"key": mask_name, "reason": str(e)})
            continue
        if label_map.shape[:2] != (height, width):
            skipped.append({"key": mask_name, "reason": f"mask size {label_map.shape[:2]} differs from image size {(height, width)}"})
            continue
        ids, masks = _instances_from_label_map(label_map)
        first = len(annotations) + 1
        anns = annotations_from_masks(masks, list(range(first, first + len(ids))), [1] * len(ids))
        for ann, k in zip(anns, ids):
            ann["image_id"] = image_id
            ann["instance_value"] = int(k)
        annotations += anns
    categories = [{"id": 1, "name": "person", "supercategory": "person"}]
    return _coco(images, annotations, categories, skipped, "Penn-Fudan pedestrians"), images_uri


# --------------------------------------------------------------------------------------------- YOLO-seg


def _category_list(class_names: Sequence[str] | None, seen: set[int]) -> list[dict]:
    if class_names is not None:
        return [{"id": i + 1, "name": str(n)} for i, n in enumerate(class_names)]
    return [{"id": c + 1, "name": f"class_{c}"} for c in sorted(seen)]


def yolo_seg_to_coco(
    images_dir: str,
    labels_dir: str,
    class_names: Sequence[str] | None = None,
    options: StorageOptions = DEFAULT_OPTIONS,
) -> tuple[dict, str]:
    """YOLO segmentation labels (``cls x1 y1 x2 y2 ...`` normalised to [0, 1], one object a line) to COCO.

    Category id = YOLO class + 1. Polygons are scaled to pixels and clipped to the image; images without a label file
    have no annotations; label files without an image, and polygons that do not make a mask, are skipped. With
    ``class_names=None`` the categories are the classes seen, named ``class_<k>`` (pass :data:`COCO80_CLASSES` for
    labels made from COCO).
    """
    names = [n for n in storage.list_names(images_dir, options) if n.lower().endswith(IMAGE_EXTENSIONS)]
    label_names = {n for n in storage.list_names(labels_dir, options) if n.endswith(".txt")}
    image_stems = {_stem(n) for n in names}
    skipped = [
        {"key": n, "reason": "label file without an image"} for n in sorted(label_names) if _stem(n) not in image_stems
    ]
    images, annotations, seen = [], [], set()
    for image_id, name in enumerate(names, start=1):
        try:
            width, height = _open_image(storage.join(images_dir, name), options).size
        except ValueError as e:
            skipped.append({"key": name, "reason": str(e)})
            continue
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        label_name = f"{_stem(name)}.txt"
        if label_name not in label_names:
            continue
        text = storage.read_text(storage.join(labels_dir, label_name), options)
        for line_no, line in enumerate(text.splitlines(), start=1):
            key = f"{label_name}:{line_no}"
            tokens = line.split()
            if not tokens:
                continue
            try:
                cls = int(tokens[0])
                coords = np.asarray([float(t) for t in tokens[1:]], dtype=np.float64)
            except ValueError:
                skipped.append({"key": key, "reason": "label line is not numbers"})
                continue
            if cls < 0 or (class_names is not None and cls >= len(class_names)):
                skipped.append({"key": key, "reason": f"class {cls} out of range"})
                continue
            if len(coords) % 2:
                skipped.append({"key": key, "reason": "odd number of coordinates"})
                continue
            if not np.isfinite(coords).all():
                skipped.append({"key": key, "reason": "non-finite coordinate"})
                continue
            xy = coords.reshape(-1, 2) * np.asarray([width, height], dtype=np.float64)
            xy = np.clip(xy, 0.0, [float(width), float(height)])
            polygon = [round(float(v), 2) for v in xy.reshape(-1)]
            ann_id = len(annotations) + 1
            raw = {"id": ann_id, "category_id": cls + 1, "segmentation": [polygon], "iscrowd": 0}
            clean, reason = clean_annotation(raw, height, width)
            if clean is None:
                skipped.append({"key": key, "reason": reason})
                continue
            seen.add(cls)
            annotations.append({**raw, "image_id": image_id, "bbox": clean["bbox"], "area": clean["area"]})
    categories = _category_list(class_names, seen)
    return _coco(images, annotations, categories, skipped, "YOLO segmentation labels"), images_dir


# --------------------------------------------------------------------------------------------- VOC instances


def _read_class_names(voc_root: str, options: StorageOptions) -> list[str]:
    """Class names indexed by VOC class value (0 = background); from class_names.txt when present."""
    uri = storage.join(voc_root, "class_names.txt")
    if storage.exists(uri, options):
        lines = [ln.strip() for ln in storage.read_text(uri, options).splitlines()]
        names = [ln for ln in lines if ln]
        if names:
            return names
    return ["_background_", *VOC_CLASSES]


def voc_instances_to_coco(voc_root: str, options: StorageOptions = DEFAULT_OPTIONS) -> tuple[dict, str]:
    """VOC instance segmentation: ``JPEGImages``, ``SegmentationObject`` and ``SegmentationClass`` PNGs.

    In ``SegmentationObject`` each palette index is an instance (0 background, 255 void border); the instance's class
    is the most common ``SegmentationClass`` index under it (0 and 255 ignored), and that index is its category id
    (names from ``class_names.txt``, line k = class k, line 0 = background). Images without an object PNG have no
    annotations.
    """
    images_uri = storage.join(voc_root, "JPEGImages")
    obj_uri = storage.join(voc_root, "SegmentationObject")
    cls_uri = storage.join(voc_root, "SegmentationClass")
    class_names = _read_class_names(voc_root, options)
    names = [n for n in storage.list_names(images_uri, options) if n.lower().endswith(IMAGE_EXTENSIONS)]
    obj_names = set(storage.list_names(obj_uri, options))
    cls_names = set(storage.list_names(cls_uri, options))
    images, annotations, skipped = [], [], []
    for image_id, name in enumerate(names, start=1):
        try:
            width, height = _open_image(storage.join(images_uri, name), options).size
        except ValueError as e:
            skipped.append({"key": name, "reason": str(e)})
            continue
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        png = f"{_stem(name)}.png"
        if png not in obj_names:
            continue
        if png not in cls_names:
            skipped.append({"key": png, "reason": "SegmentationObject PNG without a SegmentationClass PNG"})
            continue
        try:
            objects = _read_label_map(storage.join(obj_uri, png), options)
            classes = _read_label_map(storage.join(cls_uri, png), options)
        except ValueError as e:
            skipped.append({"key": png, "reason": str(e)})
            continue
        if objects.shape[:2] != (height, width) or classes.shape[:2] != (height, width):
            skipped.append({"key": png, "reason": f"mask size {objects.shape[:2]} differs from image size {(height, width)}"})
            continue
        ids, masks = _instances_from_label_map(objects, ignore=(0, 255))
        keep_masks, keep_ids, cats = [], [], []
        for k, m in zip(ids, masks):
            under = classes[m]
            under = under[(under != 0) & (under != 255)]
            if under.size == 0:
                skipped.append({"key": f"{png}:{int(k)}", "reason": "instance has no class in SegmentationClass"})
                continue
            cat = int(np.bincount(under).argmax())
            if cat >= len(class_names):
                skipped.append({"key": f"{png}:{int(k)}", "reason": f"class {cat} not in class_names"})
                continue
            keep_masks.append(m)
            keep_ids.append(int(k))
            cats.append(cat)
        if not keep_masks:
            continue
        first = len(annotations) + 1
        anns = annotations_from_masks(np.stack(keep_masks), list(range(first, first + len(cats))), cats)
        for ann, k in zip(anns, keep_ids):
            ann["image_id"] = image_id
            ann["instance_value"] = k
        annotations += anns
    categories = [{"id": i, "name": n} for i, n in enumerate(class_names) if i > 0]
    return _coco(images, annotations, categories, skipped, "VOC instance segmentation"), images_uri


# --------------------------------------------------------------------------------------------- DAVIS


def davis_to_coco(
    root: str,
    sequences: Sequence[str] | None = None,
    resolution: str = "480p",
    options: StorageOptions = DEFAULT_OPTIONS,
) -> tuple[dict, str]:
    """DAVIS 2016 (one foreground object per sequence, masks 0/255) to a COCO-video dict.

    Images carry ``video_id`` and ``frame_index`` (the frame file's number, 0-based; position in sorted order when
    the names are not numbers), and ``length`` is the last index + 1, so a missing frame shows as a gap; file names are ``<seq>/<frame>.jpg``
    relative to ``JPEGImages/<resolution>``; the top-level ``videos`` list holds ``{id, name, length}``. Each frame
    with a non-empty mask gets one annotation with ``track_id`` 1 (the object's id within its video).
    """
    images_uri = storage.join(root, "JPEGImages", resolution)
    ann_root = storage.join(root, "Annotations", resolution)
    if sequences is None:
        sequences = storage.list_names(images_uri, options)
    images, annotations, videos, skipped = [], [], [], []
    for video_id, seq in enumerate(sorted(sequences), start=1):
        frames = [n for n in storage.list_names(storage.join(images_uri, seq), options) if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not frames:
            skipped.append({"key": seq, "reason": "sequence without frames"})
            continue
        mask_names = set(storage.list_names(storage.join(ann_root, seq), options))
        # DAVIS numbers its frames (00000.jpg, ...): the number is the frame's index, so a frame missing from the
        # folder leaves a gap that consumers can see instead of silently shifting the later frames.
        numbered = all(_stem(f).isdigit() for f in frames)
        indices = [int(_stem(f)) for f in frames] if numbered else list(range(len(frames)))
        videos.append({"id": video_id, "name": seq, "length": max(indices) + 1})
        for frame_index, frame in zip(indices, frames):
            image_id = len(images) + 1
            file_name = f"{seq}/{frame}"
            try:
                width, height = _open_image(storage.join(images_uri, seq, frame), options).size
            except ValueError as e:
                skipped.append({"key": file_name, "reason": str(e)})
                continue
            images.append({
                "id": image_id, "file_name": file_name, "height": height, "width": width,
                "video_id": video_id, "frame_index": frame_index,
            })  # fmt: skip
            png = f"{_stem(frame)}.png"
            if png not in mask_names:
                continue
            try:
                mask = _read_label_map(storage.join(ann_root, seq, png), options)
            except ValueError as e:
                skipped.append({"key": f"{seq}/{png}", "reason": str(e)})
                continue
            if mask.shape[:2] != (height, width):
                skipped.append({"key": f"{seq}/{png}", "reason": f"mask size {mask.shape[:2]} differs from image size {(height, width)}"})
                continue
            fg = mask > 127 if mask.ndim == 2 else (mask > 127).any(axis=-1)
            if not fg.any():
                continue
            ann = annotations_from_masks(fg[None], [len(annotations) + 1], [1])[0]
            ann.update({"image_id": image_id, "video_id": video_id, "track_id": 1})
            annotations.append(ann)
    categories = [{"id": 1, "name": "object"}]
    coco = _coco(images, annotations, categories, skipped, "DAVIS 2016")
    coco["videos"] = videos
    return coco, images_uri


# --------------------------------------------------------------------------------------------- dlib faces

DLIB_SPLITS = ("training", "testing")
DLIB_LANDMARKS = 68  # iBUG 300-W 68-point scheme (dlib's shape_predictor_68_face_landmarks)


def face_masks(boxes: np.ndarray, height: int, width: int, shape: str = "ellipse") -> np.ndarray:
    """(F, H, W) bool foreground of ``(F, 4)`` ``[x, y, w, h]`` face boxes in COCO's continuous pixel coordinates
    (pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``): ``shape="ellipse"`` the ellipse inscribed in each box
    (a face is round; the box corners are background), ``"box"`` the filled box. A pixel is inside when its centre
    ``(j + 0.5, i + 0.5)`` is; parts of a box beyond the image are cut off."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0, y0, w, h = (boxes[:, k, None, None] for k in range(4))  # each (F, 1, 1)
    xs = np.arange(width, dtype=np.float64)[None, None, :] + 0.5
    ys = np.arange(height, dtype=np.float64)[None, :, None] + 0.5
    if shape == "ellipse":
        u = (xs - (x0 + w / 2)) / np.maximum(w / 2, 1e-9)
        v = (ys - (y0 + h / 2)) / np.maximum(h / 2, 1e-9)
        return u * u + v * v <= 1.0
    if shape == "box":
        return (xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h)
    raise ValueError(f'shape must be "ellipse" or "box", got {shape!r}')


def _dlib_images(xml_text: bytes, xml_name: str) -> Iterator[tuple[str, dict, list, list[dict]]]:
    """``(file, image attributes, [(box attributes, parts)], skipped)`` per ``<image>`` of a dlib imglab XML."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml_text)
    for image in root.iter("image"):
        faces, skipped = [], []
        for n, box in enumerate(image.iter("box")):
            key = f"{xml_name}:{image.get('file')}:box{n}"
            if box.get("ignore") == "1":
                skipped.append({"key": key, "reason": "box marked ignore"})
                continue
            parts = sorted(((p.get("name", ""), float(p.get("x")), float(p.get("y"))) for p in box.iter("part")),
                           key=lambda p: int(p[0]) if p[0].isdigit() else p[0])
            faces.append((key, box.attrib, [(x, y) for _, x, y in parts]))
        yield image.get("file", ""), dict(image.attrib), faces, skipped


def dlib_faces_to_coco(root: str, splits: Sequence[str] = DLIB_SPLITS, face_shape: str = "ellipse",
                       options: StorageOptions = DEFAULT_OPTIONS) -> tuple[dict, str]:
    """dlib's face examples (``examples/faces``: photos with hand-drawn face boxes and machine-made 68-point landmarks
    in imglab XML) to COCO, for planar face alignment (HSTN) and real landmark transfer (SFNet's evaluation).

    Reads ``<split>_with_face_landmarks.xml`` for each of ``splits`` (``training``, ``testing``). Each face box
    (``left``, ``top``, ``width``, ``height``: whole pixels, so ``bbox = [left, top, width, height]``) becomes one
    ``face`` annotation whose mask is the ellipse inscribed in the box (``face_shape="box"``: the filled box), as RLE;
    the foreground the affine-pairs stage warps. The landmarks go into the image record as ``keypoints``: a list of
    ``[x, y]`` pixels (dlib's part coordinates: pixel centres at integers, the project's keypoint convention), 68 per
    face in the iBUG 300-W order, faces in annotation order (face ``j``'s points are ``keypoints[68 j : 68 j + 68]``).
    The ingest stage keeps them in the image meta and the affine-pairs stage carries them to the target.

    Left out, with a reason in ``info.skipped``: a box marked ``ignore``, a face without exactly 68 landmarks or with a
    landmark outside the image, a box that leaves no pixel in the image, an image whose file is unreadable or whose
    size differs from the XML's, an image listed in two splits (kept in the first).
    """
    listed: dict[str, tuple[dict, list]] = {}
    skipped: list[dict] = []
    for split in splits:
        if split not in DLIB_SPLITS:
            raise ValueError(f"split must be one of {DLIB_SPLITS}, got {split!r}")
        xml_name = f"{split}_with_face_landmarks.xml"
        xml_text = storage.read_bytes(storage.join(root, xml_name), options)
        for file_name, attrs, faces, dropped in _dlib_images(xml_text, xml_name):
            skipped += dropped
            if file_name in listed:
                skipped.append({"key": f"{xml_name}:{file_name}", "reason": "image listed in an earlier split"})
                continue
            listed[file_name] = (attrs, faces)
    images, annotations = [], []
    for image_id, file_name in enumerate(sorted(listed), start=1):
        attrs, faces = listed[file_name]
        try:
            width, height = _open_image(storage.join(root, file_name), options).size
        except FileNotFoundError:
            skipped.append({"key": file_name, "reason": "missing image file"})
            continue
        except ValueError as e:
            skipped.append({"key": file_name, "reason": str(e)})
            continue
        if (int(attrs.get("width", width)), int(attrs.get("height", height))) != (width, height):
            skipped.append({"key": file_name, "reason": f"image is {width}x{height} but the XML says "
                                                        f"{attrs.get('width')}x{attrs.get('height')}"})
            continue
        boxes, points = [], []
        for key, box, parts in faces:
            xy = np.asarray(parts, np.float64).reshape(-1, 2)
            if len(xy) != DLIB_LANDMARKS:
                skipped.append({"key": key, "reason": f"{len(xy)} landmarks, not {DLIB_LANDMARKS}"})
                continue
            if not ((xy >= 0).all() and (xy[:, 0] <= width - 1).all() and (xy[:, 1] <= height - 1).all()):
                skipped.append({"key": key, "reason": "landmark outside the image"})
                continue
            boxes.append([float(box[k]) for k in ("left", "top", "width", "height")])
            points.append((key, xy))
        masks = face_masks(np.asarray(boxes).reshape(-1, 4), height, width, face_shape)
        keep = masks.reshape(len(masks), -1).any(1)
        skipped += [{"key": key, "reason": "face box has no pixel in the image"}
                    for (key, _), k in zip(points, keep) if not k]
        kept = [xy for (_, xy), k in zip(points, keep) if k]
        first = len(annotations) + 1
        anns = annotations_from_masks(masks[keep], list(range(first, first + len(kept))), [1] * len(kept))
        for ann in anns:
            ann["image_id"] = image_id
        annotations += anns
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width,
                       "keypoints": [[float(x), float(y)] for xy in kept for x, y in xy]})
    categories = [{"id": 1, "name": "face", "supercategory": "person"}]
    return _coco(images, annotations, categories, skipped, "dlib face examples (68-point landmarks)"), root
