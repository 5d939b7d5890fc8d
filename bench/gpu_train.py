"""GPU part of the training benchmark (called by bench/gpu.sh): torch only, no Ray.

The same side-by-side comparison as bench/train.py (our step vs the original TopK and
Matryoshka loops, same data, hyper-parameters and initial weights, alternating one epoch at a
time, CUDA-synchronised at epoch boundaries only), at a size where a GPU is busy:

    python bench/gpu_train.py [--n-train 131072] [--epochs 3] [--smoke]

Falls back to the CPU (and says so) when no GPU is visible. Ends with `target ...` lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", HERE / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=131072)
    p.add_argument("--n-test", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--embeddings", default="")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CI check)")
    args = p.parse_args(argv)
    shrink = 1
    if args.smoke:
        args.n_train, args.n_test, args.epochs, shrink = 512, 128, 2, 8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("gpu_train: no GPU visible, measuring on the CPU", file=sys.stderr)
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 for both sides: a like-for-like FVU
        print(f"device: {torch.cuda.get_device_name()}")
    bt = _bench_train()
    x_train, x_test, source = bt.load_embeddings(args)
    rows, part_rows = [], []
    for kind in ("topk", "matryoshka"):
        rows += bt.compare(kind, x_train, x_test, args.epochs, device, shrink=shrink)
        part_rows += bt.parts(kind, x_train, device, reps=2 if args.smoke else 10, shrink=shrink)
    bt.report_parts(part_rows)
    lines = bt.report(rows, source, prefix="gpu_" if device == "cuda" else "cpu_")
    if device == "cuda":
        print(f"GPU memory peak: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
