"""Label alignment: Spearman with Galaxy Zoo fractions (missing = not asked), novelty, per level."""

from __future__ import annotations

import json
import re

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
    # sparse codes (an SAE's) give the same without a dense copy
    from scipy import sparse

    nov_s, r2_s = compare.novelty(sparse.csr_matrix(codes), x)
    assert np.allclose(nov_s[:2], nov[:2], atol=1e-9) and np.isnan(nov_s[2])


def test_novelty_is_adjusted_for_the_independent_fractions_only():
    """A question's fractions sum to its "asked" indicator: the design has fewer independent
    columns than columns, and the adjustment counts those (lstsq's rank), not the columns."""
    rng = np.random.default_rng(2)
    n = 200
    lab, cols = _labels(n, rng)
    for q, answers in schema.QUESTIONS.items():  # fractions of a question sum to 1, as in gz_euclid
        idx = [cols.index(schema.fraction_column(q, a)) for a in answers]
        lab[:, idx] = lab[:, idx] / lab[:, idx].sum(1, keepdims=True)
    lab = lab.astype(np.float32).astype(np.float64)  # stored as float32: the sums are 1 to ~1e-7
    x, _ = compare.design_matrix(lab, cols)
    a = np.column_stack([np.ones(n), x])
    rank = np.linalg.matrix_rank(a, tol=1e-4)
    assert rank < a.shape[1] == np.linalg.matrix_rank(a)  # dependent, though not to float64 precision
    y = lab[:, cols.index("smooth-or-featured-euclid_smooth_fraction")] + 0.3 * rng.normal(size=n)
    coef, *_ = np.linalg.lstsq(a, y, rcond=1e-6)  # the float32 rounding directions are no fit
    r2 = 1 - ((y - a @ coef) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    nov, r2_ours = compare.novelty(y[:, None], x)
    assert r2_ours[0] == pytest.approx(r2)
    assert 0.3 < r2 < 0.9
    assert nov[0] == pytest.approx((1 - r2) * (n - 1) / (n - rank))


def test_readable_answer_names():
    assert compare.readable("has-spiral-arms-euclid_yes_fraction") == "Spiral arms? → yes"
    assert compare.readable("merging-euclid_major-disturbance_fraction") == "Merging? → major disturbance"
    assert all("euclid" not in compare.readable(c) for c in schema.fraction_columns())


def _write_labels(root, fractions: dict[str, np.ndarray], totals: dict[str, np.ndarray]) -> str:
    """A one-shard dataset with id_str and every fraction and total-votes column (no images)."""
    import pyarrow as pa

    n = len(next(iter(totals.values())))
    cols = {"id_str": [f"g{i}" for i in range(n)]}
    for q, answers in schema.QUESTIONS.items():
        for a in answers:
            cols[schema.fraction_column(q, a)] = fractions.get(schema.fraction_column(q, a), np.full(n, 0.5))
        cols[schema.total_column(q)] = totals.get(q, np.full(n, 40))
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.table(cols), root / "data" / "test-00000-of-00001.parquet")
    return str(root)


def test_questions_answered_by_too_few_volunteers_count_as_not_asked(tmp_path):
    """A fraction from 2 votes is 0, 0.5 or 1: below min_votes it is masked like an unasked
    question, n_valid drops to the well-voted galaxies, and a total of 0 never counts even where
    the dataset stores a fraction of 0 rather than NaN."""
    rng = np.random.default_rng(4)
    n = 200
    q = "bulge-size-euclid"
    total = np.where(np.arange(n) < 100, rng.integers(5, 30, n), rng.integers(0, 5, n))  # half well voted
    total[150:160] = 0
    frac = rng.uniform(0, 1, n)
    frac[150:160] = 0.0  # not asked, stored as 0 instead of NaN
    dataset = _write_labels(tmp_path / "ds", {schema.fraction_column(q, "dominant"): frac}, {q: total})
    j = schema.fraction_columns().index(schema.fraction_column(q, "dominant"))

    ids, lab, cols = compare.read_labels(dataset, "test", min_votes=5)
    assert len(ids) == n and cols == schema.fraction_columns()
    assert np.isnan(lab[100:, j]).all() and not np.isnan(lab[:100, j]).any()
    assert not np.isnan(lab[:, cols.index("merging-euclid_none_fraction")]).any()  # 40 votes everywhere
    feat = np.where(np.arange(n) < 100, frac, -frac)  # tracks the answer only where it was well voted
    rho, n_valid = compare.spearman(feat[:, None], lab, min_valid=20)
    assert n_valid[j] == 100 and rho[0, j] == pytest.approx(1.0)

    _, lab1, _ = compare.read_labels(dataset, "test", min_votes=1)
    assert (~np.isnan(lab1[:, j])).sum() == int((total >= 1).sum()) < n  # the ten 0-vote rows are out
    _, n_valid1 = compare.spearman(feat[:, None], lab1, min_valid=20)
    assert n_valid1[j] > n_valid[j]

    assert compare.Config.__dataclass_fields__["min_votes"].default == 5
    with pytest.raises(ValueError, match="min_votes"):
        config.from_dict(compare.Config, {"dictionaries": ["d"], "embeddings": "e", "dataset": "x", "min_votes": 0})


def test_chance_level_separates_an_aligned_feature_from_random_ones():
    """Best z over ~60 columns is far from 0 for pure noise; the shuffled-label baseline says
    how far, and only the feature that tracks a vote fraction clears its 95th percentile."""
    rng = np.random.default_rng(5)
    lab, cols = _labels(300, rng)
    j = cols.index("bulge-size-euclid_dominant_fraction")
    codes = np.column_stack([lab[:, j] + 0.05 * rng.normal(size=300), rng.normal(size=(300, 40))])
    null = compare.shuffled(codes, lab, min_valid=20, n_samples=1000, seed=0).feature_best
    assert len(null) == 25 * 41  # ceil(1000 / 41) shuffles of 41 features
    assert np.array_equal(null, compare.shuffled(codes, lab, min_valid=20, n_samples=1000, seed=0).feature_best)
    res = compare.align(codes, lab, cols, min_valid=20)
    s = compare.chance_summary(res["abs_spearman"], res["z"], np.ones(41, bool), null)
    p95 = s["null_best_z_p95"]
    assert 2 < p95 < 5  # chance alone gives a "best answer" well above z = 0 (|rho| ~ 0.2 here)
    assert res["abs_spearman"][0] > 0.9 and res["z"][0] > 3 * p95
    random_above = np.mean(np.asarray(res["z"][1:]) > p95)
    assert random_above <= 0.15  # ~5% by construction
    assert s["share_above_null"] == pytest.approx((1 + random_above * 40) / 41)
    assert s["share_abs_rho_ge_0_5"] == pytest.approx(1 / 41)
    # an inactive feature is left out of the share
    s2 = compare.chance_summary([*res["abs_spearman"], np.nan], [*res["z"], np.nan],
                                np.r_[np.ones(41, bool), False], null)
    assert s2["share_above_null"] == s["share_above_null"] and s2["active"] == 41
    # the level in |rho| grows as fewer galaxies are asked
    assert compare.chance_rho(p95, 40) > 2 * compare.chance_rho(p95, 300) > 0


def test_a_feature_s_best_answer_is_its_most_significant_not_a_rarely_asked_one():
    """A weak but real link over 3,000 galaxies beats the chance |rho| of answers asked of a few
    dozen (a raw-|rho| pick would name the artifact question, and its chance level would call the
    real link noise); the answer's chance level is in z, so it holds for every column size."""
    rng = np.random.default_rng(11)
    n = 3000
    cols = schema.fraction_columns()
    lab = rng.uniform(0, 1, size=(n, len(cols)))
    rare = rng.random(n) < 42 / n  # the artifact question, asked of ~42 galaxies
    for a in schema.QUESTIONS["artifact-euclid"]:
        lab[~rare, cols.index(schema.fraction_column("artifact-euclid", a))] = np.nan
    smooth = cols.index("smooth-or-featured-euclid_smooth_fraction")
    weak = lab[:, smooth] + 7.0 * rng.random(n)  # rho ~ 0.15 over 3,000 galaxies: z ~ 8
    # a sparse detector: active on the 2% smoothest galaxies only (|rho| ~ 0.25, z ~ 14)
    detector = np.where(lab[:, smooth] > np.quantile(lab[:, smooth], 0.98), lab[:, smooth], 0.0)
    noise = np.where(rng.random((n, 60)) < 0.02, rng.random((n, 60)), 0.0)
    codes = np.column_stack([weak, detector, noise])
    rho, n_valid = compare.spearman(codes, lab, min_valid=20)
    art = [cols.index(schema.fraction_column("artifact-euclid", a)) for a in schema.QUESTIONS["artifact-euclid"]]
    assert np.nanmax(np.abs(rho[0, art])) > abs(rho[0, smooth])  # raw |rho| would pick an artifact answer
    res = compare.align(codes, lab, cols, min_valid=20, corr=(rho, n_valid))
    assert res["best_column"][:2] == [cols[smooth]] * 2 and res["n_valid"][:2] == [n, n]
    null = compare.shuffled(codes, lab, 20, 1000, seed=0)
    s = compare.chance_summary(res["abs_spearman"], res["z"], np.ones(62, bool), null.feature_best)
    assert min(res["z"][:2]) > s["null_best_z_p95"]  # both are above chance ...
    assert np.mean(np.asarray(res["z"][2:]) > s["null_best_z_p95"]) <= 0.15  # ... noise mostly not
    table = compare.answer_table(rho, n_valid, cols, np.ones(62, bool), float(np.percentile(null.answer_best, 95)))
    row = {r["column"]: r for r in table}
    assert row[cols[smooth]]["feature"] == 1 and row[cols[smooth]]["above_null"]
    assert row[cols[art[0]]]["chance_abs_rho"] > 3 * row[cols[smooth]]["chance_abs_rho"]
    assert not any(row[cols[j]]["above_null"] for j in art if cols[j] in row)  # noise over 42 galaxies


def test_a_negative_best_match_reads_as_fewer_votes_and_each_question_is_listed_once():
    rng = np.random.default_rng(6)
    lab, cols = _labels(300, rng)
    yes, no = (cols.index(schema.fraction_column("has-spiral-arms-euclid", a)) for a in ("yes", "no"))
    lab[:, no] = 1 - lab[:, yes]  # the two answers of a yes/no question sum to 1 (NaN stays NaN)
    bulge = cols.index("bulge-size-euclid_dominant_fraction")
    asked = ~np.isnan(lab[:, yes])
    spiral = np.where(asked, np.nan_to_num(lab[:, yes]), rng.uniform(0, 1, 300))
    codes = np.column_stack([-lab[:, bulge], -spiral, spiral])
    res = compare.align(codes, lab, cols, min_valid=20)
    assert res["spearman"][0] == pytest.approx(-1.0)
    assert res["best_answer"][0] == "fewer votes for: Bulge size → dominant"
    # fewer "yes" votes is more "no" votes: the exact tie goes to the positive reading
    assert res["best_answer"][1:] == ["Spiral arms? → no", "Spiral arms? → yes"]
    for top in res["top_columns"]:
        entries = json.loads(top)
        questions = [compare.QUESTION_OF[c] for c, _, _ in entries]
        assert len(entries) == 3 and len(set(questions)) == 3, entries
    assert compare.signed_answer("bulge-size-euclid_dominant_fraction", 0.3) == "Bulge size → dominant"


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
    assert best["abs_spearman"] >= 0.5 and best["best_column"].startswith(("bulge-size", "smooth-or-featured"))
    assert best["best_answer"].startswith("fewer votes for: ") == (best["spearman"] < 0)
    for r in t:
        assert 0.0 <= r["novelty"] <= 1.0 and r["n_valid"] >= 20
    # the votes of the bulge component's top galaxies lean the way its rho says
    votes = json.loads(best["top_votes"])
    tops = [v for _, v in votes if v is not None]
    assert [i for i, _ in votes] == activation_top_ids(results, "pca")[best["feature"]] and tops, best
    assert (np.mean(tops) > best["best_column_mean"]) == (best["spearman"] > 0), best
    # the chance level: a PCA component that tracks the bulge is above it
    p95 = summary["pca"]["null_best_z_p95"]
    assert 0 < p95 < best["z"] and best["above_null"]
    assert 0 < best["chance_abs_rho"] < best["abs_spearman"]
    assert summary["pca"]["share_above_null"] == pytest.approx(np.mean([r["z"] > p95 for r in t]))

    # Matryoshka: one table row per latent, with its level, and a summary per nested prefix
    m = pq.read_table(storage.join(results, "matryoshka_sae", "compare.parquet")).to_pandas()
    assert len(m) == 64 and sorted(m["level"].unique()) == [1, 2, 3, 4]
    assert (m.loc[m.feature < 8, "level"] == 1).all() and (m.loc[m.feature >= 32, "level"] == 4).all()
    levels = summary["matryoshka_sae"]["levels"]
    assert [lv["n_latents"] for lv in levels] == [8, 16, 32, 64]
    assert [lv["alive"] for lv in levels] == sorted(lv["alive"] for lv in levels)
    assert summary["matryoshka_sae"]["null_best_z_p95"] is not None
    assert all(lv["share_above_null"] is not None for lv in levels)
    # by answer: PCA's best feature for the driven answer is the bulge component, above chance
    answers = json.loads(storage.read_bytes(storage.join(results, "compare", "answers.json")))
    row = next(r for r in answers["pca"] if r["column"] == driven)
    assert abs(row["spearman"]) >= 0.5 and row["above_null"], row
    assert summary["pca"]["answers_above_null"] >= 1 and summary["pca"]["answer_null_z_p95"] < row["z"]
    assert pq.read_schema(storage.join(results, "pca", "compare.parquet")).metadata[b"split"] == b"test"
    for name in ("distributions.png", "levels_matryoshka_sae.png", "summary.json", "summary.csv", "compare_all.csv",
                 "answers.json", "answers.csv"):
        assert storage.exists(storage.join(results, "compare", name)), name
    csv = storage.read_bytes(storage.join(results, "pca", "compare.csv")).decode()
    assert csv.splitlines()[0].startswith("dictionary,feature,level,frequency,best_column,best_answer,spearman")


def activation_top_ids(results: str, name: str) -> dict[int, list[str]]:
    t = pq.read_table(storage.join(results, name, "activations", "test", "features.parquet")).to_pylist()
    return {r["feature"]: r["top_ids"] for r in t}


def test_compare_keeps_no_votes_for_a_feature_without_an_answer():
    lab = np.array([[0.2, np.nan], [0.8, np.nan], [np.nan, np.nan]])
    v = compare.top_votes([["a", "c"], ["b"]], ["x", None], lab, ["a", "b", "c"], ["x", "y"])
    assert [json.loads(t) for t in v["top_votes"]] == [[["a", 0.2], ["c", None]], []]  # c: not asked
    assert v["best_column_mean"][0] == pytest.approx(0.5) and np.isnan(v["best_column_mean"][1])


def test_repeated_ids_in_the_votes_are_refused(tmp_path):
    """Two shards of one split holding the same galaxy would join its votes to the wrong row."""
    import shutil

    dataset = _write_labels(tmp_path / "ds", {}, {"smooth-or-featured-euclid": np.full(30, 40)})
    data = tmp_path / "ds" / "data"
    shutil.copy(data / "test-00000-of-00001.parquet", data / "test-00001-of-00001.parquet")
    with pytest.raises(ValueError, match=r"split 'test': 30 id_str values occur more than once \(\['g0'"):
        compare.read_labels(dataset, "test")


def test_embeddings_from_other_data_are_refused(tmp_path):
    """Embedded galaxies without votes in the dataset: other data, named, not skipped."""
    dataset = _write_labels(tmp_path / "ds", {}, {"smooth-or-featured-euclid": np.full(30, 40)})
    ids, _, _ = compare.read_labels(dataset, "test")
    pos = {s: i for i, s in enumerate(ids)}
    compare.check_same_galaxies(["g3", "g0"], pos, "emb/test", dataset)  # a subset: fine
    with pytest.raises(ValueError, match=r"emb/test: 2 embedded ids are not in dataset .*ds \(\['x1', 'x2'\]\): "
                                         r"embeddings and labels come from different data"):
        compare.check_same_galaxies(["g1", "x1", "x2"], pos, "emb/test", dataset)


def test_a_split_without_embeddings_is_named(tmp_path):
    from galaxysae import activations

    with pytest.raises(FileNotFoundError, match="no embeddings for split 'test'"):
        list(activations.read_embeddings(str(tmp_path), "test"))


def test_sparse_codes_are_ranked_by_their_non_zeros_exactly_as_dense_ranks():
    """SAE codes take the non-zeros-only ranking; ties, negatives, dead and nearly dead features
    and a constant vote column must give scipy's Spearman all the same."""
    from scipy import stats

    rng = np.random.default_rng(3)
    n, m = 500, 30
    codes = np.zeros((n, m), np.float32)
    for i in range(n):
        codes[i, rng.choice(m, 3, replace=False)] = np.round(rng.exponential(1, 3), 1)  # ties
    codes[:, 0] = 0  # dead
    codes[:, 1] = 0
    codes[:4, 1] = 2.0  # four tied galaxies
    codes[:, 2] = np.where(rng.random(n) < 0.1, -rng.random(n), 0)  # negative codes
    labels = rng.random((n, 4))
    asked = rng.random(n) < 0.7
    labels[~asked, 2:] = np.nan  # a second question, asked of 70%
    labels[asked, 3] = 0.5  # a constant answer
    assert np.count_nonzero(codes) < compare.SPARSE_BELOW * codes.size
    rho, n_valid = compare.spearman(codes, labels, min_valid=20)
    assert list(n_valid) == [n, n, asked.sum(), asked.sum()]
    assert np.isnan(rho[0]).all() and np.isnan(rho[:, 3]).all()
    for f in range(1, m):
        for c in range(3):
            ok = ~np.isnan(labels[:, c])
            assert rho[f, c] == pytest.approx(stats.spearmanr(codes[ok, f], labels[ok, c])[0], abs=1e-12)


def test_the_spearman_bench_runs_and_both_rankings_agree(capsys):
    from bench import compare as bench_compare

    assert bench_compare.main(["--galaxies", "600", "--latents", "64", "--k", "4", "--rounds", "1",
                               "--sort-galaxies", "600"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"max \|rho difference\| (\S+), same NaNs: True", out)
    assert m and float(m.group(1)) < 1e-9, out
    m = re.search(r"max \|novelty difference\| (\S+), same NaNs: True", out)
    assert m and float(m.group(1)) < 1e-9, out
    assert re.search(r"target novelty_memory: [0-9.]+x less peak memory", out), out
    assert re.search(r"target sparse_spearman_speedup: [0-9.]+x", out), out
    assert "46 vote columns in 13 missingness patterns" in out, out
    m = re.search(r"max \|rho difference, sorted once\| (\S+), same NaNs: True", out)
    assert m and float(m.group(1)) < 1e-9, out
    assert re.search(r"target spearman_sort_once: [0-9.]+x \(goal >= 3x\) (PASS|FAIL)", out), out
    m = re.search(r"max \|rho difference, PCA sorted once\| (\S+), same NaNs: True", out)
    assert m and float(m.group(1)) < 1e-9, out
    assert re.search(r"target pca_spearman_sort_once: [0-9.]+x \(goal >= 2x\) (PASS|FAIL)", out), out


def _sort_per_pattern(codes, labels: np.ndarray, min_valid: int) -> np.ndarray:
    """compare.spearman's sparse path as it was, sorting each pattern's non-zeros (kept in the
    bench as the baseline): sorting once must give the same rho."""
    from scipy import sparse

    from bench import compare as bench_compare

    return bench_compare.sort_per_pattern(sparse.csr_matrix(codes), labels, min_valid)


def _signed_codes(n: int, m: int, rng) -> np.ndarray:
    """Sparse signed codes (a PCA dictionary's are signed) with ties, dead and nearly dead
    features, a negative one on half the galaxies and a positive one on all but five (both with
    a few values, all tied)."""
    codes = np.where(rng.random((n, m)) < 0.08, np.round(rng.normal(size=(n, m)), 1), 0.0)
    codes[:, 0] = 0  # dead
    codes[:, 1] = 0
    codes[:3, 1] = -1.5  # three tied negatives
    codes[:, 2] = np.where(rng.random(n) < 0.1, 2.0, 0.0)  # a tie of ~10% of the galaxies
    codes[:, 3] = np.where(rng.random(n) < 0.5, -rng.integers(1, 3, n), 0.0)
    codes[:, 4] = np.where(np.arange(n) < 5, 0.0, 1.0 + (np.arange(n) % 3))
    return codes


def _pattern_votes(n: int, rng) -> np.ndarray:
    """Vote columns in four missingness patterns (one nested in another), with ties, a constant
    answer and a question asked of fewer than min_valid = 20 galaxies."""
    lab = np.round(rng.random((n, 9)), 1)
    asked = rng.random(n) < 0.6
    lab[~asked, 2:5] = np.nan
    lab[~(asked & (rng.random(n) < 0.5)), 5:7] = np.nan  # nested in the previous question
    lab[asked, 4] = 0.5  # constant where asked
    few = rng.choice(n, 15, replace=False)
    lab[:, 7] = np.nan
    lab[few, 7] = rng.random(15)  # 15 galaxies asked: below min_valid
    return lab


@pytest.mark.filterwarnings("ignore:An input array is constant")  # scipy, for the dead features
def test_sorting_once_gives_the_rho_of_sorting_per_pattern_and_of_scipy():
    """The non-zeros are sorted once per dictionary and each pattern (and shuffle) keeps those of its
    galaxies: rho, NaNs and n_valid must be those of sorting every pattern (the previous code) and
    of scipy's spearmanr over the galaxies asked, for signed codes with ties, dead and dense-ish
    features, a constant answer and a question asked of too few galaxies."""
    from scipy import sparse, stats

    rng = np.random.default_rng(8)
    n, m = 400, 24
    codes = _signed_codes(n, m, rng)
    lab = _pattern_votes(n, rng)
    assert np.count_nonzero(codes) < compare.SPARSE_BELOW * codes.size
    ranked = compare.sort_columns(codes)
    assert isinstance(ranked, compare.SortedColumns) and compare.sort_columns(ranked) is ranked
    assert ranked.rows.dtype == np.int32 and len(ranked.tied) > 0
    perm = np.random.default_rng(1).permutation(n)
    for votes in (lab, lab[perm], lab[perm[::-1]]):  # the votes and two shuffles, one sort
        rho, n_valid = compare.spearman(ranked, votes, min_valid=20)
        assert list(n_valid) == list((~np.isnan(votes)).sum(0))
        before = _sort_per_pattern(codes, votes, 20)
        assert np.array_equal(np.isnan(rho), np.isnan(before))
        assert np.allclose(rho, before, rtol=0, atol=1e-12, equal_nan=True)
        assert np.isnan(rho[:, 4]).all() and np.isnan(rho[:, 7]).all() and np.isnan(rho[0]).all()
        for f in range(1, m):
            for j in (0, 1, 2, 3, 5, 6, 8):
                ok = ~np.isnan(votes[:, j])
                expect = stats.spearmanr(codes[ok, f], votes[ok, j])[0]
                assert rho[f, j] == pytest.approx(expect, abs=1e-12, nan_ok=True), (f, j)
    # the chance baseline: one sort for all shuffles, the values of sorting for each of them
    null = compare.shuffled(ranked, lab, 20, 100, seed=3)
    again = compare.shuffled(sparse.csr_matrix(codes), lab, 20, 100, seed=3)
    assert np.array_equal(null.feature_best, again.feature_best)
    shuffle, expect = np.random.default_rng(3), []
    for _ in range(max(1, -(-100 // m), -(-compare.ANSWER_NULL_VALUES // lab.shape[1]))):  # 23
        votes = lab[shuffle.permutation(n)]
        before = _sort_per_pattern(codes, votes, 20)
        assert np.allclose(compare.spearman(ranked, votes, 20)[0], before, rtol=0, atol=1e-12, equal_nan=True)
        z = compare.significance(before, (~np.isnan(votes)).sum(0))
        score = compare._scores(z, before)
        has = score.max(1, initial=-1.0) >= 0
        expect.append(z[np.flatnonzero(has), score.argmax(1)[has]])
    assert np.allclose(null.feature_best, np.concatenate(expect), rtol=0, atol=1e-9)
    # a stored 0 of a scipy matrix ranks with the implicit zeros
    csr = sparse.csr_matrix(codes)
    i, j = np.argwhere(codes)[0]  # the first stored value
    csr.data[0] = 0.0
    zeroed = codes.copy()
    zeroed[i, j] = 0.0
    assert np.allclose(compare.spearman(csr, lab, 20)[0], compare.spearman(zeroed, lab, 20)[0],
                       rtol=0, atol=1e-12, equal_nan=True)
    # a NaN code has no rank: its feature gets no rho for the questions its galaxy was asked (as
    # with dense ranks), its rho for the others, and the other features theirs
    with_nan = codes.copy()
    g = next(i for i in np.flatnonzero(codes[:, 5]) if np.isnan(lab[i]).any() and not np.isnan(lab[i]).all())
    with_nan[g, 5] = np.nan
    rho_nan, _ = compare.spearman(with_nan, lab, 20)
    rho, _ = compare.spearman(codes, lab, 20)
    asked = ~np.isnan(lab[g])
    assert np.isnan(rho_nan[5, asked]).all() and np.isfinite(rho[5, asked]).any()
    assert np.allclose(rho_nan[5, ~asked], rho[5, ~asked], rtol=0, atol=1e-12, equal_nan=True)
    assert np.isfinite(rho_nan[5, ~asked]).any()
    assert np.array_equal(np.delete(rho_nan, 5, 0), np.delete(rho, 5, 0), equal_nan=True)
    # novelty takes the sorted codes as it takes the matrix; the sorted arrays stay as they were
    rows, values = ranked.rows.copy(), ranked.values.copy()
    x = rng.random((n, 3))
    assert np.allclose(compare.novelty(ranked, x)[0], compare.novelty(codes, x)[0], atol=1e-9, equal_nan=True)
    assert np.array_equal(ranked.rows, rows) and np.array_equal(ranked.values, values)


def test_sorted_codes_on_random_patterns_match_sorting_per_pattern():
    """Many random small cases: runs of ties split between galaxies asked and not, columns without a
    non-zero among the galaxies asked, questions asked of fewer than min_valid."""
    for seed in range(25):
        rng = np.random.default_rng(100 + seed)
        n, m = int(rng.integers(25, 200)), int(rng.integers(1, 12))
        codes = np.where(rng.random((n, m)) < rng.uniform(0.02, 0.2),
                         np.round(rng.normal(size=(n, m)), int(rng.integers(0, 2))), 0.0)
        lab = np.round(rng.random((n, 4)), 1)
        for j, share in ((1, 0.5), (2, 0.1), (3, 0.8)):
            lab[rng.random(n) > share, j] = np.nan
        rho, _ = compare.spearman(codes, lab, min_valid=5)
        before = _sort_per_pattern(codes, lab, 5)
        assert np.array_equal(np.isnan(rho), np.isnan(before)), seed
        assert np.allclose(rho, before, rtol=0, atol=1e-12, equal_nan=True), seed


@pytest.mark.filterwarnings("ignore:An input array is constant")  # scipy, for the constant feature
def test_dense_codes_sorted_once_give_scipys_rho():
    """A PCA's codes are (almost) all non-zero: sorted column by column once, every pattern and
    shuffle ranks them as scipy does, with ties, a few zeros among signed values, a constant
    feature and a NaN code; the sort is the one of the sparse route (one sort of all non-zeros)."""
    from scipy import stats

    rng = np.random.default_rng(11)
    n, m = 300, 7
    codes = rng.normal(size=(n, m)).astype(np.float32)
    codes[:, 1] = np.round(codes[:, 1], 1)  # ties among signed values
    codes[rng.random(n) < 0.05, 2] = 0.0  # a few exact zeros
    codes[:, 3] = 1.5  # constant
    codes[7, 4] = np.nan
    lab = _pattern_votes(n, rng)
    assert np.count_nonzero(codes) >= compare.SPARSE_BELOW * codes.size
    ranked = compare.sort_columns(codes)
    assert isinstance(ranked, compare.SortedColumns) and ranked.rows.dtype == np.int32
    # the same arrays as sorting all non-zeros by column then value (ties by galaxy)
    nz_cols, nz_rows = np.nonzero(codes.T)
    order = np.lexsort((codes[nz_rows, nz_cols], nz_cols))
    assert np.array_equal(ranked.rows, nz_rows[order])
    assert np.array_equal(ranked.values, codes[nz_rows, nz_cols][order], equal_nan=True)
    assert np.array_equal(ranked.indptr, np.concatenate([[0], np.cumsum(np.count_nonzero(codes, 0))]))
    for votes in (lab, lab[rng.permutation(n)]):
        rho, n_valid = compare.spearman(ranked, votes, min_valid=20)
        assert list(n_valid) == list((~np.isnan(votes)).sum(0))
        assert np.isnan(rho[3]).all()
        for f in (0, 1, 2, 4, 5, 6):
            for j in (0, 1, 2, 3, 5, 6, 8):
                ok = ~np.isnan(votes[:, j])
                expect = stats.spearmanr(codes[ok, f], votes[ok, j])[0]  # NaN where code 7 is asked
                assert rho[f, j] == pytest.approx(expect, abs=1e-12, nan_ok=True), (f, j)
