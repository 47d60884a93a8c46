"""The trainer harness and the proposals job, end to end on real components.

* Mask R-CNN trains on Ray Train from shards on the moto S3 endpoint, checkpoints to S3, survives a worker that dies
  mid-epoch (FailureConfig → restart from the last checkpoint), logs into the driver's MLflow run and registers the
  model with the alias ``candidate``.
* The proposals job loads that model from the registry (``models:/name@candidate``), runs on Penn-Fudan shards on S3,
  writes proposal shards there, which Ray Data reads back; evaluation attaches AR to the version; promotion sets
  ``champion``.
* A proposals job killed mid-run and started again finishes with exactly the right samples.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from maskflow import config, shards, stage, storage, tracking
from maskflow.data import schema
from maskflow.data.synthetic import generate_coco_dataset
from maskflow.evaluators.proposal_ar import EvaluateProposalsConfig, evaluate_proposals
from maskflow.stages.proposals import ProposalsConfig, ProposalsStage
from maskflow.train.fit import fit
from maskflow.train.loop import CHAOS_MARKER_ENV, CHAOS_STEP_ENV
from ops.masks import mask_iou
from tests.test_ingest import run_ingest
from trainers.maskrcnn import MaskRCNNPlugin, MaskRCNNTrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # the end-to-end tier: make test-e2e
ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "test-maskrcnn"


def demo_arch() -> dict:
    return yaml.safe_load((ROOT / "conf" / "demo.yaml").read_text())["model"]


@pytest.fixture(scope="module")
def tracking_module(tmp_path_factory):
    return tracking.TrackingConfig(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db",
                                   experiment="train-tests")


@pytest.fixture(scope="module")
def s3_module(s3_endpoint):
    import uuid

    options = storage.StorageOptions(endpoint_url=s3_endpoint, region="us-east-1")
    bucket = f"mf-train-{uuid.uuid4().hex[:8]}"
    storage.s3_client(options).create_bucket(Bucket=bucket)
    return options, bucket


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory, tracking_module, s3_module, shared_data):
    """A tiny Mask R-CNN trained on synthetic shards on S3, with one worker death on the way."""
    options, bucket = s3_module
    data = tmp_path_factory.mktemp("syn")
    generate_coco_dataset(str(data), 24, seed=3, split="train", size=(96, 96), max_objects=3)
    shards_uri = f"s3://{bucket}/shards/syn-train"
    run_ingest(str(data / "annotations" / "instances_train.json"), str(data / "images" / "train"), shards_uri,
               options, per_shard=6)
    marker = tmp_path_factory.mktemp("chaos") / "fired"
    cfg = config.build(MaskRCNNTrainConfig, {
        "data": {"train": shards_uri, "shuffle_buffer": 8},
        "model": {**demo_arch(), "min_size": 96, "max_size": 96},
        "optim": {"name": "adamw", "lr": 0.002}, "schedule": {"warmup_steps": 2},
        "loop": {"epochs": 2, "batch_size": 4, "log_every_steps": 1, "torch_threads": 2},
        "run": {"storage_path": f"s3://{bucket}/checkpoints", "name": "chaos-run", "max_failures": 1},
        "registry": {"model_name": MODEL_NAME},
        "storage": {"endpoint_url": options.endpoint_url, "region": "us-east-1"},
        "tracking": config.to_dict(tracking_module),
    })
    # 24 samples / batch 4 = 6 steps per epoch: the worker dies in the middle of the second epoch.
    os.environ[CHAOS_STEP_ENV], os.environ[CHAOS_MARKER_ENV] = "9", str(marker)
    try:
        result = fit(MaskRCNNPlugin(cfg))
    finally:
        os.environ.pop(CHAOS_STEP_ENV), os.environ.pop(CHAOS_MARKER_ENV)
    return {"result": result, "cfg": cfg, "marker": marker, "options": options, "bucket": bucket}


def test_training_survives_worker_failure_and_registers(trained):
    import mlflow
    from mlflow import MlflowClient

    result, cfg, options = trained["result"], trained["cfg"], trained["options"]
    assert trained["marker"].exists(), "the injected worker failure never happened"
    assert result.metrics["epoch"] == 1 and result.metrics["step"] == 12  # finished both epochs after restarting
    assert result.checkpoint_path.startswith(f"{trained['bucket']}/checkpoints/chaos-run/")
    # The checkpoint lives on the S3 endpoint.
    names = storage.list_names(f"s3://{result.checkpoint_path}", options)
    assert "state.pt" in names

    tracking.setup(cfg.tracking)
    history = MlflowClient().get_metric_history(result.run_id, "train/loss")
    steps = [m.step for m in history]
    assert steps[:9] == list(range(1, 10)) and steps[-1] == 12
    assert steps.count(7) == 2  # epoch 2 ran twice: once before the failure, once after the restart
    first, last = np.mean([m.value for m in history[:3]]), np.mean([m.value for m in history[-3:]])
    assert last < first, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    run = mlflow.get_run(result.run_id)
    assert run.data.params["loop.epochs"] == "2" and "train_seconds" in run.data.metrics

    version = tracking.model_version_for_alias(MODEL_NAME, tracking.CANDIDATE)
    assert str(version.version) == result.model_version
    assert tracking.model_version_for_alias(MODEL_NAME, tracking.CHAMPION) is None  # only promote sets it


def proposals_cfg(input_shards: str, model_uri: str, output: str, options, tracking_cfg, **proposals) -> ProposalsConfig:
    return config.build(ProposalsConfig, {
        "input": {"shards": input_shards},
        "model": {"uri": model_uri, "arch": demo_arch()},
        "proposals": {"top_k": 20, "batch_size": 4, **proposals},
        "output": {"uri": output},
        "storage": {"endpoint_url": options.endpoint_url, "region": options.region} if options.endpoint_url else {},
        "tracking": config.to_dict(tracking_cfg),
    })


def test_proposals_from_registry_on_s3_then_evaluate_and_promote(trained, tracking_module, penn_fudan_coco):
    import ray.data

    options, bucket = trained["options"], trained["bucket"]
    annotations, images = penn_fudan_coco
    pf_shards = f"s3://{bucket}/shards/pf"
    run_ingest(annotations, images, pf_shards, options, per_shard=20)
    out = f"s3://{bucket}/proposals/pf"
    cfg = proposals_cfg(pf_shards, f"models:/{MODEL_NAME}@candidate", out, options, tracking_module)
    manifest = stage.run_stage(ProposalsStage(cfg, options, tracking.resolved_tracking_uri(tracking_module)),
                               cfg.output, cfg.compute, cfg.tracking, cfg, options)
    assert manifest["inputs"] == manifest["samples"] == 60 and manifest["rejected"] == 0
    assert len(manifest["shards"]) == 3 and shards.verify(out, options) == []

    uris = shards.shard_uris(out, options)
    fs, _ = storage.pyarrow_filesystem(uris[0], options)
    rows = ray.data.read_webdataset([storage.pyarrow_filesystem(u, options)[1] for u in uris], filesystem=fs,
                                    decoder=None).take_all()
    assert len(rows) == 60
    for row in rows[:5]:
        meta, props = json.loads(row["json"]), json.loads(row["proposals.json"])
        k, g = len(props["scores"]), len(meta["annotations"])
        assert 0 < k <= 20 and np.array(props["iou"]).shape == (k, g)
        assert props["scores"] == sorted(props["scores"], reverse=True)
        assert all(s["size"] == [meta["height"], meta["width"]] for s in props["segmentations"])
        recomputed = mask_iou(props["segmentations"], [a["segmentation"] for a in meta["annotations"]])
        assert np.allclose(recomputed, props["iou"], atol=1e-6)
        assert props["model"] == f"models:/{MODEL_NAME}/{trained['result'].model_version}"  # the alias, resolved

    version = trained["result"].model_version
    result = evaluate_proposals(config.build(EvaluateProposalsConfig, {
        "proposals": out, "max_proposals": [10, 20], "model": {"name": MODEL_NAME, "version": version},
        "storage": {"endpoint_url": options.endpoint_url}, "tracking": config.to_dict(tracking_module)}))
    assert result["num_images"] == 60 and result["num_gt"] == 159
    assert 0.0 <= result["AR@10"] <= result["AR@20"] <= 1.0
    decision = tracking.promote(MODEL_NAME)  # the metric the evaluation recorded on the version (AR_20: higher)
    assert decision["metric"] == "AR_20" and decision["promoted"] and decision["candidate_value"] == pytest.approx(result["AR@20"])
    assert str(tracking.model_version_for_alias(MODEL_NAME, tracking.CHAMPION).version) == version
    again = tracking.promote(MODEL_NAME, "AR_20")  # the same version is not "better" than itself
    assert not again["promoted"]


def test_killed_proposals_job_resumes_exactly(trained, tracking_module, penn_fudan_coco, tmp_path):
    """SIGKILL the whole job mid-run; the re-run skips finished shards and ends with every sample exactly once."""
    options = trained["options"]
    annotations, images = penn_fudan_coco
    pf_shards = tmp_path / "pf-shards"
    run_ingest(annotations, images, str(pf_shards), storage.DEFAULT_OPTIONS, per_shard=5)
    out = tmp_path / "proposals"
    checkpoint = f"s3://{trained['result'].checkpoint_path}/state.pt"  # a trainer checkpoint on object storage
    cfg = proposals_cfg(str(pf_shards), checkpoint, str(out), options, tracking_module, top_k=50)
    cfg_file = tmp_path / "proposals.yaml"
    cfg_file.write_text(config.dump_yaml(cfg).replace("***", ""))  # (no secrets in this config)
    command = [sys.executable, "pipelines/proposals.py", "--config", str(cfg_file), "ray.num_cpus=2"]

    def records() -> dict[str, float]:
        return {n: (out / n).stat().st_mtime for n in os.listdir(out) if n.startswith("shard-") and n.endswith(".json")} \
            if out.exists() else {}

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while len(records()) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the job made no progress"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2)
    before = records()
    assert not (out / shards.MANIFEST).exists(), "the job finished before it could be killed"
    assert 2 <= len(before) < 12
    for name in os.listdir(out):  # whatever is visible is whole: no temporaries, every tar readable
        if name.endswith(".tar"):
            assert sum(1 for _ in shards.iter_shard(str(out / name))) == 5

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"{len(before)} already finished" in second.stdout + second.stderr
    manifest = shards.read_manifest(str(out))
    assert manifest["inputs"] == manifest["samples"] == 60 and len(manifest["shards"]) == 12
    keys = [s["__key__"] for s in shards.iter_samples(str(out))]
    expected = [s["__key__"] for s in shards.iter_samples(str(pf_shards))]
    assert sorted(keys) == sorted(expected) and len(set(keys)) == 60
    assert {n: t for n, t in records().items() if n in before} == before  # finished shards were not redone
    assert shards.verify(str(out)) == []
    assert not [n for n in os.listdir(out) if n.startswith(storage.TMP_PREFIX)]
    sample = next(shards.iter_samples(str(out)))
    assert schema.PROPOSALS in sample and len(sample[schema.PROPOSALS]["scores"]) <= 50


def test_proposals_straight_from_a_real_coco_dataset(trained, tracking_module, shared_data, tmp_path):
    """A real COCO instances json (compressed RLE, crowd regions) plus its images, with no ingest step."""
    sample = shared_data / "coco_panoptic_sample"
    cfg = config.build(ProposalsConfig, {
        "input": {"coco": {"annotations": str(sample / "panoptic_coco_detection_format.json"),
                           "images": str(sample / "input_images"), "name": "coco-sample"}},
        "model": {"uri": f"s3://{trained['result'].checkpoint_path}", "arch": demo_arch()},  # checkpoint directory
        "proposals": {"top_k": 30},
        "output": {"uri": str(tmp_path / "props")},
        "storage": {"endpoint_url": trained["options"].endpoint_url},
    })
    manifest = stage.run_stage(ProposalsStage(cfg, trained["options"]), cfg.output, cfg.compute, None, cfg,
                               trained["options"])
    assert manifest["inputs"] == manifest["samples"] == 2
    samples = {s["json"]["image_id"]: s for s in shards.iter_samples(str(tmp_path / "props"))}
    assert set(samples) == {142238, 439180}
    anns = [a for s in samples.values() for a in s["json"]["annotations"]]
    assert len(anns) == 50 and sum(a["iscrowd"] for a in anns) == 3  # crowd regions kept for AR's ignore rule
    for s in samples.values():
        props = s[schema.PROPOSALS]
        assert np.array(props["iou"]).shape == (len(props["scores"]), len(s["json"]["annotations"]))
        assert props["height"] == s["json"]["height"] and props["width"] == s["json"]["width"]
