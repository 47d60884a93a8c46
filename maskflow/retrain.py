"""Scheduled retraining: new data -> sample stages -> train -> evaluate on a pinned set -> promote only if better.

    python pipelines/retrain.py --config conf/retrain/maskrcnn.yaml [key=value ...]

One flow for every model; a model joins by a config (``conf/retrain/<model>.yaml``), not code. Each step is one of
the project's own jobs (a script's ``main``, run in this process as ``python <script> --config ...`` would run it),
so a stage resumes and skips finished work as it always does, and training resumes from its last checkpoint.

1. **What is new.** The digest of the input data (:func:`data_digest`: every input manifest's shard checksums) is
   compared with the one recorded on the champion (``maskflow.data_digest``). Equal -> exit 0 in seconds, saying so
   (no Ray, no lock).
2. **Lock.** :class:`maskflow.locks.Lease` on ``<workdir>/<model>/retrain.lock``: a second run at once stops
   (``locked``) instead of training; a holder that died on this host, or whose lock expired, is taken over.
3. **Stages** (``stages``), each a stage job (resumes, skips what is done).
4. **Train** (``train``): ``registry.model_name`` = the model, ``run.name`` derived from the data digest (a killed
   run started again resumes the same training run from its checkpoint), ``init.from`` = the champion when
   ``init_from_champion``. The new version gets its lineage tags (data digests, code version, parent version, this
   run) at once.
5. **Evaluate** on the pinned set (``eval.data``, pinned by its manifest digest): the predict job, then the
   evaluation job, which records the metrics onto the version. If the champion was scored on another set (or never),
   it is scored again on this one first, so the two numbers compare.
6. **Promote only if better** (:func:`maskflow.tracking.promote`, ``promotion.margin`` in the metric's direction),
   after checking this run still holds the lock; a failed or partial step never reaches this point. The version it
   replaces is recorded, so ``python pipelines/models.py rollback <model>`` goes back in one command.

Record: an MLflow parent run (``retrain-<model>``) with every step's job as a child run (``MASKFLOW_PARENT_RUN_ID``);
``<workdir>/<model>/state.json`` (what is done, for resuming: same data digest -> continue), ``status.json`` (what
ran, what was skipped, promoted or not and why; also an artifact of the parent run) and a one-line summary.

In step overrides, ``{workdir}`` is this model's work directory, ``{digest}`` the data digest's first 12 characters,
``{data}`` the input list, ``{champion}`` the champion's ``models:/name/N`` (empty when there is none),
``{eval_data}`` the pinned evaluation set (e.g. the baseline a refiner's evaluation compares against).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from maskflow import config as config_lib
from maskflow import shards, storage, tracking
from maskflow.config import ConfigError, Uri, require
from maskflow.train.config import uri_list
from maskflow.results import JobStep, run_script
from maskflow.runtime import Common, format_seconds
from maskflow.stage import code_version, one_line_error

log = logging.getLogger("maskflow.retrain")

DATA_DIGEST_TAG = "maskflow.data_digest"
DATA_TAG = "maskflow.data"
EVAL_DATA_DIGEST_TAG = "maskflow.eval_data_digest"
PARENT_VERSION_TAG = "maskflow.parent_version"
CODE_VERSION_TAG = "maskflow.code_version"
RETRAIN_RUN_TAG = "maskflow.retrain_run_id"
STATE_FILE, STATUS_FILE, LOCK_FILE = "state.json", "status.json", "retrain.lock"


@dataclass
class RetrainStep(JobStep):
    name: str = ""  # its label in progress lines and status.json (default: the script's name)
    data_key: str = ""  # set this key of the job to the retraining's input list (``data``), e.g. data.train

    @property
    def label(self) -> str:
        return self.name or os.path.basename(self.script).removesuffix(".py")


@dataclass
class PinnedEvalConfig:
    data: Uri = ""  # the evaluation set: a stage output, pinned by its manifest's digest
    input_key: str = "input.shards"  # the predict job's key that gets ``data``
    predict: JobStep = field(default_factory=JobStep)  # model.uri and output.uri are set per version
    evaluate: JobStep = field(default_factory=JobStep)  # predictions and model are set per version

    def validate(self) -> None:
        require(bool(self.data), "data", "required: the pinned evaluation set (a stage output)")
        require(bool(self.predict.script), "predict", "required: the job that predicts on the evaluation set")
        require(bool(self.evaluate.script), "evaluate", "required: the evaluation job (pipelines/evaluate.py)")


@dataclass
class PromotionConfig:
    margin: float = 0.0  # the candidate must beat the champion by more than this, in the metric's units
    metric: str | None = None  # None: the headline metric its evaluation recorded
    higher_is_better: bool | None = None  # None: the recorded direction

    def validate(self) -> None:
        require(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")


@dataclass
class RetrainConfig(Common):
    model_name: str = ""  # the registered model this flow retrains
    data: list[Uri] = field(default_factory=list)  # the input data (stage outputs) whose digest says what is new
    stages: list[RetrainStep] = field(default_factory=list)  # sample stages run before training, in order
    train: RetrainStep = field(default_factory=RetrainStep)
    init_from_champion: bool = False  # fine-tune from the champion (init.from) instead of training from scratch
    eval: PinnedEvalConfig = field(default_factory=PinnedEvalConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    workdir: Uri = "runs/retrain"  # state, status, lock and evaluation outputs under <workdir>/<model_name>
    lock_ttl_s: float = 6 * 3600.0  # a lock not renewed for this long is taken over (renewed at every step)
    force: bool = False  # retrain even when the data has not changed since the champion
    status_file: Uri = ""  # also write status.json here (e.g. for a scheduler); "" = only <workdir>/<model>/

    def validate(self) -> None:
        require(bool(self.model_name), "model_name", "required: the registered model to retrain")
        require(bool(uri_list(self.data)), "data", "required: the input data (stage outputs with a manifest)")
        require(bool(self.train.script.startswith("trainers/")), "train", "required: a trainer (trainers/<model>.py)")
        require(self.lock_ttl_s > 0, "lock_ttl_s", "must be > 0")


# --------------------------------------------------------------------------------------------- digests


def manifest_digest(uri: str, options: storage.StorageOptions) -> dict:
    """One stage output's content digest: its schema and every shard's checksum and sample count (not the names or
    the location), with its shard and sample counts."""
    manifest = shards.read_manifest(uri, options)
    entries = sorted((s.get("sha256", ""), int(s.get("samples", 0))) for s in manifest.get("shards", []))
    if any(not sha for sha, _ in entries):
        raise ConfigError(f"data: {uri}'s manifest lists a shard without a sha256: re-run the stage that made it")
    h = hashlib.sha256(json.dumps([manifest.get("schema"), entries]).encode())
    return {"uri": uri, "digest": h.hexdigest(), "shards": len(entries), "samples": int(manifest.get("samples", 0))}


def data_digest(uris: list[str], options: storage.StorageOptions) -> dict:
    """``{"digest", "inputs": [manifest_digest per input]}``; the digest does not depend on the inputs' order."""
    inputs = [manifest_digest(u, options) for u in uris]
    digest = hashlib.sha256(json.dumps(sorted(i["digest"] for i in inputs)).encode()).hexdigest()
    return {"digest": digest, "inputs": inputs}


def what_is_new(champion, data: dict) -> str:
    """One line: which inputs are new or changed against what the champion was trained on (its ``maskflow.data``)."""
    total = f"{len(data['inputs'])} input(s), {sum(i['shards'] for i in data['inputs'])} shards"
    if champion is None:
        return f"no champion yet: training on {total}"
    try:
        before = json.loads(champion.tags.get(DATA_TAG, "{}"))
    except ValueError:
        before = {}
    if not before:
        return f"champion v{champion.version} records no training data: training on {total}"
    known = set(before.values())
    new = [i for i in data["inputs"] if i["digest"][:16] not in known]
    gone = len(set(before.values()) - {i["digest"][:16] for i in data["inputs"]})
    return (f"against champion v{champion.version}: {len(new)} new or changed input(s) "
            f"({', '.join('%s (%d shards)' % (i['uri'], i['shards']) for i in new)})"
            + (f", {gone} input(s) gone" if gone else "") + f"; training on {total}")


# --------------------------------------------------------------------------------------------- the flow


class Retrain:
    """One retraining run of ``cfg`` (:meth:`run` returns the status dict)."""

    def __init__(self, cfg: RetrainConfig, command: str = ""):
        self.cfg = cfg
        self.options = cfg.storage.options()
        self.dir = storage.join(cfg.workdir, cfg.model_name)
        self.command = command
        self.started = time.time()
        self.steps: list[dict] = []
        self.status: dict[str, Any] = {"model": cfg.model_name, "host": socket.gethostname(),
                                       "started": _iso(self.started), "steps": self.steps}
        self.total_steps = len(cfg.stages) + 4  # stages, train, score champion, evaluate, promote
        self.lease = None  # the lock, once taken (maskflow.locks.Lease)

    # ---- progress and record

    def _line(self, index: int, name: str, what: str) -> None:
        msg = f"[retrain {self.cfg.model_name}] step {index}/{self.total_steps} {name}: {what}"
        log.info(msg)

    def _step(self, index: int, name: str, fn, done: dict, state: dict):
        """Run one step unless ``state`` says it is done; record it in ``self.steps``."""
        if name in done:
            self._line(index, name, "done in an earlier attempt, skipped")
            self.steps.append({"step": name, "status": "skipped", "why": "done in an earlier attempt",
                               **done[name]})
            return done[name]
        self._line(index, name, "running")
        t0 = time.perf_counter()
        try:
            result = fn() or {}
        except BaseException as e:
            self.steps.append({"step": name, "status": "failed", "seconds": round(time.perf_counter() - t0, 1),
                               "error": one_line_error(e)})
            raise
        seconds = round(time.perf_counter() - t0, 1)
        self.steps.append({"step": name, "status": "ran", "seconds": seconds, **result})
        done[name] = result
        self._save_state(state)
        self._line(index, name, f"done in {format_seconds(seconds)}"
                   + (f" ({_brief(result)})" if result else ""))
        if self.lease is not None:
            self.lease.renew()
        return result

    def _save_state(self, state: dict) -> None:
        storage.write_text(storage.join(self.dir, STATE_FILE), json.dumps(state, indent=1), self.options)

    def _load_state(self) -> dict | None:
        try:
            return json.loads(storage.read_text(storage.join(self.dir, STATE_FILE), self.options))
        except FileNotFoundError:
            return None

    def _finish(self, result: str, why: str, parent_run_id: str | None = None, failed: bool = False) -> dict:
        self.status.update(result=result, why=why, finished=_iso(time.time()),
                           seconds=round(time.time() - self.started, 1))
        text = json.dumps(self.status, indent=1, default=str)
        storage.write_text(storage.join(self.dir, STATUS_FILE), text, self.options)
        if self.cfg.status_file:
            storage.write_text(self.cfg.status_file, text, self.options)
        if parent_run_id:
            c = tracking.client()
            c.log_text(parent_run_id, text, STATUS_FILE)
            c.set_tag(parent_run_id, "maskflow.retrain_result", result)
            c.set_terminated(parent_run_id, "FAILED" if failed else "FINISHED")
        summary = f"retrain {self.cfg.model_name}: {result} — {why} ({format_seconds(self.status['seconds'])})"
        print(summary, flush=True)
        self.status["summary"] = summary
        return self.status

    # ---- the run

    def run(self) -> dict:
        cfg = self.cfg
        tracking.setup(cfg.tracking, self.options)
        data = data_digest(uri_list(cfg.data), self.options)
        self.status["data_digest"] = data["digest"]
        self.status["data"] = data["inputs"]
        champion = tracking.model_version_for_alias(cfg.model_name, tracking.CHAMPION)
        self.status["champion_before"] = None if champion is None else str(champion.version)
        reason = self._nothing_new(champion, data)
        if reason:
            return self._finish("nothing_new", reason)
        log.info("[retrain %s] %s", cfg.model_name, what_is_new(champion, data))
        from maskflow.locks import Lease, LockHeld

        lease = Lease(storage.join(self.dir, LOCK_FILE), cfg.lock_ttl_s, f"retraining of {cfg.model_name}",
                      self.options)
        try:
            lease.acquire()
        except LockHeld as e:
            log.warning("%s", e)
            return self._finish("locked", str(e))
        self.lease = lease
        try:
            return self._locked_run(data)
        finally:
            lease.release()

    def _nothing_new(self, champion, data: dict) -> str:
        """Why there is nothing to do ("" when there is): the champion was trained on this data, or an attempt on
        it finished already (its candidate not promoted). ``force`` retrains regardless."""
        if self.cfg.force:
            return ""
        what = f"the data (digest {data['digest'][:12]}, {sum(i['shards'] for i in data['inputs'])} shards)"
        if champion is not None and champion.tags.get(DATA_DIGEST_TAG) == data["digest"]:
            return f"{what} is what champion v{champion.version} was trained on"
        state = self._load_state()
        if state and state.get("finished") and state.get("data_digest") == data["digest"]:
            return (f"{what} was tried by the run that finished {state['finished']} (candidate "
                    f"v{state.get('done', {}).get('train', {}).get('version', '?')} not promoted); force=true "
                    "retrains anyway")
        return ""

    def _locked_run(self, data: dict) -> dict:
        cfg = self.cfg
        # Another run may have finished between our check and the lock: look again.
        champion = tracking.model_version_for_alias(cfg.model_name, tracking.CHAMPION)
        reason = self._nothing_new(champion, data)
        if reason:
            return self._finish("nothing_new", reason + " (a run that finished meanwhile)")
        state = self._load_state()
        if state and state.get("data_digest") == data["digest"] and not state.get("finished"):
            log.info("[retrain %s] resuming the attempt of %s (done: %s)", cfg.model_name, state.get("started"),
                     ", ".join(state.get("done", {})) or "nothing")
            self.status["resumed"] = True
        else:
            state = {"data_digest": data["digest"], "started": _iso(self.started), "done": {},
                     "attempt": time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.started)),
                     "champion": None if champion is None else str(champion.version)}
        done = state.setdefault("done", {})
        state.setdefault("attempt", time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.started)))
        parent_run_id = self._parent_run(state, data)
        self.status["run_id"] = parent_run_id
        os.environ[tracking.PARENT_RUN_ENV] = parent_run_id
        eval_data = data_digest([cfg.eval.data], self.options)
        self.status["eval_data_digest"] = eval_data["digest"]
        # The champion this attempt compares against: the one it started with (kept in the state, so a resumed
        # attempt compares against the same version; _promote refuses if the champion moved meanwhile).
        champion_version = state.get("champion")
        places = {"{workdir}": self.dir, "{digest}": data["digest"][:12],
                  "{data}": "[" + ", ".join(uri_list(cfg.data)) + "]",
                  "{champion}": f"models:/{cfg.model_name}/{champion_version}" if champion_version else "",
                  "{eval_data}": cfg.eval.data}
        self.places = places
        common = step_overrides(cfg, tracking.resolved_tracking_uri(cfg.tracking))
        try:
            index = 0
            for step in cfg.stages:
                index += 1
                self._step(index, f"stage {step.label}",
                           lambda step=step: self._run_stage(step, places, common), done, state)
            index += 1
            trained = self._step(index, "train", lambda: self._train(places, common, data, champion_version,
                                                                     parent_run_id, state["attempt"]), done, state)
            version = trained["version"]
            self.status["candidate_version"] = version
            index += 1
            if champion_version and self._needs_rescore(champion_version, eval_data):
                self._step(index, "score champion", lambda: self._evaluate(champion_version, eval_data, common),
                           done, state)
            else:
                self._line(index, "score champion", "skipped (" + ("no champion" if not champion_version else
                                                                   "already scored on the pinned set") + ")")
                self.steps.append({"step": "score champion", "status": "skipped",
                                   "why": "no champion" if not champion_version else "scored on the pinned set"})
            index += 1
            self._step(index, "evaluate", lambda: self._evaluate(version, eval_data, common), done, state)
            index += 1
            decision = self._step(index, "promote", lambda: self._promote(version, champion_version, eval_data,
                                                                          parent_run_id), done, state)
        except BaseException as e:
            os.environ.pop(tracking.PARENT_RUN_ENV, None)
            self._finish("failed", f"{self.steps[-1]['step'] if self.steps else 'set-up'} failed: {one_line_error(e)}; "
                         "champion untouched; run it again to continue from there", parent_run_id, failed=True)
            raise
        os.environ.pop(tracking.PARENT_RUN_ENV, None)
        state["finished"] = _iso(time.time())
        self._save_state(state)
        self.status["decision"] = decision
        champion_after = tracking.model_version_for_alias(cfg.model_name, tracking.CHAMPION)
        self.status["champion_after"] = None if champion_after is None else str(champion_after.version)
        metric = decision["metric"]
        if decision["promoted"]:
            why = (f"v{version} {metric} {decision['candidate_value']:.4g} beats "
                   + (f"v{champion_version} {decision['champion_value']:.4g} by more than {decision['margin']:g}"
                      if champion_version else "no champion"))
            return self._finish("promoted", why, parent_run_id)
        why = (f"v{version} {metric} {decision['candidate_value']:.4g} does not beat champion v{champion_version} "
               f"{decision['champion_value']:.4g} by more than {decision['margin']:g}: champion unchanged")
        return self._finish("not_promoted", why, parent_run_id)

    def _parent_run(self, state: dict, data: dict) -> str:
        c = tracking.client()
        run_id = state.get("parent_run_id")
        if run_id:
            c.update_run(run_id, status="RUNNING")
            return run_id
        import mlflow

        experiment = mlflow.get_experiment_by_name(self.cfg.tracking.experiment)
        run = c.create_run(experiment.experiment_id, run_name=f"retrain-{self.cfg.model_name}",
                           tags={"maskflow.job": "retrain", "maskflow.model": self.cfg.model_name,
                                 DATA_DIGEST_TAG: data["digest"]})
        run_id = run.info.run_id
        c.log_text(run_id, config_lib.dump_yaml(self.cfg), "config.yaml")
        c.log_dict(run_id, data, "data.json")
        state["parent_run_id"] = run_id
        self._save_state(state)
        return run_id

    @staticmethod
    def _expand(values: list[str], places: dict[str, str]) -> list[str]:
        out = []
        for v in values:
            for k, rep in places.items():
                v = v.replace(k, rep)
            out.append(v)
        return out

    def _argv(self, step: RetrainStep, places: dict, common: list[str]) -> list[str]:
        extra = common + self._expand(list(step.overrides), places)
        if step.data_key:  # one input as a URI (stage inputs take one), several as a list (trainers take lists)
            uris = uri_list(self.cfg.data)
            extra.append(f"{step.data_key}={uris[0] if len(uris) == 1 else places['{data}']}")
        return extra

    def _run_stage(self, step: RetrainStep, places: dict, common: list[str]) -> dict:
        manifest = run_script(JobStep(step.script, step.config), self._argv(step, places, common))
        return {"samples": int(manifest.get("samples", 0)), "rejected": int(manifest.get("rejected", 0))} \
            if isinstance(manifest, dict) else {}

    def _train(self, places: dict, common: list[str], data: dict, champion_version: str | None,
               parent_run_id: str, attempt: str) -> dict:
        cfg = self.cfg
        # one training run name per attempt: a killed attempt started again resumes it from its last checkpoint
        extra = self._argv(cfg.train, places, common) + [
            f"registry.model_name={cfg.model_name}", f"run.name=retrain-{cfg.model_name}-{attempt}"]
        if cfg.init_from_champion and champion_version:
            extra.append(f"init.from=models:/{cfg.model_name}/{champion_version}")
        result = run_script(JobStep(cfg.train.script, cfg.train.config), extra)
        version = getattr(result, "model_version", None)
        if not version:
            raise RuntimeError(f"train: {cfg.train.script} registered no version of {cfg.model_name} (no "
                               "registry.model_name, or registration failed): nothing to evaluate")
        c = tracking.client()
        tags = {DATA_DIGEST_TAG: data["digest"], DATA_TAG: json.dumps({i["uri"]: i["digest"][:16]
                                                                      for i in data["inputs"]})[:4900],
                CODE_VERSION_TAG: code_version(), RETRAIN_RUN_TAG: parent_run_id,
                PARENT_VERSION_TAG: champion_version or ""}
        for key, value in tags.items():
            c.set_model_version_tag(cfg.model_name, str(version), key, value)
        return {"version": str(version), "train_run_id": getattr(result, "run_id", None)}

    def _needs_rescore(self, version: str, eval_data: dict) -> bool:
        tags = tracking.client().get_model_version(self.cfg.model_name, version).tags
        return tags.get(EVAL_DATA_DIGEST_TAG) != eval_data["digest"]

    def _evaluate(self, version: str, eval_data: dict, common: list[str]) -> dict:
        cfg = self.cfg
        model_uri = f"models:/{cfg.model_name}/{version}"
        out = storage.join(self.dir, "eval", f"v{version}-{eval_data['digest'][:12]}")
        predict, evaluate = cfg.eval.predict, cfg.eval.evaluate
        run_script(JobStep(predict.script, predict.config), common + self._expand(predict.overrides, self.places) + [
            f"model.uri={model_uri}", f"output.uri={out}", f"{cfg.eval.input_key}={cfg.eval.data}"])
        result = run_script(JobStep(evaluate.script, evaluate.config), common + self._expand(
            evaluate.overrides, self.places) + [f"predictions={out}", f"model={model_uri}"])
        tracking.client().set_model_version_tag(cfg.model_name, version, EVAL_DATA_DIGEST_TAG, eval_data["digest"])
        return {"version": version, "metric": result.get("metric"), "value": result.get("value"),
                "eval_run_id": result.get("run_id")}

    def _promote(self, version: str, champion_version: str | None, eval_data: dict, parent_run_id: str) -> dict:
        cfg = self.cfg
        self.lease.verify()  # a run that lost its lock to another does not promote
        current = tracking.model_version_for_alias(cfg.model_name, tracking.CHAMPION)
        if current is not None and champion_version and str(current.version) != champion_version:
            raise RuntimeError(f"champion moved from v{champion_version} to v{current.version} during this run (by "
                               "hand?): not promoting against a champion this run did not score")
        if current is not None and self._needs_rescore(str(current.version), eval_data):
            raise RuntimeError(f"champion v{current.version} was not scored on the pinned evaluation set "
                               f"{cfg.eval.data}: not comparing numbers from different sets")
        decision = tracking.promote(cfg.model_name, cfg.promotion.metric, version, cfg.promotion.higher_is_better,
                                    margin=cfg.promotion.margin, by=f"retrain run {parent_run_id}")
        tracking.client().log_dict(parent_run_id, decision, "promotion.json")
        return decision


def step_overrides(cfg: RetrainConfig, tracking_uri: str) -> list[str]:
    """What every step inherits from the retraining's own config: the tracking server and experiment, the object
    store's endpoint and region. Never credentials: those reach the steps through the environment (the command lines
    are logged)."""
    out = [f"tracking.tracking_uri={tracking_uri}", f"tracking.experiment={cfg.tracking.experiment}"]
    if cfg.storage.endpoint_url:
        out.append(f"storage.endpoint_url={cfg.storage.endpoint_url}")
    if cfg.storage.region:
        out.append(f"storage.region={cfg.storage.region}")
    return out


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _brief(result: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in result.items() if v is not None and not k.endswith("run_id"))


def check(cfg: RetrainConfig) -> list[str]:
    """Every step's config passes its own job's validation (``--check``), with the overrides the flow would add;
    returns one line per step. Raises ConfigError naming the step."""
    places = {"{workdir}": "runs/retrain-check", "{digest}": "0" * 12,
              "{data}": "[" + ", ".join(uri_list(cfg.data)) + "]", "{champion}": "", "{eval_data}": cfg.eval.data}
    flow = Retrain(cfg)
    common = step_overrides(cfg, cfg.tracking.tracking_uri)
    steps: list[tuple[str, JobStep, list[str]]] = [
        (f"stages[{i}]", s, flow._argv(s, places, common)) for i, s in enumerate(cfg.stages)]
    steps.append(("train", cfg.train, flow._argv(cfg.train, places, common) +
                  [f"registry.model_name={cfg.model_name}"]))
    steps.append(("eval.predict", cfg.eval.predict, common + flow._expand(cfg.eval.predict.overrides, places) + [
        f"model.uri=models:/{cfg.model_name}/1", "output.uri=runs/retrain-check/eval",
        f"{cfg.eval.input_key}={cfg.eval.data}"]))
    steps.append(("eval.evaluate", cfg.eval.evaluate, common + flow._expand(cfg.eval.evaluate.overrides, places) + [
        "predictions=runs/retrain-check/eval", f"model=models:/{cfg.model_name}/1"]))
    lines = []
    for key, step, extra in steps:
        try:
            run_script(JobStep(step.script, step.config), extra + ["--check"])
        except config_lib.ConfigChecked as ok:
            lines.append(f"{key}: {step.script} --config {step.config}: {ok}")
            continue
        except ConfigError as e:
            raise ConfigError(f"{key} ({step.script} --config {step.config}): {e}") from None
        raise ConfigError(f"{key}: {step.script} ran instead of checking its config (does it use config.parse_cli?)")
    return lines


__all__ = ["RetrainConfig", "RetrainStep", "PinnedEvalConfig", "PromotionConfig", "Retrain", "data_digest",
           "manifest_digest", "check"]
