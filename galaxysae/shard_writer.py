"""The embed job's writer: one embeddings parquet per input shard, committed when it is whole.

Rows come back from the Ray Data pipeline in any order and from any shard. The writer knows
each pending shard's ids (scanned up front), places every returned row at its input position,
and the moment a shard's last row is back writes ``{output}/{split}/{shard}`` (and its failures
to ``{output}/_failures/{split}/{shard}``) atomically. The embeddings file is the shard's
completion marker, so it is written last.

Output contract (DESIGN.md §3): ``id_str`` string, ``split`` string, ``embedding``
fixed_size_list<float32>[D]; provenance in the parquet file metadata.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import galaxysae
from galaxysae import storage
from galaxysae.sources import Shard

log = logging.getLogger(__name__)

__all__ = ["ShardWriter", "scan_shards", "Stats", "ids_digest", "input_conflicts"]


def _read_ids(shard: Shard, required: tuple[str, ...] = ()) -> list:
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(shard.url)
    try:
        names = pq.read_schema(path, filesystem=fs).names
        missing = [c for c in ("id_str", *required) if c not in names]
        if missing:
            raise KeyError(missing)
        table = pq.read_table(path, filesystem=fs, columns=["id_str"])
    except KeyError:
        raise ValueError(f"shard {shard.url}: no column {', '.join(map(repr, missing))} "
                         f"(columns: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''})") from None
    except Exception as exc:  # noqa: BLE001 - name the file that is at fault
        raise ValueError(f"shard {shard.url}: unreadable parquet ({type(exc).__name__}: {exc})") from None
    ids = table.column("id_str").to_pylist()
    if any(i is None for i in ids):
        raise ValueError(f"shard {shard.url}: null id_str in row {ids.index(None)}")
    return [str(i) for i in ids]


def scan_shards(shards: list[Shard], pending: list[Shard],
                required: tuple[str, ...] = ()) -> dict[Shard, list[str]]:
    """id_str of every shard; raises naming the ids when one appears twice within a split.

    ``pending`` shards must also hold the ``required`` columns (the image column): a shard
    without them is an error naming it before any work starts, not a failure deep in a task.
    Returns the ids of every shard (their rows, in input order): a pending shard's rows to
    embed, a done shard's identity to compare with what its output was made from.
    """
    todo = set(pending)
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = dict(zip(shards, pool.map(
            lambda s: _read_ids(s, required if s in todo else ()), shards)))
    by_split: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for shard, shard_ids in ids.items():
        for i in shard_ids:
            by_split[shard.split][i].append(shard.rel)
    for split, where in by_split.items():
        dups = {i: w for i, w in where.items() if len(w) > 1}
        if dups:
            shown = "; ".join(f"{i!r} in {', '.join(w)}" for i, w in list(dups.items())[:10])
            more = f" (and {len(dups) - 10} more)" if len(dups) > 10 else ""
            raise ValueError(f"duplicate id_str in split {split!r}: {len(dups)} ids appear more "
                             f"than once: {shown}{more}")
    return ids


def ids_digest(ids: list[str]) -> str:
    """sha256 of a shard's id_str column in input order: what identifies an input shard's content
    where there is no dataset commit (a local directory, an s3:// copy), read by the scan anyway."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


@dataclass
class Stats:
    rows_in: int = 0
    rows_done: int = 0
    embedded: int = 0
    failed: int = 0
    shards_written: int = 0
    first_batch_at: float = 0.0  # time.monotonic() when the first rows came back (0: none yet)
    first_batch_rows: int = 0
    done_embedded: int = 0  # rows of the shards an earlier run finished (file metadata)
    done_failed: int = 0


def _weights(provenance: dict[str, str]) -> str:
    """The encoder's weights as recorded: the Hub commit where there is one (a staged copy
    records ``repo@commit``, the Hub name the bare commit), else name and revision."""
    rev = provenance.get("encoder_revision", "")
    m = re.search(r"[0-9a-f]{40}$", rev)
    return m.group(0) if m else f"{provenance.get('encoder', '')} ({rev})"


def provenance_conflicts(theirs: dict[str, str], ours: dict[str, str]) -> list[str]:
    """What makes a finished shard's embeddings not what this run would write ("key: theirs ->
    ours"). A key an older file lacks, and a dataset commit either side lacks, is not a conflict;
    precision is not compared (a resumed job may run on other hardware)."""
    out = []
    if "encoder_revision" in theirs and _weights(theirs) != _weights(ours):
        out.append(f"encoder weights: {_weights(theirs)} -> {_weights(ours)}")
    for key in ("encoder_stand_in", "image_size", "strict_jpeg", "source_revision"):
        if key not in theirs or theirs[key] == ours.get(key, ""):
            continue
        if key == "source_revision" and not (theirs[key] and ours.get(key)):
            continue
        out.append(f"{key}: {theirs[key] or '(none)'} -> {ours.get(key) or '(none)'}")
    return out


def _input_rows(meta: dict[str, str]) -> str:
    """The input rows a finished shard was made from: recorded, or (older files) rows + failed."""
    if meta.get("source_rows"):
        return meta["source_rows"]
    if meta.get("rows", "").isdigit() and meta.get("failed", "").isdigit():
        return str(int(meta["rows"]) + int(meta["failed"]))
    return ""


def input_conflicts(theirs: dict[str, str], ours: dict[str, str]) -> list[str]:
    """What makes a finished shard's output made from another input shard than the one this run
    reads ("key: theirs -> ours"): its path in the dataset (config folder included), its row
    count, the digest of its ids. Not where the dataset lies (a staged or s3:// copy, the offline
    Hub: the same shard), nor a key either side lacks (a file from before it was recorded). The
    dataset commit, where both sides have one, is compared by :func:`provenance_conflicts`."""
    out = []
    if theirs.get("source_shard") and ours.get("source_shard") and \
            theirs["source_shard"] != ours["source_shard"]:
        out.append(f"input shard: {theirs['source_shard']} -> {ours['source_shard']}")
    rows = _input_rows(theirs)
    if rows and ours.get("source_rows") and rows != ours["source_rows"]:
        out.append(f"input rows: {rows} -> {ours['source_rows']}")
    elif theirs.get("source_ids") and ours.get("source_ids") and theirs["source_ids"] != ours["source_ids"]:
        short = [d.removeprefix("sorted:")[:12] for d in (theirs["source_ids"], ours["source_ids"])]
        out.append(f"input ids (sha256): {short[0]}... -> {short[1]}...")
    return out


def _made_from(meta: dict[str, str]) -> str:
    """"{dataset}/{shard}[ @commit]" as recorded in a file's metadata (or this run's)."""
    where = meta.get("source", "")
    if meta.get("source_shard"):
        where = f"{where.rstrip('/')}/{meta['source_shard']}" if where else meta["source_shard"]
    if meta.get("source_revision"):
        where += f" @ {meta['source_revision']}"
    return where or "(not recorded)"


def _failure_schema():
    import pyarrow as pa

    return pa.schema([("id_str", pa.string()), ("split", pa.string()), ("shard", pa.string()),
                      ("reason", pa.string())])


class _Buffer:
    def __init__(self, shard: Shard, ids: list[str]):
        self.shard = shard
        self.ids = ids
        self.pos = {i: n for n, i in enumerate(ids)}
        self.seen = np.zeros(len(ids), dtype=bool)
        self.reasons: list[str] = [""] * len(ids)
        self.emb: np.ndarray | None = None
        self.count = 0


class ShardWriter:
    def __init__(self, output: str, provenance: dict[str, str], before_commit=None):
        """``before_commit()`` returns "" or why this run may no longer write (a lost claim)."""
        self.output = output
        self.before_commit = before_commit
        self.provenance = dict(provenance)
        self.stats = Stats()
        self._open: dict[str, _Buffer] = {}

    # -- paths
    def embeddings_url(self, shard: Shard) -> str:
        return storage.join(self.output, shard.split, shard.name)

    def failures_url(self, shard: Shard) -> str:
        return storage.join(self.output, "_failures", shard.split, shard.name)

    def done(self, shard: Shard) -> bool:
        return storage.exists(self.embeddings_url(shard))

    def input_of(self, shard: Shard, ids: list[str]) -> dict[str, str]:
        """What identifies the input shard an output file is made from (its file metadata)."""
        return {"source_shard": shard.rel, "source_rows": str(len(ids)),
                "source_ids": ids_digest(ids)}

    def check_done(self, shards: list[Shard], ids: dict[Shard, list[str]]) -> None:
        """Read the metadata of finished shards' files: count their rows into ``stats`` (the
        failure fraction is the whole output's, not this run's), and refuse, naming the file and
        what differs, when one was made from another input shard (another dataset, another
        config: see :func:`input_conflicts`; ``ids`` are each shard's id_str from the scan) or
        written with other encoder weights, image size, strict_jpeg or dataset commit than this
        run's: skipping it would mix two runs in one output."""
        import pyarrow.parquet as pq

        def meta(shard: Shard) -> dict[str, str]:
            url = self.embeddings_url(shard)
            fs, path = storage.arrow_fs(url)
            try:
                raw = pq.read_schema(path, filesystem=fs).metadata or {}
            except Exception as exc:  # noqa: BLE001 - name the file that is at fault
                raise ValueError(f"finished shard {url}: unreadable parquet "
                                 f"({type(exc).__name__}: {exc}); remove it or rerun with "
                                 f"--overwrite") from None
            out = {k.decode(): v.decode("utf-8", "replace") for k, v in raw.items()}
            if not out.get("source_ids"):
                # A file from before the digest was recorded: the ids it holds (embedded and
                # failed), as a sorted digest; compared with this input's below.
                made = self._ids_in(url, fs, path) + self._ids_in(self.failures_url(shard))
                out["source_ids"] = "sorted:" + ids_digest(sorted(made))
            return out

        with ThreadPoolExecutor(max_workers=8) as pool:
            metas = list(pool.map(meta, shards))
        for shard, theirs in zip(shards, metas):
            ours = {**self.provenance, **self.input_of(shard, ids[shard])}
            if theirs["source_ids"].startswith("sorted:"):
                ours["source_ids"] = "sorted:" + ids_digest(sorted(ids[shard]))
            conflicts = input_conflicts(theirs, ours) + provenance_conflicts(theirs, ours)
            if conflicts:
                raise ValueError(
                    f"{self.embeddings_url(shard)} was written by another run ({'; '.join(conflicts)}; "
                    f"made from {_made_from(theirs)}, this run reads {_made_from(ours)}): "
                    f"skipping it would mix two runs in {self.output}. Rerun with --overwrite to "
                    f"redo every shard, or write to another --output")
            self.stats.done_embedded += int(theirs.get("rows", 0))
            self.stats.done_failed += int(theirs.get("failed", 0))

    @staticmethod
    def _ids_in(url: str, fs=None, path: str = "") -> list[str]:
        """id_str of an output or failures file ([] when there is none)."""
        import pyarrow.parquet as pq

        if fs is None:
            if not storage.exists(url):
                return []
            fs, path = storage.arrow_fs(url)
        try:
            return [str(i) for i in pq.read_table(path, filesystem=fs, columns=["id_str"])
                    .column("id_str").to_pylist()]
        except Exception as exc:  # noqa: BLE001 - name the file that is at fault
            raise ValueError(f"finished shard {url}: unreadable parquet ({type(exc).__name__}: "
                             f"{exc}); remove it or rerun with --overwrite") from None

    def strays(self, shards: list[Shard], splits: list[str]) -> list[str]:
        """Parquet files under ``{output}/{split}/`` and ``{output}/_failures/{split}/`` of the
        run's ``splits`` that are no output of its ``shards``: left by a run on other input (more
        shards, other names), they would be read beside this run's. Hidden files (a write in
        progress) and other splits are not looked at."""
        names = {(s.split, s.name) for s in shards}
        found = []
        for split in splits:
            for folder in (storage.join(self.output, split),
                           storage.join(self.output, "_failures", split)):
                found += [u for u in storage.listdir(folder, suffix=".parquet")
                          if (split, posixpath.basename(u)) not in names]
        return found

    def remove_strays(self, urls: list[str]) -> None:
        """Remove what :meth:`strays` found (``--overwrite``), embeddings before failure records,
        while this run still holds the output."""
        why = self.before_commit() if self.before_commit else ""
        if why:
            raise RuntimeError(f"not removing files of an earlier run from {self.output}: {why}")
        for url in sorted(urls, key=lambda u: "/_failures/" in u):
            storage.remove(url)
            log.info("removed %s (no output of this run's shards)", url)

    # -- streaming
    def expect(self, shards: list[Shard], ids: dict[Shard, list[str]]) -> None:
        for s in shards:
            # Ray Data reports paths without a scheme (bucket/key on S3, absolute locally).
            self._open[storage.arrow_fs(s.url)[1]] = _Buffer(s, ids[s])
            self.stats.rows_in += len(ids[s])

    def add(self, batch: dict) -> None:
        """Place a batch of pipeline rows (id_str, path, reason, embedding [N, D])."""
        paths = batch["path"]
        emb = np.asarray(batch["embedding"], dtype=np.float32)
        if not self.stats.first_batch_at:
            self.stats.first_batch_at, self.stats.first_batch_rows = time.monotonic(), len(paths)
        for n, (path, id_str, reason) in enumerate(zip(paths, batch["id_str"], batch["reason"])):
            buf = self._open.get(str(path))
            if buf is None:
                raise RuntimeError(f"row {id_str!r} came back from an unexpected shard {path}")
            p = buf.pos.get(str(id_str))
            if p is None or buf.seen[p]:
                raise RuntimeError(f"row {id_str!r} of shard {buf.shard.url} came back "
                                   f"{'twice' if p is not None else 'but is not in the shard'}")
            if buf.emb is None:
                buf.emb = np.full((len(buf.ids), emb.shape[1]), np.nan, dtype=np.float32)
            buf.seen[p] = True
            buf.reasons[p] = str(reason)
            if not reason:
                buf.emb[p] = emb[n]
            buf.count += 1
            self.stats.rows_done += 1
            if buf.count == len(buf.ids):
                self._commit(buf)
                del self._open[str(path)]

    def finish(self) -> None:
        if self._open:
            missing = {b.shard.url: len(b.ids) - b.count for b in self._open.values()}
            raise RuntimeError(f"the pipeline ended with rows missing (shard: rows): {missing}")

    def commit_empty(self, shard: Shard) -> None:
        self._commit(_Buffer(shard, []))

    # -- writing
    def _commit(self, buf: _Buffer) -> None:
        import pyarrow as pa

        shard = buf.shard
        why = self.before_commit() if self.before_commit else ""
        if why:
            raise RuntimeError(f"not writing {self.embeddings_url(shard)}: {why}")
        reasons = np.asarray(buf.reasons, dtype=object)
        ok = reasons == ""
        ids = np.asarray(buf.ids, dtype=object)
        width = buf.emb.shape[1] if buf.emb is not None else int(self.provenance.get("width", 0))
        good = buf.emb[ok] if buf.emb is not None else np.zeros((0, width), np.float32)
        if good.size and not np.isfinite(good).all():
            bad = ids[ok][~np.isfinite(good).all(axis=1)]
            raise RuntimeError(f"shard {shard.url}: the encoder returned NaN/Inf for ids {list(bad[:10])}")
        if width:
            self.provenance.setdefault("width", str(width))
        failures = ids[~ok]
        furl = self.failures_url(shard)
        if len(failures):
            ftable = pa.table({
                "id_str": pa.array(list(failures), pa.string()),
                "split": pa.array([shard.split] * len(failures), pa.string()),
                "shard": pa.array([shard.rel] * len(failures), pa.string()),
                "reason": pa.array(list(reasons[~ok]), pa.string()),
            }, schema=_failure_schema())
            storage.write_parquet(ftable, furl)
            for i, r in zip(failures[:5], reasons[~ok][:5]):
                log.warning("shard %s: image %s failed: %s", shard.rel, i, r)
        elif storage.exists(furl):
            storage.remove(furl)  # a redo (--overwrite) with no failures left
        flat = pa.array(good.reshape(-1), pa.float32())
        table = pa.table({
            "id_str": pa.array(list(ids[ok]), pa.string()),
            "split": pa.array([shard.split] * int(ok.sum()), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, width),
        })
        meta = {**self.provenance, "code_version": galaxysae.__version__,
                **self.input_of(shard, buf.ids), "split": shard.split,
                "rows": str(int(ok.sum())), "failed": str(len(failures))}
        table = table.replace_schema_metadata({k: str(v) for k, v in meta.items()})
        storage.write_parquet(table, self.embeddings_url(shard))
        self.stats.embedded += int(ok.sum())
        self.stats.failed += len(failures)
        self.stats.shards_written += 1
        log.info("wrote %s (%d embedded, %d failed)", self.embeddings_url(shard), int(ok.sum()),
                 len(failures))
