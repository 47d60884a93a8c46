"""Video-proposals stage on real data: DAVIS frames -> ingest -> proposals (a Mask R-CNN trained here) on the moto
S3 endpoint -> per-video samples with templates, per-track ground truth and top-50 proposals, read back through Ray
Data. A video with a missing frame and one with a mask whose size differs from its frame are rejected with their
reasons; the others arrive whole. Synthetic videos come in through their COCO-video json."""

from __future__ import annotations

import json
import shutil
import uuid

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskflow import config, shards, stage, storage
from maskflow.data import schema
from maskflow.data.coco import load_coco_json, write_coco_json
from maskflow.data.convert import davis_to_coco
from maskflow.data.synthetic import generate_coco_video_dataset
from maskflow.data.validate import decode_rle, rle_to_bytes
from maskflow.stages import video_proposals as vp
from tests.test_ingest import run_ingest
from tests.test_stage_ffd_crops import run_proposals

pytestmark = pytest.mark.slow
FRAMES = 6


@pytest.fixture(scope="module")
def s3_options(s3_endpoint):
    return storage.StorageOptions(endpoint_url=s3_endpoint, region="us-east-1")


@pytest.fixture(scope="module")
def davis_copy(shared_data, tmp_path_factory):
    """A DAVIS-layout folder made of real DAVIS frames: two clean sequences, one with a frame missing, one with a
    mask of the wrong size."""
    src = shared_data / "davis2016_subset"
    root = tmp_path_factory.mktemp("davis")
    plan = {"blackswan": ("blackswan", 0), "car-shadow": ("car-shadow", 0),
            "blackswan-gap": ("blackswan", FRAMES), "car-shadow-badmask": ("car-shadow", FRAMES)}
    for name, (seq, first) in plan.items():
        for kind, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
            (root / kind / "480p" / name).mkdir(parents=True)
            for i in range(FRAMES):
                shutil.copy(src / kind / "480p" / seq / f"{first + i:05d}.{ext}",
                            root / kind / "480p" / name / f"{i:05d}.{ext}")
    (root / "JPEGImages" / "480p" / "blackswan-gap" / "00002.jpg").unlink()
    bad = root / "Annotations" / "480p" / "car-shadow-badmask" / "00003.png"
    mask = Image.open(bad)
    mask.resize((mask.width // 2, mask.height // 2), Image.NEAREST).save(bad)
    return root


def test_davis_videos_on_s3(ray_local, davis_copy, penn_fudan_maskrcnn, s3_options, tmp_path, tracking_cfg):
    bucket = f"mf-video-{uuid.uuid4().hex[:8]}"
    storage.s3_client(s3_options).create_bucket(Bucket=bucket)
    coco, images = davis_to_coco(str(davis_copy))
    index = tmp_path / "davis.json"
    write_coco_json(coco, str(index))
    frames = f"s3://{bucket}/shards/davis"
    assert run_ingest(str(index), images, frames, s3_options, per_shard=5)["samples"] == 4 * FRAMES - 1
    props = f"s3://{bucket}/proposals/davis"
    run_proposals(penn_fudan_maskrcnn, frames, props, s3_options)

    out = f"s3://{bucket}/videos/davis"
    cfg = config.build(vp.VideoProposalsConfig, {
        "input": {"proposals": props, "videos": {"davis": str(davis_copy)}},
        "output": {"uri": out, "samples_per_shard": FRAMES},
        "storage": {"endpoint_url": s3_options.endpoint_url, "region": s3_options.region},
    })
    manifest = stage.run_stage(vp.VideoProposalsStage(cfg, s3_options), cfg.output, cfg.compute, tracking_cfg, cfg,
                               s3_options)
    assert manifest["schema"] == vp.SCHEMA.name
    assert manifest["inputs"] == 4 and manifest["rejected"] == 2 and manifest["samples"] == 2 * FRAMES
    assert manifest["counts"] == {"videos": 2, "frames": 2 * FRAMES, "tracks": 2}
    assert [s["samples"] for s in manifest["shards"]] == [FRAMES, FRAMES]  # whole videos, one per shard here
    rejects = {json.loads(x)["key"]: json.loads(x)["reason"]
               for x in storage.read_text(storage.join(out, shards.REJECTS), s3_options).splitlines()}
    assert rejects["blackswan-gap"].startswith("frame 2 missing from the video")
    assert "car-shadow-badmask/00003.png" in rejects["car-shadow-badmask"]
    assert "differs from image size" in rejects["car-shadow-badmask"]

    import ray.data

    uris = shards.shard_uris(out, s3_options)
    fs, _ = storage.pyarrow_filesystem(uris[0], s3_options)
    rows = ray.data.read_webdataset([storage.pyarrow_filesystem(u, s3_options)[1] for u in uris], filesystem=fs,
                                    decoder=None).take_all()
    videos = {v["name"]: v["id"] for v in coco["videos"]}
    assert sorted(r["__key__"] for r in rows) == sorted(
        vp.frame_key(videos[n], i) for n in ("blackswan", "car-shadow") for i in range(FRAMES))
    by_image = {s[schema.META]["image_id"]: s for s in shards.iter_samples(props, s3_options)}
    for row in rows:
        frame = vp.SCHEMA.decode(row)[vp.FRAME]
        name, i = frame["video"], frame["frame_index"]
        assert frame["num_frames"] == FRAMES and frame["tracks"] == [1] and (frame["height"], frame["width"]) == (480,
                                                                                                                 854)
        # Ground truth = the DAVIS mask PNG of this frame; template = frame 0's.
        png = np.array(Image.open(davis_copy / "Annotations" / "480p" / name / f"{i:05d}.png")) > 127
        assert np.array_equal(decode_rle(frame["gt"]["1"]), png)
        first = np.array(Image.open(davis_copy / "Annotations" / "480p" / name / "00000.png")) > 127
        assert frame["templates"]["1"]["frame_index"] == 0
        assert np.array_equal(decode_rle(frame["templates"]["1"]["segmentation"]), first)
        # Proposals: the frame's top 50 from the proposals job, in its order, with IoU against the track.
        source = by_image[frame["image_id"]]
        assert row[schema.IMAGE] == source[schema.IMAGE]
        p = frame["proposals"]
        k = min(50, len(source[schema.PROPOSALS]["scores"]))
        assert p["scores"] == source[schema.PROPOSALS]["scores"][:k] and len(p["segmentations"]) == k
        ref = mask_utils.iou([rle_to_bytes(r) for r in p["segmentations"]], [rle_to_bytes(frame["gt"]["1"])], [0])
        assert np.allclose(np.asarray(p["iou"]), np.asarray(ref).reshape(k, 1), atol=1e-6)
        assert p["model"] == penn_fudan_maskrcnn["uri"]

    import mlflow

    run = mlflow.get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["samples"] == 2 * FRAMES and run.data.metrics["count.videos"] == 2
    assert "contact_sheet.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}


def test_synthetic_videos_from_coco_video_json(ray_local, penn_fudan_maskrcnn, tmp_path):
    """Three occluding objects per video: a track hidden in a frame has null ground truth there; the index (a
    COCO-video json) missing one frame of a video rejects that video."""
    coco = generate_coco_video_dataset(str(tmp_path / "syn"), 2, seed=5, num_frames=5, size=(64, 64),
                                       num_objects=3)
    index = tmp_path / "syn" / "annotations" / "instances_train.json"
    frames = str(tmp_path / "frames")
    run_ingest(str(index), str(tmp_path / "syn" / "images" / "train"), frames, storage.DEFAULT_OPTIONS, per_shard=4)
    props = str(tmp_path / "props")
    run_proposals(penn_fudan_maskrcnn, frames, props, storage.DEFAULT_OPTIONS, top_k=20)
    gone = next(img for img in coco["images"] if img["video_id"] == 2 and img["frame_index"] == 3)
    holed = load_coco_json(str(index))
    holed["images"] = [img for img in holed["images"] if img["id"] != gone["id"]]
    write_coco_json(holed, str(tmp_path / "holed.json"))

    cfg = config.build(vp.VideoProposalsConfig, {
        "input": {"proposals": props, "videos": {"coco": str(tmp_path / "holed.json")}},
        "videos": {"top_k": 10}, "output": {"uri": str(tmp_path / "videos")},
    })
    manifest = stage.run_stage(vp.VideoProposalsStage(cfg), cfg.output, cfg.compute, None, cfg)
    assert manifest["inputs"] == 2 and manifest["samples"] == 5 and manifest["rejected"] == 1
    (reject,) = [json.loads(x) for x in (tmp_path / "videos" / shards.REJECTS).read_text().splitlines()]
    assert reject["key"] == "000002" and reject["reason"].startswith("frame 3 missing from the video")

    truth = {}
    for ann in coco["annotations"]:
        truth[(ann["image_id"], ann["track_id"])] = ann["segmentation"]
    for s in shards.iter_samples(str(tmp_path / "videos")):
        frame = s[vp.FRAME]
        assert frame["video_id"] == 1 and frame["tracks"] == [1, 2, 3] and len(frame["proposals"]["scores"]) <= 10
        assert set(frame["templates"]) == {"1", "2", "3"}
        assert np.asarray(frame["proposals"]["iou"]).shape == (len(frame["proposals"]["scores"]), 3)
        for t in (1, 2, 3):
            want = truth.get((frame["image_id"], t))
            if want is None:
                assert frame["gt"][str(t)] is None
            else:
                assert np.array_equal(decode_rle(frame["gt"][str(t)]), decode_rle(want))
    assert manifest["counts"]["tracks"] == 3


def test_video_index_config_errors():
    with pytest.raises(config.ConfigError, match=r"^input.videos.coco: set exactly one of"):
        config.build(vp.VideoProposalsConfig, {"input": {"proposals": "p", "videos": {}}, "output": {"uri": "x"}})
