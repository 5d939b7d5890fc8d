"""Session services for the suite: a real S3 server and a real Ray head, both on loopback.

Both start only when a test asks for them, are cleaned up by PID at the end, and hand their
settings to the code under test through the same environment variables users set
(AWS_*, RAY_ADDRESS, RAY_AUTH_TOKEN, HF_HOME, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import os
import shutil
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
