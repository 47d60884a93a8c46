"""Evaluators on the evaluation harness (:mod:`maskflow.evaluate`), one module per metric family; each is listed by
name in :data:`maskflow.models.kinds.EVALUATORS`. This package imports nothing: load a module when it is used."""
