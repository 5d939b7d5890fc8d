"""`galaxysae embed` into an output that holds files of an earlier run, on the real test Ray cluster.

A finished shard is skipped only when it was made from the same input shard (read from any copy
of the dataset); files of the run's splits that none of its shards writes are an error, and
``--overwrite`` removes them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from galaxysae import embed, embeddings, storage

ENCODER = "hf_hub:mwalmsley/zoobot-encoder-euclid"
SIZE = 64
HUB = "hf://datasets/mwalmsley/gz_euclid"


def cfg(**kw) -> embed.Config:
    base = dict(encoder=ENCODER, image_size=SIZE, batch_size=16, encoder_threads=2,
                progress_interval_s=1.0, read_unit_bytes=1)
    base.update(kw)
    return embed.Config(**base)


def ids_of(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id_str"]).column("id_str").to_pylist()


def test_a_done_shard_made_from_another_input_shard_is_an_error_a_copy_of_it_is_skipped(
        synth_dataset, offline_hub, ray_cluster, s3_prefix, tmp_path, caplog):
    """The Hub's configs share a commit and file names: a smoke test with ``tiny``, then
    ``default`` into the same output, must not keep the tiny rows. The same shard read from a
    local or s3:// copy is the same input and stays skipped."""
    out = tmp_path / "out"
    shard = out / "test" / "test-00000-of-00001.parquet"
    assert embed.run(cfg(dataset=HUB, dataset_config="tiny", splits=["test"], output=str(out))) == 0
    tiny_ids = ids_of(synth_dataset / "tiny" / "test-00000-of-00001.parquet")
    assert ids_of(shard) == tiny_ids and len(tiny_ids) == 8
    before = shard.stat().st_mtime_ns

    # the default config of the same commit: same output name, another input shard
    with pytest.raises(ValueError) as err:
        embed.run(cfg(dataset=HUB, dataset_config="default", splits=["test"], output=str(out)))
    msg = str(err.value)
    assert str(shard) in msg and "--overwrite" in msg and "--output" in msg, msg
    assert "input shard: tiny/test-00000-of-00001.parquet -> data/test-00000-of-00001.parquet" in msg, msg
    assert "input rows: 8 -> 16" in msg, msg
    assert f"{HUB}/tiny/test-00000-of-00001.parquet" in msg, msg  # what it was made from
    assert f"{HUB}/data/test-00000-of-00001.parquet" in msg, msg  # what this run reads

    # another dataset, laid out the same: same shard path and row count, other galaxies
    other = tmp_path / "other"
    (other / "tiny").mkdir(parents=True)
    shutil.copy(synth_dataset / "README.md", other / "README.md")
    rows = pq.read_table(synth_dataset / "data" / "test-00000-of-00001.parquet")
    rows = rows.filter(pa.array([i not in set(tiny_ids) for i in rows.column("id_str").to_pylist()]))
    pq.write_table(rows.slice(0, 8), other / "tiny" / "test-00000-of-00001.parquet")

    def refused_other():
        with pytest.raises(ValueError) as err:
            embed.run(cfg(dataset=str(other), dataset_config="tiny", splits=["test"], output=str(out)))
        msg = str(err.value)
        assert str(shard) in msg and "input ids (sha256)" in msg and "--overwrite" in msg, msg
        assert f"this run reads {other}/tiny/test-00000-of-00001.parquet" in msg, msg

    refused_other()

    # the same shard from a local copy and an s3:// copy (no commit recorded): skipped
    fs, path = storage.fsspec_fs(s3_prefix)
    fs.put(str(synth_dataset / "README.md"), path + "/gz/README.md")
    fs.put(str(synth_dataset / "tiny" / "test-00000-of-00001.parquet"),
           path + "/gz/tiny/test-00000-of-00001.parquet")
    copy = tmp_path / "copy"
    shutil.copytree(synth_dataset, copy)

    def skipped(dataset: str):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="galaxysae"):
            assert embed.run(cfg(dataset=dataset, dataset_config="tiny", splits=["test"],
                                 output=str(out))) == 0
        assert any("shards written 0, skipped shards 1" in r.getMessage() for r in caplog.records)
        assert shard.stat().st_mtime_ns == before

    skipped(str(copy))
    skipped(f"{s3_prefix}/gz")

    # a file written before the input's digest was recorded: its ids are compared instead
    table = pq.read_table(shard)
    meta = {k: v for k, v in table.schema.metadata.items()
            if k not in (b"source_ids", b"source_rows")}
    pq.write_table(table.replace_schema_metadata(meta), shard)
    before = shard.stat().st_mtime_ns
    refused_other()
    skipped(str(copy))


def _dataset(root: Path, shards: dict[str, pa.Table]) -> Path:
    (root / "data").mkdir(parents=True)
    for name, table in shards.items():
        pq.write_table(table, root / "data" / name)
    return root


def test_files_of_an_earlier_run_on_other_input_are_an_error_and_overwrite_removes_them(
        synth_dataset, offline_hub, ray_cluster, tmp_path):
    src = pq.read_table(synth_dataset / "data" / "train-00000-of-00002.parquet")
    test = pq.read_table(synth_dataset / "data" / "test-00000-of-00001.parquet").slice(0, 4)
    bad = src.slice(4, 4)  # its first image undecodable: a failure record for that shard
    images = bad.column("image").to_pylist()
    images[0] = {"bytes": b"not an image", "path": None}
    bad = bad.set_column(bad.schema.get_field_index("image"), "image",
                         pa.array(images, bad.schema.field("image").type))
    two = _dataset(tmp_path / "two", {"train-00000-of-00002.parquet": src.slice(0, 4),
                                      "train-00001-of-00002.parquet": bad,
                                      "test-00000-of-00001.parquet": test})
    one_rows = src.slice(8, 4)
    one = _dataset(tmp_path / "one", {"train-00000-of-00001.parquet": one_rows})
    out = tmp_path / "out"
    assert embed.run(cfg(dataset=str(two), output=str(out), max_failure_fraction=1.0)) == 0
    old = sorted(p.name for p in (out / "train").glob("*.parquet"))
    assert old == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    stale_failure = out / "_failures" / "train" / "train-00001-of-00002.parquet"
    assert stale_failure.exists()
    test_file = out / "test" / "test-00000-of-00001.parquet"
    test_before = test_file.stat().st_mtime_ns

    # without --overwrite: an error naming every file left from the other input, before any work
    with pytest.raises(ValueError) as err:
        embed.run(cfg(dataset=str(one), splits=["train"], output=str(out)))
    msg = str(err.value)
    for name in old:
        assert str(out / "train" / name) in msg, msg
    assert str(stale_failure) in msg and "--overwrite" in msg and "holds 3 files" in msg, msg
    assert sorted(p.name for p in (out / "train").glob("*.parquet")) == old

    # --overwrite: only this run's shards remain in the split it embeds; the other split stays
    assert embed.run(cfg(dataset=str(one), splits=["train"], output=str(out), overwrite=True)) == 0
    assert [p.name for p in (out / "train").glob("*.parquet")] == ["train-00000-of-00001.parquet"]
    assert not list((out / "_failures" / "train").glob("*.parquet"))
    assert test_file.stat().st_mtime_ns == test_before
    # what train reads is this run's input, nothing else
    files = embeddings.parquet_files(str(out), "train")
    got = [i for f in files for i in pq.read_table(f, columns=["id_str"]).column("id_str").to_pylist()]
    assert sorted(got) == sorted(one_rows.column("id_str").to_pylist())
    # and a plain rerun finds it whole
    assert embed.run(cfg(dataset=str(one), splits=["train"], output=str(out))) == 0
