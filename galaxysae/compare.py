"""Job ``compare``: how well each feature lines up with the Galaxy Zoo vote fractions.

Data flow::

    dictionary + {embeddings}/{split} --activations (cached, shared with render)--> codes[N, M]
    dataset shards (id_str + every *_fraction column only) --join on id_str--> labels[N, C]
    --> per feature: max |Spearman| over label columns (and which), novelty = 1 - R^2
    --> {results}/{name}/compare.parquet + .csv, {results}/compare/ (all dictionaries, plots)

Missing fractions. A Galaxy Zoo question is only asked when an earlier answer leads to it (e.g.
"spiral arms?" only for face-on disks), so its fractions are NaN for the other galaxies. They are
never filled in:

- Spearman: each column is correlated over the galaxies that were asked that question only
  (pairwise complete), and only when at least ``min_valid`` were; ``n_valid`` is reported.
- Novelty: the regression gets, per question, an "asked" indicator and each fraction multiplied by
  it. That is a separate intercept for "not asked" plus the fraction's slope among the galaxies
  that were asked: the missing values do not enter the fit. Columns constant over the split are
  dropped. Novelty uses the adjusted R^2 (in-sample R^2 corrected for the number of predictors,
  which matters on small splits); the plain in-sample R^2 of the original figure is kept as ``r2``.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from galaxysae import config, schema, storage
from galaxysae.render import DictionaryInputs, activations_for, folder_names, write_summary

log = logging.getLogger(__name__)

QUESTION_TEXT = {
    "smooth-or-featured-euclid": "Smooth or featured?",
    "disk-edge-on-euclid": "Edge-on disk?",
    "has-spiral-arms-euclid": "Spiral arms?",
    "bar-euclid": "Bar?",
    "bulge-size-euclid": "Bulge size",
    "how-rounded-euclid": "How rounded?",
    "edge-on-bulge-euclid": "Edge-on bulge shape",
    "spiral-winding-euclid": "Spiral winding",
    "spiral-arm-count-euclid": "Number of spiral arms",
    "merging-euclid": "Merging?",
    "clumps-euclid": "Clumps?",
    "problem-euclid": "Problem?",
    "artifact-euclid": "Artifact type",
}


def readable(column: str | None) -> str:
    """``has-spiral-arms-euclid_yes_fraction`` -> ``Spiral arms? → yes``."""
    if not column:
        return ""
    for q, answers in schema.QUESTIONS.items():
        for a in answers:
            if column == schema.fraction_column(q, a):
                return f"{QUESTION_TEXT.get(q, q)} → {a.replace('-', ' ')}"
    return column


@dataclass
class Config(DictionaryInputs):
    """Label alignment of every feature of every dictionary with the Galaxy Zoo vote fractions."""

    min_valid: int = field(default=20, metadata={"help": "fewest galaxies asked a question for its columns to be correlated"})

    def validate(self) -> None:
        super().validate()
        if self.min_valid < 3:
            raise ValueError(f"key 'min_valid' must be >= 3, got {self.min_valid}")


# ----------------------------------------------------------------------------- labels


def read_labels(dataset: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """-> (ids[N], fractions[N, C] float64 with NaN where not asked, column names[C])."""
    import pyarrow.parquet as pq

    from galaxysae import sources

    wanted = schema.fraction_columns()
    ids, blocks = [], []
    for shard in [s for s in sources.resolve(dataset, splits=[split]) if s.split == split]:
        fs, path = storage.arrow_fs(shard.url)
        names = set(pq.read_schema(path, filesystem=fs).names)
        missing = [c for c in wanted if c not in names]
        if "id_str" not in names or missing:
            raise ValueError(f"{shard.url}: lacks label columns {(['id_str'] if 'id_str' not in names else []) + missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        t = pq.read_table(path, filesystem=fs, columns=["id_str", *wanted])
        ids += t.column("id_str").to_pylist()
        blocks.append(np.column_stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                                       for c in wanted]))
    if not ids:
        raise FileNotFoundError(f"dataset {dataset}: no shards for split {split!r}")
    return ids, np.concatenate(blocks), wanted


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=0, method="average")


def _standardise(a: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    norm = np.sqrt((a ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, a / norm, np.nan)


def spearman(codes: np.ndarray, labels: np.ndarray, min_valid: int) -> tuple[np.ndarray, np.ndarray]:
    """codes[N, M], labels[N, C] (NaN = not asked) -> (rho[M, C], n_valid[C]).

    Columns sharing a missingness pattern (the answers of one question) are ranked together.
    rho is NaN where a column has fewer than ``min_valid`` galaxies or either side is constant.
    """
    n, m = codes.shape
    c = labels.shape[1]
    rho = np.full((m, c), np.nan)
    valid = ~np.isnan(labels)
    n_valid = valid.sum(0)
    patterns: dict[bytes, list[int]] = {}
    for j in range(c):
        patterns.setdefault(np.packbits(valid[:, j]).tobytes(), []).append(j)
    for cols in patterns.values():
        mask = valid[:, cols[0]]
        if mask.sum() < min_valid:
            continue
        rf = _standardise(_ranks(codes[mask]))  # [n, M]; a column of NaN = constant feature
        rl = _standardise(_ranks(labels[mask][:, cols]))  # [n, k]
        block = np.nan_to_num(rf).T @ np.nan_to_num(rl)
        block[np.isnan(rf[0]), :] = np.nan
        block[:, np.isnan(rl[0])] = np.nan
        rho[:, cols] = block
    return rho, n_valid


def design_matrix(labels: np.ndarray, columns: list[str]) -> tuple[np.ndarray, list[str]]:
    """Missing-indicator coding (see module docstring): [asked_q, asked_q * fraction_qa, ...]."""
    parts, names = [], []
    for q, answers in schema.QUESTIONS.items():
        idx = [columns.index(schema.fraction_column(q, a)) for a in answers
               if schema.fraction_column(q, a) in columns]
        if not idx:
            continue
        asked = ~np.isnan(labels[:, idx[0]])
        parts.append(asked.astype(np.float64))
        names.append(f"{q} asked")
        for j in idx:
            parts.append(np.where(asked, np.nan_to_num(labels[:, j]), 0.0))
            names.append(columns[j])
    x = np.column_stack(parts)
    keep = x.std(0) > 0
    return x[:, keep], [nm for nm, k in zip(names, keep) if k]


def novelty(codes: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes[N, M], design x[N, P] -> (novelty[M], r2[M]); NaN for a constant feature.

    ``r2`` is the plain in-sample R^2 of the least-squares fit; novelty is 1 - adjusted R^2
    (clipped to [0, 1]): with ~60 predictors and a few hundred galaxies, plain R^2 credits the
    votes with variance they only fit by chance.
    """
    n, p = x.shape
    a = np.column_stack([np.ones(n), x])
    coef, *_ = np.linalg.lstsq(a, codes.astype(np.float64), rcond=None)
    resid = codes - a @ coef
    ss_tot = ((codes - codes.mean(0)) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - (resid ** 2).sum(0) / ss_tot, np.nan)
    adj = 1.0 - (1.0 - r2) * (n - 1) / max(n - p - 1, 1)
    return np.where(ss_tot > 0, 1.0 - np.clip(adj, 0.0, 1.0), np.nan), r2


def align(codes: np.ndarray, labels: np.ndarray, columns: list[str], min_valid: int) -> dict:
    """Per feature: best |Spearman| column (signed rho, its n_valid), top-3 columns, novelty."""
    rho, n_valid = spearman(codes, labels, min_valid)
    absrho = np.abs(rho)
    has = ~np.isnan(absrho).all(1)
    best = np.where(has, np.nanargmax(np.where(np.isnan(absrho), -1, absrho), axis=1), -1)
    x, _ = design_matrix(labels, columns)
    nov, r2 = novelty(codes, x)
    top3 = []
    for f in range(codes.shape[1]):
        if not has[f]:
            top3.append("[]")
            continue
        order = np.argsort(-np.nan_to_num(absrho[f], nan=-1))[:3]
        top3.append(json.dumps([[columns[j], readable(columns[j]), round(float(rho[f, j]), 4)]
                                for j in order if not np.isnan(rho[f, j])]))
    return {
        "best_column": [columns[b] if b >= 0 else None for b in best],
        "best_answer": [readable(columns[b]) if b >= 0 else None for b in best],
        "spearman": [float(rho[f, b]) if b >= 0 else np.nan for f, b in enumerate(best)],
        "abs_spearman": [float(absrho[f, b]) if b >= 0 else np.nan for f, b in enumerate(best)],
        "n_valid": [int(n_valid[b]) if b >= 0 else 0 for b in best],
        "novelty": nov.tolist(),
        "r2": r2.tolist(),
        "top_columns": top3,
    }


# ----------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plots(tables: dict, out: str) -> list[str]:
    """Distributions of max |Spearman| and novelty: dictionaries side by side, and per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colours = {"pca": "#dd8452", "sae": "#4c72b0", "matryoshka_sae": "#55a868"}
    fig, ax = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    bins = np.linspace(0, 1, 21)
    for name, t in tables.items():
        alive = np.asarray(t["frequency"]) > 0
        rho = np.asarray(t["abs_spearman"], float)[alive]
        nov = np.asarray(t["novelty"], float)[alive]
        c = colours.get(t["family"], None)
        for a, v in ((ax[0], rho), (ax[1], nov)):
            v = v[~np.isnan(v)]
            if len(v):
                a.hist(v, bins=bins, density=True, histtype="step", lw=2, color=c,
                       label=f"{name} ({len(v)} features)")
        ok = ~np.isnan(rho) & ~np.isnan(nov)
        ax[2].scatter(rho[ok], nov[ok], s=8, alpha=0.5, color=c, label=name)
    ax[0].set(xlabel="max |Spearman ρ| with any Galaxy Zoo vote fraction", ylabel="density",
              title="Alignment with Galaxy Zoo answers")
    ax[1].set(xlabel="novelty = 1 − adjusted R² (linear fit on all vote fractions)", ylabel="density",
              title="What the votes do not explain")
    ax[2].set(xlabel="max |Spearman ρ|", ylabel="novelty", title="Per feature", xlim=(0, 1), ylim=(0, 1.02))
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    storage.write_bytes(storage.join(out, "distributions.png"), _png(fig))
    written.append("distributions.png")
    nested = {k: t for k, t in tables.items() if len(set(t["level"])) > 1}
    for name, t in nested.items():
        levels = sorted(set(t["level"]))
        fig, ax = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
        for a, key, label in ((ax[0], "abs_spearman", "max |Spearman ρ|"), (ax[1], "novelty", "novelty = 1 − adjusted R²")):
            data = []
            for lv in levels:
                v = np.asarray([x for x, l_, fr in zip(t[key], t["level"], t["frequency"]) if l_ == lv and fr > 0], float)
                data.append(v[~np.isnan(v)])
            a.boxplot([d if len(d) else [np.nan] for d in data], tick_labels=[str(lv) for lv in levels])
            pca = [k for k, tt in tables.items() if tt["family"] == "pca"]
            if pca:
                v = np.asarray(tables[pca[0]][key], float)
                a.axhline(np.nanmedian(v), color=colours["pca"], ls="--", label=f"{pca[0]} median")
                a.legend(fontsize=8)
            a.set(xlabel="Matryoshka level (1 = coarsest, first group)", ylabel=label, title=f"{name}: {label} by level")
            a.grid(alpha=0.3)
        fname = f"levels_{name}.png"
        storage.write_bytes(storage.join(out, fname), _png(fig))
        written.append(fname)
    return written


def level_summary(t: dict, levels: list[int]) -> list[dict]:
    """Per nested prefix (features of levels 1..L): medians and the share of aligned features."""
    out = []
    lv = np.asarray(t["level"])
    alive = np.asarray(t["frequency"]) > 0
    rho = np.asarray(t["abs_spearman"], float)
    nov = np.asarray(t["novelty"], float)
    for i, size in enumerate(levels, start=1):
        sel = (lv <= i) & alive
        r, nv = rho[sel], nov[sel]
        out.append({"level": i, "n_latents": int(size), "alive": int(sel.sum()),
                    "median_abs_spearman": float(np.nanmedian(r)) if np.isfinite(r).any() else None,
                    "aligned_fraction": float(np.nanmean(r >= 0.5)) if len(r) else None,
                    "median_novelty": float(np.nanmedian(nv)) if np.isfinite(nv).any() else None})
    return out


def run(cfg: Config) -> dict:
    import pyarrow as pa

    from galaxysae import activations, dictionary

    t0 = time.time()
    storage.check_writable(cfg.results)  # wrong credentials / unreachable store: fail first
    label_ids, labels, columns = read_labels(cfg.dataset, cfg.split)
    label_pos = {s: i for i, s in enumerate(label_ids)}
    dicts = [dictionary.load(u) for u in cfg.dictionaries]
    tables: dict = {}
    summary: dict = {}
    for d, name in zip(dicts, folder_names(dicts, cfg.names)):
        folder = storage.join(cfg.results, name)
        acts = activations_for(d, folder, cfg)
        write_summary(d, folder, cfg.split, acts.n_galaxies, cfg.embeddings)
        enc_ids = activations.embedding_ids(cfg.embeddings, cfg.split)
        missing = [i for i in enc_ids if i not in label_pos]
        if missing:
            raise ValueError(f"{cfg.embeddings}/{cfg.split}: {len(missing)} embedded ids are not in dataset "
                             f"{cfg.dataset} ({missing[:5]}): embeddings and labels come from different data")
        codes = activations.dense_matrix(acts.url, enc_ids, d.n_latents)
        lab = labels[[label_pos[i] for i in enc_ids]]
        res = align(codes, lab, columns, cfg.min_valid)
        feats = acts.features
        t = {"dictionary": [name] * d.n_latents, "family": d.family,
             "feature": feats.column("feature").to_pylist(), "level": feats.column("level").to_pylist(),
             "frequency": feats.column("frequency").to_pylist(), **res}
        table = pa.table({k: v for k, v in t.items() if k != "family"})
        storage.write_parquet(table, storage.join(folder, "compare.parquet"))
        buf = io.BytesIO()
        table.to_pandas().to_csv(buf, index=False)
        storage.write_bytes(storage.join(folder, "compare.csv"), buf.getvalue())
        tables[name] = t
        summary[name] = {"kind": d.kind, "family": d.family, "n_galaxies": len(enc_ids),
                         "levels": level_summary(t, d.levels)}
        best = int(np.nanargmax(np.nan_to_num(res["abs_spearman"], nan=-1)))
        log.info("%s: %d galaxies; best aligned feature %d: %s (Spearman %.2f), median novelty %.2f",
                 name, len(enc_ids), best, res["best_answer"][best], res["spearman"][best],
                 float(np.nanmedian(res["novelty"])))
    out = storage.join(cfg.results, "compare")
    summary["_plots"] = plots(tables, out)
    summary["_missing_fractions"] = (
        "Spearman per column over the galaxies asked that question (>= min_valid); novelty from a "
        "regression on per-question 'asked' indicators and asked*fraction terms: nothing imputed")
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=1).encode())
    allt = pa.concat_tables([pa.table({k: v for k, v in t.items() if k != "family"}) for t in tables.values()])
    buf = io.BytesIO()
    allt.to_pandas().to_csv(buf, index=False)
    storage.write_bytes(storage.join(out, "compare_all.csv"), buf.getvalue())
    config.save(cfg, out, "compare.toml")
    log.info("compare finished in %.1f s -> %s", time.time() - t0, out)
    return summary
