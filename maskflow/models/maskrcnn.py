"""Class-agnostic Mask R-CNN (torchvision's own implementation) used as the proposal generator.

DMM-Net generates mask proposals with a class-agnostic Mask R-CNN on a ResNet-50-FPN backbone, keeping every detection
(score threshold 0). :func:`build_maskrcnn` builds exactly that from a :class:`MaskRCNNConfig`: torchvision's
``MaskRCNN`` with two classes (background + object), torchvision's FPN heads (``TwoMLPHead``, ``MaskRCNNHeads``,
``MaskRCNNPredictor``) and ``AnchorGenerator``, on one of three backbones:

* ``resnet50_fpn`` — torchvision's ResNet-50 + FPN (the paper's backbone); can load COCO Mask R-CNN weights
  (``weights``, e.g. ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``): backbone, FPN, RPN and box/mask head features are
  loaded and the class-specific predictors are re-initialised for the class-agnostic head;
* ``resnet18_fpn`` — the same with ResNet-18 (ImageNet weights through ``weights_backbone`` only);
* ``tiny_fpn`` — a small conv-bn-relu backbone (strides 4/8/16/32) + FPN, cheap enough to train from scratch on a CPU.

Every backbone feeds five FPN levels (strides 4, 8, 16, 32 and 64 from ``LastLevelMaxPool``), so ``anchor_sizes``
holds five sizes, one per level.

Helpers convert between the shard schema (:mod:`maskflow.data.schema`) and torchvision:
:func:`targets_from_meta` (``ImageMeta`` → training target), :func:`proposals_from_output` (prediction → the
``proposals.json`` fields ``boxes``/``scores``/``segmentations``) and :func:`image_to_tensor`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from maskflow.config import require
from maskflow.models.maskrcnn_config import (  # noqa: F401  (re-exported: the model's config lives beside it)
    _BACKBONE_WEIGHTS, _DETECTION_WEIGHTS, NUM_FPN_LEVELS, MaskRCNNConfig, resolve_weights)
from ops.masks import decode_masks, encode_masks

NUM_CLASSES = 2  # background + object (class-agnostic)


# --------------------------------------------------------------------------------------------- backbones


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class TinyBackbone(nn.Module):
    """Four conv-bn-relu stages at strides 4/8/16/32 with ``width * (1, 2, 4, 8)`` channels."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv_bn_relu(3, w // 2 or 1, 2), _conv_bn_relu(w // 2 or 1, w, 2))
        self.layer1 = _conv_bn_relu(w, w, 1)  # stride 4
        self.layer2 = nn.Sequential(_conv_bn_relu(w, 2 * w, 2), _conv_bn_relu(2 * w, 2 * w, 1))  # 8
        self.layer3 = nn.Sequential(_conv_bn_relu(2 * w, 4 * w, 2), _conv_bn_relu(4 * w, 4 * w, 1))  # 16
        self.layer4 = nn.Sequential(_conv_bn_relu(4 * w, 8 * w, 2), _conv_bn_relu(8 * w, 8 * w, 1))  # 32
        self.out_channels_list = [w, 2 * w, 4 * w, 8 * w]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # not used by IntermediateLayerGetter; for completeness
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _tiny_fpn(cfg: MaskRCNNConfig) -> nn.Module:
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    body = TinyBackbone(cfg.width)
    return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    return BackboneWithFPN(body, return_layers, body.out_channels_list, cfg.fpn_channels)


def _resnet_fpn(cfg: MaskRCNNConfig, pretrained_detector: bool) -> nn.Module:
    """torchvision's ResNet + FPN (as ``maskrcnn_resnet50_fpn`` builds it), with ``fpn_channels`` FPN channels."""
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import misc as misc_nn_ops

    arch = {"resnet50_fpn": "resnet50", "resnet18_fpn": "resnet18"}[cfg.backbone]
    weights_backbone = None
    if cfg.weights_backbone is not None and not pretrained_detector:
        weights_backbone = resolve_weights(cfg.weights_backbone, _BACKBONE_WEIGHTS[cfg.backbone], "weights_backbone")
    is_trained = pretrained_detector or weights_backbone is not None
    # as torchvision: frozen BN and partly frozen stages with pretrained weights, everything trainable from scratch
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    trainable = cfg.trainable_backbone_layers if is_trained else 5
    body = getattr(resnet, arch)(weights=weights_backbone, norm_layer=norm_layer)
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for name, parameter in body.named_parameters():
        if not name.startswith(tuple(layers_to_train)):
            parameter.requires_grad_(False)
    stage2 = body.inplanes // 8  # 256 for ResNet-50, 64 for ResNet-18
    return_layers = {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)}
    return BackboneWithFPN(body, return_layers, [stage2 * 2 ** (k - 1) for k in (1, 2, 3, 4)], cfg.fpn_channels)


# --------------------------------------------------------------------------------------------- model


def build_maskrcnn(cfg: MaskRCNNConfig):
    """torchvision ``MaskRCNN`` (class-agnostic, ``num_classes=2``) as ``cfg`` describes; downloads ``cfg.weights``
    / ``cfg.weights_backbone`` through torchvision's cache when set."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    cfg.validate()
    pretrained = cfg.weights is not None
    backbone = _tiny_fpn(cfg) if cfg.backbone == "tiny_fpn" else _resnet_fpn(cfg, pretrained)
    anchors = AnchorGenerator(sizes=tuple((int(s),) for s in cfg.anchor_sizes),
                              aspect_ratios=(tuple(float(r) for r in cfg.aspect_ratios),) * NUM_FPN_LEVELS)
    box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation_size)  # 7x7: MaskRCNN's default box RoIAlign
    mask_layers = [cfg.mask_head_channels] * cfg.mask_head_layers
    model = MaskRCNN(
        backbone,
        num_classes=None,  # predictors given explicitly
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(cfg.representation_size, NUM_CLASSES),
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        mask_head=MaskRCNNHeads(cfg.fpn_channels, mask_layers, 1),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_channels, cfg.mask_head_channels, NUM_CLASSES),
    )
    if pretrained:
        _load_detection_weights(model, cfg)
    return model


def _load_detection_weights(model: nn.Module, cfg: MaskRCNNConfig) -> None:
    """Load COCO Mask R-CNN weights into everything but the class-specific predictors (left freshly initialised)."""
    from torchvision.models.detection._utils import overwrite_eps

    enum = resolve_weights(cfg.weights, _DETECTION_WEIGHTS[cfg.backbone], "weights", cfg.backbone)
    state = enum.get_state_dict(progress=True, check_hash=True)
    predictors = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
    state = {k: v for k, v in state.items() if not k.startswith(predictors)}
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    require(not bad, "weights", f"{cfg.weights!r} does not fit this architecture: {bad[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(predictors)]
    require(not missing and not unexpected, "weights",
            f"{cfg.weights!r} does not fit this architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if enum.name == "COCO_V1":  # as torchvision's maskrcnn_resnet50_fpn
        overwrite_eps(model, 0.0)


# --------------------------------------------------------------------------------------------- conversions


def image_to_tensor(image: Any) -> torch.Tensor:
    """uint8 CHW (tensor or array) → float32 CHW in [0, 1], what torchvision detection models take."""
    t = torch.as_tensor(image)
    if t.dtype != torch.uint8:
        raise TypeError(f"image_to_tensor expects uint8 CHW, got {t.dtype}")
    if t.ndim != 3:
        raise ValueError(f"image_to_tensor expects CHW, got shape {tuple(t.shape)}")
    return t.to(torch.float32).div_(255.0)


def targets_from_meta(meta: dict, device: Any = None) -> dict[str, torch.Tensor]:
    """A torchvision Mask R-CNN target from an :class:`~maskflow.data.schema.ImageMeta`: ``boxes`` float32 (N, 4)
    xyxy, ``labels`` int64 ones, ``masks`` uint8 (N, H, W). Crowd regions and boxes with no area are skipped."""
    h, w = int(meta["height"]), int(meta["width"])
    anns = [a for a in meta.get("annotations", ())
            if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)],
                         dtype=torch.float32).reshape(-1, 4)
    try:
        masks = torch.from_numpy(decode_masks([a["segmentation"] for a in anns], h, w))  # one batched call
    except ValueError as e:
        raise ValueError(f"image_id {meta.get('image_id')}: {e}") from None
    target = {"boxes": boxes, "labels": torch.ones(len(anns), dtype=torch.int64), "masks": masks}
    if device is not None:
        target = {k: v.to(device) for k, v in target.items()}
    return target


def proposals_from_output(output: dict, top_k: int, mask_threshold: float = 0.5) -> dict[str, list]:
    """``boxes`` ([x, y, w, h] floats), ``scores`` (descending) and ``segmentations`` (RLE dicts, str counts) of the
    ``top_k`` best detections in one torchvision prediction dict (masks (N, 1, H, W) probabilities, binarised at
    ``> mask_threshold``)."""
    scores = output["scores"].detach().float().cpu()
    order = torch.argsort(scores, descending=True, stable=True)[: max(int(top_k), 0)]
    scores = scores[order]
    boxes = output["boxes"].detach().float().cpu()[order]
    masks = output["masks"].detach()[order.to(output["masks"].device)]  # binarised on its device: 4x less to copy
    if masks.ndim == 4:
        masks = masks[:, 0]
    xywh = torch.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
    segs = encode_masks(masks > mask_threshold)  # one batched pycocotools call over all N masks
    return {"boxes": xywh.reshape(-1, 4).tolist(), "scores": scores.tolist(), "segmentations": segs}
