"""Free loopback ports for the test services (several suites may run on one machine at once)."""

from __future__ import annotations

import random
import socket


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_block(n: int, lo: int = 20000, hi: int = 30000) -> int:
    """The first of ``n`` consecutive free ports (kept below the ephemeral range)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(lo, hi - n)
        if all(is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no block of {n} free ports between {lo} and {hi}")
