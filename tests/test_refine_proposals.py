"""FFD-Net end to end on real Penn-Fudan proposals: the project's Mask R-CNN proposes, the FFD-crops stage cuts the
training crops, FFD-Net trains on 2 Ray Train workers and is registered (kind ffdnet, validation metric), and the
refinement job runs on the stage harness: schema, scores and order kept, proposals beyond top-k passed through,
generator and refiner recorded, every bad input rejected with its reason (a sample that lost its image, an
undecodable image, an empty proposal mask, a proposal box outside the image; a SharpMask version as model.uri refused
before Ray). With an identity refiner the refined proposals are the unrefined ones bit for bit, and AR@k of refined
and unrefined proposals — ours (maskflow.evaluators.proposal_ar) against pycocotools' COCOeval — agree."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import mlflow
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskflow import config, shards, stage, storage, tracking
from maskflow.config import ConfigError
from maskflow.data import schema
from maskflow.data.validate import rle_to_bytes
from maskflow.evaluators.proposal_ar import evaluate_proposal_samples
from maskflow.stages import refine_proposals as rp
from tests.conftest import ROOT
from tests.test_shards import rewrite_shard

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # the end-to-end tier: make test-e2e

REFINER, NOT_A_REFINER = "ffdnet-test", "sharpmask-test"
TOP_K, KEPT = 10, 20  # proposals refined / kept per image by the generator
CROP = 64  # crops (and the test network's input) of 64 x 64: a quick run
ARS = (1, 10, 20)  # AR@k for k <= the proposals kept


@pytest.fixture(scope="module")
def tracking_cfg(tmp_path_factory):
    return tracking.TrackingConfig(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('ffd-mlflow')}/mlflow.db",
                                   experiment="ffdnet-tests")


@pytest.fixture(scope="module")
def proposals(penn_fudan_maskrcnn, penn_fudan_shards, tmp_path_factory) -> str:
    """The project's Mask R-CNN's top-20 proposals of 32 Penn-Fudan images (the first 2 of the 4 image shards: enough
    crops for a training epoch, half the inference time)."""
    from maskflow.stages.proposals import ProposalsConfig, ProposalsStage

    root = tmp_path_factory.mktemp("ffd-props")
    images = root / "images"
    images.mkdir()
    manifest = json.loads(storage.read_text(storage.join(penn_fudan_shards, shards.MANIFEST)))
    kept = manifest["shards"][:2]
    for record in kept:
        shutil.copy(storage.join(penn_fudan_shards, record["name"]), images / record["name"])
    (images / shards.MANIFEST).write_text(json.dumps({**manifest, "shards": kept,
                                                      "samples": sum(r["samples"] for r in kept)}))
    out = str(root / "pf")
    cfg = config.build(ProposalsConfig, {
        "input": {"shards": str(images)},
        "model": {"uri": penn_fudan_maskrcnn["uri"], "arch": penn_fudan_maskrcnn["arch"]},
        "proposals": {"top_k": KEPT, "batch_size": 8}, "compute": {"cpus_per_worker": 2}, "output": {"uri": out}})
    stage.run_stage(ProposalsStage(cfg), cfg.output, cfg.compute, None, cfg)
    return out


@pytest.fixture(scope="module")
def refiner(ray_local, proposals, tracking_cfg, tmp_path_factory):
    """FFD-Net (conf/ffdnet/cpu.yaml at 64 x 64) trained for an epoch on 2 Ray Train workers from the FFD crops of
    those proposals, and registered: the FitResult."""
    from maskflow.stages.ffd_crops import FFDCropsConfig, FFDCropsStage
    from maskflow.train.fit import fit
    from trainers.ffdnet import FFDNetPlugin, parse_config

    root = tmp_path_factory.mktemp("ffd-train")
    crops = config.build(FFDCropsConfig, {"input": {"proposals": [proposals]}, "crops": {"size": CROP},
                                          "output": {"uri": str(root / "crops"), "samples_per_shard": 128}})
    manifest = stage.run_stage(FFDCropsStage(crops), crops.output, crops.compute, None, crops)
    assert manifest["samples"] > 50
    cfg = parse_config(["--config", str(ROOT / "conf" / "ffdnet" / "cpu.yaml")])
    cfg = config.build(type(cfg), config.deep_merge(config.to_dict(cfg), {
        "data": {"train": crops.output.uri, "val": crops.output.uri, "shuffle_buffer": 32, "val_batch_size": 128},
        "model": {"crop_size": CROP}, "schedule": {"warmup_steps": 5},
        "loop": {"epochs": 1, "batch_size": 16, "torch_threads": 1, "log_every_steps": 2},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": str(root / "ckpt"), "name": "ffdnet-2w"},
        "registry": {"model_name": REFINER}, "tracking": vars(tracking_cfg)}))
    return {"fit": fit(FFDNetPlugin(cfg)), "crops": manifest["samples"], "arch": config.to_dict(cfg.model)}


def refine(tracking_cfg, model_uri: str, props: str, out, top_k: int = TOP_K, arch: dict | None = None) -> dict:
    cfg = config.build(rp.RefineProposalsConfig, {
        "input": {"proposals": props}, "model": {"uri": model_uri, **({"arch": arch} if arch else {})},
        "refine": {"top_k": top_k, "batch_size": 48}, "output": {"uri": str(out), "samples_per_shard": 64},
        "compute": {"workers": 1, "cpus_per_worker": 2}, "tracking": vars(tracking_cfg)})
    return stage.run_stage(rp.RefineProposalsStage(cfg, tracking_uri=tracking_cfg.tracking_uri), cfg.output,
                           cfg.compute, tracking_cfg, cfg)


def tamper(proposals: str, copy) -> dict:
    """A copy of the proposals whose first shard lost one sample's image, holds an undecodable image, and in a third
    sample has proposal 0's mask emptied and proposal 1's box moved outside the image (checksums rewritten: the
    checks after them see these)."""
    shutil.copytree(proposals, copy)
    uri = shards.shard_uris(str(copy))[0]
    samples = list(shards.iter_shard(uri))
    no_image, bad_image, edited = samples[0], samples[1], samples[2]
    del no_image[schema.IMAGE]
    bad_image[schema.IMAGE] = b"\x89PNG\r\n\x1a\n not really a png"
    props = schema.loads(edited[schema.PROPOSALS])
    h, w = props["height"], props["width"]
    props["segmentations"][0] = mask_utils.encode(np.asfortranarray(np.zeros((h, w, 1), np.uint8)))[0]
    props["segmentations"][0]["counts"] = props["segmentations"][0]["counts"].decode()
    props["boxes"][1] = [w + 10.0, 5.0, 20.0, 20.0]
    edited[schema.PROPOSALS] = props
    rewrite_shard(uri, samples)
    return {"uri": str(copy), "no_image": no_image["__key__"], "bad_image": bad_image["__key__"],
            "edited": edited["__key__"], "edited_props": props}


def cocoeval_ar(samples: list[dict], max_dets=ARS) -> dict[int, float]:
    """AR@k by pycocotools' COCOeval (segm, class-agnostic), from the masks themselves: independent of the stored iou
    and of ops.metrics."""
    images, anns, dets = [], [], []
    for n, s in enumerate(samples, start=1):
        meta, props = s[schema.META], s[schema.PROPOSALS]
        images.append({"id": n, "height": meta["height"], "width": meta["width"]})
        for a in meta["annotations"]:
            rle = rle_to_bytes(a["segmentation"])
            anns.append({"id": len(anns) + 1, "image_id": n, "category_id": 1, "segmentation": rle,
                         "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
                         "iscrowd": int(a.get("iscrowd", 0))})
        for rle, score in zip(props["segmentations"], props["scores"]):
            dets.append({"image_id": n, "category_id": 1, "segmentation": rle_to_bytes(rle), "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        ev.params.useCats = 0
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
    return {k: float(ev.eval["recall"][:, 0, 0, m].mean()) for m, k in enumerate(max_dets)}


def ours_ar(samples: list[dict]) -> dict[int, float]:
    result = evaluate_proposal_samples(samples, ARS)
    return {k: result[f"AR@{k}"] for k in ARS}


def rejects_of(out: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(out, shards.REJECTS)).splitlines()]


def test_refiner_trains_on_two_workers_and_registers_with_kind_and_metric(refiner):
    fit = refiner["fit"]
    version = tracking.client().get_model_version(REFINER, fit.model_version)
    assert version.tags["maskflow.kind"] == "ffdnet"
    assert float(version.tags["val.iou_refined"]) == pytest.approx(fit.best_value) and 0 < fit.best_value <= 1
    history = {k: [m.value for m in tracking.client().get_metric_history(fit.run_id, k)]
               for k in ("val/iou_refined", "val/iou_unrefined", "val/iou_gain", "train/l2", "epoch/steps")}
    assert history["val/iou_gain"] == pytest.approx([history["val/iou_refined"][0] - history["val/iou_unrefined"][0]],
                                                    abs=1e-6)
    assert 0.5 < history["val/iou_unrefined"][0] < 1  # crops of proposals with IoU > 0.5 (measured in the crop)
    assert history["epoch/steps"] == [refiner["crops"] // 2 // 16 + bool(refiner["crops"] // 2 % 16)]
    assert len(history["train/l2"]) > 0 and all(0 < v < 1 for v in history["train/l2"])


def test_refinement_job_keeps_order_passes_through_and_rejects_bad_input(refiner, proposals, tracking_cfg,
                                                                         tmp_path):
    bad = tamper(proposals, tmp_path / "props")
    out = str(tmp_path / "refined")
    manifest = refine(tracking_cfg, f"models:/{REFINER}@candidate", bad["uri"], out)
    pinned = f"models:/{REFINER}/{refiner['fit'].model_version}"
    assert manifest["schema"] == "proposals/1" and manifest["inputs"] == 32
    assert manifest["rejected"] == 2 and manifest["samples"] == 30

    rejects = rejects_of(out)
    samples = {r["key"]: r for r in rejects if r["kind"] == "sample"}
    assert samples[bad["no_image"]]["reason"] == stage.LACKS_IMAGE_OR_META
    assert samples[bad["bad_image"]]["reason"].startswith("corrupt image")
    proposal_rejects = {r["key"]: r["reason"] for r in rejects if r["kind"] == "proposal"}
    assert proposal_rejects[f"{bad['edited']}_0000"] == rp.EMPTY_PROPOSAL
    assert proposal_rejects[f"{bad['edited']}_0001"].startswith(f"{rp.BOX_OUTSIDE}: [")
    # the real generator leaves some masks empty too: rejected the same way, nothing else
    assert {r.split(":")[0] for r in proposal_rejects.values()} <= {rp.EMPTY_PROPOSAL, rp.BOX_OUTSIDE}
    counts = manifest["counts"]
    assert counts["images"] == 30 and counts["proposals"] == counts["proposals_refined"] \
        + counts["proposals_beyond_top_k"] + len(proposal_rejects)

    inputs = {s["__key__"]: s for s in shards.iter_samples(bad["uri"])}
    refined_any = 0
    for s in shards.iter_samples(out):
        before, after = inputs[s["__key__"]][schema.PROPOSALS], s[schema.PROPOSALS]
        n = len(before["scores"])
        assert not rp.RefineProposalsStage.schema.problems(s)
        assert after["scores"] == before["scores"] and len(after["segmentations"]) == n  # order and scores kept
        assert (after["model"], after["refiner"]) == (pinned, pinned)
        assert after["generator"] == before["model"]  # the Mask R-CNN checkpoint that proposed them
        assert after["segmentations"][TOP_K:] == before["segmentations"][TOP_K:]  # beyond top-k: unchanged
        assert after["boxes"][TOP_K:] == before["boxes"][TOP_K:] and not any(after["refined"][TOP_K:])
        for i in range(min(n, TOP_K)):
            if f"{s['__key__']}_{i:04d}" in proposal_rejects:  # passed through, unrefined
                assert after["segmentations"][i] == before["segmentations"][i] and not after["refined"][i]
            elif after["refined"][i]:
                refined_any += after["segmentations"][i] != before["segmentations"][i]
                assert np.allclose(after["boxes"][i], mask_utils.toBbox(rle_to_bytes(after["segmentations"][i])))
        # IoU recomputed from the refined masks (pycocotools directly, crowd flags as annotated)
        anns = s[schema.META]["annotations"]
        iou = mask_utils.iou([rle_to_bytes(r) for r in after["segmentations"]],
                             [rle_to_bytes(a["segmentation"]) for a in anns], [a["iscrowd"] for a in anns])
        assert np.allclose(after["iou"], np.asarray(iou).reshape(n, len(anns)), atol=1e-6)
    assert refined_any > 50  # the trained refiner moved masks
    edited = next(s for s in shards.iter_samples(out) if s["__key__"] == bad["edited"])[schema.PROPOSALS]
    assert edited["segmentations"][:2] == bad["edited_props"]["segmentations"][:2]
    assert edited["boxes"][1] == bad["edited_props"]["boxes"][1]

    # the refined AR, ours against pycocotools' COCOeval on the refined masks
    refined = list(shards.iter_samples(out))
    assert ours_ar(refined) == pytest.approx(cocoeval_ar(refined), abs=1e-9)
    run = mlflow.get_run(manifest["mlflow_run_id"])
    assert "contact_sheet.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}


def test_identity_refiner_leaves_ar_unchanged_by_ours_and_by_cocoeval(refiner, proposals, tracking_cfg, tmp_path):
    """Zero offsets: every refined proposal is its input bit for bit, so the refined AR is the unrefined AR, which
    pycocotools' COCOeval computes the same from the masks."""
    from maskflow.models.ffdnet import build_ffdnet
    from maskflow.models.ffdnet_config import FFDConfig

    arch = refiner["arch"]
    model = build_ffdnet(config.build(FFDConfig, arch))
    torch.nn.init.zeros_(model.head.last.weight)
    checkpoint = tmp_path / "identity.pt"
    torch.save({"model": model.state_dict()}, checkpoint)
    out = tmp_path / "identity"
    manifest = refine(tracking_cfg, str(checkpoint), proposals, out, top_k=KEPT, arch=arch)
    unrefined = list(shards.iter_samples(proposals))
    refined = list(shards.iter_samples(str(out)))
    assert [s["__key__"] for s in refined] == [s["__key__"] for s in unrefined] and manifest["rejected"] == 0
    empty = {r["key"] for r in rejects_of(str(out)) if r["reason"] == rp.EMPTY_PROPOSAL}
    assert manifest["counts"]["proposals_refined"] == manifest["counts"]["proposals"] - len(empty) > 500
    for before, after in zip(unrefined, refined):
        assert after[schema.PROPOSALS]["segmentations"] == before[schema.PROPOSALS]["segmentations"]
        assert np.allclose(after[schema.PROPOSALS]["iou"], before[schema.PROPOSALS]["iou"], atol=1e-6)
    ar_before, ar_after = ours_ar(unrefined), ours_ar(refined)
    assert ar_after == ar_before and ar_before[20] > 0.1
    assert ar_after == pytest.approx(cocoeval_ar(refined), abs=1e-9)


def test_a_model_of_another_kind_is_refused_before_ray(refiner, proposals, tracking_cfg, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "pipelines"))  # the script imports _bootstrap as a sibling
    from pipelines.refine_proposals import main

    tracking.setup(tracking_cfg)
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(torch.nn.Identity(), name="model", serialization_format="pickle",
                                        pip_requirements=[])
    version = tracking.register_logged_model(info.model_uri, NOT_A_REFINER, run_id=run.info.run_id, kind="sharpmask")
    argv = ["--config", str(ROOT / "conf" / "refine_proposals" / "default.yaml"), f"input.proposals={proposals}",
            f"model.uri=models:/{NOT_A_REFINER}@candidate", f"output.uri={tmp_path / 'never'}",
            f"tracking.tracking_uri={tracking_cfg.tracking_uri}"]
    with pytest.raises(ConfigError, match=rf"^model.uri: models:/{NOT_A_REFINER}@candidate \(version {version}\) is a "
                                          r"'sharpmask' model; this job needs 'ffdnet'$"):
        main(argv)
    assert not (tmp_path / "never" / shards.MANIFEST).exists()
