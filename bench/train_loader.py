"""Training steps/s with the trainer's shard loader against the same steps on in-memory batches.

    .venv/bin/python bench/train_loader.py                      # --model maskrcnn: tiny_fpn Mask R-CNN, synthetic
    .venv/bin/python bench/train_loader.py --model hstn_cls     # HSTN classifier, real cluttered MNIST 40x40

Both sides run the same model, optimizer, batch size and samples, in this process, with the same torch threads:

* **in-memory**: batches collated once up front and replayed: the model's own speed;
* **shard loader**: what a trainer worker does each epoch, through the harness's own functions: the shards as a Ray
  Dataset (:func:`maskflow.train.fit.training_dataset`: ``read_webdataset``, file order shuffled from the seed) →
  ``iter_torch_batches(collate_fn=maskflow.train.loop.collate_fn(plugin, seed, epoch))`` with the training loop's
  arguments (``data.shuffle_buffer`` as the local shuffle buffer, ``prefetch_batches=2``), a fresh iterator per
  epoch.

Each step is the training loop's: the plugin's ``losses`` (loss terms summed, metrics apart), ``zero_grad``,
``backward``, the optimizer the harness builds from ``optim`` (:func:`maskflow.train.optim.make_optimizer` over
``plugin.param_groups``), every value read back as a float. A run is one side's steps over one epoch (``--steps``
to choose another count) on a fresh model and optimizer (same seed), after one untimed step; the loader's run makes
its iterator inside the timed window, as each epoch of the loop does (Ray Data's start-up and its read-ahead are
part of the epoch: timing only the first seconds of an epoch would charge them the read-ahead of the whole epoch),
and closes it at the end. The in-memory side replays exactly the loader's batches of that epoch. The sides alternate
for ``--repeats`` rounds, so the two runs of a round see about the same load from this shared box's other tenants.
Models (``--model``):

* ``maskrcnn``: conf/demo.yaml's tiny_fpn Mask R-CNN (``trainers.maskrcnn``), ``--images`` synthetic 128 px images
  ingested 16 a shard; decoding a batch means PNGs, RLE masks and flips;
* ``hstn_cls``: conf/hstn/cls_cpu.yaml's HSTN classifier (``trainers.hstn``, batch 64, shuffle buffer 512) on the
  real cluttered MNIST 40x40 imported by the cluttered-digits stage (``--digit-splits``, 500 digits a shard as in
  conf/cluttered_digits/default.yaml): a tiny model, where a loader starves first.

Figures: each side's median steps/s, and the median over rounds of the ratio loader / in-memory (each round's two
runs; target >= 0.9), with each run's 1-minute load average (``/proc/loadavg``); and each side's CPU seconds per
step, of this process and every process under it (Ray's raylet, GCS and workers: the read tasks), from /proc: what
the loader costs in CPU, a figure other tenants' load moves far less than a rate. Ray Train's own process/DDP overhead
is in neither side. Results: bench/results/train_loader.json (maskrcnn), train_loader_hstn_cls.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

import torch  # noqa: E402

from _results import write_result  # noqa: E402
from _stage_bench import load_1m, machine, quiet_ray_data, run_in_process, tree_cpu_seconds  # noqa: E402
from maskflow import config  # noqa: E402
from maskflow.train.fit import training_dataset  # noqa: E402
from maskflow.train.loop import collate_fn  # noqa: E402
from maskflow.train.optim import make_optimizer  # noqa: E402
from maskflow.train.plugin import split_step_output  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


# --------------------------------------------------------------------------------------------- models and shards


def maskrcnn_job(args, work: str):
    """(plugin, shards) for conf/demo.yaml's Mask R-CNN on ``--images`` synthetic images."""
    from maskflow.data.synthetic import generate_coco_dataset
    from maskflow.stages.ingest import IngestConfig, IngestStage
    from trainers.maskrcnn import MaskRCNNPlugin, MaskRCNNTrainConfig

    generate_coco_dataset(work, args.images, seed=0, split="train")
    shards_uri = os.path.join(work, "shards")
    ingest = config.build(IngestConfig, {"input": {"annotations": f"{work}/annotations/instances_train.json",
                                                   "images": f"{work}/images/train"},
                                         "output": {"uri": shards_uri, "samples_per_shard": 16}})
    run_in_process(IngestStage(ingest), shards_uri, ingest)
    demo = config.load_yaml(os.path.join(ROOT, "conf", "demo.yaml"))
    loop = {"batch_size": args.batch_size or 8, "seed": 0}
    cfg = config.build(MaskRCNNTrainConfig, {"data": {"train": shards_uri, "shuffle_buffer": 64},
                                             "model": demo["model"], "loop": loop})
    return MaskRCNNPlugin(cfg), shards_uri


def hstn_cls_job(args, work: str):
    """(plugin, shards) for conf/hstn/cls_cpu.yaml's HSTN classifier on the real cluttered MNIST 40x40."""
    from maskflow.stages.cluttered_digits import ClutteredDigitsConfig, ClutteredDigitsStage
    from trainers.hstn import HSTNClassifierPlugin, HSTNClassifierTrainConfig

    shards_uri = os.path.join(work, "digits")
    digits = config.build(ClutteredDigitsConfig, {
        "input": {"source": "import_npz", "name": "cluttered_mnist_40x40", "splits": args.digit_splits,
                  "uri": os.path.join(SHARED, "cluttered_mnist_40x40", "cluttered_mnist_40x40_trainval.npz")},
        "output": {"uri": shards_uri, "samples_per_shard": 500}})
    run_in_process(ClutteredDigitsStage(digits), shards_uri, digits)
    data = config.load_yaml(os.path.join(ROOT, "conf", "hstn", "cls_cpu.yaml"))
    data = config.deep_merge(data, {"data": {"train": shards_uri}})  # data.val, init.from: unused here
    if args.batch_size:
        data["loop"]["batch_size"] = args.batch_size
    return HSTNClassifierPlugin(config.build(HSTNClassifierTrainConfig, data)), shards_uri


JOBS = {"maskrcnn": maskrcnn_job, "hstn_cls": hstn_cls_job}


# --------------------------------------------------------------------------------------------- the two sides


def train_run(plugin, make_batches, steps: int, warmup_batch) -> dict:
    """``steps`` timed steps of a fresh model and optimizer (seed 0) over ``make_batches()``, made inside the timed
    window (a loader's start-up is part of its epoch), after one untimed step on ``warmup_batch``. Each step is
    maskflow.train.loop's: loss terms summed, backward, update, every value read back as a float."""
    torch.manual_seed(0)
    model = plugin.build_model().train()
    optimizer = make_optimizer(plugin.param_groups(model), plugin.cfg.optim)

    def step(batch):
        out = split_step_output(plugin.losses(model, batch, "cpu"))
        loss = sum(out.losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for value in (*out.losses.values(), *out.metrics.values()):
            float(value.detach() if hasattr(value, "detach") else value)

    step(warmup_batch)  # untimed
    load_before, cpu = load_1m(), tree_cpu_seconds()
    t0 = time.perf_counter()
    batches = make_batches()
    try:
        for _ in range(steps):
            step(next(batches))
    finally:
        if hasattr(batches, "close"):
            batches.close()  # a loader: stops its Ray Data execution before the next run
    seconds = time.perf_counter() - t0
    cpu = tree_cpu_seconds() - cpu
    return {"steps_per_s": round(steps / seconds, 3), "seconds": round(seconds, 3),
            "cpu_s_per_step": round(cpu / steps, 3), "load_1m_before": load_before, "load_1m_after": load_1m()}


def cycle(batches: list):
    while True:
        yield from batches


def loader_batches(plugin, dataset):
    """Batches as a training worker gets them, epoch after epoch (a fresh iterator each, as the loop does)."""
    cfg = plugin.cfg
    epoch = 0
    while True:
        yield from dataset.iter_torch_batches(
            batch_size=cfg.loop.batch_size,
            collate_fn=collate_fn(plugin, cfg.loop.seed, epoch),
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.loop.seed * 1000 + epoch if cfg.data.shuffle_buffer else None,
            prefetch_batches=2,
        )
        epoch += 1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(JOBS), default="maskrcnn")
    p.add_argument("--steps", type=int, default=0, help="timed steps per run (0: one epoch)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of an in-memory run then a loader run")
    p.add_argument("--batch-size", type=int, default=0, help="0: the model's config (maskrcnn 8, hstn_cls 64)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the configs' loop.torch_threads)")
    p.add_argument("--images", type=int, default=96, help="maskrcnn: synthetic images")
    p.add_argument("--digit-splits", nargs="+", default=["train"], help="hstn_cls: cluttered MNIST splits")
    p.add_argument("--out", default=None, help="default: bench/results/train_loader[_<model>].json")
    args = p.parse_args(argv)
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   "train_loader.json" if args.model == "maskrcnn" else f"train_loader_{args.model}.json")
    torch.set_num_threads(args.threads)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    runs: dict[str, list[dict]] = {"in_memory": [], "shard_loader": []}
    with tempfile.TemporaryDirectory() as work:
        plugin, shards_uri = JOBS[args.model](args, work)
        cfg = plugin.cfg
        dataset, samples = training_dataset(shards_uri, cfg.storage.options(), seed=cfg.loop.seed)
        steps_per_epoch = -(-samples // cfg.loop.batch_size)  # the loop keeps a last, smaller batch
        steps = args.steps or steps_per_epoch
        # the in-memory side replays exactly the loader's batches of epoch 0 (the loader's runs all read epoch 0)
        loader = loader_batches(plugin, dataset)
        in_memory = [next(loader) for _ in range(min(steps, steps_per_epoch))]
        loader.close()
        print(f"{args.model}: {samples} samples ({steps_per_epoch} steps an epoch), batch {cfg.loop.batch_size}, "
              f"shuffle buffer {cfg.data.shuffle_buffer}, {steps} timed steps a run, {args.threads} torch threads",
              flush=True)
        for rep in range(args.repeats):
            runs["in_memory"].append(train_run(plugin, lambda: cycle(in_memory), steps, in_memory[0]))
            runs["shard_loader"].append(train_run(plugin, lambda: loader_batches(plugin, dataset), steps,
                                                  in_memory[0]))
            for side in runs:
                print(f"  {side:<13}#{rep}: {runs[side][-1]}", flush=True)
        del loader, dataset, in_memory  # before ray.shutdown(): their finalizers call into Ray, which then exits the process
        gc.collect()
    ratios = [real["steps_per_s"] / mem["steps_per_s"] for mem, real in zip(runs["in_memory"], runs["shard_loader"])]
    summary = {f"{side}.{key}": statistics.median(r[key] for r in rs) for side, rs in runs.items()
               for key in ("steps_per_s", "cpu_s_per_step")}
    summary.update({"ratio": round(statistics.median(ratios), 3),
                    "ratio_of_medians": round(summary["shard_loader.steps_per_s"] / summary["in_memory.steps_per_s"], 3),
                    "target": 0.9,
                    "load_1m_median": statistics.median(r["load_1m_before"] for rs in runs.values() for r in rs)})
    result = {"benchmark": f"train_loader_{args.model}", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "model": args.model, "samples": samples, "steps_per_epoch": steps_per_epoch,
              "batch_size": cfg.loop.batch_size, "threads": args.threads, "shuffle_buffer": cfg.data.shuffle_buffer,
              "steps": steps, "summary": summary, "runs": runs, "ratios_per_round": [round(r, 3) for r in ratios]}
    print(f"\nsteps/s (median of {args.repeats})   in-memory {summary['in_memory.steps_per_s']:.3f}   shard loader "
          f"{summary['shard_loader.steps_per_s']:.3f}   ratio (median of the rounds) {summary['ratio']:.3f} "
          f"{result['ratios_per_round']}; target >= 0.9; median load {summary['load_1m_median']}\n"
          f"CPU seconds per step (this process and its Ray processes): in-memory "
          f"{summary['in_memory.cpu_s_per_step']:.3f}, shard loader {summary['shard_loader.cpu_s_per_step']:.3f}")
    write_result(result, out)
    ray.shutdown()
    return result


if __name__ == "__main__":
    main()
