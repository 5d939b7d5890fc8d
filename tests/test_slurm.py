"""`make submit-embed` on a real single-node Slurm cluster (tests/services/slurm.py).

The sbatch script starts Ray inside the allocation, runs `galaxysae embed` on generated data
with its output on the test S3 server, and stops Ray. Checked: the job COMPLETES and its output
passes the embed contract; a job cancelled mid-way leaves no Ray behind and is not requeued; a
resubmitted job skips finished shards; SIGTERM to the batch script (what `--signal=B:TERM@120`
sends before the time limit) requeues the job, which then completes: no id twice, none missing,
and shards finished before an interruption are skipped, not rewritten.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from galaxysae import storage
from tests import embed_contract

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

ENCODER = "hf_hub:mwalmsley/zoobot-encoder-euclid"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _write_config(path: Path, **cfg) -> Path:
    lines = []
    for k, v in cfg.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v}")
        elif isinstance(v, list):
            lines.append(f"{k} = [{', '.join(repr(x) for x in v)}]")
        else:
            lines.append(f'{k} = "{v}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def _submit(slurm, config: Path, log_dir: Path, job_env: dict | None = None,
            **make_vars) -> tuple[str, Path]:
    """`make submit-embed`; -> (job id, log path) as make prints them. ``job_env`` is added to the
    submitter's environment, which sbatch hands to the job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no test cluster
    env.update(slurm.env())
    env.update(job_env or {})
    # The script's stop takes SIGKILL to a part of Ray still alive after this (sbatch exports the
    # submitter's environment to the job); on SIGTERM Ray stops within seconds.
    env["RAY_STOP_GRACE"] = "5"
    args = ["make", "-s", "submit-embed", f"CONFIG={config}", f"PARTITION={slurm.partition}",
            f"CPUS={slurm.cpus}", "TIME=00:20:00", f"SLURM_LOG_DIR={log_dir}"]
    args += [f"{k}={v}" for k, v in make_vars.items()]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"make submit-embed failed:\n{out.stdout}\n{out.stderr}"
    job = re.search(r"^job (\d+)$", out.stdout, re.M)
    log = re.search(r"^log (\S+)$", out.stdout, re.M)
    assert job and log, f"make did not print the job id and log path:\n{out.stdout}"
    assert log.group(1) == str(log_dir / f"gs-embed-{job.group(1)}.out")
    return job.group(1), Path(log.group(1))


def _wait_final(slurm, job: str, log: Path, timeout: float = 420) -> str:
    try:
        return slurm.wait_state(job, FINAL, timeout)
    except TimeoutError:
        text = log.read_text() if log.exists() else "(no log)"
        subprocess.run(["scancel", job], env={**os.environ, **slurm.env()})
        pytest.fail(f"job {job} did not finish in {timeout}s; log:\n{text[-4000:]}")


def _ray_processes(job: str) -> list[str]:
    """Command lines of live processes that belong to this job's Ray (its temp dir)."""
    marker = f"/tmp/ray-{job}"
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker + "/" in cmd or marker + " " in cmd or cmd.rstrip().endswith(marker):
            found.append(f"{pid}: {cmd[:200]}")
    return found


def _assert_no_ray_left(job: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while _ray_processes(job) and time.time() < deadline:
        time.sleep(1)
    assert not _ray_processes(job), f"Ray processes of job {job} outlived it: {_ray_processes(job)}"


def _assert_no_secret(text: str) -> None:
    # The per-job Ray token is "gsray-" and 64 hex digits (Ray's own ids in its logs are bare hex
    # of other lengths: task 48, node and object 56); the S3 secret comes from the environment.
    assert not re.search(r"gsray-[0-9a-f]{64}", text), "a Ray auth token appears in the job log"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text, "the S3 secret appears in the job log"


def _etags(output: str, split: str) -> dict[str, tuple]:
    """Object -> (ETag, LastModified): a rewrite with the same bytes still moves the time."""
    fs, _ = storage.fsspec_fs(output)
    fs.invalidate_cache()
    return {p: (fs.info(p)["ETag"], str(fs.info(p)["LastModified"]))
            for p in embed_contract.output_files(output, split)}


def test_submit_embed_completes(slurm, offline_hub, synth_dataset, s3_prefix, tmp_path):
    output = f"{s3_prefix}/embeddings"
    config = _write_config(tmp_path / "embed.toml", dataset=str(synth_dataset), output=output,
                           encoder=ENCODER, image_size=64, encoder_cpus=1.0,
                           splits=["train", "test"])
    # GPUS=1 asks Slurm for the node's (fake, File=/dev/null) GPU: the Ray cluster must report
    # it; the encoder is told to stay on the CPU since no CUDA device exists behind it.
    # MEM: Ray must be sized to the job's memory, not the node's (30% of it for the object store)
    job, log = _submit(slurm, config, tmp_path / "logs", GPUS=1, MEM=3000, EXTRA="--device cpu")
    state = _wait_final(slurm, job, log)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}; log:\n{text[-6000:]}"
    stats = embed_contract.check(output, embed_contract.input_ids(synth_dataset))
    assert stats["embedded"] + stats["failed"] == 64
    assert "1 GPUs per node" in text and "'GPU': 1.0" in text, text[-3000:]
    # every step (head, driver) gets all the node's CPUs, not srun's default of one
    assert f"CPUs per step: {slurm.cpus}" in text, text[-3000:]
    store = re.search(r"'object_store_memory': ([0-9.e+]+)", text)
    assert store and float(store.group(1)) == 3000 * 2**20 * 3 // 10, text[-3000:]
    assert "finished with exit code 0" in text
    # Ray stops on SIGTERM, cleanly: no 30 s drain for Ray Serve ending in SIGKILL
    assert "did not stop within" not in text, text[-3000:]
    _assert_no_secret(text)
    _assert_no_ray_left(job)
    assert not Path(f"/tmp/ray-{job}").exists(), "the job's Ray temp dir was left behind"


@pytest.fixture(scope="module")
def many_shards(session_root) -> Path:
    """Enough small shards that a job can be caught half-way: 16 train shards + 1 test shard."""
    from galaxysae import synth

    out = session_root / "gz_euclid_many_shards"
    if not out.exists():
        synth.run(synth.Config(out=str(out), n_train=96, n_test=6, shard_size=6, image_size=64,
                               seed=1, workers=1))
    return out


def _wait_for_shards(slurm, job: str, log: Path, output: str, n: int, timeout: float = 240) -> int:
    """Wait until ``n`` train shards are committed (shards stream: the job is then mid-way)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = len(embed_contract.output_files(output, "train"))
        if done >= n:
            return done
        if slurm.job_state(job) in FINAL:
            pytest.fail(f"job {job} ended before {n} shards were written; log:\n"
                        f"{log.read_text()[-4000:] if log.exists() else '(no log)'}")
        time.sleep(0.2)
    pytest.fail(f"job {job}: fewer than {n} shards after {timeout}s; log:\n"
                f"{log.read_text()[-4000:] if log.exists() else '(no log)'}")


def test_cancel_resubmit_and_requeue(slurm, offline_hub, many_shards, s3_prefix, tmp_path):
    output = f"{s3_prefix}/embeddings"
    # 224 px on one thread (~0.1 s an image), 6 images a shard: shards are committed one by
    # one, about a second apart, so a signal sent after the first lands mid-way.
    config = _write_config(tmp_path / "embed.toml", dataset=str(many_shards), output=output,
                           encoder=ENCODER, image_size=224, batch_size=2, encoder_cpus=1.0,
                           encoder_threads=1, device="cpu", splits=["train", "test"])
    logs = tmp_path / "logs"
    total = 16
    env = {**os.environ, **slurm.env()}

    # 1. scancel mid-way: the job ends CANCELLED (not requeued) within the wait, Ray goes with it.
    job1, log1 = _submit(slurm, config, logs, GPUS=0)
    _wait_for_shards(slurm, job1, log1, output, 1)
    subprocess.run(["scancel", job1], env=env, check=True)
    assert _wait_final(slurm, job1, log1, timeout=90) == "CANCELLED"
    _assert_no_ray_left(job1)
    assert slurm.job_state(job1) == "CANCELLED", "a cancelled job must not be requeued"
    assert slurm.job_field(job1, "Restarts") == "0"
    shutil.rmtree(f"/tmp/ray-{job1}", ignore_errors=True)  # kept for debugging by design

    # 1b. a job that already used its requeues (GALAXYSAE_MAX_REQUEUES) stops at SIGTERM and
    # says why, instead of looping on a unit of work longer than its time limit.
    job1b, log1b = _submit(slurm, config, logs, GPUS=0, job_env={"GALAXYSAE_MAX_REQUEUES": "0"})
    deadline = time.time() + 120  # the signal may land as soon as the job runs its command
    while not (log1b.exists() and "running:" in log1b.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job1b], env=env, check=True)
    assert _wait_final(slurm, job1b, log1b, timeout=90) != "COMPLETED"
    assert slurm.job_field(job1b, "Restarts") == "0", "a job past GALAXYSAE_MAX_REQUEUES was requeued"
    assert "not requeued: 0 requeue(s) already (GALAXYSAE_MAX_REQUEUES=0)" in log1b.read_text()
    _assert_no_ray_left(job1b)
    shutil.rmtree(f"/tmp/ray-{job1b}", ignore_errors=True)
    first = _etags(output, "train")
    assert 1 <= len(first) < total, f"the cancel did not land mid-way ({len(first)} shards)"

    # 2. resubmit; SIGTERM to the batch script (the time-limit warning) mid-way: it requeues.
    job2, log2 = _submit(slurm, config, logs, GPUS=0)
    _wait_for_shards(slurm, job2, log2, output, len(first) + 1)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job2], env=env, check=True)
    deadline = time.time() + 90
    while slurm.job_field(job2, "Restarts") != "1" and time.time() < deadline:
        time.sleep(0.5)
    assert slurm.job_field(job2, "Restarts") == "1", (
        f"job {job2} was not requeued after SIGTERM; log:\n{log2.read_text()[-4000:]}")
    state = _wait_final(slurm, job2, log2, timeout=300)
    text = log2.read_text()
    assert state == "COMPLETED", f"requeued job {job2} ended {state}; log:\n{text[-6000:]}"
    assert "requeued" in text

    # Every id exactly once; shards finished before the cancel were skipped, not rewritten.
    embed_contract.check(output, embed_contract.input_ids(many_shards))
    after = _etags(output, "train")
    assert len(after) == total
    assert {p: after[p] for p in first} == first, "finished shards were rewritten by the rerun"
    assert not storage.exists(f"{output}/_claim.json"), "the finished job left its claim behind"
    _assert_no_secret(log1.read_text() + text)
    _assert_no_ray_left(job2)


@pytest.mark.parametrize("target, gpus, gres", [
    ("submit-embed", None, "--gres=gpu:1"), ("submit-sweep", None, "--gres=gpu:1"),
    ("submit-render", None, None),  # render's encode and grids run on CPUs
    ("submit-pca", None, None), ("submit-compare", None, None), ("submit-atlas", None, None),  # CPUs too
    ("submit-train", None, "--gres=gpu:1"),
    ("submit-render", "2", "--gres=gpu:2"), ("submit-embed", "0", None)])
def test_make_submit_asks_for_gpus_only_where_the_job_uses_them(target, gpus, gres):
    args = ["make", "-n", target] + ([f"GPUS={gpus}"] if gpus else [])
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True).stdout
    sbatch = next(line for line in out.splitlines() if "sbatch --parsable" in line)
    assert re.findall(r"--gres=\S+", sbatch) == ([gres] if gres else []), sbatch
    job = target.removeprefix("submit-")
    assert f"--job-name=gs-{job} " in sbatch and f"slurm/{job}.sbatch --config" in sbatch, sbatch
    assert (REPO / "slurm" / f"{job}.sbatch").is_file()


@pytest.mark.parametrize("spec, worker_cpus", [
    ("16(x2),8", 8), ("16,8,12", 8), ("16(x3)", 16), ("8,16(x2)", 16), ("16", 16), ("", 16)])
def test_worker_nodes_ask_for_the_cpus_they_hold(spec, worker_cpus):
    """Whole nodes of mixed sizes: the batch (head) node's count would be refused on a smaller
    worker node; SLURM_JOB_CPUS_PER_NODE (node-list order, head first) gives theirs."""
    out = subprocess.run(
        ["bash", "-c", 'source slurm/ray_cluster.sh; _GS_CPUS=16; _gs_worker_cpus'], cwd=REPO,
        env={**os.environ, "SLURM_JOB_CPUS_PER_NODE": spec}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(worker_cpus)
