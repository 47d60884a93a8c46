"""Moved to :mod:`maskflow.evaluators.proposal_ar`, the evaluation harness's first evaluator.

Transitional: ``pipelines/demo.py`` and ``tests/test_train_and_proposals.py`` still import these names from here;
delete this module once they import them from :mod:`maskflow.evaluators.proposal_ar` (``evaluate_job`` there is
``evaluate_proposals``).
"""

from maskflow.evaluators.proposal_ar import EvaluateProposalsConfig, evaluate_proposal_samples, format_table
from maskflow.evaluators.proposal_ar import evaluate_proposals as evaluate_job

__all__ = ["evaluate_proposal_samples", "format_table", "EvaluateProposalsConfig", "evaluate_job"]
