"""The encoder actor's allocator settings: merged into GLIBC_TUNABLES, and they do stop a thread
that allocates and frees large blocks from page-faulting them in again every time."""

import json
import os
import subprocess
import sys

from galaxysae import allocator

_CHURN = r"""
import json, resource, threading
import torch  # what the encoder allocates with (numpy would ask for transparent huge pages)

def churn():
    for _ in range(16):  # first touches: the heap settles into its reused layout
        torch.ones(8 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # 20 x 32 MiB allocated, written and freed on a non-main thread
        torch.ones(8 << 20)
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {}
t = threading.Thread(target=churn)
t.start()
t.join()
print(json.dumps(out))
"""


def _faults(env: dict) -> int:
    full = {k: v for k, v in os.environ.items() if k != allocator.VARIABLE}
    full.update(env)
    res = subprocess.run([sys.executable, "-c", _CHURN], env=full, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(res.stdout)["faults"]


def test_tunables_add_ours_and_keep_settings_already_there():
    assert allocator.tunables(None).split(":") == [f"{k}={v}" for k, v in allocator.SETTINGS.items()]
    merged = allocator.tunables("glibc.malloc.arena_max=4:glibc.cpu.x86_foo=1")
    pairs = merged.split(":")
    assert pairs[:2] == ["glibc.malloc.arena_max=4", "glibc.cpu.x86_foo=1"]
    assert "glibc.malloc.arena_max=1" not in pairs  # the user's value wins
    assert "glibc.malloc.mmap_max=0" in pairs and len(pairs) == 4


def test_worker_env_stops_page_faults_of_a_thread_reusing_large_blocks():
    default = _faults({})
    tuned = _faults(allocator.worker_env())
    pages = 20 * (32 << 20) // 4096
    # glibc's defaults map and unmap each 32 MiB block: every page faults in again
    assert default > pages // 2, default
    # our settings reuse the heap: a few hundred stray faults at most
    assert tuned < pages // 50, (tuned, default)
