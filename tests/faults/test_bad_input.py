"""Bad input: each bad thing gets a clear error naming it, or a recorded failure; nothing else is lost.

Images go through the real embed job on the test Ray cluster; embeddings, artifacts and configs
through the real train / render / pca code. Tiny data throughout.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from galaxysae import activations, config, embed, embeddings, pca, synth, train
from galaxysae.embeddings import EmbeddingsError, planted, write_parquet

ENCODER = "hf_hub:mwalmsley/zoobot-encoder-euclid"


def _embed_cfg(ds: Path, out: Path, **kw) -> embed.Config:
    base = dict(dataset=str(ds), output=str(out), encoder=ENCODER, image_size=32, batch_size=8,
                encoder_threads=1, read_unit_bytes=1, progress_interval_s=1.0,
                max_failure_fraction=1.0)
    base.update(kw)
    return embed.Config(**base)


def _small_dataset(root: Path, n_train=16, n_test=4, seed=11) -> Path:
    synth.run(synth.Config(out=str(root), n_train=n_train, n_test=n_test, shard_size=8,
                           image_size=48, seed=seed, workers=1))
    return root


def _shards(ds: Path, split: str) -> list[Path]:
    return sorted((ds / "data").glob(f"{split}-*.parquet"))


def _huge_jpeg() -> bytes:
    # 8000 x 8000: a valid image far larger than any cutout; decoded at reduced scale.
    img = Image.new("L", (8000, 8000), 10)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=50)
    return buf.getvalue()


def _bad_images() -> dict[str, bytes]:
    good = io.BytesIO()
    Image.new("RGB", (48, 48), (30, 60, 90)).save(good, "JPEG")
    jpeg = good.getvalue()
    corrupt = bytearray(jpeg)
    sos = corrupt.index(b"\xff\xda")  # the compressed data follows the scan header
    corrupt[sos + 20:-2] = b"\x00" * (len(corrupt) - sos - 22)
    return {
        "truncated": jpeg[: len(jpeg) // 3],
        "zero-byte": b"",
        "non-image": b"id,ra,dec\n1,150.1,2.2\n",
        "corrupt-header": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "huge-8000px": _huge_jpeg(),
        "garbled-body": bytes(corrupt),
    }


def _replace_images(shard: Path, replacements: dict[int, bytes]) -> list[str]:
    t = pq.read_table(shard)
    col = t.column("image").combine_chunks()
    data = col.field("bytes").to_pylist()
    for row, b in replacements.items():
        data[row] = b
    new = pa.StructArray.from_arrays([pa.array(data, pa.binary()), col.field("path")],
                                     names=["bytes", "path"])
    t = t.set_column(t.schema.get_field_index("image"), "image", new)
    pq.write_table(t, shard)
    ids = t.column("id_str").to_pylist()
    return [ids[r] for r in replacements]


def _embedded_and_failed(out: Path, split: str) -> tuple[list[str], dict[str, str]]:
    ids, failed = [], {}
    for f in sorted((out / split).glob("*.parquet")):
        ids += pq.read_table(f, columns=["id_str"]).column("id_str").to_pylist()
    for f in sorted((out / "_failures" / split).glob("*.parquet")):
        t = pq.read_table(f).to_pylist()
        failed.update({r["id_str"]: r["reason"] for r in t})
    return ids, failed


# ----------------------------------------------------------------------------- images


@pytest.mark.slow
def test_bad_images_are_recorded_with_a_reason_and_every_other_row_is_embedded(
        offline_hub, ray_cluster, tmp_path, ledger):
    ds = _small_dataset(tmp_path / "ds")
    bad = _bad_images()
    shard = _shards(ds, "train")[0]
    kinds = list(bad)
    bad_ids = _replace_images(shard, {i: bad[k] for i, k in enumerate(kinds)})
    by_id = dict(zip(bad_ids, kinds))
    all_ids = [i for s in _shards(ds, "train")
               for i in pq.read_table(s, columns=["id_str"]).column("id_str").to_pylist()]
    out = tmp_path / "out"
    assert embed.run(_embed_cfg(ds, out, splits=["train"])) == 0
    embedded, failed = _embedded_and_failed(out, "train")
    ledger.bad_input("image", len(kinds))
    lost, dup = ledger.rows(all_ids, embedded + list(failed))
    assert lost == 0 and dup == 0
    # the huge image is valid: it is embedded (decoded at reduced scale), not refused
    huge = next(i for i, k in by_id.items() if k == "huge-8000px")
    assert huge in embedded and huge not in failed
    # zeroed bytes inside the compressed data: PIL alone decodes it to flat grey (libjpeg only
    # warns); the strict decode records it, naming the corruption
    garbled = next(i for i, k in by_id.items() if k == "garbled-body")
    assert "corrupt JPEG data" in failed.get(garbled, "")
    for i, kind in by_id.items():
        if kind == "huge-8000px":
            continue
        assert i in failed and i not in embedded, f"{kind} image {i} was not recorded as failed"
        assert failed[i], f"{kind}: empty reason"
    assert "zero bytes" in failed[bad_ids[kinds.index("zero-byte")]]
    assert "not an image" in failed[bad_ids[kinds.index("non-image")]]
    # no row was zero-filled: every written embedding is finite and non-constant
    for f in (out / "train").glob("*.parquet"):
        x = embeddings.table_to_numpy(pq.read_table(f), str(f))[1]
        assert np.isfinite(x).all() and (x.std(axis=1) > 0).all()
    # a strict threshold turns the same input into a non-zero exit that points at _failures
    assert embed.run(_embed_cfg(ds, tmp_path / "strict", splits=["train"],
                                max_failure_fraction=0.01)) == 3


# ----------------------------------------------------------------------------- shards


def _rename_column(shard, old: str, new: str):
    """Rewrite a parquet shard in place with column ``old`` called ``new``; returns the shard."""
    t = pq.read_table(shard)
    pq.write_table(t.rename_columns([new if c == old else c for c in t.column_names]), shard)
    return shard


def test_shard_without_id_column_is_named_before_any_work(tmp_path, ledger):
    ds = _small_dataset(tmp_path / "ds", n_train=8, n_test=0)
    shard = _rename_column(_shards(ds, "train")[0], "id_str", "galaxy_id")
    ledger.bad_input("shard missing id_str")
    with pytest.raises(ValueError, match=rf"{shard.name}.*id_str"):
        embed.run(_embed_cfg(ds, tmp_path / "out", splits=["train"]))
    assert not (tmp_path / "out" / "train").exists()


def test_shard_with_misnamed_image_column_is_named_before_any_work(offline_hub, tmp_path, ledger):
    ds = _small_dataset(tmp_path / "ds", n_train=8, n_test=0)
    shard = _rename_column(_shards(ds, "train")[0], "image", "picture")
    ledger.bad_input("shard misnamed image column")
    with pytest.raises(ValueError, match=rf"{shard.name}: no column 'image' \(columns: .*picture"):
        embed.run(_embed_cfg(ds, tmp_path / "out", splits=["train"]))
    assert not (tmp_path / "out" / "train").exists()


def test_duplicate_ids_across_shards_are_named_before_any_work(tmp_path, ledger):
    ds = _small_dataset(tmp_path / "ds", n_train=16, n_test=0)
    a, b = _shards(ds, "train")
    ta, tb = pq.read_table(a), pq.read_table(b)
    dup = ta.column("id_str")[0].as_py()
    ids = tb.column("id_str").to_pylist()
    ids[3] = dup
    pq.write_table(tb.set_column(tb.schema.get_field_index("id_str"), "id_str", pa.array(ids)), b)
    ledger.bad_input("duplicate id across shards")
    with pytest.raises(ValueError) as err:
        embed.run(_embed_cfg(ds, tmp_path / "out", splits=["train"]))
    msg = str(err.value)
    assert dup in msg and a.name in msg and b.name in msg and "'train'" in msg
    assert not (tmp_path / "out" / "train").exists()


# ----------------------------------------------------------------------------- embeddings


def _emb(root: Path, n=64, d=16, seed=0):
    x, _ = planted(n, d, 24, 3, seed=seed, offset=0.2)
    ids = [f"g{i:04d}" for i in range(n)]
    return x, ids


def _train_cfg(emb: str, out: Path, **kw) -> train.Config:
    base = {"embeddings": emb, "output": str(out), "mode": "local", "epochs": 1, "batch_size": 16,
            "model": {"n_latents": 32, "k": 2, "multik": 0, "aux_k": 2}}
    base.update(kw)
    return config.from_dict(train.Config, base)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_embeddings_are_named_with_their_ids(tmp_path, bad, ledger):
    x, ids = _emb(tmp_path)
    x[5, 3] = np.nan if bad == "nan" else np.inf
    write_parquet(str(tmp_path / "e"), "train", ids[:48], x[:48])
    write_parquet(str(tmp_path / "e"), "test", ids[48:], x[48:])
    ledger.bad_input(f"embeddings with {bad}")
    with pytest.raises(EmbeddingsError, match=r"part-00000\.parquet.*NaN or Inf.*g0005"):
        train.run(_train_cfg(str(tmp_path / "e"), tmp_path / "sae"))
    assert not (tmp_path / "sae" / "sae.safetensors").exists()
    # render/compare read the same files through activations: also refused, naming the id
    with pytest.raises(ValueError, match="g0005"):
        list(activations.read_embeddings(str(tmp_path / "e"), "train"))


def test_embeddings_of_the_wrong_width_are_named(tmp_path, ledger):
    x, ids = _emb(tmp_path)
    write_parquet(str(tmp_path / "e"), "train", ids[:48], x[:48])
    write_parquet(str(tmp_path / "e"), "test", ids[48:], x[48:, :12])
    ledger.bad_input("embeddings of the wrong width", 2)
    with pytest.raises(EmbeddingsError, match=r"test.*width 12, expected 16"):
        train.run(_train_cfg(str(tmp_path / "e"), tmp_path / "sae"))
    # whole files of the wrong width for the config's declared input_dim (Zoobot's 640)
    write_parquet(str(tmp_path / "e2"), "train", ids[:48], x[:48])
    write_parquet(str(tmp_path / "e2"), "test", ids[48:], x[48:])
    with pytest.raises(ValueError, match=r"input_dim.*640.*16"):
        train.run(_train_cfg(str(tmp_path / "e2"), tmp_path / "sae2", input_dim=640))
    assert not (tmp_path / "sae2" / "config.toml").exists()


def test_npy_with_mismatched_ids_is_named(tmp_path, ledger):
    x, ids = _emb(tmp_path)
    np.save(tmp_path / "train_embeddings.npy", x)
    np.save(tmp_path / "train_ids.npy", np.array(ids[:-3]))
    ledger.bad_input(".npy with mismatched ids")
    with pytest.raises(EmbeddingsError, match=r"train_embeddings\.npy has 64 rows but .*train_ids\.npy has 61"):
        train.run(_train_cfg(str(tmp_path / "train_embeddings.npy"), tmp_path / "sae"))


def test_sae_artifact_whose_width_does_not_match_the_embeddings_is_named(tmp_path, ledger):
    x, ids = _emb(tmp_path)
    write_parquet(str(tmp_path / "e16"), "train", ids[:48], x[:48])
    write_parquet(str(tmp_path / "e16"), "test", ids[48:], x[48:])
    train.run(_train_cfg(str(tmp_path / "e16"), tmp_path / "sae"))
    wide = np.concatenate([x, x], axis=1)
    write_parquet(str(tmp_path / "e32"), "test", ids, wide)
    ledger.bad_input("SAE width != embeddings width", 2)
    with pytest.raises(ValueError, match=r"part-00000\.parquet: embeddings are 32-d but the dictionary expects 16-d"):
        list(activations.read_embeddings(str(tmp_path / "e32"), "test", d_in=16))
    # the train job's eval_only path with the wrong embeddings: refused before the model runs
    write_parquet(str(tmp_path / "e32"), "train", ids, wide)
    with pytest.raises(ValueError, match=r"e32/train: embeddings are 32-d but the SAE in .*sae expects 16-d"):
        train.run(_train_cfg(str(tmp_path / "e32"), tmp_path / "sae", eval_only=True))
    # PCA fitted on 16-d embeddings, applied to 32-d ones
    pca.run(config.from_dict(pca.Config, {"embeddings": str(tmp_path / "e16"),
                                          "output": str(tmp_path / "pca"), "n_components": 4}))
    from galaxysae import dictionary

    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        dictionary.load(str(tmp_path / "pca")).encode(wide)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("toml,key,what", [
    ('epochs = "ten"\n', "epochs", "expects int"),
    ('[model]\nk = 2.5\n', "model.k", "expects int"),
    ('[model]\nk = -4\n', "model.k", "1..5120, got -4"),
    ('[model]\nn_latents = 64\nk = 65\n', "model.k", "1..64, got 65"),
    ('[model]\nn_latents = 64\nmatryoshka_groups = [16, 16, 16]\n', "model.matryoshka_groups", "sum to 48"),
    ('[model]\nactivation = "relu"\n', "model.activation", "expects 'topk' | 'batchtopk'"),
    ('batch_size = 0\n', "batch_size", "must be positive"),
])
def test_bad_train_configs_name_the_key_and_the_file(tmp_path, toml, key, what, ledger):
    path = tmp_path / "bad.toml"
    path.write_text('embeddings = "e"\noutput = "o"\n' + toml)
    ledger.bad_input("config")
    with pytest.raises(ValueError) as err:
        config.parse_args(train.Config, ["--config", str(path)], preprocess=train.preprocess_toml)
    msg = str(err.value)
    assert f"'{key}'" in msg and what in msg, msg


def test_bad_value_on_the_command_line_names_the_key(ledger):
    ledger.bad_input("config", 2)
    with pytest.raises(ValueError, match=r"'model\.k' expects int"):
        config.parse_args(train.Config, ["--embeddings", "e", "--output", "o", "--model.k", "many"])
    with pytest.raises(ValueError, match=r"'model\.k' must be in 1\.\.5120, got 0"):
        config.parse_args(train.Config, ["--embeddings", "e", "--output", "o", "--model.k", "0"])
