"""The image encoder: any timm model with its classifier removed, as a pure torch module.

Names: a timm architecture (``convnext_nano``), a Hub repo (``hf_hub:mwalmsley/zoobot-encoder-euclid``)
or a local folder (``local-dir:/path/to/encoder`` holding timm's ``config.json`` and weights).
The output width is read from the model. A folder or repo whose ``config.json`` carries the
marker key ``galaxysae_stand_in`` is a stand-in for real weights: loading it warns loudly and the
marker travels into every output's provenance. No Ray and no storage code here.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["EncoderInfo", "StageIncomplete", "check_stage_complete", "describe", "load", "embed",
           "resolve_device", "resolve_precision", "EncodeBatch"]

STAND_IN_KEY = "galaxysae_stand_in"
STAGE_FILE = "galaxysae_stage.json"  # written by `galaxysae stage` beside a copied encoder


@dataclass
class EncoderInfo:
    """Provenance of a loaded encoder (recorded in every embeddings file)."""

    name: str
    revision: str
    width: int
    stand_in: str  # "" for real weights, else why they are not real

    def to_dict(self) -> dict:
        return asdict(self)


def _hub_snapshot(repo: str) -> tuple[Path | None, str]:
    """(snapshot folder, revision) of a Hub model repo; works offline from the cache."""
    from huggingface_hub import snapshot_download

    repo_id, _, revision = repo.partition("@")
    try:
        path = Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=["config.json", "*.md"]))
    except Exception as exc:  # noqa: BLE001 - timm will raise the real error when loading
        log.debug("could not resolve %s through huggingface_hub: %s", repo_id, type(exc).__name__)
        return None, revision or "unknown"
    return path, path.name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class StageIncomplete(RuntimeError):
    """A ``galaxysae stage`` copy was interrupted: its files are a mix of two revisions."""


def check_stage_complete(manifest: dict, url: str) -> None:
    """Refuse a staged copy whose manifest names a ``pending_revision``: the stage that wrote it
    stopped part way, so the files are neither the old revision nor the new one, and recording
    either as the provenance of embeddings made from them would be wrong."""
    if manifest.get("pending_revision"):
        raise StageIncomplete(
            f"stage of {url} is incomplete (revision {manifest['pending_revision']} was being "
            "copied when it stopped): rerun galaxysae stage")


# the files a local-dir: folder holds its weights in (timm reads one of them)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@functools.lru_cache(maxsize=8)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _content_revision(folder: Path) -> str:
    """The revision of a local-dir: folder that no stage wrote (no manifest): ``local-sha256:``
    and a hash of its weight files' contents, so weights replaced in place count as other
    weights when a rerun compares its shards' provenance (a folder copied elsewhere keeps its
    hash). Hashed once per process and file state (a few hundred MB at most: about a second)."""
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        return "local"
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return "local-sha256:" + _hash_files(stats)


def describe(name: str, pretrained: bool = True) -> tuple[str, dict, str]:
    """(revision, config.json contents, stand-in text) for an encoder name, before loading."""
    if name.startswith("hf_hub:"):
        folder, revision = _hub_snapshot(name[len("hf_hub:"):])
        cfg = _read_json(folder / "config.json") if folder else {}
    elif name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if not folder.is_dir():
            raise FileNotFoundError(f"encoder {name}: folder {folder} does not exist")
        cfg = _read_json(folder / "config.json")
        staged = _read_json(folder / STAGE_FILE)
        check_stage_complete(staged, str(folder))
        revision = staged.get("revision") or _content_revision(folder)
        if staged.get("source"):
            revision = f"{staged['source']}@{revision}"
    else:
        cfg, revision = {}, "timm-" + importlib.metadata.version("timm")  # no 2 s timm import
    stand_in = str(cfg.get(STAND_IN_KEY) or "")
    if not pretrained and not stand_in:
        stand_in = f"randomly initialised {name} (pretrained=false), NOT trained weights"
    return revision, cfg, stand_in


def load(name: str, pretrained: bool = True, image_size: int = 224,
         device: str = "cpu", seed: int = 0):
    """Load an encoder -> (model in eval mode on ``device``, :class:`EncoderInfo`).

    The model maps float images [B, 3, H, W] in [0, 1] to embeddings [B, width].
    ``pretrained=False`` gives a seeded random init (tests, benchmarks), flagged as a stand-in.
    """
    import timm
    import torch

    revision, _, stand_in = describe(name, pretrained)
    if not pretrained:
        torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as exc:
        from galaxysae.sources import hf_offline

        offline = hf_offline()
        hint = (" (HF_HUB_OFFLINE is set: stage the encoder with `galaxysae stage` or use "
                "local-dir:PATH)") if offline else ""
        raise RuntimeError(f"cannot load encoder {name!r}: {type(exc).__name__}: {exc}{hint}") from None
    model.eval().to(device)
    with torch.inference_mode():
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        width = int(model(probe).shape[-1])
    if stand_in:
        log.warning("ENCODER %s IS A STAND-IN: %s. Embeddings from it are not Zoobot's; "
                    "the flag is recorded in every output file.", name, stand_in)
    return model, EncoderInfo(name=name, revision=revision, width=width, stand_in=stand_in)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA device")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> bf16 on CUDA, fp32 on CPU (bf16 on CPU only when asked: it changes the numbers)."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


def embed(model, pixels, device: str = "cpu", precision: str = "fp32"):
    """One forward pass: [B, 3, S, S] float32 in [0, 1] or uint8 0-255 (numpy or tensor)
    -> float32 [B, D] numpy. uint8 is divided by 255 on the device (after the copy: 4x fewer
    bytes cross to a GPU)."""
    import torch

    x = torch.as_tensor(np.require(pixels, requirements="W"))  # object-store views are read-only
    cuda = device.startswith("cuda")
    if cuda:
        # From pinned host memory the copy runs by DMA at full bus speed (a pageable source is
        # staged through a bounce buffer first); the .cpu() at the end waits for the batch.
        x = x.pin_memory().to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        if precision == "bf16":
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
                out = model(x)
        else:
            out = model(x)
    return out.float().cpu().numpy()


class EncodeBatch:
    """Ray Data callable class: loads the encoder once per actor, then embeds batches.

    In: ``id_str``, ``path``, ``reason``, ``pixels`` [N, 3, S, S] uint8 or float32 (from
    ``decode.decode_batch``).
    Out: ``id_str``, ``path``, ``reason`` and ``embedding`` float32 [N, D]; rows whose decode
    failed are not encoded and keep NaN embeddings, dropped by the writer.
    """

    def __init__(self, name: str, pretrained: bool = True, image_size: int = 224,
                 device: str = "auto", precision: str = "auto", threads: int = 0,
                 localize: Optional[Callable[[str], str]] = None):
        import torch

        from galaxysae import cli

        cli.setup_worker()
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if localize is not None:
            name = localize(name)  # e.g. an s3://-staged encoder fetched to a local cache
        self.model, self.info = load(name, pretrained=pretrained, image_size=image_size,
                                     device=self.device)
        if self.device.startswith("cuda"):
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, batch: dict) -> dict:
        reason = batch["reason"]
        ok = np.asarray([r == "" for r in reason], dtype=bool)
        out = np.full((len(reason), self.info.width), np.nan, dtype=np.float32)
        if ok.any():
            pixels = batch["pixels"] if ok.all() else batch["pixels"][ok]
            out[ok] = embed(self.model, np.ascontiguousarray(pixels), self.device, self.precision)
        return {"id_str": batch["id_str"], "path": batch["path"], "reason": reason, "embedding": out}
