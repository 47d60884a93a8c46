"""MLflow: one tracking set-up for every job, run helpers, and the model registry.

Every job (stage, training, evaluation) is an MLflow run with its resolved config logged as params and as
``config.yaml``. Models are registered under a name; a freshly trained version gets the alias ``candidate`` and its
kind (tag ``maskflow.kind``, see :mod:`maskflow.models.kinds`); only :func:`promote` (an explicit step that compares
evaluation metrics) moves ``champion``. Users load ``models:/<name>@champion``.

What a model version's tags hold:

* ``maskflow.kind``: the model's kind (its plugin's ``name``); absent on versions registered before kinds existed;
* ``eval.<metric>``: each metric of its latest evaluation (``repr(float)``), ``eval.run_id``: that evaluation's run;
* ``maskflow.metric`` / ``maskflow.higher_is_better``: the headline metric its evaluator declares and its direction,
  which :func:`promote` uses unless told otherwise;
* ``maskflow.previous_champion``: on a version made champion, the version it replaced (what :func:`rollback` goes
  back to), with ``maskflow.promoted_at`` / ``maskflow.promoted_by``; ``maskflow.rolled_back`` on one rolled back;
* from a retraining run (:mod:`maskflow.retrain`): ``maskflow.data_digest`` / ``maskflow.data`` (what it was trained
  on), ``maskflow.eval_data_digest`` (the pinned set its ``eval.*`` were scored on), ``maskflow.code_version``,
  ``maskflow.parent_version`` (the champion it was compared with), ``maskflow.retrain_run_id``.

A job started with ``MASKFLOW_PARENT_RUN_ID`` in its environment (:data:`PARENT_RUN_ENV`; retraining sets it) makes
its MLflow run a child of that run.

Locally the backend is sqlite (the registry needs a database); on a cluster it is a tracking server
(``http://...``) with S3 artifacts, for which :func:`maskflow.storage.mlflow_environment` sets the endpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

from maskflow import config as config_lib
from maskflow import storage
from maskflow.config import Uri, require
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
EVAL_TAG_PREFIX = "eval."
KIND_TAG = "maskflow.kind"
METRIC_TAG = "maskflow.metric"
HIGHER_IS_BETTER_TAG = "maskflow.higher_is_better"
PREVIOUS_CHAMPION_TAG = "maskflow.previous_champion"
PARENT_RUN_ENV = "MASKFLOW_PARENT_RUN_ID"


@dataclass
class TrackingConfig:
    tracking_uri: Uri = "sqlite:///runs/mlflow.db"  # a relative sqlite path resolves as every Uri (config.py)
    experiment: str = "maskflow"
    artifact_location: Uri | None = None  # for new experiments; None: runs/mlartifacts beside a sqlite db

    def validate(self) -> None:
        require(bool(self.tracking_uri), "tracking_uri", "must not be empty")
        require(bool(self.experiment), "experiment", "must not be empty")


def resolved_tracking_uri(cfg: TrackingConfig) -> str:
    """Absolute form of the tracking URI, so Ray workers with another working directory reach the same db."""
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = os.path.abspath(uri[len("sqlite:///") :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri:  # a plain directory: file store
        return os.path.abspath(uri)
    return uri


def setup(cfg: TrackingConfig, options: StorageOptions = DEFAULT_OPTIONS) -> str:
    """Point this process's MLflow client at the tracking backend and experiment; returns the experiment id."""
    import mlflow

    storage.mlflow_environment(options)
    uri = resolved_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        mlflow.set_experiment(cfg.experiment)
        return experiment.experiment_id
    location = cfg.artifact_location
    if location is None and uri.startswith("sqlite:///"):
        location = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///") :]), "mlartifacts")
    with contextlib.suppress(Exception):  # another process may create it first
        mlflow.create_experiment(cfg.experiment, artifact_location=location)
    return mlflow.set_experiment(cfg.experiment).experiment_id


def worker_setup(tracking_uri: str | None, options: StorageOptions = DEFAULT_OPTIONS) -> None:
    """In a stage's actor that loads registry models: the object-store environment MLflow's artifact reads need, and
    the driver's tracking URI (``None``: nothing to set, the model comes from a checkpoint)."""
    if not tracking_uri:
        return
    import mlflow

    storage.mlflow_environment(options)
    mlflow.set_tracking_uri(tracking_uri)


def log_config(cfg: Any) -> None:
    """Log a resolved config: flattened params (secrets redacted) and the YAML as an artifact."""
    import mlflow

    flat = config_lib.flatten(config_lib.redacted(config_lib.to_dict(cfg)))
    mlflow.log_params({k: ("" if v is None else str(v))[:6000] for k, v in flat.items()})
    mlflow.log_text(config_lib.dump_yaml(cfg), "config.yaml")


@contextlib.contextmanager
def job_run(
    cfg: TrackingConfig, run_name: str, job_config: Any, tags: dict | None = None, options: StorageOptions = DEFAULT_OPTIONS
) -> Iterator[Any]:
    """An MLflow run for one job, with its config logged; yields the active run."""
    import mlflow

    setup(cfg, options)
    with mlflow.start_run(run_name=run_name, tags={"maskflow.job": run_name, **parent_tags(), **(tags or {})}) as run:
        log_config(job_config)
        yield run


def parent_tags() -> dict[str, str]:
    """``{"mlflow.parentRunId": ...}`` when this job runs as a step of a parent run (:data:`PARENT_RUN_ENV`)."""
    parent = os.environ.get(PARENT_RUN_ENV)
    return {"mlflow.parentRunId": parent} if parent else {}


# --------------------------------------------------------------------------------------------- registry


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def register_logged_model(model_uri: str, name: str, run_id: str | None = None, kind: str | None = None,
                          extra_tags: dict[str, str] | None = None) -> str:
    """Register a logged model (``runs:/...`` or ``models:/m-...``) as a new version of ``name``, alias it candidate,
    and tag it with its ``kind`` (the plugin's ``name``: ``maskflow.kind``), the ``run_id`` that made it and any
    ``extra_tags``. Returns the new version number."""
    import mlflow

    version = str(mlflow.register_model(model_uri, name).version)
    c = client()
    c.set_registered_model_alias(name, CANDIDATE, version)
    tags = {"run_id": run_id, KIND_TAG: kind, **(extra_tags or {})}
    for key, value in tags.items():
        if value is not None:
            c.set_model_version_tag(name, version, key, str(value))
    return version


def model_kind(name: str, version: str) -> str | None:
    """The kind recorded on a model version (``maskflow.kind``), or None for a version registered without one."""
    return client().get_model_version(name, str(version)).tags.get(KIND_TAG)


def model_version_for_alias(name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def latest_version(name: str) -> str | None:
    """The highest version number of a registered model, or None (no such model, or no versions)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in versions)) if versions else None


def record_evaluation(name: str, version: str, metrics: dict[str, float], run_id: str | None = None,
                      metric: str | None = None, higher_is_better: bool | None = None) -> None:
    """Attach evaluation metrics to a model version (as tags), so promotion compares versions directly; with
    ``metric`` (the evaluator's headline metric, one of ``metrics``) and its direction, promotion needs neither."""
    c = client()
    for k, v in metrics.items():
        c.set_model_version_tag(name, version, f"{EVAL_TAG_PREFIX}{k}", repr(float(v)))
    if run_id:
        c.set_model_version_tag(name, version, "eval.run_id", run_id)
    if metric is not None:
        c.set_model_version_tag(name, version, METRIC_TAG, metric)
    if higher_is_better is not None:
        c.set_model_version_tag(name, version, HIGHER_IS_BETTER_TAG, str(bool(higher_is_better)).lower())


def evaluation_metric(name: str, version: str, metric: str) -> float | None:
    tags = client().get_model_version(name, version).tags
    value = tags.get(f"{EVAL_TAG_PREFIX}{metric}")
    return None if value is None else float(value)


def declared_metric(name: str, version: str) -> tuple[str | None, bool | None, str]:
    """``(metric, higher_is_better, where from)`` that promotes a version: the headline metric and direction recorded
    by its last evaluation (``maskflow.metric`` / ``maskflow.higher_is_better``), else those of its kind's evaluator
    (:data:`maskflow.models.kinds.KINDS`), else ``(None, None, "none")``."""
    tags = client().get_model_version(name, version).tags
    metric, direction = tags.get(METRIC_TAG), tags.get(HIGHER_IS_BETTER_TAG)
    if metric:
        return metric, None if direction is None else direction == "true", "the version's evaluation"
    kind = tags.get(KIND_TAG)
    if kind:
        from maskflow.models import kinds

        if kind in kinds.KINDS:
            evaluator = kinds.load_attr(kinds.KINDS[kind].evaluator)
            return evaluator.metric, bool(evaluator.higher_is_better), f"the {kind!r} kind's evaluator"
    return None, None, "none"


def promote(name: str, metric: str | None = None, version: str | None = None,
            higher_is_better: bool | None = None, margin: float = 0.0, by: str = "promote") -> dict:
    """Move ``champion`` to ``version`` (default: the candidate) only if its evaluation ``metric`` beats the champion's.

    ``metric`` and ``higher_is_better`` default to what the version's evaluation recorded (the evaluator's headline
    metric and direction: EPE is lower-is-better, AR higher), else to its kind's evaluator (:func:`declared_metric`);
    given, they override it. A metric with no known direction is higher-is-better. Returns what was decided, with
    both values. A version without a recorded evaluation is never promoted. ``margin``: the candidate must beat the
    champion by more than this (in the metric's units); ``by`` is recorded on the new champion.
    """
    if version is None:
        cand = model_version_for_alias(name, CANDIDATE)
        if cand is None:
            raise ValueError(f"model {name!r} has no {CANDIDATE!r} version to promote")
        version = str(cand.version)
    version = str(version)
    declared, declared_direction, source = declared_metric(name, version)
    if metric is None:
        if declared is None:
            raise ValueError(f"model {name!r} version {version} records no evaluation metric and no kind: evaluate it "
                             "first, or name the metric")
        metric = declared
    if higher_is_better is None:
        higher_is_better = declared_direction if metric == declared and declared_direction is not None else True
    new_value = evaluation_metric(name, version, metric)
    if new_value is None:
        raise ValueError(f"model {name!r} version {version} has no evaluation metric {metric!r}: evaluate it first")
    champ = model_version_for_alias(name, CHAMPION)
    old_value = evaluation_metric(name, str(champ.version), metric) if champ is not None else None
    better = old_value is None or (new_value > old_value + margin if higher_is_better
                                   else new_value < old_value - margin)
    if champ is not None and str(champ.version) == version:
        better = False
    if better:
        set_champion(name, version, by=by)
    decision = {
        "model": name,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "metric_from": source if metric == declared else "the caller",
        "candidate_version": version,
        "candidate_value": new_value,
        "champion_version": None if champ is None else str(champ.version),
        "champion_value": old_value,
        "margin": margin,
        "promoted": better,
    }
    log.info("promotion decision: %s", decision)
    return decision


def set_champion(name: str, version: str, by: str = "hand") -> str | None:
    """Alias ``version`` champion, recording on it the version it replaces (``maskflow.previous_champion``), when and
    by what; returns the replaced version (None: there was no champion)."""
    import time

    c = client()
    c.get_model_version(name, str(version))  # raises for a version that does not exist
    champ = model_version_for_alias(name, CHAMPION)
    previous = None if champ is None else str(champ.version)
    c.set_registered_model_alias(name, CHAMPION, str(version))
    if previous is not None and previous != str(version):
        c.set_model_version_tag(name, str(version), PREVIOUS_CHAMPION_TAG, previous)
    c.set_model_version_tag(name, str(version), "maskflow.promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime()))
    c.set_model_version_tag(name, str(version), "maskflow.promoted_by", by)
    return previous


def rollback(name: str) -> dict:
    """Move ``champion`` back to the version the current champion replaced (its ``maskflow.previous_champion``);
    the demoted version is tagged ``maskflow.rolled_back``. Raises ValueError when there is nothing to go back to."""
    import time

    champ = model_version_for_alias(name, CHAMPION)
    if champ is None:
        raise ValueError(f"model {name!r} has no {CHAMPION!r}: nothing to roll back")
    previous = champ.tags.get(PREVIOUS_CHAMPION_TAG)
    if not previous:
        raise ValueError(f"model {name!r}: champion version {champ.version} replaced no earlier champion (it was the "
                         "first): nothing to roll back to")
    c = client()
    c.set_registered_model_alias(name, CHAMPION, previous)
    c.set_model_version_tag(name, str(champ.version), "maskflow.rolled_back",
                            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    decision = {"model": name, "champion_version": previous, "rolled_back_version": str(champ.version)}
    log.info("rollback: %s", decision)
    return decision
