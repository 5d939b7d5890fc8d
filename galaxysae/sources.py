"""Where the galaxies come from: ``--dataset`` -> the parquet shards of each split.

Three kinds of source, one layout (the Hugging Face one of ``mwalmsley/gz_euclid``):

- ``hf://datasets/owner/name[@revision]``: the revision is pinned to its commit (one Hub call on
  the driver) and the shards are ``hf://datasets/owner/name@<commit>/...`` URLs that every read
  task streams from the Hub itself (``HfFileSystem``): nothing is downloaded onto the driver, and
  a run reads one commit even if the dataset changes meanwhile. With ``HF_HUB_OFFLINE`` set the
  shards come from the local Hugging Face cache instead (``snapshot_download``; on a cluster of
  several nodes that cache must be on a shared filesystem, or stage the dataset). ``HF_TOKEN``
  (or a ``hf auth login`` token) is read by huggingface_hub, never logged or written.
- a local directory in the same layout;
- an ``s3://`` prefix in the same layout (endpoint and keys from the standard AWS variables).

Shards are found from the dataset README's YAML ``configs:`` header when there is one, else by
the usual file patterns (``data/{split}-*.parquet`` for ``default``, ``{config}/{split}-*``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from galaxysae import storage
from galaxysae.encoder import STAGE_FILE, check_stage_complete

log = logging.getLogger(__name__)

__all__ = ["Shard", "SourceError", "resolve", "shards_at", "hf_repo", "hf_root", "hf_snapshot",
           "hf_offline", "hub_error", "dataset_revision", "staged_revision", "localize_encoder",
           "encoder_cache_dir"]


class SourceError(ValueError):
    """A dataset source cannot be resolved; the message names the source, config and split.

    Redacted as it is made: it quotes the dataset URL, whose ``user:password@`` would otherwise
    reach a traceback or a job's log."""

    def __init__(self, message: str = "") -> None:
        from galaxysae import config

        super().__init__(config.redact(str(message)))


@dataclass(frozen=True)
class Shard:
    split: str
    url: str   # local path or s3:// URL of the parquet file
    rel: str   # path relative to the dataset root, e.g. data/train-00000-of-00002.parquet
    out: str = ""  # the output file name where the file name is not unique in its split

    @property
    def name(self) -> str:
        """The shard's output file name: its file name, or its whole relative path with "/" as
        "__" where two shards of a split share a file name (a/0000.parquet, b/0000.parquet)."""
        return self.out or posixpath.basename(self.rel)


def hf_repo(dataset: str) -> tuple[str, str | None]:
    """``hf://datasets/owner/name[@rev]`` -> (``owner/name``, revision or None). A revision may hold
    slashes, plain or %2F-encoded (``@refs/convert/parquet``)."""
    from urllib.parse import unquote

    m = re.fullmatch(r"hf://datasets/([^/@]+/[^/@]+)(?:@([^@]+?))?/?", dataset)
    if not m:
        raise SourceError(f"dataset {dataset!r}: expected hf://datasets/OWNER/NAME[@REVISION]")
    return m.group(1), unquote(m.group(2)) if m.group(2) else None


def _front_matter(text: str) -> dict:
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml

    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _readme_patterns(readme: str, config: str) -> dict[str, list[str]] | None:
    """split -> glob patterns from the README's ``configs:`` header, or None when it has none."""
    configs = _front_matter(readme).get("configs")
    if not isinstance(configs, list):
        return None
    for entry in configs:
        if not isinstance(entry, dict) or entry.get("config_name", "default") != config:
            continue
        files = entry.get("data_files")
        out: dict[str, list[str]] = {}
        if isinstance(files, str):
            return {"train": [files]}
        if isinstance(files, dict):
            files = [{"split": k, "path": v} for k, v in files.items()]
        for item in files or []:
            if isinstance(item, str):  # data_files: [pattern, ...]: all of them the train split
                item = {"split": "train", "path": item}
            paths = item.get("path")
            out.setdefault(item.get("split", "train"), []).extend(
                [paths] if isinstance(paths, str) else list(paths or []))
        return out
    known = [e.get("config_name", "default") for e in configs if isinstance(e, dict)]
    raise SourceError(f"config {config!r} is not declared in the dataset README (configs: {known})")


def _default_patterns(config: str, split: str) -> list[str]:
    base = ["data"] if config == "default" else [config]
    if config == "default":
        base.append("")
    out = []
    for b in base:
        pre = f"{b}/" if b else ""
        out += [f"{pre}{split}-*.parquet", f"{pre}{split}/*.parquet"]
    return out


def _glob(root: str, patterns: list[str]) -> list[str]:
    """Relative paths under ``root`` matching any pattern (sorted, unique)."""
    fs, base = storage.fsspec_fs(root)
    found: set[str] = set()
    for pat in patterns:
        for hit in fs.glob(posixpath.join(base.rstrip("/"), pat)):
            rel = posixpath.relpath(hit, base.rstrip("/"))
            if rel.endswith(".parquet"):
                found.add(rel)
    return sorted(found)


def _shards_under(root: str, readme: str, config: str, splits: list[str], what: str) -> list[Shard]:
    declared = _readme_patterns(readme, config) if readme else None
    shards: list[Shard] = []
    for split in splits:
        if declared is not None:
            if split not in declared:
                raise SourceError(f"{what}: split {split!r} is not in config {config!r} "
                                  f"(splits: {sorted(declared)})")
            patterns = declared[split]
        else:
            patterns = _default_patterns(config, split)
        rels = _glob(root, patterns)
        if not rels:
            raise SourceError(f"{what}: no parquet shards for config {config!r}, split {split!r} "
                              f"(looked for {patterns})")
        _check_complete(rels, f"{what}, split {split!r}")
        names = collections.Counter(posixpath.basename(r) for r in rels)
        shards += [Shard(split, storage.join(root, rel), rel,
                         rel.replace("/", "__") if names[posixpath.basename(rel)] > 1 else "")
                   for rel in rels]
    return shards


def _check_complete(rels: list[str], what: str) -> None:
    """Shards named the Hub's way (``train-00003-of-00008.parquet``) must all be there: a copy or
    ``galaxysae stage`` that was interrupted would otherwise be embedded as a silent subset."""
    parts = [re.search(r"-(\d+)-of-(\d+)\.parquet$", posixpath.basename(r)) for r in rels]
    if not parts or not all(parts):
        return
    by_total: dict[int, set[int]] = {}
    for m in parts:
        by_total.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    for total, have in by_total.items():
        missing = sorted(set(range(total)) - have)
        if missing:
            shown = ", ".join(f"{i:05d}" for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise SourceError(f"{what}: {len(missing)} of {total} shards are missing ({shown}): an "
                              "interrupted copy or `galaxysae stage`? Rerun it (it skips what is "
                              "there)")


def _hf_allow_patterns(readme: str, config: str, splits: list[str]) -> list[str]:
    declared = _readme_patterns(readme, config) if readme else None
    pats = ["README.md"]
    for split in splits:
        pats += declared.get(split, []) if declared else _default_patterns(config, split)
    return pats


def hf_offline() -> bool:
    """huggingface_hub's own reading of ``HF_HUB_OFFLINE`` (taken when it is imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_error(what: str, exc: Exception) -> SourceError:
    """A Hub failure named with ``what`` ("dataset hf://...", "encoder hf_hub:..."), with the Hub's
    reason, token-free (huggingface_hub's messages carry no token; redacted anyway)."""
    from huggingface_hub import get_token

    from galaxysae import config

    detail = " ".join(str(exc).split())[:300]
    token = get_token()
    if token:
        detail = detail.replace(token, "***")
    return SourceError(f"{what}: cannot resolve from the Hugging Face Hub: "
                       f"{type(exc).__name__}: {config.redact(detail)}")


def hf_root(dataset: str) -> str:
    """``hf://datasets/owner/name[@rev]`` -> ``hf://datasets/owner/name@<commit sha>`` (online)."""
    from huggingface_hub import HfApi

    repo_id, revision = hf_repo(dataset)
    try:
        sha = HfApi().dataset_info(repo_id, revision=revision).sha
    except Exception as exc:  # noqa: BLE001 - re-raised with the dataset named
        raise hub_error(f"dataset {dataset}", exc) from None
    return f"hf://datasets/{repo_id}@{sha}"


def hf_snapshot(dataset: str, config: str, splits: list[str]) -> str:
    """Download (or find in the offline cache) the README and chosen shards; -> snapshot folder."""
    from huggingface_hub import snapshot_download

    repo_id, revision = hf_repo(dataset)
    try:
        head = snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                 allow_patterns=["README.md"])
        readme_path = Path(head) / "README.md"
        readme = readme_path.read_text() if readme_path.is_file() else ""
        # fnmatch-style patterns: huggingface_hub matches allow_patterns the same way
        allow = _hf_allow_patterns(readme, config, splits)
        return snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                 allow_patterns=allow)
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the dataset named, token-free
        err = hub_error(f"dataset {dataset}", exc)
        if hf_offline():
            err = SourceError(f"{err} (HF_HUB_OFFLINE is set: the dataset must be in the local "
                              "Hugging Face cache, complete)")
        raise err from None


def resolve(dataset: str, config: str = "default", splits: list[str] | tuple = ("train", "test")) -> list[Shard]:
    """``--dataset`` -> the shards of each split, in (split, file name) order."""
    splits = list(splits)
    if dataset.startswith("hf://") and hf_offline():
        root = hf_snapshot(dataset, config, splits)
        what = f"dataset {dataset} (offline cache {root})"
    elif dataset.startswith("hf://"):
        root = hf_root(dataset)
        what = f"dataset {dataset} (commit {root.rpartition('@')[2]})"
    elif dataset.startswith("s3://") or not storage.is_remote(dataset):
        root = dataset.rstrip("/") if storage.is_remote(dataset) else os.path.abspath(dataset)
        if not storage.exists(root):
            raise SourceError(f"dataset {dataset}: does not exist")
        what = f"dataset {dataset}"
    else:
        raise SourceError(f"dataset {dataset!r}: expected hf://datasets/OWNER/NAME, a local "
                          "directory or an s3:// prefix")
    return shards_at(root, what, config, splits)


def dataset_revision(shards: list[Shard]) -> str:
    """The Hub commit the shards come from: pinned in an hf:// URL, the offline cache's snapshot
    folder, or the manifest of a ``galaxysae stage`` copy (local or s3://); '' for a directory or
    prefix that is none of these. A stage that did not finish is refused here, before any work."""
    url = shards[0].url if shards else ""
    m = (re.match(r"hf://datasets/[^/]+/[^/@]+@([^/]+)/", url)
         or re.search(r"/snapshots/([0-9a-f]{40})/", url))  # the offline cache's layout
    if m:
        return m.group(1)
    return staged_revision(_dataset_root(shards[0])) if shards else ""


def _dataset_root(shard: Shard) -> str:
    """The dataset root a shard was found under: its URL less its relative path."""
    return shard.url[: -len(shard.rel)].rstrip("/") if shard.url.endswith("/" + shard.rel) else ""


def staged_revision(root: str) -> str:
    """The revision ``galaxysae stage`` recorded at ``root`` ('' when it was not staged)."""
    if not root:
        return ""
    url = storage.join(root, STAGE_FILE)
    if not storage.exists(url):
        return ""
    manifest = _manifest(storage.read_bytes(url), url)
    check_stage_complete(manifest, root)
    return str(manifest.get("revision") or "")


def _manifest(data: bytes, url: str) -> dict:
    """A stage manifest's contents; one that does not parse is refused, not read as unstaged."""
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise SourceError(f"{url}: not a readable stage manifest ({exc}): rerun galaxysae stage") from None
    return manifest if isinstance(manifest, dict) else {}


def shards_at(root: str, what: str, config: str, splits: list[str]) -> list[Shard]:
    """The shards under a dataset root (local, s3:// or hf://...@commit) per its README."""
    readme_url = storage.join(root, "README.md")
    readme = storage.read_bytes(readme_url).decode("utf-8", "replace") if storage.exists(readme_url) else ""
    return _shards_under(root, readme, config, list(splits), what)


# ----------------------------------------------------------------------------- staged encoders


def encoder_cache_dir(cache: str | None = None) -> Path:
    if cache:
        return Path(cache) / "encoders"
    base = os.environ.get("GALAXYSAE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "galaxysae")
    return Path(base) / "encoders"


def localize_encoder(name: str, cache: str | None = None) -> str:
    """``local-dir:s3://bucket/prefix`` (an encoder staged on S3) -> ``local-dir:`` a local copy.

    The copy is made once per machine (a temp folder renamed into place, so a crash never leaves a
    half copy that a later run would trust). Other names are returned unchanged.
    """
    url = name[len("local-dir:"):] if name.startswith("local-dir:") else name
    if not url.startswith("s3://"):
        return name
    # keyed on what the stage recorded (revision, each file's blob id) too: a node that fetched
    # an earlier stage to this prefix does not keep using those weights
    stage_url = storage.join(url, STAGE_FILE)
    stamp = storage.read_bytes(stage_url) if storage.exists(stage_url) else b""
    if stamp:
        check_stage_complete(_manifest(stamp, stage_url), url)  # before fetching a mix of revisions
    target = encoder_cache_dir(cache) / hashlib.sha256(url.encode() + b"\0" + stamp).hexdigest()[:16]
    if (target / "config.json").is_file():
        return f"local-dir:{target}"
    fs, path = storage.fsspec_fs(url)
    files = [f for f in fs.find(path) if not posixpath.basename(f).startswith(".")]
    if not any(posixpath.basename(f) == "config.json" for f in files):
        raise SourceError(f"encoder {url}: no config.json under that prefix (stage it with "
                          "`galaxysae stage`)")
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for f in files:
            rel = posixpath.relpath(f, path.rstrip("/"))
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(tmp / rel))
        try:
            tmp.rename(target)
        except OSError:  # another worker on this machine won the race: use its copy
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched encoder %s to %s", url, target)
    return f"local-dir:{target}"
