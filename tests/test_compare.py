"""Label alignment: Spearman with Galaxy Zoo fractions (missing = not asked), novelty, per level."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from galaxysae import compare, config, schema, storage
from tests import atlas_chain


# ----------------------------------------------------------------------------- the maths, on known data


def _labels(n: int, rng) -> tuple[np.ndarray, list[str]]:
    cols = schema.fraction_columns()
    lab = rng.uniform(0, 1, size=(n, len(cols)))
    # the spiral question is asked of half the galaxies only: NaN elsewhere (as in gz_euclid)
    asked = rng.random(n) < 0.5
    for a in schema.QUESTIONS["has-spiral-arms-euclid"]:
        lab[~asked, cols.index(schema.fraction_column("has-spiral-arms-euclid", a))] = np.nan
    return lab, cols


def test_spearman_uses_only_the_galaxies_that_were_asked():
    rng = np.random.default_rng(0)
    lab, cols = _labels(400, rng)
    j = cols.index("has-spiral-arms-euclid_yes_fraction")
    asked = ~np.isnan(lab[:, j])
    feat = np.where(asked, np.nan_to_num(lab[:, j]) ** 3, rng.uniform(0, 1, 400))  # monotone where asked
    rho, n_valid = compare.spearman(feat[:, None], lab, min_valid=20)
    assert n_valid[j] == asked.sum()
    assert rho[0, j] == pytest.approx(1.0)
    # zero-filling the unasked galaxies (what we must not do) would blur it
    filled = np.nan_to_num(lab)
    rho_filled, _ = compare.spearman(feat[:, None], filled, min_valid=20)
    assert rho_filled[0, j] < 0.9
    res = compare.align(feat[:, None], lab, cols, min_valid=20)
    assert res["best_column"] == ["has-spiral-arms-euclid_yes_fraction"]
    assert res["best_answer"] == ["Spiral arms? → yes"]
    # too few galaxies asked: no correlation is claimed
    rho_few, _ = compare.spearman(feat[:, None], lab, min_valid=int(asked.sum()) + 1)
    assert np.isnan(rho_few[0, j]) and not np.isnan(rho_few[0, 0])


def test_novelty_is_low_for_a_linear_function_of_the_votes_and_high_for_noise():
    rng = np.random.default_rng(1)
    lab, cols = _labels(600, rng)
    x, names = compare.design_matrix(lab, cols)
    assert not np.isnan(x).any()
    assert "has-spiral-arms-euclid asked" in names
    a = cols.index("smooth-or-featured-euclid_smooth_fraction")
    b = cols.index("has-spiral-arms-euclid_yes_fraction")
    explained = 2 * lab[:, a] + np.where(np.isnan(lab[:, b]), 0.5, lab[:, b])
    codes = np.column_stack([explained, rng.normal(size=600), np.zeros(600)])
    nov, r2 = compare.novelty(codes, x)
    assert nov[0] < 0.01 and r2[0] > 0.99
    assert nov[1] > 0.9
    assert np.isnan(nov[2])  # a dead feature has no novelty


def test_readable_answer_names():
    assert compare.readable("has-spiral-arms-euclid_yes_fraction") == "Spiral arms? → yes"
    assert compare.readable("merging-euclid_major-disturbance_fraction") == "Merging? → major disturbance"
    assert all("euclid" not in compare.readable(c) for c in schema.fraction_columns())


# ----------------------------------------------------------------------------- the real chain


@pytest.fixture
def chain(ray_cluster, offline_hub, session_root):
    return atlas_chain.build(session_root)


@pytest.mark.slow
def test_compare_finds_the_bulge_feature_on_generated_galaxies(chain, tmp_path):
    """The generator sets the bulge-size votes from each disk's bulge-to-total ratio, which also
    sets how concentrated its light is; even through a randomly initialised encoder a principal
    component of the embeddings tracks it: |Spearman| >= 0.5 with bulge-size "dominant"
    (about 0.7 over generator seeds, on 120 test galaxies)."""
    results = str(tmp_path / "results")
    cfg = config.from_dict(compare.Config, {
        "dictionaries": [str(chain.pca), str(chain.matryoshka)], "embeddings": str(chain.embeddings),
        "dataset": str(chain.dataset), "results": results, "min_valid": 20})
    summary = compare.run(cfg)

    t = pq.read_table(storage.join(results, "pca", "compare.parquet")).to_pylist()
    assert len(t) == 16
    driven = "bulge-size-euclid_dominant_fraction"
    hits = [(r["feature"], rho) for r in t for col, _, rho in json.loads(r["top_columns"])
            if col == driven and abs(rho) >= 0.5]
    assert hits, f"no PCA component with |Spearman| >= 0.5 with {driven}: {[(r['best_column'], r['spearman']) for r in t]}"
    best = max(t, key=lambda r: r["abs_spearman"])
    assert best["abs_spearman"] >= 0.5 and best["best_answer"].startswith(("Bulge size", "Smooth or featured"))
    for r in t:
        assert 0.0 <= r["novelty"] <= 1.0 and r["n_valid"] >= 20

    # Matryoshka: one table row per latent, with its level, and a summary per nested prefix
    m = pq.read_table(storage.join(results, "matryoshka_sae", "compare.parquet")).to_pandas()
    assert len(m) == 64 and sorted(m["level"].unique()) == [1, 2, 3, 4]
    assert (m.loc[m.feature < 8, "level"] == 1).all() and (m.loc[m.feature >= 32, "level"] == 4).all()
    levels = summary["matryoshka_sae"]["levels"]
    assert [lv["n_latents"] for lv in levels] == [8, 16, 32, 64]
    assert [lv["alive"] for lv in levels] == sorted(lv["alive"] for lv in levels)
    for name in ("distributions.png", "levels_matryoshka_sae.png", "summary.json", "compare_all.csv"):
        assert storage.exists(storage.join(results, "compare", name)), name
    csv = storage.read_bytes(storage.join(results, "pca", "compare.csv")).decode()
    assert csv.splitlines()[0].startswith("dictionary,feature,level,frequency,best_column,best_answer,spearman")


def test_embeddings_from_other_data_are_refused(tmp_path):
    from galaxysae import activations

    with pytest.raises(FileNotFoundError, match="no embeddings for split 'test'"):
        list(activations.read_embeddings(str(tmp_path), "test"))
