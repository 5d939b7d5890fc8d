"""Job ``atlas``: a static HTML site over the results of render and compare.

Data flow::

    {results}/{name}/dictionary.json, activations/{split}/*.parquet, compare.parquet, grids/*.jpg
    {results}/compare/*.png, summary.json (chance level and shares per dictionary)
    (the dictionaries are those of the last compare, when it has run; grids and compare results
    must come from the current activations, activations/{split}/_SUCCESS, or they are refused)
    --> {output}/index.html               dictionaries, metrics, FVU against L0, comparison plots
        {output}/answers.html             per Galaxy Zoo answer, each dictionary's best feature
        {output}/{name}/index.html        sortable, filterable feature table
        {output}/{name}/f/{feature}.html  grid, activation histogram, top galaxies, label alignment
        {output}/assets/                  one CSS and one JS file (no external assets)

Every page opens from disk (file://) or any static host: data is embedded in the pages, images
are copied next to them, nothing is fetched at run time. Pages are written atomically; a rerun
rewrites the HTML (cheap), copies only images that are not there yet, and removes what the
previous build wrote that this one does not (pages of dictionaries or features no longer shown:
``{output}/_atlas_files.json`` lists a build's files; nothing else in the folder is touched).
"""

from __future__ import annotations

import html
import json
import logging
import math
import posixpath
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from galaxysae import activations, compare, config, render, storage

log = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("atlas_assets")
COLOURS = {"pca": "#dd8452", "sae": "#4c72b0", "matryoshka_sae": "#55a868"}
KIND_TEXT = {"pca": "PCA baseline", "sae": "TopK sparse autoencoder",
             "matryoshka_sae": "Matryoshka sparse autoencoder (nested levels)"}
GLOSSARY = [
    ("FVU", "fraction of variance unexplained: how much of the (standardised) embedding the "
            "dictionary fails to reconstruct on the test split; 0 is perfect."),
    ("L0", "average number of features active per galaxy (PCA uses every component, so its L0 is "
           "its number of components). Dictionaries are compared at equal L0, not equal size."),
    ("k (training)", "the number of active features per galaxy the SAE was trained with (BatchTopK: "
                     "on average over a batch); L0 is what it actually uses on the test split."),
    ("Dead fraction", "share of SAE latents that activate on no galaxy at all, neither of the test "
                      "split nor of the training split (a sample of up to 65,536 training galaxies)."),
    ("Frequency", "share of test galaxies on which a feature is active (PCA: score above zero)."),
    ("Best Galaxy Zoo answer", "the vote fraction the feature tracks most significantly (largest z, "
                               "below), over galaxies whose volunteers were asked that question (by at "
                               "least min_votes volunteers: fractions from fewer votes are noise)."),
    ("fewer votes for: …", "the best answer with a negative ρ: the feature is strongest on the "
                           "galaxies with the LOWEST vote fraction for that answer."),
    ("Spearman ρ", "rank correlation between the feature and that vote fraction (sign kept): "
                   "|ρ| near 1 means the feature tracks the volunteers' answer. Tables sort on |ρ|. "
                   "A feature active on few galaxies has a small |ρ| even when its galaxies are exactly "
                   "the most extreme ones (its zeros tie): read its top galaxies' votes too."),
    ("Top galaxies' vote vs all", "the best answer's mean vote fraction over a feature's top galaxies "
     "(the most active; at least 5 of them asked) against its mean over every galaxy asked: "
     "0.85 vs 0.20 reads as \"its galaxies are what the volunteers call that\", the direct "
     "reading of a detector active on few galaxies. Tables sort on the gap."),
    ("z", "atanh|ρ| · √(n − 3), n the galaxies asked: the same |ρ| means much more over 3,000 galaxies "
          "than over 40, where chance alone gives |ρ| ≈ 0.3. Answers asked of different numbers of "
          "galaxies compare on z, so a feature's best answer is its most significant one."),
    ("Chance level, share above chance", "the best z over ~60 vote fractions is well above 0 even "
     "for a feature unrelated to the votes. Chance level: the 95th percentile of the same statistic "
     "with the votes shuffled over the galaxies (shown in |ρ| at a row's n); share above chance: the "
     "share of active features whose best z exceeds it (about 5% if the features knew nothing of "
     "the votes, so with thousands of features some pass by chance)."),
    ("Novelty", "1 − R² of a linear fit of the feature on all vote fractions (R² adjusted for the "
                "number of independent fractions): near 1, the votes do not explain the feature (new, "
                "or noise); near 0, it restates them. A sparse feature scores high here even when it "
                "detects one answer's most extreme galaxies: a line fits a detector badly."),
    ("Level", "Matryoshka nesting level: level 1 is the smallest, coarsest prefix of the dictionary."),
]


@dataclass
class Config:
    """A static, self-contained HTML atlas of every dictionary under a results root."""

    results: str = field(default="results", metadata={"help": "results root written by render/compare (local or s3://)"})
    output: str = field(default="atlas", metadata={"help": "site folder (local or s3://)"})
    title: str = field(default="Galaxy feature atlas", metadata={"help": "site title"})
    top_rows: int = field(default=30, metadata={"help": "top galaxies listed on a feature page"})
    bins: int = field(default=30, metadata={"help": "bins of a feature's activation histogram"})


# ----------------------------------------------------------------------------- small helpers


def esc(v) -> str:
    return html.escape(str(v), quote=True)


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{float(v):.{digits}g}" if abs(float(v)) >= 1e-3 or v == 0 else f"{float(v):.2e}"


def frac(v) -> str:
    """A vote fraction: two decimals."""
    return "–" if v is None or not math.isfinite(float(v)) else f"{float(v):.2f}"


def pct(v) -> str:
    return "–" if v is None or not math.isfinite(float(v)) else f"{100 * float(v):.1f}%"


def page(title: str, crumbs: list[tuple[str, str | None]], body: str, depth: int) -> str:
    up = "../" * depth
    trail = " / ".join(f'<a href="{esc(h)}">{esc(t)}</a>' if h else esc(t) for t, h in crumbs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{up}assets/atlas.css">
</head><body>
<header class="top"><h1>{esc(title)}</h1><div class="crumbs">{trail}</div></header>
<main>
{body}
</main>
<footer>galaxysae atlas · static pages, no server needed · generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</footer>
</body></html>
"""


def _subdirs(url: str) -> list[str]:
    fs, path = storage.fsspec_fs(url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")


def _read_parquet(url: str):
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(url)
    return pq.read_table(path, filesystem=fs)


# ----------------------------------------------------------------------------- SVG charts


def svg_histogram(values: np.ndarray, bins: int, xlabel: str, width: int = 320, height: int = 200) -> str:
    """A bar histogram of ``values[N]`` as inline SVG (counts on the y axis)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return '<p class="dead">no activations on the test split</p>'
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    ml, mr, mt, mb = 36, 8, 8, 34
    w, h = width - ml - mr, height - mt - mb
    top = max(int(counts.max()), 1)
    bw = w / bins
    bars = "".join(
        f'<rect x="{ml + i * bw:.1f}" y="{mt + h - h * c / top:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{h * c / top:.1f}" fill="#3557c8"><title>{edges[i]:.3g} – {edges[i + 1]:.3g}: {c}</title></rect>'
        for i, c in enumerate(counts) if c)
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="activation histogram">'
            f'<line x1="{ml}" y1="{mt + h}" x2="{ml + w}" y2="{mt + h}" stroke="#99a"/>'
            f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + h}" stroke="#99a"/>{bars}'
            f'<text x="{ml}" y="{mt + h + 14}">{lo:.3g}</text>'
            f'<text x="{ml + w}" y="{mt + h + 14}" text-anchor="end">{hi:.3g}</text>'
            f'<text x="{ml + w / 2}" y="{height - 4}" text-anchor="middle">{esc(xlabel)}</text>'
            f'<text x="{ml - 4}" y="{mt + 10}" text-anchor="end">{top}</text>'
            f'<text x="{ml - 4}" y="{mt + h}" text-anchor="end">0</text>'
            f'<text x="10" y="{mt + h / 2}" transform="rotate(-90 10 {mt + h / 2})" text-anchor="middle">galaxies</text>'
            "</svg>")


def fvu_points(doc: dict) -> list[tuple[float, float]]:
    """[(L0, test FVU)] of a dictionary: one per Matryoshka prefix or PCA component count, else one.

    L0 (active features per galaxy), not dictionary size, is the fair x: a 256-latent TopK SAE with
    k = 16 describes a galaxy with 16 numbers, a 32-component PCA with 32. PCA's L0 is its number
    of components.
    """
    m = doc.get("metrics") or {}
    pca = doc.get("kind") == "pca"
    pts = [(lv.get("l0", lv.get("n_latents") if pca else None), lv.get("fvu")) for lv in m.get("levels", [])]
    if not pts and m.get("fvu") is not None:
        pts = [(m.get("l0", doc["n_latents"] if pca else None), m["fvu"])]
    return [(float(x), float(v)) for x, v in pts if x is not None and v is not None]


def svg_levels(series: list[tuple[str, str, list[tuple[float, float]]]], width: int = 620,
               height: int = 300) -> str:
    """FVU against L0 (log2 x axis): one line per dictionary [(name, colour, [(l0, fvu)])]."""
    pts = [p for _, _, s in series for p in s if p[0] > 0 and math.isfinite(p[1])]
    if not pts:
        return ""
    xs = [math.log2(p[0]) for p in pts]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    if x1 == x0:
        x1 = x0 + 1
    ymax = min(1.0, max(p[1] for p in pts) * 1.1) or 1.0
    ml, mr, mt, mb = 48, 150, 10, 40
    w, h = width - ml - mr, height - mt - mb

    def X(n):
        return ml + w * (math.log2(n) - x0) / (x1 - x0)

    def Y(v):
        return mt + h - h * min(v, ymax) / ymax

    parts = [f'<line x1="{ml}" y1="{mt + h}" x2="{ml + w}" y2="{mt + h}" stroke="#99a"/>',
             f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + h}" stroke="#99a"/>']
    for e in range(x0, x1 + 1):
        parts.append(f'<line x1="{X(2 ** e):.1f}" y1="{mt}" x2="{X(2 ** e):.1f}" y2="{mt + h}" stroke="#eef0f5"/>'
                     f'<text x="{X(2 ** e):.1f}" y="{mt + h + 14}" text-anchor="middle">{2 ** e}</text>')
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        v = ymax * frac
        parts.append(f'<text x="{ml - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for i, (name, colour, s) in enumerate(series):
        s = [p for p in s if p[0] > 0 and math.isfinite(p[1])]
        if not s:
            continue
        path = " ".join(f"{'M' if j == 0 else 'L'}{X(n):.1f},{Y(v):.1f}" for j, (n, v) in enumerate(s))
        parts.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{X(n):.1f}" cy="{Y(v):.1f}" r="3" fill="{colour}" data-l0="{n:.4g}" '
                  f'data-fvu="{v:.4g}"><title>{esc(name)}: L0 {n:.1f}, FVU {v:.3f}</title></circle>' for n, v in s]
        parts.append(f'<rect x="{ml + w + 14}" y="{mt + 8 + 18 * i}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{ml + w + 30}" y="{mt + 17 + 18 * i}">{esc(name)}</text>')
    parts.append(f'<text x="{ml + w / 2}" y="{height - 6}" text-anchor="middle">active features per '
                 f'galaxy (L0, log scale)</text>')
    parts.append(f'<text x="12" y="{mt + h / 2}" transform="rotate(-90 12 {mt + h / 2})" '
                 f'text-anchor="middle">test FVU (lower is better)</text>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="FVU against active features per galaxy (L0)">{"".join(parts)}</svg>')


# ----------------------------------------------------------------------------- one dictionary


@dataclass
class Entry:
    name: str
    doc: dict
    features: list[dict]
    grids: set
    histograms: dict
    plots: list[str]
    chance: dict = field(default_factory=dict)  # this dictionary's entry of compare/summary.json
    low_grids: set = field(default_factory=set)  # PCA: components whose lowest scores have a grid


def load_entry(results: str, name: str, cfg: Config, chance: dict | None = None) -> Entry | None:
    """One dictionary's results; ``chance``: its entry of compare/summary.json."""
    folder = storage.join(results, name)
    doc_url = storage.join(folder, "dictionary.json")
    if not storage.exists(doc_url):
        return None
    doc = json.loads(storage.read_bytes(doc_url))
    acts = storage.join(folder, "activations", doc.get("split", "test"))
    stats = _read_parquet(storage.join(acts, "features.parquet")).to_pylist()
    cmp_url = storage.join(folder, "compare.parquet")
    rendered_url = storage.join(folder, "grids", "_rendered.json")
    made_from = {}  # what was made from which activations: {what: (identity, job to rerun)}
    if storage.exists(rendered_url):
        inputs = json.loads(storage.read_bytes(rendered_url)).get("inputs", {}).get("activations", {})
        _check_same_data(folder, doc, "its grids were rendered", inputs, "render")
        made_from["its grids (grids/_rendered.json)"] = (inputs, "render")
    table = None
    if storage.exists(cmp_url):
        table = _read_parquet(cmp_url)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        _check_same_data(folder, doc, "compare.parquet was computed", meta, "compare")
        made_from["compare.parquet"] = (json.loads(meta.get("activations") or "null"), "compare")
    if chance:
        made_from["compare's summary.json and answers.json"] = (chance.get("activations"), "compare")
    _check_same_activations(folder, acts, made_from)
    if table is not None:
        cmp = {r["feature"]: r for r in table.to_pylist()}
        for r in stats:
            c = cmp.get(r["feature"], {})
            for k in ("best_column", "best_answer", "spearman", "abs_spearman", "novelty", "n_valid",
                      "z", "chance_abs_rho", "above_null", "top_columns", "top_votes", "best_column_mean"):
                r[k] = c.get(k)
            # from the column and the sign, so results of older compare runs read right too
            r["best_answer"] = compare.signed_answer(r["best_column"], r["spearman"]) or None
    names = [posixpath.basename(u) for u in storage.listdir(storage.join(folder, "grids"), ".jpg")]
    grids = {int(m.group(1)) for n in names if (m := re.fullmatch(r"feature_(\d{5})\.jpg", n))}
    low_grids = {int(m.group(1)) for n in names if (m := re.fullmatch(r"feature_(\d{5})_low\.jpg", n))}
    hist: dict[int, np.ndarray] = {}
    act_url = storage.join(acts, "activations.parquet")
    if storage.exists(act_url):
        # the histograms need feature and value only: id_str (most of the file) is not read
        t = activations.load_activations(acts, columns=["feature", "value"])
        f = t.column("feature").to_numpy()
        v = t.column("value").to_numpy()
        # activations.compute writes the file sorted by feature; sort only a file that is not
        if not (f[:-1] <= f[1:]).all():
            order = np.argsort(f, kind="stable")
            f, v = f[order], v[order]
        cuts = np.searchsorted(f, np.arange(doc["n_latents"] + 1))
        hist = {i: v[cuts[i]:cuts[i + 1]] for i in range(doc["n_latents"]) if cuts[i + 1] > cuts[i]}
    plots = storage.listdir(storage.join(folder, "plots"), ".png")
    return Entry(name, doc, stats, grids, hist, plots, chance or {}, low_grids)


def _check_same_data(folder: str, doc: dict, what: str, inputs: dict, job: str) -> None:
    """dictionary.json holds the split and embeddings of the last render or compare run; grids or
    a compare table from another split (or other embeddings) would put one set of galaxies'
    numbers beside another's pictures: refused, naming both."""
    for key in ("split", "embeddings"):
        theirs, ours = inputs.get(key), doc.get(key)
        if theirs and ours and theirs.rstrip("/") != ours.rstrip("/"):
            raise ValueError(
                f"{folder}: {what} from {key} {theirs!r}, but the last render/compare run into it "
                f"used {ours!r} (dictionary.json): run render and compare on the same {key} "
                f"(or run {job} again with --{key} {ours})")


def _check_same_activations(folder: str, acts: str, made_from: dict) -> None:
    """The statistics, histograms and top galaxies the pages show are read from the current
    activations (``acts``); grids or compare results made from earlier ones (the dictionary
    retrained in place, or the embeddings rewritten, then only render or only compare run again)
    would show another dictionary's galaxies and votes beside them: refused, naming what is stale
    and the job to run again. Results that recorded no identity (an older render or compare)
    cannot be checked: a warning says so."""
    current = render.activations_identity(acts)
    if current is None:  # no _SUCCESS: nothing to hold them to
        return
    stale, jobs, change = [], [], ""
    for what, (theirs, job) in made_from.items():
        if not theirs or not theirs.get("stamps"):
            log.warning("%s: %s recorded no activations to check against %s (an older %s): run "
                        "`galaxysae %s` again if the dictionary or embeddings changed since",
                        folder, what, acts, job, job)
        elif {k: theirs.get(k) for k in render.ACTIVATION_KEYS} != current:
            stale.append(what)
            jobs.append(job)
            change = change or render.activations_change(theirs, current)
    if stale:
        again = " and ".join(f"`galaxysae {j}`" for j in dict.fromkeys(jobs))
        raise ValueError(
            f"{folder}: {', '.join(stale[:-1]) + ' and ' if len(stale) > 1 else ''}{stale[-1]} "
            f"{'was' if stale == ['compare.parquet'] else 'were'} made from other "
            f"activations than the current ones in {acts} ({change}; a later render or compare "
            f"recomputed them): run {again} again for this dictionary (same config), or the pages "
            f"would show one set of activations' numbers beside another's galaxies")


def compare_summary(results: str) -> dict:
    """compare's summary.json ({name: {null_best_z_p95, share_above_null, ...}}), or {}."""
    url = storage.join(results, "compare", "summary.json")
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}


def _metric_rows(doc: dict) -> str:
    m = doc.get("metrics") or {}
    rows = [("Latents" if doc["kind"] != "pca" else "Components", fmt(doc["n_latents"])),
            (f"Galaxies ({doc.get('split', 'test')} split)", fmt(doc.get("n_galaxies")))]
    if doc.get("kind") == "sae":
        cfg = doc.get("cfg") or {}
        rows.append(("k (training)", f"{cfg.get('k', '–')} ({cfg.get('activation', '')})"))
    rows += [("FVU", fmt(m.get("fvu"))), ("MSE", fmt(m.get("mse"))), ("L0", fmt(m.get("l0"))),
             ("Dead fraction", pct(m["dead_fraction"]) if m.get("dead_fraction") is not None else "–")]
    if isinstance(m.get("pca"), dict) and m["pca"].get("fvu") is not None:
        rows.append((f"PCA FVU at {m['pca'].get('n_components')} comps", fmt(m["pca"]["fvu"])))
    if len(doc.get("levels", [])) > 1:
        rows.append(("Levels", " · ".join(str(v) for v in doc["levels"])))
    return "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows)


def feature_label(doc: dict, f: int) -> str:
    return f"PC {f + 1}" if doc["kind"] == "pca" else f"feature {f}"


def table_page(e: Entry, cfg: Config) -> str:
    doc = e.doc
    nested = len(doc.get("levels", [])) > 1
    rows = []
    for r in e.features:
        f = int(r["feature"])
        rows.append({"feature": f, "label": feature_label(doc, f), "level": r["level"],
                     "frequency": r["frequency"],
                     "mean_active": None if r["mean_active"] is None or not math.isfinite(r["mean_active"]) else round(r["mean_active"], 5),
                     "max": None if r["max"] is None or not math.isfinite(r["max"]) else round(r["max"], 5),
                     "best_answer": r.get("best_answer"), "best_column": r.get("best_column"),
                     "spearman": _num(r.get("spearman")), "abs_spearman": _num(r.get("abs_spearman")),
                     "novelty": _num(r.get("novelty")), "grid": f in e.grids,
                     **_table_votes(r, cfg.top_rows)})
    data = json.dumps(rows, separators=(",", ":")).replace("</", "<\\/")
    level_ctl = ""
    if nested:
        opts = "".join(f'<option value="{i}">level {i} (≤ {n} latents)</option>' for i, n in enumerate(doc["levels"], 1))
        level_ctl = f'<label>Level <select id="level"><option value="">all</option>{opts}</select></label>'
    sort = "feature" if doc["kind"] == "pca" else "frequency"  # table.js: ascending on feature id
    heads = [("feature", "Feature", ""), *([("level", "Level", "num")] if nested else []),
             ("frequency", "Frequency", "num"), ("mean_active", "Mean when active", "num"),
             ("max", "Max", "num"), ("best_answer", "Best Galaxy Zoo answer", ""),
             ("spearman", "Spearman ρ (sorts on |ρ|)", "num"),
             ("top_vote", "Top galaxies' vote vs all (sorts on the gap)", "num"), ("novelty", "Novelty", "num")]
    th = "".join(f'<th data-key="{k}" class="{c}">{esc(t)}</th>' for k, t, c in heads)
    alive = sum(1 for r in e.features if r["frequency"] > 0)
    body = f"""
<p class="lead">{esc(KIND_TEXT.get(doc['family'], doc['kind']))} with {doc['n_latents']:,} latents;
{alive:,} active on the {esc(doc.get('split', 'test'))} split ({doc.get('n_galaxies', 0):,} galaxies).
Click a column to sort, type an answer (e.g. <i>spiral</i>, <i>edge-on</i>, <i>merger</i>) to filter,
open a feature for its galaxies. Spearman ρ is with the best-matching vote fraction (negative: the
feature is strongest where the fewest volunteers gave that answer, shown as <i>fewer votes for</i>);
top galaxies' vote = that answer's mean vote fraction over the feature's top {cfg.top_rows} galaxies
against all galaxies asked (the direct reading of a feature active on few galaxies, whose ρ stays
small); novelty = 1 − adjusted R² of a linear fit on all vote fractions.{_chance_line(e)}</p>
<div class="controls">
<label>Search <input type="search" id="search" placeholder="answer or feature id"></label>
<label>min |ρ| <input type="number" id="min-rho" min="0" max="1" step="0.05" value="0"></label>
{level_ctl}
<label><input type="checkbox" id="only-grid"> with grid only</label>
<label><input type="checkbox" id="hide-dead" checked> hide inactive</label>
<span class="count" id="count"></span>
</div>
<table class="features"><thead><tr>{th}</tr></thead>
<tbody id="feature-body" data-sort="{sort}"></tbody></table>
<script id="feature-data" type="application/json">{data}</script>
<script src="../assets/table.js"></script>
"""
    return page(f"{cfg.title}: {e.name}", [("atlas", "../index.html"), (e.name, None)], body, 1)


def _chance_rho_example(e: Entry, z95: float) -> str:
    """The chance level in |rho| over all the split's galaxies (the most asked questions)."""
    rho = compare.chance_rho(z95, e.doc.get("n_galaxies") or 0)
    return f"|ρ| {fmt(rho, 2)} over all {fmt(e.doc.get('n_galaxies'))} galaxies" if rho is not None else ""


def _chance_line(e: Entry) -> str:
    z95, share = e.chance.get("null_best_z_p95"), e.chance.get("share_above_null")
    old = e.chance.get("null_best_abs_rho_p95")
    if z95 is None and old is not None:  # compare/summary.json of an older compare
        return (f" Chance level: |ρ| {fmt(old, 2)} (95th percentile with the votes shuffled, from an "
                f"older compare: rerun compare for levels that allow for how many galaxies each "
                f"question was asked of); {pct(share)} of the active features are above it.")
    if z95 is None:
        return ""
    return (f" Chance level: z {fmt(z95, 2)} (95th percentile with the votes shuffled; "
            f"{_chance_rho_example(e, z95)}, more for questions asked of fewer); "
            f"{pct(share)} of the active features are above it.")


def _alignment_rows(e: Entry) -> str:
    """Card rows: shares of the active features (not counts: dictionaries differ in size), above
    chance first. The |rho| share is counted here when compare/summary.json lacks this
    dictionary (a later compare run into the same results folder rewrote it without)."""
    z95, share = e.chance.get("null_best_z_p95"), e.chance.get("share_above_null")
    aligned = e.chance.get("share_abs_rho_ge_0_5")
    active = [r for r in e.features if r["frequency"] > 0]
    if aligned is None and active and any(r.get("abs_spearman") is not None for r in active):
        aligned = sum(1 for r in active if (r.get("abs_spearman") or 0) >= 0.5) / len(active)
    old = e.chance.get("null_best_abs_rho_p95")  # an older compare's level, in |rho|
    rows = [(f"Share of features above chance (z > {fmt(z95, 2)})" if z95 is not None
             else f"Share of features above chance (|ρ| > {fmt(old, 2)})" if old is not None
             else "Share of features above chance", pct(share) if share is not None else "–"),
            ("Share with |ρ| ≥ 0.5", pct(aligned) if aligned is not None else "–")]
    return "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows)


# top galaxies asked the best answer's question, at least, for the table's "top galaxies' vote"
MIN_TOP_ASKED = 5


def _top_vote_mean(votes: dict, top_ids: list[str]) -> tuple[float | None, int, int]:
    """(mean vote fraction over the asked of ``top_ids``, how many of them compare saw, how many
    were asked); None for the mean when none was."""
    shown = [votes[i] for i in top_ids if i in votes]
    asked = [v for v in shown if v is not None]
    return (sum(asked) / len(asked) if asked else None), len(shown), len(asked)


def _top_votes(r: dict, n: int) -> tuple[tuple[str, str], dict] | None:
    """(the card's line, {id_str: vote fraction or None where not asked}) for the ``n`` top
    galaxies and the feature's best answer, from compare's top_votes, or None (no answer, or
    results of an older compare)."""
    votes = dict(json.loads(r.get("top_votes") or "[]"))
    mean_top, shown, asked = _top_vote_mean(votes, r["top_ids"][:n])
    if not r.get("best_column") or not shown:
        return None
    line = (f"Votes for {compare.readable(r['best_column'])}",
            f"mean {frac(mean_top) if mean_top is not None else '–'} over its top {shown} galaxies "
            f"({asked} asked); {frac(r.get('best_column_mean'))} over all galaxies asked")
    return line, votes


def _table_votes(r: dict, n: int) -> dict:
    """The feature table's "top galaxies' vote" columns: the mean vote for the best answer over
    the top ``n`` galaxies (at least MIN_TOP_ASKED of them asked) beside its mean over all, and
    the gap it sorts on. The direct reading of a sparse detector, whose rho stays small."""
    base = _num(r.get("best_column_mean"))
    mean_top, _, asked = (_top_vote_mean(dict(json.loads(r.get("top_votes") or "[]")), r["top_ids"][:n])
                          if r.get("best_column") else (None, 0, 0))
    if mean_top is None or base is None or asked < MIN_TOP_ASKED:
        return {"top_vote": None, "all_vote": None, "abs_top_gap": None}
    return {"top_vote": round(mean_top, 4), "all_vote": base, "abs_top_gap": round(abs(mean_top - base), 4)}


def _num(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(float(v), 4)


def feature_page(e: Entry, r: dict, cfg: Config, prev_f, next_f) -> str:
    doc = e.doc
    f = int(r["feature"])
    label = feature_label(doc, f)
    if f in e.grids:
        grid = (f'<img class="grid-img" src="../grids/feature_{f:05d}.jpg" alt="the {len(r["top_ids"][:cfg.top_rows])} '
                f'galaxies that excite {esc(label)} most, with their activations">')
    else:
        grid = (f'<div class="missing">No grid rendered for {esc(label)} yet.<br>'
                f'<code>galaxysae render --features {f} ...</code> renders it.</div>')
    signed = doc["kind"] == "pca"
    if f in e.low_grids:
        low = list(zip(r.get("bottom_ids") or [], r.get("bottom_values") or []))[:cfg.top_rows]
        rows = "".join(f"<tr><td class='num'>{i + 1}</td><td><code>{esc(gid)}</code></td>"
                       f"<td class='num'>{v:.4g}</td></tr>" for i, (gid, v) in enumerate(low))
        grid += (f'<h2>The other end: lowest scores</h2>'
                 f'<img class="grid-img" src="../grids/feature_{f:05d}_low.jpg" alt="the {len(low)} '
                 f'galaxies with the lowest scores on {esc(label)}">'
                 f"<table class='plain'><tr><th>#</th><th>id_str</th><th>score</th></tr>{rows}</table>")
    vals = e.histograms.get(f, np.array([]))
    hist = svg_histogram(vals, cfg.bins, "score" if signed else "activation (non-zero only)")
    stats = [("Frequency", f"{pct(r['frequency'])} of galaxies" + (" (score > 0)" if signed else "")),
             ("Mean when active", fmt(r["mean_active"])), ("Max", fmt(r["max"]))]
    if len(doc.get("levels", [])) > 1:
        stats.append(("Matryoshka level", f"{r['level']} (first {doc['levels'][r['level'] - 1]:,} latents)"))
    if r.get("best_answer"):
        rho = _num(r.get("spearman"))
        stats += [("Best Galaxy Zoo answer", r["best_answer"] + (f" (ρ {rho:+.2f})" if rho is not None else "")),
                  ("Spearman ρ", f"{fmt(r.get('spearman'), 2)} (over {fmt(r.get('n_valid'))} galaxies "
                                 f"asked; z {fmt(r.get('z'), 2)})")]
        if r.get("chance_abs_rho") is not None and r.get("above_null") is not None:
            stats.append(("Chance level (votes shuffled)",
                          f"|ρ| {fmt(r['chance_abs_rho'], 2)} over {fmt(r.get('n_valid'))} galaxies: this "
                          f"feature is {'above' if r['above_null'] else 'not above'} it"))
        stats.append(("Novelty (1 − adjusted R²)", fmt(r.get("novelty"), 2)))
    votes = _top_votes(r, cfg.top_rows)
    if votes:
        stats.append(votes[0])
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in stats)
    top3 = json.loads(r.get("top_columns") or "[]")
    corr = "".join(f"<tr><td>{esc(compare.signed_answer(col, rho))}</td><td class='num'>{rho:+.2f}</td></tr>"
                   for col, _, rho in top3)
    corr_html = (f"<h2>Closest Galaxy Zoo answers</h2><table class='plain'><tr><th>answer</th><th>ρ</th></tr>{corr}</table>"
                 if corr else "")
    by_id = votes[1] if votes else {}
    tops = []
    for i, (gid, v) in enumerate(zip(r["top_ids"][:cfg.top_rows], r["top_values"][:cfg.top_rows])):
        cells = [str(i + 1), f"<code>{esc(gid)}</code>", f"{v:.4g}"]
        if by_id:
            cells.append("–" if gid not in by_id else "not asked" if by_id[gid] is None else frac(by_id[gid]))
        tops.append("<tr>" + "".join(f"<td class='num'>{c}</td>" if j > 1 else f"<td>{c}</td>"
                                     for j, c in enumerate(cells)) + "</tr>")
    tops = "".join(tops)
    votes_head = f"<th>votes: {esc(compare.readable(r['best_column']))}</th>" if by_id else ""
    nav = (f'<div class="nav"><span>{f"<a href={chr(34)}{prev_f}.html{chr(34)}>← {esc(feature_label(doc, prev_f))}</a>" if prev_f is not None else ""}</span>'
           f'<a href="../index.html">all features of {esc(e.name)}</a>'
           f'<span>{f"<a href={chr(34)}{next_f}.html{chr(34)}>{esc(feature_label(doc, next_f))} →</a>" if next_f is not None else ""}</span></div>')
    body = f"""{nav}
<div class="feature-layout">
<div>{grid}</div>
<div>
<div class="card"><h3>{esc(label)}</h3><div class="kind">{esc(KIND_TEXT.get(doc['family'], doc['kind']))}</div>
<dl class="metrics">{dl}</dl></div>
<h2>Activation histogram</h2>
<div class="card">{hist}</div>
{corr_html}
<h2>Top galaxies</h2>
<table class="plain"><tr><th>#</th><th>id_str</th><th>activation</th>{votes_head}</tr>{tops}</table>
</div>
</div>
"""
    return page(f"{e.name}: {label}", [("atlas", "../../index.html"), (e.name, "../index.html"), (label, None)], body, 2)


def answers_page(entries: list[Entry], answers: dict, cfg: Config) -> str:
    """One row per Galaxy Zoo answer: the feature of each dictionary that tracks it best (|rho|),
    linked to its page, dimmed where no better than chance (the same best with the votes
    shuffled). The way in for "which feature finds bars?" and the fairest SAE-vs-PCA summary."""
    shown = [e for e in entries if e.name in answers]
    by_col = {name: {r["column"]: r for r in rows} for name, rows in answers.items()}
    columns = list(dict.fromkeys(r["column"] for e in shown for r in answers[e.name]))
    heads = "".join(f"<th>{esc(e.name)}</th>" for e in shown)
    body_rows = []
    for col in columns:
        first = next(by_col[e.name][col] for e in shown if col in by_col[e.name])
        cells = []
        for e in shown:
            r = by_col[e.name].get(col)
            if r is None:
                cells.append("<td>–</td>")
                continue
            label = f"{feature_label(e.doc, r['feature'])} (ρ {r['spearman']:+.2f})"
            chance = (f' title="chance level: |ρ| {fmt(r["chance_abs_rho"], 2)} over these galaxies"'
                      if r.get("chance_abs_rho") is not None else "")
            cells.append(f'<td class="{"" if r["above_null"] else "weak"}"{chance}><a href="{esc(e.name)}/f/'
                         f'{r["feature"]}.html">{esc(label)}</a></td>')
        level = next((r.get("chance_abs_rho") for e in shown if (r := by_col[e.name].get(col))), None)
        body_rows.append(f"<tr><td>{esc(first['question'])}</td><td>{esc(first['answer'].split(' → ')[-1])}"
                         f"</td><td class='num'>{first['n_valid']:,}</td><td class='num'>{fmt(level, 2)}</td>"
                         f"{''.join(cells)}</tr>")
    counts = "; ".join(
        f"{esc(e.name)}: {sum(r['above_null'] for r in answers[e.name])} of {len(answers[e.name])}"
        for e in shown)
    body = f"""<p class="lead">For every Galaxy Zoo answer, the feature of each dictionary whose activation
tracks its vote fraction best (largest |Spearman ρ|, over the galaxies asked that question by enough
volunteers; a negative ρ: the feature is strongest where the fewest volunteers gave that answer).
Dimmed: no better than chance, the 95th percentile of the same best with the votes shuffled over
the galaxies; in |ρ| it depends on how many galaxies were asked (column "chance |ρ|": the first
dictionary's level; a question asked of few galaxies needs a much larger |ρ|). Answers with a
feature above chance: {counts}.</p>
<table class="plain answers"><thead><tr><th>Question</th><th>Answer</th><th class="num">galaxies asked</th>
<th class="num">chance |ρ|</th>{heads}</tr></thead>
<tbody>{''.join(body_rows)}</tbody></table>"""
    return page(f"{cfg.title}: features by Galaxy Zoo answer", [("atlas", "index.html"), ("by answer", None)], body, 0)


def index_page(entries: list[Entry], results: str, compare_plots: list[str], cfg: Config,
               has_answers: bool = False) -> str:
    cards, series = [], []
    for e in entries:
        colour = COLOURS.get(e.doc["family"], "#777")
        points = fvu_points(e.doc)
        if points:
            series.append((e.name, colour, points))
        alive = sum(1 for r in e.features if r["frequency"] > 0)
        plots = "".join(f'<div class="figure"><a href="{esc(e.name)}/plots/{esc(posixpath.basename(p))}">'
                        f'<img src="{esc(e.name)}/plots/{esc(posixpath.basename(p))}" '
                        f'alt="{esc(posixpath.basename(p))}"></a></div>' for p in e.plots)
        cards.append(f"""<div class="card"><div class="kind"><span class="swatch" style="background:{colour}"></span>{esc(KIND_TEXT.get(e.doc['family'], e.doc['kind']))}</div>
<h3><a href="{esc(e.name)}/index.html">{esc(e.name)}</a></h3>
<dl class="metrics">{_metric_rows(e.doc)}
<dt>Active features</dt><dd>{alive:,} of {e.doc['n_latents']:,}</dd>
{_alignment_rows(e)}
<dt>Grids rendered</dt><dd>{len(e.grids):,}</dd></dl>
<a href="{esc(e.name)}/index.html">Browse the features →</a>{plots}</div>""")
    curve = svg_levels(series)
    curve_html = (f'<h2>Reconstruction vs active features per galaxy</h2><div class="figure">{curve}<div class="caption">'
                  "Test FVU against L0, the average number of features active per galaxy: each nested "
                  "Matryoshka prefix, PCA with its first k components (L0 = k), and each TopK SAE (one "
                  "point). At equal L0 both describe a galaxy with as many numbers. Lower is better.</div></div>"
                  ) if curve else ""
    captions = {"distributions.png": "Left: how strongly each feature tracks its best Galaxy Zoo answer; dashed: "
                                     "the same with the votes shuffled over the galaxies (chance). Middle: how much "
                                     "of each feature the votes cannot explain (sparse features score high here "
                                     "and low on |ρ| even as sharp detectors: see the glossary). Right: both, "
                                     "per feature."}
    figs = "".join(f'<div class="figure"><img src="compare/{esc(p)}" alt="{esc(p)}"><div class="caption">'
                   f'{esc(captions.get(p, "Per Matryoshka level: level 1 is the coarsest prefix; dashed: PCA median; dotted: chance level in |ρ| for an answer asked of every galaxy."))}'
                   f"</div></div>" for p in compare_plots)
    figs_html = f"<h2>Alignment with Galaxy Zoo votes</h2>{figs}" if figs else ""
    gloss = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in GLOSSARY)
    prov = next((e.doc.get("provenance") for e in entries if e.doc.get("provenance")), {}) or {}
    note = ""
    if prov.get("encoder"):
        rev = f" @ {prov['encoder_revision'][:10]}" if prov.get("encoder_revision") else ""
        note += (f'<p class="lead">Embeddings: <code>{esc(prov["encoder"])}{esc(rev)}</code>, '
                 f'{esc(prov.get("image_size", "?"))} px, {esc(prov.get("precision", ""))}.</p>')
    stand_in = {e.doc.get("provenance", {}).get("encoder_stand_in") for e in entries} - {None, ""}
    if stand_in:
        note += (f'<p class="note">These embeddings come from a stand-in encoder ({esc(", ".join(sorted(stand_in)))}): '
                 "the features describe it, not Zoobot.</p>")
    body = f"""<p class="lead">Sparse dictionaries of galaxy image embeddings, side by side with a PCA baseline.
Each feature's page shows the galaxies that excite it most, its activation histogram and the Galaxy
Zoo answers it tracks. Results from <code>{esc(results)}</code>.</p>{note}
{'<p class="lead"><a href="answers.html">Find a morphology →</a> the feature of each dictionary that best tracks each Galaxy Zoo answer (bars, spiral arms, mergers, edge-on disks, ...).</p>' if has_answers else ''}
<h2>Dictionaries</h2><div class="cards">{''.join(cards)}</div>
{curve_html}
{figs_html}
<h2>How to read the numbers</h2><dl class="glossary">{gloss}</dl>
"""
    return page(cfg.title, [("atlas", None)], body, 0)


class Site:
    """The files one build writes under ``out`` (relative paths); :meth:`finish` removes the
    files the previous build listed and this one did not write, then lists this build's."""

    MANIFEST = "_atlas_files.json"

    def __init__(self, out: str):
        self.out, self.files = out, set()

    def url(self, rel: str) -> str:
        self.files.add(rel)
        return storage.join(self.out, rel)

    def put(self, rel: str, data: bytes) -> None:
        storage.write_bytes(self.url(rel), data)

    def finish(self) -> list[str]:
        manifest = storage.join(self.out, self.MANIFEST)
        try:
            before = set(json.loads(storage.read_bytes(manifest))) if storage.exists(manifest) else set()
        except ValueError as exc:
            raise ValueError(f"{manifest}: not the file list of an earlier atlas build ({exc}); "
                             "remove it (files of that build are then left in place)") from None
        gone = sorted(before - self.files)
        for rel in gone:
            storage.remove(storage.join(self.out, rel))
        if gone and not storage.is_remote(self.out):
            # folders left empty (a dictionary's pages): deepest first
            for d in sorted({p for rel in gone for p in Path(rel).parents if str(p) != "."},
                            key=lambda p: -len(p.parts)):
                folder = Path(storage.local_path(self.out)) / d
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        storage.write_bytes(manifest, json.dumps(sorted(self.files), indent=0).encode())
        return gone


def run(cfg: Config) -> str:
    t0 = time.time()
    # a relative output in a `ray job submit` copy of the checkout is refused (Ray deletes it)
    cfg = config.absolute_paths(cfg, inputs=("results",), outputs=("output",))
    out = cfg.output.rstrip("/")
    storage.check_writable(out)  # wrong credentials / unreachable store: fail first
    names = [n for n in _subdirs(cfg.results) if not n.startswith(("_", ".")) and n != "compare"]
    chance = compare_summary(cfg.results)
    compared = [n for n in chance if not n.startswith("_")]
    if compared:
        # the dictionaries of the last compare: a folder it did not cover (an earlier run's, or one
        # rendered since) has no chance level and no answers in compare/summary.json, answers.json
        left = [n for n in names if n not in compared]
        if left:
            log.warning("atlas: leaving out %s: the last compare (%s, covering %s) did not cover "
                        "them; run `galaxysae compare` with them among its dictionaries to show them",
                        ", ".join(left), storage.join(cfg.results, "compare", "summary.json"),
                        ", ".join(compared))
        names = [n for n in names if n in compared]
    entries = [e for e in (load_entry(cfg.results, n, cfg, chance.get(n)) for n in names) if e is not None]
    if not entries:
        raise FileNotFoundError(f"{cfg.results}: no dictionary results found (run `galaxysae render` "
                                "and `galaxysae compare` first)")
    order = {"sae": 0, "matryoshka_sae": 1, "pca": 2}
    entries.sort(key=lambda e: (order.get(e.doc["family"], 9), e.name))
    site = Site(out)
    for asset in ("atlas.css", "table.js"):
        site.put(f"assets/{asset}", (ASSETS / asset).read_bytes())
    compare_dir = storage.join(cfg.results, "compare")
    compare_plots = [posixpath.basename(u) for u in storage.listdir(compare_dir, ".png")]
    compare_plots.sort(key=lambda p: (p != "distributions.png", p))
    for p in compare_plots:
        site.put(f"compare/{p}", storage.read_bytes(storage.join(compare_dir, p)))
    n_pages = 0
    for e in entries:
        folder = storage.join(cfg.results, e.name)
        grid_files = [f"feature_{f:05d}.jpg" for f in sorted(e.grids)]
        grid_files += [f"feature_{f:05d}_low.jpg" for f in sorted(e.low_grids)]
        for g in grid_files:
            storage.copy_if_newer(storage.join(folder, "grids", g), site.url(f"{e.name}/grids/{g}"))
        for p in e.plots:
            site.put(f"{e.name}/plots/{posixpath.basename(p)}", storage.read_bytes(p))
        site.put(f"{e.name}/index.html", table_page(e, cfg).encode())
        alive = [r for r in e.features if r["frequency"] > 0 or int(r["feature"]) in e.grids]
        for i, r in enumerate(alive):
            prev_f = int(alive[i - 1]["feature"]) if i > 0 else None
            next_f = int(alive[i + 1]["feature"]) if i + 1 < len(alive) else None
            site.put(f"{e.name}/f/{int(r['feature'])}.html",
                     feature_page(e, r, cfg, prev_f, next_f).encode())
            n_pages += 1
    answers_url = storage.join(compare_dir, "answers.json")
    answers = json.loads(storage.read_bytes(answers_url)) if storage.exists(answers_url) else {}
    if answers:
        site.put("answers.html", answers_page(entries, answers, cfg).encode())
    index = site.url("index.html")
    storage.write_bytes(index, index_page(entries, cfg.results, compare_plots, cfg, bool(answers)).encode())
    gone = site.finish()
    if gone:
        log.info("atlas: removed %d files of the previous build no longer shown (%s)", len(gone),
                 config.listed(gone, ", "))
    config.save(cfg, out, "atlas.toml")
    log.info("atlas: %d dictionaries, %d feature pages in %.1f s", len(entries), n_pages, time.time() - t0)
    where = index if storage.is_remote(index) else str(Path(index).resolve())
    print(f"atlas: {where}")
    return where
