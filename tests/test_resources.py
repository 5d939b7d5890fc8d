"""A request the Ray cluster cannot place (a GPU it lacks, more CPUs than a node has) fails at
once, naming the config keys and the cluster, instead of waiting for ever (Ray Data) or for
minutes per attempt (Ray Train). The test cluster has 4 CPUs and no GPU."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from galaxysae import cluster, embed
from tests.test_train import SMALL, make_embeddings, run_cli

REPO = Path(__file__).resolve().parents[1]
ENCODER = "hf_hub:mwalmsley/zoobot-encoder-euclid"


def test_fits_places_each_bundle_on_one_node():
    gpu_node, cpu_node = {"CPU": 16.0, "GPU": 1.0, "memory": 1e9}, {"CPU": 4.0}
    assert cluster.fits([{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0}], [gpu_node])
    assert not cluster.fits([{"CPU": 2.0, "GPU": 1.0}] * 2, [gpu_node, cpu_node])  # one GPU only
    assert cluster.fits([{"CPU": 2.0, "GPU": 1.0}] * 2, [gpu_node, gpu_node])
    # 6 CPUs in all, but no node holds 3 + 3 next to each other's 3
    assert not cluster.fits([{"CPU": 3.0}] * 3, [cpu_node, {"CPU": 2.0}])
    assert cluster.fits([{"CPU": 3.0}, {"CPU": 1.0}, {"CPU": 2.0}], [cpu_node, {"CPU": 2.0}])
    assert cluster.fits([{"CPU": 0.25, "GPU": 0.0}] * 8, [{"CPU": 2.0}])
    assert not cluster.fits([{"CPU": 1.0}], [])
    assert cluster.describe_nodes([gpu_node, gpu_node, cpu_node]) == (
        "3 nodes: 2 x {CPU 16, GPU 1} + 1 x {CPU 4}")


def test_train_plan_takes_the_clusters_gpus_and_cpus_where_the_config_leaves_them_open():
    from galaxysae import train

    def plan(nodes, **kw):
        cfg = train.Config(embeddings="s3://b/emb", output="s3://b/sae", **kw)
        p = train.plan_workers(cfg, nodes)
        return p.use_gpu, p.cpus_per_worker, p.device

    gpu_nodes = [{"CPU": 16.0, "GPU": 4.0}] * 2
    # 8 GPU workers: every CPU; streamed, 3 CPUs each leave every node one for Ray Data's reads
    assert plan(gpu_nodes, num_workers=8) == (True, 4, "cuda")
    assert plan(gpu_nodes, num_workers=8, data_loading="stream") == (True, 3, "cuda")
    assert plan([{"CPU": 64.0, "GPU": 1.0}]) == (True, train.MAX_CPUS_PER_GPU_WORKER, "cuda")
    # more workers than GPUs: all on CPUs, not some; a CPU cluster: every CPU but the reader's
    assert plan(gpu_nodes, num_workers=9) == (False, 3, "cpu")
    assert plan([{"CPU": 8.0}], data_loading="stream") == (False, 7, "cpu")
    assert plan([{"CPU": 8.0}], device="cpu") == (False, 8, "cpu")
    # what the config says wins; a GPU asked of a CPU cluster is kept (require() then says so)
    assert plan(gpu_nodes, device="cpu", cpus_per_worker=2) == (False, 2, "cpu")
    assert plan([{"CPU": 8.0}], device="cuda")[0] is True
    assert plan([{"CPU": 8.0}], use_gpu=True)[0] is True
    with pytest.raises(ValueError, match="'use_gpu' = true contradicts 'device' = 'cpu'"):
        train.Config(embeddings="e", output="o", use_gpu=True, device="cpu").validate()
    # a quarter of a GPU: found on a 1-GPU node, with a quarter of its CPUs
    assert plan([{"CPU": 16.0, "GPU": 1.0}], gpus_per_worker=0.25) == (True, 4, "cuda")
    assert train.worker_bundles(2, 3, 0.25) == [{"CPU": 3.0, "GPU": 0.25}] * 2
    with pytest.raises(ValueError, match="'gpus_per_worker' = 0.5 needs num_workers = 1"):
        train.Config(embeddings="e", output="o", num_workers=2, gpus_per_worker=0.5).validate()
    with pytest.raises(ValueError, match=r"'gpus_per_worker' must be in \(0, 1\], got 0"):
        train.Config(embeddings="e", output="o", gpus_per_worker=0).validate()


def test_embed_plan_leaves_each_gpu_node_a_cpu_of_its_own():
    assert embed.plan(embed.Config(), [{"CPU": 16.0, "GPU": 1.0}]).encoder_cpus == 2.0
    assert embed.plan(embed.Config(), [{"CPU": 8.0, "GPU": 4.0}]).encoder_cpus == 1.75
    small = embed.plan(embed.Config(), [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0}])
    assert small.device == "cuda" and small.encoder_cpus == 0.0 and small.encoder_threads == 1


def test_embed_plan_fits_a_one_cpu_node_and_uneven_nodes():
    def fits(c, nodes):
        actors = [{"CPU": c.encoder_cpus, "GPU": 1.0 if c.device == "cuda" else 0.0}] * c.num_encoders
        return cluster.fits(actors + [{"CPU": c.decode_cpus}], nodes)

    # 1 CPU: the encoder reserves none, or Ray Data's listing task (one whole CPU) never runs
    one = embed.plan(embed.Config(), [{"CPU": 1.0}])
    assert (one.num_encoders, one.encoder_cpus, one.encoder_threads) == (1, 0.0, 1)
    # a small head beside two big workers: an encoder on each node that can hold one
    uneven = [{"CPU": 2.0}, {"CPU": 16.0}, {"CPU": 16.0}]
    big = embed.plan(embed.Config(), uneven)
    assert (big.num_encoders, big.encoder_cpus) == (2, 15.0) and fits(big, uneven)
    # two encoders asked on a 2-CPU laptop share the CPU left beside the listing
    two = embed.plan(embed.Config(num_encoders=2), [{"CPU": 2.0}])
    assert two.encoder_cpus == 0.5 and fits(two, [{"CPU": 2.0}])
    for nodes in ([{"CPU": 1.0}], [{"CPU": 2.0}], [{"CPU": 16.0}] * 4, [{"CPU": 16.0, "GPU": 1.0}],
                  [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0}], [{"CPU": 8.0, "GPU": 4.0}]):
        assert fits(embed.plan(embed.Config(), nodes), nodes), nodes


def _galaxysae(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # A subprocess with a deadline: without the checks these runs wait for ever.
    return subprocess.run([sys.executable, "-m", "galaxysae", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=180)


def test_embed_on_cuda_without_a_gpu_fails_at_once_and_writes_nothing(
        ray_cluster, synth_dataset, offline_hub, tmp_path):
    out = tmp_path / "emb"
    res = _galaxysae("embed", "--dataset", str(synth_dataset), "--output", str(out),
                     "--encoder", ENCODER, "--image-size", "64", "--device", "cuda")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("galaxysae.cluster.ResourceError: embed with device='cuda'"), res.stderr[-3000:]
    assert "needs 1 x {CPU 2, GPU 1} + 1 x {CPU 1}" in last and "1 node: 1 x {CPU 4}" in last, last
    assert "Slurm: --gpus" in last and "or device = 'auto' to embed on the CPUs." in last, last
    assert cluster.WAIT_ENV in last, last
    # the output was claimed (its folder made), then released with nothing written: a rerun
    # with device = auto starts cleanly
    assert out.is_dir() and sorted(p.name for p in out.rglob("*")) == []


def test_embed_asking_more_cpus_than_a_node_has_fails_at_once(
        ray_cluster, synth_dataset, offline_hub, tmp_path):
    res = _galaxysae("embed", "--dataset", str(synth_dataset), "--output", str(tmp_path / "emb"),
                     "--encoder", ENCODER, "--image-size", "64", "--encoder-cpus", "6")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "encoder_cpus=6" in last and "needs 1 x {CPU 6} + 1 x {CPU 0.25}" in last, res.stderr[-3000:]
    assert "Lower those keys" in last, last


def test_ray_train_with_use_gpu_without_a_gpu_fails_at_once(ray_cluster, tmp_path):
    make_embeddings(str(tmp_path / "emb"))
    res = _galaxysae("train", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "sae"),
                     "--mode", "ray", "--use_gpu", "true", *SMALL)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("galaxysae.cluster.ResourceError: train with num_workers=1, "
                           "cpus_per_worker=1, use_gpu=true: needs 1 x {CPU 1, GPU 1}"), res.stderr[-3000:]
    assert "or use_gpu = false (and device = 'auto')." in last, last
    assert not (tmp_path / "sae" / "ray").exists()  # Ray Train never started


def test_resource_wait_polls_for_nodes_then_says_how_long_it_waited(ray_cluster, monkeypatch, caplog):
    cluster.connect()
    monkeypatch.setenv(cluster.WAIT_ENV, "3")
    with caplog.at_level(logging.INFO, logger="galaxysae.cluster"):
        with pytest.raises(cluster.ResourceError, match=r"\(after waiting 3 s\)"):
            cluster.require([{"CPU": 1.0, "GPU": 1.0}], "a test request", "No hint.")
    # it waited for the cluster to grow (said so while polling), then gave up
    assert re.search(r"waiting up to [0-3] s more for the cluster \(1 node: 1 x \{CPU 4\}\) to fit "
                     r"a test request", caplog.text), caplog.text
    caplog.clear()
    monkeypatch.setenv(cluster.WAIT_ENV, "30")
    with caplog.at_level(logging.INFO, logger="galaxysae.cluster"):
        nodes = cluster.require([{"CPU": 1.0}] * 4, "a request that fits", "No hint.")
    assert "waiting" not in caplog.text  # it fits: no wait at all
    assert cluster.fits([{"CPU": 1.0}] * 4, nodes) and not cluster.fits([{"CPU": 1.0}] * 5, nodes)


def test_local_train_on_cuda_without_a_gpu_is_an_error_not_a_silent_cpu_run(tmp_path, capsys):
    make_embeddings(str(tmp_path / "emb"))
    with pytest.raises(SystemExit) as stop:  # a config error, before anything is written
        run_cli("--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "sae"),
                "--mode", "local", "--device", "cuda", *SMALL)
    assert stop.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "sae").exists()


def test_activations_asking_more_cpus_than_a_node_has_fail_at_once(ray_cluster, tmp_path):
    from galaxysae import activations, dictionary, pca

    make_embeddings(str(tmp_path / "emb"))
    pca.run(pca.Config(embeddings=str(tmp_path / "emb"), output=str(tmp_path / "pca"), n_components=4))
    d = dictionary.load(str(tmp_path / "pca"))
    with pytest.raises(cluster.ResourceError, match=r"activations of pca with cpus_per_actor=8 .*: "
                       r"needs 1 x \{CPU 8\} \+ 1 x \{CPU 1\}, which the Ray cluster \(1 node: 1 x \{CPU 4\}\)"):
        activations.compute(d, str(tmp_path / "emb"), "test", str(tmp_path / "act"), cpus_per_actor=8)
    assert not (tmp_path / "act").exists()


def test_sweep_whose_trial_cannot_fit_fails_before_tune_starts(ray_cluster, tmp_path):
    from galaxysae import cli

    make_embeddings(str(tmp_path / "emb"), n_train=128, n_test=32)
    out = tmp_path / "sweep"
    with pytest.raises(cluster.ResourceError, match=r"sweep trial with num_workers=2, "
                       r"cpus_per_worker=3, use_gpu=false: needs 2 x \{CPU 3\}"):
        cli.main(["sweep", "--config", str(REPO / "configs/demo/sweep.toml"), "--embeddings",
                  str(tmp_path / "emb"), "--output", str(out), "--num_workers", "2",
                  "--cpus_per_worker", "3"])
    assert not (out / "tune").exists()
