"""`galaxysae.sources`: what `--dataset` resolves to, on local copies (the online Hub path runs
against a stand-in Hub in test_embed.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from galaxysae import sources


def test_hub_names_take_revisions_with_slashes():
    assert sources.hf_repo("hf://datasets/mwalmsley/gz_euclid") == ("mwalmsley/gz_euclid", None)
    assert sources.hf_repo("hf://datasets/mwalmsley/gz_euclid@v1.2/") == ("mwalmsley/gz_euclid", "v1.2")
    for rev in ("refs/convert/parquet", "refs%2Fconvert%2Fparquet"):
        assert sources.hf_repo(f"hf://datasets/mwalmsley/gz_euclid@{rev}") == (
            "mwalmsley/gz_euclid", "refs/convert/parquet")
    for bad in ("hf://datasets/gz_euclid", "hf://models/a/b", "hf://datasets/a/b@"):
        with pytest.raises(sources.SourceError, match="expected hf://datasets/OWNER/NAME"):
            sources.hf_repo(bad)


def test_a_credential_in_a_dataset_url_is_not_echoed(tmp_path):
    for bad in ("https://user:hf_SECRET@huggingface.co/datasets/x", "s3://AKIA:SECRET@bucket/gz"):
        with pytest.raises(sources.SourceError) as err:
            sources.hf_repo(bad)
        assert "SECRET" not in str(err.value) and "://***@" in str(err.value)


def test_a_staged_copy_gives_the_revision_it_was_staged_from(synth_dataset, tmp_path):
    """A dataset copied by `galaxysae stage` has no commit in its path: its manifest holds it."""
    copy = tmp_path / "gz_euclid"
    shutil.copytree(synth_dataset, copy)
    (copy / "galaxysae_stage.json").write_text(json.dumps(
        {"source": "hf://datasets/mwalmsley/gz_euclid", "revision": "c" * 40, "files": {}}))
    assert sources.dataset_revision(sources.resolve(str(copy))) == "c" * 40


def test_a_copy_missing_a_shard_is_refused_naming_it(synth_dataset, tmp_path):
    copy = tmp_path / "gz_euclid"
    shutil.copytree(synth_dataset, copy)
    full = sources.resolve(str(copy))
    assert [s.name for s in full if s.split == "train"] == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert sources.dataset_revision(full) == ""  # a local directory has no commit
    (copy / "data" / "train-00001-of-00002.parquet").unlink()
    with pytest.raises(sources.SourceError, match=r"split 'train': 1 of 2 shards are missing \(00001\)"):
        sources.resolve(str(copy))
    # the split asked for is what counts: the test split alone is complete
    assert [s.split for s in sources.resolve(str(copy), splits=["test"])] == ["test"]


def test_the_offline_cache_gives_its_commit(offline_hub):
    shards = sources.resolve("hf://datasets/mwalmsley/gz_euclid")
    assert shards and sources.dataset_revision(shards) == offline_hub["dataset_revision"]


def test_readme_pattern_lists_and_shards_sharing_a_file_name(tmp_path):
    """``data_files: [pattern]`` (HF's list form: all train) reads; two shards of a split with
    one file name get output names of their own, so neither overwrites the other's."""
    for sub in ("north", "south"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "0000.parquet").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - north/*.parquet\n"
        "  - south/*.parquet\n---\n# two fields\n")
    shards = sources.resolve(str(tmp_path), splits=["train"])
    assert [(s.split, s.rel, s.name) for s in shards] == [
        ("train", "north/0000.parquet", "north__0000.parquet"),
        ("train", "south/0000.parquet", "south__0000.parquet")]
    with pytest.raises(sources.SourceError, match="split 'test' is not in config 'default'"):
        sources.resolve(str(tmp_path), splits=["test"])
