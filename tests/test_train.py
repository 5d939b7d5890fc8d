"""`galaxysae train`: inputs (parquet local/s3, research .npy), the original TOML layout, local
and Ray Train modes, checkpoints, evaluation and --eval-only (resume after a kill: tests/faults/)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from galaxysae import cli, config, embeddings, storage
from galaxysae import train as train_job
from galaxysae.embeddings import EmbeddingsError, load, planted, write_parquet
from galaxysae.sae import SparseAutoencoder

REPO = Path(__file__).resolve().parents[1]

SMALL = [
    "--epochs", "6", "--batch_size", "64", "--log_every", "10", "--model.n_latents", "64",
    "--model.k", "4", "--model.multik", "16", "--model.aux_k", "8", "--model.dead_steps", "20",
    "--optim.lr", "3e-3",
]


def make_embeddings(root: str, n_train=480, n_test=120, d=32, seed=0, n_files=2):
    x, atoms = planted(n_train + n_test, d, 48, 4, seed=seed, offset=0.3)
    write_parquet(root, "train", [f"g{i:05d}" for i in range(n_train)], x[:n_train], n_files=n_files)
    write_parquet(root, "test", [f"g{i:05d}" for i in range(n_train, n_train + n_test)], x[n_train:])
    return x


def run_cli(*args) -> int:
    return cli.main(["train", *args])


def checkpoints(out) -> list[str]:
    return storage.listdir(f"{out}/checkpoints", ".pt")


def run_crashing(monkeypatch, *args) -> None:
    """A run that stops after its last checkpoint, before its metrics.json (a crash there)."""
    from galaxysae import evaluation

    def crash(*a, **kw):
        raise RuntimeError("crashed before metrics.json")

    with monkeypatch.context() as m:
        m.setattr(evaluation, "write", crash)
        with pytest.raises(RuntimeError, match="crashed before metrics.json"):
            run_cli(*args)


def test_local_mode_writes_a_complete_artifact_and_rerun_skips(tmp_path, caplog, capsys, monkeypatch):
    make_embeddings(str(tmp_path / "emb"))
    out = tmp_path / "sae"
    assert run_cli("--embeddings", str(tmp_path / "emb"), "--output", str(out), "--mode", "local",
                   *SMALL) == 0
    for name in ("sae.safetensors", "cfg.json", "metrics.json", "config.toml", "eval.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["l0"] == pytest.approx(4.0)
    assert 0 < metrics["fvu"] < 1 and metrics["fvu"] < metrics["pca"]["fvu"]
    assert metrics["pca"]["n_components"] == 4
    assert metrics["train"]["steps"] == 6 * (480 // 64)
    assert set(metrics["levels"][0]) >= {"n_latents", "fvu", "mse", "l0", "pca_fvu"}
    model = SparseAutoencoder.load(str(out))
    assert model.encode(torch.randn(3, 32)).shape == (3, 64)
    saved = (out / "config.toml").read_text()
    assert "n_latents = 64" in saved
    # finished: its checkpoints (weights + optimiser state, ~250 MB each at full scale) are gone
    assert (out / "checkpoints").is_dir() and not checkpoints(out)
    mtime = (out / "sae.safetensors").stat().st_mtime_ns
    # one left by a run stopped between its metrics.json and the clean-up goes on the rerun
    (out / "checkpoints" / "epoch-000006.pt").write_bytes(b"left over")
    assert run_cli("--embeddings", str(tmp_path / "emb"), "--output", str(out), "--mode", "local",
                   *SMALL) == 0
    assert (out / "sae.safetensors").stat().st_mtime_ns == mtime  # done: nothing rewritten
    assert not checkpoints(out)
    # --eval-only re-evaluates the artifact without training
    (out / "metrics.json").unlink()
    assert run_cli("--embeddings", str(tmp_path / "emb"), "--output", str(out), "--eval-only",
                   *SMALL) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["fvu"] == pytest.approx(metrics["fvu"])
    assert (out / "sae.safetensors").stat().st_mtime_ns == mtime
    # other settings: the SAE is not kept as theirs, nor its checkpoints resumed into a hybrid
    common = ("--embeddings", str(tmp_path / "emb"), "--output", str(out), "--mode", "local", *SMALL)
    with pytest.raises(SystemExit, match="2"):
        run_cli(*common, "--model.k", "8")
    assert "a trained SAE with other settings (model.k: 4 -> 8)" in capsys.readouterr().err
    # the same run crashing after its last checkpoint, before metrics.json: its checkpoints stay
    crashed = tmp_path / "crashed"
    common = ("--embeddings", str(tmp_path / "emb"), "--output", str(crashed), "--mode", "local", *SMALL)
    run_crashing(monkeypatch, *common)
    assert checkpoints(crashed) and not (crashed / "metrics.json").exists()
    mtime = (crashed / "sae.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="2"):
        run_cli(*common, "--optim.lr", "1e-3", "--epochs", "8")
    err = capsys.readouterr().err
    assert "checkpoints of a training with other settings (epochs: 6 -> 8; optim.lr: 0.003 -> 0.001)" in err
    assert (crashed / "sae.safetensors").stat().st_mtime_ns == mtime and checkpoints(crashed)
    # the same settings on another device, logging more often: resumed (from the last epoch's checkpoint)
    with caplog.at_level(logging.INFO, logger="galaxysae"):
        assert run_cli(*common, "--device", "cpu", "--log_every", "5") == 0
    assert any("resuming from" in r.getMessage() for r in caplog.records)
    # resumed after its last epoch: that epoch's train metrics come back from the checkpoint
    resumed = json.loads((crashed / "metrics.json").read_text())["train"]
    assert (resumed["epoch"], resumed["mse"]) == (6, pytest.approx(metrics["train"]["mse"]))
    assert not checkpoints(crashed)  # finished now


def test_other_inputs_or_step_limit_neither_keep_nor_resume_an_output(tmp_path, capsys, monkeypatch):
    """What the weights were trained on is part of the settings: a smoke run (max_steps) is not
    the full run, other embeddings are not these, whether the run finished or left checkpoints;
    the same inputs (here given relative) still resume."""
    emb, other = str(tmp_path / "emb"), str(tmp_path / "other")
    make_embeddings(emb)
    make_embeddings(other, seed=1)
    out = tmp_path / "sae"
    common = ("--output", str(out), "--mode", "local", *SMALL, "--epochs", "2")
    run_crashing(monkeypatch, "--embeddings", emb, *common, "--max_steps", "3")  # a smoke run
    capsys.readouterr()  # crashed after the checkpoint written at max_steps
    with pytest.raises(SystemExit, match="2"):
        run_cli("--embeddings", other, *common, "--max_steps", "3", "--split_seed", "4")
    err = capsys.readouterr().err  # parquet input holds out no rows: split_seed is not compared
    assert f"checkpoints of a training with other settings (embeddings: {emb!r} -> {other!r})" in err
    assert "split_seed = 0\n" in (out / "config.toml").read_text()
    monkeypatch.chdir(tmp_path)
    assert run_cli("--embeddings", "emb/", *common, "--max_steps", "3") == 0  # relative, a slash
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 3
    assert not checkpoints(out)  # finished: no checkpoint left to compare with
    with pytest.raises(SystemExit, match="2"):
        run_cli("--embeddings", emb, *common)  # the full run: not "nothing to do"
    assert "a trained SAE with other settings (max_steps: 3 -> 0)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        run_cli("--embeddings", other, *common, "--max_steps", "3")
    assert f"a trained SAE with other settings (embeddings: {emb!r} -> {other!r})" in capsys.readouterr().err


def test_settings_compare_inputs_as_paths_and_old_configs_by_the_seed_they_held_out_with():
    """A config.toml from before split_seed drew a .npy hold-out from the training seed: it
    compares as that split_seed. The hold-out keys count for .npy input only; one input spelt
    with a trailing slash, or uploaded again by `ray job submit` (another _ray_pkg_ hash), is
    the same input."""
    def cfg(**kw):
        return config.from_dict(train_job.Config, {"output": "o", **kw})

    old = {"seed": 5, "embeddings": "/d/emb.npy", "test_fraction": 0.1}
    assert train_job.settings_changes(old, cfg(embeddings="/d/emb.npy", seed=5)) == ["split_seed: 5 -> 0"]
    assert train_job.settings_changes(old, cfg(embeddings="/d/emb.npy", seed=5, split_seed=5)) == []
    assert train_job.settings_changes({**old, "embeddings": "s3://b/emb"},
                                      cfg(embeddings="s3://b/emb/", seed=5, test_fraction=0.2)) == []
    pkg = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_{}/emb"
    assert train_job.settings_changes({"embeddings": pkg.format("8a1f")},
                                      cfg(embeddings=pkg.format("c0de42"))) == []
    assert train_job.settings_changes({"embeddings": "/a/emb"}, cfg(embeddings="/b/emb")) == [
        "embeddings: '/a/emb' -> '/b/emb'"]


def test_a_run_resumed_at_max_steps_takes_no_step_more(tmp_path):
    """The checkpoint written when max_steps is reached (mid-epoch), then a crash before the
    artifact: the rerun resumes there and stops, with the same weights and step count."""
    x, _ = planted(448, 16, 24, 3, seed=4)
    cfg = config.from_dict(train_job.Config, dict(
        embeddings="planted", output=str(tmp_path / "sae"), epochs=3, batch_size=64, max_steps=5,
        log_every=100, model=dict(n_latents=32, k=3, multik=0, aux_k=0)))
    init = train_job.init_stats(cfg, x)
    first, last = train_job.run_local(cfg, x, init)  # 7 steps an epoch: stops inside epoch 1
    assert last["steps"] == 5 and train_job.latest_checkpoint(cfg.output)
    again, resumed = train_job.run_local(cfg, x, init)
    assert resumed["steps"] == 5
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


def test_the_held_out_rows_do_not_depend_on_the_training_seed(tmp_path):
    """A .npy input without a test file: the hold-out is drawn from split_seed, so runs of other
    seeds test on the same rows (none of which they trained on)."""
    x, _ = planted(200, 8, 16, 2)
    np.save(tmp_path / "embeddings.npy", x)
    np.save(tmp_path / "ids.npy", np.array([f"id{i}" for i in range(200)]))

    def split(**kw) -> tuple[set, set]:
        cfg = config.from_dict(train_job.Config, dict(
            embeddings=str(tmp_path / "embeddings.npy"), output="o", **kw))
        train, test = train_job.load_data(cfg)
        return set(train.ids), set(test.ids)

    train0, test0 = split(seed=0)
    assert len(test0) == 20 and not train0 & test0
    assert split(seed=7) == (train0, test0)
    assert split(seed=7, split_seed=1)[1] != test0
    # --eval-only of an SAE trained on it tests on the rows it held out, or refuses
    emb, out = str(tmp_path / "embeddings.npy"), str(tmp_path / "sae")
    common = ("--embeddings", emb, "--output", out, "--mode", "local", "--epochs", "1",
              "--batch_size", "32", "--model.n_latents", "16", "--model.k", "2", "--model.multik", "0",
              "--model.aux_k", "0")
    assert run_cli(*common, "--seed", "7", "--split_seed", "3") == 0
    assert run_cli(*common, "--seed", "7", "--split_seed", "3", "--eval-only") == 0
    with pytest.raises(config.ConfigError, match=r"--eval-only would test on other rows than were held "
                                                 r"out when it was trained \(split_seed: 3 -> 0\)"):
        train_job.run(config.from_dict(train_job.Config, dict(
            embeddings=emb, output=out, seed=7, eval_only=True, mode="local")))


def test_matryoshka_metrics_per_level(tmp_path):
    make_embeddings(str(tmp_path / "emb"))
    out = tmp_path / "mat"
    assert run_cli("--embeddings", str(tmp_path / "emb"), "--output", str(out), "--mode", "local",
                   *SMALL, "--model.activation", "batchtopk", "--model.multik", "0",
                   "--model.matryoshka_groups", "8,8,16,32") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    levels = metrics["levels"]
    assert [lv["n_latents"] for lv in levels] == [8, 16, 32, 64]
    # the last level is the whole dictionary; each nested prefix reconstructs better than the last
    assert levels[-1]["fvu"] == pytest.approx(metrics["fvu"]) and levels[-1]["l0"] == pytest.approx(metrics["l0"])
    fvus = [lv["fvu"] for lv in levels]
    assert fvus == sorted(fvus, reverse=True) and fvus[0] > fvus[-1], fvus
    assert 0 < levels[0]["l0"] < levels[-1]["l0"]


def test_s3_input_and_output(s3_prefix):
    make_embeddings(f"{s3_prefix}/emb", n_train=256, n_test=64)
    out = f"{s3_prefix}/sae"
    run_cli("--embeddings", f"{s3_prefix}/emb", "--output", out, "--mode", "local", *SMALL,
            "--epochs", "2")
    metrics = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    assert metrics["n_test"] == 64
    assert SparseAutoencoder.load(out).n_latents == 64
    assert not checkpoints(out)  # deleted once finished


def test_original_matryoshka_toml_is_accepted_as_is():
    cfg = config.parse_args(train_job.Config, [
        "--config", str(REPO / "configs/matryoshka.toml"), "--embeddings", "e.npy", "--output", "o"],
        preprocess=train_job.preprocess_toml)
    m = cfg.model
    assert m.matryoshka_groups == [64, 64, 128, 256, 512, 1024] and m.n_latents == 2048
    assert m.activation == "batchtopk" and m.k == 64 and m.l1_coeff == 1e-3
    assert m.aux_coeff == 0.03 and m.aux_k == 16 * 64 and m.dead_steps == 256 and m.multik == 0
    assert cfg.optim.lr == 1e-4 and cfg.batch_size == 256 and cfg.epochs == 200
    assert cfg.optim.weight_decay == 0.01 and cfg.optim.schedule == "constant"  # AdamW(lr=1e-4)
    assert cfg.input_dim == 640 and cfg.device == "cuda"
    assert cfg.test_embeddings == "results/embeddings/test_embeddings.npy"
    topk = config.parse_args(train_job.Config, [
        "--config", str(REPO / "configs/train.toml"), "--embeddings", "e", "--output", "o"],
        preprocess=train_job.preprocess_toml)
    assert topk.model.n_latents == 5120 and topk.model.multik == 256 and topk.batch_size == 1024


def test_original_layout_rejects_unknown_keys_by_name(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ngroup_sizes = [4, 4]\ntop_k = 2\nwarp_drive = 3\n[training]\nepochs = 1\n")
    with pytest.raises(config.ConfigError, match="model.warp_drive"):
        config.parse_args(train_job.Config, ["--config", str(bad)], preprocess=train_job.preprocess_toml)
    bad.write_text("[model]\ngroup_sizes = [4, 4]\n[training]\nepochs = 1\nwarmup = 3\n")
    with pytest.raises(config.ConfigError, match="training.warmup"):
        config.parse_args(train_job.Config, ["--config", str(bad)], preprocess=train_job.preprocess_toml)


def test_research_npy_input_with_sibling_ids_and_test_file(tmp_path):
    x, _ = planted(300, 16, 24, 3, seed=2)
    np.save(tmp_path / "train_embeddings.npy", x[:240])
    np.save(tmp_path / "train_ids.npy", np.array([f"id{i}" for i in range(240)], dtype=object),
            allow_pickle=True)  # the research code saved str ids as an object array
    np.save(tmp_path / "test_embeddings.npy", x[240:])
    np.save(tmp_path / "test_ids.npy", np.array([f"id{i}" for i in range(240, 300)]))
    train, test = load(str(tmp_path / "train_embeddings.npy"), "train", "test")
    assert len(train) == 240 and len(test) == 60 and test.ids[0] == "id240"
    out = tmp_path / "sae"
    run_cli("--embeddings", str(tmp_path / "train_embeddings.npy"), "--output", str(out),
            "--mode", "local", *SMALL, "--epochs", "2")
    assert json.loads((out / "metrics.json").read_text())["n_test"] == 60


def test_bad_embeddings_are_named(tmp_path):
    x, _ = planted(100, 16, 24, 3)
    np.save(tmp_path / "embeddings.npy", x)
    np.save(tmp_path / "ids.npy", np.array([f"id{i}" for i in range(99)]))
    with pytest.raises(EmbeddingsError, match=r"has 100 rows but .*ids.npy has 99 ids"):
        load(str(tmp_path / "embeddings.npy"), "train", "test")
    x[[7, 42]] = np.nan
    np.save(tmp_path / "ids.npy", np.array([f"id{i}" for i in range(100)]))
    with pytest.raises(EmbeddingsError, match=r"embeddings.npy: 2 embedding rows contain NaN or Inf: ids id7, id42"):
        np.save(tmp_path / "embeddings.npy", x)
        load(str(tmp_path / "embeddings.npy"), "train", "test")
    # parquet: a test file of another width names the file
    root = str(tmp_path / "emb")
    write_parquet(root, "train", [f"a{i}" for i in range(10)], np.ones((10, 8)))
    write_parquet(root, "test", [f"b{i}" for i in range(5)], np.ones((5, 9)))
    with pytest.raises(EmbeddingsError, match=r"test/part-00000.parquet: embedding width 9, expected 8"):
        load(root, "train", "test")
    with pytest.raises(EmbeddingsError, match="no parquet files for split 'valid'"):
        load(root, "train", "valid")


def _store_rows(n: int, d: int = 3) -> np.ndarray:
    """x[n, d] whose first column is the row number, read-only as ray.get returns it."""
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], d, 1)
    x.flags.writeable = False
    return x


def test_ray_workers_train_from_views_of_the_object_store_split():
    # memory mode: each worker gathers its batches from the store's read-only array; on the CPU a
    # view of all of it (a node holds the split once, whatever its workers and trials), never written
    x = _store_rows(7)
    base = x.ctypes.data
    for rank in range(3):
        rows, own = train_job.worker_rows(x, rank, 3, "cpu")
        assert not own and torch.equal(rows, torch.from_numpy(x.copy()))
        assert rows.data_ptr() == base, "a worker copied its rows"


def test_ray_workers_take_a_new_share_of_all_rows_every_epoch():
    """Memory mode: each epoch the workers split one seeded permutation of all rows between
    them, so rows stored in a meaningful order (shard by shard: a sky region, a brightness
    range) do not give a worker the same biased block for the whole run. A resumed worker
    (built afresh at epoch e) draws what the uninterrupted one drew."""
    n, world, bs, steps = 120, 2, 10, 6  # 6 steps of 10 rows a worker: every row each epoch
    x = _store_rows(n)

    def seen(rank: int, epoch: int, batches=None) -> list[list[int]]:
        """The row numbers of each batch rank draws in epoch, from the real batch builder."""
        if batches is None:
            batches, rows = train_job.memory_batches(x, rank, world, "cpu", 5, bs, steps)
            assert rows == n // world
        return [b[:, 0].long().tolist() for b in batches(epoch)]

    runs = [train_job.memory_batches(x, r, world, "cpu", 5, bs, steps)[0] for r in range(world)]
    shares = []  # [epoch][rank]: the set of rows
    for epoch in range(4):
        got = [seen(r, epoch, runs[r]) for r in range(world)]
        assert all(len(b) == bs for r in got for b in r)
        flat = [sum(r, []) for r in got]
        assert not set(flat[0]) & set(flat[1])  # disjoint
        assert sorted(flat[0] + flat[1]) == list(range(n))  # every row once
        # neither half of the rows: a share of all of them
        assert all(0 < sum(i < n // 2 for i in f) < n // 2 for f in flat), flat
        shares.append([set(f) for f in flat])
        assert seen(0, epoch) == got[0] and seen(1, epoch) == got[1]  # resumed at this epoch
    for rank in range(world):
        assert len({frozenset(s[rank]) for s in shares}) == 4  # a new share every epoch
    # an odd count: the strided shares of one epoch still cover every row once
    odd = [train_job.epoch_rows(101, r, 3, 5, 2) for r in range(3)]
    assert sorted(torch.cat(odd).tolist()) == list(range(101)) and [len(o) for o in odd] == [34, 34, 33]


def test_a_worker_whose_device_cannot_hold_the_split_takes_its_block(caplog):
    """Where the split would take more than DEVICE_DATA_SHARE of the device's free memory, the
    worker copies only its block there and draws from it alone, shuffled each epoch, and says so."""
    x = _store_rows(30)
    with caplog.at_level(logging.WARNING, logger="galaxysae"):
        batches, rows = train_job.memory_batches(x, 1, 3, "cpu", 0, 5, 2, free_bytes=x.nbytes)
    assert rows == 10 and "worker 1 takes its block of rows 10:20 alone" in caplog.text
    epochs = [[i for b in batches(e) for i in b[:, 0].long().tolist()] for e in range(3)]
    assert all(set(e) <= set(range(10, 20)) and len(set(e)) == 10 for e in epochs)
    assert epochs[0] != epochs[1]  # shuffled anew
    assert not train_job.worker_rows(x, 1, 3, "cpu", free_bytes=3 * x.nbytes)[1]  # room: all rows


# A run SIGKILLed after a checkpoint resumes to the uninterrupted run's weights:
# tests/faults/test_kill_resume.py (at three seeded points).


@pytest.mark.slow
def test_ray_train_mode_streams_parquet_from_s3(ray_cluster, s3_prefix):
    make_embeddings(f"{s3_prefix}/emb", n_train=512, n_test=64)
    out = f"{s3_prefix}/sae-ray"
    assert run_cli("--embeddings", f"{s3_prefix}/emb", "--output", out, "--mode", "ray",
                   "--num_workers", "2", "--data_loading", "stream", *SMALL, "--epochs", "3") == 0
    metrics = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    t = metrics["train"]
    # CPUs chosen from the 4-CPU cluster: one each, one left for Ray Data's read tasks
    assert (t["mode"], t["workers"], t["cpus_per_worker"], t["use_gpu"], t["data_loading"]) == (
        "ray", 2, 1, False, "stream")
    # the global batch of 64 is split over the 2 workers: 512 rows / 64 steps an epoch, 3 epochs
    assert t["batch_size"] == 64 and t["steps"] == 3 * (512 // 64)
    assert metrics["l0"] == pytest.approx(4.0) and metrics["fvu"] < 1
    assert not checkpoints(out)  # deleted once finished


def test_streamed_embeddings_come_in_another_file_order_each_epoch(ray_cluster, tmp_path):
    """Stream mode reads the per-shard files in a seeded shuffled order, reshuffled each time the
    dataset is iterated (each epoch), not in file-name order every epoch."""
    import ray

    x = make_embeddings(str(tmp_path / "emb"), n_train=160, n_test=16, n_files=8)
    ctx = ray.data.DataContext.get_current()
    saved, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        def first_rows(ds) -> list[int]:
            """The training row (of x) that opens each of the 8 files, in the order read."""
            rows = np.concatenate([b["x"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
            assert len(rows) == 160
            at = {tuple(np.round(r, 5)): i for i, r in enumerate(x[:160])}
            order = [at[tuple(np.round(r, 5))] for r in rows]
            return [order[i] for i in range(0, 160, 20)]

        in_name_order = first_rows(embeddings.ray_dataset(str(tmp_path / "emb"), "train", 32))
        assert in_name_order == list(range(0, 160, 20))
        ds = embeddings.ray_dataset(str(tmp_path / "emb"), "train", 32, seed=0)
        epoch0, epoch1 = first_rows(ds), first_rows(ds)
        assert sorted(epoch0) == sorted(epoch1) == in_name_order
        assert epoch0 != in_name_order and epoch1 != epoch0
    finally:
        ctx.execution_options.preserve_order = saved


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a CUDA device this machine lacks")
def test_a_cuda_device_this_machine_lacks_is_a_config_error_before_anything_is_written(tmp_path, capsys):
    """The original Matryoshka TOML says device = "cuda": on a laptop the run stops as a config
    error naming the key and the flag to pass, with no traceback and no output folder."""
    x, _ = planted(64, 8, 16, 2)
    np.save(tmp_path / "embeddings.npy", x)
    with pytest.raises(SystemExit) as stop:
        run_cli("--embeddings", str(tmp_path / "embeddings.npy"), "--output", str(tmp_path / "sae"),
                "--mode", "local", "--device", "cuda")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "key 'device' is 'cuda'" in err and "--device auto" in err, err
    assert not (tmp_path / "sae").exists()


def test_embeddings_remade_in_place_are_neither_kept_nor_resumed(tmp_path, capsys, caplog, monkeypatch):
    """The same embeddings path re-embedded in place (other rows at the same URLs): the finished
    SAE is not kept as trained on them, nor its checkpoints resumed; the refusal names the files.
    An output from before the stamps were recorded (no inputs.json) is kept, said in the log."""
    emb = str(tmp_path / "emb")
    make_embeddings(emb)
    out, crashed = tmp_path / "sae", tmp_path / "crashed"
    common = ("--embeddings", emb, "--mode", "local", *SMALL, "--epochs", "1")
    assert run_cli(*common, "--output", str(out)) == 0
    assert set(json.loads((out / embeddings.INPUTS).read_text())["files"]) == {
        "train/part-00000.parquet", "train/part-00001.parquet", "test/part-00000.parquet"}
    run_crashing(monkeypatch, *common, "--output", str(crashed))
    assert (crashed / embeddings.INPUTS).is_file() and checkpoints(crashed)
    mtime = (out / "sae.safetensors").stat().st_mtime_ns
    assert run_cli(*common, "--output", str(out)) == 0  # the same files: nothing to do
    assert (out / "sae.safetensors").stat().st_mtime_ns == mtime
    capsys.readouterr()
    make_embeddings(emb, seed=1, n_train=400, n_test=100)  # re-embedded in place
    with pytest.raises(SystemExit, match="2"):
        run_cli(*common, "--output", str(out))
    err = capsys.readouterr().err
    assert f"{out} holds a trained SAE of other embeddings: {emb} changed" in err
    assert "test/part-00000.parquet rewritten; train/part-00000.parquet rewritten" in err
    assert "another --output" in err
    assert (out / "sae.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(SystemExit, match="2"):
        run_cli(*common, "--output", str(crashed))
    assert f"{crashed} holds checkpoints of a training of other embeddings" in capsys.readouterr().err
    assert checkpoints(crashed) and not (crashed / "metrics.json").exists()
    # --eval-only evaluates the SAE on the parquet files as they are now, with a warning
    with caplog.at_level(logging.WARNING, logger="galaxysae"):
        assert run_cli(*common, "--output", str(out), "--eval-only") == 0
    assert any("changed since the SAE was trained" in r.getMessage() for r in caplog.records)
    # written by an earlier version (no stamps): kept and resumed, as before
    (out / embeddings.INPUTS).unlink()
    (crashed / embeddings.INPUTS).unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="galaxysae"):
        assert run_cli(*common, "--output", str(out)) == 0
        assert run_cli(*common, "--output", str(crashed)) == 0
    logged = [r.getMessage() for r in caplog.records]
    assert any("records no stamps" in m and "keeping" in m for m in logged)
    assert any("records no stamps" in m and "resuming" in m for m in logged)
    assert any("resuming from" in m for m in logged)
    assert (out / "sae.safetensors").stat().st_mtime_ns == mtime


def test_a_finished_sae_is_not_kept_for_another_test_split(tmp_path, capsys):
    """Its metrics.json measures the test split it was trained with: another one (or other test
    ids of a .npy test file) is another artifact."""
    emb = str(tmp_path / "emb")
    x = make_embeddings(emb)
    write_parquet(emb, "val", [f"v{i:05d}" for i in range(50)], x[:50])
    out = tmp_path / "sae"
    common = ("--embeddings", emb, "--output", str(out), "--mode", "local", *SMALL, "--epochs", "1")
    assert run_cli(*common) == 0
    with pytest.raises(SystemExit, match="2"):
        run_cli(*common, "--test_split", "val")
    assert "a trained SAE with other settings (test_split: 'test' -> 'val')" in capsys.readouterr().err

    def cfg(**kw):
        return config.from_dict(train_job.Config, {"output": "o", "embeddings": "/d/emb.npy", **kw})

    assert train_job.settings_changes({"test_ids": "/d/ti.npy"}, cfg(test_ids="/d/ti.npy/")) == []
    assert train_job.settings_changes({"test_ids": "/d/ti.npy"}, cfg(test_ids="/d/other.npy")) == [
        "test_ids: '/d/ti.npy' -> '/d/other.npy'"]


def test_two_runs_on_one_output_one_exits_4_naming_the_other_which_completes(tmp_path):
    """Two train runs at once on one output (other k): the second finds the first's claim and
    exits 4 naming it, writing nothing; the first finishes its own artifact and releases."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    emb = str(tmp_path / "emb")
    make_embeddings(emb)
    out = tmp_path / "sae"
    args = [sys.executable, "-m", "galaxysae", "train", "--embeddings", emb, "--output", str(out),
            "--mode", "local", *SMALL, "--epochs", "40"]
    first = subprocess.Popen(args, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # startup (torch import); not asserted on
        while not (out / "config.toml").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-2000:]
        # held still (training, after its checks) while the second run starts: they surely overlap
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run([*args, "--model.k", "8"], cwd=repo, capture_output=True, text=True,
                                timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert second.returncode == 4, second.stderr[-2000:]
    assert f"output {out} is being written by another run" in second.stderr
    assert f"pid {first.pid}" in second.stderr and "host " in second.stderr
    assert first.returncode == 0, err[-2000:]
    assert not (out / "_claim.json").exists(), "the winner releases its claim"
    assert "k = 4\n" in (out / "config.toml").read_text()  # the first's settings, not the second's
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["l0"] == pytest.approx(4.0) and metrics["train"]["epoch"] == 40
    assert not checkpoints(out)
