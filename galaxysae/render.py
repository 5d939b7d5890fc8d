"""Job ``render``: for chosen features, a JPEG grid of the galaxies that excite them most.

Data flow::

    dictionary artifact + {embeddings}/{split}  --activations (Ray Data, cached)-->  top-N ids per feature
    dataset shards --image index (id_str -> shard, row; built once)--> Ray tasks, one per shard:
        read only the needed row groups, decode, make thumbnails (bad images recorded, not blanked)
    --> Ray tasks, one per chunk of features: compose grids
    --> {results}/{name}/grids/feature_NNNNN.jpg (atomic; a rerun skips finished grids)

``name`` is ``sae``, ``matryoshka_sae`` or ``pca`` by default (the original code's folders).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from galaxysae import config, decode, storage

log = logging.getLogger(__name__)

GAP, HEADER = 4, 34


@dataclass
class DictionaryInputs:
    """What render and compare both read: dictionaries, their embeddings and the dataset."""

    dictionaries: list[str] = field(default_factory=list, metadata={"help": "artifact dirs (SAE or PCA), local or s3://"})
    embeddings: str = field(default="", metadata={"help": "embed output (dir or s3:// prefix)"})
    dataset: str = field(default="", metadata={"help": "dataset with the images and votes (dir, s3:// or hf://datasets/...)"})
    dataset_config: str = field(default="default", metadata={"help": "dataset config (as embedded: default, tiny)"})
    split: str = field(default="test", metadata={"help": "split whose galaxies are ranked and correlated"})
    results: str = field(default="results", metadata={"help": "results root (local or s3://)"})
    names: list[str] = field(default_factory=list, metadata={"help": "results folder per dictionary (default: sae/matryoshka_sae/pca)"})
    batch_size: int = field(default=1024, metadata={"help": "embeddings per encode batch"})
    actors: int = field(default=1, metadata={"help": "encode actors (activations)"})
    cpus_per_actor: int = field(default=1, metadata={"help": "CPUs (torch threads) per encode actor"})
    overwrite: bool = field(default=False, metadata={"help": "recompute outputs that exist"})

    def validate(self) -> None:
        for key in ("embeddings", "dataset"):
            if not getattr(self, key):
                raise ValueError(f"key '{key}' is required")
        if not self.dictionaries:
            raise ValueError("key 'dictionaries' needs at least one artifact directory")
        if self.names and len(self.names) != len(self.dictionaries):
            raise ValueError(f"key 'names' has {len(self.names)} entries for {len(self.dictionaries)} dictionaries")


@dataclass
class Config(DictionaryInputs):
    """Grids of each feature's most exciting galaxies, for SAE features and principal components."""

    features: list[int] = field(default_factory=list, metadata={"help": "feature ids to render (overrides 'select')"})
    select: Literal["frequent", "aligned", "all", "first"] = field(default="frequent", metadata={"help": "which features: most frequent; aligned: each Galaxy Zoo answer's best feature (from compare's answers.json: run compare first), then the most frequent; all; or the first n_features (PCA: frequent = first)"})
    n_features: int = field(default=64, metadata={"help": "how many features 'frequent'/'aligned'/'first' pick"})
    top_n: int = field(default=30, metadata={"help": "galaxies per grid"})
    columns: int = field(default=6, metadata={"help": "galaxies per grid row"})
    tile: int = field(default=128, metadata={"help": "thumbnail size in pixels"})
    strict_jpeg: bool = field(default=True, metadata={"help": "a JPEG whose compressed data libjpeg finds damaged is an unreadable image (false: shown as PIL decodes it)"})
    features_per_task: int = field(default=16, metadata={"help": "grids composed by one Ray task"})

    def validate(self) -> None:
        super().validate()
        for key in ("n_features", "top_n", "columns", "tile", "features_per_task"):
            if getattr(self, key) < 1:
                raise ValueError(f"key '{key}' must be >= 1, got {getattr(self, key)}")


# ----------------------------------------------------------------------------- shared with compare


def folder_names(dicts, names: list[str] | None = None) -> list[str]:
    """Results folder per dictionary: the family name, made unique with the artifact's name.
    Two dictionaries that would share a folder (``sweepA/trials/t0`` and ``sweepB/trials/t0``)
    are refused: the second would overwrite the first's results."""
    if names:
        out = list(names)
    else:
        fams = [d.family for d in dicts]
        out = [f if fams.count(f) == 1 else f"{f}-{d.name}" for f, d in zip(fams, dicts)]
    clash = sorted({n for n in out if out.count(n) > 1})
    if clash:
        which = [d.url for d, n in zip(dicts, out) if n in clash]
        raise ValueError(f"dictionaries {which} would share the results folder(s) {clash}: "
                         "give each its own with key 'names'")
    return out


def provenance(embeddings: str, split: str) -> dict:
    """Encoder provenance the embed job wrote into the embeddings' parquet metadata."""
    import pyarrow.parquet as pq

    from galaxysae.activations import embedding_files

    fs, path = storage.arrow_fs(embedding_files(embeddings, split)[0])
    meta = pq.read_schema(path, filesystem=fs).metadata or {}
    keys = ("encoder", "encoder_revision", "encoder_stand_in", "image_size", "precision", "code_version")
    return {k: meta[k.encode()].decode("utf-8", "replace") for k in keys if k.encode() in meta}


def write_summary(d, folder_url: str, split: str, n_galaxies: int, embeddings: str) -> None:
    """``dictionary.json``: what the atlas needs to present a dictionary, beside its results."""
    doc = {"name": folder_url.rstrip("/").rsplit("/", 1)[-1], "url": d.url, "kind": d.kind,
           "family": d.family, "n_latents": d.n_latents, "d_in": d.d_in, "levels": d.levels,
           "split": split, "n_galaxies": n_galaxies, "cfg": d.cfg, "metrics": d.metrics,
           "embeddings": embeddings, "provenance": provenance(embeddings, split)}
    storage.write_bytes(storage.join(folder_url, "dictionary.json"), json.dumps(doc, indent=1).encode())
    # the artifact's own plots (PCA explained variance, SAE training curves) travel with it
    for url in storage.listdir(d.url, ".png"):
        storage.copy_if_newer(url, storage.join(folder_url, "plots", url.rstrip("/").rsplit("/", 1)[-1]))


# what identifies a set of activations (activations/{split}/_SUCCESS): a dictionary retrained in
# place or embeddings rewritten at the same URLs change the stamps of its weights and files
ACTIVATION_KEYS = ("dictionary", "embeddings", "split", "stamps")
FAILURES = "render_failures.json"  # images a grid of the folder could not show


def activations_identity(activations_url: str) -> dict | None:
    """The identity of the activations at ``activations_url`` (see ACTIVATION_KEYS), None when
    none were computed there. Render records it in ``grids/_rendered.json``, compare in
    ``compare.parquet``'s metadata and ``compare/summary.json``: the atlas (and select =
    'aligned') refuse results of activations that have been recomputed since."""
    url = storage.join(activations_url, "_SUCCESS")
    if not storage.exists(url):
        return None
    marker = json.loads(storage.read_bytes(url))
    return {k: marker.get(k) for k in ACTIVATION_KEYS}


def activations_change(old: dict, new: dict) -> str:
    """What differs between two activation identities, in words."""
    for key in ("dictionary", "embeddings", "split"):
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)!r}, now {new.get(key)!r}"
    return "the dictionary's weights or the embedding files were rewritten since"


def start_grids(folder: str, name: str, activations_url: str, chosen: list[int], cfg) -> None:
    """Before drawing: grids drawn from other inputs (activations of another dictionary or
    embeddings, another top_n, layout or decode) are removed, so a rerun redraws them instead of
    keeping pictures that no longer match the tables; then ``grids/_rendered.json`` records this
    run's inputs (a killed run's rerun, with the same inputs, keeps the grids it finished).
    ``render_failures.json`` goes with the grids it describes."""
    inputs = {"activations": activations_identity(activations_url),
              "top_n": cfg.top_n, "columns": cfg.columns, "tile": cfg.tile,
              "strict_jpeg": cfg.strict_jpeg}
    url = storage.join(folder, "grids", "_rendered.json")
    if storage.exists(url) and json.loads(storage.read_bytes(url)).get("inputs") != inputs:
        stale = storage.listdir(storage.join(folder, "grids"), ".jpg")
        log.info("%s: %d grids were drawn from other inputs: drawing them again", name, len(stale))
        for u in stale + [storage.join(folder, FAILURES)]:
            storage.remove(u)  # nothing to do where it is not there
    storage.write_bytes(url, json.dumps({"inputs": inputs, "features": chosen}, indent=1).encode())


def record_failures(folder: str, name: str, failures: dict[str, str], index, keep: bool) -> None:
    """``{folder}/render_failures.json``: every image that could not be decoded in the grids
    now in ``folder``: this run's ``failures`` (id -> reason) and, when ``keep`` (the grids
    drawn before stay), those recorded before; no file when there are none."""
    url = storage.join(folder, FAILURES)
    if keep and not failures:
        return  # the grids and their record stay as they were
    rows = {}
    if keep and storage.exists(url):
        rows = {r["id_str"]: r for r in json.loads(storage.read_bytes(url))}
    rows.update({i: {"id_str": i, "shard": index.locate(i)[0], "reason": r} for i, r in failures.items()})
    if rows:
        storage.write_bytes(url, json.dumps([rows[i] for i in sorted(rows)], indent=1).encode())
        log.warning("%s: %d images could not be decoded (listed in %s): %s", name, len(failures),
                    url, ", ".join(sorted(failures)[:5]))
    else:
        storage.remove(url)


def activations_for(d, folder_url: str, cfg) -> "object":
    from galaxysae import activations

    return activations.compute(
        d, cfg.embeddings, cfg.split, storage.join(folder_url, "activations", cfg.split),
        top_n=max(getattr(cfg, "top_n", 30), 30), batch_size=cfg.batch_size,
        actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor, overwrite=cfg.overwrite)


# ----------------------------------------------------------------------------- drawing


def grid_size(top_n: int, columns: int, tile: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of ``top_n`` thumbnails, ``columns`` per row."""
    rows = math.ceil(top_n / columns)
    return columns * tile + (columns + 1) * GAP, HEADER + rows * tile + (rows + 1) * GAP


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow built without FreeType
        return ImageFont.load_default()


def thumbnail(data: bytes, tile: int, strict_jpeg: bool = True) -> bytes:
    """Encoded image -> a ``tile`` x ``tile`` PNG (aspect kept, centred). Raises on a bad image
    (``strict_jpeg``: also on a JPEG whose compressed data is damaged, see decode.py)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        if strict_jpeg and img.format in decode.JPEG_FORMATS:  # PIL would grey damaged blocks
            decode.check_jpeg(data, img.mode)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGBA") if "A" in img.getbands() else img.convert("RGB")
        img = img.convert("RGB")
        img.thumbnail((tile, tile), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (tile, tile), (0, 0, 0))
        canvas.paste(img, ((tile - img.width) // 2, (tile - img.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def draw_grid(title: str, items: list[tuple[str, float]], thumbs: dict[str, bytes],
              failures: dict[str, str], top_n: int, columns: int, tile: int) -> bytes:
    """One grid JPEG: a title bar, then ``top_n`` slots (rank and activation on each thumbnail).
    JPEG at quality GRID_QUALITY: ~6x smaller than PNG on the demo's grids (96 KB, not 617 KB),
    so an atlas of thousands of grids stays shareable; the labels stay legible."""
    from PIL import Image, ImageDraw

    w, h = grid_size(top_n, columns, tile)
    img = Image.new("RGB", (w, h), (24, 26, 33))
    draw = ImageDraw.Draw(img)
    draw.text((GAP + 2, 8), title, fill=(235, 235, 240), font=_font(16))
    small = _font(max(10, tile // 11))
    for slot in range(top_n):
        r, c = divmod(slot, columns)
        x, y = GAP + c * (tile + GAP), HEADER + GAP + r * (tile + GAP)
        if slot >= len(items):
            draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline=(60, 62, 70))
            continue
        id_str, value = items[slot]
        if id_str in thumbs:
            with Image.open(io.BytesIO(thumbs[id_str])) as t:
                img.paste(t.convert("RGB"), (x, y))
        else:
            # never a silent blank: the slot says the image could not be read
            draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=(70, 20, 24))
            draw.text((x + 6, y + tile // 2 - 8), "unreadable image", fill=(255, 180, 180), font=small)
            draw.text((x + 6, y + tile // 2 + 6), failures.get(id_str, "")[:24], fill=(255, 180, 180), font=small)
        label = f"#{slot + 1}  {value:.3g}"
        box = draw.textbbox((x + 3, y + 2), label, font=small)
        draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=(0, 0, 0))
        draw.text((x + 3, y + 2), label, fill=(255, 214, 102), font=small)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=GRID_QUALITY)
    return buf.getvalue()


GRID_QUALITY = 85


def grid_url(folder_url: str, feature: int, low: bool = False) -> str:
    """A feature's grid; ``low``: a signed dictionary's other end (PCA: the lowest scores)."""
    return storage.join(folder_url, "grids", f"feature_{feature:05d}{'_low' if low else ''}.jpg")


def grid_jobs(d, folder: str, chosen: list[int], stats: list[dict], top_n: int) -> list[dict]:
    """The grids of the ``chosen`` features: their top galaxies, and for a signed dictionary
    (PCA, whose components run both ways) a second grid of the lowest scores, so a component is
    seen whole, as an SAE feature is."""
    jobs = []
    for f in chosen:
        row = stats[f]
        jobs.append({"feature": f, "url": grid_url(folder, f), "title": _title(d, f, row),
                     "items": list(zip(row["top_ids"][:top_n], row["top_values"][:top_n]))})
        low = list(zip((row.get("bottom_ids") or [])[:top_n], (row.get("bottom_values") or [])[:top_n]))
        if d.signed and low:
            jobs.append({"feature": f, "url": grid_url(folder, f, low=True),
                         "title": _title(d, f, row, low=low[0][1]), "items": low})
    return jobs


# ----------------------------------------------------------------------------- Ray tasks


def _thumbs_task(shard: str, rows: list[tuple[int, str]], tile: int, strict_jpeg: bool = True):
    """(thumbnails {id: png}, failures {id: reason}) for rows of one shard."""
    from galaxysae import cli
    from galaxysae.image_index import read_rows

    cli.setup_worker()
    raw = read_rows(shard, rows)
    thumbs, failures = {}, {}
    for id_str, data in raw.items():
        try:
            thumbs[id_str] = thumbnail(data, tile, strict_jpeg)
        except Exception as exc:  # noqa: BLE001 - any decoder error is a bad image, recorded
            failures[id_str] = f"{type(exc).__name__}: {exc}"[:200]
    return thumbs, failures


def _chunk_images(jobs: list[dict], thumbs: dict, failures: dict) -> tuple[dict, dict]:
    """The thumbnails and failures one grid task draws: its own galaxies' only. All of them
    (every chosen feature's top galaxies: 3.7 GB for 5,120 features x 30 at 128 px) would be
    unpickled by every task, a copy per task running at once."""
    ids = {i for j in jobs for i, _ in j["items"]}
    return ({i: thumbs[i] for i in ids if i in thumbs}, {i: failures[i] for i in ids if i in failures})


def _grids_task(jobs: list[dict], thumbs: dict, failures: dict, top_n: int, columns: int, tile: int) -> list[int]:
    from galaxysae import cli

    cli.setup_worker()
    done = []
    for job in jobs:
        png = draw_grid(job["title"], job["items"], thumbs, failures, top_n, columns, tile)
        storage.write_bytes(job["url"], png)
        done.append(job["feature"])
    return done


def aligned_features(results: str, name: str, activations_url: str | None = None) -> list[int]:
    """Each Galaxy Zoo answer's best feature of dictionary ``name`` from compare's answers.json,
    those above chance first: the features the atlas's "by answer" page links to. Before compare
    has run there are none (a warning says so; the most frequent features fill the grids), nor
    when compare ran on other activations than those at ``activations_url`` (the dictionary
    retrained, the embeddings rewritten, since): its feature ids would name other features."""
    url = storage.join(results, "compare", "answers.json")
    if not storage.exists(url):
        log.warning("select = 'aligned': %s does not exist yet, so %s gets the most frequent features; "
                    "run `galaxysae compare`, then render again to add the grids its answers link to",
                    url, name)
        return []
    summary_url = storage.join(results, "compare", "summary.json")
    current = activations_identity(activations_url) if activations_url else None
    theirs = (json.loads(storage.read_bytes(summary_url)).get(name) or {}).get("activations") \
        if current and storage.exists(summary_url) else None
    if theirs and theirs != current:  # an older compare recorded none: its answers are used
        log.warning("select = 'aligned': compare's answers for %s (%s) were computed from other "
                    "activations than the current ones (%s: %s), so %s gets the most frequent features; "
                    "run `galaxysae compare`, then render again to add the grids its answers link to",
                    name, url, activations_url, activations_change(theirs, current), name)
        return []
    rows = json.loads(storage.read_bytes(url)).get(name, [])
    rows = sorted(rows, key=lambda r: not r.get("above_null"))  # stable: answer order otherwise
    return list(dict.fromkeys(int(r["feature"]) for r in rows))


def select_features(stats, kind: str, cfg: Config, aligned: list[int] | None = None) -> list[int]:
    """The features to draw; ``aligned``: see :func:`aligned_features` (select = 'aligned')."""
    n = stats.num_rows
    if cfg.features:
        bad = [f for f in cfg.features if not 0 <= f < n]
        if bad:
            raise ValueError(f"key 'features': ids {bad} are outside 0..{n - 1}")
        return list(dict.fromkeys(int(f) for f in cfg.features))
    if cfg.select == "all":
        return list(range(n))
    if cfg.select == "first" or kind == "pca":
        # principal components are already ordered by explained variance
        order = list(range(n))
    else:
        freq = stats.column("frequency").to_numpy()
        order = [int(f) for f in np.argsort(-freq, kind="stable") if freq[f] > 0]
    if cfg.select == "aligned":
        order = [f for f in aligned or [] if 0 <= f < n] + order
    return list(dict.fromkeys(order))[: cfg.n_features]


def _title(d, f: int, row: dict, low: float | None = None) -> str:
    """A grid's header; ``low``: the lowest score, for a component's other-end grid."""
    if d.kind == "pca":
        end = f"its other end: the lowest scores, min {low:.3g}" if low is not None else f"max score {row['max']:.3g}"
        return f"{d.name} · principal component {f + 1} (feature {f}) · {end}"
    lvl = f" · level {row['level']}" if len(d.levels) > 1 else ""
    return f"{d.name} · feature {f}{lvl} · active in {row['frequency']:.1%} · max {row['max']:.3g}"


def run(cfg: Config) -> dict:
    import ray

    from galaxysae import cluster, dictionary, image_index

    t0 = time.time()
    # the grid tasks write from the cluster's workers, which run in directories of their own
    cfg = config.absolute_paths(cfg, inputs=("dictionaries", "embeddings", "dataset"),
                                outputs=("results",))
    storage.check_writable(cfg.results)  # wrong credentials / unreachable store: fail first
    cluster.connect()
    # thumbnail tasks read the dataset's shards, grid tasks write the results, on any node
    cluster.require_shared({"dataset": cfg.dataset}, {"results": cfg.results}, "render")
    dicts = [dictionary.load(u) for u in cfg.dictionaries]
    index = image_index.load_or_build(cfg.dataset, cfg.split,
                                      storage.join(cfg.results, "_image_index", f"{cfg.split}.parquet"),
                                      cfg.dataset_config)
    decode.warn_if_lenient(log, cfg.strict_jpeg)
    thumbs_remote = ray.remote(num_cpus=1)(_thumbs_task)
    grids_remote = ray.remote(num_cpus=1)(_grids_task)
    summary: dict = {}
    for d, name in zip(dicts, folder_names(dicts, cfg.names)):
        folder = storage.join(cfg.results, name)
        acts = activations_for(d, folder, cfg)
        write_summary(d, folder, cfg.split, acts.n_galaxies, cfg.embeddings)
        stats = acts.features.to_pylist()
        aligned = (aligned_features(cfg.results, name, acts.url)
                   if cfg.select == "aligned" and not cfg.features else None)
        chosen = select_features(acts.features, d.kind, cfg, aligned)
        start_grids(folder, name, acts.url, chosen, cfg)
        grids = grid_jobs(d, folder, chosen, stats, cfg.top_n)
        # one listing, not a request per grid (thousands on S3)
        present = set() if cfg.overwrite else set(storage.listdir(storage.join(folder, "grids"), ".jpg"))
        jobs = [j for j in grids if j["url"] not in present]
        needed = {i for j in jobs for i, _ in j["items"]}
        thumbs: dict[str, bytes] = {}
        failures: dict[str, str] = {}
        for t, fl in ray.get([thumbs_remote.remote(shard, rows, cfg.tile, cfg.strict_jpeg)
                              for shard, rows in index.by_shard(sorted(needed)).items()]):
            thumbs.update(t)
            failures.update(fl)
        record_failures(folder, name, failures, index, keep=not cfg.overwrite)
        chunks = [jobs[i:i + cfg.features_per_task] for i in range(0, len(jobs), cfg.features_per_task)]
        done = sum(ray.get([grids_remote.remote(c, *_chunk_images(c, thumbs, failures), cfg.top_n,
                                                cfg.columns, cfg.tile) for c in chunks]), [])
        summary[name] = {"rendered": len(done), "skipped": len(grids) - len(jobs), "features": chosen,
                         "failed_images": len(failures)}
        log.info("%s: %d grids rendered, %d already done -> %s/grids", name, len(done),
                 len(grids) - len(jobs), folder)
    config.save(cfg, cfg.results, "render.toml")
    log.info("render finished in %.1f s", time.time() - t0)
    return summary
