"""Connecting a job to Ray: an existing cluster when one is named, else a local one.

``RAY_ADDRESS`` (set by `ray job submit`, our Slurm scripts, KubeRay and the tests) names the
cluster; token auth (``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``) is read by Ray from the environment.
Without an address, a laptop or a `docker run` gets a private local Ray instance.
"""

from __future__ import annotations

import logging
import math
import os
import time

log = logging.getLogger(__name__)

WAIT_ENV = "GALAXYSAE_RESOURCE_WAIT_S"


class ResourceError(RuntimeError):
    """The cluster cannot place what a job asks for (a GPU it lacks, more CPUs than a node has)."""


class SharedPathError(RuntimeError):
    """A local path of the config is not the same place on every node of the cluster."""


def connect(address: str | None = None) -> None:
    """Initialise Ray once per process (a second call only re-applies the Ray Data settings)."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
        else:
            log.info("no RAY_ADDRESS: starting a local Ray instance")
            ray.init(include_dashboard=False)
    _limit_parquet_footer_readers(ray.cluster_resources().get("CPU", 1))


def _limit_parquet_footer_readers(cpus: float) -> None:
    """At most a few of Ray Data's footer-reading actors, for every ``read_parquet`` of the job.

    Ray Data lists parquet files through a pool of such actors, up to 32 by default, a process
    (~110 MB) each. Each keeps 128 reads in flight, so a few serve thousands of S3 shards, and on
    a small machine the pool costs more start-up CPU than the whole listing and makes a job's
    memory grow with its file count (render: 1.22x at 8x the files). One on clusters of up to 8
    CPUs, 4 above. The variable is read when read_parquet builds its indexer on the driver; an
    explicit setting wins.
    """
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1" if cpus <= 8 else "4")


def fits(bundles: list[dict], nodes: list[dict]) -> bool:
    """Whether every bundle ({"CPU": c, "GPU": g}) finds room on a node's total resources, each
    bundle on one node (first fit, largest bundles first). Totals, not what is free now: other
    work on the cluster ends, a missing GPU never appears."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        for node in free:
            if all(node.get(k, 0) + 1e-9 >= v for k, v in b.items() if v > 0):
                for k, v in b.items():
                    node[k] = node.get(k, 0) - v
                break
        else:
            return False
    return True


def describe_nodes(nodes: list[dict]) -> str:
    """"4 nodes: 3 x {CPU 16, GPU 1} + 1 x {CPU 2}" (or "no nodes")."""
    if not nodes:
        return "no nodes"
    return f"{len(nodes)} node{'s' if len(nodes) > 1 else ''}: " + _counted(nodes)


def alive_nodes() -> list[dict]:
    """The total resources of each alive node of the connected cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def require(bundles: list[dict], what: str, hint: str, gpu_off: str = "",
            nodes: list[dict] | None = None) -> list[dict]:
    """Fail now when the cluster cannot place ``bundles`` (Ray would wait for them for ever, or
    for minutes), naming ``what`` (the config keys behind the request), the cluster's nodes and
    what to change: ``hint``, or, when a GPU is asked of a cluster without any, how to get one
    or ``gpu_off`` (the setting that runs without). A cluster that adds nodes on demand may only
    grow into the request: with GALAXYSAE_RESOURCE_WAIT_S set, wait up to that long for them.
    ``nodes``: the caller's ``alive_nodes()``, if it has them. Returns the nodes that fit."""
    wait = float(os.environ.get(WAIT_ENV, "0") or 0)
    deadline = time.monotonic() + wait
    nodes = alive_nodes() if nodes is None else nodes
    said = -math.inf  # when the last waiting line was logged
    while not fits(bundles, nodes):
        now = time.monotonic()
        if now >= deadline:
            if any(b.get("GPU", 0) > 0 for b in bundles) and not any(n.get("GPU", 0) for n in nodes):
                hint = ("A GPU needs a cluster with GPUs (Slurm: --gpus or --gres=gpu:N; KubeRay: "
                        "the gpu worker group)" + (f", or {gpu_off}." if gpu_off else "."))
            waited = f" (after waiting {wait:g} s)" if wait else ""
            raise ResourceError(
                f"{what}: needs {_counted(bundles)}, which the Ray cluster ({describe_nodes(nodes)}) "
                f"cannot place{waited}. {hint} If the cluster adds nodes on demand, set {WAIT_ENV} "
                "to the seconds to wait for them.")
        if now - said >= 60:  # a line a minute while waiting
            said = now
            log.info("waiting up to %.0f s more for the cluster (%s) to fit %s (%s)", deadline - now,
                     describe_nodes(nodes), what, _counted(bundles))
        time.sleep(min(5.0, deadline - now))
        nodes = alive_nodes()
    return nodes


def _counted(bundles: list[dict]) -> str:
    """[{"CPU": 2, "GPU": 1}] * 2 + [{"CPU": 1}] -> "2 x {CPU 2, GPU 1} + 1 x {CPU 1}" (CPU and
    GPU only: a node's memory and custom resources are not asked for here)."""
    kinds = [tuple((k, b[k]) for k in ("CPU", "GPU") if b.get(k, 0) > 0) for b in bundles]
    counts = dict.fromkeys(kinds, 0)
    for kind in kinds:
        counts[kind] += 1
    return " + ".join(f"{n} x {{{', '.join(f'{k} {v:g}' for k, v in kind) or 'CPU 0'}}}"
                      for kind, n in counts.items())


def _fingerprint(path: str) -> tuple:
    """What the driver sees at an input path: a file and its size, or a folder and a few of its
    entries by name (a node then looks each up by its full path: a fresh lookup, where a listing
    may come from a network filesystem's attribute cache and lag behind)."""
    if os.path.isdir(path):
        return ("dir", tuple(sorted(os.listdir(path))[:3]))
    if os.path.isfile(path):
        return ("file", os.path.getsize(path))
    return ("missing",)


def _sees(path: str, seen: tuple) -> bool:
    """On a node: whether ``path`` shows what the driver saw (:func:`_fingerprint`)."""
    if seen[0] == "dir":
        return os.path.isdir(path) and all(os.path.exists(os.path.join(path, e)) for e in seen[1])
    if seen[0] == "file":
        return os.path.isfile(path) and os.path.getsize(path) == seen[1]
    return True


def _look(outputs: dict[str, tuple[str, str]], inputs: dict[str, tuple]) -> list[str]:
    """On one node: the keys whose path shows something else than on the driver."""
    wrong = []
    for key, (probe, token) in outputs.items():
        try:
            with open(probe) as f:
                if f.read() != token:
                    wrong.append(key)
        except OSError:
            wrong.append(key)
    return wrong + [key for key, (path, seen) in inputs.items() if not _sees(path, seen)]


def _node_name(node: dict) -> str:
    """``10.0.0.5 (node 1a2b3c4d)``: nodes may share an address (several on one host)."""
    return f"{node.get('NodeManagerAddress', '?')} (node {node.get('NodeID', '')[:8]})"


def require_shared(inputs: dict[str, str], outputs: dict[str, str], what: str,
                   timeout: float = 120.0) -> None:
    """Local paths (config key -> path; URLs and "" are skipped) that Ray tasks read (``inputs``)
    or write (``outputs``) must be the same place on every alive node, or a multi-node job
    writes its results where the driver never finds them (after hours of training) or reads
    nothing. The driver leaves a probe file in each output folder (created if missing) and
    fingerprints each input; a zero-CPU task on every node checks them. One node: nothing to
    check. Raises :class:`SharedPathError` naming the keys, the paths and the nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from galaxysae import storage

    def local(paths: dict[str, str]) -> dict[str, str]:  # absolute: the tasks run elsewhere
        return {k: os.path.abspath(storage.local_path(p))
                for k, p in paths.items() if p and not storage.is_remote(p)}

    inputs = {k: p for k, p in local(inputs).items() if os.path.exists(p)}  # else: loaders say so
    outputs = local(outputs)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or not (inputs or outputs):
        return
    token = os.urandom(16).hex()
    probes: dict[str, tuple[str, str]] = {}
    try:
        for key, path in outputs.items():
            os.makedirs(path, exist_ok=True)
            probes[key] = (os.path.join(path, f".galaxysae-probe-{token}"), token)
            with open(probes[key][0], "w") as f:
                f.write(token)
        seen = {key: (path, _fingerprint(path)) for key, path in inputs.items()}
        look = ray.remote(num_cpus=0)(_look)
        refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(probes, seen) for n in nodes]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for r in pending:
            ray.cancel(r, force=True)
        answers = {}
        for i, r in enumerate(refs):
            try:
                if r in ready:
                    answers[i] = ray.get(r)
            except ray.exceptions.RayError as exc:  # the node went away, its worker failed
                log.warning("%s: node %s could not run the shared-path check: %s", what,
                            _node_name(nodes[i]), str(exc).strip().splitlines()[-1][:200])
    finally:
        for probe, _ in probes.values():
            try:
                os.remove(probe)
            except OSError:
                pass
    if len(answers) < len(nodes):
        log.warning("%s: %d of %d nodes did not answer the shared-path check within %.0f s",
                    what, len(nodes) - len(answers), len(nodes), timeout)
    blind = {_node_name(nodes[i]): keys for i, keys in answers.items() if keys}
    if blind:
        keys = sorted({k for ks in blind.values() for k in ks})
        paths = ", ".join(f"{k} = {({**inputs, **outputs})[k]!r}" for k in keys)
        raise SharedPathError(
            f"{what}: {paths}: a local path that {len(blind)} of {len(nodes)} nodes of the Ray "
            f"cluster ({', '.join(sorted(blind))}) do not see as the driver does, so Ray tasks "
            "there would read or write elsewhere. Use s3:// URLs, or a filesystem that every "
            "node mounts at the same path.")
