"""Spearman of SAE codes with the votes: ranks of the non-zeros alone vs dense ranks.

``galaxysae compare`` correlates every feature with every vote fraction, once per question's
missingness pattern and again for each shuffle of the chance baseline. Ranked densely (scipy's
``rankdata`` on the [N, M] codes) that is O(N M log N) per pattern; an SAE's codes are k of M
non-zero, and ``compare.spearman`` ranks only those (the zeros share one average rank). Both are
timed side by side in one run on the same generated TopK-like codes and must agree.

Novelty (1 - adjusted R^2 of each feature on the vote design) likewise: a dense least-squares fit
of the [N, M] codes (what compare did before) vs ``compare.novelty``'s projection of the sparse
codes on an orthonormal basis of the design; time and peak memory (tracemalloc: numpy and scipy
report their buffers to it) side by side, and the values must agree.

Sorting once: compare ranks the codes once per question's missingness pattern (13 in Galaxy Zoo
Euclid's decision tree) and again for every shuffle of the chance baseline. What compare did
before (kept here as ``sort_per_pattern``) sorted all the non-zeros of the galaxies asked for each
pattern; ``compare.sort_columns`` sorts each feature's non-zeros once per dictionary and each
pattern filters them (O(nnz)). One dictionary's work (the correlation and the shuffles
``compare.shuffled`` draws for the 46 vote columns) is timed both ways, with its peak memory, on
``--sort-galaxies`` galaxies with votes that follow the decision tree; the rho must agree.
The PCA baseline's dense codes go the same way (sorted column by column once, vs scipy's
rankdata per pattern and shuffle), timed on ``--components`` dense columns.
Usage: ``python bench/compare.py [--galaxies 8000] [--latents 2048] [--k 32] [--questions 3]
[--sort-galaxies 20000] [--components 32]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from galaxysae import compare  # noqa: E402


def topk_codes(n: int, m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k active latents per galaxy, drawn with a power-law frequency as trained SAEs show."""
    p = 1.0 / np.arange(1, m + 1) ** 0.8
    p /= p.sum()
    codes = np.zeros((n, m), np.float32)
    for i in range(n):
        codes[i, rng.choice(m, k, replace=False, p=p)] = rng.exponential(1.0, k)
    return codes


def votes(n: int, questions: int, rng: np.random.Generator) -> np.ndarray:
    """Three answers per question; later questions asked of a shrinking share of galaxies."""
    cols = []
    for q in range(questions):
        asked = rng.random(n) < 1.0 / (q + 1)
        frac = rng.dirichlet(np.ones(3), n)
        frac[~asked] = np.nan
        cols.append(frac)
    return np.concatenate(cols, axis=1)


def dense_novelty(codes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The dense reference: lstsq of the codes on [1, x], adjusted for the design's rank."""
    n = len(codes)
    a = np.column_stack([np.ones(n), x])
    c = codes.astype(np.float64)
    coef, _, rank, _ = np.linalg.lstsq(a, c, rcond=compare.RANK_TOLERANCE)
    resid = c - a @ coef
    ss_tot = ((c - c.mean(0)) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - (resid ** 2).sum(0) / ss_tot
    adj = 1.0 - (1.0 - r2) * (n - 1) / max(n - rank, 1)
    return np.where(ss_tot > 0, 1.0 - np.clip(adj, 0.0, 1.0), np.nan)


def tree_votes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Every answer fraction of schema.QUESTIONS, [n, 46]: the first question is asked of every
    galaxy, each later one of a share of those its parent question was asked of
    (schema.ASKED_WHEN), NaN elsewhere, as in the dataset: 13 missingness patterns, nested.
    Fractions of 5 to 40 votes, so with ties."""
    from galaxysae import schema

    asked = {}
    cols = []
    for q, answers in schema.QUESTIONS.items():
        parents = schema.ASKED_WHEN[q]
        share = 0.1 if q == "problem-euclid" else 0.6  # "problem?" is asked of few galaxies
        if parents is None:
            asked[q] = np.ones(n, bool)  # the first question: every galaxy
        else:
            asked[q] = asked[parents[0].split("_")[0]] & (rng.random(n) < share)
        total = rng.integers(5, 41, n)
        frac = rng.multinomial(total, np.ones(len(answers)) / len(answers)) / total[:, None]
        frac[~asked[q]] = np.nan
        cols.append(frac)
    return np.concatenate(cols, axis=1)


def _old_rank_products(codes, rl: np.ndarray) -> np.ndarray:
    """compare._sparse_rank_products before sorting once: codes [n, M] (CSC) of the pattern's
    galaxies, all their non-zeros sorted by (column, value) in every call."""
    from scipy import sparse

    n, m = codes.shape
    counts = np.diff(codes.indptr)
    cols = np.repeat(np.arange(m), counts)
    v = codes.data.astype(np.float64)
    order = np.lexsort((v, cols))
    vs, cs, rows = v[order], cols[order], codes.indices[order]
    pos = np.arange(len(vs)) - codes.indptr[cs]
    new = np.ones(len(vs), bool)
    new[1:] = (vs[1:] != vs[:-1]) | (cs[1:] != cs[:-1])
    group = np.cumsum(new) - 1
    first = pos[new]
    tie_rank = first + (np.bincount(group) - 1) / 2 + 1
    zeros = n - counts
    negative = np.bincount(cs[vs < 0], minlength=m)
    r = tie_rank[group] + zeros[cs] * (vs > 0)
    c = negative + (zeros + 1) / 2
    mean = (n + 1) / 2
    norm2 = zeros * (c - mean) ** 2 + np.bincount(cs, weights=(r - mean) ** 2, minlength=m)
    s = sparse.csc_matrix((r - c[cs], (rows, cs)), shape=(n, m))
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(norm2 > 1e-9 * n ** 3, np.sqrt(norm2), np.nan)
        return np.asarray(s.T @ rl) / norm[:, None]


def sort_per_pattern(csr, labels: np.ndarray, min_valid: int) -> np.ndarray:
    """compare.spearman's sparse path before sorting once: per missingness pattern, the rows of
    the galaxies asked (``csr[mask].tocsc()``) and a sort of all their non-zeros."""
    rho = np.full((csr.shape[1], labels.shape[1]), np.nan)
    for mask, cols in compare.vote_patterns(labels, min_valid):
        rl = compare._standardise(compare._ranks(labels[mask][:, cols]))
        block = _old_rank_products(csr[mask].tocsc(), np.nan_to_num(rl))
        block[:, np.isnan(rl[0])] = np.nan
        rho[:, cols] = block
    return rho


def dense_ranks(codes: np.ndarray, labels: np.ndarray, min_valid: int) -> np.ndarray:
    """compare.spearman as it ranked dense codes before sorting once: scipy's ``rankdata`` of the
    codes of the galaxies asked, per missingness pattern (and again for every shuffle)."""
    rho = np.full((codes.shape[1], labels.shape[1]), np.nan)
    for mask, cols in compare.vote_patterns(labels, min_valid):
        rl = compare._standardise(compare._ranks(labels[mask][:, cols]))
        rf = compare._standardise(compare._ranks(codes[mask]))  # a column of NaN: constant
        block = np.nan_to_num(rf).T @ np.nan_to_num(rl)
        block[np.isnan(rf[0]), :] = np.nan
        block[:, np.isnan(rl[0])] = np.nan
        rho[:, cols] = block
    return rho


def peak_mib(fn) -> tuple[float, float, object]:
    """(seconds, peak MiB allocated while fn ran, its result)."""
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, out


def timed(fn, rounds: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--galaxies", type=int, default=8000)
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sort-galaxies", type=int, default=20000)
    ap.add_argument("--components", type=int, default=32)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    codes = topk_codes(args.galaxies, args.latents, args.k, rng)
    labels = votes(args.galaxies, args.questions, rng)

    def dense():
        return dense_ranks(codes, labels, 20)

    t_sparse, rho_sparse = timed(lambda: compare.spearman(codes, labels, 20)[0], args.rounds)
    t_dense, rho_dense = timed(dense, args.rounds)
    same_nan = bool((np.isnan(rho_sparse) == np.isnan(rho_dense)).all())
    diff = float(np.nanmax(np.abs(rho_sparse - rho_dense)))
    print(f"codes {args.galaxies} x {args.latents}, k = {args.k}; {labels.shape[1]} vote columns "
          f"in {args.questions} missingness patterns; best of {args.rounds} rounds")
    print(f"{'ranking':<22}{'seconds':>10}")
    print(f"{'dense (rankdata)':<22}{t_dense:>10.3f}")
    print(f"{'non-zeros only (ours)':<22}{t_sparse:>10.3f}")
    print(f"max |rho difference| {diff:.2e}, same NaNs: {same_nan}")
    ratio = t_dense / t_sparse
    ok = ratio >= 5 and diff < 1e-9 and same_nan
    print(f"target sparse_spearman_speedup: {ratio:.1f}x (goal >= 5x, equal rho) {'PASS' if ok else 'FAIL'}")

    from scipy import sparse

    from galaxysae import schema

    columns = schema.fraction_columns()
    design, _ = compare.design_matrix(
        np.column_stack([labels, rng.uniform(0, 1, (args.galaxies, len(columns) - labels.shape[1]))]),
        columns)
    csr = sparse.csr_matrix(codes)
    t_old, m_old, nov_old = peak_mib(lambda: dense_novelty(codes, design))
    t_new, m_new, (nov_new, _) = peak_mib(lambda: compare.novelty(csr, design))
    same = bool((np.isnan(nov_old) == np.isnan(nov_new)).all())
    nov_diff = float(np.nanmax(np.abs(nov_old - nov_new))) if np.isfinite(nov_old).any() else 0.0
    print(f"novelty on a {design.shape[1]}-column design  {'seconds':>10}{'peak MiB':>10}")
    print(f"{'dense lstsq':<34}{t_old:>10.3f}{m_old:>10.1f}")
    print(f"{'sparse projection (ours)':<34}{t_new:>10.3f}{m_new:>10.1f}")
    print(f"max |novelty difference| {nov_diff:.2e}, same NaNs: {same}")
    mem_ratio = m_old / max(m_new, 1e-3)
    ok = mem_ratio >= 10 and nov_diff < 1e-6 and same
    print(f"target novelty_memory: {mem_ratio:.1f}x less peak memory, {t_old / max(t_new, 1e-6):.1f}x "
          f"faster (goal >= 10x less memory, equal novelty) {'PASS' if ok else 'FAIL'}")
    sort_once(args.sort_galaxies, args.latents, args.k, args.rounds, rng)
    pca_sort_once(args.sort_galaxies, args.components, args.rounds, rng)
    return 0


def shuffled_votes(n: int, m: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The votes of n galaxies and the shuffles compare.shuffled draws for m features."""
    labels = tree_votes(n, rng)
    shuffles = max(1, -(-1000 // m), -(-compare.ANSWER_NULL_VALUES // labels.shape[1]))
    return [labels] + [labels[rng.permutation(n)] for _ in range(shuffles)]


def agreement(rho_old: list[np.ndarray], rho_new: list[np.ndarray]) -> tuple[float, bool]:
    """(max |rho difference|, same NaNs) over pairs of rho."""
    same_nan = all(bool((np.isnan(a) == np.isnan(b)).all()) for a, b in zip(rho_old, rho_new))
    diff = max(float(np.nanmax(np.abs(a - b), initial=0.0)) for a, b in zip(rho_old, rho_new))
    return diff, same_nan


def sort_once(n: int, m: int, k: int, rounds: int, rng: np.random.Generator) -> None:
    """One dictionary's Spearman work (the correlation and its shuffles), sorting the non-zeros
    per pattern (before) vs once (ours): time, peak memory, and the rho of both."""
    csr = compare.sparse_if_sparse(topk_codes(n, m, k, rng))
    votes = shuffled_votes(n, m, rng)
    c = votes[0].shape[1]
    patterns = len({np.packbits(~np.isnan(votes[0][:, j])).tobytes() for j in range(c)})
    shuffles = len(votes) - 1

    def before():
        return [sort_per_pattern(csr, v, 20) for v in votes]

    def ours():
        ranked = compare.sort_columns(csr)
        return [compare.spearman(ranked, v, 20)[0] for v in votes]

    t_old, rho_old = timed(before, rounds)
    t_new, rho_new = timed(ours, rounds)
    _, m_old, _ = peak_mib(before)
    _, m_new, _ = peak_mib(ours)
    diff, same_nan = agreement(rho_old, rho_new)
    print(f"codes {n} x {m}, k = {k} ({csr.nnz} non-zeros); {c} vote columns in {patterns} "
          f"missingness patterns; the correlation and {shuffles} shuffles; best of {rounds} rounds")
    print(f"{'non-zeros sorted':<26}{'seconds':>10}{'peak MiB':>10}{'B/non-zero':>12}")
    for name, t, mem in (("per pattern (before)", t_old, m_old), ("once (ours)", t_new, m_new)):
        print(f"{name:<26}{t:>10.3f}{mem:>10.1f}{mem * 2**20 / max(csr.nnz, 1):>12.1f}")
    print(f"max |rho difference, sorted once| {diff:.2e}, same NaNs: {same_nan}")
    ratio = t_old / t_new
    ok = ratio >= 3 and diff < 1e-9 and same_nan
    print(f"target spearman_sort_once: {ratio:.1f}x (goal >= 3x) {'PASS' if ok else 'FAIL'}")


def pca_sort_once(n: int, m: int, rounds: int, rng: np.random.Generator) -> None:
    """The PCA baseline's Spearman work (its m dense components; the correlation and the shuffles,
    ceil(1000 / m) of them): ranked per pattern with rankdata (before) vs sorted once (ours)."""
    codes = rng.normal(size=(n, m)).astype(np.float32)
    votes = shuffled_votes(n, m, rng)

    def before():
        return [dense_ranks(codes, v, 20) for v in votes]

    def ours():
        ranked = compare.sort_columns(codes)
        return [compare.spearman(ranked, v, 20)[0] for v in votes]

    t_old, rho_old = timed(before, rounds)
    t_new, rho_new = timed(ours, rounds)
    diff, same_nan = agreement(rho_old, rho_new)
    print(f"PCA codes {n} x {m} (dense); the correlation and {len(votes) - 1} shuffles; "
          f"best of {rounds} rounds")
    print(f"{'dense codes ranked':<26}{'seconds':>10}")
    for name, t in (("per pattern (before)", t_old), ("sorted once (ours)", t_new)):
        print(f"{name:<26}{t:>10.3f}")
    print(f"max |rho difference, PCA sorted once| {diff:.2e}, same NaNs: {same_nan}")
    ratio = t_old / t_new
    ok = ratio >= 2 and diff < 1e-9 and same_nan
    print(f"target pca_spearman_sort_once: {ratio:.1f}x (goal >= 2x) {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
