"""Data layer: COCO reading, validation, converters of the real sets, synthetic data."""

from __future__ import annotations

import collections
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskflow.data import coco as coco_io
from maskflow.data import convert, synthetic
from maskflow.data.validate import (
    BOX_OUTSIDE,
    POLYGON_TOO_SHORT,
    ZERO_AREA,
    clean_annotation,
    decode_image,
    decode_rle,
    encode_mask,
)

from tests.conftest import SHARED_DATA as DATA, require_shared_data  # noqa: E402


def data_dir(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        require_shared_data(DATA / name)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- real sets


def test_penn_fudan_counts_and_mask_round_trip():
    root = data_dir("penn_fudan_ped")
    coco, images_uri = convert.penn_fudan_to_coco(str(root))
    assert len(coco["images"]) == 60
    assert [c["name"] for c in coco["categories"]] == ["person"]
    assert [img["id"] for img in coco["images"]] == list(range(1, 61))
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    assert coco["info"]["skipped"] == []

    by_image = collections.defaultdict(list)
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    expected_total = 0
    for img in coco["images"]:
        label_map = np.asarray(Image.open(root / "PedMasks" / img["file_name"].replace(".png", "_mask.png")))
        values = [int(v) for v in np.unique(label_map) if v != 0]
        expected_total += len(values)
        anns = by_image[img["id"]]
        assert [a["instance_value"] for a in anns] == values
        for ann in anns:  # decode(RLE) == (mask PNG == k), and bbox/area describe that mask
            decoded = decode_rle(ann["segmentation"])
            truth = label_map == ann["instance_value"]
            assert np.array_equal(decoded, truth)
            assert ann["area"] == truth.sum()
            ys, xs = np.nonzero(truth)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert len(coco["annotations"]) == expected_total
    assert Path(images_uri, coco["images"][0]["file_name"]).is_file()


def test_dlib_faces_masks_and_landmarks():
    root = data_dir("dlib_faces_landmarks")
    coco, images_uri = convert.dlib_faces_to_coco(str(root))
    assert images_uri == str(root) and coco["info"]["skipped"] == []
    # 4 training + 5 testing photos, 18 + 25 hand-drawn face boxes, 68 machine-made landmarks each (SOURCES.md)
    assert len(coco["images"]) == 9 and len(coco["annotations"]) == 43
    assert [c["name"] for c in coco["categories"]] == ["face"]
    assert [img["file_name"] for img in coco["images"]] == sorted(p.name for p in root.glob("*.jpg"))
    faces = collections.Counter(a["image_id"] for a in coco["annotations"])
    for img in coco["images"]:
        width, height = Image.open(root / img["file_name"]).size
        assert (img["width"], img["height"]) == (width, height)
        kps = np.asarray(img["keypoints"])
        assert kps.shape == (68 * faces[img["id"]], 2)
        assert (kps >= 0).all() and (kps[:, 0] <= width - 1).all() and (kps[:, 1] <= height - 1).all()
    # the first training face, box (left 194, top 90, 37 x 37), and its first landmark (part 00 at 201, 107)
    first = next(a for a in coco["annotations"] if a["image_id"] == 1)
    assert first["bbox"] == [194.0, 90.0, 37.0, 37.0] and coco["images"][0]["keypoints"][0] == [201.0, 107.0]
    for ann in coco["annotations"]:
        mask = decode_rle(ann["segmentation"])
        x, y, w, h = ann["bbox"]
        assert mask.any() and ann["area"] == mask.sum()
        assert ann["area"] == pytest.approx(np.pi * w * h / 4, rel=0.05)  # the ellipse inscribed in the box
    # each face's landmarks gather on its mask (jaw and brows reach past the inscribed ellipse): most inside it
    inside = []
    for img in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        kps = np.asarray(img["keypoints"]).round().astype(int).reshape(len(anns), 68, 2)
        for ann, pts in zip(anns, kps):
            inside.append(decode_rle(ann["segmentation"])[pts[:, 1], pts[:, 0]].mean())
    assert np.mean(inside) > 0.7

    boxes, _ = convert.dlib_faces_to_coco(str(root), ["training"], face_shape="box")
    assert len(boxes["images"]) == 4 and len(boxes["annotations"]) == 18
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] for a in boxes["annotations"])


def test_dlib_faces_skips_with_reasons(tmp_path):
    root = data_dir("dlib_faces_landmarks")
    text = (root / "training_with_face_landmarks.xml").read_text(encoding="iso-8859-1")
    text = text.replace("<box top='90' left='194' width='37' height='37'>",
                        "<box top='90' left='194' width='37' height='37' ignore='1'>", 1)
    text = text.replace("      <part name='67' x='174' y='144'/>\n", "", 1)  # the second face loses a landmark
    (tmp_path / "training_with_face_landmarks.xml").write_text(text, encoding="iso-8859-1")
    for name in ("2007_007763.jpg", "2008_002079.jpg", "2008_001009.jpg"):  # 2008_001322.jpg is missing
        (tmp_path / name).write_bytes((root / name).read_bytes())
    coco, _ = convert.dlib_faces_to_coco(str(tmp_path), ["training"])
    xml = "training_with_face_landmarks.xml"
    assert [(s["key"], s["reason"]) for s in coco["info"]["skipped"]] == [
        (f"{xml}:2007_007763.jpg:box0", "box marked ignore"),
        (f"{xml}:2007_007763.jpg:box1", "67 landmarks, not 68"),
        ("2008_001322.jpg", "missing image file")]
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 18 - 3 - 2
    assert len(coco["images"][0]["keypoints"]) == 68 * 5
    with pytest.raises(ValueError, match="split"):
        convert.dlib_faces_to_coco(str(root), ["validation"])


def test_coco128_polygons_inside_images():
    root = data_dir("coco128_seg")
    images_dir, labels_dir = root / "images" / "train2017", root / "labels" / "train2017"
    coco, images_uri = convert.yolo_seg_to_coco(str(images_dir), str(labels_dir), convert.COCO80_CLASSES)
    assert len(coco["images"]) == 96
    assert len(coco["categories"]) == 80 and coco["categories"][0] == {"id": 1, "name": "person"}
    # every line of every label file that has an image becomes one annotation (none of them is degenerate)
    stems = {Path(img["file_name"]).stem for img in coco["images"]}
    lines = sum(
        sum(1 for line in p.read_text().splitlines() if line.strip()) for p in labels_dir.glob("*.txt") if p.stem in stems
    )
    assert len(coco["annotations"]) == lines > 500
    orphans = {s["key"] for s in coco["info"]["skipped"]}
    assert orphans == {p.name for p in labels_dir.glob("*.txt") if p.stem not in stems}
    sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
    for ann in coco["annotations"]:
        w, h = sizes[ann["image_id"]]
        xy = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        assert len(xy) >= 3
        assert (xy >= 0).all() and (xy[:, 0] <= w).all() and (xy[:, 1] <= h).all()
        x, y, bw, bh = ann["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h and ann["area"] > 0
    # images without a label file are present, with no annotations
    unlabelled = {p.stem for p in images_dir.iterdir()} - {p.stem for p in labels_dir.glob("*.txt")}
    annotated = {ann["image_id"] for ann in coco["annotations"]}
    assert unlabelled and all(img["id"] not in annotated for img in coco["images"] if Path(img["file_name"]).stem in unlabelled)
    records, rejects = coco_io.image_records(coco, images_uri)
    assert len(records) == 96 and rejects == []


def test_voc_instances_match_labelme_coco_export():
    root = data_dir("labelme_examples") / "instance_segmentation"
    coco, images_uri = convert.voc_instances_to_coco(str(root / "data_dataset_voc"))
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 12
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert names[15] == "person" and 0 not in names
    # labelme's own COCO export of the same polygons: same classes per image
    export = json.loads((root / "data_dataset_coco" / "annotations.json").read_text())
    export_files = {img["id"]: Path(img["file_name"]).name for img in export["images"]}
    expected = collections.defaultdict(list)
    for ann in export["annotations"]:
        expected[export_files[ann["image_id"]]].append(ann["category_id"])
    got = collections.defaultdict(list)
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    for ann in coco["annotations"]:
        got[files[ann["image_id"]]].append(ann["category_id"])
        mask = decode_rle(ann["segmentation"])
        assert ann["area"] == mask.sum() > 0
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}
    assert Path(images_uri, coco["images"][0]["file_name"]).is_file()


def test_davis_frames_videos_and_tracks():
    root = data_dir("davis2016_subset")
    coco, images_uri = convert.davis_to_coco(str(root))
    videos = {v["name"]: v for v in coco["videos"]}
    assert videos["blackswan"]["length"] == 50 and videos["car-shadow"]["length"] == 40
    assert len(coco["images"]) == 90 and len(coco["annotations"]) == 90  # every DAVIS 2016 frame has its object
    swan = [img for img in coco["images"] if img["video_id"] == videos["blackswan"]["id"]]
    assert [img["frame_index"] for img in swan] == list(range(50))
    assert {a["track_id"] for a in coco["annotations"]} == {1}
    first = next(a for a in coco["annotations"] if a["image_id"] == swan[0]["id"])
    truth = np.asarray(Image.open(root / "Annotations" / "480p" / "blackswan" / "00000.png")) > 127
    assert np.array_equal(decode_rle(first["segmentation"]), truth)
    records, rejects = coco_io.image_records(coco, images_uri)
    assert rejects == [] and records[0]["video_id"] == 1 and records[0]["frame_index"] == 0
    assert Path(records[0]["file_uri"]).is_file()
    only, _ = convert.davis_to_coco(str(root), sequences=["car-shadow"])
    assert len(only["images"]) == 40 and only["videos"] == [{"id": 1, "name": "car-shadow", "length": 40}]


def test_pycocotools_reads_real_coco_json():
    root = data_dir("coco_panoptic_sample")
    coco = coco_io.load_coco_json(str(root / "panoptic_coco_detection_format.json"))
    records, rejects = coco_io.image_records(coco, str(root / "input_images"))
    assert rejects == []
    assert [r["image_id"] for r in records] == [142238, 439180]
    assert sum(len(r["annotations"]) for r in records) == len(coco["annotations"]) == 50
    for rec in records:
        assert Path(rec["file_uri"]).is_file()
        for ann in rec["annotations"]:
            clean, reason = clean_annotation(ann, rec["height"], rec["width"])
            assert reason is None
            assert np.allclose(clean["bbox"], ann["bbox"], atol=1.0) and clean["area"] == ann["area"]
    with pytest.raises(ValueError, match="panoptic"):
        coco_io.load_coco_json(str(root / "panoptic_examples.json"))


def test_converter_skips_mask_of_wrong_size(tmp_path):
    (tmp_path / "PNGImages").mkdir()
    (tmp_path / "PedMasks").mkdir()
    good = np.zeros((20, 30), np.uint8)
    good[5:10, 5:12] = 1
    good[12:18, 20:25] = 2
    for name, mask in [("a", good), ("b", np.ones((10, 10), np.uint8))]:
        (tmp_path / "PNGImages" / f"{name}.png").write_bytes(png_bytes(np.zeros((20, 30, 3), np.uint8)))
        (tmp_path / "PedMasks" / f"{name}_mask.png").write_bytes(png_bytes(mask))
    coco, _ = convert.penn_fudan_to_coco(str(tmp_path))
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 2
    assert coco["annotations"][0]["bbox"] == [5.0, 5.0, 7.0, 5.0] and coco["annotations"][0]["area"] == 35.0
    (skip,) = coco["info"]["skipped"]
    assert skip["key"] == "b_mask.png" and "differs from image size" in skip["reason"]


# --------------------------------------------------------------------------------------------- COCO json


def test_load_coco_json_rejects_non_instances(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        coco_io.load_coco_json(str(bad_json))
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="'images'"):
        coco_io.load_coco_json(str(no_images))
    ok = {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}], "annotations": [], "categories": []}
    coco_io.write_coco_json(ok, str(tmp_path / "sub" / "ok.json"))
    assert coco_io.load_coco_json(str(tmp_path / "sub" / "ok.json")) == ok


def test_image_records_rejects_unknown_image_and_missing_size():
    coco = {
        "images": [
            {"id": 2, "file_name": "b.png", "height": 8, "width": 8, "video_id": 1, "frame_index": 3},
            {"id": 1, "file_name": "a.png", "height": 8, "width": 8},
            {"id": 3, "file_name": "c.png", "width": 8},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]},
            {"id": 11, "image_id": 99, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]},
            {"id": 12, "image_id": 3, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    records, rejects = coco_io.image_records(coco, "s3://bucket/images")
    assert [r["image_id"] for r in records] == [1, 2]
    assert records[0]["file_uri"] == "s3://bucket/images/a.png"
    assert [a["id"] for a in records[0]["annotations"]] == [10] and records[1]["annotations"] == []
    assert records[1]["video_id"] == 1 and records[1]["frame_index"] == 3 and "video_id" not in records[0]
    assert {"kind": "annotation", "key": "ann-11", "reason": "annotation for unknown image id 99"} in rejects
    assert any(r["kind"] == "image" and r["key"] == "img-3" and "height" in r["reason"] for r in rejects)
    assert any(r["key"] == "ann-12" for r in rejects)
    assert coco_io.image_records(coco, "s3://bucket/images") == (records, rejects)  # deterministic


# --------------------------------------------------------------------------------------------- validation


def _ann(segmentation, **kw):
    return {"id": 7, "category_id": 3, "segmentation": segmentation, **kw}


def test_clean_accepts_polygon_and_both_rle_forms():
    clean, reason = clean_annotation(_ann([[2, 2, 12, 2, 12, 8, 2, 8]], bbox=[2, 2, 10, 6]), 20, 30)
    assert reason is None and clean["id"] == 7 and clean["category_id"] == 3 and clean["iscrowd"] == 0
    assert isinstance(clean["segmentation"]["counts"], str) and clean["segmentation"]["size"] == [20, 30]
    mask = decode_rle(clean["segmentation"])
    assert clean["area"] == mask.sum() > 0
    ys, xs = np.nonzero(mask)
    assert clean["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]

    truth = np.zeros((20, 30), bool)
    truth[3:9, 4:15] = True
    compressed = encode_mask(truth)
    clean, reason = clean_annotation(_ann(compressed, iscrowd=1), 20, 30)
    assert reason is None and clean["iscrowd"] == 1 and clean["area"] == 66 and clean["bbox"] == [4, 3, 11, 6]
    assert np.array_equal(decode_rle(clean["segmentation"]), truth)
    # uncompressed RLE: column-major run lengths starting with background
    flat = truth.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    clean, reason = clean_annotation(_ann({"size": [20, 30], "counts": counts}), 20, 30)
    assert reason is None and np.array_equal(decode_rle(clean["segmentation"]), truth)
    assert clean["segmentation"]["counts"] == compressed["counts"]


@pytest.mark.parametrize(
    "ann, reason",
    [
        (_ann([[1, 1, 5, 5]]), POLYGON_TOO_SHORT),
        (_ann([[1, 1, 5, 5, 9, 1], [2, 2]]), POLYGON_TOO_SHORT),
        (_ann([[1, 1, 5, 5, 9, 1]], bbox=[40, 40, 5, 5]), BOX_OUTSIDE),
        (_ann([[1, 1, 5, 5, 9, 1]], bbox=[1, 1, 0, 4]), BOX_OUTSIDE),
        (_ann([[1, 1, 5, 5, 9, 1]], bbox=[-5, 1, 10, 4]), BOX_OUTSIDE),
        (_ann([[1, 1, 5, 1, 9, 1]]), ZERO_AREA),  # collinear points
        (_ann({"size": [20, 30], "counts": [600]}), ZERO_AREA),
        (_ann({"size": [10, 30], "counts": [300]}), "RLE size [10, 30] differs from image size [20, 30]"),
        (_ann({"size": [20, 30], "counts": [10, 5]}), "malformed segmentation"),
        (_ann({"size": [20, 30], "counts": "\x7f\x7f"}), "malformed segmentation"),
        (_ann({"size": [20, 30], "counts": encode_mask(np.ones((10, 10), bool))["counts"]}), "malformed segmentation"),
        (_ann({"size": [20, 30]}), "malformed segmentation"),
        (_ann([["a", 1, 2, 3, 4, 5]]), "malformed segmentation"),
        (_ann("polygon"), "malformed segmentation"),
        (_ann(None), "missing segmentation"),
        (_ann([]), "missing segmentation"),
        ({"id": 7, "category_id": 3}, "missing segmentation"),
        ({"id": 7, "segmentation": [[1, 1, 5, 5, 9, 1]]}, "missing or non-integer category_id"),
    ],
)
def test_clean_rejects_with_reason(ann, reason):
    clean, why = clean_annotation(ann, 20, 30)
    assert clean is None
    assert why is not None and why.startswith(reason)


def test_decode_image_good_and_corrupt():
    rgb = np.random.default_rng(0).integers(0, 255, (6, 9, 3), dtype=np.uint8)
    tensor = decode_image(png_bytes(rgb))
    assert tuple(tensor.shape) == (3, 6, 9) and np.array_equal(tensor.permute(1, 2, 0).numpy(), rgb)
    grey = decode_image(png_bytes(rgb[..., 0]))
    assert tuple(grey.shape) == (3, 6, 9)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    assert tuple(decode_image(buf.getvalue()).shape) == (3, 6, 9)
    for bad in (b"", b"not an image at all", png_bytes(rgb)[:40], buf.getvalue()[:30]):
        with pytest.raises(ValueError, match="^corrupt image"):
            decode_image(bad)


# --------------------------------------------------------------------------------------------- synthetic


def test_render_image_reproducible_and_masks_valid():
    a = synthetic.render_image(5, 1)
    b = synthetic.render_image(5, 1)
    assert np.array_equal(a[0], b[0]) and all(np.array_equal(x, y) for x, y in zip(a[1], b[1])) and a[2] == b[2]
    assert not np.array_equal(synthetic.render_image(6, 1)[0], a[0])
    assert not np.array_equal(synthetic.render_image(5, 2)[0], a[0])
    for image_id in range(1, 9):
        image, masks, cats = synthetic.render_image(5, image_id, size=(96, 128), max_objects=5)
        assert image.shape == (96, 128, 3) and image.dtype == np.uint8
        assert 0 < len(masks) <= 5 and len(cats) == len(masks)
        assert all(c in {1, 2, 3, 4} for c in cats)
        stack = np.stack(masks)
        assert stack.shape[1:] == (96, 128) and stack.dtype == bool
        assert (stack.sum(axis=(1, 2)) >= synthetic.min_area((96, 128))).all()
        assert stack.sum(axis=0).max() == 1  # disjoint: occlusion resolved
        assert image.std() > 5  # textured, not flat


def test_generate_coco_dataset_deterministic_and_readable(tmp_path):
    a = synthetic.generate_coco_dataset(str(tmp_path / "a"), 4, seed=1, split="train")
    synthetic.generate_coco_dataset(str(tmp_path / "b"), 4, seed=1, split="train")
    synthetic.generate_coco_dataset(str(tmp_path / "c"), 4, seed=2, split="train")
    val = synthetic.generate_coco_dataset(str(tmp_path / "a"), 2, seed=1, split="val", first_image_id=5)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 + 2 + 2
    for rel in files:
        if "val" not in str(rel):
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    img = Path("images/train/000000000001.png")
    assert (tmp_path / "a" / img).read_bytes() != (tmp_path / "c" / img).read_bytes()
    assert not {i["id"] for i in a["images"]} & {i["id"] for i in val["images"]}

    loaded = coco_io.load_coco_json(str(tmp_path / "a" / "annotations" / "instances_train.json"))
    assert loaded == json.loads(json.dumps(a))
    records, rejects = coco_io.image_records(loaded, str(tmp_path / "a" / "images" / "train"))
    assert rejects == [] and len(records) == 4
    for rec in records:
        pixels = decode_image(Path(rec["file_uri"]).read_bytes())
        assert tuple(pixels.shape) == (3, 128, 128)
        assert np.array_equal(pixels.permute(1, 2, 0).numpy(), synthetic.render_image(1, rec["image_id"])[0])
        union = np.zeros((128, 128), int)
        for ann in rec["annotations"]:
            clean, reason = clean_annotation(ann, rec["height"], rec["width"])
            assert reason is None and clean["bbox"] == ann["bbox"] and clean["area"] == ann["area"]
            union += decode_rle(ann["segmentation"])
        assert union.max() == 1


def test_video_tracks_are_stable(tmp_path):
    frames, masks, track_ids, cats = synthetic.render_video(3, 1, num_frames=8, num_objects=3)
    again = synthetic.render_video(3, 1, num_frames=8, num_objects=3)
    assert np.array_equal(frames, again[0]) and np.array_equal(masks, again[1])
    assert frames.shape == (8, 128, 128, 3) and masks.shape == (8, 3, 128, 128)
    assert track_ids == [1, 2, 3] and len(cats) == 3
    assert masks.sum(axis=1).max() == 1  # disjoint within every frame
    assert not np.array_equal(frames[0], frames[-1])  # things move
    for k in range(3):  # the same track overlaps itself from one frame to the next
        for t in range(7):
            a, b = masks[t, k], masks[t + 1, k]
            if a.sum() > 30 and b.sum() > 30:
                assert (a & b).sum() / (a | b).sum() > 0.3

    coco = synthetic.generate_coco_video_dataset(str(tmp_path), 2, seed=3, num_frames=5, num_objects=3)
    assert [v["length"] for v in coco["videos"]] == [5, 5] and len(coco["images"]) == 10
    assert sorted({(i["video_id"], i["frame_index"]) for i in coco["images"]}) == [(v, t) for v in (1, 2) for t in range(5)]
    per_track = collections.defaultdict(set)
    for ann in coco["annotations"]:
        per_track[(ann["video_id"], ann["track_id"])].add(ann["category_id"])
    assert all(len(c) == 1 for c in per_track.values())  # a track keeps its category
    assert {t for _, t in per_track} <= {1, 2, 3}
    records, rejects = coco_io.image_records(
        coco_io.load_coco_json(str(tmp_path / "annotations" / "instances_train.json")), str(tmp_path / "images" / "train")
    )
    assert rejects == [] and len(records) == 10 and Path(records[-1]["file_uri"]).is_file()


def test_synthetic_and_coco_io_through_s3(s3_options, s3_bucket):
    """Everything goes through maskflow.storage, so an s3:// root works like a local one (moto server on loopback)."""
    from maskflow import storage

    root = f"s3://{s3_bucket}/syn"
    coco = synthetic.generate_coco_dataset(root, 2, seed=4, split="val", first_image_id=100, options=s3_options)
    assert storage.list_names(f"{root}/images/val", s3_options) == ["000000000100.png", "000000000101.png"]
    loaded = coco_io.load_coco_json(f"{root}/annotations/instances_val.json", s3_options)
    assert loaded == json.loads(json.dumps(coco))
    records, rejects = coco_io.image_records(loaded, f"{root}/images/val")
    assert rejects == [] and records[0]["file_uri"] == f"{root}/images/val/000000000100.png"
    pixels = decode_image(storage.read_bytes(records[0]["file_uri"], s3_options))
    assert np.array_equal(pixels.permute(1, 2, 0).numpy(), synthetic.render_image(4, 100)[0])


def test_pf_pascal_pairs_through_s3(s3_options, s3_bucket):
    from maskflow import storage
    from maskflow.data.pf_pascal import read_pf_pascal_pairs

    local = data_dir("pf_pascal_pairs") / "test_pairs.csv"
    uri = f"s3://{s3_bucket}/pf_pascal/test_pairs.csv"
    storage.write_bytes(uri, local.read_bytes(), s3_options)
    remote, here = read_pf_pascal_pairs(uri, s3_options), read_pf_pascal_pairs(str(local))
    assert len(remote) == len(here) == 299
    assert all(np.array_equal(a["target_kps"], b["target_kps"]) and a["source_image"] == b["source_image"]
               for a, b in zip(remote, here))
    storage.write_bytes(uri, b"source_image,target_image\na.jpg,b.jpg\n", s3_options)
    with pytest.raises(ValueError, match="expected columns"):
        read_pf_pascal_pairs(uri, s3_options)
