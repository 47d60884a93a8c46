"""maskflow.models.maskrcnn: config validation, model construction, train/eval forward and schema conversions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskflow.config import ConfigError, build
from maskflow.models import maskrcnn as M
from maskflow.models.maskrcnn import (
    MaskRCNNConfig,
    build_maskrcnn,
    image_to_tensor,
    proposals_from_output,
    targets_from_meta,
)

LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def tiny_cfg(**kw) -> MaskRCNNConfig:
    base = dict(backbone="tiny_fpn", width=8, fpn_channels=16, min_size=64, max_size=64,
                anchor_sizes=[8, 16, 32, 64, 128], representation_size=32, mask_head_channels=8, mask_head_layers=1,
                rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
                rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, box_detections_per_img=30)
    base.update(kw)
    return MaskRCNNConfig(**base)


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


def make_meta(h: int = 48, w: int = 64) -> tuple[dict, list[np.ndarray]]:
    m1 = np.zeros((h, w), bool)
    m1[5:20, 10:30] = True  # box [10, 5, 20, 15]
    m2 = np.zeros((h, w), bool)
    m2[30:45, 40:60] = True
    m2[30:35, 40:45] = False  # not a full rectangle
    crowd = np.zeros((h, w), bool)
    crowd[0:10, 50:64] = True
    anns = [
        {"id": 1, "category_id": 3, "bbox": [10.0, 5.0, 20.0, 15.0], "area": float(m1.sum()), "iscrowd": 0,
         "segmentation": rle(m1)},
        {"id": 2, "category_id": 1, "bbox": [50.0, 0.0, 14.0, 10.0], "area": float(crowd.sum()), "iscrowd": 1,
         "segmentation": rle(crowd)},
        {"id": 3, "category_id": 7, "bbox": [40.0, 30.0, 20.0, 15.0], "area": float(m2.sum()), "iscrowd": 0,
         "segmentation": rle(m2)},
        {"id": 4, "category_id": 7, "bbox": [3.0, 3.0, 0.0, 5.0], "area": 0.0, "iscrowd": 0,  # degenerate
         "segmentation": rle(np.zeros((h, w), bool))},
    ]
    meta = {"image_id": 7, "file_name": "x.png", "height": h, "width": w, "source": "test", "annotations": anns}
    return meta, [m1, m2]


# --------------------------------------------------------------------------------------------- config


def test_defaults_are_valid_and_dmmnet_like():
    cfg = MaskRCNNConfig()
    cfg.validate()
    assert cfg.backbone == "resnet50_fpn" and cfg.weights is None and cfg.weights_backbone is None
    assert cfg.box_score_thresh == 0.0 and cfg.box_detections_per_img == 100


@pytest.mark.parametrize(
    "data, key",
    [
        ({"anchor_sizes": [16, 32, 64]}, "model.anchor_sizes"),
        ({"box_nms_thresh": 0.0}, "model.box_nms_thresh"),
        ({"trainable_backbone_layers": 6}, "model.trainable_backbone_layers"),
        ({"min_size": 256, "max_size": 128}, "model.max_size"),
        ({"width": 0}, "model.width"),
        ({"mask_head_layers": 0}, "model.mask_head_layers"),
        ({"backbone": "vgg16"}, "model.backbone"),
    ],
)
def test_bad_value_raises_config_error_naming_key(data, key):
    with pytest.raises(ConfigError) as e:
        build(MaskRCNNConfig, data, prefix="model.")
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_unknown_weights_name_is_a_clear_error():
    for name in ("MaskRCNN_ResNet50_FPN_Weights.NOPE", "NoSuchWeights.COCO_V1", "NOPE"):
        with pytest.raises(ConfigError, match=r"^weights: unknown torchvision weights"):
            MaskRCNNConfig(weights=name).validate()
    with pytest.raises(ConfigError, match=r"^weights_backbone: unknown torchvision weights"):
        MaskRCNNConfig(weights_backbone="ResNet50_Weights.NOPE").validate()
    with pytest.raises(ConfigError, match=r"^weights: .*tiny_fpn"):  # no detection weights for the tiny backbone
        tiny_cfg(weights="DEFAULT").validate()
    with pytest.raises(ConfigError, match=r"^weights: .*does not fit backbone"):
        MaskRCNNConfig(weights="ResNet50_Weights.DEFAULT").validate()
    with pytest.raises(ConfigError, match=r"^representation_size: must be 1024"):  # COCO weights need the paper heads
        MaskRCNNConfig(weights="DEFAULT", representation_size=256).validate()
    with pytest.raises(ConfigError, match=r"^weights_backbone: "):
        build_maskrcnn(tiny_cfg(weights_backbone="DEFAULT"))


def test_known_weights_names_resolve_without_download():
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    assert M.resolve_weights("DEFAULT", "MaskRCNN_ResNet50_FPN_Weights") == MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    MaskRCNNConfig(weights="MaskRCNN_ResNet50_FPN_Weights.COCO_V1").validate()
    MaskRCNNConfig(backbone="resnet18_fpn", weights_backbone="DEFAULT").validate()


# --------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("backbone", ["resnet50_fpn", "resnet18_fpn", "tiny_fpn"])
def test_each_backbone_builds_class_agnostic_torchvision_maskrcnn(backbone):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

    cfg = MaskRCNNConfig(backbone=backbone, fpn_channels=64 if backbone != "resnet50_fpn" else 256)
    model = build_maskrcnn(cfg)
    assert isinstance(model, MaskRCNN)
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 2
    assert isinstance(model.roi_heads.mask_head, MaskRCNNHeads)
    assert model.backbone.out_channels == cfg.fpn_channels
    assert model.roi_heads.score_thresh == 0.0 and model.roi_heads.detections_per_img == 100
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    if backbone != "tiny_fpn":  # from scratch: everything trainable, plain BatchNorm (as torchvision)
        assert all(p.requires_grad for p in model.backbone.parameters())
        assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)
        assert model.backbone.fpn.inner_blocks[-1][0].in_channels == (2048 if backbone == "resnet50_fpn" else 512)


def test_pretrained_weights_load_everything_but_predictors(monkeypatch):
    """The weight-loading path, offline: the enum's download is replaced by a state dict of the same architecture."""
    import torchvision
    from torchvision.models._api import WeightsEnum
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(1)
    coco = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    state = {k: v for k, v in coco.state_dict().items() if "num_batches_tracked" not in k}
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(str(self))
        return state

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    model = build_maskrcnn(MaskRCNNConfig(weights="DEFAULT", trainable_backbone_layers=2))
    assert calls == ["MaskRCNN_ResNet50_FPN_Weights.COCO_V1"]
    own = model.state_dict()
    for key in ("backbone.body.layer3.0.conv1.weight", "backbone.fpn.layer_blocks.0.0.weight",
                "rpn.head.cls_logits.weight", "roi_heads.box_head.fc7.weight", "roi_heads.mask_head.0.0.weight",
                "roi_heads.mask_predictor.conv5_mask.weight"):
        assert torch.equal(own[key], state[key]), key
    assert own["roi_heads.box_predictor.cls_score.weight"].shape == (2, 1024)  # re-initialised, class-agnostic
    assert own["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 2
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}

    resnet18_state = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: resnet18_state)
    model = build_maskrcnn(MaskRCNNConfig(backbone="resnet18_fpn", fpn_channels=64, weights_backbone="DEFAULT",
                                          trainable_backbone_layers=0))
    assert not any(p.requires_grad for p in model.backbone.body.parameters())
    assert torch.equal(model.backbone.body.conv1.weight, resnet18_state["conv1.weight"])


def test_tiny_backbone_feature_strides():
    model = build_maskrcnn(tiny_cfg(width=4, fpn_channels=8))
    feats = model.backbone(torch.zeros(1, 3, 64, 128))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)]
    assert all(f.shape[1] == 8 for f in feats.values())


def _train_batch():
    meta, _ = make_meta()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 48, 64, generator=g), torch.rand(3, 48, 64, generator=g)]
    return images, [targets_from_meta(meta), targets_from_meta(meta)]


def test_tiny_train_forward_returns_five_finite_losses_and_backprops():
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_cfg())
    model.train()
    images, targets = _train_batch()
    losses = model(images, targets)
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)


def test_eval_output_to_proposals():
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_cfg())
    model.eval()
    images, _ = _train_batch()
    with torch.no_grad():
        outputs = model(images)
    out = outputs[0]
    assert out["masks"].shape[1:] == (1, 48, 64) and len(out["scores"]) > 10  # score threshold 0 keeps plenty
    for top_k in (5, 1000):
        props = proposals_from_output(out, top_k=top_k)
        n = min(top_k, len(out["scores"]))
        assert len(props["boxes"]) == len(props["scores"]) == len(props["segmentations"]) == n
        assert props["scores"] == sorted(props["scores"], reverse=True)
        assert all(isinstance(s, float) for s in props["scores"])
        for box in props["boxes"]:
            assert len(box) == 4 and box[2] >= 0 and box[3] >= 0
        for seg in props["segmentations"]:
            assert seg["size"] == [48, 64] and isinstance(seg["counts"], str)
        with warnings.catch_warnings():  # pycocotools' Masks.__array__ predates numpy 2's copy keyword (ops/masks.py)
            warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
            decoded = mask_utils.decode(props["segmentations"])
        assert decoded.shape == (48, 64, n)
        best = int(torch.argmax(out["scores"]))
        np.testing.assert_array_equal(decoded[:, :, 0], (out["masks"][best, 0] > 0.5).numpy())


def test_proposals_from_output_sorts_thresholds_and_truncates():
    h, w = 10, 12
    probs = torch.zeros(3, 1, h, w)
    probs[0, 0, 1:4, 1:5] = 0.9
    probs[1, 0, 5:9, 6:11] = 0.6
    probs[1, 0, 0, 0] = 0.5  # not > 0.5
    probs[2, 0, 2:3, 2:3] = 0.7
    out = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 4.0], [6.0, 5.0, 11.0, 9.0], [2.0, 2.0, 3.0, 3.0]]),
           "scores": torch.tensor([0.2, 0.9, 0.5]), "labels": torch.ones(3, dtype=torch.int64), "masks": probs}
    props = proposals_from_output(out, top_k=2)
    assert props["scores"] == pytest.approx([0.9, 0.5])
    assert props["boxes"] == [[6.0, 5.0, 5.0, 4.0], [2.0, 2.0, 1.0, 1.0]]
    areas = mask_utils.area(props["segmentations"]).tolist()
    assert areas == [20, 1]
    assert mask_utils.toBbox(props["segmentations"][0]).tolist() == [6.0, 5.0, 5.0, 4.0]
    assert proposals_from_output(out, top_k=2, mask_threshold=0.95)["segmentations"][0]["counts"] == \
        rle(np.zeros((h, w), bool))["counts"]
    empty = {k: v[:0] for k, v in out.items()}
    assert proposals_from_output(empty, top_k=10) == {"boxes": [], "scores": [], "segmentations": []}


# --------------------------------------------------------------------------------------------- conversions


def test_targets_from_meta_round_trip():
    meta, masks = make_meta()
    t = targets_from_meta(meta)
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.uint8
    assert t["boxes"].tolist() == [[10.0, 5.0, 30.0, 20.0], [40.0, 30.0, 60.0, 45.0]]  # crowd + degenerate skipped
    assert t["labels"].tolist() == [1, 1]
    assert t["masks"].shape == (2, 48, 64)
    for got, want in zip(t["masks"].numpy(), masks):
        np.testing.assert_array_equal(got.astype(bool), want)
    # back to the schema: the masks re-encode to the same RLE strings
    assert [rle(m.numpy()) for m in t["masks"]] == [meta["annotations"][0]["segmentation"],
                                                    meta["annotations"][2]["segmentation"]]


def test_targets_from_meta_empty_and_size_mismatch():
    meta = {"image_id": 1, "file_name": "e.png", "height": 20, "width": 30, "source": "t", "annotations": []}
    t = targets_from_meta(meta, device="cpu")
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 20, 30)
    bad, _ = make_meta()
    bad["height"] = 50
    with pytest.raises(ValueError, match="size"):
        targets_from_meta(bad)


def test_image_to_tensor():
    img = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8).expand(3, 2, 2)
    x = image_to_tensor(img)
    assert x.dtype == torch.float32 and x.shape == (3, 2, 2)
    np.testing.assert_allclose(x[0].numpy(), [[0.0, 1.0], [0.2, 0.4]], rtol=1e-6)
    assert image_to_tensor(np.zeros((3, 4, 5), np.uint8)).shape == (3, 4, 5)
    with pytest.raises(TypeError):
        image_to_tensor(torch.zeros(3, 2, 2))
