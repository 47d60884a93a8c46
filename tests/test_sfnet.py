"""SFNet and its affine-regression baseline (trainers/sfnet.py, maskflow/models/sfnet.py), the inference stage and
the correspondence evaluator, on real Penn-Fudan pairs made in-process by the affine-pairs stage's own functions.
No Ray: the plugin's collate / losses / validation_step run as the harness calls them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskflow import config, shards
from maskflow.config import JobFailed
from maskflow.data import schema
from maskflow.data.validate import encode_mask
from maskflow.evaluators.correspondence import CorrespondenceEvaluator, pseudo_keypoints
from maskflow.models.sfnet import AffineRegressionNet, FlowPair, SFNet, resize_flow
from maskflow.stages import affine_pairs as ap
from maskflow.train.loop import freeze, keep_frozen_in_eval
from maskflow.train.plugin import StepOutput
from ops.sfnet import sfnet_loss_weights
from ops.warp import compose, valid_mask
from tests.conftest import ROOT
from trainers.sfnet import AffineRegressionPlugin, SFNetPlugin, SFNetTrainConfig, plugin_for

PAPER_LAMBDAS = (3.0, 16.0, 0.5)


@pytest.fixture(autouse=True)
def one_thread():
    """The losses here are small: OpenMP threads would only fight the other tests' processes for the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def penn_fudan_pairs(shared_data, photos: range, per_image: int, seed: int = 0) -> list[dict]:
    """``pair`` samples (raw entry bytes, as a shard holds them) of Penn-Fudan photos (indices into the sorted file
    list; image id = index + 1), made by the affine-pairs stage's own function with jitter on and no flips; the
    photos at half size (about 270 x 280: the pairs and their decoding cost a quarter)."""
    root = shared_data / "penn_fudan_ped"
    names = sorted(p.stem for p in (root / "PNGImages").glob("*.png"))
    settings = config.build(ap.PairSettings, {"seed": seed, "per_image": per_image, "flip_prob": 0.0})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    samples = []
    for index in photos:
        name = names[index]
        photo = Image.open(root / "PNGImages" / f"{name}.png").convert("RGB")
        size = (photo.width // 2, photo.height // 2)
        labels = np.array(Image.open(root / "PedMasks" / f"{name}_mask.png").resize(size, Image.NEAREST))
        meta = {"image_id": index + 1, "source": "penn_fudan", "file_name": f"{name}.png",
                "annotations": [{"segmentation": encode_mask(labels == k)} for k in range(1, labels.max() + 1)]}
        image = schema.png(np.array(photo.resize(size, Image.BILINEAR)))
        samples += ap.make_pairs(schema.sample_key(index + 1), image, meta, settings)
    torch.set_num_threads(threads)
    return [{k: (v if k == "__key__" else shards.encode_entry(v)) for k, v in s.items()} for s in samples]


@pytest.fixture(scope="module")
def pair_samples(shared_data):
    """Two pairs (independent affine draws) of each of two Penn-Fudan photos."""
    return penn_fudan_pairs(shared_data, range(2), per_image=2)


@pytest.fixture(scope="module")
def ray_batch(pair_samples):
    """The pairs as a Ray Data numpy batch of raw shard rows (what collate receives)."""
    columns = [k for k in pair_samples[0] if k != "__key__"]
    batch = {c: np.array([s[c] for s in pair_samples], dtype=object) for c in columns}
    batch["__key__"] = np.array([s["__key__"] for s in pair_samples])
    return batch


def train_config(**overrides) -> SFNetTrainConfig:
    data = config.load_yaml(str(ROOT / "conf" / "sfnet" / "cpu.yaml"))
    return config.build(SFNetTrainConfig, config.apply_overrides(data, [f"{k}={v}" for k, v in overrides.items()]))


def built(plugin):
    torch.manual_seed(0)
    model = plugin.build_model()
    freeze(model, plugin.cfg.freeze)  # as the harness does: the config's frozen prefixes
    return model


def train_mode(model, plugin):
    model.train()
    keep_frozen_in_eval(model, plugin.cfg.freeze)


# --------------------------------------------------------------------------------------------- model


def test_output_shapes_and_units(ray_batch):
    for variant, net in (("sfnet", SFNet), ("affine_baseline", AffineRegressionNet)):
        plugin = plugin_for(train_config(**{"model.variant": variant}))
        batch = plugin.collate(ray_batch, None)
        n, s, g = len(ray_batch["__key__"]), plugin.cfg.model.image_size, plugin.cfg.model.grid
        assert (s, g) == (128, 16)
        assert batch["source"].shape == batch["target"].shape == (n, 3, s, s)
        assert batch["source_mask"].shape == (n, 1, g, g) and batch["flow_t2s"].shape == (n, 2, s, s)
        assert batch["keypoints_valid"].sum(1).tolist() == [20] * n
        model = built(plugin)
        assert isinstance(model, net)
        model.eval()
        with torch.no_grad():
            out = model(batch["source"], batch["target"])
        assert isinstance(out, FlowPair)
        assert out.flow_s2t.shape == out.flow_t2s.shape == (n, 2, g, g)
        assert resize_flow(out.flow_s2t, 300, 200).shape == (n, 2, 300, 200)
        if variant == "affine_baseline":  # identity at init, and F^s, F^t always inverse to each other
            assert out.flow_t2s.abs().max() == 0
            theta = torch.tensor([[[0.9, 0.1, 0.05], [-0.1, 1.1, -0.1]]])
            from maskflow.models.sfnet import affine_flows

            f = affine_flows(theta, g, g)
            inside = valid_mask(f.flow_s2t)[:, 0] > 0
            assert torch.linalg.vector_norm(compose(f.flow_t2s, f.flow_s2t), dim=1)[inside].max() < 1e-4


def test_cells_to_pixels_round_trip_scores_ground_truth_perfectly(pair_samples, ray_batch):
    """The plugin's validation with a model that returns the ground truth on the G x G grid: every unit conversion
    (px of the pair -> px of the 128 input -> cells -> px) must keep PCK at 1 and EPE at ~0 (the pairs are affine)."""
    plugin = SFNetPlugin(train_config())
    batch = plugin.collate(ray_batch, None)
    s, g = plugin.cfg.model.image_size, plugin.cfg.model.grid
    s2t = torch.stack([resize_flow(torch.from_numpy(schema.load_npy(p["flow_s2t.npy"]))[None], s, s)[0]
                       for p in pair_samples])
    truth = FlowPair(resize_flow(s2t, g, g), resize_flow(batch["flow_t2s"], g, g))
    values = plugin.validation_step(lambda source, target: truth, batch, "cpu")
    assert set(values) == {"pck_10", "pck_05", "mask_iou", "lt_acc", "epe"}
    assert np.all(values["pck_05"] == 1.0) and np.all(values["epe"] < 0.05)
    assert np.all(values["mask_iou"] > 0.9) and np.all(values["lt_acc"] > 0.98)


def test_gradients_reach_trainable_parameters_only_and_frozen_bn_stays(ray_batch):
    for variant in ("sfnet", "affine_baseline"):
        plugin = plugin_for(train_config(**{"model.variant": variant}))
        model = built(plugin)
        batch = plugin.collate(ray_batch, None)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(2):  # the baseline's zero-initialised last layer passes no gradient back until one step
            train_mode(model, plugin)
            out = plugin.losses(model, batch, "cpu")
            assert isinstance(out, StepOutput)
            optimizer.zero_grad()
            sum(out.losses.values()).backward()
            optimizer.step()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(not n.startswith("backbone.") for n in trainable)
        for name, p in trainable.items():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("backbone."))
        after = model.state_dict()
        for name, value in before.items():  # BatchNorm running statistics of the frozen backbone did not move
            if name.startswith("backbone.") and ("running_" in name or "num_batches" in name):
                assert torch.equal(value, after[name]), name
        moved = [n for n in before if "running_mean" in n and not n.startswith("backbone.")
                 and not torch.equal(before[n], after[n])]
        assert moved  # ... while the trained layers' did (the check above can fail)


def test_loss_weights_are_the_papers_converted_to_cells(ray_batch):
    plugin = SFNetPlugin(train_config())
    g = plugin.cfg.model.grid
    assert (plugin.cfg.loss.lambda_mask, plugin.cfg.loss.lambda_flow, plugin.cfg.loss.lambda_smooth) == PAPER_LAMBDAS
    weights = plugin.loss_weights()
    assert weights == sfnet_loss_weights(*PAPER_LAMBDAS, g)
    assert weights == pytest.approx((3.0, 16.0 / 56.25, 0.5 / 7.5))  # G = 16: (G-1)/2 = 7.5
    model = built(plugin)
    train_mode(model, plugin)
    out = plugin.losses(model, plugin.collate(ray_batch, None), "cpu")
    # three weighted terms and nothing else is optimised (no total beside them: it would count twice)
    assert set(out.losses) == {"loss_mask", "loss_flow", "loss_smooth"}
    for term, weight in zip(("mask", "flow", "smooth"), weights):
        assert float(out.losses[f"loss_{term}"].detach()) == pytest.approx(weight * float(out.metrics[term]), rel=1e-6)


@pytest.mark.parametrize("plugin_class, steps, lr", [(SFNetPlugin, 25, 1e-3), (AffineRegressionPlugin, 60, 1e-3)])
def test_small_batch_is_overfitted(ray_batch, plugin_class, steps, lr):
    variant = "sfnet" if plugin_class is SFNetPlugin else "affine_baseline"
    plugin = plugin_class(train_config(**{"model.variant": variant}))
    model = built(plugin)
    batch = plugin.collate(ray_batch, None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        train_mode(model, plugin)
        loss = sum(plugin.losses(model, batch, "cpu").losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert min(losses[-3:]) * 5 <= losses[0], losses


# --------------------------------------------------------------------------------------------- inference, evaluation


def prediction_samples(pair_samples, flows_of) -> list[dict]:
    """flow_prediction samples as the evaluation harness hands them over (JSON parsed, the rest bytes)."""
    out = []
    for p in pair_samples:
        s2t, t2s = flows_of(p)
        raw = {**p, "pred_flow_s2t.npy": schema.npy(s2t), "pred_flow_t2s.npy": schema.npy(t2s),
               schema.PREDICTION: schema.dumps({"model": "test", "image_size": 0, "seconds": 0.0})}
        out.append(shards.decode(raw))
    return out


def test_evaluator_on_ground_truth_flows(pair_samples):
    evaluator = CorrespondenceEvaluator()
    assert (evaluator.metric, evaluator.higher_is_better, evaluator.schema) == ("pck_10", True, "flow_prediction/1")
    evaluator.reset()
    evaluator.process(prediction_samples(
        pair_samples, lambda p: (schema.load_npy(p["flow_s2t.npy"]), schema.load_npy(p["flow_t2s.npy"]))))
    result = evaluator.summarize()
    m = result.metrics
    assert m["pck_10"] == m["pck_05"] == 1.0 and m["epe"] == pytest.approx(0.0, abs=1e-9)
    assert m["mask_iou"] > 0.99 and m["lt_acc"] > 0.999 and m["pairs"] == len(pair_samples)
    assert len(result.rows) == len(pair_samples) and {"key", "pck_10", "epe", "mask_iou"} <= set(result.rows[0])
    assert "keypoints.png" in result.figures
    # Zero flows score worse on every count (the metrics see the prediction, not the ground truth).
    evaluator.reset()
    evaluator.process(prediction_samples(pair_samples, lambda p: (
        np.zeros_like(schema.load_npy(p["flow_s2t.npy"])),) * 2))
    zero = evaluator.summarize().metrics
    assert zero["pck_10"] < 0.6 and zero["epe"] > 5 and zero["mask_iou"] < m["mask_iou"]
    # Predictions without the masks and F^s (HSTN's flow_t2s-only samples) are refused in one line.
    bare = {k: v for k, v in prediction_samples(pair_samples[:1], lambda p: (
        schema.load_npy(p["flow_s2t.npy"]), schema.load_npy(p["flow_t2s.npy"])))[0].items()
        if k not in ("pred_flow_s2t.npy", "source_mask.png")}
    with pytest.raises(JobFailed, match=r"lacks source_mask.png, pred_flow_s2t.npy"):
        evaluator.process([bare])


def test_pseudo_keypoints_follow_the_protocol(pair_samples):
    p = pair_samples[0]
    mask = schema.load_png(p["source_mask.png"]) > 0
    flow = schema.load_npy(p["flow_s2t.npy"])
    src, tgt = pseudo_keypoints(mask, flow, image_id=1, seed=0, count=20)
    again, _ = pseudo_keypoints(mask, flow, image_id=1, seed=0, count=20)
    other, _ = pseudo_keypoints(mask, flow, image_id=2, seed=0, count=20)
    assert src.shape == tgt.shape == (20, 2) and np.array_equal(src, again) and not np.array_equal(src, other)
    xs, ys = src[:, 0].astype(int), src[:, 1].astype(int)
    assert mask[ys, xs].all()  # on the source foreground
    assert np.allclose(tgt, src + flow[:, ys, xs].T)  # moved by the ground truth
    h, w = mask.shape
    assert (tgt >= 0).all() and (tgt[:, 0] <= w - 1).all() and (tgt[:, 1] <= h - 1).all()  # inside the target


def test_inference_stage_writes_flows_the_evaluator_scores(pair_samples, tmp_path):
    from maskflow.stages.sfnet_predict import SFNetPredictConfig, SFNetPredictStage, transfer_keypoints_with_flow

    plugin = SFNetPlugin(train_config())
    model = built(plugin)
    torch.save({"model": model.state_dict()}, tmp_path / "state.pt")
    cfg = config.build(SFNetPredictConfig, {
        "input": {"shards": str(tmp_path / "pairs")}, "output": {"uri": str(tmp_path / "out")},
        "model": {"uri": str(tmp_path / "state.pt"), "arch": config.to_dict(plugin.cfg.model)}})
    stage = SFNetPredictStage(cfg)
    stage.setup()
    out = stage.infer(pair_samples)
    assert [s["__key__"] for s in out] == [p["__key__"] for p in pair_samples]
    for sample, pair in zip(out, pair_samples):
        assert stage.schema.problems(sample) == []
        h, w = schema.load_png(pair["source.png"]).shape[:2]
        for entry in ("pred_flow_s2t.npy", "pred_flow_t2s.npy"):
            assert schema.load_npy(sample[entry]).shape == (2, h, w)
    # The flows are the model's, upsampled to the pair: the same as running it here.
    first = plugin.collate({k: np.array([pair_samples[0][k]], dtype=object) for k in pair_samples[0]}, None)
    h, w = schema.load_png(pair_samples[0]["source.png"]).shape[:2]
    model.eval()
    with torch.no_grad():
        ref = resize_flow(model(first["source"], first["target"]).flow_s2t, h, w)[0]
    assert np.allclose(schema.load_npy(out[0]["pred_flow_s2t.npy"]), ref.numpy(), atol=1e-4)
    points = np.array([[10.0, 20.0], [100.5, 50.25]])
    moved = transfer_keypoints_with_flow(points, schema.load_npy(out[0]["pred_flow_s2t.npy"]).astype(np.float64))
    assert moved.shape == (2, 2) and np.allclose(moved[0], points[0] + ref.numpy()[:, 20, 10], atol=1e-4)
    evaluator = CorrespondenceEvaluator()
    evaluator.process([shards.decode({k: v if k == "__key__" else shards.encode_entry(v) for k, v in s.items()})
                       for s in out])
    metrics = evaluator.summarize().metrics
    assert 0.0 <= metrics["pck_10"] <= 1.0 and np.isfinite(metrics["epe"]) and metrics["pairs"] == len(out)


def test_evaluator_scores_real_landmarks(shared_data):
    """dlib's face photos (68 landmarks per face, converted as the ingest reads them): the pair carries the landmarks
    to the target, and the evaluator scores their transfer besides the pseudo-keypoints."""
    from maskflow.data.convert import dlib_faces_to_coco

    coco, root = dlib_faces_to_coco(str(shared_data / "dlib_faces_landmarks"), splits=("testing",))
    image = coco["images"][0]
    meta = {"image_id": image["id"], "source": "dlib_faces", "file_name": image["file_name"],
            "keypoints": image["keypoints"],
            "annotations": [a for a in coco["annotations"] if a["image_id"] == image["id"]]}
    settings = config.build(ap.PairSettings, {"seed": 0, "flip_prob": 0.0, "rotation_deg": 10.0})
    pair = ap.make_pairs(schema.sample_key(image["id"]), (shared_data / "dlib_faces_landmarks" /
                                                          image["file_name"]).read_bytes(), meta, settings)[0]
    raw = {k: (v if k == "__key__" else shards.encode_entry(v)) for k, v in pair.items()}
    assert sum(pair["pair.json"]["keypoints"]["inside"]) >= 60
    evaluator = CorrespondenceEvaluator()
    evaluator.process(prediction_samples([raw], lambda p: (schema.load_npy(p["flow_s2t.npy"]),
                                                           schema.load_npy(p["flow_t2s.npy"]))))
    evaluator.process(prediction_samples([raw], lambda p: (np.zeros_like(schema.load_npy(p["flow_s2t.npy"])),) * 2))
    truth, zero = evaluator.rows
    assert truth["pck_landmarks_10"] == truth["pck_landmarks_05"] == 1.0
    assert truth["landmarks"] == sum(pair["pair.json"]["keypoints"]["inside"])
    assert zero["pck_landmarks_10"] < 1.0
    metrics = evaluator.summarize().metrics
    assert metrics["landmark_pairs"] == 2 and metrics["pck_landmarks_10"] == pytest.approx(
        (1.0 + zero["pck_landmarks_10"]) / 2)
