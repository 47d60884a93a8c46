"""Promote a model version to ``champion`` only if its evaluation metric beats the current champion's.

    python pipelines/promote.py model=maskflow-maskrcnn [version=7] [metric=AR_100 higher_is_better=true]

The metric and its direction default to those the version's evaluation recorded (its evaluator's headline metric:
AR is higher-is-better, EPE lower), else to its kind's evaluator; ``metric=`` / ``higher_is_better=`` override them.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

import json
from dataclasses import dataclass

from maskflow import config, runtime, tracking
from maskflow.config import require


@dataclass
class PromoteConfig(runtime.Common):
    model: str = ""
    version: str | None = None  # None: the version aliased `candidate`
    metric: str | None = None  # None: the version's recorded headline metric (maskflow.metric)
    higher_is_better: bool | None = None  # None: the recorded direction (maskflow.higher_is_better)

    def validate(self) -> None:
        require(bool(self.model), "model", "required: the registered model name")
        require(self.metric is None or bool(self.metric), "metric", "must not be empty (omit it for the recorded one)")


def main(argv=None) -> dict:
    cfg = config.parse_cli(PromoteConfig, argv, description=__doc__)
    runtime.setup_logging()
    tracking.setup(cfg.tracking, cfg.storage.options())
    try:
        decision = tracking.promote(cfg.model, cfg.metric, cfg.version, cfg.higher_is_better)
    except ValueError as e:  # no candidate, no recorded evaluation: the line says what to do
        raise config.ConfigError(f"model: {e}") from None
    print(json.dumps(decision, indent=1))
    return decision


if __name__ == "__main__":
    config.main_guard(main)
