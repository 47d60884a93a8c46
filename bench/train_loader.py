"""Training steps/s with the real loader against the same steps on in-memory batches.

Both sides run the same Mask R-CNN (conf/demo.yaml's model block), optimizer, batch size and samples, in this
process, with the same torch threads:

* **in-memory**: batches collated once up front (decoded images, targets) and replayed — the model's own speed;
* **real loader**: what a trainer worker does each epoch: ``ray.data.read_webdataset`` over the shards (the trainer
  harness's :func:`maskflow.train.fit.training_dataset`) → ``iter_torch_batches(collate_fn=<the plugin's collate>)`` with
  prefetching (PNG decode, RLE decode, flips in the collate function).

The ratio (real / in-memory steps/s) says how much of a CPU training step the input pipeline costs; Ray Train's
own process/DDP overhead is not in either figure. Results: bench/results/train_loader.json.

    .venv/bin/python bench/train_loader.py [--images 96] [--steps 12] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import yaml  # noqa: E402

from _results import write_result  # noqa: E402
from maskflow import config, stage  # noqa: E402
from maskflow.data.synthetic import generate_coco_dataset  # noqa: E402
from maskflow.stages.ingest import IngestConfig, IngestStage  # noqa: E402
from maskflow.train.fit import training_dataset  # noqa: E402
from maskflow.train.loop import collate_fn  # noqa: E402
from trainers.maskrcnn import MaskRCNNPlugin, MaskRCNNTrainConfig  # noqa: E402


def train_steps(plugin, model, optimizer, batches, steps: int) -> float:
    """Seconds for ``steps`` optimizer steps over an iterable of batches (first batch excluded: warm-up)."""
    it = iter(batches)
    plugin.losses(model, next(it), "cpu")  # warm-up forward, untimed
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        loss = sum(plugin.losses(model, batch, "cpu").values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "train_loader.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    demo = yaml.safe_load(open(os.path.join(ROOT, "conf", "demo.yaml")))
    with tempfile.TemporaryDirectory() as work:
        generate_coco_dataset(work, args.images, seed=0, split="train")
        shards_uri = os.path.join(work, "shards")
        ingest = config.build(IngestConfig, {"input": {"annotations": f"{work}/annotations/instances_train.json",
                                                       "images": f"{work}/images/train"},
                                             "output": {"uri": shards_uri, "samples_per_shard": 16}})
        stage.run_stage(IngestStage(ingest), ingest.output, ingest.compute, None, ingest)
        cfg = config.build(MaskRCNNTrainConfig, {"data": {"train": shards_uri}, "model": demo["model"],
                                                 "loop": {"batch_size": args.batch_size}})
        plugin = MaskRCNNPlugin(cfg)
        needed = args.steps + 1
        ds, _ = training_dataset(shards_uri, cfg.storage.options(), seed=0)

        def real_batches():
            while True:  # epochs, each with a fresh iterator as the trainer does
                yield from ds.iter_torch_batches(batch_size=args.batch_size, collate_fn=collate_fn(plugin, seed=0),
                                                 local_shuffle_buffer_size=64, local_shuffle_seed=0,
                                                 prefetch_batches=2, drop_last=True)

        in_memory = []
        for batch in real_batches():
            in_memory.append(batch)
            if len(in_memory) == needed:
                break

        results = {}
        for side, batches in (("in_memory", lambda: iter(in_memory * 2)), ("real_loader", real_batches),
                              ("in_memory#2", lambda: iter(in_memory * 2)), ("real_loader#2", real_batches)):
            torch.manual_seed(0)
            model = plugin.build_model().train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            seconds = train_steps(plugin, model, optimizer, batches(), args.steps)
            results[side] = args.steps / seconds
            print(f"  {side:<14} {results[side]:.3f} steps/s ({args.steps * args.batch_size / seconds:.1f} img/s)")
    ray.shutdown()
    mem = sorted([results["in_memory"], results["in_memory#2"]])[1]
    real = sorted([results["real_loader"], results["real_loader#2"]])[1]
    result = {"steps": args.steps, "batch_size": args.batch_size, "threads": args.threads, "images": args.images,
              "steps_per_s": results, "ratio_real_vs_in_memory": real / mem}
    print(f"\nsteps/s (best of 2)   in-memory {mem:.3f}   real loader {real:.3f}   ratio {real / mem:.3f}")
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
