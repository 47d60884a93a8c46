"""Evaluate proposals (AR@10/100/1000 over IoU 0.50:0.05:0.95, recall-vs-IoU) as an MLflow evaluation run.

    python pipelines/evaluate_proposals.py proposals=runs/demo/proposals/val model.name=maskflow-maskrcnn model.version=3

The same job as ``pipelines/evaluate.py --config conf/eval/proposals.yaml predictions=... model=models:/name/3``
(the evaluation harness with the ``proposal_ar`` evaluator), in the keys this command has always taken.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

from maskflow import config, runtime
from maskflow.evaluators.proposal_ar import EvaluateProposalsConfig, evaluate_proposals, format_table


def main(argv=None) -> dict:
    cfg = config.parse_cli(EvaluateProposalsConfig, argv, description=__doc__)
    runtime.setup_logging()
    result = evaluate_proposals(cfg)
    print(format_table(result))
    return result


if __name__ == "__main__":
    config.main_guard(main)
