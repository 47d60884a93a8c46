"""maskflow.storage against real backends: the local filesystem and moto's S3 server on 127.0.0.1 (conftest)."""

from __future__ import annotations

import os

import pytest

from maskflow import storage
from maskflow.storage import StorageError, StorageOptions

# --------------------------------------------------------------------------------------------- URIs


def test_parse_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.parse("/abs/dir/file.json") == storage.Location("file", "", "/abs/dir/file.json")
    rel = storage.parse("sub/file.json")
    assert rel.scheme == "file" and rel.bucket == ""
    assert rel.path == os.path.join(str(tmp_path), "sub", "file.json")  # relative paths become absolute
    assert storage.parse("file:///abs/dir/x.bin") == storage.Location("file", "", "/abs/dir/x.bin")
    assert storage.parse("/abs/dir/file.json").uri == "/abs/dir/file.json"
    assert storage.is_s3("/abs/x") is False and storage.is_s3("file:///abs/x") is False


def test_parse_s3():
    loc = storage.parse("s3://bucket/some/key.json")
    assert loc == storage.Location("s3", "bucket", "some/key.json")
    assert loc.uri == "s3://bucket/some/key.json"
    assert storage.parse("s3://bucket") == storage.Location("s3", "bucket", "")
    assert storage.parse("s3://bucket/") == storage.Location("s3", "bucket", "")
    assert storage.is_s3("s3://bucket/k") is True


@pytest.mark.parametrize("bad", ["", "gs://bucket/key", "http://host/x", "s3://", "s3:///key-without-bucket", None, 3])
def test_parse_rejects_bad_uris(bad):
    with pytest.raises(StorageError) as e:
        storage.parse(bad)
    assert "\n" not in str(e.value)


def test_parse_s3_key_with_hash_and_question_mark():
    assert storage.parse("s3://bucket/images/frame#12.jpg").path == "images/frame#12.jpg"
    assert storage.parse("s3://bucket/a?b.png").path == "a?b.png"


def test_join():
    assert storage.join("s3://b/prefix", "shards", "x.tar") == "s3://b/prefix/shards/x.tar"
    assert storage.join("s3://b/prefix/", "/shards/", "x.tar") == "s3://b/prefix/shards/x.tar"
    assert storage.join("s3://b", "x.tar") == "s3://b/x.tar"
    assert storage.join("s3://b/p", "", "x") == "s3://b/p/x"  # empty parts are skipped
    assert storage.join("/data/out", "a", "b.json") == "/data/out/a/b.json"
    assert storage.join("file:///data/out", "a.json") == "/data/out/a.json"  # file:// becomes a plain path


def test_basename():
    assert storage.basename("s3://b/p/shard-000001.tar") == "shard-000001.tar"
    assert storage.basename("s3://b/p/dir/") == "dir"
    assert storage.basename("/data/out/manifest.json") == "manifest.json"
    assert storage.basename("file:///data/out/") == "out"


def test_local_path():
    assert storage.local_path("file:///x/y") == "/x/y"
    with pytest.raises(StorageError):
        storage.local_path("s3://b/k")


# --------------------------------------------------------------------------------------------- I/O round trips


def _round_trip(base: str, options: StorageOptions) -> None:
    a, b, nested = storage.join(base, "a.bin"), storage.join(base, "b.txt"), storage.join(base, "sub", "c.bin")
    assert storage.exists(a, options) is False
    assert storage.list_names(base, options) == []

    storage.write_bytes(a, b"\x00\x01payload", options)
    storage.write_text(b, "héllo", options)
    storage.write_bytes(nested, b"nested", options)

    assert storage.exists(a, options) is True
    assert storage.read_bytes(a, options) == b"\x00\x01payload"
    assert storage.read_text(b, options) == "héllo"
    assert storage.read_bytes(nested, options) == b"nested"
    assert storage.list_names(base, options) == ["a.bin", "b.txt", "sub"]  # sorted, one level only
    assert storage.list_names(storage.join(base, "sub"), options) == ["c.bin"]

    storage.write_bytes(a, b"overwritten", options)
    assert storage.read_bytes(a, options) == b"overwritten"

    storage.delete(a, options)
    assert storage.exists(a, options) is False
    assert storage.list_names(base, options) == ["b.txt", "sub"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(a, options)


def test_local_round_trip(tmp_path):
    _round_trip(str(tmp_path / "out"), storage.DEFAULT_OPTIONS)
    _round_trip("file://" + str(tmp_path / "out2"), storage.DEFAULT_OPTIONS)
    storage.delete(str(tmp_path / "out"))  # a directory is removed recursively
    assert not (tmp_path / "out").exists()


def test_s3_round_trip(s3_bucket, s3_options):
    _round_trip(f"s3://{s3_bucket}/run1", s3_options)
    # the objects really are on the endpoint (checked with boto3, not through the module under test)
    keys = [o["Key"] for o in storage.s3_client(s3_options).list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(keys) == ["run1/b.txt", "run1/sub/c.bin"]


def test_read_missing_raises_file_not_found(tmp_path, s3_bucket, s3_options):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "nope.bin"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{s3_bucket}/nope.bin", s3_options)


def test_open_missing_s3_key_raises_file_not_found(s3_bucket, s3_options):
    """smart_open says OSError for a missing key; the storage module says what it is, as for local files, so a
    consumer can tell a missing input shard (rejected) from an I/O failure (retried)."""
    from maskflow import stage

    uri = f"s3://{s3_bucket}/out/shard-000000.tar"
    with pytest.raises(FileNotFoundError):
        storage.open_uri(uri, "rb", s3_options)
    rejects = list(stage.iter_input_shard(stage.InputShard(uri, ["000001", "000002"], 2), s3_options))
    assert [(r.key, r.reason) for r in rejects] == [("000001", stage.INPUT_SHARD_MISSING),
                                                     ("000002", stage.INPUT_SHARD_MISSING)]


def test_list_names_hides_temporaries_local(tmp_path):
    (tmp_path / f"{storage.TMP_PREFIX}abc-shard.tar").write_bytes(b"partial")
    (tmp_path / "shard.tar").write_bytes(b"done")
    assert storage.list_names(str(tmp_path)) == ["shard.tar"]
    assert storage.list_names(str(tmp_path / "missing-dir")) == []
    # while a write is in flight its temporary exists on disk but is not listed
    with storage.atomic_writer(str(tmp_path / "new.tar")) as f:
        f.write(b"x")
        on_disk = os.listdir(tmp_path)
        assert sum(n.startswith(storage.TMP_PREFIX) for n in on_disk) == 2
        assert storage.list_names(str(tmp_path)) == ["shard.tar"]
        assert not storage.exists(str(tmp_path / "new.tar"))
    assert storage.list_names(str(tmp_path)) == ["new.tar", "shard.tar"]
    assert storage.remove_stale_temporaries(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == ["new.tar", "shard.tar"]


def test_list_names_hides_temporaries_s3(s3_bucket, s3_options):
    client = storage.s3_client(s3_options)
    client.put_object(Bucket=s3_bucket, Key=f"p/{storage.TMP_PREFIX}123-x.tar", Body=b"partial")
    client.put_object(Bucket=s3_bucket, Key="p/x.tar", Body=b"done")
    assert storage.list_names(f"s3://{s3_bucket}/p", s3_options) == ["x.tar"]
    assert storage.list_names(f"s3://{s3_bucket}", s3_options) == ["p"]
    uri = f"s3://{s3_bucket}/p/new.tar"
    with storage.atomic_writer(uri, s3_options) as f:
        f.write(b"y" * 1000)
        assert not storage.exists(uri, s3_options)  # invisible until the upload completes
        assert storage.list_names(f"s3://{s3_bucket}/p", s3_options) == ["x.tar"]
    assert storage.read_bytes(uri, s3_options) == b"y" * 1000


class Boom(Exception):
    pass


def test_atomic_writer_exception_leaves_nothing_local(tmp_path):
    target = tmp_path / "out" / "obj.bin"
    with pytest.raises(Boom):
        with storage.atomic_writer(str(target)) as f:
            f.write(b"half")
            raise Boom()
    assert not target.exists()
    assert os.listdir(tmp_path / "out") == []  # no temporary left behind
    # an existing object is not replaced by a failed write either
    storage.write_bytes(str(target), b"old")
    with pytest.raises(Boom):
        with storage.atomic_writer(str(target)) as f:
            f.write(b"new")
            raise Boom()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path / "out") == ["obj.bin"]


def test_atomic_writer_exception_leaves_nothing_s3(s3_bucket, s3_options, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # any spill of the spool would land here
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    uri = f"s3://{s3_bucket}/k/obj.bin"
    with pytest.raises(Boom):
        with storage.atomic_writer(uri, s3_options) as f:
            f.write(b"half")
            raise Boom()
    assert not storage.exists(uri, s3_options)
    assert storage.s3_client(s3_options).list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------- other clients


def test_pyarrow_filesystem_reaches_endpoint(s3_bucket, s3_options):
    assert "AWS_ENDPOINT_URL" not in os.environ and "AWS_ENDPOINT_URL_S3" not in os.environ
    storage.s3_client(s3_options).put_object(Bucket=s3_bucket, Key="pa/obj.bin", Body=b"written by boto3")
    fs, path = storage.pyarrow_filesystem(f"s3://{s3_bucket}/pa/obj.bin", s3_options)
    assert path == f"{s3_bucket}/pa/obj.bin"
    with fs.open_input_stream(path) as f:
        assert f.read() == b"written by boto3"
    fs_dir, dir_path = storage.pyarrow_filesystem(f"s3://{s3_bucket}/pa/", s3_options)
    assert dir_path == f"{s3_bucket}/pa"
    import pyarrow.fs as pafs

    infos = fs_dir.get_file_info(pafs.FileSelector(dir_path))
    assert [i.base_name for i in infos] == ["obj.bin"]


def test_pyarrow_filesystem_local(tmp_path):
    import pyarrow.fs as pafs

    (tmp_path / "f.txt").write_bytes(b"local")
    fs, path = storage.pyarrow_filesystem("file://" + str(tmp_path / "f.txt"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "f.txt")
    with fs.open_input_stream(path) as f:
        assert f.read() == b"local"


def test_open_uri_streams_s3(s3_bucket, s3_options):
    payload = bytes(range(256)) * 4096  # 1 MiB
    storage.s3_client(s3_options).put_object(Bucket=s3_bucket, Key="big.bin", Body=payload)
    with storage.open_uri(f"s3://{s3_bucket}/big.bin", "rb", s3_options) as f:
        head = f.read(1000)
        f.seek(500_000)
        middle = f.read(10)
        rest = f.read()
    assert head == payload[:1000]
    assert middle == payload[500_000:500_010]
    assert rest == payload[500_010:]
    with storage.open_uri(f"s3://{s3_bucket}/written.txt", "w", s3_options) as f:
        f.write("streamed text")
    assert storage.read_text(f"s3://{s3_bucket}/written.txt", s3_options) == "streamed text"


def test_open_uri_local(tmp_path):
    uri = str(tmp_path / "new" / "dir" / "f.txt")
    with storage.open_uri(uri, "w") as f:
        f.write("abc")
    with storage.open_uri(uri, "r") as f:
        assert f.read() == "abc"


# --------------------------------------------------------------------------------------------- checks


def test_check_uri_missing_bucket_names_it(s3_options):
    with pytest.raises(StorageError) as e:
        storage.check_uri("s3://no-such-bucket-xyz/in.json", for_write=False, options=s3_options, what="input.images")
    msg = str(e.value)
    assert msg.startswith("input.images:")
    assert "'no-such-bucket-xyz'" in msg and "does not exist" in msg
    assert "\n" not in msg
    with pytest.raises(StorageError, match="no-such-bucket-xyz"):
        storage.check_uri("s3://no-such-bucket-xyz/out", for_write=True, options=s3_options, what="output.uri")


def test_check_uri_s3_existing(s3_bucket, s3_options):
    storage.write_bytes(f"s3://{s3_bucket}/in/a.json", b"{}", s3_options)
    storage.check_uri(f"s3://{s3_bucket}/in/a.json", for_write=False, options=s3_options)  # an object
    storage.check_uri(f"s3://{s3_bucket}/in", for_write=False, options=s3_options)  # a prefix
    storage.check_uri(f"s3://{s3_bucket}/out/new", for_write=True, options=s3_options)  # writable bucket
    with pytest.raises(StorageError, match=r"^input\.annotations: no such object or prefix"):
        storage.check_uri(f"s3://{s3_bucket}/in/b.json", for_write=False, options=s3_options,
                          what="input.annotations")


def test_check_uri_local(tmp_path):
    with pytest.raises(StorageError) as e:
        storage.check_uri(str(tmp_path / "missing.json"), for_write=False, what="input.annotations")
    assert str(e.value).startswith("input.annotations: no such file")
    assert "missing.json" in str(e.value)
    (tmp_path / "there.json").write_text("{}")
    storage.check_uri(str(tmp_path / "there.json"), for_write=False)
    storage.check_uri(str(tmp_path / "not" / "yet" / "made"), for_write=True)  # parent is writable
    with pytest.raises(StorageError, match="^output.uri: unsupported URI scheme"):
        storage.check_uri("gs://b/x", for_write=True, what="output.uri")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_check_uri_local_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="not writable"):
            storage.check_uri(str(ro / "out"), for_write=True, what="output.uri")
    finally:
        ro.chmod(0o700)


# --------------------------------------------------------------------------------------------- options


def test_storage_options_repr_hides_credentials():
    opts = StorageOptions(endpoint_url="http://127.0.0.1:9", region="eu-west-1",
                          access_key_id="AKIAEXAMPLEKEYID77", secret_access_key="SuperSecretValue123")
    for text in (repr(opts), str(opts), f"{opts}", f"{opts!r}", repr([opts]), repr({"o": opts})):
        assert "AKIAEXAMPLEKEYID77" not in text
        assert "SuperSecretValue123" not in text
    assert "http://127.0.0.1:9" in repr(opts) and "eu-west-1" in repr(opts)
    assert opts.credentials() == ("AKIAEXAMPLEKEYID77", "SuperSecretValue123")


def test_storage_options_env_fallbacks(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert StorageOptions().resolved_endpoint() == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert StorageOptions().resolved_endpoint() == "http://s3-specific:2"
    assert StorageOptions(endpoint_url="http://explicit:3").resolved_endpoint() == "http://explicit:3"
    assert StorageOptions().resolved_region() == "ap-south-1"
    assert StorageOptions(region="us-west-2").resolved_region() == "us-west-2"
    opts = storage.options_from_dict({"endpoint_url": "http://e:4", "unknown": 1})
    assert opts == StorageOptions(endpoint_url="http://e:4")


def test_mlflow_environment_sets_endpoint(monkeypatch, s3_endpoint):
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)  # monkeypatch restores the original afterwards
    env = storage.mlflow_environment(StorageOptions(endpoint_url=s3_endpoint))
    assert env == {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == s3_endpoint


def test_mlflow_environment_without_endpoint(monkeypatch):
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    assert storage.mlflow_environment(StorageOptions()) == {}
    assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ
