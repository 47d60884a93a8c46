"""FFD-crops stage on real data: proposals of a Mask R-CNN trained here on Penn-Fudan -> proposal shards on the moto
S3 endpoint -> 1.6x crops of the proposals with IoU > 0.5, read back through Ray Data; a proposal shard that lost
a sample, an empty proposal mask and a degenerate box are rejected with their reasons; paste-back inverts the crop."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskflow import config, shards, stage, storage
from maskflow.data import schema
from maskflow.data.validate import decode_rle, encode_mask, rle_to_bytes
from maskflow.stages import ffd_crops as fc
from maskflow.stages.proposals import ProposalsConfig, ProposalsStage
from ops.ffd import paste_crops
from tests.test_shards import rewrite_shard

pytestmark = pytest.mark.slow


def run_proposals(model: dict, input_shards: str, out: str, options, top_k: int = 50) -> dict:
    cfg = config.build(ProposalsConfig, {
        "input": {"shards": input_shards},
        "model": {"uri": model["uri"], "arch": model["arch"]},
        "proposals": {"top_k": top_k, "batch_size": 8},
        "compute": {"cpus_per_worker": 2},
        "output": {"uri": out},
        "storage": {"endpoint_url": options.endpoint_url, "region": options.region},
    })
    return stage.run_stage(ProposalsStage(cfg, options), cfg.output, cfg.compute, None, cfg, options)


def tamper(proposals_uri: str, options) -> dict:
    """The first proposal shard as a faulty writer would leave it: one listed sample gone; in another sample one
    proposal's mask emptied and another's box made degenerate (with a matching checksum, so it gets past the
    checksums to the checks after them). The manifest keeps its keys. Returns the keys touched."""
    uri = shards.shard_uris(proposals_uri, options)[0]
    samples = list(shards.iter_shard(uri, options))
    dropped, edited = samples[0]["__key__"], samples[1]
    props = schema.loads(edited[schema.PROPOSALS])
    h, w = props["height"], props["width"]
    props["segmentations"][0] = encode_mask(np.zeros((h, w), bool))
    props["boxes"][1] = [10.0, 10.0, 0.0, 5.0]
    edited[schema.PROPOSALS] = props
    rewrite_shard(uri, samples[1:], options)
    return {"dropped": dropped, "edited": edited["__key__"]}


def best_iou(props: dict, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """Independent of the stage: pycocotools IoU of every proposal against the non-crowd ground truth."""
    gts = [rle_to_bytes(a["segmentation"]) for a in meta["annotations"] if not a["iscrowd"]]
    dts = [rle_to_bytes(r) for r in props["segmentations"]]
    iou = np.asarray(mask_utils.iou(dts, gts, [0] * len(gts))).reshape(len(dts), len(gts))
    return iou.max(1), iou.argmax(1)


@pytest.fixture(scope="module")
def s3_options(s3_endpoint):
    return storage.StorageOptions(endpoint_url=s3_endpoint, region="us-east-1")


@pytest.fixture(scope="module")
def crops_run(penn_fudan_maskrcnn, penn_fudan_shards, s3_options, tmp_path_factory):
    import uuid

    from maskflow.tracking import TrackingConfig

    s3_bucket = f"mf-crops-{uuid.uuid4().hex[:8]}"
    storage.s3_client(s3_options).create_bucket(Bucket=s3_bucket)
    tracking_cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('crops-mlflow')}/mlflow.db")
    props_uri = f"s3://{s3_bucket}/proposals/pf"
    run_proposals(penn_fudan_maskrcnn, penn_fudan_shards, props_uri, s3_options)
    touched = tamper(props_uri, s3_options)
    out = f"s3://{s3_bucket}/ffd_crops/pf"
    cfg = config.build(fc.FFDCropsConfig, {
        "input": {"proposals": [props_uri]}, "crops": {"size": 96}, "output": {"uri": out},
        "storage": {"endpoint_url": s3_options.endpoint_url, "region": s3_options.region},
    })
    manifest = stage.run_stage(fc.FFDCropsStage(cfg, s3_options), cfg.output, cfg.compute, tracking_cfg, cfg,
                               s3_options)
    return {"manifest": manifest, "props": props_uri, "out": out, "cfg": cfg, **touched}


def test_crops_keep_exactly_the_proposals_above_iou(crops_run, penn_fudan_maskrcnn, s3_options, ray_local):
    manifest, out = crops_run["manifest"], crops_run["out"]
    assert manifest["schema"] == fc.SCHEMA.name
    counts = manifest["counts"]
    rejects = [json.loads(x) for x in storage.read_text(storage.join(out, shards.REJECTS), s3_options).splitlines()]
    by_reason: dict[tuple, set] = {}
    for r in rejects:
        by_reason.setdefault((r["kind"], r["reason"].split(":")[0]), set()).add(r["key"])
    edited = crops_run["edited"]
    assert by_reason[("sample", stage.LACKS_LISTED_SAMPLE)] == {crops_run["dropped"]}
    # The real generator leaves some masks empty too (every pixel below its mask threshold): rejected the same way.
    assert f"{edited}_0_0000" in by_reason[("proposal", fc.EMPTY_PROPOSAL)]
    assert by_reason[("proposal", fc.DEGENERATE_BOX)] == {f"{edited}_0_0001"}
    assert set(by_reason) == {("sample", stage.LACKS_LISTED_SAMPLE), ("proposal", fc.EMPTY_PROPOSAL),
                              ("proposal", fc.DEGENERATE_BOX)}
    # Counts add up: every image is processed or rejected, every proposal kept, below the threshold or rejected.
    assert manifest["inputs"] == 60 and counts["images"] == 59 and manifest["rejected"] == 1
    assert counts["proposals"] == counts["proposals_kept"] + counts["proposals_below_iou"] \
        + manifest["rejected_by_kind"]["proposal"]
    assert manifest["samples"] == counts["proposals_kept"] > 10

    # The kept set is exactly {proposals with best IoU > 0.5}, recomputed here from the input proposals.
    expected = {}
    for sample in shards.iter_samples(crops_run["props"], s3_options):
        props, meta = sample[schema.PROPOSALS], sample[schema.META]
        iou, gt = best_iou(props, meta)
        bad = {0, 1} if sample["__key__"] == edited else set()
        for i in np.nonzero(iou > 0.5)[0]:
            if int(i) not in bad:
                expected[f"{sample['__key__']}_0_{int(i):04d}"] = (iou[i], meta["annotations"][gt[i]]["id"], meta,
                                                                   props["segmentations"][i])

    import ray.data

    uris = shards.shard_uris(out, s3_options)
    fs, _ = storage.pyarrow_filesystem(uris[0], s3_options)
    rows = ray.data.read_webdataset([storage.pyarrow_filesystem(u, s3_options)[1] for u in uris], filesystem=fs,
                                    decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(expected)

    images = {}
    for row in rows:
        s = fc.SCHEMA.decode(row)
        crop = s[fc.CROP]
        iou, ann_id, meta, seg = expected[row["__key__"]]
        assert crop["iou"] == pytest.approx(iou, abs=1e-6) and crop["annotation_id"] == ann_id
        assert crop["image_id"] == meta["image_id"] and crop["model"] == penn_fudan_maskrcnn["uri"]
        # Geometry: tight box of the proposal mask, crop box 1.6x about its centre.
        tight = mask_utils.toBbox(rle_to_bytes(seg)).tolist()
        assert np.allclose(crop["tight_box"], tight)
        x, y, w, h = crop["crop_box"]
        assert np.allclose([w, h], np.array(tight[2:]) * 1.6)
        assert np.allclose([x + w / 2, y + h / 2], [tight[0] + tight[2] / 2, tight[1] + tight[3] / 2])
        assert s[fc.IMAGE].shape == (96, 96, 3) and s[fc.PROPOSAL].shape == s[fc.GT].shape == (96, 96)
        assert set(np.unique(s[fc.PROPOSAL])) <= {0, 255} and set(np.unique(s[fc.GT])) <= {0, 255}
        # The whole proposal lies in its crop (the crop box contains the tight box), so the crop's IoU can only
        # exceed the full-image IoU (ground truth past the box is cut), up to resampling error.
        p, g = s[fc.PROPOSAL] > 0, s[fc.GT] > 0
        assert (p & g).sum() / max((p | g).sum(), 1) >= iou - 0.05
        # Paste-back: the ground-truth crop, pasted into the image frame, is the ground-truth mask inside the box.
        gt_full = decode_rle(next(a for a in meta["annotations"] if a["id"] == ann_id)["segmentation"])
        pasted = paste_crops(torch.from_numpy(g).float()[None], fc.crop_rois([crop["crop_box"]], [0]),
                             *gt_full.shape)[0] > 0.5
        inside = np.zeros_like(gt_full)
        inside[max(0, int(np.ceil(y))):int(y + h), max(0, int(np.ceil(x))):int(x + w)] = True
        ref = gt_full & inside
        assert (pasted.numpy() & ref).sum() / max((pasted.numpy() | ref).sum(), 1) > 0.85
        images.setdefault(meta["image_id"], (meta, crop, s[fc.IMAGE]))

    # The image crop agrees with PIL's own box resize of the original (independent resampler, within a few levels).
    root = next(iter(images.values()))
    meta, crop, pixels = root
    x, y, w, h = crop["crop_box"]
    sample = next(s for s in shards.iter_samples(crops_run["props"], s3_options)
                  if s[schema.META]["image_id"] == meta["image_id"])
    original = Image.open(io.BytesIO(sample[schema.IMAGE])).convert("RGB")
    if x >= 0 and y >= 0 and x + w <= meta["width"] and y + h <= meta["height"]:
        ref = np.asarray(original.resize((96, 96), Image.BILINEAR, box=(x, y, x + w, y + h)), np.float32)
        assert np.abs(ref - pixels.astype(np.float32)).mean() < 6.0

    import mlflow

    run = mlflow.get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["samples"] == manifest["samples"] and run.data.metrics["count.proposals_kept"] > 10
    assert "contact_sheet.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}


def test_crops_from_two_generators_and_reproducible(crops_run, s3_options):
    """Two proposal outputs in one job (as from Mask R-CNN and SharpMask): crops keyed by input, none lost; a re-run
    over complete output is a no-op, and a unit recomputed here equals the shard the Ray worker wrote."""
    out = crops_run["out"]
    cfg = crops_run["cfg"]
    again = stage.run_stage(fc.FFDCropsStage(cfg, s3_options), cfg.output, cfg.compute, None, cfg, s3_options)
    assert again["job_fingerprint"] == crops_run["manifest"]["job_fingerprint"]

    unit = fc.FFDCropsStage(cfg, s3_options).plan().units[1]
    recomputed = [s for s in fc.FFDCropsStage(cfg, s3_options).process(unit) if isinstance(s, dict)]
    written = {s["__key__"]: s for s in shards.iter_shard(storage.join(out, shards.shard_name(1)), s3_options)}
    assert len(recomputed) == len(written) > 0
    for s in recomputed:
        assert s[fc.IMAGE] == written[s["__key__"]][fc.IMAGE]
        assert schema.dumps(s[fc.CROP]) == written[s["__key__"]][fc.CROP]

    two = config.build(fc.FFDCropsConfig, {
        "input": {"proposals": [crops_run["props"], crops_run["props"]]}, "crops": {"size": 96},
        "output": {"uri": f"{out}-two"},
        "storage": {"endpoint_url": s3_options.endpoint_url, "region": s3_options.region},
    })
    plan = fc.FFDCropsStage(two, s3_options).plan()
    assert [u.items[0].origin for u in plan.units] == [0] * 4 + [1] * 4
    keys = [s["__key__"] for s in fc.FFDCropsStage(two, s3_options).process(plan.units[5]) if isinstance(s, dict)]
    assert keys and all(k.split("_")[1] == "1" for k in keys)


def test_crops_refuse_input_of_another_kind(penn_fudan_shards):
    cfg = config.build(fc.FFDCropsConfig, {"input": {"proposals": [penn_fudan_shards]}, "output": {"uri": "x"}})
    with pytest.raises(config.ConfigError, match=r"^input.proposals: holds image/1 samples, expected proposals/1"):
        fc.FFDCropsStage(cfg).plan()
