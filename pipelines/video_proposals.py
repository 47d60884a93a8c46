"""DMM-Net video samples: per video, every frame with its top-50 proposals, per-track ground truth and templates.

    python pipelines/video_proposals.py --config conf/video_proposals/davis.yaml input.proposals=... output.uri=...
    ray job submit --working-dir . -- python pipelines/video_proposals.py --config ... [key=value ...]
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage
from maskflow.stages.video_proposals import VideoProposalsConfig, VideoProposalsStage


def main(argv=None) -> dict:
    return stage.stage_main(VideoProposalsConfig, VideoProposalsStage, argv, __doc__)


if __name__ == "__main__":
    config.main_guard(main)
