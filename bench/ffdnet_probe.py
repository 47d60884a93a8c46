"""Can FFD-Net learn from a given set of crops? An in-memory probe of the refiner's training on ``ffd_crop/1`` shards,
for trying training changes quickly before a results run (docs/RESULTS.md, FFD-Net: the variants listed there were
measured with it).

    python bench/ffdnet_probe.py --train runs/results/ffdnet/crops/train --val runs/results/ffdnet/crops/val
    python bench/ffdnet_probe.py ... --epochs 40 --lr 3e-3 --dropout 0      # longer / faster / no dropout
    python bench/ffdnet_probe.py ... --jitter 0.5 --gt-source 0.5            # random B-spline jitter of the inputs
    python bench/ffdnet_probe.py ... --blur 3                                # L2 on Gaussian-smoothed masks
    python bench/ffdnet_probe.py ... --trunk models:/<sharpmask>@candidate [--freeze]  # SharpMask's trunk as backbone

Trains conf/ffdnet/cpu.yaml's network (AdamW, one-cycle) on all crops held in memory, no Ray, and prints after every
epoch the training loss and the held-out crops' mean IoU gain (refined - unrefined, masks at 0.5): what the
trainer's ``val/iou_gain`` reports. Not a replacement for the trainer: no checkpoints, no MLflow.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F

from maskflow.models.ffdnet import build_ffdnet, mask_iou_per_sample
from maskflow.models.ffdnet_config import FFDBackboneConfig, FFDConfig
from ops.ffd import ffd_warp
from trainers.ffdnet import CROP, GT, IMAGE, PROPOSAL, crop_batch, l2_loss


def load_crops(directory: str, size: int) -> dict[str, torch.Tensor]:
    rows: dict[str, dict[str, bytes]] = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, entry = member.name.partition(".")
                rows.setdefault(key, {})[entry] = tar.extractfile(member).read()
    if not rows:
        raise SystemExit(f"{directory}: no ffd_crop/1 shards (make them with pipelines/ffd_crops.py)")
    batch = {f: np.array([r[f] for r in rows.values()], dtype=object) for f in (IMAGE, PROPOSAL, GT, CROP)}
    return crop_batch(batch, size, 1.6)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default="runs/results/ffdnet/crops/train")
    p.add_argument("--val", default="runs/results/ffdnet/crops/val")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--jitter", type=float, default=0.0, help="probability of replacing a proposal by a jittered mask")
    p.add_argument("--jitter-std", type=float, default=0.03, help="control-point offsets' std, in crop sizes")
    p.add_argument("--jitter-mesh", type=int, default=5)
    p.add_argument("--gt-source", type=float, default=0.0, help="probability that the jittered mask is the ground truth")
    p.add_argument("--blur", type=float, default=0.0, help="L2 on masks smoothed by a Gaussian of this sigma (px)")
    p.add_argument("--trunk", default="", help="a registered SharpMask whose trunk becomes the backbone")
    p.add_argument("--freeze", action="store_true", help="keep the --trunk backbone fixed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    cfg = FFDConfig(backbone=FFDBackboneConfig(arch="tiny", widths=[16, 32, 64, 64]), crop_size=96,
                    grid_sizes=[15, 10], level_fc=64, fc=256, dropout=a.dropout)
    train, val = load_crops(a.train, cfg.crop_size), load_crops(a.val, cfg.crop_size)
    if a.trunk:  # SharpMask's CPU trunk: 4 residual stages at strides 2-16, the levels FFD-Net pools from
        import mlflow.pytorch

        sharpmask = mlflow.pytorch.load_model(a.trunk, map_location="cpu")
        cfg.backbone.widths = list(sharpmask.cfg.trunk.channels)
        model = build_ffdnet(cfg)
        trunk = sharpmask.trunk
        trunk.out_channels = cfg.backbone.widths
        model.backbone = trunk
        if a.freeze:
            trunk.requires_grad_(False)
    else:
        model = build_ffdnet(cfg)
    n = len(train["image"])
    print(f"{n} training crops, {len(val['image'])} held-out crops", flush=True)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
    steps = a.epochs * -(-n // a.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps, pct_start=0.05)
    unrefined = mask_iou_per_sample(val["proposal"], val["gt"])
    started = time.perf_counter()
    for epoch in range(a.epochs):
        model.train()
        losses = []
        for idx in np.array_split(rng.permutation(n), -(-n // a.batch_size)):
            idx = torch.from_numpy(idx)
            image, proposal, gt = train["image"][idx], train["proposal"][idx], train["gt"][idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)[:, None, None, None]
            image, proposal, gt = (torch.where(flip, x.flip(-1), x) for x in (image, proposal, gt))
            if a.jitter > 0:
                source = torch.where(torch.from_numpy(rng.random(len(idx)) < a.gt_source)[:, None, None, None],
                                     gt, proposal)
                offsets = torch.from_numpy(rng.normal(0, a.jitter_std, (len(idx), 2, a.jitter_mesh,
                                                                        a.jitter_mesh))).float()
                jittered = (ffd_warp(source, offsets) > 0.5).float()
                use = (torch.from_numpy(rng.random(len(idx)) < a.jitter) & (jittered.flatten(1).sum(1) > 0))
                proposal = torch.where(use[:, None, None, None], jittered, proposal)
            if a.blur > 0:
                proposal, gt = gaussian_blur(proposal, a.blur), gaussian_blur(gt, a.blur)
            loss = l2_loss(model(image, proposal)["mask"], gt).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            refined = mask_iou_per_sample(model(val["image"], val["proposal"])["mask"], val["gt"])
        print(f"epoch {epoch + 1}/{a.epochs}: train l2 {np.mean(losses):.4f}, held-out IoU {unrefined.mean():.4f} -> "
              f"{refined.mean():.4f} (gain {(refined - unrefined).mean():+.4f}), {time.perf_counter() - started:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
