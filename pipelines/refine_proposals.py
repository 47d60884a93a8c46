"""Any generator's proposals refined by a registered FFD-Net, into ``proposals/1`` shards that record the generator
and the refiner (see maskflow.stages.refine_proposals).

    python pipelines/refine_proposals.py --config conf/refine_proposals/default.yaml \
        input.proposals=runs/proposals/penn_fudan_val model.uri=models:/maskflow-ffdnet@champion [key=value ...]
    ray job submit --working-dir . -- python pipelines/refine_proposals.py --config conf/refine_proposals/default.yaml \
        input.proposals=s3://bucket/props/val output.uri=s3://bucket/props/val-refined

Locally it starts an embedded Ray; under ``ray job submit`` it joins the cluster. Evaluate refined against unrefined
with ``pipelines/evaluate.py`` on both outputs.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage, tracking
from maskflow.stages.refine_proposals_config import RefineProposalsConfig


def make_stage(cfg: RefineProposalsConfig, options) -> stage.Stage:
    from maskflow.stages.refine_proposals import RefineProposalsStage  # torch loads only once the config has parsed

    # The actors load registry models themselves: hand them the tracking URI (absolute, for any working directory).
    return RefineProposalsStage(cfg, options, tracking.resolved_tracking_uri(cfg.tracking))


def main(argv=None) -> dict:
    return stage.stage_main(RefineProposalsConfig, make_stage, argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
