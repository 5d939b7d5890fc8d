"""Find a galaxy's image by ``id_str`` without scanning the dataset: an index built once.

The index maps ``id_str -> (shard, row)`` for one split of a dataset (local dir, ``s3://``
prefix or ``hf://`` dataset, resolved by :mod:`galaxysae.sources`). Building it reads only the
``id_str`` column of every shard; it is saved as parquet (``id_str``, ``shard``, ``row``) with
the shard list and each shard's stamp (size and ETag or mtime; an ``hf://...@commit`` shard
cannot change) in its metadata, and rebuilt when either changes: a dataset regenerated in place
would otherwise send a galaxy's lookup to another galaxy's row. Fetching reads only the row
groups that hold the wanted rows, one shard at a time.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import numpy as np

from galaxysae import storage

log = logging.getLogger(__name__)

__all__ = ["ImageIndex", "build", "load_or_build"]


class ImageIndex:
    def __init__(self, shards: list[str], ids: list[str], shard_of: np.ndarray, row_of: np.ndarray):
        self.shards = list(shards)
        self._pos = {s: i for i, s in enumerate(ids)}
        if len(self._pos) != len(ids):
            seen, dups = set(), []
            for s in ids:
                if s in seen:
                    dups.append(s)
                seen.add(s)
            raise ValueError(f"duplicate id_str in the dataset shards: {dups[:5]}")
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.row_of = np.asarray(row_of, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._pos)

    def __contains__(self, id_str: str) -> bool:
        return id_str in self._pos

    def locate(self, id_str: str) -> tuple[str, int]:
        """-> (shard URL, row in shard). Unknown ids raise KeyError naming the id."""
        try:
            i = self._pos[id_str]
        except KeyError:
            raise KeyError(f"id_str {id_str!r} is not in the image index ({len(self)} galaxies from "
                           f"{len(self.shards)} shards)") from None
        return self.shards[self.shard_of[i]], int(self.row_of[i])

    def by_shard(self, ids) -> dict[str, list[tuple[int, str]]]:
        """Group ids by shard: {shard URL: [(row, id_str), ...] sorted by row}."""
        groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for s in ids:
            shard, row = self.locate(s)
            groups[shard].append((row, s))
        return {k: sorted(v) for k, v in groups.items()}

    def fetch(self, ids) -> dict[str, bytes]:
        """{id_str: encoded image bytes} for the given ids (reads only the needed row groups)."""
        out: dict[str, bytes] = {}
        for shard, rows in self.by_shard(list(dict.fromkeys(ids))).items():
            out.update(read_rows(shard, rows))
        return out

    def to_table(self, stamps: list[str] | None = None):
        import pyarrow as pa

        ids = [None] * len(self._pos)
        for s, i in self._pos.items():
            ids[i] = s
        meta = {b"galaxysae.image_index": json.dumps({"shards": self.shards,
                                                      "stamps": stamps or _stamps(self.shards)}).encode()}
        return pa.table({"id_str": pa.array(ids, pa.string()), "shard": pa.array(self.shard_of, pa.int32()),
                         "row": pa.array(self.row_of, pa.int64())}).replace_schema_metadata(meta)


def read_rows(shard: str, rows: list[tuple[int, str]]) -> dict[str, bytes]:
    """Image bytes of ``rows`` [(row, expected id_str)] of one shard, checking the ids match."""
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(shard)
    out: dict[str, bytes] = {}
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        bounds = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        wanted: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for row, id_str in rows:
            g = int(np.searchsorted(bounds, row, side="right") - 1)
            if not 0 <= g < pf.num_row_groups:
                raise KeyError(f"{shard}: row {row} (id_str {id_str!r}) is beyond the shard: stale index?")
            wanted[g].append((row - int(bounds[g]), id_str))
        for g, items in wanted.items():
            # only the wanted rows become Python objects (a row group holds ~100 images)
            t = pf.read_row_group(g, columns=["id_str", "image"]).take([r for r, _ in items])
            got_ids = t.column("id_str").to_pylist()
            images = t.column("image").to_pylist()
            for j, (r, id_str) in enumerate(items):
                if str(got_ids[j]) != id_str:
                    raise KeyError(f"{shard}: row {int(bounds[g]) + r} holds {got_ids[j]!r}, not "
                                   f"{id_str!r}: the image index is stale; rebuild it")
                img = images[j]
                data = img.get("bytes") if isinstance(img, dict) else img
                if data is None:
                    raise ValueError(f"{shard}: id_str {id_str!r} has no image bytes")
                out[id_str] = data
    return out


def _shard_urls(dataset: str, split: str, config: str = "default") -> list[str]:
    from galaxysae import sources

    return [s.url for s in sources.resolve(dataset, config, splits=[split]) if s.split == split]


def _stamps(shards: list[str]) -> list[str]:
    """What changes when a shard is rewritten ("" for an hf:// shard: pinned to its commit)."""
    return ["" if url.startswith("hf://") else storage.stamp(url) for url in shards]


def build(shards: list[str]) -> ImageIndex:
    """Read the ``id_str`` column of every shard (and nothing else)."""
    import pyarrow.parquet as pq

    ids, shard_of, row_of = [], [], []
    for i, url in enumerate(shards):
        fs, path = storage.arrow_fs(url)
        col = pq.read_table(path, filesystem=fs, columns=["id_str"]).column("id_str").to_pylist()
        ids += [str(i) for i in col]  # as embed writes them
        shard_of.append(np.full(len(col), i, np.int32))
        row_of.append(np.arange(len(col), dtype=np.int64))
    return ImageIndex(shards, ids, np.concatenate(shard_of) if shard_of else [],
                      np.concatenate(row_of) if row_of else [])


def load_or_build(dataset: str, split: str, index_url: str, config: str = "default") -> ImageIndex:
    """The index of ``dataset`` (its ``config``)/``split`` saved at ``index_url`` (parquet), built
    if missing or stale."""
    import pyarrow.parquet as pq

    shards = _shard_urls(dataset, split, config)
    if not shards:
        raise FileNotFoundError(f"dataset {dataset}: no parquet shards for split {split!r}")
    stamps = _stamps(shards)
    if storage.exists(index_url):
        fs, path = storage.arrow_fs(index_url)
        t = pq.read_table(path, filesystem=fs)
        meta = json.loads((t.schema.metadata or {}).get(b"galaxysae.image_index", b"{}"))
        if meta.get("shards") == shards and meta.get("stamps") == stamps:
            return ImageIndex(shards, t.column("id_str").to_pylist(), t.column("shard").to_numpy(),
                              t.column("row").to_numpy())
        log.info("image index %s is for other shards, or shards rewritten since: rebuilding", index_url)
    index = build(shards)
    storage.write_parquet(index.to_table(stamps), index_url)
    log.info("image index of %s/%s: %d galaxies in %d shards -> %s", dataset, split, len(index),
             len(shards), index_url)
    return index
