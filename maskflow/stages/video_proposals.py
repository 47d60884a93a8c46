"""Video-proposals stage: DMM-Net's training and J/F evaluation samples (001_6622dcd01de272f9.txt, sections 3-4.1).

DMM-Net matches the top-50 Mask R-CNN proposals of every frame to templates (the first-frame masks of the tracked
instances) and is supervised with each instance's mask in every frame. This stage assembles exactly that, per
video, from two inputs:

* ``input.proposals``: the proposals job's output on the video's frames (``conf/proposals/dmm_top50.yaml``): one
  ``proposals`` sample per frame, carrying ``video_id``, ``frame_index`` and ``track_id`` per annotation (ingest keeps
  them);
* ``input.videos``: the index of the videos, i.e. which frames each video has: the COCO-video json the frames were
  ingested from (``coco``; the synthetic generator's videos and converted data sets are COCO-video json) or a DAVIS
  folder (``davis``, indexed with :func:`maskflow.data.convert.davis_to_coco`, the converter the frames were ingested
  through).

The plan needs no shard read: the index says which frames a video has, the proposals manifest's sample keys say which
shard holds each frame. Whole videos go into a shard (never split), packed up to ``output.samples_per_shard`` frames.

A video is the unit of rejection (kind ``sample``, key = the video's name): a frame missing from the video (a gap in
its frame indices, or a frame without a proposals sample), a frame or mask the converter or ingest could not use
(a mask whose size differs from its image...), a frame that does not decode or whose masks do not fit it, an
annotation without ``track_id``, or a track whose ground truth the index has but the frame lacks: DMM-Net needs every
frame of a video and its masks, so a video with a hole is rejected with the reason, never produced with a gap.
Counts: ``videos`` (= manifest inputs - rejected), ``frames``, ``tracks``.

Templates: the mask of each track in the first frame it appears in (frame 0 for DAVIS and the synthetic videos).

``video_frame`` samples, key ``<video_id:06d>_<frame_index:05d>``, a video's frames consecutive in frame order
    ``<key>.image``       the frame's encoded bytes, as ingested
    ``<key>.frame.json``  ``video_id`` int, ``video`` str (name), ``frame_index`` int, ``num_frames`` int,
                          ``image_id`` int, ``file_name`` str, ``source`` str, ``height``/``width`` int,
                          ``tracks`` sorted track ids, ``gt`` {track id (str): RLE or null when the instance is
                          not visible in this frame}, ``templates`` {track id (str): {``frame_index`` int,
                          ``segmentation`` RLE}}, ``proposals``: ``boxes`` k x [x, y, w, h], ``scores`` k,
                          ``segmentations`` k RLE (the best ``top_k`` of the proposals sample, score order),
                          ``iou`` k x T (mask IoU of each proposal with each track's mask here, 0 when absent,
                          columns in ``tracks`` order), ``model`` str.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from maskflow import storage
from maskflow.config import ConfigError, Uri, require
from maskflow.data import schema
from maskflow.data.coco import load_coco_json
from maskflow.stage import (Count, InputShard, Plan, Reject, Stage, StageJobConfig, WorkUnit, input_shards,
                            iter_input_shard)
from maskflow.stages.inputs import open_image_sample, read_proposals
from maskflow.storage import StorageOptions
from ops.masks import mask_iou

FRAME = "frame.json"
SCHEMA = schema.SampleSchema("video_frame/1", (
    schema.Field(schema.IMAGE, "bytes", "the frame's encoded image"),
    schema.Field(FRAME, "json", "video/frame ids, per-track ground truth, templates, top-k proposals, IoU"),
))


@dataclass
class VideoIndexConfig:
    coco: Uri | None = None  # COCO-video json (videos + images with video_id / frame_index)
    davis: Uri | None = None  # or a DAVIS root (JPEGImages/<resolution>/<seq>, Annotations/<resolution>/<seq>)
    davis_sequences: list[str] | None = None  # DAVIS only: these sequences (None: all)
    davis_resolution: str = "480p"

    def validate(self) -> None:
        require((self.coco is None) != (self.davis is None), "coco",
                "set exactly one of input.videos.coco (a COCO-video json) or input.videos.davis (a DAVIS root)")


@dataclass
class VideoInputConfig:
    proposals: Uri = ""  # the proposals job's output on the frames
    videos: VideoIndexConfig = field(default_factory=VideoIndexConfig)

    def validate(self) -> None:
        require(bool(self.proposals), "proposals", "required: the proposals job's output on the frames")


@dataclass
class VideoSettings:
    top_k: int = 50  # proposals kept per frame (DMM-Net: 50)

    def validate(self) -> None:
        require(1 <= self.top_k <= 1000, "top_k", "must be in 1..1000")


@dataclass
class VideoProposalsConfig(StageJobConfig):
    input: VideoInputConfig = field(default_factory=VideoInputConfig)
    videos: VideoSettings = field(default_factory=VideoSettings)


def frame_key(video_id: int, frame_index: int) -> str:
    return f"{int(video_id):06d}_{int(frame_index):05d}"


# --------------------------------------------------------------------------------------------- plan


def load_video_index(cfg: VideoIndexConfig, options: StorageOptions) -> dict:
    """The COCO-video dict describing the videos (read, or converted from a DAVIS folder)."""
    if cfg.coco is not None:
        storage.check_uri(cfg.coco, for_write=False, options=options, what="input.videos.coco")
        try:
            return load_coco_json(cfg.coco, options)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"input.videos.coco: {e}") from None
    from maskflow.data.convert import davis_to_coco

    storage.check_uri(cfg.davis, for_write=False, options=options, what="input.videos.davis")
    coco, _ = davis_to_coco(cfg.davis, cfg.davis_sequences, cfg.davis_resolution, options)
    return coco


def plan_videos(index: dict, proposal_shards: list[InputShard], frames_per_shard: int) -> Plan:
    """Videos with every frame present, packed whole into units; a reject for each video that is not."""
    key_to_shard = {key: shard for shard in proposal_shards for key in shard.keys}
    frames: dict[int, dict[int, dict]] = {}
    for img in index["images"]:
        if "video_id" in img and "frame_index" in img:
            frames.setdefault(int(img["video_id"]), {})[int(img["frame_index"])] = img
    tracks_of: dict[int, set[int]] = {}
    for ann in index["annotations"]:
        if "track_id" in ann and not ann.get("iscrowd"):
            tracks_of.setdefault(int(ann["image_id"]), set()).add(int(ann["track_id"]))
    skipped: dict[str, str] = {}
    for s in (index.get("info") or {}).get("skipped", []) or []:
        skipped.setdefault(str(s.get("key", "")).split("/", 1)[0], f"{s.get('reason')} ({s.get('key')})")
    videos = index.get("videos") or [{"id": v, "name": f"{v:06d}"} for v in sorted(frames)]

    rejects, good = [], []
    for video in sorted(videos, key=lambda v: int(v["id"])):
        vid, name = int(video["id"]), str(video.get("name", video["id"]))
        have = frames.get(vid, {})
        length = int(video.get("length") or (max(have) + 1 if have else 0))
        missing = [i for i in range(length) if i not in have]
        if not have:
            reason = "video has no frames"
        elif missing:
            reason = f"frame {missing[0]} missing from the video ({len(missing)} of {length} frames missing)"
        elif name in skipped:
            reason = f"unusable input: {skipped[name]}"
        else:
            absent = [i for i in range(length) if schema.sample_key(have[i]["id"]) not in key_to_shard]
            reason = (f"frame {absent[0]} (image {have[absent[0]]['id']}) has no proposals sample"
                      if absent else None)
        if reason:
            rejects.append(Reject(name, reason, source="input.videos"))
            continue
        good.append({
            "video_id": vid, "name": name,
            "frames": [{"frame_index": i, "image_id": int(have[i]["id"]), "key": schema.sample_key(have[i]["id"]),
                        "tracks": sorted(tracks_of.get(int(have[i]["id"]), ()))} for i in range(length)],
        })

    units, current, size = [], [], 0
    for video in good:
        current.append(video)
        size += len(video["frames"])
        if size >= frames_per_shard:
            units.append(current)
            current, size = [], 0
    if current:
        units.append(current)
    plan_units = []
    for n, videos_ in enumerate(units):
        needed = {key_to_shard[f["key"]].uri for v in videos_ for f in v["frames"]}
        inputs = [shard for shard in proposal_shards if shard.uri in needed]
        plan_units.append(WorkUnit(n, [{"videos": videos_, "inputs": inputs}],
                                   source=",".join(v["name"] for v in videos_), expected_inputs=len(videos_)))
    return Plan(plan_units, rejects)


# --------------------------------------------------------------------------------------------- one video


def video_samples(video: dict, raw: dict[str, dict | Reject], s: VideoSettings,
                  source: str = "") -> tuple[list[dict], None] | tuple[None, str]:
    """The frame samples of one video, or ``(None, reason)`` if it cannot be made whole."""
    opened = []
    for f in video["frames"]:
        i = f["frame_index"]
        sample = raw.get(f["key"])
        if sample is None:
            return None, f"frame {i} (image {f['image_id']}) missing from its proposal shard"
        if isinstance(sample, Reject):  # lost or damaged in its proposal shard: say why
            return None, f"frame {i} (image {f['image_id']}): {sample.reason}"
        got = open_image_sample(sample, source)
        if isinstance(got, Reject):
            return None, f"frame {i}: {got.reason}"
        image, meta = got
        H, W = int(image.shape[-2]), int(image.shape[-1])
        if (meta.get("video_id"), meta.get("frame_index")) != (video["video_id"], i):
            return None, (f"frame {i}: its sample says video {meta.get('video_id')} frame {meta.get('frame_index')}"
                          " (index and proposals disagree)")
        props, problem = read_proposals(sample, H, W)
        if problem:
            return None, f"frame {i}: {problem}"
        gt: dict[int, dict] = {}
        for ann in meta["annotations"]:
            if ann.get("iscrowd"):
                continue
            if "track_id" not in ann:
                return None, f"frame {i}: annotation {ann.get('id')} without track_id"
            if ann["track_id"] in gt:
                return None, f"frame {i}: two annotations of track {ann['track_id']}"
            gt[int(ann["track_id"])] = ann["segmentation"]
        lost = [t for t in f["tracks"] if t not in gt]
        if lost:
            return None, f"frame {i}: ground truth of track {lost[0]} missing from the proposals input"
        opened.append((f, sample, meta, props, gt))

    tracks = sorted({t for *_, gt in opened for t in gt})
    templates: dict[str, dict] = {}
    for f, *_, gt in opened:
        for t in tracks:
            if str(t) not in templates and t in gt:
                templates[str(t)] = {"frame_index": f["frame_index"], "segmentation": gt[t]}
    out = []
    for f, sample, meta, props, gt in opened:
        k = min(s.top_k, len(props["segmentations"]))
        segs = props["segmentations"][:k]
        iou = np.zeros((k, len(tracks)))
        present = [j for j, t in enumerate(tracks) if t in gt]
        if k and present:
            iou[:, present] = mask_iou(segs, [gt[tracks[j]] for j in present])
        out.append({
            "__key__": frame_key(video["video_id"], f["frame_index"]),
            schema.IMAGE: sample[schema.IMAGE],
            FRAME: {
                "video_id": video["video_id"], "video": video["name"], "frame_index": f["frame_index"],
                "num_frames": len(video["frames"]), "image_id": f["image_id"],
                "file_name": meta.get("file_name", ""), "source": meta.get("source", ""),
                "height": meta["height"], "width": meta["width"], "tracks": tracks,
                "gt": {str(t): gt.get(t) for t in tracks}, "templates": templates,
                "proposals": {"boxes": props["boxes"][:k], "scores": props["scores"][:k], "segmentations": segs,
                              "iou": iou.round(6).tolist(), "model": str(props.get("model", ""))},
            },
        })
    return out, None


class VideoProposalsStage(Stage):
    name = "video_proposals"
    schema = SCHEMA

    def plan(self) -> Plan:
        uri = self.cfg.input.proposals
        proposal_shards = input_shards(uri, self.options, "input.proposals", expect=schema.PROPOSALS_SCHEMA)
        if any(shard.keys is None for shard in proposal_shards):
            raise ConfigError("input.proposals: its manifest lists no sample keys (written by an older maskflow): "
                              "re-run the proposals job")
        index = load_video_index(self.cfg.input.videos, self.options)
        return plan_videos(index, proposal_shards, self.cfg.output.samples_per_shard)

    def fingerprint_config(self):
        return {"videos": vars(self.cfg.videos)}

    def process(self, unit: WorkUnit) -> Iterator[dict | Reject | Count]:
        (item,) = unit.items
        wanted = {f["key"] for v in item["videos"] for f in v["frames"]}
        raw: dict[str, dict] = {}
        for shard in item["inputs"]:  # each input shard read once per unit, only this unit's frames kept
            for sample in iter_input_shard(shard, self.options):
                if not isinstance(sample, Reject) and sample["__key__"] in wanted:
                    raw[sample["__key__"]] = sample
                elif isinstance(sample, Reject) and sample.kind == "sample" and sample.key in wanted:
                    raw.setdefault(sample.key, sample)  # why a frame is lost (a damaged or missing sample)
        for video in item["videos"]:
            samples, reason = video_samples(video, raw, self.cfg.videos, unit.source)
            if reason:
                yield Reject(video["name"], reason, source=unit.source)
                continue
            yield Count("videos")
            yield Count("frames", len(samples))
            yield Count("tracks", len(samples[0][FRAME]["tracks"]) if samples else 0)
            yield from samples

    def contact_sheet(self, samples: list[dict]):
        return video_sheet(samples)


def video_sheet(samples: list[dict]):
    """Per frame: the frame with its ground-truth tracks | with its 5 best proposals."""
    from maskflow import viz
    from maskflow.data.validate import decode_image
    from ops.masks import decode_masks

    tiles = []
    for s in samples[:4]:
        frame = s[FRAME] if isinstance(s[FRAME], dict) else schema.loads(s[FRAME])
        image = decode_image(s[schema.IMAGE])
        h, w = frame["height"], frame["width"]
        gts = [r for r in frame["gt"].values() if r is not None]
        tiles.append(viz.overlay_masks(image, decode_masks(gts, h, w) if gts else np.zeros((0, h, w), bool)))
        props = frame["proposals"]["segmentations"][:5]
        tiles.append(viz.overlay_masks(image, decode_masks(props, h, w) if props else np.zeros((0, h, w), bool)))
    return viz.grid(tiles, columns=4)
