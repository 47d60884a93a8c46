"""The deployable cluster (cluster/): every manifest parses and holds its kind's schema — KubeRay's CRDs (v1.7.0,
../shared/schemas/kuberay, with unknown fields refused as `kubectl apply --validate=strict` refuses them) and
Kubernetes' own for core kinds (kubernetes-validate, strict) —; every entrypoint's script exists and its config passes
the project's validation (`--check`) with the cluster's environment; images and Ray versions match the pinned Ray;
token authentication is on everywhere; no credential is written in a manifest; cluster/k8s/ is what
cluster/render.py renders; the `ray up` file holds Ray's own cluster-config schema."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from maskflow import config
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
KUBERAY_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
CUSTOM_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
                "RayCronJob": "ray.io_raycronjobs.yaml"}
KUBERNETES_VERSION = "1.33.0"
sys.path.insert(0, str(CLUSTER))
sys.path.insert(0, str(ROOT / "pipelines"))  # the pipeline scripts import _bootstrap as a sibling module


def pinned_ray() -> str:
    match = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml pins no ray"
    return match.group(1)


def manifest_docs() -> list[tuple[str, dict]]:
    """Every YAML document under cluster/k8s/, and the RayJobs that the CronJobs' ConfigMaps carry."""
    docs = []
    for path in sorted((CLUSTER / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            name = str(path.relative_to(ROOT))
            docs.append((name, doc))
            if doc.get("kind") == "ConfigMap" and "rayjob.yaml" in doc.get("data", {}):
                docs.append((f"{name} (ConfigMap rayjob.yaml)", yaml.safe_load(doc["data"]["rayjob.yaml"])))
    assert docs, "no manifests under cluster/k8s/"
    return docs


def strict(schema):
    """A CRD's openAPIV3Schema with unknown fields refused, as the API server's strict field validation does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict:
    import jsonschema

    if not KUBERAY_SCHEMAS.exists():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_SCHEMAS}")
    validators = {}
    for kind, file in CUSTOM_KINDS.items():
        crd = yaml.safe_load((KUBERAY_SCHEMAS / file).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[kind] = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    return validators


def ray_cluster_specs(doc: dict) -> list[dict]:
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "RayCluster":
        return [spec]
    if kind == "RayJob":
        return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
    if kind == "RayCronJob":
        return [spec["jobTemplate"]["rayClusterSpec"]]
    return []


def entrypoints() -> list[tuple[str, str]]:
    out = []
    for name, doc in manifest_docs():
        if doc["kind"] == "RayJob":
            out.append((name, doc["spec"]["entrypoint"]))
        elif doc["kind"] == "RayCronJob":
            out.append((name, doc["spec"]["jobTemplate"]["entrypoint"]))
    return out


def test_rendered_manifests_are_up_to_date():
    import render

    assert render.main(["--check"]) == 0, "cluster/k8s/ differs from cluster/jobs.yaml: run python cluster/render.py"


def test_every_manifest_holds_its_kinds_schema(crd_validators):
    import kubernetes_validate

    kinds = set()
    for name, doc in manifest_docs():
        kind = doc["kind"]
        kinds.add(kind)
        assert doc["metadata"].get("namespace") == "maskflow" or kind == "ConfigMap" and "rayjob" in name, name
        if kind in crd_validators:
            assert doc["apiVersion"] == "ray.io/v1", name
            errors = sorted(crd_validators[kind].iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, f"{name}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}"
                                                       for e in errors[:5])
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name} ({kind}): {e.message} at {'.'.join(map(str, e.path))}")
    assert kinds >= {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap", "Deployment", "Service",
                     "ServiceAccount", "Role", "RoleBinding"}, kinds


def test_a_broken_manifest_is_caught(crd_validators):
    """The validation is strict: a misspelt field and a wrong type both fail (else the test above could not)."""
    doc = yaml.safe_load((CLUSTER / "k8s" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # misspelt
    doc["spec"]["headGroupSpec"]["rayStartParams"] = {"num-cpus": 0}  # must be a string
    messages = [e.message for e in crd_validators["RayCluster"].iter_errors(doc)]
    assert any("maxReplica" in m for m in messages) and any("is not of type 'string'" in m for m in messages), messages


def test_images_and_ray_versions_match_the_pinned_ray():
    ray = pinned_ray()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray)}-py311(-gpu|-cpu)?\s*$", dockerfile, re.M), \
        "cluster/Dockerfile is not FROM the official image of the pinned Ray and Python 3.11"
    images = set()
    for name, doc in manifest_docs():
        for spec in ray_cluster_specs(doc):
            assert spec["rayVersion"] == ray, name
        text = json.dumps(doc)
        for image in re.findall(r'"image": "([^"]+)"', text):
            images.add(image)
            if "maskflow" in image:
                assert image.endswith(f":{ray}"), f"{name}: image {image} is not tagged with the pinned Ray {ray}"
    assert any(i.startswith("ghcr.io/maskflow/maskflow:") for i in images), images
    ray_up = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    assert ray_up["docker"]["image"].endswith(f":{ray}")


def test_token_authentication_is_on_everywhere():
    clusters = 0
    for name, doc in manifest_docs():
        for spec in ray_cluster_specs(doc):
            clusters += 1
            assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: no token authentication"
    assert clusters >= 1 + len(entrypoints())
    ray_up = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    for command in ray_up["head_start_ray_commands"] + ray_up["worker_start_ray_commands"]:
        assert "ray start" not in command or "RAY_AUTH_MODE=token" in command, command
    assert "/home/ray/.ray/auth_token" in ray_up["file_mounts"]


def test_gpu_worker_group_requests_gpus_on_gpu_nodes():
    spec = yaml.safe_load((CLUSTER / "k8s" / "raycluster.yaml").read_text())["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"} and spec["enableInTreeAutoscaling"] is True
    gpu = groups["gpu"]
    pod = gpu["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert "nvidia.com/gpu" not in json.dumps(groups["cpu"])


def test_no_credentials_are_written_in_a_manifest():
    secret_like = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL)", re.I)
    for name, doc in manifest_docs():
        text = json.dumps(doc)
        for env in re.findall(r'\{"name": "([^"]+)", "value": "([^"]*)"\}', text):
            assert not secret_like.search(env[0]), f"{name}: {env[0]} is set in the manifest; use a Secret"
        assert "postgresql://" not in text, f"{name}: a database URI in a manifest; it belongs in a Secret"
    mlflow = [d for n, d in manifest_docs() if d["kind"] == "Deployment"][0]
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in container["env"] if "valueFrom" in e} == {"MLFLOW_BACKEND_STORE_URI"}
    command = " ".join(container["command"])
    for flag in ("--backend-store-uri", "--artifacts-destination s3://", "--allowed-hosts"):
        assert flag in command, flag


@pytest.mark.parametrize("manifest,entrypoint", entrypoints(), ids=[n for n, _ in entrypoints()])
def test_every_entrypoint_names_a_script_whose_config_checks(manifest, entrypoint, monkeypatch):
    """The entrypoint as the cluster runs it (relative data paths under the bucket) passes `--check`."""
    import importlib

    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1].startswith(("pipelines/", "trainers/")), entrypoint
    script = ROOT / argv[1]
    assert script.exists(), f"{manifest}: {argv[1]} does not exist"
    monkeypatch.setenv(config.BASE_DIR_ENV, "s3://maskflow")
    sys.path.insert(0, str(script.parent))
    module = importlib.import_module(argv[1].removesuffix(".py").replace("/", "."))
    try:
        result = module.main(argv[2:] + ["--check"])
    except config.ConfigChecked as ok:
        assert str(ok).startswith("config ok"), ok
        return
    assert result == {"result": "checked"}, f"{manifest}: {argv[1]} did not check its config"


def test_ray_up_file_holds_rays_cluster_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    ray_up = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    assert [e.message for e in validator.iter_errors(ray_up)] == []
    ray_up["max_worker"] = 3  # misspelt: the schema refuses unknown keys, so the check above can fail
    assert any("max_worker" in e.message for e in validator.iter_errors(ray_up))
