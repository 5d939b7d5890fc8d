"""Job ``hub``: an offline Hugging Face cache in which the real loading code runs unchanged.

It writes, under ``$HF_HOME/hub`` and in the Hub cache layout (``refs/main`` holding the
revision, ``snapshots/<rev>/...`` linking into ``blobs/``):

- ``models--mwalmsley--zoobot-encoder-euclid``: a timm ``convnext_nano`` with ``num_classes=0``
  (640-d pooled output), **randomly initialised** from ``seed``: a stand-in for the real Zoobot
  weights, which never come here. Its ``config.json`` carries the marker key
  ``galaxysae_stand_in``, its snapshot a README saying so, and building it logs a WARNING.
- ``datasets--mwalmsley--gz_euclid``: a copy of a local dataset folder (``galaxysae synth``).

With ``HF_HOME`` pointing there and ``HF_HUB_OFFLINE=1``, ``timm.create_model(
"hf_hub:mwalmsley/zoobot-encoder-euclid", pretrained=True)`` and ``huggingface_hub.
snapshot_download("mwalmsley/gz_euclid", repo_type="dataset")`` resolve without a network.

Revisions are content hashes, so rebuilding from the same inputs is a no-op. A repo already in
the cache that this job did not write (e.g. the real weights) is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from galaxysae.config import redact

log = logging.getLogger(__name__)

ENCODER_REPO = "mwalmsley/zoobot-encoder-euclid"
DATASET_REPO = "mwalmsley/gz_euclid"
STAND_IN_KEY = "galaxysae_stand_in"
STAND_IN_NOTE = "randomly initialised convnext_nano, NOT the real Zoobot weights"
_OWNER_FILE = ".galaxysae_stand_in.json"  # in the repo folder: marks what this job wrote
_DATASET_FILES = ("README.md", "data", "tiny")


@dataclass
class Config:
    """Build an offline Hugging Face cache: stand-in Zoobot encoder + a local gz_euclid copy."""

    dataset: str = field(default="", metadata={"help": "local dataset folder to publish as the Hub dataset (required)"})
    hf_home: str = field(default="", metadata={"help": "folder to populate, then use as HF_HOME (required)"})
    encoder_repo: str = field(default=ENCODER_REPO, metadata={"help": "model repo id of the stand-in encoder"})
    dataset_repo: str = field(default=DATASET_REPO, metadata={"help": "dataset repo id"})
    seed: int = field(default=0, metadata={"help": "seed of the random encoder weights"})

    def validate(self) -> None:
        if not self.dataset:
            raise ValueError("key 'dataset' is required (a local folder written by galaxysae synth)")
        if not self.hf_home:
            # No silent default to ~/.cache/huggingface: a stand-in does not belong in a real cache.
            raise ValueError("key 'hf_home' is required (a folder for the offline cache, then export HF_HOME=it)")
        if "://" in self.dataset:
            raise ValueError(f"key 'dataset' must be a local folder, got {redact(self.dataset)!r}")
        for key in ("encoder_repo", "dataset_repo"):
            value = getattr(self, key)
            if value.count("/") != 1 or not all(value.split("/")):
                raise ValueError(f"key '{key}' must look like 'owner/name', got {redact(value)!r}")


def repo_folder(hf_home: str | os.PathLike, repo_id: str, repo_type: str) -> Path:
    """``<hf_home>/hub/{models,datasets}--owner--name``: where huggingface_hub caches a repo."""
    return Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"


def _revision(files: dict[str, Path]) -> str:
    """A 40-hex revision from the snapshot's content (stable for the same files)."""
    h = hashlib.sha1()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0")
        with open(files[rel], "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_owned(repo: Path, repo_id: str, what: str) -> None:
    if (repo / "refs" / "main").exists() and not (repo / _OWNER_FILE).exists():
        raise ValueError(
            f"{repo} already holds a cached {repo_id} that galaxysae did not write (perhaps the real "
            f"{what}); refusing to replace it. Use another --hf-home."
        )


def _publish(repo: Path, files: dict[str, Path], repo_id: str, what: str) -> tuple[str, Path]:
    """Place ``files`` (snapshot-relative path -> source file) as a snapshot of ``repo``.

    -> (revision, snapshot folder). Atomic per snapshot: built under a temporary name, then
    renamed, and ``refs/main`` is replaced last, so a crash never leaves a half snapshot in use.
    """
    _check_owned(repo, repo_id, what)
    refs = repo / "refs" / "main"
    owner = repo / _OWNER_FILE
    rev = _revision(files)
    snap = repo / "snapshots" / rev
    if refs.exists() and refs.read_text() == rev and snap.is_dir():
        return rev, snap
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    owner.write_text(json.dumps({STAND_IN_KEY: what, "repo_id": repo_id}) + "\n")
    tmp = Path(tempfile.mkdtemp(prefix=f".{rev}.", dir=_mkdir(repo / "snapshots")))
    try:
        for rel, src in sorted(files.items()):
            blob = blobs / _sha256(src)
            if not blob.exists():
                part = blob.with_name(blob.name + ".incomplete")
                shutil.copyfile(src, part)
                os.replace(part, blob)
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:  # the Hub cache's own layout: snapshot entries are relative links into blobs/
                os.symlink(os.path.relpath(blob, snap / Path(rel).parent), dst)
            except OSError:  # filesystems without symlinks: huggingface_hub copes with plain files
                shutil.copyfile(blob, dst)
        if snap.exists():
            shutil.rmtree(snap)
        os.replace(tmp, snap)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    part = refs.with_name("main.incomplete")
    refs.parent.mkdir(parents=True, exist_ok=True)
    part.write_text(rev)  # no trailing newline: huggingface_hub reads the file verbatim
    os.replace(part, refs)
    return rev, snap


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _model_card(repo_id: str, seed: int) -> str:
    return (
        "---\nlibrary_name: timm\ntags:\n- galaxysae-stand-in\n---\n"
        f"# STAND-IN for {repo_id}: NOT the real Zoobot weights\n\n"
        f"A timm `convnext_nano` with `num_classes=0` (640-d pooled features), **randomly initialised** "
        f"(torch seed {seed}) by `galaxysae hub`, so the offline tests and the demo can run the real "
        "`hf_hub:` loading code without the network. Its embeddings carry no knowledge of galaxies.\n"
        f"`config.json` holds the marker key `{STAND_IN_KEY}`; galaxysae records it in every output.\n"
    )


def _write_encoder(folder: Path, repo_id: str, seed: int) -> None:
    """config.json + model.safetensors of a seeded random convnext_nano, as timm saves HF repos."""
    import timm
    import torch
    from timm.models import save_for_hf

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(seed)
        model = timm.create_model("convnext_nano", pretrained=False, num_classes=0)
    # The research code feeds 224 px images scaled to [0, 1] without ImageNet normalisation.
    data_config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0,
                   "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    # timm would otherwise copy the ImageNet checkpoint tag, which these weights are not.
    model_config = {"pretrained_cfg": {"tag": "galaxysae-stand-in-random-init"}}
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True, data_config=data_config)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[STAND_IN_KEY] = STAND_IN_NOTE
    cfg["galaxysae_seed"] = seed
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "README.md").write_text(_model_card(repo_id, seed))


def _dataset_files(dataset_dir: Path) -> dict[str, Path]:
    if not (dataset_dir / "README.md").is_file() or not (dataset_dir / "data").is_dir():
        raise ValueError(
            f"{dataset_dir}: not a dataset folder (needs README.md and data/); make one with "
            f"`galaxysae synth --out {dataset_dir}`"
        )
    files: dict[str, Path] = {}
    for top in _DATASET_FILES:
        path = dataset_dir / top
        if path.is_file():
            files[top] = path
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and not p.name.startswith("."):
                    files[p.relative_to(dataset_dir).as_posix()] = p
    if not any(rel.startswith("data/") and rel.endswith(".parquet") for rel in files):
        raise ValueError(f"{dataset_dir}/data holds no parquet shards")
    return files


def build_offline_cache(
    hf_home: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    encoder_repo: str = ENCODER_REPO,
    dataset_repo: str = DATASET_REPO,
    seed: int = 0,
) -> dict:
    """Populate ``hf_home`` with the stand-in encoder and a copy of ``dataset_dir``.

    -> {"hf_home", "hub_cache", "encoder_repo", "encoder_revision", "encoder_snapshot",
    "dataset_repo", "dataset_revision", "dataset_snapshot", "stand_in"} (paths as str).
    """
    hf_home = Path(hf_home).expanduser().resolve()
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    data_files = _dataset_files(dataset_dir)  # check the inputs before any work
    enc_repo = repo_folder(hf_home, encoder_repo, "model")
    ds_repo = repo_folder(hf_home, dataset_repo, "dataset")
    _check_owned(enc_repo, encoder_repo, "Zoobot encoder weights")
    _check_owned(ds_repo, dataset_repo, "gz_euclid dataset")
    with tempfile.TemporaryDirectory(prefix="galaxysae-hub-") as tmp:
        enc_dir = Path(tmp)
        _write_encoder(enc_dir, encoder_repo, seed)
        enc_files = {p.name: p for p in sorted(enc_dir.iterdir()) if p.is_file()}
        enc_rev, enc_snap = _publish(enc_repo, enc_files, encoder_repo, "Zoobot encoder weights")
    log.warning(
        "offline Hub: %s in %s is a STAND-IN (%s); embeddings made with it mean nothing about galaxies",
        encoder_repo, hf_home, STAND_IN_NOTE,
    )
    ds_rev, ds_snap = _publish(ds_repo, data_files, dataset_repo, "gz_euclid dataset")
    log.info("offline Hub: dataset %s@%s <- %s", dataset_repo, ds_rev[:10], dataset_dir)
    return {
        "hf_home": str(hf_home),
        "hub_cache": str(hf_home / "hub"),
        "encoder_repo": encoder_repo,
        "encoder_revision": enc_rev,
        "encoder_snapshot": str(enc_snap),
        "dataset_repo": dataset_repo,
        "dataset_revision": ds_rev,
        "dataset_snapshot": str(ds_snap),
        "stand_in": STAND_IN_NOTE,
    }


def run(cfg: Config) -> dict:
    info = build_offline_cache(cfg.hf_home, cfg.dataset, cfg.encoder_repo,
                               cfg.dataset_repo, cfg.seed)
    print(
        f"Offline Hub ready. To use it:\n  export HF_HOME={info['hf_home']} HF_HUB_OFFLINE=1\n"
        f"  encoder: hf_hub:{info['encoder_repo']} (STAND-IN: {STAND_IN_NOTE})\n"
        f"  dataset: {info['dataset_repo']} -> {info['dataset_snapshot']}"
    )
    return info


__all__ = ["Config", "run", "build_offline_cache", "repo_folder", "ENCODER_REPO",
           "DATASET_REPO", "STAND_IN_KEY", "STAND_IN_NOTE"]
