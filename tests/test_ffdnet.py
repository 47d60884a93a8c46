"""FFD-Net (000_b890a838f4d0d4ed.txt sec. 3) on real Penn-Fudan masks, without Ray: zero offsets give the proposal back
(every variant), the crop / paste-back round trip, the in-image replay of a deformation, the paper's L2 loss and the
IoU metrics by hand, the ablation variants, a short training that learns a real misalignment, the log-spaced schedule,
config errors, and the refinement stage's process() with an identity refiner (bit-exact output)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from maskflow import config, shards
from maskflow.config import ConfigError
from maskflow.data import schema
from maskflow.models.ffdnet import FFDNet, apply_edits, mask_iou_per_sample
from maskflow.models.ffdnet_config import FFDConfig
from maskflow.stages.ffd_crops import crop_boxes, crop_rois
from ops.ffd import crop_resize, ffd_warp, paste_crops
from ops.masks import decode_masks, encode_masks, mask_iou, rle_boxes
from tests.conftest import ROOT

CPU_MODEL = yaml.safe_load((ROOT / "conf" / "ffdnet" / "cpu.yaml").read_text())["model"]
VARIANTS = {"cpu": {}, "mesh7": {"mesh_size": 7}, "proposal_pool": {"pooling": "proposal"},
            "direct_head": {"head": "direct"}}


def cpu_arch(**changes) -> FFDConfig:
    return config.build(FFDConfig, {**CPU_MODEL, **changes})


def identity(model: FFDNet) -> FFDNet:
    """The network with its last layer zeroed: zero offsets (or a zero residual) for every input."""
    torch.nn.init.zeros_(model.head.last.weight)
    torch.nn.init.zeros_(model.head.last.bias)
    return model.eval()


# --------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def pf_samples(penn_fudan_coco) -> list[dict]:
    """The first 6 Penn-Fudan images as image samples (the ingest stage's process(), no Ray)."""
    from maskflow.stages.ingest import IngestConfig, IngestStage

    annotations, images = penn_fudan_coco
    cfg = config.build(IngestConfig, {"input": {"annotations": annotations, "images": images},
                                      "output": {"uri": "unused", "samples_per_shard": 6}})
    job = IngestStage(cfg)
    return [s for s in job.process(job.plan().units[0]) if isinstance(s, dict)]


@pytest.fixture(scope="module")
def pf_crops(pf_samples) -> dict[str, torch.Tensor]:
    """Every pedestrian of those images as the FFD-crops stage cuts it (1.6x its tight box, 96 x 96): image crops
    (N, 3, S, S) in [0, 1], mask crops (N, 1, S, S) {0, 1}, the full masks, their crop boxes and image index."""
    from maskflow.data.validate import decode_image

    images, masks, rois, full = [], [], [], []
    for n, s in enumerate(pf_samples):
        image = decode_image(s[schema.IMAGE]).float()
        rles = [a["segmentation"] for a in s[schema.META]["annotations"]]
        planes = torch.from_numpy(decode_masks(rles)).float()
        boxes = crop_boxes(rle_boxes(rles), 1.6)
        images.append(crop_resize(image[None], crop_rois(boxes, torch.zeros(len(rles))), 96) / 255)
        masks.append((crop_resize(planes[:, None], crop_rois(boxes, torch.arange(len(rles))), 96) > 0.5).float())
        rois.append(crop_rois(boxes, torch.full((len(rles),), n)))
        full += list(planes)
    return {"image": torch.cat(images), "mask": torch.cat(masks), "rois": torch.cat(rois), "full": full}


# --------------------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero_offsets_return_the_proposal(variant, pf_crops):
    model = identity(FFDNet(cpu_arch(**VARIANTS[variant])))
    image, mask = pf_crops["image"], pf_crops["mask"]
    out = model(image, mask)
    assert out["mask"].shape == mask.shape
    # pixel-centre sampling (float rounding only), or a zero residual; the same binary mask exactly
    torch.testing.assert_close(out["mask"], mask, atol=1e-5, rtol=0)
    assert torch.equal(out["mask"] > 0.5, mask > 0.5)
    edit = out["offsets"] if "offsets" in out else out["residual"]
    assert edit.abs().max() == 0
    # as initialised (Gaussian std 1e-3, zero bias: near the identity), not yet exactly it
    fresh = FFDNet(cpu_arch(**VARIANTS[variant])).eval()
    moved = fresh(image, mask)["mask"]
    assert 0 < (moved - mask).abs().max() < 0.5 and mask_iou_per_sample(moved, mask).min() > 0.97


def test_variants_differ_only_where_configured():
    counts = {v: FFDNet(cpu_arch(**c)) for v, c in VARIANTS.items()}
    heads = {v: m.head.last.weight.numel() for v, m in counts.items()}
    # the FFD head regresses 2 x 13 x 13 = 338 values; the direct head an 18 x 18 = 324 residual: the same size
    assert counts["cpu"].head.last.out_features == 338 and counts["direct_head"].head.last.out_features == 324
    assert abs(heads["direct_head"] - heads["cpu"]) / heads["cpu"] < 0.05
    assert counts["mesh7"].head.last.out_features == 2 * 7 * 7
    # proposal-only pooling halves every level's pooled features (no context half)
    dual = [fc[0].in_features for fc in counts["cpu"].head.levels]
    single = [fc[0].in_features for fc in counts["proposal_pool"].head.levels]
    assert dual == [2 * 16 * 225, 2 * 32 * 225, 2 * 64 * 100, 2 * 64 * 100] and single == [d // 2 for d in dual]


def test_paper_backbone_levels_and_every_parameter_trains():
    """ResNet-101 cut above res4b22 branch2a: conv1 (64, /2), res2c (256, /4), res3b3 branch2a (128, /8), res4b22
    branch2a (256, /16); no parameter left without a gradient (DDP would fail on one)."""
    model = FFDNet(config.build(FFDConfig, {"crop_size": 64, "grid_sizes": [4, 2], "level_fc": 8, "fc": 8}))
    levels = model.backbone(torch.rand(2, 3, 64, 64))
    assert [(f.shape[1], 64 // f.shape[-1]) for f in levels] == [(64, 2), (256, 4), (128, 8), (256, 16)]
    assert len(model.backbone.layer3) == 22 and sum(p.numel() for p in model.backbone.parameters()) > 20e6
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 16:48, 20:40] = 1
    model(torch.rand(2, 3, 64, 64), mask)["mask"].square().sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains_a_step(variant, pf_crops):
    from trainers.ffdnet import l2_loss

    torch.manual_seed(0)
    model = FFDNet(cpu_arch(**VARIANTS[variant]))
    image, mask = pf_crops["image"][:4], pf_crops["mask"][:4]
    loss = l2_loss(model(image, mask.roll(3, dims=-1))["mask"], mask).mean()
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert model.head.last.weight.grad.abs().sum() > 0 and model.backbone.parameters().__next__().grad is not None


def test_module_pickles_with_its_config(pf_crops):
    model = FFDNet(cpu_arch(mesh_size=7)).eval()
    copy = pickle.loads(pickle.dumps(model))
    assert copy.cfg == model.cfg
    image, mask = pf_crops["image"][:2], pf_crops["mask"][:2]
    assert torch.equal(copy(image, mask)["mask"], model(image, mask)["mask"])


# --------------------------------------------------------------------------------------------- crops and paste-back


def test_paste_back_round_trip(pf_crops):
    """A real mask cut into its 96 x 96 crop and pasted back is the mask up to resampling; the image-frame replay of a
    zero deformation is the mask bit for bit; a real deformation replayed in the image equals the crop's warp."""
    rois, full = pf_crops["rois"], pf_crops["full"]
    for n, plane in enumerate(full):
        h, w = plane.shape
        roi = rois[n:n + 1].clone()
        roi[:, 0] = 0
        crop = crop_resize(plane[None, None], roi, 96)[:, 0] > 0.5
        back = paste_crops(crop.float(), roi, h, w)[0] > 0.5
        iou = float((back & (plane > 0)).sum() / (back | (plane > 0)).sum())
        assert iou > 0.9, (n, iou)  # the crop samples a large pedestrian at ~1/3 its resolution
        same = apply_edits(plane[None], [{"offsets": torch.zeros(1, 2, 13, 13)}], roi, 96)[0]
        torch.testing.assert_close(same, plane, atol=1e-4, rtol=0)  # float32 coordinates of a ~500 px image
        assert torch.equal(same > 0.5, plane > 0)
        assert torch.equal(apply_edits(plane[None], [{"residual": torch.zeros(1, 1, 18, 18)}], roi, 96)[0], plane)
        # a residual of 1 everywhere fills the crop box (clipped to the image), and nothing outside it
        filled = apply_edits(plane[None], [{"residual": torch.ones(1, 1, 18, 18)}], roi, 96)[0] > 0.5
        x1, y1, x2, y2 = roi[0, 1:].tolist()
        box = torch.zeros(h, w, dtype=torch.bool)
        box[max(0, round(y1)):round(y2), max(0, round(x1)):round(x2)] = True
        assert (filled ^ box).sum() <= 2 * (h + w)  # up to the box's one-pixel rim
    # a smooth deformation (the content moves right by ~4% of the box and shrinks vertically), both ways
    offsets = torch.zeros(len(full), 2, 13, 13)
    offsets[:, 0] = -0.04
    offsets[:, 1] = torch.linspace(-0.05, 0.05, 13)[:, None]
    crop_warped = ffd_warp(pf_crops["mask"], offsets) > 0.5
    for n, plane in enumerate(full):
        roi = rois[n:n + 1].clone()
        roi[:, 0] = 0
        in_image = apply_edits(plane[None], [{"offsets": offsets[n:n + 1]}], roi, 96)[0]
        assert not torch.equal(in_image > 0.5, plane > 0)
        recropped = crop_resize(in_image[None, None], roi, 96)[0, 0] > 0.5
        iou = float((recropped & crop_warped[n, 0]).sum() / (recropped | crop_warped[n, 0]).sum())
        assert iou > 0.9, (n, iou)


# --------------------------------------------------------------------------------------------- training pieces


def crop_rows(image: torch.Tensor, proposal: torch.Tensor, gt: torch.Tensor, enlarge: float = 1.6) -> dict:
    """``ffd_crop/1`` rows as Ray Data hands them to collate (raw entry bytes)."""
    def png(t):
        return schema.png((t * 255).round().byte().numpy())

    return {"image.png": np.array([png(i.permute(1, 2, 0)) for i in image], dtype=object),
            "proposal.png": np.array([png(p[0]) for p in proposal], dtype=object),
            "gt.png": np.array([png(g[0]) for g in gt], dtype=object),
            "crop.json": np.array([schema.dumps({"enlarge": enlarge}) for _ in image], dtype=object),
            "__key__": np.array([f"k{i}" for i in range(len(image))], dtype=object)}


def test_collate_decodes_resizes_and_flips(pf_crops):
    from trainers.ffdnet import crop_batch

    image, mask = pf_crops["image"][:4], pf_crops["mask"][:4]
    rows = crop_rows(image, mask, mask.roll(5, dims=-1))
    batch = crop_batch(rows, 96, 1.6)
    assert torch.allclose(batch["image"], image, atol=1 / 255) and torch.equal(batch["proposal"], mask)
    assert torch.equal(batch["gt"], mask.roll(5, dims=-1))
    flipped = crop_batch(rows, 96, 1.6, np.random.default_rng(0), hflip=1.0)
    assert torch.equal(flipped["proposal"], mask.flip(-1)) and torch.equal(flipped["gt"], batch["gt"].flip(-1))
    half = crop_batch(rows, 96, 1.6, np.random.default_rng(3), hflip=0.5)
    again = crop_batch(rows, 96, 1.6, np.random.default_rng(3), hflip=0.5)
    assert torch.equal(half["image"], again["image"])  # reproducible from the generator
    small = crop_batch(rows, 64, 1.6)
    assert small["image"].shape == (4, 3, 64, 64) and set(small["gt"].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"crops made with crops.enlarge \[2.0\] but model.crop_enlarge is 1.6"):
        crop_batch(crop_rows(image, mask, mask, enlarge=2.0), 96, 1.6)


def test_loss_is_the_mean_squared_difference_and_metrics_are_ious(pf_crops):
    """With zero offsets the refined mask is the proposal, so the L2 is the fraction of pixels where proposal and
    ground truth differ; the IoUs are counted here by hand."""
    from trainers.ffdnet import FFDNetPlugin, FFDNetTrainConfig

    cfg = config.build(FFDNetTrainConfig, {"data": {"train": "x"}, "model": CPU_MODEL})
    plugin = FFDNetPlugin(cfg)
    model = identity(plugin.build_model())
    gt = pf_crops["mask"][:6]
    proposal = gt.roll(7, dims=-1)
    batch = {"image": pf_crops["image"][:6], "proposal": proposal, "gt": gt}
    out = plugin.losses(model, batch, "cpu")
    differ = (proposal != gt).float()
    assert set(out.losses) == {"l2"}
    assert out.losses["l2"].item() == pytest.approx(differ.mean().item(), rel=1e-6)
    a, b = proposal.bool().flatten(1), gt.bool().flatten(1)
    by_hand = ((a & b).sum(1).float() / (a | b).sum(1).float())
    assert out.metrics["iou_unrefined"].item() == pytest.approx(by_hand.mean().item(), rel=1e-6)
    assert out.metrics["iou_refined"].item() == pytest.approx(by_hand.mean().item(), rel=1e-6)
    with torch.no_grad():
        val = plugin.validation_step(model, batch, "cpu")
    assert set(val) == {"iou_refined", "iou_unrefined", "iou_gain", "l2"}
    assert torch.allclose(val["iou_unrefined"], by_hand) and torch.equal(val["iou_gain"], torch.zeros(6))
    assert torch.allclose(val["l2"], differ.flatten(1).mean(1))


def test_a_short_training_learns_a_real_misalignment(pf_crops):
    """Proposals = 8 real pedestrian masks shifted 6 px (of 96) right: after 10 Adam steps on them the refined masks
    overlap the ground truth better than the proposals do (the deformation's sign and units are learnable)."""
    from trainers.ffdnet import l2_loss

    torch.manual_seed(0)
    model = FFDNet(cpu_arch(dropout=0.0))
    image, gt = pf_crops["image"][:8], pf_crops["mask"][:8]
    proposal = torch.roll(gt, 6, dims=-1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        opt.zero_grad()
        l2_loss(model(image, proposal)["mask"], gt).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        refined = model(image, proposal)["mask"]
    before, after = mask_iou_per_sample(proposal, gt).mean(), mask_iou_per_sample(refined, gt).mean()
    assert after > before + 0.05, (float(before), float(after))


def test_log_epoch_schedule_is_log_even_per_epoch():
    """The paper's schedule (sec. 3.3): constant within an epoch, 1e-4 to 1e-7 log-evenly over 10 epochs; a group
    with an lr multiplier keeps it."""
    from maskflow.train.config import ParamGroupConfig, ScheduleConfig, TrainJobConfig
    from maskflow.train.optim import LRSchedule, make_optimizer, param_groups_by_prefix

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    optim = config.build(type(TrainJobConfig().optim), {"name": "sgd", "lr": 1e-4, "weight_decay": 0.002})
    opt = make_optimizer(param_groups_by_prefix(model, [ParamGroupConfig(prefix="1.", lr_mult=0.5)]), optim)
    schedule = LRSchedule(opt, config.build(ScheduleConfig, {"name": "log_epoch", "warmup_steps": 0,
                                                             "min_lr": 1e-7}), 7, 70)
    firsts = [schedule.apply(e * 7, e) for e in range(10)]
    assert firsts == pytest.approx(list(np.logspace(-4, -7, 10)), rel=1e-9)
    assert schedule.apply(6, 0) == pytest.approx(1e-4) and schedule.apply(69, 9) == pytest.approx(1e-7)
    schedule.apply(4 * 7, 4)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * np.logspace(-4, -7, 10)[4])
    with pytest.raises(ConfigError, match=r"^min_lr: required by schedule.name=log_epoch"):
        config.build(ScheduleConfig, {"name": "log_epoch"})


# --------------------------------------------------------------------------------------------- configs


def test_config_errors_name_the_key():
    from maskflow.stages.refine_proposals_config import RefineProposalsConfig
    from trainers.ffdnet import FFDNetTrainConfig, parse_config

    cases = [
        (FFDConfig, {"grid_sizes": [15, 10, 5]}, r"^grid_sizes: must be 2 \(\[shallow, deep\]\) or 4"),
        (FFDConfig, {"pooling": "max"}, r"^pooling: must be one of \['dual', 'proposal'\]"),
        (FFDConfig, {"head": "mlp"}, r"^head: must be one of \['ffd', 'direct'\]"),
        (FFDConfig, {"crop_size": 16}, r"^crop_size: must be >= 32"),
        (FFDConfig, {"backbone": {"widths": [16, 32]}}, r"^backbone.widths: needs 4 positive"),
        (FFDNetTrainConfig, {"data": {"train": "x", "val": "y"}, "validation": {"metric": "iou"}},
         r"^validation.metric: must be one of iou_refined"),
        (FFDNetTrainConfig, {"data": {"train": "x"}, "augment": {"hflip": 2}}, r"^augment.hflip: must be in \[0, 1\]"),
        (RefineProposalsConfig, {"output": {"uri": "x"}, "model": {"uri": "m.pt"}}, r"^input.proposals: required"),
        (RefineProposalsConfig, {"output": {"uri": "x"}, "input": {"proposals": "p"}}, r"^model.uri: required"),
        (RefineProposalsConfig, {"output": {"uri": "x"}, "input": {"proposals": "p"}, "model": {"uri": "m.pt"},
                                 "refine": {"iterations": 0}}, r"^refine.iterations: must be at least 1"),
        (RefineProposalsConfig, {"output": {"uri": "x"}, "input": {"proposals": "p"}, "model": {"uri": "m.pt"},
                                 "refine": {"top_k": 0}}, r"^refine.top_k: must be in 1..1000"),
    ]
    for schema_, data, match in cases:
        with pytest.raises(ConfigError, match=match):
            config.build(schema_, data)
    with pytest.raises(ConfigError, match=r"^model.mesh_size: needs >= 4"):
        parse_config(["--config", str(ROOT / "conf" / "ffdnet" / "cpu.yaml"), "model.mesh_size=3"])
    # the configs load without torch: a config error prints before torch loads
    probe = ("import sys, trainers.ffdnet, maskflow.stages.refine_proposals_config, maskflow.models.ffdnet_config; "
             "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT).returncode == 0


def test_ablation_configs_change_one_thing_each():
    from trainers.ffdnet import parse_config

    base = config.to_dict(parse_config(["--config", str(ROOT / "conf" / "ffdnet" / "cpu.yaml")]))
    for name, key, value in (("mesh7_cpu", "mesh_size", 7), ("proposal_pool_cpu", "pooling", "proposal"),
                             ("direct_head_cpu", "head", "direct")):
        cfg = config.to_dict(parse_config(["--config", str(ROOT / "conf" / "ffdnet" / f"{name}.yaml")]))
        assert cfg["model"][key] == value
        diff = {k for k in config.flatten(base) if config.flatten(base)[k] != config.flatten(cfg)[k]}
        assert diff == {f"model.{key}", "run.storage_path", "registry.model_name"}, (name, diff)
    paper = parse_config(["--config", str(ROOT / "conf" / "ffdnet" / "paper.yaml")])
    assert (paper.optim.name, paper.optim.momentum, paper.optim.weight_decay, paper.optim.lr) == ("sgd", 0.9, 0.002,
                                                                                                  1e-4)
    assert (paper.schedule.name, paper.schedule.min_lr, paper.loop.epochs) == ("log_epoch", 1e-7, 10)
    assert paper.model.level_grids == [30, 30, 20, 20] and paper.model.backbone.arch == "resnet101"


# --------------------------------------------------------------------------------------------- the stage, no Ray


def proposals_output(root, samples: list[dict], generator: str, per_shard: int = 8) -> str:
    """A finished ``proposals/1`` stage output as the proposals stage leaves it."""
    root.mkdir(parents=True, exist_ok=True)
    records = [shards.write_shard(str(root / shards.shard_name(n)), samples[i:i + per_shard])
               for n, i in enumerate(range(0, len(samples), per_shard))]
    (root / shards.MANIFEST).write_text(json.dumps({"stage": "proposals", "schema": "proposals/1",
                                                   "samples": len(samples), "shards": records}))
    return str(root)


def gt_proposals(sample: dict, generator: str) -> dict:
    """Proposals made from the ground truth: each pedestrian, then each shifted 9 px right; scores descending."""
    meta = sample[schema.META]
    planes = decode_masks([a["segmentation"] for a in meta["annotations"]])
    shifted = np.roll(planes, 9, axis=-1)
    rles = encode_masks(np.concatenate([planes, shifted]))
    n = len(rles)
    return {**sample, schema.PROPOSALS: {
        "boxes": rle_boxes(rles).tolist(), "scores": list(np.linspace(0.9, 0.1, n)), "segmentations": rles,
        "iou": mask_iou(rles, [a["segmentation"] for a in meta["annotations"]], [0] * (n // 2)).tolist(),
        "model": generator, "height": meta["height"], "width": meta["width"]}}


def test_stage_with_an_identity_refiner_returns_the_proposals_bit_for_bit(pf_samples, tmp_path):
    from maskflow.stage import Reject
    from maskflow.stages.refine_proposals import RefineProposalsConfig, RefineProposalsStage

    generator = "models:/pf-generator/3"
    samples = [gt_proposals(s, generator) for s in pf_samples]
    props_uri = proposals_output(tmp_path / "props", samples, generator, per_shard=3)
    checkpoint = tmp_path / "ffd_identity.pt"
    torch.save({"model": identity(FFDNet(cpu_arch())).state_dict()}, checkpoint)
    cfg = config.build(RefineProposalsConfig, {
        "input": {"proposals": props_uri}, "model": {"uri": str(checkpoint), "arch": CPU_MODEL},
        "refine": {"top_k": 3, "batch_size": 4, "iterations": 2}, "output": {"uri": str(tmp_path / "out")}})
    job = RefineProposalsStage(cfg)
    plan = job.plan()
    assert len(plan.units) == 2
    out, counts = [], {}
    for unit in plan.units:
        for item in job.process(unit):
            assert not isinstance(item, Reject), item
            if isinstance(item, dict):
                out.append(item)
            else:
                counts[item.name] = counts.get(item.name, 0) + item.value
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples]
    sizes = [len(s[schema.PROPOSALS]["scores"]) for s in samples]
    top = sum(min(3, n) for n in sizes)
    assert counts == {"images": 6, "proposals": sum(sizes), "proposals_beyond_top_k": sum(sizes) - top,
                      "proposals_refined": top, "proposals_refined_empty": 0}
    assert sum(sizes) > top  # some pass through
    for before, after in zip(samples, out):
        b, a = before[schema.PROPOSALS], after[schema.PROPOSALS]
        assert a["segmentations"] == b["segmentations"] and a["scores"] == b["scores"]  # bit for bit, same order
        assert np.allclose(a["boxes"], b["boxes"]) and np.allclose(a["iou"], b["iou"], atol=1e-6)
        n = len(b["scores"])
        assert a["refined"] == [True] * min(3, n) + [False] * max(0, n - 3)
        assert (a["model"], a["refiner"], a["generator"]) == (str(checkpoint), str(checkpoint), generator)
        assert after[schema.IMAGE] == before[schema.IMAGE] and after[schema.META] == before[schema.META]
        assert not job.schema.problems(after)
