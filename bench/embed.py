"""Embedding throughput and memory: our Ray Data pipeline vs the original research loop.

Everything is measured side by side in one run, on the same generated shards, each variant in
its own process (a private local Ray instance for ours) while this process samples the memory
(PSS, so pages shared between Ray workers count once) of the variant's whole process tree:

- original: ``datasets`` + torch DataLoader (4 workers, batch 64), PIL Resize((S, S)) +
  ToTensor, a forward hook on ``head``, fp32 (DESIGN.md §2);
- ours fp32 and ours bf16 (``galaxysae embed``), and ours fp32 on 1/8 of the images (memory);
- model only: forward passes on ready 8-bit pixels, fp32 and bf16, in as many processes at
  once as our pipeline runs encoder actors on this machine, each at their batch size, thread
  count and allocator settings (``galaxysae.allocator``); for reference also with glibc's
  default allocator: the ceiling without decoding (target
  ``pipeline_vs_model_only``: decode, transfer and writing hidden behind encoding, compared
  once the pipeline is up: rows after the first batch came back, over the time since, as the
  embed summary reports it).

The encoder is a randomly initialised convnext_nano (the Zoobot architecture; weights do not
change the cost). Throughput counts each variant from its start, with Ray already imported
and initialised for ours (on a cluster it is already up), model loading and data loading
included. Memory is sampled every 2 s: one sample of a Ray process tree costs ~75 ms of CPU,
which at a faster rate would be a load of its own on a small machine.
Usage: ``python bench/embed.py [--images 2000] [--image-px 256] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.memory import run_sampled  # noqa: E402

ENCODER = "convnext_nano"


# ----------------------------------------------------------------------------- variants (children)


def variant_original(data: str, size: int, out: str) -> dict:
    import numpy as np
    import timm
    import torch
    from datasets import load_dataset
    from torch.utils.data import DataLoader
    from torchvision import transforms

    t0 = time.perf_counter()
    ds = load_dataset("parquet", data_files=sorted(glob.glob(f"{data}/data/train-*.parquet")),
                      split="train", cache_dir=os.path.join(out, "hf_cache"))
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    class Galaxies(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            row = ds[i]
            return tf(row["image"].convert("RGB")), row["id_str"]

    torch.manual_seed(0)
    model = timm.create_model(ENCODER, pretrained=False, num_classes=0).eval()
    feats = []
    model.head.register_forward_hook(lambda m, i, o: feats.append(o.detach().cpu().numpy()))
    ids = []
    with torch.no_grad():
        for x, batch_ids in DataLoader(Galaxies(), batch_size=64, num_workers=4):
            model(x)
            ids += list(batch_ids)
    np.save(os.path.join(out, "embeddings.npy"), np.concatenate(feats))
    return {"images": len(ids), "seconds": time.perf_counter() - t0}


def variant_ours(data: str, size: int, out: str, precision: str) -> dict:
    import logging
    import re

    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(include_dashboard=False, log_to_driver=False)
    from galaxysae import embed

    summary: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("summary:"):
                summary.append(record.getMessage())

    logging.getLogger("galaxysae.embed").addHandler(Catch())
    logging.getLogger("galaxysae.embed").setLevel(logging.INFO)
    t0 = time.perf_counter()
    rc = embed.run(embed.Config(dataset=data, splits=["train"], output=os.path.join(out, "emb"),
                                encoder=ENCODER, pretrained=False, image_size=size,
                                precision=precision, progress_interval_s=60))
    seconds = time.perf_counter() - t0
    import pyarrow.parquet as pq

    n = sum(pq.read_metadata(f).num_rows for f in glob.glob(os.path.join(out, "emb/train/*.parquet")))
    ray.shutdown()
    m = re.search(r"\(([0-9.]+) img/s after ([0-9.]+) s of start-up\)", summary[-1] if summary else "")
    if not m:
        raise SystemExit(f"no summary line with the rate after start-up: {summary}")
    return {"images": n, "seconds": seconds, "rc": rc, "steady_rate": float(m.group(1)),
            "startup_s": float(m.group(2))}


def variant_model(size: int, precision: str, n: int, batch: int, threads: int,
                  encoders: int = 1) -> dict:
    """The encoder as our actors run it (``encoder.embed``; the parent gives this process the
    actors' allocator settings), on ready pixels: no decoding, no Ray. ``encoders`` processes at
    once, as the pipeline's encoder actors share a node, each with ``threads`` torch threads and
    a share of the ``n`` images; the rate is all their images over the time from their common
    start to the last one's end."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # each loads torch itself, as an actor does
    start, done = ctx.Barrier(encoders), ctx.Queue()
    share = -(-n // encoders)
    procs = [ctx.Process(target=_model_loop, args=(size, precision, share, batch, threads, start, done))
             for _ in range(encoders)]
    for p in procs:
        p.start()
    spans = [done.get() for _ in procs]
    for p in procs:
        p.join()
    images = sum(s[0] for s in spans)
    return {"images": images, "seconds": max(s[2] for s in spans) - min(s[1] for s in spans)}


def _model_loop(size, precision, n, batch, threads, start, done) -> None:
    import numpy as np
    import timm
    import torch

    from galaxysae import encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(ENCODER, pretrained=False, num_classes=0).eval()
    x = (np.random.default_rng(0).random((batch, 3, size, size)) * 255).astype(np.uint8)
    encoder.embed(model, x, "cpu", precision)  # warm-up at the timed shape
    start.wait()
    t0 = time.time()
    images = 0
    while images < n:
        encoder.embed(model, x, "cpu", precision)
        images += len(x)
    done.put((images, t0, time.time()))


# ----------------------------------------------------------------------------- the parent


def measure(args: list[str], label: str, env_extra: dict | None = None) -> dict:
    """Run one variant in a child process; sample its tree's PSS every 2 s."""
    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    rc, peak, err = run_sampled([sys.executable, __file__, "--child", result, *args], env, 2.0)
    if rc != 0:
        raise SystemExit(f"{label} failed ({rc}):\n{err[-4000:]}")
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    out["peak_mib"] = peak / 2**20
    out["rate"] = out["images"] / out["seconds"]
    steady = (f"  ({out['steady_rate']:.2f} img/s after {out['startup_s']:.1f} s of start-up)"
              if "steady_rate" in out else "")
    print(f"  {label:<56} {out['images']:>6} img {out['seconds']:>8.1f} s {out['rate']:>8.2f} img/s "
          f"peak {out['peak_mib']:>8.0f} MiB{steady}", flush=True)
    return out


def bf16_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def make_data(workdir: Path, n: int, px: int) -> tuple[str, str]:
    """Two datasets from the same generator: n images, and n/8 images, in shards of one size
    (as a real dataset grows: more shards), at least 8 shards in the smaller one so that both
    runs have the same read/decode parallelism and only the data volume differs."""
    from galaxysae import synth

    shard = max(8, n // 64)
    paths = []
    for label, count in (("full", n), ("eighth", max(8, n // 8))):
        path = workdir / f"data_{label}_{count}_{px}_{shard}"
        if not (path / "README.md").exists():
            synth.run(synth.Config(out=str(path), n_train=count, n_test=1, image_size=px,
                                   shard_size=shard, seed=11))
        paths.append(str(path))
    return paths[0], paths[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="images in the full run")
    ap.add_argument("--image-px", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--size", type=int, default=224, help="encoder input size")
    ap.add_argument("--workdir", default="", help="where data and outputs go (default: a temp dir)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *params = a.rest
        if kind == "original":
            res = variant_original(params[0], int(params[1]), params[2])
        elif kind == "ours":
            res = variant_ours(params[0], int(params[1]), params[2], params[3])
        else:
            res = variant_model(int(params[0]), params[1], int(params[2]), int(params[3]),
                                int(params[4]), int(params[5]))
        Path(a.child).write_text(json.dumps(res))
        return 0

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench/embed.py: {a.images} images of {a.image_px} px -> {a.size} px, {os.cpu_count()} CPUs, "
          f"workdir {work}", flush=True)
    full, eighth = make_data(work, a.images, a.image_px)
    bf16 = bf16_supported()

    def out(name):
        d = work / f"out_{name}"
        subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir()
        return str(d)

    from galaxysae import allocator, embed

    planned = embed.plan(embed.Config(), [{"CPU": float(os.cpu_count() or 1)}])
    batch, threads, actors = planned.batch_size, planned.encoder_threads, planned.num_encoders
    actor_env = allocator.worker_env()  # what the pipeline's encoder actors run with

    def model(precision, env=actor_env, note=""):
        label = f"model only {precision}, {actors} x {threads} threads, batch {batch}{note}"
        return measure(["model", str(a.size), precision, str(min(a.images, 512)), str(batch),
                        str(threads), str(actors)], label, env)

    print(f"{'variant':<58} images   seconds    img/s   peak memory (PSS)")
    r = {}
    r["original"] = measure(["original", full, str(a.size), out("original")], "original fp32")
    r["ours"] = measure(["ours", full, str(a.size), out("ours"), "fp32"], "ours fp32")
    if bf16:
        r["ours_bf16"] = measure(["ours", full, str(a.size), out("ours_bf16"), "bf16"], "ours bf16")
    r["ours_eighth"] = measure(["ours", eighth, str(a.size), out("eighth"), "fp32"], "ours fp32, 1/8 input")
    r["model"] = model("fp32")
    if bf16:
        r["model_bf16"] = model("bf16")
    # the same forward pass with glibc's default allocator settings: what allocator.py buys
    model("fp32", env=None, note=", default malloc")

    base = r["original"]["rate"]
    print()
    steady = r["ours"]["steady_rate"] / r["model"]["rate"]
    print(f"ratio ours/original fp32: {r['ours']['rate'] / base:.3f}; ours after start-up / "
          f"model-only fp32: {steady:.3f}; from the start: {r['ours']['rate'] / r['model']['rate']:.3f}")
    if bf16:
        print(f"ratio ours bf16 after start-up / model-only bf16: "
              f"{r['ours_bf16']['steady_rate'] / r['model_bf16']['rate']:.3f}")
    rss_ratio = r["ours"]["peak_mib"] / r["ours_eighth"]["peak_mib"]
    targets = [("throughput_fp32_vs_original", r["ours"]["rate"] / base, 0.95, ">="),
               ("pipeline_vs_model_only", steady, 0.9, ">=")]
    if bf16:
        targets.append(("throughput_bf16_vs_original_fp32", r["ours_bf16"]["rate"] / base, 1.8, ">="))
    else:
        print("bf16: this CPU has no avx512_bf16/amx_bf16; the bf16 target does not apply here")
    targets.append(("peak_memory_8x_input", rss_ratio, 1.2, "<="))
    for name, value, goal, op in targets:
        ok = value >= goal if op == ">=" else value <= goal
        print(f"target {name}: {value:.3f} (goal {op} {goal}) {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
