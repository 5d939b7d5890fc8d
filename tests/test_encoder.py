"""The encoder loader: timm names, hf_hub: names from the offline cache, local-dir: folders."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from galaxysae import encoder

SIZE = 64  # small images keep the CPU forward quick; the width does not depend on it


@pytest.fixture(scope="module")
def hub_model(offline_hub):
    return encoder.load("hf_hub:" + offline_hub["encoder_repo"], image_size=SIZE)


def test_hf_hub_name_loads_offline_and_flags_the_stand_in(offline_hub, hub_model, caplog):
    model, info = hub_model
    assert info.width == 640  # read from the model, convnext_nano's pooled width
    assert info.revision == offline_hub["encoder_revision"]
    assert "NOT the real Zoobot weights" in info.stand_in
    with caplog.at_level(logging.WARNING, logger="galaxysae.encoder"):
        encoder.load("local-dir:" + str(offline_hub["encoder_snapshot"]), image_size=SIZE)
    assert any("STAND-IN" in r.getMessage() for r in caplog.records)


def test_local_dir_gives_the_same_embeddings_as_the_hub_name(offline_hub, hub_model):
    model, _ = hub_model
    local, info = encoder.load("local-dir:" + str(offline_hub["encoder_snapshot"]), image_size=SIZE)
    assert info.stand_in and info.width == 640
    x = np.random.default_rng(0).random((3, 3, SIZE, SIZE), dtype=np.float32)
    a = encoder.embed(model, x)
    b = encoder.embed(local, x)
    assert a.shape == (3, 640) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_timm_name_random_init_is_flagged_and_seeded():
    m1, info = encoder.load("resnet18", pretrained=False, image_size=SIZE)
    m2, _ = encoder.load("resnet18", pretrained=False, image_size=SIZE)
    assert info.width == 512 and "randomly initialised" in info.stand_in
    x = np.random.default_rng(1).random((2, 3, SIZE, SIZE), dtype=np.float32)
    np.testing.assert_array_equal(encoder.embed(m1, x), encoder.embed(m2, x))


def test_bf16_on_cpu_is_close_to_fp32(hub_model):
    model, _ = hub_model
    x = np.random.default_rng(2).random((2, 3, SIZE, SIZE), dtype=np.float32)
    a = encoder.embed(model, x, precision="fp32")
    b = encoder.embed(model, x, precision="bf16")
    assert b.dtype == np.float32
    # bf16 keeps ~3 significant digits: relative error of the whole vector stays small
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05


def test_missing_local_dir_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        encoder.load(f"local-dir:{tmp_path / 'nope'}")


def test_encode_batch_skips_failed_rows(offline_hub):
    op = encoder.EncodeBatch("hf_hub:" + offline_hub["encoder_repo"], image_size=SIZE, threads=1)
    assert op.precision == "fp32" and op.device == "cpu"
    pixels = np.random.default_rng(3).random((3, 3, SIZE, SIZE), dtype=np.float32)
    pixels[1] = np.nan  # a failed decode
    out = op({"id_str": np.array(["a", "b", "c"], object), "path": np.array(["p"] * 3, object),
              "reason": np.array(["", "zero bytes", ""], object), "pixels": pixels})
    assert out["embedding"].shape == (3, 640)
    assert np.isnan(out["embedding"][1]).all()
    assert np.isfinite(out["embedding"][[0, 2]]).all()
    np.testing.assert_allclose(out["embedding"][[0, 2]], encoder.embed(op.model, pixels[[0, 2]]),
                               atol=1e-5)


def test_a_local_dir_without_a_stage_manifest_is_identified_by_its_weights(offline_hub, tmp_path):
    """No stage wrote the folder: its revision hashes the weight files, so weights replaced in
    place read as other weights (embed refuses to mix their embeddings with the old ones), and
    the same weights copied elsewhere keep their revision."""
    import shutil

    a = tmp_path / "a"
    shutil.copytree(offline_hub["encoder_snapshot"], a)  # follows the cache's symlinks
    revision = encoder.describe(f"local-dir:{a}")[0]
    assert revision.startswith("local-sha256:") and len(revision) == len("local-sha256:") + 16
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert encoder.describe(f"local-dir:{b}")[0] == revision
    weights = next(p for p in b.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert encoder.describe(f"local-dir:{b}")[0] not in (revision, "local")
