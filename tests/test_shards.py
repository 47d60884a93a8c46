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
    assert shards.verify(out) == ["shard-000001.tar: checksum mismatch"]


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
