"""Proposal generators' inference speed: SharpMask against Mask R-CNN on the same images at the same input size.

    .venv/bin/python bench/generators.py                               # top_k 100, 1 and 2 threads, 12 images
    .venv/bin/python bench/generators.py --top-k 100 1000 --images 60 --repeats 5

Both networks are built from their CPU recipes with random weights (``torch.manual_seed(--seed)``) and configured
for proposals as the proposals job does (:func:`maskflow.models.loading.configure_for_proposals` with the same
``top_k``, ``score_thresh`` 0 and each generator's own NMS: Mask R-CNN 0.5, SharpMask none):

* **SharpMask**: conf/sharpmask/sharpmask_cpu.yaml's ``model`` (DeepMask trunk + refinement modules, 96 px windows,
  the pyramid 2^-2.5..2^0.5 in half octaves) by the ``sharpmask`` kind's plugin ``build_model()``;
* **Mask R-CNN**: conf/maskrcnn/penn_fudan.yaml's ``model`` (tiny_fpn, ``min_size`` 224, ``max_size`` 352) by
  :func:`maskflow.models.maskrcnn.build_maskrcnn`.

Input: the first ``--images`` Penn-Fudan photographs (../shared/data/penn_fudan_ped), decoded and resized once,
untimed, by Mask R-CNN's own rule for that recipe (shorter side ``--min-size`` 224, longer side at most
``--max-size`` 352: ~224 x 280 for these photos) and handed to both as the same list of CHW float tensors in [0, 1].
Mask R-CNN's ``min_size``/``max_size`` are set to the same numbers, so its internal resize is the identity: both
networks see the same pixels and paste their masks at the same size.

Timing: ``model(batch)`` under ``torch.inference_mode`` over all the images, ``--batch-size`` images a call (the
proposals job's call), torch at 1 and 2 intra-op threads (``--threads``). One untimed warm-up call per setting, then
``--repeats`` timed passes, the generators alternating pass by pass (both see the same load); images/s is the median
over the passes, and the ratio SharpMask / Mask R-CNN is the median of the passes' ratios. Each pass records the
1-minute load average before it (this box is shared) and the proposals returned per image. The proposals job's own
work around the network (decode, top-k, RLE, IoU, shard writing) is in bench/proposals_throughput.py's figures,
not here. Results: bench/results/generators.json.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from _results import write_result  # noqa: E402
from _stage_bench import load_1m, machine  # noqa: E402
from maskflow import config  # noqa: E402
from maskflow.models import kinds  # noqa: E402

PENN_FUDAN = os.path.join(os.path.dirname(ROOT), "shared", "data", "penn_fudan_ped")
RESULT = os.path.join(ROOT, "bench", "results", "generators.json")
SHARPMASK_CONFIG = "conf/sharpmask/sharpmask_cpu.yaml"
MASKRCNN_CONFIG = "conf/maskrcnn/penn_fudan.yaml"
NAMES = ("sharpmask", "maskrcnn")


def load_images(root: str, count: int, min_size: int, max_size: int) -> list[torch.Tensor]:
    """The first ``count`` photographs as (3, h, w) floats in [0, 1], resized as GeneralizedRCNNTransform does for
    (``min_size``, ``max_size``): scale = min(min_size / shorter side, max_size / longer side), bilinear."""
    import numpy as np
    from PIL import Image

    files = sorted(os.listdir(os.path.join(root, "PNGImages")))[:count]
    images = []
    for name in files:
        rgb = np.array(Image.open(os.path.join(root, "PNGImages", name)).convert("RGB"))  # writable: torch shares it
        x = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        h, w = x.shape[-2:]
        scale = min(min_size / min(h, w), max_size / max(h, w))
        size = (round(h * scale), round(w * scale))
        images.append(torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                                                      antialias=True)[0].clamp_(0, 1))
    return images


def build_generators(args) -> tuple[dict[str, torch.nn.Module], dict]:
    """Both networks from their recipes' ``model`` blocks, random weights, in eval mode; and those blocks."""
    from maskflow.models.maskrcnn import MaskRCNNConfig, build_maskrcnn

    sm_kind = kinds.kind("sharpmask")
    sm_cfg = config.build(kinds.load_attr("trainers.sharpmask:SharpMaskTrainConfig"),
                          config.load_yaml(os.path.join(ROOT, SHARPMASK_CONFIG)))
    mr_arch = {**config.load_yaml(os.path.join(ROOT, MASKRCNN_CONFIG))["model"],
               "min_size": args.min_size, "max_size": args.max_size}
    torch.manual_seed(args.seed)
    sharpmask = kinds.load_attr(sm_kind.plugin)(sm_cfg).build_model()
    torch.manual_seed(args.seed)
    maskrcnn = build_maskrcnn(config.build(MaskRCNNConfig, mr_arch))
    return {"sharpmask": sharpmask.eval(), "maskrcnn": maskrcnn.eval()}, \
        {"sharpmask": config.to_dict(sm_cfg.model), "maskrcnn": mr_arch}


def one_pass(model: torch.nn.Module, images: list[torch.Tensor], batch_size: int) -> tuple[float, float]:
    """(seconds, mean proposals per image) of one pass of ``model`` over ``images``."""
    returned = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            returned += sum(len(o["scores"]) for o in model(images[start:start + batch_size]))
    return time.perf_counter() - t, returned / len(images)


def result_of(args, images: list, sizes: list, arch: dict, summary: dict, settings: list) -> dict:
    return {
        "benchmark": "generators",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "penn_fudan_root")},
        "input": {"images": len(images), "sizes_hw": [list(s) for s in sizes]},
        "models": {"sharpmask": {"config": SHARPMASK_CONFIG, "arch": arch["sharpmask"]},
                   "maskrcnn": {"config": MASKRCNN_CONFIG, "arch": arch["maskrcnn"]},
                   "weights": f"random, torch.manual_seed({args.seed})"},
        "summary": summary,
        "settings": settings,
    }


def main(argv=None) -> dict:
    from maskflow.models.loading import configure_for_proposals

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12, help="first N Penn-Fudan photographs (60 in all)")
    ap.add_argument("--min-size", type=int, default=224, help="input's shorter side (Mask R-CNN recipe's min_size)")
    ap.add_argument("--max-size", type=int, default=352, help="input's longer side at most (its max_size)")
    ap.add_argument("--top-k", type=int, nargs="+", default=[100], help="proposals kept per image")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads")
    ap.add_argument("--batch-size", type=int, default=4, help="images per call (conf/proposals/penn_fudan.yaml's 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per generator and setting (alternating)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    ap.add_argument("--penn-fudan-root", default=PENN_FUDAN)
    ap.add_argument("--out", default=RESULT)
    args = ap.parse_args(argv)

    images = load_images(args.penn_fudan_root, args.images, args.min_size, args.max_size)
    sizes = sorted({tuple(x.shape[-2:]) for x in images})
    models, arch = build_generators(args)
    print(f"{len(images)} Penn-Fudan images resized to {sizes[0]}..{sizes[-1]} (h, w); batch {args.batch_size}",
          flush=True)
    default_threads = torch.get_num_threads()
    settings, summary = [], {}
    try:
        for top_k in args.top_k:
            for model in models.values():
                configure_for_proposals(model, top_k, 0.0, None)  # the proposals job's call (each generator's NMS)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for model in models.values():  # warm-up: one call, untimed
                    one_pass(model, images[:args.batch_size], args.batch_size)
                passes = {name: [] for name in NAMES}
                for rep in range(args.repeats):
                    for name in NAMES:
                        load = load_1m()
                        seconds, returned = one_pass(models[name], images, args.batch_size)
                        passes[name].append({"seconds": round(seconds, 3), "ips": round(len(images) / seconds, 3),
                                             "proposals_per_image": round(returned, 1), "load_1m_before": load})
                        print(f"  top_k {top_k} threads {threads} {name:<9} #{rep}: {passes[name][-1]}", flush=True)
                row = {"top_k": top_k, "threads": threads, "passes": passes}
                for name in NAMES:
                    row[f"{name}.ips"] = round(statistics.median(p["ips"] for p in passes[name]), 2)
                    row[f"{name}.proposals_per_image"] = statistics.median(p["proposals_per_image"]
                                                                           for p in passes[name])
                row["ratio_sharpmask_vs_maskrcnn"] = round(statistics.median(
                    s["ips"] / m["ips"] for s, m in zip(passes["sharpmask"], passes["maskrcnn"])), 3)
                loads = [p["load_1m_before"] for name in NAMES for p in passes[name]]
                row["load_1m"] = [min(loads), max(loads)]
                settings.append(row)
                summary[f"top{top_k}_t{threads}"] = {k: v for k, v in row.items() if k != "passes"}
                # after every setting: a run cut short (2 threads can run 10x slower under load) keeps its figures
                write_result(result_of(args, images, sizes, arch, summary, settings), args.out)
    finally:
        torch.set_num_threads(default_threads)
    result = result_of(args, images, sizes, arch, summary, settings)
    print()
    print(f"{'top_k':>6}{'threads':>8}{'SharpMask img/s':>17}{'Mask R-CNN img/s':>18}{'SM / MR':>9}"
          f"{'props/img SM, MR':>18}{'load 1m':>13}")
    for r in settings:
        print(f"{r['top_k']:>6}{r['threads']:>8}{r['sharpmask.ips']:>17}{r['maskrcnn.ips']:>18}"
              f"{r['ratio_sharpmask_vs_maskrcnn']:>9}"
              f"{str(r['sharpmask.proposals_per_image']) + ', ' + str(r['maskrcnn.proposals_per_image']):>18}"
              f"{str(r['load_1m'][0]) + '-' + str(r['load_1m'][1]):>13}")
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
