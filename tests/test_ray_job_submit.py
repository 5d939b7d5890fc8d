"""`ray job submit --working-dir . -- python jobs/embed.py ...` against a real `ray start --head`.

The cluster is the session's `ray_cluster` (token auth on: RAY_AUTH_MODE/RAY_AUTH_TOKEN are in the
environment, as a user exports them); the job embeds generated data with the offline stand-in
encoder into the test S3 server, and its output must pass the embed contract.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import embed_contract

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_ray_job_submit_embed(ray_cluster, offline_hub, synth_dataset, s3_prefix, tmp_path):
    output = f"{s3_prefix}/embeddings"
    config = tmp_path / "embed.toml"
    config.write_text(
        f'dataset = "{synth_dataset}"\noutput = "{output}"\n'
        'encoder = "hf_hub:mwalmsley/zoobot-encoder-euclid"\nimage_size = 64\n'
        'splits = ["train", "test"]\ndevice = "cpu"\n')
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, **ray_cluster.client_env(), "RAY_ADDRESS": ray_cluster.dashboard_url}
    # The documented command line. `python` is resolved on the cluster: there, the image's; here
    # the head was started without the venv on PATH, so the runtime env puts it first.
    runtime_env = {"env_vars": {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}}
    args = [ray, "job", "submit", "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
            "--", "python", "jobs/embed.py", "--config", str(config)]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"ray job submit failed ({out.returncode}):\n{log[-6000:]}"
    assert "succeeded" in log.lower(), log[-3000:]
    assert ray_cluster.token not in log, "the Ray auth token appears in the job output"
    stats = embed_contract.check(output, embed_contract.input_ids(synth_dataset))
    assert stats["embedded"] + stats["failed"] == 64


def test_make_ray_submit_ships_the_config_with_the_checkout(tmp_path):
    """The config must travel with --working-dir: one outside the checkout is refused before
    anything is submitted; a path inside it, however written, is passed relative to the checkout."""
    env = {**os.environ, "RAY_ADDRESS": "http://head.invalid:8265"}
    outside = tmp_path / "embed.toml"
    outside.write_text('output = "s3://b/e"\n')
    res = subprocess.run(["make", "-s", "ray-submit-embed", f"CONFIG={outside}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "is outside this checkout" in res.stderr, res.stderr
    # inside the checkout, by a path with a space, through a symlink to the checkout (an HPC home
    # directory often is one: $PWD is not make's CURDIR, the physical path)
    inside = Path(tempfile.mkdtemp(prefix="a dir ", dir=REPO / "configs"))
    (tmp_path / "home").symlink_to(REPO)
    config = tmp_path / "home" / inside.relative_to(REPO) / "my embed.toml"
    try:
        shutil.copy(REPO / "configs/embed.toml", inside / "my embed.toml")
        res = subprocess.run(["make", "-s", "ray-submit-embed", f"CONFIG={config}",
                              "RAY=printf '%s\\n'", "EXTRA=--batch_size 8"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(inside)
    assert res.returncode == 0, res.stderr
    rel = inside.relative_to(REPO) / "my embed.toml"
    checked, *args = res.stdout.splitlines()  # the preflight's verdict, then ray's arguments
    assert checked == "galaxysae embed: config OK", res.stdout
    assert args[:4] == ["job", "submit", "--working-dir", "."], args
    assert args[-6:] == ["python", "jobs/embed.py", "--config", str(rel), "--batch_size", "8"], args
