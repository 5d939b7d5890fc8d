"""Peak memory of a child process and all its descendants (a Ray job's whole process tree).

PSS (proportional set size), so pages shared between Ray workers count once; Linux /proc only,
no extra dependency. One sample of a Ray process tree costs ~75 ms of CPU, so samples are
seconds apart: at a faster rate the sampling would be a load of its own on a small machine.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree_pss(pid: int) -> int:
    """Bytes of PSS of ``pid`` and all its descendants (Linux /proc; no extra dependency)."""
    kids, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


def run_sampled(cmd: list[str], env: dict, interval_s: float, cwd=None) -> tuple[int, int, str]:
    """Run ``cmd`` (stdout discarded) while sampling its tree's PSS every ``interval_s``:
    (return code, peak PSS bytes, stderr)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss(proc.pid))
            time.sleep(interval_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    t.join()
    return proc.returncode, peak[0], err
