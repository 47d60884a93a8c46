"""HSTN inference stages: digit predictions for cluttered digits, dense flows for image pairs.

* :class:`DigitPredictStage` reads ``cluttered_digit/1`` shards and writes ``digit_prediction/1`` samples (the
  input canvas and meta, the predicted label and the softmax probabilities; :mod:`maskflow.data.schema`) with an
  ``hstn_cls`` model (CNN, Affine-STN or HSTN).
* :class:`FlowPredictStage` reads ``pair/1`` shards and writes ``flow_prediction/1`` samples (the pair's source,
  target, ground-truth ``flow_t2s`` and meta, plus the predicted ``flow_t2s`` at the pair's own resolution) with an
  ``hstn_align`` model (each pair resized to the model's side, its flow upsampled back and rescaled per axis), or
  with a classical optical flow (``model.uri: opencv:dis`` or ``opencv:farneback``, at the pair's resolution, see
  :mod:`maskflow.models.hstn_baselines`), so networks and baselines are scored by the same evaluator
  (:mod:`maskflow.evaluators.flow_epe`) on the same pairs. Each sample records the method's time for its pair
  (a network's batch time divided by the batch's pairs; decoding excluded).

One output shard per input shard; a damaged input sample is a reject with its reason. The model loads once per
actor (``setup``) from ``model.uri`` (``models:/name@alias`` pinned to its version on the driver and checked to be of
the right kind, ``runs:/``, or a trainer checkpoint built with ``model.arch``).
"""

from __future__ import annotations

import abc

import time
from dataclasses import dataclass, field
from typing import Iterator

from maskflow.config import Uri, require
from maskflow.data import schema
from maskflow.models.hstn_config import HSTNAlignConfig, HSTNClassifierConfig
from maskflow.models.hstn_data import DIGIT_IMAGE, PAIR_FLOW_T2S, PAIR_META, PAIR_SOURCE, PAIR_TARGET
from maskflow.stage import Plan, Reject, Stage, StageJobConfig, WorkUnit, batched, iter_unit_shards, plan_shard_units
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

__all__ = ["DigitPredictConfig", "FlowPredictConfig", "DigitPredictStage", "FlowPredictStage"]

DIGIT_KIND, ALIGN_KIND = "hstn_cls", "hstn_align"
OPENCV = "opencv:"  # model.uri prefix of the classical baselines (maskflow.models.hstn_baselines.OPENCV_METHODS)
OPENCV_URIS = ("opencv:dis", "opencv:farneback")
# the pair's entries a flow prediction carries over unchanged (images, masks, ground-truth flows)
GROUND_TRUTH_ENTRIES = (PAIR_SOURCE, PAIR_TARGET, "source_mask.png", "target_mask.png", PAIR_FLOW_T2S, "flow_s2t.npy")


@dataclass
class PredictInputConfig:
    shards: Uri | list[Uri] = ""  # stage output(s): cluttered_digit/1 (digits) or pair/1 (flows)

    def validate(self) -> None:
        require(bool(self.shards), "shards", "required: the stage output(s) to predict on")


@dataclass
class PredictSettings:
    batch_size: int = 64  # samples per forward pass

    def validate(self) -> None:
        require(self.batch_size >= 1, "batch_size", "must be at least 1")


@dataclass
class DigitModelConfig:
    uri: Uri = ""  # models:/name@alias | models:/name/N | runs:/<id>/model | a checkpoint (.pt or directory)
    arch: HSTNClassifierConfig = field(default_factory=HSTNClassifierConfig)  # for checkpoints

    def validate(self) -> None:
        require(bool(self.uri), "uri", "required: the hstn_cls model (models:/name@alias, runs:/.., a checkpoint)")


@dataclass
class FlowModelConfig:
    # an hstn_align model: models:/name@alias | models:/name/N | runs:/<id>/model | a checkpoint (.pt or directory);
    # or a classical optical flow instead of a network: opencv:dis | opencv:farneback
    uri: Uri = ""
    arch: HSTNAlignConfig = field(default_factory=HSTNAlignConfig)  # for checkpoints

    def validate(self) -> None:
        require(bool(self.uri), "uri", "required: an hstn_align model (models:/name@alias, runs:/.., a checkpoint) "
                                       f"or one of {', '.join(OPENCV_URIS)}")
        require(not self.uri.startswith(OPENCV) or self.uri in OPENCV_URIS, "uri",
                f"unknown OpenCV method {self.uri!r} (known: {', '.join(OPENCV_URIS)})")

    @property
    def baseline(self) -> str:
        """The OpenCV method (``dis`` / ``farneback``) when ``uri`` names one, else ""."""
        return self.uri[len(OPENCV):] if self.uri.startswith(OPENCV) else ""


@dataclass
class DigitPredictConfig(StageJobConfig):
    input: PredictInputConfig = field(default_factory=PredictInputConfig)
    model: DigitModelConfig = field(default_factory=DigitModelConfig)
    predict: PredictSettings = field(default_factory=PredictSettings)


@dataclass
class FlowPredictConfig(StageJobConfig):
    input: PredictInputConfig = field(default_factory=PredictInputConfig)
    model: FlowModelConfig = field(default_factory=FlowModelConfig)
    predict: PredictSettings = field(default_factory=lambda: PredictSettings(batch_size=16))


class _ModelStage(Stage):
    """What both stages share: the model URI pinned and kind-checked on the driver, loaded once per actor, torch's
    threads set to the actor's CPUs."""

    wants_gpu = True
    kind = ""

    def __init__(self, cfg, options: StorageOptions = DEFAULT_OPTIONS, tracking_uri: str | None = None):
        from maskflow.models.loading import check_model_uri

        check_model_uri(cfg.model.uri)
        super().__init__(cfg, options)
        self.tracking_uri = tracking_uri
        self.model_uri = cfg.model.uri  # pinned in plan()
        self.model = None
        self.device = None

    def plan(self) -> Plan:
        from maskflow.models.loading import resolve_model_uri

        if not self.cfg.model.uri.startswith(OPENCV):
            if self.tracking_uri:
                import mlflow

                mlflow.set_tracking_uri(self.tracking_uri)
            self.model_uri = resolve_model_uri(self.cfg.model.uri, "model.uri", self.options,
                                               expected_kinds=(self.kind,))
        return plan_shard_units(self.cfg.input.shards, self.options, "input.shards", expect=self.input_schema())

    def fingerprint_config(self):
        network = not self.model_uri.startswith(OPENCV)
        return {"model": self.model_uri, "arch": vars(self.cfg.model.arch) if network else None,
                "predict": vars(self.cfg.predict)}

    def setup(self) -> None:
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.model_uri.startswith(OPENCV):
            return
        from maskflow import tracking

        tracking.worker_setup(self.tracking_uri, self.options)
        from maskflow.models.hstn import load_hstn

        self.model = load_hstn(self.model_uri, self.cfg.model.arch, self.options, self.device)

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject]:
        import torch

        if self.device is None:
            self.setup()
        if self.device.type == "cpu":  # Ray Data calls actors from a thread of its own: set the count there
            torch.set_num_threads(max(1, int(self.cfg.compute.cpus_per_worker)))
        decoded = self._decoded(unit)
        for batch in batched(decoded, self.cfg.predict.batch_size):
            yield from (b for b in batch if isinstance(b, Reject))
            good = [b for b in batch if not isinstance(b, Reject)]
            if good:
                with torch.inference_mode():
                    yield from self.predict(good)

    def _decoded(self, unit: WorkUnit) -> Iterator[tuple[dict, object] | Reject]:
        for sample in iter_unit_shards(unit, self.options):
            if isinstance(sample, Reject):
                yield sample
                continue
            try:
                yield sample, self.decode(sample)
            except (ValueError, KeyError) as e:
                problem = f"missing entry {e}" if isinstance(e, KeyError) else str(e)
                yield Reject(sample["__key__"], problem, source=unit.source)

    @abc.abstractmethod
    def input_schema(self) -> schema.SampleSchema:
        """The kind of sample the stage reads (an input of another kind fails in one line while planning)."""

    @abc.abstractmethod
    def decode(self, sample: dict):
        """One input sample -> what :meth:`predict` takes for it (ValueError / KeyError: the sample is rejected)."""

    @abc.abstractmethod
    def predict(self, items: list[tuple[dict, object]]) -> list[dict]:
        """A batch of (sample, decoded) -> one output sample each."""


class DigitPredictStage(_ModelStage):
    """``cluttered_digit/1`` -> ``digit_prediction/1`` with an ``hstn_cls`` model."""

    name = "hstn_digit_predict"
    kind = DIGIT_KIND
    config_class = DigitPredictConfig
    schema = schema.DIGIT_PREDICTION_SCHEMA

    def input_schema(self) -> schema.SampleSchema:
        from maskflow.stages.cluttered_digits import SCHEMA

        return SCHEMA

    def decode(self, sample: dict):
        from maskflow.models.hstn_data import decode_digit

        meta = schema.decode_value(sample[schema.META], "json")
        if not isinstance(meta, dict) or "label" not in meta:
            raise ValueError("malformed sample json: no label")
        return decode_digit(sample[DIGIT_IMAGE], self.cfg.model.arch.image_size)

    def predict(self, items: list[tuple[dict, object]]) -> list[dict]:
        import torch

        images = torch.stack([image for _, image in items]).to(self.device)
        probabilities = torch.softmax(self.model(images).logits.float(), dim=1).cpu()
        out = []
        for (sample, _), p in zip(items, probabilities):
            out.append({"__key__": sample["__key__"], DIGIT_IMAGE: sample[DIGIT_IMAGE],
                        schema.META: schema.decode_value(sample[schema.META], "json"),
                        schema.PREDICTION: {"label": int(p.argmax()), "probabilities": [round(float(v), 7) for v in p],
                                            "model": self.model_uri}})
        return out

    def contact_sheet(self, samples: list[dict]):
        """The canvases, each with a green (right) or red (wrong) bar under it."""
        import numpy as np

        from maskflow import viz

        tiles = []
        for s in samples:
            tile = viz.to_rgb(schema.load_png(bytes(s[DIGIT_IMAGE])))
            right = s[schema.PREDICTION]["label"] == s[schema.META]["label"]
            bar = np.zeros((max(2, tile.shape[0] // 10), tile.shape[1], 3), np.uint8)
            bar[:] = (40, 200, 40) if right else (220, 40, 40)
            tiles.append(np.concatenate((tile, bar), 0))
        return viz.grid(tiles)


class FlowPredictStage(_ModelStage):
    """``pair/1`` -> ``flow_prediction/1`` with an ``hstn_align`` model or an OpenCV optical flow."""

    name = "hstn_flow_predict"
    kind = ALIGN_KIND
    config_class = FlowPredictConfig
    schema = schema.FLOW_PREDICTION_SCHEMA

    def input_schema(self) -> schema.SampleSchema:
        from maskflow.stages.affine_pairs import SCHEMA  # torch loads here: plan() runs after the config parsed

        return SCHEMA

    def decode(self, sample: dict):
        if self.cfg.model.baseline:
            from maskflow.data.validate import decode_image

            source, target = decode_image(sample[PAIR_SOURCE]), decode_image(sample[PAIR_TARGET])
            if source.shape != target.shape:
                raise ValueError(f"pair sizes disagree: source {tuple(source.shape)}, target {tuple(target.shape)}")
            return source.permute(1, 2, 0).numpy(), target.permute(1, 2, 0).numpy()
        from maskflow.models.hstn_data import decode_pair

        return decode_pair(sample[PAIR_SOURCE], sample[PAIR_TARGET], sample[PAIR_FLOW_T2S],
                           self.cfg.model.arch.image_size)

    def predict(self, items: list[tuple[dict, object]]) -> list[dict]:
        if self.cfg.model.baseline:
            from maskflow.models.hstn_baselines import opencv_flow_t2s

            flows, seconds = [], []
            for _, (source, target) in items:
                start = time.perf_counter()
                flows.append(opencv_flow_t2s(source, target, self.cfg.model.baseline))
                seconds.append(time.perf_counter() - start)
            model, side = self.model_uri, 0
        else:
            flows, seconds = self._network_flows([pair for _, pair in items])
            model, side = self.model_uri, self.cfg.model.arch.image_size
        return [{"__key__": sample["__key__"], **{k: sample[k] for k in GROUND_TRUTH_ENTRIES if k in sample},
                 PAIR_META: schema.decode_value(sample[PAIR_META], "json"),
                 "pred_flow_t2s.npy": schema.npy(flow),
                 schema.PREDICTION: {"model": model, "image_size": side, "seconds": round(s, 6)}}
                for (sample, _), flow, s in zip(items, flows, seconds)]

    def _network_flows(self, pairs: list[dict]):
        """Flows at each pair's resolution, and the per-pair share of the batch's time (resize, forward, upsample)."""
        import torch

        from maskflow.models.hstn_data import pair_batch, upsample_flows

        start = time.perf_counter()
        batch = pair_batch(pairs)
        flow = self.model(batch["source"].to(self.device), batch["target"].to(self.device)).flow.float()
        flows = [f.numpy() for f in upsample_flows(flow.cpu(), batch["sizes"])]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        share = (time.perf_counter() - start) / len(pairs)
        return flows, [share] * len(pairs)

    def contact_sheet(self, samples: list[dict]):
        """Per pair: target | predicted flow | ground-truth flow (same colour scale)."""
        import numpy as np

        from maskflow import viz

        tiles = []
        for s in samples[:4]:
            gt, pred = schema.load_npy(bytes(s[PAIR_FLOW_T2S])), schema.load_npy(bytes(s["pred_flow_t2s.npy"]))
            scale = float(np.hypot(gt[0], gt[1]).max()) or 1.0
            tiles += [schema.load_png(bytes(s[PAIR_TARGET])), viz.flow_to_rgb(pred, scale), viz.flow_to_rgb(gt, scale)]
        return viz.grid(tiles, columns=3)
