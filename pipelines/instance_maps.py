"""DVIS instance label maps (+ semantic maps) from image shards.

    python pipelines/instance_maps.py --config conf/instance_maps/default.yaml input.shards=... output.uri=...
    ray job submit --working-dir . -- python pipelines/instance_maps.py --config ... [key=value ...]
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage
from maskflow.stages.instance_maps_config import InstanceMapsConfig


def make_stage(cfg: InstanceMapsConfig, options) -> stage.Stage:
    from maskflow.stages.instance_maps import InstanceMapsStage  # torch loads only once the config has parsed

    return InstanceMapsStage(cfg, options)


def main(argv=None) -> dict:
    return stage.stage_main(InstanceMapsConfig, make_stage, argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
