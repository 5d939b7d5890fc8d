"""Feature activations of one split under one dictionary, and per-feature statistics.

Data flow::

    {embeddings}/{split}/*.parquet  --Ray Data read_parquet (id_str, embedding)-->
    Encode actors (load the dictionary once, codes = encode(x))  --> sparse (id_str, feature, value)
    --> driver: activations.parquet + features.parquet (frequency, mean, max, top-N ids)

Outputs under ``out`` (local or ``s3://``), written atomically, ``_SUCCESS`` last, so a rerun
with the same inputs reuses them:

- ``activations.parquet``: ``id_str`` (string), ``feature`` (int32), ``value`` (float32); the
  non-zero activations of an SAE, every score of a PCA (dense, signed).
- ``features.parquet``: one row per feature: ``feature``, ``level`` (1-based Matryoshka level),
  ``n_active``, ``frequency`` (fraction of galaxies with a non-zero activation; for PCA the
  fraction with a positive score), ``mean`` (over all galaxies), ``mean_active`` (over active
  ones), ``max``, ``top_ids`` / ``top_values`` (the ``top_n`` highest activations, descending),
  ``bottom_ids`` / ``bottom_values`` (a signed dictionary's ``top_n`` lowest scores, ascending;
  empty for an SAE).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from galaxysae import storage

log = logging.getLogger(__name__)

__all__ = ["embedding_files", "embedding_ids", "read_embeddings", "Encode", "compute", "load_features",
           "load_activations", "code_matrix", "ActivationSet"]


def embedding_files(embeddings: str, split: str) -> list[str]:
    """The parquet files of one split of an embed output (``{embeddings}/{split}/*.parquet``)."""
    url = storage.join(embeddings, split)
    files = storage.listdir(url, ".parquet")
    if not files:
        raise FileNotFoundError(f"no embeddings for split {split!r}: {url} has no .parquet files "
                                f"(run `galaxysae embed` first)")
    return files


def read_embeddings(embeddings: str, split: str, d_in: int | None = None):
    """Yield ``(file_url, ids[B], x[B, D] float32)`` per file, checking the width and finiteness."""
    import pyarrow.parquet as pq

    for url in embedding_files(embeddings, split):
        fs, path = storage.arrow_fs(url)
        table = pq.read_table(path, filesystem=fs, columns=["id_str", "embedding"])
        col = table.column("embedding").combine_chunks()
        width = col.type.list_size if hasattr(col.type, "list_size") else None
        if width is None or width <= 0:
            raise ValueError(f"{url}: column 'embedding' must be a fixed-size list of float32, got {col.type}")
        if d_in is not None and width != d_in:
            raise ValueError(f"{url}: embeddings are {width}-d but the dictionary expects {d_in}-d")
        x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
        ids = np.asarray(table.column("id_str").to_pylist(), dtype=object)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise ValueError(f"{url}: non-finite embeddings for ids {list(ids[bad][:5])}")
        yield url, ids, x


def embedding_ids(embeddings: str, split: str) -> list[str]:
    """Every ``id_str`` of one split, in file order (reads only that column)."""
    import pyarrow.parquet as pq

    out: list[str] = []
    for url in embedding_files(embeddings, split):
        fs, path = storage.arrow_fs(url)
        out += pq.read_table(path, filesystem=fs, columns=["id_str"]).column("id_str").to_pylist()
    return out


class Encode:
    """Ray Data operator: load the dictionary once, turn a batch of embeddings into sparse codes.

    Input batch: ``id_str[B]``, ``embedding[B, D]``; output: ``id_str[nnz]``, ``feature[nnz]``,
    ``value[nnz]`` (every score for a signed/dense dictionary like PCA).
    """

    def __init__(self, url: str, threads: int = 1):
        import torch

        from galaxysae import dictionary

        torch.set_num_threads(max(1, threads))
        self.d = dictionary.load(url)

    def __call__(self, batch: dict) -> dict:
        emb = batch["embedding"]
        x = np.stack(emb).astype(np.float32) if emb.dtype == object else np.asarray(emb, np.float32)
        codes = self.d.encode(x.reshape(len(x), -1))
        ids = np.asarray(batch["id_str"], dtype=object)
        if self.d.signed:
            rows, feats = np.indices(codes.shape).reshape(2, -1)
        else:
            rows, feats = np.nonzero(codes)
        return {"id_str": ids[rows], "feature": feats.astype(np.int32),
                "value": codes[rows, feats].astype(np.float32)}


@dataclass
class ActivationSet:
    url: str
    n_galaxies: int
    features: "object"  # pyarrow.Table (features.parquet)


def _n_rows(files: list[str]) -> int:
    import pyarrow.parquet as pq

    total = 0
    for url in files:
        fs, path = storage.arrow_fs(url)
        with fs.open_input_file(path) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def feature_stats(ids, feats, values, n_galaxies: int, n_latents: int, levels, top_n: int,
                  signed: bool):
    """Per-feature statistics from the sparse triples (numpy arrays of equal length)."""
    import pyarrow as pa

    feats = np.asarray(feats, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    active = values > 0 if signed else values != 0
    n_active = np.bincount(feats[active], minlength=n_latents)
    sums = np.bincount(feats, weights=values, minlength=n_latents)
    sums_active = np.bincount(feats[active], weights=values[active], minlength=n_latents)
    maxes = np.full(n_latents, np.nan)
    if len(feats):
        np.fmax.at(maxes, feats, values)
    # top-N per feature: sort by (feature, -value), then take the first N of each run
    order = np.lexsort((-values, feats))
    f_sorted = feats[order]
    starts = np.searchsorted(f_sorted, np.arange(n_latents), side="left")
    ends = np.searchsorted(f_sorted, np.arange(n_latents), side="right")
    top_ids, top_vals, bottom_ids, bottom_vals = [], [], [], []
    ids = np.asarray(ids, dtype=object)
    for f in range(n_latents):
        sel = order[starts[f]:min(ends[f], starts[f] + top_n)]
        if not signed:
            sel = sel[values[sel] != 0]
        top_ids.append(list(ids[sel]))
        top_vals.append(values[sel].astype(np.float32).tolist())
        # a signed dictionary's other end (PCA: the lowest scores), lowest first
        low = order[max(starts[f], ends[f] - top_n):ends[f]][::-1] if signed else order[:0]
        bottom_ids.append(list(ids[low]))
        bottom_vals.append(values[low].astype(np.float32).tolist())
    level = np.searchsorted(np.asarray(levels), np.arange(n_latents), side="right") + 1
    n = max(n_galaxies, 1)
    return pa.table({
        "feature": pa.array(np.arange(n_latents), pa.int32()),
        "level": pa.array(level, pa.int32()),
        "n_active": pa.array(n_active, pa.int64()),
        "frequency": pa.array(n_active / n, pa.float64()),
        "mean": pa.array(sums / n, pa.float64()),
        "mean_active": pa.array(np.where(n_active > 0, sums_active / np.maximum(n_active, 1), np.nan),
                                pa.float64()),
        "max": pa.array(maxes, pa.float64()),
        "top_ids": pa.array(top_ids, pa.list_(pa.string())),
        "top_values": pa.array(top_vals, pa.list_(pa.float32())),
        "bottom_ids": pa.array(bottom_ids, pa.list_(pa.string())),
        "bottom_values": pa.array(bottom_vals, pa.list_(pa.float32())),
    })


def compute(d, embeddings: str, split: str, out: str, top_n: int = 30, batch_size: int = 1024,
            actors: int = 1, cpus_per_actor: int = 1, overwrite: bool = False) -> ActivationSet:
    """Encode ``{embeddings}/{split}`` with dictionary ``d`` on Ray Data; write and return stats."""
    import pyarrow as pa

    marker = storage.join(out, "_SUCCESS")
    files = embedding_files(embeddings, split)
    # the inputs' stamps too: a dictionary retrained or embeddings rewritten at the same URLs
    # make other activations
    weights = [u for u in storage.listdir(d.url) if u.endswith((".safetensors", "/cfg.json"))]
    key = {"dictionary": d.url, "embeddings": embeddings, "split": split, "files": files,
           "stamps": [storage.stamp(u) for u in weights + files], "top_n": top_n}
    if not overwrite and storage.exists(marker):
        done = json.loads(storage.read_bytes(marker))
        same = {k: done.get(k) for k in key if k != "top_n"} == {k: v for k, v in key.items() if k != "top_n"}
        if same and int(done.get("top_n", 0)) >= top_n:
            log.info("activations of %s on %s/%s already computed: %s", d.name, embeddings, split, out)
            return ActivationSet(out, int(done["n_galaxies"]), load_features(out))
        log.info("activations at %s were made from other inputs: recomputing", out)

    import ray

    from galaxysae import cluster

    cluster.connect()
    cluster.require([{"CPU": float(cpus_per_actor)}], f"activations of {d.name} with "
                    f"cpus_per_actor={cpus_per_actor}", "Lower cpus_per_actor.")
    # Ray Data's read tasks and the encode actors read these on any node
    cluster.require_shared({"dictionary": d.url, "embeddings": embeddings}, {},
                           f"activations of {d.name}")
    t0 = time.time()
    n_galaxies = _n_rows(files)
    fs, _ = storage.arrow_fs(files[0])
    paths = [storage.arrow_fs(u)[1] for u in files]
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["id_str", "embedding"])
    codes = ds.map_batches(
        Encode, fn_constructor_kwargs={"url": d.url, "threads": cpus_per_actor},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
        num_cpus=cpus_per_actor,
    )
    tables = []
    for batch in codes.iter_batches(batch_format="pyarrow", batch_size=None):
        tables.append(batch.select(["id_str", "feature", "value"]))
    schema = pa.schema([("id_str", pa.string()), ("feature", pa.int32()), ("value", pa.float32())])
    table = (pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table())
    n_seen = len(set(table.column("id_str").to_pylist())) if d.signed else None
    if n_seen is not None and n_seen != n_galaxies:
        raise RuntimeError(f"encoded {n_seen} galaxies of {n_galaxies} in {embeddings}/{split}")
    table = table.sort_by([("feature", "ascending"), ("value", "descending")])
    stats = feature_stats(table.column("id_str").to_numpy(zero_copy_only=False),
                          table.column("feature").to_numpy(), table.column("value").to_numpy(),
                          n_galaxies, d.n_latents, d.levels, top_n, d.signed)
    storage.write_parquet(table, storage.join(out, "activations.parquet"))
    storage.write_parquet(stats, storage.join(out, "features.parquet"))
    storage.write_bytes(marker, json.dumps({**key, "n_galaxies": n_galaxies,
                                            "n_activations": table.num_rows}, indent=1).encode())
    log.info("activations of %s on %d %s galaxies: %d non-zeros in %.1f s -> %s", d.name, n_galaxies,
             split, table.num_rows, time.time() - t0, out)
    return ActivationSet(out, n_galaxies, stats)


def load_features(out: str):
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(storage.join(out, "features.parquet"))
    return pq.read_table(path, filesystem=fs)


def load_activations(out: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(storage.join(out, "activations.parquet"))
    return pq.read_table(path, filesystem=fs, columns=columns)


def code_matrix(out: str, ids: list[str], n_latents: int):
    """codes[len(ids), n_latents] as a scipy CSR matrix (float32) for the given galaxies; absent
    entries are true zeros of a sparse code (an SAE writes only its non-zeros), so pass only ids
    that were encoded. Sparse: a dense [galaxies, 16k latents] copy would not fit a driver."""
    from scipy import sparse

    table = load_activations(out)
    pos = {s: i for i, s in enumerate(ids)}
    act_ids = table.column("id_str").to_pylist()
    rows = np.fromiter((pos.get(s, -1) for s in act_ids), dtype=np.int64, count=len(act_ids))
    keep = rows >= 0
    feats = table.column("feature").to_numpy()
    vals = table.column("value").to_numpy().astype(np.float32)
    m = sparse.csr_matrix((vals[keep], (rows[keep], feats[keep])), shape=(len(ids), n_latents))
    m.eliminate_zeros()  # a stored 0 must rank with the implicit ones
    return m
