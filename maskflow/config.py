"""YAML configs with ``key=value`` overrides, validated against a dataclass schema.

Every job and trainer declares its config as nested dataclasses (one file per model under ``conf/``, as in
detectron2), loads a YAML file, applies dotted CLI overrides (``train.lr=0.01 output.uri=s3://b/x``, values parsed as
YAML, as in timm), and gets a typed object back. Unknown keys and values of the wrong type fail fast with a
:class:`ConfigError` whose message is one line naming the key.

A YAML file may start with ``_base_: other.yaml`` (a path relative to the file) to inherit and override another.

Fields that hold data locations are typed :data:`Uri`. Code and configs travel with a job (``--config`` and
``_base_`` resolve against the working directory, which ``ray job submit --working-dir`` uploads); data does not, so
a relative ``Uri`` resolves against ``$MASKFLOW_BASE_DIR`` when that is set (a directory the cluster shares with the
submitter, which ``cluster/local.sh`` sets to the checkout; or an ``s3://`` bucket prefix, as the Kubernetes manifests
set it, so ``runs/...`` lands in the bucket), and inside an uploaded working directory without it is
refused in one line (it would land in Ray's temporary copy and be lost when the job ends). Elsewhere it stays
relative to the working directory.

This module imports nothing heavy: a job parses its config, and reports a config error, before torch, Ray or MLflow
load.
"""

from __future__ import annotations

import argparse
import dataclasses
import keyword
import os
import sys
import types
import typing
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

SECRET_WORDS = ("secret", "password", "token", "access_key")

BASE_DIR_ENV = "MASKFLOW_BASE_DIR"
_URI = "maskflow.uri"
# A data location: a local path, file://, s3://, a sqlite:/// tracking database, or a model URI (models:/, runs:/,
# torchvision:). Relative local paths are resolved by :func:`resolve_relative_uri` when the config is built.
Uri = Annotated[str, _URI]


class ConfigError(ValueError):
    """A config problem; ``str(e)`` is one line that starts with the offending key."""


def require(condition: bool, key: str, message: str) -> None:
    """Schema-level validation helper for ``__post_init__`` / ``validate`` methods."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------------------------- loading


def load_yaml(path: str) -> dict:
    from maskflow import storage

    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping at top level")
    base = data.pop("_base_", None)
    if base:
        base_path = base if os.path.isabs(base) or "://" in base else os.path.join(os.path.dirname(path), base)
        data = deep_merge(load_yaml(base_path), data)
    return data


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = {}
            node[p] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


# --------------------------------------------------------------------------------------------- validation


def build(schema: type[T], data: dict | None, prefix: str = "") -> T:
    """Build a dataclass instance from a dict, checking keys and types recursively."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(schema, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    # A Python keyword cannot name a field: ``from`` in a config is the field ``from_`` (e.g. ``init.from``).
    data = {(f"{k}_" if keyword.iskeyword(str(k)) and f"{k}_" in fields else k): v for k, v in data.items()}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (known keys: {', '.join(sorted(map(_key_of, fields)))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{_key_of(name)}"
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key)
        elif dataclasses.is_dataclass(hints[name]) or _has_uri(hints[name]):  # defaults are validated / resolved too
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(hints[name]):
                data_default = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}
                kwargs[name] = build(hints[name], data_default, prefix=f"{key}.")
            else:
                kwargs[name] = _coerce(hints[name], default, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        obj = schema(**kwargs)
    except ConfigError as e:  # raised by a nested __post_init__: give it its full dotted key
        raise ConfigError(f"{prefix}{e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}") from None
    return obj


def _key_of(field_name: str) -> str:
    """The config key of a dataclass field: ``from_`` is written ``from``."""
    stem = field_name[:-1]
    return stem if field_name.endswith("_") and keyword.iskeyword(stem) else field_name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _has_uri(tp: Any) -> bool:
    if get_origin(tp) is Annotated:
        return _URI in tp.__metadata__
    return any(_has_uri(arg) for arg in get_args(tp))


def in_uploaded_working_dir() -> bool:
    """True in a Ray job whose working directory is an uploaded copy (``ray job submit --working-dir``)."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        job = {}
    working_dir = (job.get("runtime_env") or {}).get("working_dir")
    return bool(working_dir) or f"{os.sep}runtime_resources{os.sep}" in os.getcwd()


_NOT_LOCAL = ("models:/", "runs:/", "torchvision:", "opencv:")  # opencv:<method>: a classical baseline


def resolve_relative_uri(value: str, key: str) -> str:
    """A relative local path in a :data:`Uri` field: against ``$MASKFLOW_BASE_DIR`` when set; refused in an
    uploaded Ray working directory; else unchanged (relative to the working directory)."""
    if not value or value.startswith(_NOT_LOCAL):
        return value
    prefix, path = "", value
    for scheme in ("sqlite:///", "file://"):
        if value.startswith(scheme):
            prefix, path = scheme, value[len(scheme):]
    if "://" in path or os.path.isabs(os.path.expanduser(path)):
        return value
    base = os.environ.get(BASE_DIR_ENV)
    if base and base.startswith("s3://"):  # a bucket as the base (the Kubernetes manifests): runs/... lands in it
        if prefix:
            raise ConfigError(f"{key}: {value!r} is a local database or file, which cannot live in {BASE_DIR_ENV}="
                              f"{base}; give the tracking server's http:// URI (or an absolute path)")
        path = os.path.normpath(path)
        if path.startswith(".."):
            raise ConfigError(f"{key}: {value!r} climbs out of {BASE_DIR_ENV}={base}; give an s3:// URI")
        return base.rstrip("/") + "/" + path
    if base:
        if not os.path.isdir(base):
            raise ConfigError(f"{key}: {BASE_DIR_ENV}={base} is not a directory on this node; relative paths need a "
                              "directory the cluster shares, or give an absolute path or s3:// URI")
        return prefix + os.path.normpath(os.path.join(base, path))
    if in_uploaded_working_dir():
        raise ConfigError(f"{key}: relative path {value!r} would resolve inside Ray's temporary copy of the working "
                          f"directory and be lost; give an absolute path or s3:// URI, or set {BASE_DIR_ENV} on the "
                          "cluster (see cluster/README.md)")
    return value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        value = _coerce(get_args(tp)[0], value, key)
        return resolve_relative_uri(value, key) if _URI in tp.__metadata__ and isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict:
    """The config as plain data, keyed as it is written in YAML (``from``, not the field name ``from_``)."""

    def keyed(d: Any) -> Any:
        if isinstance(d, dict):
            return {_key_of(k) if isinstance(k, str) else k: keyed(v) for k, v in d.items()}
        if isinstance(d, list):
            return [keyed(v) for v in d]
        return d

    return keyed(dataclasses.asdict(cfg))


def redacted(d: Any) -> Any:
    """A copy safe to log: values under keys that look like secrets are replaced."""
    if isinstance(d, dict):
        return {
            k: ("***" if v and any(w in str(k).lower() for w in SECRET_WORDS) else redacted(v)) for k, v in d.items()
        }
    if isinstance(d, list):
        return [redacted(v) for v in d]
    return d


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(redacted(to_dict(cfg)), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------------- CLI


def load(schema: type[T], config_path: str | None, overrides: list[str] | None = None) -> T:
    data = load_yaml(config_path) if config_path else {}
    return build(schema, apply_overrides(data, overrides or []))


def _cli_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (local path or s3:// URI)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=2")
    parser.add_argument("--check", action="store_true",
                        help="validate the config (YAML, _base_, overrides, every key's rules) and exit: runs nothing")
    return parser.parse_args(argv)


class ConfigChecked(Exception):
    """``--check``: the config parsed and validated; the job does not run (:func:`main_guard` exits 0)."""

    def __init__(self, config: Any):
        super().__init__(f"config ok: {type(config).__name__}")
        self.config = config


def parse_cli(schema: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    args = _cli_args(argv, description)
    cfg = load(schema, args.config, args.overrides)
    if args.check:
        raise ConfigChecked(cfg)
    return cfg


def parse_cli_dispatch(key: str, schema_of, argv: list[str] | None = None,
                       description: str | None = None) -> tuple[str, Any]:
    """A generic job's config: the top-level ``key`` (e.g. ``kind: hstn_cls``) picks the schema
    (``schema_of(value) -> dataclass``) that the rest of the YAML and overrides are built against.
    Returns ``(value, config)``."""
    args = _cli_args(argv, description)
    data = apply_overrides(load_yaml(args.config) if args.config else {}, args.overrides)
    value = data.pop(key, None)
    if not value or not isinstance(value, str):
        raise ConfigError(f"{key}: required (in the YAML or as {key}=...)")
    cfg = build(schema_of(value), data)
    if args.check:
        raise ConfigChecked(cfg)
    return value, cfg


class JobFailed(RuntimeError):
    """A job ran but part of its work failed (the rest is kept); ``str(e)`` is one line naming what and the fix."""


def main_guard(fn) -> None:
    """Run a CLI entry point: config and input errors print one line and exit 2, a job that ran but failed in part
    prints one line and exits 1 (no traceback: the line names the input and what to do)."""
    from maskflow.storage import StorageError

    try:
        fn()
    except ConfigChecked as e:
        print(e)
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except JobFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        sys.exit(1)
