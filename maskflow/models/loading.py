"""Where proposal-model weights come from: one URI, four kinds (of source; the *model* kinds a proposals job takes
are :data:`PROPOSAL_KINDS`: Mask R-CNN from any of these sources, SharpMask from the registry or a run).

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
import os
from typing import TYPE_CHECKING

from maskflow import storage
from maskflow.config import ConfigError
from maskflow.models.maskrcnn_config import MaskRCNNConfig
from maskflow.storage import DEFAULT_OPTIONS, StorageError, StorageOptions

if TYPE_CHECKING:  # torch loads only where a model is built (workers), not when a driver checks its config
    import torch

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
REGISTRY_SCHEMES = ("models:/", "runs:/")
# The kinds of model the proposals job runs (maskflow.models.kinds): a registered SharpMask is a pickled module that
# answers the same call as torchvision's Mask R-CNN, so one job serves both.
PROPOSAL_KINDS = ("maskrcnn", "sharpmask")


def check_model_uri(uri: str | None, key: str = "model.uri") -> str:
    if not uri:
        raise ConfigError(f"{key}: required: models:/name@alias, runs:/id/model, a .pt checkpoint (local or s3://), "
                          "a checkpoint directory, or torchvision:<WeightsEnum>")
    return uri


def resolve_model_uri(uri: str, key: str = "model.uri", options: StorageOptions = DEFAULT_OPTIONS,
                      expected_kinds: tuple[str, ...] | None = None) -> str:
    """Check on the driver, before Ray starts, that the weights ``uri`` names exist, and pin it: ``models:/name@alias``
    becomes ``models:/name/<version>`` (the version the alias points to now), so a job's output names exactly the
    weights it used and a later alias move is a different job. Each problem is one :class:`ConfigError` naming ``key``:

    * ``models:/name@alias`` — the alias exists; ``models:/name/N`` — version N exists; ``runs:/id/path`` — the run
      exists and holds a model at ``path`` (its ``MLmodel`` file is read, nothing else);
    * ``torchvision:<Enum.MEMBER>`` — the weights enum exists (nothing is downloaded here);
    * a checkpoint file or directory (local or ``s3://``) — it exists and can be read.

    With ``expected_kinds``, a registered version must be of one of those kinds (its ``maskflow.kind`` tag, see
    :mod:`maskflow.models.kinds`): ``model.uri: models:/x/3 is a 'hstn' model; this job needs 'maskrcnn'``. Versions
    registered before kinds existed (no tag), runs, checkpoints and torchvision weights carry no kind and pass.

    The tracking URI must already be set (``mlflow.set_tracking_uri``) for registry URIs."""
    check_model_uri(uri, key)
    if uri.startswith(REGISTRY_SCHEMES):
        pinned = _resolve_registry_uri(uri, key)
        if expected_kinds is not None and pinned.startswith("models:/"):
            check_model_kind(pinned, expected_kinds, key, given=uri)
        return pinned
    if uri.startswith("torchvision:"):
        from maskflow.models.maskrcnn_config import resolve_weights

        name = uri[len("torchvision:"):]
        if "." not in name:
            raise ConfigError(f"{key}: torchvision weights are named <Enum>.<MEMBER>, e.g. "
                              f"torchvision:MaskRCNN_ResNet50_FPN_Weights.COCO_V1; got {name!r}")
        resolve_weights(name, None, key)
        return uri
    target = uri if uri.endswith((".pt", ".pth")) else storage.join(uri, CHECKPOINT_FILE)
    try:
        storage.check_uri(target, for_write=False, options=options, what=key)
    except StorageError as e:
        raise ConfigError(f"{e} (a checkpoint: a .pt file or a directory holding {CHECKPOINT_FILE})") from None
    return uri


def registered_version(pinned: str) -> tuple[str, str]:
    """``(name, version)`` of a pinned registry URI ``models:/<name>/<version>`` (what :func:`resolve_model_uri`
    returns for ``models:/`` URIs)."""
    name, _, version = pinned[len("models:/"):].rpartition("/")
    if not pinned.startswith("models:/") or not name or not version.isdigit():
        raise ValueError(f"{pinned!r} is not a pinned registry URI models:/<name>/<version>")
    return name, version


def check_model_kind(pinned: str, expected_kinds: tuple[str, ...], key: str = "model.uri",
                     given: str | None = None) -> str | None:
    """The kind of the registered version ``models:/<name>/<version>``; a :class:`ConfigError` naming ``key`` when it
    is recorded and not one of ``expected_kinds`` (a version without a kind passes: returns None). ``given``: the URI
    as the user wrote it (an alias), shown beside the version it resolved to."""
    from maskflow import tracking

    name, version = registered_version(pinned)
    found = tracking.model_kind(name, version)
    if found is not None and found not in expected_kinds:
        shown = pinned if given in (None, pinned) else f"{given} (version {version})"
        needed = " or ".join(repr(k) for k in expected_kinds)
        raise ConfigError(f"{key}: {shown} is a {found!r} model; this job needs {needed}")
    return found


def _resolve_registry_uri(uri: str, key: str) -> str:
    from mlflow.exceptions import MlflowException

    from maskflow import tracking

    if uri.startswith("models:/"):
        ref = uri[len("models:/"):]
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = tracking.model_version_for_alias(name, alias)
            if version is None:
                raise ConfigError(f"{key}: registered model {name!r} has no version with alias {alias!r}")
            return f"models:/{name}/{version.version}"
        name, _, version = ref.partition("/")
        if not name or not version.isdigit():
            raise ConfigError(f"{key}: {uri!r} names no version: use models:/<name>/<version> or models:/<name>@<alias>")
        try:
            tracking.client().get_model_version(name, version)
        except MlflowException:
            raise ConfigError(f"{key}: registered model {name!r} has no version {version} "
                              f"(latest: {tracking.latest_version(name) or 'none'})") from None
        return uri
    run_id, _, path = uri[len("runs:/"):].partition("/")
    try:
        tracking.client().get_run(run_id)
    except MlflowException:
        raise ConfigError(f"{key}: no MLflow run {run_id!r} in the tracking store (check tracking.tracking_uri)") from None
    from mlflow.models import get_model_info

    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # one small file: no progress bar for it
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        get_model_info(uri)
    except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing model; all mean the same here
        raise ConfigError(f"{key}: run {run_id} holds no logged model at {path or '<empty path>'!r}") from None
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return uri


def load_state_dict(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> dict:
    if not uri.endswith((".pt", ".pth")):
        uri = storage.join(uri, CHECKPOINT_FILE)
    import torch

    state = torch.load(io.BytesIO(storage.read_bytes(uri, options)), map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state, dict) and "model" in state else state


def load_registered_module(uri: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A model logged with ``mlflow.pytorch`` (a pickled module: it carries its own architecture), on ``device``."""
    import mlflow.pytorch
    import torch

    return mlflow.pytorch.load_model(uri, map_location=torch.device(device))


def load_proposal_model(uri: str, arch: MaskRCNNConfig, options: StorageOptions = DEFAULT_OPTIONS,
                        device: str | torch.device = "cpu") -> torch.nn.Module:
    """The proposal generator named by ``uri``, in eval mode on ``device``: called with a list of CHW float images in
    [0, 1] it returns torchvision detection dicts (``boxes``, ``scores``, ``masks``). A registered model or a run's
    model is the logged module, whatever its kind (Mask R-CNN or SharpMask: both answer that call); a checkpoint or
    torchvision weights are a Mask R-CNN built from ``arch``."""
    from maskflow.models.maskrcnn import build_maskrcnn

    check_model_uri(uri)
    if uri.startswith(REGISTRY_SCHEMES):
        model = load_registered_module(uri, device)
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


MASKRCNN_PROPOSAL_NMS = 0.5  # box NMS of Mask R-CNN's detections when the job leaves nms_thresh unset


def configure_for_proposals(model: torch.nn.Module, top_k: int, score_thresh: float, nms_thresh: float | None) -> None:
    """Test-time settings of a proposal generator: keep ``top_k`` per image. ``nms_thresh`` None: the generator's
    own default (Mask R-CNN: 0.5; SharpMask: none, as the paper). A generator other than torchvision's Mask R-CNN
    (SharpMask) brings its own ``configure_for_proposals`` method."""
    if hasattr(model, "configure_for_proposals"):
        model.configure_for_proposals(top_k, score_thresh, nms_thresh)
        return
    nms_thresh = MASKRCNN_PROPOSAL_NMS if nms_thresh is None else nms_thresh
    model.roi_heads.score_thresh = score_thresh
    model.roi_heads.nms_thresh = nms_thresh
    model.roi_heads.detections_per_img = top_k
    # The RPN must hand the box head at least top_k candidates.
    post = model.rpn._post_nms_top_n
    post["testing"] = max(post["testing"], top_k)
    pre = model.rpn._pre_nms_top_n
    pre["testing"] = max(pre["testing"], top_k)
