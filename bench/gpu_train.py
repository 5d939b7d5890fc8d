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
sys.path.insert(0, str(HERE))

from measurement import attempt  # noqa: E402 - bench/, beside this script


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", HERE / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sync_check(bt, x_train, device: str, shrink: int) -> list[str]:
    """Training steps of both models (AuxK path on) under torch's CUDA sync debug mode
    ("error"): any op that copies a value to the host (``item()``, ``nonzero``, CUDA
    ``bincount``, ...) raises. The first step runs outside it (it takes the periodic look at the
    dead-latent counters). Returns the offending ops, [] when none; on the CPU the steps run
    without the mode (nothing to sync)."""
    import traceback

    from galaxysae import train as train_job

    found = []
    for kind in ("topk", "matryoshka"):
        ours, _, cfg, opt, sched, x = bt.step_setup(kind, x_train, device, shrink)
        ours.train()
        ours.steps_since_active.fill_(ours.cfg.dead_steps)  # all dead: the AuxK path runs too
        train_job.train_step(cfg, ours, opt, sched, x)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                train_job.train_step(cfg, ours, opt, sched, x)
        except RuntimeError as exc:
            where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                     for f in traceback.extract_tb(exc.__traceback__) if "galaxysae" in f.filename]
            found.append(f"{kind}: {str(exc).splitlines()[0]} at {' <- '.join(reversed(where[-3:]))}")
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return found


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
    tag = "gpu_" if device == "cuda" else "cpu_"
    rows, part_rows, lines, failed = [], [], [], []

    def run(what: str, fn):
        """fn() or None; a failure is printed (``measurement.attempt``) and counted."""
        out = attempt(f"{what}:", fn, device)
        if out is None:
            failed.append(what)
        return out

    for kind in ("topk", "matryoshka"):
        trained = run(f"{kind} training",
                      lambda k=kind: bt.compare(k, x_train, x_test, args.epochs, device, shrink=shrink))
        if trained is None:
            lines.append(f"target {tag}{kind}_speedup_at_equal_fvu: not measured (see ERROR above) FAIL")
        rows += trained or []
        part_rows += run(f"{kind} parts", lambda k=kind: bt.parts(
            k, x_train, device, reps=2 if args.smoke else 10, shrink=shrink)) or []
    if part_rows:
        bt.report_parts(part_rows)
    if rows:
        lines = bt.report(rows, source, prefix=tag) + lines
    if device == "cuda":
        print(f"GPU memory peak: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    syncs = run("sync check", lambda: sync_check(bt, x_train, device, shrink))  # None: it failed
    if device == "cuda":
        for msg in syncs or []:
            print(f"host sync in a training step: {msg}")
        measured = "not measured (see ERROR above)" if syncs is None else f"{len(syncs)} models with a sync"
        lines.append(f"target gpu_train_step_no_host_sync: {measured} (goal 0) "
                     f"{'PASS' if syncs == [] else 'FAIL'}")
    elif syncs is not None:
        print("host syncs in a training step: not checked on the CPU (the steps ran)")
    for line in lines:
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
