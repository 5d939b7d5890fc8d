"""Embed under faults, on the real test Ray cluster: SIGKILL of the job, and of its encoder actor.

- the job killed at three seeded points (after a seeded number of shards is committed), then
  rerun: the same id set as an uninterrupted run, no duplicates, the same values (atol 1e-5);
- the encoder actor's worker process SIGKILLed mid-run: Ray restarts it and the job completes,
  or the job fails with an error and leaves only whole shards, which a rerun completes.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from galaxysae import embed, synth

REPO = Path(__file__).resolve().parents[2]
ENCODER = "hf_hub:mwalmsley/zoobot-encoder-euclid"
N_SHARDS = 8
SEEDS = (101, 202, 303)


@pytest.fixture
def dataset(tmp_path) -> Path:
    ds = tmp_path / "ds"
    synth.run(synth.Config(out=str(ds), n_train=56, n_test=8, shard_size=8, image_size=64, seed=21,
                           workers=1))
    return ds


def _input_ids(ds: Path) -> list[str]:
    return [i for f in sorted((ds / "data").glob("*.parquet"))
            for i in pq.read_table(f, columns=["id_str"]).column("id_str").to_pylist()]


def _args(ds: Path, out: Path, size: int = 96) -> list[str]:
    return [sys.executable, "-m", "galaxysae", "embed", "--dataset", str(ds), "--output", str(out),
            "--encoder", ENCODER, "--image_size", str(size), "--batch_size", "4",
            "--encoder_threads", "1", "--read_unit_bytes", "1"]


def _cfg(ds: Path, out: Path, size: int = 96) -> embed.Config:
    return embed.Config(dataset=str(ds), output=str(out), encoder=ENCODER, image_size=size,
                        batch_size=4, encoder_threads=1, read_unit_bytes=1)


def _read(out: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    ids, vecs = [], {}
    for f in sorted(out.glob("*/*.parquet")):
        t = pq.read_table(f)
        emb = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
        for i, v in zip(t.column("id_str").to_pylist(), emb):
            ids.append(i)
            vecs[i] = v
    for f in sorted(out.glob("_failures/*/*.parquet")):
        ids += pq.read_table(f, columns=["id_str"]).column("id_str").to_pylist()
    return ids, vecs


def _shards_done(out: Path) -> int:
    return len([p for p in out.glob("*/*.parquet") if not p.name.startswith(".")])


@pytest.mark.slow
def test_embed_killed_at_three_seeded_points_then_rerun_matches_the_uninterrupted_run(
        offline_hub, ray_cluster, dataset, tmp_path, ledger):
    expected = _input_ids(dataset)
    assert embed.run(_cfg(dataset, tmp_path / "whole")) == 0
    _, ref = _read(tmp_path / "whole")
    for seed in SEEDS:
        out = tmp_path / f"killed-{seed}"
        at = random.Random(seed).randint(1, 3)  # shards committed when the kill lands
        proc = subprocess.Popen(_args(dataset, out), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None and _shards_done(out) < at:
                time.sleep(0.02)
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(30)
        ledger.fault("SIGKILL embed")
        assert at <= _shards_done(out) < N_SHARDS, "the kill must land mid-way"
        # only whole files: every visible shard file is readable parquet
        for f in out.glob("*/*.parquet"):
            pq.read_table(f)
        assert embed.run(_cfg(dataset, out)) == 0
        assert _shards_done(out) == N_SHARDS  # one file per shard, none written twice
        ids, got = _read(out)
        lost, dup = ledger.rows(expected, ids)
        assert lost == 0 and dup == 0
        assert set(got) == set(ref)
        assert max(float(np.abs(got[i] - ref[i]).max()) for i in ref) <= 1e-5


def _encoder_pids(dashboard: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True,
                         raise_on_missing_output=False)
    _SEEN.update(f"{a.class_name}:{a.pid}" for a in actors)
    return [a.pid for a in actors if "EncodeBatch" in (a.class_name or "") and a.pid]


_SEEN: set = set()


@pytest.mark.slow
def test_encoder_actor_killed_mid_run_the_job_recovers_or_fails_with_whole_outputs(
        offline_hub, ray_cluster, dataset, tmp_path, ledger):
    expected = _input_ids(dataset)
    out = tmp_path / "out"
    # 128 px: a slower encoder, so the actor is alive well before the last shard commits
    proc = subprocess.Popen(_args(dataset, out, size=128), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed, done_at_kill = [], 0
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not killed:
            pids = _encoder_pids(ray_cluster.dashboard_url)
            done_at_kill = _shards_done(out)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)  # the encoder actor's worker process, on this node
                killed.append(pid)
            time.sleep(0.1)
        assert killed, f"no encoder actor found mid-run (the job ended first?) {_SEEN} {proc.poll()} {_shards_done(out)}"
        assert done_at_kill < N_SHARDS, "the kill must land before the last shard"
        ledger.fault("SIGKILL encoder actor", len(killed))
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    for f in out.glob("*/*.parquet"):
        pq.read_table(f)  # whole files only
    if proc.returncode != 0:
        # failing is allowed, silently is not: the error says what died
        said = re.search(r"ActorDiedError|RayActorError|actor died|worker process has died|died unexpectedly",
                         err, re.I)
        assert said, err[-3000:]
        assert embed.run(_cfg(dataset, out, size=128)) == 0
    ids, _ = _read(out)
    lost, dup = ledger.rows(expected, ids)
    assert lost == 0 and dup == 0
    print(f"encoder actor killed: job {'completed' if proc.returncode == 0 else 'failed, rerun completed'}")
