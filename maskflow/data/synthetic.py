"""The demo's default data: seeded synthetic scenes of textured shapes on textured backgrounds, as COCO.

Everything is reproducible from ``(seed, image_id)`` (or ``(seed, video_id)``) through
``np.random.default_rng([seed, id])`` and built with vectorised numpy on coordinate grids (no per-pixel loops):

* the background is a base colour plus random low-frequency sinusoids, bilinearly upsampled coarse noise and a little
  fine grain;
* each object is an ellipse, a rotated rectangle, a polygon (regular or irregular) or a star, 8%-50% of the image
  side across, filled with its own texture (stripes, checker or blotches) in two colours chosen away from the
  background; textures live in the object's own frame, so they move with it;
* objects are painted in order, later ones occluding earlier ones; masks are the *visible* parts, so the masks of one
  image are disjoint. In still images, objects left with less than ``min_area`` visible pixels are not painted at all
  (no unlabelled paint).

Category ids name the shape (see :data:`CATEGORIES`); the class-agnostic model ignores them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from maskflow import storage
from maskflow.data.coco import write_coco_json
from maskflow.data.validate import annotations_from_masks
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

SHAPES = ("ellipse", "rectangle", "polygon", "star")
CATEGORIES = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
TEXTURES = ("stripes", "checker", "blotches")
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.08, 0.5
VIDEO_STREAM = 1  # extra rng key for videos, so video k and image k of one seed draw different numbers


def min_area(size: tuple[int, int]) -> int:
    """Smallest visible area (pixels) an object of a still image may have to be kept."""
    return max(12, int(round(0.0015 * size[0] * size[1])))


# --------------------------------------------------------------------------------------------- building blocks


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs), each H x W float32."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return ys + 0.5, xs + 0.5


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """n_out x n_in linear interpolation weights (upsampling a coarse grid to n_out samples)."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2 if n_in > 1 else 0)
    frac = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1.0 - frac
    if n_in > 1:
        m[np.arange(n_out), lo + 1] += frac
    return m


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int) -> np.ndarray:
    """H x W x C smooth noise in about [-1, 1]: a coarse Gaussian grid, bilinearly upsampled (two matrix products)."""
    gh, gw = max(2, cells), max(2, int(round(cells * w / h)))
    coarse = rng.normal(0.0, 1.0, (gh, gw, channels)).astype(np.float32)
    rows = np.tensordot(_interp_matrix(h, gh), coarse, axes=(1, 0))  # H x gw x C
    return np.tensordot(rows, _interp_matrix(w, gw), axes=(1, 1)).transpose(0, 2, 1) / 1.5  # H x W x C


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    ys, xs = _grid(h, w)
    side = float(max(h, w))
    img = np.broadcast_to(rng.uniform(50, 205, 3).astype(np.float32), (h, w, 3)).copy()
    for _ in range(int(rng.integers(2, 5))):
        cycles = rng.uniform(0.4, 3.0)
        angle = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * cycles / side * (np.cos(angle) * xs + np.sin(angle) * ys) + phase)
        img += wave[..., None] * rng.uniform(-35, 35, 3).astype(np.float32)
    img += _smooth_noise(rng, h, w, int(rng.integers(3, 9)), 3) * rng.uniform(10, 35)
    img += rng.normal(0.0, rng.uniform(1, 6), (h, w, 3)).astype(np.float32)
    return img


def _object_colours(rng: np.random.Generator, avoid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two colours for an object's texture, the main one at least ~90 (RGB distance) from ``avoid``."""
    c1 = rng.uniform(0, 255, 3)
    for _ in range(12):
        if np.linalg.norm(c1 - avoid) >= 90:
            break
        c1 = rng.uniform(0, 255, 3)
    c2 = np.clip(c1 + rng.uniform(-80, 80, 3), 0, 255)
    return c1.astype(np.float32), c2.astype(np.float32)


def _new_object(rng: np.random.Generator, size: tuple[int, int], avoid: np.ndarray, centre_margin: float) -> dict:
    h, w = size
    side = float(min(h, w))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    radius = side * rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION) / 2
    obj = {
        "shape": shape,
        "category_id": SHAPES.index(shape) + 1,
        "cx": rng.uniform(centre_margin, 1 - centre_margin) * w,
        "cy": rng.uniform(centre_margin, 1 - centre_margin) * h,
        "radius": radius,
        "angle": rng.uniform(0, 2 * np.pi),
        "aspect": rng.uniform(0.45, 1.0),
        "texture": TEXTURES[int(rng.integers(len(TEXTURES)))],
        "period": rng.uniform(3.0, 9.0),
        "tex_angle": rng.uniform(0, np.pi),
        "blotch": (rng.uniform(0.1, 0.5, 4), rng.uniform(0, 2 * np.pi, 4), rng.uniform(0, np.pi, 4)),
        "colours": _object_colours(rng, avoid),
    }
    if shape == "polygon":
        n = int(rng.integers(3, 9))
        regular = bool(rng.integers(2))
        jitter = 0.0 if regular else 0.35 * (2 * np.pi / n)
        obj["vertex_angles"] = np.arange(n) * 2 * np.pi / n + rng.uniform(-jitter, jitter, n)
        obj["vertex_radii"] = np.ones(n) if regular else rng.uniform(0.55, 1.0, n)
    elif shape == "star":
        n = int(rng.integers(4, 9))
        inner = rng.uniform(0.35, 0.6)
        obj["vertex_angles"] = np.arange(2 * n) * np.pi / n
        obj["vertex_radii"] = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return obj


def _local(obj: dict, ys: np.ndarray, xs: np.ndarray, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in the object's frame (u along its rotated x axis)."""
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _shape_mask(obj: dict, u: np.ndarray, v: np.ndarray, radius: float, aspect: float, radii: np.ndarray | None) -> np.ndarray:
    shape = obj["shape"]
    if shape == "ellipse":
        return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= radius * 0.85) & (np.abs(v) <= radius * 0.85 * aspect)
    # Star-shaped polygon around the centre: find each pixel's angular sector, test it against that sector's edge.
    alphas = np.mod(obj["vertex_angles"], 2 * np.pi)
    order = np.argsort(alphas)
    alphas, rad = alphas[order], (radii if radii is not None else obj["vertex_radii"])[order] * radius
    px, py = rad * np.cos(alphas), rad * np.sin(alphas)
    phi = np.mod(np.arctan2(v, u), 2 * np.pi)
    i = (np.searchsorted(alphas, phi, side="right") - 1) % len(alphas)
    j = (i + 1) % len(alphas)
    ax, ay, bx, by = px[i], py[i], px[j], py[j]
    cross = (bx - ax) * (v - ay) - (by - ay) * (u - ax)
    centre = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)  # the centre is inside: same side as it
    return cross * centre >= 0


def _texture(obj: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """H x W x 3 float texture in the object's frame."""
    c, s = np.cos(obj["tex_angle"]), np.sin(obj["tex_angle"])
    a, b = c * u + s * v, -s * u + c * v
    p = obj["period"]
    kind = obj["texture"]
    if kind == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * a / p)
    elif kind == "checker":
        t = (np.floor(a / p) + np.floor(b / p)) % 2
    else:
        freqs, phases, dirs = obj["blotch"]
        t = sum(np.sin(f * (np.cos(d) * a + np.sin(d) * b) + ph) for f, ph, d in zip(freqs, phases, dirs))
        t = 0.5 + 0.5 * np.tanh(t)
    c1, c2 = obj["colours"]
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _visible(full: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when painted in order (later ones on top)."""
    if not full:
        return []
    covered = np.zeros_like(full[0])
    out = [None] * len(full)
    for k in range(len(full) - 1, -1, -1):
        out[k] = full[k] & ~covered
        covered |= full[k]
    return out  # type: ignore[return-value]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- still images


def render_image(
    seed: int, image_id: int, size: tuple[int, int] = (128, 128), max_objects: int = 5
) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """``(image H x W x 3 uint8, visible masks H x W bool, category ids)``, reproducible from ``(seed, image_id)``.

    Masks are in painting order (back to front), disjoint and each at least :func:`min_area` pixels.
    """
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    h, w = int(size[0]), int(size[1])
    rng = np.random.default_rng([int(seed), int(image_id)])
    img = _background(rng, h, w)
    ys, xs = _grid(h, w)
    avoid = img.mean(axis=(0, 1))
    threshold = min_area((h, w))
    objects, full, kept = [], [], []
    for _attempt in range(8):  # redraw in the rare case that every object ends up too small to keep
        objects = [_new_object(rng, (h, w), avoid, 0.08) for _ in range(int(rng.integers(1, max_objects + 1)))]
        full = []
        for obj in objects:
            u, v = _local(obj, ys, xs, obj["cx"], obj["cy"], obj["angle"])
            full.append(_shape_mask(obj, u, v, obj["radius"], obj["aspect"], None))
        visible = _visible(full)
        kept = [k for k, m in enumerate(visible) if int(m.sum()) >= threshold]
        if kept:
            break
    # Objects too small to label are not painted; removing one only uncovers others, so the rest stay above it.
    objects, full = [objects[k] for k in kept], [full[k] for k in kept]
    for obj, m in zip(objects, full):
        u, v = _local(obj, ys, xs, obj["cx"], obj["cy"], obj["angle"])
        img = np.where(m[..., None], _texture(obj, u, v), img)
    visible = _visible(full)
    return _to_uint8(img), visible, [int(o["category_id"]) for o in objects]


def _ann_extra(image_id: int, n: int, extra: dict | None = None) -> list[dict]:
    return [{"image_id": image_id, **(extra or {})} for _ in range(n)]


def generate_coco_dataset(
    out_uri: str,
    num_images: int,
    seed: int,
    split: str = "train",
    size: tuple[int, int] = (128, 128),
    max_objects: int = 5,
    first_image_id: int = 1,
    options: StorageOptions = DEFAULT_OPTIONS,
) -> dict:
    """Render ``num_images`` scenes to ``out_uri/images/<split>/<id:012d>.png`` and their COCO json to
    ``out_uri/annotations/instances_<split>.json``; returns the COCO dict.

    Image ids run ``first_image_id .. first_image_id + num_images - 1``: give each split its own range (e.g. val
    starting after train) so splits never share ids. Annotation ids run 1..M within the split.
    """
    h, w = int(size[0]), int(size[1])
    images, annotations = [], []
    for image_id in range(int(first_image_id), int(first_image_id) + int(num_images)):
        image, masks, cats = render_image(seed, image_id, (h, w), max_objects)
        file_name = f"{image_id:012d}.png"
        storage.write_bytes(storage.join(out_uri, "images", split, file_name), encode_png(image), options)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        first = len(annotations) + 1
        annotations += annotations_from_masks(
            np.stack(masks), list(range(first, first + len(masks))), cats, _ann_extra(image_id, len(masks))
        )
    coco = {
        "info": {"description": f"maskflow synthetic shapes ({split})", "seed": int(seed), "split": split},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    write_coco_json(coco, storage.join(out_uri, "annotations", f"instances_{split}.json"), options)
    return coco


# --------------------------------------------------------------------------------------------- videos


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold positions into [lo, hi] as if bouncing off its ends."""
    span = hi - lo
    y = np.mod(x - lo, 2 * span)
    return lo + span - np.abs(y - span)


def render_video(
    seed: int, video_id: int, num_frames: int = 12, size: tuple[int, int] = (128, 128), num_objects: int = 3
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """``(frames T x H x W x 3 uint8, masks T x K x H x W bool, track_ids, category_ids)`` for one video.

    Object k (track id k + 1) keeps its identity, shape and texture in every frame; it translates (bouncing off the
    borders), rotates, scales and deforms smoothly. Objects are painted in track order, so later ones occlude
    earlier ones; masks are visible parts (possibly empty when an object is fully hidden in a frame).
    """
    h, w = int(size[0]), int(size[1])
    rng = np.random.default_rng([int(seed), VIDEO_STREAM, int(video_id)])
    background = _background(rng, h, w)
    avoid = background.mean(axis=(0, 1))
    ys, xs = _grid(h, w)
    side = float(min(h, w))
    objects = [_new_object(rng, (h, w), avoid, 0.2) for _ in range(int(num_objects))]
    # Keep video objects mid-sized so they stay trackable while moving.
    for obj in objects:
        obj["radius"] = side * rng.uniform(0.15, 0.4) / 2
        obj["vel"] = rng.uniform(-2.5, 2.5, 2) * side / 128.0
        obj["spin"] = rng.uniform(-0.08, 0.08)
        obj["scale_amp"], obj["scale_freq"], obj["scale_phase"] = rng.uniform(0, 0.15), rng.uniform(0.1, 0.4), rng.uniform(0, 2 * np.pi)
        obj["aspect_amp"] = rng.uniform(0, 0.15)
        n = len(obj.get("vertex_radii", ()))
        obj["wobble"] = (rng.uniform(0, 0.12, n), rng.uniform(0.1, 0.5, n), rng.uniform(0, 2 * np.pi, n))
    t_all = np.arange(int(num_frames), dtype=np.float64)
    frames = np.empty((len(t_all), h, w, 3), dtype=np.uint8)
    masks = np.zeros((len(t_all), len(objects), h, w), dtype=bool)
    for ti, t in enumerate(t_all):
        img = background.copy()
        full = []
        for obj in objects:
            cx = float(_reflect(np.asarray(obj["cx"] + obj["vel"][0] * t), 0.1 * w, 0.9 * w))
            cy = float(_reflect(np.asarray(obj["cy"] + obj["vel"][1] * t), 0.1 * h, 0.9 * h))
            angle = obj["angle"] + obj["spin"] * t
            scale = 1.0 + obj["scale_amp"] * np.sin(obj["scale_freq"] * t + obj["scale_phase"])
            aspect = float(np.clip(obj["aspect"] * (1.0 + obj["aspect_amp"] * np.sin(0.3 * t)), 0.3, 1.0))
            radii = None
            if "vertex_radii" in obj:
                amp, freq, phase = obj["wobble"]
                radii = obj["vertex_radii"] * (1.0 + amp * np.sin(freq * t + phase))
            u, v = _local(obj, ys, xs, cx, cy, angle)
            m = _shape_mask(obj, u, v, obj["radius"] * scale, aspect, radii)
            img = np.where(m[..., None], _texture(obj, u, v), img)
            full.append(m)
        frames[ti] = _to_uint8(img)
        masks[ti] = np.stack(_visible(full))
    return frames, masks, list(range(1, len(objects) + 1)), [int(o["category_id"]) for o in objects]


def generate_coco_video_dataset(
    out_uri: str,
    num_videos: int,
    seed: int,
    split: str = "train",
    num_frames: int = 12,
    size: tuple[int, int] = (128, 128),
    num_objects: int = 3,
    first_video_id: int = 1,
    first_image_id: int = 1,
    options: StorageOptions = DEFAULT_OPTIONS,
) -> dict:
    """Render videos to ``out_uri/images/<split>/<video_id:06d>/<frame:04d>.png`` and a COCO-video json to
    ``out_uri/annotations/instances_<split>.json``; returns the dict.

    Images carry ``video_id`` and ``frame_index``; each non-empty visible mask is one annotation with ``track_id``
    (the object's id within its video, stable across frames) and ``video_id``; ``videos`` lists ``{id, name, length}``.
    Use a different ``out_uri`` from a still-image set, and separate id ranges for splits.
    """
    h, w = int(size[0]), int(size[1])
    images, annotations, videos = [], [], []
    image_id = int(first_image_id)
    for video_id in range(int(first_video_id), int(first_video_id) + int(num_videos)):
        frames, masks, track_ids, cats = render_video(seed, video_id, num_frames, (h, w), num_objects)
        videos.append({"id": video_id, "name": f"{video_id:06d}", "length": int(len(frames))})
        for t in range(len(frames)):
            file_name = f"{video_id:06d}/{t:04d}.png"
            storage.write_bytes(storage.join(out_uri, "images", split, file_name), encode_png(frames[t]), options)
            images.append({
                "id": image_id, "file_name": file_name, "height": h, "width": w,
                "video_id": video_id, "frame_index": t,
            })  # fmt: skip
            present = [k for k in range(masks.shape[1]) if masks[t, k].any()]
            if present:
                first = len(annotations) + 1
                extra = [{"image_id": image_id, "video_id": video_id, "track_id": track_ids[k]} for k in present]
                annotations += annotations_from_masks(
                    masks[t, present], list(range(first, first + len(present))), [cats[k] for k in present], extra
                )
            image_id += 1
    coco = {
        "info": {"description": f"maskflow synthetic shape videos ({split})", "seed": int(seed), "split": split},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
        "videos": videos,
    }
    write_coco_json(coco, storage.join(out_uri, "annotations", f"instances_{split}.json"), options)
    return coco
