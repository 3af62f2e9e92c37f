"""Joining or starting Ray, once per process, from the config."""

from __future__ import annotations

import logging
import os

from se_ray.config import RayConfig
from se_ray.console import install_signal_handlers

logger = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig) -> None:
    """Join ``ray.address`` (or ``RAY_ADDRESS``), else start a local cluster with ``ray.num_cpus``."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=True)
        logger.info("joined Ray cluster at %s", address)
    else:
        ray.init(num_cpus=cfg.num_cpus, namespace=cfg.namespace, include_dashboard=False)
        logger.info("started a local Ray cluster with %s CPUs", cfg.num_cpus)
    # ray.init installs its own SIGTERM handler, down to the OS level (a native abort): put
    # ours back so SIGTERM ends a verb like Ctrl-C, releasing its engines.
    install_signal_handlers()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = True
