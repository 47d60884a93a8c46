"""``init.from``: initialise (part of) a model from another model's weights, on the driver before Ray starts.

The source is any weights URI :func:`maskflow.models.loading.resolve_model_uri` accepts (a registered version or
alias, a run's model, a trainer checkpoint). Its state dict's keys are mapped by ``init.prefix_map`` (source prefix
-> this model's prefix; keys under no listed prefix are dropped; an empty map keeps every key as it is), then matched
against the model built from this run's config: what matches in name and shape is loaded (on the workers, before DDP
wraps the model); the rest is reported. Nothing matching at all is a one-line config error, as is ``init.strict``
with any model key left out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from maskflow.config import ConfigError
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions
from maskflow.train.config import InitConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class InitReport:
    source: str  # the resolved URI (an alias pinned to its version)
    loaded: list[str] = field(default_factory=list)  # model keys initialised
    missing: list[str] = field(default_factory=list)  # model keys the source did not provide
    unexpected: list[str] = field(default_factory=list)  # mapped source keys the model does not have
    shape_mismatch: list[str] = field(default_factory=list)  # same name, other shape (not loaded)

    def summary(self) -> str:
        return (f"init.from {self.source}: {len(self.loaded)} tensors loaded, {len(self.missing)} model keys not in "
                f"the source, {len(self.unexpected)} source keys not in the model, {len(self.shape_mismatch)} of "
                "another shape")

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)


def source_state_dict(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> dict[str, "torch.Tensor"]:
    """The state dict of the model at a weights URI (already resolved)."""
    import torch

    from maskflow.models.loading import REGISTRY_SCHEMES, load_state_dict

    if uri.startswith(REGISTRY_SCHEMES):
        import mlflow.pytorch

        return mlflow.pytorch.load_model(uri, map_location=torch.device("cpu")).state_dict()
    if uri.startswith("torchvision:"):
        raise ConfigError("init.from: torchvision weights initialise a backbone through the model's own config "
                          "(e.g. model.backbone.weights), not init.from")
    return load_state_dict(uri, options)


def map_keys(state: dict, prefix_map: dict[str, str]) -> dict:
    """Source keys renamed by the first matching prefix; keys under no prefix dropped (an empty map: all kept)."""
    if not prefix_map:
        return dict(state)
    out = {}
    for key, value in state.items():
        for src, dst in prefix_map.items():
            if key.startswith(src):
                out[dst + key[len(src):]] = value
                break
    return out


def match_state(model_state: dict, source: dict, uri: str) -> tuple[dict, InitReport]:
    """The part of ``source`` that fits ``model_state`` (same key, same shape), and the report."""
    report = InitReport(uri)
    loadable = {}
    for key, value in source.items():
        if key not in model_state:
            report.unexpected.append(key)
        elif tuple(model_state[key].shape) != tuple(value.shape):
            report.shape_mismatch.append(key)
        else:
            loadable[key] = value
    report.loaded = sorted(loadable)
    report.missing = sorted(set(model_state) - set(loadable))
    return loadable, report


def initial_state(cfg: InitConfig, model, options: StorageOptions = DEFAULT_OPTIONS) -> tuple[dict, InitReport]:
    """Resolve ``init.from``, load its weights, map and match them against ``model``; raise a one-line
    :class:`ConfigError` when nothing matches (or, with ``strict``, when anything is missing)."""
    from maskflow.models.loading import resolve_model_uri

    uri = resolve_model_uri(cfg.from_, "init.from", options)
    source = map_keys(source_state_dict(uri, options), cfg.prefix_map)
    loadable, report = match_state(model.state_dict(), source, uri)
    if not loadable:
        examples = ", ".join(list(source)[:3]) or "none (no source key is under init.prefix_map)"
        raise ConfigError(f"init.from: no tensor of {uri} matches this model (mapped source keys: {examples}; model "
                          f"keys: {', '.join(list(model.state_dict())[:3])}); fix init.prefix_map")
    if cfg.strict and report.missing:
        raise ConfigError(f"init.strict: {len(report.missing)} model keys are not initialised from {uri} "
                          f"(e.g. {report.missing[0]})")
    log.info(report.summary())
    return loadable, report
