"""Convert a real data set in its original layout into a COCO instances json (local or s3://), ready for ingest.

    python pipelines/convert.py format=penn_fudan root=../shared/data/penn_fudan_ped output=runs/data/pf.json
    python pipelines/convert.py format=yolo_seg root=../shared/data/coco128_seg output=s3://bucket/coco128.json
    python pipelines/convert.py format=voc root=../shared/data/labelme_examples/instance_segmentation/data_dataset_voc ...
    python pipelines/convert.py format=davis root=../shared/data/davis2016_subset output=...
    python pipelines/convert.py format=dlib_faces root=../shared/data/dlib_faces_landmarks output=runs/data/faces.json

It prints the ``input.annotations`` / ``input.images`` pair to give the ingest or proposals job.

A held-out validation split (images never used in training, for measuring how a model generalises):

    python pipelines/convert.py format=penn_fudan root=../shared/data/penn_fudan_ped holdout=0.25 \
        output=runs/data/penn_fudan_train.json val_output=runs/data/penn_fudan_val.json

writes the training images to ``output`` and ``round(holdout * N)`` images to ``val_output``, chosen by a seeded hash
of their file names (``holdout_seed``; see maskflow.data.convert.holdout_split): deterministic, disjoint, and
together every converted image.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

import json
from dataclasses import dataclass
from typing import Literal

from maskflow import config, runtime, storage
from maskflow.config import Uri, require
from maskflow.data import convert
from maskflow.data.coco import write_coco_json


@dataclass
class ConvertConfig(runtime.Common):
    format: Literal["penn_fudan", "yolo_seg", "voc", "davis", "dlib_faces"] = "penn_fudan"
    root: Uri = ""  # the data set's root folder (local or s3://)
    output: Uri = ""  # where the COCO json goes
    # yolo_seg: images/<split> and labels/<split> ("" = train2017); dlib_faces: training | testing ("" = both)
    split: str = ""
    holdout: float = 0.0  # fraction of the images held out for validation (0: none; output gets every image)
    holdout_seed: int = 0  # seed of the file-name hash that picks them
    val_output: Uri = ""  # where the held-out images' COCO json goes (required with holdout > 0)

    def validate(self) -> None:
        require(bool(self.root), "root", "required: the data set's root folder")
        require(bool(self.output), "output", "required: the COCO json URI to write")
        require(0.0 <= self.holdout < 1.0, "holdout", f"must be in [0, 1), got {self.holdout}")
        if self.holdout > 0:
            require(bool(self.val_output), "val_output", "required with holdout > 0: the held-out COCO json URI")
            require(self.val_output != self.output, "val_output", "must differ from output")
            # frames of one video are near-duplicates: a per-frame split would leak the video into both halves
            require(self.format != "davis", "holdout", "not for davis (hold out whole sequences instead)")
        else:
            require(not self.val_output, "val_output", "needs holdout > 0")
        if self.format == "dlib_faces":
            require(self.split in ("", *convert.DLIB_SPLITS), "split",
                    f"dlib_faces: one of {', '.join(convert.DLIB_SPLITS)}, or empty for both")


def main(argv=None) -> dict:
    cfg = config.parse_cli(ConvertConfig, argv, description=__doc__)
    runtime.setup_logging()
    options = cfg.storage.options()
    storage.check_uri(cfg.root, for_write=False, options=options, what="root")
    storage.check_uri(cfg.output, for_write=True, options=options, what="output")
    if cfg.holdout > 0:
        storage.check_uri(cfg.val_output, for_write=True, options=options, what="val_output")
    if cfg.format == "penn_fudan":
        coco, images = convert.penn_fudan_to_coco(cfg.root, options)
    elif cfg.format == "yolo_seg":
        split = cfg.split or "train2017"
        coco, images = convert.yolo_seg_to_coco(storage.join(cfg.root, "images", split),
                                                storage.join(cfg.root, "labels", split),
                                                convert.COCO80_CLASSES, options)
    elif cfg.format == "voc":
        coco, images = convert.voc_instances_to_coco(cfg.root, options)
    elif cfg.format == "davis":
        coco, images = convert.davis_to_coco(cfg.root, options=options)
    else:
        splits = (cfg.split,) if cfg.split else convert.DLIB_SPLITS
        coco, images = convert.dlib_faces_to_coco(cfg.root, splits, options=options)
    skipped = coco.get("info", {}).get("skipped", [])
    summary = {"input.annotations": cfg.output, "input.images": images, "images": len(coco["images"]),
               "annotations": len(coco["annotations"]), "skipped": len(skipped)}
    if cfg.holdout > 0:
        train, val = convert.holdout_split(coco, cfg.holdout, cfg.holdout_seed)
        write_coco_json(train, cfg.output, options)
        write_coco_json(val, cfg.val_output, options)
        summary.update({"images": len(train["images"]), "annotations": len(train["annotations"]),
                        "val": {"input.annotations": cfg.val_output, "images": len(val["images"]),
                                "annotations": len(val["annotations"])}})
        print(json.dumps(summary, indent=1))
        return train
    write_coco_json(coco, cfg.output, options)
    print(json.dumps(summary, indent=1))
    return coco


if __name__ == "__main__":
    config.main_guard(main)
