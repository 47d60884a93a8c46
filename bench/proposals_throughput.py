"""Proposals job throughput: the Ray Data job with ONE actor against a bare single-process loop, same work.

    .venv/bin/python bench/proposals_throughput.py                       # synthetic 128 px images
    .venv/bin/python bench/proposals_throughput.py --data penn_fudan     # ../shared/data/penn_fudan_ped
    .venv/bin/python bench/proposals_throughput.py --images 96 --repeats 1 --cpus-per-worker 2

Both sides run the same ``ProposalsStage`` (tiny_fpn Mask R-CNN from conf/demo.yaml's ``model`` block, random
weights from a fixed seed saved as a ``{"model": state_dict}`` .pt checkpoint), the same batch size and top_k, over
the same image shards (ingested first with ``IngestStage``), and both write their output shards and records:

* **ray**: ``maskflow.stage.run_stage`` with ``compute.workers=1`` on an embedded ``ray.init(num_cpus=2)``,
  tracking off (``tracking_cfg=None``);
* **bare**: what a user writes without Ray: ``stage.setup()`` once, then ``maskflow.stage.process_unit`` for each
  unit (decode + batch + infer + build outputs + encode + write the shard and its record), in this process.

Each side warms its model up once (one forward pass on a dummy batch, inside ``setup()``) before any unit.

Numbers (images/s unless said; medians over ``--repeats`` alternating runs):

* ``steady``: images / summed ``process_unit`` seconds of the units (each record's ``seconds``: read + decode +
  infer + build outputs + encode + write the shard). Excludes Ray start-up, actor start-up, model load, warm-up and
  any gap between units: the pure per-unit rate of each side.
* ``span``: images / (end of the last unit - start of the first), on the worker's wall clock. Adds the gaps between
  units (on the Ray side: Ray Data handing the actor its next unit and taking its record) to ``steady``.
* ``e2e``: images / wall time of the whole job. Ray: the ``run_stage`` call (plan, Ray Data start, actor start-up,
  model load, warm-up, all units, manifest), excluding ``ray.init`` (reported alone as ``ray_init_s``). Bare: the
  same steps in this process (plan, setup + warm-up, all units, manifest).
* ``ready_s``: seconds from the job's start to its first unit starting (start-up + model load + warm-up).

Ray sets ``OMP_NUM_THREADS`` to the actor's CPUs (``compute.cpus_per_worker``, default 1), so torch in the actor
runs 1 thread while a bare process runs torch's default (one per core). The bare loop is therefore measured twice:
as a user writes it (``bare``, default threads) and with torch threads matched to the actor (``bare_matched``).

Results go to bench/results/proposals_throughput.json (``--data penn_fudan``: proposals_throughput_penn_fudan.json).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from _results import write_result  # noqa: E402
from maskflow import config, shards, stage, storage  # noqa: E402
from maskflow.data.coco import write_coco_json  # noqa: E402
from maskflow.models.maskrcnn import MaskRCNNConfig, build_maskrcnn  # noqa: E402
from maskflow.stage import Count, WorkUnit  # noqa: E402
from maskflow.stages.ingest import IngestConfig, IngestStage  # noqa: E402
from maskflow.stages.proposals import ProposalsConfig, ProposalsStage  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "proposals_throughput.json")
PENN_FUDAN = os.path.join(os.path.dirname(ROOT), "shared", "data", "penn_fudan_ped")


class BenchProposalsStage(ProposalsStage):
    """ProposalsStage plus a warm-up forward pass in ``setup()`` and two diagnostic counts per unit (torch threads,
    wall-clock start time in ms). Counts only reach the unit's record and the manifest's ``counts``, never a shard.
    """

    warmup_size = (128, 128)

    def setup(self) -> None:
        super().setup()
        n = self.cfg.proposals.batch_size
        gen = torch.Generator().manual_seed(0)
        dummy = [torch.rand(3, *self.warmup_size, generator=gen) for _ in range(n)]
        with torch.inference_mode():
            self.model([d.to(self.device) for d in dummy])

    def process(self, unit: WorkUnit):
        yield Count("unit_start_ms", int(time.time() * 1000))  # wall clock: process_unit's timer starts here too
        yield Count("torch_threads", torch.get_num_threads())
        yield from super().process(unit)


def quiet_ray_data() -> None:
    """No periodic progress lines from Ray Data (they would bury the results)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------- data + model


def make_dataset(args, work: str) -> tuple[str, str, str]:
    """(annotations json, images dir, dataset name) of the benchmark's input images."""
    if args.data == "synthetic":
        from maskflow.data.synthetic import generate_coco_dataset

        data = os.path.join(work, "data")
        generate_coco_dataset(data, args.images, 0, "bench", (args.size, args.size), 5)
        return os.path.join(data, "annotations", "instances_bench.json"), os.path.join(data, "images", "bench"), \
            "synthetic"
    from maskflow.data.convert import penn_fudan_to_coco

    coco, images = penn_fudan_to_coco(args.penn_fudan_root)
    if args.images and args.images < len(coco["images"]):
        keep = {im["id"] for im in coco["images"][: args.images]}
        coco["images"] = [im for im in coco["images"] if im["id"] in keep]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    path = os.path.join(work, "penn_fudan.json")
    write_coco_json(coco, path)
    return path, images, "penn_fudan"


def run_in_process(st: stage.Stage, out: str, job_config) -> tuple[dict, list[dict]]:
    """A stage's whole job without Ray: setup, process_unit per unit, manifest. Returns (manifest, records)."""
    plan = st.plan()
    fingerprint = stage.job_fingerprint(st, plan)
    st.setup()
    records = {}
    for unit in plan.units:
        records[unit.index] = stage.process_unit(st, unit, out, fingerprint, storage.DEFAULT_OPTIONS)
    manifest = stage._seal(st, plan, records, out, fingerprint, job_config, storage.DEFAULT_OPTIONS)
    return manifest, [records[u.index] for u in plan.units]


def ingest(args, work: str) -> tuple[str, dict]:
    annotations, images, name = make_dataset(args, work)
    cfg = config.build(IngestConfig, {"input": {"annotations": annotations, "images": images, "name": name},
                                      "output": {"uri": os.path.join(work, "images"),
                                                 "samples_per_shard": args.samples_per_shard}})
    manifest, _ = run_in_process(IngestStage(cfg), cfg.output.uri, cfg)
    return cfg.output.uri, manifest


def make_checkpoint(work: str, seed: int) -> tuple[str, dict]:
    arch = config.load_yaml(os.path.join(ROOT, "conf", "demo.yaml"))["model"]
    torch.manual_seed(seed)
    model = build_maskrcnn(config.build(MaskRCNNConfig, arch))
    path = os.path.join(work, "model.pt")
    torch.save({"model": model.state_dict()}, path)
    return path, arch


def proposals_config(args, images_uri: str, ckpt: str, arch: dict, out: str) -> ProposalsConfig:
    demo = config.load_yaml(os.path.join(ROOT, "conf", "demo.yaml"))
    props = dict(demo.get("proposals", {}))
    props["batch_size"] = args.batch_size
    if args.top_k:
        props["top_k"] = args.top_k
    return config.build(ProposalsConfig, {
        "input": {"shards": images_uri},
        "model": {"uri": ckpt, "arch": arch},
        "proposals": props,
        "output": {"uri": out},
        "compute": {"workers": 1, "cpus_per_worker": args.cpus_per_worker},
        "ray": {"num_cpus": args.num_cpus},
    })


# --------------------------------------------------------------------------------------------- the two sides


def summarise(records: list[dict], wall: float, t0_epoch: float) -> dict:
    images = sum(r["samples"] for r in records)
    busy = sum(r["seconds"] for r in records)
    threads = sorted({r["counts"]["torch_threads"] for r in records})
    starts = [r["counts"]["unit_start_ms"] / 1000 for r in records]
    ends = [s + r["seconds"] for s, r in zip(starts, records)]
    span = max(ends) - min(starts)
    return {"images": images, "units": len(records), "e2e_s": round(wall, 3), "e2e_ips": round(images / wall, 2),
            "busy_s": round(busy, 3), "steady_ips": round(images / busy, 2), "span_s": round(span, 3),
            "span_ips": round(images / span, 2), "ready_s": round(min(starts) - t0_epoch, 3), "torch_threads": threads}


def run_bare(args, images_uri, ckpt, arch, work, tag, threads: int | None = None) -> dict:
    out = os.path.join(work, f"bare-{tag}")
    cfg = proposals_config(args, images_uri, ckpt, arch, out)
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0, t0_epoch = time.perf_counter(), time.time()
        manifest, records = run_in_process(BenchProposalsStage(cfg), out, cfg)
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(default_threads)
    res = summarise(records, wall, t0_epoch)
    res["manifest_samples"] = manifest["samples"]
    return res


def run_ray(args, images_uri, ckpt, arch, work, tag) -> dict:
    out = os.path.join(work, f"ray-{tag}")
    cfg = proposals_config(args, images_uri, ckpt, arch, out)
    t0, t0_epoch = time.perf_counter(), time.time()
    manifest = stage.run_stage(BenchProposalsStage(cfg), cfg.output, cfg.compute, None, cfg, storage.DEFAULT_OPTIONS,
                               cfg.ray)
    wall = time.perf_counter() - t0
    records = [json.loads(storage.read_text(os.path.join(out, shards.record_name(i))))
               for i in range(len(manifest["shards"]))]
    res = summarise(records, wall, t0_epoch)
    res["manifest_samples"] = manifest["samples"]
    return res


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("synthetic", "penn_fudan"), default="synthetic")
    ap.add_argument("--penn-fudan-root", default=PENN_FUDAN)
    ap.add_argument("--images", type=int, default=64, help="synthetic: images generated (default 64); penn_fudan: first N (default 24; 0: all)")
    ap.add_argument("--size", type=int, default=128, help="synthetic image side")
    ap.add_argument("--samples-per-shard", type=int, default=8, help="images per unit / output shard")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=0, help="0: conf/demo.yaml's proposals.top_k")
    ap.add_argument("--repeats", type=int, default=2, help="alternating bare/ray pairs; medians are reported")
    ap.add_argument("--num-cpus", type=int, default=2, help="embedded ray.init(num_cpus=...)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, help="compute.cpus_per_worker of the Ray actor")
    ap.add_argument("--sides", default="bare,bare_matched,ray", help="which of bare,bare_matched,ray to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: bench/results/proposals_throughput[_penn_fudan].json")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed afterwards")
    args = ap.parse_args(argv)
    if args.data == "penn_fudan" and args.images == 64:
        args.images = 24  # full-resolution post-processing (mask paste, RLE, IoU) makes these ~4x slower per image
    sides = set(args.sides.split(","))
    if args.out is None:
        args.out = RESULTS if args.data == "synthetic" else RESULTS.replace(".json", f"_{args.data}.json")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's periodic progress lines

    tmp = None
    if args.workdir:
        work = os.path.abspath(args.workdir)
        os.makedirs(work, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="maskflow-bench-")
        work = tmp.name
    try:
        t0 = time.perf_counter()
        images_uri, ing = ingest(args, work)
        ingest_s = time.perf_counter() - t0
        ckpt, arch = make_checkpoint(work, args.seed)
        print(f"ingested {ing['samples']} {args.data} images into {len(ing['shards'])} shards in {ingest_s:.1f}s; "
              f"bare torch threads: {torch.get_num_threads()}", flush=True)

        # Ray sets OMP_NUM_THREADS to the actor's CPUs, so torch in the actor runs that many threads; the bare loop
        # runs torch's default (all cores) unless told otherwise. Both bare variants are measured.
        matched = max(1, int(args.cpus_per_worker))
        runs: dict[str, list[dict]] = {"bare": [], "bare_matched": [], "ray": []}
        ray_init_s = None
        for rep in range(args.repeats):
            if "bare" in sides:
                runs["bare"].append(run_bare(args, images_uri, ckpt, arch, work, f"{rep}"))
                print(f"  bare         #{rep}: {runs['bare'][-1]}", flush=True)
            if "bare_matched" in sides and matched != torch.get_num_threads():
                runs["bare_matched"].append(run_bare(args, images_uri, ckpt, arch, work, f"{rep}-t{matched}", matched))
                print(f"  bare_matched #{rep}: {runs['bare_matched'][-1]}", flush=True)
            if "ray" not in sides:
                continue
            if ray_init_s is None:
                import ray

                t = time.perf_counter()
                ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
                quiet_ray_data()
                ray_init_s = time.perf_counter() - t
            runs["ray"].append(run_ray(args, images_uri, ckpt, arch, work, rep))
            print(f"  ray          #{rep}: {runs['ray'][-1]}", flush=True)
        if ray_init_s is not None:
            import ray

            ray.shutdown()
    finally:
        if tmp is not None:
            tmp.cleanup()
    runs = {side: r for side, r in runs.items() if r}

    def med(side, key):
        vals = [r[key] for r in runs.get(side, []) if key in r]
        return round(statistics.median(vals), 2) if vals else None

    summary: dict = {"ray_init_s": round(ray_init_s, 2) if ray_init_s is not None else None, "target": 0.9}
    for side in runs:
        for key in ("steady_ips", "span_ips", "e2e_ips", "ready_s"):
            v = med(side, key)
            if v is not None:
                summary[f"{side}.{key}"] = v
        summary[f"{side}.torch_threads"] = runs[side][0]["torch_threads"]
    for base in [b for b in ("bare", "bare_matched") if b in runs and "ray" in runs]:
        summary[f"ratio_steady_vs_{base}"] = round(summary["ray.steady_ips"] / summary[f"{base}.steady_ips"], 3)
        summary[f"ratio_span_vs_{base}"] = round(summary["ray.span_ips"] / summary[f"{base}.span_ips"], 3)
        summary[f"ratio_e2e_vs_{base}"] = round(summary["ray.e2e_ips"] / summary[f"{base}.e2e_ips"], 3)

    result = {
        "benchmark": "proposals_throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": __import__("ray").__version__, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "penn_fudan_root")},
        "model": {"arch": "tiny_fpn (conf/demo.yaml model block)", "weights": f"random, torch.manual_seed({args.seed})",
                  "top_k": proposals_config(args, "x", "x.pt", arch, "x").proposals.top_k},
        "summary": summary,
        "runs": runs,
    }

    sides = list(runs)
    bases = [b for b in sides if b != "ray"] if "ray" in runs else []
    label = {"bare": "bare", "bare_matched": f"bare {matched}thr", "ray": "ray 1 actor"}
    print()
    print(f"{'images/s (median of ' + str(args.repeats) + ')':<26}" + "".join(f"{label[s]:>14}" for s in sides)
          + "".join(f"{'ray/' + label[b]:>18}" for b in bases))
    for key, name in (("steady_ips", "steady (sum of units)"), ("span_ips", "steady (first..last unit)"),
                      ("e2e_ips", "end-to-end job"), ("ready_s", "seconds to first unit")):
        row = "".join(f"{summary.get(f'{s}.{key}', ''):>14}" for s in sides)
        rkey = key.split("_")[0]
        row += "".join(f"{summary.get(f'ratio_{rkey}_vs_{b}', ''):>18}" for b in bases)
        print(f"{name:<26}{row}")
    print("torch threads: " + ", ".join(f"{label[s]}={summary[f'{s}.torch_threads']}" for s in sides)
          + f"; ray.init {summary['ray_init_s']}s (in no figure); target ratio >= {summary['target']}")
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
