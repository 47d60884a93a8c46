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

Both sides run torch at ``compute.cpus_per_worker`` threads: the stage sets them in ``process`` (OpenMP's count is
per calling thread, and Ray Data calls the actor from a thread of its own); each run records the count it used.
The timing helpers are shared with bench/inference.py (bench/_stage_bench.py).

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
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from _results import write_result  # noqa: E402
from _stage_bench import (TimedUnits, compare, machine, print_table, run_in_process, side_by_side,  # noqa: E402
                          time_bare, time_ray)
from maskflow import config  # noqa: E402
from maskflow.data.coco import write_coco_json  # noqa: E402
from maskflow.models.maskrcnn import MaskRCNNConfig, build_maskrcnn  # noqa: E402
from maskflow.stages.ingest import IngestConfig, IngestStage  # noqa: E402
from maskflow.stages.proposals import ProposalsConfig, ProposalsStage  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "proposals_throughput.json")
PENN_FUDAN = os.path.join(os.path.dirname(ROOT), "shared", "data", "penn_fudan_ped")


class BenchProposalsStage(TimedUnits, ProposalsStage):
    """ProposalsStage with the benchmark's per-unit counts (:class:`_stage_bench.TimedUnits`) and, as its warm-up,
    one forward pass on a dummy batch of ``warmup_size`` images."""

    warmup_size = (128, 128)

    def warm_up(self) -> None:
        n = self.cfg.proposals.batch_size
        gen = torch.Generator().manual_seed(0)
        dummy = [torch.rand(3, *self.warmup_size, generator=gen) for _ in range(n)]
        with torch.inference_mode():
            self.model([d.to(self.device) for d in dummy])


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
    ap.add_argument("--cpus-per-worker", type=float, default=1.0,
                    help="compute.cpus_per_worker of the Ray actor (= torch threads on both sides)")
    ap.add_argument("--sides", default="bare,ray", help="which of bare,ray to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: bench/results/proposals_throughput[_penn_fudan].json")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed afterwards")
    args = ap.parse_args(argv)
    if args.data == "penn_fudan" and args.images == 64:
        args.images = 24  # full-resolution post-processing (mask paste, RLE, IoU) makes these ~4x slower per image
    sides = [s for s in ("bare", "ray") if s in args.sides.split(",")]
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
        print(f"ingested {ing['samples']} {args.data} images into {len(ing['shards'])} shards in {ingest_s:.1f}s",
              flush=True)

        def run_side(side: str, rep: int) -> dict:
            cfg = proposals_config(args, images_uri, ckpt, arch, os.path.join(work, f"{side}-{rep}"))
            st = BenchProposalsStage(cfg)
            return time_bare(st, cfg) if side == "bare" else time_ray(st, cfg)

        runs, ray_init_s = side_by_side(sides, args.repeats, run_side, args.num_cpus)
    finally:
        if tmp is not None:
            tmp.cleanup()
    summary = compare(runs, ray_init_s)
    result = {
        "benchmark": "proposals_throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "penn_fudan_root")},
        "model": {"arch": "tiny_fpn (conf/demo.yaml model block)", "weights": f"random, torch.manual_seed({args.seed})",
                  "top_k": proposals_config(args, "x", "x.pt", arch, "x").proposals.top_k},
        "summary": summary,
        "runs": runs,
    }
    print()
    print_table(summary, list(runs), {"bare": "bare", "ray": "ray 1 actor"}, "images/s", args.repeats)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
