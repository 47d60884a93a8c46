"""The trainer harness, one for every model (see ``plugin.py`` for what a model contributes):

* ``config.py`` — the config blocks every training job has (torch-free);
* ``plugin.py`` — :class:`ModelPlugin`, the model's contract, and :class:`StepOutput`;
* ``optim.py`` — optimizer with parameter groups, learning-rate schedules;
* ``init.py`` — ``init.from``: weights from another model, mapped and reported;
* ``loop.py`` — the per-worker loop on Ray Train, with hooks (MLflow, progress, fault injection);
* ``fit.py`` — the driver: :func:`maskflow.train.fit.fit`.

Nothing is imported here, so a job's config module loads without torch or Ray.
"""
