"""The evaluation harness (maskflow.evaluate), model kinds, and promotion by the model's declared metric, on real
MLflow (sqlite) with tiny registered models, prediction shards written with maskflow.shards, and real Penn-Fudan
masks for the proposal-AR evaluator. Nothing here trains a model or starts Ray."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maskflow import shards, storage, tracking
from maskflow.config import ConfigError, JobFailed, build
from maskflow.data import schema
from maskflow.evaluate import EvalResult, EvaluateConfig, Evaluator, evaluate_job
from maskflow.models import kinds
from tests.conftest import ROOT, SHARED_DATA, require_shared_data
from tests.test_errors_before_ray import PROBE, clean_env
from tests.test_tracking import isolated_mlflow, migrated_db  # noqa: F401  (fixtures: a fresh sqlite db per test)

sys.path.insert(0, str(ROOT / "pipelines"))  # the pipeline scripts import _bootstrap as a sibling module

TOY_SCHEMA = "toy_pred/1"
TOY = "tests.test_evaluate:MeanAbsError"


class MeanAbsError(Evaluator):
    """A lower-is-better toy: mean |value - target| of ``pred.json`` samples, with a table, a plot and a text."""

    name = "toy_mae"
    metric = "MAE"
    higher_is_better = False
    schema = TOY_SCHEMA

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.reset()

    def reset(self) -> None:
        self.errors: list[tuple[str, float]] = []

    def process(self, samples: list[dict]) -> None:
        for s in samples:
            pred = s["pred.json"]
            self.errors.append((s["__key__"], self.scale * abs(pred["value"] - pred["target"])))

    def summarize(self) -> EvalResult:
        from matplotlib.figure import Figure

        errors = np.array([e for _, e in self.errors])
        fig = Figure(figsize=(3, 2))
        fig.subplots().hist(errors, bins=5)
        return EvalResult(metrics={"MAE": float(errors.mean()), "max_error": float(errors.max())},
                          rows=[{"key": k, "error": e} for k, e in self.errors], figures={"errors.png": fig},
                          text={"summary.txt": f"MAE {errors.mean():.3f} over {len(errors)}"},
                          series={"error_by_item": [(i, e) for i, (_, e) in enumerate(self.errors)]})

    def predicted_by(self, sample: dict) -> str | None:
        return sample["pred.json"].get("model")


def write_predictions(out: Path | str, errors: list[float], model_uri: str | None = None,
                      sample_model: str | None = None, sample_schema: str = TOY_SCHEMA, per_shard: int = 3,
                      options: storage.StorageOptions = storage.DEFAULT_OPTIONS) -> str:
    """A finished stage output (local or s3://) as the stage harness leaves it: shards, and the manifest last (with
    per-shard keys and checksums, the schema, and the config's model.uri)."""
    out = str(out)
    samples = [{"__key__": f"item{i:03d}", "pred.json": {"value": 1.0 + e, "target": 1.0, "model": sample_model}}
               for i, e in enumerate(errors)]
    records = [shards.write_shard(storage.join(out, shards.shard_name(n)), samples[i:i + per_shard], options)
               for n, i in enumerate(range(0, len(samples), per_shard))]
    manifest = {"stage": "toy_predict", "schema": sample_schema, "samples": len(samples), "shards": records,
                "config": {"model": {"uri": model_uri}}}
    storage.write_text(storage.join(out, shards.MANIFEST), json.dumps(manifest, indent=1), options)
    return out


def register(tracking_cfg, name: str, kind: str | None) -> str:
    """A tiny registered model (a torch Linear, logged with mlflow.pytorch): its version number."""
    import mlflow
    import torch

    tracking.setup(tracking_cfg)
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(torch.nn.Linear(2, 1), name="model", serialization_format="pickle",
                                        pip_requirements=[])
    return tracking.register_logged_model(info.model_uri, name, run_id=run.info.run_id, kind=kind)


def eval_cfg(tracking_cfg, predictions: str, model: str = "", evaluator: str = TOY, **extra) -> EvaluateConfig:
    return build(EvaluateConfig, {"evaluator": evaluator, "predictions": predictions, "model": model,
                                  "batch_size": 2, "tracking": {"tracking_uri": tracking_cfg.tracking_uri,
                                                                "experiment": tracking_cfg.experiment}, **extra})


def evaluation_runs(tracking_cfg) -> list:
    import mlflow

    tracking.setup(tracking_cfg)
    return mlflow.search_runs(experiment_names=[tracking_cfg.experiment], output_format="list",
                              filter_string="tags.`maskflow.job` LIKE 'evaluate-%'")


# --------------------------------------------------------------------------------------------- the harness


def test_evaluation_run_and_promotion_by_the_declared_direction(tracking_cfg, tmp_path):
    """One evaluation: an MLflow run with the metrics (and step series), items.csv, the PNG, the text, the digest of
    the predictions (tag and dataset input); the metrics, the headline name and its direction on the version. Then
    promotion without a metric uses them: MAE is lower-is-better, so the lower version wins and a worse one is not
    promoted."""
    import mlflow

    v1 = register(tracking_cfg, "toy", kind=None)
    preds = write_predictions(tmp_path / "v1", [0.5, -0.25, 0.75, 0.5, 0.0], model_uri="models:/toy@candidate",
                              sample_model=f"models:/toy/{v1}")
    out = evaluate_job(eval_cfg(tracking_cfg, preds, "models:/toy@candidate", options={"scale": 2.0}))
    assert (out["metric"], out["higher_is_better"], out["model_version"]) == ("MAE", False, v1)
    assert out["value"] == pytest.approx(2.0 * 0.4)

    run = mlflow.MlflowClient().get_run(out["run_id"])
    assert run.data.tags["maskflow.job"] == "evaluate-toy_mae"
    assert (run.data.tags["maskflow.model_name"], run.data.tags["maskflow.model_version"]) == ("toy", v1)
    digest = hashlib.sha256((tmp_path / "v1" / shards.MANIFEST).read_bytes()).hexdigest()
    assert run.data.tags["maskflow.predictions_sha256"] == digest == out["predictions_sha256"]
    assert run.data.tags["maskflow.predictions"] == preds
    assert run.data.metrics["MAE"] == pytest.approx(0.8) and run.data.metrics["max_error"] == pytest.approx(1.5)
    assert run.data.params["options.scale"] == "2.0" and run.data.params["evaluator"] == TOY
    history = mlflow.MlflowClient().get_metric_history(out["run_id"], "error_by_item")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 1.5), (3, 1.0), (4, 0.0)]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == digest[:32] and preds in dataset.dataset.source

    local = Path(mlflow.artifacts.download_artifacts(run_id=out["run_id"], dst_path=str(tmp_path / "art")))
    rows = list(csv.DictReader(io.StringIO((local / "items.csv").read_text())))
    assert [r["key"] for r in rows] == [f"item{i:03d}" for i in range(5)] and float(rows[2]["error"]) == 1.5
    assert (local / "errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (local / "summary.txt").read_text() == "MAE 0.800 over 5"
    assert (local / "config.yaml").exists()

    tags = tracking.client().get_model_version("toy", v1).tags
    assert tags["eval.MAE"] == repr(0.8) and tags["eval.run_id"] == out["run_id"]
    assert (tags[tracking.METRIC_TAG], tags[tracking.HIGHER_IS_BETTER_TAG]) == ("MAE", "false")

    first = tracking.promote("toy")  # no metric given: the recorded one, lower is better
    assert first["promoted"] and (first["metric"], first["higher_is_better"]) == ("MAE", False)

    def evaluated_version(errors: list[float]) -> str:
        version = register(tracking_cfg, "toy", kind=None)
        folder = tmp_path / f"v{version}"
        evaluate_job(eval_cfg(tracking_cfg, write_predictions(folder, errors, f"models:/toy/{version}"),
                              f"models:/toy/{version}"))
        return version

    worse = evaluated_version([0.9, 0.9, 0.9])  # MAE 0.9 > 0.8: not promoted (a higher-is-better rule would)
    decision = tracking.promote("toy")
    assert not decision["promoted"] and decision["candidate_version"] == worse
    assert (decision["candidate_value"], decision["champion_value"]) == (pytest.approx(0.9), pytest.approx(0.8))
    assert str(tracking.model_version_for_alias("toy", tracking.CHAMPION).version) == v1
    better = evaluated_version([0.1, -0.1])  # MAE 0.1: the lower one wins
    assert tracking.promote("toy")["promoted"]
    assert str(tracking.model_version_for_alias("toy", tracking.CHAMPION).version) == better
    # the CLI override still decides when given: higher-is-better would prefer the worse version
    assert tracking.promote("toy", "MAE", worse, higher_is_better=True)["promoted"]


def test_predictions_of_another_schema_are_refused_before_anything_is_logged(tracking_cfg, tmp_path):
    version = register(tracking_cfg, "toy", kind=None)
    preds = write_predictions(tmp_path / "p", [0.1, 0.2], sample_schema="image/1")
    with pytest.raises(ConfigError) as err:
        evaluate_job(eval_cfg(tracking_cfg, preds, f"models:/toy/{version}"))
    assert str(err.value) == f"predictions: {preds} holds image/1 samples; evaluator 'toy_mae' reads toy_pred/1"
    assert evaluation_runs(tracking_cfg) == []
    assert not any(k.startswith("eval.") for k in tracking.client().get_model_version("toy", version).tags)


def test_predictions_made_by_another_model_are_refused(tracking_cfg, tmp_path):
    """The manifest's pinned model.uri, or (for an alias there) the version the first sample names, must be the
    version evaluated; a checkpoint-made output cannot be compared and passes."""
    v1, v2 = register(tracking_cfg, "toy", None), register(tracking_cfg, "toy", None)
    pinned = write_predictions(tmp_path / "pinned", [0.1], model_uri=f"models:/toy/{v1}")
    with pytest.raises(ConfigError, match=rf"^model: {pinned} was made by models:/toy/{v1} \(its manifest's "
                                          rf"model.uri\), not models:/toy/{v2}: "):
        evaluate_job(eval_cfg(tracking_cfg, pinned, f"models:/toy/{v2}"))
    other = write_predictions(tmp_path / "other", [0.1], model_uri="models:/someone-else@champion")
    with pytest.raises(ConfigError, match="was made by models:/someone-else@champion"):
        evaluate_job(eval_cfg(tracking_cfg, other, "models:/toy@candidate"))
    alias = write_predictions(tmp_path / "alias", [0.1, 0.2], model_uri="models:/toy@candidate",
                              sample_model=f"models:/toy/{v1}")  # the alias has moved on to v2 since
    with pytest.raises(ConfigError, match=rf"was made by models:/toy/{v1} \(its sample item000\), not models:/toy/{v2}"):
        evaluate_job(eval_cfg(tracking_cfg, alias, "models:/toy@candidate"))
    assert evaluation_runs(tracking_cfg) == []
    checkpoint = write_predictions(tmp_path / "ckpt", [0.1], model_uri=str(tmp_path / "state.pt"))
    assert evaluate_job(eval_cfg(tracking_cfg, checkpoint, f"models:/toy/{v2}"))["model_version"] == v2


def test_damaged_predictions_fail_the_job_before_anything_is_logged(tracking_cfg, tmp_path):
    preds = write_predictions(tmp_path / "p", [0.1, 0.2, 0.3, 0.4], per_shard=2)
    manifest = json.loads((tmp_path / "p" / shards.MANIFEST).read_text())
    manifest["shards"][1]["sample_sha256"][0] = "0" * 64  # as if item002's bytes had changed after writing
    (tmp_path / "p" / shards.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(JobFailed, match=r"^predictions: sample item002 of shard-000001.tar is unusable \(checksum "):
        evaluate_job(eval_cfg(tracking_cfg, preds))
    assert evaluation_runs(tracking_cfg) == []
    with pytest.raises(Exception, match=r"^predictions \(manifest\): "):
        evaluate_job(eval_cfg(tracking_cfg, str(tmp_path / "unfinished")))


def test_predictions_on_s3(tracking_cfg, s3_options, s3_bucket):
    """Predictions on object storage (moto's S3 endpoint): read with the job's storage options, digest and dataset
    input from the s3:// manifest."""
    import mlflow

    preds = write_predictions(f"s3://{s3_bucket}/preds", [0.5, 0.25], options=s3_options)
    out = evaluate_job(eval_cfg(tracking_cfg, preds, storage={"endpoint_url": s3_options.endpoint_url}))
    assert out["value"] == pytest.approx(0.375) and out["model_version"] is None
    manifest = storage.read_bytes(f"{preds}/{shards.MANIFEST}", s3_options)
    assert out["predictions_sha256"] == hashlib.sha256(manifest).hexdigest()
    (dataset,) = mlflow.MlflowClient().get_run(out["run_id"]).inputs.dataset_inputs
    assert preds in dataset.dataset.source and dataset.dataset.source_type == "s3"


def test_evaluator_comes_from_the_model_kind(tracking_cfg, tmp_path):
    """evaluator="": the kind's evaluator (maskrcnn -> proposal_ar, so toy predictions are of the wrong schema); a
    version without a kind needs the evaluator named."""
    preds = write_predictions(tmp_path / "p", [0.1])
    mask = register(tracking_cfg, "props", kind="maskrcnn")
    with pytest.raises(ConfigError, match=r"^predictions: .* holds toy_pred/1 samples; evaluator 'proposal_ar' "
                                          r"reads proposals/1$"):
        evaluate_job(eval_cfg(tracking_cfg, preds, f"models:/props/{mask}", evaluator=""))
    bare = register(tracking_cfg, "bare", kind=None)
    with pytest.raises(ConfigError, match=rf"^evaluator: required: models:/bare/{bare} records no kind"):
        evaluate_job(eval_cfg(tracking_cfg, preds, "models:/bare@candidate", evaluator=""))


def test_config_and_option_errors_are_one_line():
    with pytest.raises(ConfigError, match="^evaluator: unknown evaluator 'nope' "):
        build(EvaluateConfig, {"evaluator": "nope", "predictions": "/p"})
    with pytest.raises(ConfigError, match="^evaluator: required without a model"):
        build(EvaluateConfig, {"predictions": "/p"})
    with pytest.raises(ConfigError, match="^model: must be a registered version"):
        build(EvaluateConfig, {"evaluator": "proposal_ar", "predictions": "/p", "model": "runs:/abc/model"})
    from maskflow.evaluate import build_evaluator

    with pytest.raises(ConfigError, match=r"^options.k: unknown option of evaluator 'proposal_ar' \(known: "
                                          r"max_proposals\)"):
        build_evaluator("proposal_ar", {"k": 3})
    with pytest.raises(ConfigError, match="^options: evaluator 'proposal_ar': max_proposals must be positive"):
        build_evaluator("proposal_ar", {"max_proposals": [0]})
    assert build_evaluator(TOY, {"scale": 3}).scale == 3


# --------------------------------------------------------------------------------------------- kinds


def test_kinds_table_names_loadable_parts():
    maskrcnn = kinds.kind("maskrcnn")
    from maskflow.evaluators.proposal_ar import ProposalAR

    assert kinds.load_attr(maskrcnn.evaluator) is ProposalAR
    assert kinds.load_attr(maskrcnn.inference_stage).__name__ == "ProposalsStage"
    assert kinds.load_attr(maskrcnn.plugin).name == "maskrcnn"  # the plugin's name is the kind
    assert kinds.evaluator_class("proposal_ar") is ProposalAR and ProposalAR.name == "proposal_ar"
    for name, path in kinds.EVALUATORS.items():
        assert kinds.load_attr(path).name == name
    for name, entry in kinds.KINDS.items():  # every kind's parts exist, and its plugin's name is the kind
        assert kinds.load_attr(entry.plugin).name == name
        assert issubclass(kinds.load_attr(entry.evaluator), Evaluator)
        assert kinds.load_attr(entry.inference_stage).config_class is not None
    with pytest.raises(ConfigError, match=r"^model: unknown model kind 'nope' \(known: .*maskrcnn"):
        kinds.kind("nope", "model")


def test_model_uri_of_the_wrong_kind_is_refused(tracking_cfg, tmp_path, monkeypatch):
    """resolve_model_uri(expected_kinds=...) refuses a version of another kind in one line; untagged versions (from
    before kinds) pass. The proposals job refuses a registered HSTN before Ray starts, nothing written."""
    from maskflow.models.loading import resolve_model_uri

    hstn = register(tracking_cfg, "tiny-hstn", kind="hstn")
    old = register(tracking_cfg, "tiny-old", kind=None)
    mask = register(tracking_cfg, "tiny-mask", kind="maskrcnn")
    assert tracking.model_kind("tiny-hstn", hstn) == "hstn" and tracking.model_kind("tiny-old", old) is None
    with pytest.raises(ConfigError) as err:
        resolve_model_uri(f"models:/tiny-hstn/{hstn}", "model.uri", expected_kinds=("maskrcnn",))
    assert str(err.value) == f"model.uri: models:/tiny-hstn/{hstn} is a 'hstn' model; this job needs 'maskrcnn'"
    assert resolve_model_uri("models:/tiny-old@candidate", expected_kinds=("maskrcnn",)) == f"models:/tiny-old/{old}"
    assert resolve_model_uri("models:/tiny-mask@candidate", expected_kinds=("maskrcnn",)) == f"models:/tiny-mask/{mask}"
    assert resolve_model_uri(f"models:/tiny-hstn/{hstn}") == f"models:/tiny-hstn/{hstn}"  # no kinds asked: any

    import proposals as proposals_script

    from maskflow import runtime

    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: pytest.fail("the job started Ray"))
    with pytest.raises(ConfigError) as err:  # the job as `python pipelines/proposals.py ...` runs it
        proposals_script.main(["--config", str(ROOT / "conf" / "proposals" / "demo.yaml"), f"input.shards={tmp_path}",
                               f"output.uri={tmp_path / 'out'}", "model.uri=models:/tiny-hstn@candidate",
                               f"tracking.tracking_uri={tracking_cfg.tracking_uri}"])
    assert str(err.value) == (f"model.uri: models:/tiny-hstn@candidate (version {hstn}) is a 'hstn' model; this job "
                              "needs 'maskrcnn' or 'sharpmask'")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- the scripts


def test_evaluate_script_config_error_before_heavy_imports():
    done = subprocess.run([sys.executable, "-c", PROBE, "pipelines/evaluate.py", "evaluator=nope", "predictions=/p"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 2 and result["heavy"] == [], done.stderr
    assert done.stderr.strip().startswith("error: evaluator: unknown evaluator 'nope'")


def pf_proposals(out: Path, model_uri: str, images: int = 8, max_shift: int = 12) -> str:
    """proposals/1 samples for real Penn-Fudan images and masks, as the proposals stage writes them, with proposals
    made from the ground truth (shifted, cut, duplicated, random) instead of a model; IoUs from ops.masks."""
    from PIL import Image

    from ops.masks import encode_masks, mask_iou
    from tests.mask_helpers import shift_masks

    root = require_shared_data(SHARED_DATA / "penn_fudan_ped")
    rng = np.random.default_rng(0)
    samples = []
    for image_id, mask_file in enumerate(sorted((root / "PedMasks").glob("*_mask.png"))[:images], start=1):
        label = np.asarray(Image.open(mask_file))
        ids = np.unique(label)[1:]
        gt = (label[None] == ids[:, None, None]).astype(np.uint8)
        h, w = label.shape
        upper = gt.copy()
        upper[:, h // 2:] = 0  # the upper half of each pedestrian
        props = np.concatenate([shift_masks(gt, int(rng.integers(-max_shift, max_shift + 1)),
                                            int(rng.integers(-max_shift, max_shift + 1)))
                                for _ in range(6)] + [upper, rng.random((4, h, w)) > 0.5])
        gt_rles, prop_rles = encode_masks(gt), encode_masks(props.astype(np.uint8))
        iou = mask_iou(prop_rles, gt_rles)
        anns = [{"id": image_id * 100 + j, "category_id": 1, "iscrowd": 0, "area": float(m.sum()),
                 "bbox": [0.0, 0.0, 1.0, 1.0], "segmentation": r} for j, (m, r) in enumerate(zip(gt, gt_rles))]
        image_file = root / "PNGImages" / mask_file.name.replace("_mask", "")
        meta = {"image_id": image_id, "file_name": image_file.name, "height": h, "width": w, "source": "penn_fudan",
                "annotations": anns}
        props_json = {"boxes": [[0.0, 0.0, 1.0, 1.0]] * len(prop_rles), "scores": rng.random(len(prop_rles)).tolist(),
                      "segmentations": prop_rles, "iou": iou.round(6).tolist(), "model": model_uri, "height": h,
                      "width": w}
        sample = {"__key__": schema.sample_key(image_id), schema.IMAGE: image_file.read_bytes(), schema.META: meta,
                  schema.PROPOSALS: props_json}
        assert schema.PROPOSALS_SCHEMA.problems(sample) == []
        samples.append(sample)
    record = shards.write_shard(str(out / shards.shard_name(0)), samples)
    manifest = {"stage": "proposals", "schema": schema.PROPOSALS_SCHEMA.name, "samples": len(samples),
                "shards": [record], "config": {"model": {"uri": model_uri}}}
    storage.write_text(str(out / shards.MANIFEST), json.dumps(manifest))
    return str(out)


def test_proposal_ar_through_the_harness_on_penn_fudan(tracking_cfg, tmp_path, capsys):
    """The README's two evaluation commands on proposals/1 shards of real Penn-Fudan masks: the proposals command
    (its keys as before) and the generic one with conf/eval/proposals.yaml and an alias; same AR as
    evaluate_proposal_samples, recorded on a 'maskrcnn' version, which promotion then reads (AR_100, higher)."""
    import evaluate as evaluate_script
    import evaluate_proposals as evaluate_proposals_script
    import mlflow

    from maskflow.evaluators.proposal_ar import evaluate_proposal_samples

    version = register(tracking_cfg, "pf-maskrcnn", kind="maskrcnn")
    preds = pf_proposals(tmp_path / "props", f"models:/pf-maskrcnn/{version}")
    expected = evaluate_proposal_samples(shards.iter_samples(preds), max_proposals=(1, 10, 100))
    assert 0.0 < expected["AR@1"] < expected["AR@10"] <= expected["AR@100"] < 1.0 and expected["num_gt"] > 8

    track = [f"tracking.tracking_uri={tracking_cfg.tracking_uri}", f"tracking.experiment={tracking_cfg.experiment}"]
    legacy = evaluate_proposals_script.main([f"proposals={preds}", "model.name=pf-maskrcnn", f"model.version={version}",
                                             "max_proposals=[1,10,100]", *track])
    assert legacy["AR@100"] == expected["AR@100"] and legacy["num_images"] == 8
    assert capsys.readouterr().out.splitlines()[0].split() == ["AR@1", "AR@10", "AR@100"]
    generic = evaluate_script.main(["--config", str(ROOT / "conf" / "eval" / "proposals.yaml"), f"predictions={preds}",
                                    "model=models:/pf-maskrcnn@candidate", *track])
    assert (generic["metric"], generic["higher_is_better"]) == ("AR_100", True)
    assert generic["value"] == expected["AR@100"] and generic["metrics"]["AR_10"] == expected["AR@10"]

    run = mlflow.MlflowClient().get_run(generic["run_id"])
    assert run.data.tags["maskflow.job"] == "evaluate-proposal_ar"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "recall_100_vs_iou")] == \
        list(range(50, 100, 5))
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"items.csv", "recall_curves.png", "ar_table.txt", "config.yaml"} <= artifacts
    decision = tracking.promote("pf-maskrcnn")
    assert decision["promoted"] and decision["metric"] == "AR_100" and decision["higher_is_better"] is True
    assert decision["candidate_value"] == pytest.approx(expected["AR@100"])


def test_refined_against_unrefined_proposals_in_one_run(tracking_cfg, tmp_path):
    """FFD-Net's evaluation: refined and unrefined proposals of the same images scored in one MLflow run — both AR
    tables, the relative gain, both curves in one figure, the IoU-bin table — and AR@1000 left out when no image has
    more than 100 proposals. A baseline over other images is refused in one line naming ``baseline``."""
    import mlflow

    from maskflow.evaluators.proposal_ar import evaluate_proposal_samples

    # "refined": the same generator's recipe with the masks shifted less (same seed: same random proposals)
    unrefined = pf_proposals(tmp_path / "unrefined", "models:/gen/1", max_shift=12)
    refined = pf_proposals(tmp_path / "refined", "models:/ffd/1", max_shift=3)
    before = evaluate_proposal_samples(shards.iter_samples(unrefined), max_proposals=(10, 100))
    after = evaluate_proposal_samples(shards.iter_samples(refined), max_proposals=(10, 100))
    assert after["AR@100"] > before["AR@100"] > 0

    result = evaluate_job(build(EvaluateConfig, {
        "evaluator": "proposal_ar", "predictions": refined, "baseline": unrefined, "labels": ["refined", "unrefined"],
        "tracking": {"tracking_uri": tracking_cfg.tracking_uri, "experiment": tracking_cfg.experiment}}))
    metrics = result["metrics"]
    assert metrics["AR_100"] == after["AR@100"] and metrics["unrefined/AR_100"] == before["AR@100"]
    assert metrics["gain/AR_100"] == pytest.approx((after["AR@100"] - before["AR@100"]) / before["AR@100"])
    assert "AR_1000" not in metrics and "unrefined/AR_1000" not in metrics  # at most 7 G + 4 proposals an image
    assert metrics["num_proposals_max"] < 100
    assert "AR@1000 not reported" in result["text"]["ar_table.txt"]
    run = mlflow.MlflowClient().get_run(result["run_id"])
    assert run.data.tags["maskflow.baseline"] == unrefined and run.data.tags["maskflow.labels"] == "refined,unrefined"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"recall_curves.png", "iou_bins.txt", "ar_table.txt", "items.csv"} <= artifacts
    assert not any(a.startswith("unrefined_recall") for a in artifacts)  # one figure holds both
    bins = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/iou_bins.txt").splitlines()
    assert bins[0].split()[:3] == ["initial", "IoU", "proposals"] and len(bins) == 6

    with pytest.raises(ConfigError, match=r"^baseline: .* hold different items \(0 only in the predictions, 2 only"):
        evaluate_job(build(EvaluateConfig, {
            "evaluator": "proposal_ar", "predictions": pf_proposals(tmp_path / "six", "models:/ffd/1", images=6),
            "baseline": unrefined, "tracking": {"tracking_uri": tracking_cfg.tracking_uri}}))


def test_iou_bin_table_pairs_proposals_by_image_and_position():
    """FFD-Net's IoU-bin table (sec. 4.2.1) from hand-made best IoUs: bins by the initial IoU, means before and
    after, relative gain; an image only one side has is left out."""
    from maskflow.evaluators.proposal_ar import iou_bin_table

    before = {"a": np.array([0.55, 0.58, 0.75, 0.2], np.float32), "b": np.array([0.95]), "gone": np.array([0.6])}
    after = {"a": np.array([0.65, 0.68, 0.76, 0.9], np.float32), "b": np.array([0.9]), "new": np.array([0.7])}
    rows = {round(r["low"], 1): r for r in iou_bin_table(before, after)}
    assert rows[0.5]["proposals"] == 2 and rows[0.5]["before"] == pytest.approx(0.565)
    assert rows[0.5]["after"] == pytest.approx(0.665) and rows[0.5]["gain"] == pytest.approx(0.1 / 0.565)
    assert rows[0.6]["proposals"] == 0 and np.isnan(rows[0.6]["after"])
    assert rows[0.7]["proposals"] == 1 and rows[0.9]["proposals"] == 1 and rows[0.9]["gain"] < 0
