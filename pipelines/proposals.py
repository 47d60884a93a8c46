"""Mask proposals for every image of a dataset, into WebDataset shards.

    python pipelines/proposals.py --config conf/proposals/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python pipelines/proposals.py --config conf/proposals/dmm_top50.yaml \
        model.uri=models:/maskflow-maskrcnn-r50@champion input.shards=s3://bucket/shards/val \
        output.uri=s3://bucket/props/val

Locally it starts an embedded Ray; under ``ray job submit`` it joins the cluster. See maskflow.stages.proposals.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage, tracking
from maskflow.stages.proposals import ProposalsConfig, ProposalsStage


def main(argv=None) -> dict:
    # The actors load registry models themselves: hand them the tracking URI (absolute, for any working directory).
    return stage.stage_main(
        ProposalsConfig, lambda cfg, options: ProposalsStage(cfg, options, tracking.resolved_tracking_uri(cfg.tracking)),
        argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
