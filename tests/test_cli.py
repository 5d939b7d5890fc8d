"""`galaxysae <job> ... --check`, and the launchers' preflight that runs it before a job is queued.

A config that lacks a key (configs/train.toml names neither embeddings nor output) must stop
`make submit-<job>` / `make ray-submit-<job>` before sbatch or `ray job submit`, not after the job
waited in the queue and started Ray. Everything runs for real (the CLI and make as subprocesses);
sbatch and ray are replaced on PATH by a tripwire that records that it was called, since the
point is that they are not reached (the real Slurm submit is tests/test_slurm.py's).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH_JOBS = ("embed", "train", "sweep", "pca", "compare", "render", "atlas")
# keys the shipped full-scale configs leave to the command line (README: EXTRA="--embeddings ...")
EXTRA = {"train": ["--embeddings", "s3://bucket/embeddings", "--output", "s3://bucket/sae/topk"],
         "sweep": ["--embeddings", "s3://bucket/embeddings", "--output", "s3://bucket/sweeps/topk"]}


def galaxysae(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "galaxysae", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("job", LAUNCH_JOBS)
def test_check_passes_the_shipped_configs_and_runs_nothing(job, tmp_path):
    """The shipped config (plus the README's overrides) is OK; nothing is written: its relative
    outputs (embeddings/, pca/, results/, atlas/) would land in the working dir, here empty."""
    out = galaxysae(job, "--config", str(REPO / "configs" / f"{job}.toml"), *EXTRA.get(job, []),
                    "--check", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == f"galaxysae {job}: config OK", out.stdout
    assert not list(tmp_path.iterdir()), f"--check wrote {sorted(tmp_path.rglob('*'))}"


def test_check_writes_no_output(tmp_path):
    out = galaxysae("pca", "--config", str(REPO / "configs" / "pca.toml"), "--embeddings",
                    str(tmp_path / "embeddings"), "--output", str(tmp_path / "pca"), "--check", cwd=tmp_path)
    assert out.returncode == 0 and "galaxysae pca: config OK" in out.stdout, out.stdout + out.stderr
    assert not (tmp_path / "pca").exists()


@pytest.mark.parametrize("args, named", [
    (["train", "--config", "configs/train.toml"], "'embeddings' is required"),
    (["train", "--config", "configs/train.toml", "--embeddings", "e"], "'output' is required"),
    (["pca", "--config", "configs/pca.toml", "--n_component", "8"], "unknown key 'n_component'"),
    (["render", "--config", "configs/render.toml", "--select", "best"], "key 'select' expects"),
])
def test_check_fails_on_a_config_error_with_exit_2(args, named):
    out = galaxysae(*args, "--check", cwd=REPO)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "config error" in out.stderr and named in out.stderr, out.stderr
    assert "config OK" not in out.stdout


def test_help_and_usage_mention_check():
    job = galaxysae("train", "--help", cwd=REPO)
    assert job.returncode == 0, job.stderr
    assert "usage: galaxysae train [--config FILE.toml] [--KEY VALUE ...] [--check]" in job.stdout
    assert "--embeddings" in job.stdout and "--check  parse and validate" in job.stdout
    top = galaxysae("--help", cwd=REPO)
    assert top.returncode == 0 and "[--check]" in top.stdout and "--check  parse and validate" in top.stdout


# ----------------------------------------------------------------------------- make preflight


@pytest.fixture
def tripwires(tmp_path):
    """``sbatch`` and ``ray`` that record their arguments (and answer as if they had queued a
    job): PATH for sbatch, RAY=... for ray."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    for name, reply in (("sbatch", "4242"), ("ray", "submitted")):
        tool = bindir / name
        tool.write_text(f'#!/usr/bin/env bash\nprintf "{name} %s\\n" "$*" >> "{calls}"\necho {reply}\n')
        tool.chmod(0o755)
    return bindir, calls


def make(target: str, bindir: Path, *variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MAKE"))}
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    env["RAY_ADDRESS"] = "http://127.0.0.1:9"  # never contacted: ray is the tripwire
    return subprocess.run(["make", "-s", target, f"CHECK_PYTHON={sys.executable}",
                           f"RAY={bindir / 'ray'}", *variables],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("target", ["submit-train", "submit-sweep", "ray-submit-train", "ray-submit-sweep"])
def test_make_submit_stops_a_config_missing_a_key_before_submitting(target, tripwires, tmp_path):
    """README's `make submit-train CONFIG=configs/train.toml ...` without EXTRA: refused here."""
    bindir, calls = tripwires
    job = target.rsplit("-", 1)[1]
    out = make(target, bindir, f"CONFIG=configs/{job}.toml", f"SLURM_LOG_DIR={tmp_path / 'logs'}")
    assert out.returncode != 0, out.stdout + out.stderr
    assert "'embeddings' is required" in out.stderr, out.stderr
    assert f"make: {job} not submitted" in out.stderr, out.stderr
    assert not calls.exists(), f"submitted anyway: {calls.read_text()}"


@pytest.mark.parametrize("target", ["submit-train", "ray-submit-train"])
def test_make_submit_checks_with_extra_then_submits(target, tripwires, tmp_path):
    bindir, calls = tripwires
    extra = "--embeddings s3://bucket/embeddings --output s3://bucket/sae/topk"
    out = make(target, bindir, "CONFIG=configs/train.toml", f"EXTRA={extra}",
               f"SLURM_LOG_DIR={tmp_path / 'logs'}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "galaxysae train: config OK" in out.stdout
    submitted = calls.read_text()
    tool = "ray" if target.startswith("ray-") else "sbatch"
    assert submitted.startswith(f"{tool} ") and submitted.count("\n") == 1, submitted
    assert f'--config configs/train.toml {extra}' in submitted, submitted
    if tool == "sbatch":
        assert "slurm/train.sbatch" in submitted and "job 4242" in out.stdout


def test_make_submit_without_a_python_for_the_check_says_so_and_submits(tripwires, tmp_path):
    bindir, calls = tripwires
    out = make("submit-atlas", bindir, f"CHECK_PYTHON={tmp_path / 'no-python'}",
               f"SLURM_LOG_DIR={tmp_path / 'logs'}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "atlas's config not checked before submitting" in out.stderr, out.stderr
    assert "slurm/atlas.sbatch --config configs/atlas.toml" in calls.read_text()


@pytest.mark.parametrize("job", LAUNCH_JOBS)
def test_every_launcher_checks_with_the_venv_python(job, tmp_path):
    """`make -n`: each submit and ray-submit target runs the check, with CONFIG and EXTRA, by the
    venv's python when there is one, before it submits."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    for target, submit in ((f"submit-{job}", "sbatch --parsable"), (f"ray-submit-{job}", "job submit")):
        out = subprocess.run(["make", "-n", target, f"VENV={venv}", "EXTRA=--title X"], cwd=REPO,
                             env={**env, "RAY_ADDRESS": "http://127.0.0.1:9"},
                             capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
        check = next(i for i, line in enumerate(lines)
                     if f'"{venv}/bin/python" -m galaxysae {job} --config "configs/{job}.toml" --title X --check' in line)
        assert check < next(i for i, line in enumerate(lines) if submit in line), out


def test_check_makes_a_jobs_own_extra_checks(tmp_path):
    """A job module's ``check_config(cfg)`` runs under --check too: a sweep's base train config
    is read and validated, so a missing or broken one fails before the sweep is queued."""
    bad = tmp_path / "train.toml"
    bad.write_text("batch_size = 'many'\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("batch_size = \n")
    for train_config, shown in ((tmp_path / "nowhere.toml", "nowhere.toml does not exist"),
                                (bad, "batch_size"), (broken, "broken.toml is not valid TOML"),
                                # the shipped sweep searches n_latents, which a Matryoshka base fixes
                                (REPO / "configs" / "matryoshka.toml", "is a Matryoshka SAE")):
        proc = subprocess.run([sys.executable, "-m", "galaxysae", "sweep", "--config",
                               str(REPO / "configs" / "sweep.toml"), "--embeddings", "e", "--output",
                               "o", "--train_config", str(train_config), "--check"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and shown in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "config OK" not in proc.stdout
