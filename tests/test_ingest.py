"""Ingest stage on real data: Penn-Fudan → COCO → WebDataset shards on the moto S3 endpoint, read back through Ray
Data; every kind of bad input rejected with its reason while everything else arrives."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from maskflow import config, shards, stage, storage
from maskflow.data import schema
from maskflow.data.coco import load_coco_json, write_coco_json
from maskflow.stages.ingest import IngestConfig, IngestStage
from ops.masks import decode_masks


def run_ingest(annotations: str, images: str, output: str, options, tracking_cfg=None, per_shard: int = 16) -> dict:
    cfg = config.build(IngestConfig, {
        "input": {"annotations": annotations, "images": images, "name": "test"},
        "output": {"uri": output, "samples_per_shard": per_shard},
        "storage": {"endpoint_url": options.endpoint_url, "region": options.region},
    })
    return stage.run_stage(IngestStage(cfg, options), cfg.output, cfg.compute, tracking_cfg, cfg, options)


def test_penn_fudan_to_s3_and_back_through_ray_data(ray_local, penn_fudan_coco, s3_options, s3_bucket, shared_data,
                                                     tracking_cfg):
    annotations, images = penn_fudan_coco
    out = f"s3://{s3_bucket}/shards/pf"
    manifest = run_ingest(annotations, images, out, s3_options, tracking_cfg)

    coco = load_coco_json(annotations)
    assert manifest["inputs"] == manifest["samples"] == len(coco["images"]) == 60
    assert manifest["counts"]["annotations"] == len(coco["annotations"])
    assert [s["samples"] for s in manifest["shards"]] == [16, 16, 16, 12]
    assert shards.verify(out, s3_options) == []
    assert storage.read_text(storage.join(out, shards.REJECTS), s3_options) == ""

    # Ray Data's WebDataset reader over the same endpoint (explicit pyarrow S3 filesystem) sees every sample.
    import ray.data

    uris = shards.shard_uris(out, s3_options)
    fs, _ = storage.pyarrow_filesystem(uris[0], s3_options)
    rows = ray.data.read_webdataset([storage.pyarrow_filesystem(u, s3_options)[1] for u in uris], filesystem=fs,
                                    decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(schema.sample_key(i["id"]) for i in coco["images"])

    # The stored instance masks are exactly the Penn-Fudan mask PNG's instances.
    row = next(r for r in rows if json.loads(r["json"])["file_name"] == "FudanPed00001.png")
    meta = json.loads(row["json"])
    label_map = np.array(Image.open(shared_data / "penn_fudan_ped" / "PedMasks" / "FudanPed00001_mask.png"))
    masks = decode_masks([a["segmentation"] for a in meta["annotations"]])
    assert len(masks) == label_map.max()
    for k, m in enumerate(masks, 1):
        assert np.array_equal(m.astype(bool), label_map == k)
    assert row["image"] == (shared_data / "penn_fudan_ped" / "PNGImages" / "FudanPed00001.png").read_bytes()

    # A re-run over complete output is a no-op (same manifest, nothing rewritten).
    again = run_ingest(annotations, images, out, s3_options)
    assert again["created"] == manifest["created"] and again["job_fingerprint"] == manifest["job_fingerprint"]

    import mlflow

    run = mlflow.get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["samples"] == 60 and run.data.metrics["rejected"] == 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"manifest.json", "rejects.jsonl", "config.yaml", "contact_sheet.png"} <= artifacts


def test_bad_inputs_are_rejected_with_reasons(ray_local, penn_fudan_coco, tmp_path, caplog):
    annotations, images = penn_fudan_coco
    coco = load_coco_json(annotations)
    keep = coco["images"][:6]
    ids = [im["id"] for im in keep]
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for im in keep:
        shutil.copy(f"{images}/{im['file_name']}", img_dir / im["file_name"])
    (img_dir / keep[1]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")  # corrupt bytes
    (img_dir / keep[2]["file_name"]).unlink()  # missing file
    anns = [a for a in coco["annotations"] if a["image_id"] in ids]
    good_anns = [a for a in anns if a["image_id"] not in (ids[1], ids[2])]
    h, w = keep[3]["height"], keep[3]["width"]
    next_id = max(a["id"] for a in coco["annotations"]) + 1
    bad = [
        {"id": next_id, "image_id": ids[0], "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 5, 5],
         "segmentation": [[10, 10, 15, 10]]},  # polygon with 2 points
        {"id": next_id + 1, "image_id": ids[3], "category_id": 1, "iscrowd": 0, "bbox": [w + 50, 10, 20, 20],
         "segmentation": [[w + 50, 10, w + 70, 10, w + 70, 30]]},  # box outside the image
        {"id": next_id + 2, "image_id": ids[4], "category_id": 1, "iscrowd": 0, "bbox": [20, 20, 5, 5],
         "segmentation": {"size": [keep[4]["height"], keep[4]["width"]], "counts": [keep[4]["height"] * keep[4]["width"]]}},
        {"id": next_id + 3, "image_id": 987654, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 5, 5],
         "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},  # unknown image id
    ]
    path = tmp_path / "instances.json"
    write_coco_json({**coco, "images": keep, "annotations": anns + bad}, str(path))

    out = tmp_path / "shards"
    manifest = run_ingest(str(path), str(img_dir), str(out), storage.DEFAULT_OPTIONS, per_shard=4)
    rejects = [json.loads(line) for line in (out / shards.REJECTS).read_text().splitlines()]
    reasons = {r["key"]: r["reason"] for r in rejects}

    assert "corrupt image" in reasons[schema.sample_key(ids[1])]
    assert "missing image file" in reasons[schema.sample_key(ids[2])]
    assert "fewer than 3 points" in reasons[f"ann-{next_id}"]
    assert "outside the image" in reasons[f"ann-{next_id + 1}"]
    assert "zero-area" in reasons[f"ann-{next_id + 2}"]
    assert "unknown image id 987654" in reasons[f"ann-{next_id + 3}"]
    for reason in reasons.values():  # each one is logged too
        assert reason in caplog.text
    # The counts add up: every other image and annotation arrived.
    assert manifest["inputs"] == 6 and manifest["samples"] == 4 and manifest["rejected"] == 2
    assert manifest["rejected_by_kind"] == {"sample": 2, "annotation": 4}
    assert manifest["counts"]["annotations"] == len(good_anns)
    got = {s["__key__"]: s for s in shards.iter_samples(str(out))}
    assert sorted(got) == sorted(schema.sample_key(i) for i in (ids[0], ids[3], ids[4], ids[5]))
    assert sum(len(s["json"]["annotations"]) for s in got.values()) == len(good_anns)


def test_bad_config_and_uris_fail_before_ray(tmp_path, s3_options):
    with pytest.raises(config.ConfigError, match=r"^output\.samples_per_shard: "):
        config.build(IngestConfig, {"input": {"annotations": "a", "images": "b"},
                                    "output": {"uri": "x", "samples_per_shard": 0}})
    cfg = config.build(IngestConfig, {"input": {"annotations": str(tmp_path / "nope.json"), "images": str(tmp_path)},
                                      "output": {"uri": str(tmp_path / "out")}})
    with pytest.raises(storage.StorageError, match="input.annotations"):
        stage.run_stage(IngestStage(cfg), cfg.output, cfg.compute, None, cfg)
    cfg.input.annotations = "s3://maskflow-no-such-bucket/x.json"
    with pytest.raises(storage.StorageError, match="maskflow-no-such-bucket"):
        stage.run_stage(IngestStage(cfg, s3_options), cfg.output, cfg.compute, None, cfg, s3_options)
    cfg.input.annotations = "gs://bucket/x.json"
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        stage.run_stage(IngestStage(cfg), cfg.output, cfg.compute, None, cfg)
