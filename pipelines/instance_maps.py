"""DVIS instance label maps (+ semantic maps) from image shards.

    python pipelines/instance_maps.py --config conf/instance_maps/default.yaml input.shards=... output.uri=...
    ray job submit --working-dir . -- python pipelines/instance_maps.py --config ... [key=value ...]
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage
from maskflow.stages.instance_maps import InstanceMapsConfig, InstanceMapsStage


def main(argv=None) -> dict:
    return stage.stage_main(InstanceMapsConfig, InstanceMapsStage, argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
