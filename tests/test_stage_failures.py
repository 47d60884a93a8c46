"""A unit that fails never takes a stage job down: it raises (a bug, an I/O error) or its worker process dies (a
crash in native code), the other units are written, the failed ones are recorded with their reason, the job exits
non-zero naming them, and a re-run redoes exactly those. Crashes are retried a bounded number of times, never forever.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path

import pytest

from maskflow import shards, stage

pytestmark = pytest.mark.slow


class TroubleStage(stage.Stage):
    """Six one-sample units; unit i raises while ``raise-i`` exists in ``trouble``, and dies of a segmentation fault
    while ``crash-i`` exists (as a decoder crashing in native code would). The trouble files are not part of the job's
    fingerprint, so removing them and re-running resumes the same job."""

    name = "trouble"

    def __init__(self, trouble: str):
        super().__init__()
        self.trouble = trouble

    def plan(self) -> stage.Plan:
        return stage.Plan([stage.WorkUnit(i, [i], source=f"input-{i}") for i in range(6)])

    def process(self, unit):
        i = unit.index
        if os.path.exists(os.path.join(self.trouble, f"raise-{i}")):
            raise OSError(f"connection reset while reading input-{i}\nsecond line that must not reach the log")
        if os.path.exists(os.path.join(self.trouble, f"crash-{i}")):
            ctypes.string_at(0)  # a real segfault, in this thread (os.kill may land on another thread first)
        yield {"__key__": f"s{i}", "txt": f"sample {i}"}


def test_failed_units_are_recorded_the_rest_written_and_a_rerun_redoes_them(ray_local, tmp_path: Path):
    trouble = tmp_path / "trouble"
    trouble.mkdir()
    (trouble / "raise-2").touch()
    (trouble / "crash-4").touch()
    out = str(tmp_path / "out")
    compute = stage.ComputeConfig(workers=2, unit_retries=1)

    started = time.monotonic()
    with pytest.raises(stage.StageFailed) as failure:
        stage.run_stage(TroubleStage(str(trouble)), stage.OutputConfig(uri=out, samples_per_shard=1), compute,
                        None, None)
    seconds = time.monotonic() - started
    message = str(failure.value)
    assert "\n" not in message and message.startswith("[trouble] 2 of 6 units failed, e.g. shard-000002.tar (input-2)")
    assert "re-run the same command to retry" in message
    assert seconds < 120, f"a crashing unit must not be retried forever ({seconds:.0f} s)"

    failed = {r["index"]: r for r in map(json.loads, (Path(out) / stage.FAILED_UNITS).read_text().splitlines())}
    assert sorted(failed) == [2, 4]
    assert failed[2]["reason"] == "OSError: connection reset while reading input-2"
    assert failed[4]["reason"].startswith("its worker died 2 times while processing it")  # 1 try + 1 retry
    assert failed[4]["source"] == "input-4"
    assert shards.try_read_manifest(out) is None  # not sealed: the output is incomplete
    written = sorted(p.name for p in Path(out).glob("shard-*.tar"))
    assert written == [shards.shard_name(i) for i in (0, 1, 3, 5)]

    # The trouble is gone: a re-run redoes the two failed units only and seals the output.
    (trouble / "raise-2").unlink()
    (trouble / "crash-4").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(out).glob("shard-*.tar")}
    manifest = stage.run_stage(TroubleStage(str(trouble)), stage.OutputConfig(uri=out, samples_per_shard=1), compute,
                               None, None)
    assert manifest["samples"] == 6 and manifest["inputs"] == 6 and manifest["rejected"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in Path(out).glob("shard-*.tar") if p.name in mtimes} == mtimes
    assert not (Path(out) / stage.FAILED_UNITS).exists()


def test_a_failed_stage_script_exits_1_with_one_line(tmp_path: Path):
    """What the command line shows: main_guard turns StageFailed into one line and exit status 1."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(
        "from maskflow import config, stage\n"
        "def main():\n"
        "    raise stage.StageFailed('[x] 1 of 3 units failed, e.g. shard-000001.tar (a.jpg): OSError: gone; re-run')\n"
        "config.main_guard(main)\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["failed: [x] 1 of 3 units failed, e.g. shard-000001.tar (a.jpg): "
                                                "OSError: gone; re-run"]
