"""Secrets: a whole small demo run with recognisable secrets set never writes them anywhere.

synth -> hub -> embed (to S3, on the token-auth test Ray cluster) -> train -> pca -> render ->
compare -> atlas, each stage a real `python -m galaxysae` process (train and pca side by side)
with HF_TOKEN, the S3 secret key and the Ray token in its environment. Then every captured
stdout/stderr, every file written (local and on S3), the Ray session logs and the error of a
failing stage are scanned.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from galaxysae import storage

REPO = Path(__file__).resolve().parents[2]


def _scan_tree(root: Path, needles: dict[str, bytes]) -> tuple[int, list[str]]:
    hits, n = [], 0
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            n += 1
            hits += [f"{name} in {p}" for name, s in needles.items() if s in data]
    return n, hits


@pytest.mark.slow
def test_no_secret_reaches_a_log_config_metadata_error_or_atlas_file(
        ray_cluster, s3_server, s3_prefix, offline_hub, tmp_path, ledger):
    hf_token = "hf_CANARY" + secrets.token_hex(12)
    needles = {"HF_TOKEN": hf_token.encode(), "AWS_SECRET_ACCESS_KEY": s3_server.secret_key.encode(),
               "RAY_AUTH_TOKEN": ray_cluster.token.encode()}
    env = {**os.environ, "HF_TOKEN": hf_token, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    assert env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key and env["RAY_AUTH_TOKEN"] == ray_cluster.token
    logs: dict[str, str] = {}

    def stages(*runs: tuple) -> dict[str, str]:
        """Run (name, ok, *args) stages side by side (each a process mostly importing torch);
        -> name: stderr."""
        procs = {name: (ok, subprocess.Popen(
            [sys.executable, "-m", "galaxysae", *args], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for name, ok, *args in runs}
        errs = {}
        try:
            for name, (ok, proc) in procs.items():
                out, errs[name] = proc.communicate(timeout=300)
                logs[name] = out + errs[name]
                assert (proc.returncode == 0) == ok, f"{name}: rc {proc.returncode}\n{errs[name][-3000:]}"
        finally:  # a stage that failed or hung leaves none of the others running
            for _, proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        return errs

    def stage(name: str, *args: str) -> None:
        stages((name, True, *args))

    ds, emb, res = tmp_path / "gz", f"{s3_prefix}/embeddings", f"{s3_prefix}/results"
    topk, pca_dir = tmp_path / "sae" / "topk", tmp_path / "pca"
    stage("synth", "synth", "--out", str(ds), "--n_train", "48", "--n_test", "24",
          "--shard_size", "24", "--image_size", "48", "--seed", "5")
    stage("hub", "hub", "--hf-home", str(tmp_path / "hf"), "--dataset", str(ds))
    stage("embed", "embed", "--dataset", str(ds), "--output", emb, "--encoder",
          "hf_hub:mwalmsley/zoobot-encoder-euclid", "--image_size", "32", "--batch_size", "16",
          "--encoder_threads", "1", "--read_unit_bytes", "1")
    errs = stages(
        ("train", True, "train", "--embeddings", emb, "--output", str(topk), "--mode", "local",
         "--epochs", "2", "--batch_size", "16", "--model.n_latents", "32", "--model.k", "4",
         "--model.multik", "0", "--model.aux_k", "4"),
        ("pca", True, "pca", "--embeddings", emb, "--output", str(pca_dir), "--n_components", "4"),
        # a failing stage: its error message is scanned too
        ("train-error", False, "train", "--embeddings", f"{s3_prefix}/missing", "--output",
         str(tmp_path / "x"), "--mode", "local"))
    assert "/missing/train: no parquet files for split 'train'" in errs["train-error"]
    dicts = f"{topk},{pca_dir}"
    # one after the other: the second takes the activations the first wrote
    stage("render", "render", "--dictionaries", dicts, "--embeddings", emb, "--dataset", str(ds),
          "--results", res, "--n_features", "3", "--top_n", "4", "--columns", "2", "--tile", "24")
    stage("compare", "compare", "--dictionaries", dicts, "--embeddings", emb, "--dataset", str(ds),
          "--results", res, "--min_valid", "5")
    stage("atlas", "atlas", "--results", res, "--output", str(tmp_path / "atlas"))
    ledger.fault("secret canaries", 3)

    found = [f"{n} in the output of stage {s}" for s, text in logs.items()
             for n, v in needles.items() if v.decode() in text]
    n_local, hits = _scan_tree(tmp_path, needles)
    found += hits
    # every object the run wrote on S3 (configs, parquet metadata, grids, JSON)
    fs, root = storage.fsspec_fs(s3_prefix)
    fs.invalidate_cache()
    objects = [p for p in fs.find(root)]
    for p in objects:
        data = fs.cat_file(p)
        found += [f"{n} in s3://{p}" for n, v in needles.items() if v in data]
    # the Ray session logs of the test cluster (driver, workers, raylet, GCS, dashboard)
    ray_logs = [p for p in Path(ray_cluster.temp_dir).glob("session_*/logs")]
    assert ray_logs, f"no Ray session logs under {ray_cluster.temp_dir}"
    n_ray = 0
    for d in ray_logs:
        n, hits = _scan_tree(d, needles)
        n_ray += n
        found += hits
    assert n_local > 20 and len(objects) > 10 and n_ray > 10, (n_local, len(objects), n_ray)
    assert not found, "secrets leaked:\n" + "\n".join(found[:30])
    # the stand-in atlas really exists, and the configs that were saved are there to be scanned
    assert (tmp_path / "atlas" / "index.html").is_file()
    assert any(p.endswith("config.toml") for p in objects) or (topk / "config.toml").is_file()


def test_the_scan_finds_a_planted_secret(tmp_path):
    """The scanner is not blind: a secret hidden in a nested binary file is found."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.parquet").write_bytes(b"PAR1\x00\x01s3-deadbeef\x00PAR1")
    (tmp_path / "clean.txt").write_text("nothing here")
    n, hits = _scan_tree(tmp_path, {"AWS_SECRET_ACCESS_KEY": b"s3-deadbeef"})
    assert n == 2 and len(hits) == 1 and "x.parquet" in hits[0]


WORKER_SCRIPT = """
import logging, os, sys
import ray
from galaxysae import cluster

cluster.connect()


@ray.remote
def work(token, marker):
    from galaxysae import cli

    cli.setup_worker()  # as each of galaxysae's actors and tasks does first
    os.environ["HF_TOKEN"] = token  # as on a node whose environment holds the token
    logging.getLogger("galaxysae.worker_check").info("%s reading s3://AKIAEXAMPLE:%s@bucket/x", marker, token)
    print(marker, "a library prints the token", token, file=sys.stderr, flush=True)
    print(marker, "and on stdout", token, flush=True)
    return os.getpid()


ray.get(work.remote(*sys.argv[1:]))
"""


def test_what_a_ray_worker_prints_or_logs_is_redacted_and_its_info_lines_shown(ray_cluster, tmp_path, ledger):
    """Job code and libraries inside Ray workers (embed's encoders, Train workers) print to the
    worker's stdout/stderr, which Ray writes to its session logs and echoes on the driver's
    console: cli.setup_worker, which each of our actors and tasks calls first, redacts them as
    the driver's log is, and galaxysae's INFO lines from a worker are shown (a worker's root
    logger has no handler of its own)."""
    secret = "hf_CANARY" + secrets.token_hex(12)
    marker = "worker-check-" + secrets.token_hex(4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, secret, marker], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = list(Path(ray_cluster.temp_dir).glob("session_*/logs"))

    def worker_lines() -> list[str]:
        return [line for d in logs for p in d.glob("worker-*") if p.is_file()
                for line in p.read_text(errors="replace").splitlines() if marker in line]

    deadline = time.monotonic() + 60  # the worker's files are written as it prints: a margin
    while len(worker_lines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    lines = worker_lines()
    assert any(f"INFO galaxysae.worker_check: {marker} reading s3://***@bucket/x" in line
               for line in lines), lines
    assert any("a library prints the token ***" in line for line in lines), lines
    assert any("and on stdout ***" in line for line in lines), lines
    found = [p for d in logs for p in d.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not found and secret not in proc.stdout + proc.stderr, found
    ledger.fault("secret canaries in a worker", 3)


@pytest.mark.parametrize("entry", [
    "activations.Encode.__init__", "encoder.EncodeBatch.__init__", "decode.decode_batch",
    "render._thumbs_task", "render._grids_task", "train.ray_train_loop", "sweep._trial"])
def test_every_ray_entry_point_of_ours_sets_up_its_worker_first(entry):
    """What runs in Ray's worker processes starts with cli.setup_worker (the test above shows
    what it does there): a new actor or task without it would print credentials in clear."""
    import importlib
    import inspect

    module, *path = entry.split(".")
    obj = importlib.import_module(f"galaxysae.{module}")
    for name in path:
        obj = getattr(obj, name)
    body = inspect.getsource(obj).split('"""')[-1]  # after the docstring
    assert "cli.setup_worker()" in body, f"{entry} does not call cli.setup_worker()"
