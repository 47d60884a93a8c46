"""SFNet end to end on the harnesses: a 2-worker Ray Train run on Penn-Fudan pairs whose frozen backbone comes from
the registered Mask R-CNN (``init.from=models:/...@champion``), registered with its kind and validation metric; its
inference stage on held-out pairs (a model of another kind refused before Ray); the correspondence evaluation written
onto the version; promotion only if better."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from maskflow import config, shards, stage, tracking
from maskflow.config import ConfigError
from maskflow.evaluate import EvaluateConfig, evaluate_job
from tests.conftest import ROOT
from tests.test_sfnet import penn_fudan_pairs

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # the end-to-end tier: make test-e2e

MASKRCNN, SFNET = "pf-maskrcnn", "sfnet-test"


def stage_output(uri, samples: list[dict], per_shard: int = 8) -> str:
    """A finished ``pair/1`` stage output as the affine-pairs stage leaves it (shards, then the manifest)."""
    records = [shards.write_shard(str(uri / shards.shard_name(n)), samples[i:i + per_shard])
               for n, i in enumerate(range(0, len(samples), per_shard))]
    manifest = {"stage": "affine_pairs", "schema": "pair/1", "samples": len(samples), "shards": records}
    (uri / shards.MANIFEST).write_text(json.dumps(manifest))
    return str(uri)


@pytest.fixture(scope="module")
def pairs(shared_data, tmp_path_factory):
    """Training pairs: 8 photos x 2 warps; validation: 4 other photos x 1 warp (held-out images)."""
    root = tmp_path_factory.mktemp("sfnet-pairs")
    (root / "train").mkdir()
    (root / "val").mkdir()
    return {"train": stage_output(root / "train", penn_fudan_pairs(shared_data, range(8), per_image=2)),
            "val": stage_output(root / "val", penn_fudan_pairs(shared_data, range(8, 12), per_image=1, seed=1))}


@pytest.fixture(scope="module")
def tracking_cfg(tmp_path_factory):
    return tracking.TrackingConfig(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('sfnet-mlflow')}/mlflow.db",
                                   experiment="sfnet-tests")


@pytest.fixture(scope="module")
def champion_maskrcnn(penn_fudan_maskrcnn, tracking_cfg):
    """The suite's Penn-Fudan Mask R-CNN, registered as a 'maskrcnn' and made champion: the backbone SFNet reuses."""
    from maskflow.models.loading import load_proposal_model
    from maskflow.models.maskrcnn_config import MaskRCNNConfig

    model = load_proposal_model(penn_fudan_maskrcnn["uri"], config.build(MaskRCNNConfig, penn_fudan_maskrcnn["arch"]))
    tracking.setup(tracking_cfg)
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", pip_requirements=[])
    version = tracking.register_logged_model(info.model_uri, MASKRCNN, run_id=run.info.run_id, kind="maskrcnn")
    tracking.client().set_registered_model_alias(MASKRCNN, tracking.CHAMPION, version)
    return model


def history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(tracking.client().get_metric_history(run_id, key), key=lambda m: m.step)]


def predict(tracking_cfg, model_uri: str, shards_uri: str, out) -> str:
    from maskflow.stages.sfnet_predict import SFNetPredictConfig, SFNetPredictStage

    cfg = config.build(SFNetPredictConfig, {
        "input": {"shards": shards_uri}, "output": {"uri": str(out), "samples_per_shard": 4},
        "model": {"uri": model_uri}, "predict": {"batch_size": 4},
        "compute": {"workers": 1, "cpus_per_worker": 1}, "tracking": vars(tracking_cfg)})
    stage.run_stage(SFNetPredictStage(cfg, tracking_uri=tracking_cfg.tracking_uri), cfg.output, cfg.compute,
                    tracking_cfg, cfg)
    return str(out)


def evaluate(tracking_cfg, predictions: str, version: str) -> dict:
    cfg = config.build(EvaluateConfig, {"predictions": predictions, "model": f"models:/{SFNET}/{version}",
                                        "tracking": vars(tracking_cfg)})
    return evaluate_job(cfg)  # evaluator from the version's kind


def test_sfnet_trains_on_two_workers_registers_evaluates_and_promotes(ray_local, pairs, champion_maskrcnn,
                                                                     tracking_cfg, tmp_path):
    from maskflow.train.fit import fit
    from trainers.sfnet import SFNetPlugin, SFNetTrainConfig

    data = config.load_yaml(str(ROOT / "conf" / "sfnet" / "cpu.yaml"))
    cfg = config.build(SFNetTrainConfig, config.deep_merge(data, {
        "data": {"train": pairs["train"], "val": pairs["val"], "shuffle_buffer": 8},
        "init": {"from": f"models:/{MASKRCNN}@champion"},
        "schedule": {"milestones": [1]},
        "loop": {"epochs": 2, "batch_size": 4, "torch_threads": 1, "log_every_steps": 1},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": str(tmp_path / "ckpt"), "name": "sfnet-2w"},
        "registry": {"model_name": SFNET},
        "tracking": vars(tracking_cfg),
    }))
    result = fit(SFNetPlugin(cfg))

    # registered with its kind and validation metric; the best epoch's weights by val/pck_10
    version = tracking.client().get_model_version(SFNET, result.model_version)
    assert version.tags["maskflow.kind"] == "sfnet"
    pck = history(result.run_id, "val/pck_10")
    assert len(pck) == 2 and result.best_value == pytest.approx(max(pck))
    assert float(version.tags["val.pck_10"]) == pytest.approx(result.best_value)
    for key in ("val/pck_05", "val/mask_iou", "val/lt_acc", "val/epe"):
        assert len(history(result.run_id, key)) == 2, key
    # 16 pairs over 2 workers, batch 4: 2 steps an epoch each; the objective is the three weighted terms only
    assert history(result.run_id, "epoch/steps") == [2, 2]
    terms = [history(result.run_id, f"train/loss_{t}") for t in ("mask", "flow", "smooth")]
    assert history(result.run_id, "train/loss") == pytest.approx(np.sum(terms, axis=0).tolist(), rel=1e-5)
    assert len(history(result.run_id, "train/metric/epe_cells")) == len(terms[0])
    # the backbone is the Mask R-CNN's body, copied by init.from and kept frozen (BatchNorm statistics included)
    registered = mlflow.pytorch.load_model(f"models:/{SFNET}/{result.model_version}").eval()
    body = {k.removeprefix("backbone.body."): v for k, v in champion_maskrcnn.state_dict().items()
            if k.startswith("backbone.body.")}
    backbone = registered.backbone.state_dict()
    assert backbone and all(torch.equal(v, body[k]) for k, v in backbone.items())
    assert sorted(result.init_report["loaded"]) == sorted(f"backbone.{k}" for k in backbone)

    # inference: a Mask R-CNN is refused before Ray; the SFNet writes flows of the held-out pairs
    from maskflow.stages.sfnet_predict import SFNetPredictConfig, SFNetPredictStage

    wrong = config.build(SFNetPredictConfig, {"input": {"shards": pairs["val"]},
                                              "output": {"uri": str(tmp_path / "wrong")},
                                              "model": {"uri": f"models:/{MASKRCNN}@champion"}})
    tracking.setup(tracking_cfg)
    with pytest.raises(ConfigError, match=rf"^model.uri: models:/{MASKRCNN}@champion \(version 1\) is a 'maskrcnn' "
                                          r"model; this job needs 'sfnet' or 'sfnet_affine_baseline'$"):
        SFNetPredictStage(wrong).plan()
    predictions = predict(tracking_cfg, f"models:/{SFNET}@candidate", pairs["val"], tmp_path / "pred1")
    manifest = shards.read_manifest(predictions)
    assert manifest["schema"] == "flow_prediction/1" and manifest["samples"] == 4

    # evaluation written onto the version, then promotion: the first evaluated version becomes champion
    first = evaluate(tracking_cfg, predictions, result.model_version)
    assert first["metric"] == "pck_10" and first["higher_is_better"] is True
    assert 0.0 <= first["value"] <= 1.0 and {"pck_05", "mask_iou", "lt_acc", "epe"} <= set(first["metrics"])
    assert tracking.promote(SFNET)["promoted"] is True

    # a second version (the untrained network) is promoted only if its PCK beats the champion's
    untrained = SFNetPlugin(cfg).build_model()
    untrained.load_state_dict({**untrained.state_dict(), **{f"backbone.{k}": v for k, v in backbone.items()}})
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(untrained, name="model", serialization_format="pickle", pip_requirements=[])
    second_version = tracking.register_logged_model(info.model_uri, SFNET, run_id=run.info.run_id, kind="sfnet")
    second = evaluate(tracking_cfg, predict(tracking_cfg, f"models:/{SFNET}/{second_version}", pairs["val"],
                                            tmp_path / "pred2"), second_version)
    decision = tracking.promote(SFNET)
    assert decision["candidate_version"] == second_version and decision["champion_version"] == result.model_version
    assert decision["promoted"] is (second["value"] > first["value"])
    champion = tracking.model_version_for_alias(SFNET, tracking.CHAMPION).version
    assert str(champion) == (second_version if decision["promoted"] else result.model_version)
