"""Kill and resume: train and render SIGKILLed at three seeded points each, then rerun.

Kill points are seeded fractions of an uninterrupted reference run's wall time, measured in the
same test, so they land inside the run whatever the machine's speed. After each kill a rerun
must end with exactly the reference outputs:

- train: it resumes from its last checkpoint and ends with the reference weights (rtol 1e-5,
  atol 1e-6: the same steps in the same order; only float reassociation may differ) and the
  same test metrics (FVU within 1e-4);
- render: the same set of files, byte for byte (grids, activations, summaries).

Embed's kill/resume lives in test_embed_faults.py (it needs the Ray cluster's encoder actors).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from galaxysae import config, pca, synth
from galaxysae.embeddings import planted, write_parquet

REPO = Path(__file__).resolve().parents[2]
SEEDS = (101, 202, 303)
WEIGHT_RTOL, WEIGHT_ATOL, FVU_TOL = 1e-5, 1e-6, 1e-4


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], timeout=300) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return time.monotonic() - t0, r


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    """``cmd`` in the background, output discarded."""
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO, **kw)


def _wait_for(proc, cond, timeout=240) -> float:
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None or cond(), "process ended early"
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic()


def _ckpt(out: Path) -> bool:
    return any((out / "checkpoints").glob("epoch-*.pt")) if (out / "checkpoints").is_dir() else False


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


# ----------------------------------------------------------------------------- train


def _train_cmd(emb: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "galaxysae", "train", "--embeddings", str(emb), "--output", str(out),
            "--mode", "local", "--epochs", "24", "--batch_size", "16", "--checkpoint_every", "1",
            "--keep_checkpoints", "2", "--log_every", "1000", "--model.n_latents", "48",
            "--model.k", "4", "--model.multik", "16", "--model.aux_k", "8", "--model.dead_steps", "20",
            "--optim.lr", "3e-3"]


@pytest.mark.slow
def test_train_killed_at_three_seeded_points_resumes_to_the_reference(tmp_path, ledger):
    import torch

    from galaxysae.sae import SparseAutoencoder

    emb = tmp_path / "emb"
    x, _ = planted(448, 24, 32, 4, seed=4, offset=0.3)
    write_parquet(str(emb), "train", [f"g{i}" for i in range(384)], x[:384], n_files=2)
    write_parquet(str(emb), "test", [f"g{i}" for i in range(384, 448)], x[384:])
    # reference: the window from the first checkpoint to metrics.json is where kills land
    ref_out = tmp_path / "ref"
    proc = _start(_train_cmd(emb, ref_out))
    t_ckpt = _wait_for(proc, lambda: _ckpt(ref_out))
    window = _wait_for(proc, lambda: (ref_out / "metrics.json").exists()) - t_ckpt
    assert proc.wait(60) == 0
    ref = SparseAutoencoder.load(str(tmp_path / "ref")).state_dict()
    ref_metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    resumed_from = []
    for seed in SEEDS:
        out = tmp_path / f"killed-{seed}"
        frac = random.Random(seed).uniform(0.1, 0.8)
        # The window is the reference run's; a run on a less loaded machine can finish inside
        # it. Such a run was never killed: it is redone with the kill twice as early.
        for _ in range(4):
            shutil.rmtree(out, ignore_errors=True)
            proc = _start(_train_cmd(emb, out))
            _wait_for(proc, lambda: _ckpt(out))
            time.sleep(frac * window)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            if not (out / "metrics.json").exists():
                break
            frac /= 2
        ledger.fault("SIGKILL train")
        assert not (out / "metrics.json").exists()
        _, r = _run(_train_cmd(emb, out))
        if "resuming from" in r.stderr:
            resumed_from.append(r.stderr.split("resuming from")[1].split("\n")[0])
        got = SparseAutoencoder.load(str(out)).state_dict()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                       msg=f"seed {seed}: {name}")
        m = json.loads((out / "metrics.json").read_text())
        assert abs(m["fvu"] - ref_metrics["fvu"]) <= FVU_TOL
        assert m["train"]["steps"] == ref_metrics["train"]["steps"]
    # every kill landed after a checkpoint, so each rerun really resumed
    assert len(resumed_from) == len(SEEDS), resumed_from


# ----------------------------------------------------------------------------- render


@pytest.fixture
def render_inputs(tmp_path):
    """Generated galaxies, made-up embeddings for their ids, and a PCA fitted on them."""
    ds = tmp_path / "ds"
    synth.run(synth.Config(out=str(ds), n_train=8, n_test=40, shard_size=20, image_size=48,
                           seed=8, workers=1))
    ids = {s: [i for f in sorted((ds / "data").glob(f"{s}-*.parquet"))
               for i in pq.read_table(f, columns=["id_str"]).column("id_str").to_pylist()]
           for s in ("train", "test")}
    x, _ = planted(48, 16, 20, 3, seed=9)
    emb = tmp_path / "emb"
    write_parquet(str(emb), "train", ids["train"], x[:8])
    write_parquet(str(emb), "test", ids["test"], x[8:], n_files=2)
    pca.run(config.from_dict(pca.Config, {"embeddings": str(emb), "output": str(tmp_path / "pca"),
                                          "n_components": 6, "train_split": "test"}))
    return ds, emb, tmp_path / "pca"


def _render_cmd(ds: Path, emb: Path, d: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "galaxysae", "render", "--dictionaries", str(d), "--embeddings",
            str(emb), "--dataset", str(ds), "--results", str(out), "--select", "all",
            "--top_n", "6", "--columns", "3", "--tile", "32", "--features_per_task", "1"]


@pytest.mark.slow
def test_render_killed_at_three_seeded_points_gives_the_same_files(ray_cluster, render_inputs,
                                                                   tmp_path, ledger):
    ds, emb, d = render_inputs
    _run(_render_cmd(ds, emb, d, tmp_path / "ref"))
    ref = _files(tmp_path / "ref")
    grids = [k for k in ref if "/grids/feature_" in k]
    assert len(grids) == 12  # 6 components, both ends
    for seed in SEEDS:
        out = tmp_path / f"killed-{seed}"
        # killed (with its Ray workers: its process group) once the n-th grid is on disk, n
        # seeded: mid-run for sure, as render.toml, written last, is not there yet
        n = random.Random(seed).randint(1, 4)
        proc = _start(_render_cmd(ds, emb, d, out), start_new_session=True)
        _wait_for(proc, lambda: len(list(out.glob("*/grids/feature_*.jpg"))) >= n)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        partial = _files(out)
        assert "render.toml" not in partial and sum("/grids/feature_" in k for k in partial) >= n
        ledger.fault("SIGKILL render")
        _run(_render_cmd(ds, emb, d, out))
        got = _files(out)
        assert sorted(got) == sorted(ref), f"seed {seed}: files differ"
        differ = [k for k in ref if got[k] != ref[k] and not k.endswith(".toml")]
        assert not differ, f"seed {seed}: contents differ: {differ}"
