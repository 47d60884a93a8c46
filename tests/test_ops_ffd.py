"""ops.ffd: B-spline FFD warping and dual mask feature pooling (FFD-Net sec. 3.1-3.3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from maskflow.models.ffdnet_config import FFDConfig
from ops.ffd import (
    bspline_weights,
    crop_resize,
    dual_mask_pooling,
    enlarge_boxes,
    ffd_displacement,
    ffd_displacement_naive,
    ffd_grid,
    ffd_warp,
    mask_boxes,
    paste_crops,
    weighted_roi_pool,
)
from ops.masks import decode_masks, encode_masks, rle_boxes

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def ped_mask() -> torch.Tensor:
    """One real instance mask (Penn-Fudan FudanPed00001, instance 1), downsampled 2x to keep tests quick: (H, W)."""
    from tests.conftest import require_shared_data
    from PIL import Image

    path = require_shared_data(SHARED_DATA / "penn_fudan_ped" / "PedMasks") / "FudanPed00001_mask.png"
    arr = np.asarray(Image.open(path))[::2, ::2] == 1
    assert arr.sum() > 500
    # round-trip through the project's RLE utilities (the form masks travel in)
    arr = decode_masks(encode_masks(arr[None]))[0]
    return torch.from_numpy(arr.astype(np.float32))


# --------------------------------------------------------------------------------------------- B-splines


@pytest.mark.parametrize("out_size,mesh", [(1, 4), (7, 13), (128, 13), (300, 5), (13, 13)])
def test_bspline_partition_of_unity_and_nonnegative(out_size, mesh):
    w = bspline_weights(out_size, mesh, dtype=torch.float64)
    assert w.shape == (out_size, mesh)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(out_size, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (w >= 0).all()
    assert ((w > 0).sum(dim=1) <= 4).all()  # local support: at most 4 control points per pixel
    assert bspline_weights(out_size, mesh, dtype=torch.float64) is w  # cached


def test_bspline_weights_reproduce_linear_functions():
    # cubic B-splines reproduce linear functions: control points on a line give that line at pixel centres
    out, m = 50, 13
    w = bspline_weights(out, m, dtype=torch.float64)
    delta = out / (m - 3)
    ctrl = (torch.arange(m, dtype=torch.float64) - 1) * delta  # control point k at pixel coordinate (k-1)*delta
    torch.testing.assert_close(w @ ctrl, torch.arange(out, dtype=torch.float64) + 0.5, atol=1e-9, rtol=0)


def test_bspline_rejects_small_mesh():
    with pytest.raises(ValueError):
        bspline_weights(10, 3)


# --------------------------------------------------------------------------------------------- displacement / warp


def test_fast_matches_naive_displacement():
    g = torch.Generator().manual_seed(0)
    off = torch.randn(4, 2, 13, 11, generator=g) * 0.1
    fast = ffd_displacement(off, (61, 47))
    for method in ("eq1", "loop"):
        naive = ffd_displacement_naive(off, (61, 47), method=method)
        assert fast.shape == naive.shape == (4, 2, 61, 47)
        torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)


def test_displacement_scale_units():
    off = torch.randn(3, 2, 13, 13, dtype=torch.float64)
    base = ffd_displacement(off, (20, 30))
    px = ffd_displacement(off, (20, 30), scale=(30, 20))  # (sx, sy) = (W, H): pixels
    torch.testing.assert_close(px[:, 0], base[:, 0] * 30)
    torch.testing.assert_close(px[:, 1], base[:, 1] * 20)
    per = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    torch.testing.assert_close(ffd_displacement(off, (20, 30), scale=per), base * per[:, :, None, None])


def test_zero_offsets_identity_warp_on_real_mask(ped_mask):
    m = ped_mask[None, None]
    for dtype in (torch.float32, torch.float64):
        out = ffd_warp(m.to(dtype), torch.zeros(1, 2, 13, 13, dtype=dtype))
        assert out.dtype == dtype
        # exact up to rounding of the normalised pixel-centre coordinates (|g| <= 1, unnormalised by size / 2):
        # a sample lands within ~eps * size / 2 pixels of its centre, so a 0/1 mask is off by at most that
        bound = torch.finfo(dtype).eps * max(m.shape[-2:])
        err = (out - m.to(dtype)).abs().max().item()
        assert err <= bound, (dtype, err, bound)


@pytest.mark.parametrize("shift", [(3, 0), (0, -5), (4, 7)])
def test_constant_offsets_translate(ped_mask, shift):
    sx, sy = shift
    h, w = ped_mask.shape
    m = ped_mask[None, None].repeat(2, 1, 1, 1)
    off = torch.zeros(2, 2, 13, 13)
    off[:, 0] = sx / w  # normalised by the mask size: sx pixels
    off[:, 1] = sy / h
    out = ffd_warp(m, off)
    # backward warp: output(x, y) = input(x + sx, y + sy)  ==  roll by (-sy, -sx)
    ref = torch.roll(m, shifts=(-sy, -sx), dims=(2, 3))
    b = 8  # interior: away from the wrapped border
    torch.testing.assert_close(out[..., b:-b, b:-b], ref[..., b:-b, b:-b], atol=1e-4, rtol=0)
    assert ref[..., b:-b, b:-b].sum() > 100  # the comparison covers the object


def test_warp_is_batched_per_sample():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 24, 20, generator=g)
    off = torch.randn(3, 2, 13, 13, generator=g) * 0.05
    full = ffd_warp(x, off)
    for i in range(3):
        torch.testing.assert_close(full[i : i + 1], ffd_warp(x[i : i + 1], off[i : i + 1]))
    torch.testing.assert_close(full, ffd_warp(x, off, naive=True), atol=1e-5, rtol=0)
    grid = ffd_grid(off, (24, 20))
    assert grid.shape == (3, 24, 20, 2)
    assert ffd_warp(x, off, out_hw=(48, 40)).shape == (3, 2, 48, 40)


def test_warp_direction_positive_dx_moves_content_left():
    m = torch.zeros(1, 1, 16, 40)
    m[..., 20:25] = 1
    off = torch.zeros(1, 2, 13, 13)
    off[:, 0] = 5 / 40  # fetch from 5 px to the right
    out = ffd_warp(m, off)
    torch.testing.assert_close(out[0, 0, 8, 15:20], torch.ones(5), atol=1e-4, rtol=0)
    assert out[0, 0, 8, 20:25].abs().max() < 1e-4


def test_gradcheck_displacement_and_warp():
    g = torch.Generator().manual_seed(2)
    off = (torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64) * 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda o: ffd_displacement(o, (7, 6), scale=(6.0, 7.0)), (off,))
    img = torch.rand(2, 1, 7, 6, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, o: ffd_warp(x, o), (img, off))


# --------------------------------------------------------------------------------------------- pooling


def test_mask_boxes_match_rle_boxes(ped_mask):
    boxes = mask_boxes(ped_mask[None])
    x, y, w, h = rle_boxes(encode_masks(ped_mask[None].numpy().astype(bool)))[0]
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, x, y, x + w, y + h], dtype=torch.float32))


def test_weighted_pool_full_mask_is_roi_align_and_empty_is_zero(ped_mask):
    g = torch.Generator().manual_seed(3)
    h, w = ped_mask.shape
    feats = torch.randn(2, 4, h // 4, w // 4, generator=g)
    box = mask_boxes(ped_mask[None])
    boxes = torch.cat([box, box + torch.tensor([1.0, -3.0, 2.0, -3.0, 2.0])])  # second on image 1
    plain = roi_align(feats, boxes, (7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=True)
    full = torch.ones(2, h, w)
    torch.testing.assert_close(weighted_roi_pool(feats, boxes, full, 7, 0.25), plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(weighted_roi_pool(feats, boxes, torch.ones(2, 5, 3), 7, 0.25, mask_frame="box"),
                               plain, atol=1e-6, rtol=0)
    empty = weighted_roi_pool(feats, boxes, torch.zeros(2, h, w), 7, 0.25)
    assert empty.shape == (2, 4, 7, 7) and empty.abs().max() == 0
    # a real mask: cells are scaled by their coverage in [0, 1], some partly covered
    real = weighted_roi_pool(feats, boxes[:1], ped_mask[None], 7, 0.25)
    ratio = (real / plain[:1])[plain[:1].abs() > 1e-3]
    assert ratio.min() >= -1e-6 and ratio.max() <= 1 + 1e-5
    assert ((ratio > 0.05) & (ratio < 0.95)).any() and (ratio > 0.99).any()


def test_weighted_pool_box_frame_matches_image_frame():
    # a box-local mask equals the same mask pasted into the image at the box
    feats = torch.randn(1, 3, 16, 16)
    full = torch.zeros(1, 64, 64)
    full[0, 10:42, 20:36] = 1
    full[0, 10:26, 20:28] = 0  # an L shape
    boxes = torch.tensor([[0.0, 20.0, 10.0, 36.0, 42.0]])
    local = full[:, 10:42, 20:36]
    a = weighted_roi_pool(feats, boxes, full, 8, 0.25)
    b = weighted_roi_pool(feats, boxes, local, 8, 0.25, mask_frame="box")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_gradcheck_weighted_roi_pool():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64).requires_grad_()
    boxes = torch.tensor([[0, 2.0, 3.0, 25.0, 20.0], [1, 5.0, 1.0, 30.0, 28.0]], dtype=torch.float64)
    masks = (torch.rand(2, 32, 32, generator=g) > 0.4).float()
    assert torch.autograd.gradcheck(lambda f: weighted_roi_pool(f, boxes, masks, 4, 0.25), (feats,))


def test_dual_pooling_shapes_two_levels_two_grids(ped_mask):
    h, w = ped_mask.shape
    levels = [torch.randn(2, 3, h // 4, w // 4), torch.randn(2, 5, h // 8, w // 8)]
    box = mask_boxes(ped_mask[None])
    boxes = torch.cat([box, box + torch.tensor([1.0, 0, 0, 0, 0])])
    masks = ped_mask[None].repeat(2, 1, 1)
    pieces = dual_mask_pooling(levels, [0.25, 0.125], boxes, masks, grid_sizes=(30, 20), flatten=False)
    assert [tuple(p.shape) for p in pieces] == [(2, 6, 30, 30), (2, 6, 20, 20), (2, 10, 30, 30), (2, 10, 20, 20)]
    flat = dual_mask_pooling(levels, [0.25, 0.125], boxes, masks, grid_sizes=(30, 20))
    assert flat.shape == (2, 2 * 3 * (900 + 400) + 2 * 5 * (900 + 400))
    torch.testing.assert_close(flat, torch.cat([p.flatten(1) for p in pieces], 1))
    # channel layout: [tight weighted | context], context is roi_align in the 1.6x box
    ctx = roi_align(levels[1], enlarge_boxes(boxes, 1.6), (20, 20), spatial_scale=0.125, sampling_ratio=2,
                    aligned=True)
    torch.testing.assert_close(pieces[3][:, 5:], ctx)
    torch.testing.assert_close(pieces[3][:, :5], weighted_roi_pool(levels[1], boxes, masks, 20, 0.125))
    # the paper's per-level grids
    per = dual_mask_pooling(levels, [0.25, 0.125], boxes, masks, grid_sizes=[[30], [20]], flatten=False)
    assert [tuple(p.shape) for p in per] == [(2, 6, 30, 30), (2, 10, 20, 20)]


def test_enlarge_boxes_keeps_centre():
    b = torch.tensor([[1.0, 10.0, 20.0, 30.0, 60.0]])
    torch.testing.assert_close(enlarge_boxes(b, 1.6), torch.tensor([[1.0, 4.0, 8.0, 36.0, 72.0]]))


def test_config_validation():
    import subprocess
    import sys

    from maskflow import config

    assert FFDConfig().mesh_size == 13 and FFDConfig().grid_sizes == [30, 20]
    with pytest.raises(config.ConfigError, match=r"^mesh_size: needs >= 4"):
        config.build(FFDConfig, {"mesh_size": 3})
    with pytest.raises(config.ConfigError, match=r"^context:"):
        config.build(FFDConfig, {"context": 0.9})
    # the config block loads without torch (a config error must print before torch loads)
    probe = "import sys, maskflow.models.ffdnet_config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1]).returncode == 0


def test_ops_reject_bad_settings_with_value_error(ped_mask):
    h, w = ped_mask.shape
    levels, boxes, masks = [torch.randn(1, 3, h // 4, w // 4)], mask_boxes(ped_mask[None]), ped_mask[None]
    for bad, match in (({"context": 0.5}, "context"), ({"sampling_ratio": 0}, "sampling_ratio"),
                       ({"grid_sizes": (30, 0)}, "grid sizes")):
        with pytest.raises(ValueError, match=match):
            dual_mask_pooling(levels, [0.25], boxes, masks, **bad)
    with pytest.raises(ValueError, match="mesh_size"):
        ffd_warp(masks[None], torch.zeros(1, 2, 3, 3))


# --------------------------------------------------------------------------------------------- crops


def test_crop_resize_and_paste_back_on_real_mask(ped_mask):
    h, w = ped_mask.shape
    planes = torch.stack([ped_mask, 1 - ped_mask])[:, None]  # (2, 1, H, W): two planes, picked by box row
    whole = torch.tensor([[1.0, 0.0, 0.0, w, h]])
    # a box over the whole plane at the plane's own size samples every pixel centre exactly: the identity
    torch.testing.assert_close(crop_resize(planes, whole, (h, w))[0], planes[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(paste_crops(planes[1], whole, h, w), planes[1], atol=1e-4, rtol=0)  # float32 grid
    # FFD-Net's training crop: the tight box enlarged 1.6x, 64 x 64; pasted back it is the mask again
    crop_box = enlarge_boxes(mask_boxes(ped_mask[None]), 1.6)
    crops = crop_resize(planes, torch.cat([crop_box, crop_box + torch.tensor([1.0, 0, 0, 0, 0])]), 64)
    assert crops.shape == (2, 1, 64, 64) and crops.dtype == torch.float32
    torch.testing.assert_close(crops[1], 1 - crops[0], atol=1e-6, rtol=0)  # the second row read plane 1
    pasted = paste_crops(crops[:1, 0], crop_box, h, w)[0] > 0.5
    fg = ped_mask > 0.5
    assert (pasted & fg).sum() / (pasted | fg).sum() > 0.9
    x1, y1, x2, y2 = crop_box[0, 1:].tolist()
    outside = torch.ones_like(fg)
    outside[max(0, int(y1)):int(y2) + 1, max(0, int(x1)):int(x2) + 1] = False
    assert not pasted[outside].any()  # zero outside the box
    # integer planes (a uint8 image) are resampled as float32; (K, 4) boxes paste like (K, 5) rows
    image = (ped_mask * 200).to(torch.uint8)[None, None]
    assert crop_resize(image, whole, (h, w)).dtype == torch.float32
    mask_crop = crops[:1, 0]
    torch.testing.assert_close(paste_crops(mask_crop, crop_box[:, 1:], h, w), paste_crops(mask_crop, crop_box, h, w))


@CUDA
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, 1, 64, 48, generator=g)
    off = torch.randn(4, 2, 13, 13, generator=g) * 0.05
    cpu = ffd_warp(x, off)
    gpu = ffd_warp(x.cuda(), off.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    torch.testing.assert_close(ffd_displacement(off.cuda(), (64, 48)),
                               ffd_displacement_naive(off.cuda(), (64, 48)), atol=1e-5, rtol=0)
    feats = torch.randn(2, 3, 16, 12, generator=g)
    boxes = torch.tensor([[0, 4.0, 4.0, 40.0, 50.0], [1, 0.0, 8.0, 30.0, 60.0]])
    masks = (torch.rand(2, 64, 48, generator=g) > 0.5).float()
    a = dual_mask_pooling([feats], [0.25], boxes, masks, grid_sizes=(6,))
    b = dual_mask_pooling([feats.cuda()], [0.25], boxes.cuda(), masks.cuda(), grid_sizes=(6,))
    torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=0)


def test_ffd_warp_agrees_with_the_project_warp_convention():
    """ops.ffd samples with align_corners=False (pixel squares, any output size); ops.warp with align_corners=True
    (pixel centres). Both mean out(p) = in(p + d(p)) at pixel centres, so on the same grid they must agree."""
    from ops.ffd import ffd_displacement, ffd_warp
    from ops.warp import warp

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 56, generator=g, dtype=torch.float64)
    offsets = 0.05 * torch.randn(2, 2, 13, 13, generator=g, dtype=torch.float64)
    flow_px = ffd_displacement(offsets, (40, 56), scale=(56, 40))
    torch.testing.assert_close(ffd_warp(x, offsets), warp(x, flow_px), atol=1e-10, rtol=0)
