"""The main job on the embedded defaults: synthetic data → shards → Mask R-CNN on Ray Train → MLflow registry →
proposals job → AR evaluation → champion promotion.

    make demo                       # = python pipelines/demo.py --config conf/demo.yaml
    python pipelines/demo.py --config conf/demo.yaml workdir=s3://bucket/demo storage.endpoint_url=http://...

Every step is the same library code the individual pipelines run; the demo only chains them. Re-running reuses the
finished data stages (their manifests make them no-ops) and trains a new model version.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

import logging
import time
from dataclasses import dataclass, field

from maskflow import config, runtime, shards, stage, storage, tracking
from maskflow.config import Uri, require
from maskflow.data.synthetic import generate_coco_dataset
from maskflow.evaluators.proposal_ar import EvaluateProposalsConfig, evaluate_proposals, format_table
from maskflow.models.maskrcnn_config import MaskRCNNConfig
from maskflow.stage import ComputeConfig
from maskflow.stages.ingest import IngestConfig, IngestStage
from maskflow.stages.proposals import ProposalsConfig, ProposalSettings, ProposalsStage
from maskflow.train.config import LoopConfig, OptimConfig, ScalingConfig, ScheduleConfig
from trainers.maskrcnn import AugmentConfig, MaskRCNNPlugin, MaskRCNNTrainConfig

log = logging.getLogger("maskflow.demo")


@dataclass
class SyntheticConfig:
    train_images: int = 400
    val_images: int = 100
    size: int = 128
    max_objects: int = 5
    seed: int = 0

    def validate(self) -> None:
        require(self.train_images > 0 and self.val_images > 0, "train_images", "both splits need images")


@dataclass
class DemoConfig(runtime.Common):
    workdir: Uri = "runs/demo"  # every artefact (data, shards, checkpoints) under this URI
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    samples_per_shard: int = 50
    compute: ComputeConfig = field(default_factory=lambda: ComputeConfig(workers=1, cpus_per_worker=2))  # proposals
    model_name: str = "maskflow-maskrcnn-demo"
    model: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    proposals: ProposalSettings = field(default_factory=ProposalSettings)


def sub_config(schema, cfg: DemoConfig, **blocks):
    """A job config sharing the demo's ray/storage/tracking blocks, built (and validated) like any loaded config."""
    data = {"ray": config.to_dict(cfg.ray), "storage": config.to_dict(cfg.storage),
            "tracking": config.to_dict(cfg.tracking), **blocks}
    return config.build(schema, data)


def main(argv=None) -> dict:
    cfg = config.parse_cli(DemoConfig, argv, description=__doc__)
    runtime.setup_logging()
    options = cfg.storage.options()
    storage.check_uri(cfg.workdir, for_write=True, options=options, what="workdir")
    t_start = time.perf_counter()
    data_uri = storage.join(cfg.workdir, "data")
    syn = cfg.synthetic
    splits = {"train": (syn.train_images, 1), "val": (syn.val_images, 1_000_000)}

    # 1. the built-in synthetic dataset (deterministic from the seed; skipped when already there)
    for split, (n, first_id) in splits.items():
        if not storage.exists(storage.join(data_uri, "annotations", f"instances_{split}.json"), options):
            log.info("generating %d synthetic %s images", n, split)
            generate_coco_dataset(data_uri, n, syn.seed, split, (syn.size, syn.size), syn.max_objects, first_id,
                                  options)

    # 2. ingest both splits into shards
    shard_uris = {}
    for split in splits:
        shard_uris[split] = storage.join(cfg.workdir, "shards", split)
        ingest = sub_config(IngestConfig, cfg, input={
            "annotations": storage.join(data_uri, "annotations", f"instances_{split}.json"),
            "images": storage.join(data_uri, "images", split), "name": f"synthetic-{split}"},
            output={"uri": shard_uris[split], "samples_per_shard": cfg.samples_per_shard})
        stage.run_stage(IngestStage(ingest, options), ingest.output, ingest.compute, ingest.tracking, ingest,
                        options, ingest.ray)

    # 3. train on Ray Train, log + register (alias candidate)
    train_cfg = sub_config(
        MaskRCNNTrainConfig, cfg, data={"train": shard_uris["train"]}, model=config.to_dict(cfg.model),
        optim=config.to_dict(cfg.optim), schedule=config.to_dict(cfg.schedule), loop=config.to_dict(cfg.loop), scaling=config.to_dict(cfg.scaling),
        augment=config.to_dict(cfg.augment), run={"storage_path": storage.join(cfg.workdir, "checkpoints")},
        registry={"model_name": cfg.model_name})
    from maskflow.train.fit import fit as fit_model  # torch and Ray load only once the configs have parsed

    fit = fit_model(MaskRCNNPlugin(train_cfg))
    model_uri = f"models:/{cfg.model_name}/{fit.model_version}"

    # 4. proposals for the validation split with the registered model
    props_uri = storage.join(cfg.workdir, "proposals", f"val-v{fit.model_version}")
    props_cfg = sub_config(
        ProposalsConfig, cfg, input={"shards": shard_uris["val"]}, model={"uri": model_uri},
        proposals=config.to_dict(cfg.proposals), output={"uri": props_uri},
        compute=config.to_dict(cfg.compute))
    stage.run_stage(ProposalsStage(props_cfg, options, tracking.resolved_tracking_uri(cfg.tracking)),
                    props_cfg.output, props_cfg.compute, props_cfg.tracking, props_cfg, options, props_cfg.ray)

    # 5. evaluate (attached to the model version), then promote only if better than the champion
    eval_cfg = sub_config(EvaluateProposalsConfig, cfg, proposals=props_uri,
                          model={"name": cfg.model_name, "version": fit.model_version})
    result = evaluate_proposals(eval_cfg)
    decision = tracking.promote(cfg.model_name, version=fit.model_version)  # by the metric evaluation recorded

    minutes = (time.perf_counter() - t_start) / 60
    tracking_uri = tracking.resolved_tracking_uri(cfg.tracking)
    print("\n" + "=" * 72)
    print(f"maskflow demo finished in {minutes:.1f} min — proposals of {cfg.model_name} v{fit.model_version} "
          f"on {result['num_images']} synthetic val images ({result['num_gt']} instances):\n")
    # the evaluation's own table: AR@k for the k the kept proposals tell apart, and a line saying which were left out
    print(result["evaluation"].get("text", {}).get("ar_table.txt") or format_table(result))
    champ = "now champion" if decision["promoted"] else f"champion stays v{decision['champion_version']}"
    print(f"\n{decision['metric']} = {decision['candidate_value']:.3f} ({champ})")
    print(f"shards:      {shard_uris['train']}  {shard_uris['val']}  (manifest.json in each)")
    print(f"proposals:   {props_uri}  ({len(shards.read_manifest(props_uri, options)['shards'])} shards)")
    print(f"checkpoint:  {fit.checkpoint_path}")
    print(f"model:       models:/{cfg.model_name}@champion   (this run: {model_uri})")
    print(f"mlflow ui:   .venv/bin/mlflow ui --backend-store-uri {tracking_uri}")
    print("=" * 72)
    return {"result": result, "decision": decision, "fit": fit}


if __name__ == "__main__":
    config.main_guard(main)
