"""Cluttered, distorted digits (HSTN §4.1) from real MNIST digits, or an existing cluttered-MNIST .npz, as shards.

    python pipelines/cluttered_digits.py --config conf/cluttered_digits/default.yaml output.uri=s3://bucket/shards/cd
    python pipelines/cluttered_digits.py --config conf/cluttered_digits/default.yaml input.source=import_npz \\
        input.uri=../shared/data/cluttered_mnist_40x40/cluttered_mnist_40x40_trainval.npz output.uri=runs/shards/cm40
    ray job submit --working-dir . -- python pipelines/cluttered_digits.py --config ... [key=value ...]

The sample schema is in :mod:`maskflow.stages.cluttered_digits`.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage
from maskflow.stages.cluttered_digits import ClutteredDigitsConfig, ClutteredDigitsStage


def main(argv=None) -> dict:
    return stage.stage_main(ClutteredDigitsConfig, ClutteredDigitsStage, argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
