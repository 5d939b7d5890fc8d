"""A local path on a Ray cluster of several nodes must be the same place on each of them.

A real two-node Ray cluster on this machine: the second node runs in a private mount namespace
where one folder is a different (empty) tmpfs, as a node's local disk is on a cluster without
a shared filesystem. A job whose input or output lies there stops before any work, naming the
key, the path and the node, instead of writing where the driver never finds it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.services.ports import free_block
from tests.services.ray_head import RayHead
from tests.test_train import SMALL, make_embeddings

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(head, the folder the second node does not share)."""
    hidden = tmp_path_factory.mktemp("node_local")
    head = RayHead(num_cpus=1).start()
    b = free_block(8)
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = [
        ray_bin, "start", "--block", f"--address={head.address}", "--node-ip-address=127.0.0.1",
        "--num-cpus=1", "--num-gpus=0", f"--object-manager-port={b}", f"--node-manager-port={b + 1}",
        f"--dashboard-agent-listen-port={b + 2}", f"--dashboard-agent-grpc-port={b + 3}",
        f"--runtime-env-agent-port={b + 4}", f"--metrics-export-port={b + 5}",
        f"--min-worker-port={b + 100}", f"--max-worker-port={b + 300}",
        "--disable-usage-stats"]
    script = f"mount -t tmpfs tmpfs {hidden} && exec " + " ".join(start)
    env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **os.environ, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": head.token, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    with open(Path(head.temp_dir) / "node2.log", "ab") as log:  # the child keeps its own handle
        node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while _alive_nodes(head) < 2:
            if node.poll() is not None or time.time() > deadline:
                pytest.fail("the second Ray node did not join:\n"
                            + (Path(head.temp_dir) / "node2.log").read_text()[-3000:])
            time.sleep(1)
        yield head, hidden
    finally:
        _stop(node)
        head.stop()


def _stop(proc: subprocess.Popen) -> None:
    """End a process group we started (never `ray stop`: it ends every Ray on the machine)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _alive_nodes(head: RayHead) -> int:
    out = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(address='auto', log_to_driver=False); "
         "print(sum(n['Alive'] for n in ray.nodes()))"],
        env={**os.environ, **head.client_env()}, capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def _python(head: RayHead, code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **head.client_env()},
                          capture_output=True, text=True, timeout=180)


CHECK = ("from galaxysae import cluster; cluster.connect(); "
         "cluster.require_shared({{'embeddings': {inp!r}}}, {{'output': {out!r}}}, 'a job'); print('shared')")


def test_paths_every_node_sees_pass_and_a_node_local_one_is_named(two_nodes, tmp_path):
    head, hidden = two_nodes
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "part-0.parquet").write_bytes(b"x")
    ok = _python(head, CHECK.format(inp=str(tmp_path / "emb"), out=str(tmp_path / "out")))
    assert ok.returncode == 0 and "shared" in ok.stdout, ok.stderr[-3000:]
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the probe is gone
    # an output folder the second node does not see
    bad = _python(head, CHECK.format(inp=str(tmp_path / "emb"), out=str(hidden / "out")))
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode != 0 and re.match(
        rf"galaxysae.cluster.SharedPathError: a job: output = '{re.escape(str(hidden / 'out'))}': a "
        r"local path that 1 of 2 nodes of the Ray cluster \([0-9.]+ \(node [0-9a-f]{8}\)\) do not see",
        last), bad.stderr[-3000:]
    assert "Use s3:// URLs" in last
    assert list((hidden / "out").iterdir()) == []
    # an input with other contents on the second node (there: an empty tmpfs), given relative
    # to the driver's directory: the tasks on the nodes run elsewhere, the check resolves it
    (hidden / "emb").mkdir()
    (hidden / "emb" / "part-0.parquet").write_bytes(b"x")
    bad = _python(head, CHECK.format(inp="emb", out=""), cwd=hidden)
    assert bad.returncode != 0 and f"embeddings = '{hidden / 'emb'}'" in bad.stderr, bad.stderr[-3000:]


def test_train_whose_output_one_node_cannot_see_stops_before_training(two_nodes, tmp_path):
    head, hidden = two_nodes
    make_embeddings(str(tmp_path / "emb"), n_train=128, n_test=32)
    out = hidden / "sae"
    res = subprocess.run([sys.executable, "-m", "galaxysae", "train", "--embeddings", str(tmp_path / "emb"),
                          "--output", str(out), "--mode", "ray", *SMALL],
                         cwd=REPO, env={**os.environ, **head.client_env()}, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode != 0
    assert "SharedPathError: train: output = " in res.stderr, res.stderr[-3000:]
    assert not (out / "ray").exists() and not (out / "checkpoints").exists()  # no Train run began


@pytest.mark.slow  # a Ray Train run over two nodes: ~50 s
def test_train_in_memory_mode_needs_the_embeddings_on_the_driver_only(two_nodes, tmp_path):
    """Memory mode hands the driver's split to the workers through Ray's object store: a worker
    on a node that cannot see the embeddings folder trains on its share all the same. Asked to
    stream, two 1-CPU workers on two 1-CPU nodes leave Ray Data's read tasks no CPU: the run
    takes the split from memory instead of waiting for ever."""
    head, hidden = two_nodes
    emb = hidden / "emb_driver_only"  # the second node sees an empty tmpfs here
    make_embeddings(str(emb), n_train=256, n_test=64)
    # a relative output: the Train workers run in directories of their own, the driver here
    res = subprocess.run([sys.executable, "-m", "galaxysae", "train", "--embeddings", str(emb),
                          "--output", "sae", "--mode", "ray", "--num_workers", "2",
                          "--data_loading", "stream", *SMALL, "--epochs", "2"],
                         cwd=tmp_path, env={**os.environ, **head.client_env()},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "none is left to stream the parquet: the workers take the split from memory" in res.stderr
    out = tmp_path / "sae"
    assert (out / "sae.safetensors").is_file() and (out / "checkpoints").is_dir()
    metrics = json.loads((out / "metrics.json").read_text())
    t = metrics["train"]
    # one 1-CPU worker on each 1-CPU node, each holding its half of the rows (rank 0 says);
    # batch_size 64 is the global batch (32 a worker): as many steps as one process takes
    assert (t["mode"], t["workers"], t["cpus_per_worker"], t["data_loading"], t["worker_rows"]) == (
        "ray", 2, 1, "memory", 128)
    assert (t["batch_size"], t["steps"]) == (64, 2 * (256 // 64))
    assert 0 < metrics["fvu"] < 1
