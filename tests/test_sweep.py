"""`galaxysae sweep`: Ray Tune trials, each its own TorchTrainer, on the test Ray cluster."""

from __future__ import annotations

import csv
import io
import os

import pytest

from galaxysae import cli, config, storage
from galaxysae import sweep as sweep_job
from tests.test_train import REPO, make_embeddings


def test_sweep_config_names_bad_keys(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text('train_config = "configs/demo/train_topk.toml"\n[space]\nkay = [1]\n')
    with pytest.raises(config.ConfigError, match="space.kay"):
        config.parse_args(sweep_job.Config, ["--config", str(bad), "--embeddings", "e", "--output", "o"])


def test_trial_config_applies_params():
    base = {"model": {"n_latents": 64, "matryoshka_groups": [32, 32], "aux_k": 128}, "optim": {}}
    d = sweep_job.trial_config(base, {"matryoshka_groups": [8, 8, 16], "lr": 0.5, "k": 3}, "o")
    assert d["model"]["n_latents"] == 32 and d["model"]["aux_k"] == 32
    assert d["optim"]["lr"] == 0.5 and d["model"]["k"] == 3 and d["output"] == "o"
    d = sweep_job.trial_config(base, {"n_latents": 128}, "o")
    assert d["model"]["matryoshka_groups"] == []


def test_space_searches_every_key_given():
    """Each [space] key with values becomes its own grid axis (Tune crosses them), or a choice."""
    cfg = config.from_dict(sweep_job.Config, {
        "train_config": "configs/demo/train_topk.toml", "embeddings": "e", "output": "o",
        "space": {"k": [2, 4], "n_latents": [32, 64, 128]}})
    assert sweep_job._space(cfg) == {"k": {"grid_search": [2, 4]},
                                     "n_latents": {"grid_search": [32, 64, 128]}}
    cfg.search = "random"
    space = sweep_job._space(cfg)
    assert set(space) == {"k", "n_latents"} and space["k"].categories == [2, 4]
    cfg.space.k, cfg.space.n_latents = [], []
    with pytest.raises(config.ConfigError, match="no values"):
        sweep_job._space(cfg)


@pytest.mark.slow
def test_sweep_runs_its_trials_end_to_end(ray_cluster, s3_prefix, tmp_path):
    # two trials (a trial is ~25 s of Ray Train start-up here); the grid's crossing of keys is
    # Tune's, checked above on the space we hand it
    make_embeddings(f"{s3_prefix}/emb", n_train=256, n_test=64)
    out = str(tmp_path / "sweep")
    args = ["--config", str(REPO / "configs/demo/sweep.toml"), "--embeddings", f"{s3_prefix}/emb",
            "--output", out, "--epochs", "3", "--space.n_latents", "32", "--space.k", "2,4",
            "--max_concurrent_trials", "2",
            "--asha.grace_period", "100"]  # no early stop: every trial must finish here
    assert cli.main(["sweep", *args]) == 0
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/results.csv").decode())))
    assert len(rows) == 2
    assert {(r["k"], r["n_latents"]) for r in rows} == {("2", "32"), ("4", "32")}
    assert len({r["trial"] for r in rows}) == 2
    assert all(r["status"] == "finished" for r in rows), rows
    for r in rows:
        assert 0 < float(r["fvu"]) < 1.5
        assert float(r["l0"]) == pytest.approx(float(r["k"]))
        assert os.path.isfile(os.path.join(r["output"], "sae.safetensors"))
    assert os.path.getsize(f"{out}/fvu_vs_l0.png") > 1000
    # a rerun restores the experiment instead of training again
    before = {r["trial"]: os.path.getmtime(os.path.join(r["output"], "sae.safetensors")) for r in rows}
    assert cli.main(["sweep", *args]) == 0
    again = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/results.csv").decode())))
    assert {r["trial"] for r in again} == set(before)
    for r in again:
        assert os.path.getmtime(os.path.join(r["output"], "sae.safetensors")) == before[r["trial"]]
