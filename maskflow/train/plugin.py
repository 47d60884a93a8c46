"""What one paper's model contributes to the trainer harness (detectron2's contract: a loss dict in training).

A :class:`ModelPlugin` is pickled to the Ray Train workers: keep heavy state (networks, datasets) out of
``__init__``. The harness calls, per worker:

* ``build_model()`` once;
* ``collate(batch, rng)`` on every Ray Data numpy batch of shard rows (columns: entry suffixes such as ``image.png``,
  values: raw bytes; plus ``__key__``). ``rng`` is a ``numpy.random.Generator`` for augmentation in training, made
  from ``(seed, epoch, first key of the batch)`` so it is reproducible and thread-safe; it is ``None`` in validation
  and inference (no augmentation there);
* ``losses(model, batch, device)`` in train mode: a dict of weighted loss terms, **all of which are summed** into the
  objective, or a :class:`StepOutput` that adds ``metrics`` (accuracy, EPE, ...) which are logged, never optimised;
* ``validation_step(model, batch, device)`` in eval mode under ``torch.no_grad()``: ``{name: per-sample values}``
  (1-d tensors or arrays, one value per sample of the batch); the harness averages each over the whole validation
  split (a sample-weighted mean, whatever the batch sizes) and logs them as ``val/<name>``;
* ``param_groups(model)`` to build the optimizer: a list of ``{"params": [...], "lr_mult": float,
  "weight_decay": float | None}`` (default: the groups of ``optim.param_groups`` by name prefix, the rest in one);
* ``log_model(model, registered_name)`` at the end, on the driver.

``name`` is the model's kind (``"maskrcnn"``, ``"hstn"``...): it is recorded on every registered version, so a job
given ``models:/x@champion`` knows which plugin loads it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from maskflow.train.config import TrainJobConfig


@dataclass
class StepOutput:
    """A training step's result: ``losses`` (summed into the objective) and ``metrics`` (logged only)."""

    losses: dict[str, "torch.Tensor"]
    metrics: dict[str, "torch.Tensor | float"] = field(default_factory=dict)


def split_step_output(out: "dict | StepOutput") -> StepOutput:
    return out if isinstance(out, StepOutput) else StepOutput(dict(out))


class ModelPlugin(abc.ABC):
    """Base class of a model plugin; see the module docstring for when each method runs."""

    name = "model"

    def __init__(self, cfg: "TrainJobConfig"):
        self.cfg = cfg

    @abc.abstractmethod
    def build_model(self) -> "torch.nn.Module":
        """The network (the harness moves it to the device and wraps it for DDP)."""

    @abc.abstractmethod
    def collate(self, batch: dict, rng: "np.random.Generator | None") -> Any:
        """A Ray Data numpy batch of shard rows → a model batch (``rng`` is None outside training)."""

    @abc.abstractmethod
    def losses(self, model, batch: Any, device) -> "dict | StepOutput":
        """The weighted loss terms of one batch (moves the batch to ``device``); optionally with metrics."""

    def validation_step(self, model, batch: Any, device) -> dict:
        """Per-sample validation values of one batch (``{name: 1-d tensor}``); none by default."""
        return {}

    def param_groups(self, model) -> list[dict]:
        """Optimizer parameter groups; default: by ``optim.param_groups`` name prefixes (see the trainer config)."""
        from maskflow.train.optim import param_groups_by_prefix

        return param_groups_by_prefix(model, self.cfg.optim.param_groups)

    def batch_size_of(self, batch: Any) -> int:
        """Samples in a model batch: the length of its first element (a tuple/list batch) or of its first value (a
        dict batch)."""
        first = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values())) if isinstance(batch, dict) \
            else batch
        return len(first)

    def log_model(self, model, registered_name: str | None):
        """Log the trained model to the active MLflow run; returns the ModelInfo."""
        import mlflow.pytorch

        from maskflow.train.fit import default_pip_requirements

        return mlflow.pytorch.log_model(
            model,
            name="model",
            registered_model_name=registered_name or None,
            # Detection models take lists of variable-size images and do not torch.export: pickle the module.
            serialization_format="pickle",
            pip_requirements=default_pip_requirements() + list(self.cfg.registry.pip_requirements),
        )
