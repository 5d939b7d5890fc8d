"""bench/gpu.sh --smoke: the GPU bench script runs end to end (on the CPU here) on a bare box.

"Bare" is enforced: Ray, datasets, s3fs, scikit-learn and matplotlib are made unimportable for
the run (a package of that name that raises ImportError, first on PYTHONPATH), so the script
cannot quietly come to need them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ["ray", "datasets", "s3fs", "sklearn", "matplotlib"]


@pytest.mark.slow  # ~20 s alone; minutes on a loaded 2-CPU box
def test_gpu_bench_smoke_runs_without_ray_and_prints_every_figure(tmp_path):
    for name in BLOCKED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not on a bare GPU box')\n")
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label in ["original: DataLoader fp32 loop", "encoder only fp32 ",
                  "encoder only bf16 channels_last", "ours: decode stage (1 CPUs)",
                  "ours: pipeline (1 decode CPUs)", "GPU memory peak",
                  "host syncs in a training step: not checked on the CPU (the steps ran)"]:
        assert label in out, f"{label!r} missing from:\n{out}"
    rates = re.findall(r"^\s+(.+?)\s+([0-9.]+) img/s$", out, re.M)
    assert len(rates) >= 8 and all(float(r) > 0 for _, r in rates), rates
    for part in ["encoder GEMM", "top-k", "backward (sparse vs dense)", "optimizer"]:
        assert re.search(rf"^topk\s+{re.escape(part)}", out, re.M), f"part {part!r} missing:\n{out}"
    targets = re.findall(r"^target (\S+): .* (PASS|FAIL)$", out, re.M)
    assert [t for t, _ in targets] == [
        "cpu_embed_vs_original", "cpu_topk_speedup_at_equal_fvu", "cpu_topk_speedup_5x_at_equal_fvu",
        "cpu_matryoshka_speedup_at_equal_fvu", "cpu_matryoshka_speedup_5x_at_equal_fvu"], out
    # both SAE implementations train to the same test FVU from the same start (same maths)
    fvus = re.findall(r"^(topk|matryoshka)\s+(original|ours)\s+\d+\s+\d+\s+\d+\s+([0-9.]+)", out, re.M)
    assert len(fvus) == 4, out
    by = {(k, i): float(f) for k, i, f in fvus}
    for kind in ("topk", "matryoshka"):
        assert abs(by[(kind, "ours")] - by[(kind, "original")]) < 0.02, by
