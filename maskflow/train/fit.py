"""The driver of a training run: :func:`fit` checks the inputs, starts Ray Train, and logs and registers the model.

* Input streamed from WebDataset shards on object storage (each stage output's manifest lists them) through Ray Data
  and split across workers (``data.train``, one or several stage outputs); ``data.val`` goes whole to every worker;
  shard order shuffled deterministically from the seed.
* ``TorchTrainer`` with ``ScalingConfig`` from config (GPU when the cluster has one), DDP via ``prepare_model``;
  AMP on GPU; checkpoints to object storage; a failed worker group restarts from the latest checkpoint
  (``FailureConfig``), and re-running with the same ``run.name`` resumes.
* MLflow: the driver creates the run (its id survives restarts); rank 0 logs step and epoch metrics into it; the
  best model by ``validation.metric`` (else the last) is logged, registered with its kind (``maskflow.kind``) and
  validation value, and given the ``candidate`` alias.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

from maskflow import shards, storage, tracking
from maskflow.config import JobFailed
from maskflow.runtime import init_ray
from maskflow.storage import StorageOptions
from maskflow.train.config import TrainJobConfig
from maskflow.train.loop import CHECKPOINT_FILE, STOP_ERROR, STOP_NONFINITE, STOP_TAG, train_loop_per_worker
from maskflow.train.plugin import ModelPlugin

log = logging.getLogger("maskflow.train")

VAL_TAG_PREFIX = "val."


class TrainingStopped(JobFailed):
    """The run stopped on its own (a non-finite loss, an empty validation split...); the message is one line."""


@dataclass
class FitResult:
    run_id: str
    run_name: str
    checkpoint_path: str
    metrics: dict[str, float]
    model_uri: str | None = None
    model_version: str | None = None
    best_value: float | None = None  # validation.metric of the registered model (None: no validation metric)
    best_epoch: int | None = None  # 0-based
    init_report: dict = field(default_factory=dict)


def default_pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "torchvision", "pycocotools", "numpy")]


def samples_in(uris: list[str], options: StorageOptions) -> int:
    return sum(int(shards.read_manifest(u, options)["samples"]) for u in uris)


def shards_dataset(uris: list[str], options: StorageOptions, seed: int | None, key: str):
    """Ray Dataset over the shards of one or several stage outputs (raw entry bytes per row); file order shuffled
    from ``seed`` (None: in order)."""
    import ray.data
    from ray.data import FileShuffleConfig

    shard_uris = [s for u in uris for s in shards.shard_uris(u, options)]
    if not shard_uris:
        raise storage.StorageError(f"{key}: {', '.join(uris)} hold(s) no samples")
    fs, _ = storage.pyarrow_filesystem(shard_uris[0], options)
    paths = [storage.pyarrow_filesystem(u, options)[1] for u in shard_uris]
    dataset = ray.data.read_webdataset(paths, filesystem=fs, decoder=None,
                                       shuffle=FileShuffleConfig(seed=seed) if seed is not None else None)
    # Ray Train's split coordinator runs this dataset once per epoch in a process of its own: with bars "on" and no
    # terminal there it logs progress at INFO, which cluster/ray_data_logging.yaml keeps off the console; with them off
    # (this driver's setting) it would warn about it once per run.
    dataset.context.enable_progress_bars = True
    dataset.context.use_ray_tqdm = False  # else its bars stream to the driver's log line by line
    return dataset


def training_dataset(train_uri: str | list[str], options: StorageOptions, seed: int):
    """(dataset, samples) of the training shards; kept for benchmarks that read them as the trainer does."""
    uris = [train_uri] if isinstance(train_uri, str) else list(train_uri)
    return shards_dataset(uris, options, seed, "data.train"), samples_in(uris, options)


def _find_or_create_run(cfg: TrainJobConfig, run_name: str, model_name: str) -> str:
    """The MLflow run of a training run name: the existing one when resuming, else a new one."""
    import mlflow

    existing = mlflow.search_runs(
        filter_string=f"tags.`maskflow.train_name` = '{run_name}'", output_format="list", max_results=1
    )
    if existing:
        run_id = existing[0].info.run_id
        log.info("resuming MLflow run %s of training run %s", run_id, run_name)
        if STOP_TAG in existing[0].data.tags:  # why an earlier attempt stopped: not this attempt's outcome
            mlflow.MlflowClient().delete_tag(run_id, STOP_TAG)
        return run_id
    with mlflow.start_run(run_name=run_name, tags={"maskflow.job": f"train-{model_name}",
                                                   "maskflow.train_name": run_name, **tracking.parent_tags()}) as run:
        tracking.log_config(cfg)
        return run.info.run_id


def check_inputs(cfg: TrainJobConfig, options: StorageOptions) -> None:
    """Fail fast, before Ray starts: every input manifest readable, the checkpoint location writable."""
    for key, uris in (("data.train", cfg.data.train_uris), ("data.val", cfg.data.val_uris)):
        for uri in uris:
            storage.check_uri(storage.join(uri, shards.MANIFEST), for_write=False, options=options,
                              what=f"{key} (manifest)")
        if uris and samples_in(uris, options) == 0:
            raise storage.StorageError(f"{key}: {', '.join(uris)} hold(s) no samples; run the stage that makes them")
    storage.check_uri(cfg.run.storage_path, for_write=True, options=options, what="run.storage_path")


def check_model_settings(cfg: TrainJobConfig, model) -> None:
    """``freeze`` and ``optim.param_groups`` prefixes must each name something in the model (a typo would
    otherwise train what was meant to be frozen, silently)."""
    from maskflow.config import ConfigError
    from maskflow.train.loop import module_matches

    modules = [name for name, _ in model.named_modules() if name]
    for i, prefix in enumerate(cfg.freeze):
        if not any(module_matches(name, [prefix]) for name in modules):
            raise ConfigError(f"freeze[{i}]: {prefix!r} names no module of the model (top-level modules: "
                              f"{', '.join(n for n, _ in model.named_children())})")
    params = [name for name, _ in model.named_parameters()]
    for i, group in enumerate(cfg.optim.param_groups):
        if not any(name.startswith(group.prefix) for name in params):
            raise ConfigError(f"optim.param_groups[{i}].prefix: {group.prefix!r} matches no parameter of the model")


def fit(plugin: ModelPlugin) -> FitResult:
    """Train ``plugin``'s model as configured; log, register (alias ``candidate``) and return the result."""
    import mlflow

    cfg = plugin.cfg
    options = cfg.storage.options()
    check_inputs(cfg, options)
    run_name = cfg.run.name or f"{plugin.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking.setup(cfg.tracking, options)
    init_state, init_report = None, None
    if cfg.init.from_ or cfg.freeze or cfg.optim.param_groups:
        model = plugin.build_model()  # on the driver too: its settings are checked before Ray starts
        check_model_settings(cfg, model)
        if cfg.init.from_:
            from maskflow.train.init import initial_state

            init_state, init_report = initial_state(cfg.init, model, options)
        del model
    run_id = _find_or_create_run(cfg, run_name, plugin.name)
    if init_report is not None:
        mlflow.log_dict(init_report.__dict__, "init_report.json", run_id=run_id)
        mlflow.MlflowClient().set_tag(run_id, "maskflow.init_from", init_report.source)

    init_ray(cfg.ray)  # before Ray's first import in this process (init_ray sets how Ray authenticates)
    import ray.train
    import torch
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from maskflow.runtime import cluster_has_gpus

    use_gpu = cluster_has_gpus() if cfg.scaling.use_gpu is None else cfg.scaling.use_gpu
    train_uris, val_uris = cfg.data.train_uris, cfg.data.val_uris
    n_samples = samples_in(train_uris, options)
    datasets = {"train": shards_dataset(train_uris, options, cfg.loop.seed, "data.train")}
    if val_uris:
        datasets["val"] = shards_dataset(val_uris, options, None, "data.val")
    # Ray Data splits the training rows equally across workers (the remainder is dropped).
    steps_per_epoch = math.ceil((n_samples // cfg.scaling.workers) / cfg.loop.batch_size)
    fs, storage_path = storage.pyarrow_filesystem(cfg.run.storage_path, options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plugin": plugin, "run_id": run_id, "steps_per_epoch": steps_per_epoch,
                           "tracking_uri": tracking.resolved_tracking_uri(cfg.tracking), "val_uris": val_uris,
                           "init_state": init_state},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            # Ray Train's INFO lines (resources requested, worker group started, device) are set-up chatter.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if log.isEnabledFor(logging.DEBUG) else "WARNING"),
            # MASKFLOW_* settings (log level, fault injection) reach the workers even on an already-running Ray.
            worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("MASKFLOW_")}},
        ),
        datasets=datasets,
        # explicit options: Ray Train's defaults copy a deprecated field (exclude_resources) in every worker
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions()),
    )
    log.info("training %s: run %s, %d samples, ~%d steps/epoch x %d epochs on %d worker(s)%s%s", plugin.name, run_name,
             n_samples, steps_per_epoch, cfg.loop.epochs, cfg.scaling.workers, " with GPUs" if use_gpu else "",
             f"; validation on {samples_in(val_uris, options)} samples" if val_uris else "")
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    final = result.metrics or {}
    checkpoint = result.checkpoint
    stop = json.loads(mlflow.MlflowClient().get_run(run_id).data.tags.get(STOP_TAG, "{}"))
    where = f"last good checkpoint: {checkpoint.path}" if checkpoint else "no checkpoint was written"
    if stop.get("stop") == STOP_NONFINITE:
        raise TrainingStopped(f"training run {run_name}: the loss became non-finite at step {stop['stop_step'] + 1} "
                              f"(epoch {stop['stop_epoch'] + 1}; terms {stop['stop_losses']}); {where}. Lower "
                              "optim.lr or set optim.grad_clip_norm, then re-run with another run.name")
    if stop.get("stop") == STOP_ERROR:
        raise TrainingStopped(f"{stop['stop_message']} (training run {run_name}; {where})")
    if checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint: {result.error}")

    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
    model = plugin.build_model()
    best = state.get("best_model")
    model.load_state_dict(best if best is not None else state["model"])
    model.eval()
    out = FitResult(run_id, run_name, checkpoint.path,
                    {k: float(v) for k, v in final.items() if isinstance(v, (int, float)) and v is not None},
                    best_value=state.get("best_value"), best_epoch=state.get("best_epoch"),
                    init_report=init_report.__dict__ if init_report else {})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({"train_seconds": seconds})
        mlflow.set_tag("maskflow.checkpoint", checkpoint.path)
        if out.best_value is not None:
            mlflow.log_metrics({f"best/{cfg.validation.metric}": out.best_value, "best/epoch": out.best_epoch})
        info = plugin.log_model(model, None)
        out.model_uri = info.model_uri
        if cfg.registry.model_name:
            val_tags = {} if out.best_value is None else \
                {f"{VAL_TAG_PREFIX}{cfg.validation.metric}": repr(float(out.best_value))}
            out.model_version = tracking.register_logged_model(info.model_uri, cfg.registry.model_name, run_id,
                                                               kind=plugin.name, extra_tags=val_tags)
            log.info("registered %s version %s (kind %s, alias %s)%s", cfg.registry.model_name, out.model_version,
                     plugin.name, tracking.CANDIDATE,
                     f", best {cfg.validation.metric} {out.best_value:.4g} at epoch {out.best_epoch + 1}"
                     if out.best_value is not None else "")
    return out
