"""DeepMask / SharpMask, fast and on real Penn-Fudan: the mask-patches stage's windows (positives centred and scaled
as specified, negatives clear of every object, recomputed here from the stored json and the source annotations;
reproducible from (image, seed); bad input rejected with reasons), and the model (training outputs; the pyramid
inference's output contract; masks pasted at the right place, through a network whose weights make its score and
mask known functions of the image)."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskflow import config, shards
from maskflow.data import schema
from maskflow.data.validate import decode_image, encode_mask, rle_to_bytes
from maskflow.models.sharpmask import SharpMask
from maskflow.models.sharpmask_config import SharpMaskConfig
from maskflow.stage import Count, Reject
from maskflow.stages import mask_patches as mp
from tests.conftest import ROOT
from ops.sharpmask import gather_windows, paste_windows

PATCH = 96
CANONICAL = math.ceil(PATCH * 128 / 224)  # 55
SHIFT, NEG_SHIFT = 16 * PATCH / 160, 32 * PATCH / 160  # 9.6, 19.2 window pixels


@pytest.fixture(scope="module")
def pf_images(penn_fudan_coco) -> list[dict]:
    """The first 12 Penn-Fudan images as ``image`` samples (the ingest stage's own code, no Ray)."""
    from maskflow.stages.ingest import IngestConfig, IngestStage

    annotations, images = penn_fudan_coco
    cfg = config.build(IngestConfig, {"input": {"annotations": annotations, "images": images, "name": "pf"},
                                      "output": {"uri": "unused", "samples_per_shard": 12}})
    job = IngestStage(cfg)
    unit = job.plan().units[0]
    return [s for s in job.process(unit) if isinstance(s, dict)]


def image_output(root, samples: list[dict]) -> str:
    """A finished ``image/1`` stage output holding ``samples`` (one shard)."""
    root.mkdir(parents=True, exist_ok=True)
    record = shards.write_shard(str(root / shards.shard_name(0)), samples)
    (root / shards.MANIFEST).write_text(json.dumps({"stage": "ingest", "schema": schema.IMAGE_SCHEMA.name,
                                                    "samples": len(samples), "shards": [record]}))
    return str(root)


def meta_of(sample: dict) -> dict:
    meta = sample[schema.META]
    return meta if isinstance(meta, dict) else schema.loads(meta)


def windows_of(sample: dict, settings: mp.PatchSettings | None = None) -> list:
    image = decode_image(sample[schema.IMAGE])
    meta = meta_of(sample)
    return list(mp.image_patches(sample["__key__"], image, meta, settings or mp.PatchSettings()))


def relation(window, ann) -> tuple[np.ndarray, float]:
    """Independently of the stage: the object's offset from the window centre and log2 of its larger side over the
    canonical size, in window pixels, from its RLE's pycocotools box."""
    x, y, w, h = mask_utils.toBbox(rle_to_bytes(ann["segmentation"])).tolist()
    wx, wy, side, _ = window
    k = PATCH / side
    offset = np.array([x + w / 2 - (wx + side / 2), y + h / 2 - (wy + side / 2)]) * k
    return offset, math.log2(max(w, h) * k / CANONICAL)


# --------------------------------------------------------------------------------------------- windows


def test_positives_centred_and_scaled_negatives_clear(pf_images):
    kinds, objects = {}, 0
    for sample in pf_images:
        meta = meta_of(sample)
        anns = {a["id"]: a for a in meta["annotations"]}
        items = windows_of(sample)
        counts = {c.name: c.value for c in items if isinstance(c, Count)}
        objects += counts["objects"]
        for w in (i for i in items if isinstance(i, dict)):
            info = w[mp.INFO]
            kinds[info["kind"]] = kinds.get(info["kind"], 0) + 1
            patch = schema.load_png(w[mp.PATCH])
            assert patch.shape == (PATCH, PATCH, 3) and info["canonical_size"] == CANONICAL
            if info["label"] == 1:
                offset, log_scale = relation(info["window"], anns[info["annotation_id"]])
                assert np.abs(offset).max() <= SHIFT + 1e-6 and abs(log_scale) <= 0.25 + 1e-6
                assert np.allclose(offset, info["offset"], atol=1e-6)
                assert log_scale == pytest.approx(math.log2(info["scale"]), abs=1e-6)
                # the mask target is that object, centred and at the canonical size, in the window's pixels
                mask = schema.load_png(w[mp.MASK]) > 0
                rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
                centre = np.array([cols[0] + cols[-1] + 1, rows[0] + rows[-1] + 1]) / 2
                assert np.abs(centre - (PATCH / 2 + np.array(info["offset"]))).max() < 1.5
                side = max(cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0])
                assert abs(side - CANONICAL * info["scale"]) < 2.0
            else:
                assert mp.MASK not in w
                # clear of every object of the image, not only of the one it was drawn for
                for ann in meta["annotations"]:
                    offset, log_scale = relation(info["window"], ann)
                    assert np.abs(offset).max() >= NEG_SHIFT - 1e-6 or abs(log_scale) >= 1 - 1e-6
                if info["kind"] == "shifted":
                    offset, _ = relation(info["window"], anns[info["annotation_id"]])
                    assert np.abs(offset).max() >= NEG_SHIFT - 1e-6
                if info["kind"] == "scaled":
                    _, log_scale = relation(info["window"], anns[info["annotation_id"]])
                    assert 1 - 1e-6 <= abs(log_scale) <= 2 + 1e-6
    s = mp.PatchSettings()
    assert objects > 20 and kinds["positive"] == objects * s.positives_per_object
    assert kinds["shifted"] + kinds["scaled"] + kinds["background"] > objects * s.negatives_per_object * 0.9
    assert min(kinds["shifted"], kinds["scaled"], kinds["background"]) > 0


def test_windows_reproducible_from_image_and_seed(pf_images):
    first = [w for w in windows_of(pf_images[3]) if isinstance(w, dict)]
    again = [w for w in windows_of(pf_images[3]) if isinstance(w, dict)]
    assert [(w["__key__"], w[mp.PATCH], schema.dumps(w[mp.INFO])) for w in first] == \
        [(w["__key__"], w[mp.PATCH], schema.dumps(w[mp.INFO])) for w in again]
    other = [w for w in windows_of(pf_images[3], mp.PatchSettings(seed=1)) if isinstance(w, dict)]
    assert [w["__key__"] for w in other] == [w["__key__"] for w in first]
    assert all(a[mp.INFO]["window"] != b[mp.INFO]["window"] for a, b in zip(first, other))


def test_split_by_image_id_is_a_partition():
    ids = range(1, 401)
    val = {i for i in ids if mp.in_split(i, "val", 0.2)}
    train = {i for i in ids if mp.in_split(i, "train", 0.2)}
    assert not val & train and val | train == set(ids) and 50 < len(val) < 110


def test_bad_input_rejected_with_reasons(pf_images, tmp_path):
    good, edited, broken = pf_images[0], dict(pf_images[1]), dict(pf_images[2])
    meta = dict(meta_of(edited))
    h, w = meta["height"], meta["width"]
    anns = meta["annotations"]
    extra = dict(anns[0], id=9001, segmentation=encode_mask(np.zeros((h, w), bool)))  # empty mask
    degenerate = dict(anns[0], id=9002, bbox=[10.0, 10.0, 0.0, 5.0])
    malformed = dict(anns[0], id=9003, segmentation={"size": [h, w], "counts": "not an rle"})
    meta["annotations"] = anns + [extra, degenerate, malformed]
    edited[schema.META] = meta
    broken[schema.IMAGE] = broken[schema.IMAGE][:200]  # truncated: does not decode
    out = image_output(tmp_path / "images", [good, edited, broken])
    cfg = config.build(mp.MaskPatchesConfig, {"input": {"shards": out}, "output": {"uri": str(tmp_path / "o")}})
    job = mp.MaskPatchesStage(cfg)
    (unit,) = job.plan().units
    items = list(job.process(unit))
    rejects = {r.key: r for r in items if isinstance(r, Reject)}
    ek = edited["__key__"]
    assert rejects[f"{ek}_9001"].reason == mp.EMPTY_MASK and rejects[f"{ek}_9001"].kind == "annotation"
    assert rejects[f"{ek}_9002"].reason.startswith(mp.DEGENERATE_BOX + ": [10.0, 10.0, 0.0, 5.0]")
    assert rejects[f"{ek}_9003"].reason.startswith(mp.MALFORMED_ANNOTATION + ": segmentation does not decode")
    assert rejects[broken["__key__"]].kind == "sample"
    assert rejects[broken["__key__"]].reason.startswith("corrupt image")
    assert len(rejects) == 4
    # nothing else is lost: the two good images' objects all made their windows
    counts = {}
    for c in (i for i in items if isinstance(i, Count)):
        counts[c.name] = counts.get(c.name, 0) + c.value
    made = [i for i in items if isinstance(i, dict)]
    assert counts["images"] == 2 and counts["objects"] == len(meta_of(good)["annotations"]) + len(anns)
    assert sum(i[mp.INFO]["label"] == 1 for i in made) == counts["objects"] * mp.PatchSettings().positives_per_object
    assert {i[mp.INFO]["image_id"] for i in made} == {meta["image_id"], meta_of(good)["image_id"]}
    # an output of another kind is refused before anything runs
    other = config.build(mp.MaskPatchesConfig, {"input": {"shards": str(tmp_path / "o2")}, "output": {"uri": "x"}})
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / shards.MANIFEST).write_text(json.dumps({"schema": "ffd_crop/1", "samples": 0, "shards": []}))
    with pytest.raises(config.ConfigError, match=r"^input.shards: holds ffd_crop/1 samples, expected image/1"):
        mp.MaskPatchesStage(other).plan()


# --------------------------------------------------------------------------------------------- model


def test_training_outputs_deepmask_and_sharpmask():
    for refine, side in ((False, 56), (True, PATCH)):
        model = SharpMask(config.build(SharpMaskConfig, {"refine": refine}))
        out = model(torch.rand(3, 3, PATCH, PATCH))
        assert out.mask_logits.shape == (3, 1, side, side) and out.score_logits.shape == (3,)
        assert out.coarse_logits.shape == (3, 1, 56, 56)
    with pytest.raises(ValueError, match="call model.eval"):
        model([torch.rand(3, 100, 100)])


def test_gather_windows_reads_the_cells_under_each_window():
    feature = torch.arange(20 * 30, dtype=torch.float32).view(1, 20, 30)
    crops = gather_windows(feature, torch.tensor([0, 2]), torch.tensor([1, 3]), step=4, size=6)
    assert crops.shape == (2, 1, 6, 6)
    assert torch.equal(crops[1, 0], feature[0, 8:14, 12:18]) and torch.equal(crops[0, 0], feature[0, 0:6, 4:10])


def test_eval_forward_follows_the_proposal_contract(pf_images):
    from maskflow.models.maskrcnn import proposals_from_output

    images = [decode_image(s[schema.IMAGE]).float() / 255 for s in pf_images[:2]]
    model = SharpMask(config.build(SharpMaskConfig, {"refine": True})).eval()
    model.configure_for_proposals(40, 0.0, 1.0)
    outputs = model(images)
    for image, out in zip(images, outputs):
        H, W = image.shape[-2:]
        assert out["boxes"].shape == (40, 4) and out["scores"].shape == (40,)
        assert out["masks"].shape == (40, 1, H, W) and 0 <= float(out["masks"].min()) <= float(out["masks"].max()) <= 1
        assert torch.all(out["scores"][:-1] >= out["scores"][1:])
        b = out["boxes"]
        assert torch.all((b[:, 0] >= 0) & (b[:, 2] <= W) & (b[:, 1] >= 0) & (b[:, 3] <= H) & (b[:, 2] >= b[:, 0]))
        props = proposals_from_output(out, 40)
        assert len(props["segmentations"]) == 40 and props["segmentations"][0]["size"] == [H, W]
    # suppression: no two kept window boxes overlap by more than the threshold; top_k bounds the count
    from torchvision.ops import box_iou

    model.configure_for_proposals(15, 0.0, 0.3)
    out = model(images[:1])[0]
    iou = box_iou(out["windows"], out["windows"]).fill_diagonal_(0)
    assert len(out["scores"]) == 15 and float(iou.max()) <= 0.3 + 1e-6
    # pickled (as mlflow.pytorch logs it): same proposals, settings kept
    copy = pickle.loads(pickle.dumps(model))
    assert copy.cfg.inference.top_k == 15 and torch.equal(copy(images[:1])[0]["scores"], out["scores"])


def _oracle(refine: bool) -> SharpMask:
    """A SharpMask whose weights make its outputs known functions of the image. The trunk passes the mean
    normalised grey on, sampled at stride 2, 4, 8, 16 (channel 0; residual branches zero, BatchNorm identity); the
    score is ``relu(sum of the window's 2 x 2 central cells - sum of its other 32 cells) - 1`` — high for a window
    centred on a bright object spanning its centre cells and no further; DeepMask's mask is a fixed centred square
    of the canonical size (bias only); SharpMask's refined mask is the bright object's silhouette read from the
    stride-2 skip feature under the window (last module: skip -> 1 channel -> logits ``grey - 1``)."""
    cfg = config.build(SharpMaskConfig, {"refine": refine, "dropout": 0.0})
    model = SharpMask(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, module in model.trunk.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
        for i, stage in enumerate(model.trunk.stages):
            stage[0].downsample[0].weight[0, :, 0, 0] = 1.0 / 3 if i == 0 else torch.eye(1, stage[0].conv1.in_channels)[0]
        model.head[0].weight[0, 0] = 1.0
        fc = -torch.ones(6, 6)
        fc[2:4, 2:4] = 1.0
        model.head[2].weight[0, 0] = fc
        model.score_head[1].weight[0, 0] = 1.0
        model.score_head[4].weight[0, 0] = 1.0
        model.score_head[4].bias.fill_(-1.0)
        square = torch.full((28, 28), -5.0)
        lo = (28 - 16) // 2
        square[lo:lo + 16, lo:lo + 16] = 5.0  # 16 of 28 cells = 55 of 96 pixels
        model.mask_head.bias.copy_(square.flatten())
        if refine:
            last = model.refine.blocks[-1]
            last.skip[0].weight[0, 0, 1, 1] = 1.0
            last.from_skip.weight[0, 0, 1, 1] = 1.0
            model.refine.final.weight[0, 0, 1, 1] = 1.0
            model.refine.final.bias.fill_(-1.0)
    return model


def test_pyramid_pastes_masks_where_the_object_is():
    H, W, (x0, y0, D) = 300, 420, (230, 90, 100)  # a bright 100 px square on black at a known place
    image = torch.zeros(3, H, W)
    image[:, y0:y0 + D, x0:x0 + D] = 1.0
    truth = torch.zeros(H, W, dtype=torch.bool)
    truth[y0:y0 + D, x0:x0 + D] = True
    centre = np.array([x0 + D / 2, y0 + D / 2])

    deepmask = _oracle(False)
    deepmask.configure_for_proposals(5, 0.0, 1.0)
    out = deepmask([image])[0]
    assert float(out["scores"][-1]) > 0.95  # the centre cells bright, the others dark
    for window, box, mask in zip(out["windows"], out["boxes"], out["masks"][:, 0]):
        side = float(window[2] - window[0])
        wc = np.array([float(window[0] + window[2]) / 2, float(window[1] + window[3]) / 2])
        # the best windows are centred on the object, to a window stride of their scale...
        assert np.abs(wc - centre).max() <= 16 * side / PATCH
        # ...and the fixed centred square of DeepMask's mask lands centred in each, at 55/96 of its side
        half = side * 55 / 96 / 2
        expected = np.clip([wc[0] - half, wc[1] - half, wc[0] + half, wc[1] + half], 0, [W, H, W, H])
        assert np.allclose(box.numpy(), expected, atol=1.0 + side / PATCH)
        on = mask > 0.5
        x1, y1 = (math.floor(float(v)) for v in box[:2])
        x2, y2 = (math.ceil(float(v)) for v in box[2:])
        # all of the pasted mask inside the box (bilinear upsampling rounds the square's corners off a little)
        assert int(on[y1:y2, x1:x2].sum()) == int(on.sum()) >= 0.95 * (y2 - y1) * (x2 - x1)

    sharpmask = _oracle(True)
    sharpmask.configure_for_proposals(5, 0.0, 1.0)
    out = sharpmask([image])[0]
    top = out["masks"][0, 0] > 0.5
    iou = float((top & truth).sum()) / float((top | truth).sum())
    assert iou > 0.85, iou  # the refined silhouette, gathered from the skip features and pasted back
    assert np.allclose(out["boxes"][0].numpy(), [x0, y0, x0 + D, y0 + D], atol=6)
    # one window stride off in the scaled image would cost far more than the pasting's resampling does
    side = float(out["windows"][0, 2] - out["windows"][0, 0])
    shifted = torch.roll(truth, shifts=round(16 * side / PATCH), dims=1)
    assert float((top & shifted).sum()) / float((top | shifted).sum()) < iou - 0.15


def test_paste_windows_matches_the_window_box():
    masks = torch.ones(2, 8, 8)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [-30.0, -30.0, 10.0, 10.0]])
    out = paste_windows(masks, boxes, 80, 90, chunk=1, out=torch.zeros(2, 80, 90, dtype=torch.float16))
    assert out.dtype == torch.float16
    on = out > 0.5
    assert on[0].nonzero().min(0).values.tolist() == [20, 10] and on[0].nonzero().max(0).values.tolist() == [59, 49]
    assert on[1].nonzero().max(0).values.tolist() == [9, 9] and on[1].nonzero().min(0).values.tolist() == [0, 0]
    # bilinear from a zero border: pixels whose centre is within half a mask cell of the box edge may drop out
    assert 0.97 * (40 * 40 + 10 * 10) <= int(on.sum()) <= 40 * 40 + 10 * 10


def test_paper_network_and_its_trunk_from_a_maskrcnn_backbone():
    """conf/sharpmask/paper.yaml builds the paper's network (ResNet-50 to conv4, 160 px windows, a 10 x 10 code), and
    its ``init.prefix_map`` takes a torchvision ResNet-50-FPN Mask R-CNN's conv1..layer3 onto the whole trunk."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from maskflow.train.init import map_keys, match_state
    from trainers.sharpmask import SharpMaskTrainConfig

    cfg = config.load(SharpMaskTrainConfig, str(ROOT / "conf" / "sharpmask" / "paper.yaml"), ["model.refine=true"])
    model = SharpMask(cfg.model)
    assert cfg.model.code_size == 10 and cfg.model.canonical_size == 92
    out = model(torch.rand(1, 3, 160, 160))
    assert out.mask_logits.shape == (1, 1, 160, 160) and out.coarse_logits.shape == (1, 1, 112, 112)
    source = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    loadable, report = match_state(model.state_dict(), map_keys(source, cfg.init.prefix_map), "maskrcnn")
    trunk = [k for k in model.state_dict() if k.startswith("trunk.")]
    assert sorted(loadable) == sorted(trunk) and not report.shape_mismatch
