"""Job `sweep`: a Ray Tune search over SAE trainings (k, dictionary size, learning rate, groups).

Data flow:
  sweep TOML (search space + a base train TOML) -> Ray Tune (grid or random; ASHA on the
  per-epoch train MSE, among trials of the same k and dictionary size) -> one trial = one
  function trainable that builds its own TorchTrainer (Train V2) under a unique run name,
  training into {output}/trials/{trial}/ (checkpoints, artifact, metrics.json on the test
  split) -> results.csv (its `pareto` column: the trials on the front of test L0 and FVU) +
  fvu_vs_l0.png in {output}.

The sweep's driver reads the embeddings once and puts them in Ray's object store: every trial
(its driver and its Train workers) takes them from its node's store, so a node holds one copy
however many trials run there, and only the sweep's driver needs to see the files (unless
``data_loading = "stream"``).

Resources are explicit so a 2-CPU machine cannot deadlock: a trial's driver asks for a little
memory and no CPU (TRIAL_DRIVER), its Train workers ask for ``cpus_per_worker`` each, the
workers take the split from the object store (``data_loading = "memory"``: no Ray Data tasks
competing for CPUs), and at most ``max_concurrent_trials`` run at once (0: as many as the
cluster's nodes hold). A trial that fails (its driver lost with its node) is restarted up to
``max_failures`` times and resumes from its checkpoints. A rerun restores the experiment
(``Tuner.restore``): finished trials are kept, unfinished ones resume from their checkpoints,
failed ones are retried.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from galaxysae import config, embeddings, storage
from galaxysae import train as train_job

log = logging.getLogger("galaxysae.sweep")


@dataclass
class Space:
    """Values to search; an empty list keeps the base train config's value."""

    k: list[int] = field(default_factory=list)
    n_latents: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    matryoshka_groups: list[list[int]] = field(
        default_factory=list, metadata={"help": "each entry a group list; sets n_latents to its sum"})


@dataclass
class Asha:
    """Early stopping on the train MSE, among trials of one dictionary shape (k, n_latents,
    groups) only: a larger k or dictionary always reconstructs better, so across shapes ASHA
    would stop the small ones and lose the low-L0 end of the FVU-L0 frontier."""

    grace_period: int = field(default=2, metadata={
        "help": "epochs before a trial may be stopped; >= epochs: never stopped"})
    reduction_factor: int = 2


@dataclass
class Config:
    """A Ray Tune sweep of SAE trainings: galaxysae sweep --config S.toml."""

    train_config: str = field(default="", metadata={
        "help": ("base train TOML (our or the original layout); relative: in a sweep TOML, "
                 "beside that file (else, for older configs, from the working dir); on the "
                 "command line, from the working dir")})
    embeddings: str = field(default="", metadata={"help": "as for train (overrides the base config)"})
    output: str = field(default="", metadata={"help": "sweep directory, local or s3://"})
    search: Literal["grid", "random"] = "grid"
    num_samples: int = field(default=1, metadata={"help": "random: trials; grid: repeats of the grid"})
    seed: int = field(default=0, metadata={"help": (
        "trial i trains with seed + i (repeats of a grid are replicates, not copies); it also "
        "seeds random search. The rows held out of a .npy input come from the base config's "
        "split_seed: the same for every trial")})
    epochs: int = field(default=0, metadata={"help": "epochs per trial; 0 = the base config's"})
    max_concurrent_trials: int = field(default=0, metadata={
        "help": "trials running at once; 0: as many as the cluster's nodes hold now"})
    max_failures: int = field(default=2, metadata={"help": (
        "times a failed trial is restarted (its driver lost with a node, say) before it counts "
        "as failed; it resumes from its checkpoints")})
    num_workers: int = field(default=1, metadata={"help": "Train workers per trial"})
    cpus_per_worker: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = field(default=1.0, metadata={"help": (
        "use_gpu: the share of a GPU each trial reserves (num_workers = 1); 0.25 runs four "
        "trials on each GPU, which one SAE trial alone leaves mostly idle")})
    data_loading: Literal["stream", "memory"] = "memory"
    space: Space = field(default_factory=Space)
    asha: Asha = field(default_factory=Asha)

    def validate(self) -> None:
        for key in ("train_config", "embeddings", "output"):
            if not getattr(self, key):
                raise ValueError(f"'{key}' is required")
        if self.max_concurrent_trials < 0 or self.num_samples <= 0:
            raise ValueError("'max_concurrent_trials' must be >= 0 (0: as many as fit) and "
                             "'num_samples' positive")
        if self.max_failures < 0:
            raise ValueError("'max_failures' must be >= 0 (0: a failed trial is not restarted)")
        if self.use_gpu:
            train_job.check_gpu_share(self.gpus_per_worker, self.num_workers)
        if not _axes(self):
            raise ValueError(f"the [space] table names no values to search: give one of "
                             f"{', '.join('space.' + k for k in _KEYS)} a list of values")
        for groups in self.space.matryoshka_groups:
            if not groups or any(g <= 0 for g in groups):
                raise ValueError(f"'space.matryoshka_groups' entry {groups} must be positive sizes")


def preprocess_toml(data: dict, path: str) -> dict:
    """A relative ``train_config`` in a sweep TOML names a file beside it, so the pair works from
    any working directory (the image's configs are in /opt/galaxysae/configs, its workdir is
    elsewhere). One found only from the working directory (older configs said
    "configs/train.toml" and ran from the checkout) still is."""
    tc = data.get("train_config")
    if isinstance(tc, str) and tc and not os.path.isabs(tc) and not storage.is_remote(tc):
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), tc)
        if os.path.isfile(beside) or not os.path.isfile(tc):
            data = {**data, "train_config": beside}
    return data


def check_config(cfg: Config) -> None:
    """``galaxysae sweep ... --check`` (run by the launchers before a sweep is queued): the base
    train config exists, is a valid train config with the sweep's overrides (base_train_config
    builds one), and the space can resize it."""
    check_space(cfg, base_train_config(cfg))


def base_train_config(cfg: Config) -> dict:
    """The base train config as data, with the sweep's overrides applied."""
    path = Path(cfg.train_config)
    if not path.is_file():
        raise config.ConfigError(
            f"key 'train_config': {cfg.train_config} does not exist (a relative train_config in a "
            f"sweep TOML is read beside that file; --train_config PATH names another)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise config.ConfigError(f"key 'train_config': {path} is not valid TOML: {exc}") from None
    data = train_job.preprocess_toml(data, str(path))
    # the sweep's resources, not the base's (the original Matryoshka TOML says device = "cuda")
    data.update(embeddings=cfg.embeddings, mode="ray", num_workers=cfg.num_workers,
                cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu,
                gpus_per_worker=cfg.gpus_per_worker,
                device="cuda" if cfg.use_gpu else "cpu", data_loading=cfg.data_loading,
                seed=cfg.seed)
    for key in ("ids", "test_embeddings", "test_ids"):  # trials run in Tune's own folders
        if data.get(key) and not storage.is_remote(data[key]):
            data[key] = os.path.abspath(storage.local_path(data[key]))
    if cfg.epochs:
        data["epochs"] = cfg.epochs
    data.setdefault("output", cfg.output)
    config.from_dict(train_job.Config, data, str(path))  # fail now, naming the key, not per trial
    return data


def trial_config(base: dict, params: dict, output: str) -> dict:
    """One trial's train config data: the base with the sampled ``params`` applied. AuxK's and
    multi-k's k keep their ratio to k from the base (k/4 and 4k in the research code)."""
    data = copy.deepcopy(base)
    model = data.setdefault("model", {})
    optim = data.setdefault("optim", {})
    defaults = train_job.ModelConfig()
    base_k = model.get("k", defaults.k)
    if "k" in params:
        model["k"] = params["k"]
    if "n_latents" in params:
        model["n_latents"] = params["n_latents"]
    if params.get("matryoshka_groups"):
        model["matryoshka_groups"] = list(params["matryoshka_groups"])
        model["n_latents"] = sum(params["matryoshka_groups"])
    if "lr" in params:
        optim["lr"] = params["lr"]
    n, k = model.get("n_latents", defaults.n_latents), model.get("k", base_k)
    aux_k = model.get("aux_k", defaults.aux_k)  # 0: AuxK off, in every trial too
    model["aux_k"] = max(1, min(round(aux_k * k / base_k), n)) if aux_k else 0
    if model.get("multik", defaults.multik):
        model["multik"] = max(k, min(round(model.get("multik", defaults.multik) * k / base_k), n))
    data["output"] = output
    return data


# Ray Tune copies these from the driver's environment into every trial's runtime_env, and Ray's
# runtime_env agent writes a runtime_env, env_vars and all, to its log (runtime_env_agent.log on
# each node) in clear. The sweep keeps them out of it: they reach the trials in the object store
# (tune.with_parameters), as the data does, and a trial sets the ones its node lacks.
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def _credentials_for_trials() -> dict[str, str]:
    """The driver's S3 credentials, taken out of what Tune puts in a trial's runtime_env."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = class_cache.ENV_VARS_TO_PROPAGATE - set(CREDENTIALS)
    return {k: os.environ[k] for k in CREDENTIALS if os.environ.get(k)}


def _trial(params: dict, base: dict, sweep_output: str, shared: train_job.SharedSplits,
           credentials: dict[str, str] | None = None) -> None:
    """A Tune function trainable: one TorchTrainer run on the sweep's ``shared`` data, then the
    test metrics. ``credentials``: the driver's S3 keys, for a node whose environment has none."""
    import torch
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from galaxysae import cli

    cli.setup_worker()
    for key, value in (credentials or {}).items():
        os.environ.setdefault(key, value)
    # The driver holds no CPU of its own, but its workers' CPUs are the trial's for the whole
    # trial: the sweep runs no more trials at once than their workers fit (concurrent_trials,
    # with max_concurrent_trials = 0). While the workers train, this process only waits on them
    # (no torch work); before they start (init_stats) and once they have ended (the evaluation
    # of the test split, in train_job.run after the Train run, on the CPU on GPU trials too)
    # those CPUs are idle, and the driver's torch takes them instead of one thread.
    torch.set_num_threads(eval_threads(base, _node_cpus()))
    ctx = tune.get_context()
    name = ctx.get_trial_id()
    out = storage.join(sweep_output, "trials", name)
    data = trial_config(base, params, out)
    data["seed"] = trial_seed(data.get("seed", 0), name, out)
    data["run_name"] = f"sweep-{name}"  # unique Train run per trial
    cfg = config.from_dict(train_job.Config, data, f"trial {name}")
    metrics = train_job.run(cfg, callbacks=[TuneReportCallback()], shared=shared)
    # epoch stays below ASHA's max_t (epochs + 1): this last report must not be cut short.
    # "mse" is the train MSE in every report (ASHA compares it); the test metrics beside it.
    # (a checkpoint from before 'last' was recorded gives a resumed run no train MSE: the test's)
    tune.report({"epoch": cfg.epochs, "mse": metrics["train"].get("mse", metrics["levels"][-1]["mse"]),
                 "test_mse": metrics["levels"][-1]["mse"], "fvu": metrics["fvu"],
                 "l0": metrics["l0"], "dead": metrics["dead_fraction"],
                 "eval_threads": torch.get_num_threads(), "done": True})


def eval_threads(base: dict, node_cpus: float) -> int:
    """Torch threads for a trial's driver (its evaluation): the CPUs its Train workers hold,
    num_workers x cpus_per_worker of the ``base`` train config, at most its node's
    ``node_cpus`` (the workers may have trained on a larger node), at least 1."""
    held = base.get("num_workers", 1) * base.get("cpus_per_worker", 1)
    return max(1, min(int(held), int(node_cpus)))


def _node_cpus() -> float:
    """The CPUs Ray counts on the node this process runs on."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == here), 1)


def trial_number(trial_id: str) -> int:
    """Tune's trial id ``3f9a1_00002`` -> 2 (the trial's place in the experiment)."""
    found = re.fullmatch(r"[0-9a-f]+_(\d+)", trial_id)
    if not found:
        raise ValueError(f"unexpected Tune trial id {trial_id!r}")
    return int(found.group(1))


def trial_seed(seed: int, trial_id: str, out: str) -> int:
    """``seed`` + the trial's number; a trial that already started (restored, its config.toml
    written) keeps the seed it started with, whatever the sweep's seed is now."""
    saved = storage.join(out, "config.toml")
    if storage.exists(saved):
        return int(tomllib.loads(storage.read_bytes(saved).decode()).get("seed", seed))
    return seed + trial_number(trial_id)


def shape_of(params: dict) -> tuple:
    """A trial's dictionary shape: its sampled parameters other than the learning rate."""
    return tuple((k, repr(v)) for k, v in sorted(params.items()) if k != "lr")


def scheduler(cfg: Config, epochs: int):
    """ASHA on the per-epoch train MSE within each dictionary shape (see :class:`Asha`)."""
    from galaxysae.scheduler import ShapeASHA

    return ShapeASHA(shape_of, time_attr="epoch", metric="mse", mode="min", max_t=epochs + 1,
                     grace_period=min(cfg.asha.grace_period, epochs + 1),
                     reduction_factor=cfg.asha.reduction_factor)


_KEYS = ("k", "n_latents", "lr", "matryoshka_groups")


def _axes(cfg: Config) -> list[list]:
    """The [space] keys' value lists that are searched (non-empty)."""
    return [getattr(cfg.space, key) for key in _KEYS if getattr(cfg.space, key)]


def _space(cfg: Config):
    from ray import tune

    pick = tune.grid_search if cfg.search == "grid" else tune.choice
    return {key: pick(getattr(cfg.space, key)) for key in _KEYS if getattr(cfg.space, key)}


def tune_config(cfg: Config, at_once: int, epochs: int):
    """Trials run ``at_once`` at most; random search draws from ``cfg.seed``. The limit goes to
    the search algorithm itself: Tune ignores max_concurrent_trials (with a warning) beside a
    BasicVariantGenerator passed in, and every trial's driver would start at once."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return tune.TuneConfig(
        num_samples=cfg.num_samples,
        search_alg=BasicVariantGenerator(max_concurrent=at_once, random_state=cfg.seed),
        scheduler=scheduler(cfg, epochs))


# What a trial's driver (the Tune trial that starts its Train run) reserves: no CPU, which the
# Train workers need whole (any CPU at all, even 0.01, leaves one trial fewer on a node whose CPUs
# are its GPUs x cpus_per_worker: that GPU idles for the whole sweep), and, as Tune refuses an
# empty request, a little memory (logical, about what the driver process takes). How many
# drivers run is bounded by max_concurrent_trials (the search algorithm's limit), not by CPUs.
TRIAL_DRIVER = {"memory": float(256 * 2**20)}


def concurrent_trials(cfg: Config, nodes: list[dict], n_trials: int) -> int:
    """How many trials the cluster's ``nodes`` hold at once (each its Train workers and its
    driver's TRIAL_DRIVER), at least 1 and at most ``n_trials``: a sweep fills the cluster."""
    from galaxysae import cluster

    trial = (train_job.worker_bundles(cfg.num_workers, cfg.cpus_per_worker, train_job.gpu_share(cfg))
             + [TRIAL_DRIVER])
    n = 1
    while n < n_trials and cluster.fits(trial * (n + 1), nodes):
        n += 1
    return n


def idle_gpus_warning(cfg: Config, nodes: list[dict], at_once: int, n_trials: int) -> str:
    """A warning when ``at_once`` trials leave GPUs of the cluster's ``nodes`` idle while
    trials wait (and what would use them), else ''."""
    per_trial = cfg.num_workers * train_job.gpu_share(cfg)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if not per_trial or at_once >= n_trials or at_once * per_trial >= gpus - 1e-9:
        return ""
    said = (f"sweep: {at_once} trial(s) at once use {at_once * per_trial:g} of the cluster's {gpus:g} "
            f"GPUs: the others stay idle while trials wait")
    if cfg.max_concurrent_trials:
        return said + f" (max_concurrent_trials = {cfg.max_concurrent_trials}; 0 runs as many as fit)"
    for cpus in range(cfg.cpus_per_worker - 1, 0, -1):
        more = concurrent_trials(dataclasses.replace(cfg, cpus_per_worker=cpus), nodes, n_trials)
        if more > at_once:
            return said + (f": the nodes' CPUs hold no more workers of cpus_per_worker = "
                           f"{cfg.cpus_per_worker}; cpus_per_worker = {cpus} runs {more} at once")
    return said + (f": the GPUs do not divide into more trials of num_workers = {cfg.num_workers} x "
                   f"gpus_per_worker = {cfg.gpus_per_worker:g}")


def check_space(cfg: Config, base: dict) -> None:
    """A Matryoshka base's nested groups fix its size: 'space.n_latents' cannot change it (the
    trials would silently become plain SAEs); sizes come with 'space.matryoshka_groups'."""
    if base.get("model", {}).get("matryoshka_groups") and cfg.space.n_latents:
        raise config.ConfigError(
            f"sweep: {cfg.train_config} is a Matryoshka SAE (model.matryoshka_groups), whose size "
            "its groups fix: search sizes with 'space.matryoshka_groups' instead of 'space.n_latents'")


# What a sweep's trials are (recorded under {output}/tune/ when it starts, compared when a rerun
# restores it): the search, and the base train config less the resources, which may change
# between runs (a rerun on other nodes) as they may for train.
EXPERIMENT = "experiment.json"
RESOURCE_KEYS = ("mode", "num_workers", "cpus_per_worker", "use_gpu", "gpus_per_worker", "device",
                 "data_loading", "output")


def experiment(cfg: Config, base: dict) -> dict:
    """What defines the sweep's trials: search, samples, seed, space, ASHA and the base train
    config (with the sweep's overrides; secrets in URLs redacted, as written to the file)."""
    return config.redact({
        "search": cfg.search, "num_samples": cfg.num_samples, "seed": cfg.seed,
        "space": dataclasses.asdict(cfg.space), "asha": dataclasses.asdict(cfg.asha),
        "train": {k: v for k, v in base.items() if k not in RESOURCE_KEYS}})


def experiment_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two :func:`experiment` records ("key: old ->
    new"); paths compared as train compares them (a trailing slash is the same input)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += experiment_changes(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, str) and embeddings.same_input(a, b)):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_same_experiment(cfg: Config, base: dict, fs, exp_path: str) -> bool:
    """-> whether a rerun restores the sweep under {output}/tune/; refused, naming what differs,
    when it was started with another search, space, seed or base train config: Tune would
    restore the old trials and ignore the new settings (a 'k = [4, 8, 16]' rerun of a
    'k = [4]' sweep reports the one old trial). A sweep from before the record was kept is
    restored as it is, said in the log."""
    from ray import tune

    url = storage.join(cfg.output, "tune", EXPERIMENT)
    if not tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        return False
    if not storage.exists(url):
        log.info("%s records no settings (an earlier version): restoring it as it is", url)
        return True
    changes = experiment_changes(json.loads(storage.read_bytes(url)), experiment(cfg, base))
    if changes:
        raise config.ConfigError(
            f"{cfg.output} holds a sweep started with other settings ({config.listed(changes)}; "
            f"recorded in {url}): "
            f"a rerun restores that sweep and would run none of the new settings. Rerun with its "
            f"settings to resume it, write to another --output, or remove "
            f"{storage.join(cfg.output, 'tune')} to start over")
    return True


class SweepError(RuntimeError):
    """Trials of a sweep failed: the job fails too, after writing results.csv."""


def run(cfg: Config) -> dict:
    from ray import tune

    from galaxysae import cluster

    cfg = config.absolute_paths(cfg, inputs=("train_config", "embeddings"), outputs=("output",))
    base = base_train_config(cfg)
    check_space(cfg, base)
    epochs = base.get("epochs", 200)
    fs, path = storage.arrow_fs(storage.join(cfg.output, "tune"))
    exp_path = f"{path.rstrip('/')}/sweep"
    restoring = check_same_experiment(cfg, base, fs, exp_path)  # before the data is read
    cluster.connect()
    # trials (each a driver of its own Train run) run on any node and write their output there;
    # they read the embeddings only to stream them (Ray Data's read tasks, on any node too)
    reads = {"embeddings": cfg.embeddings} if cfg.data_loading == "stream" else {}
    cluster.require_shared(reads, {"output": cfg.output}, "sweep")
    # one trial must fit (Tune runs fewer at once when not all of them do)
    nodes = train_job.require_resources(cfg.num_workers, cfg.cpus_per_worker, train_job.gpu_share(cfg),
                                        "sweep trial")
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if gpus and not cfg.use_gpu:
        log.warning("the cluster has %g GPUs, but use_gpu = false: the trials train on CPUs", gpus)
    n_trials = cfg.num_samples * (math.prod(map(len, _axes(cfg))) if cfg.search == "grid" else 1)
    at_once = cfg.max_concurrent_trials or concurrent_trials(cfg, nodes, n_trials)
    idle = idle_gpus_warning(cfg, nodes, at_once, n_trials)
    if idle:
        log.warning(idle)
    log.info("sweep: %d trials, up to %d at once, each %d worker(s) x {CPU %d%s}", n_trials, at_once,
             cfg.num_workers, cfg.cpus_per_worker, f", GPU {cfg.gpus_per_worker:g}" if cfg.use_gpu else "")
    # read once, here: the trials take the rows from the object store (SharedSplits)
    train_cfg = config.from_dict(train_job.Config, base, cfg.train_config)
    train, test = train_job.load_data(train_cfg)
    train_job.check_width(train_cfg, train.x.shape[1], train.source)  # before any trial starts
    shared = train_job.SharedSplits(train, test)
    log.info("sweep: %d train and %d test rows of width %d from %s, read once: every trial takes "
             "them from Ray's object store", len(train), len(test), train.x.shape[1], train.source)
    del train, test
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, sweep_output=cfg.output, shared=shared,
                             credentials=_credentials_for_trials()),
        TRIAL_DRIVER)
    if restoring:
        log.info("restoring the sweep from %s", storage.join(cfg.output, "tune", "sweep"))
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        storage.write_bytes(storage.join(cfg.output, "tune", EXPERIMENT),
                            json.dumps(experiment(cfg, base), indent=1, sort_keys=True).encode())
        tuner = tune.Tuner(
            trainable,
            param_space=_space(cfg),
            tune_config=tune_config(cfg, at_once, epochs),
            # a trial restarted after a failure resumes from its checkpoints (train_job.run)
            run_config=tune.RunConfig(name="sweep", storage_path=path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures)),
        )
    grid = tuner.fit()
    rows = collect(cfg, grid)
    write_results(cfg.output, rows)
    log_front(rows)
    done = sum(r["status"] == "finished" for r in rows)
    failed = [r for r in rows if r["status"] == "error"]
    log.info("sweep: %d trials (%d finished, %d stopped early, %d failed) -> %s", len(rows), done,
             len(rows) - done - len(failed), len(failed), storage.join(cfg.output, "results.csv"))
    if failed or not done:
        causes = "; ".join(f"{r['trial']}: {r['error']}" for r in failed[:3])
        raise SweepError(
            f"sweep {cfg.output}: {len(failed)} of {len(rows)} trials failed, {done} finished "
            f"(results.csv lists them; a rerun retries the failed ones)" + (f": {causes}" if causes else ""))
    return {"trials": len(rows), "finished": done}


COLUMNS = ["trial", "status", "seed", "k", "n_latents", "lr", "matryoshka_groups", "epochs", "train_mse",
           "fvu", "mse", "l0", "dead_fraction", "pca_fvu", "pareto", "output", "error"]


def collect(cfg: Config, grid) -> list[dict]:
    """One row per trial: its parameters, how far it got, and its test metrics if finished."""
    rows = []
    for result in grid:
        params = result.config or {}
        # a trial that failed before its first report has no trial_id metric: its directory
        # (Tune's, named <trainable>_<trial id>_...) still names it
        name = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        out = storage.join(cfg.output, "trials", name)
        metrics_url = storage.join(out, "metrics.json")
        m = json.loads(storage.read_bytes(metrics_url)) if storage.exists(metrics_url) else {}
        last = result.metrics or {}
        groups = params.get("matryoshka_groups") or []
        rows.append({
            "trial": name, "status": "finished" if m else ("error" if result.error else "stopped"),
            "seed": trial_seed(cfg.seed, name, out) if name else "",
            "k": params.get("k", ""), "n_latents": sum(groups) if groups else params.get("n_latents", ""),
            "lr": params.get("lr", ""), "matryoshka_groups": "-".join(map(str, groups)),
            "epochs": last.get("epoch", ""), "train_mse": m.get("train", {}).get("mse", "") if m else last.get("mse", ""),
            "fvu": m.get("fvu", ""), "mse": m.get("mse", ""), "l0": m.get("l0", ""),
            "dead_fraction": m.get("dead_fraction", ""), "pca_fvu": m.get("pca", {}).get("fvu", ""),
            "output": out,
            "error": _first_line(result.error) if result.error and not m else "",
        })
        if m and rows[-1]["n_latents"] == "":
            rows[-1]["n_latents"] = m["n_latents"]
        if m and rows[-1]["k"] == "":
            rows[-1]["k"] = m["k"]
    mark_pareto(rows)
    return sorted(rows, key=lambda r: r["trial"])


def mark_pareto(rows: list[dict]) -> None:
    """Sets each row's ``pareto``: a finished trial that no other finished one beats, with a
    test L0 and FVU each no higher and one of them lower (trials at the same point are all on
    the front). Unfinished trials are not on it."""
    done = [r for r in rows if r.get("fvu", "") != "" and r.get("l0", "") != ""]
    finished = {id(r) for r in done}
    for r in rows:
        r["pareto"] = id(r) in finished and not any(
            o["l0"] <= r["l0"] and o["fvu"] <= r["fvu"] and (o["l0"], o["fvu"]) != (r["l0"], r["fvu"])
            for o in done)


def log_front(rows: list[dict]) -> None:
    """Logs the trials on the Pareto front (by L0), with the output each one trained into (an
    SAE for render, compare or train --eval-only)."""
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: (r["l0"], r["fvu"]))
    if not front:
        return
    log.info("sweep: %d trial(s) on the Pareto front of test L0 and FVU (no other finished trial "
             "is lower in one and no higher in the other), by L0:", len(front))
    for r in front:
        log.info("  %s  L0 %.1f  FVU %.4f  (k %s, %s latents, lr %s) -> %s", r["trial"], r["l0"],
                 r["fvu"], r["k"], r["n_latents"], r["lr"] or "base", r["output"])


def _trial_id_from_path(path: str | None) -> str:
    """Tune's trial folder ``_trial_3f9a1_00001_1_k=64,...`` -> ``3f9a1_00001``."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename((path or "").rstrip("/")))
    return found.group(1) if found else ""


def _first_line(error: BaseException) -> str:
    """The cause of a trial's error, on one line (Tune wraps it in TuneError/RayTaskError)."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def write_results(output: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    storage.write_bytes(storage.join(output, "results.csv"), buf.getvalue().encode())
    storage.write_bytes(storage.join(output, "fvu_vs_l0.png"), plot(rows))


def plot(rows: list[dict]) -> bytes:
    """Test FVU against L0, one series per dictionary size, PCA (components = L0) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    done = [r for r in rows if r["fvu"] != ""]
    for size in sorted({r["n_latents"] for r in done}):
        pts = sorted((r["l0"], r["fvu"]) for r in done if r["n_latents"] == size)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"SAE, {size} latents")
    pca = sorted({(r["l0"], r["pca_fvu"]) for r in done})
    if pca:
        ax.plot([p[0] for p in pca], [p[1] for p in pca], "k--", alpha=0.6, label="PCA")
    ax.set_xlabel("L0 (active latents per galaxy)")
    ax.set_ylabel("test FVU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"sweep: {len(done)} finished of {len(rows)} trials")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
