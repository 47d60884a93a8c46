"""Synthetic (source, target) pairs with ground-truth flow from image shards (SFNet / HSTN training data).

    python pipelines/affine_pairs.py --config conf/affine_pairs/default.yaml input.shards=... output.uri=...
    ray job submit --working-dir . -- python pipelines/affine_pairs.py --config ... [key=value ...]
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage
from maskflow.stages.affine_pairs_config import AffinePairsConfig


def make_stage(cfg: AffinePairsConfig, options) -> stage.Stage:
    from maskflow.stages.affine_pairs import AffinePairsStage  # torch loads only once the config has parsed

    return AffinePairsStage(cfg, options)


def main(argv=None) -> dict:
    return stage.stage_main(AffinePairsConfig, make_stage, argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
