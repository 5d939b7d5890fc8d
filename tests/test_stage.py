"""`galaxysae stage`: from the offline Hub cache into the S3 server, then embed from the copy."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from galaxysae import config, embed, encoder, sources, stage, storage
from galaxysae.decode import decode_image
from tests.test_embed import SIZE, embeddings


def _copied(caplog) -> list[str]:
    """The dataset stage's "(N copied, M already there)" of each run caplog saw, then cleared."""
    out = [m.group(1) for r in caplog.records
           if (m := re.search(r"\((\d+ copied, \d+ already there)\)", r.getMessage()))]
    caplog.clear()
    return out


def test_stage_to_s3_then_embed_offline_from_the_copy(offline_hub, ray_cluster, s3_prefix, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="galaxysae.stage")
    out = stage.run(stage.Config(output=s3_prefix, dataset_config="tiny"))
    assert out == {"dataset": f"{s3_prefix}/gz_euclid",
                   "encoder": f"local-dir:{s3_prefix}/zoobot-encoder-euclid"}
    fs, path = storage.fsspec_fs(s3_prefix)
    staged = sorted(p[len(path) + 1:] for p in fs.find(path))
    assert "gz_euclid/README.md" in staged and "zoobot-encoder-euclid/config.json" in staged
    assert "gz_euclid/tiny/train-00000-of-00001.parquet" in staged
    assert not any(p.startswith("gz_euclid/data/") for p in staged)  # only the chosen config
    info = json.loads(storage.read_bytes(f"{s3_prefix}/zoobot-encoder-euclid/galaxysae_stage.json"))
    assert info["revision"] == offline_hub["encoder_revision"]
    assert _copied(caplog) == ["3 copied, 0 already there"]
    # a rerun copies nothing (same blobs) and still succeeds
    mtime = fs.info(f"{path}/gz_euclid/tiny/train-00000-of-00001.parquet")["LastModified"]
    stage.run(stage.Config(output=s3_prefix, dataset_config="tiny"))
    assert _copied(caplog) == ["0 copied, 3 already there"]
    assert fs.info(f"{path}/gz_euclid/tiny/train-00000-of-00001.parquet")["LastModified"] == mtime
    # a file staged from another blob (an earlier revision, even of the same size) is copied again
    manifest_url = f"{s3_prefix}/gz_euclid/galaxysae_stage.json"
    manifest = json.loads(storage.read_bytes(manifest_url))
    assert len(manifest["files"]["tiny/train-00000-of-00001.parquet"]) == 64  # the sha256 blob
    manifest["files"]["tiny/train-00000-of-00001.parquet"] = "an-earlier-blob"
    storage.write_bytes(manifest_url, json.dumps(manifest).encode())
    time.sleep(1.1)  # S3 LastModified counts whole seconds
    stage.run(stage.Config(output=s3_prefix, dataset_config="tiny"))
    assert _copied(caplog) == ["1 copied, 2 already there"]
    assert fs.info(f"{path}/gz_euclid/tiny/train-00000-of-00001.parquet")["LastModified"] > mtime
    again = json.loads(storage.read_bytes(manifest_url))["files"]
    assert len(again["tiny/train-00000-of-00001.parquet"]) == 64 and set(again) == set(manifest["files"])
    # a stage that died part way (README.md not copied yet): its rerun sends only what is missing
    shard_mtime = fs.info(f"{path}/gz_euclid/tiny/train-00000-of-00001.parquet")["LastModified"]
    fs.rm(f"{path}/gz_euclid/README.md")
    storage.write_bytes(manifest_url, json.dumps(
        {**manifest, "files": {k: v for k, v in again.items() if k != "README.md"}}).encode())
    stage.run(stage.Config(output=s3_prefix, dataset_config="tiny"))
    assert _copied(caplog) == ["1 copied, 2 already there"]  # README.md only
    assert fs.info(f"{path}/gz_euclid/tiny/train-00000-of-00001.parquet")["LastModified"] == shard_mtime
    assert storage.exists(f"{s3_prefix}/gz_euclid/README.md")

    # the staged copy carries the dataset's commit: embeddings made from it record it
    assert sources.dataset_revision(sources.resolve(out["dataset"], "tiny")) == offline_hub["dataset_revision"]
    emb_url = f"{s3_prefix}/emb"
    assert embed.run(embed.Config(
        dataset=out["dataset"], dataset_config="tiny", encoder=out["encoder"], output=emb_url,
        encoder_cache=str(tmp_path / "cache"), image_size=SIZE, batch_size=8,
        encoder_threads=2)) == 0
    got = embeddings(emb_url)
    snap = Path(offline_hub["dataset_snapshot"])
    rows = {}
    for split in ("train", "test"):
        for f in sorted((snap / "tiny").glob(f"{split}-*.parquet")):
            t = pq.read_table(f, columns=["id_str", "image"])
            rows.update(zip(t.column("id_str").to_pylist(), (r["bytes"] for r in t.column("image").to_pylist())))
    assert set(got) == set(rows)
    model, _ = encoder.load("hf_hub:" + offline_hub["encoder_repo"], image_size=SIZE)
    ids = sorted(rows)
    ref = encoder.embed(model, np.stack([decode_image(rows[i], SIZE) for i in ids]))
    assert float(np.abs(np.stack([got[i] for i in ids]) - ref).max()) <= 1e-4
    fs2, p2 = storage.arrow_fs(f"{emb_url}/train/train-00000-of-00001.parquet")
    meta = pq.read_schema(p2, filesystem=fs2).metadata
    assert meta[b"encoder_revision"].decode() == (
        f"hf_hub:{offline_hub['encoder_repo']}@{offline_hub['encoder_revision']}")
    assert b"NOT the real Zoobot weights" in meta[b"encoder_stand_in"]
    assert meta[b"source_revision"].decode() == offline_hub["dataset_revision"]
    # a node's local copy of the S3-staged encoder is keyed on what was staged: a restage of
    # another revision to the same prefix is fetched again, not served from the old copy
    cache = str(tmp_path / "cache")
    first = sources.localize_encoder(out["encoder"], cache)
    assert sources.localize_encoder(out["encoder"], cache) == first
    enc_manifest = f"{s3_prefix}/zoobot-encoder-euclid/galaxysae_stage.json"
    storage.write_bytes(enc_manifest, json.dumps({**info, "revision": "0" * 40}).encode())
    assert sources.localize_encoder(out["encoder"], cache) != first
    # a restage that stopped part way is refused before any node fetches its mix of revisions
    pending = {"source": info["source"], "pending_revision": "1" * 40, "files": info["files"]}
    storage.write_bytes(enc_manifest, json.dumps(pending).encode())
    with pytest.raises(encoder.StageIncomplete, match=rf"stage of {s3_prefix}/zoobot-encoder-euclid "
                       r"is incomplete .*: rerun galaxysae stage"):
        sources.localize_encoder(out["encoder"], str(tmp_path / "cache2"))
    assert not (tmp_path / "cache2").exists()


def _snapshot(hub: Path, revision: str, files: dict[str, bytes]) -> tuple[Path, list[str]]:
    """A Hub snapshot folder of plain files, named for its revision -> (folder, its files)."""
    for rel, data in files.items():
        (hub / revision / rel).parent.mkdir(parents=True, exist_ok=True)
        (hub / revision / rel).write_bytes(data)
    return hub / revision, sorted(files)


def test_an_interrupted_restage_names_no_revision_and_is_refused(tmp_path):
    """Files copy in sorted order: a restage that dies uploading model.safetensors leaves the new
    config.json over the old weights. Its manifest must not name the new revision (embed would
    record it for the old weights): it names a pending one, refused until a rerun completes."""
    hub, dest = tmp_path / "hub", tmp_path / "staged" / "enc"
    old, rels = _snapshot(hub, "a" * 40, {"config.json": b'{"v": 1}', "model.safetensors": b"old"})
    stage.copy_tree(old, rels, str(dest), "hf_hub:o/enc", overwrite=False)
    assert encoder.describe(f"local-dir:{dest}")[0] == f"hf_hub:o/enc@{'a' * 40}"
    new, _ = _snapshot(hub, "b" * 40, {"config.json": b'{"v": 2}', "model.safetensors": b"new"})
    (new / "model.safetensors").unlink()
    (new / "model.safetensors").mkdir()  # the weights' copy fails, as a kill during it would
    with pytest.raises(IsADirectoryError):
        stage.copy_tree(new, rels, str(dest), "hf_hub:o/enc", overwrite=False)
    assert (dest / "config.json").read_bytes() == b'{"v": 2}' and (dest / "model.safetensors").read_bytes() == b"old"
    manifest = stage.read_manifest(str(dest))
    assert manifest["pending_revision"] == "b" * 40 and "revision" not in manifest
    with pytest.raises(encoder.StageIncomplete, match=rf"stage of {dest} is incomplete .*: rerun galaxysae stage"):
        encoder.describe(f"local-dir:{dest}")
    # the rerun finishes the copy: the revision is named, with its weights in place
    (new / "model.safetensors").rmdir()
    (new / "model.safetensors").write_bytes(b"new")
    assert stage.copy_tree(new, rels, str(dest), "hf_hub:o/enc", overwrite=False) == 1  # the weights
    assert (dest / "model.safetensors").read_bytes() == b"new"
    assert "pending_revision" not in stage.read_manifest(str(dest))
    assert encoder.describe(f"local-dir:{dest}")[0] == f"hf_hub:o/enc@{'b' * 40}"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_restage_of_a_resharded_revision_leaves_only_its_shards(where, tmp_path, request):
    """A new revision that re-shards (2 -> 3 train shards): the old shards go, else embed would
    read both sets; the staged copy gives the revision it holds as the dataset's commit."""
    root = str(tmp_path / "staged") if where == "local" else request.getfixturevalue("s3_prefix")
    dest = storage.join(root, "gz_euclid")
    hub = tmp_path / "hub"
    readme = b"# gz_euclid\n"
    old = _snapshot(hub, "a" * 40, {"README.md": readme, **{
        f"data/train-0000{i}-of-00002.parquet": b"old %d" % i for i in range(2)}})
    new = _snapshot(hub, "b" * 40, {"README.md": readme, **{
        f"data/train-0000{i}-of-00003.parquet": b"new %d" % i for i in range(3)}})
    stage.copy_tree(*old, dest, "hf://datasets/o/gz_euclid", overwrite=False)
    assert sources.dataset_revision(sources.resolve(dest, splits=["train"])) == "a" * 40
    stage.copy_tree(*new, dest, "hf://datasets/o/gz_euclid", overwrite=False)
    shards = sources.resolve(dest, splits=["train"])
    assert [s.name for s in shards] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert sources.dataset_revision(shards) == "b" * 40
    manifest = stage.read_manifest(dest)
    assert sorted(manifest["files"]) == new[1] and manifest["revision"] == "b" * 40
    # a restage of the same revision keeps what it has (another config staged before, say)
    storage.write_bytes(storage.join(dest, "tiny/train-00000-of-00001.parquet"), b"tiny")
    manifest["files"]["tiny/train-00000-of-00001.parquet"] = "its-blob"
    storage.write_bytes(storage.join(dest, "galaxysae_stage.json"), json.dumps(manifest).encode())
    assert stage.copy_tree(*new, dest, "hf://datasets/o/gz_euclid", overwrite=False) == 0
    assert storage.exists(storage.join(dest, "tiny/train-00000-of-00001.parquet"))
    # ... and so does the rerun of a stage of this revision that stopped part way: it removes
    # only what that stage found stale (an old shard here), not the other config's file
    storage.write_bytes(storage.join(dest, "data/train-00000-of-00002.parquet"), b"old 0")
    pending = {"source": manifest["source"], "pending_revision": "b" * 40,
               "stale": ["data/train-00000-of-00002.parquet"], "files": {
                   **manifest["files"], "data/train-00000-of-00002.parquet": "old-blob"}}
    storage.write_bytes(storage.join(dest, "galaxysae_stage.json"), json.dumps(pending).encode())
    assert stage.copy_tree(*new, dest, "hf://datasets/o/gz_euclid", overwrite=False) == 0
    assert storage.exists(storage.join(dest, "tiny/train-00000-of-00001.parquet"))
    assert not storage.exists(storage.join(dest, "data/train-00000-of-00002.parquet"))
    assert stage.read_manifest(dest)["revision"] == "b" * 40
    assert "stale" not in stage.read_manifest(dest)
    # embed refuses a copy whose stage did not finish
    pending = {"source": manifest["source"], "pending_revision": "c" * 40, "files": manifest["files"]}
    storage.write_bytes(storage.join(dest, "galaxysae_stage.json"), json.dumps(pending).encode())
    with pytest.raises(encoder.StageIncomplete, match=rf"stage of {dest} is incomplete"):
        sources.dataset_revision(sources.resolve(dest, splits=["train"]))


def test_a_restage_over_a_manifest_listing_no_files_is_refused(tmp_path):
    """An earlier galaxysae's manifest named a revision but no files: which are stale is unknown."""
    dest = tmp_path / "staged" / "gz_euclid"
    dest.mkdir(parents=True)
    legacy = {"source": "hf://datasets/o/gz_euclid", "revision": "a" * 40}
    (dest / "galaxysae_stage.json").write_text(json.dumps(legacy))
    new = _snapshot(tmp_path / "hub", "b" * 40, {"data/train-00000-of-00001.parquet": b"new"})
    with pytest.raises(ValueError, match=rf"{dest}/galaxysae_stage.json names revision '{'a' * 40}' "
                       r"but lists no files .* stage to a new folder, or delete this one first"):
        stage.copy_tree(*new, str(dest), "hf://datasets/o/gz_euclid", overwrite=False)
    assert json.loads((dest / "galaxysae_stage.json").read_text()) == legacy
    assert not (dest / "data").exists()


def test_a_relative_output_in_a_ray_job_working_dir_copy_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(config.ConfigError, match=r"'output' = 'staged' is a relative path"):
        stage.run(stage.Config(output="staged"))
    assert not any(copy.iterdir())


def test_a_credential_in_a_source_url_is_not_echoed():
    for cfg in (stage.Config(output="x", dataset="https://u:SECRET@huggingface.co/datasets/x"),
                stage.Config(output="x", encoder="https://u:SECRET@huggingface.co/x")):
        with pytest.raises(ValueError) as err:
            cfg.validate()
        assert "SECRET" not in str(err.value) and "https://***@huggingface.co" in str(err.value)
