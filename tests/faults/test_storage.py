"""Object storage faults on a private, real S3 server (SeaweedFS) that the tests stop and restart.

- stopped mid-write: the job retries with backoff, then fails with an error naming the URL; no
  partial object is visible; a rerun after the restart completes (train resumes its checkpoint);
- stopped briefly: a write retries and lands once the server is back;
- wrong credentials: a clear error naming the output URL before any work starts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from galaxysae import config, pca, storage
from galaxysae.embeddings import planted, write_parquet
from tests.services.s3 import S3Server

REPO = Path(__file__).resolve().parents[2]
BUCKET = "galaxysae-faults"


@pytest.fixture(scope="module")
def flaky_s3(session_root):
    """A second S3 server this module may stop and restart (the session's one stays up)."""
    server = S3Server(session_root / "s3-flaky").start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture
def flaky_env(flaky_s3, monkeypatch):
    """Point this process at the flaky server; fast retries (3 attempts, 0.5 s doubling)."""
    if flaky_s3.proc is None:
        flaky_s3.start()
    env = {**flaky_s3.env(), "AWS_MAX_ATTEMPTS": "1", "GALAXYSAE_S3_ATTEMPTS": "3",
           "GALAXYSAE_S3_BACKOFF_S": "0.5"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _objects(prefix: str) -> list[str]:
    fs, root = storage.fsspec_fs(prefix)
    fs.invalidate_cache()
    return sorted(fs.find(root)) if fs.exists(root) else []


def test_a_write_during_a_short_outage_retries_and_lands(flaky_s3, flaky_env, ledger, caplog):
    url = f"s3://{BUCKET}/short-outage/blob.bin"
    data = os.urandom(1 << 20)
    os.environ["GALAXYSAE_S3_ATTEMPTS"] = "6"  # 0.5+1+2+4+8 s: outlives the restart
    flaky_s3.stop()
    ledger.fault("s3 server stopped during a write")
    threading.Timer(1.0, flaky_s3.start).start()
    with caplog.at_level(logging.WARNING, logger="galaxysae.storage"):
        storage.write_bytes(url, data)
    retries = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    assert retries and all(url in m for m in retries)  # it failed while the server was down ...
    assert storage.read_bytes(url) == data  # ... and landed whole once it was back


@pytest.mark.slow
def test_train_killed_by_an_outage_names_the_url_leaves_whole_objects_and_resumes(
        flaky_s3, flaky_env, tmp_path, ledger):
    emb = tmp_path / "emb"
    x, _ = planted(640, 16, 24, 3, seed=1, offset=0.2)
    write_parquet(str(emb), "train", [f"g{i}" for i in range(576)], x[:576], n_files=2)
    write_parquet(str(emb), "test", [f"g{i}" for i in range(576, 640)], x[576:])
    out = f"s3://{BUCKET}/train-outage-{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "galaxysae", "train", "--embeddings", str(emb), "--output", out,
           "--mode", "local", "--epochs", "30", "--batch_size", "16", "--checkpoint_every", "1",
           "--model.n_latents", "32", "--model.k", "4", "--model.multik", "0", "--model.aux_k", "4",
           "--log_every", "1000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any(p.endswith(".pt") for p in _objects(out)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        assert proc.poll() is None, "train finished before the outage"
        flaky_s3.stop()
        ledger.fault("s3 server stopped mid-job")
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "retry 1/2" in err and "retry 2/2" in err, err[-3000:]
    # the error names the object it could not write, and says it retried
    last = err.strip().splitlines()[-1]
    assert f"{out}/" in last and "after 3 attempts" in last, last
    flaky_s3.start()
    # whole objects only: every checkpoint loads; the artifact is absent, not half there
    from galaxysae import train

    names = _objects(out)
    ckpts = [p for p in names if p.endswith(".pt")]
    assert ckpts and not any(p.endswith(("metrics.json", "sae.safetensors")) for p in names)
    for p in ckpts:
        state = train.load_checkpoint("s3://" + p)
        assert isinstance(state, dict) and state
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr
    import json

    assert any(p.endswith("metrics.json") for p in _objects(out)), (_objects(out), rerun.stderr[-2000:])
    metrics = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    assert metrics["train"]["epochs"] == 30 and metrics["train"]["steps"] == 30 * (576 // 16)


def test_wrong_credentials_fail_before_any_work_naming_the_url(flaky_s3, flaky_env, tmp_path,
                                                              monkeypatch, ledger, caplog):
    emb = tmp_path / "emb"
    x, _ = planted(64, 8, 12, 2, seed=2)
    write_parquet(str(emb), "train", [f"g{i}" for i in range(48)], x[:48])
    write_parquet(str(emb), "test", [f"g{i}" for i in range(48, 64)], x[48:])
    out = f"s3://{BUCKET}/wrong-creds-{os.getpid()}"
    wrong = "wrong-secret-" + "9" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    ledger.fault("wrong S3 credentials", 2)
    cfg = config.from_dict(pca.Config, {"embeddings": str(emb), "output": out, "n_components": 2})
    with caplog.at_level(logging.WARNING, logger="galaxysae.storage"), pytest.raises(PermissionError) as err:
        pca.run(cfg)
    msg = str(err.value)
    assert out in msg and "AWS_SECRET_ACCESS_KEY" in msg and wrong not in msg
    retried = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    assert not retried, f"wrong credentials must not be retried: {retried}"
    # an unknown access key too
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(PermissionError, match=out):
        storage.check_writable(out)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", flaky_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", flaky_s3.secret_key)
    assert _objects(out) == [], "nothing may be written with wrong credentials"
    # the same job with the right credentials then runs
    pca.run(cfg)
    assert any(p.endswith("cfg.json") for p in _objects(out))


def _arrow_s3_options(url: str = "s3://bucket/key") -> dict:
    fs, path = storage.arrow_fs(url)
    assert path == url[len("s3://"):]
    return fs.__reduce__()[1][0]  # the options pyarrow ships to every Ray read and write task


def test_arrow_s3_takes_temporary_credentials_and_the_buckets_region(monkeypatch):
    """pyarrow's S3 (Ray Data reads and writes) sees what s3fs sees through botocore: a session
    token beside temporary keys, the region named, else the bucket's own on AWS."""
    import pyarrow.fs as pafs

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    opts = _arrow_s3_options()
    assert opts["session_token"] == "" and opts["region"] == "us-east-1"
    assert opts["endpoint_override"] == "127.0.0.1:9" and opts["scheme"] == "http"
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLE")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-2")
    opts = _arrow_s3_options()
    assert opts["session_token"] == "FwoGZXIvYXdzEXAMPLE" and opts["region"] == "eu-west-2"
    # AWS itself, no region named: the bucket's (AWS cannot be reached from the tests)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    asked = []
    monkeypatch.setattr(pafs, "resolve_s3_region", lambda b: asked.append(b) or "ap-southeast-2")
    storage._bucket_region.cache_clear()
    try:
        assert _arrow_s3_options("s3://euclid-q1/emb/x.parquet")["region"] == "ap-southeast-2"
        assert _arrow_s3_options("s3://euclid-q1/emb/y.parquet")["region"] == "ap-southeast-2"
        assert asked == ["euclid-q1"]  # once per bucket
    finally:
        storage._bucket_region.cache_clear()
