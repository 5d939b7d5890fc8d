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
    """Initialise Ray once per process (a second call only re-applies the Ray Data settings)."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
        else:
            log.info("no RAY_ADDRESS: starting a local Ray instance")
            ray.init(include_dashboard=False)
    _limit_parquet_footer_readers(ray.cluster_resources().get("CPU", 1))


def _limit_parquet_footer_readers(cpus: float) -> None:
    """At most a few of Ray Data's footer-reading actors, for every ``read_parquet`` of the job.

    Ray Data lists parquet files through a pool of such actors, up to 32 by default, a process
    (~110 MB) each. Each keeps 128 reads in flight, so a few serve thousands of S3 shards, and on
    a small machine the pool costs more start-up CPU than the whole listing and makes a job's
    memory grow with its file count (render: 1.22x at 8x the files). One on clusters of up to 8
    CPUs, 4 above. The variable is read when read_parquet builds its indexer on the driver; an
    explicit setting wins.
    """
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1" if cpus <= 8 else "4")
