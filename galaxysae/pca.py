"""Job ``pca``: the PCA baseline, written as one more dictionary artifact.

Data flow::

    {embeddings}/train/*.parquet --stream, float64 moments (n, sum x, X^T X)--> standardise
    (per-dimension mean/std, like the SAE) --> eigendecomposition of the correlation matrix
    {embeddings}/test/*.parquet  --stream--> scores, test FVU per number of components
    --> {output}/pca.safetensors, cfg.json ("kind": "pca"), metrics.json, config.toml,
        explained_variance.png, scores/test.parquet

The fit streams one embeddings file at a time, so memory is O(D^2) whatever the split size.
A research ``.npy`` input is read as train reads it (:func:`galaxysae.embeddings.load`: its ids,
its test file or the hold-out drawn from ``split_seed``), whole, so PCA and an SAE trained on the
same file with the same keys fit and test on the same rows.
``cfg.json`` is written last: it marks a finished artifact, and a rerun skips one.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from galaxysae import config, embeddings, storage
from galaxysae.activations import read_embeddings
from galaxysae.dictionary import PCA, PCA_WEIGHTS

log = logging.getLogger(__name__)


@dataclass
class Config:
    """The PCA baseline: principal components of standardised embeddings, saved like an SAE."""

    embeddings: str = field(default="", metadata={"help": (
        "embed output (dir or s3:// prefix with {split}/*.parquet), or a research .npy [N, D] "
        "read as train reads it (ids, test_embeddings or a held-out test_fraction)")})
    ids: str = field(default="", metadata={"help": ".npy input: its ids file (default: beside it)"})
    test_embeddings: str = field(default="", metadata={
        "help": ".npy input: its test file (default: found as train finds it)"})
    test_ids: str = field(default="", metadata={"help": ".npy input: ids of test_embeddings"})
    test_fraction: float = field(default=0.1, metadata={"help": ".npy input without a test file"})
    split_seed: int = field(default=0, metadata={
        "help": ".npy input without a test file: seeds the hold-out, as train's split_seed"})
    output: str = field(default="", metadata={"help": "artifact directory (local or s3://)"})
    n_components: int = field(default=32, metadata={"help": "number of principal components kept"})
    train_split: str = field(default="train", metadata={"help": "split the components are fitted on"})
    test_split: str = field(default="test", metadata={"help": "split scored and evaluated ('' to skip)"})
    overwrite: bool = field(default=False, metadata={"help": "refit even if the artifact exists"})

    def validate(self) -> None:
        if not self.embeddings:
            raise ValueError("key 'embeddings' is required (the embed output)")
        if not self.output:
            raise ValueError("key 'output' is required (the artifact directory)")
        if self.n_components < 1:
            raise ValueError(f"key 'n_components' must be >= 1, got {self.n_components}")


def inputs(cfg: Config):
    """(train rows, test rows): functions of the expected width (None: any) that yield
    ``(source, ids[B], x[B, D])``: per parquet file of the embed output, streamed; or, for a
    research .npy, the train and test Splits of :func:`embeddings.load`, read once here."""
    if not embeddings.is_npy(cfg.embeddings):
        return (lambda d_in=None: read_embeddings(cfg.embeddings, cfg.train_split, d_in=d_in),
                lambda d_in=None: read_embeddings(cfg.embeddings, cfg.test_split, d_in=d_in))
    train, test = embeddings.load(cfg.embeddings, cfg.train_split, cfg.test_split, cfg.ids,
                                  cfg.test_fraction, split_seed=cfg.split_seed,
                                  test_path=cfg.test_embeddings, test_ids=cfg.test_ids)
    return (lambda d_in=None: iter([(train.source, train.ids, train.x)]),
            lambda d_in=None: iter([(test.source, test.ids, test.x)]))


def fit(rows, where: str, n_components: int) -> tuple[PCA, int]:
    """Fit on the ``rows`` (source, ids[B], x[B, D]) of ``where``, one batch at a time;
    -> (PCA, number of training galaxies)."""
    n, s, xtx = 0, None, None
    for _, _, x in rows:
        x64 = x.astype(np.float64)
        if s is None:
            s, xtx = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != len(s):
            raise ValueError(f"{where}: files disagree on the embedding width")
        n += len(x64)
        s += x64.sum(0)
        xtx += x64.T @ x64
    if n < 2:
        raise ValueError(f"{where}: PCA needs at least 2 galaxies, found {n}")
    d = len(s)
    mean = s / n
    cov = (xtx - n * np.outer(mean, mean)) / (n - 1)
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    # a constant dimension carries no information: keep it out of the correlation (std := 1),
    # by the SAE's rule, so both baselines standardise alike
    std = _safe_std(mean, std)
    corr = cov / np.outer(std, std)
    evals, evecs = np.linalg.eigh(corr)
    order = np.argsort(evals)[::-1][: min(n_components, d)]
    evals, comps = np.clip(evals[order], 0, None), evecs[:, order].T
    # a deterministic sign: the largest loading of each component is positive
    flip = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    comps *= flip[:, None]
    if n_components > d:
        log.warning("n_components=%d > embedding width %d: keeping %d", n_components, d, d)
    return PCA(comps, mean, std, evals), n


def _safe_std(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """:func:`galaxysae.sae.safe_std` on float64 arrays [D]."""
    import torch

    from galaxysae.sae import safe_std

    return safe_std(torch.from_numpy(mean), torch.from_numpy(std)).numpy()


def evaluate(pca: PCA, rows, where: str, scores_url: str | None):
    """Scores of every galaxy in the ``rows`` (source, ids[B], x[B, D]) of ``where`` and the FVU
    using the first k components, k = 1..M.

    FVU is measured in the standardised space the components live in (the same space the SAE
    reconstructs): sum ||z - z_hat_k||^2 / sum ||z - mean(z)||^2.
    """
    import pyarrow as pa

    m = pca.n_latents
    n, ss_total_raw, z_sum, score_sq = 0, 0.0, None, np.zeros(m)
    tables = []
    for _, ids, x in rows:
        z = ((x - pca.mean) / pca.std).astype(np.float64)
        scores = z @ pca.components.T.astype(np.float64)
        n += len(z)
        z_sum = z.sum(0) if z_sum is None else z_sum + z.sum(0)
        ss_total_raw += float((z ** 2).sum())
        score_sq += (scores ** 2).sum(0)
        flat = pa.array(scores.astype(np.float32).ravel(), pa.float32())
        tables.append(pa.table({"id_str": pa.array(list(ids), pa.string()),
                                "scores": pa.FixedSizeListArray.from_arrays(flat, m)}))
    if n == 0:
        raise ValueError(f"{where}: no galaxies to evaluate")
    ss_total = ss_total_raw - float((z_sum ** 2).sum()) / n
    residual = ss_total_raw - np.cumsum(score_sq)
    fvu = np.clip(residual / ss_total, 0, None)
    if scores_url:
        storage.write_parquet(pa.concat_tables(tables), scores_url)
    return fvu, n, residual[-1] / (n * pca.d_in)


def plot(pca: PCA, test_fvu, url: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = pca.explained_variance / pca.d_in
    k = np.arange(1, len(ratio) + 1)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    ax[0].bar(k, ratio * 100, color="#4c72b0")
    ax[0].set(xlabel="principal component", ylabel="explained variance (%)",
              title="Per component (train split)")
    ax[1].plot(k, np.cumsum(ratio) * 100, "o-", ms=3, label="train (fit)")
    if test_fvu is not None:
        ax[1].plot(k, (1 - np.asarray(test_fvu)) * 100, "s--", ms=3, label="test (1 - FVU)")
    ax[1].set(xlabel="number of components", ylabel="cumulative explained variance (%)",
              title="Cumulative", ylim=(0, 100))
    ax[1].grid(alpha=0.3)
    ax[1].legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())


def _where(cfg: Config, split: str) -> str:
    """The input named in messages: {embeddings}/{split}, or the .npy file."""
    return cfg.embeddings if embeddings.is_npy(cfg.embeddings) else f"{cfg.embeddings}/{split}"


def run(cfg: Config) -> dict:
    from safetensors.numpy import save as st_save

    # Ray Data's read tasks run elsewhere; a relative output in a `ray job submit` copy is refused
    cfg = config.absolute_paths(cfg, inputs=("embeddings", "ids", "test_embeddings", "test_ids"),
                                outputs=("output",))
    out = cfg.output.rstrip("/")
    cfg_url = storage.join(out, "cfg.json")
    if storage.exists(cfg_url) and not cfg.overwrite:
        log.info("PCA artifact %s exists: skipping (--overwrite to refit)", out)
        return json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    storage.check_writable(out)  # wrong credentials / unreachable store: fail before fitting
    train_rows, test_rows = inputs(cfg)
    pca, n_train = fit(train_rows(), _where(cfg, cfg.train_split), cfg.n_components)
    m = pca.n_latents
    ratio = pca.explained_variance / pca.d_in
    metrics: dict = {
        "kind": "pca", "n_latents": m, "n_train": n_train,
        "explained_variance_ratio": ratio.tolist(),
        "cumulative_explained_variance": np.cumsum(ratio).tolist(),
        # PCA scores are dense: every component is "active" for every galaxy
        "l0": float(m), "dead_fraction": 0.0,
    }
    test_fvu = None
    if cfg.test_split:
        test_fvu, n_test, mse = evaluate(pca, test_rows(pca.d_in), _where(cfg, cfg.test_split),
                                         storage.join(out, "scores", f"{cfg.test_split}.parquet"))
        metrics.update({
            "split": cfg.test_split, "n_test": n_test, "fvu": float(test_fvu[-1]), "mse": float(mse),
            "fvu_by_components": [float(v) for v in test_fvu],
            # the same per-level shape as an SAE's metrics (level k = the first k components)
            "levels": [{"n_latents": k + 1, "fvu": float(v), "l0": float(k + 1)} for k, v in enumerate(test_fvu)],
        })
    storage.write_bytes(storage.join(out, PCA_WEIGHTS), st_save(pca.tensors()))
    storage.write_bytes(storage.join(out, "metrics.json"), json.dumps(metrics, indent=1).encode())
    plot(pca, test_fvu, storage.join(out, "explained_variance.png"))
    config.save(cfg, out)
    storage.write_bytes(cfg_url, json.dumps({
        "kind": "pca", "d_in": pca.d_in, "n_latents": m, "standardise": True,
        "weights": PCA_WEIGHTS, "fit_split": cfg.train_split, "n_train": n_train,
    }, indent=1).encode())
    log.info("PCA: %d components of %d-d embeddings from %d galaxies; %s -> %s", m, pca.d_in,
             n_train, f"test FVU {metrics['fvu']:.3f}" if test_fvu is not None else "no test split", out)
    return metrics
