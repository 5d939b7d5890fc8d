"""The image index of a dataset regenerated in place: rebuilt, never read stale."""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq

from galaxysae import image_index


def test_a_shard_rewritten_in_place_rebuilds_the_index(synth_dataset, tmp_path):
    """Same shard list, other rows in a shard (the dataset regenerated where it was): the saved
    index is rebuilt from the shards, and every galaxy is found at its new row."""
    dataset = tmp_path / "gz"
    shutil.copytree(synth_dataset, dataset)
    url = str(tmp_path / "index.parquet")
    first = image_index.load_or_build(str(dataset), "train", url)
    shard = sorted((dataset / "data").glob("train-*.parquet"))[0]
    t = pq.read_table(shard)
    ids = t.column("id_str").to_pylist()
    assert first.locate(ids[0]) == (first.shards[0], 0)
    pq.write_table(t.take(list(range(len(ids)))[::-1]), shard)  # the same galaxies, rows reversed
    os.utime(shard, ns=(0, 0))  # a stamp that differs whatever the clock's resolution
    again = image_index.load_or_build(str(dataset), "train", url)
    assert again.locate(ids[0]) == (first.shards[0], len(ids) - 1)
    want = [ids[0], ids[-1], ids[len(ids) // 2]]
    truth = dict(zip(ids, (img["bytes"] for img in t.column("image").to_pylist())))
    assert again.fetch(want) == {i: truth[i] for i in want}
    # unchanged shards: the saved index is read, not rebuilt (its file is not written again)
    written = os.stat(url).st_mtime_ns
    assert image_index.load_or_build(str(dataset), "train", url).locate(ids[0]) == again.locate(ids[0])
    assert os.stat(url).st_mtime_ns == written
