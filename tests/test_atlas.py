"""The static atlas, opened from disk in headless Chromium: no console errors, real content."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from galaxysae import atlas, compare, config, render
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
    assert len(list((out / "matryoshka_sae" / "grids").glob("*.png"))) == 3
    for page in [out / "index.html", out / "pca" / "index.html", out / "pca" / "f" / "0.html"]:
        text = page.read_text()
        # nothing outside the site: no http(s) links, scripts, styles or images
        assert "http://" not in text and "https://" not in text, page
    assert "Bulge size" in (out / "pca" / "index.html").read_text()
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

        page = next(iter(sorted((out / "matryoshka_sae" / "grids").glob("*.png")))).stem.split("_")[1]
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


def test_missing_results_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dictionary results found"):
        atlas.run(config.from_dict(atlas.Config, {"results": str(tmp_path / "nothing"), "output": str(tmp_path / "o")}))
