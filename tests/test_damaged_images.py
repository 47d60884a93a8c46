"""Damaged data is rejected, never fatal: a fuzz corpus of damaged PNG and JPEG files, made from real images, goes
through :func:`maskflow.data.validate.decode_image` (in a subprocess, so a decoder that crashed the process would be
seen as a signal rather than take pytest down), through the ingest stage, and, as damaged shard members, through a
stage's shard read.

The corpus (seeded, 90 files): for each of 2 Penn-Fudan PNGs and 2 COCO JPEGs, 22 damaged versions
(random bit flips in the pixel data at 4 densities x 3 seeds; the known libpng crash recipe, 64 bytes scrambled inside
one IDAT chunk (or the JPEG scan) x 2 seeds; truncation at 5 points; wrong magic; all-zero bytes of the same length),
plus one zero-length file per format.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from maskflow import shards, stage, storage
from maskflow.data import schema
from maskflow.data.validate import CORRUPT_IMAGE

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "png": ["penn_fudan_ped/PNGImages/FudanPed00001.png", "penn_fudan_ped/PNGImages/FudanPed00027.png"],
    "jpg": ["coco128_seg/images/train2017/000000000009.jpg", "coco128_seg/images/train2017/000000000025.jpg"],
}
FLIP_DENSITIES = (1, 8, 64, 512)  # bytes with one bit flipped, spread over the pixel data
FLIP_SEEDS = 3
SCRAMBLE_SEEDS = 2
TRUNCATE_AT = (0.0, 0.25, 0.5, 0.9, 0.999)  # fractions of the pixel data kept
PER_IMAGE = len(FLIP_DENSITIES) * FLIP_SEEDS + SCRAMBLE_SEEDS + len(TRUNCATE_AT) + 2
PNG_CRC_FIXED = 2 * FLIP_SEEDS + SCRAMBLE_SEEDS  # bitflip-64, bitflip-512 and scramble-64 again, CRCs recomputed
CORPUS_SIZE = 2 * (2 * PER_IMAGE + 1) + 2 * PNG_CRC_FIXED


# --------------------------------------------------------------------------------------------- the corpus


def png_data_ranges(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each IDAT chunk's data in a PNG."""
    ranges, p = [], 8
    while p + 8 <= len(data):
        length = int.from_bytes(data[p:p + 4], "big")
        if data[p + 4:p + 8] == b"IDAT":
            ranges.append((p + 8, p + 8 + length))
        p += 12 + length
    return ranges


def jpeg_data_ranges(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the entropy-coded scan data of a baseline JPEG: after the SOS segment, up to the EOI."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    return [(start, len(data) - 2)]


def damaged_versions(data: bytes, fmt: str, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """``(kind, bytes)`` of every damaged version of one image (see the module docstring)."""
    ranges = png_data_ranges(data) if fmt == "png" else jpeg_data_ranges(data)
    positions = np.concatenate([np.arange(a, b) for a, b in ranges])
    out = []
    for n in FLIP_DENSITIES:
        for seed in range(FLIP_SEEDS):
            bad = bytearray(data)
            for p in rng.choice(positions, n, replace=False):
                bad[p] ^= 1 << int(rng.integers(8))
            out.append((f"bitflip-{n}", bytes(bad)))
    first = ranges[0]
    for seed in range(SCRAMBLE_SEEDS):  # what crashed torchvision's PNG decoder: 64 bytes of one IDAT chunk
        bad = bytearray(data)
        for p in rng.choice(np.arange(first[0] + min(100, (first[1] - first[0]) // 2), min(first[1], first[0] + 8192)),
                            64, replace=False):
            bad[p] ^= int(rng.integers(1, 256))
        out.append(("scramble-64", bytes(bad)))
    start, end = ranges[0][0], ranges[-1][1]
    for f in TRUNCATE_AT:
        out.append((f"truncate-{f:g}", data[:start + int(f * (end - start))]))
    magic = bytearray(data)
    magic[:8 if fmt == "png" else 4] = b"GIF87a\x00\x00"[:8 if fmt == "png" else 4]
    out.append(("wrong-magic", bytes(magic)))
    out.append(("all-zero", bytes(len(data))))
    if fmt == "png":  # the same damage with every chunk's CRC made to match: what the decoder itself does with it
        out += [(f"{kind}-crc-fixed", fix_png_crcs(bad)) for kind, bad in out
                if kind in ("bitflip-64", "bitflip-512", "scramble-64")]
    return out


def fix_png_crcs(data: bytes) -> bytes:
    """The PNG with each chunk's CRC-32 recomputed (so damaged pixel data gets past the checksums)."""
    import zlib

    out, p = bytearray(data), 8
    while p + 12 <= len(out):
        length = int.from_bytes(out[p:p + 4], "big")
        end = p + 12 + length
        out[end - 4:end] = zlib.crc32(out[p + 4:end - 4]).to_bytes(4, "big")
        p = end
    return bytes(out)


def build_corpus(shared_data: Path, directory: Path) -> list[dict]:
    """Write the corpus under ``directory``; returns one entry per file: path, format, kind, source image."""
    rng = np.random.default_rng(20240611)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for fmt, names in SOURCES.items():
        for name in names:
            original = (shared_data / name).read_bytes()
            for kind, data in damaged_versions(original, fmt, rng):
                path = directory / f"{len(entries):03d}-{kind}.{fmt}"
                path.write_bytes(data)
                entries.append({"path": str(path), "format": fmt, "kind": kind, "source": name})
        path = directory / f"{len(entries):03d}-zero-length.{fmt}"
        path.write_bytes(b"")
        entries.append({"path": str(path), "format": fmt, "kind": "zero-length", "source": ""})
    assert len(entries) == CORPUS_SIZE
    return entries


# --------------------------------------------------------------------------------------------- decoding in a subprocess

CRASH_SENTINEL = "<crash>"  # a "file" the worker answers by crashing: proves the harness sees crashes
WORKER = r"""
import faulthandler, json, sys
from pathlib import Path
from maskflow.data.validate import decode_image

faulthandler.disable()
for path in sys.argv[1:]:
    print(json.dumps({"path": path, "event": "start"}), flush=True)
    if path == "<crash>":
        faulthandler._sigsegv()
    try:
        image = decode_image(Path(path).read_bytes())
        result = {"outcome": "decoded", "shape": list(image.shape)}
    except ValueError as e:
        result = {"outcome": "rejected", "reason": str(e)}
    except BaseException as e:  # anything else breaks the contract: a ValueError or an image
        result = {"outcome": "error", "reason": f"{type(e).__name__}: {e}"}
    print(json.dumps({"path": path, "event": "done", **result}), flush=True)
"""


def decode_in_subprocess(paths: list[str]) -> dict[str, dict]:
    """``{path: {"outcome": "decoded" | "rejected" | "error" | "crashed", ...}}``: each file decoded by a worker
    process; a worker that dies (signal, abort) marks the file it was on as crashed and a new worker goes on."""
    results: dict[str, dict] = {}
    remaining = list(paths)
    while remaining:
        proc = subprocess.run([sys.executable, "-c", WORKER, *remaining], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONFAULTHANDLER": ""})
        started = None
        for line in proc.stdout.splitlines():
            event = json.loads(line)
            if event["event"] == "start":
                started = event["path"]
            else:
                results[event["path"]] = event
                started = None
        if proc.returncode == 0:
            assert started is None and len(results) == len(paths), proc.stderr[-2000:]
            break
        assert started is not None, f"worker failed outside a decode (rc {proc.returncode}): {proc.stderr[-2000:]}"
        results[started] = {"outcome": "crashed", "returncode": proc.returncode}
        remaining = remaining[remaining.index(started) + 1:]
    return results


def check_reason(reason: str) -> None:
    """A reject reason in our words: one line, the corrupt-image prefix, no library path or source file."""
    assert reason.startswith(f"{CORRUPT_IMAGE}: "), reason
    assert "\n" not in reason and "/" not in reason and "\\" not in reason, reason
    assert ".cpp" not in reason and ".c:" not in reason and "0x" not in reason, reason


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> list[dict]:
    return build_corpus(shared_data, tmp_path_factory.mktemp("damaged"))


@pytest.fixture(scope="module")
def decoded(corpus) -> dict[str, dict]:
    return decode_in_subprocess([e["path"] for e in corpus])


def test_harness_sees_a_crash(shared_data):
    png, jpg = str(shared_data / SOURCES["png"][0]), str(shared_data / SOURCES["jpg"][0])
    results = decode_in_subprocess([png, CRASH_SENTINEL, jpg])
    assert results[CRASH_SENTINEL]["outcome"] == "crashed" and results[CRASH_SENTINEL]["returncode"] < 0
    assert results[png]["outcome"] == results[jpg]["outcome"] == "decoded"  # the one after the crash too


def tally(corpus: list[dict], decoded: dict[str, dict]) -> dict[tuple[str, str], Counter]:
    """(format, kind family) -> Counter of outcomes."""
    out: dict[tuple[str, str], Counter] = {}
    for e in corpus:
        family = e["kind"].split("-")[0] if e["kind"].startswith(("bitflip", "truncate")) else e["kind"]
        out.setdefault((e["format"], family), Counter())[decoded[e["path"]]["outcome"]] += 1
    return out


def test_damaged_files_never_crash_and_are_rejected(corpus, decoded):
    counts = tally(corpus, decoded)
    print("\n" + "\n".join(f"{fmt:4s} {kind:12s} {dict(c)}" for (fmt, kind), c in sorted(counts.items())))
    outcomes = Counter(r["outcome"] for r in decoded.values())
    # Zero crashes, no other exception than the corrupt-image ValueError; the counts add up to the corpus.
    assert outcomes["crashed"] == 0 and outcomes["error"] == 0, outcomes
    assert outcomes["rejected"] + outcomes["decoded"] == len(corpus) == CORPUS_SIZE
    for r in decoded.values():
        if r["outcome"] == "rejected":
            check_reason(r["reason"])
    # Every damaged PNG is rejected (each chunk's CRC is checked), and every JPEG too except bit flips inside the
    # scan data, which a JPEG cannot notice (no checksum): those may decode to damaged pixels, at the right size.
    for (fmt, kind), c in counts.items():
        if fmt == "png" or kind not in ("bitflip", "scramble-64"):
            assert c == Counter(rejected=sum(c.values())), (fmt, kind, c)
    for e in corpus:
        r = decoded[e["path"]]
        if r["outcome"] == "decoded":
            assert e["format"] == "jpg" and r["shape"][0] == 3
    assert outcomes["rejected"] > 0.75 * len(corpus)


# --------------------------------------------------------------------------------------------- through ingest


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def mixed_coco(penn_fudan_coco, shared_data: Path, directory: Path, damaged: list[dict]) -> tuple[str, str, dict]:
    """A COCO json over ``directory``: 4 good Penn-Fudan images with their annotations, 2 good COCO JPEGs without
    any, and every ``damaged`` file (no annotations; the size its original has). Returns (json, images dir,
    {image id: corpus entry or None for a good image})."""
    from maskflow.data.coco import load_coco_json, write_coco_json

    annotations, pf_images = penn_fudan_coco
    pf = load_coco_json(annotations)
    directory.mkdir()
    images, anns, entry_of = [], [], {}
    for img in pf["images"][:4]:
        shutil.copy(f"{pf_images}/{img['file_name']}", directory / img["file_name"])
        images.append(img)
        anns += [a for a in pf["annotations"] if a["image_id"] == img["id"]]
        entry_of[img["id"]] = None
    extra = [(shared_data / name, None) for name in SOURCES["jpg"]] + [(Path(e["path"]), e) for e in damaged]
    for n, (path, entry) in enumerate(extra):
        image_id = 1000 + n
        size_of = shared_data / entry["source"] if entry and entry["source"] else path
        height, width = image_size(size_of) if size_of.suffix and size_of.stat().st_size else (480, 640)
        shutil.copy(path, directory / path.name)
        images.append({"id": image_id, "file_name": path.name, "height": height, "width": width})
        entry_of[image_id] = entry
    path = directory.parent / "instances.json"
    write_coco_json({**pf, "images": images, "annotations": anns}, str(path))
    return str(path), str(directory), entry_of


def test_ingest_rejects_every_undecodable_image(ray_local, penn_fudan_coco, shared_data, corpus, decoded, tmp_path):
    from tests.test_ingest import run_ingest

    annotations, images, entry_of = mixed_coco(penn_fudan_coco, shared_data, tmp_path / "images", corpus)
    out = tmp_path / "shards"
    manifest = run_ingest(annotations, images, str(out), storage.DEFAULT_OPTIONS, per_shard=16)  # the job finished
    rejects = {r["key"]: r for r in map(json.loads, (out / shards.REJECTS).read_text().splitlines())}

    undecodable = {schema.sample_key(i) for i, e in entry_of.items() if e and decoded[e["path"]]["outcome"] != "decoded"}
    assert all(decoded[e["path"]]["outcome"] in ("decoded", "rejected") for e in entry_of.values() if e)
    assert len(undecodable) > 0.75 * len(corpus)
    # Every undecodable image is rejected with the corrupt-image reason (and its file name); everything else arrived.
    assert {k for k, r in rejects.items() if r["kind"] == "sample"} == undecodable
    for key in undecodable:
        check_reason(rejects[key]["reason"])
    arrived = {s["__key__"] for s in shards.iter_samples(str(out))}
    assert arrived == {schema.sample_key(i) for i in entry_of} - undecodable
    assert manifest["inputs"] == len(entry_of) == manifest["samples"] + manifest["rejected"]
    assert manifest["rejected"] == len(undecodable) and shards.verify(str(out)) == []


# --------------------------------------------------------------------------------------------- through a shard read


def damage_member(shard: Path, member: str, rng: np.random.Generator, n: int = 64) -> None:
    """Scramble ``n`` bytes of one member's data inside a shard tar, in place (same length: the tar still reads)."""
    data = bytearray(shard.read_bytes())
    header = data.index(member.encode() + b"\0")
    assert header % 512 == 0
    size = int(data[header + 124:header + 136].rstrip(b"\0 "), 8)
    start = header + 512
    for p in rng.choice(np.arange(start + min(100, size // 2), start + size), min(n, size // 2), replace=False):
        data[p] ^= int(rng.integers(1, 256))
    shard.write_bytes(bytes(data))


def test_damaged_shard_members_are_rejected_by_their_checksums(ray_local, penn_fudan_coco, shared_data, tmp_path):
    """Image shards (8 samples in shards of 3) damaged in place (64 bytes of a PNG's pixel data — torchvision's crash
    recipe — and of one sample's json) and cut short (a second shard, inside its second sample's json), read by the
    instance-maps stage: the damaged samples are rejected by their checksums naming the shard and the key, the cut
    shard's lost samples as unreadable, nothing crashes, the counts add up."""
    from maskflow import config
    from maskflow.stages import instance_maps as im
    from maskflow.stages.inputs import open_image_sample
    from tests.test_ingest import run_ingest

    annotations, images, entry_of = mixed_coco(penn_fudan_coco, shared_data, tmp_path / "images", [])
    pngs = [k for k, e in entry_of.items() if k < 1000]
    coco = json.loads(Path(annotations).read_text())
    coco["images"] = [i for i in coco["images"] if i["id"] in pngs] * 2  # 8 samples: 4 PNGs, each twice
    for n, img in enumerate(coco["images"]):
        coco["images"][n] = {**img, "id": img["id"] + 100 * (n // len(pngs))}
    coco["annotations"] = [{**a, "id": a["id"] + 10**6 * (n + 1), "image_id": a["image_id"] + 100 * n}
                           for n in range(2) for a in coco["annotations"] if a["image_id"] in pngs]
    Path(annotations).write_text(json.dumps(coco))
    image_shards = tmp_path / "image-shards"
    first = run_ingest(annotations, images, str(image_shards), storage.DEFAULT_OPTIONS, per_shard=3)
    assert [s["samples"] for s in first["shards"]] == [3, 3, 2]
    keys = [s["keys"] for s in first["shards"]]

    rng = np.random.default_rng(7)
    shard0, shard1 = image_shards / first["shards"][0]["name"], image_shards / first["shards"][1]["name"]
    damage_member(shard0, f"{keys[0][0]}.{schema.IMAGE}", rng)  # inside the PNG's IDAT data
    damage_member(shard0, f"{keys[0][2]}.{schema.META}", rng, n=4)
    data = shard1.read_bytes()
    shard1.write_bytes(data[:data.index(f"{keys[1][1]}.{schema.META}".encode()) + 512 + 10])  # cut in sample 2
    assert shards.verify(str(image_shards)) == [
        f"shard-000000.tar: checksum mismatch (damaged or missing samples: {keys[0][0]}, {keys[0][2]})",
        f"shard-000001.tar: checksum mismatch (damaged or missing samples: {keys[1][1]}, {keys[1][2]})"]
    damaged = {keys[0][0]: "shard-000000.tar", keys[0][2]: "shard-000000.tar"}
    lost = {keys[1][1], keys[1][2]}

    def expect_rejects(rejects: dict[str, str]) -> None:
        assert set(rejects) == set(damaged) | lost
        for key, name in damaged.items():
            assert rejects[key] == (f"{stage.CHECKSUM_MISMATCH}: sample {key} in {name} differs from its manifest "
                                    "(damaged data)")
        for key in lost:
            assert rejects[key].startswith("input shard unreadable after 1 samples: ReadError: truncated tar")

    # The stage's read, in this process: each arriving sample checked, then decoded like the stages do.
    got, rejects = [], {}
    for shard in stage.input_shards(str(image_shards)):
        assert shard.sample_sha256 is not None
        for item in stage.iter_input_shard(shard):
            opened = item if isinstance(item, stage.Reject) else open_image_sample(item, shard.uri)
            if isinstance(opened, stage.Reject):
                rejects[opened.key] = opened.reason
            else:
                got.append(item["__key__"])
    expect_rejects(rejects)
    assert len(got) + len(rejects) == 8

    # Without the per-sample checksums (a manifest from an older maskflow) the damaged PNG still never crashes
    # anything: its decode is a corrupt-image reject.
    shard = stage.input_shards(str(image_shards))[0]
    shard.sample_sha256 = None
    old = {}
    for item in stage.iter_input_shard(shard):
        opened = item if isinstance(item, stage.Reject) else open_image_sample(item, shard.uri)
        if isinstance(opened, stage.Reject):
            old[opened.key] = opened.reason
    check_reason(old[keys[0][0]])

    # The whole stage on Ray: the job finishes, the same samples are rejected for the same reasons.
    out = tmp_path / "maps"
    cfg = config.build(im.InstanceMapsConfig, {"input": {"shards": str(image_shards)}, "output": {"uri": str(out)},
                                               "resize": {"mode": "square", "size": 64}})
    manifest = stage.run_stage(im.InstanceMapsStage(cfg), cfg.output, cfg.compute, None, cfg)
    assert manifest["inputs"] == 8 == manifest["samples"] + manifest["rejected"]
    assert manifest["rejected"] == len(damaged) + len(lost)
    expect_rejects({r["key"]: r["reason"] for r in map(json.loads, (out / shards.REJECTS).read_text().splitlines())})
    assert sorted(s["__key__"] for s in shards.iter_samples(str(out))) == sorted(got)
