"""`galaxysae embed` on the real test Ray cluster, from a local dir, S3 and the offline Hub."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from galaxysae import embed, encoder, storage
from galaxysae.decode import decode_image

REPO = Path(__file__).resolve().parents[1]
ENCODER = "hf_hub:mwalmsley/zoobot-encoder-euclid"
SIZE = 64  # embed at 64 px: the pipeline is the same, the CPU forward ~12x cheaper than 224
# Same encoder, same images: the pipeline must reproduce a plain single-process forward up to
# float reassociation from different batch compositions.
DIRECT_ATOL = 1e-4


def cfg(**kw) -> embed.Config:
    # read_unit_bytes=1: one read task per row group, so tiny test shards stream one by one
    base = dict(encoder=ENCODER, image_size=SIZE, batch_size=16, encoder_threads=2,
                progress_interval_s=1.0, read_unit_bytes=1)
    base.update(kw)
    return embed.Config(**base)


def read_dir(url: str, sub: str) -> pa.Table:
    fs, path = storage.arrow_fs(storage.join(url, sub))
    files = [f.path for f in fs.get_file_info(pa.fs.FileSelector(path, allow_not_found=True))
             if f.path.endswith(".parquet") and not os.path.basename(f.path).startswith(".")]
    tables = [pq.read_table(f, filesystem=fs) for f in sorted(files)]
    return pa.concat_tables(tables) if tables else None


def embeddings(url: str, splits=("train", "test")) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for split in splits:
        t = read_dir(url, split)
        ids = t.column("id_str").to_pylist()
        assert len(ids) == len(set(ids)), f"duplicate ids in {url}/{split}"
        assert set(t.column("split").to_pylist()) == {split}
        emb = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
        out.update(zip(ids, emb))
    return out


def failures(url: str) -> dict[str, str]:
    out = {}
    for split in ("train", "test"):
        t = read_dir(storage.join(url, "_failures"), split)
        if t is not None:
            out.update(zip(t.column("id_str").to_pylist(), t.column("reason").to_pylist()))
    return out


def input_rows(dataset: Path) -> dict[str, bytes]:
    rows = {}
    for f in sorted((dataset / "data").glob("*.parquet")):
        t = pq.read_table(f, columns=["id_str", "image"])
        for i, img in zip(t.column("id_str").to_pylist(), t.column("image").to_pylist()):
            rows[i] = img["bytes"]
    return rows


# ----------------------------------------------------------------------------- planning


def test_plan_defaults_for_a_laptop_a_gpu_node_and_a_cpu_cluster():
    laptop = embed.plan(embed.Config(), [{"CPU": 2.0}])
    # one CPU stays free for Ray Data's listing tasks; torch still uses both cores
    assert (laptop.device, laptop.precision, laptop.num_encoders) == ("cpu", "fp32", 1)
    assert laptop.encoder_cpus == 1.0 and laptop.encoder_threads == 2
    gpu = embed.plan(embed.Config(), [{"CPU": 16.0, "GPU": 1.0}])
    assert (gpu.device, gpu.precision, gpu.num_encoders, gpu.batch_size) == ("cuda", "bf16", 1, 128)
    assert gpu.encoder_cpus + gpu.decode_cpus <= 16
    farm = embed.plan(embed.Config(), [{"CPU": 16.0}] * 4 + [{"memory": 1.0}])
    assert farm.num_encoders == 4 and farm.encoder_cpus == 15.0 and farm.encoder_threads == 16
    # a run of fewer batches than encoders starts one actor per batch: more would only load the model
    few = embed.plan(embed.Config(), [{"CPU": 16.0}] * 4, rows=70)
    assert (few.num_encoders, few.decode_tasks, few.encoder_threads) == (3, 6, 16)
    assert embed.plan(embed.Config(), [{"CPU": 16.0, "GPU": 8.0}], rows=200).num_encoders == 2
    assert embed.plan(embed.Config(num_encoders=4), [{"CPU": 16.0}] * 4, rows=70).num_encoders == 4
    # the object store budget holds enough decoded batches, or a warning names the setting
    assert embed.budget_warning(laptop) == "" and embed.budget_warning(gpu) == ""
    big = embed.plan(embed.Config(image_size=640), [{"CPU": 2.0}])
    assert big.object_store_mib > 256 and embed.budget_warning(big) == ""
    starved = embed.budget_warning(embed.plan(embed.Config(object_store_mib=16), [{"CPU": 2.0}]))
    assert "object_store_mib = 16 holds 3.5 decoded batches" in starved and "at least 56" in starved
    asked = embed.plan(embed.Config(precision="bf16", batch_size=8), [{"CPU": 2.0}])
    assert asked.precision == "bf16" and asked.batch_size == 8


# ----------------------------------------------------------------------------- sources agree


@pytest.fixture(scope="module")
def local_run(synth_dataset, offline_hub, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("embed") / "local"
    assert embed.run(cfg(dataset=str(synth_dataset), output=str(out))) == 0
    return out


def test_local_s3_and_hub_sources_give_identical_embeddings(
        local_run, synth_dataset, offline_hub, s3_prefix, caplog):
    fs, path = storage.fsspec_fs(s3_prefix)
    fs.put(str(synth_dataset), path + "/gz_euclid", recursive=True)
    with caplog.at_level(logging.INFO, logger="galaxysae"):
        assert embed.run(cfg(dataset=f"{s3_prefix}/gz_euclid", output=f"{s3_prefix}/emb")) == 0
    assert any("summary: rows in 64, embedded 64, failed 0" in r.getMessage() for r in caplog.records)
    hub_out = local_run.parent / "hub"
    assert embed.run(cfg(dataset="hf://datasets/mwalmsley/gz_euclid", output=str(hub_out))) == 0

    local = embeddings(str(local_run))
    assert len(local) == 64 and set(local) == set(input_rows(synth_dataset))
    for other in (embeddings(f"{s3_prefix}/emb"), embeddings(str(hub_out))):
        assert set(other) == set(local)
        diff = max(float(np.abs(other[i] - local[i]).max()) for i in local)
        assert diff == 0.0, f"sources disagree by {diff}"
    assert storage.exists(f"{s3_prefix}/emb/config.toml")


HUB_TOKEN = "hf_online_test_token_5f0c2e"  # the stand-in Hub refuses requests without it


def _online_env(hub, tmp_path: Path, token: str = HUB_TOKEN) -> dict:
    """A process that is online against the stand-in Hub: its own local Ray (whose workers get
    no HF_* settings but the driver's), a fresh HF cache, the token in HF_TOKEN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HOME=str(tmp_path / "hf-home"))
    return env


@pytest.fixture
def hub(synth_dataset):
    from tests.services.hub_server import HubServer

    server = HubServer({"mwalmsley/gz_euclid": synth_dataset}, token=HUB_TOKEN).start()
    yield server
    server.stop()


def test_online_hub_dataset_streams_to_the_read_tasks_at_a_pinned_commit(
        local_run, hub, offline_hub, tmp_path):
    """hf:// online: one commit for the whole run, shards read by range requests from the Hub
    (the token reaching every reader), nothing downloaded into the driver's cache, and the
    embeddings of the local-directory run."""
    out = tmp_path / "online"
    env = _online_env(hub, tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "galaxysae", "embed", "--dataset", "hf://datasets/mwalmsley/gz_euclid",
         "--output", str(out), "--encoder", f"local-dir:{offline_hub['encoder_snapshot']}",
         "--image-size", str(SIZE), "--batch-size", "16", "--encoder-threads", "2",
         "--read-unit-bytes", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    local, online = embeddings(str(local_run)), embeddings(str(out))
    assert set(online) == set(local)
    assert max(float(np.abs(online[i] - local[i]).max()) for i in local) == 0.0
    sha = hub.sha["mwalmsley/gz_euclid"]
    meta = pq.read_schema(out / "train" / "train-00000-of-00002.parquet").metadata
    assert meta[b"source_revision"].decode() == sha
    shard_reads = [r for r in hub.requests if "/resolve/" in r["path"] and r["path"].endswith(".parquet")]
    assert shard_reads and all(r["range"] and f"/resolve/{sha}/" in r["path"] for r in shard_reads)
    assert {r["path"].rsplit("/", 1)[1] for r in shard_reads} == {
        p.name for p in (Path(offline_hub["dataset_snapshot"]) / "data").glob("*.parquet")}
    # (huggingface_hub also fetches a public registry of its own, without a token: not ours)
    refused = [r["path"] for r in hub.requests if "gz_euclid" in r["path"] and not r["authorized"]]
    assert not refused, f"dataset requests reached the Hub without the token: {refused}"
    downloaded = list((tmp_path / "hf-home").rglob("*.parquet"))
    assert not downloaded, f"shards were downloaded onto the driver: {downloaded}"
    written = res.stdout + res.stderr + "".join(
        f.read_text(errors="replace") for f in out.rglob("*") if f.is_file() and f.suffix != ".parquet")
    assert HUB_TOKEN not in written


def test_online_hub_errors_name_the_dataset_and_never_the_token(hub, tmp_path):
    code = ("from galaxysae import sources\n"
            "try:\n    sources.resolve('hf://datasets/{repo}')\n"
            "except sources.SourceError as exc:\n    print(exc)\n")
    for repo, token, expect in (("mwalmsley/nope", HUB_TOKEN, "RepositoryNotFound"),
                                ("mwalmsley/gz_euclid@v9", HUB_TOKEN, "RevisionNotFound"),
                                ("mwalmsley/gz_euclid", "hf_wrong_token_3b9d", "401")):
        res = subprocess.run([sys.executable, "-c", code.format(repo=repo)], cwd=REPO, timeout=120,
                             env=_online_env(hub, tmp_path, token), capture_output=True, text=True)
        assert f"dataset hf://datasets/{repo}: cannot resolve from the Hugging Face Hub" in res.stdout, \
            res.stdout + res.stderr[-2000:]
        assert expect in res.stdout, res.stdout
        assert token not in res.stdout + res.stderr


def test_output_contract_readable_by_plain_pyarrow(local_run, offline_hub):
    shard = local_run / "train" / "train-00000-of-00002.parquet"
    code = (
        "import sys; sys.modules['ray'] = None\n"  # any import of ray would now fail
        "import json, pyarrow as pa, pyarrow.parquet as pq\n"
        f"t = pq.read_table({str(shard)!r})\n"
        "m = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}\n"
        "e = t.schema.field('embedding').type\n"
        "print(json.dumps({'fixed': pa.types.is_fixed_size_list(e), 'width': e.list_size,"
        " 'f32': e.value_type == pa.float32(), 'names': t.column_names,"
        " 'rows': t.num_rows, 'meta': m}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    info = json.loads(res.stdout)
    assert info["names"] == ["id_str", "split", "embedding"]
    assert info["fixed"] and info["f32"] and info["width"] == 640 and info["rows"] == 24
    meta = info["meta"]
    assert meta["encoder"] == ENCODER and meta["encoder_revision"] == offline_hub["encoder_revision"]
    assert "NOT the real Zoobot weights" in meta["encoder_stand_in"]
    assert meta["image_size"] == str(SIZE) and meta["precision"] == "fp32"
    assert meta["strict_jpeg"] == "true"
    assert meta["source_shard"] == "data/train-00000-of-00002.parquet" and meta["code_version"]
    assert meta["source_revision"] == ""  # a local directory has no commit


def test_embeddings_match_a_direct_single_process_forward(local_run, synth_dataset):
    got = embeddings(str(local_run))
    rows = input_rows(synth_dataset)
    ids = sorted(rows)
    model, _ = encoder.load(ENCODER, image_size=SIZE)
    pixels = np.stack([decode_image(rows[i], SIZE) for i in ids])
    ref = np.concatenate([encoder.embed(model, pixels[k:k + 8]) for k in range(0, len(ids), 8)])
    diff = float(np.abs(np.stack([got[i] for i in ids]) - ref).max())
    assert diff <= DIRECT_ATOL, f"max abs difference {diff} > {DIRECT_ATOL}"


def test_rerun_skips_done_shards_and_overwrite_redoes_them(local_run, synth_dataset, caplog):
    shard = local_run / "train" / "train-00000-of-00002.parquet"
    before = shard.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="galaxysae"):
        assert embed.run(cfg(dataset=str(synth_dataset), output=str(local_run))) == 0
    assert shard.stat().st_mtime_ns == before
    assert any("skipped shards 3" in r.getMessage() for r in caplog.records)
    test_shards = sorted((local_run / "test").glob("*.parquet"))
    test_before = {p.name: p.stat().st_mtime_ns for p in test_shards}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="galaxysae"):
        assert embed.run(cfg(dataset=str(synth_dataset), output=str(local_run), splits=["test"],
                             overwrite=True)) == 0
    assert shard.stat().st_mtime_ns == before  # only the test split was redone ...
    assert test_shards and all(p.stat().st_mtime_ns != test_before[p.name] for p in test_shards)  # ... all of it
    assert any("skipped shards 0" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- bad input


def _png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _make_bad_dataset(src: Path, dest: Path) -> dict[str, str]:
    """12 rows from the synth data: 3 undecodable, 6 odd but valid. -> id -> expected kind."""
    t = pq.read_table(src / "data" / "train-00000-of-00002.parquet").slice(0, 12)
    ids = t.column("id_str").to_pylist()
    imgs = [r["bytes"] for r in t.column("image").to_pylist()]
    base = Image.open(io.BytesIO(imgs[0])).convert("RGB")
    kinds = {}
    replace = {
        0: ("truncated", imgs[0][: len(imgs[0]) // 3]),
        1: ("zero bytes", b""),
        2: ("not an image", b"<html>404 not found</html>"),
        3: ("ok", _png(base.convert("L"))),
        4: ("ok", _png(base.convert("RGBA"))),
        5: ("ok", _png(base.convert("CMYK"), "JPEG")),
        6: ("ok", _png(Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)))),
        7: ("ok", _png(base.resize((150, 60)), "JPEG")),
        8: ("ok", _png(base.resize((2400, 2400)), "JPEG")),
    }
    for n, (kind, data) in replace.items():
        imgs[n] = data
        kinds[ids[n]] = kind
    for n in range(9, 12):
        kinds[ids[n]] = "ok"
    image_type = t.schema.field("image").type
    t = t.set_column(t.schema.get_field_index("image"), "image",
                     pa.array([{"bytes": b, "path": None} for b in imgs], image_type))
    (dest / "data").mkdir(parents=True)
    pq.write_table(t, dest / "data" / "train-00000-of-00001.parquet")
    return kinds


def test_corrupt_images_are_recorded_and_odd_ones_embedded(synth_dataset, offline_hub, ray_cluster,
                                                           tmp_path, caplog):
    kinds = _make_bad_dataset(synth_dataset, tmp_path / "bad")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="galaxysae"):
        rc = embed.run(cfg(dataset=str(tmp_path / "bad"), splits=["train"], output=str(out)))
    assert rc != 0  # 3/12 failed, over the default max_failure_fraction 0.01
    assert any("summary: rows in 12, embedded 9, failed 3" in r.getMessage() for r in caplog.records)
    got, failed = embeddings(str(out), ["train"]), failures(str(out))
    assert set(got).isdisjoint(failed) and set(got) | set(failed) == set(kinds)
    assert set(failed) == {i for i, k in kinds.items() if k != "ok"}
    for i, reason in failed.items():
        assert kinds[i] in reason, (i, reason)
    assert all(np.isfinite(v).all() and np.abs(v).sum() > 0 for v in got.values())
    t = pq.read_table(out / "_failures" / "train" / "train-00000-of-00001.parquet")
    assert t.column_names == ["id_str", "split", "shard", "reason"]
    assert set(t.column("shard").to_pylist()) == {"data/train-00000-of-00001.parquet"}
    # a rerun finds the shard done and still judges the whole output: the same exit, no work
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="galaxysae"):
        assert embed.run(cfg(dataset=str(tmp_path / "bad"), splits=["train"], output=str(out))) == 3
    assert any("output: 1 shards, 9 rows embedded, 3 failed" in r.getMessage()
               for r in caplog.records)
    assert any("summary: rows in 0, embedded 0" in r.getMessage() for r in caplog.records)
    # a finished shard written at another image size is not silently kept beside new ones
    with pytest.raises(ValueError) as err:
        embed.run(cfg(dataset=str(tmp_path / "bad"), splits=["train"], output=str(out),
                      image_size=SIZE + 16))
    assert "train-00000-of-00001.parquet" in str(err.value), err.value
    assert f"image_size: {SIZE} -> {SIZE + 16}" in str(err.value) and "--overwrite" in str(err.value)
    # tolerated when asked to: the same failures, exit 0
    assert embed.run(cfg(dataset=str(tmp_path / "bad"), splits=["train"], output=str(out),
                         overwrite=True, max_failure_fraction=0.5)) == 0
    assert failures(str(out)) == failed


def test_duplicate_ids_within_a_split_are_an_error_naming_them(synth_dataset, tmp_path):
    src = pq.read_table(synth_dataset / "data" / "train-00000-of-00002.parquet").slice(0, 4)
    (tmp_path / "dup" / "data").mkdir(parents=True)
    pq.write_table(src, tmp_path / "dup" / "data" / "train-00000-of-00002.parquet")
    pq.write_table(src.slice(2, 2), tmp_path / "dup" / "data" / "train-00001-of-00002.parquet")
    dup = src.column("id_str").to_pylist()[2:4]
    with pytest.raises(ValueError) as err:
        embed.run(cfg(dataset=str(tmp_path / "dup"), splits=["train"], output=str(tmp_path / "o")))
    assert all(d in str(err.value) for d in dup) and "'train'" in str(err.value)
    assert not (tmp_path / "o" / "train").exists()


# ----------------------------------------------------------------------------- crash and rerun


# A run SIGKILLed mid-way and rerun: tests/faults/test_embed_faults.py (at three seeded points).


# ----------------------------------------------------------------------------- two writers


@pytest.mark.slow
def test_two_runs_on_one_output_one_wins_the_other_exits_naming_it(local_run, synth_dataset,
                                                                   ray_cluster, tmp_path):
    out = tmp_path / "shared"
    args = [sys.executable, "-m", "galaxysae", "embed", "--dataset", str(synth_dataset),
            "--output", str(out), "--encoder", ENCODER, "--image-size", str(SIZE),
            "--batch-size", "16", "--encoder-threads", "2", "--read-unit-bytes", "1"]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        results.append((p.returncode, err))
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 4], [(rc, err[-2000:]) for rc, err in results]
    winner = next(p for p, (rc, _) in zip(procs, results) if rc == 0)
    loser_err = next(err for rc, err in results if rc == 4)
    assert f"output {out} is being written by another run" in loser_err
    assert f"pid {winner.pid}" in loser_err and "host " in loser_err and "started 20" in loser_err
    assert not (out / "_claim.json").exists(), "the winner must release its claim"
    # The winner's output is whole: every input id once, identical to a run on its own.
    a, b = embeddings(str(out)), embeddings(str(local_run))
    assert set(a) == set(b) and len(a) == 64
    assert max(float(np.abs(a[i] - b[i]).max()) for i in a) <= 1e-5


def test_claim_on_s3_is_exclusive_stale_ones_are_taken_over_and_a_loser_notices(s3_prefix):
    from galaxysae.claim import Claim, ClaimError

    out = f"{s3_prefix}/emb"
    first = Claim(out, stale_s=60).acquire()
    with pytest.raises(ClaimError, match=rf"output {out} is being written by another run .*"
                                         rf"pid {os.getpid()}.*started 20"):
        Claim(out, stale_s=60).acquire()
    # A claim whose heartbeat stopped (a dead run on another host) is taken over...
    first._stop.set()
    first._thread.join()
    time.sleep(1.2)
    second = Claim(out, stale_s=1.0, heartbeat_s=0.3).acquire()
    # ...and the old holder learns it lost before its next commit.
    assert "taken over by run " + second.record["run_id"] in first.check()
    time.sleep(1.0)  # the heartbeat keeps the new claim fresh past stale_s
    with pytest.raises(ClaimError):
        Claim(out, stale_s=1.0).acquire()
    second.release()
    assert not storage.exists(f"{out}/_claim.json")
    Claim(out, stale_s=60).acquire().release()


def test_8bit_batches_travel_as_uint8_and_embed_exactly_like_floats(synth_dataset, offline_hub):
    from galaxysae.decode import decode_batch, to_float
    from galaxysae.encoder import EncodeBatch

    shard = sorted((synth_dataset / "data").glob("train-*.parquet"))[0]
    table = pq.read_table(shard, columns=["id_str", "image"]).slice(0, 6)
    table = table.append_column("path", pa.array([str(shard)] * 6))
    out = decode_batch(table, image_size=SIZE)
    assert out["pixels"].dtype == np.uint8 and out["pixels"].shape == (6, 3, SIZE, SIZE)
    as_float = to_float(out["pixels"])
    for i, img in enumerate(table.column("image").to_pylist()):
        assert np.array_equal(as_float[i], decode_image(img["bytes"], SIZE))
    op = EncodeBatch(ENCODER, image_size=SIZE, device="cpu", threads=2)
    a = op(out)["embedding"]
    b = op({**out, "pixels": as_float})["embedding"]
    assert np.array_equal(a, b), "uint8 transfer must not change a single bit"
    # One failed image: the batch falls back to float32 with NaN for it, never zeros.
    bad = table.set_column(1, "image", pa.array(
        [{"bytes": b"not a jpeg", "path": None}] + table.column("image").to_pylist()[1:],
        table.schema.field("image").type))
    out = decode_batch(bad, image_size=SIZE)
    assert out["pixels"].dtype == np.float32 and np.isnan(out["pixels"][0]).all()
    assert np.array_equal(out["pixels"][1:], as_float[1:])


def test_a_finished_shard_conflicts_only_on_what_changes_its_embeddings():
    from galaxysae.shard_writer import provenance_conflicts

    sha = "a" * 40
    hub = {"encoder": ENCODER, "encoder_revision": sha, "image_size": "224",
           "strict_jpeg": "true", "source_revision": "b" * 40, "precision": "bf16"}
    # the same weights staged (repo@commit), read from another copy of the data, on a CPU
    staged = {**hub, "encoder": "local-dir:/shared/enc", "encoder_revision": f"mwalmsley/z@{sha}",
              "source_revision": "", "precision": "fp32"}
    assert provenance_conflicts(hub, staged) == []
    assert provenance_conflicts({"rows": "3"}, staged) == []  # a file from before provenance
    assert provenance_conflicts(hub, {**hub, "encoder_revision": "c" * 40}) == [
        f"encoder weights: {sha} -> {'c' * 40}"]
    assert provenance_conflicts(hub, {**hub, "source_revision": "d" * 40, "strict_jpeg": "false"}) == [
        "strict_jpeg: true -> false", f"source_revision: {'b' * 40} -> {'d' * 40}"]
    local = {**hub, "encoder": "local-dir:/a", "encoder_revision": "local"}
    assert provenance_conflicts(local, {**local, "encoder": "local-dir:/b"}) == [
        "encoder weights: local-dir:/a (local) -> local-dir:/b (local)"]


def test_a_claim_held_on_another_host_is_watched_not_fatal(tmp_path, caplog):
    """A rerun on a new pod or container cannot check the old holder's pid: it waits while the
    heartbeat stands still and takes over once it is stale; a live holder's moving heartbeat
    stops it."""
    import json
    import threading

    from galaxysae.claim import Claim, ClaimError

    def held(out, beat: float) -> dict:
        rec = {"run_id": "elsewhere", "host": "another-pod", "pid": 1, "slurm_job": "",
               "started": "2026-11-30T00:00:00+00:00", "heartbeat": time.time(), "heartbeat_s": beat}
        (out / "_claim.json").write_text(json.dumps(rec))
        return rec

    dead = tmp_path / "dead"
    dead.mkdir()
    held(dead, 0.4)
    with caplog.at_level(logging.WARNING, logger="galaxysae"):
        claim = Claim(str(dead), stale_s=2.0).acquire()
    said = [r.getMessage() for r in caplog.records]
    assert any("claimed by run elsewhere on host another-pod" in m and "waiting up to" in m for m in said)
    # taken over only once its heartbeat was stale, not at first sight
    assert any(re.search(r"taking over .*heartbeat \d+ s old \(stale after 2 s\)", m) for m in said), said
    assert json.loads((dead / "_claim.json").read_text())["run_id"] == claim.record["run_id"]
    claim.release()

    live = tmp_path / "live"
    live.mkdir()
    rec, stop = held(live, 0.4), threading.Event()

    def beat():
        while not stop.wait(0.4):
            rec["heartbeat"] = time.time()
            (live / "_claim.tmp").write_text(json.dumps(rec))
            os.replace(live / "_claim.tmp", live / "_claim.json")  # atomic, as storage writes

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(ClaimError, match="host another-pod"):
            Claim(str(live), stale_s=30.0).acquire()
    finally:
        stop.set()
        thread.join()
