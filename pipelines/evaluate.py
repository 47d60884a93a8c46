"""Evaluate any model's predictions (a stage output) with its evaluator, as an MLflow evaluation run; the metrics go
onto the model version, whose recorded headline metric and direction promotion then uses.

    python pipelines/evaluate.py --config conf/eval/proposals.yaml predictions=runs/proposals/penn_fudan \
        model=models:/maskflow-maskrcnn-demo/2
    python pipelines/evaluate.py predictions=runs/proposals/penn_fudan model=models:/maskflow-maskrcnn-demo@candidate

``evaluator`` is a name (``proposal_ar``, ...) or empty: then the evaluator of the model's kind. Evaluator options go
under ``options.`` (e.g. ``options.max_proposals=[10,100]``). See maskflow.evaluate.

Against a baseline in the same run (FFD-Net: refined against the unrefined proposals of the same images; both curves
in one figure, ``gain/AR_100``, the IoU-bin table):

    python pipelines/evaluate.py --config conf/eval/proposals.yaml predictions=runs/refined/penn_fudan_val \
        baseline=runs/proposals/penn_fudan_val "labels=[refined, unrefined]" model=models:/maskflow-ffdnet@candidate
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

import json

from maskflow import config, runtime
from maskflow.evaluate import EvaluateConfig, evaluate_job


def main(argv=None) -> dict:
    cfg = config.parse_cli(EvaluateConfig, argv, description=__doc__)
    runtime.setup_logging()
    result = evaluate_job(cfg)
    for text in result["text"].values():
        print(text)
    print(json.dumps({k: result[k] for k in ("evaluator", "metric", "value", "higher_is_better", "run_id",
                                             "model_name", "model_version")}, indent=1))
    return result


if __name__ == "__main__":
    config.main_guard(main)
