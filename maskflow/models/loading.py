"""Where proposal-model weights come from: one URI, four kinds.

* ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` / ``runs:/<id>/model`` — the MLflow registry or a run;
* ``s3://.../state.pt`` or a local ``.pt`` file — a trainer checkpoint (``{"model": state_dict, ...}``) or a bare
  state dict, built with the architecture from config;
* a directory (local or s3://) holding ``state.pt`` — a Ray Train checkpoint directory;
* ``torchvision:<WeightsEnum>`` (e.g. ``torchvision:MaskRCNN_ResNet50_FPN_Weights.COCO_V1``) — torchvision's
  COCO-trained 91-class model; its detections are used class-agnostically.

Checkpoints load with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import io
import logging

import torch

from maskflow import storage
from maskflow.config import ConfigError
from maskflow.models.maskrcnn import MaskRCNNConfig, build_maskrcnn
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


def check_model_uri(uri: str | None, key: str = "model.uri") -> str:
    if not uri:
        raise ConfigError(f"{key}: required: models:/name@alias, runs:/id/model, a .pt checkpoint (local or s3://), "
                          "a checkpoint directory, or torchvision:<WeightsEnum>")
    return uri


def resolve_model_uri(uri: str) -> str:
    """``models:/name@alias`` → ``models:/name/<version>`` (the version the alias points to now), so a job's output
    names exactly the weights it used and a later alias move is a different job. Other URIs are returned as they are."""
    if uri.startswith("models:/") and "@" in uri:
        from maskflow import tracking

        name, alias = uri[len("models:/"):].split("@", 1)
        version = tracking.model_version_for_alias(name, alias)
        if version is None:
            raise ConfigError(f"model.uri: registered model {name!r} has no version with alias {alias!r}")
        return f"models:/{name}/{version.version}"
    return uri


def load_state_dict(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> dict:
    if not uri.endswith((".pt", ".pth")):
        uri = storage.join(uri, CHECKPOINT_FILE)
    state = torch.load(io.BytesIO(storage.read_bytes(uri, options)), map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state, dict) and "model" in state else state


def load_maskrcnn(uri: str, arch: MaskRCNNConfig, options: StorageOptions = DEFAULT_OPTIONS,
                  device: str | torch.device = "cpu") -> torch.nn.Module:
    """The proposal model named by ``uri``, in eval mode on ``device``."""
    check_model_uri(uri)
    if uri.startswith(("models:/", "runs:/")):
        import mlflow.pytorch

        model = mlflow.pytorch.load_model(uri, map_location=torch.device(device))
    elif uri.startswith("torchvision:"):
        from torchvision.models import get_weight
        from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

        name = uri[len("torchvision:"):]
        try:
            weights = get_weight(name)
        except (ValueError, KeyError, AttributeError):
            raise ConfigError(f"model.uri: unknown torchvision weights {name!r}") from None
        builder = maskrcnn_resnet50_fpn_v2 if "V2" in type(weights).__name__ else maskrcnn_resnet50_fpn
        model = builder(weights=weights, box_score_thresh=arch.box_score_thresh,
                        box_detections_per_img=arch.box_detections_per_img)
    else:
        model = build_maskrcnn(arch)
        model.load_state_dict(load_state_dict(uri, options))
    return model.to(device).eval()


def configure_for_proposals(model: torch.nn.Module, top_k: int, score_thresh: float, nms_thresh: float) -> None:
    """Test-time settings of a torchvision Mask R-CNN for proposal generation: keep ``top_k`` per image."""
    model.roi_heads.score_thresh = score_thresh
    model.roi_heads.nms_thresh = nms_thresh
    model.roi_heads.detections_per_img = top_k
    # The RPN must hand the box head at least top_k candidates.
    post = model.rpn._post_nms_top_n
    post["testing"] = max(post["testing"], top_k)
    pre = model.rpn._pre_nms_top_n
    pre["testing"] = max(pre["testing"], top_k)
