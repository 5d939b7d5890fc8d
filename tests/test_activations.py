"""activations.compute, write_activations and code_matrix against plain references from dense codes.

The dictionaries are built by hand so their codes are known: a Matryoshka TopK SAE whose encoder
is the identity (codes = the k largest of x, clamped at 0) and a PCA whose components are the
identity (scores = x). Each galaxy's inputs are distinct within the galaxy (TopK has no ties to
break) but repeat across galaxies, so every feature has ties; one feature is never active (never
among an SAE's top k; a negative score for every galaxy under PCA).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from galaxysae import activations, dictionary, storage

M, K, TOP_N, NEVER = 16, 4, 5, 5  # latents, SAE k, top_n, the feature never active
GROUPS = [4, 4, 8]  # Matryoshka levels 4, 8, 16


def inputs(n: int, seed: int = 0) -> np.ndarray:
    """x[n, M]: each row a permutation of 16 half-integer levels plus a row offset (distinct within
    a row, ties across rows); feature NEVER far below every other input."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.permutation(M) - 7.5 for _ in range(n)]) + rng.integers(0, 3, (n, 1)) * 0.5
    x[:, NEVER] = -100.0 - np.arange(n) * 0.25
    return x.astype(np.float32)


def make_sae(path) -> dictionary.Dictionary:
    import torch

    from galaxysae.sae import SAEConfig, SparseAutoencoder

    model = SparseAutoencoder(SAEConfig(d_in=M, n_latents=M, k=K, matryoshka_groups=GROUPS))
    with torch.no_grad():
        model.W_enc.copy_(torch.eye(M))
        model.b_enc.zero_()
        model.b_pre.zero_()
    model.save(str(path))
    return dictionary.load(str(path))


def make_pca(path) -> dictionary.Dictionary:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    pca = dictionary.PCA(np.eye(M), np.zeros(M), np.ones(M), np.linspace(2, 1, M))
    save_file(pca.tensors(), str(path / dictionary.PCA_WEIGHTS))
    (path / "cfg.json").write_text(json.dumps({"kind": "pca"}))
    return dictionary.load(str(path))


def reference(codes: np.ndarray, ids: list[str], signed: bool, levels: list[int]):
    """(activation rows, features rows) as the contract says, by plain Python from dense codes
    whose galaxies are in arrival order: rows sorted by feature, then value descending, ties in
    arrival order (Python's sort is stable); top_n highest per feature, and for a signed
    dictionary the top_n lowest, lowest first (ties in reverse arrival order, the tail of the
    sorted rows read backwards)."""
    n, m = codes.shape
    rows = sorted(((ids[g], f, float(codes[g, f])) for g in range(n) for f in range(m)
                   if signed or codes[g, f] != 0), key=lambda r: (r[1], -r[2]))
    feats = []
    for f in range(m):
        run = [r for r in rows if r[1] == f]
        vals = [v for _, _, v in run]
        active = [v for v in vals if (v > 0 if signed else v != 0)]
        low = run[::-1][:TOP_N] if signed else []
        feats.append({
            "feature": f, "level": 1 + sum(f >= e for e in levels), "n_active": len(active),
            "frequency": len(active) / n, "mean": sum(vals) / n,
            "mean_active": sum(active) / len(active) if active else math.nan,
            "max": max(vals) if vals else math.nan,
            "top_ids": [i for i, _, _ in run[:TOP_N]], "top_values": vals[:TOP_N],
            "bottom_ids": [i for i, _, _ in low], "bottom_values": [v for _, _, v in low]})
    return rows, feats


def assert_features_equal(got: list[dict], want: list[dict], ties_in_any_order: bool = False,
                          codes: np.ndarray | None = None, index: dict | None = None) -> None:
    """Every column equal (sums to rounding); with ``ties_in_any_order`` (Ray hands batches over
    in no fixed order) the listed galaxies must have exactly the listed values, which must be
    the reference's, and only galaxies tied at the cut may differ from it."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        f = w["feature"]
        for key in ("feature", "level", "n_active", "frequency"):
            assert g[key] == w[key], (f, key, g[key], w[key])
        for key in ("mean", "mean_active", "max"):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9, nan_ok=True), (f, key)
        for side in ("top", "bottom"):
            assert g[f"{side}_values"] == pytest.approx(w[f"{side}_values"]), (f, side)
            if not ties_in_any_order:
                assert g[f"{side}_ids"] == w[f"{side}_ids"], (f, side)
                continue
            listed = [float(codes[index[i], f]) for i in g[f"{side}_ids"]]
            assert listed == pytest.approx(g[f"{side}_values"]) and len(set(g[f"{side}_ids"])) == len(listed)
            cut = listed[-1] if listed else None
            assert ({i for i in g[f"{side}_ids"] if codes[index[i], f] != cut}
                    == {i for i in w[f"{side}_ids"] if codes[index[i], f] != cut}), (f, side)


def nan_safe(rows: list[dict]) -> list[dict]:
    return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def batches_of(codes: np.ndarray, ids: list[str], signed: bool, size: int):
    """Ray-like batches of the codes, galaxies in order: what Encode emits for each batch."""
    for s in range(0, len(codes), size):
        c, i = codes[s:s + size], np.asarray(ids[s:s + size], dtype=object)
        rows, feats = np.indices(c.shape).reshape(2, -1) if signed else np.nonzero(c)
        yield pa.table({"id_str": pa.array(list(i[rows]), pa.string()),
                        "feature": pa.array(feats.astype(np.int32)),
                        "value": pa.array(c[rows, feats].astype(np.float32))})


@pytest.mark.parametrize("signed", [False, True], ids=["topk", "pca"])
@pytest.mark.parametrize("spill", [(1 << 19, 256), (7, 3)], ids=["one_group", "many_groups"])
def test_write_activations_equals_the_reference_with_ties_in_arrival_order(tmp_path, monkeypatch, signed, spill):
    """The driver's side alone, batches in a known order: every column and every tie exact."""
    monkeypatch.setattr(activations, "SPILL_ROWS", spill[0])
    monkeypatch.setattr(activations, "SPILL_FILES", spill[1])
    n = 45
    x = inputs(n)
    codes = x if signed else np.where(x >= np.sort(x, axis=1)[:, -K:-K + 1], np.maximum(x, 0), 0)
    ids = [f"g{i:03d}" for i in np.random.default_rng(1).permutation(n)]  # not in id order
    rows, feats = reference(codes, ids, signed, [4, 8, 16])
    stats, n_rows = activations.write_activations(batches_of(codes, ids, signed, 8), str(tmp_path), n, M,
                                                  [4, 8, 16], TOP_N, signed)
    table = pq.read_table(tmp_path / "activations.parquet")
    assert table.schema == pa.schema([("id_str", pa.string()), ("feature", pa.int32()), ("value", pa.float32())])
    assert n_rows == table.num_rows == len(rows)
    assert list(zip(*(table.column(c).to_pylist() for c in ("id_str", "feature", "value")))) == rows
    assert_features_equal(stats.to_pylist(), feats)
    assert stats.column("n_active")[NEVER].as_py() == 0 and (signed or stats.column("top_ids")[NEVER].as_py() == [])
    # the features table as it was: the same schema (list<string> / list<float32> items)
    assert stats.schema.field("top_ids").type == pa.list_(pa.string())
    assert stats.schema.field("bottom_values").type == pa.list_(pa.float32())
    if not signed:
        assert stats.column("bottom_ids").to_pylist() == [[]] * M


def test_the_driver_sorts_one_bounded_group_of_features_at_a_time(tmp_path, monkeypatch):
    """What keeps the driver's memory flat: groups of consecutive feature ranges of at most
    SPILL_ROWS rows (more only for a single range), in feature order, covering every feature."""
    monkeypatch.setattr(activations, "SPILL_ROWS", 500)
    monkeypatch.setattr(activations, "SPILL_FILES", 8)  # ranges of 2 features: 240 rows each
    seen = []
    add = activations._FeatureStats.add
    monkeypatch.setattr(activations._FeatureStats, "add",
                        lambda self, lo, hi, g, f, v: seen.append((lo, hi, len(f))) or add(self, lo, hi, g, f, v))
    x = inputs(120, seed=6)
    activations.write_activations(batches_of(x, [f"g{i}" for i in range(120)], True, 32), str(tmp_path), 120,
                                  M, [M], TOP_N, True)
    assert [lo for lo, _, _ in seen] == [0] + [hi for _, hi, _ in seen[:-1]] and seen[-1][1] == M
    assert [rows for _, _, rows in seen] == [480] * 4  # two ranges a group: three would be 720
    assert sum(rows for _, _, rows in seen) == 120 * M


def test_a_signed_dictionary_missing_galaxies_is_an_error(tmp_path):
    x = inputs(10)
    ids = [f"g{i}" for i in range(10)]
    with pytest.raises(RuntimeError, match="encoded 10 galaxies of 11 in here"):
        activations.write_activations(batches_of(x, ids, True, 4), str(tmp_path), 11, M, [M], TOP_N, True,
                                      "here")
    assert not (tmp_path / "activations.parquet").exists()


def test_code_matrix_equals_the_dense_codes_for_the_ids_asked(tmp_path):
    n = 30
    x = inputs(n, seed=2)
    codes = np.where(x >= np.sort(x, axis=1)[:, -K:-K + 1], np.maximum(x, 0), 0)
    codes[3, 0] = codes[4, 1] = 0.0
    ids = [f"g{i:03d}" for i in range(n)]
    activations.write_activations(batches_of(codes, ids, False, 7), str(tmp_path), n, M, [M], TOP_N, False)
    # another order, an id never encoded, and a repeated id (its last row holds its codes, as a
    # dict {id: row} gives; the first stays empty)
    asked = ids[::-1][:20] + ["not-encoded", ids[25]]
    m = activations.code_matrix(str(tmp_path), asked, M)
    want = np.stack([codes[ids.index(i)] if i in ids else np.zeros(M) for i in asked])
    want[asked.index(ids[25])] = 0
    assert m.shape == (len(asked), M) and m.dtype == np.float32
    np.testing.assert_array_equal(m.toarray(), want)
    assert m.nnz == np.count_nonzero(want)


@pytest.mark.parametrize("kind", ["topk", "pca"])
def test_compute_equals_the_reference_from_the_dense_codes(ray_cluster, s3_prefix, tmp_path, monkeypatch, kind):
    """The whole job on Ray Data (3 files, batches of 8): both files as the contract says, for
    a Matryoshka TopK SAE (written locally) and a PCA (written to S3); code_matrix gives the
    codes back; a second run reuses the outputs."""
    from galaxysae import atlas, config
    from galaxysae.embeddings import write_parquet

    monkeypatch.setattr(activations, "SPILL_ROWS", 40)  # several groups of feature ranges
    monkeypatch.setattr(activations, "SPILL_FILES", 6)
    n = 60
    x = inputs(n, seed=3)
    ids = [f"EUC_{i:04d}" for i in np.random.default_rng(4).permutation(n)]
    write_parquet(str(tmp_path / "emb"), "test", ids, x, n_files=3)
    d = make_sae(tmp_path / "sae") if kind == "topk" else make_pca(tmp_path / "pca")
    codes = d.encode(x)
    assert (codes == (x if d.signed else np.where(x >= np.sort(x, axis=1)[:, -K:-K + 1], x, 0))).all()
    out = str(tmp_path / "results" / kind / "activations" / "test") if kind == "topk" else s3_prefix
    res = activations.compute(d, str(tmp_path / "emb"), "test", out, top_n=TOP_N, batch_size=8)
    rows, feats = reference(codes, ids, d.signed, d.levels)

    table = activations.load_activations(out)
    got = list(zip(*(table.column(c).to_pylist() for c in ("id_str", "feature", "value"))))
    order = [(f, -v) for _, f, v in got]
    assert order == sorted(order)  # by feature, then value descending
    assert sorted(got) == sorted(rows) and len(got) == (n * M if d.signed else n * K)
    index = {s: i for i, s in enumerate(ids)}
    written = activations.load_features(out).to_pylist()
    assert nan_safe(written) == nan_safe(res.features.to_pylist()) and res.n_galaxies == n
    assert_features_equal(written, feats, ties_in_any_order=True, codes=codes, index=index)
    assert written[NEVER]["n_active"] == 0 and math.isnan(written[NEVER]["mean_active"])
    assert [r["level"] for r in written] == ([1] * 4 + [2] * 4 + [3] * 8 if kind == "topk" else [1] * M)
    done = json.loads(storage.read_bytes(storage.join(out, "_SUCCESS")))
    assert done["n_activations"] == len(rows) and done["n_galaxies"] == n

    m = activations.code_matrix(out, ids, M)
    np.testing.assert_array_equal(m.toarray(), codes)

    stamp = storage.stamp(storage.join(out, "activations.parquet"))
    again = activations.compute(d, str(tmp_path / "emb"), "test", out, top_n=TOP_N, batch_size=8)
    assert storage.stamp(storage.join(out, "activations.parquet")) == stamp
    assert nan_safe(again.features.to_pylist()) == nan_safe(written)

    if kind == "topk":  # the atlas's histograms from this file, and from one not sorted by feature
        results = tmp_path / "results"
        (results / kind / "dictionary.json").write_text(json.dumps({"n_latents": M, "split": "test"}))
        cfg = config.from_dict(atlas.Config, {"results": str(results), "output": str(tmp_path / "site")})
        want = {f: sorted(v for _, g, v in rows if g == f) for f in range(M)}
        want = {f: v for f, v in want.items() if v}
        hist = atlas.load_entry(str(results), kind, cfg).histograms
        assert {f: sorted(v.tolist()) for f, v in hist.items()} == want
        shuffled = table.take(np.random.default_rng(5).permutation(table.num_rows))
        pq.write_table(shuffled, f"{out}/activations.parquet")
        hist = atlas.load_entry(str(results), kind, cfg).histograms
        assert {f: sorted(v.tolist()) for f, v in hist.items()} == want


def test_an_actor_that_would_leave_no_cpu_to_the_reads_is_refused_not_left_waiting(ray_cluster, tmp_path):
    """cpus_per_actor = every CPU of the node: the encode actor would start and Ray Data's read
    tasks (1 CPU each) never could, a job waiting for ever without a word; refused at once,
    naming the key and the cluster."""
    from galaxysae import cluster
    from galaxysae.embeddings import write_parquet

    write_parquet(str(tmp_path / "emb"), "test", [f"g{i}" for i in range(8)], inputs(8), n_files=1)
    d = make_sae(tmp_path / "sae")
    cluster.connect()
    cpus = int(max(n.get("CPU", 0) for n in cluster.alive_nodes()))
    with pytest.raises(cluster.ResourceError, match=f"cpus_per_actor={cpus} .*Lower cpus_per_actor"):
        activations.compute(d, str(tmp_path / "emb"), "test", str(tmp_path / "out"), cpus_per_actor=cpus)
    assert not (tmp_path / "out").exists()
