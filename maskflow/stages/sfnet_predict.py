"""SFNet inference stage: dense flows both ways for every ``pair`` sample, as ``flow_prediction`` samples.

Input is one or several stage outputs of ``pair/1`` samples (:mod:`maskflow.stages.affine_pairs`), one output shard
per input shard. Each actor of the pool loads the model once from ``model.uri`` (a registered SFNet or affine
baseline, kind ``sfnet`` / ``sfnet_affine_baseline``; a run; or a trainer checkpoint built with ``model.arch``) and
runs batched inference (a GPU per actor when the cluster has GPUs): each pair resized to the model's square input
(align_corners=True), F^s and F^t predicted on its G x G grid in cells, and brought back to the pair's own
resolution in pixels (:func:`maskflow.models.sfnet.resize_flow`, the paper's bilinear upsampling).

``flow_prediction`` samples (:data:`maskflow.data.schema.FLOW_PREDICTION_SCHEMA`), key = the pair's: the pair's
entries unchanged (``source.png``, ``target.png``, ``source_mask.png``, ``target_mask.png``, ``flow_t2s.npy``,
``flow_s2t.npy``, ``pair.json``: the ground truth), plus

    ``<key>.pred_flow_s2t.npy``  float32 ``(2, H, W)``: F^s, source pixel -> target location, pixels of the pair
    ``<key>.pred_flow_t2s.npy``  float32 ``(2, H, W)``: F^t, target pixel -> source location (warps source-side maps
                                 onto the target: ``ops.warp.warp(x_source, F^t)``)
    ``<key>.prediction.json``    ``model`` (the pinned weights' URI), ``image_size`` (the model's input side),
                                 ``seconds`` (the batch's forward and upsampling time over its pairs)

:func:`transfer_keypoints_with_flow` moves source points to the target with a predicted ``pred_flow_s2t``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from maskflow import tracking
from maskflow.config import Uri, require
from maskflow.data import schema
from maskflow.models.loading import check_model_uri, resolve_model_uri
from maskflow.models.sfnet_config import SFNetConfig
from maskflow.stage import Plan, Reject, Stage, StageJobConfig, WorkUnit, batched, iter_unit_shards, plan_shard_units
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

KINDS = ("sfnet", "sfnet_affine_baseline")  # the registered kinds this stage runs
PAIR_ENTRIES = ("source.png", "target.png", "source_mask.png", "target_mask.png", "flow_t2s.npy", "flow_s2t.npy",
                "pair.json")
PRED_FLOW_S2T, PRED_FLOW_T2S = "pred_flow_s2t.npy", "pred_flow_t2s.npy"
PAIR_SCHEMA_NAME = "pair/1"


@dataclass
class FlowPredictInputConfig:
    shards: Uri | list[Uri] = ""  # one or several stage outputs of pair samples (directories with manifest.json)

    def validate(self) -> None:
        require(bool(self.shards), "shards", "required: a stage output of pair samples (or a list of them)")


@dataclass
class SFNetModelRef:
    uri: Uri = ""  # models:/name@alias | models:/name/N | runs:/.. | .pt checkpoint (local/s3) | checkpoint directory
    arch: SFNetConfig = field(default_factory=SFNetConfig)  # for checkpoints (registered models carry their own)


@dataclass
class FlowPredictSettings:
    batch_size: int = 16  # pairs per forward pass
    amp: bool = False  # fp16 autocast on GPU (the matching head stays float32 inside the model)

    def validate(self) -> None:
        require(self.batch_size >= 1, "batch_size", "must be at least 1")


@dataclass
class SFNetPredictConfig(StageJobConfig):
    input: FlowPredictInputConfig = field(default_factory=FlowPredictInputConfig)
    model: SFNetModelRef = field(default_factory=SFNetModelRef)
    predict: FlowPredictSettings = field(default_factory=FlowPredictSettings)


def transfer_keypoints_with_flow(points, flow_s2t):
    """Source points ``(K, 2)`` ``(x, y)`` pixels -> their target locations ``p + F^s(p)``, with a predicted
    ``flow_s2t`` ``(2, H, W)`` in pixels of the source (a ``pred_flow_s2t.npy`` entry), sampled bilinearly at the
    sub-pixel points (border values outside). Batched ``(N, K, 2)`` with ``(N, 2, H, W)`` works too; returns the
    type of ``points`` (numpy or torch)."""
    from ops.correspondence_metrics import transfer_keypoints

    return transfer_keypoints(flow_s2t, points)


class SFNetPredictStage(Stage):
    name = "sfnet_predict"
    wants_gpu = True
    schema = schema.FLOW_PREDICTION_SCHEMA
    config_class = SFNetPredictConfig  # what pipelines/predict.py builds for the kinds this stage runs

    def __init__(self, cfg: SFNetPredictConfig, options: StorageOptions = DEFAULT_OPTIONS,
                 tracking_uri: str | None = None):
        check_model_uri(cfg.model.uri)
        super().__init__(cfg, options)
        self.tracking_uri = tracking_uri
        self.model_uri = cfg.model.uri  # pinned to a registry version in plan()
        self.model = None

    # -- driver
    def plan(self) -> Plan:
        from maskflow.data.schema import SampleSchema

        if self.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
        self.model_uri = resolve_model_uri(self.cfg.model.uri, "model.uri", self.options, expected_kinds=KINDS)
        # only the schema's name is compared with the inputs' manifests
        return plan_shard_units(self.cfg.input.shards, self.options, "input.shards",
                                expect=SampleSchema(PAIR_SCHEMA_NAME, ()))

    def fingerprint_config(self):
        return {"model": self.model_uri, "predict": vars(self.cfg.predict)}

    def contact_sheet(self, samples: list[dict]):
        """Per pair: source | target | predicted F^t colour-coded | source mask moved onto the target by it."""
        import torch

        from maskflow import viz
        from ops.warp import warp

        tiles = []
        for s in samples[:4]:
            flow_t2s = schema.load_npy(s[PRED_FLOW_T2S])
            mask = torch.from_numpy(schema.load_png(s["source_mask.png"]) > 0).float()[None, None]
            moved = warp(mask, torch.from_numpy(flow_t2s)[None])[0] > 0.5
            tiles += [schema.load_png(s["source.png"]), schema.load_png(s["target.png"]), viz.flow_to_rgb(flow_t2s),
                      viz.overlay_masks(schema.load_png(s["target.png"]), moved.numpy())]
        return viz.grid(tiles, columns=4)

    # -- worker
    def setup(self) -> None:
        import torch

        from maskflow.models.sfnet import load_sfnet

        tracking.worker_setup(self.tracking_uri, self.options)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_sfnet(self.model_uri, self.cfg.model.arch, self.options, self.device)

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject]:
        import torch

        if self.device.type == "cpu":
            # OpenMP's thread count is per calling thread, and Ray Data calls actors from a thread of its own.
            torch.set_num_threads(max(1, int(self.cfg.compute.cpus_per_worker)))
        for batch in batched(self._complete_pairs(unit), self.cfg.predict.batch_size):
            yield from (b for b in batch if isinstance(b, Reject))
            pairs = [b for b in batch if not isinstance(b, Reject)]
            if pairs:
                yield from self.infer(pairs)

    def _complete_pairs(self, unit: WorkUnit) -> Iterator[dict | Reject]:
        for sample in iter_unit_shards(unit, self.options):
            if isinstance(sample, Reject):
                yield sample
                continue
            missing = [e for e in PAIR_ENTRIES if e not in sample]
            yield Reject(sample["__key__"], f"pair sample lacks {', '.join(missing)}", source=unit.source) \
                if missing else sample

    def infer(self, pairs: list[dict]) -> list[dict]:
        """Prediction samples of a batch of raw pair samples (entries as bytes)."""
        import torch

        with torch.inference_mode():
            return self._infer(pairs)

    def _infer(self, pairs: list[dict]) -> list[dict]:
        import torch

        from maskflow.models.sfnet import resize_flow, resize_image

        size = self.model.cfg.image_size
        images = [(schema.load_png(bytes(p["source.png"])), schema.load_png(bytes(p["target.png"]))) for p in pairs]
        source = torch.stack([resize_image(s, size) for s, _ in images]).to(self.device, non_blocking=True)
        target = torch.stack([resize_image(t, size) for _, t in images]).to(self.device, non_blocking=True)
        start = time.perf_counter()
        amp = self.cfg.predict.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=amp):
            out = self.model(source, target)
        flows = []
        for i, (s, _) in enumerate(images):  # pairs differ in size: one resize each
            h, w = s.shape[:2]
            flows.append((resize_flow(out.flow_s2t[i:i + 1].float(), h, w)[0].cpu().numpy(),
                          resize_flow(out.flow_t2s[i:i + 1].float(), h, w)[0].cpu().numpy()))
        seconds = (time.perf_counter() - start) / len(pairs)
        results = []
        for pair, (flow_s2t, flow_t2s) in zip(pairs, flows):
            sample = {"__key__": pair["__key__"], **{e: pair[e] for e in PAIR_ENTRIES}}
            sample.update({
                PRED_FLOW_S2T: schema.npy(flow_s2t), PRED_FLOW_T2S: schema.npy(flow_t2s),
                schema.PREDICTION: {"model": self.model_uri, "image_size": size, "seconds": seconds},
            })
            results.append(sample)
        return results


def main(argv: list[str] | None = None) -> dict:
    """The job (a ``pipelines/`` script calls this; the actors get the tracking URI to load registry models)."""
    from maskflow.stage import stage_main

    return stage_main(SFNetPredictConfig, lambda cfg, options: SFNetPredictStage(
        cfg, options, tracking.resolved_tracking_uri(cfg.tracking)), argv, description=__doc__)
