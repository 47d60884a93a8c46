"""Scheduled retraining (pipelines/retrain.py) end to end against the production shape of the tracking service: a real
`mlflow server` on loopback with a PostgreSQL backend store and S3 artifacts on the moto endpoint, the retraining's
state, status and lock on S3 too. The model is the cluttered-digit classifier (conf/retrain/hstn_cls.yaml), small
enough to train several times in a test.

Scenarios, in order (each builds on the registry the previous one left):
1. the first run trains, evaluates on the pinned set and promotes (no champion yet), with its lineage recorded;
2. a second run with no new data is a no-op in seconds;
3. new data appended: one run trains while a second one started at the same time finds the lock and stops; the
   first promotes only if it beats the champion by the margin;
4. a candidate that cannot learn, killed during training: started again it resumes the same training run, scores
   the champion again (its score came from another evaluation set), is evaluated and not promoted; the champion is
   untouched;
5. rollback from the command line puts the previous champion back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from maskflow import config, storage, tracking
from maskflow.storage import StorageOptions
from tests import servers
from tests.conftest import ROOT
from tests.test_hstn_train import stage_output

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # the end-to-end tier: make test-e2e
sys.path.insert(0, str(ROOT / "pipelines"))  # the pipeline scripts import _bootstrap as a sibling module

RETRAIN_CONFIG = ROOT / "conf" / "retrain" / "hstn_cls.yaml"


@pytest.fixture(scope="module")
def digit_sets(shared_data, tmp_path_factory) -> dict[str, str]:
    """Cluttered MNIST 40x40 as the cluttered-digits stage imports it: a first training set (256), data that
    arrives later (128), and the pinned evaluation set (128)."""
    from maskflow.stages.cluttered_digits import SCHEMA, ClutteredDigitsConfig, ClutteredDigitsStage

    npz = shared_data / "cluttered_mnist_40x40" / "cluttered_mnist_40x40_trainval.npz"
    root = tmp_path_factory.mktemp("retrain-digits")
    samples = {}
    for split in ("train", "valid"):
        cfg = config.build(ClutteredDigitsConfig, {
            "input": {"source": "import_npz", "uri": str(npz), "splits": [split]},
            "output": {"uri": "unused", "samples_per_shard": 384 if split == "train" else 128}})
        job = ClutteredDigitsStage(cfg)
        job.setup()
        samples[split] = list(job.process(job.plan().units[0]))
    return {"first": stage_output(root / "first", samples["train"][:256], "cluttered_digits", SCHEMA.name),
            "new": stage_output(root / "new", samples["train"][256:384], "cluttered_digits", SCHEMA.name),
            "valid": stage_output(root / "valid", samples["valid"][:128], "cluttered_digits", SCHEMA.name)}


@pytest.fixture(scope="module")
def production_tracking(s3_endpoint, tmp_path_factory):
    """`mlflow server` with a PostgreSQL backend store and S3 artifacts (moto), as cluster/mlflow.yaml runs it;
    yields (tracking URL, bucket, storage options for the bucket)."""
    options = StorageOptions(endpoint_url=s3_endpoint, region="us-east-1")
    bucket = f"mf-retrain-{uuid.uuid4().hex[:8]}"
    storage.s3_client(options).create_bucket(Bucket=bucket)
    with servers.postgres_cluster() as database:
        with servers.mlflow_server(tmp_path_factory.mktemp("mlflow-pg"), database, f"s3://{bucket}/mlartifacts",
                                   {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}) as url:
            yield url, bucket, options


def overrides(digit_sets, url: str, bucket: str, endpoint: str, ckpt: Path, model: str, data: list[str],
              extra_train: list[str] = (), **top) -> list[str]:
    train = [f"data.val={digit_sets['valid']}", "loop.epochs=4", "loop.batch_size=32", "loop.torch_threads=1",
             "loop.log_every_steps=4", "scaling.cpus_per_worker=1", "optim.lr=0.003", f"run.storage_path={ckpt}",
             "data.shuffle_buffer=64", *extra_train]
    out = [f"model_name={model}", f"data=[{', '.join(data)}]", f"eval.data={digit_sets['valid']}",
           f"workdir=s3://{bucket}/retrain", f"storage.endpoint_url={endpoint}", f"tracking.tracking_uri={url}",
           "tracking.experiment=retrain-tests", "train.overrides=[" + ", ".join(train) + "]",
           "eval.predict.overrides=[compute.cpus_per_worker=1]", "promotion.margin=0.01",
           "train.config=conf/hstn/cls_cnn_cpu.yaml"]
    return out + [f"{k}={v}" for k, v in top.items()]


def run_in_process(argv: list[str]) -> dict:
    from pipelines.retrain import main

    return main(["--config", str(RETRAIN_CONFIG), *argv])


def start_subprocess(argv: list[str], log_path: Path) -> subprocess.Popen:
    """The retraining as a cron job would start it: its own process (and its own embedded Ray), its own session so
    that killing it takes its Ray processes with it."""
    env = {**os.environ, "MASKFLOW_LOG_LEVEL": "INFO"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "retrain.py"), "--config", str(RETRAIN_CONFIG),
                             *argv, "ray.num_cpus=2"], cwd=ROOT, env=env, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    started = time.monotonic()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}) first:\n{servers.log_tail(log, 40)}")
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s" + (f":\n{servers.log_tail(log, 40)}" if log else ""))
        time.sleep(0.5)


def read_json(uri: str, options: StorageOptions) -> dict:
    return json.loads(storage.read_text(uri, options))


def test_retraining_flow_against_postgres_and_s3(ray_local, digit_sets, production_tracking, tmp_path):
    import mlflow

    url, bucket, options = production_tracking
    endpoint = options.endpoint_url
    model = f"retrain-digits-{uuid.uuid4().hex[:6]}"
    workdir = f"s3://{bucket}/retrain/{model}"
    ckpt = tmp_path / "ckpt"
    first = overrides(digit_sets, url, bucket, endpoint, ckpt, model, [digit_sets["first"]])
    tracking.setup(tracking.TrackingConfig(tracking_uri=url, experiment="retrain-tests"))
    client = tracking.client()

    # 1. First run: trains, evaluates on the pinned set, promotes; lineage on the version, steps as child runs.
    status = run_in_process(first)
    assert status["result"] == "promoted", status
    assert [s["step"] for s in status["steps"]] == ["train", "score champion", "evaluate", "promote"]
    v1 = status["candidate_version"]
    version = client.get_model_version(model, v1)
    assert str(client.get_model_version_by_alias(model, "champion").version) == v1
    assert version.tags["maskflow.data_digest"] == status["data_digest"]
    assert version.tags["maskflow.eval_data_digest"] == status["eval_data_digest"]
    assert version.tags["maskflow.retrain_run_id"] == status["run_id"]
    assert version.tags["maskflow.code_version"] and version.tags["maskflow.kind"] == "hstn_cls"
    accuracy_v1 = float(version.tags["eval.accuracy"])
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{status['run_id']}'")
    assert {r.data.tags["maskflow.job"] for r in children} >= {"train-hstn_cls", "hstn_digit_predict", "evaluate-classification"}, \
        [r.data.tags.get("maskflow.job") for r in children]
    parent = client.get_run(status["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["maskflow.retrain_result"] == "promoted"
    assert read_json(f"{workdir}/status.json", options)["result"] == "promoted"
    # the artifacts went to S3 through the server
    assert storage.list_names(f"s3://{bucket}/mlartifacts", options)

    # 2. Nothing new: a no-op in seconds, no lock taken, champion untouched.
    t0 = time.monotonic()
    status = run_in_process(first)
    assert status["result"] == "nothing_new" and time.monotonic() - t0 < 30, status
    assert "champion v" + v1 in status["why"]

    # 3. New data appended; two runs at once: the one started second finds the lock and stops.
    both = overrides(digit_sets, url, bucket, endpoint, ckpt, model, [digit_sets["first"], digit_sets["new"]])
    log_a = tmp_path / "retrain-a.log"
    proc = start_subprocess(both, log_a)
    try:
        wait_for(lambda: storage.exists(f"{workdir}/retrain.lock", options), 240, "the first run's lock", proc, log_a)
        status_b = run_in_process(both)
        assert status_b["result"] == "locked", status_b
        assert proc.wait(timeout=420) == 0, servers.log_tail(log_a, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    status_a = read_json(f"{workdir}/status.json", options)
    assert status_a["result"] in ("promoted", "not_promoted"), status_a
    v2 = status_a["candidate_version"]
    accuracy_v2 = float(client.get_model_version(model, v2).tags["eval.accuracy"])
    assert client.get_model_version(model, v2).tags["maskflow.parent_version"] == v1
    should_promote = accuracy_v2 > accuracy_v1 + 0.01
    assert (status_a["result"] == "promoted") == should_promote, (accuracy_v1, accuracy_v2, status_a)
    champion = str(client.get_model_version_by_alias(model, "champion").version)
    assert champion == (v2 if should_promote else v1)
    summary = servers.log_tail(log_a, 3)
    assert f"retrain {model}: {status_a['result']}" in summary, summary

    # 4. A candidate that cannot learn (lr 1e-9), forced on the same data, killed once its first checkpoint exists;
    #    started again it resumes that training run, evaluates, and is not promoted. The champion's score is made to
    #    look as if it came from another evaluation set: the run scores the champion again first.
    client.set_model_version_tag(model, champion, "maskflow.eval_data_digest", "another-evaluation-set")
    bad = overrides(digit_sets, url, bucket, endpoint, ckpt, model, [digit_sets["first"], digit_sets["new"]],
                    extra_train=["optim.lr=1e-9", "loop.epochs=4"], force="true")
    log_c = tmp_path / "retrain-c.log"
    proc = start_subprocess(bad, log_c)
    try:
        def checkpointed() -> bool:
            runs = [p for p in ckpt.glob(f"retrain-{model}-*") if p.is_dir()]
            newest = max(runs, key=lambda p: p.stat().st_mtime, default=None)
            return newest is not None and newest.name not in seen and any(newest.rglob("checkpoint_*"))

        seen = {p.name for p in ckpt.glob(f"retrain-{model}-*")}
        wait_for(checkpointed, 300, "the killed run's first checkpoint", proc, log_c)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = read_json(f"{workdir}/state.json", options)
    assert "train" not in state["done"] and not state.get("finished")
    status = run_in_process(bad)
    assert status["result"] == "not_promoted" and status.get("resumed"), status
    steps = {s["step"]: s["status"] for s in status["steps"]}
    assert steps == {"train": "ran", "score champion": "ran", "evaluate": "ran", "promote": "ran"}, steps
    assert client.get_model_version(model, champion).tags["maskflow.eval_data_digest"] == status["eval_data_digest"]
    v3 = status["candidate_version"]
    assert str(client.get_model_version_by_alias(model, "champion").version) == champion
    train_runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string=f"tags.`maskflow.train_name` = 'retrain-{model}-{state['attempt']}'")
    assert len(train_runs) == 1  # the killed attempt's training run, resumed
    assert client.get_model_version(model, v3).run_id == train_runs[0].info.run_id
    assert state["parent_run_id"] == status["run_id"]  # the same parent run, continued

    # 5. Roll back from the command line (after promoting v3 by hand, so there is something to roll back).
    from pipelines.models import main as models_main

    forced = models_main(["--tracking-uri", url, "--json", "promote", f"{model}/{v3}", "--force"])
    assert forced["previous_champion"] == champion
    back = models_main(["--tracking-uri", url, "--json", "rollback", model])
    assert back == {"model": model, "champion_version": champion, "rolled_back_version": v3}
    assert str(client.get_model_version_by_alias(model, "champion").version) == champion
    rows = models_main(["--tracking-uri", url, "--json", "versions", model])
    assert [r["version"] for r in rows] == [v1, v2, v3]
    assert rows[int(v3) - 1]["lineage"]["maskflow.rolled_back"]
