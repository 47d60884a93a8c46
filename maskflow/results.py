"""Results jobs: one command reproduces one table of ``docs/RESULTS.md`` — the paper's number, ours, and the
baselines at the same budget — from the project's own jobs, run as a user would run them.

A results config (``conf/results/<name>.yaml``) lists

* ``data``: the stage jobs that make the inputs (each a script with its config; a finished output is a no-op);
* ``methods``: per row, a training job (or a ``model_uri`` for a method that is not trained, e.g. a classical
  optical flow) and the inference job that predicts with it; a method may start from the weights another method of
  the same table trained (``init_from_method``: HSTN's affine generator from the Affine-STN);
* ``evaluate``: the evaluation job every method's predictions go through (one evaluator, so one metric).

Each trained method registers as ``results-<name>-<method>`` (a version per run). The table (with the training
time and the inference time per item, measured in this run) replaces the section between
``<!-- results:<name> -->`` and ``<!-- /results:<name> -->`` in the results file, and goes to an MLflow run with
every method's metrics.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from maskflow.config import Uri, require
from maskflow.runtime import Common

log = logging.getLogger("maskflow.results")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class JobStep:
    script: str = ""  # a script of this repository: pipelines/<job>.py or trainers/<model>.py
    config: str = ""  # its --config
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(self.script.startswith(("pipelines/", "trainers/")) and self.script.endswith(".py"), "script",
                "required: a script under pipelines/ or trainers/, e.g. pipelines/predict.py")
        require(os.path.exists(os.path.join(ROOT, self.script)), "script", f"no such script: {self.script}")
        require(not self.config or os.path.exists(os.path.join(ROOT, self.config)), "config",
                f"no such file: {self.config}")


@dataclass
class MethodConfig:
    name: str = ""  # the row's label, e.g. "HSTN"
    role: Literal["ours", "baseline"] = "ours"
    paper: float | None = None  # the paper's number for this method (None: not in the paper)
    train: JobStep | None = None  # a training job; its registered version predicts
    # instead of train: an existing model URI, a method's own URI (e.g. opencv:dis), or "method:<name>" = the model
    # a method listed before trained in this run (the same model predicting on other data, e.g. its training split)
    model_uri: str = ""
    init_from_method: str = ""  # init.from = the version another method of this table trained in this run
    predict: JobStep = field(default_factory=JobStep)  # its model.uri and output.uri are set here
    # A method that transforms another method's predictions (FFD-Net refining a generator's proposals): its predict
    # job reads that method's predictions (``<input_key>=<that output>``) and its evaluation scores it against
    # them in the same run (the evaluation job's ``baseline``: gain/<metric> columns).
    input_from_method: str = ""
    input_key: str = "input.proposals"

    def validate(self) -> None:
        require(bool(self.name), "name", "required: the row's label")
        require((self.train is None) != (not self.model_uri), "train", "set exactly one of train or model_uri")


@dataclass
class ResultsConfig(Common):
    name: str = ""  # the section's key in the results file
    title: str = ""
    paper: str = ""  # where the paper's numbers come from (authors, year, table)
    metric: str = ""  # the evaluator's headline metric: the table's main column
    extra_metrics: list[str] = field(default_factory=list)  # more columns from the evaluation
    metric_scale: float = 1.0  # e.g. 100 to show an accuracy in percent as the paper does
    data: list[JobStep] = field(default_factory=list)
    methods: list[MethodConfig] = field(default_factory=list)
    evaluate: JobStep = field(default_factory=JobStep)  # its predictions and model are set per method
    workdir: Uri = "runs/results"
    results_file: str = "docs/RESULTS.md"
    budget: str = ""  # the training budget every method shares, in words (printed under the table)
    note: str = ""  # what the numbers say, honestly (printed under the table)

    def validate(self) -> None:
        require(bool(re.fullmatch(r"[a-z0-9_]+", self.name)), "name", "required: lower-case letters, digits, _")
        require(bool(self.methods), "methods", "at least one method")
        require(bool(self.metric), "metric", "required: the evaluator's headline metric")
        names = [m.name for m in self.methods]
        require(len(set(names)) == len(names), "methods", "method names must be unique")
        for m in self.methods:
            if m.model_uri.startswith("method:"):
                require(m.model_uri[len("method:"):] in names[:names.index(m.name)], "methods",
                        f"{m.name}: model_uri {m.model_uri!r} must name a method listed before it")
            for key in ("init_from_method", "input_from_method"):
                require(not getattr(m, key) or getattr(m, key) in names[:names.index(m.name)],
                        "methods", f"{m.name}: {key} must name a method listed before it")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_script(step: JobStep, extra: list[str]) -> Any:
    """Run a repository script's ``main(argv)`` in this process (as ``python <script> --config ...`` would) and return
    what it returns. The script is imported by its package name (``trainers/hstn.py`` -> ``trainers.hstn``), so its
    dataclass configs resolve their annotations and its plugin classes pickle by reference to the Ray workers."""
    import importlib

    argv = (["--config", os.path.join(ROOT, step.config)] if step.config else []) + list(step.overrides) + extra
    log.info("$ python %s %s", step.script, " ".join(argv))
    directory = os.path.dirname(os.path.join(ROOT, step.script))
    if directory not in sys.path:
        sys.path.insert(0, directory)  # the script's own imports (pipelines/_bootstrap.py)
    module = importlib.import_module(step.script.removesuffix(".py").replace("/", "."))
    return module.main(argv)


def markdown_table(cfg: ResultsConfig, rows: list[dict]) -> str:
    scale = cfg.metric_scale
    heads = ["method", "role", f"paper {cfg.metric}", f"ours {cfg.metric}"] + cfg.extra_metrics + \
        ["train time", "inference s/item", "model"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        paper = "—" if r["paper"] is None else f"{r['paper']:g}"
        ours = r["metrics"].get(cfg.metric)
        cells = [r["method"], r["role"], paper, "—" if ours is None else f"{ours * scale:.4g}"]
        cells += ["—" if r["metrics"].get(k) is None else f"{r['metrics'][k]:.4g}" for k in cfg.extra_metrics]
        cells += [r["train_time"], f"{r['seconds_per_item']:.4f}", f"`{r['model']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(cfg: ResultsConfig, rows: list[dict], command: str) -> str:
    out = [f"<!-- results:{cfg.name} -->", f"### {cfg.title}", "", f"Paper: {cfg.paper}.", "",
           markdown_table(cfg, rows), ""]
    if cfg.budget:
        out += [f"Budget (every method): {cfg.budget}.", ""]
    if cfg.note:
        out += [cfg.note, ""]
    out += [f"Reproduce: `{command}` (run {time.strftime('%Y-%m-%d')}).", f"<!-- /results:{cfg.name} -->"]
    return "\n".join(out)


def write_section(path: str, name: str, text: str) -> None:
    """Replace the section ``name`` of the results file (or append it)."""
    current = open(path).read() if os.path.exists(path) else "# Results\n"
    pattern = re.compile(rf"<!-- results:{re.escape(name)} -->.*?<!-- /results:{re.escape(name)} -->", re.S)
    updated = pattern.sub(lambda _: text, current) if pattern.search(current) else current.rstrip() + "\n\n" + text
    with open(path, "w") as f:
        f.write(updated.rstrip() + "\n")


def run_results(cfg: ResultsConfig, command: str) -> list[dict]:
    """Run every job of the table, write its section, and return the rows."""
    import mlflow

    from maskflow import storage, tracking
    from maskflow.runtime import format_seconds

    common = [f"tracking.tracking_uri={tracking.resolved_tracking_uri(cfg.tracking)}",
              f"tracking.experiment={cfg.tracking.experiment}"]
    for step in cfg.data:
        run_script(step, common)
    rows, versions, outputs = [], {}, {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for m in cfg.methods:
        name = f"results-{cfg.name}-{slug(m.name)}"
        t0 = time.perf_counter()
        if m.train is not None:
            extra = common + [f"registry.model_name={name}", f"run.name={name}-{stamp}"]
            if m.init_from_method:
                extra.append(f"init.from={versions[m.init_from_method]}")
            fit = run_script(m.train, extra)
            model_uri = f"models:/{name}/{fit.model_version}"
            train_time = format_seconds(time.perf_counter() - t0)
        elif m.model_uri.startswith("method:"):
            model_uri, train_time = versions[m.model_uri[len("method:"):]], "—"
        else:
            model_uri, train_time = m.model_uri, "—"
        versions[m.name] = model_uri
        out = storage.join(cfg.workdir, cfg.name, slug(m.name), f"predictions-{stamp}")
        t0 = time.perf_counter()
        source = [f"{m.input_key}={outputs[m.input_from_method]}"] if m.input_from_method else []
        manifest = run_script(m.predict, common + [f"model.uri={model_uri}", f"output.uri={out}"] + source)
        outputs[m.name] = out
        per_item = (time.perf_counter() - t0) / max(int(manifest["samples"]), 1)
        extra = common + [f"predictions={out}"] + ([f"model={model_uri}"] if model_uri.startswith("models:/") else [])
        if m.input_from_method:
            extra += [f"baseline={outputs[m.input_from_method]}", f"labels=[{slug(m.name)}, {slug(m.input_from_method)}]"]
        result = run_script(cfg.evaluate, extra)
        metrics = {k: float(v) for k, v in result["metrics"].items()} if "metrics" in result else \
            {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
        rows.append({"method": m.name, "role": m.role, "paper": m.paper, "metrics": metrics, "model": model_uri,
                     "train_time": train_time, "seconds_per_item": per_item})
        log.info("[results %s] %s: %s = %s", cfg.name, m.name, cfg.metric, metrics.get(cfg.metric))
    text = section(cfg, rows, command)
    write_section(cfg.results_file if os.path.isabs(cfg.results_file) else os.path.join(ROOT, cfg.results_file),
                  cfg.name, text)
    with tracking.job_run(cfg.tracking, f"results-{cfg.name}", cfg, {"maskflow.results": cfg.name},
                          cfg.storage.options()):
        for r in rows:
            mlflow.log_metrics({f"{slug(r['method'])}/{k}": v for k, v in r["metrics"].items()})
        mlflow.log_text(text, f"results_{cfg.name}.md")
    print(text)
    return rows
