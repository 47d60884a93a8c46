"""DeepMask then SharpMask on the harnesses, on real Penn-Fudan windows: the mask-patches stage through Ray Data
(manifest, counts, contact sheet), a 2-worker Ray Train run of the DeepMask phase, then the SharpMask phase
initialised from the registered DeepMask by ``init.from`` with the trunk and DeepMask heads frozen (Pinheiro et al.,
ECCV 2016 sec. 4); each registered with kind ``sharpmask`` and its validation metric; the frozen weights unchanged
and the registered SharpMask answering the proposal generators' contract — through the proposals job, which takes it
by its kind, and the evaluation job, which scores it with its kind's evaluator."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

import sys

from maskflow import config, shards, stage, tracking
from maskflow.stages import mask_patches as mp
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "pipelines"))  # the pipeline scripts import _bootstrap as a sibling module

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # the end-to-end tier: make test-e2e

DEEPMASK, SHARPMASK = "deepmask-test", "sharpmask-test"
FEW = {"positives_per_object": 2, "negatives_per_object": 2, "background_per_image": 1}
FROZEN = ("trunk.", "head.", "mask_head.", "score_head.")


@pytest.fixture(scope="module")
def tracking_cfg(tmp_path_factory):
    return tracking.TrackingConfig(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('sm-mlflow')}/mlflow.db",
                                   experiment="sharpmask-tests")


@pytest.fixture(scope="module")
def windows(ray_local, penn_fudan_shards, tracking_cfg, tmp_path_factory) -> dict:
    """Training windows of the images outside the validation split, made by the stage through Ray Data; validation
    windows of the others made by the same stage code in-process."""
    root = tmp_path_factory.mktemp("sm-windows")
    cfg = config.build(mp.MaskPatchesConfig, {
        "input": {"shards": penn_fudan_shards, "split": "train"}, "patches": FEW,
        "output": {"uri": str(root / "train")}, "compute": {"workers": 2, "cpus_per_worker": 1}})
    manifest = stage.run_stage(mp.MaskPatchesStage(cfg), cfg.output, cfg.compute, tracking_cfg, cfg)
    val_cfg = config.build(mp.MaskPatchesConfig, {"input": {"shards": penn_fudan_shards, "split": "val"},
                                                  "patches": FEW, "output": {"uri": str(root / "val")}})
    job = mp.MaskPatchesStage(val_cfg)
    samples = [s for u in job.plan().units for s in job.process(u) if isinstance(s, dict)]
    (root / "val").mkdir()
    record = shards.write_shard(str(root / "val" / shards.shard_name(0)), samples)
    (root / "val" / shards.MANIFEST).write_text(json.dumps({"stage": "mask_patches", "schema": mp.SCHEMA.name,
                                                             "samples": len(samples), "shards": [record]}))
    return {"train": str(root / "train"), "val": str(root / "val"), "manifest": manifest, "val_samples": samples,
            "image_shards": penn_fudan_shards}


def history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(tracking.client().get_metric_history(run_id, key), key=lambda m: m.step)]


def train(conf: str, windows: dict, tracking_cfg, tmp_path, name: str, epochs: int, extra: list[str] = ()):
    from maskflow.train.fit import fit
    from trainers.sharpmask import SharpMaskPlugin, SharpMaskTrainConfig

    cfg = config.parse_cli(SharpMaskTrainConfig, ["--config", str(ROOT / "conf" / "sharpmask" / conf), *extra])
    cfg = config.build(SharpMaskTrainConfig, config.deep_merge(config.to_dict(cfg), {
        "data": {"train": windows["train"], "val": windows["val"], "shuffle_buffer": 64, "val_batch_size": 64},
        "validation": {"every_epochs": 1}, "schedule": {"warmup_steps": 5},
        "loop": {"epochs": epochs, "batch_size": 16, "torch_threads": 1, "log_every_steps": 2},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": str(tmp_path / "ckpt"), "name": f"{name}-2w"},
        "registry": {"model_name": name}, "tracking": vars(tracking_cfg)}))
    return fit(SharpMaskPlugin(cfg))


def test_windows_stage_through_ray(windows):
    manifest = windows["manifest"]
    counts = manifest["counts"]
    assert manifest["schema"] == "mask_patch/1" and manifest["rejected"] == 0
    assert counts["images"] + counts["images_other_split"] == 60 and counts["images_other_split"] > 5
    assert counts["positives"] == 2 * counts["objects"] and manifest["samples"] == counts["positives"] + \
        counts["negatives"]
    val_images = {s[mp.INFO]["image_id"] for s in windows["val_samples"]}
    train_images = {s[mp.INFO]["image_id"] for s in shards.iter_samples(windows["train"])}
    assert val_images and train_images and not val_images & train_images
    run = mlflow.get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["count.positives"] == counts["positives"]
    assert "contact_sheet.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}


def test_deepmask_then_sharpmask_on_two_workers(windows, tracking_cfg, tmp_path):
    deepmask = train("deepmask_cpu.yaml", windows, tracking_cfg, tmp_path / "dm", DEEPMASK, 2)
    version = tracking.client().get_model_version(DEEPMASK, deepmask.model_version)
    assert version.tags["maskflow.kind"] == "sharpmask"
    ious = history(deepmask.run_id, "val/mask_iou")
    assert len(ious) == 2 and deepmask.best_value == pytest.approx(max(ious))
    assert float(version.tags["val.mask_iou"]) == pytest.approx(deepmask.best_value)
    assert history(deepmask.run_id, "val/coarse_iou") == pytest.approx(ious)  # DeepMask: one mask
    masks, scores = history(deepmask.run_id, "train/mask"), history(deepmask.run_id, "train/score")
    assert history(deepmask.run_id, "train/loss") == pytest.approx([a + b for a, b in zip(masks, scores)], rel=1e-5)
    assert 0 < max(ious) < 1 and len(history(deepmask.run_id, "val/score_accuracy")) == 2

    sharp = train("sharpmask_cpu.yaml", windows, tracking_cfg, tmp_path / "sm", SHARPMASK, 1,
                  [f"init.from=models:/{DEEPMASK}@candidate"])
    version = tracking.client().get_model_version(SHARPMASK, sharp.model_version)
    assert version.tags["maskflow.kind"] == "sharpmask" and "val.mask_iou" in version.tags
    before = mlflow.pytorch.load_model(f"models:/{DEEPMASK}/{deepmask.model_version}").state_dict()
    after = mlflow.pytorch.load_model(f"models:/{SHARPMASK}/{sharp.model_version}")
    state = after.state_dict()
    # init.from loaded every DeepMask tensor; only the refinement is new
    assert sorted(sharp.init_report["loaded"]) == sorted(before)
    assert sharp.init_report["missing"] and all(k.startswith("refine.") for k in sharp.init_report["missing"])
    # frozen: trunk and DeepMask heads (BatchNorm statistics included) exactly as the DeepMask left them
    frozen = [k for k in state if k.startswith(FROZEN)]
    assert len(frozen) == len(before) and all(torch.equal(state[k], before[k]) for k in frozen)
    # phase 2 optimises the mask term of the refined mask alone
    assert history(sharp.run_id, "train/loss") == pytest.approx(history(sharp.run_id, "train/mask"), rel=1e-6)
    assert not history(sharp.run_id, "train/score") and len(history(sharp.run_id, "val/mask_iou")) == 1

    # the registered module answers the proposal generators' contract after a pickle round trip
    image = torch.rand(3, 120, 150)
    after.configure_for_proposals(7, 0.0, 1.0)
    (out,) = after.eval()([image])
    assert out["masks"].shape == (7, 1, 120, 150) and out["boxes"].shape == (7, 4) and out["scores"].shape == (7,)

    # the proposals job takes it by its kind (no Mask R-CNN settings needed), through Ray Data, and writes the same
    # proposals/1 samples; the evaluation job scores them with the kind's evaluator onto the version
    import evaluate as evaluate_script
    import proposals as proposals_script

    images = tmp_path / "images"
    images.mkdir()
    first = sorted(shards.iter_samples(windows["image_shards"]), key=lambda s: s["__key__"])[:3]
    record = shards.write_shard(str(images / shards.shard_name(0)), first)
    (images / shards.MANIFEST).write_text(json.dumps({"stage": "ingest", "schema": "image/1", "samples": 3,
                                                       "shards": [record]}))
    track = [f"tracking.tracking_uri={tracking_cfg.tracking_uri}", f"tracking.experiment={tracking_cfg.experiment}"]
    manifest = proposals_script.main(["--config", str(ROOT / "conf" / "proposals" / "sharpmask_penn_fudan.yaml"),
                                      f"input.shards={images}", f"output.uri={tmp_path / 'props'}",
                                      f"model.uri=models:/{SHARPMASK}@candidate", "proposals.top_k=20",
                                      "compute.workers=1", "compute.cpus_per_worker=1", *track])
    assert manifest["schema"] == "proposals/1" and manifest["samples"] == 3 and manifest["rejected"] == 0
    samples = list(shards.iter_samples(str(tmp_path / "props")))
    for sample in samples:
        props, meta = sample["proposals.json"], sample["json"]  # iter_samples parses JSON entries
        assert props["model"] == f"models:/{SHARPMASK}/{sharp.model_version}"
        assert len(props["segmentations"]) == 20 and props["scores"] == sorted(props["scores"], reverse=True)
        assert len(props["iou"]) == 20 and len(props["iou"][0]) == len(meta["annotations"])
        assert props["segmentations"][0]["size"] == [meta["height"], meta["width"]]
    result = evaluate_script.main([f"predictions={tmp_path / 'props'}", f"model=models:/{SHARPMASK}@candidate", *track])
    assert result["evaluator"] == "proposal_ar" and result["metric"] == "AR_100" and 0.0 <= result["value"] <= 1.0
    assert "AR_1000" not in result["metrics"]  # 20 proposals an image
    recorded = tracking.client().get_model_version(SHARPMASK, sharp.model_version).tags
    assert recorded["maskflow.metric"] == "AR_100"
