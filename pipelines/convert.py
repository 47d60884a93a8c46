"""Convert a real data set in its original layout into a COCO instances json (local or s3://), ready for ingest.

    python pipelines/convert.py format=penn_fudan root=../shared/data/penn_fudan_ped output=runs/data/pf.json
    python pipelines/convert.py format=yolo_seg root=../shared/data/coco128_seg output=s3://bucket/coco128.json
    python pipelines/convert.py format=voc root=../shared/data/labelme_examples/instance_segmentation/data_dataset_voc ...
    python pipelines/convert.py format=davis root=../shared/data/davis2016_subset output=...
    python pipelines/convert.py format=dlib_faces root=../shared/data/dlib_faces_landmarks output=runs/data/faces.json

It prints the ``input.annotations`` / ``input.images`` pair to give the ingest or proposals job.
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

    def validate(self) -> None:
        require(bool(self.root), "root", "required: the data set's root folder")
        require(bool(self.output), "output", "required: the COCO json URI to write")
        if self.format == "dlib_faces":
            require(self.split in ("", *convert.DLIB_SPLITS), "split",
                    f"dlib_faces: one of {', '.join(convert.DLIB_SPLITS)}, or empty for both")


def main(argv=None) -> dict:
    cfg = config.parse_cli(ConvertConfig, argv, description=__doc__)
    runtime.setup_logging()
    options = cfg.storage.options()
    storage.check_uri(cfg.root, for_write=False, options=options, what="root")
    storage.check_uri(cfg.output, for_write=True, options=options, what="output")
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
    write_coco_json(coco, cfg.output, options)
    skipped = coco.get("info", {}).get("skipped", [])
    print(json.dumps({"input.annotations": cfg.output, "input.images": images, "images": len(coco["images"]),
                      "annotations": len(coco["annotations"]), "skipped": len(skipped)}, indent=1))
    return coco


if __name__ == "__main__":
    config.main_guard(main)
