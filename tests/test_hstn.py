"""HSTN (Shu et al., "Hierarchical Spatial Transformer Network") networks, plugins, inference stages, evaluators and
the OpenCV baseline, on real data in-process (no Ray): cluttered MNIST 40x40 digits imported by the
cluttered-digits stage, and Penn-Fudan photographs made into elastic pairs by the affine-pairs stage's functions
(shrunk first so a pair takes milliseconds, not seconds)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from maskflow import config
from maskflow.data import schema
from maskflow.models.hstn import HSTNAligner, HSTNClassifier, load_hstn, resize_flow
from maskflow.models.hstn_config import HSTNAlignConfig, HSTNClassifierConfig
from maskflow.models.hstn_data import decode_pair, digit_batch, pair_batch
from trainers.hstn import HSTNAlignPlugin, HSTNAlignTrainConfig, HSTNClassifierPlugin, HSTNClassifierTrainConfig

CLS_VARIANTS = ("cnn", "affine_stn", "hstn")
ALIGN_VARIANTS = ("affine_stn", "hstn")
PAIR_SIDE = 96  # Penn-Fudan photographs shrunk to this longer side before pairs are made


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small convolutions on a shared 2-core machine: one thread is several times faster than two that wait for each
    other (measured: 0.1 s vs 1.2 s per classifier step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def digit_samples(shared_data) -> list[dict]:
    """The first 64 validation digits of the real cluttered MNIST 40x40, as the cluttered-digits stage imports
    them (``cluttered_digit/1`` samples, in-process)."""
    from maskflow.stages.cluttered_digits import ClutteredDigitsConfig, ClutteredDigitsStage

    npz = shared_data / "cluttered_mnist_40x40" / "cluttered_mnist_40x40_trainval.npz"
    cfg = config.build(ClutteredDigitsConfig, {
        "input": {"source": "import_npz", "uri": str(npz), "name": "cluttered_mnist_40x40", "splits": ["valid"]},
        "output": {"uri": "unused", "samples_per_shard": 64}})
    stage = ClutteredDigitsStage(cfg)
    plan = stage.plan()
    assert plan.units[0].items[0][0] == "valid" and plan.units[0].items[0][2] == 10000  # ids count every split
    stage.setup()
    return list(stage.process(plan.units[0]))


def shrink_image_sample(sample: dict, side: int) -> dict:
    """An ``image/1`` sample (meta as a dict) resized so its longer side is ``side`` (image bilinear, masks nearest)."""
    from PIL import Image

    from maskflow.data.validate import decode_image, decode_rle, encode_mask

    image = decode_image(sample[schema.IMAGE]).permute(1, 2, 0).numpy()
    meta = sample[schema.META]
    scale = side / max(meta["height"], meta["width"])
    size = (max(1, round(meta["width"] * scale)), max(1, round(meta["height"] * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    annotations = []
    for ann in meta["annotations"]:
        mask = np.asarray(Image.fromarray(decode_rle(ann["segmentation"]).astype(np.uint8)).resize(size, Image.NEAREST))
        if mask.any():
            annotations.append({**ann, "segmentation": encode_mask(mask.astype(bool))})
    return {"__key__": sample["__key__"], schema.IMAGE: schema.png(small),
            schema.META: {**meta, "height": size[1], "width": size[0], "annotations": annotations}}


@pytest.fixture(scope="module")
def pair_samples(shared_data) -> list[dict]:
    """12 ``pair/1`` samples (affine + elastic, no flip, no jitter: section 4.2's "linear transformation plus
    elastic deformation") made by the affine-pairs stage's :func:`make_pair` from shrunk Penn-Fudan photographs."""
    from maskflow.data.coco import image_records
    from maskflow.data.convert import penn_fudan_to_coco
    from maskflow.stages.affine_pairs import make_pair
    from maskflow.stages.affine_pairs_config import PairSettings
    from maskflow.stages.ingest import image_sample
    from maskflow.storage import DEFAULT_OPTIONS

    coco, images = penn_fudan_to_coco(str(shared_data / "penn_fudan_ped"))
    records, _ = image_records(coco, images)
    settings = config.build(PairSettings, {"flip_prob": 0, "brightness": 0, "contrast": 0, "saturation": 0,
                                           "rotation_deg": 15, "translation": 0.05, "elastic_amplitude": 3,
                                           "elastic_spacing": 24})
    pairs = []
    for record in records[:12]:
        sample = next(s for s in image_sample(record, "penn_fudan", DEFAULT_OPTIONS) if isinstance(s, dict))
        small = shrink_image_sample(sample, PAIR_SIDE)
        pair = make_pair(small["__key__"], small[schema.IMAGE], small[schema.META], settings, "penn_fudan")
        assert isinstance(pair, dict), pair
        pairs.append(pair)
    return pairs


def digit_train_config(variant: str, **model) -> HSTNClassifierTrainConfig:
    return config.build(HSTNClassifierTrainConfig, {"data": {"train": "unused"},
                                                    "model": {"variant": variant, **model}})


def align_train_config(variant: str, **model) -> HSTNAlignTrainConfig:
    return config.build(HSTNAlignTrainConfig, {"task": "align", "data": {"train": "unused"},
                                               "model": {"variant": variant, **model}})


def column_batch(samples: list[dict], keys: tuple[str, ...]) -> dict:
    """Samples as the Ray Data numpy batch a plugin's collate gets: one column per entry, raw bytes (JSON encoded)."""
    def raw(value):
        return value if isinstance(value, (bytes, bytearray)) else schema.dumps(value)

    return {k: np.array([raw(s[k]) for s in samples], dtype=object) for k in keys}


@pytest.fixture(scope="module")
def digits(digit_samples) -> dict:
    return digit_batch([s["image.png"] for s in digit_samples], [s[schema.META] for s in digit_samples], 40)


@pytest.fixture(scope="module")
def pairs(pair_samples) -> dict:
    return pair_batch([decode_pair(s["source.png"], s["target.png"], s["flow_t2s.npy"], 64) for s in pair_samples])


# --------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("variant", CLS_VARIANTS)
def test_classifier_output_shapes(variant, digits):
    model = HSTNClassifier(config.build(HSTNClassifierConfig, {"variant": variant})).eval()
    out = model(digits["image"][:8])
    assert out.logits.shape == (8, 10) and out.warped.shape == (8, 1, 40, 40)
    assert (out.theta is None) == (variant == "cnn")
    if out.theta is not None:
        assert out.theta.shape == (8, 2, 3)
    assert (out.residual_flow is None) == (variant != "hstn")
    if out.residual_flow is not None:
        assert out.residual_flow.shape == (8, 2, 40, 40)


@pytest.mark.parametrize("variant", ALIGN_VARIANTS)
def test_aligner_output_shapes(variant, pairs):
    model = HSTNAligner(config.build(HSTNAlignConfig, {"variant": variant})).eval()
    out = model(pairs["source"][:4], pairs["target"][:4])
    assert out.warped.shape == (4, 3, 64, 64) and out.flow.shape == (4, 2, 64, 64) and out.theta.shape == (4, 2, 3)
    assert (out.residual_flow is None) == (variant == "affine_stn")


def test_collated_batches_from_real_samples(digit_samples, pair_samples, digits, pairs):
    labels = [s[schema.META]["label"] for s in digit_samples]
    assert digits["label"].tolist() == labels and digits["image"].shape == (64, 1, 40, 40)
    assert 0.0 <= float(digits["image"].min()) and float(digits["image"].max()) <= 1.0
    # the plugins' collate read the raw columns Ray Data hands them
    plugin = HSTNClassifierPlugin(digit_train_config("hstn"))
    batch = plugin.collate(column_batch(digit_samples[:5], ("image.png", "json")), None)
    assert torch.equal(batch["image"], digits["image"][:5]) and plugin.batch_size_of(batch) == 5
    plugin = HSTNAlignPlugin(align_train_config("hstn"))
    batch = plugin.collate(column_batch(pair_samples[:3], ("source.png", "target.png", "flow_t2s.npy")), None)
    assert torch.equal(batch["flow_t2s"], pairs["flow_t2s"][:3]) and plugin.batch_size_of(batch) == 3
    height, width = batch["sizes"][0]
    assert max(height, width) == PAIR_SIDE and batch["flow_t2s_full"][0].shape == (2, height, width)
    # resizing keeps the geometry: the target is the source warped by the (resized) ground truth where valid
    from ops.warp import warp

    valid = pairs["valid"]
    residual = ((warp(pairs["source"], pairs["flow_t2s"]) - pairs["target"]).abs() * valid).sum() / valid.sum() / 3
    assert residual < 0.03, residual


def test_resize_flow_is_the_affine_flow_of_the_resized_grid():
    """An affine motion field resized to another grid equals the affine field of the conjugated theta there
    (``theta' = S^-1 theta S`` with ``S`` the grid scale): the (S-1)/(W-1) per-axis rule, exact for linear fields."""
    from ops.warp import affine_to_flow, compose_affine

    height, width, side = 57, 83, 64
    theta = torch.tensor([[[1.1, 0.2, -3.0], [-0.1, 0.9, 5.0]]], dtype=torch.float64)
    scale = torch.tensor([[[(width - 1) / (side - 1), 0, 0], [0, (height - 1) / (side - 1), 0]]], dtype=torch.float64)
    inverse = torch.tensor([[[(side - 1) / (width - 1), 0, 0], [0, (side - 1) / (height - 1), 0]]],
                           dtype=torch.float64)
    expected = affine_to_flow(compose_affine(inverse, compose_affine(theta, scale)), side, side)
    resized = resize_flow(affine_to_flow(theta, height, width), side, side)
    assert torch.allclose(resized, expected, atol=1e-9)
    assert torch.allclose(resize_flow(resized, height, width), affine_to_flow(theta, height, width), atol=1e-9)


def test_hstn_equals_affine_stn_at_initialisation(digits, pairs):
    """The flow generator's zero-initialised last layer makes HSTN exactly its Affine-STN at the start (section
    3.2), which is why HSTN's affine generator can be initialised from a trained Affine-STN by key prefix."""
    torch.manual_seed(0)
    affine_stn = HSTNClassifier(config.build(HSTNClassifierConfig, {"variant": "affine_stn"})).eval()
    with torch.no_grad():  # a trained-looking affine generator: away from the identity
        affine_stn.affine.theta.weight.normal_(0, 0.02)
    hstn = HSTNClassifier(config.build(HSTNClassifierConfig, {"variant": "hstn"})).eval()
    missing, unexpected = hstn.load_state_dict(affine_stn.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("flow.") for k in missing)
    with torch.no_grad():
        a, h = affine_stn(digits["image"]), hstn(digits["image"])
        assert float(h.residual_flow.abs().max()) == 0.0
        assert torch.allclose(a.logits, h.logits, atol=1e-5) and torch.allclose(a.warped, h.warped, atol=1e-4)
        assert float((a.warped - digits["image"]).abs().max()) > 0.05  # the affine warp did something
        hstn.flow.head.weight.normal_(0, 0.01)  # without the zero initialisation they differ
        assert not torch.allclose(affine_stn(digits["image"]).warped, hstn(digits["image"]).warped, atol=1e-4)

    aligner_stn = HSTNAligner(config.build(HSTNAlignConfig, {"variant": "affine_stn"})).eval()
    aligner = HSTNAligner(config.build(HSTNAlignConfig, {"variant": "hstn"})).eval()
    aligner.load_state_dict(aligner_stn.state_dict(), strict=False)
    with torch.no_grad():
        a, h = aligner_stn(pairs["source"], pairs["target"]), aligner(pairs["source"], pairs["target"])
    assert torch.allclose(a.flow, h.flow, atol=1e-4) and torch.allclose(a.warped, h.warped, atol=1e-4)


def _step(plugin, model, batch, optimizer) -> float:
    from maskflow.train.plugin import split_step_output

    out = split_step_output(plugin.losses(model, batch, "cpu"))
    loss = sum(out.losses.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@pytest.mark.parametrize("task,variant", [("classify", v) for v in CLS_VARIANTS] + [("align", v) for v in ALIGN_VARIANTS])
def test_gradients_reach_every_trainable_parameter(task, variant, digits, pairs):
    """After one step (which moves the zero-initialised last layers, the only ones a gradient reaches at first),
    every parameter gets a non-zero gradient from the plugin's loss."""
    torch.manual_seed(0)
    if task == "classify":
        plugin, batch = HSTNClassifierPlugin(digit_train_config(variant)), {k: v[:16] for k, v in digits.items()}
    else:
        plugin = HSTNAlignPlugin(align_train_config(variant))
        batch = {k: v[:4] for k, v in pairs.items()}
    model = plugin.build_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    _step(plugin, model, batch, optimizer)
    optimizer.zero_grad()
    from maskflow.train.plugin import split_step_output

    out = split_step_output(plugin.losses(model, batch, "cpu"))
    sum(out.losses.values()).backward()
    expected = {"cross_entropy"} if task == "classify" else {"photometric"}
    if variant == "hstn":
        expected |= {"bending", "smoothness"}
    assert set(out.losses) == expected
    no_gradient = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_gradient, no_gradient


def test_classifier_overfits_a_small_batch(digits):
    """HSTN on 16 real cluttered digits: the objective (cross-entropy + weighted penalties) falls >= 5x."""
    torch.manual_seed(0)
    plugin = HSTNClassifierPlugin(digit_train_config("hstn"))
    batch = {k: v[:16] for k, v in digits.items()}
    model = plugin.build_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = [_step(plugin, model, batch, optimizer) for _ in range(60)]
    first, last = losses[0], float(np.mean(losses[-5:]))
    assert first / last >= 5, (first, last)
    model.eval()
    with torch.no_grad():
        values = plugin.validation_step(model, batch, "cpu")
    assert float(values["accuracy"].mean()) == 1.0 and float(values["cross_entropy"].mean()) < first / 5


def test_aligner_overfits_a_small_batch(pairs):
    """HSTN on 4 real elastic pairs, unsupervised: the objective (photometric L2 + penalties) falls >= 5x, and the
    predicted flow moves towards the ground truth it never saw."""
    from ops.warp import epe

    torch.manual_seed(0)
    plugin = HSTNAlignPlugin(align_train_config("hstn"))
    batch = {k: v[:4] for k, v in pairs.items()}
    model = plugin.build_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    start_epe = float(epe(torch.zeros_like(batch["flow_t2s"]), batch["flow_t2s"], batch["valid"]))
    losses = [_step(plugin, model, batch, optimizer) for _ in range(120)]
    first, last = losses[0], float(np.mean(losses[-5:]))
    assert first / last >= 5, (first, last)
    with torch.no_grad():
        flow = model(batch["source"], batch["target"]).flow
    assert float(epe(flow, batch["flow_t2s"], batch["valid"])) < 0.4 * start_epe


def test_align_validation_epe_is_measured_at_the_pairs_resolution(pairs):
    """An identity aligner (Affine-STN at initialisation: zero flow) scores each pair's own ground-truth EPE at full
    resolution over the central valid region."""
    from maskflow.evaluators.flow_epe import pair_epe

    plugin = HSTNAlignPlugin(align_train_config("affine_stn"))
    model = plugin.build_model().eval()
    with torch.no_grad():
        values = plugin.validation_step(model, pairs, "cpu")
    expected = [float(pair_epe(torch.zeros_like(gt)[None], gt[None])[0]) for gt in pairs["flow_t2s_full"]]
    assert values["epe"].shape == (len(expected),)
    assert np.allclose(values["epe"].numpy(), expected, atol=1e-4) and min(expected) > 0.5


# --------------------------------------------------------------------------------------------- evaluators


def digit_prediction(sample: dict, probabilities) -> dict:
    probabilities = [float(p) for p in probabilities]
    return {"__key__": sample["__key__"], "image.png": sample["image.png"], schema.META: sample[schema.META],
            schema.PREDICTION: {"label": int(np.argmax(probabilities)), "probabilities": probabilities,
                                "model": "models:/m/1"}}


def test_classification_evaluator(digit_samples):
    from maskflow.evaluators.classification import ClassificationAccuracy

    samples = digit_samples[:20]
    perfect = [digit_prediction(s, np.eye(10)[s[schema.META]["label"]]) for s in samples]
    evaluator = ClassificationAccuracy()
    evaluator.process(perfect[:7])
    evaluator.process(perfect[7:])
    result = evaluator.summarize()
    assert result.metrics["accuracy"] == 1.0 and result.metrics["cross_entropy"] == 0.0
    assert result.metrics["samples"] == 20 and len(result.rows) == 20 and "confusion_matrix.png" in result.figures

    # half right with p = 0.8, half wrong (all mass on label + 1): accuracy 0.5, CE = (-ln 0.8 - ln 1e-12) / 2
    evaluator.reset()
    mixed = []
    for i, s in enumerate(samples):
        label = s[schema.META]["label"]
        p = np.full(10, 0.2 / 9)
        p[label if i % 2 == 0 else (label + 1) % 10] = 0.8
        if i % 2:
            p = np.eye(10)[(label + 1) % 10]
        mixed.append(digit_prediction(s, p))
    evaluator.process(mixed)
    result = evaluator.summarize()
    assert result.metrics["accuracy"] == 0.5
    assert result.metrics["cross_entropy"] == pytest.approx((-np.log(0.8) - np.log(1e-12)) / 2)
    confusion = np.array([[int(v) for v in line.split(",")] for line in result.text["confusion_matrix.csv"].split()])
    assert confusion.sum() == 20 and np.trace(confusion) == 10
    buf = io.BytesIO()
    result.figures["confusion_matrix.png"].savefig(buf, format="png")
    assert buf.getvalue().startswith(b"\x89PNG")
    assert evaluator.predicted_by(mixed[0]) == "models:/m/1"


def flow_prediction(pair: dict, predicted: np.ndarray, model: str = "test") -> dict:
    return {**{k: v for k, v in pair.items() if k != "flow_s2t.npy"},
            "pred_flow_t2s.npy": schema.npy(predicted),
            schema.PREDICTION: {"model": model, "image_size": 0, "seconds": 0.01}}


def test_flow_epe_evaluator(pair_samples):
    from maskflow.evaluators.flow_epe import FlowEPE

    assert not schema.FLOW_PREDICTION_SCHEMA.problems(flow_prediction(pair_samples[0], np.zeros((2, 4, 4))))
    gts = [schema.load_npy(s["flow_t2s.npy"]) for s in pair_samples]
    evaluator = FlowEPE()
    evaluator.process([flow_prediction(s, gt) for s, gt in zip(pair_samples, gts)])
    result = evaluator.summarize()
    assert result.metrics["EPE"] == 0.0 and result.metrics["EPE_valid"] == 0.0
    assert result.metrics["pairs"] == len(pair_samples) and result.metrics["seconds_per_pair"] == pytest.approx(0.01)

    evaluator.reset()  # off by (3, 4) px everywhere: EPE 5 wherever it is measured
    evaluator.process([flow_prediction(s, gt + np.array([3.0, 4.0], np.float32)[:, None, None])
                       for s, gt in zip(pair_samples, gts)])
    result = evaluator.summarize()
    assert result.metrics["EPE"] == pytest.approx(5.0) and len(result.rows) == len(pair_samples)
    assert "overlay.png" in result.figures
    buf = io.BytesIO()
    result.figures["overlay.png"].savefig(buf, format="png")
    assert buf.getvalue().startswith(b"\x89PNG")


def test_central_region_excludes_the_border():
    """Only the central box counts: an error confined to the border leaves the EPE at 0; inside it counts."""
    from maskflow.evaluators.flow_epe import central_mask, pair_epe

    gt = torch.zeros(1, 2, 40, 60)
    pred = gt.clone()
    pred[..., :5, :] = 10.0
    assert float(pair_epe(pred, gt)[0]) == 0.0 and float(pair_epe(pred, gt, None)[0]) > 0
    mask = central_mask(40, 60, 0.5)
    assert mask.sum() == 20 * 30 and mask[0, 0, 10, 15] == 1 and mask[0, 0, 9, 15] == 0


# --------------------------------------------------------------------------------------------- baseline, stages


def test_opencv_dis_recovers_a_translation(pair_samples):
    """A pure translation of a real photograph (target(p) = source(p + (3, -2))): DIS's flow_t2s is within a
    fraction of a pixel of it in the central region."""
    from maskflow.evaluators.flow_epe import pair_epe
    from maskflow.models.hstn_baselines import opencv_flow_t2s, seconds_per_pair

    source = schema.load_png(pair_samples[0]["source.png"])
    dx, dy = 3, -2
    target = np.zeros_like(source)
    target[2:, :-3] = source[:-2, 3:]  # target[y, x] = source[y + dy, x + dx]
    flow = opencv_flow_t2s(source, target, "dis")
    truth = np.broadcast_to(np.array([dx, dy], np.float32)[:, None, None], flow.shape)
    error = float(pair_epe(torch.from_numpy(flow)[None], torch.from_numpy(truth.copy())[None])[0])
    assert error < 0.5, error
    farneback = opencv_flow_t2s(source, target, "farneback")
    assert float(pair_epe(torch.from_numpy(farneback)[None], torch.from_numpy(truth.copy())[None])[0]) < 1.0
    timing = seconds_per_pair(lambda pair: opencv_flow_t2s(*pair), [(source, target)] * 4, warmup=1)
    assert timing["pairs"] == 3 and 0 < timing["median"] < 1


def test_flow_predict_stage_in_process(pair_samples, tmp_path):
    """The flow inference stage's work in-process: an hstn_align checkpoint (built from ``model.arch``) and the DIS
    baseline turn pair samples into flow_prediction/1 samples at the pairs' resolution, which FlowEPE scores."""
    from maskflow.evaluators.flow_epe import FlowEPE
    from maskflow.stages.hstn_predict import FlowPredictConfig, FlowPredictStage

    checkpoint = tmp_path / "state.pt"
    arch = {"variant": "hstn", "image_size": 64}
    torch.save({"model": HSTNAligner(config.build(HSTNAlignConfig, arch)).state_dict()}, checkpoint)
    scores = {}
    for model in ({"uri": str(checkpoint), "arch": arch}, {"uri": "opencv:dis"}):
        cfg = config.build(FlowPredictConfig, {"input": {"shards": "unused"}, "model": model,
                                               "output": {"uri": str(tmp_path / "out")}})
        stage = FlowPredictStage(cfg)
        stage.setup()
        items = [(s, stage.decode(s)) for s in pair_samples[:4]]
        with torch.inference_mode():
            out = stage.predict(items)
        for sample, pair in zip(out, pair_samples):
            assert not stage.schema.problems(sample), stage.schema.problems(sample)
            assert schema.load_npy(sample["pred_flow_t2s.npy"]).shape == schema.load_npy(pair["flow_t2s.npy"]).shape
            assert sample["flow_s2t.npy"] == pair["flow_s2t.npy"] and sample[schema.PREDICTION]["seconds"] > 0
        evaluator = FlowEPE()
        evaluator.process(out)
        scores[cfg.model.baseline or "hstn"] = evaluator.summarize().metrics["EPE"]
    assert all(np.isfinite(v) for v in scores.values()), scores


def test_digit_predict_stage_in_process(digit_samples, tmp_path):
    from maskflow.evaluators.classification import ClassificationAccuracy
    from maskflow.stages.hstn_predict import DigitPredictConfig, DigitPredictStage

    checkpoint = tmp_path / "state.pt"
    arch = {"variant": "affine_stn", "image_size": 40}
    model = HSTNClassifier(config.build(HSTNClassifierConfig, arch))
    torch.save({"model": model.state_dict()}, checkpoint)
    assert isinstance(load_hstn(str(checkpoint), config.build(HSTNClassifierConfig, arch)), HSTNClassifier)
    cfg = config.build(DigitPredictConfig, {"input": {"shards": "unused"}, "model": {"uri": str(checkpoint),
                                                                                    "arch": arch},
                                            "output": {"uri": str(tmp_path / "out")}})
    stage = DigitPredictStage(cfg)
    stage.setup()
    damaged = {**digit_samples[1], "__key__": "damaged", "image.png": digit_samples[1]["image.png"][:40]}
    with pytest.raises(ValueError, match="corrupt image"):
        stage.decode(damaged)
    with torch.inference_mode():
        out = stage.predict([(s, stage.decode(s)) for s in digit_samples[:8]])
    assert all(not stage.schema.problems(s) for s in out)
    probabilities = np.array([s[schema.PREDICTION]["probabilities"] for s in out])
    assert probabilities.shape == (8, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    evaluator = ClassificationAccuracy()
    evaluator.process(out)
    assert 0 <= evaluator.summarize().metrics["accuracy"] <= 1


def test_configs_parse_and_pick_their_plugin():
    from pathlib import Path

    from trainers.hstn import PLUGINS, parse_config

    root = Path(__file__).resolve().parents[1] / "conf" / "hstn"
    kinds = {}
    for path in sorted([*root.glob("cls_*.yaml"), *root.glob("align_*.yaml")]):
        cfg = parse_config(["--config", str(path)])
        kinds[path.name] = (PLUGINS[cfg.task][1].name, cfg.model.variant)
    assert kinds == {"align_affine_stn_cpu.yaml": ("hstn_align", "affine_stn"), "align_cpu.yaml": ("hstn_align", "hstn"),
                     "cls_affine_stn_cpu.yaml": ("hstn_cls", "affine_stn"), "cls_cnn_cpu.yaml": ("hstn_cls", "cnn"),
                     "cls_cpu.yaml": ("hstn_cls", "hstn")}
    with pytest.raises(config.ConfigError, match="^task: must be one of"):
        parse_config(["--config", str(root / "cls_cpu.yaml"), "task=segment"])
    with pytest.raises(config.ConfigError, match="^model.flow.channels: 3 levels need image_size divisible by 8"):
        parse_config(["--config", str(root / "align_cpu.yaml"), "model.image_size=60"])
    # the inference configs name their kind, whose stage reads them (pipelines/predict.py)
    from maskflow.models import kinds

    for path, kind in (("predict_cls.yaml", "hstn_cls"), ("predict_align.yaml", "hstn_align")):
        data = config.load_yaml(str(root / path))
        assert data.pop("kind") == kind
        stage_class = kinds.load_attr(kinds.kind(kind).inference_stage)
        assert stage_class.kind == kind and config.build(stage_class.config_class, data).model.uri
    from maskflow.stages.hstn_predict import FlowPredictConfig

    data = config.load_yaml(str(root / "predict_align.yaml"))
    data.pop("kind")
    assert config.build(FlowPredictConfig, {**data, "model": {"uri": "opencv:dis"}}).model.baseline == "dis"
    with pytest.raises(config.ConfigError, match="^model.uri: unknown OpenCV method"):
        config.build(FlowPredictConfig, {**data, "model": {"uri": "opencv:lucas_kanade"}})
