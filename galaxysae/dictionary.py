"""A dictionary is anything that turns raw embeddings into feature activations: an SAE or PCA.

Every artifact directory (local or ``s3://``) carries a ``cfg.json`` whose ``kind`` says what it
is: ``"sae"`` (TopK or Matryoshka/BatchTopK, loaded by :mod:`galaxysae.sae`) or ``"pca"``
(:class:`PCA`, written by ``galaxysae pca``). Downstream jobs (render, compare, atlas) only see
:class:`Dictionary`: ``encode(x_raw[B, D]) -> codes[B, M]``, the number of latents, a family name
for the results folder and the Matryoshka levels (one level for a flat dictionary).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Dictionary", "PCA", "load", "read_json", "family_of"]

PCA_WEIGHTS = "pca.safetensors"


def read_json(url: str) -> dict:
    from galaxysae import storage

    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist (is this a dictionary artifact directory?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{url} is not valid JSON ({exc})") from None


def family_of(cfg: dict) -> str:
    """Results folder name, as in the original code: ``sae``, ``matryoshka_sae`` or ``pca``."""
    if cfg.get("kind") == "pca":
        return "pca"
    groups = cfg.get("matryoshka_groups") or cfg.get("group_sizes") or []
    return "matryoshka_sae" if len(groups) > 1 else "sae"


class PCA:
    """Principal components of standardised embeddings, in the shape of an SAE.

    ``encode(x[B, D]) -> scores[B, M]`` with ``scores = ((x - mean) / std) @ components.T``;
    ``components`` is ``[M, D]`` (unit rows, by decreasing explained variance).
    """

    kind = "pca"

    def __init__(self, components: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 explained_variance: np.ndarray):
        self.components = np.asarray(components, dtype=np.float32)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.explained_variance = np.asarray(explained_variance, dtype=np.float64)

    @property
    def n_latents(self) -> int:
        return int(self.components.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.components.shape[1])

    def encode(self, x: Any) -> np.ndarray:
        """x[B, D] raw embeddings -> scores[B, M] (float32)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"PCA expects embeddings of shape [B, {self.d_in}], got {list(x.shape)}")
        return ((x - self.mean) / self.std) @ self.components.T

    def decode(self, scores: Any) -> np.ndarray:
        """scores[B, M] -> reconstructed raw embeddings x_hat[B, D]."""
        z = np.asarray(scores, dtype=np.float32) @ self.components
        return z * self.std + self.mean

    def tensors(self) -> dict[str, np.ndarray]:
        return {"components": self.components, "mean": self.mean, "std": self.std,
                "explained_variance": self.explained_variance.astype(np.float64)}

    @classmethod
    def from_tensors(cls, t: dict) -> "PCA":
        return cls(t["components"], t["mean"], t["std"], t["explained_variance"])


@dataclass
class Dictionary:
    """A loaded artifact. ``levels`` are the cumulative Matryoshka prefix sizes (``[M]`` if flat)."""

    url: str
    kind: str
    family: str
    n_latents: int
    d_in: int
    levels: list[int]
    cfg: dict
    metrics: dict
    model: Any = field(repr=False)

    @property
    def name(self) -> str:
        return posixpath.basename(str(self.url).rstrip("/")) or self.family

    @property
    def signed(self) -> bool:
        """PCA scores are signed and dense; SAE codes are non-negative and sparse."""
        return self.kind == "pca"

    def level_of(self, features: Any) -> np.ndarray:
        """features[F] -> 1-based Matryoshka level of each (1 for a flat dictionary)."""
        return np.searchsorted(np.asarray(self.levels), np.asarray(features), side="right") + 1

    def encode(self, x: Any) -> np.ndarray:
        """x[B, D] raw embeddings (float32) -> codes[B, M] (float32 numpy)."""
        if self.kind == "pca":
            return self.model.encode(x)
        import torch

        with torch.no_grad():
            codes = self.model.encode(torch.as_tensor(np.asarray(x, dtype=np.float32)))
        return codes.float().cpu().numpy()


def _load_pca(url: str) -> PCA:
    import tempfile

    from safetensors.numpy import load_file

    from galaxysae import storage

    blob = storage.read_bytes(storage.join(url, PCA_WEIGHTS))
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as fh:
        fh.write(blob)
        fh.flush()
        return PCA.from_tensors(load_file(fh.name))


def load(url: str) -> Dictionary:
    """Load any dictionary artifact (local dir or ``s3://`` prefix) by its ``cfg.json`` kind."""
    from galaxysae import storage

    url = str(url).rstrip("/")
    cfg = read_json(storage.join(url, "cfg.json"))
    kind = cfg.get("kind")
    metrics_url = storage.join(url, "metrics.json")
    metrics = read_json(metrics_url) if storage.exists(metrics_url) else {}
    if kind == "pca":
        model = _load_pca(url)
        n, d = model.n_latents, model.d_in
        levels = [n]
    elif kind == "sae":
        try:
            from galaxysae.sae import SparseAutoencoder
        except ImportError as exc:  # pragma: no cover - part of the package
            raise ImportError(f"{url}: loading an SAE needs galaxysae.sae ({exc})") from exc
        model = SparseAutoencoder.load(url)
        model.eval()
        n, d = int(model.n_latents), int(model.d_in)
        groups = [int(g) for g in (cfg.get("matryoshka_groups") or [])]
        levels = list(np.cumsum(groups).tolist()) if len(groups) > 1 else [n]
        if levels[-1] != n:
            raise ValueError(f"{url}/cfg.json: matryoshka_groups sum to {levels[-1]} but the SAE has {n} latents")
    else:
        raise ValueError(f"{url}/cfg.json: unknown dictionary kind {kind!r} (expected 'sae' or 'pca')")
    return Dictionary(url=url, kind=kind, family=family_of(cfg), n_latents=n, d_in=d,
                      levels=[int(v) for v in levels], cfg=cfg, metrics=metrics, model=model)
