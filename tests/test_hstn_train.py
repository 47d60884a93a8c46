"""HSTN end to end on the harnesses, on real data: 2-worker Ray Train runs of the cluttered-digit classifier
(Affine-STN first, then HSTN whose affine generator is initialised from the registered Affine-STN, as Shu et al.
section 4.1 does) and of the planar aligner; each registered with its kind and validation metric; the inference
stages on held-out samples (a model of another kind refused before Ray; the OpenCV baseline through the same stage);
evaluations written onto the versions; promotion only if better, in the metric's direction."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

from maskflow import config, shards, stage, tracking
from maskflow.config import ConfigError
from maskflow.evaluate import EvaluateConfig, evaluate_job
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # the end-to-end tier: make test-e2e

AFFINE_STN, HSTN, ALIGN = "hstn-cls-affine-stn-test", "hstn-cls-test", "hstn-align-test"


def stage_output(root, samples: list[dict], stage_name: str, schema_name: str, per_shard: int = 64) -> str:
    """A finished stage output as the stage leaves it (shards, then the manifest)."""
    root.mkdir(parents=True, exist_ok=True)
    records = [shards.write_shard(str(root / shards.shard_name(n)), samples[i:i + per_shard])
               for n, i in enumerate(range(0, len(samples), per_shard))]
    manifest = {"stage": stage_name, "schema": schema_name, "samples": len(samples), "shards": records}
    (root / shards.MANIFEST).write_text(json.dumps(manifest))
    return str(root)


@pytest.fixture(scope="module")
def digits(shared_data, tmp_path_factory) -> dict:
    """Cluttered MNIST 40x40 as the cluttered-digits stage imports it: 256 training and 128 validation digits."""
    from maskflow.stages.cluttered_digits import SCHEMA, ClutteredDigitsConfig, ClutteredDigitsStage

    npz = shared_data / "cluttered_mnist_40x40" / "cluttered_mnist_40x40_trainval.npz"
    root = tmp_path_factory.mktemp("hstn-digits")
    out = {}
    for split, count in (("train", 256), ("valid", 128)):
        cfg = config.build(ClutteredDigitsConfig, {
            "input": {"source": "import_npz", "uri": str(npz), "splits": [split]},
            "output": {"uri": "unused", "samples_per_shard": count}})
        job = ClutteredDigitsStage(cfg)
        unit = job.plan().units[0]
        job.setup()
        samples = list(job.process(unit))
        out[split] = stage_output(root / split, samples, "cluttered_digits", SCHEMA.name)
    return out


@pytest.fixture(scope="module")
def pairs(shared_data, tmp_path_factory) -> dict:
    """Elastic pairs of shrunk Penn-Fudan photographs: 12 for training, 4 held-out photographs for validation."""
    from maskflow.stages.affine_pairs import SCHEMA
    from tests.test_hstn import pair_samples

    samples = pair_samples.__wrapped__(shared_data)  # 12 pairs of 12 photographs
    root = tmp_path_factory.mktemp("hstn-pairs")
    return {"train": stage_output(root / "train", samples[:8], "affine_pairs", SCHEMA.name, per_shard=4),
            "val": stage_output(root / "val", samples[8:], "affine_pairs", SCHEMA.name, per_shard=4)}


@pytest.fixture(scope="module")
def tracking_cfg(tmp_path_factory):
    return tracking.TrackingConfig(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('hstn-mlflow')}/mlflow.db",
                                   experiment="hstn-tests")


def history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(tracking.client().get_metric_history(run_id, key), key=lambda m: m.step)]


def two_worker_overrides(tmp_path, name: str, tracking_cfg, epochs: int) -> dict:
    return {"loop": {"epochs": epochs, "batch_size": 16, "torch_threads": 1, "log_every_steps": 2},
            "scaling": {"workers": 2, "cpus_per_worker": 0.5},
            "run": {"storage_path": str(tmp_path / "ckpt"), "name": f"{name}-2w"},
            "registry": {"model_name": name}, "tracking": vars(tracking_cfg)}


def predict(stage_class, config_class, tracking_cfg, model_uri: str, shards_uri: str, out) -> str:
    cfg = config.build(config_class, {
        "input": {"shards": shards_uri}, "output": {"uri": str(out), "samples_per_shard": 64},
        "model": {"uri": model_uri}, "compute": {"workers": 1, "cpus_per_worker": 1}, "tracking": vars(tracking_cfg)})
    stage.run_stage(stage_class(cfg, tracking_uri=tracking_cfg.tracking_uri), cfg.output, cfg.compute, tracking_cfg,
                    cfg)
    return str(out)


def evaluate(tracking_cfg, predictions: str, name: str | None = None, version: str | None = None,
             evaluator: str = "") -> dict:
    cfg = config.build(EvaluateConfig, {"predictions": predictions, "evaluator": evaluator,
                                        "model": f"models:/{name}/{version}" if name else "",
                                        "tracking": vars(tracking_cfg)})
    return evaluate_job(cfg)  # without an evaluator: the version's kind's


DIGIT_DATA = {"shuffle_buffer": 32, "val_batch_size": 64}


@pytest.fixture(scope="module")
def affine_stn(ray_local, digits, tracking_cfg, tmp_path_factory):
    """The Affine-STN trained on 2 workers for 2 epochs (the paper's Adam on a validation plateau; lr raised for so
    short a run) and registered: the FitResult."""
    from maskflow.train.fit import fit
    from trainers.hstn import HSTNClassifierPlugin, parse_config

    cfg = parse_config(["--config", str(ROOT / "conf" / "hstn" / "cls_affine_stn_cpu.yaml")])
    cfg = config.build(type(cfg), config.deep_merge(config.to_dict(cfg), {
        "data": {"train": digits["train"], "val": digits["valid"], **DIGIT_DATA}, "optim": {"lr": 0.003},
        **two_worker_overrides(tmp_path_factory.mktemp("stn"), AFFINE_STN, tracking_cfg, 2)}))
    return fit(HSTNClassifierPlugin(cfg))


def test_affine_stn_on_two_workers_registered_with_kind_and_metric(affine_stn):
    version = tracking.client().get_model_version(AFFINE_STN, affine_stn.model_version)
    assert version.tags["maskflow.kind"] == "hstn_cls"
    ce = history(affine_stn.run_id, "val/cross_entropy")  # validation.metric: cross_entropy, mode min
    assert len(ce) == 2 and affine_stn.best_value == pytest.approx(min(ce))
    assert len(history(affine_stn.run_id, "val/accuracy")) == 2
    assert history(affine_stn.run_id, "epoch/steps") == [8, 8]  # 256 digits over 2 workers, batch 16
    assert len(history(affine_stn.run_id, "train/metric/accuracy")) > 0


def test_hstn_from_the_affine_stn_predicts_evaluates_and_promotes(affine_stn, digits, tracking_cfg, tmp_path):
    from maskflow.stages.hstn_predict import DigitPredictConfig, DigitPredictStage, FlowPredictConfig, \
        FlowPredictStage
    from maskflow.train.fit import fit
    from trainers.hstn import HSTNClassifierPlugin, parse_config

    stn = affine_stn
    # HSTN, its affine generator initialised from the registered Affine-STN by key prefix (section 4.1, item 6)
    cfg = parse_config(["--config", str(ROOT / "conf" / "hstn" / "cls_cpu.yaml"),
                        f"init.from=models:/{AFFINE_STN}@candidate"])
    cfg = config.build(type(cfg), config.deep_merge(config.to_dict(cfg), {
        "data": {"train": digits["train"], "val": digits["valid"], **DIGIT_DATA}, "optim": {"lr": 0.003},
        **two_worker_overrides(tmp_path, HSTN, tracking_cfg, 1)}))
    hstn = fit(HSTNClassifierPlugin(cfg))
    assert tracking.client().get_model_version(HSTN, hstn.model_version).tags["maskflow.kind"] == "hstn_cls"
    stn_model = mlflow.pytorch.load_model(f"models:/{AFFINE_STN}/{stn.model_version}")
    assert sorted(hstn.init_report["loaded"]) == sorted(f"affine.{k}" for k in stn_model.affine.state_dict())
    terms = [history(hstn.run_id, f"train/{t}") for t in ("cross_entropy", "bending", "smoothness")]
    assert history(hstn.run_id, "train/loss") == pytest.approx([sum(t) for t in zip(*terms)], rel=1e-5)

    # inference: an hstn_cls model is refused by the flow stage before Ray; the digits predicted by the HSTN
    tracking.setup(tracking_cfg)
    wrong = config.build(FlowPredictConfig, {"input": {"shards": digits["valid"]},
                                             "output": {"uri": str(tmp_path / "wrong")},
                                             "model": {"uri": f"models:/{HSTN}@candidate"}})
    with pytest.raises(ConfigError, match=rf"^model.uri: models:/{HSTN}@candidate \(version 1\) is a 'hstn_cls' "
                                          r"model; this job needs 'hstn_align'$"):
        FlowPredictStage(wrong).plan()
    out = predict(DigitPredictStage, DigitPredictConfig, tracking_cfg, f"models:/{HSTN}@candidate", digits["valid"],
                  tmp_path / "pred")
    manifest = shards.read_manifest(out)
    assert manifest["schema"] == "digit_prediction/1" and manifest["samples"] == 128
    result = evaluate(tracking_cfg, out, HSTN, hstn.model_version)
    assert result["metric"] == "accuracy" and result["higher_is_better"] is True
    assert 0.0 <= result["value"] <= 1.0 and "cross_entropy" in result["metrics"]
    # promotion by accuracy: the first evaluated version becomes champion; a version no better is not promoted
    assert tracking.promote(HSTN)["promoted"] is True
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(torch.nn.Identity(), name="model", serialization_format="pickle",
                                        pip_requirements=[])
    copy = tracking.register_logged_model(info.model_uri, HSTN, run_id=run.info.run_id, kind="hstn_cls")
    tracking.record_evaluation(HSTN, copy, {"accuracy": result["value"]}, metric="accuracy", higher_is_better=True)
    decision = tracking.promote(HSTN)
    assert decision["candidate_version"] == copy and decision["promoted"] is False


def test_aligner_on_two_workers_against_the_opencv_baseline(ray_local, pairs, tracking_cfg, tmp_path):
    from maskflow.stages.hstn_predict import FlowPredictConfig, FlowPredictStage
    from maskflow.train.fit import fit
    from trainers.hstn import HSTNAlignPlugin, parse_config

    cfg = parse_config(["--config", str(ROOT / "conf" / "hstn" / "align_cpu.yaml"), 'init.from=""'])
    cfg = config.build(type(cfg), config.deep_merge(config.to_dict(cfg), {
        "data": {"train": pairs["train"], "val": pairs["val"], "shuffle_buffer": 8, "val_batch_size": 4},
        "validation": {"every_epochs": 1}, **two_worker_overrides(tmp_path, ALIGN, tracking_cfg, 2)}))
    cfg.loop.batch_size = 4
    result = fit(HSTNAlignPlugin(cfg))
    version = tracking.client().get_model_version(ALIGN, result.model_version)
    assert version.tags["maskflow.kind"] == "hstn_align"
    epe = history(result.run_id, "val/epe")  # validation.metric: epe, mode min, at the pairs' own resolution
    assert len(epe) == 2 and result.best_value == pytest.approx(min(epe)) and all(v > 0 for v in epe)
    assert history(result.run_id, "epoch/steps") == [1, 1]  # 8 pairs over 2 workers, batch 4

    outputs = {}
    for uri in (f"models:/{ALIGN}@candidate", "opencv:dis"):
        outputs[uri] = predict(FlowPredictStage, FlowPredictConfig, tracking_cfg, uri, pairs["val"],
                               tmp_path / f"pred-{uri.split(':')[0]}")
        assert shards.read_manifest(outputs[uri])["schema"] == "flow_prediction/1"
    network = evaluate(tracking_cfg, outputs[f"models:/{ALIGN}@candidate"], ALIGN, result.model_version)
    assert network["metric"] == "EPE" and network["higher_is_better"] is False and network["value"] > 0
    dis = evaluate(tracking_cfg, outputs["opencv:dis"], evaluator="flow_epe")
    assert dis["metrics"]["seconds_per_pair"] > 0 and dis["value"] > 0
    assert tracking.promote(ALIGN)["promoted"] is True  # first evaluated version; EPE's direction recorded
    assert version.tags.get("maskflow.kind") == "hstn_align"
