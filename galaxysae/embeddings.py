"""Reading embeddings for training: the embed job's parquet, or the research code's ``.npy``.

Parquet (the embed output contract): ``{root}/{split}/*.parquet`` with columns ``id_str``
(string), ``split`` (string) and ``embedding`` (fixed_size_list<float32>[D]), local or s3://.

``.npy`` (the original research code): ``--embeddings DIR/train_embeddings.npy`` holds a float
array [N, D]; its ids are the sibling file with ``embeddings`` replaced by ``ids`` in the name
(``train_ids.npy``), else ``ids.npy`` beside it, or an explicit ``ids`` path. The test split is
the file with ``train`` replaced by ``test`` in both names (``test_embeddings.npy`` +
``test_ids.npy``) when it exists, else a random hold-out drawn from ``split_seed``.

Every reader checks what it reads: a row with NaN/Inf, a wrong width, a missing or mismatched id
column is an ``EmbeddingsError`` naming the file and the ids at fault. Nothing is dropped quietly.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from dataclasses import dataclass

import numpy as np

from galaxysae import storage

log = logging.getLogger(__name__)

__all__ = ["EmbeddingsError", "Split", "load_split", "load_npy", "parquet_files", "check_rows",
           "is_npy", "ray_dataset", "as_tensor", "fingerprint", "fingerprint_changes", "same_input",
           "INPUTS", "record_fingerprint", "recorded_changes"]


class EmbeddingsError(ValueError):
    """Embeddings that cannot be trained on; the message names the file and the ids at fault."""


@dataclass
class Split:
    ids: np.ndarray  # [N] str
    x: np.ndarray  # [N, D] float32
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def as_tensor(x: np.ndarray):
    """A torch tensor over the rows ``x`` without copying them, also when they are Ray's
    read-only object-store array (train's memory mode, a sweep's shared splits): the steps and
    the evaluation only read them (torch would warn of the read-only memory)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(x)


def is_npy(path: str) -> bool:
    return str(path).endswith(".npy")


def check_rows(x: np.ndarray, ids, source: str, width: int | None = None) -> None:
    """Raise EmbeddingsError on non-finite rows or a wrong width; x[N, D]."""
    if x.ndim != 2:
        raise EmbeddingsError(f"{source}: embeddings must be 2-d [N, D], got shape {x.shape}")
    if width is not None and x.shape[1] != width:
        raise EmbeddingsError(f"{source}: embedding width {x.shape[1]}, expected {width}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        where = np.flatnonzero(bad)
        shown = ", ".join(str(ids[i]) for i in where[:10])
        more = f" (and {len(where) - 10} more)" if len(where) > 10 else ""
        raise EmbeddingsError(f"{source}: {len(where)} embedding rows contain NaN or Inf: ids {shown}{more}")


def parquet_files(root: str, split: str) -> list[str]:
    files = storage.listdir(storage.join(root, split), suffix=".parquet")
    if not files:
        raise EmbeddingsError(f"{storage.join(root, split)}: no parquet files for split {split!r}")
    return files


def _read_table(url: str):
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(url)
    try:
        return pq.read_table(path, filesystem=fs, columns=None)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise EmbeddingsError(f"{url}: cannot read parquet ({exc})") from None


def table_to_numpy(table, source: str) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow table/batch with id_str + embedding -> (ids[N], x[N, D] float32)."""
    import pyarrow as pa

    names = table.schema.names
    for col in ("id_str", "embedding"):
        if col not in names:
            raise EmbeddingsError(f"{source}: missing column {col!r} (columns: {names})")
    emb = table.column("embedding")
    if isinstance(emb, pa.ChunkedArray):
        emb = emb.combine_chunks()
    ids = np.asarray(table.column("id_str").to_pylist(), dtype=object)
    if pa.types.is_fixed_size_list(emb.type):
        width = emb.type.list_size
        if emb.null_count:
            where = np.flatnonzero(np.asarray(emb.is_null()))
            raise EmbeddingsError(f"{source}: null embeddings for ids {', '.join(map(str, ids[where][:10]))}")
        x = np.asarray(emb.flatten(), dtype=np.float32).reshape(len(emb), width)
    elif pa.types.is_list(emb.type) or pa.types.is_large_list(emb.type):
        rows = emb.to_pylist()
        lens = {len(r) if r is not None else -1 for r in rows}
        if len(lens) != 1 or -1 in lens:
            counts = np.array([len(r) if r is not None else -1 for r in rows])
            common = np.bincount(counts[counts >= 0]).argmax() if (counts >= 0).any() else 0
            where = np.flatnonzero(counts != common)
            raise EmbeddingsError(
                f"{source}: embeddings of different widths (expected {common}); ids "
                f"{', '.join(map(str, ids[where][:10]))}")
        x = np.asarray(rows, dtype=np.float32)
    else:
        raise EmbeddingsError(f"{source}: column 'embedding' has type {emb.type}, expected a list of float")
    return ids, x


def load_split(root: str, split: str, width: int | None = None) -> Split:
    """All rows of ``{root}/{split}/*.parquet`` -> Split, validated (width from the first file)."""
    files = parquet_files(root, split)
    all_ids, all_x = [], []
    for url in files:
        ids, x = table_to_numpy(_read_table(url), url)
        if len(ids) == 0:
            continue
        check_rows(x, ids, url, width)
        width = x.shape[1]
        all_ids.append(ids)
        all_x.append(x)
    if not all_x:
        raise EmbeddingsError(f"{storage.join(root, split)}: the parquet files hold no rows")
    ids = np.concatenate(all_ids)
    _check_unique(ids, storage.join(root, split))
    return Split(ids, np.concatenate(all_x), storage.join(root, split))


def _check_unique(ids: np.ndarray, source: str) -> None:
    uniq, counts = np.unique(ids.astype(str), return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise EmbeddingsError(f"{source}: duplicate ids {', '.join(map(str, dup[:10]))}")


def _load_array(url: str) -> np.ndarray:
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise EmbeddingsError(f"{url} does not exist") from None
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError:
        # The research code saved ids as an object array of str; reading pickles from an
        # untrusted file is unsafe, so only do it for id files (which are plain strings).
        arr = np.load(io.BytesIO(data), allow_pickle=True)
        if arr.dtype != object or not all(isinstance(v, (str, bytes, int, np.integer)) for v in arr.ravel()):
            raise EmbeddingsError(f"{url}: unexpected object array") from None
        return arr
    except Exception as exc:  # noqa: BLE001
        raise EmbeddingsError(f"{url}: not a readable .npy file ({exc})") from None


def ids_path_for(emb_path: str) -> str:
    """The ids file beside ``emb_path``: 'embeddings' -> 'ids' in the name, else ids.npy."""
    head, name = posixpath.split(str(emb_path)) if storage.is_remote(emb_path) else _split_local(emb_path)
    if "embeddings" in name:
        cand = storage.join(head, name.replace("embeddings", "ids"))
        if storage.exists(cand):
            return cand
    cand = storage.join(head, name[: -len(".npy")] + "_ids.npy")
    if storage.exists(cand):
        return cand
    return storage.join(head, "ids.npy")


def _split_local(path: str) -> tuple[str, str]:
    import os

    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def load_npy(emb_path: str, ids_path: str = "", width: int | None = None) -> Split:
    """The research code's arrays: embeddings [N, D] + ids [N] -> Split, validated."""
    ids_path = ids_path or ids_path_for(emb_path)
    x = _load_array(emb_path)
    if not storage.exists(ids_path):
        raise EmbeddingsError(
            f"{emb_path}: no ids file found (looked for {ids_path}); pass --ids PATH.npy")
    ids = _load_array(ids_path).reshape(-1)
    ids = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in ids], dtype=object)
    if x.ndim != 2:
        raise EmbeddingsError(f"{emb_path}: embeddings must be 2-d [N, D], got shape {x.shape}")
    if len(ids) != len(x):
        raise EmbeddingsError(f"{emb_path} has {len(x)} rows but {ids_path} has {len(ids)} ids")
    x = x.astype(np.float32, copy=False)
    check_rows(x, ids, emb_path, width)
    _check_unique(ids, ids_path)
    return Split(ids, x, emb_path)


def test_path_for(emb_path: str) -> str | None:
    """``train_embeddings.npy`` -> ``test_embeddings.npy`` if that file exists."""
    head, name = posixpath.split(str(emb_path)) if storage.is_remote(emb_path) else _split_local(emb_path)
    if "train" not in name:
        return None
    cand = storage.join(head, name.replace("train", "test"))
    return cand if storage.exists(cand) else None


def hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded random (train, test) partition of one Split."""
    n_test = max(1, int(round(len(split) * fraction)))
    perm = np.random.default_rng(seed).permutation(len(split))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return (Split(split.ids[tr], split.x[tr], split.source + " (train part)"),
            Split(split.ids[te], split.x[te], split.source + f" (held-out {fraction:g})"))


def load(path: str, train_split: str, test_split: str, ids: str = "", test_fraction: float = 0.1,
         split_seed: int = 0, test_path: str = "", test_ids: str = "") -> tuple[Split, Split]:
    """(train, test) Splits from the embed output root or a research ``.npy`` file.

    ``split_seed`` draws the hold-out of a ``.npy`` file without a test file. It is not the
    training seed: runs that train with other seeds on the same file must test on the same rows,
    none of which they trained on."""
    if is_npy(path):
        train = load_npy(path, ids)
        test_path = test_path or test_path_for(path)
        if test_path:
            test = load_npy(test_path, test_ids, width=train.x.shape[1])
            return train, test
        log.info("%s: no test file beside it; holding out %.0f%% of rows", path, 100 * test_fraction)
        return hold_out(train, test_fraction, split_seed)
    train = load_split(path, train_split)
    test = load_split(path, test_split, width=train.x.shape[1])
    return train, test


def fingerprint(path: str, splits=("train", "test"), ids: str = "", test_path: str = "",
                test_ids: str = "") -> dict[str, str]:
    """Cheap stamps of the files an embeddings input is read from, without reading them:
    ``{name: storage.stamp(url)}`` (size and S3 ETag or local mtime, as activations records).

    Record it beside an output made from the input, and compare it (:func:`fingerprint_changes`)
    before keeping that output on a rerun: embeddings re-embedded in place, at the same URLs, give
    other stamps. ``path`` and the other arguments are those of :func:`load`:

    - the embed output root: one entry per ``{root}/{split}/*.parquet`` file of each of
      ``splits`` (an empty name is skipped), named ``"{split}/{file}"``, so two spellings of one
      root (a trailing slash) fingerprint alike;
    - a research ``.npy``: the files :func:`load` reads, named by role: ``"embeddings"``,
      ``"ids"``, and ``"test_embeddings"``, ``"test_ids"`` when there is a test file (``splits``
      is not used: a hold-out comes from the same file).

    A file that is not there has no entry (the reader names it when it is read; a comparison
    says it was removed). Costs one listing per split and one metadata request per file."""
    def stamped(named: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, url in named.items():
            try:
                out[name] = storage.stamp(url)
            except FileNotFoundError:
                continue
        return out

    if is_npy(path):
        named = {"embeddings": path, "ids": ids or ids_path_for(path)}
        test_path = test_path or test_path_for(path) or ""
        if test_path:
            named.update({"test_embeddings": test_path, "test_ids": test_ids or ids_path_for(test_path)})
        return stamped(named)
    named = {}
    for split in dict.fromkeys(s for s in splits if s):
        for url in storage.listdir(storage.join(path, split), suffix=".parquet"):
            named[f"{split}/{posixpath.basename(url)}"] = url
    return stamped(named)


def fingerprint_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What differs between two :func:`fingerprint` results, one entry per file, sorted:
    ``"train/a.parquet rewritten"``, ``"... added"``, ``"... removed"``; [] when the same."""
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            out.append(f"{name} removed")
        elif name not in old:
            out.append(f"{name} added")
        elif old[name] != new[name]:
            out.append(f"{name} rewritten")
    return out


# beside an output made from embeddings: the fingerprint of the files it read (pca, train)
INPUTS = "inputs.json"


def record_fingerprint(output: str, stamps: dict[str, str]) -> None:
    """Write ``stamps`` (a :func:`fingerprint`) as ``{output}/inputs.json``."""
    storage.write_bytes(storage.join(output, INPUTS), json.dumps({"files": stamps}, indent=1).encode())


def recorded_changes(output: str, stamps: dict[str, str]) -> list[str] | None:
    """:func:`fingerprint_changes` from the stamps ``{output}/inputs.json`` records to ``stamps``:
    [] when the files are unchanged, None when the output records none (an earlier version's)."""
    url = storage.join(output, INPUTS)
    if not storage.exists(url):
        return None
    return fingerprint_changes(json.loads(storage.read_bytes(url))["files"], stamps)


def same_input(a, b) -> bool:
    """Two spellings of one input path: a trailing slash, or two uploads of a `ray job submit`
    working dir (``.../_ray_pkg_<hash>/``, a new hash for every upload of a changed checkout)."""
    import re

    def norm(p):
        return re.sub(r"/_ray_pkg_[0-9a-f]+/", "/_ray_pkg_/", p.rstrip("/")) if isinstance(p, str) else p
    return norm(a) == norm(b)


def ray_dataset(root: str, split: str, width: int, seed: int | None = None):
    """A Ray Data dataset streaming ``{root}/{split}/*.parquet`` as float32 batches.

    Each batch is checked (finite rows, width) where it is read, so a bad row fails the run with
    the file's ids instead of poisoning the model. With a ``seed`` the files are read in a
    shuffled order, another one each time the dataset is iterated (each epoch): embed writes one
    file per input shard, and shards ordered by sky position or id would otherwise feed training
    the same runs of similar galaxies in the same order every epoch.
    """
    import ray.data

    files = parquet_files(root, split)
    fs, _ = storage.arrow_fs(files[0])
    paths = [storage.arrow_fs(f)[1] for f in files]
    shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True) if seed is not None else None
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle).select_columns(["id_str", "embedding"])
    source = storage.join(root, split)

    def to_x(batch):
        ids = np.asarray(batch["id_str"], dtype=object)
        x = np.stack(batch["embedding"]).astype(np.float32) if batch["embedding"].dtype == object \
            else np.asarray(batch["embedding"], dtype=np.float32)
        check_rows(x, ids, source, width)
        return {"x": x}

    return ds.map_batches(to_x, batch_format="numpy")


# ----------------------------------------------------------------------------- generated data


def planted(n: int, d: int, n_atoms: int, k: int, seed: int = 0, noise: float = 0.01,
            offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings with a planted sparse dictionary: x = sum of k random unit atoms + noise.

    Returns (x[n, d] float32, atoms[n_atoms, d]). Coefficients are positive (uniform 0.5..2),
    like the non-negative codes an SAE learns; ``offset`` shifts every embedding (a non-zero
    median for the input-bias init to find).
    """
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :k]
    coef = rng.uniform(0.5, 2.0, (n, k))
    x = np.einsum("nk,nkd->nd", coef, atoms[idx]) + noise * rng.standard_normal((n, d)) + offset
    return x.astype(np.float32), atoms


def write_parquet(root: str, split: str, ids, x: np.ndarray, n_files: int = 1,
                  metadata: dict | None = None) -> list[str]:
    """Write rows in the embed output contract: {root}/{split}/part-NNNNN.parquet."""
    import json

    import pyarrow as pa

    x = np.asarray(x, dtype=np.float32)
    urls = []
    for i, part in enumerate(np.array_split(np.arange(len(x)), n_files)):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[part].reshape(-1)), x.shape[1])
        table = pa.table({"id_str": pa.array([str(ids[j]) for j in part], pa.string()),
                          "split": pa.array([split] * len(part), pa.string()), "embedding": emb})
        meta = {"galaxysae": json.dumps(metadata or {"encoder": "generated"})}
        table = table.replace_schema_metadata(meta)
        url = storage.join(root, split, f"part-{i:05d}.parquet")
        storage.write_parquet(table, url)
        urls.append(url)
    return urls
