"""WebDataset shards on object storage: writing, reading and manifests.

A shard is a plain POSIX tar in WebDataset layout (``<key>.<suffix>`` entries, one sample's entries consecutive),
readable by ``webdataset.WebDataset`` and ``ray.data.read_webdataset``. Shards are written deterministically (fixed
member order, zeroed mtimes/owners), so the same samples always give the same bytes and the same checksum, and
atomically through :func:`maskflow.storage.atomic_writer`.

A stage's output directory holds::

    shard-000000.tar        the samples
    shard-000000.json       the shard's record (samples, keys, per-sample sha256, bytes, sha256, rejects, counts),
                            written after its tar
    ...
    rejects.jsonl           every rejected input with its reason
    manifest.json           written last: the list of complete shards, totals, config, code version

Consumers read shards through the manifest (:func:`shard_uris`), never by listing, so an unfinished job is never
mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any, Iterable, Iterator

from maskflow import storage
from maskflow.data import schema
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def record_name(index: int) -> str:
    return f"shard-{index:06d}.json"


def encode_entry(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return schema.dumps(value)


def sample_entries(sample: dict) -> list[tuple[str, bytes]]:
    """The tar members ``(name, data)`` of one sample (``{"__key__": str, suffix: value}``), in the order they are
    written (suffixes sorted) or, for a sample read back from a shard, in the order they were read."""
    key = sample["__key__"]
    return [(f"{key}.{suffix}", encode_entry(value)) for suffix, value in sample.items() if suffix != "__key__"]


def sample_digest(entries: Iterable[tuple[str, bytes]]) -> str:
    """sha256 (hex) of one sample's members in order: per member its name (UTF-8), a NUL, its length (8 bytes,
    big-endian), its data. The writer records it per sample and a reader checks it, with this one function, so
    damage to a single sample is caught (and named) without re-reading the whole shard."""
    h = hashlib.sha256()
    for name, data in entries:
        h.update(name.encode("utf-8"))
        h.update(b"\0")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def _tar(samples: Iterable[dict]) -> tuple[bytes, int, list[str]]:
    """(tar bytes, number of samples, per-sample digests) of a deterministic tar of ``samples``."""
    buf = io.BytesIO()
    digests: list[str] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
            entries = sample_entries({"__key__": key, **{k: sample[k] for k in sorted(sample) if k != "__key__"}})
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            digests.append(sample_digest(entries))
    return buf.getvalue(), len(digests), digests


def tar_bytes(samples: Iterable[dict]) -> tuple[bytes, int]:
    """Serialise samples (``{"__key__": str, suffix: bytes | str | JSON-able}``) into a deterministic tar.

    Returns (tar bytes, number of samples).
    """
    data, count, _ = _tar(samples)
    return data, count


def write_shard(uri: str, samples: Iterable[dict], options: StorageOptions = DEFAULT_OPTIONS) -> dict:
    """Write samples as one shard, atomically. Returns its record: name, samples, keys, sample_sha256, bytes, sha256.

    ``keys`` (the samples' keys in shard order) lets a consumer plan from the manifest alone (which shard holds which
    sample) and notice a shard that lacks a sample it should have; ``sample_sha256`` (parallel to ``keys``, see
    :func:`sample_digest`) lets it notice a sample whose bytes were damaged, and reject just that sample.
    """
    samples = list(samples)
    data, count, digests = _tar(samples)
    storage.write_bytes(uri, data, options)
    return {"name": storage.basename(uri), "samples": count, "keys": [s["__key__"] for s in samples],
            "sample_sha256": digests, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream: one ``read(512)`` per header, one read per member.

    Python's ``tarfile`` stream mode costs ~60 µs a member, which caps local shard reads at a fifth of raw read speed
    (bench/shard_read.py); this reader keeps up with the bytes. It verifies header checksums and understands the
    ustar, GNU long-name (``L``) and pax (``x``) headers that tar writers emit; other special members are skipped.
    """
    long_name: str | None = None
    while True:
        header = stream.read(512)
        if header == _ZERO_BLOCK:
            return
        if not header:  # a tar ends with zero blocks: a stream that stops at a member boundary was cut short
            raise tarfile.ReadError("truncated tar: no end-of-archive blocks")
        if len(header) < 512:
            raise tarfile.ReadError("truncated tar header")
        # The ustar magic catches misaligned or non-tar input; content integrity is the manifest's sha256
        # (:func:`verify`). Summing each header for its checksum would cost more than reading the data.
        if header[257:262] != b"ustar":
            raise tarfile.ReadError("not a ustar header (corrupt or misaligned tar)")
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise tarfile.ReadError("corrupt tar header (bad size field)") from None
        data = stream.read(size)
        if len(data) < size:
            raise tarfile.ReadError("truncated tar member")
        if size % 512:
            stream.read(512 - size % 512)
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind == b"x":  # pax extended header of the next member
            for record in data.decode("utf-8").split("\n"):
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0"):
            long_name = None
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
        yield long_name or (f"{prefix}/{name}" if prefix else name), data
        long_name = None


_ZERO_BLOCK = bytes(512)


def iter_tar_samples(stream) -> Iterator[dict]:
    """Group consecutive tar members by key into samples ``{"__key__": key, suffix: bytes}`` (streaming)."""
    current: dict | None = None
    for path, data in _tar_members(stream):
        base = path.rsplit("/", 1)[-1]
        if "." not in base:
            continue
        key, suffix = base.split(".", 1)
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key}
        current[suffix] = data
    if current is not None:
        yield current


def iter_shard(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> Iterator[dict]:
    """Stream the samples of one shard (local or s3://); values are raw bytes, decode with :func:`decode`."""
    with storage.open_uri(uri, "rb", options) as f:
        yield from iter_tar_samples(f)


def decode(sample: dict) -> dict:
    """JSON entries parsed, binary entries left as bytes (never unpickle: shards are data, not code)."""
    out = {}
    for k, v in sample.items():
        out[k] = schema.loads(v) if k.endswith("json") and isinstance(v, (bytes, str)) else v
    return out


# --------------------------------------------------------------------------------------------- manifests


def read_manifest(output_uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> dict:
    """The manifest of a finished stage output; FileNotFoundError if the stage has not finished."""
    return json.loads(storage.read_text(storage.join(output_uri, MANIFEST), options))


def try_read_manifest(output_uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> dict | None:
    try:
        return read_manifest(output_uri, options)
    except FileNotFoundError:
        return None


def shard_uris(output_uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> list[str]:
    """URIs of the complete, non-empty shards of a finished stage output, in order."""
    manifest = read_manifest(output_uri, options)
    return [storage.join(output_uri, s["name"]) for s in manifest["shards"] if s["samples"] > 0]


def iter_samples(output_uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> Iterator[dict]:
    """Every decoded sample of a finished stage output, in shard order."""
    for uri in shard_uris(output_uri, options):
        for sample in iter_shard(uri, options):
            yield decode(sample)


def verify(output_uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> list[str]:
    """Check every shard against the manifest's byte count and checksum; returns the problems found. Where the
    manifest has per-sample checksums, a changed shard's problem names the samples that are damaged or missing."""
    problems = []
    for rec in read_manifest(output_uri, options)["shards"]:
        if rec["samples"] == 0:
            continue
        data = storage.read_bytes(storage.join(output_uri, rec["name"]), options)
        if len(data) != rec["bytes"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
            problems.append(f"{rec['name']}: checksum mismatch{_damaged_samples(data, rec)}")
    return problems


def _damaged_samples(data: bytes, rec: dict, show: int = 10) -> str:
    """`` (damaged or missing samples: k1, k2...)`` for a changed shard whose record has per-sample checksums."""
    keys, digests = rec.get("keys"), rec.get("sample_sha256")
    if not keys or not digests or len(keys) != len(digests):
        return ""
    expected, intact = dict(zip(keys, digests)), set()
    try:
        for sample in iter_tar_samples(io.BytesIO(data)):
            key = sample["__key__"]
            if key in expected and sample_digest(sample_entries(sample)) == expected[key]:
                intact.add(key)
    except (tarfile.ReadError, UnicodeDecodeError):
        pass  # a cut or garbled tar: what was not read intact is listed below
    bad = [k for k in keys if k not in intact]
    more = f" and {len(bad) - show} more" if len(bad) > show else ""
    return f" (damaged or missing samples: {', '.join(bad[:show])}{more})" if bad else ""
