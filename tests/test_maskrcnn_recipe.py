"""The real-data Mask R-CNN recipe's pieces, on real Penn-Fudan images: the held-out split (deterministic, disjoint,
covering every image) and each training augmentation keeping boxes and masks on what the image shows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskflow import config
from maskflow.config import ConfigError
from maskflow.data.coco import load_coco_json
from maskflow.data.convert import holdout_split
from maskflow.models.maskrcnn import image_to_tensor, targets_from_meta
from maskflow.data.validate import decode_image
from maskflow import storage
from tests.conftest import ROOT
from trainers.maskrcnn import (AugmentConfig, MaskRCNNPlugin, MaskRCNNTrainConfig, augment, boxes_of_masks, hflip,
                               photometric, scale_jitter)


# --------------------------------------------------------------------------------------------- the split


def test_holdout_split_is_deterministic_disjoint_and_complete(penn_fudan_coco):
    coco = load_coco_json(penn_fudan_coco[0])
    train, val = holdout_split(coco, 0.25, seed=0)
    assert (len(train["images"]), len(val["images"])) == (45, 15)
    train_ids, val_ids = {im["id"] for im in train["images"]}, {im["id"] for im in val["images"]}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {im["id"] for im in coco["images"]}
    # annotations follow their images, none lost
    assert {a["image_id"] for a in train["annotations"]} <= train_ids
    assert {a["image_id"] for a in val["annotations"]} <= val_ids
    assert len(train["annotations"]) + len(val["annotations"]) == len(coco["annotations"])
    assert val["info"]["split"] == {"name": "val", "fraction": 0.25, "seed": 0, "images": 15}
    # the same split for any listing order; another seed holds out other images
    shuffled = {**coco, "images": coco["images"][::-1]}
    assert {im["id"] for im in holdout_split(shuffled, 0.25, seed=0)[1]["images"]} == val_ids
    assert {im["id"] for im in holdout_split(coco, 0.25, seed=1)[1]["images"]} != val_ids


@pytest.fixture
def convert_job(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "pipelines"))  # the script's own `import _bootstrap`, as results jobs do
    import pipelines.convert

    return pipelines.convert


def test_convert_job_writes_both_splits(convert_job, shared_data, tmp_path, capsys):
    main = convert_job.main

    out, val_out = tmp_path / "train.json", tmp_path / "val.json"
    main(["format=penn_fudan", f"root={shared_data / 'penn_fudan_ped'}", "holdout=0.25", f"output={out}",
          f"val_output={val_out}"])
    printed = json.loads(capsys.readouterr().out)
    train, val = json.loads(out.read_text()), json.loads(val_out.read_text())
    assert (printed["images"], printed["val"]["images"]) == (len(train["images"]), len(val["images"])) == (45, 15)
    names = sorted(im["file_name"] for im in train["images"] + val["images"])
    assert names == sorted(p.name for p in (shared_data / "penn_fudan_ped" / "PNGImages").glob("*.png"))


@pytest.mark.parametrize("overrides, key", [
    (["holdout=0.25"], "val_output"),
    (["holdout=1.0", "val_output=v.json"], "holdout"),
    (["val_output=v.json"], "val_output"),
    (["format=davis", "holdout=0.2", "val_output=v.json"], "holdout"),
])
def test_convert_holdout_config_errors_name_the_key(convert_job, overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        config.parse_cli(convert_job.ConvertConfig, ["format=penn_fudan", "root=r", "output=o.json", *overrides])


# --------------------------------------------------------------------------------------------- augmentation


@pytest.fixture(scope="module")
def sample(penn_fudan_coco):
    """FudanPed00001 (two pedestrians) as the trainer sees it: image tensor and target."""
    coco = load_coco_json(penn_fudan_coco[0])
    image_rec = coco["images"][0]
    meta = {**image_rec, "annotations": [a for a in coco["annotations"] if a["image_id"] == image_rec["id"]]}
    image = image_to_tensor(decode_image(storage.read_bytes(storage.join(penn_fudan_coco[1], image_rec["file_name"]))))
    return image, targets_from_meta(meta)


def mask_image(target: dict) -> torch.Tensor:
    """A 3-channel image whose channel k holds instance k's mask (k < 3): transformed alongside the target, it must
    land on the transformed masks (the geometry of image and target agree)."""
    masks = target["masks"].float()
    out = torch.zeros((3, *masks.shape[-2:]))
    out[: min(3, len(masks))] = masks[:3]
    return out


def assert_consistent(image: torch.Tensor, target: dict, tracer: torch.Tensor | None = None) -> None:
    h, w = image.shape[-2:]
    assert target["masks"].shape[-2:] == (h, w)
    assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
    assert torch.equal(target["boxes"], boxes_of_masks(target["masks"]))
    assert bool((target["masks"].flatten(1).sum(1) > 0).all())
    if tracer is not None:  # the traced masks: IoU of the image-borne copy with the target's mask
        for k in range(min(3, len(target["masks"]))):
            a, b = tracer[k] > 0.5, target["masks"][k].bool()
            assert (a & b).sum() / (a | b).sum() > 0.95, f"instance {k} drifted from the image"


def test_targets_from_meta_boxes_are_the_tight_boxes_of_the_masks(sample):
    image, target = sample
    assert len(target["masks"]) == 2
    assert torch.equal(target["boxes"], boxes_of_masks(target["masks"]))


@pytest.mark.parametrize("scale, offset", [(1.5, (0.0, 1.0)), (1.5, (1.0, 0.0)), (0.6, (0.3, 0.7)), (1.0, (0.5, 0.5))])
def test_scale_jitter_moves_image_and_masks_together(sample, scale, offset):
    image, target = sample
    h, w = image.shape[-2:]
    tracer = mask_image(target)
    out, t = scale_jitter(torch.cat([image, tracer]), target, scale, offset, min_mask_pixels=16)
    assert out.shape[-2:] == (h, w) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert_consistent(out[:3], t, out[3:])
    if scale <= 1.0:  # nothing leaves the canvas: every instance kept, its box scaled and shifted
        assert len(t["boxes"]) == len(target["boxes"])
        shift_y, shift_x = round((h - round(h * scale)) * offset[0]), round((w - round(w * scale)) * offset[1])
        expected = target["boxes"] * scale + torch.tensor([shift_x, shift_y, shift_x, shift_y])
        assert torch.allclose(t["boxes"], expected, atol=2.0)
        # the photo itself moved the same way: the pixels under each mask keep their mean colour
        for k in range(len(t["masks"])):
            before = image[:, target["masks"][k].bool()].mean(1)
            after = out[:3, t["masks"][k].bool()].mean(1)
            assert torch.allclose(before, after, atol=0.03)


def test_scale_jitter_drops_instances_cropped_away(sample):
    image, target = sample
    # zoom 3x into the top-left corner: FudanPed00001's pedestrians stand in the middle and right, out of the window
    out, t = scale_jitter(image, target, 3.0, (0.0, 0.0), min_mask_pixels=16)
    kept = len(t["masks"])
    assert kept < len(target["masks"])
    assert_consistent(out, t)


def test_hflip_mirrors_image_masks_and_boxes(sample):
    image, target = sample
    tracer = mask_image(target)
    out, t = hflip(torch.cat([image, tracer]), target)
    assert torch.equal(out[:3], image.flip(-1))
    assert_consistent(out[:3], t, out[3:])


def test_photometric_changes_colours_only(sample):
    image, target = sample
    out = photometric(image, {"brightness": 1.3, "contrast": 0.7, "saturation": 1.4, "hue": 0.05})
    assert out.shape == image.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float((out - image).abs().mean()) > 0.02
    bright = photometric(image, {"brightness": 0.5})
    assert torch.allclose(bright, image * 0.5, atol=1e-6)


def test_augment_is_reproducible_and_consistent(sample):
    image, target = sample
    cfg = AugmentConfig(hflip=0.5, scale_range=(0.5, 2.0), brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05)
    for seed in range(6):
        a_img, a_t = augment(image, target, cfg, np.random.default_rng(seed))
        b_img, b_t = augment(image, target, cfg, np.random.default_rng(seed))
        assert torch.equal(a_img, b_img) and torch.equal(a_t["masks"], b_t["masks"])
        assert a_img.shape == image.shape
        assert_consistent(a_img, a_t)
    # off by default but the flip: an unflipped draw leaves the sample as it was
    plain, t = augment(image, target, AugmentConfig(hflip=0.0), np.random.default_rng(0))
    assert torch.equal(plain, image) and torch.equal(t["boxes"], target["boxes"])


def test_multiscale_sizes_reach_the_model_and_evaluation_keeps_min_size():
    cfg = config.build(MaskRCNNTrainConfig, {
        "data": {"train": "x"}, "augment": {"min_sizes": [192, 256, 320]},
        "model": {"backbone": "tiny_fpn", "width": 8, "fpn_channels": 16, "min_size": 256, "max_size": 400,
                  "representation_size": 32, "mask_head_channels": 8, "mask_head_layers": 1}})
    model = MaskRCNNPlugin(cfg).build_model()
    assert model.transform.min_size == (192, 320, 256)  # torchvision evaluates at the last


@pytest.mark.parametrize("overrides, key", [
    (["augment.scale_range=[1.5,0.5]"], "augment.scale_range"),
    (["augment.hue=0.7"], "augment.hue"),
    (["augment.min_sizes=[16]"], "augment.min_sizes"),
])
def test_augment_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        config.parse_cli(MaskRCNNTrainConfig, ["data.train=x", *overrides])


def test_recipe_config_parses():
    cfg = config.parse_cli(MaskRCNNTrainConfig, ["--config", str(ROOT / "conf" / "maskrcnn" / "penn_fudan.yaml")])
    assert cfg.data.train_uris and cfg.augment.scale_range[0] < cfg.augment.scale_range[1]
