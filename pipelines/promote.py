"""Promote a model version to ``champion`` only if its evaluation metric beats the current champion's.

    python pipelines/promote.py model=maskflow-maskrcnn metric=AR_100 [version=7]
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

import json
from dataclasses import dataclass

from maskflow import config, runtime, tracking
from maskflow.config import require


@dataclass
class PromoteConfig(runtime.Common):
    model: str = ""
    metric: str = "AR_100"
    version: str | None = None  # None: the version aliased `candidate`
    higher_is_better: bool = True

    def validate(self) -> None:
        require(bool(self.model), "model", "required: the registered model name")


def main(argv=None) -> dict:
    cfg = config.parse_cli(PromoteConfig, argv, description=__doc__)
    runtime.setup_logging()
    tracking.setup(cfg.tracking, cfg.storage.options())
    decision = tracking.promote(cfg.model, cfg.metric, cfg.version, cfg.higher_is_better)
    print(json.dumps(decision, indent=1))
    return decision


if __name__ == "__main__":
    config.main_guard(main)
