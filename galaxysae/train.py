"""Job `train`: a TopK or Matryoshka sparse autoencoder on Zoobot embeddings.

Data flow:
  embeddings (parquet {root}/{split}/*.parquet, or research .npy + ids)
    -> standardisation stats + input-bias init from a train sample (driver)
    -> training loop (plain local loop, or Ray Train TorchTrainer workers that take their rows
       of the driver's split from the object store, or stream the parquet through
       ``get_dataset_shard``), checkpoints under {output}/checkpoints/ every checkpoint_every epochs
    -> SAE artifact {output}/: sae.safetensors, cfg.json, config.toml
    -> evaluation on the test split: metrics.json (written last: the completion marker) + eval.png
    -> the checkpoints deleted (nothing resumes a finished run)

A rerun with the same output resumes from the last checkpoint, or does nothing when
metrics.json already exists. ``--eval-only`` re-evaluates an existing artifact.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import time
import tomllib
from dataclasses import dataclass, field
from typing import Literal

from galaxysae import config, storage

log = logging.getLogger("galaxysae.train")

_CKPT = re.compile(r"^epoch-(\d{6})\.pt$")


@dataclass
class ModelConfig:
    activation: Literal["topk", "batchtopk"] = field(
        default="topk", metadata={"help": "topk: k per sample; batchtopk: k*B over the batch"})
    n_latents: int = field(default=5120, metadata={"help": "dictionary size M"})
    k: int = field(default=64, metadata={"help": "active latents per sample"})
    matryoshka_groups: list[int] = field(
        default_factory=list, metadata={"help": "nested group sizes summing to n_latents; [] = plain"})
    matryoshka_weights: list[float] = field(
        default_factory=list, metadata={"help": "loss weight per nested level; [] = equal (mean)"})
    aux_k: int = field(default=16, metadata={"help": "AuxK: dead latents reconstructing the residual"})
    aux_coeff: float = field(default=1 / 32, metadata={"help": "AuxK loss weight"})
    dead_steps: int = field(default=256, metadata={"help": "steps without firing before a latent is dead"})
    multik: int = field(default=256, metadata={"help": "multi-k auxiliary reconstruction k; 0 = off"})
    multik_coeff: float = field(default=0.125, metadata={"help": "multi-k loss weight"})
    l1_coeff: float = field(default=0.0, metadata={"help": "L1 penalty on active latents"})
    b_pre_init: Literal["median", "geometric_median", "mean", "zero"] = "median"
    standardize: bool = field(default=True, metadata={"help": "per-dimension standardised inputs"})


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "constant"] = field(
        default="cosine", metadata={"help": "cosine decays to lr * final_lr_ratio"})
    final_lr_ratio: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm; 0 = off"})


@dataclass
class Config:
    """Train a sparse autoencoder: galaxysae train --config C.toml --embeddings PATH --output DIR."""

    embeddings: str = field(default="", metadata={"help": (
        "embed output root ({root}/{split}/*.parquet, local or s3://) or a research .npy file "
        "[N, D]; its ids: sibling with 'embeddings'->'ids' in the name, else ids.npy; test split: "
        "the file with 'train'->'test' in the name, else a held-out test_fraction")})
    ids: str = field(default="", metadata={"help": ".npy ids file (default: found beside the embeddings)"})
    test_embeddings: str = field(default="", metadata={"help": ".npy test file (default: see embeddings)"})
    test_ids: str = field(default="", metadata={"help": "ids of test_embeddings (default: beside it)"})
    input_dim: int = field(default=0, metadata={"help": "expected embedding width; 0 = any"})
    output: str = field(default="", metadata={"help": "artifact directory, local or s3://"})
    train_split: str = "train"
    test_split: str = "test"
    test_fraction: float = field(default=0.1, metadata={"help": ".npy input without a test file"})
    split_seed: int = field(default=0, metadata={"help": (
        "seeds which rows of a .npy input without a test file are held out (test_fraction); "
        "apart from seed, so runs of other seeds (a sweep's trials, a later --eval-only of one) "
        "hold out the same rows")})
    epochs: int = 200
    batch_size: int = field(default=1024, metadata={
        "help": "samples per optimiser step, over all Ray Train workers together"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps; 0 = all epochs"})
    seed: int = 0
    mode: Literal["auto", "local", "ray"] = field(
        default="auto", metadata={"help": "ray: TorchTrainer; local: plain loop; auto: ray if RAY_ADDRESS"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (data parallel)"})
    use_gpu: bool = field(default=False, metadata={
        "help": "ray mode: a GPU (gpus_per_worker of one) per worker, as device = 'cuda'; device "
                "'auto' also takes them"})
    cpus_per_worker: int = field(default=0, metadata={
        "help": "ray mode: CPUs reserved per worker = its torch threads; 0: chosen from the cluster"})
    gpus_per_worker: float = field(default=1.0, metadata={"help": (
        "ray mode on GPUs: the share of a GPU each worker reserves; below 1 lets several runs "
        "(sweep trials) share a GPU, one worker each")})
    data_loading: Literal["stream", "memory"] = field(default="memory", metadata={"help": (
        "ray mode: memory: the driver's copy of the split goes to the object store once (one "
        "copy per node), each epoch every worker trains on its share of one seeded permutation "
        "of all its rows (a GPU too small for the split: its own block, shuffled); stream: Ray "
        "Data re-reads the parquet every epoch, its files in a seeded order new each epoch, rows "
        "shuffled within a buffer")})
    device: str = field(default="auto", metadata={"help": (
        "auto: a GPU when there is one (local: torch sees one; ray: the cluster has one, or "
        "gpus_per_worker of one, per worker); cpu; cuda: a GPU or an error; mps: Apple's GPU "
        "(local mode)")})
    checkpoint_every: int = field(default=1, metadata={"help": "epochs between checkpoints"})
    keep_checkpoints: int = 2
    log_every: int = field(default=50, metadata={"help": "steps between progress lines"})
    eval_only: bool = field(default=False, metadata={"help": "evaluate the artifact in output"})
    eval_batch_size: int = 4096
    run_name: str = field(default="", metadata={"help": "Ray Train run name (default: from output)"})
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        if not self.embeddings:
            raise ValueError("'embeddings' is required (embed output root or a .npy file)")
        if not self.output:
            raise ValueError("'output' is required (artifact directory, local or s3://)")
        for name in ("epochs", "batch_size", "num_workers", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"'{name}' must be positive, got {getattr(self, name)}")
        if self.cpus_per_worker < 0:
            raise ValueError(f"'cpus_per_worker' must be >= 0 (0: chosen from the cluster), got "
                             f"{self.cpus_per_worker}")
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            raise ValueError(f"'device' must be auto, cpu, cuda or mps, got {self.device!r}")
        if self.use_gpu and self.device == "cpu":
            raise ValueError("'use_gpu' = true contradicts 'device' = 'cpu': drop one of them")
        if self.device != "cpu":
            check_gpu_share(self.gpus_per_worker, self.num_workers)
        m = self.model
        if m.matryoshka_groups and sum(m.matryoshka_groups) != m.n_latents:
            raise ValueError(f"'model.matryoshka_groups' {m.matryoshka_groups} sum to "
                             f"{sum(m.matryoshka_groups)}, not model.n_latents={m.n_latents}")
        if not 0 < m.k <= m.n_latents:
            raise ValueError(f"'model.k' must be in 1..{m.n_latents}, got {m.k}")
        if m.multik and m.activation == "topk" and not m.k <= m.multik <= m.n_latents:
            raise ValueError(f"'model.multik' must be 0 or in k..n_latents, got {m.multik}")


def check_gpu_share(gpus_per_worker: float, num_workers: int) -> None:
    if not 0 < gpus_per_worker <= 1:
        raise ValueError(f"'gpus_per_worker' must be in (0, 1], got {gpus_per_worker}")
    if gpus_per_worker < 1 and num_workers > 1:
        raise ValueError(f"'gpus_per_worker' = {gpus_per_worker:g} needs num_workers = 1: the "
                         "workers of one run step together, each on a whole GPU of its own")


# ----------------------------------------------------------------------------- the original layout

_ORIGINAL_MODEL = {"input_dim", "group_sizes", "top_k", "l1_coeff", "aux_penalty",
                   "n_batches_to_dead", "aux_k_multiplier", "dict_size", "n_latents"}
_ORIGINAL_TABLES = {"model", "training", "data", "output", "visualization"}
# [data] keys of the research scripts -> our key ("" = known, not needed here).
_ORIGINAL_DATA = {"embeddings_path": "embeddings", "train_embeddings": "embeddings",
                  "embeddings": "embeddings", "ids_path": "ids", "train_ids": "ids", "ids": "ids",
                  "test_embeddings": "test_embeddings", "test_ids": "test_ids",
                  "embeddings_dir": "", "dataset": "", "dataset_name": "", "dataset_config": ""}
_ORIGINAL_OUTPUT = {"results_dir", "output_dir", "save_dir", "dir", "model_path", "plot_path",
                    "model_name"}


def preprocess_toml(data: dict, path: str) -> dict:
    """Accept the research code's Matryoshka TOML as is; pass our own layout through.

    Original layout: [model] input_dim, group_sizes, top_k, l1_coeff, aux_penalty,
    n_batches_to_dead, aux_k_multiplier; [training] epochs, learning_rate, batch_size, device;
    [data] (embedding paths); [output] (results dir); [visualization] (ignored: rendering is
    the render job's). Unknown keys inside these tables are errors naming the key.
    """
    model = data.get("model", {})
    original = "training" in data or (isinstance(model, dict) and ("group_sizes" in model or "top_k" in model))
    if not original:
        return data
    out: dict = {k: v for k, v in data.items() if k not in _ORIGINAL_TABLES}
    unknown_tables = set(out) - {f for f in Config.__dataclass_fields__}
    if unknown_tables:
        raise config.ConfigError(f"{path}: unknown table or key {sorted(unknown_tables)} in the "
                                 f"original layout (known tables: {sorted(_ORIGINAL_TABLES)})")
    m: dict = {}
    for key, value in model.items():
        if key not in _ORIGINAL_MODEL:
            raise config.ConfigError(f"{path}: unknown key 'model.{key}' in the original layout "
                                     f"(known: {sorted(_ORIGINAL_MODEL)})")
    groups = model.get("group_sizes")
    if groups:
        m["matryoshka_groups"] = list(groups)
        m["n_latents"] = int(sum(groups))
        m["activation"] = "batchtopk"  # the original Matryoshka SAE is BatchTopK
        m["multik"] = 0  # the original Matryoshka loop has no multi-k term
    elif "dict_size" in model or "n_latents" in model:
        m["n_latents"] = model.get("dict_size", model.get("n_latents"))
    if "top_k" in model:
        m["k"] = model["top_k"]
    if "l1_coeff" in model:
        m["l1_coeff"] = model["l1_coeff"]
    if "aux_penalty" in model:
        m["aux_coeff"] = model["aux_penalty"]
    if "n_batches_to_dead" in model:
        m["dead_steps"] = model["n_batches_to_dead"]
    if "aux_k_multiplier" in model:
        m["aux_k"] = int(model["aux_k_multiplier"] * model.get("top_k", 64))
    if groups:
        m["aux_k"] = min(m.get("aux_k", 0), m["n_latents"])
    training = data.get("training", {})
    known_training = {"epochs", "learning_rate", "batch_size", "device", "weight_decay", "seed"}
    for key in training:
        if key not in known_training:
            raise config.ConfigError(f"{path}: unknown key 'training.{key}' in the original layout "
                                     f"(known: {sorted(known_training)})")
    o: dict = {}
    if "learning_rate" in training:
        o["lr"] = training["learning_rate"]
    if "weight_decay" in training:
        o["weight_decay"] = training["weight_decay"]
    if groups:
        # The original Matryoshka loop: torch.optim.AdamW given only its lr, at a constant rate;
        # so AdamW's default weight decay, 0.01 (not our TopK default, 1e-6)
        o.setdefault("weight_decay", 0.01)
        o["schedule"] = "constant"
    for key in ("epochs", "batch_size", "seed"):
        if key in training:
            out[key] = training[key]
    if "device" in training:
        out["device"] = training["device"]
    data_t = data.get("data", {})
    for key in data_t:
        if key not in _ORIGINAL_DATA:
            raise config.ConfigError(f"{path}: unknown key 'data.{key}' in the original layout "
                                     f"(known: {sorted(_ORIGINAL_DATA)})")
    for key, target in _ORIGINAL_DATA.items():
        if key in data_t and target and target not in out:
            out[target] = data_t[key]
    out_t = data.get("output", {})
    for key in out_t:
        if key not in _ORIGINAL_OUTPUT:
            raise config.ConfigError(f"{path}: unknown key 'output.{key}' in the original layout "
                                     f"(known: {sorted(_ORIGINAL_OUTPUT)})")
    for key in ("results_dir", "output_dir", "save_dir", "dir"):
        if key in out_t and "output" not in out:
            out["output"] = out_t[key]
    if data.get("visualization"):
        log.info("%s: [visualization] is the render job's business here; ignored by train", path)
    if "input_dim" in model:
        out["input_dim"] = model["input_dim"]
    out["model"] = {**out.get("model", {}), **m}
    out["optim"] = {**out.get("optim", {}), **o}
    return out


# ----------------------------------------------------------------------------- model + optimiser


def sae_config(cfg: Config, d_in: int):
    from galaxysae.sae import SAEConfig

    m = cfg.model
    return SAEConfig(
        d_in=d_in, n_latents=m.n_latents, k=m.k, activation=m.activation,
        matryoshka_groups=m.matryoshka_groups, matryoshka_weights=m.matryoshka_weights,
        aux_k=min(m.aux_k, m.n_latents), aux_coeff=m.aux_coeff, dead_steps=m.dead_steps,
        multik=m.multik if m.activation == "topk" else 0, multik_coeff=m.multik_coeff,
        l1_coeff=m.l1_coeff)


def lr_lambda(cfg: Config, total_steps: int):
    o = cfg.optim

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = min(1.0, step / max(1, total_steps))
        return o.final_lr_ratio + (1 - o.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def make_optimizer(cfg: Config, model):
    import torch

    kw = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    try:  # the fused kernel saves several passes over the dense [M, D] weights per step
        return torch.optim.AdamW(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), foreach=True, **kw)


def init_stats(cfg: Config, x_sample):
    """Standardisation stats and input bias from a raw sample x[N, D] -> dict of tensors."""
    import torch

    from galaxysae.sae import SparseAutoencoder

    torch.manual_seed(cfg.seed)
    model = SparseAutoencoder(sae_config(cfg, x_sample.shape[1]))
    model.init_from_data(torch.as_tensor(x_sample), cfg.model.b_pre_init, cfg.model.standardize)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(output: str) -> str:
    return storage.join(output, "checkpoints")


def latest_checkpoint(output: str) -> str | None:
    names = [u for u in storage.listdir(checkpoint_dir(output), suffix=".pt")
             if _CKPT.match(os.path.basename(u.rstrip("/")))]
    return names[-1] if names else None


def save_checkpoint(cfg: Config, state: dict, epoch: int) -> str:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    url = storage.join(checkpoint_dir(cfg.output), f"epoch-{epoch:06d}.pt")
    storage.write_bytes(url, buf.getvalue())
    old = [u for u in storage.listdir(checkpoint_dir(cfg.output), suffix=".pt")
           if _CKPT.match(os.path.basename(u))]
    for u in old[: max(0, len(old) - cfg.keep_checkpoints)]:
        storage.remove(u)
    return url


def remove_checkpoints(output: str) -> None:
    """Delete the checkpoints of a finished run: weights plus AdamW state, ~250 MB each at 16,384
    latents of 640-d, and nothing resumes from them once metrics.json is written (a rerun
    skips the run; one with other settings is refused on the finished SAE alone)."""
    for url in storage.listdir(checkpoint_dir(output), suffix=".pt"):
        if _CKPT.match(os.path.basename(url)):
            storage.remove(url)


# What decides the trained weights: the model and its optimisation, and the rows it trains on
# (the inputs, and for a .npy input without a test file, which rows are held out). Checkpoints
# or a finished SAE written with other values are neither resumed nor kept; resources (workers,
# device, mode) may differ: a resumed job may run on other hardware. input_dim is left out: it
# only checks the width (check_width refuses a mismatch before any step). The test split and
# its files are in too: a finished SAE's metrics.json is measured on them. What the paths hold
# is compared as well: INPUTS records the stamps of the files a run read (check_same_inputs).
SETTINGS = ("model", "optim", "epochs", "batch_size", "max_steps", "seed", "embeddings", "ids",
            "train_split", "test_split", "test_embeddings", "test_ids", "test_fraction", "split_seed")
HOLD_OUT = ("test_fraction", "split_seed")  # compared for a .npy input only: it may hold out rows
PATHS = ("embeddings", "ids", "test_embeddings", "test_ids")  # compared as paths (see _same_path)


def settings_changes(saved: dict, cfg: Config) -> list[str]:
    """``SETTINGS`` keys whose value in ``cfg`` differs from the ``saved`` config ("key: old ->
    new"); a key either side lacks (a field added or removed since, a None) is not compared.
    ``cfg`` is compared as config.save writes it (paths absolute as run made them, secrets in
    URLs redacted), so the same inputs compare equal."""
    now = config.redact(config.to_dict(cfg))
    saved = dict(saved)
    if "split_seed" not in saved and "seed" in saved:
        saved["split_seed"] = saved["seed"]  # written before split_seed: the hold-out came from seed
    keys = [k for k in SETTINGS if k not in HOLD_OUT or _is_npy(cfg.embeddings)]
    out: list[str] = []

    def walk(old: dict, new: dict, prefix: str) -> None:
        for key in sorted(set(old) & set(new)):
            a, b = old[key], new[key]
            if isinstance(a, dict) and isinstance(b, dict):
                walk(a, b, f"{prefix}{key}.")
            elif a != b and not (key in PATHS and _same_path(a, b)):
                out.append(f"{prefix}{key}: {a!r} -> {b!r}")

    walk({k: saved[k] for k in keys if k in saved}, {k: now[k] for k in keys}, "")
    return out


def _is_npy(path: str) -> bool:
    from galaxysae import embeddings

    return embeddings.is_npy(path)


def _same_path(a, b) -> bool:
    """Two spellings of one input (:func:`galaxysae.embeddings.same_input`)."""
    from galaxysae import embeddings

    return embeddings.same_input(a, b)


def input_fingerprint(cfg: Config) -> dict[str, str]:
    """:func:`galaxysae.embeddings.fingerprint` of the files this config trains and tests on
    (stamps only: one listing per split, one metadata request per file; nothing is read)."""
    from galaxysae import embeddings

    return embeddings.fingerprint(cfg.embeddings, (cfg.train_split, cfg.test_split), ids=cfg.ids,
                                  test_path=cfg.test_embeddings, test_ids=cfg.test_ids)


def check_same_inputs(cfg: Config, finished: bool, stamps: dict[str, str]) -> None:
    """Refuse to keep a finished SAE, or resume checkpoints, trained on embedding files that
    changed since (re-embedded in place: the same URLs, other rows or values), naming the files.
    An output written before the stamps were recorded is kept or resumed, said in the log."""
    if not (finished or latest_checkpoint(cfg.output)):
        return
    from galaxysae import embeddings

    what = "a trained SAE" if finished else "checkpoints of a training"
    changes = embeddings.recorded_changes(cfg.output, stamps)
    if changes is None:
        log.info("%s records no stamps of its embeddings (written by an earlier version): cannot "
                 "tell whether %s changed since; %s it (remove the output to retrain)", cfg.output,
                 cfg.embeddings, "keeping" if finished else "resuming")
        return
    if changes:
        raise config.ConfigError(
            f"{cfg.output} holds {what} of other embeddings: {cfg.embeddings} changed since it "
            f"was trained ({config.listed(changes)}; stamps in "
            f"{storage.join(cfg.output, embeddings.INPUTS)}): "
            f"write to another --output, or remove {cfg.output} to retrain there (train has no "
            f"--overwrite)")


def check_same_settings(cfg: Config, finished: bool) -> None:
    """Refuse, naming what differs, to resume or keep an output trained with other settings
    (its config.toml): the weights would be half one run and half another, or the artifact
    would not be what this config describes."""
    if not (finished or latest_checkpoint(cfg.output)):
        return
    saved_url, saved = _saved_config(cfg)
    if saved is None:
        return
    changes = settings_changes(saved, cfg)
    if changes:
        what = "a trained SAE" if finished else "checkpoints of a training"
        raise config.ConfigError(
            f"{cfg.output} holds {what} with other settings ({'; '.join(changes)}): rerun with "
            f"the settings in {saved_url} to {'keep' if finished else 'resume'} it, or write to "
            f"another --output (or delete it to start over)")


def _saved_config(cfg: Config) -> tuple[str, dict | None]:
    """(URL, contents) of the config.toml a run wrote beside its output; None when there is none."""
    url = storage.join(cfg.output, "config.toml")
    return url, tomllib.loads(storage.read_bytes(url).decode()) if storage.exists(url) else None


def check_same_hold_out(cfg: Config) -> None:
    """--eval-only of an SAE trained on a .npy input: the rows tested must be the ones held out
    when it was trained (same file, ids, test file or hold-out), or some would be training rows
    and the metrics flattering."""
    if not _is_npy(cfg.embeddings):
        return
    saved_url, saved = _saved_config(cfg)
    if saved is None:
        return
    keys = ("embeddings", "ids", "test_embeddings", *HOLD_OUT)
    changes = [c for c in settings_changes(saved, cfg) if c.split(":", 1)[0] in keys]
    if changes:
        raise config.ConfigError(
            f"{cfg.output}: --eval-only would test on other rows than were held out when it was "
            f"trained ({'; '.join(changes)}), some of them training rows: rerun with the settings in "
            f"{saved_url}")


def check_eval_inputs(cfg: Config, stamps: dict[str, str]) -> None:
    """--eval-only when the embedding files changed since the SAE was trained: on a .npy input
    holding out rows of its file, the rows now held out may be training rows (refused, as in
    check_same_hold_out); otherwise the SAE is evaluated on the files as they are now, said in
    the log."""
    from galaxysae import embeddings

    changes = embeddings.recorded_changes(cfg.output, stamps)
    if not changes:
        return
    if _is_npy(cfg.embeddings) and "test_embeddings" not in stamps:  # a hold-out of its file
        raise config.ConfigError(
            f"{cfg.output}: --eval-only would test on rows held out of {cfg.embeddings}, which "
            f"changed since the SAE was trained ({config.listed(changes)}): some may be training rows")
    log.warning("%s: the embeddings changed since the SAE was trained (%s): evaluating it on them "
                "as they are now", cfg.output, config.listed(changes))


def load_checkpoint(url: str) -> dict:
    import torch

    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- the loop


class Progress:
    """Periodic progress lines: loss, L0, dead fraction, samples/s (one host sync per line)."""

    def __init__(self, every: int, total_steps: int, prefix: str = ""):
        self.every, self.total, self.prefix = every, total_steps, prefix
        self.t0, self.n0, self.k = time.perf_counter(), 0, 0
        self.acc = None

    def update(self, step: int, epoch: int, out, model, n_samples: int) -> dict | None:
        import torch

        terms = torch.stack([out.loss.detach(), out.recon.detach(), out.l0.detach()])
        self.acc = terms if self.acc is None else self.acc + terms
        self.n0 += n_samples
        self.k += 1
        if step % self.every and step != self.total:
            return None
        loss, recon, l0 = (self.acc / self.k).tolist()
        dead = float(model.dead_fraction())
        dt = time.perf_counter() - self.t0
        rate = self.n0 / max(dt, 1e-9)
        log.info("%sstep %d/%d epoch %d loss %.4f mse %.4f L0 %.1f dead %.3f %.0f samples/s",
                 self.prefix, step, self.total, epoch, loss, recon, l0, dead, rate)
        self.acc, self.t0, self.n0, self.k = None, time.perf_counter(), 0, 0
        return {"step": step, "epoch": epoch, "loss": loss, "mse": recon, "l0": l0, "dead": dead,
                "samples_per_s": rate}


def train_step(cfg: Config, model, opt, sched, x):
    """One optimiser step on raw x[B, D]; returns the model's Output (no host sync)."""
    out = model(x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer_step(cfg, getattr(model, "module", model), opt, sched)
    return out


def optimizer_step(cfg: Config, model, opt, sched) -> None:
    """After backward: drop the decoder gradients' parallel part, clip, step, renormalise."""
    import torch

    model.remove_parallel_grads()
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
    opt.step()
    sched.step()
    model.normalize_decoder()


def train_steps(cfg: Config, model, opt, sched, batches, state: dict, progress: Progress,
                on_epoch_end) -> dict:
    """Run the epochs left in ``state`` (epoch, step). ``batches(epoch)`` yields x[B, D] tensors.

    ``on_epoch_end(epoch, metrics)`` checkpoints/reports with the epoch's mean loss, mse, L0 and
    the dead fraction (one host sync per epoch); returns the last epoch's metrics.
    """
    import torch

    raw = getattr(model, "module", model)  # DDP-wrapped in Ray mode
    # a run resumed after its last epoch's checkpoint reports that epoch's metrics
    last: dict = dict(state.get("last") or {})
    t_start, n_seen = time.perf_counter(), 0
    for epoch in range(state["epoch"], cfg.epochs):
        if _steps_done(cfg, state):  # resumed from a checkpoint written at max_steps
            break
        model.train()
        acc, n_steps = None, 0
        for x in batches(epoch):
            out = train_step(cfg, model, opt, sched, x)
            terms = torch.stack([out.loss.detach(), out.recon.detach(), out.l0.detach()])
            acc = terms if acc is None else acc + terms
            n_steps += 1
            state["step"] += 1
            n_seen += x.shape[0]
            progress.update(state["step"], epoch, out, raw, x.shape[0])
            if _steps_done(cfg, state):
                break
        state["epoch"] = epoch + 1
        loss, mse, l0 = (acc / max(1, n_steps)).tolist() if acc is not None else (math.nan,) * 3
        last = {"epoch": epoch + 1, "step": state["step"], "loss": loss, "mse": mse, "l0": l0,
                "dead": float(raw.dead_fraction())}
        state["last"] = dict(last)
        on_epoch_end(epoch + 1, last)
    last["train_samples_per_s"] = n_seen / max(time.perf_counter() - t_start, 1e-9)
    return last


def _steps_done(cfg: Config, state: dict) -> bool:
    """Whether the run has taken its ``max_steps`` (checked before a step as well as after it,
    so a run resumed from the checkpoint written at max_steps takes no step more)."""
    return bool(cfg.max_steps) and state["step"] >= cfg.max_steps


def _resume(cfg: Config, model, opt, sched, state: dict) -> None:
    url = latest_checkpoint(cfg.output)
    if url is None:
        return
    ck = load_checkpoint(url)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optim"])
    sched.load_state_dict(ck["sched"])
    state.update(epoch=ck["epoch"], step=ck["step"], last=ck.get("last") or {})
    log.info("resuming from %s (epoch %d, step %d)", url, ck["epoch"], ck["step"])


def _checkpoint_state(model, opt, sched, state) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
            "epoch": state["epoch"], "step": state["step"], "last": state.get("last") or {}}


def _steps_per_epoch(n: int, batch: int) -> int:
    return max(1, n // batch)


def run_local(cfg: Config, train_x, init: dict, checkpoints: bool = True):
    """The plain loop, no Ray: train_x[N, D] float32 numpy. Returns (model, last line).

    ``checkpoints=False`` neither resumes nor writes checkpoints (in-memory use: tests, benches).
    """
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from galaxysae.sae import SparseAutoencoder

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device here: set "
                           "device = 'auto' to train on the CPU")
    torch.manual_seed(cfg.seed)
    model = SparseAutoencoder(sae_config(cfg, train_x.shape[1]))
    model.load_state_dict(init)
    model.to(device)
    x_all = torch.as_tensor(train_x).to(device)
    n = x_all.shape[0]
    bs = min(cfg.batch_size, n)
    per_epoch = _steps_per_epoch(n, bs)
    total = per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, per_epoch * cfg.epochs)
    opt = make_optimizer(cfg, model)
    sched = LambdaLR(opt, lr_lambda(cfg, total))
    state = {"epoch": 0, "step": 0}
    if checkpoints:
        _resume(cfg, model, opt, sched, state)

    def batches(epoch: int):
        perm = epoch_rows(n, 0, 1, cfg.seed, epoch).to(device)  # a resumed epoch: the same order
        for i in range(per_epoch):
            yield x_all[perm[i * bs:(i + 1) * bs]]

    def on_epoch_end(epoch: int, last: dict) -> None:
        if checkpoints and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs):
            save_checkpoint(cfg, _checkpoint_state(model, opt, sched, state), epoch)

    progress = Progress(cfg.log_every, total)
    last = train_steps(cfg, model, opt, sched, batches, state, progress, on_epoch_end)
    last["steps"], last["epochs"] = state["step"], state["epoch"]
    return model.cpu().eval(), last


def epoch_rows(n: int, rank: int, world: int, seed: int, epoch: int):
    """The rows (indices into n) worker ``rank`` of ``world`` trains on in ``epoch``, in batch
    order: its strided share ``perm[rank::world]`` of one permutation of all n rows seeded by
    (seed, epoch), the same on every rank. The shares of an epoch are disjoint and cover every
    row; they change every epoch, so no worker keeps a block of rows (one sky region, one
    brightness range when rows come in shard order) for the whole run; a resumed epoch gets
    the same rows. ``world`` = 1: the local loop's shuffle."""
    import torch

    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=gen)[rank::world]


# The split goes whole onto a worker's GPU when it takes at most this share of the free memory.
DEVICE_DATA_SHARE = 0.5


def worker_rows(x, rank: int, world: int, device, free_bytes: int | None = None):
    """The rows of ``x`` [N, D] (the object store's read-only array) worker ``rank`` of ``world``
    gathers its batches from, as (tensor on ``device``, own block or not).

    All rows (``False``): the workers take their shares of each epoch from them (``epoch_rows``).
    On the CPU the tensor is a view of the store's memory, not a copy, so a node holds the split
    once however many workers and trials train from it (the steps only gather batches from it,
    never write); on a GPU a copy of the whole split when it takes at most DEVICE_DATA_SHARE of
    the memory free there (``free_bytes``; default: torch's count on a CUDA device). Else only
    the rank's contiguous block is copied (``True``): the worker draws from its block alone,
    shuffled each epoch, which is said in the log (rows stored in a meaningful order then bias
    each worker's batches)."""
    import torch

    from galaxysae import embeddings

    n = x.shape[0]
    if free_bytes is None and torch.device(device).type == "cuda":
        free_bytes = torch.cuda.mem_get_info(torch.device(device))[0]
    if free_bytes is not None and x.nbytes > DEVICE_DATA_SHARE * free_bytes:
        lo, hi = rank * n // world, (rank + 1) * n // world
        log.warning("the split (%.1f GB) does not fit on %s (%.1f GB free): worker %d takes its "
                    "block of rows %d:%d alone, shuffled every epoch, not a share of all rows",
                    x.nbytes / 1e9, device, free_bytes / 1e9, rank, lo, hi)
        return embeddings.as_tensor(x[lo:hi]).to(device), True
    return embeddings.as_tensor(x).to(device), False


def memory_batches(x, rank: int, world: int, device, seed: int, batch_size: int, steps: int,
                   free_bytes: int | None = None):
    """Memory mode's batches for worker ``rank`` of ``world`` from the store's array ``x`` [N, D]:
    (``batches(epoch)``, which yields ``steps`` tensors [batch_size, D] on ``device``, and the
    number of rows it draws them from an epoch). Its share of each epoch's permutation of all
    rows (``epoch_rows``), or of its own block when only that is on the device (``worker_rows``;
    ``free_bytes`` as there)."""
    x_all, own = worker_rows(x, rank, world, device, free_bytes)
    n = x_all.shape[0]
    who, of = (0, 1) if own else (rank, world)  # its own block: all of it, shuffled

    def batches(epoch: int):
        mine = epoch_rows(n, who, of, seed, epoch).to(device)
        for i in range(steps):
            yield x_all[mine[i * batch_size:(i + 1) * batch_size]]

    return batches, len(range(who, n, of))


def ray_train_loop(loop_cfg: dict) -> None:
    """Ray Train worker loop (Train V2): same steps as local mode, data from the dataset shard
    (stream) or from the driver's split in the object store (memory)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from galaxysae import cli
    from galaxysae.sae import SparseAutoencoder

    cli.setup_worker()
    cfg: Config = config.from_dict(Config, loop_cfg["cfg"], "train loop")
    torch.set_num_threads(max(1, cfg.cpus_per_worker))  # Ray gives each worker one thread otherwise
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    model = SparseAutoencoder(sae_config(cfg, loop_cfg["d_in"]))
    model.load_state_dict(loop_cfg["init"])
    model.to(device)
    bs = loop_cfg["batch_size"]
    per_epoch = loop_cfg["steps_per_epoch"]
    total = loop_cfg["total_steps"]
    opt = make_optimizer(cfg, model)
    sched = LambdaLR(opt, lr_lambda(cfg, total))
    state = {"epoch": 0, "step": 0}
    _resume(cfg, model, opt, sched, state)
    # no buffer broadcast before every forward: the SAE keeps its state identical on every rank
    # itself (an all-reduce a step, and an all_gather for BatchTopK's threshold:
    # SparseAutoencoder._update_state)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs={
        "broadcast_buffers": False}) if world > 1 else model

    rows = None  # the rows this worker trains on an epoch (memory mode)
    if cfg.data_loading == "stream":
        shard = ray.train.get_dataset_shard("train")

        def batches(epoch: int):
            it = shard.iter_torch_batches(batch_size=bs, dtypes=torch.float32, device=device,
                                          drop_last=True, local_shuffle_buffer_size=4 * bs,
                                          local_shuffle_seed=cfg.seed + epoch)
            for i, b in enumerate(it):
                if i >= per_epoch:  # every rank takes the same number of steps (DDP)
                    break
                yield b["x"]
    else:
        # the driver's split from this node's object store (read-only shared memory, one copy a
        # node); nothing reads the embeddings files again
        batches, rows = memory_batches(ray.get(loop_cfg["train_x"]), rank, world, device,
                                       cfg.seed, bs, per_epoch)

    def on_epoch_end(epoch: int, metrics: dict) -> None:
        if rank == 0 and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs):
            save_checkpoint(cfg, _checkpoint_state(model, opt, sched, state), epoch)
        ray.train.report(metrics)

    progress = Progress(cfg.log_every, total, prefix=f"[rank {rank}] ")
    last = train_steps(cfg, ddp, opt, sched, batches, state, progress, on_epoch_end)
    last["train_samples_per_s"] *= world  # the workers step together: rank 0's rate, times world
    if rank == 0:
        model.cpu().save(cfg.output)
        state_line = {k: v for k, v in last.items() if isinstance(v, (int, float))}
        state_line.update(steps=state["step"], epochs=state["epoch"])
        if rows is not None:
            state_line["worker_rows"] = rows
        storage.write_bytes(storage.join(cfg.output, "train_state.json"),
                            json.dumps(state_line).encode())


def require_resources(num_workers: int, cpus_per_worker: int, gpus_per_worker: float, job: str,
                      nodes: list[dict] | None = None) -> list[dict]:
    """The Train workers of one run (``gpus_per_worker``: 0 on CPUs) must fit the cluster
    (``nodes``: its ``alive_nodes()`` if the caller has them), or Ray Train waits minutes per
    attempt before it fails. Raises :class:`cluster.ResourceError` naming the keys; returns the
    alive nodes they fit."""
    from galaxysae import cluster

    gpu = f"use_gpu={str(gpus_per_worker > 0).lower()}" + (
        f", gpus_per_worker={gpus_per_worker:g}" if 0 < gpus_per_worker < 1 else "")
    return cluster.require(worker_bundles(num_workers, cpus_per_worker, gpus_per_worker),
                           f"{job} with num_workers={num_workers}, cpus_per_worker={cpus_per_worker}, {gpu}",
                           "Lower num_workers or cpus_per_worker.",
                           gpu_off="use_gpu = false (and device = 'auto')", nodes=nodes)


def worker_bundles(num_workers: int, cpus_per_worker: int, gpus_per_worker: float) -> list[dict]:
    """What each Train worker reserves (``gpus_per_worker``: 0 on CPUs)."""
    return [{"CPU": float(cpus_per_worker), "GPU": float(gpus_per_worker)}] * num_workers


def gpu_share(cfg) -> float:
    """The GPU each worker of a planned train (or sweep) ``cfg`` reserves: 0 on CPUs."""
    return cfg.gpus_per_worker if cfg.use_gpu else 0.0


# An SAE step is a few GEMMs: more host threads than this per GPU worker only wait.
MAX_CPUS_PER_GPU_WORKER = 8


def plan_workers(cfg: Config, nodes: list[dict]) -> Config:
    """Ray mode: the workers' GPU and CPUs from the cluster's ``nodes`` where the config leaves
    them open. GPU: ``use_gpu`` or ``device = "cuda"``; ``device = "auto"`` takes one (its
    ``gpus_per_worker``) per worker when the cluster has that many (all workers or none: DDP
    workers step together). CPUs: ``cpus_per_worker = 0`` gives each worker as many as fit (at
    most MAX_CPUS_PER_GPU_WORKER on GPU, its share of a node's CPUs per GPU), leaving one for
    Ray Data's read tasks when the parquet is streamed. The chosen values are returned in the
    config (``device`` says cuda or cpu)."""
    from galaxysae import cluster, embeddings

    gpu = cfg.use_gpu or cfg.device.startswith("cuda")
    if cfg.device == "auto" and not gpu:
        gpu = cluster.fits([{"GPU": cfg.gpus_per_worker}] * cfg.num_workers, nodes)
    share = cfg.gpus_per_worker if gpu else 0.0
    cpus = cfg.cpus_per_worker
    if not cpus:
        stream = cfg.data_loading == "stream" and not embeddings.is_npy(cfg.embeddings)
        reader = [{"CPU": 1.0}] if stream else []
        if gpu:
            per_gpu = (n.get("CPU", 0) / n["GPU"] for n in nodes if n.get("GPU", 0) >= 1)
            top = min(MAX_CPUS_PER_GPU_WORKER, int(max(per_gpu, default=1) * cfg.gpus_per_worker))
        else:
            top = int(max((n.get("CPU", 0) for n in nodes), default=1))
        cpus = next((c for c in range(max(1, top), 0, -1)
                     if cluster.fits(worker_bundles(cfg.num_workers, c, share) + reader, nodes)), 1)
    device = cfg.device if cfg.device.startswith("cuda") else ("cuda" if gpu else "cpu")
    return dataclasses.replace(cfg, use_gpu=gpu, cpus_per_worker=cpus, device=device)


def run_ray(cfg: Config, train, init: dict, callbacks=None, x_ref=None) -> dict:
    """Train on the Split ``train`` with a Ray Train V2 TorchTrainer; the model lands in
    cfg.output. Returns the last metrics line. In memory mode ``train.x`` becomes the object
    store's read-only copy, so the driver's node holds the split once; ``x_ref``: train.x is in
    the store already (SharedSplits), the workers take that object."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from galaxysae import cluster, embeddings

    cluster.connect()
    nodes = cluster.alive_nodes()
    cfg = plan_workers(cfg, nodes)
    nodes = require_resources(cfg.num_workers, cfg.cpus_per_worker, gpu_share(cfg), "train", nodes)
    d_in = train.x.shape[1]
    per_worker = len(train) // cfg.num_workers
    # batch_size is the global batch, as in a one-process run: each worker takes its share
    bs = max(1, cfg.batch_size // cfg.num_workers)
    if cfg.batch_size % cfg.num_workers:
        log.warning("batch_size %d does not divide over %d workers: %d samples per step (%d each)",
                    cfg.batch_size, cfg.num_workers, bs * cfg.num_workers, bs)
    bs = min(bs, max(1, per_worker))
    per_epoch = _steps_per_epoch(per_worker, bs)
    log.info("Ray Train: %d worker(s) x {CPU %d%s}, %d samples per step (%d per worker), %d steps "
             "per epoch", cfg.num_workers, cfg.cpus_per_worker,
             f", GPU {cfg.gpus_per_worker:g}" if cfg.use_gpu else "",
             bs * cfg.num_workers, bs, per_epoch)
    total = per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, per_epoch * cfg.epochs)
    datasets = {}
    workers = worker_bundles(cfg.num_workers, cfg.cpus_per_worker, gpu_share(cfg))
    if cfg.data_loading == "stream" and embeddings.is_npy(cfg.embeddings):
        log.info("%s is a .npy file: the workers take it from memory (data_loading = memory)",
                 cfg.embeddings)
        cfg = config.from_dict(Config, {**config.to_dict(cfg), "data_loading": "memory"})
    elif cfg.data_loading == "stream" and not cluster.fits(workers + [{"CPU": 1.0}], nodes):
        # Ray Data's read tasks need a CPU of their own: streaming would wait for ever
        log.info("the Train workers take every CPU of the cluster, none is left to stream the "
                 "parquet: the workers take the split from memory (data_loading = memory)")
        cfg = config.from_dict(Config, {**config.to_dict(cfg), "data_loading": "memory"})
    elif cfg.data_loading == "stream":
        datasets["train"] = embeddings.ray_dataset(cfg.embeddings, cfg.train_split, d_in, seed=cfg.seed)
    # rank 0 writes the output and every worker resumes from it; Ray Data's read tasks read the
    # embeddings on any node, while in memory mode the split travels through the object store
    reads = {"embeddings": cfg.embeddings} if cfg.data_loading == "stream" else {}
    cluster.require_shared(reads, {"output": cfg.output}, "train")
    loop_cfg = {"cfg": config.to_dict(cfg), "d_in": d_in, "init": init, "batch_size": bs,
                "steps_per_epoch": per_epoch, "total_steps": total, "train_x": None}
    if cfg.data_loading == "memory":
        if x_ref is None:
            x_ref = ray.put(train.x)
            train.x = ray.get(x_ref)  # zero-copy: the driver's own copy can go
        loop_cfg["train_x"] = x_ref
    fs, path = storage.arrow_fs(storage.join(cfg.output, "ray"))
    name = cfg.run_name or re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.output.rstrip("/").split("/")[-1]) or "train"
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={k: v for k, v in workers[0].items() if v}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=path, storage_filesystem=fs, callbacks=callbacks or None,
            failure_config=ray.train.FailureConfig(max_failures=2)),
        datasets=datasets or None,
    )
    trainer.fit()
    last = json.loads(storage.read_bytes(storage.join(cfg.output, "train_state.json")))
    return {**last, "workers": cfg.num_workers, "cpus_per_worker": cfg.cpus_per_worker,
            "use_gpu": cfg.use_gpu, "gpus_per_worker": gpu_share(cfg), "batch_size": bs * cfg.num_workers,
            "data_loading": cfg.data_loading}


# ----------------------------------------------------------------------------- the job


def load_data(cfg: Config):
    """(train, test) Splits named by the config."""
    from galaxysae import embeddings

    return embeddings.load(cfg.embeddings, cfg.train_split, cfg.test_split, cfg.ids,
                           cfg.test_fraction, split_seed=cfg.split_seed,
                           test_path=cfg.test_embeddings, test_ids=cfg.test_ids)


class SharedSplits:
    """A (train, test) pair read once and kept in Ray's object store, for many runs on the same
    data (a sweep's trials): each run takes the train rows zero-copy from its node's store and
    hands the same object to its Train workers, so N trials read the embeddings once and a node
    holds one copy of them, not one per trial. Pickles small: the rows travel as an ObjectRef."""

    def __init__(self, train, test):
        import ray

        self.x_ref = ray.put(train.x)
        self.train = dataclasses.replace(train, x=None)  # ids and source; x from the store
        self.test = test  # the held-out rows go along (a tenth of the data, zero-copy as well)

    def get(self) -> tuple:
        """(train, test) Splits; train.x is the store's read-only array."""
        import ray

        return dataclasses.replace(self.train, x=ray.get(self.x_ref)), self.test


def use_ray(cfg: Config) -> bool:
    if cfg.mode == "auto":
        return bool(os.environ.get("RAY_ADDRESS")) or cfg.num_workers > 1 or cfg.use_gpu
    return cfg.mode == "ray"


def check_device(cfg: Config) -> None:
    """A one-process run on a CUDA device this machine lacks stops before anything is read or
    written, as a config error (the original Matryoshka TOML says device = "cuda"). Ray runs
    take their devices from the cluster (use_gpu), not from this machine."""
    if use_ray(cfg) or not cfg.device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise config.ConfigError(
            f"key 'device' is {cfg.device!r}, but torch sees no CUDA device on this machine: pass "
            "--device auto (the GPU when there is one, else the CPU) or --device cpu")
    index = cfg.device.partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise config.ConfigError(
            f"key 'device' is {cfg.device!r}, but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), numbered from 0 (CUDA_VISIBLE_DEVICES renumbers them): pass --device cuda")


def check_width(cfg: Config, d_in: int, source: str) -> None:
    if cfg.input_dim and cfg.input_dim != d_in:
        raise ValueError(f"input_dim (the config's [model] input_dim) is {cfg.input_dim}, but "
                         f"{source} has embeddings of width {d_in}")


# A run holds its output's claim ({output}/_claim.json, galaxysae.claim) from before its checks
# until its metrics.json: two runs on one output cannot both pass the checks and write (resume)
# one artifact. Stale after 2 min (a heartbeat every 30 s, from a thread of the driver process,
# which only waits while Ray Train workers train): a rerun on another host (a sweep trial
# restarted on another node, a new pod) waits at most that long for a crashed run's claim,
# not embed's 10 min; on the same host a dead holder's claim is taken over at once.
CLAIM_STALE_S = 120.0


def run(cfg: Config, callbacks=None, shared: SharedSplits | None = None) -> dict | int:
    """Train (or with eval_only, evaluate) one SAE; ``callbacks``: Ray Train callbacks (sweeps);
    ``shared``: the data already in the object store (a sweep's), instead of cfg's files.
    -> the metrics, or 4 when another run holds the output (logged, naming it; a sweep's trial,
    with ``shared``, raises the ClaimError instead)."""
    from galaxysae.claim import Claim, ClaimError, sigterm_unwinds

    cfg = config.absolute_paths(cfg, inputs=("embeddings", "ids", "test_embeddings", "test_ids"),
                                outputs=("output",))  # Ray Train workers run elsewhere
    check_device(cfg)
    storage.check_writable(cfg.output)  # wrong credentials / unreachable store: fail first
    claim = Claim(cfg.output, stale_s=CLAIM_STALE_S, job="train")
    try:
        claim.acquire()
    except ClaimError as exc:
        if shared is not None:
            raise
        log.error("%s", exc)
        return 4
    try:
        with sigterm_unwinds():  # scancel, a pod eviction: the claim is released
            return _run(cfg, callbacks, shared, claim)
    finally:
        claim.release()


def _check_claim(claim) -> None:
    lost = claim.check()
    if lost:
        raise RuntimeError(f"{claim.output}: this run lost its claim on the output ({lost}): "
                           "stopping before writing the artifact")


def _run(cfg: Config, callbacks, shared, claim) -> dict:
    """:func:`run` holding the output's claim: every check of what the output holds is made
    under it."""
    from galaxysae import embeddings, evaluation
    from galaxysae.sae import SparseAutoencoder

    metrics_url = storage.join(cfg.output, "metrics.json")
    # before the files are read (a sweep's trials: the files the sweep read into ``shared``):
    # files rewritten while this run reads them then differ on the next rerun
    stamps = input_fingerprint(cfg)
    train, test = shared.get() if shared is not None else load_data(cfg)
    check_width(cfg, train.x.shape[1], train.source)
    if cfg.eval_only:
        check_same_hold_out(cfg)
        check_eval_inputs(cfg, stamps)
        model = SparseAutoencoder.load(cfg.output)
        if model.d_in != train.x.shape[1]:
            raise ValueError(f"{train.source}: embeddings are {train.x.shape[1]}-d but the SAE in "
                             f"{cfg.output} expects {model.d_in}-d (embeddings of another encoder?)")
        metrics = evaluation.evaluate(model, test.x, train.x, cfg.eval_batch_size)
        old = _read_json(metrics_url)
        if old and "train" in old:
            metrics["train"] = old["train"]
        evaluation.write(metrics, model, cfg.output)
        return metrics
    finished = storage.exists(metrics_url) and storage.exists(storage.join(cfg.output, "sae.safetensors"))
    check_same_settings(cfg, finished)
    check_same_inputs(cfg, finished, stamps)
    if finished:
        log.info("%s already holds a trained SAE (metrics.json): nothing to do", cfg.output)
        remove_checkpoints(cfg.output)  # left by a run stopped after its metrics.json
        return _read_json(metrics_url)
    log.info("training on %d x %d embeddings from %s; test %d rows", len(train), train.x.shape[1],
             train.source, len(test))
    resuming = latest_checkpoint(cfg.output) is not None
    config.save(cfg, cfg.output)
    # the stamps go with the output before its first checkpoint; checkpoints of an earlier
    # version's run (no stamps: trained on files of unknown state) are resumed without them
    if not resuming or embeddings.recorded_changes(cfg.output, stamps) is not None:
        embeddings.record_fingerprint(cfg.output, stamps)
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    sample = train.x[rng.permutation(len(train))[:65536]]
    init = init_stats(cfg, sample)
    t0 = time.perf_counter()
    if use_ray(cfg):
        last = run_ray(cfg, train, init, callbacks, shared.x_ref if shared is not None else None)
        model = SparseAutoencoder.load(cfg.output)
    else:
        model, last = run_local(cfg, train.x, init)
        _check_claim(claim)
        model.save(cfg.output)
    wall = time.perf_counter() - t0
    metrics = evaluation.evaluate(model, test.x, train.x, cfg.eval_batch_size)
    metrics["train"] = {**last, "wall_s": wall, "mode": "ray" if use_ray(cfg) else "local",
                        "n_train": len(train), "n_test": len(test)}
    _check_claim(claim)
    evaluation.write(metrics, model, cfg.output)
    remove_checkpoints(cfg.output)
    log.info("test FVU %.4f (PCA with %d components: %.4f), L0 %.1f, dead %.3f -> %s",
             metrics["fvu"], metrics["pca"]["n_components"], metrics["pca"]["fvu"], metrics["l0"],
             metrics["dead_fraction"], cfg.output)
    return metrics


def _read_json(url: str) -> dict:
    if not storage.exists(url):
        return {}
    return json.loads(storage.read_bytes(url))
