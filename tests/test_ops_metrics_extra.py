"""Tests of ops.vos_metrics (DAVIS J/F), ops.correspondence_metrics (PCK, LT-ACC) and ops.instance_metrics (AP^r,
COCO mask AP), on hand-made cases and on the real data in ../shared/data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tests.mask_helpers import rect_mask, shift_masks
import pytest
import torch
from PIL import Image
from scipy import ndimage

from maskflow.data.pf_pascal import read_pf_pascal_pairs
from ops.correspondence_metrics import (
    lt_acc,
    mask_iou_transfer,
    pck,
    stack_pair_keypoints,
    transfer_keypoints,
    warp_labels,
)
from ops.instance_metrics import ap_r, coco_mask_ap, voc_ap
from ops.masks import encode_masks, mask_iou, rle_areas, rle_boxes
from ops.vos_metrics import (
    boundary_map,
    boundary_measure,
    boundary_radius,
    decay,
    evaluate_sequence,
    region_similarity,
    sequence_statistics,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _need(path: Path) -> Path:
    from tests.conftest import require_shared_data

    return require_shared_data(path)


_rect, _shift = rect_mask, shift_masks


def _davis_f_reference(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """The DAVIS benchmark's f_measure for one frame (seg2bmap + binary dilation by skimage's disk)."""

    def seg2bmap(seg):
        seg = seg.astype(bool)
        e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
        e[:, :-1] = seg[:, 1:]
        s[:-1, :] = seg[1:, :]
        se[:-1, :-1] = seg[1:, 1:]
        b = seg ^ e | seg ^ s | seg ^ se
        b[-1, :] = seg[-1, :] ^ e[-1, :]
        b[:, -1] = seg[:, -1] ^ s[:, -1]
        b[-1, -1] = 0
        return b

    r = bound_th if bound_th >= 1 else int(np.ceil(bound_th * np.linalg.norm(gt.shape)))
    ax = np.arange(-r, r + 1)
    disk = ax[:, None] ** 2 + ax[None, :] ** 2 <= r * r
    fb, gb = seg2bmap(pred), seg2bmap(gt)
    fd, gd = ndimage.binary_dilation(fb, disk), ndimage.binary_dilation(gb, disk)
    n_f, n_g = fb.sum(), gb.sum()
    if n_f == 0 and n_g > 0:
        p, rc = 1.0, 0.0
    elif n_f > 0 and n_g == 0:
        p, rc = 0.0, 1.0
    elif n_f == 0 and n_g == 0:
        p, rc = 1.0, 1.0
    else:
        p, rc = (fb & gd).sum() / n_f, (gb & fd).sum() / n_g
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


# ================================================================================================ VOS (DAVIS)
def test_region_similarity_hand_made():
    gt = _rect(20, 20, 0, 0, 10, 10)  # 100 px
    pred = _rect(20, 20, 5, 0, 15, 10)  # 100 px, overlap 50 -> IoU 50 / 150
    empty = np.zeros((20, 20), np.uint8)
    j = region_similarity(np.stack([pred, gt, empty, empty]), np.stack([gt, gt, empty, gt]))
    np.testing.assert_allclose(j, [1 / 3, 1.0, 1.0, 0.0])
    # torch input, any non-zero value is foreground
    jt = region_similarity(torch.from_numpy(pred * 255)[None], torch.from_numpy(gt * 7)[None])
    np.testing.assert_allclose(jt, [1 / 3])


def test_boundary_measure_identical_shifted_and_empty():
    h = w = 100  # diagonal 141.4 -> radius ceil(1.13) = 2
    assert boundary_radius(h, w) == 2
    assert boundary_radius(480, 854) == math.ceil(0.008 * math.hypot(480, 854)) == 8
    gt = _rect(h, w, 30, 30, 70, 70)[None]
    same = boundary_measure(gt, gt)
    assert same["F"][0] == 1.0 and same["precision"][0] == 1.0 and same["recall"][0] == 1.0
    near = boundary_measure(_shift(gt, 0, 2), gt)["F"][0]  # within the 2-px tolerance
    far = boundary_measure(_shift(gt, 0, 6), gt)["F"][0]  # the vertical edges are 6 px off
    assert near == 1.0
    assert 0.0 < far < 1.0
    # only the horizontal edges still match: P = R just under 1/2
    assert far < 0.5
    assert far == pytest.approx(_davis_f_reference(_shift(gt, 0, 6)[0], gt[0]))
    empty = np.zeros_like(gt)
    r = boundary_measure(np.concatenate([empty, gt, empty]), np.concatenate([empty, empty, gt]))
    np.testing.assert_array_equal(r["F"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(r["precision"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(r["recall"], [1.0, 1.0, 0.0])


def test_boundary_measure_matches_davis_reference_on_random_blobs():
    rng = np.random.default_rng(0)
    noise = rng.random((6, 60, 80))
    gt = ndimage.gaussian_filter(noise, (0, 4, 4)) > 0.5
    pred = ndimage.gaussian_filter(rng.random((6, 60, 80)), (0, 4, 4)) > 0.5
    pred[0] = gt[0]
    pred[1] = _shift(gt[1:2].astype(np.uint8), 3, -2)[0].astype(bool)
    f = boundary_measure(pred, gt)["F"]
    ref = [_davis_f_reference(pred[i], gt[i]) for i in range(6)]
    np.testing.assert_allclose(f, ref, rtol=0, atol=1e-12)
    assert f[0] == 1.0 and f[1] < 1.0
    bm = boundary_map(gt)
    assert bm.dtype == np.bool_ and bm.shape == gt.shape


def _davis_frames(seq: str, n: int = 10) -> np.ndarray:
    ann = _need(DATA / "davis2016_subset" / "Annotations" / "480p" / seq)
    files = sorted(ann.glob("*.png"))
    idx = np.linspace(0, len(files) - 1, n).round().astype(int)
    frames = np.stack([np.array(Image.open(files[i])) for i in idx])
    assert set(np.unique(frames)) <= {0, 255}
    return frames > 127


def test_davis_real_blackswan_j_f_and_shift():
    gt = _davis_frames("blackswan", 10)
    assert gt.shape == (10, 480, 854)
    self_eval = evaluate_sequence(gt, gt)
    np.testing.assert_array_equal(self_eval["J"], np.ones(10))
    np.testing.assert_array_equal(self_eval["F"], np.ones(10))
    assert self_eval["J_mean"] == self_eval["F_mean"] == self_eval["JF_mean"] == 1.0
    assert self_eval["J_recall"] == 1.0 and self_eval["J_decay"] == 0.0
    j_means, f_means = [], []
    for s in (1, 3, 5, 10):
        r = evaluate_sequence(_shift(gt, 0, s), gt)
        j_means.append(r["J_mean"])
        f_means.append(r["F_mean"])
    assert all(a > b for a, b in zip(j_means, j_means[1:])), j_means  # J strictly decreasing with the shift
    assert j_means[2] < 1.0  # 5 px
    # F tolerates ceil(0.008 * 979.6) = 8 px: a pure 5-px translation is still a perfect boundary match,
    # a 10-px one is not
    assert f_means[2] == 1.0
    assert f_means[3] < 0.9
    r10 = evaluate_sequence(_shift(gt, 0, 10), gt)
    assert r10["F"][0] == pytest.approx(_davis_f_reference(_shift(gt, 0, 10)[0], gt[0]), abs=1e-12)
    # official protocol: first and last frames left out
    assert evaluate_sequence(_shift(gt, 0, 10), gt, exclude_first_last=True)["num_frames"] == 8


def test_decay_known_quartiles_and_davis_bins():
    # 100 frames: DAVIS bins are ids = round(linspace(1, 100, 5)) - 1 = [0, 25, 50, 74, 99] -> first bin X[0:26],
    # last bin X[74:100]
    x = np.full(100, 0.5)
    x[:26] = 0.9
    x[74:] = 0.3
    assert decay(x) == pytest.approx(0.6)
    st = sequence_statistics(x)
    assert st["mean"] == pytest.approx(x.mean())
    assert st["recall"] == pytest.approx(26 / 100)  # only the 0.9 frames are > 0.5
    # 8 frames: ids = [0, 2, 4, 5, 7] -> bins X[0:3], X[5:8]
    y = np.array([1.0, 0.8, 0.6, 0.5, 0.5, 0.4, 0.2, 0.0])
    assert decay(y) == pytest.approx(0.8 - 0.2)
    # nan frames are ignored, constant sequences do not decay
    assert decay(np.ones(37)) == 0.0
    z = y.copy()
    z[1] = np.nan
    assert decay(z) == pytest.approx(np.mean([1.0, 0.6]) - 0.2)
    assert decay(np.array([0.7])) == 0.0


def test_recall_counts_nan_frames_as_failures():
    # DAVIS db_statistics: R = nanmean(X > 0.5), and nan > 0.5 is False, so a frame without a value is a failure
    # over all T frames (2 of 5 here, not 2 of the 3 scored frames); the mean leaves it out.
    x = np.array([0.9, np.nan, 0.7, 0.2, np.nan])
    st = sequence_statistics(x)
    assert st["recall"] == pytest.approx(2 / 5) and st["recall"] == np.nanmean(x > 0.5)
    assert st["mean"] == pytest.approx(np.nanmean(x))
    unscored = sequence_statistics(np.full(4, np.nan))
    assert unscored["recall"] == 0.0 and math.isnan(unscored["mean"]) and math.isnan(unscored["decay"])


def test_long_sequence_300_frames():
    t, h, w = 300, 24, 32
    gt = np.zeros((t, h, w), dtype=bool)
    gt[:, 6:18, 8:24] = True
    # prediction degrades linearly: frame k loses the first round(k * 12 / 299) rows of the object
    pred = gt.copy()
    lost = np.round(np.arange(t) * 12 / (t - 1)).astype(int)
    rows = np.arange(h)[None, :, None]
    pred &= ~((rows >= 6) & (rows < 6 + lost[:, None, None]))
    r = evaluate_sequence(pred, gt)
    assert r["J"].shape == (300,) and r["F"].shape == (300,)
    np.testing.assert_allclose(r["J"], (12 - lost) / 12)
    ids = (np.round(np.linspace(1, t, 5) + 1e-10) - 1).astype(np.int64)
    assert ids.tolist() == [0, 75, 150, 224, 299]
    expected = r["J"][0:76].mean() - r["J"][224:300].mean()
    assert r["J_decay"] == pytest.approx(expected)
    assert r["J_decay"] > 0.7
    # the reference's uint8 bins wrap 224 -> 224 but 299 -> 43, giving a bogus last bin
    bad = ids.astype(np.uint8)
    assert bad[4] == 43 and r["J"][bad[3] : bad[4] + 1].size == 0


# ===================================================================================== correspondence (SFNet)
def test_pck_hand_computed_both_normalisers():
    gt = np.array([[[10.0, 10.0], [50.0, 10.0], [10.0, 30.0], [50.0, 30.0]]])  # kp box 40 x 20 -> max 40
    # errors 1, 3.9, 5, 20 px
    pred = gt + np.array([[[1.0, 0.0], [0.0, 3.9], [3.0, 4.0], [0.0, 20.0]]])
    # bbox of the keypoints: threshold 0.1 * 40 = 4 -> 2 of 4 correct
    assert pck(pred, gt, alpha=0.1, normaliser="bbox") == 0.5
    # explicit [x, y, w, h] box of 30 x 50 -> threshold 5 -> the 5-px one counts too (<=)
    assert pck(pred, gt, alpha=0.1, normaliser="bbox", bbox=[0, 0, 30, 50]) == 0.75
    # image (h, w) = (200, 100) -> threshold 20 -> all four
    assert pck(pred, gt, alpha=0.1, normaliser="image", image_size=(200, 100)) == 1.0
    assert pck(pred, gt, alpha=0.02, normaliser="image", image_size=(200, 100)) == 0.5  # threshold 4
    # valid mask: drop the two wrong ones -> 1.0; padded -1 keypoints are invalid by default
    assert pck(pred, gt, normaliser="bbox", bbox=[0, 0, 40, 20], valid=[[1, 1, 0, 0]]) == 1.0
    gt2 = np.concatenate([gt, -np.ones((1, 2, 2))], axis=1)
    pred2 = np.concatenate([pred, np.zeros((1, 2, 2))], axis=1)
    assert pck(pred2, gt2, normaliser="bbox") == 0.5
    # per-pair mean vs pooled
    both_p = np.concatenate([pred, gt])
    both_g = np.concatenate([gt, gt])
    np.testing.assert_allclose(pck(both_p, both_g, reduction="none"), [0.5, 1.0])
    assert pck(both_p, both_g) == 0.75
    assert pck(both_p, both_g, reduction="sum") == 0.75
    with pytest.raises(ValueError):
        pck(pred, gt, normaliser="image")


def test_transfer_keypoints_bilinear_and_direction():
    h, w = 5, 7
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    flow = np.stack([2.0 * xs + 1.0, -ys])  # dx = 2x + 1, dy = -y (linear: bilinear sampling is exact)
    kps = np.array([[0.0, 0.0], [1.5, 2.25], [6.0, 4.0], [3.3, 0.7]])
    out = transfer_keypoints(flow, kps)
    np.testing.assert_allclose(out[:, 0], kps[:, 0] + 2 * kps[:, 0] + 1)
    np.testing.assert_allclose(out[:, 1], kps[:, 1] - kps[:, 1])
    # torch, batched, differentiable
    kt = torch.tensor(kps[None], requires_grad=True)
    ot = transfer_keypoints(torch.from_numpy(flow)[None], kt)
    assert ot.shape == (1, 4, 2)
    ot[..., 0].sum().backward()
    np.testing.assert_allclose(kt.grad[0, [1, 3], 0].numpy(), 3.0)  # interior, off-grid points: d/dx = 1 + 2
    # outside the image: border value
    np.testing.assert_allclose(transfer_keypoints(flow, np.array([[10.0, 0.0]])), [[10.0 + 13.0, 0.0]])


def test_warp_labels_lt_acc_and_iou():
    src = np.zeros((10, 12), dtype=np.int64)
    src[2:6, 3:8] = 1
    flow = np.zeros((2, 10, 12))
    flow[0] = 2.0  # target p takes the source label at p + (2, 0)
    tgt = warp_labels(src, flow)
    exp = np.zeros_like(src)
    exp[2:6, 1:6] = 1
    np.testing.assert_array_equal(tgt, exp)
    assert lt_acc(tgt, exp) == 1.0
    assert mask_iou_transfer(tgt, exp) == 1.0
    # identity transfer (src used as-is) vs exp: foreground columns 3:8 vs 1:6 -> overlap 3 of union 7 columns
    assert mask_iou_transfer(src, exp) == pytest.approx(3 / 7)
    wrong = (src != exp).sum()
    assert lt_acc(src, exp) == pytest.approx(1 - wrong / src.size)
    valid = np.zeros_like(src, dtype=bool)
    valid[:, 8:] = True  # only background there
    assert lt_acc(src, exp, valid) == 1.0
    np.testing.assert_allclose(lt_acc(np.stack([src, exp]), np.stack([exp, exp]), reduction="none"),
                               [1 - wrong / src.size, 1.0])
    assert mask_iou_transfer(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0


def test_pf_pascal_real_pairs_identity_pck():
    path = _need(DATA / "pf_pascal_pairs") / "test_pairs.csv"
    pairs = read_pf_pascal_pairs(str(path))
    assert len(pairs) == 299
    assert sum(len(p["source_kps"]) for p in pairs) == 2414
    assert all(p["source_kps"].shape == p["target_kps"].shape for p in pairs)
    assert {p["class"] for p in pairs} <= set(range(1, 21))
    first = pairs[0]
    assert first["source_image"].endswith("2011_001407.jpg") and first["class"] == 1
    np.testing.assert_allclose(first["source_kps"][0], [253.631662222222, 58.1813333333333])
    np.testing.assert_allclose(first["target_kps"][0], [272.801888, 65.2755428571429])
    src, tgt, valid = stack_pair_keypoints(pairs)
    assert src.shape == (299, 17, 2) and valid.sum() == 2414
    # identity transfer: source keypoint positions taken as the prediction of the target ones
    v = pck(src, tgt, alpha=0.1, normaliser="bbox", valid=valid)
    per = pck(src, tgt, alpha=0.1, normaliser="bbox", valid=valid, reduction="none")
    assert 0.0 <= v <= 1.0 and per.shape == (299,) and np.isfinite(per).all()
    assert 0.0 < v < 1.0  # identity is neither perfect nor useless on PF-PASCAL (0.222 at alpha = 0.1)
    assert pck(tgt, tgt, valid=valid) == 1.0
    assert pck(src, tgt, alpha=0.2, valid=valid) >= v
    # train/val lists have a flip column and no keypoints
    val = read_pf_pascal_pairs(str(path.parent / "val_pairs.csv"))
    assert len(val) == 308 and "source_kps" not in val[0] and isinstance(val[0]["flip"], bool)


# ====================================================================================== instance AP (DVIS)
def _reference_ap_r(preds, gts, thr):
    """Straightforward VOC devkit loop (per class, per threshold) for cross-checking ap_r."""
    classes = sorted({int(c) for g in gts for c in g[1]})
    res = {}
    for c in classes:
        dets = [(s, i, k) for i, p in enumerate(preds) for k, (s, cc) in enumerate(zip(p[1], p[2])) if cc == c]
        dets.sort(key=lambda d: -d[0])
        npos = sum(int(np.sum(np.asarray(g[1]) == c)) for g in gts)
        aps = []
        for t in thr:
            taken = [np.zeros(len(g[1]), bool) for g in gts]
            tp, fp = [], []
            for s, i, k in dets:
                gi = [j for j, cc in enumerate(gts[i][1]) if cc == c]
                ovmax, jmax = -1.0, -1
                if gi:
                    ious = mask_iou([preds[i][0][k]], [gts[i][0][j] for j in gi])[0]
                    jmax = gi[int(np.argmax(ious))]
                    ovmax = float(ious.max())
                if ovmax >= t and not taken[i][jmax]:
                    taken[i][jmax] = True
                    tp.append(1), fp.append(0)
                else:
                    tp.append(0), fp.append(1)
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            rec = tp / npos
            prec = tp / np.maximum(tp + fp, 1e-300)
            mrec = np.concatenate([[0], rec, [1]])
            mpre = np.concatenate([[0], prec, [0]])
            for q in range(len(mpre) - 2, -1, -1):
                mpre[q] = max(mpre[q], mpre[q + 1])
            idx = np.where(mrec[1:] != mrec[:-1])[0]
            aps.append(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
        res[c] = np.array(aps)
    return res


def test_ap_r_perfect_and_hand_made():
    h, w = 40, 40
    a, b = _rect(h, w, 0, 0, 10, 10), _rect(h, w, 20, 20, 30, 30)
    gts = [(encode_masks(np.stack([a, b])), [1, 2])]
    perfect = [(encode_masks(np.stack([a, b])), [0.9, 0.8], [1, 2])]
    r = ap_r(perfect, gts)
    assert r["AP_avg"] == 1.0 and all(r[f"mAP@{t:g}"] == 1.0 for t in (0.5, 0.6, 0.7, 0.8, 0.9))
    # class 1: a false positive (score 0.9) ranked above the true positive (0.5): P = [0, 1/2], R = [0, 1]
    # -> all-point AP = 0.5; class 2 perfect -> mean 0.75
    fp = _rect(h, w, 30, 0, 40, 10)
    preds = [(encode_masks(np.stack([fp, a, b])), [0.9, 0.5, 0.7], [1, 1, 2])]
    r = ap_r(preds, gts)
    np.testing.assert_allclose(r["per_class"][1], 0.5)
    np.testing.assert_allclose(r["per_class"][2], 1.0)
    assert r["mAP@0.5"] == 0.75
    # a detection of IoU 0.8 (a 10x8 box inside the 10x10 one): TP at t <= 0.8, FP at 0.9
    part = _rect(h, w, 0, 0, 10, 8)
    r = ap_r([(encode_masks(part[None]), [1.0], [1])], [(encode_masks(a[None]), [1])])
    np.testing.assert_allclose(r["per_class"][1], [1, 1, 1, 1, 0])  # IoU 0.8 >= 0.8 (>=, VOC devkit)
    assert r["AP_avg"] == pytest.approx(0.8)
    # duplicate detection of one object: 2nd is a FP even though it overlaps perfectly; 2 GTs of class 1
    gts2 = [(encode_masks(np.stack([a, b])), [1, 1])]
    r = ap_r([(encode_masks(np.stack([a, a, b])), [0.9, 0.8, 0.7], [1, 1, 1])], gts2)
    # ranked TP, FP, TP: P = 1, 1/2, 2/3; R = 1/2, 1/2, 1 -> AP = 0.5 * 1 + 0.5 * 2/3
    np.testing.assert_allclose(r["per_class"][1], 0.5 + 0.5 * 2 / 3)
    # wrong class never matches; a class with predictions but no GT is nan and left out of the mean
    r = ap_r([(encode_masks(a[None]), [0.9], [3])], [(encode_masks(a[None]), [1])])
    assert np.isnan(r["per_class"][3]).all() and r["mAP@0.5"] == 0.0
    # an image without detections (missed GT halves the recall)
    r = ap_r([(encode_masks(a[None]), [0.9], [1]), ([], [], [])], [(encode_masks(a[None]), [1]),
                                                                   (encode_masks(b[None]), [1])])
    assert r["mAP@0.5"] == 0.5
    # difficult GT: a detection on it is ignored (neither TP nor FP)
    r = ap_r([{"masks": encode_masks(np.stack([b, a])), "scores": [0.9, 0.8], "classes": [1, 1]}],
             [{"masks": encode_masks(np.stack([a, b])), "classes": [1, 1], "ignore": [False, True]}])
    assert r["mAP@0.5"] == 1.0 and r["num_gt"] == {1: 1}
    # VOC07 11-point on the FP-then-TP list: precision 0.5 at every recall point -> 0.5
    assert voc_ap(np.array([0.0, 1.0]), np.array([0.0, 0.5]), use_07_metric=True) == pytest.approx(0.5)


def test_ap_r_matches_reference_loop_on_random_masks():
    rng = np.random.default_rng(3)
    h, w = 32, 32
    preds, gts = [], []
    for _ in range(4):
        ng, nd = rng.integers(1, 4), rng.integers(0, 6)
        g = []
        for _ in range(ng):
            y, x = rng.integers(0, 20, 2)
            g.append(_rect(h, w, y, x, y + rng.integers(6, 12), x + rng.integers(6, 12)))
        d = [np.clip(_shift(gm[None], *rng.integers(-3, 4, 2))[0], 0, 1) for gm in g[: min(ng, nd)]]
        while len(d) < nd:
            y, x = rng.integers(0, 20, 2)
            d.append(_rect(h, w, y, x, y + 10, x + 10))
        gts.append((encode_masks(np.stack(g)), rng.integers(1, 3, ng).tolist()))
        dm = encode_masks(np.stack(d)) if d else []
        preds.append((dm, rng.random(nd).tolist(), rng.integers(1, 3, nd).tolist()))
    thr = (0.5, 0.6, 0.7, 0.8, 0.9)
    r = ap_r(preds, gts, thr)
    ref = _reference_ap_r(preds, gts, thr)
    for c, v in ref.items():
        np.testing.assert_allclose(r["per_class"][c], v, atol=1e-12)


def _penn_fudan_coco(n_images: int = 3):
    root = _need(DATA / "penn_fudan_ped" / "PedMasks")
    files = sorted(root.glob("*_mask.png"))[:n_images]
    images, anns, per_image = [], [], []
    for i, f in enumerate(files, start=1):
        lab = np.array(Image.open(f))
        ids = np.unique(lab)
        ids = ids[ids > 0]
        masks = (lab[None] == ids[:, None, None]).astype(np.uint8)
        rles = encode_masks(masks)
        images.append({"id": i, "file_name": f.name, "height": int(lab.shape[0]), "width": int(lab.shape[1])})
        for rle, area, box in zip(rles, rle_areas(rles), rle_boxes(rles)):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "segmentation": rle,
                         "area": float(area), "iscrowd": 0, "bbox": box.tolist()})
        per_image.append(rles)
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    return gt, per_image


def test_coco_mask_ap_penn_fudan_gt_as_detections():
    gt, per_image = _penn_fudan_coco(3)
    assert len(gt["annotations"]) >= 4
    dets = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"], "score": 1.0}
            for a in gt["annotations"]]
    stats = coco_mask_ap(gt, dets)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AP75"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)
    # the same masks through AP^r
    r = ap_r([(rles, [1.0] * len(rles), [1] * len(rles)) for rles in per_image],
             [(rles, [1] * len(rles)) for rles in per_image])
    assert r["AP_avg"] == 1.0
    # dropping half the detections lowers AP; no detections at all gives 0
    half = coco_mask_ap(gt, dets[::2])
    assert 0.0 < half["AP"] < 1.0
    assert coco_mask_ap(gt, [])["AP"] == 0.0
