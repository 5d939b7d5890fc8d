"""`galaxysae stage`: copy a Hub dataset and encoder to a shared folder or s3:// prefix.

Compute nodes without internet (common on HPC) then run ``embed`` from the staged copy::

    galaxysae stage --output s3://bucket/staged
    galaxysae embed --dataset s3://bucket/staged/gz_euclid \\
                    --encoder local-dir:s3://bucket/staged/zoobot-encoder-euclid ...

The dataset keeps its Hub layout (README.md with its configs header, ``data/...`` shards); the
encoder folder keeps timm's files. Each holds ``galaxysae_stage.json`` (source, revision, which
embed records as the dataset's and the encoder's provenance, and each file's Hub blob id). Each
file is written atomically (temp + rename on disk; S3 uploads appear only when complete) and a
file already there from the same blob is skipped, so a rerun after a crash finishes the copy and
a restage of a newer revision replaces every file that changed, even one of the same size, and
removes those the new revision does not have. Until a copy is complete its manifest names a
``pending_revision`` instead of a ``revision``, and embed refuses it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from galaxysae import config, sources, storage
from galaxysae.encoder import STAGE_FILE

log = logging.getLogger("galaxysae.stage")


@dataclass
class Config:
    """Stage a Hub dataset and encoder for offline compute nodes."""

    output: str = field(default="", metadata={"help": "shared folder or s3:// prefix (required)"})
    dataset: str = field(default="hf://datasets/mwalmsley/gz_euclid", metadata={
        "help": "hf://datasets/OWNER/NAME[@REV] to copy ('' to skip)"})
    dataset_config: str = field(default="default", metadata={"help": "dataset config to copy"})
    splits: list[str] = field(default_factory=lambda: ["train", "test"],
                              metadata={"help": "splits to copy"})
    encoder: str = field(default="hf_hub:mwalmsley/zoobot-encoder-euclid", metadata={
        "help": "hf_hub:OWNER/NAME[@REV] to copy ('' to skip)"})
    overwrite: bool = field(default=False, metadata={"help": "copy files even when already there"})

    def validate(self) -> None:
        if not self.output:
            raise ValueError("key 'output' is required (a shared folder or s3:// prefix)")
        if self.dataset and not self.dataset.startswith("hf://datasets/"):
            raise ValueError("key 'dataset' must be hf://datasets/OWNER/NAME, got "
                             f"{config.redact(self.dataset)!r}")
        if self.encoder and not self.encoder.startswith("hf_hub:"):
            raise ValueError(f"key 'encoder' must be hf_hub:OWNER/NAME, got {config.redact(self.encoder)!r}")


def _same_size(src: Path, dest: str) -> bool:
    fs, path = storage.fsspec_fs(dest)
    try:
        return fs.size(path) == src.stat().st_size
    except (FileNotFoundError, OSError):
        return False


def blob_id(src: Path) -> str:
    """A Hub cache file's content id: the name of the blob its snapshot link points to (the
    file's sha256 for LFS files, its git hash for others), else its size and mtime."""
    real = Path(os.path.realpath(src))
    if real.parent.name == "blobs":
        return real.name
    st = real.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def read_manifest(dest_root: str) -> dict:
    url = storage.join(dest_root, STAGE_FILE)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}


def is_staged(src: Path, dest: str, staged: str) -> bool:
    """Whether ``dest`` already holds ``src``: ``staged``, the blob id a previous stage recorded
    for it, is this file's, and the size matches (a size alone would pass a new revision's
    weights of the old ones' size)."""
    return staged == blob_id(src) and _same_size(src, dest)


def copy_file(src: Path, dest: str, overwrite: bool = False, staged: str = "") -> bool:
    """Copy one local file to a local path or s3:// URL atomically; False when skipped because
    the destination holds the same content (:func:`is_staged`)."""
    if not overwrite and is_staged(src, dest, staged):
        return False
    if storage.is_remote(dest):
        fs, path = storage.fsspec_fs(dest)
        fs.put_file(str(src), path)  # single PUT or a completed multipart upload
    else:
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return True


def stale_files(before: dict, files: dict[str, str], snapshot: Path, rels: list[str],
                dest_root: str) -> list[str]:
    """Files a previous stage left that are not this snapshot's: on a revision change (or after
    an interrupted stage, whose manifest names no revision), every listed file that is not in the
    new copy and not, blob for blob, in the new snapshot. Kept, they would sit under the new
    revision's name: a re-sharded dataset would be read as both sets of shards."""
    if before.get("revision") == snapshot.name:
        return []  # complete and of this revision: every listed file is this revision's
    if before.get("pending_revision") == snapshot.name:
        # a stage of this revision stopped part way: what it found stale and had not removed yet
        # (not every listed file missing here: another config's files of this revision stay)
        return sorted(rel for rel in before.get("stale", []) if rel in files)
    if before and "files" not in before:
        raise ValueError(
            f"{storage.join(dest_root, STAGE_FILE)} names revision {before.get('revision')!r} but "
            f"lists no files (an earlier galaxysae wrote it), so a restage of {snapshot.name} cannot "
            "tell which of its files are stale: stage to a new folder, or delete this one first")
    keep = set(rels)
    return sorted(rel for rel, blob in files.items() if rel not in keep
                  and not ((snapshot / rel).is_file() and blob_id(snapshot / rel) == blob))


def copy_tree(snapshot: Path, rels: list[str], dest_root: str, source: str, overwrite: bool) -> int:
    """Copy ``rels`` of a Hub snapshot under ``dest_root``, keeping ``galaxysae_stage.json`` (source,
    revision, each file's blob id) up to date after every file copied: what a restage compares (a
    new revision's weights can have the old ones' size; a crashed stage's rerun skips the files
    it finished) and what a node's local copy of an S3-staged encoder is keyed on. -> files copied.

    The manifest names a ``revision`` only once every file of it is in place. While files change
    it names ``pending_revision`` instead, which readers refuse: files are copied in sorted order,
    so a restage killed while uploading model.safetensors has the new config.json over the old
    weights, and an embed run must not record the new revision for them."""
    before = read_manifest(dest_root)
    files = dict(before.get("files", {}))
    if "files" not in before and before.get("revision") == snapshot.name:
        # staged by an earlier version from this very revision: the same size is the same file
        files = {rel: blob_id(snapshot / rel) for rel in rels if _same_size(snapshot / rel, storage.join(dest_root, rel))}

    def record(done: bool) -> None:
        info = {"source": source, "revision" if done else "pending_revision": snapshot.name,
                "files": dict(sorted(files.items()))}
        if not done:
            info["stale"] = [rel for rel in stale if rel in files]  # still to remove
        storage.write_bytes(storage.join(dest_root, STAGE_FILE), json.dumps(info, indent=2).encode())

    stale = stale_files(before, files, snapshot, rels, dest_root)
    todo = [rel for rel in rels if overwrite
            or not is_staged(snapshot / rel, storage.join(dest_root, rel), files.get(rel, ""))]
    if stale or todo:
        record(done=False)  # before the first change: a crash from here on leaves it pending
    if stale:
        log.warning("%s: removing %d file(s) of the revision staged before (%s), not in %s",
                    dest_root, len(stale), before.get("revision") or "an interrupted stage",
                    snapshot.name)
    for rel in stale:
        storage.remove(storage.join(dest_root, rel))
        del files[rel]
        record(done=False)
    for rel in todo:
        copy_file(snapshot / rel, storage.join(dest_root, rel), overwrite=True)
        files[rel] = blob_id(snapshot / rel)
        record(done=False)
    files.update({rel: blob_id(snapshot / rel) for rel in rels})
    record(done=True)
    return len(todo)


def stage_dataset(cfg: Config) -> str:
    repo_id, _ = sources.hf_repo(cfg.dataset)
    snapshot = Path(sources.hf_snapshot(cfg.dataset, cfg.dataset_config, cfg.splits))
    shards = sources.shards_at(str(snapshot), f"dataset {cfg.dataset} (snapshot {snapshot})",
                               cfg.dataset_config, cfg.splits)
    dest_root = storage.join(cfg.output, repo_id.split("/")[-1])
    rels = [s.rel for s in shards] + (["README.md"] if (snapshot / "README.md").is_file() else [])
    copied = copy_tree(snapshot, rels, dest_root, cfg.dataset, cfg.overwrite)
    log.info("dataset %s: %d files at %s (%d copied, %d already there)", cfg.dataset, len(rels),
             dest_root, copied, len(rels) - copied)
    return dest_root


def stage_encoder(cfg: Config) -> str:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = cfg.encoder[len("hf_hub:"):].partition("@")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision or None))
    except Exception as exc:  # noqa: BLE001 - named, token-free
        raise sources.hub_error(f"encoder {cfg.encoder}", exc) from None
    dest_root = storage.join(cfg.output, repo_id.split("/")[-1])
    files = sorted(p for p in snapshot.rglob("*") if p.is_file() and not p.name.startswith("."))
    rels = [f.relative_to(snapshot).as_posix() for f in files]
    copied = copy_tree(snapshot, rels, dest_root, f"hf_hub:{repo_id}", cfg.overwrite)
    cfg_json = json.loads((snapshot / "config.json").read_text()) if (snapshot / "config.json").is_file() else {}
    if cfg_json.get("galaxysae_stand_in"):
        log.warning("encoder %s is a STAND-IN (%s); staged as is", cfg.encoder, cfg_json["galaxysae_stand_in"])
    log.info("encoder %s@%s: %d files at %s (%d copied)", cfg.encoder, snapshot.name, len(files),
             dest_root, copied)
    return dest_root


def run(cfg: Config) -> dict:
    # run by `ray job submit`, a relative output would land in Ray's temporary copy of the
    # working dir, which Ray deletes: refused there; resolved against the cwd elsewhere
    cfg = config.absolute_paths(cfg, outputs=("output",))
    out: dict = {}
    if cfg.dataset:
        out["dataset"] = stage_dataset(cfg)
    if cfg.encoder:
        out["encoder"] = "local-dir:" + stage_encoder(cfg)
    config.save(cfg, cfg.output, name="stage_config.toml")
    args = []
    if "dataset" in out:
        args.append(f"--dataset {out['dataset']} --dataset-config {cfg.dataset_config}")
    if "encoder" in out:
        args.append(f"--encoder {out['encoder']}")
    log.info("staged; on the compute nodes run: galaxysae embed %s --output ...", " ".join(args))
    return out
