"""The trainer harness: every model trains through :func:`fit` on Ray Train V2.

A model plugs in a :class:`ModelPlugin` (detectron2-style: the model returns a loss dict in training mode):

* ``build_model()`` — an ``nn.Module`` whose ``forward`` in train mode returns ``{name: scalar loss}``;
* ``collate(batch)`` — a Ray Data numpy batch of shard rows (raw entry bytes) → what ``losses()`` consumes;
* ``losses(model, batch, device)`` — the loss dict for one batch;
* ``log_model(model, name)`` — how the trained model is logged to MLflow.

The harness owns everything else, the same for every model:

* input streamed from WebDataset shards on object storage (the stage manifest lists them) through Ray Data and split
  across workers; shard order shuffled deterministically from the seed, differently every epoch;
* ``TorchTrainer`` with ``ScalingConfig`` from config (GPU when the cluster has one), DDP via ``prepare_model``;
* AMP (autocast + GradScaler) on GPU;
* checkpoints (model, optimizer, scheduler, scaler, epoch, step) to object storage every N epochs; a failed worker
  group restarts from the latest checkpoint (``FailureConfig``), and re-running with the same ``run.name`` resumes;
* MLflow: the driver creates the run (its id survives restarts); rank 0 logs step metrics into it; the final model is
  logged, registered and given the ``candidate`` alias.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from maskflow import shards, storage, tracking
from maskflow.config import Uri, require
from maskflow.runtime import Common, format_seconds, init_ray
from maskflow.storage import StorageOptions

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
# Fault injection for tests of recovery: the worker of rank 0 exits once at this global step (then drops the marker).
CHAOS_STEP_ENV = "MASKFLOW_CHAOS_EXIT_AT_STEP"
CHAOS_MARKER_ENV = "MASKFLOW_CHAOS_MARKER"


@dataclass
class DataConfig:
    train: Uri = ""  # a stage output (directory with manifest.json) of training samples
    shuffle_buffer: int = 64  # rows in each worker's local shuffle buffer (0: off)

    def validate(self) -> None:
        require(bool(self.train), "train", "required: the training shards' directory URI")
        require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip_norm: float | None = None

    def validate(self) -> None:
        require(self.lr > 0, "lr", "must be positive")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")


@dataclass
class LoopConfig:
    epochs: int = 10
    batch_size: int = 4  # per worker
    amp: bool = True  # used only on GPU
    seed: int = 0
    log_every_steps: int = 10
    checkpoint_every_epochs: int = 1
    torch_threads: int | None = None  # per worker; None: the worker's CPU reservation

    def validate(self) -> None:
        require(self.epochs >= 1, "epochs", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.checkpoint_every_epochs >= 1, "checkpoint_every_epochs", "must be at least 1")


@dataclass
class ScalingConfig:
    workers: int = 1
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_worker: float = 1.0

    def validate(self) -> None:
        require(self.workers >= 1, "workers", "must be at least 1")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")


@dataclass
class RunConfig:
    storage_path: Uri = "runs/train"  # checkpoints (local path or s3://)
    name: str | None = None  # None: <model>-<timestamp>; re-using a name resumes that run
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2


@dataclass
class RegistryConfig:
    model_name: str = ""  # registered model name; "" = don't register
    pip_requirements: list[str] = field(default_factory=list)  # extra requirements logged with the model


@dataclass
class TrainJobConfig(Common):
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


@dataclass
class FitResult:
    run_id: str
    run_name: str
    checkpoint_path: str
    metrics: dict[str, float]
    model_uri: str | None = None
    model_version: str | None = None


class ModelPlugin(abc.ABC):
    """What one paper's model contributes to the harness. Pickled to the workers: keep it light."""

    name = "model"

    def __init__(self, cfg: TrainJobConfig):
        self.cfg = cfg

    @abc.abstractmethod
    def build_model(self):
        """The nn.Module; in train mode its forward returns a dict of scalar losses."""

    @abc.abstractmethod
    def collate(self, batch: dict) -> Any:
        """A Ray Data numpy batch of shard rows (columns: entry suffixes, values: raw bytes) → a model batch."""

    @abc.abstractmethod
    def losses(self, model, batch: Any, device) -> dict:
        """The loss dict of one batch (moves the batch to ``device``)."""

    def batch_size_of(self, batch: Any) -> int:
        return len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)

    def log_model(self, model, registered_name: str | None):
        """Log the trained model to the active MLflow run; returns the ModelInfo."""
        import mlflow.pytorch

        return mlflow.pytorch.log_model(
            model,
            name="model",
            registered_model_name=registered_name or None,
            # Detection models take lists of variable-size images and do not torch.export: pickle the module.
            serialization_format="pickle",
            pip_requirements=default_pip_requirements() + list(self.cfg.registry.pip_requirements),
        )


def default_pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "torchvision", "pycocotools", "numpy")]


# --------------------------------------------------------------------------------------------- worker side


def _lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "cosine" and total > 0:
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return warm


def _make_optimizer(params, cfg: OptimConfig):
    import torch

    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class MLflowStepLogger:
    """Rank 0's hook: step and epoch metrics into the driver's MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str, every: int):
        from mlflow import MlflowClient

        self.client, self.run_id, self.every = MlflowClient(tracking_uri), run_id, every

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def _maybe_chaos(step: int, rank: int) -> None:
    target = os.environ.get(CHAOS_STEP_ENV)
    marker = os.environ.get(CHAOS_MARKER_ENV)
    if target and marker and rank == 0 and step == int(target) and not os.path.exists(marker):
        open(marker, "w").close()
        log.warning("chaos: worker exiting at step %d to test recovery", step)
        os._exit(1)


def collate_fn(plugin: ModelPlugin):
    """The plugin's ``collate`` as the callable class Ray Data's ``iter_torch_batches`` takes (a bare function is
    deprecated there). Built in the worker: Ray Data's base class is not imported on the driver."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class PluginCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> Any:
            return plugin.collate(batch)

    return PluginCollate()


class EpochProgress:
    """Rank 0's progress lines: every ``every_s`` seconds within an epoch and at its end — step, samples/s, the
    running mean of the loss, time left in the epoch and in the run."""

    def __init__(self, name: str, epochs: int, steps_per_epoch: int, world: int, every_s: float = 30.0):
        self.name, self.epochs, self.steps_per_epoch, self.world = name, epochs, steps_per_epoch, world
        self.every_s = every_s
        self.run_started = time.perf_counter()
        self.steps_done = 0  # in this process (a resumed run counts from its restart)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.epoch_started, self.last_line = epoch, time.perf_counter(), time.perf_counter()

    def step(self, step_in_epoch: int, samples: int, mean_loss: float) -> None:
        self.steps_done += 1
        now = time.perf_counter()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            log.info("[%s] epoch %d/%d step %d/%d: loss %.4f, %.1f samples/s, epoch ETA %s", self.name, self.epoch + 1,
                     self.epochs, step_in_epoch, self.steps_per_epoch, mean_loss,
                     samples * self.world / max(now - self.epoch_started, 1e-9),
                     format_seconds((self.steps_per_epoch - step_in_epoch) * (now - self.epoch_started)
                                    / max(step_in_epoch, 1)))

    def end_epoch(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        per_step = (now - self.run_started) / max(self.steps_done, 1)
        left = (self.epochs - self.epoch - 1) * self.steps_per_epoch * per_step
        terms = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in metrics.items()
                          if k.startswith("epoch/") and k not in ("epoch/loss", "epoch/samples_per_s"))
        log.info("[%s] epoch %d/%d done (step %d): loss %.4f (%s), %.1f samples/s, %s, run ETA %s", self.name,
                 self.epoch + 1, self.epochs, step, metrics.get("epoch/loss", float("nan")), terms,
                 metrics.get("epoch/samples_per_s", 0.0), format_seconds(now - self.epoch_started), format_seconds(left))


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from maskflow.runtime import setup_logging

    setup_logging()  # a worker process: its lines reach the driver's log through Ray
    if log.getEffectiveLevel() > logging.DEBUG:
        # Ray Train logs every report (metrics and checkpoint path, ~700 characters) under a logger named by its
        # source file, which its LoggingConfig does not reach; rank 0's epoch line says the same, readably.
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    plugin: ModelPlugin = loop_config["plugin"]
    cfg = plugin.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.loop.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.loop.seed + rank)
    device = ray.train.torch.get_device()
    use_amp = cfg.loop.amp and device.type == "cuda"

    model = ray.train.torch.prepare_model(plugin.build_model())
    optimizer = _make_optimizer(model.parameters(), cfg.optim)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    steps_per_epoch = loop_config["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.loop.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, cfg.optim))

    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=False)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        log.info("rank %d resumed from epoch %d (step %d)", rank, start_epoch, step)

    logger = MLflowStepLogger(loop_config["tracking_uri"], loop_config["run_id"], cfg.loop.log_every_steps) \
        if rank == 0 and loop_config.get("run_id") else None
    shard = ray.train.get_dataset_shard("train")
    progress = EpochProgress(plugin.name, cfg.loop.epochs, steps_per_epoch, world) if rank == 0 else None
    collate = collate_fn(plugin)
    for epoch in range(start_epoch, cfg.loop.epochs):
        model.train()
        sums: dict[str, float] = {}
        n_batches, n_samples, t0 = 0, 0, time.perf_counter()
        if progress:
            progress.start_epoch(epoch)
        # A fresh iterator every epoch: a reused one yields nothing after the first.
        batches = shard.iter_torch_batches(
            batch_size=cfg.loop.batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.loop.seed * 1000 + epoch if cfg.data.shuffle_buffer else None,
            prefetch_batches=2,
        )
        for batch in batches:
            with torch.autocast(device.type, enabled=use_amp):
                losses = plugin.losses(model, batch, device)
                loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: {({k: float(v) for k, v in losses.items()})}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.grad_clip_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            n_batches += 1
            n_samples += plugin.batch_size_of(batch)
            values = {k: float(v.detach()) for k, v in losses.items()}
            values["loss"] = float(loss.detach())
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if logger and step % cfg.loop.log_every_steps == 0:
                logger.log({**{f"train/{k}": v for k, v in values.items()}, "train/lr": scheduler.get_last_lr()[0]}, step)
            if progress:
                progress.step(n_batches, n_samples, sums["loss"] / n_batches)
            _maybe_chaos(step, rank)
        seconds = time.perf_counter() - t0
        metrics = {f"epoch/{k}": v / max(n_batches, 1) for k, v in sums.items()}
        metrics.update({"epoch": epoch, "step": step, "epoch/samples_per_s": n_samples * world / max(seconds, 1e-9)})
        if logger:
            logger.log(metrics, step)
        if progress:
            progress.end_epoch(step, metrics)
        last = epoch == cfg.loop.epochs - 1
        if last or (epoch + 1) % cfg.loop.checkpoint_every_epochs == 0:
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    torch.save(
                        {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                         "step": step},
                        os.path.join(d, CHECKPOINT_FILE),
                    )
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=ckpt)  # a barrier: every rank calls it


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


# --------------------------------------------------------------------------------------------- driver side


def training_dataset(train_uri: str, options: StorageOptions, seed: int):
    """Ray Dataset over a stage output's shards (raw entry bytes), file order shuffled from the seed."""
    import ray.data
    from ray.data import FileShuffleConfig

    uris = shards.shard_uris(train_uri, options)
    if not uris:
        raise storage.StorageError(f"data.train: {train_uri} holds no samples")
    fs, _ = storage.pyarrow_filesystem(uris[0], options)
    paths = [storage.pyarrow_filesystem(u, options)[1] for u in uris]
    dataset = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, shuffle=FileShuffleConfig(seed=seed))
    # Ray Train's split coordinator runs this dataset once per epoch in a process of its own: with bars "on" and no
    # terminal there it logs progress at INFO, which cluster/ray_data_logging.yaml keeps off the console; with them off
    # (this driver's setting) it would warn about it once per run.
    dataset.context.enable_progress_bars = True
    dataset.context.use_ray_tqdm = False  # else its bars stream to the driver's log line by line
    return dataset, shards.read_manifest(train_uri, options)["samples"]


def _find_or_create_run(cfg: TrainJobConfig, run_name: str, model_name: str) -> str:
    """The MLflow run of a training run name: the existing one when resuming, else a new one."""
    import mlflow

    existing = mlflow.search_runs(
        filter_string=f"tags.`maskflow.train_name` = '{run_name}'", output_format="list", max_results=1
    )
    if existing:
        log.info("resuming MLflow run %s of training run %s", existing[0].info.run_id, run_name)
        return existing[0].info.run_id
    with mlflow.start_run(run_name=run_name, tags={"maskflow.job": f"train-{model_name}",
                                                   "maskflow.train_name": run_name}) as run:
        tracking.log_config(cfg)
        return run.info.run_id


def fit(plugin: ModelPlugin) -> FitResult:
    """Train ``plugin``'s model as configured; log, register (alias ``candidate``) and return the result."""
    import mlflow

    cfg = plugin.cfg
    options = cfg.storage.options()
    # Fail fast, before Ray starts: inputs readable, checkpoint location writable.
    storage.check_uri(storage.join(cfg.data.train, shards.MANIFEST), for_write=False, options=options,
                      what="data.train (manifest)")
    storage.check_uri(cfg.run.storage_path, for_write=True, options=options, what="run.storage_path")
    run_name = cfg.run.name or f"{plugin.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking.setup(cfg.tracking, options)
    run_id = _find_or_create_run(cfg, run_name, plugin.name)

    init_ray(cfg.ray)  # before Ray's first import in this process (init_ray sets how Ray authenticates)
    import ray.train
    import torch
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from maskflow.runtime import cluster_has_gpus

    use_gpu = cluster_has_gpus() if cfg.scaling.use_gpu is None else cfg.scaling.use_gpu
    dataset, n_samples = training_dataset(cfg.data.train, options, cfg.loop.seed)
    steps_per_epoch = math.ceil(n_samples / (cfg.loop.batch_size * cfg.scaling.workers))
    fs, storage_path = storage.pyarrow_filesystem(cfg.run.storage_path, options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plugin": plugin, "run_id": run_id, "steps_per_epoch": steps_per_epoch,
                           "tracking_uri": tracking.resolved_tracking_uri(cfg.tracking)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
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
        datasets={"train": dataset},
        # explicit options: Ray Train's defaults copy a deprecated field (exclude_resources) in every worker
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions()),
    )
    log.info("training %s: run %s, %d samples, %d steps/epoch x %d epochs on %d worker(s)%s", plugin.name, run_name,
             n_samples, steps_per_epoch, cfg.loop.epochs, cfg.scaling.workers, " with GPUs" if use_gpu else "")
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint: {result.error}")
    checkpoint_path = result.checkpoint.path
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}

    model = plugin.build_model()
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    model.eval()
    out = FitResult(run_id, run_name, checkpoint_path, metrics)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({"train_seconds": seconds})
        mlflow.set_tag("maskflow.checkpoint", checkpoint_path)
        info = plugin.log_model(model, None)
        out.model_uri = info.model_uri
        if cfg.registry.model_name:
            out.model_version = tracking.register_logged_model(info.model_uri, cfg.registry.model_name, run_id)
            log.info("registered %s version %s (alias %s)", cfg.registry.model_name, out.model_version,
                     tracking.CANDIDATE)
    return out
