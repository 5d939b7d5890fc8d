"""Fetching each feature's top galaxies: the id index vs the original scan-per-feature.

The original analysis scripts found a feature's 30 top galaxies by iterating over the whole
dataset for each feature. ``galaxysae render`` builds an ``id_str -> (shard, row)`` index once
and reads only the row groups holding the wanted rows. Both are timed side by side in one run on
the same generated shards, for the same features (random top-30 id lists), and must return the
same images. The original iterates over a ``datasets`` dataset (images decoded) once per
feature; ours builds the index and fetches the union of the ids once, as render does.
Usage: ``python bench/render.py [--galaxies 3000] [--features 16] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def scan_fetch(ds, ids: set[str]) -> dict:
    """The original approach: iterate over the whole dataset (images decoded by ``datasets``)."""
    out = {}
    for row in ds:
        if row["id_str"] in ids:
            out[row["id_str"]] = row["image"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--galaxies", type=int, default=3000)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--image-px", type=int, default=128)
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()

    from galaxysae import config, image_index, synth

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-render-"))
    ds = work / "ds"
    if not (ds / "data").exists():
        synth.run(config.from_dict(synth.Config, {"out": str(ds), "n_train": 1, "n_test": args.galaxies,
                                                  "image_size": args.image_px, "shard_size": 500}))
    shards = sorted(str(p) for p in (ds / "data").glob("test-*.parquet"))
    index = image_index.build(shards)
    all_ids = sorted(index._pos)
    rng = random.Random(0)
    features = [rng.sample(all_ids, args.top) for _ in range(args.features)]

    import datasets

    t0 = time.perf_counter()
    ds = datasets.load_dataset("parquet", data_files=shards, split="train", cache_dir=str(work / "hf-cache"))
    scanned = [scan_fetch(ds, set(f)) for f in features]
    t_scan = time.perf_counter() - t0

    t0 = time.perf_counter()
    index = image_index.build(shards)  # the one-off build is counted
    union = index.fetch(sorted({i for f in features for i in f}))  # what render does: one pass
    t_index = time.perf_counter() - t0

    for f, found in zip(features, scanned):
        assert set(found) == set(f) and all(i in union for i in f), "index and scan disagree"
    probe = features[0][0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(union[probe]))), np.asarray(scanned[0][probe]))
    n = args.features
    print(f"{args.galaxies} galaxies in {len(shards)} shards, {n} features x {args.top} galaxies")
    print(f"{'method':<28}{'seconds':>10}{'features/s':>12}")
    print(f"{'scan per feature (original)':<28}{t_scan:>10.2f}{n / t_scan:>12.1f}")
    print(f"{'id index (build + 1 fetch)':<28}{t_index:>10.2f}{n / t_index:>12.1f}")
    ratio = t_scan / t_index
    print(f"target index_vs_scan: {ratio:.1f}x (goal >= 10x) {'PASS' if ratio >= 10 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
