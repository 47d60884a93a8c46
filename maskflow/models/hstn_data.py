"""What the HSTN networks (:mod:`maskflow.models.hstn`) eat: shard entries decoded into tensors, shared by the
trainer plugins (``trainers/hstn.py``) and the inference stages (:mod:`maskflow.stages.hstn_predict`).

* Cluttered digits (``cluttered_digit/1``): the canvas as ``(1, S, S)`` float in [0, 1], the label from the meta.
* Pairs (``pair/1``): source and target resized to ``S x S`` (bilinear, ``align_corners=True``, antialiased), the
  ground-truth ``flow_t2s`` resampled onto that grid and rescaled per axis by ``(S - 1) / (W - 1)`` and
  ``(S - 1) / (H - 1)`` (:func:`maskflow.models.hstn.resize_flow`), and kept at full resolution for evaluation.

Every image goes through :func:`maskflow.data.validate.decode_image` (checksums verified, damage is a
``ValueError`` that a stage turns into a reject).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from maskflow.data import schema

if TYPE_CHECKING:
    import torch

__all__ = ["DIGIT_IMAGE", "PAIR_SOURCE", "PAIR_TARGET", "PAIR_FLOW_T2S", "PAIR_META", "decode_digit",
           "digit_batch", "decode_pair", "pair_batch", "upsample_flows"]

# the entries read (see the stages' schemas: cluttered_digit/1 and pair/1)
DIGIT_IMAGE = "image.png"
PAIR_SOURCE, PAIR_TARGET, PAIR_FLOW_T2S, PAIR_META = "source.png", "target.png", "flow_t2s.npy", "pair.json"


def decode_digit(image_png: bytes, image_size: int) -> "torch.Tensor":
    """A cluttered-digit canvas -> ``(1, S, S)`` float in [0, 1]; ``ValueError`` if damaged or not ``S x S``."""
    from maskflow.data.validate import decode_image

    canvas = decode_image(bytes(image_png))[:1]  # grey PNG, decoded as RGB with equal channels
    if tuple(canvas.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"cluttered digit canvas is {canvas.shape[-2]}x{canvas.shape[-1]}, the model takes "
                         f"{image_size}x{image_size} (model.image_size)")
    return canvas.float().div_(255.0)


def digit_batch(images: Iterable, metas: Iterable, image_size: int) -> dict:
    """Raw ``image.png`` / ``json`` entries -> ``{"image": (N, 1, S, S) float, "label": (N,) int64}``."""
    import torch

    pixels = torch.stack([decode_digit(b, image_size) for b in images])
    labels = torch.tensor([int(schema.decode_value(m, "json")["label"]) for m in metas], dtype=torch.int64)
    return {"image": pixels, "label": labels}


def decode_pair(source_png: bytes, target_png: bytes, flow_npy: bytes, image_size: int) -> dict:
    """One ``pair/1`` sample -> ``source``, ``target`` (3, S, S) float in [0, 1], ``flow_t2s`` (2, S, S) on that
    grid (pixels), ``flow_t2s_full`` (2, H, W) as stored, ``size`` ``(H, W)``. ``ValueError`` if damaged or if the
    entries' sizes disagree."""
    import torch

    from maskflow.data.validate import decode_image
    from maskflow.models.hstn import resize_flow, resize_images

    source, target = decode_image(bytes(source_png)), decode_image(bytes(target_png))  # (3, H, W) uint8
    try:
        flow = torch.from_numpy(schema.load_npy(bytes(flow_npy))).float()
    except ValueError as e:
        raise ValueError(f"unreadable flow_t2s.npy: {e}") from None
    height, width = int(source.shape[-2]), int(source.shape[-1])
    if target.shape != source.shape or tuple(flow.shape) != (2, height, width):
        raise ValueError(f"pair sizes disagree: source {tuple(source.shape)}, target {tuple(target.shape)}, "
                         f"flow_t2s {tuple(flow.shape)}")
    images = resize_images(torch.stack((source, target)).float().div_(255.0), image_size, image_size)
    return {"source": images[0], "target": images[1],
            "flow_t2s": resize_flow(flow.unsqueeze(0), image_size, image_size)[0],
            "flow_t2s_full": flow, "size": (height, width)}


def pair_batch(pairs: list[dict]) -> dict:
    """Decoded pairs (:func:`decode_pair`) -> the model batch: ``source``, ``target`` (N, 3, S, S); ``flow_t2s``
    (N, 2, S, S); ``valid`` (N, 1, S, S) the target's valid region on that grid (``ops.warp.valid_mask`` of the
    ground truth: the pixels the pair stage filled from the source; black by construction elsewhere);
    ``flow_t2s_full`` a list of (2, H, W); ``sizes`` a list of ``(H, W)``."""
    import torch

    from ops.warp import valid_mask

    flow = torch.stack([p["flow_t2s"] for p in pairs])
    return {"source": torch.stack([p["source"] for p in pairs]), "target": torch.stack([p["target"] for p in pairs]),
            "flow_t2s": flow, "valid": valid_mask(flow), "flow_t2s_full": [p["flow_t2s_full"] for p in pairs],
            "sizes": [p["size"] for p in pairs]}


def upsample_flows(flows: "torch.Tensor", sizes: list[tuple[int, int]]) -> list["torch.Tensor"]:
    """(N, 2, S, S) flows -> each on its pair's ``(H, W)`` grid, in that grid's pixels: a list of (2, H, W)."""
    from maskflow.models.hstn import resize_flow

    return [resize_flow(f.unsqueeze(0), h, w)[0] for f, (h, w) in zip(flows, sizes)]
