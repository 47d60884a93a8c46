"""Tests of ops.masks, ops.metrics, the proposal-AR evaluator and its plot; AR is checked against pycocotools'
COCOeval."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from tests.mask_helpers import rect_mask, shift_masks
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from maskflow.data import schema
from maskflow.evaluators.proposal_ar import ProposalAR, evaluate_proposal_samples, format_table
from maskflow.viz import plot_recall_curves
from ops.masks import decode_masks, encode_masks, mask_iou, rle_areas, rle_boxes
from ops.metrics import IOU_THRESHOLDS, proposal_recall, recall_vs_iou

from tests.conftest import SHARED_DATA as DATA, require_shared_data  # noqa: E402
PENN_FUDAN = DATA / "penn_fudan_ped" / "PedMasks"
MAX_DETS = (10, 100, 1000)


# ----------------------------------------------------------------------------------------------------- helpers
_rect, _shift = rect_mask, shift_masks


def _dilate(masks: np.ndarray, r: int) -> np.ndarray:
    out = masks.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= _shift(masks, dy, dx)
    return out


def _erode(masks: np.ndarray, r: int) -> np.ndarray:
    return 1 - _dilate(1 - masks, r)


def _cocoeval_recall(images: list[dict], max_dets=MAX_DETS) -> np.ndarray:
    """COCOeval's recall (T, M) for class-agnostic segm evaluation.

    ``images``: dicts with ``gt`` (RLE list), ``crowd`` (flags), ``dt`` (RLE list), ``scores``.
    """
    imgs, anns, dets = [], [], []
    for i, im in enumerate(images, start=1):
        first = (im["gt"] or im["dt"])[0]
        imgs.append({"id": i, "height": first["size"][0], "width": first["size"][1]})
        for rle, c, a in zip(im["gt"], im["crowd"], rle_areas(im["gt"])):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "segmentation": rle,
                         "area": float(a), "bbox": rle_boxes([rle])[0].tolist(), "iscrowd": int(c)})
        for rle, s in zip(im["dt"], im["scores"]):
            dets.append({"image_id": i, "category_id": 1, "segmentation": rle, "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": imgs, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "segm")
        ev.params.useCats = 0
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
    return ev.eval["recall"][:, 0, 0, :]  # (T, M): area range 'all'


def _ours(images: list[dict], max_dets=MAX_DETS) -> dict:
    ious, crowds = [], []
    for im in images:
        order = np.argsort(-np.asarray(im["scores"], dtype=np.float64), kind="mergesort")
        ious.append(mask_iou([im["dt"][j] for j in order], im["gt"], im["crowd"]))
        crowds.append(np.asarray(im["crowd"], dtype=bool))
    return proposal_recall(ious, crowds, max_proposals=max_dets)


def _assert_matches_cocoeval(images: list[dict], max_dets=MAX_DETS) -> dict:
    ref = _cocoeval_recall(images, max_dets)
    ours = _ours(images, max_dets)
    for m, k in enumerate(max_dets):
        col = ref[:, m]
        assert (col > -1).all(), "reference has no ground truth"
        np.testing.assert_allclose(ours["recall"][k], col, rtol=0, atol=1e-9)
        assert abs(ours[f"AR@{k}"] - col[col > -1].mean()) <= 1e-9
    return ours


# ------------------------------------------------------------------------------------------------------ masks
def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 17, 23)) > 0.6
    rles = encode_masks(masks)
    assert len(rles) == 5 and all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    json.dumps(rles)  # JSON-safe
    back = decode_masks(rles)
    assert back.dtype == np.uint8 and back.shape == (5, 17, 23) and back.flags.c_contiguous
    np.testing.assert_array_equal(back, masks.astype(np.uint8))
    # torch, integer values other than 1, bytes counts
    t = torch.from_numpy(masks.astype(np.uint8) * 255)
    assert encode_masks(t) == rles
    as_bytes = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    np.testing.assert_array_equal(decode_masks(as_bytes), back)
    np.testing.assert_array_equal(rle_areas(rles), masks.sum(axis=(1, 2)))
    # empty batches
    assert encode_masks(np.zeros((0, 4, 6), bool)) == []
    assert decode_masks([], 4, 6).shape == (0, 4, 6)
    with pytest.raises(ValueError):
        decode_masks([])


def test_mask_iou_rectangles_and_crowd():
    a = _rect(10, 10, 0, 0, 4, 4)  # 16 px
    b = _rect(10, 10, 2, 2, 6, 6)  # 16 px, overlap 2x2 = 4
    ra, rb = encode_masks(np.stack([a, b]))
    iou = mask_iou([ra, rb], [rb, ra])
    assert iou.shape == (2, 2) and iou.dtype == np.float64
    np.testing.assert_allclose(iou, [[4 / 28, 1.0], [1.0, 4 / 28]], rtol=0, atol=1e-12)
    # crowd ground truth: intersection over detection area
    big = _rect(10, 10, 0, 0, 10, 3)  # 30 px, overlaps a in 4x3 = 12 px
    (rbig,) = encode_masks(big[None])
    np.testing.assert_allclose(mask_iou([ra], [rbig], [1]), [[12 / 16]], atol=1e-12)
    np.testing.assert_allclose(mask_iou([ra], [rbig], [0]), [[12 / 34]], atol=1e-12)
    assert mask_iou([], [ra, rb]).shape == (0, 2)
    assert mask_iou([ra], []).shape == (1, 0)
    np.testing.assert_array_equal(rle_boxes([ra, rb]), [[0, 0, 4, 4], [2, 2, 4, 4]])
    np.testing.assert_array_equal(rle_areas([ra, rb, rbig]), [16, 16, 30])


# ------------------------------------------------------------------------------------------- recall vs COCOeval
def test_thresholds_are_cocoevals():
    assert IOU_THRESHOLDS.shape == (10,)
    assert np.array_equal(IOU_THRESHOLDS, Params(iouType="segm").iouThrs)  # bit-for-bit


def test_hand_computed_tiny_case():
    # rows: proposals by descending score; columns g0, g1, crowd g2
    iou = np.array([[0.90, 0.95, 1.0],
                    [0.70, 0.00, 1.0],
                    [0.00, 0.80, 1.0]])
    crowd = np.array([False, False, True])
    r = proposal_recall([iou], [crowd], max_proposals=(1, 2, 3))
    # p0 takes g1 (best IoU) at every t; p1 then takes g0 for t <= 0.70 (5 thresholds); p2 finds g1 taken
    np.testing.assert_array_equal(r["recall"][1], np.full(10, 0.5))
    np.testing.assert_array_equal(r["recall"][2], [1.0] * 5 + [0.5] * 5)
    assert r["AR@1"] == 0.5 and r["AR@2"] == 0.75 and r["AR@3"] == 0.75
    assert r["num_gt"] == 2 and r["num_images"] == 1
    # a second image with one ground truth and no proposal: recall scales by 2/3
    r2 = proposal_recall([iou, np.zeros((0, 1))], [crowd, np.array([False])], max_proposals=(2,))
    assert r2["num_gt"] == 3 and abs(r2["AR@2"] - 0.5) < 1e-12
    # recall vs IoU up to 1.0: an exact copy passes t = 1.0 (COCOeval's 1 - 1e-10 cap)
    rv = recall_vs_iou([np.array([[1.0, 0.3]])], [np.array([False, False])], k=1)
    np.testing.assert_array_equal(rv, np.full(11, 0.5))
    # no non-crowd ground truth: nan (COCOeval: -1)
    assert np.isnan(proposal_recall([iou[:, 2:]], [crowd[2:]], max_proposals=(1,))["AR@1"])


def test_iou_exactly_at_threshold_like_cocoeval():
    # IoU 9/10 = 0.9 exactly: COCOeval's 0.9 threshold is 0.8999999999999999, so it passes there
    gt = np.zeros((1, 4, 5), np.uint8)
    gt[0, :2, :] = 1  # 10 px
    dt = gt.copy()
    dt[0, 1, 4] = 0  # 9 px subset
    images = [{"gt": encode_masks(gt), "crowd": [0], "dt": encode_masks(dt), "scores": [0.5]}]
    ours = _assert_matches_cocoeval(images, max_dets=(1,))
    np.testing.assert_array_equal(ours["recall"][1], [1.0] * 9 + [0.0])
    # a stored IoU one ulp below 0.9 still passes COCOeval's 0.9 but would fail round(0.9, 2)
    below = np.array([[np.nextafter(0.9, 0.0)]])
    np.testing.assert_array_equal(proposal_recall([below], [np.zeros(1, bool)], (1,))["recall"][1], [1.0] * 9 + [0.0])
    rounded = np.round(np.arange(0.50, 0.951, 0.05), 2)
    np.testing.assert_array_equal(proposal_recall([below], [np.zeros(1, bool)], (1,), rounded)["recall"][1],
                                  [1.0] * 8 + [0.0] * 2)


def test_iou_tie_goes_to_later_ground_truth_like_cocoeval():
    # g0 = cols 0-9, g1 = cols 2-11; p0 = cols 1-10 ties them (9/11); p1 = g0 (1.0 with g0, 8/12 with g1)
    g = np.stack([_rect(3, 14, 0, 0, 3, 10), _rect(3, 14, 0, 2, 3, 12)])
    p = np.stack([_rect(3, 14, 0, 1, 3, 11), g[0]])
    images = [{"gt": encode_masks(g), "crowd": [0, 0], "dt": encode_masks(p), "scores": [0.9, 0.8]}]
    ours = _assert_matches_cocoeval(images, max_dets=(2,))
    # t <= 0.80: p0 takes g1 (the later of the tie) and p1 takes g0; above, p0 matches nothing and p1 takes g0
    # (taking g0 on the tie would leave p1 only g1 at 8/12 and recall 0.5 at t = 0.70-0.80)
    np.testing.assert_array_equal(ours["recall"][2], [1.0] * 7 + [0.5] * 3)


def _synthetic_images(rng: np.random.Generator) -> list[dict]:
    h, w = 36, 44
    images = []
    for i in range(8):
        g = int(rng.integers(1, 7))
        gt = np.stack([_rect(h, w, *sorted(rng.integers(0, h, 2)), *sorted(rng.integers(0, w, 2)))
                       for _ in range(g)])
        gt[:, 0, 0] = 1  # never empty
        if i == 1:
            gt = np.concatenate([gt, gt[:1]])  # identical ground truths: IoU ties between columns
        crowd = np.zeros(len(gt), dtype=int)
        if i in (2, 5):
            crowd[-1] = 1
        if i == 6:
            crowd[:] = 1  # only crowd
        n_dt = 150 if i in (0, 3) else int(rng.integers(5, 40))
        src = gt[rng.integers(0, len(gt), n_dt)]
        kind = rng.integers(0, 4, n_dt)
        dt = src.copy()
        for j in np.flatnonzero(kind == 1):
            dt[j] = _shift(src[j:j + 1], int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))[0]
        if (kind == 2).any():
            dt[kind == 2] = _dilate(src[kind == 2], 1)
        for j in np.flatnonzero(kind == 3):
            dt[j] = rng.random((h, w)) > 0.7
        scores = np.round(rng.random(n_dt), 1)  # many ties
        images.append({"gt": encode_masks(gt), "crowd": crowd.tolist(), "dt": encode_masks(dt), "scores": scores})
    # an image with proposals but no ground truth, one with ground truth but no proposal
    images.append({"gt": [], "crowd": [], "dt": encode_masks(rng.random((3, h, w)) > 0.5), "scores": [0.9, 0.2, 0.9]})
    images.append({"gt": encode_masks(_rect(h, w, 3, 3, 9, 9)[None]), "crowd": [0], "dt": [], "scores": []})
    return images


def test_proposal_recall_equals_cocoeval_synthetic():
    rng = np.random.default_rng(1234)
    ours = _assert_matches_cocoeval(_synthetic_images(rng))
    assert ours["AR@10"] < ours["AR@100"] <= ours["AR@1000"]  # the cut-offs matter in this set


def test_proposal_recall_equals_cocoeval_penn_fudan():
    files = sorted(PENN_FUDAN.glob("*_mask.png")) if PENN_FUDAN.is_dir() else []
    if not files:
        require_shared_data(PENN_FUDAN)
    from PIL import Image

    rng = np.random.default_rng(7)
    images = []
    for n, f in enumerate(files[:6]):
        label = np.asarray(Image.open(f))
        ids = np.unique(label)
        ids = ids[ids > 0]
        gt = (label[None] == ids[:, None, None]).astype(np.uint8)
        props = [gt, _dilate(gt, 2), _erode(gt, 2)]
        for _ in range(4):
            props.append(_shift(gt, int(rng.integers(-15, 16)), int(rng.integers(-15, 16))))
        props.append(gt[rng.integers(0, len(gt), 4)])  # copies (duplicates)
        props.append((rng.random((3,) + gt.shape[1:]) > 0.5).astype(np.uint8))
        dt = np.concatenate(props)
        crowd = np.zeros(len(gt), dtype=int)
        if n == 0 and len(gt) > 1:
            crowd[0] = 1
        images.append({"gt": encode_masks(gt), "crowd": crowd.tolist(), "dt": encode_masks(dt),
                       "scores": rng.random(len(dt))})
    ours = _assert_matches_cocoeval(images)
    assert 0.0 < ours["AR@10"] <= ours["AR@100"] == ours["AR@1000"] <= 1.0


# ---------------------------------------------------------------------------------------- plots, sample eval
def test_plot_recall_curves_writes_png(tmp_path):
    r = proposal_recall([np.array([[0.9, 0.2], [0.6, 0.7]])], [np.array([False, False])], max_proposals=(1, 2))
    r["recall"] = {k: recall_vs_iou([np.array([[0.9, 0.2], [0.6, 0.7]])], [np.zeros(2, bool)], k) for k in (1, 2)}
    r["thresholds"] = np.linspace(0.5, 1.0, 11)
    out = plot_recall_curves(r, str(tmp_path / "sub" / "ar.png"), title="tiny")
    data = Path(out).read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def _sample(image_id: int, crowd: list[int], iou: list[list[float]], scores: list[float], as_bytes: bool) -> dict:
    anns = [{"id": image_id * 10 + j, "category_id": 1, "bbox": [0.0, 0.0, 1.0, 1.0], "area": 1.0,
             "iscrowd": c, "segmentation": {"size": [2, 2], "counts": "04"}} for j, c in enumerate(crowd)]
    meta = {"image_id": image_id, "file_name": f"{image_id}.png", "height": 2, "width": 2, "source": "test",
            "annotations": anns}
    props = {"boxes": [[0.0, 0.0, 1.0, 1.0]] * len(scores), "scores": scores,
             "segmentations": [{"size": [2, 2], "counts": "04"}] * len(scores), "iou": iou, "model": "test://w",
             "height": 2, "width": 2}
    enc = schema.dumps if as_bytes else (lambda x: x)
    return {"__key__": schema.sample_key(image_id), schema.META: enc(meta), schema.PROPOSALS: enc(props)}


def test_evaluate_proposal_samples():
    # same as the tiny hand case, proposals stored out of score order
    samples = [
        _sample(1, [0, 0, 1], [[0.0, 0.8, 1.0], [0.9, 0.95, 1.0], [0.7, 0.0, 1.0]], [0.1, 0.9, 0.5], True),
        _sample(2, [0], [], [], False),  # no proposals
        _sample(3, [], [[], []], [0.3, 0.2], True),  # no ground truth
    ]
    r = evaluate_proposal_samples(samples, max_proposals=(1, 2, 3))
    assert r["num_gt"] == 3 and r["num_images"] == 3
    assert abs(r["num_proposals_mean"] - 5 / 3) < 1e-12
    np.testing.assert_allclose([r["AR@1"], r["AR@2"], r["AR@3"]], [1 / 3, 0.5, 0.5], atol=1e-12)
    table = format_table(r)
    head, vals = table.splitlines()
    assert head.split() == ["AR@1", "AR@2", "AR@3"] and vals.split() == ["0.333", "0.500", "0.500"]
    assert len(head) == len(vals)
    assert format_table(evaluate_proposal_samples(samples)).splitlines()[0].split() == ["AR@10", "AR@100", "AR@1000"]
    with pytest.raises(ValueError):
        evaluate_proposal_samples([_sample(4, [0, 0], [[0.5]], [0.5], False)])


def test_proposal_ar_pools_per_image_matching_exactly():
    """ProposalAR matches each image once (for its per-image row) and pools the matched counts: the pooled AR and
    recall curves equal proposal_recall over all images at once (itself = COCOeval), crowds and empty images
    included, whatever the batching."""
    rng = np.random.default_rng(7)
    samples, ious, crowds = [], [], []
    for image_id in range(40):
        g, k = int(rng.integers(0, 6)), int(rng.integers(0, 30))
        crowd = (rng.random(g) < 0.15).astype(int).tolist()
        iou = np.round(rng.random((k, g)) ** 0.5, 3)  # many IoUs near the thresholds, some ties
        scores = rng.random(k)
        samples.append(_sample(image_id, crowd, iou.tolist(), scores.tolist(), bool(image_id % 2)))
        ious.append(iou[np.argsort(-scores, kind="mergesort")])
        crowds.append(np.asarray(crowd, dtype=bool))
    expected = proposal_recall(ious, crowds, max_proposals=(1, 5, 10, 100))
    evaluator = ProposalAR(max_proposals=(1, 5, 10, 100))
    for start in range(0, 40, 7):
        evaluator.process(samples[start:start + 7])
    pooled = evaluator.summarize()
    assert evaluator.metric == "AR_100" and pooled.metrics["AR_100"] == expected["AR@100"]
    for k in (1, 5, 10, 100):
        np.testing.assert_array_equal(evaluator.result["recall"][k], expected["recall"][k])
        assert pooled.metrics[f"AR_{k}"] == expected[f"AR@{k}"]
    assert pooled.metrics["num_gt"] == expected["num_gt"] and len(pooled.rows) == 40
    assert sum(row["num_gt"] for row in pooled.rows) == expected["num_gt"]
    assert [len(pooled.series[f"recall_{k}_vs_iou"]) for k in (1, 100)] == [10, 10]
    assert ProposalAR(max_proposals=(10, 20)).metric == "AR_20"  # no AR_100 asked for: the largest k heads


def test_rle_areas_beyond_255_masks():
    """pycocotools' area() overflows a uint8 count from 256 RLEs on; rle_areas must not."""
    masks = np.zeros((300, 6, 5), bool)
    masks[np.arange(300), 0, np.arange(300) % 5] = True
    masks[::2, 1:3] = True
    areas = rle_areas(encode_masks(masks))
    assert areas.shape == (300,) and (areas == masks.sum((1, 2))).all()
