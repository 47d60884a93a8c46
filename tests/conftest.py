"""Shared fixtures: real components only — a local Ray, moto's S3 server on 127.0.0.1, MLflow on sqlite — and the
real data sets in ../shared/data."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Credentials for the loopback S3 endpoint only; set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "maskflow-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "maskflow-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for _var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
    os.environ.pop(_var, None)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def require_shared_data(path: Path = SHARED_DATA) -> Path:
    """The real data (or a part of it); skipped on a developer machine without it, a failure on CI."""
    if not path.exists():
        message = f"real data not found at {path} (../shared/data beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto server) on loopback; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint):
    from maskflow.storage import StorageOptions

    return StorageOptions(endpoint_url=s3_endpoint, region="us-east-1")


@pytest.fixture
def s3_bucket(s3_options) -> str:
    """A fresh bucket on the moto endpoint; yields its name."""
    from maskflow import storage

    name = f"mf-{uuid.uuid4().hex[:10]}"
    storage.s3_client(s3_options).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (2 CPUs, as on CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tracking_cfg(tmp_path):
    from maskflow.tracking import TrackingConfig

    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="tests")


@pytest.fixture(scope="session")
def penn_fudan_coco(shared_data, tmp_path_factory) -> tuple[str, str]:
    """Penn-Fudan converted to COCO json: (annotations path, images dir)."""
    from maskflow.data.convert import penn_fudan_to_coco
    from maskflow.data.coco import write_coco_json

    coco, images = penn_fudan_to_coco(str(shared_data / "penn_fudan_ped"))
    path = tmp_path_factory.mktemp("pf") / "instances.json"
    write_coco_json(coco, str(path))
    return str(path), images


@pytest.fixture(scope="session")
def penn_fudan_shards(penn_fudan_coco, tmp_path_factory) -> str:
    """All 60 Penn-Fudan images as local image shards (ingest stage)."""
    from tests.test_ingest import run_ingest
    from maskflow.storage import DEFAULT_OPTIONS

    out = str(tmp_path_factory.mktemp("pf-shards") / "shards")
    run_ingest(*penn_fudan_coco, out, DEFAULT_OPTIONS, per_shard=16)
    return out


@pytest.fixture(scope="session")
def penn_fudan_maskrcnn(ray_local, penn_fudan_shards, tmp_path_factory) -> dict:
    """A CPU-sized class-agnostic Mask R-CNN the project trains itself on Penn-Fudan through the trainer harness
    (~1.5 min on 2 cores): good enough that some of its top-50 proposals overlap pedestrians by IoU > 0.5, which is
    what the stages consuming proposals need. Returns ``{"uri": checkpoint dir, "arch": model config dict}``."""
    import yaml

    from maskflow import config
    from maskflow.trainer import fit
    from trainers.maskrcnn import MaskRCNNPlugin, MaskRCNNTrainConfig

    arch = {**yaml.safe_load((ROOT / "conf" / "demo.yaml").read_text())["model"],
            "min_size": 160, "max_size": 256, "anchor_sizes": [16, 32, 64, 128, 256]}
    cfg = config.build(MaskRCNNTrainConfig, {
        "data": {"train": penn_fudan_shards, "shuffle_buffer": 16},
        "model": arch,
        "optim": {"name": "adamw", "lr": 0.002, "warmup_steps": 20},
        "loop": {"epochs": 12, "batch_size": 4, "log_every_steps": 20, "torch_threads": 2},
        "run": {"storage_path": str(tmp_path_factory.mktemp("pf-ckpt")), "name": "pf-maskrcnn"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path_factory.mktemp('pf-mlflow')}/mlflow.db"},
    })
    result = fit(MaskRCNNPlugin(cfg))
    return {"uri": result.checkpoint_path, "arch": arch}
