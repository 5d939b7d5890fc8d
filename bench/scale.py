"""Scale model: from measured stage costs to wall time and cost for Euclid Q1 and DR1.

Measured here, in one run:
- per-image JPEG decode + resize cost (``galaxysae.decode``, one CPU), at the survey's image size;
- per-image encode cost of the CPU encoder actors (``galaxysae.encoder``, stand-in
  convnext_nano weights: the same FLOPs as Zoobot's), as many at once and with the threads the
  embed job gives them;
- parquet write rate of embedding rows, and the S3 read rate of dataset shards, both against a
  local SeaweedFS started by this script (``tests/services/s3.py``);
- embedding storage per galaxy (float32 vs float16, parquet bytes written);
then the model is checked against two real ``galaxysae embed`` runs here (Ray, S3 in and out):
``target scale_model_error_<n>: |predicted - measured| / measured (goal <= 0.25)``.

The model of one node: images/s = min(encoder rate, decode CPUs / decode s per image,
S3 bandwidth / bytes per image, parquet write rate). Here the 2 CPUs are shared by decode and
the encoder actors, so the stages cannot overlap: s per image = decode + encode + read + write.
The measured time is the job's own pipeline time (logged after Ray is up); a fixed pipeline
start-up (encoder actors, model load), measured by a calibration run of one batch per encoder
actor, is added.

The GPU encode rate is a PLACEHOLDER (``--gpu-img-s``, default 5000 img/s for convnext_nano at
224 px in bf16 on an H100-class GPU) until ``bench/gpu.sh`` has run on a GPU; cost is
``--usd-per-gpu-hour`` (default 2.5) times GPU-hours.

    .venv/bin/python bench/scale.py [--gpus 1 8 64] [--gpu-img-s 5000] [--usd-per-gpu-hour 2.5]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SURVEYS = {"Euclid Q1": 380_000, "Euclid DR1": 1_500_000_000}
SURVEY_PX = 424  # gz_euclid cut-outs are a few hundred px; decoded and resized to 224 for Zoobot
D = 640


def _median_time(fn, reps: int = 3) -> float:
    import statistics

    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def decode_cost(px: int, size: int, n: int = 64) -> tuple[float, int]:
    """(seconds per image on one CPU, JPEG bytes per image) for px-sided JPEGs -> size."""
    import pyarrow as pa

    from bench.gpu_embed import make_jpegs
    from galaxysae.decode import decode_batch

    imgs = make_jpegs(n, px)
    t = pa.table({"id_str": [str(i) for i in range(n)],
                  "image": pa.array([{"bytes": b, "path": None} for b in imgs],
                                    pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                  "path": ["bench"] * n})
    return _median_time(lambda: decode_batch(t, image_size=size)) / n, sum(map(len, imgs)) // n


def encode_cost(size: int, threads: int, batch: int = 32, actors: int = 1) -> float:
    """Seconds per image of this node's encoder forward on the CPU, ``actors`` processes of
    ``threads`` torch threads at once: the model-only variant of ``bench/embed.py``
    (``encoder.embed`` in child processes with the embed job's encoder-actor allocator
    settings, which glibc reads at process start)."""
    from bench import embed as embed_bench
    from galaxysae import allocator

    out = embed_bench.measure(["model", str(size), "fp32", str(5 * batch * actors), str(batch),
                               str(threads), str(actors)],
                              f"encode {size} px, {actors} x batch {batch}", allocator.worker_env())
    return out["seconds"] / out["images"]


def embedding_table(n: int, dtype: str):
    import numpy as np
    import pyarrow as pa

    x = np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)
    typ = pa.float16() if dtype == "float16" else pa.float32()
    arr = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(dtype).ravel(), typ), D)
    return pa.table({"id_str": [f"EUC_{i:012d}" for i in range(n)], "split": ["train"] * n,
                     "embedding": arr})


def parquet_cost(url_root: str, n: int = 4096) -> dict:
    """Write rate (s per row) of embedding parquet to S3, and bytes per galaxy (f32 vs f16)."""
    import pyarrow.parquet as pq

    from galaxysae import storage

    out = {}
    for dtype in ("float32", "float16"):
        t = embedding_table(n, dtype)
        buf = io.BytesIO()
        pq.write_table(t, buf)
        out[f"bytes_{dtype}"] = buf.tell() / n
    t = embedding_table(n, "float32")
    i = [0]

    def write():
        i[0] += 1
        storage.write_parquet(t, storage.join(url_root, f"bench-write/{i[0]}.parquet"))

    out["write_s_per_row"] = _median_time(write) / n
    return out


def s3_read_rate(url_root: str, mib: int = 16) -> float:
    """Bytes/s of one reader streaming a ``mib`` MiB object from S3 (a shard-sized read)."""
    from galaxysae import storage

    url = storage.join(url_root, "bench-read/blob")
    storage.write_bytes(url, os.urandom(mib << 20))
    return (mib << 20) / _median_time(lambda: storage.read_bytes(url))


def embed_run(dataset: str, output: str, size: int, env: dict) -> tuple[float, float]:
    """(pipeline seconds as the job reports them, process wall seconds) of one real
    ``galaxysae embed`` run with its own local Ray instance. The pipeline time starts after Ray
    is up and the plan made: Ray's own start-up (10-60 s on a loaded 2-CPU box) is not what the
    model is about."""
    import re

    args = [sys.executable, "-m", "galaxysae", "embed", "--dataset", dataset, "--output", output,
            "--encoder", "convnext_nano", "--pretrained", "false", "--image-size", str(size),
            "--splits", "train"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"embed run on {dataset} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = re.search(r"summary: .* ([0-9.]+) s, [0-9.]+ img/s", proc.stderr + proc.stdout)
    if not m:
        raise RuntimeError(f"embed run on {dataset}: no summary line in its log:\n{proc.stderr[-3000:]}")
    return float(m.group(1)), wall


def predict_local(n: int, c: dict, startup: float) -> float:
    """Seconds for n images here: 2 shared CPUs, so the stages add up (no overlap)."""
    per = c["decode_s"] + c["encode_s"] + c["write_s_per_row"] + c["jpeg_bytes"] / c["s3_bytes_s"]
    return startup + n * per


def predict_cluster(n: int, gpus: int, c: dict, gpu_img_s: float, cpus_per_gpu: int) -> dict:
    """Throughput-bound model of N GPU nodes: each stage runs in parallel, the slowest decides."""
    per_gpu = {
        "encode (GPU, placeholder)": gpu_img_s,
        f"decode ({cpus_per_gpu - 1} CPUs)": (cpus_per_gpu - 1) / c["survey_decode_s"],
        # one S3 stream per decode CPU, each at the single-stream rate measured here
        "S3 read (measured here)": (cpus_per_gpu - 1) * c["s3_bytes_s"] / c["survey_jpeg_bytes"],
        "parquet write (measured here)": 1 / c["write_s_per_row"],
    }
    bound = min(per_gpu, key=per_gpu.get)
    rate = per_gpu[bound] * gpus
    return {"rate": rate, "bound": bound, "hours": n / rate / 3600}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--gpu-img-s", type=float, default=5000.0,
                   help="GPU encode rate, img/s (placeholder until bench/gpu.sh runs on a GPU)")
    p.add_argument("--gpu-sae-samples-s", type=float, default=1e6,
                   help="GPU SAE training rate, samples/s (placeholder)")
    p.add_argument("--usd-per-gpu-hour", type=float, default=2.5)
    p.add_argument("--cpus-per-gpu", type=int, default=16)
    p.add_argument("--sizes", type=int, nargs=2, default=[160, 480], help="embed runs to check")
    p.add_argument("--image-px", type=int, default=160, help="image side of the check runs")
    p.add_argument("--embed-px", type=int, default=128, help="encoder input side of the check runs")
    a = p.parse_args(argv)

    from galaxysae import synth
    from tests.services.s3 import S3Server

    from galaxysae import embed

    here = embed.plan(embed.Config(device="cpu"), [{"CPU": float(os.cpu_count() or 1)}])
    threads, batch, actors = here.encoder_threads, here.batch_size, here.num_encoders
    with tempfile.TemporaryDirectory(prefix="galaxysae-scale-") as tmp:
        s3 = S3Server(Path(tmp) / "s3").start()
        try:
            os.environ.update(s3.env())
            bucket = s3.make_bucket("scale")
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            env.pop("RAY_ADDRESS", None)  # a private local Ray instance per run

            c: dict = {}
            c["survey_decode_s"], c["survey_jpeg_bytes"] = decode_cost(SURVEY_PX, 224)
            c["decode_s"], _ = decode_cost(a.image_px, a.embed_px)
            c["encode_s"] = encode_cost(a.embed_px, threads, batch, actors)
            c["encode_224_s"] = encode_cost(224, threads, batch, actors)
            c.update(parquet_cost(bucket))
            datasets = {}
            calibration = batch * actors  # one batch per actor: every actor starts, as in the checks
            for n in [calibration] + list(a.sizes):
                url = f"{bucket}/ds{n}"
                synth.run(synth.Config(out=url, n_train=n, n_test=8, shard_size=160,
                                       image_size=a.image_px, seed=1, workers=1))
                datasets[n] = url
            from galaxysae import storage

            shards = storage.listdir(f"{datasets[a.sizes[0]]}/data", suffix=".parquet")
            c["s3_bytes_s"] = s3_read_rate(bucket)
            c["jpeg_bytes"] = len(storage.read_bytes(shards[0])) / min(160, a.sizes[0])

            print(f"bench/scale.py: {os.cpu_count()} CPUs here; check runs at {a.image_px} px -> "
                  f"{a.embed_px} px")
            print(f"{'measured stage':<44} {'value':>12} {'unit':<14}")
            for label, v, unit in [
                (f"decode {SURVEY_PX} px JPEG -> 224 (1 CPU)", c["survey_decode_s"] * 1e3, "ms/img"),
                (f"decode {a.image_px} px JPEG -> {a.embed_px} (1 CPU)", c["decode_s"] * 1e3, "ms/img"),
                (f"encode 224 px, {actors} CPU actors x {threads} threads", 1 / c["encode_224_s"], "img/s"),
                (f"encode {a.embed_px} px, {actors} CPU actors x {threads} threads", 1 / c["encode_s"],
                 "img/s"),
                ("parquet write to S3 (float32 rows)", 1 / c["write_s_per_row"], "rows/s"),
                ("S3 read of a dataset shard", c["s3_bytes_s"] / 2**20, "MiB/s"),
                (f"JPEG bytes per image ({SURVEY_PX} px)", c["survey_jpeg_bytes"] / 1024, "KiB"),
                ("embedding parquet per galaxy, float32", c["bytes_float32"], "bytes"),
                ("embedding parquet per galaxy, float16", c["bytes_float16"], "bytes"),
            ]:
                print(f"{label:<44} {v:>12.1f} {unit:<14}")

            startup, _ = embed_run(datasets[calibration], f"{bucket}/out{calibration}", a.embed_px,
                                   env)
            startup = max(0.0, startup - predict_local(calibration, c, 0.0))
            print(f"\nfixed pipeline start-up (encoder actors, model load), from a {calibration}-image "
                  f"calibration run: {startup:.1f} s")
            print(f"{'check run':<12} {'predicted s':>12} {'measured s':>11} {'error':>7} "
                  f"{'(process wall s, with Ray start)':>34}")
            lines = []
            for n in a.sizes:
                measured, wall = embed_run(datasets[n], f"{bucket}/out{n}", a.embed_px, env)
                pred = predict_local(n, c, startup)
                err = abs(pred - measured) / measured
                print(f"{n:<12} {pred:>12.1f} {measured:>11.1f} {err:>7.1%} {wall:>34.1f}")
                lines.append(f"target scale_model_error_{n}: {err:.3f} (goal <= 0.25) "
                             f"{'PASS' if err <= 0.25 else 'FAIL'}")
            out_files = storage.listdir(f"{bucket}/out{a.sizes[1]}/train", suffix=".parquet")
            written = sum(len(storage.read_bytes(u)) for u in out_files)
            print(f"embed output parquet: {written / a.sizes[1]:.0f} bytes per galaxy (float32, "
                  f"{a.sizes[1]} rows incl. metadata)")
        finally:
            s3.stop()

    print(f"\nprojection (GPU encode {a.gpu_img_s:.0f} img/s/GPU: PLACEHOLDER until bench/gpu.sh runs "
          f"on a GPU; {a.cpus_per_gpu} CPUs per GPU; ${a.usd_per_gpu_hour}/GPU-hour)")
    print(f"{'survey':<12} {'galaxies':>14} {'GPUs':>5} {'img/s':>10} {'wall h':>9} {'GPU-h':>9} "
          f"{'USD':>10}  bound by")
    for name, n in SURVEYS.items():
        for g in a.gpus:
            r = predict_cluster(n, g, c, a.gpu_img_s, a.cpus_per_gpu)
            print(f"{name:<12} {n:>14,} {g:>5} {r['rate']:>10.0f} {r['hours']:>9.2f} "
                  f"{r['hours'] * g:>9.1f} {r['hours'] * g * a.usd_per_gpu_hour:>10.0f}  {r['bound']}")
    print(f"\n{'storage':<12} {'galaxies':>14} {'float32 GB':>11} {'float16 GB':>11}")
    for name, n in SURVEYS.items():
        print(f"{name:<12} {n:>14,} {n * c['bytes_float32'] / 1e9:>11.2f} "
              f"{n * c['bytes_float16'] / 1e9:>11.2f}")
    need = a.gpu_sae_samples_s * D * 4
    print(f"\nSAE data loader: a GPU at {a.gpu_sae_samples_s:.0e} samples/s (placeholder) needs "
          f"{need / 1e9:.2f} GB/s of float32 embeddings ({need / 2e9:.2f} GB/s float16); Q1 "
          f"({SURVEYS['Euclid Q1'] * D * 4 / 1e9:.1f} GB) stays resident on the GPU, DR1 "
          f"({SURVEYS['Euclid DR1'] * D * 2 / 1e12:.1f} TB float16) must stream at that rate "
          f"(= {need / (c['s3_bytes_s']):.0f} S3 streams at the single-stream rate measured here).")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
