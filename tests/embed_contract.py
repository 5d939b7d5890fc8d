"""The embed output contract (DESIGN.md §3), checked the same way for every launcher.

``{output}/{split}/*.parquet`` hold ``id_str``, ``split`` and ``embedding`` (a fixed-size list of
float32); failures are recorded under ``{output}/_failures/``; every input id appears exactly
once across the two.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from galaxysae import storage


def input_ids(dataset_dir: Path, splits=("train", "test")) -> dict[str, list[str]]:
    """id_str of every row of a local gz_euclid-layout dataset (``data/{split}-*.parquet``)."""
    out = {}
    for split in splits:
        files = sorted(Path(dataset_dir).rglob(f"{split}-*.parquet"))
        assert files, f"no {split} shards under {dataset_dir}"
        out[split] = [i for f in files for i in pq.read_table(f, columns=["id_str"])["id_str"].to_pylist()]
    return out


def _tables(url: str) -> list[tuple[str, pa.Table]]:
    if not storage.exists(url):
        return []
    fs, root = storage.fsspec_fs(url)
    fs.invalidate_cache()
    found = []
    for path in sorted(fs.find(root)):
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                found.append((path, pq.read_table(f)))
    return found


def output_files(output: str, split: str) -> list[str]:
    """The embedding parquet files of one split (paths as the filesystem names them)."""
    url = storage.join(output, split)
    if not storage.exists(url):
        return []
    fs, root = storage.fsspec_fs(url)
    fs.invalidate_cache()
    return sorted(p for p in fs.find(root) if p.endswith(".parquet"))


def check(output: str, expected: dict[str, list[str]]) -> dict:
    """Assert the contract; -> {"embedded": n, "failed": n, "width": d}."""
    width = None
    embedded = failed = 0
    for split, ids in expected.items():
        seen: Counter = Counter()
        for path, t in _tables(storage.join(output, split)):
            emb = t.schema.field("embedding").type
            assert pa.types.is_fixed_size_list(emb), f"{path}: embedding is {emb}, not a fixed-size list"
            assert emb.value_type == pa.float32(), f"{path}: embedding values are {emb.value_type}"
            width = width or emb.list_size
            assert emb.list_size == width, f"{path}: width {emb.list_size} != {width}"
            assert set(t["split"].to_pylist()) <= {split}, f"{path}: wrong split column"
            seen.update(t["id_str"].to_pylist())
            embedded += t.num_rows
        for path, t in _tables(storage.join(output, "_failures", split)):
            seen.update(t["id_str"].to_pylist())
            failed += t.num_rows
        dups = [i for i, n in seen.items() if n > 1]
        assert not dups, f"split {split}: ids written more than once: {dups[:10]}"
        missing = set(ids) - set(seen)
        assert not missing, f"split {split}: {len(missing)} input ids missing, e.g. {sorted(missing)[:5]}"
        extra = set(seen) - set(ids)
        assert not extra, f"split {split}: ids not in the input: {sorted(extra)[:5]}"
    assert width and width > 0, "no embeddings written"
    return {"embedded": embedded, "failed": failed, "width": width}
