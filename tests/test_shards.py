"""Shard writing and reading: deterministic bytes, the fast tar reader against tar files other tools write, checksums."""

from __future__ import annotations

import io
import tarfile

import pytest

from maskflow import shards


def samples(n: int) -> list[dict]:
    return [{"__key__": f"{i:06d}", "image": bytes([i % 256]) * (100 + 511 * i), "json": {"i": i}} for i in range(n)]


def test_write_is_deterministic_and_reads_back(tmp_path):
    a = shards.write_shard(str(tmp_path / "a" / "shard-000000.tar"), samples(5))
    b = shards.write_shard(str(tmp_path / "b" / "shard-000000.tar"), samples(5))
    assert a["sha256"] == b["sha256"] and a["samples"] == 5
    got = [shards.decode(s) for s in shards.iter_shard(str(tmp_path / "a" / "shard-000000.tar"))]
    assert [g["__key__"] for g in got] == [f"{i:06d}" for i in range(5)]
    assert got[3]["image"] == bytes([3]) * (100 + 511 * 3) and got[3]["json"] == {"i": 3}
    # Python's tarfile agrees with what we wrote.
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as t:
        assert t.getnames()[:2] == ["000000.image", "000000.json"]


def test_keys_with_dots_are_refused():
    with pytest.raises(ValueError, match="must not contain"):
        shards.tar_bytes([{"__key__": "img.001", "image": b"x"}])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_understands_tars_written_by_tarfile(fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        members = [("sub/000001.image", b"a" * 700), ("sub/000001.json", b"{}"), ("sub/", None),
                   (("d" * 120 if fmt != tarfile.USTAR_FORMAT else "d") + "/000002.image", b"b")]
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
    got = list(shards.iter_tar_samples(io.BytesIO(buf.getvalue())))
    assert got == [{"__key__": "000001", "image": b"a" * 700, "json": b"{}"}, {"__key__": "000002", "image": b"b"}]


def test_corrupt_or_truncated_shards_fail_loudly():
    data, _ = shards.tar_bytes(samples(3))
    corrupt = bytearray(data)
    corrupt[1024 + 257] ^= 0xFF  # the second header's magic (after a 100-byte member padded to 512)
    with pytest.raises(tarfile.ReadError, match="not a ustar header"):
        list(shards.iter_tar_samples(io.BytesIO(bytes(corrupt))))
    with pytest.raises(tarfile.ReadError, match="not a ustar header"):
        list(shards.iter_tar_samples(io.BytesIO(b"\x89PNG" + bytes(600))))
    with pytest.raises(tarfile.ReadError, match="truncated"):
        list(shards.iter_tar_samples(io.BytesIO(data[:1200])))


def test_verify_catches_a_changed_shard(tmp_path):
    from maskflow import stage

    class Tiny(stage.Stage):
        name = "tiny"

        def plan(self):
            return stage.Plan([stage.WorkUnit(i, [i]) for i in range(2)])

        def process(self, unit):
            yield from samples(3)[unit.index:unit.index + 2]

    out = str(tmp_path / "out")
    manifest = stage.run_stage(Tiny(), stage.OutputConfig(out, 2), stage.ComputeConfig(), None, None)
    assert manifest["samples"] == 4 and shards.verify(out) == []
    (tmp_path / "out" / "shard-000001.tar").write_bytes(shards.tar_bytes(samples(1))[0])
    assert shards.verify(out) == ["shard-000001.tar: checksum mismatch (damaged or missing samples: 000001, 000002)"]
    # One byte changed inside one sample's member (same length: the tar still reads): that sample is named.
    data = bytearray(shards.tar_bytes(samples(3)[1:3])[0])
    data[data.index(b"000002.json") + 512] ^= 0x01  # the first data byte of 000002.json
    (tmp_path / "out" / "shard-000001.tar").write_bytes(bytes(data))
    assert shards.verify(out) == ["shard-000001.tar: checksum mismatch (damaged or missing samples: 000002)"]


def test_input_shard_checked_against_its_manifest_keys(tmp_path):
    """What a consuming stage sees of a damaged input shard: every listed sample arrives or is rejected with the
    reason (absent, shard missing, shard truncated); a sample the manifest does not list is set aside."""
    from maskflow import stage

    uri = str(tmp_path / "shard-000000.tar")
    record = shards.write_shard(uri, samples(4))
    assert record["keys"] == [f"{i:06d}" for i in range(4)]

    def seen(keys, at=uri):
        out = list(stage.iter_input_shard(stage.InputShard(at, keys, len(keys))))
        return ([s["__key__"] for s in out if isinstance(s, dict)],
                [(r.key, r.kind, r.reason) for r in out if isinstance(r, stage.Reject)])

    good, rejects = seen(record["keys"] + ["000009"])
    assert good == record["keys"] and rejects == [("000009", "sample", stage.LACKS_LISTED_SAMPLE)]
    good, rejects = seen(record["keys"][1:])
    assert good == record["keys"][1:] and rejects == [("000000", "unlisted", stage.UNLISTED_SAMPLE)]
    good, rejects = seen(record["keys"], at=str(tmp_path / "gone.tar"))
    assert good == [] and {r[2] for r in rejects} == {stage.INPUT_SHARD_MISSING} and len(rejects) == 4
    data = (tmp_path / "shard-000000.tar").read_bytes()
    boundary = data.index(b"000003.json")  # a copy cut off between two members, or inside one
    for cut in (boundary, boundary + 700):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        good, rejects = seen(record["keys"], at=str(tmp_path / "cut.tar"))
        assert good == record["keys"][:3] and [r[0] for r in rejects] == ["000003"]
        assert rejects[0][2].startswith("input shard unreadable after 3 samples: ReadError: truncated tar")


def rewrite_shard(shard_uri: str, new_samples: list[dict], options=None) -> dict:
    """Rewrite one shard of a finished stage output as its *writer* might have written it (for tests of the
    checks made after the checksums): the manifest keeps the keys it lists, and each sample still in the shard gets
    its new per-sample checksum, so a dropped sample is missing and an edited one is intact but wrong. (A bad *copy*
    of a sample, by contrast, is a checksum mismatch.) Returns the shard's new record."""
    import json

    from maskflow import storage

    options = options or storage.DEFAULT_OPTIONS
    output_uri, name = shard_uri.rsplit("/", 1)
    manifest = shards.read_manifest(output_uri, options)
    (entry,) = [e for e in manifest["shards"] if e["name"] == name]
    record = shards.write_shard(shard_uri, new_samples, options)
    new = dict(zip(record["keys"], record["sample_sha256"]))
    entry["sample_sha256"] = [new.get(k, d) for k, d in zip(entry["keys"], entry["sample_sha256"])]
    storage.write_text(storage.join(output_uri, shards.MANIFEST), json.dumps(manifest, indent=1), options)
    return record


def test_sample_digests_written_and_checked(tmp_path):
    """Each sample's checksum (one function for writer and reader): a sample whose bytes changed in place is
    rejected naming the shard and the key and is never yielded; the others arrive; a manifest without checksums
    (older maskflow) still reads."""
    from maskflow import stage

    uri = str(tmp_path / "shard-000000.tar")
    record = shards.write_shard(uri, samples(4))
    assert len(record["sample_sha256"]) == len(record["keys"]) == 4
    # The digest is over the members as written: name, NUL, 8-byte big-endian length, data.
    import hashlib

    s0 = samples(1)[0]
    h = hashlib.sha256()
    for name, data in (("000000.image", s0["image"]), ("000000.json", shards.encode_entry(s0["json"]))):
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    assert record["sample_sha256"][0] == h.hexdigest()
    # Read back, every sample's digest agrees with the record's.
    got = list(shards.iter_shard(uri))
    assert [shards.sample_digest(shards.sample_entries(g)) for g in got] == record["sample_sha256"]

    data = bytearray((tmp_path / "shard-000000.tar").read_bytes())
    data[data.index(b"000001.image") + 512 + 50] ^= 0x10  # a bit inside 000001's image, in place
    data[data.index(b"000003.json") + 512] ^= 0x01  # and inside 000003's json
    (tmp_path / "bad.tar").write_bytes(bytes(data))

    def read(sums):
        shard = stage.InputShard(str(tmp_path / "bad.tar"), record["keys"], 4, sample_sha256=sums)
        out = list(stage.iter_input_shard(shard))
        return [s["__key__"] for s in out if isinstance(s, dict)], [r for r in out if isinstance(r, stage.Reject)]

    good, rejects = read(record["sample_sha256"])
    assert good == ["000000", "000002"]
    assert [(r.key, r.kind) for r in rejects] == [("000001", "sample"), ("000003", "sample")]
    for r in rejects:
        assert r.reason.startswith(stage.CHECKSUM_MISMATCH) and f"sample {r.key} in bad.tar" in r.reason
        assert r.source.endswith("bad.tar")
    good, rejects = read(None)  # an older manifest: no per-sample checksums, everything that reads arrives
    assert good == record["keys"] and rejects == []
