"""Every YAML under conf/ loads and validates against the schema of the job that reads it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from maskflow import config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))  # the pipeline scripts import _bootstrap as a sibling module

from pipelines.convert import ConvertConfig  # noqa: E402
from pipelines.demo import DemoConfig  # noqa: E402
from maskflow.evaluate import EvaluateConfig  # noqa: E402
from maskflow.stages.affine_pairs import AffinePairsConfig  # noqa: E402
from maskflow.stages.cluttered_digits import ClutteredDigitsConfig  # noqa: E402
from maskflow.stages.ffd_crops import FFDCropsConfig  # noqa: E402
from maskflow.stages.ingest import IngestConfig  # noqa: E402
from maskflow.stages.instance_maps import InstanceMapsConfig  # noqa: E402
from maskflow.stages.proposals import ProposalsConfig  # noqa: E402
from maskflow.stages.video_proposals import VideoProposalsConfig  # noqa: E402
from maskflow.models import kinds  # noqa: E402
from maskflow.results import ResultsConfig  # noqa: E402
from trainers.hstn import PLUGINS as HSTN_TASKS  # noqa: E402
from trainers.maskrcnn import MaskRCNNTrainConfig  # noqa: E402
from trainers.sfnet import SFNetTrainConfig  # noqa: E402
from trainers.ffdnet import FFDNetTrainConfig  # noqa: E402
from maskflow.stages.refine_proposals_config import RefineProposalsConfig  # noqa: E402
from maskflow.stages.mask_patches_config import MaskPatchesConfig  # noqa: E402
from trainers.sharpmask import SharpMaskTrainConfig  # noqa: E402
from maskflow.retrain import RetrainConfig  # noqa: E402

SCHEMAS = {"demo.yaml": DemoConfig, "maskrcnn": MaskRCNNTrainConfig, "proposals": ProposalsConfig,
           "ingest": IngestConfig, "convert": ConvertConfig, "affine_pairs": AffinePairsConfig,
           "cluttered_digits": ClutteredDigitsConfig, "instance_maps": InstanceMapsConfig,
           "ffd_crops": FFDCropsConfig, "video_proposals": VideoProposalsConfig, "eval": EvaluateConfig,
           "sfnet": SFNetTrainConfig, "ffdnet": FFDNetTrainConfig,
           "refine_proposals": RefineProposalsConfig, "mask_patches": MaskPatchesConfig,
           "sharpmask": SharpMaskTrainConfig, "hstn": None, "results": ResultsConfig,
           "retrain": RetrainConfig}  # None: the file's ``task`` picks the schema (trainers/hstn.py)


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")))
def test_conf_file_is_valid(path):
    schema = SCHEMAS[path.split("/")[0]]
    data = config.load_yaml(str(ROOT / "conf" / path))
    if "kind" in data and schema is not None:  # an inference config (pipelines/predict.py): its kind's stage config
        schema = kinds.load_attr(kinds.kind(data.pop("kind")).inference_stage).config_class
    if schema is None:  # conf/hstn: a training config names its task, an inference config its model kind
        schema = HSTN_TASKS[data["task"]][0] if "task" in data else \
            kinds.load_attr(kinds.kind(data.pop("kind")).inference_stage).config_class
    if schema is ProposalsConfig and "input" not in data:  # input is given on the command line for these
        data["input"] = {"shards": "s3://bucket/shards"}
    if schema is EvaluateConfig and "predictions" not in data:  # and the predictions to evaluate
        data["predictions"] = "s3://bucket/predictions"
    cfg = config.build(schema, data)
    assert config.to_dict(cfg)  # and it round-trips to a dict for MLflow
    with pytest.raises(config.ConfigError, match=r"^no_such_key: unknown key"):
        config.build(schema, {**data, "no_such_key": 1})
