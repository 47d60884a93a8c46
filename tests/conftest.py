"""Shared fixtures: real components only — a local Ray, moto's S3 server on 127.0.0.1, MLflow on sqlite — and the
real data sets in ../shared/data."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
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
# Token authentication on, set before Ray is imported (as maskflow.runtime.init_ray does) so Ray need not warn.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Ray's start-up waits, made realistic for a loaded 2-core machine (read when ray.init runs; scripts the tests start
# inherit them): the GCS port file and the driver's first GCS connection (default 30 s), the wait for the raylet to
# start and register with the GCS (default 10 s). The Python-side wait for the node to register is a fixed 30 s in
# Ray 2.60, hence ray_local's second try.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


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


RAY_START_TRIES = 2
# Set when the session's local Ray failed to start: "first" is the test that reported why.
_ray_start_failure: dict[str, str] = {}
_current_test: dict[str, str] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """After local Ray failed to start once, every other test that needs it fails in one line pointing at the test
    that reported the failure (pytest would otherwise re-raise the session fixture's error in each of them)."""
    _current_test["nodeid"] = item.nodeid
    if _ray_start_failure and "ray_local" in item.fixturenames:
        pytest.fail(f"local Ray did not start (see the first failure, {_ray_start_failure['first']})", pytrace=False)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (2 CPUs, as on CI), in a temp dir of its own under /tmp (short: Ray's socket
    paths must stay under 108 characters) so it never meets another Ray on the machine; no dashboard. Start-up gets
    the waits set above and a second try; if both fail, the first test that needs Ray fails with one line and the
    others point at it."""
    import ray

    from maskflow.runtime import quiet_ray_data, start_embedded_ray

    quiet_ray_data()
    if ray.is_initialized():  # a test started one through maskflow.runtime.init_ray: use it
        yield ray
        ray.shutdown()
        return
    temp_dir = tempfile.mkdtemp(prefix="mf-ray-", dir="/tmp")
    errors: list[str] = []
    started = time.monotonic()
    for _ in range(RAY_START_TRIES):
        try:
            # the project's embedded-Ray set-up: a GCS port of its own on loopback, RAY_ADDRESS for every worker
            start_embedded_ray(2, log_to_driver=False, _temp_dir=temp_dir)
            break
        except Exception as exc:  # noqa: BLE001 - any start-up error is reported the same way
            lines = str(exc).strip().splitlines()
            errors.append(f"{type(exc).__name__}: {lines[0] if lines else ''}")
            ray.shutdown()
    else:
        _ray_start_failure["first"] = _current_test.get("nodeid", "?")
        logs = f"; Ray's logs: {temp_dir}/session_latest/logs" if os.listdir(temp_dir) else ""
        if not logs:
            os.rmdir(temp_dir)
        pytest.fail(f"local Ray did not start: {RAY_START_TRIES} tries in {time.monotonic() - started:.0f} s "
                    f"({'; '.join(dict.fromkeys(errors))}){logs}", pytrace=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


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
    from maskflow.train.fit import fit
    from trainers.maskrcnn import MaskRCNNPlugin, MaskRCNNTrainConfig

    arch = {**yaml.safe_load((ROOT / "conf" / "demo.yaml").read_text())["model"],
            "min_size": 160, "max_size": 256, "anchor_sizes": [16, 32, 64, 128, 256]}
    cfg = config.build(MaskRCNNTrainConfig, {
        "data": {"train": penn_fudan_shards, "shuffle_buffer": 16},
        "model": arch,
        "optim": {"name": "adamw", "lr": 0.002}, "schedule": {"warmup_steps": 20},
        "loop": {"epochs": 12, "batch_size": 4, "log_every_steps": 20, "torch_threads": 2},
        "run": {"storage_path": str(tmp_path_factory.mktemp("pf-ckpt")), "name": "pf-maskrcnn"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path_factory.mktemp('pf-mlflow')}/mlflow.db"},
    })
    result = fit(MaskRCNNPlugin(cfg))
    return {"uri": result.checkpoint_path, "arch": arch}
