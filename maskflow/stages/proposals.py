"""Proposals stage: class-agnostic segment proposals for every image, as ``proposals`` samples.

The generator is the model ``model.uri`` names: a class-agnostic Mask R-CNN or a SharpMask (its registered kind,
:data:`maskflow.models.loading.PROPOSAL_KINDS`; a model of any other kind is refused before Ray starts). Both answer
the same call — a list of images in, torchvision detection dicts out — so everything after the forward pass, and the
``proposals/1`` samples it writes, are the same for both.

Input is a stage output of ``image`` samples (one output shard per input shard) or a COCO dataset. Each actor of the
pool loads the model once and runs batched inference (a GPU per actor when the cluster has GPUs). Per image it keeps
the ``top_k`` best masks at score threshold 0 (DMM-Net, 001_6622dcd01de272f9.txt sec. 4.1: top 50; FFD-Net refines up
to 1000), as COCO RLE with boxes and scores, and the mask IoU of every proposal against every ground-truth instance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from maskflow import tracking
from maskflow.config import Uri, require
from maskflow.data import schema
from maskflow.data.validate import decode_image
from maskflow.models.loading import PROPOSAL_KINDS, check_model_uri, resolve_model_uri
from maskflow.models.maskrcnn_config import MaskRCNNConfig
from maskflow.stage import Plan, Reject, Stage, StageJobConfig, WorkUnit, batched, plan_shard_units
from maskflow.stages.ingest import CocoInputConfig, image_sample, image_sample_sheet, plan_coco_units
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions
from ops.masks import mask_iou

if TYPE_CHECKING:  # torch and the model load in the actors (setup), not when the driver parses the config
    import torch

log = logging.getLogger(__name__)


@dataclass
class ProposalsInputConfig:
    shards: Uri | None = None  # a stage output of image samples (directory with manifest.json)
    coco: CocoInputConfig | None = None  # or a COCO dataset (annotations json + images directory)

    def validate(self) -> None:
        require((self.shards is None) != (self.coco is None), "shards",
                "set exactly one of input.shards (image shards) or input.coco (a COCO dataset)")


@dataclass
class ProposalModelConfig:
    # models:/name@alias | runs:/.. (Mask R-CNN or SharpMask) | .pt checkpoint (local/s3) | checkpoint dir |
    # torchvision:<Weights> (those three: Mask R-CNN)
    uri: Uri = ""
    arch: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)  # for checkpoints (registry models carry their own)


@dataclass
class ProposalSettings:
    top_k: int = 50  # proposals kept per image (DMM-Net: 50; FFD-Net: up to 1000)
    score_thresh: float = 0.0
    nms_thresh: float | None = None  # None: the generator's own (Mask R-CNN 0.5; SharpMask none, as its paper)
    mask_threshold: float = 0.5
    batch_size: int = 4  # images per forward pass
    amp: bool = False  # fp16 autocast on GPU

    def validate(self) -> None:
        require(1 <= self.top_k <= 1000, "top_k", "must be in 1..1000")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.nms_thresh is None or 0.0 < self.nms_thresh <= 1.0, "nms_thresh",
                f"must be in (0, 1] (1: no suppression) or unset for the generator's own; got {self.nms_thresh}")


@dataclass
class ProposalsConfig(StageJobConfig):
    input: ProposalsInputConfig = field(default_factory=ProposalsInputConfig)
    model: ProposalModelConfig = field(default_factory=ProposalModelConfig)
    proposals: ProposalSettings = field(default_factory=ProposalSettings)


class ProposalsStage(Stage):
    name = "proposals"
    wants_gpu = True
    schema = schema.PROPOSALS_SCHEMA
    config_class = ProposalsConfig

    def __init__(self, cfg: ProposalsConfig, options: StorageOptions = DEFAULT_OPTIONS, tracking_uri: str | None = None):
        check_model_uri(cfg.model.uri)
        super().__init__(cfg, options)
        self.tracking_uri = tracking_uri
        self.model_uri = cfg.model.uri  # resolved to a concrete registry version in plan()
        self.model = None

    # -- driver
    def plan(self) -> Plan:
        if self.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
        self.model_uri = resolve_model_uri(self.cfg.model.uri, "model.uri", self.options, expected_kinds=PROPOSAL_KINDS)
        inp = self.cfg.input
        if inp.coco is not None:
            return plan_coco_units(inp.coco, self.cfg.output.samples_per_shard, self.options)
        return plan_shard_units(inp.shards, self.options)

    def fingerprint_config(self):
        return {"model": self.model_uri, "proposals": vars(self.cfg.proposals)}

    def contact_sheet(self, samples: list[dict]):
        """Each image with its 5 best proposals."""
        return image_sample_sheet(samples, masks_of=lambda s: s[schema.PROPOSALS]["segmentations"][:5])

    # -- worker
    def setup(self) -> None:
        import torch

        from maskflow.models.loading import configure_for_proposals, load_proposal_model

        tracking.worker_setup(self.tracking_uri, self.options)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        p = self.cfg.proposals
        self.model = load_proposal_model(self.model_uri, self.cfg.model.arch, self.options, self.device)
        configure_for_proposals(self.model, p.top_k, p.score_thresh, p.nms_thresh)

    def _input_samples(self, unit: WorkUnit) -> Iterator[dict | Reject]:
        """Image samples of a unit (decoded meta, raw image bytes), from a shard or from COCO records."""
        if self.cfg.input.coco is not None:
            for record in unit.items:
                for item in image_sample(record, unit.source, self.options):
                    if isinstance(item, (dict, Reject)):
                        yield item
            return
        from maskflow.stages.inputs import unit_raw_image_samples

        for sample in unit_raw_image_samples(unit, self.options):
            if isinstance(sample, Reject):
                yield sample
            else:
                yield {**sample, schema.META: schema.loads(sample[schema.META])}

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject]:
        import torch

        if self.device.type == "cpu":
            # OpenMP's thread count is per calling thread, and Ray Data calls actors from a thread of its own:
            # set it here, where inference runs, to the CPUs this actor reserved.
            torch.set_num_threads(max(1, int(self.cfg.compute.cpus_per_worker)))
        decoded = self._decoded(unit)
        for batch in batched(decoded, self.cfg.proposals.batch_size):
            rejects = [b for b in batch if isinstance(b, Reject)]
            yield from rejects
            good = [b for b in batch if not isinstance(b, Reject)]
            if good:
                yield from self.infer([s for s, _ in good], [t for _, t in good])

    def _decoded(self, unit: WorkUnit) -> Iterator[tuple[dict, torch.Tensor] | Reject]:
        from maskflow.models.maskrcnn import image_to_tensor

        for sample in self._input_samples(unit):
            if isinstance(sample, Reject):
                yield sample
                continue
            try:
                yield sample, image_to_tensor(decode_image(sample[schema.IMAGE]))
            except ValueError as e:
                yield Reject(sample["__key__"], str(e), source=unit.source)

    def infer(self, samples: list[dict], images: list[torch.Tensor]) -> list[dict]:
        import torch

        with torch.inference_mode():
            return self._infer(samples, images)

    def _infer(self, samples: list[dict], images: list[torch.Tensor]) -> list[dict]:
        import torch

        from maskflow.models.maskrcnn import proposals_from_output

        p = self.cfg.proposals
        with torch.autocast(self.device.type, enabled=p.amp and self.device.type == "cuda"):
            outputs = self.model([im.to(self.device, non_blocking=True) for im in images])
        results = []
        for sample, output in zip(samples, outputs):
            props = proposals_from_output(output, p.top_k, p.mask_threshold)
            meta = sample[schema.META]
            anns = meta["annotations"]
            iou = mask_iou(props["segmentations"], [a["segmentation"] for a in anns], [a["iscrowd"] for a in anns])
            props.update(iou=iou.round(6).tolist(), model=self.model_uri, height=meta["height"],
                         width=meta["width"])
            results.append({"__key__": sample["__key__"], schema.IMAGE: sample[schema.IMAGE], schema.META: meta,
                            schema.PROPOSALS: props})
        return results

