"""Errors a user sees before any work starts: every job script parses its config before torch, Ray or MLflow load
(a config error in about a second), resolves model URIs of every form on the driver before Ray starts, and never
lets a relative data path land in a Ray job's temporary working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maskflow import config
from maskflow.config import ConfigError
from tests.conftest import ROOT

HEAVY = ("torch", "torchvision", "ray", "mlflow", "scipy")
SCRIPTS = ["pipelines/proposals.py", "pipelines/ingest.py", "pipelines/affine_pairs.py", "pipelines/ffd_crops.py",
           "pipelines/instance_maps.py", "pipelines/cluttered_digits.py", "pipelines/video_proposals.py",
           "pipelines/evaluate_proposals.py", "pipelines/evaluate.py", "pipelines/promote.py", "pipelines/convert.py",
           "pipelines/demo.py", "pipelines/predict.py", "pipelines/results.py",
           "pipelines/mask_patches.py", "trainers/maskrcnn.py", "trainers/sharpmask.py"]

# Generic scripts that pick their schema from a key need it before they can tell an unknown key.
SCRIPT_ARGS = {"pipelines/predict.py": ["kind=maskrcnn"]}

# Runs a script's main as `python <script>` would, then reports which heavy modules got imported.
PROBE = """
import runpy, sys, json
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[:0] = ['.', __import__('os').path.dirname(script)]
try:
    runpy.run_path(script, run_name='__main__')
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_errors_come_before_heavy_imports(script):
    done = subprocess.run([sys.executable, "-c", PROBE, script, *SCRIPT_ARGS.get(script, []), "no_such_key=1"],
                          cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "no_such_key: unknown key" in done.stderr
    assert result["heavy"] == [], f"{script} imported {result['heavy']} before reporting a config error"


def test_a_config_error_prints_in_about_a_second():
    """Wall time of the whole process, interpreter start included (about 0.3 s on an idle 2-core machine; the bound
    leaves room for a loaded CI machine, where torch's import alone took 15+ s before)."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "pipelines/proposals.py", "--config", "conf/proposals/demo.yaml",
                               "proposals.top_k=0"], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=120)
        times.append(time.perf_counter() - started)
        assert done.returncode == 2 and done.stderr.startswith("error: proposals.top_k"), done.stderr
    assert min(times) < 3.0, f"config error took {min(times):.2f} s"


def proposals_with_model(tmp_path: Path, model_uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "pipelines/proposals.py", "--config", "conf/proposals/demo.yaml",
         f"input.shards={ROOT / 'tests'}", f"output.uri={tmp_path / 'out'}", f"model.uri={model_uri}",
         f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[Path, str]:
    """A registry with model `tiny` version 1 (alias champion) and the run that logged it."""
    import mlflow
    import torch

    from maskflow import tracking

    root = tmp_path_factory.mktemp("registry")
    tracking.setup(tracking.TrackingConfig(tracking_uri=f"sqlite:///{root}/mlflow.db"))
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(torch.nn.Linear(1, 1), name="model", serialization_format="pickle")
    version = tracking.register_logged_model(info.model_uri, "tiny", run.info.run_id)
    tracking.client().set_registered_model_alias("tiny", tracking.CHAMPION, version)
    return root, run.info.run_id


@pytest.mark.parametrize("uri, needle", [
    ("models:/tiny/99", "model.uri: registered model 'tiny' has no version 99 (latest: 1)"),
    ("models:/tiny@nope", "model.uri: registered model 'tiny' has no version with alias 'nope'"),
    ("models:/tiny", "model.uri: 'models:/tiny' names no version"),
    ("models:/other/1", "model.uri: registered model 'other' has no version 1 (latest: none)"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "model.uri: no MLflow run '0123456789abcdef0123456789abcdef'"),
    ("RUN/elsewhere", "model.uri: run RUN holds no logged model at 'elsewhere'"),
    ("/nonexistent/state.pt", "model.uri: no such file or directory: /nonexistent/state.pt"),
    ("/nonexistent/checkpoint_dir", "model.uri: no such file or directory: /nonexistent/checkpoint_dir/state.pt"),
    ("torchvision:MaskRCNN_ResNet50_FPN_Weights.NOPE", "model.uri: unknown torchvision weights"),
    ("torchvision:COCO_V1", "model.uri: torchvision weights are named <Enum>.<MEMBER>"),
])
def test_model_uris_are_checked_before_ray_starts(registered, tmp_path, uri, needle):
    """Each form of a bad model URI fails on the driver in one line, exit 2, before Ray starts (no Ray session
    directory is made, nothing is written)."""
    root, run_id = registered
    uri = uri.replace("RUN", f"runs:/{run_id}")
    needle = needle.replace("RUN", run_id)
    (tmp_path / "mlflow.db").write_bytes((root / "mlflow.db").read_bytes())
    started = time.perf_counter()
    done = proposals_with_model(tmp_path, uri)
    elapsed = time.perf_counter() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr[-3000:]
    assert "Ray" not in done.stderr and not (tmp_path / "out").exists()
    assert elapsed < 60


# --------------------------------------------------------------------------------------------- relative paths


def build_ingest(data: dict):
    from maskflow.stages.ingest import IngestConfig

    return config.build(IngestConfig, data)


DATA = {"input": {"annotations": "runs/data/a.json", "images": "runs/data/images"}, "output": {"uri": "runs/shards"}}


def test_relative_data_paths_resolve_against_the_base_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(config.BASE_DIR_ENV, str(tmp_path))
    cfg = build_ingest({**DATA, "tracking": {"tracking_uri": "sqlite:///runs/mlflow.db"}})
    assert cfg.input.annotations == f"{tmp_path}/runs/data/a.json"
    assert cfg.output.uri == f"{tmp_path}/runs/shards"
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path}/runs/mlflow.db"
    # absolute, s3:// and model URIs are left as they are
    cfg = build_ingest({"input": {"annotations": "s3://b/a.json", "images": "/data/images"},
                        "output": {"uri": "file:///x/y"}, "tracking": {"tracking_uri": "http://mlflow:5000"}})
    assert (cfg.input.annotations, cfg.input.images, cfg.output.uri, cfg.tracking.tracking_uri) == \
        ("s3://b/a.json", "/data/images", "file:///x/y", "http://mlflow:5000")


def test_relative_data_paths_are_refused_in_an_uploaded_working_dir(monkeypatch):
    monkeypatch.delenv(config.BASE_DIR_ENV, raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x"}}))
    with pytest.raises(ConfigError) as e:
        build_ingest({**DATA, "output": {"uri": "/abs/shards"}, "tracking": {"tracking_uri": "/abs/mlflow"}})
    assert str(e.value).startswith("input.annotations: relative path 'runs/data/a.json' would resolve inside Ray's "
                                   "temporary copy of the working directory")
    assert "MASKFLOW_BASE_DIR" in str(e.value) and "\n" not in str(e.value)
    # the default tracking URI is relative too: it is refused the same way, naming its key
    with pytest.raises(ConfigError, match=r"^tracking.tracking_uri: relative path 'sqlite:///runs/mlflow.db'"):
        build_ingest({"input": {"annotations": "/a.json", "images": "/i"}, "output": {"uri": "/o"}})


def test_a_base_dir_missing_on_the_node_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(config.BASE_DIR_ENV, str(tmp_path / "not-here"))
    with pytest.raises(ConfigError, match=r"^[\w.]+: MASKFLOW_BASE_DIR=.* is not a directory on this node"):
        build_ingest(DATA)
