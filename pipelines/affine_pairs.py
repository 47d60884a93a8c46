"""Synthetic (source, target) pairs with ground-truth flow from image shards (SFNet / HSTN training data).

    python pipelines/affine_pairs.py --config conf/affine_pairs/default.yaml input.shards=... output.uri=...
    ray job submit --working-dir . -- python pipelines/affine_pairs.py --config ... [key=value ...]
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage
from maskflow.stages.affine_pairs import AffinePairsConfig, AffinePairsStage


def main(argv=None) -> dict:
    return stage.stage_main(AffinePairsConfig, AffinePairsStage, argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
