"""maskflow.tracking against real MLflow backends: sqlite in tmp (tracking_cfg), and a real `mlflow server` process."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from maskflow import tracking
from maskflow.runtime import Common, StorageConfig
from maskflow.tracking import TrackingConfig
from tests import servers


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite db with its schema migrated once: creating one costs seconds per test otherwise."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    store = SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "artifacts"))
    store.engine.dispose()
    return path


@pytest.fixture(autouse=True)
def isolated_mlflow(monkeypatch, tmp_path, migrated_db):
    """Leave no global MLflow state (tracking URI, experiment, active run) behind for other tests."""
    import mlflow

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)  # restored by monkeypatch afterwards
    shutil.copyfile(migrated_db, tmp_path / "mlflow.db")  # where tracking_cfg points; srv.db for the server
    shutil.copyfile(migrated_db, tmp_path / "srv.db")
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None


@dataclass
class Train:
    epochs: int = 2
    lr: float = 0.01


@dataclass
class JobConfig(Common):
    train: Train = field(default_factory=Train)
    note: str | None = None


def linear(weight: float):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.fill_(0.0)
    return model


def log_and_register(cfg: TrackingConfig, name: str, weight: float, kind: str | None = None) -> str:
    import mlflow

    with tracking.job_run(cfg, "train", JobConfig()) as run:
        info = mlflow.pytorch.log_model(linear(weight), name="model", serialization_format="pickle",
                                        pip_requirements=[])
        return tracking.register_logged_model(info.model_uri, name, run_id=run.info.run_id, kind=kind)


# --------------------------------------------------------------------------------------------- sqlite


def test_resolved_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolved_tracking_uri(TrackingConfig("sqlite:///runs/m.db")) == f"sqlite:///{tmp_path}/runs/m.db"
    assert (tmp_path / "runs").is_dir()  # created so sqlite can open the file
    assert tracking.resolved_tracking_uri(TrackingConfig("sqlite:////abs/m.db")) == "sqlite:////abs/m.db"
    assert tracking.resolved_tracking_uri(TrackingConfig("http://h:5000")) == "http://h:5000"
    assert tracking.resolved_tracking_uri(TrackingConfig("mlruns")) == str(tmp_path / "mlruns")


def test_setup_creates_experiment(tracking_cfg, tmp_path):
    import mlflow

    exp_id = tracking.setup(tracking_cfg)
    assert mlflow.get_tracking_uri() == tracking_cfg.tracking_uri
    exp = mlflow.MlflowClient().get_experiment_by_name("tests")
    assert exp is not None and exp.experiment_id == exp_id
    assert exp.artifact_location == f"file://{tmp_path}/mlartifacts"  # beside the sqlite db
    assert tracking.setup(tracking_cfg) == exp_id  # idempotent: the existing experiment is reused
    other = tracking.setup(TrackingConfig(tracking_cfg.tracking_uri, experiment="other"))
    assert other != exp_id


def test_job_run_logs_redacted_params_and_config(tracking_cfg):
    import mlflow

    job = JobConfig(storage=StorageConfig(endpoint_url="http://127.0.0.1:1", access_key_id="AKIAID0000",
                                          secret_access_key="SUPERSECRET123"), train=Train(epochs=5, lr=0.5))
    with tracking.job_run(tracking_cfg, "ingest", job, tags={"extra": "yes"}) as run:
        mlflow.log_metric("samples", 42)
        run_id = run.info.run_id
    stored = mlflow.MlflowClient().get_run(run_id)
    params = stored.data.params
    assert params["train.epochs"] == "5" and params["train.lr"] == "0.5"
    assert params["storage.endpoint_url"] == "http://127.0.0.1:1"
    assert params["storage.secret_access_key"] == "***"
    assert params["storage.access_key_id"] == "***"
    assert params["note"] == ""  # None is logged as an empty string
    assert params["tracking.experiment"] == "maskflow"  # the job's own block, not the tracking_cfg used
    assert all("SUPERSECRET123" not in v and "AKIAID0000" not in v for v in params.values())
    assert stored.data.tags["maskflow.job"] == "ingest" and stored.data.tags["extra"] == "yes"
    assert stored.data.metrics["samples"] == 42
    assert stored.info.status == "FINISHED"
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    assert "SUPERSECRET123" not in text and "AKIAID0000" not in text
    assert "epochs: 5" in text and "secret_access_key: '***'" in text


def test_job_run_marks_failed_run(tracking_cfg):
    import mlflow

    with pytest.raises(RuntimeError):
        with tracking.job_run(tracking_cfg, "boom", JobConfig()) as run:
            run_id = run.info.run_id
            raise RuntimeError("x")
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_registry_and_promotion(tracking_cfg):
    import mlflow
    import torch

    name = "tiny-linear"
    v1 = log_and_register(tracking_cfg, name, weight=1.0)
    assert tracking.model_version_for_alias(name, tracking.CANDIDATE).version == int(v1)
    assert tracking.model_version_for_alias(name, tracking.CHAMPION) is None
    run_tag = tracking.client().get_model_version(name, v1).tags["run_id"]
    assert tracking.client().get_run(run_tag).data.tags["maskflow.job"] == "train"

    with pytest.raises(ValueError, match="evaluate it first"):
        tracking.promote(name, "AR_100")  # no evaluation recorded yet
    assert tracking.model_version_for_alias(name, tracking.CHAMPION) is None

    tracking.record_evaluation(name, v1, {"AR_100": 0.50, "AR_10": 0.2})
    assert tracking.evaluation_metric(name, v1, "AR_100") == 0.5
    first = tracking.promote(name, "AR_100")
    assert first["promoted"] is True and first["candidate_version"] == v1 and first["champion_version"] is None
    assert str(tracking.model_version_for_alias(name, tracking.CHAMPION).version) == v1

    v2 = log_and_register(tracking_cfg, name, weight=2.0)
    assert str(tracking.model_version_for_alias(name, tracking.CANDIDATE).version) == v2 != v1  # candidate moved
    tracking.record_evaluation(name, v2, {"AR_100": 0.40})
    worse = tracking.promote(name, "AR_100")
    assert worse["promoted"] is False
    assert (worse["candidate_version"], worse["candidate_value"]) == (v2, 0.40)
    assert (worse["champion_version"], worse["champion_value"]) == (v1, 0.50)
    assert str(tracking.model_version_for_alias(name, tracking.CHAMPION).version) == v1  # champion stays

    v3 = log_and_register(tracking_cfg, name, weight=3.0)
    tracking.record_evaluation(name, v3, {"AR_100": 0.75})
    better = tracking.promote(name, "AR_100")
    assert better["promoted"] is True and better["candidate_version"] == v3
    assert (better["champion_version"], better["champion_value"]) == (v1, 0.50)
    assert str(tracking.model_version_for_alias(name, tracking.CHAMPION).version) == v3
    assert tracking.promote(name, "AR_100", version=v3)["promoted"] is False  # already the champion
    # lower-is-better comparisons go the other way: v2 (0.40) would beat v3 (0.75), v1 (0.50) would not beat v2
    assert tracking.promote(name, "AR_100", version=v2, higher_is_better=False)["promoted"] is True
    assert tracking.promote(name, "AR_100", version=v1, higher_is_better=False)["promoted"] is False
    assert str(tracking.model_version_for_alias(name, tracking.CHAMPION).version) == v2
    tracking.client().set_registered_model_alias(name, tracking.CHAMPION, v3)  # back to v3 for loading

    loaded = mlflow.pytorch.load_model(f"models:/{name}@champion")
    assert torch.equal(loaded.weight.detach(), torch.full((1, 2), 3.0))
    assert loaded(torch.ones(1, 2)).item() == pytest.approx(6.0)
    assert tracking.evaluation_metric(name, v3, "missing") is None


def test_kind_and_declared_metric_decide_promotion(tracking_cfg):
    """A version's kind is a tag; promotion without a metric takes the one its evaluation recorded (name and
    direction), else its kind's evaluator's (maskrcnn: AR_100, higher is better); with neither it asks for one."""
    v1 = log_and_register(tracking_cfg, "kinded", 1.0, kind="maskrcnn")
    version = tracking.client().get_model_version("kinded", v1)
    assert tracking.model_kind("kinded", v1) == "maskrcnn" == version.tags[tracking.KIND_TAG]
    assert version.tags["run_id"] and tracking.client().get_registered_model("kinded").aliases == {"candidate": int(v1)}
    tracking.record_evaluation("kinded", v1, {"AR_100": 0.3})  # no headline recorded: the kind's evaluator decides
    assert tracking.declared_metric("kinded", v1) == ("AR_100", True, "the 'maskrcnn' kind's evaluator")
    assert tracking.promote("kinded")["promoted"]

    v2 = log_and_register(tracking_cfg, "kinded", 2.0, kind="maskrcnn")
    tracking.record_evaluation("kinded", v2, {"AR_100": 0.2, "EPE": 1.5}, metric="EPE", higher_is_better=False)
    assert tracking.declared_metric("kinded", v2) == ("EPE", False, "the version's evaluation")
    decision = tracking.promote("kinded")  # the champion has no EPE: the candidate's recorded one wins
    assert decision["promoted"] and (decision["metric"], decision["higher_is_better"]) == ("EPE", False)
    assert tracking.promote("kinded", "AR_100", v1)["promoted"]  # named: higher is better, 0.3 > 0.2

    bare = log_and_register(tracking_cfg, "bare", 1.0)
    assert tracking.model_kind("bare", bare) is None
    tracking.record_evaluation("bare", bare, {"AR_100": 0.5})
    with pytest.raises(ValueError, match="records no evaluation metric and no kind"):
        tracking.promote("bare")
    assert tracking.promote("bare", "AR_100")["higher_is_better"] is True  # an unknown direction: higher


def test_promote_without_candidate(tracking_cfg):
    tracking.setup(tracking_cfg)
    tracking.client().create_registered_model("empty-model")
    with pytest.raises(ValueError, match="no 'candidate' version"):
        tracking.promote("empty-model", "AR_100")


# --------------------------------------------------------------------------------------------- real server


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback (sqlite backend, local artifacts), healthy or one failure naming why."""
    with servers.mlflow_server(tmp_path, f"sqlite:///{tmp_path}/srv.db", str(tmp_path / "artifacts")) as url:
        yield url, tmp_path


@pytest.mark.slow
def test_tracking_server_end_to_end(mlflow_server):
    import mlflow
    import torch

    url, tmp_path = mlflow_server
    cfg = TrackingConfig(tracking_uri=url, experiment="srv")
    exp_id = tracking.setup(cfg)
    assert mlflow.get_tracking_uri() == url
    assert mlflow.MlflowClient().get_experiment(exp_id).name == "srv"

    with tracking.job_run(cfg, "train", JobConfig()) as run:
        mlflow.log_metric("loss", 0.25, step=1)
        info = mlflow.pytorch.log_model(linear(5.0), name="model", serialization_format="pickle",
                                        pip_requirements=[])
        version = tracking.register_logged_model(info.model_uri, "srv-model", run_id=run.info.run_id)
    stored = mlflow.MlflowClient().get_run(run.info.run_id)
    assert stored.data.metrics["loss"] == 0.25 and stored.data.params["train.epochs"] == "2"

    tracking.record_evaluation("srv-model", version, {"AR_100": 0.3})
    decision = tracking.promote("srv-model", "AR_100")
    assert decision["promoted"] is True
    assert str(tracking.model_version_for_alias("srv-model", tracking.CHAMPION).version) == version

    loaded = mlflow.pytorch.load_model("models:/srv-model@champion")
    assert torch.equal(loaded.weight.detach(), torch.full((1, 2), 5.0))
    # the artifacts went through the server into its --artifacts-destination, not into a local client path
    assert any(p.name == "MLmodel" for p in (tmp_path / "artifacts").rglob("MLmodel"))
    assert any(p.name == "config.yaml" for p in (tmp_path / "artifacts").rglob("config.yaml"))
