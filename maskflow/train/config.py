"""The trainer's config blocks: every model's training config subclasses :class:`TrainJobConfig` and adds its own
(``model``, ``loss``, ``augment``...). Torch-free at import, so a config error prints before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from maskflow.config import Uri, require
from maskflow.runtime import Common


def uri_list(value: str | list[str]) -> list[str]:
    """A ``data.train``/``data.val`` value as a list of stage outputs ("" = none)."""
    if isinstance(value, str):
        return [value] if value else []
    return [v for v in value if v]


@dataclass
class DataConfig:
    # One stage output (a directory with manifest.json) or a list of them (pair sets made with other seeds...).
    train: Uri | list[Uri] = ""
    val: Uri | list[Uri] = ""  # "" = no validation split
    shuffle_buffer: int = 64  # rows in each worker's local shuffle buffer (0: off)
    val_batch_size: int | None = None  # None: loop.batch_size

    def validate(self) -> None:
        require(bool(uri_list(self.train)), "train", "required: the training shards' directory URI (or a list)")
        require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        require(self.val_batch_size is None or self.val_batch_size >= 1, "val_batch_size", "must be at least 1")

    @property
    def train_uris(self) -> list[str]:
        return uri_list(self.train)

    @property
    def val_uris(self) -> list[str]:
        return uri_list(self.val)


@dataclass
class ParamGroupConfig:
    prefix: str = ""  # parameters whose name starts with this (the first matching group wins)
    lr_mult: float = 1.0
    weight_decay: float | None = None  # None: optim.weight_decay

    def validate(self) -> None:
        require(bool(self.prefix), "prefix", "required: a parameter name prefix (e.g. backbone.)")
        require(self.lr_mult >= 0, "lr_mult", "must be >= 0")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    weight_decay: float = 1e-4
    grad_clip_norm: float | None = None  # max global gradient norm; None: no clipping
    param_groups: list[ParamGroupConfig] = field(default_factory=list)  # per-prefix lr multipliers / weight decay

    def validate(self) -> None:
        require(self.lr > 0, "lr", "must be positive")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm", "must be positive")


@dataclass
class ScheduleConfig:
    """The learning-rate schedule: a linear warm-up over ``warmup_steps``, then

    * ``constant``;
    * ``cosine``: cosine decay to ``min_lr`` over the run's steps;
    * ``step``: multiplied by ``gamma`` at each epoch in ``milestones``;
    * ``plateau``: multiplied by ``gamma`` when ``validation.metric`` has not improved for ``patience`` validations
      (HSTN: Adam 1e-4 divided by 10 on a validation plateau), never below ``min_lr``;
    * ``log_epoch``: constant within an epoch, log-evenly spaced over the epochs from ``optim.lr`` (first epoch) to
      ``min_lr`` (last epoch) (FFD-Net: 1e-4 to 1e-7 over 10 epochs).
    """

    name: Literal["constant", "cosine", "step", "plateau", "log_epoch"] = "cosine"
    warmup_steps: int = 50
    milestones: list[int] = field(default_factory=list)  # epochs (step)
    gamma: float = 0.1  # step, plateau
    patience: int = 2  # validations without improvement (plateau)
    min_lr: float = 0.0

    def validate(self) -> None:
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        require(self.patience >= 0, "patience", "must be >= 0")
        require(self.min_lr >= 0, "min_lr", "must be >= 0")
        require(all(m >= 1 for m in self.milestones), "milestones", "epochs must be >= 1")
        require(self.name != "step" or bool(self.milestones), "milestones", "required by schedule.name=step")
        require(self.name != "log_epoch" or self.min_lr > 0, "min_lr",
                "required by schedule.name=log_epoch (> 0: the last epoch's learning rate)")


@dataclass
class ValidationConfig:
    every_epochs: int = 1  # a validation pass every N epochs (and after the last); needs data.val
    metric: str = ""  # the validation value that picks the best checkpoint (a key of validation_step); "": loss
    mode: Literal["max", "min"] = "max"
    early_stop_patience: int | None = None  # stop after N validations without improvement; None: never

    def validate(self) -> None:
        require(self.every_epochs >= 1, "every_epochs", "must be at least 1")
        require(self.early_stop_patience is None or self.early_stop_patience >= 1, "early_stop_patience",
                "must be at least 1")


@dataclass
class InitConfig:
    """Initialise (part of) the model from another model before training (never on resume): detectron2's
    ``MODEL.WEIGHTS``, mmengine's ``load_from``."""

    from_: Uri = ""  # written `from`: models:/name@alias | models:/name/N | runs:/.. | a checkpoint (state.pt, dir)
    # source key prefix -> this model's key prefix; source keys outside every prefix are dropped ({}: keep all as-is)
    prefix_map: dict[str, str] = field(default_factory=dict)
    strict: bool = False  # every key of the model must be initialised


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
        require(self.log_every_steps >= 1, "log_every_steps", "must be at least 1")


@dataclass
class ScalingConfig:
    workers: int = 1
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_worker: float = 1.0
    # PACK: workers on as few nodes as fit them (fast local collectives); SPREAD: one per node where possible (a
    # node lost costs one worker's share; the restart packs the group onto the nodes that are left)
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"

    def validate(self) -> None:
        require(self.workers >= 1, "workers", "must be at least 1")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")


@dataclass
class RunConfig:
    storage_path: Uri = "runs/train"  # checkpoints (local path or s3://)
    name: str | None = None  # None: <model>-<timestamp>; re-using a name resumes that run
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2  # besides the best one by validation.metric


@dataclass
class RegistryConfig:
    model_name: str = ""  # registered model name; "" = don't register
    pip_requirements: list[str] = field(default_factory=list)  # extra requirements logged with the model


@dataclass
class TrainJobConfig(Common):
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    init: InitConfig = field(default_factory=InitConfig)
    freeze: list[str] = field(default_factory=list)  # module name prefixes: no gradients, kept in eval mode
    loop: LoopConfig = field(default_factory=LoopConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def validate(self) -> None:
        require(self.schedule.name != "plateau" or bool(self.data.val_uris), "schedule.name",
                "plateau needs a validation split (data.val)")
        require(self.validation.early_stop_patience is None or bool(self.data.val_uris),
                "validation.early_stop_patience", "needs a validation split (data.val)")
        require(not self.validation.metric or bool(self.data.val_uris), "validation.metric",
                "needs a validation split (data.val)")
