"""FFD-Net training examples: 1.6x crops of proposals with IoU > 0.5 against their ground truth.

    python pipelines/ffd_crops.py --config conf/ffd_crops/default.yaml input.proposals=[runs/proposals/a] output.uri=...
    ray job submit --working-dir . -- python pipelines/ffd_crops.py --config ... [key=value ...]
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage
from maskflow.stages.ffd_crops_config import FFDCropsConfig


def make_stage(cfg: FFDCropsConfig, options) -> stage.Stage:
    from maskflow.stages.ffd_crops import FFDCropsStage  # torch loads only once the config has parsed

    return FFDCropsStage(cfg, options)


def main(argv=None) -> dict:
    return stage.stage_main(FFDCropsConfig, make_stage, argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
