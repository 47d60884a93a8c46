"""Optimizer with parameter groups, and the learning-rate schedule (see :class:`maskflow.train.config.ScheduleConfig`).

The schedule is one small object rather than a chain of torch schedulers: the learning rate of every group at step
``s`` is ``base_lr * lr_mult * warm_up(s) * decay(s) * plateau_factor``, set on the optimizer before each step, so
its value at any step is a pure function of the config (and, for ``plateau``, of the validation history it keeps
in its state dict).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from maskflow.train.config import OptimConfig, ParamGroupConfig, ScheduleConfig

if TYPE_CHECKING:
    import torch


def param_groups_by_prefix(model, groups: list[ParamGroupConfig]) -> list[dict]:
    """Trainable parameters in groups by name prefix (the first matching prefix wins). The parameters no prefix
    matches form the first group (``lr_mult`` 1: the rate the run logs as ``lr``); empty groups are dropped."""
    buckets: list[list] = [[] for _ in groups] + [[]]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")  # DDP's wrapper
        i = next((i for i, g in enumerate(groups) if name.startswith(g.prefix)), len(groups))
        buckets[i].append(p)
    out = [{"params": buckets[-1], "lr_mult": 1.0, "weight_decay": None, "prefix": ""}] if buckets[-1] else []
    out += [{"params": b, "lr_mult": g.lr_mult, "weight_decay": g.weight_decay, "prefix": g.prefix}
            for g, b in zip(groups, buckets) if b]
    return out


def make_optimizer(groups: list[dict], cfg: OptimConfig) -> "torch.optim.Optimizer":
    """The optimizer over ``groups`` (``{"params", "lr_mult", "weight_decay"}``); each group remembers its
    ``base_lr`` for the schedule."""
    import torch

    torch_groups = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        wd = cfg.weight_decay if g.get("weight_decay") is None else g["weight_decay"]
        lr = cfg.lr * g.get("lr_mult", 1.0)
        torch_groups.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": wd,
                             "prefix": g.get("prefix", "")})
    if not torch_groups:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    if cfg.name == "sgd":
        return torch.optim.SGD(torch_groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "adam":
        # Adam's weight_decay is L2 added to the gradient (the papers' "Adam"); adamw decouples it.
        return torch.optim.Adam(torch_groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=tuple(cfg.betas))


class LRSchedule:
    """Sets every group's learning rate before each step; ``plateau`` also listens to validation results."""

    def __init__(self, optimizer, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int, mode: str = "max"):
        self.optimizer, self.cfg, self.mode = optimizer, cfg, mode
        self.steps_per_epoch, self.total_steps = max(1, steps_per_epoch), max(1, total_steps)
        self.plateau_factor = 1.0
        self.best: float | None = None
        self.bad_validations = 0

    def factor(self, step: int, epoch: int | None = None) -> float:
        """The multiplier of each group's base learning rate at (0-based) ``step`` of (0-based) ``epoch`` (default:
        ``step // steps_per_epoch``), before ``min_lr``."""
        cfg = self.cfg
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.name == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        elif cfg.name == "step":
            epoch = step // self.steps_per_epoch if epoch is None else epoch
            decay = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        elif cfg.name == "log_epoch":
            epoch = step // self.steps_per_epoch if epoch is None else epoch
            epochs = max(1, round(self.total_steps / self.steps_per_epoch))
            # relative to the first group's base rate (optim.lr, the rate logged as lr); others keep their lr_mult
            ratio = cfg.min_lr / self.optimizer.param_groups[0]["base_lr"]
            decay = ratio ** (min(epoch, epochs - 1) / (epochs - 1)) if epochs > 1 else 1.0
        else:
            decay = 1.0
        return warm * decay * self.plateau_factor

    def apply(self, step: int, epoch: int | None = None) -> float:
        """Set the learning rates for ``step``; returns the first group's. Decay stops at ``min_lr`` (a group whose
        base rate is 0 stays at 0)."""
        f = self.factor(step, epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f if g["base_lr"] == 0 else max(g["base_lr"] * f, min(self.cfg.min_lr, g["base_lr"]))
        return self.optimizer.param_groups[0]["lr"]

    def on_validation(self, value: float) -> bool:
        """Record a validation value (``plateau``: divide by ``1/gamma`` after ``patience`` bad ones); returns
        whether the learning rate was reduced."""
        if self.cfg.name != "plateau" or value is None or math.isnan(value):
            return False
        improved = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if improved:
            self.best, self.bad_validations = value, 0
            return False
        self.bad_validations += 1
        if self.bad_validations > self.cfg.patience:
            self.plateau_factor *= self.cfg.gamma
            self.bad_validations = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"plateau_factor": self.plateau_factor, "best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_factor = state["plateau_factor"]
        self.best, self.bad_validations = state["best"], state["bad_validations"]
