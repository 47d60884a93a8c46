"""Starting or joining Ray, and the settings every job shares (Ray, storage, MLflow)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from maskflow.config import require
from maskflow.storage import StorageOptions
from maskflow.tracking import TrackingConfig

log = logging.getLogger(__name__)


@dataclass
class RayConfig:
    # None: join the cluster in $RAY_ADDRESS (set by `ray job submit`), else start an embedded local Ray.
    address: str | None = None
    num_cpus: int | None = None  # embedded Ray only
    num_gpus: int | None = None  # embedded Ray only
    object_store_memory_gb: float | None = None  # embedded Ray only

    def validate(self) -> None:
        require(self.num_cpus is None or self.num_cpus > 0, "num_cpus", "must be positive")


@dataclass
class StorageConfig:
    """Object-storage settings; unset values come from the standard AWS environment variables."""

    endpoint_url: str | None = None
    region: str | None = None
    # Prefer the AWS credential chain; never commit keys in a YAML file. repr=False: never printed.
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)

    def options(self) -> StorageOptions:
        return StorageOptions(self.endpoint_url, self.region, self.access_key_id, self.secret_access_key)


@dataclass
class Common:
    """Blocks shared by every job's config."""

    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("MASKFLOW_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster ``cfg.address`` or ``$RAY_ADDRESS`` names (set by ``ray job submit``), else start an embedded
    Ray of this process's own; once per process."""
    import sys

    if "ray" not in sys.modules:  # Ray reads its auth mode when imported (see start_embedded_ray)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    quiet_ray_data()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    start_embedded_ray(cfg.num_cpus, cfg.num_gpus, cfg.object_store_memory_gb)
    log.info("started embedded Ray (%d CPUs)", int(ray.cluster_resources().get("CPU", 0)))


def start_embedded_ray(num_cpus: int | None = None, num_gpus: int | None = None,
                       object_store_memory_gb: float | None = None, **extra) -> None:
    """``ray.init`` of an embedded local Ray that never confuses itself with another Ray on the machine.

    Some of Ray's own actors (Ray Train's placement-group cleaner) find "their" cluster through ``$RAY_ADDRESS`` or,
    without it, by scanning the machine for GCS processes, which fails when another Ray runs there. So the embedded
    GCS gets a port chosen here, on loopback, and every worker gets ``RAY_ADDRESS`` naming it. Token authentication
    stays on (Ray's default for local clusters); :func:`init_ray` sets it explicitly before Ray is first imported, so
    Ray does not warn about it (set later, the driver would not send the token its own cluster asks for)."""
    import ray

    port = free_port()
    runtime_env = extra.pop("runtime_env", None) or {}
    env_vars = {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": f"127.0.0.1:{port}",
                RAY_DATA_LOGGING_ENV: RAY_DATA_LOGGING_CONFIG}
    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls (without it, it warns
    # every 2 s); on loopback, on a free port.
    kwargs = dict(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1",
                  dashboard_port=free_port(), _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                  runtime_env={**runtime_env, "env_vars": env_vars}, **extra)
    if object_store_memory_gb:
        kwargs["object_store_memory"] = int(object_store_memory_gb * (1 << 30))
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts the head; not for children
    try:
        ray.init(**kwargs)
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
RAY_DATA_LOGGING_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster",
                                       "ray_data_logging.yaml")


def quiet_ray_data() -> None:
    """Ray Data settings for a readable driver log: the stage harness and the trainer print their own progress (a
    line per shard or epoch, a tqdm bar on a terminal), so Ray Data's bars and periodic status blocks are off here,
    and its console shows warnings only (cluster/ray_data_logging.yaml, for this process and every Ray worker)."""
    os.environ.setdefault(RAY_DATA_LOGGING_ENV, RAY_DATA_LOGGING_CONFIG)  # read when ray.data is first imported
    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Ray Data logs once per process that its bars are off, as a warning; this process turned them off on purpose.
    log_once("ray_data_progress_manager_disabled")
    if log.getEffectiveLevel() > logging.DEBUG:  # ray.data imported before the variable was set: same effect
        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
