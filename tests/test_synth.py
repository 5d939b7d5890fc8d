"""galaxysae synth: gz_euclid layout and schema, label consistency, determinism, morphology -> votes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from galaxysae import schema, synth
from tests.conftest import REPO, SYNTH_FIXTURE

# DESIGN.md §3, written out independently of galaxysae.schema.
EXPECTED_QUESTIONS = [
    ("smooth-or-featured", ["smooth", "featured-or-disk", "problem"]),
    ("disk-edge-on", ["yes", "no"]),
    ("has-spiral-arms", ["yes", "no"]),
    ("bar", ["strong", "weak", "no"]),
    ("bulge-size", ["dominant", "large", "moderate", "small", "none"]),
    ("how-rounded", ["round", "in-between", "cigar-shaped"]),
    ("edge-on-bulge", ["boxy", "none", "rounded"]),
    ("spiral-winding", ["tight", "medium", "loose"]),
    ("spiral-arm-count", ["1", "2", "3", "4", "more-than-4", "cant-tell"]),
    ("merging", ["none", "minor-disturbance", "major-disturbance", "merger"]),
    ("clumps", ["yes", "no"]),
    ("problem", ["star", "artifact", "zoom"]),
    ("artifact", ["satellite", "scattered", "diffraction", "ray", "saturation", "other", "ghost"]),
]
Q = [(f"{q}-euclid", answers) for q, answers in EXPECTED_QUESTIONS]


def _tables(root: Path, folder: str = "data") -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted((root / folder).glob("*.parquet"))}


def _split(root: Path, split: str) -> pa.Table:
    return pa.concat_tables(t for name, t in _tables(root).items() if name.startswith(split + "-"))


def test_schema_module_matches_design():
    assert len(Q) == 13
    assert list(schema.QUESTIONS.items()) == Q
    assert schema.count_columns() == [f"{q}_{a}" for q, ans in Q for a in ans]
    assert schema.fraction_columns() == [f"{q}_{a}_fraction" for q, ans in Q for a in ans]
    assert schema.total_columns() == [f"{q}_total-votes" for q, _ in Q]
    assert sorted(schema.label_columns()) == sorted(
        schema.count_columns() + schema.fraction_columns() + schema.total_columns()
    )
    assert "smooth-or-featured-euclid_smooth_fraction" in schema.fraction_columns()


def test_layout_and_schema_column_by_column(synth_dataset):
    root = synth_dataset
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet")) == [
        "data/test-00000-of-00001.parquet",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "tiny/test-00000-of-00001.parquet",
        "tiny/train-00000-of-00001.parquet",
    ]
    image_type = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    for name, table in {**_tables(root), **_tables(root, "tiny")}.items():
        sch = table.schema
        assert sch.field("image").type == image_type, name
        assert sch.field("id_str").type == pa.string(), name
        expected = {"image", "id_str"}
        for q, answers in Q:
            total = f"{q}_total-votes"
            assert sch.field(total).type == pa.int32(), (name, total)
            expected.add(total)
            for a in answers:
                assert sch.field(f"{q}_{a}").type == pa.int32(), (name, q, a)
                assert sch.field(f"{q}_{a}_fraction").type == pa.float32(), (name, q, a)
                expected |= {f"{q}_{a}", f"{q}_{a}_fraction"}
        assert set(sch.names) == expected, name
        assert len(sch.names) == 2 + 13 + 2 * sum(len(a) for _, a in Q)
        assert sch.names[:2] == ["image", "id_str"]
        # The features `datasets` writes, so every HF reader decodes `image` as an Image.
        features = json.loads(sch.metadata[b"huggingface"])["info"]["features"]
        assert list(features) == sch.names
        assert features["image"] == {"_type": "Image"}
        assert features["smooth-or-featured-euclid_smooth_fraction"] == {"dtype": "float32", "_type": "Value"}
    assert _split(root, "train").num_rows == 48 and _split(root, "test").num_rows == 16
    ids = _split(root, "train").column("id_str").to_pylist() + _split(root, "test").column("id_str").to_pylist()
    assert len(set(ids)) == 64


def test_load_dataset_decodes_images(synth_dataset):
    import datasets
    from PIL import Image

    ds = datasets.load_dataset(str(synth_dataset))
    assert set(ds) == {"train", "test"}
    assert ds["train"].num_rows == 48 and ds["test"].num_rows == 16
    assert isinstance(ds["train"].features["image"], datasets.Image)
    row = ds["test"][3]
    assert isinstance(row["image"], Image.Image)
    assert row["image"].size == (96, 96) and row["image"].mode == "RGB"
    assert np.asarray(row["image"]).std() > 1  # an image, not a blank
    assert row["id_str"] == _split(synth_dataset, "test").column("id_str")[3].as_py()
    tiny = datasets.load_dataset(str(synth_dataset), "tiny")
    assert tiny["train"].num_rows == 8 and tiny["test"].num_rows == 8
    assert tiny["train"][0]["id_str"] == ds["train"][0]["id_str"]


def test_fractions_are_consistent_with_counts(synth_dataset):
    for split in ("train", "test"):
        t = _split(synth_dataset, split).to_pydict()
        root_total = np.asarray(t["smooth-or-featured-euclid_total-votes"])
        assert (root_total > 0).all()
        for q, answers in Q:
            total = np.asarray(t[f"{q}_total-votes"])
            counts = np.stack([np.asarray(t[f"{q}_{a}"]) for a in answers], 1)
            fracs = np.stack([np.asarray(t[f"{q}_{a}_fraction"], np.float64) for a in answers], 1)
            assert (counts >= 0).all()
            np.testing.assert_array_equal(counts.sum(1), total, err_msg=q)
            asked = total > 0
            np.testing.assert_allclose(fracs[asked], counts[asked] / total[asked, None], rtol=1e-6, err_msg=q)
            np.testing.assert_allclose(fracs[asked].sum(1), 1.0, rtol=1e-5, err_msg=q)
            assert np.isnan(fracs[~asked]).all(), q  # not asked: NaN, as the synth docstring says
        # The decision tree: a question's voters are those who gave the answers leading to it.
        def total(q):
            return np.asarray(t[f"{q}-euclid_total-votes"])

        def count(q, a):
            return np.asarray(t[f"{q}-euclid_{a}"])

        np.testing.assert_array_equal(total("disk-edge-on"), count("smooth-or-featured", "featured-or-disk"))
        np.testing.assert_array_equal(total("has-spiral-arms"), count("disk-edge-on", "no"))
        np.testing.assert_array_equal(total("how-rounded"), count("smooth-or-featured", "smooth"))
        np.testing.assert_array_equal(total("edge-on-bulge"), count("disk-edge-on", "yes"))
        np.testing.assert_array_equal(total("spiral-winding"), count("has-spiral-arms", "yes"))
        np.testing.assert_array_equal(total("artifact"), count("problem", "artifact"))


def test_same_seed_same_bytes_other_seed_differs(synth_dataset, tmp_path):
    # Same settings, but with a process pool instead of one worker: the bytes must not change.
    again = tmp_path / "again"
    synth.run(synth.Config(out=str(again), **{**SYNTH_FIXTURE, "workers": 2}))
    files = sorted(p.relative_to(synth_dataset) for p in synth_dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel.name == "config.toml":
            continue  # records `out` and `workers`, which differ here
        assert (synth_dataset / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    synth.run(synth.Config(out=str(other), **{**SYNTH_FIXTURE, "seed": 1}))
    rel = Path("data/train-00000-of-00002.parquet")
    assert (other / rel).read_bytes() != (synth_dataset / rel).read_bytes()
    a, b = pq.read_table(synth_dataset / rel), pq.read_table(other / rel)
    assert a.column("image")[0].as_py()["bytes"] != b.column("image")[0].as_py()["bytes"]


def _population(n: int = 400, size: int = 48):
    rows, params = [], []
    for i in range(n):
        row, p = synth.make_galaxy(7, "train", i, size, 90)
        rows.append(row)
        params.append(p)
    return rows, params


def _frac(row, q, a):
    total = row[f"{q}-euclid_total-votes"]
    return row[f"{q}-euclid_{a}"] / total if total else np.nan


def test_labels_follow_morphology():
    rows, params = _population()
    kinds = np.array([p["kind"] for p in params])
    arms = np.array([p["arms"] > 0 for p in params])
    face_on = np.array([p["q"] > 0.6 for p in params])
    edge_on = np.array([p["edge_on"] for p in params])
    merging = np.array([p["merging"] for p in params])
    disk = kinds == "disk"

    def mean(q, a, mask):
        return np.nanmean([_frac(r, q, a) for r, m in zip(rows, mask) if m])

    spirals = disk & arms & face_on
    assert spirals.sum() > 30 and (kinds == "elliptical").sum() > 60
    assert mean("smooth-or-featured", "featured-or-disk", spirals) > mean(
        "smooth-or-featured", "featured-or-disk", kinds == "elliptical") + 0.4
    assert mean("has-spiral-arms", "yes", spirals) > mean("has-spiral-arms", "yes", disk & ~arms) + 0.4
    assert mean("disk-edge-on", "yes", disk & edge_on) > mean("disk-edge-on", "yes", disk & face_on) + 0.5
    assert mean("merging", "merger", merging == 3) > mean("merging", "merger", merging == 0) + 0.3
    assert mean("smooth-or-featured", "problem", kinds == "problem") > 0.6
    # Across the whole population the label is a strong linear signal of the morphology.
    spiral_label = np.nan_to_num([_frac(r, "has-spiral-arms", "yes") for r in rows])
    assert np.corrcoef(spiral_label, spirals.astype(float))[0, 1] > 0.5


def test_images_follow_morphology():
    """The light really is where the parameters put it: measured elongation tracks the axis ratio."""
    from PIL import Image

    rows, params = _population(150, 64)
    measured, true = [], []
    for row, p in zip(rows, params):
        if p["kind"] == "problem" or p["merging"] or p["n_stars"] or p["trail"]:
            continue
        img = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("L"), np.float64)
        w = np.clip(img - np.median(img) - 20, 0, None)
        yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
        m = w.sum()
        cx, cy = (w * xx).sum() / m, (w * yy).sum() / m
        cov = np.cov(np.stack([xx.ravel() - cx, yy.ravel() - cy]), aweights=w.ravel())
        ev = np.linalg.eigvalsh(cov)
        measured.append(np.sqrt(ev[0] / ev[1]))
        true.append(p["q"])
    assert len(true) > 40
    assert np.corrcoef(measured, true)[0, 1] > 0.6


def test_cli_writes_dataset_and_config(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "galaxysae", "synth", "--out", str(out), "--n-train", "10", "--n-test", "3",
         "--seed", "3", "--image-size", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "data" / "train-00000-of-00001.parquet").is_file()
    assert pq.read_table(out / "data" / "test-00000-of-00001.parquet").num_rows == 3
    assert "seed = 3" in (out / "config.toml").read_text()
    assert "config_name: tiny" in (out / "README.md").read_text()


def test_misspelt_key_fails_before_any_work(tmp_path):
    cfg = tmp_path / "synth.toml"
    cfg.write_text(f'out = "{tmp_path / "never"}"\nn_trian = 10\n')
    proc = subprocess.run(
        [sys.executable, "-m", "galaxysae", "synth", "--config", str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "n_trian" in proc.stderr and str(cfg) in proc.stderr
    assert not (tmp_path / "never").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "galaxysae", "synth", "--out", str(tmp_path / "never"), "--n-tests", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "n_tests" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_a_relative_out_in_a_ray_job_working_dir_copy_is_refused(tmp_path, monkeypatch):
    """Under `ray job submit` the job runs in Ray's temporary copy of the working dir, which Ray
    deletes: a relative --out stops it at once (README), nothing is written there."""
    from galaxysae.config import ConfigError

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(ConfigError, match=r"'out' = 'demo/gz_euclid' is a relative path"):
        synth.run(synth.Config(out="demo/gz_euclid", n_train=8, n_test=0, image_size=32, workers=1))
    assert not any(copy.iterdir())


def test_bad_values_are_rejected_by_name():
    from galaxysae.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match="image_size"):
        parse_args(synth.Config, ["--out", "x", "--image-size", "8"])
    with pytest.raises(ConfigError, match="'out' is required"):
        parse_args(synth.Config, ["--n-train", "3"])


def test_rerun_skips_done_shards_and_refuses_other_settings(tmp_path):
    cfg = synth.Config(out=str(tmp_path / "d"), n_train=6, n_test=2, image_size=48, workers=1)
    first = synth.run(cfg)
    assert first["written"] == 4
    shard = tmp_path / "d" / "data" / "train-00000-of-00001.parquet"
    mtime = shard.stat().st_mtime_ns
    shard_b = tmp_path / "d" / "data" / "test-00000-of-00001.parquet"
    shard_b.unlink()  # as if the first run had died before writing it
    second = synth.run(cfg)
    assert second["written"] == 1 and shard_b.is_file() and shard.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"seed 0 -> 5"):
        synth.run(synth.Config(out=str(tmp_path / "d"), n_train=6, n_test=2, image_size=48, seed=5))


def test_writes_to_s3(s3_prefix):
    from galaxysae import storage

    synth.run(synth.Config(out=s3_prefix, n_train=5, n_test=2, image_size=48, workers=1))
    names = [u.rsplit("/", 1)[1] for u in storage.listdir(storage.join(s3_prefix, "data"), ".parquet")]
    assert names == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    fs, path = storage.arrow_fs(storage.join(s3_prefix, "data", names[1]))
    assert pq.read_table(path, filesystem=fs).num_rows == 5
    assert b"config_name: default" in storage.read_bytes(storage.join(s3_prefix, "README.md"))
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in storage.read_bytes(
        storage.join(s3_prefix, "config.toml"))


def test_corrupt_option_truncates_named_galaxies_only(tmp_path):
    from PIL import Image

    result = synth.run(synth.Config(out=str(tmp_path / "c"), n_train=12, n_test=2, image_size=48, corrupt=2,
                                    workers=1))
    assert len(result["corrupt_ids"]) == 2
    for id_ in result["corrupt_ids"]:
        assert id_ in (tmp_path / "c" / "README.md").read_text()
    failed = []
    for row in pq.read_table(tmp_path / "c" / "data" / "train-00000-of-00001.parquet").to_pylist():
        try:
            Image.open(io.BytesIO(row["image"]["bytes"])).load()
        except OSError:
            failed.append(row["id_str"])
        assert row["smooth-or-featured-euclid_total-votes"] > 0  # labels stay intact
    assert failed == result["corrupt_ids"]
