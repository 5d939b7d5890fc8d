# Data flow of `galaxysae embed`:
#
#   sources.resolve(--dataset)  -> parquet shards per split (hf:// at a pinned commit, local, s3://)
#   scan (driver)               -> id_str of every pending shard: row counts, duplicate check
#   ray.data.read_parquet       -> id_str, image, path            (CPU tasks, in parallel)
#   decode.decode_batch         -> pixels [N,3,S,S] uint8 (float32 for >8-bit images), reason
#   encoder.EncodeBatch         -> embedding [N,D]                (actor pool, model loaded once)
#   shard_writer (driver)      -> {output}/{split}/{shard}.parquet + {output}/_failures/...,
#                                  each written atomically once every row of its shard is back
#
# A shard's output file is its completion marker: a rerun skips shards whose file exists (made
# from the same input shard, else it stops), and a run killed at any moment leaves only whole
# files, so a rerun ends with the same row set. Files of the run's splits that are no output of
# its shards stop it too (--overwrite removes them).
"""`galaxysae embed`: Zoobot embeddings of every galaxy, streamed with Ray Data."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from galaxysae import allocator, config, sources, storage
from galaxysae.shard_writer import ShardWriter, scan_shards

log = logging.getLogger("galaxysae.embed")


@dataclass
class Config:
    """Embed every galaxy image of a dataset with a Zoobot-style encoder (Ray Data)."""

    dataset: str = field(default="hf://datasets/mwalmsley/gz_euclid", metadata={
        "help": "hf://datasets/OWNER/NAME[@REV], a local directory or an s3:// prefix (HF layout)"})
    dataset_config: str = field(default="default", metadata={"help": "dataset config (default, tiny)"})
    splits: list[str] = field(default_factory=lambda: ["train", "test"],
                              metadata={"help": "splits to embed"})
    output: str = field(default="embeddings", metadata={"help": "output directory or s3:// prefix"})
    encoder: str = field(default="hf_hub:mwalmsley/zoobot-encoder-euclid", metadata={
        "help": "timm name, hf_hub:OWNER/NAME or local-dir:PATH (PATH may be an s3:// prefix)"})
    encoder_cache: str = field(default="", metadata={
        "help": "local folder for encoders fetched from s3:// (default $GALAXYSAE_CACHE or "
                "~/.cache/galaxysae)"})
    pretrained: bool = field(default=True, metadata={
        "help": "load trained weights (false: seeded random init, flagged as a stand-in)"})
    image_size: int = field(default=224, metadata={"help": "pixels per side fed to the encoder"})
    image_column: str = field(default="image", metadata={"help": "column holding the image"})
    strict_jpeg: bool = field(default=True, metadata={
        "help": "record a JPEG whose compressed data libjpeg finds damaged as a failure (false: "
                "embed it as PIL decodes it, lost blocks grey)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto: cuda when the cluster has GPUs"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "auto: bf16 autocast on CUDA, fp32 on CPU"})
    batch_size: int = field(default=0, metadata={"help": "images per encoder batch (0: auto)"})
    num_encoders: int = field(default=0, metadata={"help": "encoder actors (0: one per GPU, else 1)"})
    encoder_cpus: float = field(default=0.0, metadata={
        "help": "CPUs reserved per encoder actor (0: auto)"})
    encoder_threads: int = field(default=0, metadata={
        "help": "torch threads per encoder actor (0: auto, see embed.plan)"})
    decode_cpus: float = field(default=0.0, metadata={"help": "CPUs per decode task (0: auto)"})
    object_store_mib: int = field(default=0, metadata={
        "help": "object store budget of the pipeline, MiB (0: auto, 256 per encoder on CPU, "
                "2048 per GPU encoder, more for large images): decoded images wait here, so it "
                "bounds memory; under ~12 decoded batches the encoders starve (a warning says so)"})
    read_unit_bytes: int = field(default=1 << 20, metadata={
        "help": "compressed parquet bytes per read task (smaller: finer streaming, more tasks)"})
    decode_tasks: int = field(default=0, metadata={
        "help": "most read+decode tasks at once: bounds decoded images held in memory (0: auto)"})
    max_failure_fraction: float = field(default=0.01, metadata={
        "help": "exit non-zero when more than this fraction of images fails to decode"})
    overwrite: bool = field(default=False, metadata={"help": "redo shards whose output exists"})
    progress_interval_s: float = field(default=30.0, metadata={
        "help": "seconds between progress lines in the log"})
    claim_stale_s: float = field(default=600.0, metadata={
        "help": "a run writing the output holds {output}/_claim.json with a heartbeat; a second run "
                "exits 4 while it moves, and takes over once it is older than this (seconds)"})

    def validate(self) -> None:
        if not self.splits:
            raise ValueError("splits must name at least one split")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.read_unit_bytes < 1:
            raise ValueError(f"read_unit_bytes must be >= 1, got {self.read_unit_bytes}")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ValueError(f"max_failure_fraction must be in [0, 1], got {self.max_failure_fraction}")
        if self.claim_stale_s <= 0:
            raise ValueError(f"claim_stale_s must be > 0, got {self.claim_stale_s}")
        for key in ("batch_size", "num_encoders", "encoder_cpus", "encoder_threads", "decode_cpus",
                    "decode_tasks", "object_store_mib"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0 = auto), got {getattr(self, key)}")


# decoded 8-bit batches the object store budget must hold: Ray Data shares it among the
# operators, and the encoder starves below ~12 (measured at 224 px, batch 32: 64 MiB, 14
# batches, ran at full speed; 32 MiB at 3/4; 16 MiB at a tenth)
MIN_BUDGET_BATCHES = 12


def _batch_bytes(cfg: Config) -> int:
    """Bytes of one encoder batch of decoded 8-bit images."""
    return cfg.batch_size * 3 * cfg.image_size ** 2


def plan(cfg: Config, nodes: list[dict], rows: int = 0) -> Config:
    """Fill the auto (0) settings from the resources of the cluster's alive nodes, for a run
    that embeds ``rows`` images (0: not known): auto encoders are never more than its batches.

    GPU: one encoder actor per GPU with 2 CPUs of host work each (fewer where that would leave
    a GPU node no CPU of its own), 128-image batches, every other CPU decoding. CPU only: one
    actor on each node with room for it, reserving all but one CPU (Ray Data's file-listing
    tasks need one whole CPU: reserving them all would deadlock; on a 1-CPU node the actor
    reserves none), with torch threads for every CPU of the node, because decoding costs a few
    percent of a forward pass and a core left to it would idle; decode tasks take a quarter CPU
    so several fit in the spare one. (Measured on 2 cores: two actors of one thread each embed
    5-8% more images/s once up, because torch's threads meet at a barrier after every operator
    and a decode task holding one core idles a lone actor's other thread; but they start 3 s
    later and hold 1.3 GB more memory. ``num_encoders = 2`` asks for them.)
    """
    cpus = [float(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) > 0] or [1.0]
    gpus = sum(float(n.get("GPU", 0)) for n in nodes)
    device = cfg.device
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    c = dataclasses.replace(cfg, device=device)
    c.batch_size = c.batch_size or (128 if device == "cuda" else 32)
    # an actor with no batch to embed would only load the encoder (seconds of CPU)
    batches = max(1, math.ceil(rows / c.batch_size)) if rows else math.inf
    # auto budgets hold at least twice the least that works (large images)
    least_mib = math.ceil(2 * MIN_BUDGET_BATCHES * _batch_bytes(c) / 2**20)
    if device == "cuda":
        c.num_encoders = c.num_encoders or max(1, min(int(gpus), batches))
        # two CPUs of host work per GPU actor, or fewer where a GPU node would have none left for
        # Ray Data's listing and decode tasks
        shares = [(float(n.get("CPU", 0)) - 1.0) / float(n["GPU"])
                  for n in nodes if n.get("GPU", 0) >= 1]
        c.encoder_cpus = c.encoder_cpus or max(0.0, min([2.0, *shares]))
        c.decode_cpus = c.decode_cpus or 1.0
        c.precision = "bf16" if c.precision == "auto" else c.precision
        c.encoder_threads = c.encoder_threads or max(1, math.ceil(c.encoder_cpus))
        spare = sum(cpus) - c.num_encoders * c.encoder_cpus
        c.decode_tasks = c.decode_tasks or max(2, int(spare // c.decode_cpus))
        c.object_store_mib = c.object_store_mib or max(2048, least_mib) * c.num_encoders
    else:
        node = max(cpus)
        per_node = max(1, c.num_encoders // len(cpus)) if c.num_encoders else 1
        c.decode_cpus = c.decode_cpus or (0.25 if node <= 8 else 1.0)
        # A 1-CPU node runs its encoder unreserved (0 CPUs), so the listing still gets its CPU.
        c.encoder_cpus = c.encoder_cpus or ((node - 1.0) / per_node if node >= 2 else 0.0)
        # one encoder per node that can hold one: all of them on the usual uniform cluster
        room = c.encoder_cpus + c.decode_cpus
        c.num_encoders = c.num_encoders or max(1, min(batches, sum(x >= room for x in cpus)))
        c.precision = "fp32" if c.precision == "auto" else c.precision
        c.encoder_threads = c.encoder_threads or max(1, math.ceil(node / per_node))
        # Decoding is ~20x cheaper than encoding on a CPU: two tasks per encoder keep it fed,
        # and more would only pile decoded images up in memory.
        c.decode_tasks = c.decode_tasks or 2 * c.num_encoders
        # ~1,700 decoded 224 px images per encoder: tens of seconds of work for a CPU encoder,
        # so a deeper queue would only add memory.
        c.object_store_mib = c.object_store_mib or max(256, least_mib) * c.num_encoders
    return c


def budget_warning(cfg: Config) -> str:
    """A warning when the planned object store budget is too small for the pipeline, else ""."""
    batch_mib = _batch_bytes(cfg) / 2**20
    if cfg.object_store_mib >= MIN_BUDGET_BATCHES * batch_mib:
        return ""
    return (f"object_store_mib = {cfg.object_store_mib} holds {cfg.object_store_mib / batch_mib:.1f} "
            f"decoded batches of {cfg.batch_size} images at {cfg.image_size} px: Ray Data will "
            f"starve the encoders (give it at least {math.ceil(MIN_BUDGET_BATCHES * batch_mib)}, "
            f"or 0 for the default)")


def require_resources(cfg: Config, nodes: list[dict]) -> None:
    """The planned encoder actors and one decode task must fit the cluster's ``nodes``: Ray Data
    would wait for ever for an actor no node can hold (a GPU on a CPU-only cluster, more CPUs
    than a node has). Raises :class:`cluster.ResourceError` naming the keys."""
    from galaxysae import cluster

    gpu = 1.0 if cfg.device == "cuda" else 0.0
    bundles = [{"CPU": cfg.encoder_cpus, "GPU": gpu}] * cfg.num_encoders + [{"CPU": cfg.decode_cpus}]
    cluster.require(bundles, f"embed with device={cfg.device!r}, num_encoders={cfg.num_encoders}, "
                    f"encoder_cpus={cfg.encoder_cpus:g}, decode_cpus={cfg.decode_cpus:g}",
                    "Lower those keys (0 chooses them from the cluster).",
                    gpu_off="device = 'auto' to embed on the CPUs", nodes=nodes)


def _absolute(cfg: Config) -> Config:
    """Workers run in other directories: local paths must be absolute before they travel."""
    c = config.absolute_paths(cfg, inputs=("dataset", "encoder_cache"), outputs=("output",))
    if c.encoder.startswith("local-dir:") and not storage.is_remote(c.encoder[len("local-dir:"):]):
        c.encoder = "local-dir:" + os.path.abspath(c.encoder[len("local-dir:"):])
    return c


def build_dataset(cfg: Config, shards: list[sources.Shard], min_blocks: int = 1,
                  encoder_name: str = ""):
    """The Ray Data pipeline over the pending shards: read -> decode -> encode (the actors load
    ``encoder_name``, default ``cfg.encoder``)."""
    import ray.data

    from galaxysae import decode
    from galaxysae.encoder import EncodeBatch

    decode.warn_if_lenient(log, cfg.strict_jpeg)

    # Ray Data's parquet reader bin-packs row groups into read tasks of up to 128 MiB of
    # compressed bytes: for JPEGs that is thousands of images (30x more once decoded) in one
    # block, and small shards all land in one task, committed together at the very end.
    # Smaller read units keep memory flat and let shards finish one by one.
    os.environ["RAY_DATA_PARQUET_BIN_PACKING_BYTES"] = str(cfg.read_unit_bytes)
    fs, _ = storage.arrow_fs(shards[0].url)
    paths = [storage.arrow_fs(s.url)[1] for s in shards]
    # decode_tasks bounds read tasks too: each holds a block of images until it is decoded.
    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True, num_cpus=cfg.decode_cpus,
                               override_num_blocks=max(len(paths), min_blocks),
                               concurrency=cfg.decode_tasks or None)
    # Only the columns we need leave the files (gz_euclid has ~150 label columns).
    ds = ds.select_columns(["id_str", cfg.image_column, "path"])
    ds = ds.map_batches(decode.decode_batch, batch_size=cfg.batch_size, batch_format="pyarrow",
                        num_cpus=cfg.decode_cpus,
                        compute=ray.data.TaskPoolStrategy(size=cfg.decode_tasks or None),
                        fn_kwargs={"image_size": cfg.image_size, "image_column": cfg.image_column,
                                   "strict_jpeg": cfg.strict_jpeg})
    # On a CPU the encoder process reuses freed memory instead of page-faulting every batch's
    # activations in again (allocator.py: 15-35% more img/s here); on a GPU they live in
    # CUDA's allocator.
    remote_args = {}
    if cfg.device != "cuda":
        remote_args["runtime_env"] = {"env_vars": allocator.worker_env()}
    return ds.map_batches(
        EncodeBatch, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_encoders),
        num_cpus=cfg.encoder_cpus, num_gpus=1 if cfg.device == "cuda" else 0, **remote_args,
        fn_constructor_kwargs={
            "name": encoder_name or cfg.encoder, "pretrained": cfg.pretrained,
            "image_size": cfg.image_size,
            "device": cfg.device, "precision": cfg.precision,
            "threads": cfg.encoder_threads,
            "localize": functools.partial(sources.localize_encoder, cache=cfg.encoder_cache or None),
        })


def run(cfg: Config) -> int:
    """Embed, holding the output's claim (two runs on one output: the second exits 4)."""
    from galaxysae.claim import Claim, ClaimError, sigterm_unwinds

    cfg = _absolute(cfg)
    storage.check_writable(cfg.output)  # wrong credentials: a clear error before any work
    claim = Claim(cfg.output, stale_s=cfg.claim_stale_s)
    try:
        claim.acquire()
    except ClaimError as exc:
        log.error("%s", exc)
        return 4
    # SIGTERM unwinds like an exception, so the claim is released and the rerun starts at
    # once; written shards are whole files anyway.
    try:
        with sigterm_unwinds():
            return _run(cfg, claim)
    finally:
        claim.release()


def _run(cfg: Config, claim) -> int:
    from galaxysae import cluster, encoder

    shards = sources.resolve(cfg.dataset, cfg.dataset_config, cfg.splits)
    revision, _, stand_in = encoder.describe(
        sources.localize_encoder(cfg.encoder, cfg.encoder_cache or None), cfg.pretrained)
    if stand_in:
        log.warning("STAND-IN ENCODER %s: %s", cfg.encoder, stand_in)
    # Every actor loads the commit recorded in the output, not "main" looked up again on its own.
    pinned = cfg.encoder
    if (cfg.encoder.startswith("hf_hub:") and "@" not in cfg.encoder
            and re.fullmatch(r"[0-9a-f]{40}", revision)):
        pinned = f"{cfg.encoder}@{revision}"
    writer = ShardWriter(cfg.output, before_commit=claim.check, provenance={
        "encoder": cfg.encoder, "encoder_revision": revision, "encoder_stand_in": stand_in,
        "image_size": str(cfg.image_size), "strict_jpeg": str(cfg.strict_jpeg).lower(),
        "source": config.redact(cfg.dataset),
        "source_revision": sources.dataset_revision(shards),
    })
    # Files of these splits that no shard of this run writes (an earlier run on other input)
    # would be read beside its output: --overwrite removes them (below, once every check has
    # passed), otherwise they are an error before any work.
    strays = writer.strays(shards, cfg.splits)
    if strays and not cfg.overwrite:
        raise ValueError(
            f"{cfg.output} holds {len(strays)} files that are no output of the shards of "
            f"{config.redact(cfg.dataset)} (config {cfg.dataset_config!r}, splits "
            f"{', '.join(cfg.splits)}), left by a run on other input: {config.listed(strays, ', ')}. Train would read "
            f"them beside this run's. Rerun with --overwrite to remove them and redo every shard, "
            f"or write to another --output")
    pending = [s for s in shards if cfg.overwrite or not writer.done(s)]
    skipped = len(shards) - len(pending)
    # Every shard of a split is scanned (done ones too): a duplicate id_str anywhere in a split
    # is an error before any work starts, and a done shard's ids tell whether its output was
    # made from this very input shard.
    ids = scan_shards(shards, pending, required=(cfg.image_column,))
    writer.check_done([s for s in shards if s not in pending], ids)
    expected = {s: ids[s] for s in pending}
    log.info("%d shards (%d to embed, %d already done), %d rows to embed", len(shards),
             len(pending), skipped, sum(len(v) for v in expected.values()))

    cluster.connect()
    import ray

    nodes = cluster.alive_nodes()
    # read tasks open the dataset's shards and encoder actors load a local-dir encoder, on any node
    local_encoder = cfg.encoder[len("local-dir:"):] if cfg.encoder.startswith("local-dir:") else ""
    cluster.require_shared({"dataset": cfg.dataset, "encoder": local_encoder}, {}, "embed")
    cfg = plan(cfg, nodes, rows=sum(len(v) for v in expected.values()))
    require_resources(cfg, nodes)
    starved = budget_warning(cfg)
    if starved:
        log.warning("%s", starved)
    writer.provenance["precision"] = cfg.precision
    config.save(cfg, cfg.output)
    log.info("plan: device=%s precision=%s encoders=%d x (%.3g CPU, %d threads) batch=%d "
             "decode=%d tasks x %.3g CPU", cfg.device, cfg.precision, cfg.num_encoders,
             cfg.encoder_cpus, cfg.encoder_threads, cfg.batch_size, cfg.decode_tasks, cfg.decode_cpus)

    if strays:
        log.warning("--overwrite: removing %d files of an earlier run on other input from %s",
                    len(strays), cfg.output)
        writer.remove_strays(strays)

    todo = [s for s in pending if expected[s]]
    stats = writer.stats
    start = time.monotonic()
    if todo:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = sys.stderr.isatty()
        ctx.execution_options.preserve_order = False
        # Ray Data has every map task read its own /proc smaps once a second to estimate its
        # peak memory (a statistic): tens of ms of CPU and the GIL each time for the encoder.
        ctx.memory_usage_poll_interval_s = None
        # Without a budget Ray Data lets decoded images (30x their JPEG size) queue up to a
        # share of the whole object store in front of a slower encoder: memory would then grow
        # with the input instead of staying flat.
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=cfg.object_store_mib * 2**20)
        # Blocks of one encoder batch of 8-bit images: Ray Data's default (128 MiB) bundles
        # hundreds of decoded images, or every row of many small shards, into one block whose
        # rows all come back at once, so shards were committed in bursts (a killed job lost
        # them) and memory held several such blocks. An encoder task embeds one block: its
        # rows come back as soon as that batch is done (float pixels of deeper images make
        # blocks of a quarter batch, which Ray Data bundles back up to one batch).
        ctx.target_max_block_size = max(1 << 20, _batch_bytes(cfg))
        writer.expect(todo, expected)
        last = start
        ds = build_dataset(cfg, todo, min_blocks=int(ray.cluster_resources().get("CPU", 1)),
                           encoder_name=pinned)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            writer.add(batch)
            now = time.monotonic()
            if now - last >= cfg.progress_interval_s:
                last = now
                log.info("progress: %d/%d rows (%d failed), %d/%d shards written, %.1f img/s",
                         stats.rows_done, stats.rows_in, stats.failed, stats.shards_written,
                         len(pending), stats.rows_done / max(now - start, 1e-9))
        writer.finish()
    empty = [s for s in pending if not expected[s]]
    if empty and "width" not in writer.provenance:
        _, info = encoder.load(sources.localize_encoder(cfg.encoder, cfg.encoder_cache or None),
                               cfg.pretrained, cfg.image_size)
        writer.provenance["width"] = str(info.width)
    for s in empty:
        writer.commit_empty(s)
    end = time.monotonic()
    elapsed = end - start
    rate = stats.rows_done / elapsed if elapsed > 0 else 0.0
    # The rate once the workers are up (encoder loaded, first rows back): what a long run gets.
    startup = (stats.first_batch_at - start) if stats.first_batch_at else elapsed
    streamed = stats.rows_done - stats.first_batch_rows
    steady = rate
    if streamed > 0 and end > stats.first_batch_at:
        steady = streamed / (end - stats.first_batch_at)
    log.info("summary: rows in %d, embedded %d, failed %d, shards written %d, skipped shards %d "
             "(already done), %.1f s, %.1f img/s (%.1f img/s after %.1f s of start-up)",
             stats.rows_in, stats.embedded, stats.failed, stats.shards_written, skipped, elapsed,
             rate, steady, startup)
    if stand_in:
        log.warning("these embeddings come from a STAND-IN encoder (%s)", stand_in)
    # The threshold is on the whole output: a rerun that finds every shard done exits as the
    # run that wrote them did.
    failed = stats.failed + stats.done_failed
    total = stats.rows_in + stats.done_embedded + stats.done_failed
    if skipped:
        log.info("output: %d shards, %d rows embedded, %d failed (this run and earlier ones)",
                 len(shards), stats.embedded + stats.done_embedded, failed)
    fraction = failed / total if total else 0.0
    if fraction > cfg.max_failure_fraction:
        log.error("%d of %d images (%.2f%%) failed to decode, more than max_failure_fraction=%g; "
                  "see %s", failed, total, 100 * fraction, cfg.max_failure_fraction,
                  storage.join(cfg.output, "_failures"))
        return 3
    return 0
