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
Usage: ``python bench/compare.py [--galaxies 8000] [--latents 2048] [--k 32] [--questions 3]``.
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
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    codes = topk_codes(args.galaxies, args.latents, args.k, rng)
    labels = votes(args.galaxies, args.questions, rng)

    def dense():
        saved, compare.SPARSE_BELOW = compare.SPARSE_BELOW, 0.0
        try:
            return compare.spearman(codes, labels, 20)[0]
        finally:
            compare.SPARSE_BELOW = saved

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
