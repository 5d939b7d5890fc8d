"""Evaluating an SAE on held-out embeddings: FVU, MSE, L0, dead latents, per Matryoshka level,
next to PCA with as many components as the SAE's L0.

All errors are measured in the SAE's standardised space (per-dimension z-scores with the train
statistics stored in the artifact), where the SAE was trained and where the PCA baseline of the
research code works; FVU = sum of squared errors / total sum of squares around the test mean.

The codes are k-sparse, so nothing here holds a dense code [b, M]: a chunk's active latents
(``_active``: rows, latents, values) are decoded by ``embedding_bag`` in float64, b*k*D work
instead of the b*M*D of a dense decode, a Matryoshka level summing only the entries of its group.
The train sample only says which latents ever fire, which most of its rows settle without the
full encode (``_mark_fired``). The metrics are those of the dense evaluation this replaced, to
float64 rounding (tests/test_evaluation.py; bench/evaluation.py times both).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from galaxysae import storage
from galaxysae.embeddings import as_tensor

log = logging.getLogger(__name__)

__all__ = ["evaluate", "write", "plot"]


def _active(model, x):
    """The non-zero entries of ``model.encode(x)`` for raw x[b, D], without the dense code:
    (rows [n] ascending, latents [n], values [n] > 0). TopK: a row's k largest pre-activations
    that are positive; BatchTopK: those above the threshold, a variable number per row."""
    import torch

    pre = model.pre_acts(x)  # [b, M]
    if model.cfg.activation == "batchtopk":
        rows, cols = (pre > model.threshold.clamp_min(0)).nonzero().unbind(1)
        return rows, cols, pre[rows, cols]
    vals, cols = pre.topk(model.cfg.k, dim=-1)  # the same call as encode: the same ties
    keep = vals > 0
    rows = torch.arange(len(pre)).unsqueeze(1).expand_as(cols)
    return rows[keep], cols[keep], vals[keep]


def _bag_sum(rows, cols, vals, w, n_rows: int):
    """sum_j vals[j] * w[cols[j]] per row of the entries (rows ascending) -> [n_rows, D] in w's
    dtype: rows without an entry are 0."""
    import torch
    import torch.nn.functional as F

    offsets = torch.zeros(n_rows + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return F.embedding_bag(cols, w, offsets, mode="sum", per_sample_weights=vals.to(w.dtype),
                           include_last_offset=True)


def _mark_fired(model, x: np.ndarray, fired, popular, batch: int) -> None:
    """Mark in fired[M] (in place) every latent that fires on some row of raw x[N, D];
    ``popular``: latents, the most frequent first.

    Only the latents not yet marked (C) matter, and one fires on a row only if its pre-activation
    passes the row's cutoff: BatchTopK's threshold (and 0); TopK's k-th largest pre-activation
    of the row (and 0), at least the k-th largest over S, the most popular marked latents. So a
    chunk costs a [b, |C|] matmul, and [b', |S|] for the b' rows with a latent of C above 0, not
    the full [b, M]; only rows where a latent of C comes within rounding of the cutoff's bound
    are encoded in full (``_active``). A trained SAE leaves few latents unmarked by the test rows.
    """
    import torch

    cfg = model.cfg
    M, k = cfg.n_latents, cfg.k
    n_ref = max(4 * k, M // 16)
    # b + z.w computed in float32 is off by at most about (D + 1) eps (|b| + |z||w|) (Cauchy-
    # Schwarz), whatever the order of summation: 4x that on each side is ample, so no row that
    # fires a latent of C in the full encode is passed over here
    tol = 4 * (cfg.d_in + 1) * torch.finfo(model.W_enc.dtype).eps
    w_norm, b_abs = model.W_enc.norm(dim=1), model.b_enc.abs()
    floor = model.threshold.clamp_min(0) if cfg.activation == "batchtopk" else torch.zeros(())
    for i in range(0, len(x), batch):
        unfired = (~fired).nonzero().squeeze(1)
        if not len(unfired):
            return
        xb = as_tensor(x[i:i + batch])
        ref = popular[fired[popular]][:n_ref] if cfg.activation == "topk" else popular[:0]
        if len(unfired) + len(ref) > M // 2 or (cfg.activation == "topk" and len(ref) < k):
            fired[_active(model, xb)[1]] = True  # the shortcut would cost about as much
            continue
        zc = model.standardize(xb) - model.b_pre
        z_norm = zc.norm(dim=1, keepdim=True)  # [b, 1]
        pre = torch.addmm(model.b_enc[unfired], zc, model.W_enc[unfired].t())  # [b, |C|]
        reach = pre + tol * (z_norm * w_norm[unfired] + b_abs[unfired])  # >= the exact value
        near = (reach >= floor).any(1).nonzero().squeeze(1)
        if cfg.activation == "topk" and len(near):
            pre_s = torch.addmm(model.b_enc[ref], zc[near], model.W_enc[ref].t())  # [b', |S|]
            bound = pre_s.topk(k, dim=1).values[:, -1:]
            bound = bound - tol * (z_norm[near] * w_norm[ref].max() + b_abs[ref].max())
            near = near[(reach[near] >= bound).any(1)]
        if len(near):
            fired[_active(model, xb[near])[1]] = True


def evaluate(model, test_x: np.ndarray, train_x: np.ndarray, batch: int = 4096,
             max_train: int = 65536, seed: int = 0) -> dict:
    """Metrics of ``model`` on raw test_x[N, D]; train_x[N', D] fits the PCA baseline."""
    import torch

    model = model.cpu().eval()
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    if len(train_x) > max_train:
        train_x = train_x[rng.permutation(len(train_x))[:max_train]]
    with torch.no_grad():
        z = model.standardize(as_tensor(test_x)).double()
        total = (z - z.mean(0)).pow(2).sum().item()
        ends = cfg.level_ends
        sse = np.zeros(len(ends))
        l0 = np.zeros(len(ends))
        counts = torch.zeros(cfg.n_latents, dtype=torch.long)  # firings per latent on test
        W = model.W_dec.double()
        b = model.b_pre.double()
        for i in range(0, len(test_x), batch):
            rows, cols, vals = _active(model, as_tensor(test_x[i:i + batch]))
            zb = z[i:i + batch]
            counts += torch.bincount(cols, minlength=cfg.n_latents)
            x_hat = b.expand_as(zb).clone()
            start = 0
            for j, end in enumerate(ends):  # level j adds the latents start..end-1
                sel = (cols >= start) & (cols < end)
                x_hat += _bag_sum(rows[sel], cols[sel], vals[sel], W, len(zb))
                sse[j] += (zb - x_hat).pow(2).sum().item()
                l0[j] += (cols < end).sum().item()
                start = end
        fired = counts > 0
        _mark_fired(model, train_x, fired, counts.argsort(descending=True), batch)
    return summary(model, z.shape, total, sse, l0, fired,
                   lambda components: _pca_fvu(model, train_x, test_x, components))


def summary(model, shape: tuple[int, int], total: float, sse: np.ndarray, l0: np.ndarray, fired,
            pca_fvu) -> dict:
    """The metrics dict from the sums over the test rows (shape [n, d]; per nested level:
    squared errors ``sse`` and active latents ``l0``; ``total`` sum of squares about the mean),
    ``fired`` [M] (latents seen firing) and ``pca_fvu`` (numbers of components -> their FVU)."""
    cfg = model.cfg
    n, d = shape
    fvu = sse / max(total, 1e-12)
    l0 = l0 / n
    pca = pca_fvu([int(round(v)) for v in l0])
    levels = [{"n_latents": int(e), "fvu": float(f), "mse": float(s / (n * d)), "l0": float(l),
               "pca_fvu": float(p), "pca_components": int(round(l))}
              for e, f, s, l, p in zip(cfg.level_ends, fvu, sse, l0, pca)]
    top = levels[-1]
    return {
        "n_test": int(n), "d_in": int(d), "n_latents": int(cfg.n_latents), "k": int(cfg.k),
        "activation": cfg.activation, "fvu": top["fvu"], "mse": top["mse"], "l0": top["l0"],
        "dead_fraction": float(1 - fired.float().mean().item()),
        "dead_fraction_train": float(model.dead_fraction().item()),
        "pca": {"n_components": top["pca_components"], "fvu": top["pca_fvu"]},
        "levels": levels,
    }


def _pca_fvu(model, train_x: np.ndarray, test_x: np.ndarray, n_components: list[int]) -> list[float]:
    """FVU of PCA (fit on standardised train) with each number of components, on test."""
    import torch

    with torch.no_grad():
        ztr = model.standardize(as_tensor(train_x)).double().numpy()
        zte = model.standardize(as_tensor(test_x)).double().numpy()
    mean = ztr.mean(0)
    # Principal axes: eigenvectors of the centred train data's Gram matrix [D, D], largest first,
    # the right singular vectors of its SVD (same subspaces to ~1e-15 in float64) at a tenth of
    # the cost: vt[:n] spans the best n-dim subspace.
    ztr -= mean
    vt = np.linalg.eigh(ztr.T @ ztr)[1][:, ::-1].T
    total = ((zte - zte.mean(0)) ** 2).sum()
    out = []
    for c in n_components:
        c = max(0, min(c, len(ztr), vt.shape[0]))
        proj = (zte - mean) @ vt[:c].T @ vt[:c] + mean
        out.append(float(((zte - proj) ** 2).sum() / max(total, 1e-12)))
    return out


def plot(metrics: dict, title: str = "") -> bytes:
    """The seed's 'SAE performance vs dictionary size' figure as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = metrics["levels"]
    sizes = [lv["n_latents"] for lv in levels]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(sizes, [1 - lv["fvu"] for lv in levels], "o-", label="SAE")
    a1.plot(sizes, [1 - lv["pca_fvu"] for lv in levels], "s--", label="PCA (components = L0)")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("dictionary size (nested prefix)")
    a1.set_ylabel("explained variance (test)")
    a1.legend()
    a2.plot(sizes, [lv["mse"] for lv in levels], "o-")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("dictionary size (nested prefix)")
    a2.set_ylabel("MSE (standardised)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"SAE performance vs dictionary size (k={metrics['k']}, "
                          f"L0={metrics['l0']:.1f}, dead={metrics['dead_fraction']:.1%})")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write(metrics: dict, model, output: str) -> None:
    """eval.png, then metrics.json (last: its presence marks a finished artifact)."""
    storage.write_bytes(storage.join(output, "eval.png"), plot(metrics))
    storage.write_bytes(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2).encode())
