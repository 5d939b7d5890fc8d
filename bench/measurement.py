"""One measurement of the GPU benches that may fail without costing the others their figures."""

from __future__ import annotations


def attempt(prefix: str, fn, device: str):
    """``fn()``, or None when it raises: the failure (out of memory, an op the GPU lacks) is
    printed as ``{prefix} ERROR Type: first line`` and CUDA's cache is emptied for what follows."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - any failure: report it, measure the rest
        print(f"{prefix} ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
        return None
