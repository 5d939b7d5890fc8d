"""Connecting a job to Ray: an existing cluster when one is named, else a local one.

``RAY_ADDRESS`` (set by `ray job submit`, our Slurm scripts, KubeRay and the tests) names the
cluster; token auth (``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``) is read by Ray from the environment.
Without an address, a laptop or a `docker run` gets a private local Ray instance.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(address: str | None = None) -> None:
    """Initialise Ray once per process; a second call is a no-op."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("no RAY_ADDRESS: starting a local Ray instance")
        ray.init(include_dashboard=False)
