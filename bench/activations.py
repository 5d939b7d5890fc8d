"""The driver's memory for a split's activations: every triple held at once vs spilled by range.

``activations.compute`` turns Ray Data's batches of sparse codes (id_str, feature, value) into
activations.parquet (sorted by feature, then value descending) and features.parquet (per-feature
counts, sums, max, top-N galaxies). Before, the driver collected every batch, concatenated and
sorted them, turned id_str into one Python string per non-zero and sorted again (lexsort) for the
top-N: ~200-250 bytes of driver memory per non-zero, several GB per dictionary at Euclid Q1
scale (380k galaxies x k=64 of 5,120 latents = 24M non-zeros). Now
(``activations.write_activations``) the triples are spilled to local files by feature range and
sorted a bounded group of ranges at a time. ``code_matrix`` (compare's codes) likewise: a Python
string and a dict lookup per triple before; now batches of the file into preallocated arrays,
the ids looked up by arrow (``index_in``).

Both paths run side by side on the same generated TopK codes (power-law feature frequencies as
trained SAEs show; generated once into an Arrow file that each run streams batch by batch, as
Ray Data hands batches over), each in a child process of its own that first runs the same step
on two batches (so code pages and allocator arenas are in the baseline), at two sizes; the
figure is the growth of the child's peak RSS (VmHWM) over its RSS before the run, so arrow's
buffers count too. The outputs of both paths must be equal. Ends with
``target activations_memory: <ratio> ... (goal >= 10x and <= 10 bytes per added non-zero,
equal outputs) PASS|FAIL``. About a minute and a half on 2 cores.

    .venv/bin/python bench/activations.py [--galaxies 20000 80000] [--latents 5120] [--k 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

BATCH = 1024  # galaxies per batch, compute's default batch_size
TOP_N = 30


def code_batches(n: int, m: int, k: int, seed: int = 0):
    """Ray-like batches (pyarrow Tables id_str, feature, value) of n galaxies' TopK codes: k of m
    latents per galaxy, drawn without replacement with power-law weights (Gumbel top-k)."""
    import pyarrow as pa

    logp = (-0.8 * np.log(np.arange(1, m + 1))).astype(np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, n, BATCH):
        ids, feats, vals = [], [], []
        for s in range(start, min(start + BATCH, n), 128):  # 128 galaxies at a time: small temporaries
            b = min(s + 128, start + BATCH, n) - s
            g = logp + rng.gumbel(size=(b, m))
            top = np.argpartition(g, m - k, axis=1)[:, m - k:]
            top.sort(axis=1)  # np.nonzero's order in Encode: by galaxy, then feature
            feats.append(top.reshape(-1).astype(np.int32))
            vals.append(rng.exponential(1.0, b * k).astype(np.float32))
            ids += [f"EUCL_Q1_{i:012d}" for i in range(s, s + b) for _ in range(k)]
        yield pa.table({"id_str": pa.array(ids, pa.string()), "feature": np.concatenate(feats),
                        "value": np.concatenate(vals)})


def write_codes(path: Path, n: int, m: int, k: int) -> None:
    """The batches of :func:`code_batches` in an Arrow IPC stream, generated once for both paths."""
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink:
        writer = None
        for t in code_batches(n, m, k):
            writer = writer or pa.ipc.new_stream(sink, t.schema)
            writer.write_table(t)
        writer.close()


def read_codes(path: str):
    """Yield the batches of a :func:`write_codes` file one at a time, as Ray Data hands them over."""
    import pyarrow as pa

    with pa.OSFile(path) as source:
        for b in pa.ipc.open_stream(source):
            yield pa.Table.from_batches([b])


def old_feature_stats(ids, feats, values, n_galaxies: int, n_latents: int, levels, top_n: int,
                      signed: bool):
    """activations.feature_stats as it was: one lexsort of every triple, Python lists of ids."""
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


def old_write(batches, out: str, n_galaxies: int, n_latents: int, levels, top_n: int, signed: bool):
    """The driver's side of compute as it was: collect, concatenate, sort, feature_stats."""
    import pyarrow as pa

    from galaxysae import storage

    tables = [b.select(["id_str", "feature", "value"]) for b in batches]
    schema = pa.schema([("id_str", pa.string()), ("feature", pa.int32()), ("value", pa.float32())])
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    n_seen = len(set(table.column("id_str").to_pylist())) if signed else None
    if n_seen is not None and n_seen != n_galaxies:
        raise RuntimeError(f"encoded {n_seen} galaxies of {n_galaxies}")
    table = table.sort_by([("feature", "ascending"), ("value", "descending")])
    stats = old_feature_stats(table.column("id_str").to_numpy(zero_copy_only=False),
                              table.column("feature").to_numpy(), table.column("value").to_numpy(),
                              n_galaxies, n_latents, levels, top_n, signed)
    storage.write_parquet(table, storage.join(out, "activations.parquet"))
    return stats, table.num_rows


def old_code_matrix(out: str, ids: list[str], n_latents: int):
    """activations.code_matrix as it was: a Python dict lookup per triple's id string."""
    from scipy import sparse

    from galaxysae import activations

    table = activations.load_activations(out)
    pos = {s: i for i, s in enumerate(ids)}
    act_ids = table.column("id_str").to_pylist()
    rows = np.fromiter((pos.get(s, -1) for s in act_ids), dtype=np.int64, count=len(act_ids))
    keep = rows >= 0
    feats = table.column("feature").to_numpy()
    vals = table.column("value").to_numpy().astype(np.float32)
    m = sparse.csr_matrix((vals[keep], (rows[keep], feats[keep])), shape=(len(ids), n_latents))
    m.eliminate_zeros()
    return m


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args) -> int:
    """One measurement in this process: print {"seconds", "peak_mib", "rows", "digest"} as JSON.

    The step first runs once on two batches (into another folder): the code it touches (shared
    libraries' pages count in RSS) and the allocators' first arenas are then part of the
    baseline, and the figure is what the data costs."""
    import itertools

    from galaxysae import activations, storage

    levels = [args.latents]

    def write(batches, out: str, n: int):
        os.makedirs(out, exist_ok=True)
        if args.child == "old":
            stats, rows = old_write(batches, out, n, args.latents, levels, TOP_N, False)
        else:
            stats, rows = activations.write_activations(batches, out, n, args.latents, levels, TOP_N, False)
        storage.write_parquet(stats, storage.join(out, "features.parquet"))
        return rows

    def matrix(out: str, ids: list[str]):
        fn = old_code_matrix if args.child == "old_matrix" else activations.code_matrix
        return fn(out, ids, args.latents)

    ids = [f"EUCL_Q1_{i:012d}" for i in range(args.galaxies)]
    warm = args.out + "_warm"
    if args.child in ("old", "new"):
        write(itertools.islice(read_codes(args.codes), 2), warm, 2 * BATCH)
    else:
        activations.write_activations(itertools.islice(read_codes(args.codes), 2), warm, 2 * BATCH,
                                      args.latents, levels, TOP_N, False)
        matrix(warm, ids[:2 * BATCH])
    try:  # reset VmHWM (Linux >= 4.0), so the peak is this run's
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    digest = None
    if args.child in ("old", "new"):
        rows = write(read_codes(args.codes), args.out, args.galaxies)
    else:
        m = matrix(args.out, ids)
        rows = m.nnz
        digest = hashlib.sha1(b"".join(a.tobytes() for a in (m.indptr, m.indices, m.data))).hexdigest()
    seconds = time.perf_counter() - t0
    peak = max(_rss_kib("VmHWM"), _rss_kib("VmRSS")) - base
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "rows": rows, "digest": digest}))
    return 0


def run_child(mode: str, n: int, codes: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--galaxies", str(n), "--latents",
           str(args.latents), "--k", str(args.k), "--codes", str(codes), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"{mode} on {n} galaxies failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def same_outputs(a: Path, b: Path) -> bool:
    """Equal activations.parquet and features.parquet (NaN equal to NaN)."""
    import pyarrow.parquet as pq

    def plain(x):
        if isinstance(x, float) and math.isnan(x):
            return "nan"
        return [plain(y) for y in x] if isinstance(x, list) else x

    if not pq.read_table(a / "activations.parquet").equals(pq.read_table(b / "activations.parquet")):
        return False
    fa, fb = pq.read_table(a / "features.parquet"), pq.read_table(b / "features.parquet")
    return fa.schema == fb.schema and all(plain(fa.column(c).to_pylist()) == plain(fb.column(c).to_pylist())
                                          for c in fa.column_names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--galaxies", type=int, nargs="+", default=[20000, 80000])
    ap.add_argument("--latents", type=int, default=5120)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--child", choices=["old", "new", "old_matrix", "new_matrix"], help=argparse.SUPPRESS)
    ap.add_argument("--codes", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.galaxies = args.galaxies[0]
        return child(args)

    print(f"TopK codes of {args.latents} latents, k = {args.k}, top {TOP_N} per feature; "
          f"driver peak RSS growth, each run in a child process of its own")
    print(f"{'galaxies':>9}{'non-zeros':>12}  {'step':<26}{'old s':>8}{'new s':>8}"
          f"{'old MiB':>9}{'new MiB':>9}{'ratio':>7}")
    runs, equal = [], True  # (non-zeros, old, new) per size
    with tempfile.TemporaryDirectory(prefix="bench-activations-") as work:
        for n in args.galaxies:
            old_dir, new_dir, codes = Path(work) / f"old{n}", Path(work) / f"new{n}", Path(work) / f"codes{n}"
            write_codes(codes, n, args.latents, args.k)
            old, new = run_child("old", n, codes, old_dir, args), run_child("new", n, codes, new_dir, args)
            same = old["rows"] == new["rows"] and same_outputs(old_dir, new_dir)
            equal &= same
            ratio = old["peak_mib"] / max(new["peak_mib"], 1.0)
            runs.append((new["rows"], old, new))
            print(f"{n:>9,}{new['rows']:>12,}  {'compute (driver side)':<26}{old['seconds']:>8.1f}"
                  f"{new['seconds']:>8.1f}{old['peak_mib']:>9.0f}{new['peak_mib']:>9.0f}{ratio:>6.1f}x"
                  f"{'' if same else '  OUTPUTS DIFFER'}")
            mo = run_child("old_matrix", n, codes, new_dir, args)
            mn = run_child("new_matrix", n, codes, new_dir, args)
            same = mo["digest"] == mn["digest"]
            equal &= same
            print(f"{n:>9,}{mn['rows']:>12,}  {'code_matrix':<26}{mo['seconds']:>8.1f}{mn['seconds']:>8.1f}"
                  f"{mo['peak_mib']:>9.0f}{mn['peak_mib']:>9.0f}"
                  f"{mo['peak_mib'] / max(mn['peak_mib'], 1.0):>6.1f}x{'' if same else '  MATRICES DIFFER'}")
    print(f"outputs of both paths equal: {equal}")
    # growth per non-zero from the smallest to the largest size: what the driver would need at
    # Euclid Q1 scale (24M non-zeros a dictionary) on top of the constant part
    (nnz0, old0, new0), (nnz1, old1, new1) = runs[0], runs[-1]
    per_nnz = {k: (r1["peak_mib"] - r0["peak_mib"]) * 2**20 / max(nnz1 - nnz0, 1)
               for k, r0, r1 in (("old", old0, old1), ("new", new0, new1))}
    print(f"driver memory per added non-zero, {nnz0:,} -> {nnz1:,}: old {per_nnz['old']:.0f} bytes, "
          f"new {per_nnz['new']:.0f} bytes")
    ratio = old1["peak_mib"] / max(new1["peak_mib"], 1.0)
    ok = ratio >= 10 and per_nnz["new"] <= 10 and nnz1 > nnz0 and equal
    print(f"target activations_memory: {ratio:.1f}x less driver memory for compute at {nnz1:,} "
          f"non-zeros, {per_nnz['new']:.0f} bytes per added non-zero (goal >= 10x and <= 10 bytes, "
          f"equal outputs) {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
