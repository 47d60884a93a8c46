"""Model kinds: what each kind of registered model plugs into — its trainer plugin, its evaluator, its inference
stage — and the evaluators by name.

A kind is the plugin's ``name`` (``maskflow.train.plugin.ModelPlugin.name``), recorded on every registered version as
the tag ``maskflow.kind`` (:func:`maskflow.tracking.register_logged_model`), so a job given ``models:/x@champion``
knows which plugin loads it, which job may use it (:func:`maskflow.models.loading.resolve_model_uri` with
``expected_kinds``), which evaluator scores its predictions (:mod:`maskflow.evaluate`) and which metric promotes it
(:func:`maskflow.tracking.promote`).

Entries are import strings (``"module:attr"``), loaded only when used (:func:`load_attr`): this module imports
nothing heavy, so a job checks a kind or an evaluator name while it parses its config, before torch loads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from maskflow.config import ConfigError

__all__ = ["ModelKind", "KINDS", "EVALUATORS", "kind", "load_attr", "evaluator_path", "evaluator_class"]


@dataclass(frozen=True)
class ModelKind:
    """Where one kind of model's parts live, as ``"module:attr"`` import strings."""

    name: str  # = the plugin's ``name`` and the versions' ``maskflow.kind`` tag
    plugin: str  # its ModelPlugin (trainer harness)
    evaluator: str  # the Evaluator that scores its predictions (headline metric and direction for promotion)
    inference_stage: str  # the Stage that writes its predictions (weights from ``model.uri``)
    description: str = ""


KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (
    ModelKind(
        "maskrcnn",
        plugin="trainers.maskrcnn:MaskRCNNPlugin",
        evaluator="maskflow.evaluators.proposal_ar:ProposalAR",
        inference_stage="maskflow.stages.proposals:ProposalsStage",
        description="class-agnostic Mask R-CNN proposal generator; AR@k of its proposals",
    ),
    # -- HSTN ("hstn_cls": cluttered digits, "hstn_align": planar alignment) and SFNet ("sfnet") go here, one
    #    ModelKind each, added with their plugins, evaluators and inference stages. --
    ModelKind(
        "hstn_cls",
        plugin="trainers.hstn:HSTNClassifierPlugin",
        evaluator="maskflow.evaluators.classification:ClassificationAccuracy",
        inference_stage="maskflow.stages.hstn_predict:DigitPredictStage",
        description="HSTN / Affine-STN / plain-CNN cluttered-digit classifier (Shu et al., sec. 4.1); accuracy",
    ),
    ModelKind(
        "hstn_align",
        plugin="trainers.hstn:HSTNAlignPlugin",
        evaluator="maskflow.evaluators.flow_epe:FlowEPE",
        inference_stage="maskflow.stages.hstn_predict:FlowPredictStage",
        description="HSTN / Affine-STN unsupervised planar alignment (Shu et al., sec. 4.2); EPE (lower is better)",
    ),
    ModelKind(
        "sfnet",
        plugin="trainers.sfnet:SFNetPlugin",
        evaluator="maskflow.evaluators.correspondence:CorrespondenceEvaluator",
        inference_stage="maskflow.stages.sfnet_predict:SFNetPredictStage",
        description="SFNet semantic flow (Lee et al., CVPR 2019); PCK@0.1 of pseudo-keypoints on held-out pairs",
    ),
    ModelKind(
        "sfnet_affine_baseline",
        plugin="trainers.sfnet:AffineRegressionPlugin",
        evaluator="maskflow.evaluators.correspondence:CorrespondenceEvaluator",
        inference_stage="maskflow.stages.sfnet_predict:SFNetPredictStage",
        description="CNNGeometric-style affine regression on SFNet's backbone and pairs; evaluated as SFNet",
    ),
    # The second proposal generator: its registered versions go through the same proposals job as Mask R-CNN
    # (ProposalsStage dispatches on the kind) and write the same proposals/1 samples.
    ModelKind(
        "sharpmask",
        plugin="trainers.sharpmask:SharpMaskPlugin",
        evaluator="maskflow.evaluators.proposal_ar:ProposalAR",
        inference_stage="maskflow.stages.proposals:ProposalsStage",
        description="DeepMask trunk + SharpMask refinement (Pinheiro et al., ECCV 2016) proposal generator; AR@k",
    ),
    # FFD-Net's predictions are refined proposals: scored as proposals, by AR@k.
    ModelKind(
        "ffdnet",
        plugin="trainers.ffdnet:FFDNetPlugin",
        evaluator="maskflow.evaluators.proposal_ar:ProposalAR",
        inference_stage="maskflow.stages.refine_proposals:RefineProposalsStage",
        description="FFD-Net (Zhang & He, ICCV 2017) refining any generator's proposals; AR@k of the refined ones",
    ),
)}

# Evaluators by name (the ``evaluator`` key of an evaluation job; each class's ``name`` is its key here).
EVALUATORS: dict[str, str] = {
    "proposal_ar": "maskflow.evaluators.proposal_ar:ProposalAR",
    # -- the HSTN / SFNet evaluators (accuracy, EPE, PCK...) go here. --
    "correspondence": "maskflow.evaluators.correspondence:CorrespondenceEvaluator",
    "classification": "maskflow.evaluators.classification:ClassificationAccuracy",
    "flow_epe": "maskflow.evaluators.flow_epe:FlowEPE",
}


def kind(name: str, key: str = "kind") -> ModelKind:
    """The registered :class:`ModelKind` called ``name``; a :class:`ConfigError` naming ``key`` otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"{key}: unknown model kind {name!r} (known: {', '.join(sorted(KINDS))})") from None


def load_attr(path: str) -> Any:
    """The object an import string ``"package.module:attr"`` names (``attr`` may be dotted)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"import string {path!r} must look like 'package.module:attr'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def evaluator_path(name: str, key: str = "evaluator") -> str:
    """The import string of an evaluator given by name (a key of :data:`EVALUATORS`) or as ``"module:Class"``
    (an evaluator defined outside this table, e.g. in a test); checked without importing anything."""
    if name in EVALUATORS:
        return EVALUATORS[name]
    if ":" in name:
        return name
    raise ConfigError(f"{key}: unknown evaluator {name!r} (known: {', '.join(sorted(EVALUATORS))}, "
                      "or 'package.module:Class')")


def evaluator_class(name: str, key: str = "evaluator") -> type:
    """The Evaluator class of a name or import string (see :func:`evaluator_path`)."""
    path = evaluator_path(name, key)
    try:
        return load_attr(path)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot load evaluator {path!r}: {type(e).__name__}: {e}") from None
