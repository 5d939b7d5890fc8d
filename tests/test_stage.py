"""`galaxysae stage`: from the offline Hub cache into the S3 server, then embed from the copy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from galaxysae import embed, encoder, sources, stage, storage
from galaxysae.decode import decode_image
from tests.test_embed import SIZE, embeddings


def test_stage_to_s3_then_embed_offline_from_the_copy(offline_hub, ray_cluster, s3_prefix, tmp_path):
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
    # a rerun copies nothing (same sizes) and still succeeds
    mtime = fs.info(f"{path}/gz_euclid/tiny/train-00000-of-00001.parquet")["LastModified"]
    stage.run(stage.Config(output=s3_prefix, dataset_config="tiny"))
    assert fs.info(f"{path}/gz_euclid/tiny/train-00000-of-00001.parquet")["LastModified"] == mtime
    # a file staged from another blob (an earlier revision, even of the same size) is copied again
    manifest_url = f"{s3_prefix}/gz_euclid/galaxysae_stage.json"
    manifest = json.loads(storage.read_bytes(manifest_url))
    assert len(manifest["files"]["tiny/train-00000-of-00001.parquet"]) == 64  # the sha256 blob
    manifest["files"]["tiny/train-00000-of-00001.parquet"] = "an-earlier-blob"
    storage.write_bytes(manifest_url, json.dumps(manifest).encode())
    time.sleep(1.1)  # S3 LastModified counts whole seconds
    stage.run(stage.Config(output=s3_prefix, dataset_config="tiny"))
    assert fs.info(f"{path}/gz_euclid/tiny/train-00000-of-00001.parquet")["LastModified"] > mtime
    again = json.loads(storage.read_bytes(manifest_url))["files"]
    assert len(again["tiny/train-00000-of-00001.parquet"]) == 64 and set(again) == set(manifest["files"])
    # a stage that died part way (README.md not copied yet): its rerun sends only what is missing
    shard_mtime = fs.info(f"{path}/gz_euclid/tiny/train-00000-of-00001.parquet")["LastModified"]
    fs.rm(f"{path}/gz_euclid/README.md")
    storage.write_bytes(manifest_url, json.dumps(
        {**manifest, "files": {k: v for k, v in again.items() if k != "README.md"}}).encode())
    stage.run(stage.Config(output=s3_prefix, dataset_config="tiny"))
    assert fs.info(f"{path}/gz_euclid/tiny/train-00000-of-00001.parquet")["LastModified"] == shard_mtime
    assert storage.exists(f"{s3_prefix}/gz_euclid/README.md")

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
    # a node's local copy of the S3-staged encoder is keyed on what was staged: a restage of
    # another revision to the same prefix is fetched again, not served from the old copy
    cache = str(tmp_path / "cache")
    first = sources.localize_encoder(out["encoder"], cache)
    assert sources.localize_encoder(out["encoder"], cache) == first
    enc_manifest = f"{s3_prefix}/zoobot-encoder-euclid/galaxysae_stage.json"
    storage.write_bytes(enc_manifest, json.dumps({**info, "revision": "0" * 40}).encode())
    assert sources.localize_encoder(out["encoder"], cache) != first
