"""Render's peak memory as the dataset grows 8x: ``galaxysae render`` on n and 8n galaxies.

Both runs get generated galaxies (the gz_euclid layout, one shard size, so the larger dataset
has 8x the shards), made-up 640-d embeddings for their ids in the embed output contract, and a
PCA dictionary fitted on them; then ``galaxysae render`` (its own local Ray instance: the id
index, activations through Ray Data, thumbnails and grids as Ray tasks) runs in a child process
while this one samples the PSS of the child's whole process tree every second (PSS, so pages
shared between Ray workers count once). The number of grids and galaxies per grid is the same
in both runs: only the dataset grows. Ends with
``target render_peak_memory_8x_input: <ratio> (goal <= 1.2) PASS|FAIL``.

    .venv/bin/python bench/render_memory.py [--galaxies 1000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import run_sampled  # noqa: E402


def make_inputs(work: Path, n_test: int, shard: int, px: int) -> tuple[Path, Path, Path]:
    """(dataset, embeddings, pca artifact) for n_test galaxies in the test split."""
    import pyarrow.parquet as pq

    from galaxysae import config, pca, synth
    from galaxysae.embeddings import planted, write_parquet

    root = work / f"n{n_test}"
    ds, emb, d = root / "ds", root / "emb", root / "pca"
    if not (d / "cfg.json").exists():
        synth.run(synth.Config(out=str(ds), n_train=64, n_test=n_test, shard_size=shard,
                               image_size=px, seed=5))
        ids = {s: [i for f in sorted((ds / "data").glob(f"{s}-*.parquet"))
                   for i in pq.read_table(f, columns=["id_str"]).column("id_str").to_pylist()]
               for s in ("train", "test")}
        x, _ = planted(len(ids["train"]) + len(ids["test"]), 640, 256, 16, seed=6)
        ntr = len(ids["train"])
        write_parquet(str(emb), "train", ids["train"], x[:ntr])
        write_parquet(str(emb), "test", ids["test"], x[ntr:], n_files=max(1, n_test // shard))
        pca.run(config.from_dict(pca.Config, {"embeddings": str(emb), "output": str(d),
                                              "n_components": 32, "train_split": "test"}))
    return ds, emb, d


def render_peak(ds: Path, emb: Path, d: Path, results: Path) -> tuple[float, float]:
    """(peak PSS MiB of the render process tree, seconds) of one fresh render run."""
    shutil.rmtree(results, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "galaxysae", "render", "--dictionaries", str(d),
           "--embeddings", str(emb), "--dataset", str(ds), "--results", str(results),
           "--select", "first", "--n_features", "32", "--top_n", "30", "--tile", "64"]
    t0 = time.perf_counter()
    rc, peak, err = run_sampled(cmd, env, 1.0, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"render failed ({rc}):\n{err[-3000:]}")
    grids = list(results.rglob("feature_*"))
    if len(grids) < 64:  # 32 components, both ends
        raise SystemExit(f"render wrote {len(grids)} grids, expected 64:\n{err[-3000:]}")
    return peak / 2**20, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--galaxies", type=int, default=1000, help="test galaxies in the small run")
    ap.add_argument("--image-px", type=int, default=96)
    ap.add_argument("--shard", type=int, default=125, help="galaxies per dataset shard")
    ap.add_argument("--workdir", default="")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-render-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = (a.galaxies, 8 * a.galaxies)
    print(f"bench/render_memory.py: render of 32 PCA components (both ends: 64 grids) x 30 galaxies over {sizes[0]} and "
          f"{sizes[1]} test galaxies ({a.image_px} px, {a.shard} per shard), workdir {work}",
          flush=True)
    peaks = {}
    for n in sizes:
        inputs = make_inputs(work, n, a.shard, a.image_px)
        peaks[n], secs = render_peak(*inputs, work / f"results{n}")
        print(f"  {n:>7} galaxies: peak {peaks[n]:8.0f} MiB (PSS, whole Ray tree), {secs:6.1f} s",
              flush=True)
    ratio = peaks[sizes[1]] / peaks[sizes[0]]
    print(f"target render_peak_memory_8x_input: {ratio:.3f} (goal <= 1.2) "
          f"{'PASS' if ratio <= 1.2 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
