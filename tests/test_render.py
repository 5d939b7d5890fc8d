"""Image index by id, feature grids as Ray tasks (local and s3://), reruns skip finished grids."""

from __future__ import annotations

import io
import json
import os
import random
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from galaxysae import activations, config, decode, dictionary, image_index, render, storage
from tests import atlas_chain


@pytest.fixture
def chain(ray_cluster, offline_hub, session_root):
    return atlas_chain.build(session_root)


def _all_images(dataset, split: str) -> dict[str, bytes]:
    """Ground truth by a full scan (what the index exists to avoid)."""
    out = {}
    for f in sorted((dataset / "data").glob(f"{split}-*.parquet")):
        t = pq.read_table(f, columns=["id_str", "image"])
        for i, img in zip(t.column("id_str").to_pylist(), t.column("image").to_pylist()):
            out[i] = img["bytes"]
    return out


@pytest.mark.slow
def test_image_index_returns_the_right_bytes_for_random_ids(chain, tmp_path):
    truth = _all_images(chain.dataset, "test")
    url = str(tmp_path / "index" / "test.parquet")
    index = image_index.load_or_build(str(chain.dataset), "test", url)
    assert len(index) == len(truth) == 120 and len(index.shards) == 2
    ids = random.Random(0).sample(sorted(truth), 25)
    got = index.fetch(ids)
    assert set(got) == set(ids)
    assert all(got[i] == truth[i] for i in ids)
    # reloaded from its file, not rebuilt (the file is not written again) ...
    written = os.stat(url).st_mtime_ns
    again = image_index.load_or_build(str(chain.dataset), "test", url)
    assert again.locate(ids[0]) == index.locate(ids[0]) and os.stat(url).st_mtime_ns == written
    # ... unless it indexes other shards (a dataset re-sharded since): then it is rebuilt
    other = str(tmp_path / "train_index.parquet")
    image_index.load_or_build(str(chain.dataset), "train", other)
    shutil.copy(other, url)  # the train split's index where the test split's was
    rebuilt = image_index.load_or_build(str(chain.dataset), "test", url)
    assert rebuilt.shards == index.shards and rebuilt.locate(ids[0]) == index.locate(ids[0])
    with pytest.raises(KeyError, match="'no-such-galaxy' is not in the image index"):
        index.fetch(["no-such-galaxy"])
    # the dataset config embedded (render's dataset_config): the tiny subset's own shard
    tiny = image_index.load_or_build(str(chain.dataset), "test", str(tmp_path / "tiny.parquet"), "tiny")
    assert [s.split("/")[-2] for s in tiny.shards] == ["tiny"] and 8 <= len(tiny) < len(truth)
    some = sorted(tiny._pos)[:3]
    assert tiny.fetch(some) == {i: truth[i] for i in some}


@pytest.mark.slow
def test_grids_on_s3_have_the_expected_size_and_count_and_a_rerun_skips_them(chain, s3_prefix):
    cfg = config.from_dict(render.Config, {
        "dictionaries": [str(chain.matryoshka), str(chain.pca)], "embeddings": str(chain.embeddings),
        "dataset": str(chain.dataset), "results": s3_prefix, "n_features": 5, "top_n": 12,
        "columns": 4, "tile": 48, "features_per_task": 2})
    summary = render.run(cfg)
    assert set(summary) == {"matryoshka_sae", "pca"}
    fs, _ = storage.fsspec_fs(s3_prefix)
    stamps = {}
    for name, n_grids in (("matryoshka_sae", 5), ("pca", 10)):  # PCA: both ends of a component
        grids = storage.listdir(storage.join(s3_prefix, name, "grids"), ".jpg")
        assert len(grids) == n_grids and summary[name]["rendered"] == n_grids
        for g in grids:
            with Image.open(io.BytesIO(storage.read_bytes(g))) as img:
                assert img.size == render.grid_size(12, 4, 48)
                assert np.asarray(img.convert("L"), float).var() > 50  # galaxies, not a blank canvas
            stamps[g] = fs.info(storage.fsspec_fs(g)[1])["LastModified"]
    # the SAE grids show its 5 most frequent features; PCA the first 5 components
    stats = activations.load_features(storage.join(s3_prefix, "matryoshka_sae", "activations", "test"))
    freq = np.asarray(stats.column("frequency"))
    assert sorted(summary["matryoshka_sae"]["features"]) == sorted(np.argsort(-freq, kind="stable")[:5].tolist())
    assert summary["pca"]["features"] == [0, 1, 2, 3, 4]
    doc = json.loads(storage.read_bytes(storage.join(s3_prefix, "matryoshka_sae", "dictionary.json")))
    assert doc["levels"] == [8, 16, 32, 64] and doc["kind"] == "sae"

    again = render.run(cfg)
    assert {n: (s["rendered"], s["skipped"]) for n, s in again.items()} == {"matryoshka_sae": (0, 5), "pca": (0, 10)}
    assert stamps == {g: fs.info(storage.fsspec_fs(g)[1])["LastModified"] for g in stamps}
    # another top_n: every grid is drawn again (none kept from the other inputs)
    cfg.top_n = 6
    third = render.run(cfg)
    assert {n: (s["rendered"], s["skipped"]) for n, s in third.items()} == {"matryoshka_sae": (5, 0), "pca": (10, 0)}
    for g in stamps:
        with Image.open(io.BytesIO(storage.read_bytes(g))) as img:
            assert img.size == render.grid_size(6, 4, 48)


@pytest.mark.slow
def test_a_dictionary_rewritten_in_place_gets_new_activations_and_grids(chain, tmp_path):
    """The same artifact URL with other weights (retrained into the same folder): render does not
    reuse the old activations or grids, and the atlas copies the new grids over the old ones."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from galaxysae import atlas

    pca_copy = tmp_path / "pca"
    shutil.copytree(chain.pca, pca_copy)
    cfg = config.from_dict(render.Config, {
        "dictionaries": [str(pca_copy)], "embeddings": str(chain.embeddings),
        "dataset": str(chain.dataset), "results": str(tmp_path / "results"), "n_features": 2,
        "top_n": 4, "columns": 2, "tile": 32})
    assert render.run(cfg)["pca"]["rendered"] == 4  # 2 components, both ends
    acts = tmp_path / "results" / "pca" / "activations" / "test"
    before = activations.load_features(str(acts)).column("top_ids").to_pylist()
    site = tmp_path / "atlas"
    atlas.run(config.from_dict(atlas.Config, {"results": str(tmp_path / "results"), "output": str(site)}))
    grid = site / "pca" / "grids" / "feature_00000.jpg"
    old_grid = grid.read_bytes()
    t = load_file(pca_copy / dictionary.PCA_WEIGHTS)
    t["components"] = -t["components"]  # each component's other end: other top galaxies
    save_file(t, pca_copy / dictionary.PCA_WEIGHTS)
    assert render.run(cfg)["pca"]["rendered"] == 4
    after = activations.load_features(str(acts)).column("top_ids").to_pylist()
    assert after[0] != before[0]
    assert (tmp_path / "results" / "pca" / "grids" / "feature_00000.jpg").read_bytes() != old_grid
    atlas.run(config.from_dict(atlas.Config, {"results": str(tmp_path / "results"), "output": str(site)}))
    assert grid.read_bytes() != old_grid


@pytest.mark.slow
def test_top_galaxies_are_the_highest_activations_and_a_bad_image_is_recorded(chain, tmp_path):
    import pyarrow as pa

    # a copy of the dataset in which the top galaxy of PC 1 has a corrupt image
    d = dictionary.load(str(chain.pca))
    x = np.concatenate([x for _, _, x in activations.read_embeddings(str(chain.embeddings), "test")])
    ids = [i for _, ii, _ in activations.read_embeddings(str(chain.embeddings), "test") for i in ii]
    top = ids[int(np.argmax(d.encode(x)[:, 0]))]
    bad_ds = tmp_path / "ds"
    (bad_ds / "data").mkdir(parents=True)
    for f in sorted((chain.dataset / "data").glob("test-*.parquet")):
        t = pq.read_table(f)
        imgs = t.column("image").to_pylist()
        for i, img in zip(t.column("id_str").to_pylist(), imgs):
            if i == top:
                img["bytes"] = b"\xff\xd8\xff truncated"
        t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(imgs, t.schema.field("image").type))
        pq.write_table(t, bad_ds / "data" / f.name)
    cfg = config.from_dict(render.Config, {
        "dictionaries": [str(chain.pca)], "embeddings": str(chain.embeddings), "dataset": str(bad_ds),
        "results": str(tmp_path / "results"), "features": [0], "top_n": 6, "columns": 3, "tile": 40})
    summary = render.run(cfg)
    assert summary["pca"]["failed_images"] == 1
    failures = json.loads((tmp_path / "results" / "pca" / "render_failures.json").read_text())
    assert [f["id_str"] for f in failures] == [top] and failures[0]["reason"]
    stats = activations.load_features(str(tmp_path / "results" / "pca" / "activations" / "test")).to_pylist()[0]
    assert stats["top_ids"][0] == top
    assert stats["top_values"] == sorted(stats["top_values"], reverse=True)
    assert stats["top_values"][0] == pytest.approx(float(d.encode(x)[:, 0].max()), rel=1e-5)
    # the component's other end: its lowest scores, lowest first, in a grid of their own
    assert stats["bottom_values"] == sorted(stats["bottom_values"]) and len(stats["bottom_ids"]) == 30
    assert stats["bottom_values"][0] == pytest.approx(float(d.encode(x)[:, 0].min()), rel=1e-5)
    assert stats["bottom_ids"][0] == ids[int(np.argmin(d.encode(x)[:, 0]))]
    assert (tmp_path / "results" / "pca" / "grids" / "feature_00000_low.jpg").is_file()
    # the grid is still written; the slot of the bad image is marked, not blank
    png = tmp_path / "results" / "pca" / "grids" / "feature_00000.jpg"
    with Image.open(png) as img:
        slot = np.asarray(img.convert("RGB"))[render.HEADER + render.GAP + 20, render.GAP + 20]
    assert slot[0] > slot[1] + 20  # the red "unreadable image" tile
    # a rerun with nothing to draw keeps the record of the grids it keeps; grids drawn again
    # (another top_n redraws them all) from the repaired images leave none
    assert render.run(cfg)["pca"]["rendered"] == 0
    assert (tmp_path / "results" / "pca" / "render_failures.json").is_file()
    for f in sorted((chain.dataset / "data").glob("test-*.parquet")):
        shutil.copy(f, bad_ds / "data" / f.name)
    again = render.run(config.from_dict(render.Config, {**config.to_dict(cfg), "top_n": 5}))
    assert again["pca"]["failed_images"] == 0 and again["pca"]["rendered"] == summary["pca"]["rendered"]
    assert not (tmp_path / "results" / "pca" / "render_failures.json").exists()


def test_a_thumbnail_of_a_jpeg_with_corrupt_compressed_data_is_refused_not_greyed():
    buf = io.BytesIO()
    y, x = np.mgrid[0:128, 0:128]
    Image.fromarray((np.exp(-((x - 64) ** 2 + (y - 64) ** 2) / 800) * 255).astype(np.uint8)).save(buf, "JPEG")
    good = buf.getvalue()
    bad = bytearray(good)
    sos = bad.index(b"\xff\xda")
    bad[sos + 300: sos + 500] = b"\x00" * 200
    with Image.open(io.BytesIO(bytes(bad))) as img:
        img.load()  # PIL alone decodes it (libjpeg only warns)
    assert render.thumbnail(good, 32)
    with pytest.raises(decode.DecodeError, match="corrupt JPEG data"):
        render.thumbnail(bytes(bad), 32)
    assert render.thumbnail(bytes(bad), 32, strict_jpeg=False)  # as PIL alone shows it


def test_config_errors_name_the_key():
    with pytest.raises(config.ConfigError, match="'dictionaries'"):
        config.from_dict(render.Config, {"embeddings": "e", "dataset": "d"})
    with pytest.raises(config.ConfigError, match="'select'"):
        config.from_dict(render.Config, {"dictionaries": ["x"], "embeddings": "e", "dataset": "d", "select": "best"})
    with pytest.raises(config.ConfigError, match="'names' has 1 entries for 2"):
        config.from_dict(render.Config, {"dictionaries": ["x", "y"], "names": ["a"], "embeddings": "e", "dataset": "d"})


def test_aligned_selection_draws_the_features_the_answers_page_links_to(tmp_path):
    """select = 'aligned': each answer's best feature (above chance first), then the most frequent,
    up to n_features; before compare has run, the most frequent (and a warning)."""
    import json

    import pyarrow as pa

    stats = pa.table({"feature": list(range(6)), "frequency": [0.5, 0.0, 0.9, 0.1, 0.3, 0.2]})
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "answers.json").write_text(json.dumps({"sae": [
        {"feature": 1, "above_null": False}, {"feature": 3, "above_null": True},
        {"feature": 3, "above_null": True}, {"feature": 9, "above_null": True}]}))
    cfg = config.from_dict(render.Config, {"dictionaries": ["x"], "embeddings": "e", "dataset": "d",
                                           "select": "aligned", "n_features": 4})
    aligned = render.aligned_features(str(tmp_path), "sae")
    assert aligned == [3, 9, 1]
    assert render.select_features(stats, "sae", cfg, aligned) == [3, 1, 2, 0]  # 9 is no feature here
    assert render.select_features(stats, "pca", cfg, aligned) == [3, 1, 0, 2]
    assert render.aligned_features(str(tmp_path), "other") == []
    frequent = config.from_dict(render.Config, {"dictionaries": ["x"], "embeddings": "e", "dataset": "d",
                                                "n_features": 4})
    assert render.select_features(stats, "sae", frequent) == [2, 0, 4, 5]
    assert render.aligned_features(str(tmp_path / "none"), "sae") == []  # compare has not run: a warning
    assert render.select_features(stats, "sae", cfg, []) == [2, 0, 4, 5]


def test_two_dictionaries_that_would_share_a_results_folder_are_refused():
    from types import SimpleNamespace as D

    a = D(family="sae", name="t0", url="sweepA/trials/t0")
    b = D(family="sae", name="t0", url="sweepB/trials/t0")
    with pytest.raises(ValueError, match=r"\['sweepA/trials/t0', 'sweepB/trials/t0'\] would share .*'names'"):
        render.folder_names([a, b])
    assert render.folder_names([a, D(family="sae", name="t1", url="x/t1")]) == ["sae-t0", "sae-t1"]
    with pytest.raises(ValueError, match="share"):
        render.folder_names([a, b], ["same", "same"])


def test_a_grid_task_is_sent_its_own_galaxies_images_only():
    """Each grid task unpickles what it is sent: the thumbnails (and recorded failures) of its
    own features' top galaxies, not those of every chosen feature."""
    jobs = [{"items": [("a", 3.0), ("b", 2.0)]}, {"items": [("b", 1.0), ("c", 0.5)]}]
    thumbs = {k: k.encode() * 3 for k in "abdef"}
    failures = {"c": "OSError: truncated", "f": "OSError: broken"}
    mine, bad = render._chunk_images(jobs, thumbs, failures)
    assert mine == {"a": b"aaa", "b": b"bbb"} and bad == {"c": "OSError: truncated"}


def test_aligned_selection_ignores_answers_of_other_activations(tmp_path):
    """compare/summary.json records the activations compare used (their _SUCCESS stamps): after
    the dictionary was retrained (new activations), its answers.json's feature ids name other
    features, so select = 'aligned' draws the most frequent (and warns) until compare runs again.
    An older compare recorded none: its answers are used."""
    import json
    import logging

    acts = tmp_path / "sae" / "activations" / "test"
    acts.mkdir(parents=True)
    current = {"dictionary": "/d/sae", "embeddings": "/e", "split": "test", "stamps": ["10:2.0", "20:2.0"]}
    (acts / "_SUCCESS").write_text(json.dumps({**current, "files": ["/e/test/a.parquet"], "top_n": 30,
                                                "n_galaxies": 6}))
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "answers.json").write_text(json.dumps({"sae": [
        {"feature": 4, "above_null": True}, {"feature": 1, "above_null": False}]}))
    summary = tmp_path / "compare" / "summary.json"
    summary.write_text(json.dumps({"sae": {"activations": current}}))
    assert render.aligned_features(str(tmp_path), "sae", str(acts)) == [4, 1]
    summary.write_text(json.dumps({"sae": {"activations": {**current, "stamps": ["10:1.0", "20:2.0"]}}}))
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: seen.append(r.getMessage())
    logging.getLogger("galaxysae").addHandler(handler)
    try:
        assert render.aligned_features(str(tmp_path), "sae", str(acts)) == []
    finally:
        logging.getLogger("galaxysae").removeHandler(handler)
    assert any("other activations than the current ones" in m and "run `galaxysae compare`" in m
               for m in seen), seen
    summary.write_text(json.dumps({"sae": {"null_best_z_p95": 3.0}}))  # an older compare's
    assert render.aligned_features(str(tmp_path), "sae", str(acts)) == [4, 1]
