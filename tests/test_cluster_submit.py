"""The cluster path as cluster/README.md documents it: a real head node on loopback started by the project's own
command (its own ports, temp dir and token), the proposals job submitted with `ray job submit` exactly as the README
shows, run by the project's interpreter, its relative paths resolved against MASKFLOW_BASE_DIR, its output and MLflow
run where a local run would put them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # the end-to-end tier: make test-e2e

MODEL_NAME = "maskflow-maskrcnn-demo"


def readme_submit_lines() -> list[str]:
    """The shell lines of the README's submit example (the bash block after the submit-example marker), with
    continuation lines joined and comments dropped."""
    text = (ROOT / "cluster" / "README.md").read_text()
    block = re.search(r"<!-- submit-example[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "cluster/README.md lost its submit-example block"
    joined = block.group(1).replace("\\\n", " ")
    lines = [" ".join(re.sub(r"\s+#.*$", "", line).split()) for line in joined.splitlines()]
    return [line for line in lines if line]


def free_port() -> int:
    from maskflow.runtime import free_port as port

    return port()


def register_champion(base: Path, checkpoint: str, arch: dict) -> str:
    """The demo's registry state, made from the suite's own trained Mask R-CNN: MODEL_NAME@champion in
    <base>/runs/mlflow.db, as `make demo` leaves it."""
    import mlflow

    from maskflow import tracking
    from maskflow.models.loading import load_proposal_model
    from maskflow.models.maskrcnn_config import MaskRCNNConfig

    tracking.setup(tracking.TrackingConfig(tracking_uri=f"sqlite:///{base}/runs/mlflow.db"))
    model = load_proposal_model(checkpoint, MaskRCNNConfig(**arch))
    with mlflow.start_run(run_name="register-for-cluster-test") as run:
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle")
    version = tracking.register_logged_model(info.model_uri, MODEL_NAME, run.info.run_id)
    tracking.client().set_registered_model_alias(MODEL_NAME, tracking.CHAMPION, version)
    return version


def test_ray_job_submit_as_documented(penn_fudan_maskrcnn, penn_fudan_shards, tmp_path: Path):
    lines = readme_submit_lines()
    assert lines[0] == "make cluster" and lines[-1] == "make cluster-stop", lines
    assert lines[1] == 'eval "$(cluster/local.sh env)"', lines
    submit = lines[2]
    assert submit.startswith("ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python "), submit

    # What `make demo` leaves in the checkout, under a base directory of the test's own.
    base = tmp_path / "base"
    (base / "runs" / "demo" / "shards").mkdir(parents=True)
    (base / "runs" / "demo" / "shards" / "val").symlink_to(penn_fudan_shards)
    version = register_champion(base, penn_fudan_maskrcnn["uri"], penn_fudan_maskrcnn["arch"])

    temp_dir = Path(f"/tmp/mf-cluster-{os.getpid()}")  # short: Ray's socket paths must stay under 108 characters
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING"))}
    env.update(HOME=str(tmp_path / "home"),  # the token lands in <HOME>/.ray/auth_token, not the user's
               RAY_PORT=str(free_port()), RAY_DASHBOARD_PORT=str(free_port()), RAY_CLIENT_PORT=str(free_port()),
               RAY_AGENT_PORT=str(free_port()),
               RAY_TEMP_DIR=str(temp_dir), RAY_NUM_CPUS="2", MASKFLOW_BASE_DIR=str(base),
               MAKEFLAGS="")  # `make cluster` re-checks the venv stamp only

    def sh(line: str, timeout: float) -> subprocess.CompletedProcess:
        # Each README line in one shell that has eval'd the env line first, as a user's shell would have.
        script = f'eval "$(cluster/local.sh env)"\n{line}' if line != "make cluster" else line
        return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    started = time.monotonic()
    try:
        up = sh(lines[0], 180)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        assert (tmp_path / "home" / ".ray" / "auth_token").stat().st_size > 0
        job = sh(submit, 420)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
    finally:
        down = sh(lines[-1], 60)
    seconds = time.monotonic() - started
    assert down.returncode == 0, down.stderr
    leftover = subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"cluster processes left running: {leftover}"
    print(f"cluster start + documented submit + stop: {seconds:.0f} s")

    # The job ran with the project's interpreter, wrote where the relative path names under the base directory, and
    # logged its run into the base directory's MLflow database.
    out = base / "runs" / "cluster" / "proposals"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 60 and manifest["rejected"] == 0
    assert manifest["config"]["model"]["uri"] == f"models:/{MODEL_NAME}@champion"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{base}/runs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`maskflow.job` = 'proposals'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["maskflow.output"] == str(out)
    assert runs[0].data.metrics["samples"] == 60
    first = next(shard for shard in manifest["shards"] if shard["samples"])
    from maskflow import shards

    sample = shards.decode(next(shards.iter_shard(str(out / first["name"]))))
    assert sample["proposals.json"]["model"] == f"models:/{MODEL_NAME}/{version}"
