"""Affine-pairs stage on real data: Penn-Fudan images -> image shards on the moto S3 endpoint -> synthetic pairs,
read back through Ray Data; the stored ground-truth flow really maps the source onto the target. Several pairs per
image are independent draws (pair 0 unchanged); dlib's face landmarks travel from the converter through ingest to
the pairs' targets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskflow import config, shards, stage, storage
from maskflow.data import schema
from maskflow.data.coco import image_records, load_coco_json, write_coco_json
from maskflow.data.convert import dlib_faces_to_coco
from maskflow.data.validate import encode_mask
from maskflow.stages import affine_pairs as ap
from maskflow.stages.ingest import image_sample
from ops import warp as W
from ops.geometry import draw_affine, sample_points
from tests.test_ingest import run_ingest

NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0}
CONF = Path(__file__).resolve().parents[1] / "conf"


def chw(png: bytes) -> torch.Tensor:
    a = schema.load_png(png).astype(np.float32)
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))[None]  # (1, C, H, W)


def flow(npy: bytes) -> torch.Tensor:
    f = schema.load_npy(npy)
    assert f.dtype == np.float32 and f.ndim == 3 and f.shape[0] == 2
    return torch.from_numpy(f)[None]


def eroded(valid: torch.Tensor, r: int = 2) -> torch.Tensor:
    return -torch.nn.functional.max_pool2d(-valid, 2 * r + 1, stride=1, padding=r)


def pil_affine(png: bytes, theta_t2s: np.ndarray) -> np.ndarray:
    """Independent reference: PIL's bilinear affine transform with the stored matrix (PIL's coordinates put pixel
    centres at +0.5, so the translation shifts by (I - A) 0.5)."""
    (a, b, c), (d, e, f) = theta_t2s
    img = Image.open(io.BytesIO(png))
    data = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    return np.asarray(img.transform(img.size, Image.AFFINE, data, resample=Image.BILINEAR), np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def pairs_cfg(shards_uri: str, out: str, options, **pairs) -> ap.AffinePairsConfig:
    return config.build(ap.AffinePairsConfig, {
        "input": {"shards": shards_uri},
        "pairs": pairs,
        "output": {"uri": out},
        "storage": {"endpoint_url": options.endpoint_url, "region": options.region},
    })


def test_pairs_on_s3_warp_source_onto_target(ray_local, penn_fudan_coco, tmp_path, s3_options, s3_bucket,
                                             tracking_cfg):
    annotations, images = penn_fudan_coco
    coco = load_coco_json(annotations)
    keep = coco["images"][:12]
    empty_id = keep[5]["id"]  # its annotations are dropped: no foreground (ids 1..12: it sits in input shard 0)
    anns = [a for a in coco["annotations"] if a["image_id"] in {i["id"] for i in keep} and a["image_id"] != empty_id]
    path = tmp_path / "instances.json"
    write_coco_json({**coco, "images": keep, "annotations": anns}, str(path))
    image_shards = f"s3://{s3_bucket}/shards/pf"
    assert run_ingest(str(path), images, image_shards, s3_options, per_shard=6)["samples"] == 12

    out = f"s3://{s3_bucket}/pairs/pf"
    cfg = pairs_cfg(image_shards, out, s3_options, seed=7, **NO_JITTER)
    manifest = stage.run_stage(ap.AffinePairsStage(cfg, s3_options), cfg.output, cfg.compute, tracking_cfg, cfg,
                               s3_options)

    # Counts: one output shard per input shard; every input is a sample or a reject with its reason.
    assert manifest["inputs"] == 12 and manifest["samples"] == 11 and manifest["rejected"] == 1
    assert [s["samples"] for s in manifest["shards"]] == [5, 6]
    rejects = [json.loads(x) for x in storage.read_text(storage.join(out, shards.REJECTS), s3_options).splitlines()]
    assert [(r["key"], r["reason"]) for r in rejects] == [(schema.sample_key(empty_id), ap.NO_FOREGROUND)]

    import ray.data

    uris = shards.shard_uris(out, s3_options)
    fs, _ = storage.pyarrow_filesystem(uris[0], s3_options)
    rows = ray.data.read_webdataset([storage.pyarrow_filesystem(u, s3_options)[1] for u in uris], filesystem=fs,
                                    decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(schema.sample_key(i["id"]) for i in keep if i["id"] != empty_id)
    flips = set()
    for row in rows:
        pair = json.loads(row[ap.PAIR])
        src, tgt = chw(row[ap.SOURCE]), chw(row[ap.TARGET])
        f_t2s, f_s2t = flow(row[ap.FLOW_T2S]), flow(row[ap.FLOW_S2T])
        H, Wd = pair["height"], pair["width"]
        assert src.shape[-2:] == tgt.shape[-2:] == f_t2s.shape[-2:] == f_s2t.shape[-2:] == (H, Wd)
        valid = W.valid_mask(f_t2s)
        assert valid.mean() > 0.3
        v = valid[0, 0] > 0
        # The flow is the stored affine: exactly (float32 round-off), both ways.
        theta_t2s = np.array(pair["affine_t2s"])
        assert torch.allclose(f_t2s, W.affine_to_flow(torch.tensor(theta_t2s, dtype=torch.float32)[None], H, Wd),
                              atol=1e-3)
        assert np.allclose(np.vstack([pair["affine_s2t"], [0, 0, 1]]) @ np.vstack([theta_t2s, [0, 0, 1]]), np.eye(3))
        # warp(source, flow_t2s) == target: the target was made by this same bilinear sampler, so inside the valid
        # region the only difference is the target's rounding to uint8: <= 0.5 grey levels (+ float noise).
        err = (W.warp(src, f_t2s) - tgt).abs().amax(1)[0]
        assert err[v].max() <= 0.5 + 1e-3
        # Independent of ops.warp: PIL's own bilinear affine with the stored matrix agrees to 1 grey level per
        # sample (each side rounds to uint8, PIL interpolates in fixed point), 2 px away from the valid border.
        ref = np.abs(pil_affine(row[ap.SOURCE], theta_t2s) - tgt[0].permute(1, 2, 0).numpy()).max(-1)
        inner = eroded(valid)[0, 0].numpy() > 0
        assert ref[inner].max() <= 1.0 and ref[inner].mean() < 1.0
        # flow_s2t o flow_t2s == identity (affine: bilinear reads of an affine field are exact).
        roundtrip = torch.linalg.vector_norm(W.compose(f_s2t, f_t2s), dim=1)[0]
        assert roundtrip[v].max() < 1e-2
        # Target mask = the source mask carried by the flow (IoU with warp(source_mask) > 0.5) and non-empty.
        smask, tmask = chw(row[ap.SOURCE_MASK]), chw(row[ap.TARGET_MASK])[0, 0].numpy() > 127
        assert set(np.unique(smask.numpy())) <= {0.0, 255.0} and tmask.any()
        assert iou(tmask, (W.warp(smask / 255, f_t2s)[0, 0] > 0.5).numpy()) >= 0.95
        assert pair["jitter"] == {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0} and pair["elastic"] is None
        assert "keypoints" not in pair  # Penn-Fudan has none
        flips.add(pair["params"]["flip"])
    assert flips == {True, False}

    # Reproducible from (dataset, image id, seed): the shard recomputed here equals the one the Ray worker wrote,
    # byte for byte; another seed changes every target and flow but not the source.
    by_key = {r["__key__"]: r for r in rows}
    unit = ap.AffinePairsStage(cfg, s3_options).plan().units[0]
    again = list(ap.AffinePairsStage(cfg, s3_options).process(unit))
    assert [r.reason for r in again if isinstance(r, stage.Reject)] == [ap.NO_FOREGROUND]
    again = [s for s in again if isinstance(s, dict)]
    assert len(again) == 5
    for s in again:
        for name in ap.FIELDS:
            value = schema.dumps(s[name]) if name == ap.PAIR else s[name]
            assert value == by_key[s["__key__"]][name], name
    other = pairs_cfg(image_shards, out, s3_options, seed=8, **NO_JITTER)
    for s in ap.AffinePairsStage(other, s3_options).process(unit):
        if isinstance(s, dict):
            r = by_key[s["__key__"]]
            assert s[ap.SOURCE] == r[ap.SOURCE]
            assert s[ap.TARGET] != r[ap.TARGET] and s[ap.FLOW_T2S] != r[ap.FLOW_T2S]

    import mlflow

    run = mlflow.get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["samples"] == 11 and run.data.metrics["rejected"] == 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"manifest.json", "rejects.jsonl", "contact_sheet.png"} <= artifacts
    assert ap.pair_sheet([by_key[k] for k in sorted(by_key)[:2]]).shape[2] == 3


@pytest.fixture(scope="module")
def fudan_ped1(shared_data):
    root = shared_data / "penn_fudan_ped"
    labels = np.array(Image.open(root / "PedMasks" / "FudanPed00001_mask.png"))
    meta = {"image_id": 1, "source": "penn_fudan", "file_name": "FudanPed00001.png",
            "annotations": [{"segmentation": encode_mask(labels == k)} for k in range(1, labels.max() + 1)],
            "keypoints": [[160.0, 120.0], [300.5, 200.25], [5.0, 5.0]]}
    return (root / "PNGImages" / "FudanPed00001.png").read_bytes(), meta


def test_elastic_pairs_invert_and_carry_keypoints(fudan_ped1):
    image, meta = fudan_ped1
    settings = config.build(ap.PairSettings, {"seed": 3, "elastic_amplitude": 8.0, "elastic_spacing": 32.0,
                                              **NO_JITTER})
    s = ap.make_pair("k", image, meta, settings)
    pair = schema.loads(schema.dumps(s[ap.PAIR]))
    src, tgt = chw(s[ap.SOURCE]), chw(s[ap.TARGET])
    f_t2s, f_s2t = flow(s[ap.FLOW_T2S]), flow(s[ap.FLOW_S2T])
    v_t, v_s = W.valid_mask(f_t2s)[0, 0] > 0, W.valid_mask(f_s2t)[0, 0] > 0
    # Not affine any more: the flow departs from the affine part by up to the elastic amplitude.
    affine = W.affine_to_flow(torch.tensor(pair["affine_t2s"], dtype=torch.float32)[None], *f_t2s.shape[-2:])
    elastic_px = (f_t2s - affine).abs().max()
    assert elastic_px > 1.0 and elastic_px < 8.0 * 1.3 * 1.3  # amplitude x |M^-1| x bicubic overshoot
    assert (W.warp(src, f_t2s) - tgt).abs().amax(1)[0][v_t].max() <= 0.5 + 1e-3
    # Numerical inverse: phi_t2s(phi_s2t(p)) == p to the recorded residual; the other way round reads the
    # non-affine flow_s2t bilinearly between pixels, so it is only good to interpolation error (< 0.5 px).
    residual = pair["elastic"]["inverse_max_residual_px"]
    assert residual < 1e-2
    assert torch.linalg.vector_norm(W.compose(f_t2s, f_s2t), dim=1)[0][v_s].max() <= residual + 1e-4
    assert torch.linalg.vector_norm(W.compose(f_s2t, f_t2s), dim=1)[0][v_t].max() < 0.5
    # Keypoints go source -> target; flow_t2s at each target point leads back to its source point.
    kp = pair["keypoints"]
    assert kp["source"] == meta["keypoints"] and len(kp["target"]) == 3
    inside = np.array(kp["inside"])
    back = sample_points(f_t2s, np.array(kp["target"])[inside])
    assert np.abs(back - np.array(kp["source"])[inside]).max() < 0.05
    # Colour jitter touches the target image only: same geometry, same masks, same flows.
    jittered = ap.make_pair("k", image, meta, config.build(ap.PairSettings, {
        "seed": 3, "elastic_amplitude": 8.0, "elastic_spacing": 32.0}))
    assert jittered[ap.TARGET] != s[ap.TARGET]
    for name in (ap.SOURCE, ap.SOURCE_MASK, ap.TARGET_MASK, ap.FLOW_T2S, ap.FLOW_S2T):
        assert jittered[name] == s[name], name
    assert jittered[ap.PAIR]["params"] == s[ap.PAIR]["params"]
    # No foreground: rejected with its reason.
    reject = ap.make_pair("k", image, {**meta, "annotations": []}, settings)
    assert isinstance(reject, stage.Reject) and reject.reason == ap.NO_FOREGROUND


def test_several_pairs_per_image_are_independent_draws(fudan_ped1):
    image, meta = fudan_ped1
    single = ap.make_pair("k", image, meta, config.build(ap.PairSettings, {"seed": 3, **NO_JITTER}))
    settings = config.build(ap.PairSettings, {"seed": 3, "per_image": 3, **NO_JITTER})
    pairs = ap.make_pairs("k", image, meta, settings)
    assert [p["__key__"] for p in pairs] == ["k_000", "k_001", "k_002"]
    # Pair 0 is the one pair of a per_image = 1 run, byte for byte: outputs made before the setting stay valid.
    for name in ap.FIELDS:
        assert schema.dumps(pairs[0][name]) == schema.dumps(single[name]) if name == ap.PAIR else \
            pairs[0][name] == single[name], name
    assert "pair_index" not in pairs[0][ap.PAIR] and [p[ap.PAIR]["pair_index"] for p in pairs[1:]] == [1, 2]
    # Different draws of one image: same source, different warp, target and flows; each draw comes from
    # default_rng([seed, image_id, k]) and is a consistent pair on its own.
    assert len({p[ap.SOURCE] for p in pairs}) == 1
    assert len({p[ap.TARGET] for p in pairs}) == len({p[ap.FLOW_T2S] for p in pairs}) == 3
    assert len({schema.dumps(p[ap.PAIR]["params"]) for p in pairs}) == 3
    for k, p in enumerate(pairs):
        pair = p[ap.PAIR]
        M, params = draw_affine(np.random.default_rng([3, 1, k]), pair["height"], pair["width"], flip_prob=0.5)
        assert params == pair["params"] and np.allclose(M[:2], pair["affine_s2t"])
        f_t2s, src, tgt = flow(p[ap.FLOW_T2S]), chw(p[ap.SOURCE]), chw(p[ap.TARGET])
        assert (W.warp(src, f_t2s) - tgt).abs().amax(1)[0][W.valid_mask(f_t2s)[0, 0] > 0].max() <= 0.5 + 1e-3
    # An image without foreground is one reject, not one per pair.
    reject = ap.make_pairs("k", image, {**meta, "annotations": []}, settings)
    assert isinstance(reject, stage.Reject) and reject.reason == ap.NO_FOREGROUND
    # The job fingerprint of one pair per image is the one it had before per_image existed.
    cfg = config.build(ap.AffinePairsConfig, {"input": {"shards": "unused"}, "output": {"uri": "unused"}})
    assert "per_image" not in ap.AffinePairsStage(cfg).fingerprint_config()["pairs"]
    cfg.pairs.per_image = 3
    assert ap.AffinePairsStage(cfg).fingerprint_config()["pairs"]["per_image"] == 3
    with pytest.raises(config.ConfigError, match="^pairs.per_image:"):
        config.build(ap.AffinePairsConfig, {"input": {"shards": "x"}, "output": {"uri": "y"}, "pairs": {"per_image": 0}})


def test_face_landmarks_travel_from_converter_through_ingest_to_pairs(shared_data, tmp_path):
    """dlib faces -> COCO -> ingest's image samples (landmarks in the meta) -> one input shard -> the stage's
    process() with the HSTN faces settings (elastic, no flips, several pairs per image). No Ray needed."""
    coco, images = dlib_faces_to_coco(str(shared_data / "dlib_faces_landmarks"), ["training"])
    records, rejects = image_records(coco, images)
    assert rejects == [] and len(records) == 4
    samples = [s for r in records[:2] for s in image_sample(r, "dlib_faces", storage.DEFAULT_OPTIONS)
               if isinstance(s, dict)]
    assert [len(s[schema.META]["keypoints"]) for s in samples] == [7 * 68, 2 * 68]
    assert samples[0][schema.META]["keypoints"] == coco["images"][0]["keypoints"]
    shard = shards.write_shard(str(tmp_path / "shard-000000.tar"), samples)
    unit = stage.WorkUnit(0, [stage.InputShard(str(tmp_path / "shard-000000.tar"), shard["keys"], shard["samples"],
                                               sample_sha256=shard["sample_sha256"])], expected_inputs=2)
    faces = config.load_yaml(str(CONF / "affine_pairs" / "hstn_faces.yaml"))["pairs"]
    cfg = config.build(ap.AffinePairsConfig, {"input": {"shards": str(tmp_path)}, "output": {"uri": "unused"},
                                              "pairs": {**faces, "per_image": 2}})
    pairs = list(ap.AffinePairsStage(cfg).process(unit))
    assert [p["__key__"] for p in pairs] == [f"{schema.sample_key(i)}_{k:03d}" for i in (1, 2) for k in (0, 1)]
    for p in pairs:
        pair = p[ap.PAIR]
        assert pair["params"]["flip"] is False and pair["elastic"]["inverse_max_residual_px"] < 1e-2
        kp = pair["keypoints"]
        source, target, inside = np.array(kp["source"]), np.array(kp["target"]), np.array(kp["inside"])
        assert len(source) == len(target) == len(inside) == 68 * (7 if pair["image_id"] == 1 else 2)
        assert inside.mean() > 0.9
        # the landmarks land where the ground truth says: flow_t2s at each target point leads back to its source
        # point, and they sit on the warped face masks about as often as on the source's
        back = sample_points(flow(p[ap.FLOW_T2S]), target[inside])
        assert np.abs(back - source[inside]).max() < 0.05
        on_mask = [(schema.load_png(p[m]) > 0)[pts[:, 1], pts[:, 0]].mean()
                   for m, pts in ((ap.SOURCE_MASK, source[inside].round().astype(int)),
                                  (ap.TARGET_MASK, target[inside].round().astype(int)))]
        assert on_mask[0] > 0.7 and abs(on_mask[1] - on_mask[0]) < 0.1
