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
``cfg.json`` is written last: it marks a finished artifact, and a rerun skips one when it was
made with the same settings (config.toml) from the same embedding files (``inputs.json``: their
:func:`galaxysae.embeddings.fingerprint`, taken before the fit); otherwise the rerun stops,
naming what differs. ``--overwrite`` removes the marker before it writes anything, so a refit
that dies half way is not taken for a finished one.
"""

from __future__ import annotations

import io
import json
import logging
import tomllib
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


# What decides the artifact: its inputs (for a .npy input, which rows are held out) and the fit.
# A finished artifact made with other values is not kept as this config's; overwrite and output
# are not settings of the fit.
SETTINGS = ("embeddings", "ids", "test_embeddings", "test_ids", "test_fraction", "split_seed",
            "train_split", "test_split", "n_components")
NPY_ONLY = ("ids", "test_embeddings", "test_ids", "test_fraction", "split_seed")  # unused for parquet
PATHS = ("embeddings", "ids", "test_embeddings", "test_ids")  # compared as paths


def input_fingerprint(cfg: Config) -> dict[str, str]:
    """:func:`galaxysae.embeddings.fingerprint` of the files this config fits and tests on."""
    return embeddings.fingerprint(cfg.embeddings, (cfg.train_split, cfg.test_split), ids=cfg.ids,
                                  test_path=cfg.test_embeddings, test_ids=cfg.test_ids)


def settings_changes(saved: dict, cfg: Config) -> list[str]:
    """``SETTINGS`` keys whose value in ``cfg`` differs from the ``saved`` config.toml ("key: old
    -> new"); a key either side lacks is not compared. ``cfg`` is compared as config.save writes
    it (absolute paths, secrets in URLs redacted), so the same inputs compare equal."""
    now = config.redact(config.to_dict(cfg))
    keys = [k for k in SETTINGS if k not in NPY_ONLY or embeddings.is_npy(cfg.embeddings)]
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in keys
            if k in saved and k in now and saved[k] != now[k]
            and not (k in PATHS and embeddings.same_input(saved[k], now[k]))]


def check_same_settings(cfg: Config, out: str) -> None:
    """Refuse, naming what differs, to keep a finished artifact fitted with other settings (its
    config.toml): it is not what this config describes."""
    saved_url = storage.join(out, "config.toml")
    if not storage.exists(saved_url):
        return
    changes = settings_changes(tomllib.loads(storage.read_bytes(saved_url).decode()), cfg)
    if changes:
        raise config.ConfigError(
            f"{out} holds a PCA fit with other settings ({'; '.join(changes)}): rerun with the "
            f"settings in {saved_url} to keep it, with --overwrite to refit it, or write to "
            f"another --output")


def check_same_inputs(cfg: Config, out: str, stamps: dict[str, str]) -> None:
    """Refuse to keep a finished artifact whose embedding files changed since it was fitted
    (re-embedded in place: the same URLs, other rows or values), naming the files. An artifact
    written before the stamps were recorded is kept, said in the log."""
    changes = embeddings.recorded_changes(out, stamps)
    if changes is None:
        log.info("%s records no stamps of its embeddings (written by an earlier version): cannot "
                 "tell whether %s changed since the fit; keeping it (--overwrite to refit)",
                 out, cfg.embeddings)
    elif changes:
        raise config.ConfigError(
            f"{out} holds a PCA fit of other embeddings: {cfg.embeddings} changed since it was "
            f"fitted ({config.listed(changes)}; stamps in {storage.join(out, embeddings.INPUTS)}): "
            f"rerun with --overwrite to refit it, or write to another --output")


def run(cfg: Config) -> dict:
    from safetensors.numpy import save as st_save

    # Ray Data's read tasks run elsewhere; a relative output in a `ray job submit` copy is refused
    cfg = config.absolute_paths(cfg, inputs=("embeddings", "ids", "test_embeddings", "test_ids"),
                                outputs=("output",))
    out = cfg.output.rstrip("/")
    cfg_url = storage.join(out, "cfg.json")
    # before the fit reads them: files rewritten during the fit then differ on the next rerun
    stamps = input_fingerprint(cfg)
    if storage.exists(cfg_url) and not cfg.overwrite:
        check_same_settings(cfg, out)
        check_same_inputs(cfg, out, stamps)
        log.info("PCA artifact %s exists: skipping (--overwrite to refit)", out)
        return json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    storage.check_writable(out)  # wrong credentials / unreachable store: fail before fitting
    train_rows, test_rows = inputs(cfg)
    pca, n_train = fit(train_rows(), _where(cfg, cfg.train_split), cfg.n_components)
    # the old marker goes before the first file of the refit is written (the test scores): a
    # refit killed half way must not leave new files under it, taken for finished by a rerun
    storage.remove(cfg_url)
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
    embeddings.record_fingerprint(out, stamps)
    storage.write_bytes(cfg_url, json.dumps({
        "kind": "pca", "d_in": pca.d_in, "n_latents": m, "standardise": True,
        "weights": PCA_WEIGHTS, "fit_split": cfg.train_split, "n_train": n_train,
    }, indent=1).encode())
    log.info("PCA: %d components of %d-d embeddings from %d galaxies; %s -> %s", m, pca.d_in,
             n_train, f"test FVU {metrics['fvu']:.3f}" if test_fvu is not None else "no test split", out)
    return metrics
