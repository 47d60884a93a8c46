"""Instance-maps stage (DVIS) on real data: Penn-Fudan and COCO images -> image shards on the moto S3 endpoint ->
instance and semantic label maps, read back through Ray Data; a shard that lost a sample and a sample whose mask
does not fit its image are rejected with their reasons while everything else arrives."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from maskflow import config, shards, stage, storage
from maskflow.data import schema
from maskflow.data.coco import load_coco_json, write_coco_json
from maskflow.data.convert import penn_fudan_to_coco
from maskflow.stages import instance_maps as im
from ops.masks import decode_masks
from tests.test_ingest import run_ingest
from tests.test_shards import rewrite_shard

COCO_IDS = (142238, 439180)


@pytest.fixture(scope="module")
def mixed_coco(shared_data, tmp_path_factory):
    """8 Penn-Fudan images and the 2 real COCO val images (overlapping masks, 3 crowd regions) in one COCO json."""
    root = tmp_path_factory.mktemp("mixed")
    images = root / "images"
    images.mkdir()
    pf, pf_images = penn_fudan_to_coco(str(shared_data / "penn_fudan_ped"))
    keep = pf["images"][:8]
    for img in keep:
        shutil.copy(f"{pf_images}/{img['file_name']}", images / img["file_name"])
    sample = shared_data / "coco_panoptic_sample"
    coco = load_coco_json(str(sample / "panoptic_coco_detection_format.json"))
    for img in coco["images"]:
        shutil.copy(sample / "input_images" / img["file_name"], images / img["file_name"])
    anns = [a for a in pf["annotations"] if a["image_id"] <= 8]
    anns += [{**a, "id": a["id"] + 10**7} for a in coco["annotations"]]
    cats = pf["categories"] + [c for c in coco["categories"] if c["id"] != 1]
    path = root / "instances.json"
    write_coco_json({"images": keep + coco["images"], "annotations": anns, "categories": cats}, str(path))
    return str(path), str(images), keep


def maps_cfg(shards_uri: str, out: str, options, **resize) -> im.InstanceMapsConfig:
    return config.build(im.InstanceMapsConfig, {
        "input": {"shards": shards_uri}, "resize": resize, "output": {"uri": out},
        "storage": {"endpoint_url": options.endpoint_url, "region": options.region},
    })


def tamper_first_shard(shards_uri: str, options) -> tuple[str, str]:
    """Rewrite the first shard as a faulty writer would leave it: one listed sample gone, one sample's first mask of
    the wrong size (with a matching checksum, so it gets past the checksums to the checks after them). The manifest
    keeps its keys. Returns (dropped key, bad-mask key)."""
    uri = shards.shard_uris(shards_uri, options)[0]
    samples = list(shards.iter_shard(uri, options))
    dropped, bad = samples[1]["__key__"], samples[2]["__key__"]
    meta = schema.loads(samples[2][schema.META])
    meta["annotations"][0]["segmentation"]["size"] = [meta["height"] // 2, meta["width"]]
    samples[2][schema.META] = meta
    rewrite_shard(uri, [s for s in samples if s["__key__"] != dropped], options)
    return dropped, bad


def test_instance_maps_on_s3_from_penn_fudan_and_coco(ray_local, mixed_coco, shared_data, s3_options, s3_bucket,
                                                      tracking_cfg):
    annotations, images, pf_images = mixed_coco
    image_shards = f"s3://{s3_bucket}/shards/mixed"
    assert run_ingest(annotations, images, image_shards, s3_options, per_shard=5)["samples"] == 10
    dropped, bad = tamper_first_shard(image_shards, s3_options)

    out = f"s3://{s3_bucket}/instance_maps/mixed"
    cfg = maps_cfg(image_shards, out, s3_options, mode="min_edge", size=160, max_size=400)
    manifest = stage.run_stage(im.InstanceMapsStage(cfg, s3_options), cfg.output, cfg.compute, tracking_cfg, cfg,
                               s3_options)

    assert manifest["schema"] == im.SCHEMA.name
    assert manifest["inputs"] == 10 and manifest["samples"] == 8 and manifest["rejected"] == 2
    rejects = {json.loads(x)["key"]: json.loads(x)["reason"]
               for x in storage.read_text(storage.join(out, shards.REJECTS), s3_options).splitlines()}
    assert rejects[dropped] == stage.LACKS_LISTED_SAMPLE
    assert rejects[bad].startswith("mask size [") and "differs from image size" in rejects[bad]

    import ray.data

    uris = shards.shard_uris(out, s3_options)
    fs, _ = storage.pyarrow_filesystem(uris[0], s3_options)
    rows = ray.data.read_webdataset([storage.pyarrow_filesystem(u, s3_options)[1] for u in uris], filesystem=fs,
                                    decoder=None).take_all()
    by_id = {}
    for row in rows:
        s = im.SCHEMA.decode(row)
        by_id[s[im.META]["image_id"]] = s
    assert set(by_id) == {i["id"] for i in pf_images} - {int(dropped), int(bad)} | set(COCO_IDS)
    assert manifest["counts"]["instances"] == sum(len(s[im.META]["instances"]) for s in by_id.values())

    for image_id, s in by_id.items():
        meta, labels, semantic, image = s[im.META], s[im.INSTANCES], s[im.SEMANTIC], s[im.IMAGE]
        H, W = meta["original_height"], meta["original_width"]
        h, w = meta["height"], meta["width"]
        assert min(h, w) == 160 or max(h, w) == 400  # shorter side to 160 unless the longer side hits the cap
        assert abs(h / w - H / W) < 0.02  # aspect kept
        assert image.shape == (h, w, 3) and labels.shape == semantic.shape == (h, w) and labels.dtype == np.uint16
        k = len(meta["instances"])
        assert set(np.unique(labels)) == set(range(k + 1))  # 0 background, 1..K with none missing
        for inst in meta["instances"]:
            ys, xs = np.nonzero(labels == inst["label"])
            assert inst["area"] == len(ys)
            assert inst["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert (semantic[ys, xs] == inst["category_id"]).all()
        assert (semantic[labels == 0] != 0).sum() == meta["crowd_pixels"]
        assert ((semantic == im.IGNORE) == ((labels == 0) & (semantic != 0))).all()

    # Penn-Fudan: the stored map is the PedMasks PNG resized with nearest neighbours (PIL, independently of torch),
    # up to a renaming of the labels.
    pf_id = next(i for i in by_id if i not in COCO_IDS)
    s = by_id[pf_id]
    name = next(i["file_name"] for i in pf_images if i["id"] == pf_id).replace(".png", "_mask.png")
    ped = Image.open(shared_data / "penn_fudan_ped" / "PedMasks" / name)
    ref = np.array(ped.resize((s[im.META]["width"], s[im.META]["height"]), Image.NEAREST))
    pairs = set(zip(s[im.INSTANCES].ravel().tolist(), ref.ravel().tolist()))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})  # a bijection of labels
    assert (0, 0) in pairs

    # COCO: overlapping masks painted large-first, crowd regions marked IGNORE and unlabelled.
    coco = by_id[COCO_IDS[0]]
    assert coco[im.META]["crowd_pixels"] > 0 and len(coco[im.META]["instances"]) >= 10

    import mlflow

    run = mlflow.get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["samples"] == 8 and run.data.metrics["rejected"] == 2
    assert "contact_sheet.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}


def test_square_resize_and_small_instances_vanish(shared_data):
    """A fixed square (YOLACT-550 style) ignores aspect; an instance too small to survive the resize is dropped and
    the labels stay 1..K."""
    root = shared_data / "penn_fudan_ped"
    labels = np.array(Image.open(root / "PedMasks" / "FudanPed00001_mask.png"))
    from maskflow.data.validate import decode_image, encode_mask

    image = decode_image((root / "PNGImages" / "FudanPed00001.png").read_bytes())
    H, W = labels.shape
    tiny = np.zeros_like(labels, bool)
    tiny[3, 3] = True  # one pixel: gone at 1/8 scale
    anns = [{"id": k, "category_id": 1, "iscrowd": 0, "segmentation": encode_mask(labels == k)}
            for k in range(1, labels.max() + 1)]
    anns.append({"id": 99, "category_id": 1, "iscrowd": 0, "segmentation": encode_mask(tiny)})
    meta = {"image_id": 1, "height": H, "width": W, "annotations": anns}
    sample, counts = im.make_instance_map("k", image, meta, config.build(im.ResizeConfig, {"mode": "square",
                                                                                         "size": 48}))
    out = im.SCHEMA.decode(sample)
    assert out[im.INSTANCES].shape == (48, 48) and out[im.IMAGE].shape == (48, 48, 3)
    assert counts == {"instances": labels.max(), "instances_vanished": 1, "images_without_instances": 0}
    assert 99 not in [i["annotation_id"] for i in out[im.META]["instances"]]
    assert set(np.unique(out[im.INSTANCES])) == set(range(labels.max() + 1))
    # Same inputs, same bytes.
    again, _ = im.make_instance_map("k", image, meta, config.build(im.ResizeConfig, {"mode": "square", "size": 48}))
    assert all(again[k] == sample[k] for k in (im.IMAGE, im.INSTANCES, im.SEMANTIC))
    # Decoding the masks back at full size agrees with the stored areas' order of magnitude (sanity of the scale).
    full = decode_masks([a["segmentation"] for a in anns[:-1]], H, W).sum((1, 2))
    stored = sorted(i["area"] for i in out[im.META]["instances"])
    assert np.allclose(sorted(full * (48 * 48) / (H * W)), stored, rtol=0.25)
