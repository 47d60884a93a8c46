"""Predictions of any registered model over a stage output, into prediction shards: the inference stage its kind
declares (``maskflow.models.kinds``), on the stage harness's actor pool (one GPU per actor when the cluster has them).

    python pipelines/predict.py --config conf/hstn/predict_cls.yaml model.uri=models:/hstn-cls@champion
    ray job submit --working-dir . -- python pipelines/predict.py --config conf/sfnet/predict.yaml \\
        model.uri=models:/sfnet@champion input.shards=s3://bucket/pairs/val output.uri=s3://bucket/flows/val

The YAML names the ``kind`` (e.g. ``hstn_cls``, ``sfnet``); the rest is that kind's inference-stage config. A
``models:/`` URI of another kind is refused in one line before Ray starts. Evaluate the output with
``pipelines/evaluate.py``.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, stage, tracking
from maskflow.models import kinds


def inference_stage_class(kind_name: str):
    return kinds.load_attr(kinds.kind(kind_name).inference_stage)


def main(argv=None) -> dict:
    from maskflow.runtime import setup_logging

    kind_name, cfg = config.parse_cli_dispatch("kind", lambda k: inference_stage_class(k).config_class, argv, __doc__)
    setup_logging()
    options = cfg.storage.options()
    # The actors load registry models themselves: hand them the tracking URI (absolute, for any working directory).
    job = inference_stage_class(kind_name)(cfg, options, tracking.resolved_tracking_uri(cfg.tracking))
    return stage.run_stage(job, cfg.output, cfg.compute, cfg.tracking, cfg, options, cfg.ray)


if __name__ == "__main__":
    config.main_guard(main)
