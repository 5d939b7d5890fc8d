"""Session services for the suite: a real S3 server and a real Ray head, both on loopback.

Both start only when a test asks for them, are cleaned up by PID at the end, and hand their
settings to the code under test through the same environment variables users set
(AWS_*, RAY_ADDRESS, RAY_AUTH_TOKEN, HF_HOME, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

# Set before anything imports huggingface_hub (it reads these at import time): the suite never
# reaches the Hub; the offline cache under HF_HOME is built by the `offline_hub` fixture.
_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="galaxysae-tests-"))
os.environ["HF_HOME"] = str(_SESSION_ROOT / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402

from tests.services.ray_head import RayHead  # noqa: E402
from tests.services.s3 import S3Server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEST_BUCKET = "galaxysae-test"


@pytest.fixture(scope="session")
def session_root() -> Path:
    yield _SESSION_ROOT
    shutil.rmtree(_SESSION_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(session_root):
    """A SeaweedFS S3 server; its credentials and endpoint are exported as the AWS_* variables."""
    server = S3Server(session_root / "s3").start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    server.make_bucket(TEST_BUCKET)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh, empty ``s3://`` prefix for one test."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:40]
    return f"s3://{TEST_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server, session_root):
    """A Ray head (token auth on) whose workers see the S3 and offline-Hub settings.

    Exports RAY_ADDRESS / RAY_AUTH_MODE / RAY_AUTH_TOKEN, so jobs run in-process (``run(cfg)``)
    and ``ray job submit`` both reach it.
    """
    head = RayHead(num_cpus=4).start()
    saved = {k: os.environ.get(k) for k in head.client_env()}
    os.environ.update(head.client_env())
    if "ray._raylet" in sys.modules:
        # a test imported ray before this head existed, and ray read RAY_AUTH_MODE then: reread
        from ray._private.authentication_test_utils import reset_auth_token_state

        reset_auth_token_state()
    yield head
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    finally:
        head.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    return ray_cluster.address


# Generated gz_euclid data and the offline Hub (galaxysae.synth / galaxysae.hub).
SYNTH_FIXTURE = dict(n_train=48, n_test=16, shard_size=24, image_size=96, seed=0, workers=1)


@pytest.fixture(scope="session")
def synth_dataset(session_root) -> Path:
    """A small gz_euclid-layout dataset: 48 train (2 shards) + 16 test (1 shard), 96 px, seed 0.

    Shared by the session: treat it as read-only.
    """
    from galaxysae import synth

    out = session_root / "gz_euclid"
    synth.run(synth.Config(out=str(out), **SYNTH_FIXTURE))
    return out


@pytest.fixture(scope="session")
def offline_hub(synth_dataset) -> dict:
    """The offline Hub cache under $HF_HOME: stand-in encoder + a copy of ``synth_dataset``.

    -> dict with hf_home, hub_cache, encoder_repo/_revision/_snapshot, dataset_repo/_revision/_snapshot.
    """
    from galaxysae import hub

    return hub.build_offline_cache(os.environ["HF_HOME"], synth_dataset)


# A single-node Slurm cluster (tests/services/slurm.py): munged + slurmctld + slurmd by hand.
@pytest.fixture(scope="session")
def slurm(session_root):
    """A real Slurm cluster on this machine with one fake GPU; exports SLURM_CONF."""
    from tests.services import slurm as slurm_service

    missing = slurm_service.missing_binaries()
    if missing:
        why = f"Slurm not installed (missing {', '.join(missing)}): {slurm_service.INSTALL}"
        if os.geteuid() != 0:
            pytest.skip(why)
        pytest.fail(why + " (running as root: `make system-deps` installs them)")
    cluster = slurm_service.SlurmCluster().start()
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env())
    yield cluster
    cluster.stop()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved
