"""The stage harness: every Ray Data job that writes samples into WebDataset shards runs through :func:`run_stage`.

A stage plugs in three things (see :class:`Stage`):

* ``plan()`` on the driver: the deterministic list of :class:`WorkUnit` (one per output shard, each naming its
  inputs: image records, an input shard...) plus inputs rejected while planning;
* ``setup()`` once per worker actor (load a model, open a dataset);
* ``process(unit)`` in the actor: yields samples (``{"__key__": ..., suffix: value}``), :class:`Reject` and
  :class:`Count` items.

The harness gives every stage the same guarantees:

* deterministic shard names (``shard-000012.tar``) and contents; each shard written atomically, so no partial shard
  is ever visible; a record (``shard-000012.json``) written after each shard marks it finished;
* resume: a re-run with the same output skips finished shards; a re-run over complete output (manifest present, same
  plan) is a no-op; an output holding a *different* job's manifest is refused;
* rejected inputs with their reasons go to ``rejects.jsonl`` next to the shards, are counted and logged;
* the manifest (per-shard sample counts and checksums, totals, config, code version) is written last;
* the work runs as Ray Data ``map_batches`` over an actor pool (one GPU per actor when the stage wants one and the
  cluster has them), with per-shard progress logged;
* one MLflow run per job with its config, counts, throughput, manifest and rejects.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from maskflow import shards, storage, tracking
from maskflow.config import JobFailed, Uri, require
from maskflow.data.schema import SampleSchema
from maskflow.runtime import Common, format_seconds
from maskflow.storage import DEFAULT_OPTIONS, StorageError, StorageOptions
from maskflow.tracking import TrackingConfig

log = logging.getLogger(__name__)


@dataclass
class OutputConfig:
    uri: Uri = ""
    samples_per_shard: int = 64  # target shard size in samples (the unit of resume)

    def validate(self) -> None:
        require(bool(self.uri), "uri", "required: where the shards go (local path or s3://bucket/prefix)")
        require(self.samples_per_shard > 0, "samples_per_shard", "must be positive")


@dataclass
class ComputeConfig:
    workers: int = 1  # actors in the pool
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the stage can use a GPU and the cluster has GPUs, else 0
    memory_per_worker_gb: float | None = None  # Ray memory reservation for heavy workers (models)
    unit_retries: int = 2  # re-runs of a unit whose worker process died (crash, OOM) before it is marked failed

    def validate(self) -> None:
        require(self.workers >= 1, "workers", "must be at least 1")
        require(self.unit_retries >= 0, "unit_retries", "must be >= 0")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")
        require(self.gpus_per_worker is None or self.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0")


@dataclass
class StageJobConfig(Common):
    """The blocks every stage job's config has; a stage's config adds its ``input`` and settings."""

    output: OutputConfig = field(default_factory=OutputConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)


@dataclass
class WorkUnit:
    index: int  # output shard index
    items: list[Any]  # picklable descriptions of the inputs (records, shard URIs...)
    source: str = ""  # human-readable origin, for logs
    expected_inputs: int | None = None  # inputs in the unit when items are containers (an input shard); else len(items)

    @property
    def num_inputs(self) -> int:
        return self.expected_inputs if self.expected_inputs is not None else len(self.items)

    def fingerprint(self) -> str:
        return hashlib.sha256(pickle.dumps((self.index, self.items), protocol=4)).hexdigest()[:16]


@dataclass
class Reject:
    key: str  # the rejected input's id (image id, annotation id, file name...)
    reason: str
    kind: str = "sample"  # "sample" rejects count against inputs; others ("annotation") are finer-grained
    source: str = ""

    def to_dict(self) -> dict:
        return {"key": self.key, "kind": self.kind, "reason": self.reason, "source": self.source}


@dataclass
class Count:
    """A stage-specific counter increment (e.g. annotations written), summed into the manifest."""

    name: str
    value: int = 1


@dataclass
class Plan:
    units: list[WorkUnit]
    rejects: list[Reject] = field(default_factory=list)  # inputs rejected while planning


class Stage(abc.ABC):
    """Base class of a shard-writing stage. Subclasses are pickled to the workers: keep heavy state out of __init__."""

    name = "stage"
    wants_gpu = False  # True for model-inference stages
    schema: "SampleSchema | None" = None  # what every sample of this stage holds (checked as it is written)
    # Its job config (a StageJobConfig), for generic scripts that pick the stage at run time (pipelines/predict.py):
    # an inference stage is built as ``cls(config, options, tracking_uri)``.
    config_class: "type | None" = None

    def __init__(self, cfg: StageJobConfig | None = None, options: StorageOptions = DEFAULT_OPTIONS):
        self.cfg, self.options = cfg, options

    @abc.abstractmethod
    def plan(self) -> Plan:
        """Driver side: the deterministic work units, and inputs rejected while planning."""

    def setup(self) -> None:
        """Runs once in each worker actor before any unit (load models here)."""

    @abc.abstractmethod
    def process(self, unit: WorkUnit) -> Iterator[dict | Reject | Count]:
        """Worker side: the samples of one unit, plus its rejects and counts."""

    def fingerprint_config(self) -> Any:
        """What, besides the plan, determines the output (changing it makes old output incompatible)."""
        return {}

    def contact_sheet(self, samples: list[dict]):
        """A picture (H x W x 3 uint8) of a few decoded output samples, logged to the job's MLflow run; None: none."""
        return None


LACKS_IMAGE_OR_META = "sample lacks its image or json entry"
LACKS_LISTED_SAMPLE = "input shard lacks a sample its manifest lists"
INPUT_SHARD_MISSING = "input shard missing"
UNLISTED_SAMPLE = "sample not listed in its input shard's manifest"
CHECKSUM_MISMATCH = "checksum mismatch"  # a sample whose bytes differ from its manifest's sample_sha256


@dataclass
class InputShard:
    """One shard of another stage's output, as a unit's input: where it is and the keys its manifest lists."""

    uri: str
    keys: list[str] | None  # None: an older manifest without keys (then only the count is known)
    samples: int
    origin: int = 0  # position of its stage output among the inputs a stage was given
    sample_sha256: list[str] | None = None  # parallel to keys (shards.sample_digest); None: an older manifest


def read_input_manifest(shards_uri: str, options: StorageOptions = DEFAULT_OPTIONS, what: str = "input.shards",
                        expect: SampleSchema | None = None) -> dict:
    """The manifest of a finished stage output that a stage reads; fails fast (one line) if the output is unfinished
    or holds another kind of sample."""
    from maskflow.data.schema import check_manifest_schema

    storage.check_uri(storage.join(shards_uri, shards.MANIFEST), for_write=False, options=options,
                      what=f"{what} (manifest)")
    manifest = shards.read_manifest(shards_uri, options)
    if expect is not None:
        check_manifest_schema(manifest, expect, what)
    return manifest


def input_shards(shards_uri: str, options: StorageOptions = DEFAULT_OPTIONS, what: str = "input.shards",
                 expect: SampleSchema | None = None) -> list[InputShard]:
    """The non-empty shards of a finished stage output, in order, with the keys each should hold."""
    manifest = read_input_manifest(shards_uri, options, what, expect)
    return [InputShard(storage.join(shards_uri, rec["name"]), rec.get("keys"), rec["samples"],
                       sample_sha256=rec.get("sample_sha256"))
            for rec in manifest["shards"] if rec["samples"] > 0]


def plan_shard_units(shards_uris: str | list[str], options: StorageOptions = DEFAULT_OPTIONS,
                     what: str = "input.shards", expect: SampleSchema | None = None) -> Plan:
    """For stages that read other stages' output: one unit per non-empty input shard (output shard i <- the i-th
    input shard over all inputs, in order), each expecting that shard's samples. Fails fast if an input is unfinished
    or holds another kind of sample (``expect``)."""
    uris = [shards_uris] if isinstance(shards_uris, str) else list(shards_uris)
    units = []
    for origin, uri in enumerate(uris):
        for shard in input_shards(uri, options, what, expect):
            shard.origin = origin
            units.append(WorkUnit(len(units), [shard], source=shard.uri, expected_inputs=shard.samples))
    return Plan(units)


def iter_input_shard(shard: InputShard, options: StorageOptions = DEFAULT_OPTIONS) -> Iterator[dict | Reject]:
    """The samples of one input shard, checked against its manifest: every listed key that does not arrive (shard
    missing, truncated or corrupt, sample absent) becomes a :class:`Reject` with the reason, so the counts add up
    and the rest of the job goes on. Samples the manifest does not list are skipped (kind ``unlisted``). Where the
    manifest has per-sample checksums (``sample_sha256``), each sample is checked before it is yielded: one whose
    bytes differ is a reject naming the shard and the key (:data:`CHECKSUM_MISMATCH`), never handed to a decoder."""
    import tarfile

    listed = None if shard.keys is None else set(shard.keys)
    digests = (dict(zip(shard.keys, shard.sample_sha256))
               if shard.keys is not None and shard.sample_sha256 is not None
               and len(shard.sample_sha256) == len(shard.keys) else None)
    name = storage.basename(shard.uri)
    seen: set[str] = set()
    problem = LACKS_LISTED_SAMPLE
    try:
        for sample in shards.iter_shard(shard.uri, options):
            key = sample["__key__"]
            if listed is not None and key not in listed:
                yield Reject(key, UNLISTED_SAMPLE, kind="unlisted", source=shard.uri)
                continue
            if key in seen:
                continue  # a duplicated member: the first copy counts
            seen.add(key)
            if digests is not None and shards.sample_digest(shards.sample_entries(sample)) != digests[key]:
                yield Reject(key, f"{CHECKSUM_MISMATCH}: sample {key} in {name} differs from its manifest "
                                  "(damaged data)", source=shard.uri)
                continue
            yield sample
    except FileNotFoundError:
        problem = INPUT_SHARD_MISSING
    # Damaged data rejects what it lost; an I/O error (network...) is not caught: it fails the unit, and a re-run
    # retries it rather than writing off samples that are fine.
    except (tarfile.ReadError, UnicodeDecodeError) as e:
        problem = f"input shard unreadable after {len(seen)} samples: {type(e).__name__}: {e}"
    if listed is not None:
        for key in shard.keys:
            if key not in seen:
                yield Reject(key, problem, source=shard.uri)
    elif len(seen) < shard.samples:  # no keys to name: one reject per sample we know is missing
        for n in range(len(seen), shard.samples):
            yield Reject(f"{name}#{n}", problem, source=shard.uri)


def iter_unit_shards(unit: WorkUnit, options: StorageOptions = DEFAULT_OPTIONS) -> Iterator[dict | Reject]:
    """Every sample (or reject) of a unit made by :func:`plan_shard_units`."""
    for shard in unit.items:
        yield from iter_input_shard(shard, options)


# --------------------------------------------------------------------------------------------- worker side


def process_unit(stage: Stage, unit: WorkUnit, output_uri: str, job_fingerprint: str, options: StorageOptions) -> dict:
    """Run one unit: write its shard (if any sample survived), then its record. Returns the record."""
    samples: list[dict] = []
    rejects: list[dict] = []
    counts: dict[str, int] = {}
    started = time.perf_counter()
    for item in stage.process(unit):
        if isinstance(item, Reject):
            rejects.append(item.to_dict())
        elif isinstance(item, Count):
            counts[item.name] = counts.get(item.name, 0) + item.value
        else:
            if stage.schema is not None:
                problems = stage.schema.problems(item)
                if problems:  # a bug in the stage, not bad input: fail the job rather than write off-schema shards
                    raise ValueError(f"[{stage.name}] sample {item.get('__key__')} breaks {stage.schema.name}: "
                                     + "; ".join(problems))
            samples.append(item)
    name = shards.shard_name(unit.index)
    if samples:
        record = shards.write_shard(storage.join(output_uri, name), samples, options)
    else:  # every input rejected: nothing to write, but the unit is finished
        record = {"name": name, "samples": 0, "keys": [], "sample_sha256": [], "bytes": 0, "sha256": ""}
    record.update(
        index=unit.index,
        inputs=unit.num_inputs,
        rejects=rejects,
        counts=counts,
        unit_fingerprint=unit.fingerprint(),
        job_fingerprint=job_fingerprint,
        seconds=round(time.perf_counter() - started, 3),
        node=_node_id(),
    )
    storage.write_text(storage.join(output_uri, shards.record_name(unit.index)), json.dumps(record), options)
    return record


def _node_id() -> str | None:
    """The Ray node that made a shard (which node of a cluster wrote what; None outside Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


class _UnitWorker:
    """Ray Data actor: sets the stage up once, then turns each incoming unit into a shard.

    A unit that raises (a bug, an I/O error) comes back as a failed record with a one-line reason, and the actor goes
    on with the next unit. A unit whose process dies (a crash in native code, out of memory) is retried by Ray on a
    restarted actor; the attempt counter bounds that: past ``unit_retries`` re-runs it comes back as failed too. One
    bad unit never takes the job down nor retries forever, and a re-run of the job retries it."""

    def __init__(self, stage: Stage, output_uri: str, job_fingerprint: str, options: StorageOptions, attempts,
                 unit_retries: int):
        self.stage, self.output_uri, self.job_fingerprint, self.options = stage, output_uri, job_fingerprint, options
        self.attempts, self.unit_retries = attempts, unit_retries
        self.stage.setup()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        records = []
        for payload in batch["unit"]:
            unit = pickle.loads(payload)
            attempt = ray.get(self.attempts.begin.remote(unit.index))
            if attempt > self.unit_retries + 1:
                record = {"index": unit.index, "source": unit.source,
                          "failed": f"its worker died {attempt - 1} times while processing it (a crash in native code "
                                    "or out of memory: see the Ray worker logs)"}
            else:
                try:
                    record = process_unit(self.stage, unit, self.output_uri, self.job_fingerprint, self.options)
                except Exception as e:  # noqa: BLE001 - reported per unit on the driver; the other units go on
                    record = {"index": unit.index, "failed": one_line_error(e), "source": unit.source}
            records.append(json.dumps(record))
        return {"record": np.array(records, dtype=object)}


class _AttemptCounter:
    """A small Ray actor on the driver's side of a stage run: how often each unit has been started. It outlives the
    worker actors, so it counts the attempts that ended in a crash."""

    def __init__(self):
        self.attempts: dict[int, int] = {}

    def begin(self, index: int) -> int:
        self.attempts[index] = self.attempts.get(index, 0) + 1
        return self.attempts[index]


def one_line_error(e: BaseException) -> str:
    """``Type: first line of the message``, for logs and failure records."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# --------------------------------------------------------------------------------------------- driver side


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5).stdout
        return (sha or "unknown") + ("-dirty" if sha and dirty.strip() else "")
    except Exception:
        return "unknown"


def job_fingerprint(stage: Stage, plan: Plan) -> str:
    h = hashlib.sha256()
    h.update(stage.name.encode())
    h.update(json.dumps(stage.fingerprint_config(), sort_keys=True, default=str).encode())
    for unit in plan.units:
        h.update(unit.fingerprint().encode())
    return h.hexdigest()[:20]


def _finished_records(output_uri: str, fingerprint: str, options: StorageOptions) -> dict[int, dict]:
    done = {}
    for name in storage.list_names(output_uri, options):
        if not (name.startswith("shard-") and name.endswith(".json")):
            continue
        rec = json.loads(storage.read_text(storage.join(output_uri, name), options))
        if rec.get("job_fingerprint") == fingerprint:
            done[rec["index"]] = rec
    return done


def _resources(stage: Stage, compute: ComputeConfig) -> dict:
    from maskflow.runtime import cluster_has_gpus

    gpus = compute.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if stage.wants_gpu and cluster_has_gpus() else 0.0
    res: dict[str, Any] = {"num_cpus": compute.cpus_per_worker, "num_gpus": gpus}
    if compute.memory_per_worker_gb:
        res["memory"] = int(compute.memory_per_worker_gb * (1 << 30))
    return res


def _execute(stage: Stage, units: list[WorkUnit], output_uri: str, fingerprint: str, compute: ComputeConfig,
             options: StorageOptions) -> Iterator[dict]:
    import ray

    items = [{"index": u.index, "unit": pickle.dumps(u, protocol=4)} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Whatever still escapes a unit drops that unit only: the driver records every unit without a record as failed.
    ds.context.max_errored_blocks = -1
    attempts = ray.remote(num_cpus=0)(_AttemptCounter).remote()
    ds = ds.map_batches(
        _UnitWorker,
        fn_constructor_kwargs=dict(stage=stage, output_uri=output_uri, job_fingerprint=fingerprint, options=options,
                                   attempts=attempts, unit_retries=compute.unit_retries),
        batch_size=1,
        # A fixed pool: every actor starts at once (an autoscaling pool from 1 adds the second only after a queue
        # builds up, which on a short job costs most of its start-up again).
        compute=ray.data.ActorPoolStrategy(size=min(compute.workers, len(units))),
        **_resources(stage, compute),
    )
    for row in ds.iter_rows():
        yield json.loads(row["record"])


class StageFailed(JobFailed):
    """Some units of a stage failed; the others are written. ``str(e)`` is one line naming them."""


def run_stage(
    stage: Stage,
    output: OutputConfig,
    compute: ComputeConfig,
    tracking_cfg: TrackingConfig | None,
    job_config: Any,
    options: StorageOptions = DEFAULT_OPTIONS,
    ray_cfg: Any = None,
) -> dict:
    """Plan, resume, execute, and seal a stage's output with its manifest. Returns the manifest.

    Inputs and output are checked (and the plan made) before Ray starts, so a bad URI, a missing bucket or bad
    credentials fail in seconds with one line.
    """
    uri = output.uri
    storage.check_uri(uri, for_write=True, options=options, what="output.uri")
    plan = stage.plan()
    fingerprint = job_fingerprint(stage, plan)

    existing = shards.try_read_manifest(uri, options)
    if existing is not None:
        if existing.get("job_fingerprint") == fingerprint:
            log.info("[%s] %s is already complete (%d samples in %d shards): nothing to do",
                     stage.name, uri, existing["samples"], len(existing["shards"]))
            return existing
        raise StorageError(
            f"output.uri: {uri} already holds the finished output of a different job or config; choose a new output"
        )
    stale = storage.remove_stale_temporaries(uri)
    if stale:
        log.info("[%s] removed %d temporary files left by an interrupted run", stage.name, stale)
    done = _finished_records(uri, fingerprint, options)
    pending = [u for u in plan.units if u.index not in done]
    if pending:
        from maskflow.runtime import RayConfig, init_ray

        init_ray(ray_cfg or RayConfig())
    log.info("[%s] %d shards planned, %d already finished, %d to do; %d inputs rejected while planning",
             stage.name, len(plan.units), len(done), len(pending), len(plan.rejects))
    reject_log = _RejectLog(stage.name, uri)
    reject_log.add([r.to_dict() for r in plan.rejects])

    run_ctx = tracking.job_run(tracking_cfg, stage.name, job_config, {"maskflow.output": uri}, options) \
        if tracking_cfg else contextlib.nullcontext()
    with run_ctx as run:
        started = time.perf_counter()
        records = dict(done)
        failed: dict[int, str] = {}
        progress = UnitProgress(stage.name, len(pending), sum(u.num_inputs for u in pending))
        with progress:
            for rec in _execute(stage, pending, uri, fingerprint, compute, options) if pending else []:
                if "failed" in rec:
                    failed[rec["index"]] = rec["failed"]
                    progress.failed(rec)
                    continue
                records[rec["index"]] = rec
                reject_log.add(rec["rejects"])
                progress.finished(rec)
        elapsed = time.perf_counter() - started
        for u in pending:
            if u.index not in records and u.index not in failed:
                failed[u.index] = "it produced no record (its task failed in Ray: see the Ray logs above)"
                log.error("[%s] %s (%s) failed: %s", stage.name, shards.shard_name(u.index), u.source or "-",
                          failed[u.index])
        if failed:
            _record_failures(uri, {u.index: u for u in plan.units}, failed, options)
            first = min(failed)
            raise StageFailed(
                f"[{stage.name}] {len(failed)} of {len(plan.units)} units failed, e.g. {shards.shard_name(first)} "
                f"({next(u.source for u in plan.units if u.index == first) or 'no source'}): {failed[first]}; the "
                f"other shards are written; re-run the same command to retry (failures: "
                f"{storage.join(uri, FAILED_UNITS)})")
        manifest = _seal(stage, plan, records, uri, fingerprint, job_config, options)
        if storage.exists(storage.join(uri, FAILED_UNITS), options):  # an earlier run's failures, all redone now
            storage.delete(storage.join(uri, FAILED_UNITS), options)
        metrics = {
            "inputs": manifest["inputs"],
            "samples": manifest["samples"],
            "rejected": manifest["rejected"],
            "shards": len(manifest["shards"]),
            "seconds": elapsed,
            "samples_per_s": progress.samples / max(elapsed, 1e-9),
            **{f"count.{k}": v for k, v in manifest["counts"].items()},
        }
        if run is not None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            mlflow.log_dict(manifest, "manifest.json")
            mlflow.log_text(storage.read_text(storage.join(uri, shards.REJECTS), options), "rejects.jsonl")
            _log_contact_sheet(stage, uri, options)
            manifest["mlflow_run_id"] = run.info.run_id
    log.info("[%s] done: %d inputs -> %d samples in %d shards, %d rejected (rejects: %s)", stage.name,
             manifest["inputs"], manifest["samples"], len(manifest["shards"]), manifest["rejected"],
             storage.join(uri, shards.REJECTS))
    return manifest


FAILED_UNITS = "failed_units.jsonl"


def _record_failures(uri: str, units: dict[int, WorkUnit], failed: dict[int, str], options: StorageOptions) -> None:
    """``failed_units.jsonl`` beside the shards: which units failed and why (replaced by the next run's)."""
    lines = [json.dumps({"index": i, "shard": shards.shard_name(i), "source": units[i].source, "reason": failed[i]})
             for i in sorted(failed)]
    storage.write_text(storage.join(uri, FAILED_UNITS), "\n".join(lines) + "\n", options)


class UnitProgress:
    """The driver's view of a running stage: one log line per finished shard (count, rate, ETA), and a tqdm bar
    over the inputs when stderr is a terminal (log lines print above it)."""

    def __init__(self, stage_name: str, units: int, inputs: int):
        self.stage_name, self.units, self.inputs = stage_name, units, inputs
        self.done_units = self.done_inputs = self.samples = self.rejected = 0
        self.started = time.perf_counter()
        self._bar = None
        self._redirect = None

    def __enter__(self) -> "UnitProgress":
        import sys

        if self.units and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=self.inputs, desc=f"[{self.stage_name}]", unit="input", dynamic_ncols=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(*exc)

    def _advance(self, inputs: int) -> str:
        self.done_units += 1
        self.done_inputs += inputs
        elapsed = time.perf_counter() - self.started
        if self._bar is not None:
            self._bar.set_postfix(samples=self.samples, rejected=self.rejected, refresh=False)
            self._bar.update(inputs)
        left = self.inputs - self.done_inputs
        eta = left * elapsed / max(self.done_inputs, 1)
        return f"{self.samples / max(elapsed, 1e-9):.1f} samples/s, ETA {format_seconds(eta)}"

    def finished(self, rec: dict) -> None:
        self.samples += rec["samples"]
        self.rejected += len(rec["rejects"])
        rate = self._advance(rec["inputs"])
        log.info("[%s] shard %d/%d %s: %d samples, %d rejected (%s)", self.stage_name, self.done_units, self.units,
                 rec["name"], rec["samples"], len(rec["rejects"]), rate)

    def failed(self, rec: dict) -> None:
        self._advance(0)
        log.error("[%s] %s (%s) failed: %s", self.stage_name, shards.shard_name(rec["index"]), rec.get("source") or "-",
                  rec["failed"])


CONTACT_SHEET_SAMPLES = 8


def _log_contact_sheet(stage: Stage, uri: str, options: StorageOptions) -> None:
    """Log the stage's picture of its first few samples as contact_sheet.png (a failure to draw never fails a job)."""
    import itertools

    import mlflow

    try:
        samples = list(itertools.islice(shards.iter_samples(uri, options), CONTACT_SHEET_SAMPLES))
        picture = stage.contact_sheet(samples) if samples else None
        if picture is not None:
            mlflow.log_image(picture, "contact_sheet.png")
    except Exception as e:  # noqa: BLE001 - a picture is a courtesy, the shards are the product
        log.warning("[%s] no contact sheet: %s: %s", stage.name, type(e).__name__, e)


class _RejectLog:
    """Logs each rejected input with its reason, up to a limit (the full list is always in rejects.jsonl)."""

    LIMIT = 50

    def __init__(self, stage_name: str, output_uri: str):
        self.stage_name, self.output_uri, self.count = stage_name, output_uri, 0

    def add(self, rejects: list[dict]) -> None:
        for r in rejects:
            self.count += 1
            if self.count <= self.LIMIT:
                log.warning("[%s] rejected %s %s: %s", self.stage_name, r["kind"], r["key"], r["reason"])
            elif self.count == self.LIMIT + 1:
                log.warning("[%s] more rejects: see %s", self.stage_name,
                            storage.join(self.output_uri, shards.REJECTS))


def _seal(stage: Stage, plan: Plan, records: dict[int, dict], uri: str, fingerprint: str, job_config: Any,
          options: StorageOptions) -> dict:
    """Write rejects.jsonl, then the manifest (last: its presence means the output is complete)."""
    from maskflow import config as config_lib

    ordered = [records[u.index] for u in plan.units]
    rejects = [r.to_dict() for r in plan.rejects] + [r for rec in ordered for r in rec["rejects"]]
    storage.write_text(storage.join(uri, shards.REJECTS), "".join(json.dumps(r) + "\n" for r in rejects), options)
    counts: dict[str, int] = {}
    for rec in ordered:
        for k, v in rec["counts"].items():
            counts[k] = counts.get(k, 0) + v
    by_kind: dict[str, int] = {}
    for r in rejects:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    unit_inputs = sum(rec["inputs"] for rec in ordered)
    plan_sample_rejects = sum(1 for r in plan.rejects if r.kind == "sample")
    manifest = {
        "stage": stage.name,
        "job_fingerprint": fingerprint,
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": unit_inputs + plan_sample_rejects,
        "samples": sum(rec["samples"] for rec in ordered),
        "rejected": by_kind.get("sample", 0),
        "rejected_by_kind": by_kind,
        "counts": counts,
        "schema": stage.schema.name if stage.schema is not None else None,
        "shards": [{"keys": rec.get("keys", []), **{k: rec[k] for k in ("sample_sha256",) if k in rec},
                    **{k: rec[k] for k in ("name", "samples", "bytes", "sha256")}}
                   for rec in ordered],
        "config": config_lib.redacted(config_lib.to_dict(job_config)) if job_config is not None else None,
    }
    storage.write_text(storage.join(uri, shards.MANIFEST), json.dumps(manifest, indent=1), options)
    return manifest


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def stage_main(schema: type, make_stage, argv: list[str] | None = None, description: str | None = None) -> dict:
    """The body of every stage script: parse the config (YAML + overrides), build the stage, run it.

    ``make_stage(cfg, options)`` returns the :class:`Stage`; ``schema`` is a :class:`StageJobConfig`.
    """
    from maskflow import config as config_lib
    from maskflow.runtime import setup_logging

    cfg = config_lib.parse_cli(schema, argv, description=description)
    setup_logging()
    options = cfg.storage.options()
    return run_stage(make_stage(cfg, options), cfg.output, cfg.compute, cfg.tracking, cfg, options, cfg.ray)

