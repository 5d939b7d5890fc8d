"""The offline Hub: `hf_hub:` encoder and the gz_euclid dataset resolve with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from galaxysae import hub
from tests.conftest import REPO


def test_offline_mode_is_on():
    import huggingface_hub.constants as c

    assert os.environ["HF_HUB_OFFLINE"] == "1" and c.HF_HUB_OFFLINE


def test_encoder_loads_from_offline_cache(offline_hub):
    import safetensors.torch
    import timm
    import torch

    repo = Path(offline_hub["hub_cache"]) / "models--mwalmsley--zoobot-encoder-euclid"
    ref = (repo / "refs" / "main").read_bytes()
    assert ref == offline_hub["encoder_revision"].encode() and len(ref) == 40  # no trailing newline
    snap = Path(offline_hub["encoder_snapshot"])
    assert snap == repo / "snapshots" / offline_hub["encoder_revision"]

    model = timm.create_model("hf_hub:mwalmsley/zoobot-encoder-euclid", pretrained=True).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 640)
    # The weights came from the cache, not from a fresh random init.
    saved = safetensors.torch.load_file(snap / "model.safetensors")
    assert torch.equal(model.state_dict()["stem.0.weight"], saved["stem.0.weight"])
    assert model.pretrained_cfg["hf_hub_id"] == "mwalmsley/zoobot-encoder-euclid"

    cfg = json.loads((snap / "config.json").read_text())
    assert cfg["architecture"] == "convnext_nano" and cfg["num_classes"] == 0 and cfg["num_features"] == 640
    assert "NOT the real Zoobot weights" in cfg[hub.STAND_IN_KEY]
    assert "NOT the real Zoobot weights" in (snap / "README.md").read_text()


def test_dataset_snapshot_resolves_offline(offline_hub, synth_dataset):
    import datasets
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download("mwalmsley/gz_euclid", repo_type="dataset"))
    assert path == Path(offline_hub["dataset_snapshot"])
    rels = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert "README.md" in rels and "data/train-00001-of-00002.parquet" in rels
    for rel in rels:
        assert (path / rel).read_bytes() == (synth_dataset / rel).read_bytes(), rel
    ds = datasets.load_dataset(str(path), split="train")
    assert ds.num_rows == 48 and ds[0]["image"].size == (96, 96)


def test_cli_build_is_deterministic_rerunnable_and_loud(synth_dataset, tmp_path):
    home = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "galaxysae", "hub", "--hf-home", str(home), "--dataset", str(synth_dataset)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stderr and "NOT the real Zoobot weights" in proc.stderr
    assert "HF_HUB_OFFLINE=1" in proc.stdout
    # Same inputs in another process -> same revisions (content hashes), and nothing rewritten.
    info = hub.build_offline_cache(home, synth_dataset)
    enc = Path(info["encoder_snapshot"])
    assert enc.parent.name == "snapshots" and len(list(enc.parent.iterdir())) == 1
    assert len(list((home / "hub" / "datasets--mwalmsley--gz_euclid" / "snapshots").iterdir())) == 1
    # A different seed is a different stand-in: a new revision, and refs/main follows it.
    other = hub.build_offline_cache(home, synth_dataset, seed=1)
    assert other["encoder_revision"] != info["encoder_revision"]
    assert (home / "hub" / "models--mwalmsley--zoobot-encoder-euclid" / "refs" / "main").read_text() == \
        other["encoder_revision"]


def test_never_overwrites_a_real_cached_repo(synth_dataset, tmp_path):
    real = tmp_path / "hf" / "hub" / "models--mwalmsley--zoobot-encoder-euclid"
    (real / "refs").mkdir(parents=True)
    (real / "refs" / "main").write_text("a" * 40)
    (real / "snapshots" / ("a" * 40)).mkdir(parents=True)
    with pytest.raises(ValueError, match="did not write"):
        hub.build_offline_cache(tmp_path / "hf", synth_dataset)
    assert (real / "refs" / "main").read_text() == "a" * 40


def test_a_credential_in_a_url_is_not_echoed():
    for cfg in (hub.Config(hf_home="h", dataset="s3://AKIAXXX:SECRETKEY@bucket/ds"),
                hub.Config(hf_home="h", dataset="d", dataset_repo="https://u:SECRETKEY@hf.co/x")):
        with pytest.raises(ValueError) as err:
            cfg.validate()
        assert "SECRETKEY" not in str(err.value) and "://***@" in str(err.value)


def test_bad_dataset_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "nothing")):
        hub.build_offline_cache(tmp_path / "hf", tmp_path / "nothing")
    assert not (tmp_path / "hf").exists()
