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


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("MASKFLOW_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def init_ray(cfg: RayConfig) -> None:
    """Join or start Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    kwargs = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False)
    if cfg.object_store_memory_gb:
        kwargs["object_store_memory"] = int(cfg.object_store_memory_gb * (1 << 30))
    log.info("starting embedded Ray (num_cpus=%s)", cfg.num_cpus or os.cpu_count())
    ray.init(**kwargs)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
