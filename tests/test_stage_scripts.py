"""The sample stages' job scripts as a user runs them (real processes): a config error fails in one line naming the
key before Ray starts; a good config runs the job locally on an embedded Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_config import assert_one_line_exit_2

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, f"pipelines/{script}.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - started


@pytest.mark.parametrize("script, args, needles", [
    ("ffd_crops", ["--config", "conf/ffd_crops/default.yaml", "crops.min_iou=1.5"], ["crops.min_iou", "[0, 1)"]),
    ("ffd_crops", ["input.proposals=[/nonexistent/props]", "output.uri=/tmp/never"],
     ["input.proposals (manifest)", "/nonexistent/props"]),
    ("instance_maps", ["--config", "conf/instance_maps/default.yaml", "resize.mode=round"], ["resize.mode"]),
    ("video_proposals", ["--config", "conf/video_proposals/davis.yaml", "videos.top_k=0"], ["videos.top_k"]),
    ("video_proposals", ["input.proposals=/nonexistent", "output.uri=/tmp/never"],
     ["input.videos.coco", "set exactly one"]),
    ("affine_pairs", ["--config", "conf/affine_pairs/default.yaml", "pairs.flip_prob=2"], ["pairs.flip_prob"]),
])
def test_stage_script_config_errors_fail_fast(script, args, needles, tmp_path):
    proc, elapsed = run_script(script, *args, f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db")
    assert_one_line_exit_2(proc, elapsed, *needles)
    assert not (tmp_path / "m.db").exists()


def test_instance_maps_script_runs_locally(penn_fudan_shards, tmp_path):
    out = tmp_path / "maps"
    proc, _ = run_script("instance_maps", "--config", "conf/instance_maps/default.yaml",
                         f"input.shards={penn_fudan_shards}", f"output.uri={out}", "resize.size=64",
                         "resize.max_size=null", "ray.num_cpus=2", "compute.workers=1",
                         f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 60 and manifest["rejected"] == 0 and manifest["schema"] == "instance_map/1"
    assert "[instance_maps] done: 60 inputs -> 60 samples" in proc.stderr
