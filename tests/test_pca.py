"""The PCA baseline: fit on train (standardised), artifact shaped like an SAE, loaded as a dictionary."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from galaxysae import config, dictionary, pca, storage


def _write_split(root: str, split: str, x: np.ndarray, n_files: int = 2, prefix: str = "g") -> list[str]:
    ids = [f"{prefix}{split}{i:04d}" for i in range(len(x))]
    for k, part in enumerate(np.array_split(np.arange(len(x)), n_files)):
        t = pa.table({"id_str": [ids[i] for i in part], "split": [split] * len(part),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel(), pa.float32()), x.shape[1])})
        storage.write_parquet(t, storage.join(root, split, f"{split}-{k:05d}-of-{n_files:05d}.parquet"))
    return ids


def _low_rank(n: int, d: int = 24, rank: int = 3, seed: int = 0) -> np.ndarray:
    """Embeddings with a few strong directions, different per-dimension scales and offsets."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(rank, d))
    z = rng.normal(size=(n, rank)) * np.array([5.0, 3.0, 2.0])[:rank]
    x = z @ basis + 0.3 * rng.normal(size=(n, d))
    scale = np.random.default_rng(7).uniform(0.5, 20, d)
    return (x * scale + 100).astype(np.float32)


@pytest.fixture
def emb(tmp_path):
    root = str(tmp_path / "emb")
    _write_split(root, "train", _low_rank(400, seed=0))
    _write_split(root, "test", _low_rank(150, seed=1), n_files=1)
    return root


def _cfg(**kw) -> pca.Config:
    return config.from_dict(pca.Config, kw)


def test_pca_artifact_matches_a_direct_fit_and_loads_as_a_dictionary(emb, tmp_path):
    out = str(tmp_path / "pca")
    metrics = pca.run(_cfg(embeddings=emb, output=out, n_components=5))
    for name in ("pca.safetensors", "cfg.json", "metrics.json", "config.toml", "explained_variance.png",
                 "scores/test.parquet"):
        assert os.path.exists(os.path.join(out, name)), name
    cfg = json.loads(open(os.path.join(out, "cfg.json")).read())
    assert cfg["kind"] == "pca" and cfg["n_latents"] == 5 and cfg["d_in"] == 24

    d = dictionary.load(out)
    assert (d.kind, d.family, d.n_latents, d.d_in, d.levels) == ("pca", "pca", 5, 24, [5])

    # the same components as an independent fit on the standardised train split
    train = np.concatenate([x for _, _, x in pca.read_embeddings(emb, "train")]).astype(np.float64)
    z = (train - train.mean(0)) / train.std(0, ddof=1)
    _, s, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    cos = np.abs(np.sum(d.model.components * vt[:5], axis=1))
    assert np.all(cos > 0.999), cos
    ratio = (s[:5] ** 2 / (len(z) - 1)) / z.shape[1]
    np.testing.assert_allclose(metrics["explained_variance_ratio"], ratio, rtol=1e-4)

    # three planted directions: the first three components explain nearly everything, FVU falls
    fvu = metrics["fvu_by_components"]
    assert all(a >= b - 1e-9 for a, b in zip(fvu, fvu[1:]))
    assert fvu[2] < 0.1 < fvu[0]
    assert [lv["n_latents"] for lv in metrics["levels"]] == [1, 2, 3, 4, 5]

    # stored test scores == encode(raw test embeddings)
    t = pq.read_table(os.path.join(out, "scores", "test.parquet"))
    scores = np.stack(t.column("scores").to_numpy(zero_copy_only=False))
    _, _, x_test = next(pca.read_embeddings(emb, "test"))
    np.testing.assert_allclose(scores, d.encode(x_test), rtol=1e-4, atol=1e-4)


def test_pca_standardises_a_constant_dimension_like_the_sae(tmp_path):
    """One rule for both dictionaries: a dimension whose spread is tiny next to its scale,
    max(1, |mean|) (here 5e-7 about 0, and float32 rounding about 1000), divides by 1, not by
    that spread, in the PCA as in the SAE."""
    import torch

    from galaxysae.sae import SAEConfig, SparseAutoencoder

    root = str(tmp_path / "emb")
    x = _low_rank(300)
    rng = np.random.default_rng(3)
    x[:, 5] = 5e-7 * rng.standard_normal(300)
    x[:, 6] = np.float32(1000.0) + np.spacing(np.float32(1000.0)) * (rng.random(300) > 0.5)
    _write_split(root, "train", x)
    out = str(tmp_path / "pca")
    pca.run(_cfg(embeddings=root, output=out, n_components=3, test_split=""))
    std = dictionary.load(out).model.std
    model = SparseAutoencoder(SAEConfig(d_in=24, n_latents=8, k=2))
    model.init_from_data(torch.from_numpy(x))
    assert list(std[5:7]) == [1, 1] and model.std[5:7].tolist() == [1, 1]
    np.testing.assert_allclose(std, model.std.numpy(), rtol=1e-4)


def test_a_research_npy_input_fits_and_tests_on_the_rows_train_would(tmp_path):
    """A .npy input (as train takes): PCA reads it with train's loader, so it fits on the same
    train part and scores the same held-out rows (split_seed) as an SAE trained on the file."""
    from galaxysae import train as train_job

    x = _low_rank(200)
    np.save(tmp_path / "train_embeddings.npy", x)
    np.save(tmp_path / "train_ids.npy", np.array([f"id{i}" for i in range(200)]))
    out = str(tmp_path / "pca")
    metrics = pca.run(_cfg(embeddings=str(tmp_path / "train_embeddings.npy"), output=out,
                           n_components=4, split_seed=3))
    sae_cfg = config.from_dict(train_job.Config, {
        "embeddings": str(tmp_path / "train_embeddings.npy"), "output": "o", "split_seed": 3})
    train, test = train_job.load_data(sae_cfg)
    assert (metrics["n_train"], metrics["n_test"]) == (180, 20)
    scores = pq.read_table(os.path.join(out, "scores", "test.parquet"))
    assert scores.column("id_str").to_pylist() == list(test.ids)
    d = dictionary.load(out)
    np.testing.assert_allclose(d.model.mean, train.x.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.stack(scores.column("scores").to_numpy(zero_copy_only=False)),
                               d.encode(test.x), rtol=1e-4, atol=1e-4)


def test_rerun_skips_a_finished_artifact(emb, tmp_path):
    out = str(tmp_path / "pca")
    pca.run(_cfg(embeddings=emb, output=out, n_components=3))
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in ("pca.safetensors", "cfg.json")}
    pca.run(_cfg(embeddings=emb, output=out, n_components=3))
    assert before == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in before}
    pca.run(_cfg(embeddings=emb, output=out, n_components=3, overwrite=True))
    assert before["cfg.json"] != os.stat(os.path.join(out, "cfg.json")).st_mtime_ns


def test_pca_on_s3(s3_prefix, tmp_path):
    emb = storage.join(s3_prefix, "emb")
    _write_split(emb, "train", _low_rank(120, seed=2))
    _write_split(emb, "test", _low_rank(40, seed=3), n_files=1)
    out = storage.join(s3_prefix, "pca")
    pca.run(_cfg(embeddings=emb, output=out, n_components=4))
    d = dictionary.load(out)
    assert d.kind == "pca" and d.n_latents == 4
    assert storage.exists(storage.join(out, "explained_variance.png"))


def test_bad_inputs_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="no embeddings for split 'train'.*nowhere"):
        pca.run(_cfg(embeddings=str(tmp_path / "nowhere"), output=str(tmp_path / "o")))
    root = str(tmp_path / "emb")
    _write_split(root, "train", _low_rank(50))
    bad = np.ones((4, 24), np.float32)
    bad[2, 5] = np.nan
    _write_split(root, "test", bad, n_files=1, prefix="bad")
    with pytest.raises(ValueError, match=r"test-00000-of-00001\.parquet: non-finite embeddings for ids \['badtest0002'\]"):
        pca.run(_cfg(embeddings=root, output=str(tmp_path / "o")))
    assert not os.path.exists(tmp_path / "o" / "cfg.json")  # no half artifact
    with pytest.raises(config.ConfigError, match="n_components"):
        config.from_dict(pca.Config, {"embeddings": root, "output": "x", "n_components": 0})


def test_unknown_dictionary_kind_is_named(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"kind": "ica"}))
    with pytest.raises(ValueError, match=r"cfg.json: unknown dictionary kind 'ica'"):
        dictionary.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cfg.json does not exist"):
        dictionary.load(str(tmp_path / "missing"))


def _marker(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "cfg.json")))


def test_rerun_with_other_settings_is_refused_naming_them(emb, tmp_path):
    """A finished artifact is kept only for the settings it was fitted with, as train keeps an
    SAE: another n_components, split or input stops the rerun, naming each key, and --overwrite
    refits."""
    import shutil

    out = str(tmp_path / "pca")
    pca.run(_cfg(embeddings=emb, output=out, n_components=3))
    with pytest.raises(config.ConfigError, match=r"other settings \(n_components: 3 -> 5\).*"
                       r"config\.toml to keep it, with --overwrite to refit it, or write to "
                       r"another --output"):
        pca.run(_cfg(embeddings=emb, output=out, n_components=5))
    with pytest.raises(config.ConfigError, match=r"test_split: 'test' -> ''"):
        pca.run(_cfg(embeddings=emb, output=out, n_components=3, test_split=""))
    other = str(tmp_path / "emb2")
    shutil.copytree(emb, other)  # the same rows, another input
    with pytest.raises(config.ConfigError, match=r"embeddings: '.*/emb' -> '.*/emb2'"):
        pca.run(_cfg(embeddings=other, output=out, n_components=3))
    # a .npy-only key means nothing for parquet input, and a trailing slash is the same input
    pca.run(_cfg(embeddings=emb + "/", output=out, n_components=3, split_seed=9))
    assert _marker(out)["n_latents"] == 3
    pca.run(_cfg(embeddings=emb, output=out, n_components=5, overwrite=True))
    assert _marker(out)["n_latents"] == 5
    assert "n_components = 5" in open(os.path.join(out, "config.toml")).read()


def test_npy_hold_out_keys_are_settings(tmp_path):
    x = _low_rank(100)
    np.save(tmp_path / "train_embeddings.npy", x)
    np.save(tmp_path / "train_ids.npy", np.array([f"id{i}" for i in range(100)]))
    out = str(tmp_path / "pca")
    npy = str(tmp_path / "train_embeddings.npy")
    pca.run(_cfg(embeddings=npy, output=out, n_components=3, split_seed=1))
    with pytest.raises(config.ConfigError, match=r"split_seed: 1 -> 2"):
        pca.run(_cfg(embeddings=npy, output=out, n_components=3, split_seed=2))
    # the ids rewritten in place (other galaxies): other inputs
    np.save(tmp_path / "train_ids.npy", np.array([f"other{i}" for i in range(100)]))
    with pytest.raises(config.ConfigError, match=r"changed since it was fitted \(ids rewritten;"):
        pca.run(_cfg(embeddings=npy, output=out, n_components=3, split_seed=1))


def test_rerun_after_the_embeddings_were_rewritten_is_refused(emb, tmp_path):
    """Embeddings re-embedded in place (same URLs, other rows) since the fit: the rerun names the
    files that changed instead of keeping a fit of data that is no longer there; --overwrite
    refits on the new rows, and the next rerun keeps that."""
    out = str(tmp_path / "pca")
    pca.run(_cfg(embeddings=emb, output=out, n_components=3))
    recorded = json.loads(open(os.path.join(out, "inputs.json")).read())["files"]
    assert sorted(recorded) == ["test/test-00000-of-00001.parquet", "train/train-00000-of-00002.parquet",
                                "train/train-00001-of-00002.parquet"]
    _write_split(emb, "train", _low_rank(300, seed=5), n_files=2, prefix="new")
    with pytest.raises(config.ConfigError, match=r"other embeddings: .*/emb changed since it was fitted "
                       r"\(train/train-00000-of-00002\.parquet rewritten; "
                       r"train/train-00001-of-00002\.parquet "
                       r"rewritten; stamps in .*inputs\.json\): rerun with --overwrite"):
        pca.run(_cfg(embeddings=emb, output=out, n_components=3))
    assert _marker(out)["n_train"] == 400  # kept as it was
    metrics = pca.run(_cfg(embeddings=emb, output=out, n_components=3, overwrite=True))
    assert metrics["n_train"] == _marker(out)["n_train"] == 300
    assert pca.run(_cfg(embeddings=emb, output=out, n_components=3))["n_train"] == 300  # kept now
    # a shard more in the test split is another input too
    _write_split(str(tmp_path / "more"), "test", _low_rank(10, seed=6), n_files=1, prefix="more")
    os.replace(tmp_path / "more" / "test" / "test-00000-of-00001.parquet",
               os.path.join(emb, "test", "extra.parquet"))
    with pytest.raises(config.ConfigError, match=r"\(test/extra\.parquet added;"):
        pca.run(_cfg(embeddings=emb, output=out, n_components=3))


def test_rewritten_embeddings_on_s3_are_refused(s3_prefix):
    emb = storage.join(s3_prefix, "emb")
    _write_split(emb, "train", _low_rank(120, seed=2))
    _write_split(emb, "test", _low_rank(40, seed=3), n_files=1)
    out = storage.join(s3_prefix, "pca")
    pca.run(_cfg(embeddings=emb, output=out, n_components=4))
    assert pca.run(_cfg(embeddings=emb, output=out, n_components=4))["n_test"] == 40  # unchanged: kept
    _write_split(emb, "test", _low_rank(40, seed=4), n_files=1)  # the same size, other values
    with pytest.raises(config.ConfigError, match=r"\(test/test-00000-of-00001\.parquet rewritten;"):
        pca.run(_cfg(embeddings=emb, output=out, n_components=4))


def test_an_artifact_without_recorded_stamps_is_kept(emb, tmp_path, caplog):
    """One written before the stamps were recorded cannot be checked: kept, said in the log."""
    out = str(tmp_path / "pca")
    pca.run(_cfg(embeddings=emb, output=out, n_components=3))
    os.remove(os.path.join(out, "inputs.json"))
    _write_split(emb, "train", _low_rank(300, seed=5), n_files=2, prefix="new")
    with caplog.at_level("INFO", logger="galaxysae.pca"):
        assert pca.run(_cfg(embeddings=emb, output=out, n_components=3))["n_train"] == 400
    assert "records no stamps of its embeddings" in caplog.text


def test_a_refit_killed_half_way_is_not_taken_for_finished(emb, tmp_path, monkeypatch):
    """--overwrite removes the completion marker before writing: a refit that dies after writing
    new weights and metrics leaves no cfg.json, so the plain rerun refits instead of skipping."""
    out = str(tmp_path / "pca")
    pca.run(_cfg(embeddings=emb, output=out, n_components=3))
    _write_split(emb, "train", _low_rank(300, seed=5), n_files=2, prefix="new")

    def killed(*args, **kwargs):  # the job dies writing the plot, after weights and metrics
        raise OSError("No space left on device")

    monkeypatch.setattr(pca, "plot", killed)
    with pytest.raises(OSError, match="No space left"):
        pca.run(_cfg(embeddings=emb, output=out, n_components=3, overwrite=True))
    assert json.loads(open(os.path.join(out, "metrics.json")).read())["n_train"] == 300  # new files...
    assert not os.path.exists(os.path.join(out, "cfg.json"))  # ...under no marker
    monkeypatch.undo()
    assert pca.run(_cfg(embeddings=emb, output=out, n_components=3))["n_train"] == 300
    assert _marker(out)["n_train"] == 300
