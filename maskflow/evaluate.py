"""The evaluation harness: one job scores any model's predictions with that model's :class:`Evaluator`, as an MLflow
evaluation run linked to the model version, and writes the headline metric onto the version for promotion.

An evaluator has the shape of detectron2's ``DatasetEvaluator`` and mmengine's ``BaseMetric``: ``reset()``, then
``process(samples)`` for each batch of prediction samples (decoded as :func:`maskflow.shards.decode` does: JSON
entries parsed, binary entries left as bytes), then ``summarize()`` → :class:`EvalResult` (metrics, a per-item table,
figures, text). It declares the sample ``schema`` it reads, its headline ``metric`` and that metric's direction
(``higher_is_better``: AR is, EPE is not). Evaluators are found by name in :data:`maskflow.models.kinds.EVALUATORS`,
or from a registered model's kind.

:func:`evaluate_job` checks everything it can before it reads a sample, each problem a one-line error naming its
config key:

1. ``predictions`` is a finished stage output (``manifest.json``) holding samples of the evaluator's schema;
2. ``model`` (optional, ``models:/name/N`` or ``models:/name@alias``) resolves to a version; the evaluator defaults to
   its kind's; predictions made by another model are refused (a stage's manifest records ``model.uri`` in its
   config; a ``models:/name@alias`` there is checked against the version the first sample names, through
   :meth:`Evaluator.predicted_by`).

It then streams the samples shard by shard, each checked against its manifest checksum (damaged data fails the job:
a metric over part of the data would mislead silently), with a progress line per shard, and only then opens one
MLflow run (``maskflow.job=evaluate-<evaluator>``): the config, the metrics, ``items.csv``, the figures as PNGs, the
text artifacts, and the predictions' digest (sha256 of their ``manifest.json``, which lists every shard's and every
sample's sha256) as a tag and as the run's dataset input. Last, the metrics go onto the model version
(:func:`maskflow.tracking.record_evaluation`) with the headline metric's name and direction, which
:func:`maskflow.tracking.promote` then uses.

With ``baseline`` (another stage output of the same items, e.g. the unrefined proposals FFD-Net refined), both are
scored in the same run and :meth:`Evaluator.compare` merges them: the baseline's metrics under its label, the relative
gains as ``gain/<metric>``, and whatever the evaluator draws of the two together; outputs over different items are
refused in one line naming ``baseline``.

This module imports no torch, Ray or MLflow at import time: a job's config error prints before they load.
"""

from __future__ import annotations

import abc
import csv
import hashlib
import inspect
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from maskflow import storage
from maskflow.config import ConfigError, JobFailed, Uri, require
from maskflow.models import kinds
from maskflow.runtime import Common
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

__all__ = ["EvalResult", "Evaluator", "EvaluateConfig", "evaluate_job", "build_evaluator", "ITEMS_CSV"]

log = logging.getLogger(__name__)

ITEMS_CSV = "items.csv"  # the per-item table's artifact name
# MLflow stores a dataset's digest in 36 characters: the input carries the first 32 hex digits of the sha256, the
# run's tag ``maskflow.predictions_sha256`` all of it.
MLFLOW_DIGEST_CHARS = 32


@dataclass
class EvalResult:
    """What an evaluator found. Everything here is logged to the evaluation run."""

    metrics: dict[str, float]  # MLflow-safe names (no '@'); must hold the evaluator's headline ``metric``
    rows: list[dict] = field(default_factory=list)  # one dict per item (image, pair, video): -> items.csv
    figures: dict[str, Any] = field(default_factory=dict)  # "name.png" -> matplotlib Figure or a local PNG path
    text: dict[str, str] = field(default_factory=dict)  # "name.txt" -> text (e.g. a fixed-width table)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)] (curves)


class Evaluator(abc.ABC):
    """Base class of an evaluator; the harness calls ``reset()``, ``process(batch)`` per batch, ``summarize()``.

    Constructor keyword arguments are the evaluator's options (the job's ``options`` block); keep the constructor
    cheap and torch-free where it can be.
    """

    name: str = "evaluator"  # its key in maskflow.models.kinds.EVALUATORS, and the run's maskflow.job suffix
    metric: str = ""  # the headline metric (MLflow-safe name), the one promotion compares
    higher_is_better: bool = True
    schema: str = ""  # the prediction sample schema it reads, e.g. "proposals/1"

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything processed (called before the first batch)."""

    @abc.abstractmethod
    def process(self, samples: list[dict]) -> None:
        """Accumulate a batch of decoded prediction samples (``{"__key__": ..., suffix: value}``)."""

    @abc.abstractmethod
    def summarize(self) -> EvalResult:
        """The metrics (with :attr:`metric`), per-item rows, figures and text of everything processed."""

    def has_gain(self, metric: str) -> bool:
        """Whether :meth:`compare` reports the relative change of ``metric`` (not of counts, for instance)."""
        return True

    def compare(self, result: EvalResult, baseline: "Evaluator", baseline_result: EvalResult,
                labels: tuple[str, str]) -> EvalResult:
        """One result for predictions scored beside a baseline's predictions of the same items (refined against
        unrefined proposals): ``result``'s metrics, the baseline's as ``<baseline label>/<metric>``, and the relative
        change of each, ``gain/<metric>`` = (ours - baseline) / |baseline|; the baseline's figures and text under
        its label. ``baseline`` is an evaluator of the same class that has processed the baseline (override to
        draw both in one figure, as :class:`maskflow.evaluators.proposal_ar.ProposalAR` does)."""
        label, base_label = labels
        metrics = dict(result.metrics)
        for name, value in baseline_result.metrics.items():
            metrics[f"{base_label}/{name}"] = value
            ours = result.metrics.get(name)
            if not self.has_gain(name):
                continue
            if ours is not None and value not in (0, None) and value == value and ours == ours:  # skip 0 and NaN
                metrics[f"gain/{name}"] = (float(ours) - float(value)) / abs(float(value))
        figures = {**result.figures, **{f"{base_label}_{k}": v for k, v in baseline_result.figures.items()}}
        text = {**result.text, **{f"{base_label}_{k}": v for k, v in baseline_result.text.items()}}
        series = {**result.series, **{f"{base_label}/{k}": v for k, v in baseline_result.series.items()}}
        return EvalResult(metrics=metrics, rows=result.rows, figures=figures, text=text, series=series)

    def predicted_by(self, sample: dict) -> str | None:
        """The model URI a prediction sample records as its maker (e.g. ``models:/name/3``), or None if the schema
        records none. Checked against the evaluated model version on the first sample."""
        return None


# --------------------------------------------------------------------------------------------- config


@dataclass
class EvaluateConfig(Common):
    # a name in maskflow.models.kinds.EVALUATORS, a "package.module:Class", or "" = the evaluator of the model's kind
    evaluator: str = ""
    predictions: Uri = ""  # a stage output (directory with manifest.json) of the evaluator's sample schema
    model: Uri = ""  # models:/name/N or models:/name@alias: the version the metrics are written onto ("" = none)
    # Another stage output of the same items and schema to score beside ``predictions`` in the same run (FFD-Net:
    # the unrefined proposals the refined ones came from): its metrics as <baseline_label>/<metric>, the relative
    # gains as gain/<metric>, both curves in one figure.
    baseline: Uri = ""
    labels: list[str] = field(default_factory=lambda: ["model", "baseline"])  # names of predictions, baseline
    batch_size: int = 64  # samples per process() call
    options: dict[str, Any] = field(default_factory=dict)  # the evaluator's constructor arguments

    def validate(self) -> None:
        require(bool(self.predictions), "predictions",
                "required: the predictions' stage output directory (with manifest.json)")
        require(not self.model or self.model.startswith("models:/"), "model",
                f"must be a registered version, models:/<name>/<version> or models:/<name>@<alias>; got {self.model!r}")
        require(bool(self.evaluator or self.model), "evaluator",
                f"required without a model (one of: {', '.join(sorted(kinds.EVALUATORS))}; or package.module:Class)")
        if self.evaluator:
            kinds.evaluator_path(self.evaluator, "evaluator")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(len(self.labels) == 2 and all(self.labels) and self.labels[0] != self.labels[1]
                and all("/" not in x for x in self.labels), "labels",
                f"two distinct names without '/' (predictions, baseline); got {self.labels}")
        require(self.baseline != self.predictions, "baseline", "must be another stage output than predictions")


# --------------------------------------------------------------------------------------------- the job


def build_evaluator(name: str, options: dict[str, Any] | None = None, key: str = "evaluator") -> Evaluator:
    """An evaluator by name or import string, constructed with ``options``; bad options are one-line
    :class:`ConfigError` naming ``options.<option>``."""
    cls = kinds.evaluator_class(name, key)
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
        raise ConfigError(f"{key}: {name!r} is not an Evaluator")
    options = dict(options or {})
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for option in options:
            if option not in params:
                raise ConfigError(f"options.{option}: unknown option of evaluator {cls.name!r} "
                                  f"(known: {', '.join(params) or 'none'})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"options: evaluator {cls.name!r}: {e}") from None


def evaluate_job(cfg: EvaluateConfig, evaluator: Evaluator | None = None) -> dict:
    """Score ``cfg.predictions`` with the evaluator (``evaluator`` if given, else the config's, else the model's
    kind's) in one MLflow run; write the metrics onto ``cfg.model``'s version. See the module docstring.

    Returns ``{"evaluator", "metric", "value", "higher_is_better", "metrics", "text", "run_id", "model_name",
    "model_version", "predictions", "predictions_sha256"}``.
    """
    from maskflow import tracking

    options = cfg.storage.options()
    manifest, digest = read_predictions_manifest(cfg.predictions, options)
    base_manifest = base_digest = None
    if cfg.baseline:
        base_manifest, base_digest = read_predictions_manifest(cfg.baseline, options, key="baseline")
    if evaluator is None and cfg.evaluator:
        evaluator = build_evaluator(cfg.evaluator, cfg.options)
    if evaluator is not None:  # another kind of sample fails here, before MLflow is even set up
        check_schema(manifest, evaluator, cfg.predictions)

    pinned = model_name = model_version = None
    if cfg.model:
        from maskflow.models.loading import registered_version, resolve_model_uri

        tracking.setup(cfg.tracking, options)
        pinned = resolve_model_uri(cfg.model, "model", options)
        model_name, model_version = registered_version(pinned)
        if evaluator is None:
            kind = tracking.model_kind(model_name, model_version)
            if kind is None:
                raise ConfigError(f"evaluator: required: {pinned} records no kind (registered before kinds existed); "
                                  f"name one of {', '.join(sorted(kinds.EVALUATORS))}")
            evaluator = build_evaluator(kinds.kind(kind, "model").evaluator, cfg.options)
            check_schema(manifest, evaluator, cfg.predictions)
        check_predictions_model(manifest_model_uri(manifest), pinned, cfg.predictions)
    assert evaluator is not None  # EvaluateConfig.validate: an evaluator or a model

    def check_first_sample(sample: dict) -> None:
        if pinned is not None:
            check_predictions_model(evaluator.predicted_by(sample), pinned, cfg.predictions,
                                    where=f"its sample {sample.get('__key__')}")

    if base_manifest is not None:
        check_schema(base_manifest, evaluator, cfg.baseline, key="baseline")
    keys: list[str] = []
    result = score(evaluator, cfg.predictions, manifest, cfg.batch_size, options, check_first_sample, keys)
    if base_manifest is not None:
        baseline = build_evaluator(evaluator_name_or_path(evaluator), cfg.options)
        base_keys: list[str] = []
        base_result = score(baseline, cfg.baseline, base_manifest, cfg.batch_size, options, None, base_keys)
        check_same_items(keys, base_keys, cfg.predictions, cfg.baseline)
        result = evaluator.compare(result, baseline, base_result, (cfg.labels[0], cfg.labels[1]))
    if evaluator.metric not in result.metrics:
        raise ValueError(f"evaluator {evaluator.name!r} declares metric {evaluator.metric!r} but summarize() "
                         f"returned {sorted(result.metrics)}")
    metrics = {k: float(v) for k, v in result.metrics.items()}

    tags = {"maskflow.predictions": cfg.predictions, "maskflow.predictions_sha256": digest,
            "maskflow.predictions_schema": str(manifest.get("schema")), "maskflow.evaluator": evaluator.name,
            "maskflow.metric": evaluator.metric, "maskflow.higher_is_better": str(evaluator.higher_is_better).lower()}
    if base_manifest is not None:
        tags.update({"maskflow.baseline": cfg.baseline, "maskflow.baseline_sha256": str(base_digest),
                     "maskflow.labels": ",".join(cfg.labels)})
    if pinned is not None:
        tags.update({"maskflow.model_name": model_name, "maskflow.model_version": model_version,
                     "maskflow.model_uri": pinned})
    with tracking.job_run(cfg.tracking, f"evaluate-{evaluator.name}", cfg, tags, options) as run:
        run_id = run.info.run_id
        log_result(run_id, result, metrics)
        log_predictions_input(cfg.predictions, digest, manifest)
        if base_manifest is not None:
            log_predictions_input(cfg.baseline, str(base_digest), base_manifest, context="baseline")
    if pinned is not None:
        tracking.record_evaluation(model_name, model_version, metrics, run_id, metric=evaluator.metric,
                                   higher_is_better=evaluator.higher_is_better)
    log.info("[evaluate-%s] %s = %.4g over %d samples of %s%s (run %s)", evaluator.name, evaluator.metric,
             metrics[evaluator.metric], manifest.get("samples", 0), cfg.predictions,
             f", recorded on {pinned}" if pinned else "", run_id)
    return {"evaluator": evaluator.name, "metric": evaluator.metric, "value": metrics[evaluator.metric],
            "higher_is_better": evaluator.higher_is_better, "metrics": metrics, "text": dict(result.text),
            "run_id": run_id, "model_name": model_name, "model_version": model_version,
            "predictions": cfg.predictions, "predictions_sha256": digest}


# --------------------------------------------------------------------------------------------- the checks


def read_predictions_manifest(uri: str, options: StorageOptions = DEFAULT_OPTIONS, key: str = "predictions") \
        -> tuple[dict, str]:
    """(manifest, sha256 hex of its bytes) of a finished stage output; one line naming ``key`` if there is none (an
    unfinished or missing output)."""
    from maskflow import shards

    path = storage.join(uri, shards.MANIFEST)
    storage.check_uri(path, for_write=False, options=options, what=f"{key} (manifest)")
    data = storage.read_bytes(path, options)
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise ConfigError(f"{key}: {path} is not a stage manifest ({e})") from None
    return manifest, hashlib.sha256(data).hexdigest()


def check_schema(manifest: dict, evaluator: Evaluator, uri: str, key: str = "predictions") -> None:
    """Predictions of another sample schema than the evaluator reads: one line (a manifest from before schemas were
    recorded passes)."""
    found = manifest.get("schema")
    if found is not None and found != evaluator.schema:
        raise ConfigError(f"{key}: {uri} holds {found} samples; evaluator {evaluator.name!r} reads "
                          f"{evaluator.schema}")


def evaluator_name_or_path(evaluator: Evaluator) -> str:
    """How :func:`build_evaluator` finds ``evaluator``'s class again (its table name, else its import string)."""
    cls = type(evaluator)
    path = f"{cls.__module__}:{cls.__qualname__}"
    return evaluator.name if kinds.EVALUATORS.get(evaluator.name) == path else path


def check_same_items(keys: list[str], base_keys: list[str], uri: str, base_uri: str) -> None:
    """A comparison means something only over the same items: one line naming ``baseline`` otherwise."""
    ours, theirs = set(keys), set(base_keys)
    if ours != theirs:
        only_ours, only_theirs = sorted(ours - theirs), sorted(theirs - ours)
        example = (f"{only_ours[0]} only in {uri}" if only_ours else f"{only_theirs[0]} only in {base_uri}")
        raise ConfigError(f"baseline: {base_uri} and {uri} hold different items ({len(only_ours)} only in the "
                          f"predictions, {len(only_theirs)} only in the baseline; e.g. {example}): compare outputs "
                          "made from the same input")


def manifest_model_uri(manifest: dict) -> str | None:
    """The weights a prediction stage was configured with (its config's ``model.uri``), or None."""
    model = (manifest.get("config") or {}).get("model")
    uri = model.get("uri") if isinstance(model, dict) else None
    return uri or None


def _registry_ref(uri: str) -> tuple[str, str | None] | None:
    """(name, version or None for an alias) of a ``models:/`` URI; None for any other URI."""
    if not uri or not uri.startswith("models:/"):
        return None
    ref = uri[len("models:/"):]
    if "@" in ref:
        return ref.split("@", 1)[0], None
    name, _, version = ref.rpartition("/")
    return (name, version) if name and version.isdigit() else (ref, None)


def check_predictions_model(made_by: str | None, pinned: str, uri: str, where: str = "its manifest's model.uri") \
        -> None:
    """Refuse (one line) predictions that name another registered model or version than ``pinned`` made them.
    Predictions that name none, or a checkpoint or run (not comparable with a version), pass."""
    made, evaluated = _registry_ref(made_by or ""), _registry_ref(pinned)
    if made is None or evaluated is None:
        if made_by and made is None:
            log.info("predictions in %s were made by %s, not a registered version: not checked against %s",
                     uri, made_by, pinned)
        return
    if made[0] != evaluated[0] or (made[1] is not None and made[1] != evaluated[1]):
        raise ConfigError(f"model: {uri} was made by {made_by} ({where}), not {pinned}: evaluate it against that "
                          "model, or make predictions with this one")


# --------------------------------------------------------------------------------------------- scoring, logging


def score(evaluator: Evaluator, uri: str, manifest: dict, batch_size: int,
          options: StorageOptions = DEFAULT_OPTIONS, check_first_sample: Callable[[dict], None] | None = None,
          keys: list[str] | None = None) -> EvalResult:
    """Feed every sample of a finished stage output to ``evaluator`` in batches, shard by shard with a progress
    line each (and a bar on a terminal), checking each sample against its manifest checksum; then summarize.
    ``keys``, if given, receives every sample's key."""
    from maskflow import shards
    from maskflow.stage import InputShard, Reject, UnitProgress, iter_input_shard

    evaluator.reset()
    records = [rec for rec in manifest.get("shards", []) if rec["samples"] > 0]
    first = True
    with UnitProgress(f"evaluate-{evaluator.name}", len(records), sum(rec["samples"] for rec in records)) as progress:
        for rec in records:
            shard = InputShard(storage.join(uri, rec["name"]), rec.get("keys"), rec["samples"],
                               sample_sha256=rec.get("sample_sha256"))
            batch: list[dict] = []
            done = 0
            for item in iter_input_shard(shard, options):
                if isinstance(item, Reject):
                    if item.kind == "unlisted":  # not part of the output its manifest describes
                        continue
                    raise JobFailed(f"predictions: sample {item.key} of {rec['name']} is unusable ({item.reason}); "
                                    f"a metric without it would mislead: re-run the job that wrote {uri}")
                sample = shards.decode(item)
                if first and check_first_sample is not None:
                    check_first_sample(sample)
                first = False
                if keys is not None:
                    keys.append(sample.get("__key__"))
                batch.append(sample)
                if len(batch) == batch_size:
                    evaluator.process(batch)
                    done += len(batch)
                    batch = []
            if batch:
                evaluator.process(batch)
                done += len(batch)
            progress.finished({"name": rec["name"], "samples": done, "inputs": done, "rejects": []})
    return evaluator.summarize()


def items_csv(rows: list[dict]) -> str:
    """The per-item table as CSV: columns in first-seen order over all rows (a missing value is empty)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def log_result(run_id: str, result: EvalResult, metrics: dict[str, float]) -> None:
    """Metrics and their step series in one batch, then items.csv, the figures (PNG) and the text artifacts."""
    import shutil
    import tempfile
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entries = [Metric(k, v, now, 0) for k, v in metrics.items()]
    entries += [Metric(k, float(v), now, int(step)) for k, points in result.series.items() for step, v in points]
    mlflow.MlflowClient().log_batch(run_id, metrics=entries)
    if result.rows:
        mlflow.log_text(items_csv(result.rows), ITEMS_CSV)
    for name, figure in result.figures.items():
        name = name if name.endswith(".png") else f"{name}.png"
        if isinstance(figure, (str, os.PathLike)):
            with tempfile.TemporaryDirectory() as d:
                shutil.copyfile(figure, os.path.join(d, name))
                mlflow.log_artifact(os.path.join(d, name))
        else:
            mlflow.log_figure(figure, name)
    for name, text in result.text.items():
        mlflow.log_text(text, name)


def log_predictions_input(uri: str, digest: str, manifest: dict, context: str = "evaluation") -> None:
    """The predictions as the run's MLflow dataset input (source URI, digest, schema); a courtesy beside the
    ``maskflow.predictions_sha256`` tag, so a failure here only warns."""
    import mlflow

    try:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        source_uri = uri if "://" in uri else os.path.abspath(uri)
        with warnings.catch_warnings():  # a local path matches MLflow's "" and "file" sources alike: it says so
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(source_uri)
        dataset = MetaDataset(source, name=f"{manifest.get('stage') or 'predictions'}:{storage.basename(uri)}",
                              digest=digest[:MLFLOW_DIGEST_CHARS])
        mlflow.log_input(dataset, context=context,
                         tags={"schema": str(manifest.get("schema")), "samples": str(manifest.get("samples"))})
    except Exception as e:  # noqa: BLE001 - the tag holds the digest; the dataset entry is for the UI
        log.warning("predictions not logged as a dataset input: %s: %s", type(e).__name__, e)
