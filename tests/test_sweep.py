"""`galaxysae sweep`: Ray Tune trials, each its own TorchTrainer, on the test Ray cluster."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from galaxysae import cli, config, embeddings, storage
from galaxysae import sweep as sweep_job
from tests.test_train import REPO, make_embeddings


def test_sweep_config_names_bad_keys(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text('train_config = "configs/demo/train_topk.toml"\n[space]\nkay = [1]\n')
    with pytest.raises(config.ConfigError, match="space.kay"):
        config.parse_args(sweep_job.Config, ["--config", str(bad), "--embeddings", "e", "--output", "o"])


def test_a_relative_train_config_in_a_sweep_toml_is_read_beside_it(tmp_path, monkeypatch):
    """The shipped sweep configs work from any working directory (the image's workdir is not
    where its configs are); an older config's path from the working directory still works, and
    a missing file is a config error that names the key and the flag."""
    def parse(path, *extra):
        return config.parse_args(sweep_job.Config, ["--config", str(path), "--embeddings", "e",
                                                    "--output", "o", *extra],
                                 preprocess=sweep_job.preprocess_toml)

    monkeypatch.chdir(tmp_path)
    for name in ("configs/sweep.toml", "configs/demo/sweep.toml"):
        cfg = parse(REPO / name)
        assert Path(cfg.train_config).parent == (REPO / name).parent, cfg.train_config
        assert sweep_job.base_train_config(cfg)["model"]
    old = tmp_path / "old.toml"
    old.write_text('train_config = "configs/demo/train_topk.toml"\n[space]\nk = [4]\n')
    monkeypatch.chdir(REPO)
    assert parse(old).train_config == "configs/demo/train_topk.toml"
    assert parse(old, "--train_config", "configs/train.toml").train_config == "configs/train.toml"
    missing = tmp_path / "missing.toml"
    missing.write_text('train_config = "nowhere.toml"\n[space]\nk = [4]\n')
    with pytest.raises(config.ConfigError, match=r"key 'train_config': .*nowhere.toml does not exist.*--train_config"):
        sweep_job.base_train_config(parse(missing))


def test_trial_config_applies_params():
    base = {"model": {"n_latents": 64, "matryoshka_groups": [32, 32], "k": 4, "aux_k": 128,
                      "multik": 0}, "optim": {}}
    d = sweep_job.trial_config(base, {"matryoshka_groups": [8, 8, 16], "lr": 0.5, "k": 3}, "o")
    assert d["model"]["n_latents"] == 32 and d["model"]["aux_k"] == 32  # capped at the size
    assert d["optim"]["lr"] == 0.5 and d["model"]["k"] == 3 and d["output"] == "o"
    assert d["model"]["multik"] == 0  # off stays off
    # the research TopK: aux_k = k/4, multik = 4k at k = 64; the ratios hold at every k
    topk = {"model": {"n_latents": 5120, "k": 64, "aux_k": 16, "multik": 256}}
    for k, aux_k, multik in ((32, 8, 128), (128, 32, 512)):
        m = sweep_job.trial_config(topk, {"k": k}, "o")["model"]
        assert (m["k"], m["aux_k"], m["multik"]) == (k, aux_k, multik)
    assert sweep_job.trial_config(topk, {"k": 64, "n_latents": 256}, "o")["model"]["multik"] == 256
    no_aux = {"model": {"n_latents": 5120, "k": 64, "aux_k": 0}}
    assert sweep_job.trial_config(no_aux, {"k": 32, "lr": 1e-3}, "o")["model"]["aux_k"] == 0


def test_a_matryoshka_base_cannot_be_resized_by_n_latents(tmp_path):
    cfg = config.from_dict(sweep_job.Config, {
        "train_config": "configs/demo/train_matryoshka.toml", "embeddings": "e", "output": "o",
        "space": {"n_latents": [128]}})
    base = sweep_job.base_train_config(cfg)
    with pytest.raises(config.ConfigError, match="search sizes with 'space.matryoshka_groups'"):
        sweep_job.check_space(cfg, base)
    cfg.space.n_latents, cfg.space.matryoshka_groups = [], [[32, 96]]
    sweep_job.check_space(cfg, base)


def test_trials_and_a_later_eval_only_of_one_test_on_the_sweeps_held_out_rows(tmp_path):
    """A .npy input without a test file: the sweep holds out rows once for all its trials, each
    trial trains with seed + i, and `train --config trials/X/config.toml --eval-only` draws the
    same hold-out again (split_seed, not the trial's seed)."""
    import numpy as np

    from galaxysae import train as train_job

    x, _ = embeddings.planted(200, 8, 16, 2)
    np.save(tmp_path / "embeddings.npy", x)
    np.save(tmp_path / "ids.npy", np.array([f"id{i}" for i in range(200)]))
    cfg = config.from_dict(sweep_job.Config, {
        "train_config": str(REPO / "configs/demo/train_topk.toml"), "seed": 5,
        "embeddings": str(tmp_path / "embeddings.npy"), "output": str(tmp_path / "sweep"),
        "space": {"k": [2]}})
    base = sweep_job.base_train_config(cfg)
    _, sweep_test = train_job.load_data(config.from_dict(train_job.Config, base))  # as sweep.run
    out = str(tmp_path / "sweep" / "trials" / "abcde_00003")
    data = sweep_job.trial_config(base, {"k": 2}, out)
    data["seed"] = sweep_job.trial_seed(data["seed"], "abcde_00003", out)
    assert data["seed"] == 8
    config.save(config.from_dict(train_job.Config, data), out)  # what the trial's run records
    later = config.parse_args(train_job.Config, ["--config", f"{out}/config.toml", "--eval-only"],
                              preprocess=train_job.preprocess_toml)
    assert later.eval_only and later.seed == 8
    _, again = train_job.load_data(later)
    assert list(again.ids) == list(sweep_test.ids)


def test_space_searches_every_key_given():
    """Each [space] key with values becomes its own grid axis (Tune crosses them), or a choice."""
    cfg = config.from_dict(sweep_job.Config, {
        "train_config": "configs/demo/train_topk.toml", "embeddings": "e", "output": "o",
        "space": {"k": [2, 4], "n_latents": [32, 64, 128]}})
    assert sweep_job._space(cfg) == {"k": {"grid_search": [2, 4]},
                                     "n_latents": {"grid_search": [32, 64, 128]}}
    cfg.search = "random"
    space = sweep_job._space(cfg)
    assert set(space) == {"k", "n_latents"} and space["k"].categories == [2, 4]
    # a sweep with nothing to search stops when its config loads, before any data is read
    with pytest.raises(config.ConfigError, match=r"\[space\] table names no values to search"):
        config.from_dict(sweep_job.Config, {
            "train_config": "configs/demo/train_topk.toml", "embeddings": "e", "output": "o"})


@pytest.mark.slow
def test_sweep_runs_its_trials_end_to_end(ray_cluster, s3_server, s3_prefix, tmp_path, monkeypatch,
                                         capsys):
    # two trials that train (a trial is ~25 s of Ray Train start-up here) and two that fail at
    # once (k > n_latents); the grid's crossing of keys is Tune's, checked above. Relative
    # paths: the trials run in directories of their own.
    make_embeddings(f"{s3_prefix}/emb", n_train=256, n_test=64)
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "sweep")
    args = ["--config", str(REPO / "configs/demo/sweep.toml"), "--embeddings", f"{s3_prefix}/emb",
            "--output", "sweep", "--epochs", "3", "--space.n_latents", "32", "--space.k", "2,4,64,128",
            "--max_concurrent_trials", "2", "--train_config", str(REPO / "configs/demo/train_topk.toml"),
            # ASHA stops at every epoch, but never a trial of one k for one of another
            "--asha.grace_period", "1", "--asha.reduction_factor", "2"]
    reads = s3_server.volume_reads()
    with pytest.raises(sweep_job.SweepError, match=r"2 of 4 trials failed, 2 finished .*'model.k' must be in 1..32"):
        cli.main(["sweep", *args])
    # the embeddings were read once, by the sweep's driver, not once more by each trial
    reads = s3_server.volume_reads() - reads
    one = s3_server.volume_reads()
    embeddings.load(f"{s3_prefix}/emb", "train", "test")
    one = s3_server.volume_reads() - one
    assert one > 0 and reads == one, f"the sweep made {reads} reads of the embeddings; one load makes {one}"
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/results.csv").decode())))
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4  # failed trials named apart
    assert sorted(int(r["seed"]) for r in rows) == [0, 1, 2, 3]  # trial i: seed + i
    failed = [r for r in rows if r["status"] == "error"]
    assert sorted(r["k"] for r in failed) == ["128", "64"]
    assert all("'model.k' must be in 1..32" in r["error"] and r["trial"] for r in failed)
    rows = [r for r in rows if r["status"] != "error"]
    assert {(r["k"], r["n_latents"]) for r in rows} == {("2", "32"), ("4", "32")}
    assert all(r["status"] == "finished" for r in rows), rows
    for r in rows:
        assert 0 < float(r["fvu"]) < 1.5
        assert float(r["l0"]) == pytest.approx(float(r["k"]))
        m = json.loads(Path(r["output"], "metrics.json").read_text())
        assert (float(r["train_mse"]), float(r["mse"])) == (m["train"]["mse"], m["mse"]), (r, m)
        assert f"seed = {r['seed']}\n" in Path(r["output"], "config.toml").read_text()
        assert r["output"].startswith(out) and os.path.isfile(os.path.join(r["output"], "sae.safetensors"))
    assert os.path.getsize(f"{out}/fvu_vs_l0.png") > 1000
    # a rerun restores the experiment: the failed trial is retried, the finished ones are kept
    before = {r["trial"]: os.path.getmtime(os.path.join(r["output"], "sae.safetensors")) for r in rows}
    with pytest.raises(sweep_job.SweepError, match="2 of 4 trials failed"):
        cli.main(["sweep", *args])
    again = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/results.csv").decode())))
    assert {r["trial"] for r in again if r["status"] == "finished"} == set(before)
    for r in again:
        if r["status"] == "finished":
            assert os.path.getmtime(os.path.join(r["output"], "sae.safetensors")) == before[r["trial"]]
    # a rerun with another search is refused before any work: restoring would run none of it
    recorded = storage.read_bytes(f"{out}/tune/experiment.json")
    changed = [a if a != "2,4,64,128" else "2,4,8" for a in args] + ["--max_concurrent_trials", "1"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", *changed])
    assert exit_.value.code == 2
    said = capsys.readouterr().err
    assert "holds a sweep started with other settings (space.k: [2, 4, 64, 128] -> [2, 4, 8]" in said, said
    assert storage.read_bytes(f"{out}/tune/experiment.json") == recorded
    # Tune would have put the S3 secret in each trial's runtime_env, which Ray's runtime_env agent
    # logs in clear: the trials got it through the object store instead
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    logs = [p for p in Path(ray_cluster.temp_dir).glob("session_*/logs/*") if p.is_file()]
    assert any(p.name == "runtime_env_agent.log" for p in logs)
    assert not [p for p in logs if secret in p.read_bytes()]
    # nor is it in what Tune keeps of the experiment (the trainable's parameters are object refs)
    assert not [p for p in Path(out).rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_asha_compares_a_trial_only_with_trials_of_its_own_shape():
    """A larger k always reconstructs better: ASHA across shapes would stop every small-k trial."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    cfg = config.from_dict(sweep_job.Config, {
        "train_config": "configs/demo/train_topk.toml", "embeddings": "e", "output": "o",
        "space": {"k": [2, 8]}, "asha": {"grace_period": 1, "reduction_factor": 2}})
    sched = sweep_job.scheduler(cfg, epochs=4)
    trials = {name: Trial("t", config=params, stub=True) for name, params in {
        "k8": {"k": 8, "lr": 1e-3}, "k2": {"k": 2, "lr": 1e-3}, "k2_slow": {"k": 2, "lr": 1e-5}}.items()}
    for t in trials.values():
        sched.on_trial_add(None, t)

    def report(name: str, mse: float) -> str:
        return sched.on_trial_result(None, trials[name], {"epoch": 1, "mse": mse})

    assert report("k8", 0.1) == TrialScheduler.CONTINUE
    # k=2 is far worse than k=8 at the first rung, but it is the first of its shape
    assert report("k2", 0.5) == TrialScheduler.CONTINUE
    # a k=2 trial worse than the other k=2 one is stopped
    assert report("k2_slow", 0.9) == TrialScheduler.STOP
    assert sweep_job.shape_of({"k": 2, "lr": 1e-5}) == sweep_job.shape_of({"lr": 1e-3, "k": 2})


MEM = {"memory": 8e9}  # a node's memory, as alive_nodes() lists it (the trials' drivers ask for some)


def test_a_sweep_runs_as_many_trials_at_once_as_the_cluster_holds():
    def at_once(nodes, n_trials=100, **kw):
        cfg = config.from_dict(sweep_job.Config, {
            "train_config": "configs/demo/train_topk.toml", "embeddings": "e", "output": "o",
            "space": {"k": [2]}, **kw})
        return sweep_job.concurrent_trials(cfg, nodes, n_trials)

    gpu_nodes = [{"CPU": 16.0, "GPU": 4.0, **MEM}] * 2
    # 4 CPUs a worker: each node's 16 CPUs hold 4 workers, one on every GPU (the trials' drivers
    # take no CPU: a sliver each once kept the last trial of a node off its GPU)
    assert at_once(gpu_nodes, use_gpu=True, cpus_per_worker=4) == 8
    assert at_once(gpu_nodes, use_gpu=True, cpus_per_worker=3) == 8  # every GPU
    assert at_once(gpu_nodes, use_gpu=True, cpus_per_worker=5) == 6  # 3 a node: CPUs run out
    assert at_once(gpu_nodes, use_gpu=True, cpus_per_worker=3, num_workers=2) == 4
    assert at_once(gpu_nodes, use_gpu=True, cpus_per_worker=3, n_trials=5) == 5  # no more than trials
    assert at_once([{"CPU": 2.0, **MEM}]) == 2
    assert at_once([{"CPU": 4.0, **MEM}]) == 4
    assert at_once([{"CPU": 1.0, **MEM}], cpus_per_worker=4) == 1  # never 0 (require_resources says why)
    # the drivers' memory counts: a node with room for one driver runs one trial
    assert at_once([{"CPU": 4.0, "memory": 1.5 * sweep_job.TRIAL_DRIVER["memory"]}]) == 1
    # the limit is the search algorithm's: Tune ignores max_concurrent_trials beside one passed in
    cfg = config.from_dict(sweep_job.Config, {
        "train_config": "configs/demo/train_topk.toml", "embeddings": "e", "output": "o",
        "space": {"k": [2, 4]}, "seed": 7})
    tc = sweep_job.tune_config(cfg, at_once=3, epochs=5)
    assert tc.max_concurrent_trials is None and tc.search_alg.max_concurrent == 3
    # trials that share a GPU: four quarters on one GPU, CPUs allowing
    one_gpu = [{"CPU": 16.0, "GPU": 1.0, **MEM}]
    assert at_once(one_gpu, use_gpu=True, cpus_per_worker=3) == 1
    assert at_once(one_gpu, use_gpu=True, cpus_per_worker=3, gpus_per_worker=0.25) == 4
    assert at_once(one_gpu, use_gpu=True, cpus_per_worker=4, gpus_per_worker=0.25) == 4
    assert at_once(one_gpu, use_gpu=True, cpus_per_worker=5, gpus_per_worker=0.25) == 3
    cfg = config.from_dict(sweep_job.Config, {
        "train_config": str(REPO / "configs/demo/train_topk.toml"), "embeddings": "e", "output": "o",
        "use_gpu": True, "gpus_per_worker": 0.25, "space": {"k": [2]}})
    base = sweep_job.base_train_config(cfg)
    assert (base["use_gpu"], base["gpus_per_worker"], base["device"]) == (True, 0.25, "cuda")
    with pytest.raises(config.ConfigError, match="'gpus_per_worker' = 0.5 needs num_workers = 1"):
        config.from_dict(sweep_job.Config, {"train_config": "t", "embeddings": "e", "output": "o",
                                            "use_gpu": True, "gpus_per_worker": 0.5, "num_workers": 2,
                                            "space": {"k": [2]}})


def test_a_sweep_says_when_its_trials_leave_gpus_idle():
    """The README's `make submit-sweep NODES=2 GPUS=4` with too few CPUs a node for configs/sweep.toml's
    cpus_per_worker: the trials that fit leave GPUs idle for the whole sweep, and the log says so."""
    def warning(nodes, n_trials=18, **kw):
        cfg = config.from_dict(sweep_job.Config, {
            "train_config": "configs/demo/train_topk.toml", "embeddings": "e", "output": "o",
            "space": {"k": [2]}, "use_gpu": True, "cpus_per_worker": 4, **kw})
        at_once = cfg.max_concurrent_trials or sweep_job.concurrent_trials(cfg, nodes, n_trials)
        return sweep_job.idle_gpus_warning(cfg, nodes, at_once, n_trials)

    eight_cpus, sixteen = [{"CPU": 8.0, "GPU": 4.0, **MEM}] * 2, [{"CPU": 16.0, "GPU": 4.0, **MEM}] * 2
    said = warning(eight_cpus)
    assert "4 trial(s) at once use 4 of the cluster's 8 GPUs" in said
    assert "cpus_per_worker = 2 runs 8 at once" in said
    assert warning(sixteen) == ""  # a trial on every GPU
    assert warning(eight_cpus, n_trials=4) == ""  # no trial waits: nothing to run on them
    one_gpu = [{"CPU": 16.0, "GPU": 1.0, **MEM}]
    assert warning(one_gpu, gpus_per_worker=0.25) == ""  # four quarters: the GPU is in use
    assert "use 0.5 of the cluster's 1 GPUs" in warning(one_gpu, cpus_per_worker=8, gpus_per_worker=0.25)
    assert "max_concurrent_trials = 3" in warning(sixteen, max_concurrent_trials=3)
    assert "do not divide" in warning([{"CPU": 64.0, "GPU": 4.0, **MEM}], num_workers=3, cpus_per_worker=1)
    assert warning([{"CPU": 64.0, **MEM}], use_gpu=False) == ""


def test_results_mark_the_trials_on_the_pareto_front(tmp_path, caplog):
    """Lower L0 and lower FVU are both better: a trial is on the front unless another finished
    trial is at least as good in both and better in one."""
    def row(trial, l0, fvu, status="finished"):
        return {"trial": trial, "status": status, "seed": 0, "k": 4, "n_latents": 32, "lr": "",
                "matryoshka_groups": "", "epochs": 3, "train_mse": 0.1, "fvu": fvu, "mse": 0.1,
                "l0": l0, "dead_fraction": 0.0, "pca_fvu": 0.9, "output": f"{tmp_path}/trials/{trial}",
                "error": ""}

    rows = [row("a", 2.0, 0.5), row("b", 4.0, 0.3), row("c", 4.0, 0.4),  # c: b beats it on FVU
            row("d", 8.0, 0.3),  # b's FVU at a higher L0
            row("e", 8.0, 0.1), row("f", 16.0, 0.2),  # f: e is better in both
            row("g", 2.0, 0.5),  # a's twin: neither beats the other
            row("h", "", "", status="error"), row("i", "", "", status="stopped")]
    sweep_job.mark_pareto(rows)
    assert {r["trial"] for r in rows if r["pareto"]} == {"a", "b", "e", "g"}
    with caplog.at_level("INFO", logger="galaxysae.sweep"):
        sweep_job.write_results(str(tmp_path), rows)
        sweep_job.log_front(rows)
    written = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert {r["trial"]: r["pareto"] for r in written} == {
        "a": "True", "b": "True", "c": "False", "d": "False", "e": "True", "f": "False", "g": "True",
        "h": "False", "i": "False"}
    front = [m for m in caplog.messages if "/trials/" in m]
    assert len(front) == 4 and front[-1].split()[0] == "e"  # by L0
    assert all(m.endswith(f"{tmp_path}/trials/{m.split()[0]}") for m in front), front


def _npy_sweep(tmp_path, n: int, **kw) -> sweep_job.Config:
    """A sweep on ``n`` planted rows in a .npy file (the test split held out from them)."""
    import numpy as np

    x, _ = embeddings.planted(n, 16, 32, 2)
    np.save(tmp_path / "embeddings.npy", x)
    np.save(tmp_path / "ids.npy", np.array([f"id{i}" for i in range(n)]))
    return config.from_dict(sweep_job.Config, {
        "train_config": str(REPO / "configs/demo/train_topk.toml"), "embeddings": str(tmp_path / "embeddings.npy"),
        "output": str(tmp_path / "sweep"), **kw})


def _trial_results(out: Path) -> dict[str, dict]:
    """Each trial's last result as Tune recorded it ({output}/tune/sweep/<trial dir>/result.json)."""
    last = {}
    for f in (out / "tune" / "sweep").glob("*/result.json"):
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        last[lines[-1]["trial_id"]] = lines[-1]
    return last


@pytest.mark.slow
def test_trials_fill_the_cluster_and_evaluate_on_their_workers_cpus(ray_cluster, tmp_path):
    """The test cluster's 4 CPUs hold two trials of one 2-CPU worker each: their drivers take no
    CPU, so both train at once, and each evaluates with its worker's 2 CPUs once it has trained."""
    import threading

    from galaxysae import cluster

    cfg = _npy_sweep(tmp_path, 2000, epochs=6, train_config=str(_checkpointed_every_epoch(tmp_path)),
                     cpus_per_worker=2, space={"k": [2, 4], "n_latents": [32]})
    cluster.connect()
    assert sweep_job.concurrent_trials(cfg, cluster.alive_nodes(), 2) == 2
    # a trial's Train worker checkpoints every epoch while it trains (and only then) and writes
    # train_state.json as it ends; the older checkpoints go as it trains (or once it is done),
    # so the earliest one each trial has is recorded while the sweep runs
    trials, started, over = tmp_path / "sweep" / "trials", {}, threading.Event()

    def watch():
        while not over.wait(0.05):
            for p in trials.glob("*/checkpoints/epoch-*.pt"):
                try:
                    t = p.stat().st_mtime_ns
                except FileNotFoundError:
                    continue
                started[p.parents[1].name] = min(t, started.get(p.parents[1].name, t))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert sweep_job.run(cfg) == {"trials": 2, "finished": 2}
    finally:
        over.set()
        watcher.join(30)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "sweep" / "results.csv").read_text())))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert set(started) == {r["trial"] for r in rows}
    ended = {r["trial"]: Path(r["output"], "train_state.json").stat().st_mtime_ns for r in rows}
    # each trial's worker was training before the other's had ended
    assert max(started.values()) < min(ended.values()), (started, ended)
    results = _trial_results(tmp_path / "sweep")
    assert {t: r["eval_threads"] for t, r in results.items()} == {r["trial"]: 2 for r in rows}
    # two finished trials: at least one is on the front (no trial beats every other)
    assert "True" in {r["pareto"] for r in rows}


def _checkpointed_every_epoch(tmp_path) -> Path:
    """The demo's TopK train config, checkpointed after every epoch."""
    train = tmp_path / "train.toml"
    train.write_text((REPO / "configs/demo/train_topk.toml").read_text().replace(
        "checkpoint_every = 10", "checkpoint_every = 1"))
    return train


@pytest.mark.slow
def test_a_trial_whose_driver_dies_is_restarted_and_resumes(ray_cluster, tmp_path):
    """A trial's driver killed mid-training (as when its node is lost): Tune restarts the trial,
    which resumes from its checkpoints, and the sweep finishes."""
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    cfg = _npy_sweep(tmp_path, 4000, epochs=10, train_config=str(_checkpointed_every_epoch(tmp_path)),
                     space={"k": [2], "n_latents": [32]})
    trials = tmp_path / "sweep" / "trials"
    killed, seen = [], set()

    def kill_the_trial_once_it_has_a_checkpoint():
        deadline = time.time() + 300  # the sweep's own end stops this too
        while time.time() < deadline and not killed:
            if any(trials.glob("*/checkpoints/epoch-*.pt")):
                actors = list_actors(address=ray_cluster.dashboard_url, filters=[("state", "=", "ALIVE")],
                                     detail=True, raise_on_missing_output=False)
                seen.update(a.class_name for a in actors)
                for a in actors:
                    if "ImplicitFunc" in (a.class_name or "") and a.pid:
                        done = any(trials.glob("*/metrics.json"))
                        os.kill(a.pid, signal.SIGKILL)  # the trial's driver, on this node
                        killed.append((a.pid, done))
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_trial_once_it_has_a_checkpoint, daemon=True)
    killer.start()
    try:
        result = sweep_job.run(cfg)
    finally:
        killed.append(None)  # stops the killer if the sweep ended first
        killer.join(30)
    assert killed[0] is not None, f"the trial's driver was never found alive mid-run; actors: {seen}"
    assert killed[0][1] is False, "the kill must land before the trial finished"
    assert result == {"trials": 1, "finished": 1}
    (row,) = csv.DictReader(io.StringIO((tmp_path / "sweep" / "results.csv").read_text()))
    assert row["status"] == "finished" and os.path.isfile(os.path.join(row["output"], "sae.safetensors"))
    # the restarted trial's Train worker took up where the killed one had checkpointed
    resumed = f"resuming from {row['output']}/checkpoints/epoch-".encode()
    logs = [p for p in Path(ray_cluster.temp_dir).glob("session_*/logs/worker-*") if p.is_file()]
    assert any(resumed in p.read_bytes() for p in logs)
