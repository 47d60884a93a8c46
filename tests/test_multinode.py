"""Two Ray nodes on loopback, started as a team starts them (`ray start --head`, then `ray start --address` on a second
node with resources of its own), jobs submitted as scripts that join the cluster (RAY_ADDRESS), token authentication
on; then the worker node is killed — all its processes, as when a machine is lost:

* during a 2-worker training with one worker per node (SPREAD): the run restarts from its last checkpoint on the node
  that is left and finishes, losing at most one checkpoint interval (measured: the epoch it resumed from against the
  checkpoints that existed when the node died);
* during a stage whose actors run on both nodes: the job finishes with a complete manifest, no sample missing and
  none written twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from maskflow import config, shards
from tests import servers
from tests.conftest import ROOT
from tests.test_hstn_train import stage_output

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # the end-to-end tier: make test-e2e

RAY = str(Path(sys.executable).parent / "ray")


class TwoNodes:
    """A head node and a worker node of one Ray cluster on this machine, each with its own ports and CPUs."""

    def __init__(self, head_cpus: int, worker_cpus: int):
        self.temp_dir = tempfile.mkdtemp(prefix="mf-2n-", dir="/tmp")  # short: socket paths < 108 characters
        self.port = servers.free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, RAY_USAGE_STATS_ENABLED="0")
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.worker: subprocess.Popen | None = None
        self.worker_port = 0

    def _node_ports(self) -> list[str]:
        return [f"--node-manager-port={servers.free_port()}", f"--object-manager-port={servers.free_port()}",
                f"--dashboard-agent-listen-port={servers.free_port()}",
                f"--dashboard-agent-grpc-port={servers.free_port()}", f"--metrics-export-port={servers.free_port()}",
                f"--runtime-env-agent-port={servers.free_port()}"]

    def start(self) -> "TwoNodes":
        head = subprocess.run(
            [RAY, "start", "--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}", "--resources",
             json.dumps({"head_node": 1}), f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
             f"--dashboard-port={servers.free_port()}",  # Ray Train's state queries go through it
             f"--ray-client-server-port={servers.free_port()}", "--disable-usage-stats", *self._node_ports()],
            env=self.env, capture_output=True, text=True, timeout=180)
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        self.start_worker()
        return self

    def start_worker(self) -> None:
        ports = self._node_ports()
        self.worker_port = int(ports[0].split("=")[1])
        self.worker = subprocess.Popen(
            [RAY, "start", f"--address=127.0.0.1:{self.port}", f"--num-cpus={self.worker_cpus}", "--resources",
             json.dumps({"worker_node": 1}), "--block", "--disable-usage-stats", *ports],
            env=self.env, stdout=open(os.path.join(self.temp_dir, "worker-node.log"), "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_nodes(2)

    def alive_nodes(self) -> int:
        status = subprocess.run([RAY, "status", f"--address=127.0.0.1:{self.port}"], env=self.env,
                                capture_output=True, text=True, timeout=60)
        active = re.search(r"Active:\s*\n((?:\s+\d+ node_\w+\n)+)", status.stdout)
        return len(active.group(1).strip().splitlines()) if active else 0

    def wait_nodes(self, count: int, timeout: float = 120) -> None:
        started = time.monotonic()
        while self.alive_nodes() < count:
            assert time.monotonic() - started < timeout, f"{count} nodes not up in {timeout} s"
            time.sleep(1)

    def kill_worker_node(self) -> None:
        """Every process of the worker node (its raylet, its Ray workers and the `ray start --block`), SIGKILL."""
        marker = f"{self.worker_port}"
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", f"node.manager.port={marker}"], capture_output=True,
                                               text=True).stdout.split()]
        os.killpg(self.worker.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.worker.wait()

    def run_script(self, argv: list[str], log: Path) -> subprocess.Popen:
        env = {**self.env, "RAY_ADDRESS": f"127.0.0.1:{self.port}", "MASKFLOW_LOG_LEVEL": "INFO"}
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """This cluster's processes only (by its temp dir, as cluster/local.sh stops its own): `ray stop` would also
        stop every other Ray on the machine, the test session's own included."""
        if self.worker is not None and self.worker.poll() is None:
            self.kill_worker_node()
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = [int(p) for p in subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True,
                                                   text=True).stdout.split() if int(p) != os.getpid()]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def two_nodes(request):
    head_cpus, worker_cpus = request.param
    cluster = TwoNodes(head_cpus, worker_cpus)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    started = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"{what}: the job exited ({proc.returncode}) first:\n{servers.log_tail(log, 40)}")
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s:\n{servers.log_tail(log, 40)}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def digits(shared_data, tmp_path_factory) -> dict[str, str]:
    from maskflow.stages.cluttered_digits import SCHEMA, ClutteredDigitsConfig, ClutteredDigitsStage

    npz = shared_data / "cluttered_mnist_40x40" / "cluttered_mnist_40x40_trainval.npz"
    root = tmp_path_factory.mktemp("mn-digits")
    out = {}
    for split, count in (("train", 1024), ("valid", 128)):
        cfg = config.build(ClutteredDigitsConfig, {"input": {"source": "import_npz", "uri": str(npz), "splits": [split]},
                                                   "output": {"uri": "unused", "samples_per_shard": count}})
        job = ClutteredDigitsStage(cfg)
        job.setup()
        out[split] = stage_output(root / split, list(job.process(job.plan().units[0])), "cluttered_digits",
                                  SCHEMA.name, per_shard=128)
    return out


@pytest.mark.parametrize("two_nodes", [(3, 2)], indirect=True)  # head: 2 workers + the data reads after the loss
def test_training_loses_a_node_and_resumes_from_its_last_checkpoint(two_nodes, digits, tmp_path):
    ckpt, name = tmp_path / "ckpt", "two-node-digits"
    log = tmp_path / "train.log"
    proc = two_nodes.run_script([
        "trainers/hstn.py", "--config", "conf/hstn/cls_cnn_cpu.yaml", f"data.train={digits['train']}",
        f"data.val={digits['valid']}", "loop.epochs=8", "loop.batch_size=16", "loop.torch_threads=1",
        "loop.log_every_steps=16", "scaling.workers=2", "scaling.cpus_per_worker=1", "scaling.placement_strategy=SPREAD",
        f"run.storage_path={ckpt}", f"run.name={name}", "run.max_failures=2",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "data.shuffle_buffer=64"], log)
    done = re.compile(r"\[hstn_cls\] epoch (\d+)/8 done \(step (\d+)\)")
    try:
        def epochs_done() -> int:
            return len({int(e) for e, _ in done.findall(log.read_text(errors="replace"))})

        wait_for(lambda: epochs_done() >= 1 and any((ckpt / name).glob("checkpoint_*")), 300,
                 "the first checkpoint", proc, log)
        time.sleep(2)  # the checkpoint registered with the controller, the next epoch under way
        at_kill, killed_at = epochs_done(), time.monotonic()
        two_nodes.kill_worker_node()
        assert proc.wait(timeout=420) == 0, servers.log_tail(log, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    resumed = re.findall(r"rank \d+ resumed from epoch (\d+) \(step (\d+)\)", text)
    assert resumed, "the run did not resume from a checkpoint:\n" + servers.log_tail(log, 60)
    resumed_epoch, resumed_step = min((int(e), int(s)) for e, s in resumed)
    # epochs are 1-based in the progress lines; "resumed from epoch k" is the 0-based epoch it restarts: k epochs were
    # kept. Lost: the epochs finished but not yet checkpointed when the node died (0 here) + the one in flight.
    lost_epochs = at_kill - resumed_epoch
    print(f"node lost after {at_kill} finished epoch(s) (~32 steps each); resumed at epoch {resumed_epoch + 1} from "
          f"step {resumed_step}: {lost_epochs} finished epoch(s) lost + the one in flight (< 1 checkpoint interval); "
          f"finished {time.monotonic() - killed_at:.0f} s after the loss")
    assert 0 <= lost_epochs <= 1, (at_kill, resumed)
    assert {int(e) for e, _ in done.findall(text)} == set(range(1, 9))  # every epoch ran to the end
    assert "registered maskflow-hstn-cls-cnn version 1" in text


@pytest.mark.parametrize("two_nodes", [(2, 2)], indirect=True)  # 1 actor a node; both fit on the head after the loss
def test_stage_loses_a_node_and_still_writes_every_sample_once(two_nodes, penn_fudan_coco, tmp_path):
    from maskflow.storage import DEFAULT_OPTIONS
    from tests.test_ingest import run_ingest

    images = tmp_path / "images"
    run_ingest(*penn_fudan_coco, str(images), DEFAULT_OPTIONS, per_shard=4)  # 15 units of 4 photographs
    out, log = tmp_path / "pairs", tmp_path / "pairs.log"
    proc = two_nodes.run_script([
        "pipelines/affine_pairs.py", "--config", "conf/affine_pairs/sfnet.yaml", f"input.shards={images}",
        f"output.uri={out}", "pairs.per_image=6", "compute.workers=2", "compute.cpus_per_worker=1",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"], log)
    try:
        def records() -> list[dict]:
            return [json.loads(p.read_text()) for p in out.glob("shard-*.json")] if out.exists() else []

        wait_for(lambda: len({r.get("node") for r in records()}) >= 2, 300, "shards from both nodes", proc, log)
        two_nodes.kill_worker_node()
        finished_at_kill = len(records())
        assert not (out / shards.MANIFEST).exists(), "the job finished before the node was lost: nothing tested"
        assert proc.wait(timeout=420) == 0, servers.log_tail(log, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    manifest = shards.read_manifest(str(out))
    assert manifest["inputs"] == 60 and manifest["samples"] == 360 and len(manifest["shards"]) == 15
    keys = [s["__key__"] for s in shards.iter_samples(str(out))]
    assert len(keys) == len(set(keys)) == 360
    assert shards.verify(str(out)) == []
    assert len({r["node"] for r in records()}) == 2, "every shard came from one node"
    print(f"worker node lost with {finished_at_kill} of 15 shards written; the job finished on the head node: "
          f"{manifest['samples']} samples in {len(manifest['shards'])} shards, each key once")
