"""Timing helpers of the stage benchmarks: one stage run as a Ray Data job with one actor and as a bare loop.

Used by ``bench/proposals_throughput.py`` (the Mask R-CNN proposals stage) and ``bench/inference.py`` (every model
kind's inference stage); ``bench/stages.py`` uses :func:`run_in_process` and :func:`quiet_ray_data`.

Method (``bench/README.md``, "proposals_throughput.py"): the same stage object on both sides, over the same input
shards, both writing their output shards, records and manifest:

* **ray**: :func:`maskflow.stage.run_stage` with ``compute.workers=1`` on an embedded ``ray.init`` (started once,
  outside every figure), tracking off;
* **bare**: what a user writes without Ray: ``stage.setup()`` once, then :func:`maskflow.stage.process_unit` per unit
  in this process, then the manifest (:func:`run_in_process`).

The stage class is wrapped by :func:`timed` (a :class:`TimedUnits` subclass): a warm-up in ``setup()`` and, per unit,
diagnostic counts in the unit's record (``unit_start_ms``: the wall clock when the unit started; ``unit_cpu_ms``: the
process's CPU time while ``process`` ran; ``torch_threads``: torch's intra-op threads when it ended, i.e. what the
stage's ``process`` ran with). Counts reach
only records and the manifest's ``counts``, never a shard. Figures per run (:func:`summarise`; samples/s unless said):

* ``steady``: samples / summed ``process_unit`` seconds (read + decode + infer + build + encode + write);
* ``span``: samples / (last unit's end - first unit's start) on the worker's clock: steady plus the gaps between units;
* ``e2e``: samples / wall time of the whole job (plan, Ray Data and actor start-up, model load, warm-up, units,
  manifest); ``ray.init`` excluded;
* ``ready``: seconds from the job's start to its first unit;
* ``cpu_ms_per_sample``: the process's CPU time (all threads) while ``process`` built the units' samples, per sample.

Each run also records the 1-minute load average before and after it (``/proc/loadavg``: this box is shared).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Callable, Iterator

import torch

from maskflow import shards, stage, storage
from maskflow.stage import Count, Plan, Reject, WorkUnit

# Ray's actors cannot import this module (bench/ is not a package on their path): ship its classes by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FIGURES = ("steady_ips", "span_ips", "e2e_ips", "ready_s", "cpu_ms_per_sample")
FIGURE_NAMES = {"steady_ips": "steady (sum of units)", "span_ips": "steady (first..last unit)",
                "e2e_ips": "end-to-end job", "ready_s": "seconds to first unit",
                "cpu_ms_per_sample": "CPU ms per sample"}
RATIOS = ("steady", "span", "e2e")


class TimedUnits:
    """Mixin in front of a :class:`maskflow.stage.Stage` class (see :func:`timed`): a warm-up at the end of
    ``setup()``, and each unit's start time and torch threads as counts in its record.

    The default warm-up runs the first planned unit through the stage's own ``process`` up to its first output sample
    (one batch: read, decode, forward, build), outputs discarded: every code path a unit takes is warm, whatever the
    model. A stage may override :meth:`warm_up` (the proposals benchmark runs one forward pass on a dummy batch).
    """

    _warmup_unit: WorkUnit | None = None

    def plan(self) -> Plan:
        plan = super().plan()
        self._warmup_unit = plan.units[0] if plan.units else None  # travels to the actor with the pickled stage
        return plan

    def setup(self) -> None:
        super().setup()
        self.warm_up()

    def warm_up(self) -> None:
        if self._warmup_unit is None:
            return
        items = super().process(self._warmup_unit)
        try:
            for item in items:
                if not isinstance(item, (Count, Reject)):
                    break
        finally:
            items.close()

    def process(self, unit: WorkUnit) -> Iterator:
        yield Count("unit_start_ms", int(time.time() * 1000))  # process_unit's timer starts here too
        cpu = time.process_time()
        yield from super().process(unit)
        # CPU seconds of the whole process (every thread) while the stage built the unit's samples (the shard write
        # that follows is not in it): a figure of the work done that other tenants' load does not move much
        yield Count("unit_cpu_ms", int((time.process_time() - cpu) * 1000))
        # after the stage's own process: the threads it set (stages set them per call, from compute.cpus_per_worker)
        yield Count("torch_threads", torch.get_num_threads())


_TIMED: dict[type, type] = {}


def timed(stage_class: type) -> type:
    """``stage_class`` with :class:`TimedUnits` in front (one class per stage class)."""
    if stage_class not in _TIMED:
        _TIMED[stage_class] = type(f"Timed{stage_class.__name__}", (TimedUnits, stage_class), {})
    return _TIMED[stage_class]


def quiet_ray_data() -> None:
    """No periodic progress lines from Ray Data (they would bury the results)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def start_ray(num_cpus: int) -> float:
    """``ray.init`` (embedded, no dashboard, actors' logs not streamed); returns its seconds (in no figure)."""
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    return time.perf_counter() - t


def run_in_process(st: stage.Stage, out: str, job_config) -> tuple[dict, list[dict]]:
    """A stage's whole job without Ray: plan, setup, process_unit per unit, manifest. Returns (manifest, records)."""
    plan = st.plan()
    fingerprint = stage.job_fingerprint(st, plan)
    st.setup()
    records = {}
    for unit in plan.units:
        records[unit.index] = stage.process_unit(st, unit, out, fingerprint, storage.DEFAULT_OPTIONS)
    manifest = stage._seal(st, plan, records, out, fingerprint, job_config, storage.DEFAULT_OPTIONS)
    return manifest, [records[u.index] for u in plan.units]


def summarise(records: list[dict], wall: float, t0_epoch: float) -> dict:
    """The figures of one run from its units' records (see the module docstring)."""
    samples = sum(r["samples"] for r in records)
    busy = sum(r["seconds"] for r in records)
    threads = sorted({r["counts"]["torch_threads"] for r in records})
    starts = [r["counts"]["unit_start_ms"] / 1000 for r in records]
    ends = [s + r["seconds"] for s, r in zip(starts, records)]
    span = max(ends) - min(starts)
    cpu = sum(r["counts"]["unit_cpu_ms"] for r in records) / 1000
    # the stage's own counts summed over the units (e.g. the refinement job's proposals_refined), timing ones left out
    counts: dict[str, int] = {}
    for r in records:
        for name, value in r["counts"].items():
            if name not in ("unit_start_ms", "unit_cpu_ms", "torch_threads"):
                counts[name] = counts.get(name, 0) + value
    return {"samples": samples, "units": len(records), "e2e_s": round(wall, 3), "e2e_ips": round(samples / wall, 2),
            "busy_s": round(busy, 3), "steady_ips": round(samples / busy, 2), "span_s": round(span, 3),
            "span_ips": round(samples / span, 2), "ready_s": round(min(starts) - t0_epoch, 3),
            "cpu_ms_per_sample": round(1000 * cpu / samples, 3), "torch_threads": threads,
            "counts": counts}


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds (user + system, every thread) of process ``root`` (default: this one) and all its descendants
    still alive, from /proc: with an embedded Ray, its raylet, GCS and worker processes. Linux only."""
    root = os.getpid() if root is None else root
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:  # exited meanwhile
            continue
        # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15
        stats[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    return total


def time_bare(st: stage.Stage, job_config, threads: int | None = None) -> dict:
    """The bare loop's figures for a stage object (a :func:`timed` class) writing to ``job_config.output.uri``;
    ``threads``: torch's intra-op threads for the run (None: leave them)."""
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    load_before = load_1m()
    try:
        t0, t0_epoch = time.perf_counter(), time.time()
        manifest, records = run_in_process(st, job_config.output.uri, job_config)
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(default_threads)
    return {**summarise(records, wall, t0_epoch), "manifest_samples": manifest["samples"],
            "load_1m_before": load_before, "load_1m_after": load_1m()}


def time_ray(st: stage.Stage, job_config) -> dict:
    """The Ray Data job's figures for a stage object (a :func:`timed` class): ``run_stage`` with the config's
    ``compute`` block on the running Ray, tracking off."""
    out = job_config.output.uri
    load_before = load_1m()
    t0, t0_epoch = time.perf_counter(), time.time()
    manifest = stage.run_stage(st, job_config.output, job_config.compute, None, job_config, storage.DEFAULT_OPTIONS,
                               job_config.ray)
    wall = time.perf_counter() - t0
    records = [json.loads(storage.read_text(storage.join(out, shards.record_name(i))))
               for i in range(len(manifest["shards"]))]
    return {**summarise(records, wall, t0_epoch), "manifest_samples": manifest["samples"],
            "load_1m_before": load_before, "load_1m_after": load_1m()}


def side_by_side(sides: list[str], repeats: int, run_side: Callable[[str, int], dict], num_cpus: int,
                 log_prefix: str = "") -> tuple[dict[str, list[dict]], float | None]:
    """``repeats`` rounds of the sides in the given order (bare sides first, then ``"ray"``); Ray starts before
    the first ray side and stops at the end. Returns (runs per side, ``ray.init`` seconds or None)."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    ray_init_s = None
    try:
        for rep in range(repeats):
            for side in sides:
                if side == "ray" and ray_init_s is None:
                    ray_init_s = start_ray(num_cpus)
                runs[side].append(run_side(side, rep))
                print(f"  {log_prefix}{side:<13}#{rep}: {runs[side][-1]}", flush=True)
    finally:
        if ray_init_s is not None:
            import ray

            ray.shutdown()
    return {side: r for side, r in runs.items() if r}, ray_init_s


def compare(runs: dict[str, list[dict]], ray_init_s: float | None, target: float = 0.9) -> dict:
    """Medians per side of every figure; for steady, span and e2e, ray / each bare side as the ratio of the medians
    (``ratio_<figure>_vs_<side>``) and as the median of the ratios of the runs paired round by round
    (``ratio_<figure>_vs_<side>_rounds``: the two runs of a round ran minutes apart at most, under similar load)."""
    summary: dict = {"ray_init_s": round(ray_init_s, 2) if ray_init_s is not None else None, "target": target}
    for side, side_runs in runs.items():
        for key in FIGURES + ("load_1m_before", "load_1m_after"):
            summary[f"{side}.{key}"] = round(statistics.median(r[key] for r in side_runs), 2)
        summary[f"{side}.torch_threads"] = sorted({t for r in side_runs for t in r["torch_threads"]})
    if "ray" in runs:
        for base in [s for s in runs if s != "ray"]:
            for key in RATIOS:
                summary[f"ratio_{key}_vs_{base}"] = round(summary[f"ray.{key}_ips"] / summary[f"{base}.{key}_ips"], 3)
                summary[f"ratio_{key}_vs_{base}_rounds"] = round(statistics.median(
                    r[f"{key}_ips"] / b[f"{key}_ips"] for r, b in zip(runs["ray"], runs[base])), 3)
    return summary


def print_table(summary: dict, sides: list[str], labels: dict[str, str], unit: str, repeats: int) -> None:
    """The medians of each side and the ratios ray / bare side, one row per figure."""
    bases = [s for s in sides if s != "ray"] if "ray" in sides else []
    print(f"{unit + ' (median of ' + str(repeats) + ')':<28}" + "".join(f"{labels[s]:>14}" for s in sides)
          + "".join(f"{'ray/' + labels[b]:>18}" for b in bases))
    for key in FIGURES:
        figure = key.split("_")[0]  # steady, span, e2e (the others have no ratio)
        row = "".join(f"{summary.get(f'{s}.{key}', ''):>14}" for s in sides)
        row += "".join(f"{summary.get(f'ratio_{figure}_vs_{b}', ''):>18}" for b in bases)
        print(f"{FIGURE_NAMES[key]:<28}{row}")
    for b in bases:
        print(f"ray/{labels[b]}, median of the rounds' ratios: " + ", ".join(
            f"{key} {summary[f'ratio_{key}_vs_{b}_rounds']}" for key in RATIOS))
    print(f"{'load avg 1 min (before run)':<28}" + "".join(f"{summary.get(f'{s}.load_1m_before', ''):>14}"
                                                          for s in sides))
    print("torch threads: " + ", ".join(f"{labels[s]}={summary[f'{s}.torch_threads']}" for s in sides)
          + f"; ray.init {summary['ray_init_s']}s (in no figure); target ratio >= {summary['target']}")


def machine() -> dict:
    """What the figures ran on (the load average at the end of the whole benchmark)."""
    import ray

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_at_end": [round(v, 2) for v in os.getloadavg()]}
