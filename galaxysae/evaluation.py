"""Evaluating an SAE on held-out embeddings: FVU, MSE, L0, dead latents, per Matryoshka level,
next to PCA with as many components as the SAE's L0.

All errors are measured in the SAE's standardised space (per-dimension z-scores with the train
statistics stored in the artifact), where the SAE was trained and where the PCA baseline of the
research code works; FVU = sum of squared errors / total sum of squares around the test mean.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from galaxysae import storage
from galaxysae.embeddings import as_tensor

log = logging.getLogger(__name__)

__all__ = ["evaluate", "write", "plot"]


def _codes(model, x: np.ndarray, batch: int):
    """Yield dense codes [b, M] chunk by chunk (never the whole [N, M] at once)."""
    import torch

    with torch.no_grad():
        for i in range(0, len(x), batch):
            yield model.encode(as_tensor(x[i:i + batch]))


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
        fired = torch.zeros(cfg.n_latents, dtype=torch.bool)
        W = model.W_dec.double()
        b = model.b_pre.double()
        for i, codes in enumerate(_codes(model, test_x, batch)):
            codes = codes.double()
            zb = z[i * batch:(i + 1) * batch]
            fired |= (codes > 0).any(0)
            x_hat = b.expand_as(zb).clone()
            start = 0
            for j, end in enumerate(ends):
                x_hat = x_hat + codes[:, start:end] @ W[start:end]
                sse[j] += (zb - x_hat).pow(2).sum().item()
                l0[j] += (codes[:, :end] > 0).sum().item()
                start = end
        for codes in _codes(model, train_x, batch):
            fired |= (codes > 0).any(0)
    n, d = z.shape
    fvu = sse / max(total, 1e-12)
    l0 = l0 / n
    pca_fvu = _pca_fvu(model, train_x, test_x, [int(round(v)) for v in l0])
    levels = [{"n_latents": int(e), "fvu": float(f), "mse": float(s / (n * d)), "l0": float(l),
               "pca_fvu": float(p), "pca_components": int(round(l))}
              for e, f, s, l, p in zip(ends, fvu, sse, l0, pca_fvu)]
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
    # Principal axes from the SVD of the centred train data: Vt[:n] spans the best n-dim subspace.
    _, _, vt = np.linalg.svd(ztr - mean, full_matrices=False)
    total = ((zte - zte.mean(0)) ** 2).sum()
    out = []
    for c in n_components:
        c = max(0, min(c, vt.shape[0]))
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
