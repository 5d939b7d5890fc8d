"""Host memory allocator settings for processes that run the same CPU forward pass over and over.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB)
with a fresh ``mmap`` and unmaps it when freed; a thread other than the main one allocates from
its own arena, made of 64 MiB heaps that are unmapped as soon as they are empty. A CPU forward
pass of the encoder at batch 32 allocates and frees tens of blocks of that size (one activation
of convnext_nano at 224 px is 4 MiB per image), so every batch page-faults its whole working set
in again. A Ray actor runs its calls on a thread of its own, so it gets both. Measured on a 2-core
AMD EPYC, a forward pass on a thread spent ~20% of its CPU time in the kernel; with one arena,
no mmap and no trimming, it spends ~3% there and embeds 13.6-17.9 img/s instead of 11.0-11.9
(alternating runs). PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or
tcmalloc; these settings need no extra library.

glibc reads ``GLIBC_TUNABLES`` when a process starts, so the settings are handed to a worker
process through its environment (Ray: the actor's ``runtime_env``). The cost is that the process
keeps its peak heap until it exits, which is what such a worker wants anyway. Other C libraries
ignore the variable.
"""

from __future__ import annotations

import os

VARIABLE = "GLIBC_TUNABLES"

# one arena for every thread; no block served by mmap; never give the heap's top back
SETTINGS = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(2**31 - 1),
}


def tunables(current: str | None = None) -> str:
    """``GLIBC_TUNABLES`` with our settings added to ``current``; a setting already there wins."""
    pairs = [p for p in (current or "").split(":") if p]
    have = {p.split("=", 1)[0] for p in pairs}
    pairs += [f"{k}={v}" for k, v in SETTINGS.items() if k not in have]
    return ":".join(pairs)


def worker_env() -> dict[str, str]:
    """Environment variables for a worker process started from this one (Ray ``env_vars``)."""
    return {VARIABLE: tunables(os.environ.get(VARIABLE))}
