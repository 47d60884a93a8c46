"""Inference stages of the model kinds: the Ray Data job with ONE actor against a bare loop, same stage, same shards.

    .venv/bin/python bench/inference.py --kind all                  # hstn_cls, hstn_align, sfnet, one after another
    .venv/bin/python bench/inference.py --kind sfnet --repeats 3 --pairs-per-image 4
    .venv/bin/python bench/inference.py --kind ffdnet --cpus-per-worker 1   # the refinement job, 1 thread a side

The method is bench/proposals_throughput.py's (shared helpers: bench/_stage_bench.py), for any kind of
:data:`maskflow.models.kinds.KINDS` this script knows data and configs for (:data:`BENCHES`). Per kind:

* **model**: the kind's plugin (``KINDS[kind].plugin``) built from the kind's CPU training config (its ``model``
  block) by ``plugin.build_model()``, random weights from ``torch.manual_seed(--seed)``, saved as a
  ``{"model": state_dict}`` .pt checkpoint: the stage's ``model.uri`` (the same ``model`` block as ``model.arch``);
* **stage**: the kind's inference stage (``KINDS[kind].inference_stage``) configured from the kind's predict config
  (``conf/.../predict*.yaml``: batch size; ffdnet: conf/refine_proposals/default.yaml, whose ``refine`` block holds
  the batch size in crops and its input is ``input.proposals``), ``compute.workers=1``, ``compute.cpus_per_worker`` =
  ``--cpus-per-worker`` (the stage sets torch's threads to it on both sides);
* **data** (made first, untimed): ``hstn_cls``: the real cluttered MNIST 40x40 imported by the cluttered-digits
  stage (``import_npz``, ``input.splits=[valid]``: 1 000 digits, ``--digits-per-shard`` a unit); ``hstn_align``:
  affine + elastic pairs (no flip, no colour jitter: conf/hstn/align_affine_stn_cpu.yaml's recipe) and ``sfnet``:
  conf/affine_pairs/sfnet.yaml's pairs, both made by the affine-pairs stage from the 60 Penn-Fudan photographs at
  full size (ingested ``--images-per-shard`` a shard, ``--pairs-per-image`` pairs each: one unit = one input shard);
  ``ffdnet`` (the refinement job): ``proposals/1`` shards of the same 60 photographs, ``--proposals-per-image`` (100)
  each made from the ground truth as tests/test_evaluate.py's ``pf_proposals`` does (instance masks moved by up to
  ``--max-shift`` pixels, 3 in 4 cut to part of their box; never empty), so every top-k proposal is really cropped,
  refined and pasted back; its figures add refined proposals/s (steady, and per core = / ``--cpus-per-worker``).

Both sides (``bare``: setup + ``process_unit`` per unit in this process; ``ray``: ``run_stage`` on an embedded
``ray.init(num_cpus=--num-cpus)``, tracking off) warm up on one batch of the first unit in ``setup()`` and write their
prediction shards, records and manifest. Figures (samples/s, medians of ``--repeats`` alternating runs): ``steady``
(samples / summed unit seconds), ``span`` (first unit's start to last unit's end), ``e2e`` (whole job, ``ray.init``
excluded), ``ready`` (seconds to the first unit); ratio = ray / bare (target >= 0.9). Each run records the 1-minute
load average before and after it. Results: bench/results/inference_<kind>.json.
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
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _results import write_result  # noqa: E402
from _stage_bench import (compare, machine, print_table, run_in_process, side_by_side, time_bare,  # noqa: E402
                          time_ray, timed)
from maskflow import config  # noqa: E402
from maskflow.models import kinds  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
RESULTS = os.path.join(ROOT, "bench", "results")


@dataclass(frozen=True)
class KindBench:
    """What this benchmark needs besides :data:`maskflow.models.kinds.KINDS`: configs and input data of a kind."""

    train_config: str  # the CPU training config whose ``model`` block is the network (relative to the repo)
    train_config_class: str  # its schema, "module:Class"
    predict_config: str  # the kind's inference config (conf/.../predict*.yaml): batch size
    data: str  # "digits" | "hstn_pairs" | "sfnet_pairs" | "gt_proposals" (see make_inputs)
    unit: str  # what one sample is, for the table
    input_key: str = "shards"  # the stage config's input.<key> naming its input shards
    settings: str = "predict"  # the stage config's block holding batch_size
    per_sample: str = ""  # a count of the stage's (summed over units) also reported per second, e.g. proposals


BENCHES: dict[str, KindBench] = {
    "hstn_cls": KindBench("conf/hstn/cls_cpu.yaml", "trainers.hstn:HSTNClassifierTrainConfig",
                          "conf/hstn/predict_cls.yaml", "digits", "digits/s"),
    "hstn_align": KindBench("conf/hstn/align_cpu.yaml", "trainers.hstn:HSTNAlignTrainConfig",
                            "conf/hstn/predict_align.yaml", "hstn_pairs", "pairs/s"),
    "sfnet": KindBench("conf/sfnet/cpu.yaml", "trainers.sfnet:SFNetTrainConfig", "conf/sfnet/predict.yaml",
                       "sfnet_pairs", "pairs/s"),
    # the refinement job: proposals/1 in (input.proposals), its settings block is ``refine`` (batch_size = crops)
    "ffdnet": KindBench("conf/ffdnet/cpu.yaml", "trainers.ffdnet:FFDNetTrainConfig",
                        "conf/refine_proposals/default.yaml", "gt_proposals", "images/s", input_key="proposals",
                        settings="refine", per_sample="proposals_refined"),
}

# ``--kind all``: the sample-prediction kinds; the refinement job (ffdnet, ~3 min on an idle box) is run by name.
ALL = ("hstn_align", "hstn_cls", "sfnet")

# Pair recipes: HSTN alignment's (affine + elastic, no flip, no colour jitter; conf/hstn/align_affine_stn_cpu.yaml)
# and SFNet's (conf/affine_pairs/sfnet.yaml).
PAIR_RECIPES = {
    "hstn_pairs": ("conf/affine_pairs/default.yaml", {"flip_prob": 0.0, "brightness": 0.0, "contrast": 0.0,
                                                      "saturation": 0.0, "elastic_amplitude": 8.0}),
    "sfnet_pairs": ("conf/affine_pairs/sfnet.yaml", {}),
}


# --------------------------------------------------------------------------------------------- inputs (untimed)


def make_digits(args, work: str) -> str:
    from maskflow.stages.cluttered_digits import ClutteredDigitsConfig, ClutteredDigitsStage

    out = os.path.join(work, "digits")
    cfg = config.build(ClutteredDigitsConfig, {
        "input": {"source": "import_npz", "name": "cluttered_mnist_40x40", "splits": args.digit_splits,
                  "uri": os.path.join(SHARED, "cluttered_mnist_40x40", "cluttered_mnist_40x40_trainval.npz")},
        "output": {"uri": out, "samples_per_shard": args.digits_per_shard}})
    run_in_process(ClutteredDigitsStage(cfg), out, cfg)
    return out


def penn_fudan_images(args, work: str) -> str:
    """The 60 Penn-Fudan photographs as image shards (ingest, ``--images-per-shard`` a shard); made once."""
    from maskflow.data.coco import write_coco_json
    from maskflow.data.convert import penn_fudan_to_coco
    from maskflow.stages.ingest import IngestConfig, IngestStage

    out = os.path.join(work, "penn_fudan")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        coco, images = penn_fudan_to_coco(os.path.join(SHARED, "penn_fudan_ped"))
        annotations = os.path.join(work, "penn_fudan.json")
        write_coco_json(coco, annotations)
        cfg = config.build(IngestConfig, {"input": {"annotations": annotations, "images": images, "name": "penn_fudan"},
                                          "output": {"uri": out, "samples_per_shard": args.images_per_shard}})
        run_in_process(IngestStage(cfg), out, cfg)
    return out


def make_pairs(args, work: str, recipe: str) -> str:
    from maskflow.stages.affine_pairs import AffinePairsConfig, AffinePairsStage

    base, overrides = PAIR_RECIPES[recipe]
    pairs = {**config.load_yaml(os.path.join(ROOT, base))["pairs"], **overrides, "per_image": args.pairs_per_image}
    out = os.path.join(work, recipe)
    cfg = config.build(AffinePairsConfig, {"input": {"shards": penn_fudan_images(args, work)}, "pairs": pairs,
                                           "output": {"uri": out}})
    run_in_process(AffinePairsStage(cfg), out, cfg)
    return out


def shifted(masks: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(N, H, W) masks moved by (dy, dx) pixels, zero fill."""
    out = np.zeros_like(masks)
    h, w = masks.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        masks[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def gt_proposals(gt: np.ndarray, count: int, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` proposal masks made from an image's (G, H, W) instance masks, as tests/test_evaluate.py's
    ``pf_proposals`` does: instance ``i % G`` moved by up to ``max_shift`` pixels and, for 3 in 4, cut to the upper,
    lower, left or right 50-90 % of its box; never empty (an empty one falls back to the instance itself)."""
    out = np.empty((count, *gt.shape[1:]), np.uint8)
    for i in range(count):
        mask = gt[i % len(gt)]
        ys, xs = np.nonzero(mask)
        m = shifted(mask[None], *(int(v) for v in rng.integers(-max_shift, max_shift + 1, 2)))[0]
        cut, keep = (i // len(gt)) % 4, rng.uniform(0.5, 0.9)
        if cut == 1:  # upper part
            m[int(ys.min() + keep * (ys.max() - ys.min())):] = 0
        elif cut == 2:  # lower part
            m[:int(ys.max() - keep * (ys.max() - ys.min()))] = 0
        elif cut == 3 and rng.random() < 0.5:  # left part
            m[:, int(xs.min() + keep * (xs.max() - xs.min())):] = 0
        elif cut == 3:  # right part
            m[:, :int(xs.max() - keep * (xs.max() - xs.min()))] = 0
        out[i] = m if m.any() else mask
    return out


def make_gt_proposals(args, work: str) -> str:
    """proposals/1 shards of the 60 Penn-Fudan photographs (one per ingested image shard), ``--proposals-per-image``
    proposals each made from the ground truth by :func:`gt_proposals`: realistic masks, so every top-k proposal is
    really cropped, refined and pasted back. Boxes from the masks, random scores, IoUs against the annotations."""
    from maskflow import shards, storage
    from maskflow.data import schema
    from ops.masks import decode_masks, encode_masks, mask_iou, rle_boxes

    images = penn_fudan_images(args, work)
    out = os.path.join(work, "gt_proposals")
    rng = np.random.default_rng(args.seed)
    records, total = [], 0
    for i, rec in enumerate(json.loads(storage.read_text(os.path.join(images, shards.MANIFEST)))["shards"]):
        samples = []
        for sample in shards.iter_shard(os.path.join(images, rec["name"])):
            meta = schema.loads(sample[schema.META])
            h, w = meta["height"], meta["width"]
            gt_rles = [a["segmentation"] for a in meta["annotations"]]
            props = encode_masks(gt_proposals(decode_masks(gt_rles, h, w), args.proposals_per_image, args.max_shift,
                                              rng))
            sample[schema.PROPOSALS] = {
                "boxes": [[float(v) for v in b] for b in rle_boxes(props)], "scores": rng.random(len(props)).tolist(),
                "segmentations": props, "iou": mask_iou(props, gt_rles).round(6).tolist(),
                "model": "bench:ground-truth-shifted-cut", "height": h, "width": w}
            samples.append(sample)
        records.append(shards.write_shard(os.path.join(out, shards.shard_name(i)), samples))
        total += len(samples)
    manifest = {"stage": "proposals", "schema": schema.PROPOSALS_SCHEMA.name, "samples": total, "shards": records,
                "config": {"model": {"uri": "bench:ground-truth-shifted-cut"}}}
    storage.write_text(os.path.join(out, shards.MANIFEST), json.dumps(manifest))
    return out


def make_inputs(args, work: str, data: str) -> str:
    if data == "gt_proposals":
        return make_gt_proposals(args, work)
    return make_digits(args, work) if data == "digits" else make_pairs(args, work, data)


# --------------------------------------------------------------------------------------------- model + stage


def make_checkpoint(bench: KindBench, kind: kinds.ModelKind, seed: int, path: str) -> dict:
    """The kind's network from its plugin, random weights from ``seed``, saved as a trainer-style checkpoint;
    returns the network's config (its training config's ``model`` block) as a dict."""
    train_cfg = config.build(kinds.load_attr(bench.train_config_class),
                             config.load_yaml(os.path.join(ROOT, bench.train_config)))
    plugin = kinds.load_attr(kind.plugin)(train_cfg)
    torch.manual_seed(seed)
    model = plugin.build_model()
    torch.save({"model": model.state_dict()}, path)
    return config.to_dict(train_cfg.model)


def stage_config(args, bench: KindBench, stage_class: type, shards_uri: str, ckpt: str, arch: dict, out: str):
    data = config.load_yaml(os.path.join(ROOT, bench.predict_config))
    data.pop("kind", None)  # pipelines/predict.py's dispatch key, not part of the stage's config
    overrides = {"input": {bench.input_key: shards_uri}, "model": {"uri": ckpt, "arch": arch},
                 "output": {"uri": out}, "compute": {"workers": 1, "cpus_per_worker": args.cpus_per_worker},
                 "ray": {"num_cpus": args.num_cpus}}
    if args.batch_size:
        overrides[bench.settings] = {"batch_size": args.batch_size}
    data = config.deep_merge(data, overrides)
    data["model"]["arch"] = arch  # the checkpoint's network exactly, not merged with the predict config's sketch
    return config.build(stage_class.config_class, data)


def bench_kind(args, kind_name: str, work: str) -> dict:
    bench, kind = BENCHES[kind_name], kinds.kind(kind_name)
    stage_class = timed(kinds.load_attr(kind.inference_stage))
    t0 = time.perf_counter()
    shards_uri = make_inputs(args, work, bench.data)
    ckpt = os.path.join(work, f"{kind_name}.pt")
    arch = make_checkpoint(bench, kind, args.seed, ckpt)
    probe = stage_config(args, bench, stage_class, shards_uri, ckpt, arch, os.path.join(work, "unused"))
    print(f"[{kind_name}] inputs and checkpoint ready in {time.perf_counter() - t0:.1f}s: {shards_uri}; "
          f"batch size {getattr(probe, bench.settings).batch_size}, {args.cpus_per_worker:g} CPU(s) per worker",
          flush=True)

    def run_side(side: str, rep: int) -> dict:
        cfg = stage_config(args, bench, stage_class, shards_uri, ckpt, arch,
                           os.path.join(work, f"{kind_name}-{side}-{rep}"))
        st = stage_class(cfg)
        run = time_bare(st, cfg) if side == "bare" else time_ray(st, cfg)
        if bench.per_sample:  # e.g. refined proposals per second of the units, and per core (= per torch thread)
            n = run["counts"].get(bench.per_sample, 0)
            run[f"{bench.per_sample}_per_s_steady"] = round(n / run["busy_s"], 2)
            run[f"{bench.per_sample}_per_s_per_core"] = round(n / run["busy_s"] / args.cpus_per_worker, 2)
        return run

    runs, ray_init_s = side_by_side(["bare", "ray"], args.repeats, run_side, args.num_cpus, f"[{kind_name}] ")
    summary = compare(runs, ray_init_s)
    if bench.per_sample:
        name = bench.per_sample
        for side, side_runs in runs.items():
            summary[f"{side}.{name}"] = statistics.median(r["counts"].get(name, 0) for r in side_runs)
            for key in (f"{name}_per_s_steady", f"{name}_per_s_per_core"):
                summary[f"{side}.{key}"] = round(statistics.median(r[key] for r in side_runs), 2)
    result = {
        "benchmark": f"inference_{kind_name}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "params": {k: v for k, v in vars(args).items() if k not in ("out_dir", "workdir", "kind")},
        "kind": {"name": kind_name, "plugin": kind.plugin, "inference_stage": kind.inference_stage,
                 "train_config": bench.train_config, "predict_config": bench.predict_config, "data": bench.data,
                 "batch_size": getattr(probe, bench.settings).batch_size, "arch": arch,
                 "weights": f"random, torch.manual_seed({args.seed})"},
        "summary": summary,
        "runs": runs,
    }
    print()
    print(f"[{kind_name}] {kind.inference_stage}")
    print_table(summary, list(runs), {"bare": "bare", "ray": "ray 1 actor"}, bench.unit, args.repeats)
    if bench.per_sample:
        print(f"{bench.per_sample}/s steady (per core): " + ", ".join(
            f"{side} {summary[f'{side}.{bench.per_sample}_per_s_steady']} "
            f"({summary[f'{side}.{bench.per_sample}_per_s_per_core']})" for side in runs))
    write_result(result, os.path.join(args.out_dir, f"inference_{kind_name}.json"))
    print()
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=sorted(BENCHES) + ["all"], default="all")
    ap.add_argument("--repeats", type=int, default=2, help="alternating bare/ray pairs; medians are reported")
    ap.add_argument("--num-cpus", type=int, default=2, help="embedded ray.init(num_cpus=...)")
    ap.add_argument("--cpus-per-worker", type=float, default=2.0,
                    help="compute.cpus_per_worker of the actor (= torch threads on both sides; the predict configs' 2)")
    ap.add_argument("--batch-size", type=int, default=0,
                    help="0: the kind's predict config's batch_size (ffdnet: refine.batch_size, in crops)")
    ap.add_argument("--digit-splits", nargs="+", default=["valid"], help="cluttered MNIST splits to import")
    ap.add_argument("--digits-per-shard", type=int, default=250, help="digits per unit / output shard")
    ap.add_argument("--images-per-shard", type=int, default=8, help="Penn-Fudan images per image shard (= per unit)")
    ap.add_argument("--pairs-per-image", type=int, default=2, help="pairs drawn from each Penn-Fudan image")
    ap.add_argument("--proposals-per-image", type=int, default=100,
                    help="ffdnet: proposals made from each Penn-Fudan image's ground truth (the job refines top_k)")
    ap.add_argument("--max-shift", type=int, default=12, help="ffdnet: proposals moved by up to this many pixels")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    ap.add_argument("--out-dir", default=RESULTS, help="where inference_<kind>.json go")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed afterwards")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    names = list(ALL) if args.kind == "all" else [args.kind]
    with tempfile.TemporaryDirectory(prefix="maskflow-bench-") as tmp:
        work = os.path.abspath(args.workdir) if args.workdir else tmp
        os.makedirs(work, exist_ok=True)
        results = {name: bench_kind(args, name, work) for name in names}
    print("ray / bare (steady, span, e2e): " + "; ".join(
        f"{name} {r['summary']['ratio_steady_vs_bare']:.2f}, {r['summary']['ratio_span_vs_bare']:.2f}, "
        f"{r['summary']['ratio_e2e_vs_bare']:.2f}" for name, r in results.items()))
    return results


if __name__ == "__main__":
    main()
