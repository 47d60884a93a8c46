"""One place where a URI becomes what each library needs.

Every path in maskflow is a URI: a local path, ``file:///abs/path`` or ``s3://bucket/key``. This module turns one into

* a ``pyarrow.fs`` FileSystem plus path (Ray Data readers, Ray Train ``storage_filesystem``),
* a boto3 client / smart-open stream (direct reads and writes),
* the environment MLflow's artifact client reads (``MLFLOW_S3_ENDPOINT_URL``).

The endpoint and credentials come from :class:`StorageOptions` (config) or the standard AWS variables
(``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``/
``AWS_DEFAULT_REGION``), never from code. pyarrow does not reliably honour ``AWS_ENDPOINT_URL``, so the endpoint is
always passed to it explicitly. Credentials are never printed: :class:`StorageOptions` hides them in ``repr``.

Writes are atomic: a reader sees either the whole object or nothing. Local files are written to a hidden temporary
name in the same directory and renamed; S3 objects only appear when their upload completes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import IO, Iterator
from urllib.parse import urlparse

TMP_PREFIX = ".tmp-"  # names starting with this are in-flight writes, never listed


class StorageError(RuntimeError):
    """A URI cannot be used: bad scheme, missing bucket, denied access. The message is one line."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Unset fields fall back to the standard AWS environment variables."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO / moto; None = AWS or $AWS_ENDPOINT_URL
    region: str | None = None
    access_key_id: str | None = None  # normally left unset: the AWS credential chain (env, profile) supplies it
    secret_access_key: str | None = None

    def __repr__(self) -> str:  # credentials must never reach a log line
        return f"StorageOptions(endpoint_url={self.resolved_endpoint()!r}, region={self.resolved_region()!r})"

    __str__ = __repr__

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

    def resolved_region(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    def credentials(self) -> tuple[str | None, str | None]:
        return (
            self.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"),
            self.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )


DEFAULT_OPTIONS = StorageOptions()


@dataclass(frozen=True)
class Location:
    scheme: str  # "file" or "s3"
    bucket: str  # "" for local
    path: str  # absolute local path, or the key inside the bucket (no leading slash)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.path}" if self.scheme == "s3" else self.path


def parse(uri: str) -> Location:
    """Split a URI into scheme, bucket and path. Relative local paths become absolute."""
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"empty or non-string URI: {uri!r}")
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")  # not urlparse: '#' and '?' are valid in keys
        if not bucket:
            raise StorageError(f"s3 URI without a bucket: {uri}")
        return Location("s3", bucket, key.lstrip("/"))
    if uri.startswith("file://"):
        return Location("file", "", os.path.abspath(uri[len("file://") :]))
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme (use a local path, file:// or s3://): {uri}")
    return Location("file", "", os.path.abspath(os.path.expanduser(uri)))


def is_s3(uri: str) -> bool:
    return parse(uri).scheme == "s3"


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (S3 keys) or the OS separator (local)."""
    loc = parse(uri)
    if loc.scheme == "s3":
        key = "/".join([loc.path.rstrip("/")] + [p.strip("/") for p in parts if p]).lstrip("/")
        return f"s3://{loc.bucket}/{key}"
    return os.path.join(uri if "://" not in uri else loc.path, *parts)


def basename(uri: str) -> str:
    return parse(uri).path.rstrip("/").rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------- clients


@functools.lru_cache(maxsize=16)
def _boto3_client(endpoint: str | None, region: str, key: str | None, secret: str | None):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )


def s3_client(options: StorageOptions = DEFAULT_OPTIONS):
    key, secret = options.credentials()
    return _boto3_client(options.resolved_endpoint(), options.resolved_region(), key, secret)


def pyarrow_filesystem(uri: str, options: StorageOptions = DEFAULT_OPTIONS):
    """(pyarrow FileSystem, path) for Ray Data readers and Ray Train's ``storage_filesystem``.

    For S3 the returned path has no ``s3://`` prefix (``bucket/key``), as pyarrow filesystems expect.
    """
    import pyarrow.fs as pafs

    loc = parse(uri)
    if loc.scheme == "file":
        return pafs.LocalFileSystem(), loc.path
    key, secret = options.credentials()
    kwargs = dict(region=options.resolved_region(), access_key=key, secret_key=secret)
    endpoint = options.resolved_endpoint()
    if endpoint:
        ep = urlparse(endpoint)
        kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
    if not key:
        kwargs.pop("access_key"), kwargs.pop("secret_key")
    return pafs.S3FileSystem(**kwargs), f"{loc.bucket}/{loc.path}".rstrip("/")


def mlflow_environment(options: StorageOptions = DEFAULT_OPTIONS) -> dict[str, str]:
    """Environment variables MLflow's S3 artifact client needs (it ignores AWS_ENDPOINT_URL)."""
    endpoint = options.resolved_endpoint()
    env = {"MLFLOW_S3_ENDPOINT_URL": endpoint} if endpoint else {}
    os.environ.update(env)
    return env


# --------------------------------------------------------------------------------------------- I/O


def open_uri(uri: str, mode: str = "rb", options: StorageOptions = DEFAULT_OPTIONS) -> IO:
    """Open a URI for streaming. Writes through this are NOT atomic for local files: use :func:`atomic_writer`."""
    loc = parse(uri)
    if loc.scheme == "file":
        if "w" in mode or "a" in mode:
            os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
        return open(loc.path, mode)
    import smart_open

    try:
        return smart_open.open(uri, mode, transport_params={"client": s3_client(options)})
    except OSError as e:  # smart_open wraps a missing key in a plain OSError: say what it is, as for local files
        if "r" in mode and any(_error_code(c) in ("NoSuchKey", "404") for c in (e.__cause__, e.__context__) if c):
            raise FileNotFoundError(uri) from None
        raise


def read_bytes(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> bytes:
    loc = parse(uri)
    if loc.scheme == "file":
        with open(loc.path, "rb") as f:
            return f.read()
    try:
        return s3_client(options).get_object(Bucket=loc.bucket, Key=loc.path)["Body"].read()
    except Exception as e:  # botocore's NoSuchKey is created per client: match by code
        if _error_code(e) in ("NoSuchKey", "404"):
            raise FileNotFoundError(uri) from None
        raise


def read_text(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> str:
    return read_bytes(uri, options).decode("utf-8")


@contextlib.contextmanager
def atomic_writer(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> Iterator[IO[bytes]]:
    """Yield a binary file; the object appears at ``uri`` only if the block finishes without an exception."""
    loc = parse(uri)
    if loc.scheme == "file":
        directory = os.path.dirname(loc.path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(loc.path)}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, loc.path)  # atomic on POSIX within one filesystem
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    # S3: spool locally, then one upload; the object is invisible until the upload completes.
    with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
        yield spool
        spool.seek(0)
        s3_client(options).upload_fileobj(spool, loc.bucket, loc.path)


def write_bytes(uri: str, data: bytes, options: StorageOptions = DEFAULT_OPTIONS) -> None:
    with atomic_writer(uri, options) as f:
        f.write(data)


def write_text(uri: str, text: str, options: StorageOptions = DEFAULT_OPTIONS) -> None:
    write_bytes(uri, text.encode("utf-8"), options)


def create_exclusive(uri: str, data: bytes, options: StorageOptions = DEFAULT_OPTIONS) -> bool:
    """Write ``data`` at ``uri`` only if nothing is there; False if something is. Atomic against concurrent writers
    (a local ``O_EXCL`` create; on S3 a conditional PUT, ``If-None-Match: *``): what locks are built on."""
    loc = parse(uri)
    if loc.scheme == "file":
        os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
        try:
            fd = os.open(loc.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        s3_client(options).put_object(Bucket=loc.bucket, Key=loc.path, Body=data, IfNoneMatch="*")
        return True
    except Exception as e:
        if _error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return False
        raise


def exists(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> bool:
    loc = parse(uri)
    if loc.scheme == "file":
        return os.path.exists(loc.path)
    try:
        s3_client(options).head_object(Bucket=loc.bucket, Key=loc.path)
        return True
    except Exception as e:
        if _error_code(e) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def list_names(prefix_uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> list[str]:
    """Names of the objects directly under a "directory" URI, sorted; in-flight temporaries are hidden."""
    loc = parse(prefix_uri)
    if loc.scheme == "file":
        if not os.path.isdir(loc.path):
            return []
        return sorted(n for n in os.listdir(loc.path) if not n.startswith(TMP_PREFIX))
    prefix = loc.path.rstrip("/") + "/" if loc.path else ""
    names: list[str] = []
    paginator = s3_client(options).get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix, Delimiter="/"):
        names += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
        names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(n for n in names if n and not n.startswith(TMP_PREFIX))


def delete(uri: str, options: StorageOptions = DEFAULT_OPTIONS) -> None:
    loc = parse(uri)
    if loc.scheme == "file":
        if os.path.isdir(loc.path):
            shutil.rmtree(loc.path)
        elif os.path.exists(loc.path):
            os.unlink(loc.path)
        return
    s3_client(options).delete_object(Bucket=loc.bucket, Key=loc.path)


def remove_stale_temporaries(prefix_uri: str) -> int:
    """Delete in-flight temporaries a killed writer left in a local directory (S3 has none to clean)."""
    loc = parse(prefix_uri)
    if loc.scheme != "file" or not os.path.isdir(loc.path):
        return 0
    stale = [n for n in os.listdir(loc.path) if n.startswith(TMP_PREFIX)]
    for n in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(loc.path, n))
    return len(stale)


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (raises for S3)."""
    loc = parse(uri)
    if loc.scheme != "file":
        raise StorageError(f"not a local path: {uri}")
    return loc.path


# --------------------------------------------------------------------------------------------- checks


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def check_uri(uri: str, *, for_write: bool, options: StorageOptions = DEFAULT_OPTIONS, what: str = "uri") -> None:
    """Fail fast, before any Ray work, if ``uri`` cannot be read (or written). Raises StorageError naming ``what``."""
    try:
        loc = parse(uri)
    except StorageError as e:
        raise StorageError(f"{what}: {e}") from None
    if loc.scheme == "file":
        if not for_write and not os.path.exists(loc.path):
            raise StorageError(f"{what}: no such file or directory: {loc.path}")
        if for_write:
            parent = loc.path
            while parent and not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.access(parent or ".", os.W_OK):
                raise StorageError(f"{what}: not writable: {loc.path}")
        return
    client = s3_client(options)
    try:
        client.head_bucket(Bucket=loc.bucket)
    except Exception as e:
        code = _error_code(e)
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"{what}: bucket {loc.bucket!r} does not exist ({uri})") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"{what}: access denied to bucket {loc.bucket!r} (check AWS credentials)") from None
        raise StorageError(f"{what}: cannot reach {uri}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not for_write and loc.path:
        has_key = exists(uri, options)
        if not has_key:
            page = client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.path.rstrip("/") + "/", MaxKeys=1)
            if not page.get("KeyCount"):
                raise StorageError(f"{what}: no such object or prefix: {uri}")


def options_from_dict(d: dict | None) -> StorageOptions:
    d = dict(d or {})
    fields = {f.name for f in dataclasses.fields(StorageOptions)}
    return StorageOptions(**{k: v for k, v in d.items() if k in fields})
