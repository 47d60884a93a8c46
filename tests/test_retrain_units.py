"""The parts of scheduled retraining that need no training: the lock on object storage (local and the S3 endpoint),
the data digest, every conf/retrain config checked, promotion with a margin, rollback and the registry command line on
the local sqlite backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from maskflow import config, storage, tracking
from maskflow.locks import Lease, LockHeld, LockLost
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "pipelines"))  # the pipeline scripts import _bootstrap as a sibling module


@pytest.fixture(params=["local", "s3"])
def lock_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "work" / "retrain.lock"), storage.DEFAULT_OPTIONS
    options = request.getfixturevalue("s3_options")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/retrain/model/retrain.lock", options


def test_lock_is_exclusive_expires_and_is_taken_over(lock_uri):
    uri, options = lock_uri
    first = Lease(uri, 60, "retraining of m", options)
    first.acquire()
    second = Lease(uri, 60, "retraining of m", options)
    with pytest.raises(LockHeld, match=r"retraining of m is locked by .* pid \d+ since .* until"):
        second.acquire()
    first.verify()
    first.renew()
    first.release()
    assert not storage.exists(uri, options)
    with second:  # free again
        assert storage.exists(uri, options)
        second.verify()
    # an expired lock is taken over, and its old holder learns it lost it (it must not promote)
    stale = Lease(uri, 0.2, "retraining of m", options)
    stale.acquire()
    time.sleep(0.4)
    taker = Lease(uri, 60, "retraining of m", options)
    taker.acquire()
    with pytest.raises(LockLost):
        stale.verify()
    stale.release()  # not its lock any more: left alone
    taker.verify()
    taker.release()


def test_lock_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    uri = str(tmp_path / "retrain.lock")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    import socket

    storage.write_text(uri, json.dumps({"owner": "x", "host": socket.gethostname(), "pid": pid,
                                        "acquired": time.time(), "expires": time.time() + 3600}))
    lease = Lease(uri, 60, "retraining of m")
    lease.acquire()  # the holder's process is gone: no need to wait an hour
    assert lease.read()["owner"] == lease.owner and lease.read()["pid"] == os.getpid()
    lease.release()
    assert not storage.exists(uri)


def test_data_digest_follows_content_not_order_or_location(tmp_path):
    from maskflow import shards
    from maskflow.retrain import data_digest

    def output(name: str, payloads: list[bytes]) -> str:
        root = tmp_path / name
        root.mkdir()
        records = [shards.write_shard(str(root / shards.shard_name(i)), [{"__key__": f"k{i}", "x.bin": p}])
                   for i, p in enumerate(payloads)]
        (root / shards.MANIFEST).write_text(json.dumps({"schema": "x/1", "samples": len(payloads),
                                                        "shards": records}))
        return str(root)

    a, b = output("a", [b"1", b"2"]), output("b", [b"3"])
    same_as_a = output("a-copy", [b"1", b"2"])
    d = data_digest([a, b], storage.DEFAULT_OPTIONS)
    assert data_digest([b, a], storage.DEFAULT_OPTIONS)["digest"] == d["digest"]  # order-independent
    assert data_digest([same_as_a, b], storage.DEFAULT_OPTIONS)["digest"] == d["digest"]  # a copy elsewhere
    changed = output("a-changed", [b"1", b"2!"])
    assert data_digest([changed, b], storage.DEFAULT_OPTIONS)["digest"] != d["digest"]
    appended = output("c", [b"4"])
    assert data_digest([a, b, appended], storage.DEFAULT_OPTIONS)["digest"] != d["digest"]
    assert [i["shards"] for i in d["inputs"]] == [2, 1]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "retrain").glob("*.yaml")))
def test_every_retrain_config_checks(name, capsys):
    from pipelines.retrain import main

    assert main(["--config", str(ROOT / "conf" / "retrain" / f"{name}.yaml"), "--check"]) == {"result": "checked"}
    out = capsys.readouterr().out
    assert out.count("config ok") >= 3 and "retrain config ok" in out


def test_retrain_config_errors_are_one_line():
    from maskflow.retrain import RetrainConfig

    base = config.load_yaml(str(ROOT / "conf" / "retrain" / "maskrcnn.yaml"))
    with pytest.raises(config.ConfigError, match=r"^train: required: a trainer"):
        config.build(RetrainConfig, {**base, "train": {"script": "pipelines/proposals.py"}})
    with pytest.raises(config.ConfigError, match=r"^promotion.margin: must be >= 0"):
        config.build(RetrainConfig, {**base, "promotion": {"margin": -1}})
    from pipelines.retrain import main

    with pytest.raises(config.ConfigError, match=r"^train \(trainers/maskrcnn.py .*\): loop.epochs"):
        main(["--config", str(ROOT / "conf" / "retrain" / "maskrcnn.yaml"), "train.overrides=[loop.epochs=0]",
              "--check"])


def _register_tiny(name: str, values: list[float]) -> list[str]:
    """Versions of a tiny registered model with an evaluation recorded on each (no training needed)."""
    import mlflow
    import torch

    versions = []
    for value in values:
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(torch.nn.Linear(1, 1), name="model", serialization_format="pickle")
        version = tracking.register_logged_model(info.model_uri, name, kind="hstn_cls")
        tracking.record_evaluation(name, version, {"accuracy": value}, metric="accuracy", higher_is_better=True)
        versions.append(version)
    return versions


def test_promotion_margin_champion_history_rollback_and_the_command_line(tracking_cfg, capsys):
    from pipelines.models import main as models

    tracking.setup(tracking_cfg)
    uri = tracking_cfg.tracking_uri
    v1, v2, v3 = _register_tiny("digits", [0.50, 0.505, 0.60])
    assert tracking.promote("digits", version=v1)["promoted"]
    assert not tracking.promote("digits", version=v2, margin=0.01)["promoted"]  # better, but not by the margin
    decision = tracking.promote("digits", version=v3, margin=0.01)
    assert decision["promoted"] and decision["champion_version"] == v1
    assert tracking.client().get_model_version("digits", v3).tags["maskflow.previous_champion"] == v1

    rows = models(["--tracking-uri", uri, "--json", "versions", "digits"])
    assert [(r["version"], r["aliases"], r["value"]) for r in rows] == \
        [(v1, [], 0.5), (v2, [], 0.505), (v3, ["candidate", "champion"], 0.6)]
    listed = models(["--tracking-uri", uri, "list"])
    assert listed == [{"name": "digits", "versions": 3, "kind": "hstn_cls",
                       "aliases": {"candidate": v3, "champion": v3},
                       "champion": {"version": v3, "metric": "accuracy", "value": 0.6}}]
    shown = models(["--tracking-uri", uri, "show", "models:/digits@champion"])
    assert shown["version"] == v3 and shown["tags"]["maskflow.previous_champion"] == v1
    assert "load with: models:/digits/3" in capsys.readouterr().out

    assert models(["--tracking-uri", uri, "--json", "rollback", "digits"]) == \
        {"model": "digits", "champion_version": v1, "rolled_back_version": v3}
    with pytest.raises(config.ConfigError, match="nothing to roll back to"):
        models(["--tracking-uri", uri, "rollback", "digits"])  # v1 was the first champion
    forced = models(["--tracking-uri", uri, "--json", "promote", "digits/2", "--force"])
    assert forced["previous_champion"] == v1 and str(tracking.model_version_for_alias("digits", "champion").version) == v2
    with pytest.raises(config.ConfigError, match="has no version 9"):
        models(["--tracking-uri", uri, "show", "digits/9"])


def test_models_command_line_in_a_shell(tracking_cfg):
    """As a user types it: one line on an error, exit 2."""
    tracking.setup(tracking_cfg)
    done = subprocess.run([sys.executable, str(ROOT / "pipelines" / "models.py"), "--tracking-uri",
                           tracking_cfg.tracking_uri, "show", "nope@champion"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: model: no registered model 'nope' (see: python "
                                                "pipelines/models.py list)"]


def test_what_is_new_names_the_new_inputs():
    from types import SimpleNamespace

    from maskflow.retrain import what_is_new

    a, b = {"uri": "/a", "digest": "a" * 64, "shards": 2}, {"uri": "/b", "digest": "b" * 64, "shards": 1}
    champion = SimpleNamespace(version="3", tags={"maskflow.data": json.dumps({"/a": "a" * 16, "/old": "c" * 16})})
    assert what_is_new(champion, {"inputs": [a, b]}) == \
        "against champion v3: 1 new or changed input(s) (/b (1 shards)), 1 input(s) gone; training on 2 input(s), 3 shards"
    assert what_is_new(None, {"inputs": [a]}) == "no champion yet: training on 1 input(s), 2 shards"
