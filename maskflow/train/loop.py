"""The per-worker training loop (Ray Train V2), detectron2's shape: :meth:`WorkerLoop.train_step` does data, loss
dict, backward and step; everything else — MLflow logging, progress lines, fault injection — is a :class:`Hook`;
validation, checkpointing and stopping are the loop's own short methods.

Per epoch: train over this worker's split of ``data.train``; every ``validation.every_epochs`` (and after the last
epoch) a pass over the whole ``data.val`` computing the plugin's per-sample values, averaged over the split and then
across workers (so every rank takes the same decisions); the best weights by ``validation.metric`` travel inside
every checkpoint (``best_model``), so the registered model is the best one whatever checkpoints Ray keeps; the
``plateau`` schedule and early stopping listen to the same value. A non-finite loss on any rank stops every rank
(one flag all-reduced per step) and the run ends with the last good checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import zlib
from typing import Any

from maskflow.runtime import format_seconds
from maskflow.train.plugin import ModelPlugin, split_step_output

log = logging.getLogger("maskflow.train")

CHECKPOINT_FILE = "state.pt"
STOP_NONFINITE = "nonfinite_loss"
STOP_EARLY = "early_stop"
STOP_ERROR = "error"
STOP_TAG = "maskflow.stop"
# Fault injection for tests of recovery: the worker of rank 0 exits once at this global step (then drops the marker).
CHAOS_STEP_ENV = "MASKFLOW_CHAOS_EXIT_AT_STEP"
CHAOS_MARKER_ENV = "MASKFLOW_CHAOS_MARKER"


# --------------------------------------------------------------------------------------------- hooks


class StopRun(Exception):
    """A problem every rank meets at the same point (an empty validation split, an unknown validation metric):
    the run stops and the driver reports it in one line, with no restart (a restart would meet it again)."""


class Hook:
    """Extension point of the loop (detectron2's HookBase). ``loop`` is the :class:`WorkerLoop`."""

    def before_epoch(self, loop: "WorkerLoop") -> None: ...

    def after_step(self, loop: "WorkerLoop", values: dict[str, float]) -> None: ...

    def after_epoch(self, loop: "WorkerLoop", metrics: dict[str, float]) -> None: ...


class MLflowHook(Hook):
    """Rank 0: step values (losses, metrics, lr) every ``every`` steps and epoch metrics into the driver's run."""

    def __init__(self, tracking_uri: str, run_id: str, every: int):
        from mlflow import MlflowClient

        self.client, self.run_id, self.every = MlflowClient(tracking_uri), run_id, every

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(items), 900):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=items[i:i + 900])

    def after_step(self, loop, values):
        if loop.step % self.every == 0:
            self._log({f"train/{k}": v for k, v in values.items()}, loop.step)

    def after_epoch(self, loop, metrics):
        self._log(metrics, loop.step)


class ProgressHook(Hook):
    """Rank 0's progress lines: every ``every_s`` seconds within an epoch and at its end — step, samples/s, the
    running mean of the loss, time left in the epoch and in the run."""

    def __init__(self, name: str, epochs: int, steps_per_epoch: int, world: int, every_s: float = 30.0):
        self.name, self.epochs, self.steps_per_epoch, self.world = name, epochs, steps_per_epoch, world
        self.every_s = every_s
        self.run_started = time.perf_counter()
        self.steps_done = 0  # in this process (a resumed run counts from its restart)

    def before_epoch(self, loop):
        self.epoch_started = self.last_line = time.perf_counter()
        self.loss_sum, self.n = 0.0, 0

    def after_step(self, loop, values):
        self.steps_done += 1
        self.loss_sum, self.n = self.loss_sum + values["loss"], self.n + 1
        now = time.perf_counter()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            done = loop.batches_in_epoch
            log.info("[%s] epoch %d/%d step %d/~%d: loss %.4f, %.1f samples/s, epoch ETA %s", self.name,
                     loop.epoch + 1, self.epochs, done, self.steps_per_epoch, self.loss_sum / self.n,
                     loop.samples_in_epoch * self.world / max(now - self.epoch_started, 1e-9),
                     format_seconds(max(0, self.steps_per_epoch - done) * (now - self.epoch_started) / max(done, 1)))

    def after_epoch(self, loop, metrics):
        now = time.perf_counter()
        per_step = (now - self.run_started) / max(self.steps_done, 1)
        left = (self.epochs - loop.epoch - 1) * self.steps_per_epoch * per_step
        terms = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in metrics.items()
                          if k.startswith("epoch/") and k not in ("epoch/loss", "epoch/samples_per_s", "epoch/steps"))
        val = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("val/"))
        log.info("[%s] epoch %d/%d done (step %d): loss %.4f (%s), %.1f samples/s, %s, run ETA %s%s", self.name,
                 loop.epoch + 1, self.epochs, loop.step, metrics.get("epoch/loss", float("nan")), terms,
                 metrics.get("epoch/samples_per_s", 0.0), format_seconds(now - self.epoch_started),
                 format_seconds(left), f"; validation: {val}" if val else "")


class ChaosHook(Hook):
    """Exits rank 0's process once at a given step (``MASKFLOW_CHAOS_EXIT_AT_STEP``), for recovery tests."""

    def after_step(self, loop, values):
        target, marker = os.environ.get(CHAOS_STEP_ENV), os.environ.get(CHAOS_MARKER_ENV)
        if target and marker and loop.rank == 0 and loop.step == int(target) and not os.path.exists(marker):
            open(marker, "w").close()
            log.warning("chaos: worker exiting at step %d to test recovery", loop.step)
            os._exit(1)


# --------------------------------------------------------------------------------------------- helpers


def collate_fn(plugin: ModelPlugin, seed: int | None, epoch: int = 0):
    """The plugin's ``collate`` as the callable class Ray Data's ``iter_torch_batches`` takes (a bare function is
    deprecated there). ``seed`` None: no augmentation (validation). The generator of each batch comes from
    ``(seed, epoch, crc32 of its first key)``: reproducible, and safe in Ray Data's collate threads. Built in the
    worker: Ray Data's base class is not imported on the driver."""
    import numpy as np
    from ray.data.collate_fn import NumpyBatchCollateFn

    class PluginCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> Any:
            rng = None
            if seed is not None:
                keys = batch.get("__key__")
                first = str(keys[0]) if keys is not None and len(keys) else ""
                rng = np.random.default_rng([seed, epoch, zlib.crc32(first.encode())])
            return plugin.collate(batch, rng)

    return PluginCollate()


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def module_matches(name: str, prefixes: list[str]) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p.rstrip(".") + ".") for p in prefixes)


def freeze(model, prefixes: list[str]) -> list[str]:
    """No gradients for parameters under the module prefixes; returns the frozen parameter names."""
    frozen = []
    for name, p in model.named_parameters():
        if module_matches(name, prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def keep_frozen_in_eval(model, prefixes: list[str]) -> None:
    """After ``model.train()``: frozen modules back in eval mode, so BatchNorm statistics and dropout stay fixed."""
    if prefixes:
        for name, module in unwrap(model).named_modules():
            if name and module_matches(name, prefixes):
                module.eval()


def better(value: float, best: float | None, mode: str) -> bool:
    if value is None or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


# --------------------------------------------------------------------------------------------- the loop


class WorkerLoop:
    """One worker's training: built from the plugin and the driver's settings, run by :meth:`run`."""

    def __init__(self, plugin: ModelPlugin, settings: dict):
        import ray.train
        import ray.train.torch
        import torch

        self.plugin, self.cfg, self.settings = plugin, plugin.cfg, settings
        cfg = self.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(cfg.loop.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
        torch.manual_seed(cfg.loop.seed + self.rank)
        self.device = ray.train.torch.get_device()
        self.use_amp = cfg.loop.amp and self.device.type == "cuda"

        model = plugin.build_model()
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and settings.get("init_state"):
            # Initialise before DDP wraps the model (never on resume: the checkpoint has the trained weights).
            missing = set(model.state_dict()) - set(settings["init_state"])
            model.load_state_dict(settings["init_state"], strict=False)
            if self.rank == 0:
                log.info("initialised %d tensors from %s (%d of the model's keys not in it)",
                         len(settings["init_state"]), cfg.init.from_, len(missing))
        freeze(model, cfg.freeze)
        model.to(self.device)
        self.model = ray.train.torch.prepare_model(model, move_to_device=False)
        from maskflow.train.optim import LRSchedule, make_optimizer

        self.optimizer = make_optimizer(plugin.param_groups(unwrap(self.model)), cfg.optim)
        self.steps_per_epoch = settings["steps_per_epoch"]
        self.schedule = LRSchedule(self.optimizer, cfg.schedule, self.steps_per_epoch,
                                   self.steps_per_epoch * cfg.loop.epochs, cfg.validation.mode)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_epoch, self.step, self.epoch = 0, 0, 0
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None  # the best weights so far (CPU copy), saved in every checkpoint
        self.bad_validations = 0
        if checkpoint:
            self._resume(checkpoint)

        self.hooks: list[Hook] = [ChaosHook()]
        if self.rank == 0:
            if settings.get("run_id"):
                self.hooks.insert(0, MLflowHook(settings["tracking_uri"], settings["run_id"], cfg.loop.log_every_steps))
            self.hooks.insert(0, ProgressHook(plugin.name, cfg.loop.epochs, self.steps_per_epoch, self.world))

    def _resume(self, checkpoint) -> None:
        import torch

        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=self.device, weights_only=False)
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.step = state["epoch"] + 1, state["step"]
        self.best_value, self.best_epoch = state.get("best_value"), state.get("best_epoch")
        self.best_state, self.bad_validations = state.get("best_model"), state.get("bad_validations", 0)
        log.info("rank %d resumed from epoch %d (step %d)", self.rank, self.start_epoch, self.step)

    # -- one step
    def train_step(self, batch) -> dict[str, float] | None:
        """Forward, loss terms summed, backward, optimizer step. Returns the step's values (loss terms, metrics,
        lr), or None when the loss was not finite on some rank (no update was made)."""
        import torch

        lr = self.schedule.apply(self.step, self.epoch)
        with torch.autocast(self.device.type, enabled=self.use_amp):
            out = split_step_output(self.plugin.losses(self.model, batch, self.device))
            loss = sum(out.losses.values())
        if not self._all_finite(loss):
            self.nonfinite = {k: float(v) for k, v in out.losses.items()}
            return None
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        values = {k: float(v.detach()) for k, v in out.losses.items()}
        values["loss"] = float(loss.detach())
        values.update({f"metric/{k}": float(v.detach() if hasattr(v, "detach") else v)
                       for k, v in out.metrics.items()})
        values["lr"] = lr
        return values

    def _all_finite(self, loss) -> bool:
        import torch
        import torch.distributed as dist

        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops together
        return bool(finite.item())

    # -- validation
    def validate(self) -> dict[str, float]:
        """The plugin's per-sample values averaged over the whole validation split, then across ranks."""
        import numpy as np
        import torch
        import torch.distributed as dist

        import ray.train

        model = unwrap(self.model)
        model.eval()
        sums: dict[str, float] = {}
        count = 0
        batches = ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=self.cfg.data.val_batch_size or self.cfg.loop.batch_size,
            collate_fn=collate_fn(self.plugin, None), prefetch_batches=1)
        with torch.no_grad():
            for batch in batches:
                values = self.plugin.validation_step(model, batch, self.device)
                n = None
                for k, v in values.items():
                    arr = np.asarray(v.detach().float().cpu() if hasattr(v, "detach") else v, dtype=np.float64)
                    arr = arr.reshape(-1)
                    n = len(arr) if n is None else n
                    sums[k] = sums.get(k, 0.0) + float(np.nansum(arr))
                    sums[f"__n_{k}"] = sums.get(f"__n_{k}", 0.0) + float(np.isfinite(arr).sum())
                count += n or self.plugin.batch_size_of(batch)
        names = sorted(k for k in sums if not k.startswith("__n_"))
        vec = torch.tensor([sums[k] for k in names] + [sums[f"__n_{k}"] for k in names] + [count],
                           dtype=torch.float64)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(vec)
            vec /= self.world
        if vec[-1] == 0:
            raise StopRun(f"data.val: the validation split yielded no samples ({', '.join(self.settings['val_uris'])})")
        k = len(names)
        out = {f"val/{name}": float(vec[i] / vec[k + i]) if vec[k + i] > 0 else float("nan")
               for i, name in enumerate(names)}
        out["val/samples"] = float(vec[-1])
        return out

    # -- checkpoint
    def report(self, metrics: dict, with_checkpoint: bool) -> None:
        """``ray.train.report`` on every rank (a barrier); rank 0 attaches the checkpoint."""
        import ray.train
        import torch

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if with_checkpoint and self.rank == 0:
                torch.save({"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                            "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                            "epoch": self.epoch, "step": self.step, "best_value": self.best_value,
                            "best_epoch": self.best_epoch, "best_model": self.best_state,
                            "bad_validations": self.bad_validations},
                           os.path.join(d, CHECKPOINT_FILE))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    # -- the run
    def run(self) -> None:
        try:
            self._run()
        except StopRun as e:
            self.stop({"stop": STOP_ERROR, "stop_message": str(e)}, {"epoch": self.epoch, "step": self.step})

    def stop(self, why: dict, metrics: dict) -> None:
        """End the run on every rank without a restart: rank 0 records why in the MLflow run (tag
        ``maskflow.stop``, which the driver reads: Ray Train keeps only metrics reported with a checkpoint), then
        every rank reports without a checkpoint, so the latest one stays the last good one."""
        if self.rank == 0 and self.settings.get("run_id"):
            import json

            from mlflow import MlflowClient

            MlflowClient(self.settings["tracking_uri"]).set_tag(self.settings["run_id"], STOP_TAG, json.dumps(why))
        self.report({**metrics, **why}, with_checkpoint=False)

    def _run(self) -> None:
        cfg = self.cfg
        has_val = bool(self.settings.get("val_uris"))
        key = f"val/{cfg.validation.metric}" if cfg.validation.metric else None  # None: the last model is kept
        for epoch in range(self.start_epoch, cfg.loop.epochs):
            self.epoch = epoch
            metrics, stop = self.train_epoch()
            last = epoch == cfg.loop.epochs - 1
            if stop == STOP_NONFINITE:
                self.stop({"stop": STOP_NONFINITE, "stop_step": self.step, "stop_epoch": epoch,
                           "stop_losses": repr(self.nonfinite)}, metrics)
                return
            validated = has_val and (last or (epoch + 1) % cfg.validation.every_epochs == 0)
            if validated:
                metrics.update(self.validate())
            if validated and key:
                value = metrics.get(key)
                if value is None:
                    raise StopRun(f"validation.metric: {cfg.validation.metric!r} is not among the validation values "
                                  f"{sorted(k[4:] for k in metrics if k.startswith('val/') and k != 'val/samples')}")
                if better(value, self.best_value, cfg.validation.mode):
                    self.best_value, self.best_epoch, self.bad_validations = value, epoch, 0
                    if self.rank == 0:
                        self.best_state = {k: v.detach().to("cpu", copy=True)
                                           for k, v in unwrap(self.model).state_dict().items()}
                else:
                    self.bad_validations += 1
                if self.schedule.on_validation(value) and self.rank == 0:
                    log.info("[%s] %s has not improved for %d validations: learning rate x%g", self.plugin.name,
                             key, cfg.schedule.patience + 1, cfg.schedule.gamma)
                metrics.update({"best/value": self.best_value, "best/epoch": self.best_epoch})
            patience = cfg.validation.early_stop_patience
            early = validated and key is not None and patience is not None and self.bad_validations >= patience and not last
            if early:
                metrics["stop"] = STOP_EARLY
            for hook in self.hooks:
                hook.after_epoch(self, metrics)
            self.report(metrics, with_checkpoint=last or early or validated
                        or (epoch + 1) % cfg.loop.checkpoint_every_epochs == 0)
            if early:
                if self.rank == 0:
                    log.info("[%s] early stop after epoch %d: %s has not improved for %d validations (best %.4g at "
                             "epoch %d)", self.plugin.name, epoch + 1, key, patience, self.best_value,
                             self.best_epoch + 1)
                return

    def train_epoch(self) -> tuple[dict, str | None]:
        import ray.train

        cfg = self.cfg
        self.model.train()
        keep_frozen_in_eval(self.model, cfg.freeze)
        sums: dict[str, float] = {}
        self.batches_in_epoch, self.samples_in_epoch = 0, 0
        t0 = time.perf_counter()
        for hook in self.hooks:
            hook.before_epoch(self)
        # A fresh iterator every epoch: a reused one yields nothing after the first.
        batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=cfg.loop.batch_size,
            collate_fn=collate_fn(self.plugin, cfg.loop.seed, self.epoch),
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.loop.seed * 1000 + self.epoch if cfg.data.shuffle_buffer else None,
            prefetch_batches=2,
        )
        stop = None
        for batch in batches:
            values = self.train_step(batch)
            if values is None:
                stop = STOP_NONFINITE
                break
            self.batches_in_epoch += 1
            self.samples_in_epoch += self.plugin.batch_size_of(batch)
            for k, v in values.items():
                if k != "lr":
                    sums[k] = sums.get(k, 0.0) + v
            for hook in self.hooks:
                hook.after_step(self, values)
        seconds = time.perf_counter() - t0
        n = max(self.batches_in_epoch, 1)
        metrics = {f"epoch/{k}": v / n for k, v in sums.items()}
        metrics.update({"epoch": self.epoch, "step": self.step, "epoch/steps": self.batches_in_epoch,
                        "epoch/samples_per_s": self.samples_in_epoch * self.world / max(seconds, 1e-9),
                        "lr": self.optimizer.param_groups[0]["lr"]})
        metrics.update({f"lr/{g['prefix']}": g["lr"] for g in self.optimizer.param_groups[1:] if g.get("prefix")})
        return metrics, stop


def train_loop_per_worker(settings: dict) -> None:
    """Ray Train's entry point on every worker."""
    from maskflow.runtime import setup_logging

    setup_logging()  # a worker process: its lines reach the driver's log through Ray
    if log.getEffectiveLevel() > logging.DEBUG:
        # Ray Train logs every report (metrics and checkpoint path, ~700 characters) under a logger named by its
        # source file, which its LoggingConfig does not reach; rank 0's epoch line says the same, readably.
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    WorkerLoop(settings["plugin"], settings).run()
