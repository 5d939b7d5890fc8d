"""Job ``compare``: how well each feature lines up with the Galaxy Zoo vote fractions.

Data flow::

    dictionary + {embeddings}/{split} --activations (cached, shared with render)--> codes[N, M]
    dataset shards (id_str, *_fraction, *_total-votes) --mask low-vote questions, join on id_str--> labels[N, C]
    --> per feature: the most significant label column (Fisher z of its Spearman), novelty = 1 - R^2
    --> chance baseline: the same best z with the labels shuffled over the galaxies
    --> per answer: the feature of each dictionary that tracks it best, and its own chance level
    --> {results}/{name}/compare.parquet + .csv, {results}/compare/ (summary.json/.csv,
        answers.json/.csv, plots); compare.parquet's metadata and summary.json record the
        activations used (their _SUCCESS identity), so atlas and render can tell stale results

Vote counts. A fraction from 2 votes is 0, 0.5 or 1: noise, not a measurement. A galaxy's fractions
of a question count only where at least ``min_votes`` volunteers answered it (its
``{q}_total-votes``); below that, and wherever the total is 0, the question counts as not asked.

Significance. Questions are asked of very different numbers of galaxies (every galaxy is asked
"smooth or featured?", a few dozen "artifact type?"), and by chance alone |Spearman| spreads as
1/sqrt(n). A feature's best answer is therefore its most significant column, by the Fisher z
``atanh|rho| * sqrt(n_valid - 3)``, not its largest |rho| (which would mostly be noise from the
rarely asked questions); rho and n_valid of that column are reported.

Chance. With ~60 answer columns, the best z of a feature is well above 0 even for a feature
unrelated to the votes. Per dictionary, the same statistic is computed with the label rows
shuffled (a fixed seed); its 95th percentile is the chance level (in z, so one level holds for
columns of every size; ``chance_abs_rho`` is what it means in |rho| at a row's n_valid), and
``share_above_null`` the share of active features whose best z exceeds it.

Sparse features. An SAE feature active on 1% of the galaxies has a small |rho| even when it
picks exactly the most extreme galaxies of an answer (the zeros tie), and a linear fit explains
little of it (high novelty); its z is still large on a big split. The votes of its top galaxies
(``top_votes`` against ``best_column_mean``) are the direct reading.

Missing fractions. A Galaxy Zoo question is only asked when an earlier answer leads to it (e.g.
"spiral arms?" only for face-on disks), so its fractions are NaN for the other galaxies. They are
never filled in (nor are those with fewer than ``min_votes`` votes):

- Spearman: each column is correlated over the galaxies that were asked that question only
  (pairwise complete), and only when at least ``min_valid`` were; ``n_valid`` is reported.
- Novelty: the regression gets, per question, an "asked" indicator and each fraction multiplied by
  it. That is a separate intercept for "not asked" plus the fraction's slope among the galaxies
  that were asked: the missing values do not enter the fit. Columns constant over the split are
  dropped. Novelty uses the adjusted R^2 (in-sample R^2 corrected for the number of independent
  predictors, the design's rank: a question's fractions sum to its "asked" indicator), which
  matters on small splits; the plain in-sample R^2 of the original figure is kept as ``r2``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from galaxysae import config, schema, storage
from galaxysae.render import (DictionaryInputs, activations_for, activations_identity, folder_names,
                              write_summary)

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


QUESTION_OF = {schema.fraction_column(q, a): q for q, ans in schema.QUESTIONS.items() for a in ans}
NEGATIVE = "fewer votes for: "


def readable(column: str | None) -> str:
    """``has-spiral-arms-euclid_yes_fraction`` -> ``Spiral arms? → yes``."""
    if not column:
        return ""
    for q, answers in schema.QUESTIONS.items():
        for a in answers:
            if column == schema.fraction_column(q, a):
                return f"{QUESTION_TEXT.get(q, q)} → {a.replace('-', ' ')}"
    return column


def signed_answer(column: str | None, rho: float | None) -> str:
    """The answer as a reader should take it: with rho < 0 the feature is strongest where the
    fewest volunteers gave that answer, so it reads ``fewer votes for: Bulge size → dominant``."""
    text = readable(column)
    if text and rho is not None and math.isfinite(rho) and rho < 0:
        return NEGATIVE + text
    return text


@dataclass
class Config(DictionaryInputs):
    """Label alignment of every feature of every dictionary with the Galaxy Zoo vote fractions."""

    min_valid: int = field(default=20, metadata={"help": "fewest galaxies asked a question for its columns to be correlated"})
    min_votes: int = field(default=5, metadata={"help": "fewest volunteers answering a question for a galaxy's fractions of it to count (fewer: not asked)"})
    null_samples: int = field(default=1000, metadata={"help": "chance baseline: shuffle the labels ceil(null_samples / features) times (at least ceil(200 / answer columns), for the per-answer chance level)"})
    seed: int = field(default=0, metadata={"help": "seed of the label shuffles of the chance baseline"})

    def validate(self) -> None:
        super().validate()
        if self.min_valid < 3:
            raise ValueError(f"key 'min_valid' must be >= 3, got {self.min_valid}")
        if self.min_votes < 1:
            raise ValueError(f"key 'min_votes' must be >= 1, got {self.min_votes}")
        if self.null_samples < 1:
            raise ValueError(f"key 'null_samples' must be >= 1, got {self.null_samples}")


# ----------------------------------------------------------------------------- labels


def mask_low_votes(fractions: np.ndarray, columns: list[str], totals: dict[str, np.ndarray],
                   min_votes: int) -> np.ndarray:
    """fractions[N, C], totals {question: votes[N]} -> a copy with NaN wherever the column's
    question had fewer than ``min_votes`` votes (a total of 0 never counts, whatever its fraction)."""
    out = fractions.copy()
    for j, col in enumerate(columns):
        total = totals[QUESTION_OF[col]]
        out[(total < max(min_votes, 1)) | np.isnan(total), j] = np.nan
    return out


def read_labels(dataset: str, split: str, min_votes: int = 1,
                config: str = "default") -> tuple[list[str], np.ndarray, list[str]]:
    """-> (ids[N], fractions[N, C] float64, column names[C]); NaN where the question was not asked
    of the galaxy or fewer than ``min_votes`` volunteers answered it."""
    import pyarrow.parquet as pq

    from galaxysae import sources

    fractions = schema.fraction_columns()
    wanted = fractions + schema.total_columns()
    ids, blocks = [], []
    for shard in [s for s in sources.resolve(dataset, config, splits=[split]) if s.split == split]:
        fs, path = storage.arrow_fs(shard.url)
        names = set(pq.read_schema(path, filesystem=fs).names)
        missing = [c for c in wanted if c not in names]
        if "id_str" not in names or missing:
            raise ValueError(f"{shard.url}: lacks label columns {(['id_str'] if 'id_str' not in names else []) + missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        t = pq.read_table(path, filesystem=fs, columns=["id_str", *wanted])
        ids += [str(i) for i in t.column("id_str").to_pylist()]  # as embed writes them
        blocks.append(np.column_stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                                       for c in wanted]))
    if not ids:
        raise FileNotFoundError(f"dataset {dataset}: no shards for split {split!r}")
    check_unique(ids, f"dataset {dataset} split {split!r}")
    table = np.concatenate(blocks)
    totals = {q: table[:, len(fractions) + i] for i, q in enumerate(schema.QUESTIONS)}
    return ids, mask_low_votes(table[:, :len(fractions)], fractions, totals, min_votes), fractions


def check_unique(ids: list[str], what: str) -> None:
    """A repeated id_str would join one galaxy's votes or codes to another row: refused."""
    if len(set(ids)) != len(ids):
        from collections import Counter

        dup = [i for i, c in Counter(ids).items() if c > 1]
        raise ValueError(f"{what}: {len(dup)} id_str values occur more than once ({dup[:5]})")


def check_same_galaxies(enc_ids: list[str], label_pos: dict, where: str, dataset: str) -> None:
    """Every embedded galaxy must have its votes in the dataset: embeddings of other data would
    otherwise be correlated with whatever rows share their ids, or silently shrink the split."""
    missing = [i for i in enc_ids if i not in label_pos]
    if missing:
        raise ValueError(f"{where}: {len(missing)} embedded ids are not in dataset {dataset} "
                         f"({missing[:5]}): embeddings and labels come from different data")


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=0, method="average")


def _standardise(a: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    norm = np.sqrt((a ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, a / norm, np.nan)


# Below this share of non-zero codes (an SAE's: k of M), the codes are held as a sparse matrix
# and sort_columns sorts their non-zeros in one go; above it (a PCA's), column by column.
SPARSE_BELOW = 0.25


@dataclass
class SortedColumns:
    """Codes[N, M] with each column's non-zeros sorted by value, made once per dictionary
    (:func:`sort_columns`). Which galaxies a question was asked of, or a shuffle of the votes,
    changes which non-zeros count, never their order, their sign or which of them tie: every
    missingness pattern of :func:`spearman` and every shuffle reads its ranks off this in O(nnz)
    (:func:`_sparse_rank_products`) instead of ranking the codes again (a PCA's too: all their
    values are non-zeros, and ranking them per pattern and shuffle cost more than an SAE's)."""

    shape: tuple[int, int]
    indptr: np.ndarray  # [M + 1]: column j's non-zeros are [indptr[j], indptr[j + 1])
    rows: np.ndarray  # [nnz] the galaxy of each non-zero
    values: np.ndarray  # [nnz] its code (the codes' dtype), ascending within a column
    negative: np.ndarray  # [M] how many of a column's non-zeros are < 0 (its first ones)
    runs: np.ndarray  # [R, 2] start and end (exclusive) of each run of >= 2 equal non-zeros of a column
    run_column: np.ndarray  # [R] the column of each run
    tied: np.ndarray  # [T] the non-zeros in those runs ...
    tied_run: np.ndarray  # [T] ... and the run of each
    nan_rows: np.ndarray  # [K] galaxy and column of each NaN code: it has no rank, so a column
    nan_cols: np.ndarray  # with one among a question's galaxies gets a NaN rho there (as rankdata)

    def matrix(self):
        """The codes as a scipy CSC matrix on these arrays (no copy; rows unsorted in a column)."""
        from scipy import sparse

        return sparse.csc_matrix((self.values, self.rows, self.indptr), shape=self.shape)


def sort_columns(codes) -> SortedColumns:
    """codes[N, M] (an array, scipy sparse, or already :class:`SortedColumns`) -> what
    :func:`spearman` ranks: each column's non-zeros sorted by value (ties by galaxy). Sparse codes
    (an SAE's: fewer than SPARSE_BELOW non-zero) take one sort of the non-zeros by column then
    value; dense ones (a PCA's) one sort per column. Rows and offsets are int32 while they fit."""
    from scipy import sparse

    if isinstance(codes, SortedColumns):
        return codes
    codes = sparse_if_sparse(codes)
    n, m = codes.shape
    if sparse.issparse(codes):
        idx = np.int32 if max(n, codes.nnz) < 2**31 else np.int64
        rows = np.repeat(np.arange(n, dtype=idx), np.diff(codes.indptr))
        data, cols = codes.data, codes.indices
        if (data == 0).any():  # a stored 0 must rank with the implicit zeros, not among the non-zeros
            nz = data != 0
            rows, data, cols = rows[nz], data[nz], cols[nz]
        order = np.lexsort((data, cols))  # by column, then value (ties: by galaxy)
        rows, values = rows[order], data[order]
        counts = np.bincount(cols, minlength=m)
    else:
        counts = np.count_nonzero(codes, axis=0)
        idx = np.int32 if max(n, counts.sum()) < 2**31 else np.int64
        rows = np.empty(int(counts.sum()), idx)
        values = np.empty(len(rows), codes.dtype)
        at = 0
        for j in range(m):
            order = np.argsort(codes[:, j], kind="stable")
            v = codes[order, j]
            if counts[j] < n:  # zeros rank together, outside the non-zeros
                order, v = order[v != 0], v[v != 0]
            rows[at:at + len(v)], values[at:at + len(v)] = order, v
            at += len(v)
    indptr = np.zeros(m + 1, idx)
    np.cumsum(counts, out=indptr[1:])
    col = np.repeat(np.arange(m, dtype=idx), counts)
    negative = np.bincount(col[values < 0], minlength=m).astype(idx)
    nan = np.isnan(values)
    # ties: runs of equal values within a column (NaN equals nothing)
    same = (values[1:] == values[:-1]) & (col[1:] == col[:-1])  # [nnz - 1]: i + 1 ties with i
    tied = np.zeros(len(values), bool)
    tied[1:] |= same
    tied[:-1] |= same
    tied = np.flatnonzero(tied).astype(idx)
    first = np.ones(len(tied), bool)  # a tied non-zero that starts its run
    first[1:] = ~same[tied[1:] - 1]
    tied_run = (np.cumsum(first) - 1).astype(idx)
    starts = tied[first]
    runs = np.column_stack([starts, starts + np.bincount(tied_run)]).astype(idx)
    return SortedColumns((n, m), indptr, rows, values, negative, runs, col[starts], tied, tied_run,
                         rows[nan], col[nan])


def _sparse_rank_products(codes: SortedColumns, mask: np.ndarray, rl: np.ndarray) -> np.ndarray:
    """Pearson of the average ranks of each column of the ``codes`` [N, M] over the
    galaxies in ``mask`` [N] (n of them) with the standardised ``rl`` [n, k] (the votes of those
    galaxies; columns summing to 0; NaN-free), touching only the non-zeros, in O(nnz) (the sort
    is done once, in :func:`sort_columns`) instead of O(n M log n) for dense ranks; equal to them.

    A column's zeros share one average rank c_j, so sum_i (r_ij - mean) rl_i = sum over its
    non-zeros of (r_ij - c_j) rl_i. The pattern keeps a column's non-zeros of the galaxies in
    ``mask``, in the sorted order: the p-th kept one (0-based) ranks p + 1, plus the zeros when
    positive, and a run of t kept equal ones shares its average. p is the count of kept
    non-zeros before it in its column (a cumulative sum over all of them). Non-zeros of other
    galaxies get a value too, but meet a 0 in the votes. The norm follows from the counts: the
    ranks' sum of squares about the mean is (n^3 - n - sum over ties of t^3 - t) / 12, the zeros
    a tie of z_j. NaN for a constant column."""
    from scipy import sparse

    n_all, m = codes.shape
    n = int(mask.sum())
    idx = codes.indptr.dtype
    keep = mask[codes.rows]
    before = np.empty(len(keep) + 1, idx)  # kept non-zeros before each non-zero
    before[0] = 0
    np.cumsum(keep, dtype=idx, out=before[1:])
    start = before[codes.indptr[:-1]]
    count = (before[codes.indptr[1:]] - start).astype(np.float64)  # kept non-zeros of each column
    negative = before[codes.indptr[:-1] + codes.negative] - start
    zeros = n - count
    c = negative + (zeros + 1) / 2  # the zeros rank between the negatives and the positives
    # r - c of a non-zero = p + 1 - c_j (+ z_j when positive) = before - (start_j - 1 + c_j (- z_j)):
    # one shift per column's negatives and one per its positives, laid out as steps at the start of
    # each and a cumulative sum (np.repeat copies value by value; half-integers add exactly)
    shift = np.column_stack([start - 1 + c, start - 1 + c - zeros]).ravel()
    seg_start = np.column_stack([codes.indptr[:-1], codes.indptr[:-1] + codes.negative]).ravel()
    w = np.bincount(seg_start, weights=np.diff(shift, prepend=0.0), minlength=len(codes.rows) + 1)
    w = np.cumsum(w[:-1], out=w[:-1])
    np.subtract(before[:-1], w, out=w)
    # a run of equal values: t kept ones from the first one's place share its average rank
    run_start, run_end = codes.runs[:, 0], codes.runs[:, 1]
    t = (before[run_end] - before[run_start]).astype(np.float64)
    w[codes.tied] = (w[run_start] + (t - 1) / 2)[codes.tied_run]
    ties = np.bincount(codes.run_column, weights=t ** 3 - t, minlength=m)
    # n^3 - n - (z^3 - z) = (n - z) (n^2 + n z + z^2 - 1), with n - z = count: no cancellation
    norm2 = (count * (n ** 2 + n * zeros + zeros ** 2 - 1) - ties) / 12
    if before[-1] < len(keep) / 2:  # few galaxies asked: the product over their non-zeros only
        s = sparse.csc_matrix((w[keep], codes.rows[keep], before[codes.indptr]), shape=(n_all, m))
    else:
        s = sparse.csc_matrix((w, codes.rows, codes.indptr), shape=(n_all, m))  # r_ij - c_j
    del keep, before, w
    full = np.zeros((n_all, rl.shape[1]))  # the votes on every galaxy's row, 0 where not asked
    full[mask] = rl
    with np.errstate(invalid="ignore", divide="ignore"):
        nan_columns = np.bincount(codes.nan_cols[mask[codes.nan_rows]], minlength=m) > 0
        norm = np.where((norm2 > 1e-9 * n ** 3) & ~nan_columns, np.sqrt(norm2), np.nan)
        return np.asarray(s.T @ full) / norm[:, None]


def sparse_if_sparse(codes):
    """``codes`` (an array or scipy sparse) as a scipy CSR matrix when fewer than SPARSE_BELOW
    of them are non-zero (made once for many ``spearman`` calls), else as a dense array."""
    from scipy import sparse

    size = codes.shape[0] * codes.shape[1]
    if sparse.issparse(codes):
        return codes.tocsr() if codes.nnz < SPARSE_BELOW * size else codes.toarray()
    if np.count_nonzero(codes) >= SPARSE_BELOW * size:
        return codes
    return sparse.csr_matrix(codes)


def vote_patterns(labels: np.ndarray, min_valid: int):
    """The vote columns of labels[N, C] (NaN = not asked) grouped by missingness pattern (the
    answers of one question): yields (mask [N] of the galaxies asked, their columns) for each
    pattern asked of at least ``min_valid`` galaxies."""
    valid = ~np.isnan(labels)
    patterns: dict[bytes, list[int]] = {}
    for j in range(labels.shape[1]):
        patterns.setdefault(np.packbits(valid[:, j]).tobytes(), []).append(j)
    for cols in patterns.values():
        mask = valid[:, cols[0]]
        if mask.sum() >= min_valid:
            yield mask, cols


def spearman(codes, labels: np.ndarray, min_valid: int) -> tuple[np.ndarray, np.ndarray]:
    """codes[N, M] (an array, scipy sparse, or :class:`SortedColumns`), labels[N, C] (NaN = not
    asked) -> (rho[M, C], n_valid[C]).

    Columns sharing a missingness pattern (the answers of one question) are ranked together.
    rho is NaN where a column has fewer than ``min_valid`` galaxies or either side is constant.
    The codes are ranked by their non-zeros alone (see _sparse_rank_products; a PCA's are all
    non-zero), sorted once per call; pass :func:`sort_columns` of them to share that sort between
    calls (the shuffles of :func:`shuffled`).
    """
    codes = sort_columns(codes)
    rho = np.full((codes.shape[1], labels.shape[1]), np.nan)
    n_valid = (~np.isnan(labels)).sum(0)
    for mask, cols in vote_patterns(labels, min_valid):
        rl = _standardise(_ranks(labels[:, cols][mask]))  # [n, k]
        block = _sparse_rank_products(codes, mask, np.nan_to_num(rl))
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


RANK_TOLERANCE = 1e-6  # singular values below this share of the largest: dependent directions


def novelty(codes, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes[N, M] (an array, scipy sparse or :class:`SortedColumns`), design x[N, P] ->
    (novelty[M], r2[M]); NaN for a constant feature.

    ``r2`` is the plain in-sample R^2 of the least-squares fit; novelty is 1 - adjusted R^2
    (clipped to [0, 1]): with ~60 predictors and a few hundred galaxies, plain R^2 credits the
    votes with variance they only fit by chance. The adjustment counts the design's rank, not
    its columns (a question's fractions sum to its "asked" indicator). The fit is a projection
    on an orthonormal basis U of [1, x] (from its SVD): ||U^T y||^2 per feature is one product
    with the codes, which stay sparse (no dense [N, M] copy).
    """
    from scipy import sparse

    n = x.shape[0]
    a = np.column_stack([np.ones(n), x])
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    # vote fractions are float32: a question's fractions sum to its "asked" column only to ~1e-7,
    # so a float64 tolerance would count that dependent direction (and fit its rounding noise)
    u = u[:, s > s[0] * RANK_TOLERANCE]
    rank = u.shape[1]
    if isinstance(codes, SortedColumns):
        codes = codes.matrix()
    if sparse.issparse(codes):
        c = codes.tocsc()
        # float64 values on the codes' own row indices (read, never changed): 8 bytes a non-zero,
        # not a float64 copy of the whole matrix and another of its square
        c = sparse.csc_matrix((c.data.astype(np.float64), c.indices, c.indptr), shape=c.shape)
        proj = np.asarray((c.T @ u))  # [M, rank]
        mean = np.asarray(c.sum(0)).ravel() / n
        c.data **= 2
        sum_sq = np.asarray(c.sum(0)).ravel()
    else:
        c = np.asarray(codes, np.float64)
        proj = c.T @ u
        sum_sq = (c ** 2).sum(0)
        mean = c.mean(0)
    ss_tot = sum_sq - n * mean ** 2  # the intercept is in the basis: the fit keeps the mean
    ss_res = np.maximum(sum_sq - (proj ** 2).sum(1), 0.0)
    constant = ss_tot <= 1e-12 * np.maximum(sum_sq, 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(constant, np.nan, 1.0 - ss_res / ss_tot)
    adj = 1.0 - (1.0 - r2) * (n - 1) / max(n - rank, 1)  # rank - 1 predictors beside the intercept
    return np.where(constant, np.nan, 1.0 - np.clip(adj, 0.0, 1.0)), r2


def significance(rho: np.ndarray, n_valid: np.ndarray) -> np.ndarray:
    """rho[..., C], n_valid[C] -> Fisher z = atanh|rho| * sqrt(n_valid - 3) (NaN where rho is).

    By chance alone |rho| spreads as 1/sqrt(n): 0.3 over 40 galaxies is noise, 0.1 over 3,000 is
    not. z puts columns asked of different numbers of galaxies on one scale; its chance level is
    measured by shuffling (:func:`shuffled`), not read from a normal table."""
    n = np.asarray(n_valid, np.float64)
    with np.errstate(invalid="ignore"):
        return np.arctanh(np.minimum(np.abs(rho), 1 - 1e-12)) * np.sqrt(np.maximum(n - 3, 1))


def chance_rho(z: float | None, n_valid) -> float | None:
    """The |rho| a chance level ``z`` (see :func:`significance`) amounts to over n_valid galaxies."""
    if z is None or not np.isfinite(z):
        return None
    return float(np.tanh(z / np.sqrt(max(float(n_valid) - 3, 1))))


def _scores(z: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """z to rank columns by, -1 where NaN. The two answers of a yes/no question have exactly
    opposite rho; the tiny bonus makes the positive one win that tie, so the best answer reads
    "Spiral arms? → no" rather than "fewer votes for: Spiral arms? → yes"."""
    return np.where(np.isnan(z), -1.0, z * (1 + 1e-9 * (rho > 0)))


def _or_minus_one(z: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """z[M, C] (>= 0) -> z, -1 where NaN or the feature is not ``active`` [M]: what a max skips."""
    skip = np.isnan(z) if active is None else np.isnan(z) | ~np.asarray(active, bool)[:, None]
    return np.where(skip, -1.0, z)


def closest(rho_f: np.ndarray, z_f: np.ndarray, columns: list[str], n: int = 3) -> list[int]:
    """Indices of the ``n`` most significant columns of one feature (rho[C], z[C]), one per
    question: the answers of a question share their galaxies, so a second one repeats the first."""
    seen, out = set(), []
    for j in np.argsort(-_scores(z_f, rho_f), kind="stable"):
        if np.isnan(rho_f[j]) or QUESTION_OF.get(columns[j], columns[j]) in seen:
            continue
        seen.add(QUESTION_OF.get(columns[j], columns[j]))
        out.append(int(j))
        if len(out) == n:
            break
    return out


def align(codes, labels: np.ndarray, columns: list[str], min_valid: int,
          corr: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Per feature: the most significant column (its z, signed rho and n_valid), top-3 columns,
    novelty. ``codes``: as :func:`spearman` takes them; ``corr``: ``spearman(codes, labels,
    min_valid)`` if the caller has it already."""
    rho, n_valid = corr if corr is not None else spearman(codes, labels, min_valid)
    z = significance(rho, n_valid)
    has = np.isfinite(z).any(1)
    best = np.where(has, np.argmax(_scores(z, rho), axis=1), -1)
    x, _ = design_matrix(labels, columns)
    nov, r2 = novelty(codes, x)
    top3 = [json.dumps([[columns[j], readable(columns[j]), round(float(rho[f, j]), 4)]
                        for j in closest(rho[f], z[f], columns)]) if has[f] else "[]"
            for f in range(codes.shape[1])]
    return {
        "best_column": [columns[b] if b >= 0 else None for b in best],
        "best_answer": [signed_answer(columns[b], rho[f, b]) if b >= 0 else None for f, b in enumerate(best)],
        "spearman": [float(rho[f, b]) if b >= 0 else np.nan for f, b in enumerate(best)],
        "abs_spearman": [abs(float(rho[f, b])) if b >= 0 else np.nan for f, b in enumerate(best)],
        "n_valid": [int(n_valid[b]) if b >= 0 else 0 for b in best],
        "z": [float(z[f, b]) if b >= 0 else np.nan for f, b in enumerate(best)],
        "novelty": nov.tolist(),
        "r2": r2.tolist(),
        "top_columns": top3,
    }


def top_votes(top_ids: list[list[str]], best_column: list[str | None], labels: np.ndarray,
              ids: list[str], columns: list[str]) -> dict:
    """What the volunteers said of each feature's top galaxies: per feature, ``top_votes``, a
    JSON list of [id_str, vote fraction for its best column] for each of ``top_ids`` (null
    where the question was not asked of that galaxy; by id, so a page never puts a vote beside
    the wrong galaxy) and ``best_column_mean``, that column's mean over every galaxy asked.
    labels[N, C] are the rows of ``ids``. A feature that finds bars shows bar votes near 1 where
    the average is low."""
    pos = {s: i for i, s in enumerate(ids)}
    col = {c: j for j, c in enumerate(columns)}
    asked = ~np.isnan(labels)
    means = np.where(asked.any(0), np.where(asked, labels, 0).sum(0) / np.maximum(asked.sum(0), 1), np.nan)
    votes, base = [], []
    for tops, best in zip(top_ids, best_column):
        j = col.get(best) if best else None
        if j is None:
            votes.append("[]")
            base.append(np.nan)
            continue
        rows = [(t, labels[pos[t], j] if t in pos else np.nan) for t in tops]
        votes.append(json.dumps([[t, None if np.isnan(v) else round(float(v), 4)] for t, v in rows]))
        base.append(float(means[j]))
    return {"top_votes": votes, "best_column_mean": base}


# fewest shuffled values behind the chance level of an answer's best feature (one per column
# and shuffle: ~60 a shuffle)
ANSWER_NULL_VALUES = 200


@dataclass
class Chance:
    """The statistics of the atlas with the votes shuffled over the galaxies (finite values)."""

    feature_best: np.ndarray  # each feature's best z over the answer columns
    feature_best_rho: np.ndarray  # |rho| of that column (the distributions plot's chance curve)
    answer_best: np.ndarray  # each answer column's best z over the active features


def shuffled(codes, labels: np.ndarray, min_valid: int, n_samples: int, seed: int,
             active: np.ndarray | None = None) -> Chance:
    """codes[N, M], labels[N, C] -> :class:`Chance` over max(ceil(n_samples / M),
    ceil(ANSWER_NULL_VALUES / C)) shuffles (at least one); ``active``: features [M] that count
    for an answer's best (default all).

    Shuffling whole rows keeps each galaxy's votes (and which questions it was asked) together and
    each feature's distribution as is; only the link between the two is broken. Deterministic.
    """
    m, c = codes.shape[1], labels.shape[1]
    active = np.ones(m, bool) if active is None else np.asarray(active, bool)
    rng = np.random.default_rng(seed)
    codes = sort_columns(codes)  # a shuffle moves the votes, not the codes: one sort serves all
    features, features_rho, answers = [], [], []
    for _ in range(max(1, math.ceil(n_samples / max(m, 1)), math.ceil(ANSWER_NULL_VALUES / max(c, 1)))):
        rho, n_valid = spearman(codes, labels[rng.permutation(len(labels))], min_valid)
        z = significance(rho, n_valid)
        s = _scores(z, rho)
        best = s.argmax(1)
        has = s.max(1, initial=-1.0) >= 0
        rows = np.arange(m)[has]
        features.append(z[rows, best[has]])
        features_rho.append(np.abs(rho[rows, best[has]]))
        a = _or_minus_one(z, active).max(0, initial=-1.0)
        answers.append(a[a >= 0])
    return Chance(np.concatenate(features), np.concatenate(features_rho), np.concatenate(answers))


def answer_table(rho: np.ndarray, n_valid: np.ndarray, columns: list[str], active: np.ndarray,
                 chance_z95: float | None) -> list[dict]:
    """Per answer column: the active feature with the largest |rho| (signed rho, n_valid, z) and
    whether its z beats ``chance_z95``, the 95th percentile of the same maximum with the votes
    shuffled (``chance_abs_rho``: that level in |rho| at this column's n_valid). What an
    astronomer asks first: which feature finds bars, mergers, edge-on disks?"""
    z = significance(rho, n_valid)
    a = _or_minus_one(z, active)
    rows = []
    for j, col in enumerate(columns):
        f = int(np.argmax(a[:, j]))
        if a[f, j] < 0:  # too few galaxies asked, or no active feature varies
            continue
        q = QUESTION_OF.get(col, "")
        rows.append({"column": col, "question": QUESTION_TEXT.get(q, q), "answer": readable(col),
                     "feature": f, "spearman": float(rho[f, j]), "n_valid": int(n_valid[j]),
                     "z": float(a[f, j]), "chance_abs_rho": chance_rho(chance_z95, n_valid[j]),
                     "above_null": bool(chance_z95 is not None and a[f, j] > chance_z95)})
    return rows


def chance_summary(abs_best, z_best, active, null: np.ndarray) -> dict:
    """The chance level (95th percentile of the shuffled best z) and the share of active features
    above it, with the share at |rho| >= 0.5 beside it (shares, not counts: dictionaries differ
    in size)."""
    act = np.asarray(active, bool)
    r, z = np.asarray(abs_best, float)[act], np.asarray(z_best, float)[act]
    p95 = float(np.percentile(null, 95)) if len(null) else None
    above = (z > p95) if p95 is not None else np.zeros(len(z), bool)  # NaN > p95 is False
    return {"active": int(len(r)), "null_best_z_p95": p95, "null_values": int(len(null)),
            "share_above_null": float(above.mean()) if len(r) and p95 is not None else None,
            "share_abs_rho_ge_0_5": float((r >= 0.5).mean()) if len(r) else None,
            "median_abs_spearman": float(np.nanmedian(r)) if np.isfinite(r).any() else None}


# ----------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plots(tables: dict, out: str, nulls: dict | None = None, chance: dict | None = None) -> list[str]:
    """Distributions of the best answer's |Spearman| (dashed: the same with shuffled labels, i.e.
    chance) and novelty: dictionaries side by side, and per level. ``nulls``: per dictionary the
    shuffled best |rho| values; ``chance``: its chance level in |rho| over all its galaxies (the
    z level of :func:`chance_rho`: a question asked of fewer galaxies needs more)."""
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
        null = (nulls or {}).get(name)
        if null is not None and len(null):
            ax[0].hist(null, bins=bins, density=True, histtype="step", lw=1.5, ls="--", color=c,
                       label=f"{name}, labels shuffled (chance)")
        ok = ~np.isnan(rho) & ~np.isnan(nov)
        ax[2].scatter(rho[ok], nov[ok], s=8, alpha=0.5, color=c, label=name)
    ax[0].set(xlabel="|Spearman ρ| with the best Galaxy Zoo answer (largest z)", ylabel="density",
              title="Alignment with Galaxy Zoo answers")
    ax[1].set(xlabel="novelty = 1 − adjusted R² (linear fit on all vote fractions)", ylabel="density",
              title="What the votes do not explain")
    ax[2].set(xlabel="|Spearman ρ|, best answer", ylabel="novelty", title="Per feature", xlim=(0, 1), ylim=(0, 1.02))
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    storage.write_bytes(storage.join(out, "distributions.png"), _png(fig))
    written.append("distributions.png")
    nested = {k: t for k, t in tables.items() if len(set(t["level"])) > 1}
    for name, t in nested.items():
        levels = sorted(set(t["level"]))
        fig, ax = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
        for a, key, label in ((ax[0], "abs_spearman", "|Spearman ρ|, best answer"), (ax[1], "novelty", "novelty = 1 − adjusted R²")):
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
            level = (chance or {}).get(name)
            if key == "abs_spearman" and level is not None:
                a.axhline(level, color="#888", ls=":", label="chance level (|ρ| over all galaxies)")
                a.legend(fontsize=8)
            a.set(xlabel="Matryoshka level (1 = coarsest, first group)", ylabel=label, title=f"{name}: {label} by level")
            a.grid(alpha=0.3)
        fname = f"levels_{name}.png"
        storage.write_bytes(storage.join(out, fname), _png(fig))
        written.append(fname)
    return written


def level_summary(t: dict, levels: list[int], null_z95: float | None = None) -> list[dict]:
    """Per nested prefix (features of levels 1..L): medians, the share of aligned features and
    the share above the dictionary's chance level (in z, see :func:`significance`)."""
    out = []
    lv = np.asarray(t["level"])
    alive = np.asarray(t["frequency"]) > 0
    rho = np.asarray(t["abs_spearman"], float)
    zs = np.asarray(t["z"], float)
    nov = np.asarray(t["novelty"], float)
    for i, size in enumerate(levels, start=1):
        sel = (lv <= i) & alive
        r, z, nv = rho[sel], zs[sel], nov[sel]
        out.append({"level": i, "n_latents": int(size), "alive": int(sel.sum()),
                    "median_abs_spearman": float(np.nanmedian(r)) if np.isfinite(r).any() else None,
                    "aligned_fraction": float(np.nanmean(r >= 0.5)) if len(r) else None,
                    "share_above_null": float((z > null_z95).mean()) if len(r) and null_z95 is not None else None,
                    "median_novelty": float(np.nanmedian(nv)) if np.isfinite(nv).any() else None})
    return out


def table_csv(table) -> bytes:
    """A compare table (pyarrow) as CSV; its list-like columns are JSON strings already."""
    buf = io.BytesIO()
    table.to_pandas().to_csv(buf, index=False)
    return buf.getvalue()


def summary_csv(summary: dict) -> bytes:
    """One row per dictionary: its size, activity and alignment with the votes, chance beside it."""
    import pandas as pd

    keys = ["kind", "family", "n_latents", "l0", "n_galaxies", "active", "median_abs_spearman",
            "null_best_z_p95", "share_above_null", "share_abs_rho_ge_0_5", "null_values",
            "answers", "answer_null_z_p95", "answers_above_null"]
    rows = [{"dictionary": name, **{k: s.get(k) for k in keys}}
            for name, s in summary.items() if not name.startswith("_")]
    buf = io.BytesIO()
    pd.DataFrame(rows, columns=["dictionary", *keys]).to_csv(buf, index=False)
    return buf.getvalue()


def answers_csv(answers: dict) -> bytes:
    """One row per dictionary and answer: its best feature (see :func:`answer_table`)."""
    import pandas as pd

    keys = ["question", "answer", "column", "feature", "spearman", "n_valid", "z", "chance_abs_rho",
            "above_null"]
    rows = [{"dictionary": name, **{k: r[k] for k in keys}} for name, rs in answers.items() for r in rs]
    buf = io.BytesIO()
    pd.DataFrame(rows, columns=["dictionary", *keys]).to_csv(buf, index=False)
    return buf.getvalue()


def run(cfg: Config) -> dict:
    import pyarrow as pa

    from galaxysae import activations, dictionary

    t0 = time.time()
    # the activations' tasks run elsewhere; a relative output in a `ray job submit` copy is refused
    cfg = config.absolute_paths(cfg, inputs=("dictionaries", "embeddings", "dataset"),
                                outputs=("results",))
    storage.check_writable(cfg.results)  # wrong credentials / unreachable store: fail first
    label_ids, labels, columns = read_labels(cfg.dataset, cfg.split, cfg.min_votes, cfg.dataset_config)
    label_pos = {s: i for i, s in enumerate(label_ids)}
    # the galaxies every dictionary encodes, and their votes: read and joined once
    where = f"{cfg.embeddings}/{cfg.split}"
    enc_ids = activations.embedding_ids(cfg.embeddings, cfg.split)
    check_unique(enc_ids, where)
    check_same_galaxies(enc_ids, label_pos, where, cfg.dataset)
    lab = labels[[label_pos[i] for i in enc_ids]]
    dicts = [dictionary.load(u) for u in cfg.dictionaries]
    tables: dict = {}
    nulls: dict = {}
    answers: dict = {}
    summary: dict = {}
    for d, name in zip(dicts, folder_names(dicts, cfg.names)):
        folder = storage.join(cfg.results, name)
        acts = activations_for(d, folder, cfg)
        write_summary(d, folder, cfg.split, acts.n_galaxies, cfg.embeddings)
        # each feature's non-zeros sorted once: every question's galaxies and every shuffle reuse it
        codes = sort_columns(activations.code_matrix(acts.url, enc_ids, d.n_latents))
        corr = spearman(codes, lab, cfg.min_valid)
        res = align(codes, lab, columns, cfg.min_valid, corr)
        feats = acts.features
        active = np.asarray(feats.column("frequency").to_pylist(), float) > 0
        null = shuffled(codes, lab, cfg.min_valid, cfg.null_samples, cfg.seed, active)
        nulls[name] = null.feature_best_rho
        chance = chance_summary(res["abs_spearman"], res["z"], active, null.feature_best)
        p95 = chance["null_best_z_p95"]
        answer_p95 = float(np.percentile(null.answer_best, 95)) if len(null.answer_best) else None
        answers[name] = answer_table(*corr, columns, active, answer_p95)
        chance.update(answer_null_z_p95=answer_p95, answers=len(answers[name]),
                      answers_above_null=sum(r["above_null"] for r in answers[name]))
        t = {"dictionary": [name] * d.n_latents, "family": d.family,
             "feature": feats.column("feature").to_pylist(), "level": feats.column("level").to_pylist(),
             "frequency": feats.column("frequency").to_pylist(), **res,
             **top_votes(feats.column("top_ids").to_pylist(), res["best_column"], lab, enc_ids, columns),
             "chance_abs_rho": [chance_rho(p95, n) if n else None for n in res["n_valid"]],
             "above_null": [bool(p95 is not None and v > p95) for v in res["z"]]}
        table = pa.table({k: v for k, v in t.items() if k != "family"})
        # the activations it was computed from: the atlas refuses it beside grids or statistics
        # of activations recomputed since (a dictionary retrained in place, embeddings rewritten)
        ident = activations_identity(acts.url)
        table = table.replace_schema_metadata({"split": cfg.split, "embeddings": cfg.embeddings,
                                               "activations": json.dumps(ident)})
        storage.write_parquet(table, storage.join(folder, "compare.parquet"))
        storage.write_bytes(storage.join(folder, "compare.csv"), table_csv(table))
        tables[name] = t
        summary[name] = {"kind": d.kind, "family": d.family, "n_latents": d.n_latents,
                         "l0": (d.metrics or {}).get("l0"), "n_galaxies": len(enc_ids), **chance,
                         "levels": level_summary(t, d.levels, p95), "activations": ident}
        best = int(np.argmax(np.nan_to_num(res["z"], nan=-1)))
        log.info("%s: %d galaxies; best aligned feature %d: %s (Spearman %.2f), median novelty %.2f; "
                 "chance level (p95 of the best z, shuffled) %.2f, %.0f%% of active features above it",
                 name, len(enc_ids), best, res["best_answer"][best], res["spearman"][best],
                 float(np.nanmedian(res["novelty"])), p95 if p95 is not None else float("nan"),
                 100 * (chance["share_above_null"] or 0.0))
    out = storage.join(cfg.results, "compare")
    summary["_plots"] = plots(tables, out, nulls, {name: chance_rho(s["null_best_z_p95"], s["n_galaxies"])
                                                   for name, s in summary.items()})
    summary["_missing_fractions"] = (
        f"a question counts as asked of a galaxy when >= min_votes ({cfg.min_votes}) volunteers answered it; "
        "Spearman per column over the galaxies asked that question (>= min_valid); novelty from a "
        "regression on per-question 'asked' indicators and asked*fraction terms: nothing imputed")
    summary["_chance"] = (
        "z = atanh|Spearman| * sqrt(n_valid - 3), comparable across answers asked of different numbers "
        "of galaxies; each feature's best answer is its largest z. null_best_z_p95: 95th percentile of "
        f"each feature's best z with the label rows shuffled over the galaxies (seed {cfg.seed}, >= "
        f"{cfg.null_samples} values); share_above_null: share of active features whose best z exceeds "
        "it; answer_null_z_p95: the same for each answer's best feature")
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=1).encode())
    storage.write_bytes(storage.join(out, "summary.csv"), summary_csv(summary))
    storage.write_bytes(storage.join(out, "answers.json"), json.dumps(answers, indent=1).encode())
    storage.write_bytes(storage.join(out, "answers.csv"), answers_csv(answers))
    allt = pa.concat_tables([pa.table({k: v for k, v in t.items() if k != "family"}) for t in tables.values()])
    storage.write_bytes(storage.join(out, "compare_all.csv"), table_csv(allt))
    config.save(cfg, out, "compare.toml")
    log.info("compare finished in %.1f s -> %s", time.time() - t0, out)
    return summary
