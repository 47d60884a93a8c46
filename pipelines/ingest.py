"""Ingest a COCO instances dataset into WebDataset shards.

    python pipelines/ingest.py --config conf/ingest/penn_fudan.yaml output.uri=s3://bucket/shards/pf
    ray job submit --working-dir . -- python pipelines/ingest.py --config ... [key=value ...]
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage
from maskflow.stages.ingest import IngestConfig, IngestStage


def main(argv=None) -> dict:
    return stage.stage_main(IngestConfig, IngestStage, argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
