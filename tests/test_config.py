"""maskflow.config: schema validation, YAML + overrides, redaction, and the one-line CLI errors of a real pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from maskflow import config
from maskflow.config import ConfigError, require

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Loop:
    epochs: int = 1
    lr: float = 0.01
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    schedule: Literal["step", "cosine"] = "step"
    clip: Optional[float] = None

    def validate(self) -> None:
        require(self.epochs > 0, "epochs", "must be positive")


@dataclass
class Out:
    uri: str = ""  # required by validate(): the default is invalid

    def validate(self) -> None:
        require(bool(self.uri), "uri", "required")


@dataclass
class Dest:
    uri: str = "/tmp/x"

    def validate(self) -> None:
        require(bool(self.uri), "uri", "required")


@dataclass
class Creds:
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    api_token: Optional[str] = None


@dataclass
class Job:
    name: str  # required (no default)
    loop: Loop = field(default_factory=Loop)
    out: Dest = field(default_factory=Dest)
    creds: Creds = field(default_factory=Creds)
    tags: list[str] = field(default_factory=list)
    seed: Optional[int] = 0


@dataclass
class Inner:
    n: int = 1

    def __post_init__(self):
        require(self.n > 0, "n", "must be positive")


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)


def build(data, overrides=()):
    return config.build(Job, config.apply_overrides(data, list(overrides)))


def one_line_error(data, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        build(data, overrides)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------- schema


def test_build_types_and_defaults():
    cfg = build({"name": "j", "loop": {"epochs": 3, "lr": 1, "milestones": [2, 3]}})
    assert cfg.name == "j"
    assert cfg.loop == Loop(epochs=3, lr=1.0, milestones=[2, 3])
    assert isinstance(cfg.loop.lr, float)  # an int is accepted for a float and converted
    assert cfg.out.uri == "/tmp/x" and cfg.creds == Creds() and cfg.seed == 0


def test_unknown_key_names_dotted_key():
    msg = one_line_error({"name": "j", "loop": {"epochz": 3}})
    assert msg.startswith("loop.epochz: unknown key"), msg
    assert "epochs" in msg  # lists the known keys
    assert one_line_error({"name": "j", "lop": {}}).startswith("lop: unknown key")
    assert one_line_error({"name": "j"}, ["loop.milestones.x=1"]).startswith("loop.milestones: expected a list")


def test_wrong_type_names_key():
    assert one_line_error({"name": "j"}, ["loop.epochs=abc"]).startswith("loop.epochs: expected an integer, got 'abc'")
    assert one_line_error({"name": "j"}, ["loop.epochs=true"]).startswith("loop.epochs: expected an integer")
    assert one_line_error({"name": "j"}, ["loop.lr=fast"]).startswith("loop.lr: expected a number")
    assert one_line_error({"name": "j"}, ["loop.milestones=[1,x]"]).startswith("loop.milestones[1]: expected an integer")
    assert one_line_error({"name": "j"}, ["loop.milestones=5"]).startswith("loop.milestones: expected a list")
    assert one_line_error({"name": "j"}, ["loop.clip=abc"]).startswith("loop.clip: expected a number")
    assert one_line_error({"name": "j", "loop": 3}).startswith("loop: expected a mapping, got int")


def test_literal_violation():
    msg = one_line_error({"name": "j"}, ["loop.schedule=linear"])
    assert msg.startswith("loop.schedule: must be one of ['step', 'cosine'], got 'linear'"), msg
    assert build({"name": "j"}, ["loop.schedule=cosine"]).loop.schedule == "cosine"


def test_missing_required():
    assert one_line_error({}).startswith("name: required key is missing")


def test_null_for_non_optional():
    assert one_line_error({"name": "j"}, ["loop.epochs=null"]).startswith("loop.epochs")
    assert build({"name": "j"}, ["seed=null"]).seed is None


def test_validate_runs_and_is_prefixed():
    assert one_line_error({"name": "j"}, ["loop.epochs=0"]) == "loop.epochs: must be positive"
    assert one_line_error({"name": "j"}, ["out.uri=''"]) == "out.uri: required"


def test_validate_runs_for_absent_nested_blocks():
    @dataclass
    class NeedsOut:
        out: Out = field(default_factory=Out)  # default uri "" is invalid

    # the block is not in the YAML at all: its defaults are still validated
    with pytest.raises(ConfigError) as e:
        config.build(NeedsOut, {})
    assert str(e.value) == "out.uri: required"
    assert config.build(NeedsOut, {"out": {"uri": "s3://b/x"}}).out.uri == "s3://b/x"


def test_absent_nested_block_uses_field_default():
    @dataclass
    class WithFactory:
        out: Out = field(default_factory=lambda: Out("s3://b/default"))

    assert config.build(WithFactory, {}).out.uri == "s3://b/default"


def test_post_init_errors_are_prefixed():
    with pytest.raises(ConfigError) as e:
        config.build(Outer, {"inner": {"n": 0}})
    assert str(e.value) == "inner.n: must be positive"


# --------------------------------------------------------------------------------------------- YAML + overrides


def test_base_inheritance(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text(
        "name: base-job\nloop:\n  epochs: 5\n  lr: 0.5\n  milestones: [1, 2]\ntags: [a, b]\n")
    (tmp_path / "job.yaml").write_text("_base_: base/common.yaml\nloop:\n  epochs: 7\ntags: [c]\n")
    data = config.load_yaml(str(tmp_path / "job.yaml"))
    assert "_base_" not in data
    cfg = config.load(Job, str(tmp_path / "job.yaml"), ["loop.milestones=[9]"])
    assert cfg.name == "base-job"  # inherited
    assert cfg.loop.epochs == 7  # overridden by the child
    assert cfg.loop.lr == 0.5  # merged: sibling keys of an overridden block survive
    assert cfg.loop.milestones == [9]  # CLI beats both files
    assert cfg.tags == ["c"]  # lists are replaced, not concatenated


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="^--config: no such file"):
        config.load_yaml(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        config.load_yaml(str(tmp_path / "bad.yaml"))
    assert "\n" not in str(e.value)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load_yaml(str(tmp_path / "list.yaml"))
    (tmp_path / "orphan.yaml").write_text("_base_: missing.yaml\nname: x\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        config.load_yaml(str(tmp_path / "orphan.yaml"))


def test_overrides_parse_yaml_values():
    data = config.apply_overrides(
        {"loop": {"epochs": 1, "lr": 0.1}, "keep": True},
        ["loop.epochs=12", "loop.lr=0.25", "loop.milestones=[3, 4]", "seed=null", "name=42", "x.y.z=on",
         "empty=", "s=s3://b/k=v"],
    )
    assert data["loop"] == {"epochs": 12, "lr": 0.25, "milestones": [3, 4]}
    assert data["seed"] is None and data["empty"] is None
    assert data["name"] == 42 and data["x"] == {"y": {"z": True}} and data["keep"] is True
    assert data["s"] == "s3://b/k=v"  # only the first '=' splits
    cfg = build({"name": "j"}, ["loop.epochs=12", "loop.lr=0.25", "loop.milestones=[3, 4]", "seed=null", "name=42"])
    assert (cfg.loop.epochs, cfg.loop.lr, cfg.loop.milestones, cfg.seed, cfg.name) == (12, 0.25, [3, 4], None, "42")
    with pytest.raises(ConfigError, match="^loop.epochs: overrides must look like key=value"):
        config.apply_overrides({}, ["loop.epochs"])


def test_overrides_do_not_mutate_input():
    data = {"loop": {"epochs": 1}}
    config.apply_overrides(data, ["loop.epochs=2"])
    assert data == {"loop": {"epochs": 1}}


def test_float_in_exponent_notation():
    assert build({"name": "j"}, ["loop.lr=1e-4"]).loop.lr == pytest.approx(1e-4)


# --------------------------------------------------------------------------------------------- redaction


def test_redacted_hides_secret_looking_keys():
    cfg = build({"name": "j", "creds": {"access_key_id": "AKIA123", "secret_access_key": "S3CR3T",
                                        "api_token": "tok-1"}})
    red = config.redacted(config.to_dict(cfg))
    assert red["creds"] == {"access_key_id": "***", "secret_access_key": "***", "api_token": "***"}
    assert red["name"] == "j" and red["loop"]["epochs"] == 1  # other values are kept
    nested = config.redacted({"a": [{"password": "pw", "user": "u"}], "db_password": None})
    assert nested == {"a": [{"password": "***", "user": "u"}], "db_password": None}
    dumped = config.dump_yaml(cfg)
    assert "S3CR3T" not in dumped and "tok-1" not in dumped and "AKIA123" not in dumped
    flat = config.flatten(red)
    assert flat["creds.secret_access_key"] == "***" and flat["loop.milestones"] == [8, 11]


# --------------------------------------------------------------------------------------------- CLI (real process)


def run_ingest(*args: str, timeout: float = 60, log_level: str = "INFO") -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
        env.pop(var, None)
    env["MASKFLOW_LOG_LEVEL"] = log_level
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "pipelines/ingest.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - started


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, elapsed: float, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    for n in needles:
        assert n in lines[0], lines[0]
    assert "starting embedded Ray" not in proc.stdout + proc.stderr
    assert elapsed < 20, f"took {elapsed:.1f}s: something heavy started before the check"
    return lines[0]


INPUTS = ("input.annotations=/nonexistent/a.json", "input.images=/nonexistent/images")


def test_cli_unknown_key():
    proc, elapsed = run_ingest(*INPUTS, "output.urii=x")
    line = assert_one_line_exit_2(proc, elapsed)
    assert line.startswith("error: output.urii: unknown key"), line


def test_cli_bad_value():
    proc, elapsed = run_ingest(*INPUTS, "output.uri=/tmp/x", "output.samples_per_shard=abc")
    line = assert_one_line_exit_2(proc, elapsed)
    assert line.startswith("error: output.samples_per_shard: expected an integer"), line
    proc, elapsed = run_ingest(*INPUTS, "output.uri=/tmp/x", "output.samples_per_shard=0")
    assert_one_line_exit_2(proc, elapsed, "output.samples_per_shard", "must be positive")


def test_cli_missing_local_input(tmp_path):
    proc, elapsed = run_ingest(*INPUTS, f"output.uri={tmp_path}/out", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db")
    assert_one_line_exit_2(proc, elapsed, "input.annotations", "/nonexistent/a.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()


MISSING_BUCKET = ("input.annotations=s3://no-such-bucket/x.json", "input.images=s3://no-such-bucket/i",
                  "output.uri=s3://no-such-bucket/o")


def test_cli_missing_bucket(s3_endpoint, tmp_path):
    proc, elapsed = run_ingest(*MISSING_BUCKET, f"storage.endpoint_url={s3_endpoint}",
                               f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db")
    line = assert_one_line_exit_2(proc, elapsed, "'no-such-bucket'", "does not exist")
    assert line.startswith("error: output.uri:") or line.startswith("error: input."), line
    assert not (tmp_path / "m.db").exists()  # failed before any MLflow run


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])  # DEBUG: botocore logs its requests, signed headers included
def test_cli_missing_bucket_never_prints_secret(s3_endpoint, tmp_path, log_level):
    proc, elapsed = run_ingest(*MISSING_BUCKET, f"storage.endpoint_url={s3_endpoint}",
                               "storage.secret_access_key=SUPERSECRET123",
                               f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db", log_level=log_level)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no-such-bucket" in proc.stderr.splitlines()[-1]
    assert "HeadBucket" in proc.stderr if log_level == "DEBUG" else len(proc.stderr.splitlines()) == 1
    assert "SUPERSECRET123" not in proc.stdout + proc.stderr
    assert "starting embedded Ray" not in proc.stdout + proc.stderr


def test_storage_config_repr_hides_secret():
    from maskflow.runtime import StorageConfig

    text = repr(StorageConfig(access_key_id="AKIAVISIBLEKEY42", secret_access_key="SUPERSECRET123"))
    assert "SUPERSECRET123" not in text and "AKIAVISIBLEKEY42" not in text
