"""Render the Kubernetes manifests of cluster/k8s/ from cluster/jobs.yaml (one place for the image, the Ray version,
the cluster shape, the secrets' names and every job's entrypoint).

    python cluster/render.py            # write cluster/k8s/
    python cluster/render.py --check    # exit 1, naming the files, when cluster/k8s/ differs from what this renders

What it writes:

* ``raycluster.yaml`` — the long-running RayCluster: a head (no work scheduled on it), a CPU worker group and a GPU
  worker group (``nvidia.com/gpu`` requests, a node selector, the NVIDIA taint tolerated), both autoscaled between
  their bounds; token authentication on (``authOptions``: KubeRay makes the token Secret and sets ``RAY_AUTH_MODE`` /
  ``RAY_AUTH_TOKEN`` on every container, the job submitters included).
* ``jobs/rayjob-<job>.yaml`` — one RayJob per job kind, each on an ephemeral cluster of the same spec.
* ``retrain/raycronjob-<model>.yaml`` — the retraining schedule (KubeRay >= 1.7); ``retrain/cronjob-<model>.yaml`` —
  the same for older KubeRay: a Kubernetes CronJob whose pod creates the RayJob held in a ConfigMap
  (``retrain/rbac.yaml``: the service account allowed to create RayJobs, nothing else).
* ``mlflow.yaml`` — the tracking server: ``mlflow server`` with the PostgreSQL backend store and S3 artifacts,
  credentials from Secrets, ``--allowed-hosts`` its service names; a Deployment and a Service.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "k8s")
HEADER = "# Rendered by cluster/render.py from cluster/jobs.yaml: edit those, not this file.\n"


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # plain YAML for kubectl readers: no &id001 anchors
        return True


def _env(spec: dict) -> list[dict]:
    return [{"name": "MASKFLOW_BASE_DIR", "value": spec["base_dir"]},
            {"name": "MLFLOW_TRACKING_URI", "value": spec["tracking_uri"]},
            {"name": "RAY_DATA_LOGGING_CONFIG", "value": "/app/cluster/ray_data_logging.yaml"}]


def _container(spec: dict, name: str, resources: dict, gpus: int = 0) -> dict:
    limits = {"cpu": resources["cpu"], "memory": resources["memory"]}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"name": name, "image": spec["image"], "imagePullPolicy": "IfNotPresent", "workingDir": "/app",
            "env": _env(spec), "envFrom": [{"secretRef": {"name": spec["secrets"]["s3"]}}],
            "resources": {"requests": dict(limits), "limits": limits},
            "volumeMounts": [{"name": "ray-logs", "mountPath": "/tmp/ray"}]}


def cluster_spec(spec: dict, autoscale: bool = True) -> dict:
    """A RayCluster spec: head + CPU and GPU worker groups, token authentication."""
    c = spec["cluster"]
    head = _container(spec, "ray-head", c["head"])
    head["ports"] = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}]
    volumes = [{"name": "ray-logs", "emptyDir": {}}]
    cpu, gpu = c["cpu_workers"], c["gpu_workers"]
    groups = [
        {"groupName": "cpu", "replicas": cpu["min"], "minReplicas": cpu["min"], "maxReplicas": cpu["max"],
         "rayStartParams": {},
         "template": {"spec": {"containers": [_container(spec, "ray-worker", cpu)], "volumes": volumes}}},
        {"groupName": "gpu", "replicas": gpu["min"], "minReplicas": gpu["min"], "maxReplicas": gpu["max"],
         "rayStartParams": {},
         "template": {"spec": {"containers": [_container(spec, "ray-worker", gpu, gpu["gpus"])], "volumes": volumes,
                               "nodeSelector": dict(gpu["node_selector"]),
                               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                "effect": "NoSchedule"}]}}},
    ]
    out = {"rayVersion": spec["ray_version"], "authOptions": {"mode": "token"},
           "enableInTreeAutoscaling": autoscale,
           "headGroupSpec": {"rayStartParams": {"num-cpus": "0"},  # the head schedules no tasks: drivers only
                             "template": {"spec": {"containers": [head], "volumes": volumes}}},
           "workerGroupSpecs": groups}
    if autoscale:
        out["autoscalerOptions"] = {"idleTimeoutSeconds": 300, "upscalingMode": "Default"}
    return out


def raycluster(spec: dict) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": spec["cluster"]["name"], "namespace": spec["namespace"],
                         "labels": {"app.kubernetes.io/part-of": "maskflow"}},
            "spec": cluster_spec(spec)}


def rayjob_spec(spec: dict, entrypoint: str) -> dict:
    return {"entrypoint": " ".join(entrypoint.split()) + f" tracking.tracking_uri={spec['tracking_uri']}",
            "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600, "backoffLimit": 0,
            "rayClusterSpec": cluster_spec(spec)}


def rayjob(spec: dict, name: str, entrypoint: str, generate: bool = False) -> dict:
    meta = {"namespace": spec["namespace"], "labels": {"app.kubernetes.io/part-of": "maskflow",
                                                       "maskflow/job": name}}
    meta["generateName" if generate else "name"] = f"maskflow-{name}-" if generate else f"maskflow-{name}"
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": rayjob_spec(spec, entrypoint)}


def retrain_entrypoint(model: str) -> str:
    return f"python pipelines/retrain.py --config conf/retrain/{model}.yaml"


def raycronjob(spec: dict, model: str, schedule: str) -> dict:
    slug = model.replace("_", "-")
    return {"apiVersion": "ray.io/v1", "kind": "RayCronJob",
            "metadata": {"name": f"maskflow-retrain-{slug}", "namespace": spec["namespace"],
                         "labels": {"app.kubernetes.io/part-of": "maskflow", "maskflow/job": f"retrain-{slug}"}},
            "spec": {"schedule": schedule, "timeZone": "Etc/UTC", "suspend": False,
                     "jobTemplate": rayjob_spec(spec, retrain_entrypoint(model))}}


def cronjob(spec: dict, model: str, schedule: str) -> list[dict]:
    """For KubeRay without RayCronJob: a ConfigMap holding the RayJob, and a CronJob whose pod creates it."""
    slug = model.replace("_", "-")
    job = rayjob(spec, f"retrain-{slug}", retrain_entrypoint(model), generate=True)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"maskflow-retrain-{slug}-rayjob", "namespace": spec["namespace"]},
                  "data": {"rayjob.yaml": yaml.dump(job, Dumper=_Dumper, sort_keys=False)}}
    cron = {"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": f"maskflow-retrain-{slug}", "namespace": spec["namespace"]},
            "spec": {"schedule": schedule, "timeZone": "Etc/UTC", "concurrencyPolicy": "Forbid",
                     "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3,
                     "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": {
                         "serviceAccountName": "maskflow-retrain-scheduler", "restartPolicy": "Never",
                         "containers": [{"name": "create-rayjob", "image": "bitnami/kubectl:1.33",
                                         "command": ["kubectl", "create", "-f", "/rayjob/rayjob.yaml"],
                                         "volumeMounts": [{"name": "rayjob", "mountPath": "/rayjob"}]}],
                         "volumes": [{"name": "rayjob", "configMap": {"name": config_map["metadata"]["name"]}}]}}}}}}
    return [config_map, cron]


def scheduler_rbac(spec: dict) -> list[dict]:
    ns = spec["namespace"]
    name = "maskflow-retrain-scheduler"
    return [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name, "namespace": ns},
             "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": name, "namespace": ns},
             "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}}]


def mlflow(spec: dict) -> list[dict]:
    ns, labels = spec["namespace"], {"app.kubernetes.io/name": "mlflow", "app.kubernetes.io/part-of": "maskflow"}
    hosts = ",".join(f"{h}:5000" for h in ("mlflow", f"mlflow.{ns}", f"mlflow.{ns}.svc",
                                            f"mlflow.{ns}.svc.cluster.local"))
    container = {
        "name": "mlflow", "image": spec["image"], "imagePullPolicy": "IfNotPresent",
        # the database URI (with its password) only ever in the environment, from the Secret; shell expansion
        # keeps it off the command line that `kubectl describe` shows
        "command": ["/bin/sh", "-c", 'exec mlflow server --host 0.0.0.0 --port 5000 --workers 2 '
                    '--backend-store-uri "$MLFLOW_BACKEND_STORE_URI" '
                    f'--artifacts-destination {spec["base_dir"]}/mlartifacts --allowed-hosts "{hosts}"'],
        "env": [{"name": "MLFLOW_BACKEND_STORE_URI",
                 "valueFrom": {"secretKeyRef": {"name": spec["secrets"]["mlflow_db"], "key": "uri"}}},
                {"name": "MLFLOW_ENABLE_TELEMETRY", "value": "false"}],
        "envFrom": [{"secretRef": {"name": spec["secrets"]["s3"]}}],
        "ports": [{"containerPort": 5000, "name": "http"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": 5000}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 5000}, "periodSeconds": 30,
                          "initialDelaySeconds": 60},
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "mlflow", "namespace": ns, "labels": labels},
                  "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}},
                           "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mlflow", "namespace": ns, "labels": labels},
               "spec": {"selector": {"app.kubernetes.io/name": "mlflow"},
                        "ports": [{"name": "http", "port": 5000, "targetPort": 5000}]}}
    return [deployment, service]


def render(spec: dict) -> dict[str, str]:
    """Relative path under cluster/k8s/ -> YAML text."""
    def dump(*docs: dict) -> str:
        return HEADER + "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)

    files = {"raycluster.yaml": dump(raycluster(spec)), "mlflow.yaml": dump(*mlflow(spec)),
             "retrain/rbac.yaml": dump(*scheduler_rbac(spec))}
    for name, entrypoint in spec["jobs"].items():
        files[f"jobs/rayjob-{name}.yaml"] = dump(rayjob(spec, name, entrypoint))
    for model, schedule in spec["retrain"].items():
        slug = model.replace("_", "-")
        files[f"retrain/raycronjob-{slug}.yaml"] = dump(raycronjob(spec, model, schedule))
        files[f"retrain/cronjob-{slug}.yaml"] = dump(*cronjob(spec, model, schedule))
    return files


def load_spec(path: str = os.path.join(HERE, "jobs.yaml")) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with cluster/k8s/ instead of writing it")
    args = parser.parse_args(argv)
    files = render(load_spec())
    if args.check:
        stale = [p for p, text in files.items()
                 if not os.path.exists(os.path.join(OUT, p)) or open(os.path.join(OUT, p)).read() != text]
        extra = sorted(os.path.relpath(os.path.join(d, f), OUT) for d, _, fs in os.walk(OUT) for f in fs
                       if os.path.relpath(os.path.join(d, f), OUT) not in files)
        if stale or extra:
            print(f"cluster/k8s/ is out of date ({', '.join(stale + extra)}): run python cluster/render.py",
                  file=sys.stderr)
            return 1
        print(f"cluster/k8s/: {len(files)} files up to date")
        return 0
    for path, text in files.items():
        full = os.path.join(OUT, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
    for d, _, fs in os.walk(OUT):
        for f in fs:
            if os.path.relpath(os.path.join(d, f), OUT) not in files:
                os.unlink(os.path.join(d, f))
    print(f"wrote {len(files)} files under cluster/k8s/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
