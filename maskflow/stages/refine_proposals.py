"""Refinement job: any generator's proposals refined by a registered FFD-Net (Zhang & He, ICCV 2017, sec. 3; the
proposal-refinement use of sec. 4), as ``proposals/1`` samples again.

Input: a ``proposals/1`` stage output (``input.proposals``; Mask R-CNN or SharpMask, or an earlier refinement). No
ground truth is needed: each sample's image and proposals are enough. Per image, the ``refine.top_k`` best-scored
proposals are refined:

1. crop: the proposal mask's tight box enlarged ``model.crop_enlarge`` (1.6) times about its centre, image and
   mask resampled to ``model.crop_size`` squared — the FFD-crops stage's geometry (:func:`ffd_crops.crop_boxes`,
   :func:`ops.ffd.crop_resize`), so the network sees what it was trained on;
2. FFD-Net, ``refine.iterations`` passes in the same crop frame (:meth:`FFDNet.refine`), crops of several images
   ``refine.batch_size`` at a time;
3. back into the image: the network's deformation (its B-spline field on the crop grid, read at the image's pixel
   centres inside the crop box by :func:`ops.ffd.paste_crops`' map, the inverse of the crop, and scaled to pixels)
   warps the proposal at the image's full resolution (:func:`maskflow.models.ffdnet.apply_edits`: the same warp as
   the crop's, since the FFD is defined per unit of frame, not per pixel); the soft result is binarised above
   ``refine.mask_threshold`` and RLE-encoded, its box recomputed from the mask. Pasting the warped crop itself
   (``crop_size`` pixels a side) would blur a large object's outline: here nothing is resampled where nothing moves
   (an identity refiner returns the proposals bit for bit).

Scores and order are kept; proposals beyond the top k pass through unchanged. ``iou`` (each proposal against every
annotation, pycocotools' crowd semantics, as the proposals job) is recomputed when the meta has annotations — for
evaluation only — and is ``[]`` otherwise. ``proposals.json`` records ``model`` = the refiner's pinned URI (the
weights that made these masks), ``refiner`` = the same, ``generator`` = the input's generator (its ``generator`` if it
was itself refined, else its ``model``), and ``refined``: per proposal, whether it was refined.

Bad input, one line each, nothing lost:

* a sample without its image or meta, whose image does not decode or whose proposals are unusable (another size,
  malformed): rejected (kind ``sample``) with the reason;
* a proposal among the top k whose mask is empty, whose recorded box is degenerate, or whose recorded box lies
  outside the image (its crop would be cut from outside the image: proposal and mask disagree): passed through
  unrefined and recorded in ``rejects.jsonl`` (kind ``proposal``, key ``<image key>_<index:04d>``) with the reason;
* a refined mask that comes out empty keeps the unrefined mask (counted: ``proposals_refined_empty``);
* a model of another kind (a SharpMask or Mask R-CNN version as ``model.uri``): a one-line config error naming
  ``model.uri`` before Ray starts.

Counts: ``images``, ``proposals`` (= ``proposals_refined`` + ``proposals_beyond_top_k`` + proposal rejects),
``proposals_refined_empty``. One output shard per input shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from maskflow import tracking
from maskflow.data import schema
from maskflow.models.loading import check_model_uri
from maskflow.stage import Count, Plan, Reject, Stage, WorkUnit, plan_shard_units
from maskflow.stages.refine_proposals_config import (  # noqa: F401  (re-exported)
    RefineInputConfig, RefineProposalsConfig, RefinerModelConfig, RefineSettings)
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

if TYPE_CHECKING:  # torch and the model load in the actors (setup), not when the driver parses the config
    import torch

KIND = "ffdnet"
EMPTY_PROPOSAL = "empty proposal mask"  # the FFD-crops stage's words for the same problems
DEGENERATE_BOX = "degenerate proposal box"
BOX_OUTSIDE = "proposal box outside the image"
MASK_CHUNK = 32  # full-resolution masks decoded / refined at a time (bounds memory on large images) ...
PIXELS_PER_CHUNK = 4_000_000  # ... and at most about this many mask pixels (the warp's field is 2 floats a pixel)


@dataclass
class _Pending:
    """One image on its way through the network: its sample, proposals, and the crops of the proposals to refine."""

    sample: dict
    meta: dict
    props: dict
    height: int
    width: int
    refine_idx: np.ndarray  # proposal indices refined, in crop order
    rois: "torch.Tensor"  # (k, 5) crop boxes [0, x1, y1, x2, y2]
    image_crops: "torch.Tensor"  # (k, 3, S, S) float in [0, 1]
    proposal_crops: "torch.Tensor"  # (k, 1, S, S) {0, 1}


def _box_problem(box, height: int, width: int) -> str | None:
    """Why a recorded ``[x, y, w, h]`` box cannot go with a crop of this image (None: it can)."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return f"{DEGENERATE_BOX}: {box}"
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return f"{DEGENERATE_BOX}: {box}"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return f"{BOX_OUTSIDE}: {box} in {width}x{height}"
    return None


class RefineProposalsStage(Stage):
    name = "refine_proposals"
    wants_gpu = True
    schema = schema.PROPOSALS_SCHEMA
    config_class = RefineProposalsConfig

    def __init__(self, cfg: RefineProposalsConfig, options: StorageOptions = DEFAULT_OPTIONS,
                 tracking_uri: str | None = None):
        check_model_uri(cfg.model.uri)
        super().__init__(cfg, options)
        self.tracking_uri = tracking_uri
        self.model_uri = cfg.model.uri  # pinned in plan()
        self.model = None
        self.device = None

    # -- driver
    def plan(self) -> Plan:
        from maskflow.models.loading import resolve_model_uri

        if self.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
        self.model_uri = resolve_model_uri(self.cfg.model.uri, "model.uri", self.options, expected_kinds=(KIND,))
        return plan_shard_units(self.cfg.input.proposals, self.options, "input.proposals",
                                expect=schema.PROPOSALS_SCHEMA)

    def fingerprint_config(self):
        from maskflow.config import to_dict

        registered = self.model_uri.startswith(("models:/", "runs:/"))  # the logged module carries its own config
        return {"model": self.model_uri, "arch": None if registered else to_dict(self.cfg.model.arch),
                "refine": vars(self.cfg.refine)}

    def contact_sheet(self, samples: list[dict]):
        """Each image with its 5 best refined proposals."""
        from maskflow.stages.ingest import image_sample_sheet

        return image_sample_sheet(samples, masks_of=lambda s: s[schema.PROPOSALS]["segmentations"][:5])

    # -- worker
    def setup(self) -> None:
        import torch

        from maskflow.models.ffdnet import load_ffdnet

        tracking.worker_setup(self.tracking_uri, self.options)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_ffdnet(self.model_uri, self.cfg.model.arch, self.options, self.device)

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject | Count]:
        import torch

        from maskflow.stages.inputs import read_proposals, unit_image_samples

        if self.model is None:
            self.setup()
        if self.device.type == "cpu":  # Ray Data calls actors from a thread of its own: set the count there
            torch.set_num_threads(max(1, int(self.cfg.compute.cpus_per_worker)))
        pending: list[_Pending] = []
        crops = 0
        for item in unit_image_samples(unit, self.options):
            if isinstance(item, Reject):
                yield item
                continue
            raw, image, meta = item
            props, problem = read_proposals(raw, *image.shape[-2:])
            if problem:
                yield Reject(raw["__key__"], problem, source=unit.source)
                continue
            prepared = yield from self._prepare(raw, image, meta, props, unit.source)
            pending.append(prepared)
            crops += len(prepared.refine_idx)
            if crops >= self.cfg.refine.batch_size:  # enough crops for a full forward: run what is pending
                yield from self._refine(pending)
                pending, crops = [], 0
        if pending:
            yield from self._refine(pending)

    def _prepare(self, raw: dict, image: "torch.Tensor", meta: dict, props: dict, source: str):
        """Rejects and counts of one image (yielded), and its crops (returned)."""
        import torch

        from maskflow.stages.ffd_crops import crop_boxes, crop_rois
        from ops.ffd import crop_resize
        from ops.masks import decode_masks, rle_areas, rle_boxes

        key = raw["__key__"]
        H, W = int(image.shape[-2]), int(image.shape[-1])
        segs, scores = props["segmentations"], props["scores"]
        yield Count("images")
        yield Count("proposals", len(segs))
        top = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:self.cfg.refine.top_k]
        yield Count("proposals_beyond_top_k", len(segs) - len(top))
        areas = rle_areas([segs[i] for i in top])
        usable = []
        for i, area in zip(top.tolist(), areas):
            problem = EMPTY_PROPOSAL if area <= 0 else _box_problem(props["boxes"][i], H, W)
            if problem:
                yield Reject(f"{key}_{i:04d}", problem, kind="proposal", source=source)
            else:
                usable.append(i)
        idx = np.asarray(sorted(usable), dtype=np.int64)
        yield Count("proposals_refined", len(idx))
        arch = self.model.cfg
        size = arch.crop_size
        if not len(idx):
            return _Pending(raw, meta, props, H, W, idx, torch.zeros((0, 5)), torch.zeros((0, 3, size, size)),
                            torch.zeros((0, 1, size, size)))
        boxes = crop_boxes(rle_boxes([segs[i] for i in idx]), arch.crop_enlarge)
        rois = crop_rois(boxes, torch.zeros(len(idx), dtype=torch.long))
        image_crops = crop_resize(image[None].float(), rois, size) / 255.0
        proposal_crops = torch.empty((len(idx), 1, size, size))
        for start in range(0, len(idx), MASK_CHUNK):
            part = slice(start, start + MASK_CHUNK)
            planes = torch.from_numpy(decode_masks([segs[i] for i in idx[part]], H, W)).float()[:, None]
            own = crop_rois(boxes[part], torch.arange(len(planes)))
            proposal_crops[part] = (crop_resize(planes, own, size) > 0.5).float()  # binary, as the training crops
        return _Pending(raw, meta, props, H, W, idx, rois, image_crops, proposal_crops)

    def _refine(self, pending: list[_Pending]) -> Iterator[dict | Count]:
        """The network over the crops of ``pending`` images (``refine.batch_size`` per forward), then each image's
        output sample."""
        import torch

        s = self.cfg.refine
        images = torch.cat([p.image_crops for p in pending])
        proposals = torch.cat([p.proposal_crops for p in pending])
        edits: list[list[dict]] = []  # per forward: one edit dict per iteration
        with torch.inference_mode():
            for start in range(0, len(images), s.batch_size):
                part = slice(start, start + s.batch_size)
                _, steps = self.model.refine(images[part].to(self.device), proposals[part].to(self.device),
                                             s.iterations)
                edits.append([{k: v.float().cpu() for k, v in step.items()} for step in steps])
        joined = [{k: torch.cat([e[t][k] for e in edits]) for k in edits[0][t]} for t in range(s.iterations)] \
            if edits else []
        start = 0
        for p in pending:
            n = len(p.refine_idx)
            yield from self._output(p, [{k: v[start:start + n] for k, v in step.items()} for step in joined])
            start += n

    def _output(self, p: _Pending, edits: list[dict]) -> Iterator[dict | Count]:
        """The ``proposals/1`` sample of one image, its top-k proposals refined by ``edits`` (the network's per-pass
        output for its crops, replayed on the full-resolution masks: :meth:`FFDNet.apply_in_image`)."""
        import torch

        from ops.masks import decode_masks, encode_masks, mask_iou, rle_boxes

        props, threshold = p.props, self.cfg.refine.mask_threshold
        segs, boxes = list(props["segmentations"]), [list(b) for b in props["boxes"]]
        flags = [False] * len(segs)
        empty = 0
        # (chunk, H, W) planes at a time: bounds memory on large images
        chunk = max(1, min(MASK_CHUNK, PIXELS_PER_CHUNK // max(1, p.height * p.width)))
        with torch.inference_mode():
            for start in range(0, len(p.refine_idx), chunk):
                part = slice(start, start + chunk)
                idx = p.refine_idx[part].tolist()
                planes = torch.from_numpy(decode_masks([segs[i] for i in idx], p.height, p.width)).float()
                part_edits = [{k: v[part] for k, v in step.items()} for step in edits]
                masks = self.model.apply_in_image(planes.to(self.device), part_edits, p.rois[part].to(self.device))
                masks = (masks > threshold).cpu()
                for i, rle, ok in zip(idx, encode_masks(masks), masks.flatten(1).any(1).tolist()):
                    if ok:
                        segs[i], flags[i] = rle, True
                    else:
                        empty += 1
        for i in np.flatnonzero(flags).tolist():
            boxes[i] = [float(v) for v in rle_boxes([segs[i]])[0]]
        yield Count("proposals_refined_empty", empty)
        anns = p.meta.get("annotations", [])
        iou = mask_iou(segs, [a["segmentation"] for a in anns], [a.get("iscrowd", 0) for a in anns]).round(6).tolist() \
            if anns else []
        out = {"boxes": boxes, "scores": list(props["scores"]), "segmentations": segs, "iou": iou,
               "model": self.model_uri, "refiner": self.model_uri,
               "generator": str(props.get("generator") or props.get("model", "")), "refined": flags,
               "height": p.height, "width": p.width}
        yield {"__key__": p.sample["__key__"], schema.IMAGE: p.sample[schema.IMAGE], schema.META: p.meta,
               schema.PROPOSALS: out}
