"""The static atlas, opened from disk in headless Chromium: no console errors, real content."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galaxysae import activations, atlas, compare, config, render, schema
from tests import atlas_chain
from tests.chromium import CHROMIUM, Browser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="Debian chromium is not installed (run tests/services/system_deps.sh as root)")


def _variance(png: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), float).var())


@pytest.fixture(scope="module")
def site(ray_cluster, offline_hub, session_root, tmp_path_factory):
    chain = atlas_chain.build(session_root)
    results = tmp_path_factory.mktemp("atlas") / "results"
    common = {"dictionaries": [str(chain.matryoshka), str(chain.pca)], "embeddings": str(chain.embeddings),
              "dataset": str(chain.dataset), "results": str(results)}
    render.run(config.from_dict(render.Config, {**common, "n_features": 3, "top_n": 6, "columns": 3, "tile": 48}))
    compare.run(config.from_dict(compare.Config, {**common, "min_valid": 20}))
    out = results.parent / "site"
    index = atlas.run(config.from_dict(atlas.Config, {"results": str(results), "output": str(out)}))
    return out, index


@pytest.mark.slow
def test_site_layout_is_self_contained(site):
    out, index = site
    assert index == str(out / "index.html")
    assert (out / "assets" / "atlas.css").exists() and (out / "assets" / "table.js").exists()
    assert len(list((out / "pca" / "f").glob("*.html"))) == 16
    assert len(list((out / "matryoshka_sae" / "grids").glob("*.jpg"))) == 3
    # a principal component is shown at both ends: its lowest scores have a grid and a table too
    assert len(list((out / "pca" / "grids").glob("*_low.jpg"))) == 3
    pc1 = (out / "pca" / "f" / "0.html").read_text()
    assert 'src="../grids/feature_00000_low.jpg"' in pc1 and "The other end: lowest scores" in pc1
    assert not any("_low.jpg" in p.read_text() for p in (out / "matryoshka_sae" / "f").glob("*.html"))
    for page in [out / "index.html", out / "pca" / "index.html", out / "pca" / "f" / "0.html"]:
        text = page.read_text()
        # nothing outside the site: no http(s) links, scripts, styles or images
        assert "http://" not in text and "https://" not in text, page
    assert "Bulge size" in (out / "pca" / "index.html").read_text()
    # compare kept the votes of each feature's top galaxies: the page lists them (CSV: as JSON)
    assert "<th>votes: " in (out / "pca" / "f" / "0.html").read_text()
    import pandas as pd
    csv = pd.read_csv(out.parent / "results" / "pca" / "compare.csv")
    votes = [json.loads(v) for v in csv["top_votes"]]  # [[id_str, fraction], ...] a feature
    assert any(votes) and all(isinstance(i, str) and (f is None or 0 <= f <= 1) for v in votes for i, f in v)
    # the chain's encoder is the offline stand-in: the atlas says so on its front page
    assert "stand-in encoder" in (out / "index.html").read_text()


@needs_chromium
@pytest.mark.slow
def test_index_table_and_feature_page_render_in_chromium_without_errors(site):
    out, _ = site
    with Browser() as b:
        b.open((out / "index.html").as_uri())
        assert b.errors() == []
        assert b.evaluate("document.querySelectorAll('.cards .card').length") == 2
        assert b.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        shot = b.screenshot()
        assert _variance(shot) > 100, "the index screenshot is blank"

        b.open((out / "matryoshka_sae" / "index.html").as_uri())
        assert b.errors() == []
        n = b.evaluate("document.querySelectorAll('#feature-body tr').length")
        assert 0 < n <= 64
        # sorting by a header click, then filtering by level, both re-render the table
        b.evaluate("document.querySelector('th[data-key=feature]').click()")
        first = b.evaluate("document.querySelector('#feature-body tr td').textContent")
        assert first.startswith("feature 0")
        b.evaluate("var s = document.getElementById('level'); s.value = '4'; s.dispatchEvent(new Event('change'))")
        levels = b.evaluate("Array.from(document.querySelectorAll('#feature-body tr td:nth-child(2)')).map(td => td.textContent)")
        assert levels and set(levels) == {"4"}
        assert b.errors() == []

        page = next(iter(sorted((out / "matryoshka_sae" / "grids").glob("*.jpg")))).stem.split("_")[1]
        b.open((out / "matryoshka_sae" / "f" / f"{int(page)}.html").as_uri())
        assert b.errors() == []
        assert b.evaluate("document.querySelector('img.grid-img').naturalWidth") == render.grid_size(6, 3, 48)[0]
        assert b.evaluate("document.querySelectorAll('svg rect').length") > 0  # the histogram
        shot = b.screenshot()
        assert Image.open(io.BytesIO(shot)).size == (1280, 900)
        assert _variance(shot) > 100, "the feature page screenshot is blank"


@needs_chromium
def test_the_browser_check_does_catch_errors(tmp_path):
    """Guard for the test above: a broken page must be reported."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                   '<img src="missing.png"><script>undefinedFunction();</script></body></html>')
    with Browser() as b:
        b.open(bad.as_uri())
        errors = b.errors()
    assert any("undefinedFunction" in e for e in errors), errors
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in errors), errors


@pytest.mark.slow
def test_atlas_cli_prints_the_index_path(site, tmp_path):
    out, _ = site
    results = out.parent / "results"
    proc = subprocess.run([sys.executable, "-m", "galaxysae", "atlas", "--results", str(results),
                           "--output", str(tmp_path / "again")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"atlas: {tmp_path / 'again' / 'index.html'}" in proc.stdout


# ----------------------------------------------------------------------------- small results, no Ray


BULGE = "bulge-size-euclid_dominant_fraction"


def _write_dictionary(results: Path, name: str, doc: dict, codes: np.ndarray, lab: np.ndarray,
                      cols: list[str]) -> dict:
    """What render and compare leave for one dictionary, from its codes[N, M] and the votes, with
    compare's own alignment and chance baseline (no Ray, no encoder). -> its summary entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, m = codes.shape
    folder = results / name
    (folder / "activations" / "test").mkdir(parents=True)
    active = codes > 0
    freq = active.mean(0)
    top = np.argsort(-codes, axis=0)[:5]
    top_ids = [[f"g{i}" for i in top[:, f]] for f in range(m)]
    pq.write_table(pa.table({
        "feature": np.arange(m, dtype=np.int32), "level": np.ones(m, np.int32), "frequency": freq,
        "mean_active": [float(codes[active[:, f], f].mean()) if active[:, f].any() else float("nan") for f in range(m)],
        "max": codes.max(0), "top_ids": top_ids,
        "top_values": [codes[top[:, f], f].astype(np.float32).tolist() for f in range(m)]}),
        folder / "activations" / "test" / "features.parquet")
    corr = compare.spearman(codes, lab, 20)
    res = compare.align(codes, lab, cols, min_valid=20, corr=corr)
    null = compare.shuffled(codes, lab, 20, 1000, seed=0, active=freq > 0)
    chance = compare.chance_summary(res["abs_spearman"], res["z"], freq > 0, null.feature_best)
    z95 = chance["null_best_z_p95"]
    chance["answer_null_z_p95"] = float(np.percentile(null.answer_best, 95))
    chance["answer_rows"] = compare.answer_table(*corr, cols, freq > 0, chance["answer_null_z_p95"])
    votes = compare.top_votes(top_ids, res["best_column"], lab, [f"g{i}" for i in range(n)], cols)
    pq.write_table(pa.table({"feature": np.arange(m), "frequency": freq, **res, **votes,
                             "chance_abs_rho": [compare.chance_rho(z95, k) for k in res["n_valid"]],
                             "above_null": [bool(z > z95) for z in res["z"]]}), folder / "compare.parquet")
    (folder / "dictionary.json").write_text(json.dumps({"name": name, "n_latents": m, "split": "test",
                                                        "n_galaxies": n, **doc}))
    return chance


@pytest.fixture(scope="module")
def small_site(tmp_path_factory):
    """Two small dictionaries over 300 galaxies: PC 1 is the bulge-size "dominant" vote fraction
    upside down (rho -1), the other components and every SAE latent are noise."""
    rng = np.random.default_rng(7)
    n = 300
    cols = schema.fraction_columns()
    lab = rng.uniform(0, 1, size=(n, len(cols)))
    pca_codes = np.column_stack([0.5 - lab[:, cols.index(BULGE)], rng.normal(size=(n, 3))])  # centred, as PCA scores
    sae_codes = np.maximum(rng.normal(size=(n, 8)) - 1.0, 0)
    root = tmp_path_factory.mktemp("small_site")
    results = root / "results"
    summary = {
        "pca": _write_dictionary(results, "pca", {
            "kind": "pca", "family": "pca", "levels": [4], "cfg": {"kind": "pca"},
            "metrics": {"fvu": 0.7, "l0": 4.0, "dead_fraction": 0.0,
                        "levels": [{"n_latents": c, "fvu": 1 - 0.07 * c, "l0": float(c)} for c in (1, 2, 3, 4)]}},
            pca_codes, lab, cols),
        "sae": _write_dictionary(results, "sae", {
            "kind": "sae", "family": "sae", "levels": [8], "cfg": {"k": 2, "activation": "topk"},
            "metrics": {"fvu": 0.75, "l0": 1.3, "dead_fraction": 0.0,
                        "levels": [{"n_latents": 8, "fvu": 0.75, "l0": 1.3}]}},
            sae_codes, lab, cols)}
    (results / "compare").mkdir()
    answers = {name: s.pop("answer_rows") for name, s in summary.items()}
    (results / "compare" / "summary.json").write_text(json.dumps(summary))
    (results / "compare" / "answers.json").write_text(json.dumps(answers))
    out = root / "site"
    atlas.run(config.from_dict(atlas.Config, {"results": str(results), "output": str(out)}))
    return out, summary


def _rows(table_html: str) -> list[dict]:
    return json.loads(re.search(r'<script id="feature-data" type="application/json">(.*?)</script>',
                                table_html, re.S).group(1).replace("<\\/", "</"))


def test_a_negative_correlation_reads_as_fewer_votes_for(small_site):
    out, _ = small_site
    page = (out / "pca" / "f" / "0.html").read_text()
    assert "fewer votes for: Bulge size → dominant (ρ -1.00)" in page
    closest = re.findall(r"<tr><td>([^<]*)</td><td class='num'>", page)
    assert closest[0] == "fewer votes for: Bulge size → dominant"
    row = next(r for r in _rows((out / "pca" / "index.html").read_text()) if r["feature"] == 0)
    assert row["best_answer"] == "fewer votes for: Bulge size → dominant" and row["spearman"] < 0
    assert "bulge" in row["best_answer"].lower()  # the table's search still finds it


def test_feature_page_gives_the_votes_of_its_top_galaxies_beside_the_average(small_site):
    """PC 1 is the bulge "dominant" vote upside down: its top galaxies have the fewest of those
    votes, and the page shows each one's fraction and the mean beside the average over all."""
    out, _ = small_site
    page = (out / "pca" / "f" / "0.html").read_text()
    assert "<th>votes: Bulge size → dominant</th>" in page
    shown = [float(v) for v in re.findall(r"<td class='num'>[^<]*</td><td class='num'>([0-9.]+)</td></tr>", page)]
    assert len(shown) == 5 and max(shown) < 0.1  # the 5 lowest of 300 uniform fractions
    line = re.search(r"<dt>Votes for Bulge size → dominant</dt><dd>mean ([0-9.]+) over its top 5 galaxies "
                     r"\(5 asked\); ([0-9.]+) over all galaxies asked</dd>", page)
    assert line, page
    assert float(line.group(1)) == pytest.approx(np.mean(shown), abs=0.006)
    assert 0.4 < float(line.group(2)) < 0.6  # uniform votes average 0.5
    # a feature page of results written before compare kept the votes has neither
    assert atlas._top_votes({"best_column": BULGE, "top_ids": ["g1"]}, 30) is None
    # votes are matched by id: a galaxy compare did not see gets none, not its neighbour's
    r = {"best_column": BULGE, "top_ids": ["g1", "g2"], "top_votes": json.dumps([["g2", 0.5]])}
    assert atlas._top_votes(r, 30)[1] == {"g2": 0.5}


def test_fvu_is_plotted_against_l0_not_dictionary_size(small_site):
    out, _ = small_site
    index = (out / "index.html").read_text()
    svg = index[index.index("<svg"):index.index("</svg>")]
    l0 = {name: sorted(float(x) for x in re.findall(r'data-l0="([^"]+)" data-fvu="[^"]+"><title>' + name + ":", svg))
          for name in ("sae", "pca")}
    assert l0 == {"sae": [1.3], "pca": [1.0, 2.0, 3.0, 4.0]}  # the SAE at its L0 1.3, not at its 8 latents
    assert "active features per galaxy (L0" in svg and "dictionary size" not in svg
    assert atlas.fvu_points({"kind": "pca", "n_latents": 3, "metrics": {"fvu": 0.5}}) == [(3.0, 0.5)]


def test_cards_give_shares_above_chance_and_honest_labels(small_site):
    out, summary = small_site
    index = (out / "index.html").read_text()
    for name in ("pca", "sae"):
        z95, share = summary[name]["null_best_z_p95"], summary[name]["share_above_null"]
        assert f"Share of features above chance (z &gt; {atlas.fmt(z95, 2)})</dt><dd>{atlas.pct(share)}</dd>" in index
    assert summary["pca"]["share_above_null"] >= 0.25  # PC 1 of 4 is above chance
    assert "Share with |ρ| ≥ 0.5</dt><dd>25.0%</dd>" in index  # a share of the 4 components, not a count
    assert "with a GZ answer" not in index
    assert "<dt>k (training)</dt><dd>2 (topk)</dd>" in index and "active per galaxy)" not in index
    assert "never activate on the test split" not in index and "training split" in index
    feature = (out / "pca" / "f" / "0.html").read_text()
    assert "Chance level (votes shuffled)</dt><dd>|ρ| 0." in feature and "this feature is above it" in feature
    assert "over 300 galaxies asked; z " in feature


def test_answers_page_names_each_answers_best_feature_and_dims_chance(small_site):
    out, summary = small_site
    index = (out / "index.html").read_text()
    assert '<a href="answers.html">Find a morphology →</a>' in index
    page = (out / "answers.html").read_text()
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td class='num'>[^<]*</td><td class='num'>([^<]*)</td>"
                      r"(.*?)</tr>", page)
    assert len(rows) == len(schema.fraction_columns())  # every answer, once
    level, bulge = next((lv, cells) for q, a, lv, cells in rows if q == "Bulge size" and a == "dominant")
    assert 0.1 < float(level) < 0.3  # chance |rho| over 300 galaxies
    pca_cell, sae_cell = re.findall(r'<td class="([^"]*)"(?: title="[^"]*")?><a href="(\w+)/f/(\d+).html">([^<]*)</a>',
                                    bulge)[::-1]
    # PC 1 is the bulge vote upside down: found, signed, above chance; SAE noise is dimmed
    assert pca_cell[1:] == ("pca", "0", "PC 1 (ρ -1.00)") and pca_cell[0] == ""
    assert sae_cell[1] == "sae" and sae_cell[0] == "weak"
    assert summary["pca"]["answer_null_z_p95"] < 10
    dimmed = page.count('class="weak"')
    assert dimmed >= len(rows)  # the noise features of both dictionaries: most cells are dimmed
    assert (out / "pca" / "f" / "0.html").is_file() and (out / "sae" / f"f/{sae_cell[2]}.html").is_file()

@needs_chromium
def test_table_opens_on_pc_1_and_sorts_spearman_on_its_magnitude(small_site):
    out, _ = small_site
    with Browser() as b:
        b.open((out / "pca" / "index.html").as_uri())
        assert b.errors() == []
        first = "document.querySelector('#feature-body tr td').textContent"
        assert b.evaluate(first).startswith("PC 1")
        b.evaluate("document.querySelector('th[data-key=spearman]').click()")
        assert b.evaluate(first).startswith("PC 1")  # rho -1.00: the strongest match, on top
        shown = b.evaluate("Array.from(document.querySelectorAll('#feature-body tr td:nth-child(6)'))"
                           ".map(td => Math.abs(parseFloat(td.textContent)))")
        assert shown == sorted(shown, reverse=True) and len(shown) == 4
        # the top galaxies' vote against all: PC 1's are the fewest bulge "dominant" votes
        b.evaluate("document.querySelector('th[data-key=top_vote]').click()")
        assert b.evaluate(first).startswith("PC 1")
        cells = b.evaluate("Array.from(document.querySelectorAll('#feature-body tr td:nth-child(7)'))"
                           ".map(td => td.textContent)")
        assert re.fullmatch(r"0\.0\d vs 0\.[45]\d", cells[0]), cells
        assert b.errors() == []


def test_the_table_gives_each_feature_s_top_galaxies_vote_beside_all(small_site):
    """The gap between the top galaxies' vote and all galaxies' is the table's direct reading of
    a detector: PC 1 (the bulge "dominant" vote upside down) has the largest; a feature with
    fewer than MIN_TOP_ASKED of its top galaxies asked gets none."""
    out, _ = small_site
    rows = _rows((out / "pca" / "index.html").read_text())
    pc1 = next(r for r in rows if r["feature"] == 0)
    assert pc1["top_vote"] < 0.1 and 0.4 < pc1["all_vote"] < 0.6
    assert pc1["abs_top_gap"] == pytest.approx(pc1["all_vote"] - pc1["top_vote"], abs=1e-3)
    assert pc1["abs_top_gap"] == max(r["abs_top_gap"] for r in rows)
    votes = json.dumps([[f"g{i}", 0.9 if i < 4 else None] for i in range(30)])
    few = {"best_column": BULGE, "best_column_mean": 0.2, "top_ids": [f"g{i}" for i in range(30)],
           "top_votes": votes}
    assert atlas._table_votes(few, 30)["top_vote"] is None  # 4 asked
    assert atlas._table_votes({**few, "top_votes": votes.replace("null", "0.9")}, 30) == {
        "top_vote": 0.9, "all_vote": 0.2, "abs_top_gap": 0.7}


def test_missing_results_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dictionary results found"):
        atlas.run(config.from_dict(atlas.Config, {"results": str(tmp_path / "nothing"), "output": str(tmp_path / "o")}))


def test_grids_or_a_compare_table_of_another_split_are_refused(small_site, tmp_path):
    """render and compare each rewrite dictionary.json with their split: grids drawn from the test
    split under train statistics (or the reverse) would put one set of galaxies' numbers beside
    another's pictures, so the atlas names the mismatch instead of building that page."""
    import shutil

    import pyarrow.parquet as pq

    results = tmp_path / "results"
    shutil.copytree(small_site[0].parent / "results", results)
    cfg = config.from_dict(atlas.Config, {"results": str(results), "output": str(tmp_path / "site")})
    (results / "sae" / "grids").mkdir()
    rendered = results / "sae" / "grids" / "_rendered.json"
    rendered.write_text(json.dumps({"inputs": {"activations": {"split": "test"}}, "features": []}))
    atlas.run(cfg)  # the same split: fine
    rendered.write_text(json.dumps({"inputs": {"activations": {"split": "train"}}, "features": []}))
    with pytest.raises(ValueError, match=r"sae: its grids were rendered from split 'train', but the last "
                                         r"render/compare run into it used 'test'"):
        atlas.run(cfg)
    rendered.unlink()
    t = pq.read_table(results / "pca" / "compare.parquet")
    pq.write_table(t.replace_schema_metadata({"split": "train"}), results / "pca" / "compare.parquet")
    with pytest.raises(ValueError, match=r"pca: compare.parquet was computed from split 'train'.*--split test"):
        atlas.run(cfg)


def test_an_older_compare_s_chance_level_is_shown_in_its_own_units():
    """compare/summary.json from before the z chance level held a level in |rho|: the cards say
    so (and to rerun compare) rather than dropping the chance information."""
    doc = {"kind": "sae", "family": "sae", "n_latents": 4, "n_galaxies": 300}
    old = atlas.Entry("sae", doc, [], set(), {}, [], {"null_best_abs_rho_p95": 0.31, "share_above_null": 0.25})
    assert "Share of features above chance (|ρ| &gt; 0.31)</dt><dd>25.0%" in atlas._alignment_rows(old)
    assert "|ρ| 0.31" in atlas._chance_line(old) and "rerun compare" in atlas._chance_line(old)
    new = atlas.Entry("sae", doc, [], set(), {}, [], {"null_best_z_p95": 3.2, "share_above_null": 0.25})
    assert "(z &gt; 3.2)" in atlas._alignment_rows(new)
    assert "z 3.2" in atlas._chance_line(new) and "|ρ| 0.18 over all 300 galaxies" in atlas._chance_line(new)


class _Records(logging.Handler):
    """The galaxysae log records of a block (its logger may not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("galaxysae").addHandler(self)
        self._level = logging.getLogger("galaxysae").level
        logging.getLogger("galaxysae").setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        logging.getLogger("galaxysae").removeHandler(self)
        logging.getLogger("galaxysae").setLevel(self._level)


def test_dictionaries_the_last_compare_did_not_cover_are_left_out_and_named(small_site, tmp_path):
    """compare run on fewer dictionaries rewrites summary.json and answers.json without the
    others: a folder it did not cover has no chance level and no answers, so the atlas shows the
    last compare's dictionaries and names the one it leaves out."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(small_site[0].parent / "results", results)
    out = tmp_path / "site"
    atlas.run(config.from_dict(atlas.Config, {"results": str(results), "output": str(out)}))
    assert (out / "sae" / "index.html").is_file()
    (out / "notes.txt").write_text("the user's own file")
    for f in ("summary.json", "answers.json"):
        doc = json.loads((results / "compare" / f).read_text())
        (results / "compare" / f).write_text(json.dumps({"pca": doc["pca"]}))
    with _Records() as logs:
        atlas.run(config.from_dict(atlas.Config, {"results": str(results), "output": str(out)}))
    index = (out / "index.html").read_text()
    assert 'href="pca/index.html"' in index and 'href="sae/index.html"' not in index
    # the earlier build's pages of the dictionary left out are gone; nothing else is touched
    assert not (out / "sae").exists() and (out / "notes.txt").read_text() == "the user's own file"
    assert (out / "pca" / "index.html").is_file() and (out / "pca" / "f" / "0.html").is_file()
    assert "sae/f/" not in (out / "answers.html").read_text()
    assert any("leaving out sae: the last compare" in m and "`galaxysae compare`" in m
               for m in logs.messages), logs.messages


def test_results_of_other_activations_are_refused_naming_what_to_rerun(small_site, tmp_path):
    """activations/{split}/_SUCCESS identifies the current activations (the stamps of the
    dictionary's weights and of the embedding files); grids (_rendered.json) or compare results
    that recorded other ones are refused with the job to run again; results that recorded none
    (an older compare) are shown, with a warning."""
    import shutil

    import pyarrow.parquet as pq

    results = tmp_path / "results"
    shutil.copytree(small_site[0].parent / "results", results)
    cfg = config.from_dict(atlas.Config, {"results": str(results), "output": str(tmp_path / "site")})
    acts = results / "sae" / "activations" / "test"
    current = {"dictionary": "/d/sae", "embeddings": "/e", "split": "test", "stamps": ["10:1.0", "20:2.0"]}
    (acts / "_SUCCESS").write_text(json.dumps({**current, "files": ["/e/test/a.parquet"], "top_n": 30,
                                                "n_galaxies": 300}))
    old = {**current, "stamps": ["10:0.5", "20:2.0"]}  # the dictionary retrained in place since
    (results / "sae" / "grids").mkdir()
    rendered = results / "sae" / "grids" / "_rendered.json"

    def write(grids: dict | None, table: dict | None, summary: dict | None):
        rendered.write_text(json.dumps({"inputs": {"activations": grids}, "features": []}))
        t = pq.read_table(results / "sae" / "compare.parquet")
        meta = {"split": "test"} if table is None else {"split": "test", "activations": json.dumps(table)}
        pq.write_table(t.replace_schema_metadata(meta), results / "sae" / "compare.parquet")
        doc = json.loads((results / "compare" / "summary.json").read_text())
        doc["sae"].pop("activations", None)
        if summary is not None:
            doc["sae"]["activations"] = summary
        (results / "compare" / "summary.json").write_text(json.dumps(doc))

    write(current, current, current)
    atlas.run(cfg)
    # compare ran after the retrain, render did not: the grids show the old top galaxies
    write(old, current, current)
    with pytest.raises(ValueError, match=r"results/sae: its grids \(grids/_rendered.json\) were made from other "
                                         r"activations than the current ones in .*activations/test \(the "
                                         r"dictionary's weights or the embedding files were rewritten since.*"
                                         r"run `galaxysae render` again for this dictionary") as err:
        atlas.run(cfg)
    assert "compare" not in str(err.value).split("run ")[-1]
    # render ran, compare did not: its table and answers are of the old activations
    write(current, old, old)
    with pytest.raises(ValueError, match=r"results/sae: compare.parquet and compare's summary.json and answers.json "
                                         r"were made from .*run `galaxysae compare` again"):
        atlas.run(cfg)
    # a compare interrupted before summary.json: that alone is named
    write(current, current, {**current, "dictionary": "/d/other"})
    with pytest.raises(ValueError, match=r"sae: compare's summary.json and answers.json were made from "
                                         r".*dictionary '/d/other', now '/d/sae'.*`galaxysae compare`"):
        atlas.run(cfg)
    # both stale: both jobs named
    write(old, old, old)
    with pytest.raises(ValueError, match=r"run `galaxysae render` and `galaxysae compare` again"):
        atlas.run(cfg)
    # an older compare recorded no activations: it cannot be checked, and the log says so
    write(current, None, None)
    with _Records() as logs:
        atlas.run(cfg)
    assert any("compare.parquet recorded no activations to check" in m for m in logs.messages), logs.messages


@pytest.mark.slow
def test_a_retrained_dictionary_s_old_grids_or_compare_are_refused(ray_cluster, offline_hub, session_root,
                                                                    tmp_path):
    """The reviewer's case on the real jobs: a dictionary retrained into the same folder, then
    compare alone run again (it recomputes the activations): the grids still show the old top
    galaxies, so the atlas refuses and names render; after render it builds. The mirror case,
    render alone after a retrain, names compare. compare records the activations it used in
    compare.parquet's metadata and summary.json, as render does in _rendered.json."""
    import shutil

    import pyarrow.parquet as pq
    from safetensors.numpy import load_file, save_file

    from galaxysae import dictionary

    chain = atlas_chain.build(session_root)
    pca_copy = tmp_path / "pca"
    shutil.copytree(chain.pca, pca_copy)
    results = tmp_path / "results"
    common = {"dictionaries": [str(pca_copy)], "embeddings": str(chain.embeddings),
              "dataset": str(chain.dataset), "results": str(results)}
    rcfg = config.from_dict(render.Config, {**common, "n_features": 2, "top_n": 4, "columns": 2, "tile": 32,
                                            "select": "aligned"})
    ccfg = config.from_dict(compare.Config, {**common, "min_valid": 20, "null_samples": 100})
    acfg = config.from_dict(atlas.Config, {"results": str(results), "output": str(tmp_path / "site")})
    acts = results / "pca" / "activations" / "test"

    def retrain():  # the same URL, other weights: each component's other end
        t = load_file(pca_copy / dictionary.PCA_WEIGHTS)
        t["components"] = -t["components"]
        save_file(t, pca_copy / dictionary.PCA_WEIGHTS)

    compare.run(ccfg)
    render.run(rcfg)
    atlas.run(acfg)
    ident = render.activations_identity(str(acts))
    assert ident["stamps"] and json.loads(pq.read_schema(results / "pca" / "compare.parquet")
                                          .metadata[b"activations"]) == ident
    assert json.loads((results / "compare" / "summary.json").read_text())["pca"]["activations"] == ident

    retrain()
    compare.run(ccfg)
    assert render.activations_identity(str(acts)) != ident  # recomputed by compare
    with pytest.raises(ValueError, match=r"pca: its grids \(grids/_rendered.json\) were made from other "
                                         r"activations .*rewritten since.*run `galaxysae render` again"):
        atlas.run(acfg)
    render.run(rcfg)
    atlas.run(acfg)
    top = activations.load_features(str(acts)).column("top_ids").to_pylist()[0]
    assert all(f"<code>{i}</code>" in (tmp_path / "site" / "pca" / "f" / "0.html").read_text() for i in top)

    retrain()
    render.run(rcfg)
    with pytest.raises(ValueError, match=r"pca: compare.parquet and compare's summary.json and answers.json "
                                         r"were made from other activations .*run `galaxysae compare` again"):
        atlas.run(acfg)
