"""The real chain the atlas tests stand on, built once per session: synth -> embed -> pca + SAE.

Generated galaxies (morphology drives the Galaxy Zoo votes), embedded by the offline-Hub stand-in
encoder through the real embed job on the test Ray cluster, then a PCA baseline and a small
Matryoshka SAE trained by the real train job. Small enough for 2 shared cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_CACHE: dict = {}


@dataclass
class Chain:
    root: Path
    dataset: Path
    embeddings: Path
    pca: Path
    matryoshka: Path


def build(session_root: Path) -> Chain:
    if "chain" in _CACHE:
        return _CACHE["chain"]
    from galaxysae import config, embed, pca, synth, train

    root = session_root / "atlas_chain"
    ds, emb = root / "gz_euclid", root / "embeddings"
    synth.run(config.from_dict(synth.Config, {
        "out": str(ds), "n_train": 200, "n_test": 120, "image_size": 64, "shard_size": 60, "seed": 3}))
    embed.run(config.from_dict(embed.Config, {
        "dataset": str(ds), "output": str(emb), "encoder": "hf_hub:mwalmsley/zoobot-encoder-euclid",
        "image_size": 64, "splits": ["train", "test"]}))
    pca.run(config.from_dict(pca.Config, {"embeddings": str(emb), "output": str(root / "pca"),
                                          "n_components": 16}))
    train.run(config.from_dict(train.Config, {
        "embeddings": str(emb), "output": str(root / "matryoshka"), "mode": "local", "epochs": 10,
        "batch_size": 64, "model": {"activation": "batchtopk", "n_latents": 64, "k": 4,
                                    "matryoshka_groups": [8, 8, 16, 32], "multik": 0, "aux_k": 4},
        "optim": {"lr": 1e-3}}))
    chain = Chain(root, ds, emb, root / "pca", root / "matryoshka")
    _CACHE["chain"] = chain
    return chain
