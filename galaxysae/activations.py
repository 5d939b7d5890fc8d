"""Feature activations of one split under one dictionary, and per-feature statistics.

Data flow::

    {embeddings}/{split}/*.parquet  --Ray Data read_parquet (id_str, embedding)-->
    Encode actors (load the dictionary once, codes = encode(x))  --> sparse (id_str, feature, value)
    --> driver: spilled by feature range to local scratch files, sorted a few ranges at a time
    --> activations.parquet + features.parquet (frequency, mean, max, top-N ids)

Outputs under ``out`` (local or ``s3://``), written atomically, ``_SUCCESS`` last, so a rerun
with the same inputs reuses them:

- ``activations.parquet``: ``id_str`` (string), ``feature`` (int32), ``value`` (float32); the
  non-zero activations of an SAE, every score of a PCA (dense, signed); sorted by feature, then
  value descending.
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
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from galaxysae import storage

log = logging.getLogger(__name__)

__all__ = ["embedding_files", "embedding_ids", "read_embeddings", "Encode", "compute", "write_activations",
           "load_features", "load_activations", "code_matrix", "ActivationSet"]


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

        from galaxysae import cli, dictionary

        cli.setup_worker()
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


# The driver sorts the triples a group of feature ranges of at most about this many rows at a time
# (see _Spill): its memory stays flat as the split grows (Euclid Q1: 380k galaxies x k=64 = 24M
# non-zeros); ~100 bytes a row while a group is sorted and written.
SPILL_ROWS = 1 << 19
SPILL_FILES = 256  # feature ranges (spill files) at most: a group is one or more consecutive ranges


def _schema():
    import pyarrow as pa

    return pa.schema([("id_str", pa.string()), ("feature", pa.int32()), ("value", pa.float32())])


def _n_rows(files: list[str]) -> int:
    import pyarrow.parquet as pq

    total = 0
    for url in files:
        fs, path = storage.arrow_fs(url)
        with fs.open_input_file(path) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


class _Spill:
    """The sparse triples of a split, spilled to local Arrow IPC files by feature range.

    Each Ray batch is cut into up to ``SPILL_FILES`` ranges of ``width`` consecutive features and
    appended to their files, so a file holds its rows in arrival order; ``groups()`` reads back
    consecutive files of about ``SPILL_ROWS`` rows in all and sorts them, one group at a time (the
    files are grouped by their actual sizes: trained SAEs fire some features far more often than
    others). A galaxy is an int32 index into ``ids()`` (each batch's distinct id_str, appended
    batch by batch), not a string: the driver holds no string, let alone a Python object, per
    non-zero.
    """

    def __init__(self, folder: str, n_latents: int):
        import pyarrow as pa

        self.n_latents = n_latents
        self.width = -(-n_latents // min(n_latents, SPILL_FILES))
        schema = pa.schema([("galaxy", pa.int32()), ("feature", pa.int32()), ("value", pa.float32())])
        self.files: list[tuple] = []  # (path, sink, writer) per range
        for r in range(-(-n_latents // self.width)):
            path = os.path.join(folder, f"range_{r:05d}.arrow")
            sink = pa.OSFile(path, "wb")
            self.files.append((path, sink, pa.ipc.new_stream(sink, schema)))
        self.counts = np.zeros(len(self.files), np.int64)  # rows per file
        self.id_chunks: list = []
        self.n_ids = 0
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # not yet written
        self.n_pending = 0

    def add(self, batch) -> None:
        """One Ray batch: a pyarrow table with ``id_str``, ``feature``, ``value``."""
        import pyarrow as pa

        if batch.num_rows == 0:
            return
        enc = batch.column("id_str").combine_chunks().cast(pa.string()).dictionary_encode()
        self.pending.append((enc.indices.to_numpy().astype(np.int32) + np.int32(self.n_ids),
                             batch.column("feature").to_numpy().astype(np.int32, copy=False),
                             batch.column("value").to_numpy().astype(np.float32, copy=False)))
        self.id_chunks.append(enc.dictionary)
        self.n_ids += len(enc.dictionary)
        self.n_pending += batch.num_rows
        if self.n_pending >= SPILL_ROWS // 4:  # a few large writes per file, not one per batch
            self.flush()

    def flush(self) -> None:
        """Append the pending rows to their ranges' files, in arrival order."""
        import pyarrow as pa

        if not self.pending:
            return
        galaxy, feats, vals = (np.concatenate(c) for c in zip(*self.pending))
        self.pending, self.n_pending = [], 0
        part = feats // self.width
        order = np.argsort(part, kind="stable")  # stable: a range keeps the arrival order
        cuts = np.searchsorted(part[order], np.arange(len(self.files) + 1))
        for r in np.flatnonzero(np.diff(cuts)):
            sel = order[cuts[r]:cuts[r + 1]]
            self.files[r][2].write_batch(pa.record_batch(
                [galaxy[sel], feats[sel], vals[sel]], names=["galaxy", "feature", "value"]))
        self.counts += np.diff(cuts)

    def ids(self):
        """id_str of every galaxy index (a pyarrow string array)."""
        import pyarrow as pa

        return pa.concat_arrays(self.id_chunks) if self.id_chunks else pa.array([], pa.string())

    def close(self) -> None:
        """Close the files (what is pending is dropped: flush first); again, a no-op."""
        for _, sink, writer in self.files:
            if not sink.closed:
                writer.close()
                sink.close()

    def groups(self):
        """Yield ``(lo, hi, galaxy, feature, value)`` per group of features ``[lo, hi)``, sorted by
        feature, then value descending; ties keep their arrival order (stable, as the whole
        table's ``sort_by`` was before)."""
        import pyarrow as pa

        self.flush()
        self.close()
        first = 0
        while first < len(self.files):
            last = first + 1  # files first..last-1: at least one, more while under SPILL_ROWS
            while last < len(self.files) and self.counts[first:last + 1].sum() <= SPILL_ROWS:
                last += 1
            tables = []
            for path, _, _ in self.files[first:last]:
                with pa.OSFile(path) as fh:  # read, not memory-mapped: only this group is resident
                    tables.append(pa.ipc.open_stream(fh).read_all())
                os.unlink(path)
            t = pa.concat_tables(tables)
            del tables
            galaxy, feats, vals = (t.column(i).to_numpy() for i in range(3))
            del t
            order = np.lexsort((-vals, feats))
            galaxy, feats, vals = galaxy[order], feats[order], vals[order]
            del order
            yield first * self.width, min(last * self.width, self.n_latents), galaxy, feats, vals
            del galaxy, feats, vals  # before the next group is read
            first = last


def _runs(first: np.ndarray, length: np.ndarray, step: int = 1) -> np.ndarray:
    """Positions first[i], first[i] + step, ... (length[i] of each), concatenated."""
    within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    return np.repeat(first, length) + step * within


class _FeatureStats:
    """Per-feature statistics of features.parquet, filled one sorted group of features at a time.

    Each group arrives sorted by (feature, value descending) exactly as the whole table was, so
    the sums (bincount adds in array order) and the ties among the top and bottom galaxies come
    out as they did from one sort of all the triples.
    """

    def __init__(self, n_latents: int, top_n: int, signed: bool):
        self.n_latents, self.top_n, self.signed = n_latents, top_n, signed
        self.n_active = np.zeros(n_latents, np.int64)
        self.sums = np.zeros(n_latents)
        self.sums_active = np.zeros(n_latents)
        self.maxes = np.full(n_latents, np.nan)
        # top / bottom: per-feature counts, and (galaxy indices, values) of each group
        self.n_top, self.n_bottom = np.zeros(n_latents, np.int64), np.zeros(n_latents, np.int64)
        self.top: list[tuple[np.ndarray, np.ndarray]] = []
        self.bottom: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, lo: int, hi: int, galaxy: np.ndarray, feats: np.ndarray, vals: np.ndarray) -> None:
        """One group of features [lo, hi): its triples sorted by feature, then value descending."""
        n = hi - lo
        f = feats.astype(np.int64) - lo
        v = vals.astype(np.float64)
        active = v > 0 if self.signed else v != 0
        self.n_active[lo:hi] = np.bincount(f[active], minlength=n)
        self.sums[lo:hi] = np.bincount(f, weights=v, minlength=n)
        self.sums_active[lo:hi] = np.bincount(f[active], weights=v[active], minlength=n)
        if len(f):
            np.fmax.at(self.maxes[lo:hi], f, v)
        starts = np.searchsorted(f, np.arange(n), side="left")
        ends = np.searchsorted(f, np.arange(n), side="right")
        take = np.minimum(ends - starts, self.top_n)
        # top-N: the first N of each feature's run (an SAE's written zeros, if any, left out)
        pos = _runs(starts, take)
        if not self.signed:
            pos = pos[vals[pos] != 0]
        self.n_top[lo:hi] = np.bincount(f[pos], minlength=n)
        self.top.append((galaxy[pos], vals[pos]))
        if self.signed:  # a signed dictionary's other end (PCA: the lowest scores), lowest first
            pos = _runs(ends - 1, take, step=-1)
            self.n_bottom[lo:hi] = take
            self.bottom.append((galaxy[pos], vals[pos]))

    def table(self, ids, n_galaxies: int, levels):
        """features.parquet as a pyarrow Table; ``ids``: the id_str of each galaxy index."""
        import pyarrow as pa

        def lists(counts: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]], which: int):
            offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
            flat = np.concatenate([p[which] for p in parts]) if parts else np.zeros(0, np.int32)
            items = ids.take(pa.array(flat, pa.int32())) if which == 0 else pa.array(flat, pa.float32())
            return pa.ListArray.from_arrays(offsets, items)

        n_latents = self.n_latents
        n_active = self.n_active
        level = np.searchsorted(np.asarray(levels), np.arange(n_latents), side="right") + 1
        n = max(n_galaxies, 1)
        return pa.table({
            "feature": pa.array(np.arange(n_latents), pa.int32()),
            "level": pa.array(level, pa.int32()),
            "n_active": pa.array(n_active, pa.int64()),
            "frequency": pa.array(n_active / n, pa.float64()),
            "mean": pa.array(self.sums / n, pa.float64()),
            "mean_active": pa.array(np.where(n_active > 0, self.sums_active / np.maximum(n_active, 1),
                                             np.nan), pa.float64()),
            "max": pa.array(self.maxes, pa.float64()),
            "top_ids": lists(self.n_top, self.top, 0),
            "top_values": lists(self.n_top, self.top, 1),
            "bottom_ids": lists(self.n_bottom, self.bottom, 0),
            "bottom_values": lists(self.n_bottom, self.bottom, 1),
        })


def _write_parquet_streamed(tables, url: str) -> int:
    """Write ``tables`` (an iterable of pyarrow Tables of one schema) one after another as one
    parquet file at ``url``, atomically, holding one at a time; returns the number of rows."""
    import pyarrow.parquet as pq

    rows = 0
    with storage.writing(url) as tmp, pq.ParquetWriter(tmp, _schema()) as writer:
        for t in tables:
            if t.num_rows:
                writer.write_table(t)
                rows += t.num_rows
            del t  # before the next table is made
    return rows


def write_activations(batches, out: str, n_galaxies: int, n_latents: int, levels, top_n: int,
                      signed: bool, source: str = "the embeddings"):
    """The driver's side of :func:`compute`: sparse triples in, ``{out}/activations.parquet``
    written, ``(features table, number of triples)`` back (features.parquet is not written here).

    ``batches``: pyarrow Tables with ``id_str``, ``feature``, ``value`` (Ray Data's batches).
    activations.parquet is sorted by feature, then value descending (ties in arrival order).
    The triples are spilled to a local scratch folder (``TMPDIR``, ~12 bytes each, removed at
    the end) and sorted a group of feature ranges at a time: the driver's memory does not grow
    with the number of non-zeros, only with the number of galaxies (their ids) and latents.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    with tempfile.TemporaryDirectory(prefix="galaxysae-activations-") as scratch:
        spill = _Spill(scratch, n_latents)
        try:
            for batch in batches:
                spill.add(batch)
            spill.flush()
        finally:
            spill.close()  # on an error too: no file left open
        ids = spill.ids()
        if signed:  # dense: every galaxy has a score for every component
            n_seen = pc.count_distinct(ids).as_py()
            if n_seen != n_galaxies:
                raise RuntimeError(f"encoded {n_seen} galaxies of {n_galaxies} in {source}")
        stats = _FeatureStats(n_latents, top_n, signed)

        def tables():
            for lo, hi, galaxy, feats, vals in spill.groups():
                stats.add(lo, hi, galaxy, feats, vals)
                yield pa.table([ids.take(pa.array(galaxy)), pa.array(feats), pa.array(vals)],
                               schema=_schema())
                del galaxy, feats, vals  # before the next group is read

        rows = _write_parquet_streamed(tables(), storage.join(out, "activations.parquet"))
    return stats.table(ids, n_galaxies, levels), rows


def compute(d, embeddings: str, split: str, out: str, top_n: int = 30, batch_size: int = 1024,
            actors: int = 1, cpus_per_actor: int = 1, overwrite: bool = False) -> ActivationSet:
    """Encode ``{embeddings}/{split}`` with dictionary ``d`` on Ray Data; write and return stats."""
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
    # an actor holding every CPU of the only node that fits it leaves none to Ray Data's read
    # tasks (1 CPU each): the job would wait for ever, so one more CPU must fit beside it
    cluster.require([{"CPU": float(cpus_per_actor)}, {"CPU": 1.0}], f"activations of {d.name} with "
                    f"cpus_per_actor={cpus_per_actor} (and 1 CPU for Ray Data's read tasks)",
                    "Lower cpus_per_actor.")
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
    batches = (b.select(["id_str", "feature", "value"])
               for b in codes.iter_batches(batch_format="pyarrow", batch_size=None))
    stats, n_rows = write_activations(batches, out, n_galaxies, d.n_latents, d.levels, top_n,
                                      d.signed, f"{embeddings}/{split}")
    storage.write_parquet(stats, storage.join(out, "features.parquet"))
    storage.write_bytes(marker, json.dumps({**key, "n_galaxies": n_galaxies,
                                            "n_activations": n_rows}, indent=1).encode())
    log.info("activations of %s on %d %s galaxies: %d non-zeros in %.1f s -> %s", d.name, n_galaxies,
             split, n_rows, time.time() - t0, out)
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
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from scipy import sparse

    # read in batches into preallocated arrays (12 bytes a triple); each batch's ids are looked
    # up in one arrow hash lookup (index_in), no Python string per triple. The row of an id is
    # its last position in ids, as a dict {id: i} would give (index_in finds the first, hence
    # the reversed ids); -1 for ids not asked for.
    asked = pa.array(ids[::-1], pa.string())
    fs, path = storage.arrow_fs(storage.join(out, "activations.parquet"))
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        n = pf.metadata.num_rows
        rows = np.empty(n, np.int32 if len(ids) < 2**31 else np.int64)
        feats, vals = np.empty(n, np.int32), np.empty(n, np.float32)
        start = 0
        for b in pf.iter_batches(batch_size=1 << 17, columns=["id_str", "feature", "value"]):
            end = start + b.num_rows
            last = pc.fill_null(pc.index_in(b.column(0), value_set=asked), -1).to_numpy()
            rows[start:end] = np.where(last >= 0, len(ids) - 1 - last.astype(np.int64), -1)
            feats[start:end] = b.column(1).to_numpy()
            vals[start:end] = b.column(2).to_numpy()
            start = end
    keep = rows >= 0
    if not keep.all():
        rows, feats, vals = rows[keep], feats[keep], vals[keep]
    m = sparse.csr_matrix((vals, (rows, feats)), shape=(len(ids), n_latents))
    m.eliminate_zeros()  # a stored 0 must rank with the implicit ones
    return m
