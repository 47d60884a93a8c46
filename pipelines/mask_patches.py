"""DeepMask / SharpMask training windows from image shards: centred, canonically scaled positives with their mask,
shifted / mis-scaled / background negatives.

    python pipelines/mask_patches.py --config conf/mask_patches/default.yaml input.shards=runs/shards/penn_fudan \
        input.split=train output.uri=runs/mask_patches/penn_fudan/train
    ray job submit --working-dir . -- python pipelines/mask_patches.py --config ... [key=value ...]
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage
from maskflow.stages.mask_patches_config import MaskPatchesConfig


def make_stage(cfg: MaskPatchesConfig, options) -> stage.Stage:
    from maskflow.stages.mask_patches import MaskPatchesStage  # torch loads only once the config has parsed

    return MaskPatchesStage(cfg, options)


def main(argv=None) -> dict:
    return stage.stage_main(MaskPatchesConfig, make_stage, argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
