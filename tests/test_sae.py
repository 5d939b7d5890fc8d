"""The pure-torch SAE: sparsity, batch independence, fast == dense, artifact round trip, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from galaxysae import config, evaluation, sae
from galaxysae import train as train_job
from galaxysae.embeddings import planted
from galaxysae.sae import SAEConfig, SparseAutoencoder, _batch_topk


def make(seed=0, d=24, **kw) -> tuple[SparseAutoencoder, torch.Tensor]:
    torch.manual_seed(seed)
    base = dict(d_in=d, n_latents=96, k=5)
    base.update(kw)
    model = SparseAutoencoder(SAEConfig(**base))
    x = torch.randn(64, d) * torch.linspace(0.5, 3, d) + 2.0
    model.init_from_data(x)
    return model, x


def short_fit(model, x, steps=20, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        model.remove_parallel_grads()
        opt.step()
        model.normalize_decoder()
    return model.eval()


def test_topk_exactly_k_nonzeros_per_sample():
    model, x = make(k=7)
    codes = model.encode(x)
    assert codes.shape == (64, 96)
    assert ((codes != 0).sum(1) == 7).all()
    assert (codes >= 0).all()
    out = model(x)
    assert float(out.l0) == 7.0


def test_batchtopk_code_of_a_sample_does_not_depend_on_its_batch():
    model, x = make(activation="batchtopk", k=4)
    short_fit(model, x, steps=150)
    assert float(model.threshold) > 0  # learned during training
    alone = torch.cat([model.encode(x[i:i + 1]) for i in range(len(x))])
    g = torch.Generator().manual_seed(3)
    for size in (2, 7, 64):
        perm = torch.randperm(len(x), generator=g)
        together = torch.cat([model.encode(x[perm[i:i + size]]) for i in range(0, len(x), size)])
        # same active latents; values equal up to the matmul's batch-size-dependent rounding
        assert torch.equal(together > 0, alone[perm] > 0)
        torch.testing.assert_close(together, alone[perm], rtol=1e-5, atol=1e-6)
    # about k active on average: the threshold tracks the batch-level selection
    assert 2 <= (alone > 0).sum(1).float().mean() <= 8


FAST_PATH_CONFIGS = [
    dict(activation="topk", multik=20, multik_coeff=0.125, aux_k=6, aux_coeff=0.03, dead_steps=0),
    dict(activation="batchtopk", matryoshka_groups=[8, 8, 16, 64], aux_k=10, aux_coeff=0.03,
         dead_steps=0, l1_coeff=1e-3),
    dict(activation="topk", matryoshka_groups=[32, 64], matryoshka_weights=[2.0, 1.0]),
]


@pytest.mark.parametrize("variants", ["cpu", "accelerator"])
@pytest.mark.parametrize("kw", FAST_PATH_CONFIGS)
def test_fast_path_equals_dense_path(kw, variants, monkeypatch):
    if variants == "accelerator":  # the GPU variants (sort, topk, index_add_), run on the CPU
        monkeypatch.setattr(sae, "_host_paths", lambda t: False)
        monkeypatch.setattr(sae, "_DOT_BLOCK", 37)  # the gathered dot products, several blocks
    model, x = make(**kw)
    model = model.double()
    x = x.double()
    results = []
    for dense in (False, True):
        model.zero_grad()
        model.eval()  # no state update between the two passes
        out = model(x, dense=dense)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast, gf), (ref, gd) = results
    for name in fast._fields:
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-10, atol=1e-12)
    for name in gd:
        assert gf[name].abs().sum() > 0, name
        torch.testing.assert_close(gf[name], gd[name], rtol=1e-9, atol=1e-12)
    if kw.get("aux_k"):
        assert float(fast.aux.detach()) > 0  # every latent counts as dead: the aux path really ran


@pytest.mark.parametrize("dense", [False, True])
def test_aux_loss_is_zero_while_no_latent_is_dead(dense):
    """Latents near death run the aux path (sized at the last look), but none is dead yet: the
    aux term is 0, not the residual's MSE added to the logged loss."""
    model, x = make(aux_k=6, aux_coeff=0.5, dead_steps=8)
    model.train()
    model.steps_since_active.fill_(6)  # within dead_steps/4 of dead, none dead
    out = model(x, dense=dense)
    assert model._aux_k == 6  # the aux path ran
    assert float(out.aux.detach()) == 0
    assert float(out.loss.detach()) == pytest.approx(float(out.recon.detach()))
    model.steps_since_active[:3] = 8  # three dead now: a real aux term again
    assert float(model(x, dense=dense).aux.detach()) > 0


# Ops that copy a value from the device to the host (a CUDA sync that stops Python queueing
# kernels): item()/int()/bool() of a tensor, data-dependent output sizes, torch's CUDA bincount.
HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.bincount",
              "aten.equal", "aten.is_nonzero", "aten.allclose", "aten._unique2",
              "aten.unique_consecutive", "aten.unique_dim", "aten.repeat_interleave.Tensor"}


@pytest.mark.parametrize("kw", FAST_PATH_CONFIGS)
def test_accelerator_training_step_reads_nothing_back(kw, monkeypatch):
    """A whole production step (forward, backward, clipping, fused AdamW, renorm) through the
    accelerator variants, with every aten op recorded: none of them reads a value back."""
    from torch.optim.lr_scheduler import LambdaLR
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(sae, "_host_paths", lambda t: False)
    kw = {**kw, "dead_steps": 8} if kw.get("aux_k") else kw  # the dead-latent look: every 2 steps
    model, x = make(**kw)
    # train_step reads only the optim section; the model is the one made above
    cfg = config.from_dict(train_job.Config, dict(embeddings="e", output="o", model=dict(
        n_latents=96, k=5, multik=0, aux_k=0), optim=dict(grad_clip=1.0)))
    opt = train_job.make_optimizer(cfg, model)
    sched = LambdaLR(opt, lambda _: 1.0)
    model.train()
    model.steps_since_active.fill_(100)  # every latent dead: the aux path runs
    train_job.train_step(cfg, model, opt, sched, x)  # the periodic dead-latent look (a sync)

    seen: dict[str, int] = {}  # host reads
    ops: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)  # e.g. aten.nonzero.default
            if name in HOST_READS or name.rsplit(".", 1)[0] in HOST_READS:
                seen[name] = seen.get(name, 0) + 1
            if func.overloadpacket is torch.ops.aten.index and any(
                    i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                seen["boolean mask index"] = seen.get("boolean mask index", 0) + 1  # a nonzero inside
            ops.add(name)
            return func(*args, **(kwargs or {}))

    with Record():
        out = train_job.train_step(cfg, model, opt, sched, x)
    assert {"aten._fused_adamw_.default", "aten.topk.default"} <= ops, sorted(ops)  # it recorded
    if kw.get("aux_k"):
        assert float(out.aux.detach()) > 0  # the aux path ran inside the recorded step
    assert not seen, seen


def _reference_batch_topk(pre, n):
    """The plain rule: the n largest entries of pre, those > 0, in flat index order."""
    vals, idx = pre.flatten().topk(n)
    idx = idx[vals > 0].sort().values
    return idx, pre.flatten()[idx]


@pytest.mark.parametrize("case", ["gaussian", "few_positive", "biased_sample", "hot_rows", "ties"])
def test_batch_topk_selection_is_exact(case):
    g = torch.Generator().manual_seed(7)
    B, M, k = 256, 2048, 64
    pre = torch.randn(B, M, generator=g)
    if case == "few_positive":  # fewer than k*B positives: only those are kept
        pre = pre - 3.5
    elif case == "biased_sample":  # the strided sample sees only huge values: its bound is
        pre.view(-1)[::65] += 100.0  # far too high and the exact fallback must decide
    elif case == "hot_rows":  # the selection concentrates in a few rows
        pre[:8] += 10.0
    elif case == "ties":
        pre = torch.round(pre * 4) / 4
    idx, vals = _batch_topk(pre, k * B)
    ref_idx, ref_vals = _reference_batch_topk(pre, k * B)
    if case == "ties":  # every entry equal to the n-th largest value is kept
        thr = ref_vals.min()
        assert torch.equal(idx, (pre.flatten() >= thr).nonzero().squeeze(1))
    else:
        assert torch.equal(idx, ref_idx)
        assert torch.equal(vals, ref_vals)
    if case == "few_positive":
        assert idx.numel() == int((pre > 0).sum()) < k * B


def test_decode_of_encode_matches_forward_reconstruction():
    model, x = make(matryoshka_groups=[16, 80])
    model.eval()
    with torch.no_grad():
        out = model(x)
        x_hat = model.decode(model.encode(x))
        torch.testing.assert_close(model.standardize(x_hat), out.x_hat, rtol=1e-4, atol=1e-4)
        first = model.decode(model.encode(x), level=0)
        assert not torch.allclose(first, x_hat)


def test_decoder_rows_stay_unit_norm_and_parallel_gradient_is_removed():
    model, x = make()
    out = model(x)
    out.loss.backward()
    model.remove_parallel_grads()
    along = (model.W_dec.grad * model.W_dec).sum(1)
    assert along.abs().max() < 1e-5
    short_fit(model, x, steps=5)
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(96))


def test_inputs_are_standardised_inside_and_bias_starts_at_the_median():
    model, x = make()
    z = (x - x.mean(0)) / x.std(0)
    torch.testing.assert_close(model.b_pre.data, z.median(0).values)
    torch.testing.assert_close(model.mean, x.mean(0))
    # tied init: encoder = decoder^T
    fresh = SparseAutoencoder(SAEConfig(d_in=8, n_latents=16, k=2))
    assert torch.equal(fresh.W_enc.data, fresh.W_dec.data)


def test_a_constant_dimension_is_standardised_by_one():
    """A dimension constant in the training sample (exactly, or up to float32 rounding of a large
    value) divides by 1, not by a floor of 1e-6: a jitter of 1e-3 at test time stays 1e-3 in z,
    not 1000. A small but real spread is kept."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    x[:, 1] = 5.0  # exactly constant
    ulp = float(np.spacing(np.float32(1000.0)))
    x[:, 2] = 1000.0 + ulp * (torch.rand(256, generator=g) > 0.5)  # constant up to rounding
    x[:, 3] = 1e-4 * torch.randn(256, generator=g)  # small, but information
    model = SparseAutoencoder(SAEConfig(d_in=5, n_latents=16, k=2))
    model.init_from_data(x)
    assert model.std[1] == 1 and model.std[2] == 1
    torch.testing.assert_close(model.std[[0, 3, 4]], x.std(0)[[0, 3, 4]])
    test = x[:8].clone()
    test[:, 1:3] += 1e-3
    z = model.standardize(test)
    assert z[:, 1:3].abs().max() < 0.01, z[:, 1:3]


def _roundtrip(model, where, x):
    model.save(where)
    back = SparseAutoencoder.load(where)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert back.cfg == model.cfg
    assert torch.equal(back.encode(x), model.encode(x))
    return back


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, x = make(activation="batchtopk", matryoshka_groups=[32, 64], aux_k=4, aux_coeff=0.1)
    short_fit(model, x, steps=3)
    back = _roundtrip(model, str(tmp_path / "sae"), x)
    assert back.n_latents == 96 and back.d_in == 24
    import json

    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["kind"] == "sae" and cfg["matryoshka_groups"] == [32, 64]


def test_save_load_round_trip_on_s3(s3_prefix):
    model, x = make()
    _roundtrip(model, f"{s3_prefix}/sae", x)


def test_bad_configs_and_missing_artifacts_are_named(tmp_path):
    with pytest.raises(ValueError, match="matryoshka_groups"):
        SAEConfig(d_in=8, n_latents=16, k=2, matryoshka_groups=[4, 4])
    with pytest.raises(ValueError, match="activation"):
        SAEConfig(d_in=8, n_latents=16, k=2, activation="relu")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        SparseAutoencoder.load(str(tmp_path / "nothing"))


def _train_planted(activation, groups=(), epochs=40, seed=1):
    x, atoms = planted(4000, 64, 64, 4, seed=seed, offset=0.5)
    model_cfg = dict(n_latents=64, k=4, activation=activation, multik=0, aux_k=16, aux_coeff=0.25,
                     dead_steps=20, matryoshka_groups=list(groups))
    cfg = config.from_dict(train_job.Config, dict(
        embeddings="planted", output="unused", epochs=epochs, batch_size=128, log_every=10**6,
        seed=seed, model=model_cfg, optim=dict(lr=1e-2)))
    init = train_job.init_stats(cfg, x[:3600])
    model, _ = train_job.run_local(cfg, x[:3600], init, checkpoints=False)
    return model, x, atoms


def test_planted_dictionary_is_recovered():
    model, x, atoms = _train_planted("topk")
    # decoder rows live in the standardised space: map back to raw directions
    w = (model.W_dec.detach() * model.std).numpy()
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    mean_max_cos = float((atoms @ w.T).max(1).mean())
    metrics = evaluation.evaluate(model, x[3600:], x[:3600])
    assert mean_max_cos >= 0.9, mean_max_cos
    assert metrics["dead_fraction"] <= 0.01, metrics["dead_fraction"]
    assert metrics["fvu"] < metrics["pca"]["fvu"]


def test_matryoshka_fvu_does_not_increase_with_level():
    model, x, _ = _train_planted("batchtopk", groups=[8, 8, 16, 32], epochs=20)
    metrics = evaluation.evaluate(model, x[3600:], x[:3600])
    fvus = [lv["fvu"] for lv in metrics["levels"]]
    assert len(fvus) == 4
    assert all(b <= a + 1e-9 for a, b in zip(fvus, fvus[1:])), fvus
    assert fvus[-1] < 0.5 * fvus[0]


class _HostReads:
    """Records the HOST_READS ops run inside it (``seen``: their names)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func) in HOST_READS or str(func).rsplit(".", 1)[0] in HOST_READS:
                    seen.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Record()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _data_parallel_step(rank: int, world: int, port: int, out: str) -> None:
    """One training forward of the same model on this rank's share of the batch (gloo, CPU)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for activation in ("topk", "batchtopk"):
            model, x = make(activation=activation, dead_steps=4)
            model.train()
            model(x[rank::world])
            torch.save({"steps": model.steps_since_active, "threshold": model.threshold},
                       f"{out}/{activation}-{rank}.pt")
        # BatchTopK's threshold over rows that differ between the workers (ordered by norm, a
        # block each), by the CPU's selection and then by the accelerators' (on the CPU: this
        # is a process of its own)
        for variant in ("cpu", "accelerator"):
            if variant == "accelerator":
                sae._host_paths = lambda t: False
            model, x = make(activation="batchtopk", dead_steps=4)
            model.train()
            rows = x[x.norm(dim=1).argsort()]
            with _HostReads() as reads:  # the accelerator variant reads nothing back
                model(rows[rank * len(x) // world:(rank + 1) * len(x) // world])
            torch.save({"threshold": model.threshold, "reads": reads.seen},
                       f"{out}/ordered-{variant}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_workers_count_a_latent_alive_if_it_fired_on_any_of_them(tmp_path):
    """Under DDP each worker sees a share of the batch: the dead-latent counters (AuxK) and the
    BatchTopK threshold come from the whole batch, identical on every worker, as in one process;
    else a latent firing on another worker's share would count as dead here."""
    import torch.multiprocessing as mp

    from tests.services.ports import free_block

    world = 2
    mp.spawn(_data_parallel_step, args=(world, free_block(1), str(tmp_path)), nprocs=world, join=True)
    for activation in ("topk", "batchtopk"):
        ranks = [torch.load(tmp_path / f"{activation}-{r}.pt") for r in range(world)]
        assert torch.equal(ranks[0]["steps"], ranks[1]["steps"])
        assert torch.equal(ranks[0]["threshold"], ranks[1]["threshold"])
        alone, x = make(activation=activation, dead_steps=4)  # what rank 0 alone would count
        alone.train()
        alone(x[0::world])
        assert (ranks[0]["steps"] == 0).sum() > (alone.steps_since_active == 0).sum()  # rank 1's too
        whole, _ = make(activation=activation, dead_steps=4)  # the whole batch in one process
        whole.train()
        whole(x)
        if activation == "topk":  # per-sample top-k: the same firing
            assert torch.equal(whole.steps_since_active, ranks[0]["steps"])
        else:  # the cutoff of the top k*B of the whole batch, not below it (L0 above k)
            torch.testing.assert_close(ranks[0]["threshold"], whole.threshold)
    for variant in ("cpu", "accelerator"):
        ranks = [torch.load(tmp_path / f"ordered-{variant}-{r}.pt") for r in range(world)]
        assert torch.equal(ranks[0]["threshold"], ranks[1]["threshold"])
        torch.testing.assert_close(ranks[0]["threshold"], whole.threshold)
        if variant == "accelerator":
            assert ranks[0]["reads"] == ranks[1]["reads"] == [], ranks[0]["reads"]
        else:  # the recording saw the CPU variant's host reads: it works inside a collective step
            assert ranks[0]["reads"]


# BatchTopK on rows whose halves differ strongly: the first half's spread tripled after the
# standardisation stats were taken, so most of the batch's top k*B entries fall in its rows
BATCHTOPK_DP = {"plain": dict(), "matryoshka": dict(matryoshka_groups=[16, 16, 64], l1_coeff=1e-3)}


def _split_batch(kw):
    model, x = make(activation="batchtopk", **kw)
    x = x.clone()
    x[:32] = (x[:32] - model.mean) * 3 + model.mean
    return model.double(), x.double()


def _batchtopk_worker(rank: int, world: int, port: int, out: str) -> None:
    """A training forward and backward of the same model on this rank's half of the split batch
    (gloo, CPU), by the CPU's selection and then by the accelerators' (a process of its own)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for variant in ("cpu", "accelerator"):
            if variant == "accelerator":
                sae._host_paths = lambda t: False
            for name, kw in BATCHTOPK_DP.items():
                model, x = _split_batch(kw)
                B = len(x) // world
                mine = x[rank * B:(rank + 1) * B]
                model.train()
                res = model(mine)
                res.loss.backward()
                # the entries this rank's selection keeps, as flat indices of the whole batch
                idx, vals, _ = sae._global_batch_topk(model.pre_acts(mine).detach(), model.cfg.k * B,
                                                     world)
                torch.save({"x_hat": res.x_hat.detach(), "l0": res.l0, "threshold": model.threshold,
                            "entries": idx[vals > 0] + rank * B * model.n_latents,
                            "grads": {n: p.grad for n, p in model.named_parameters()}},
                           f"{out}/{variant}-{name}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_batchtopk_selects_what_one_process_selects_on_the_whole_batch(tmp_path):
    """Under DDP, BatchTopK (plain and Matryoshka) keeps the top k*B of ALL workers' rows: the
    union of the workers' entries is one process's selection on the concatenated batch, and so
    are the reconstructions, L0, the threshold and the averaged gradients, not a top k*B/world
    forced into each worker's rows whatever they hold."""
    import torch.multiprocessing as mp

    from tests.services.ports import free_block

    world = 2
    mp.spawn(_batchtopk_worker, args=(world, free_block(1), str(tmp_path)), nprocs=world, join=True)
    for name, kw in BATCHTOPK_DP.items():
        whole, x = _split_batch(kw)
        whole.train()
        ref = whole(x)
        ref.loss.backward()
        ref_idx, _ = _batch_topk(whole.pre_acts(x).detach(), whole.cfg.k * len(x))
        per_row = torch.bincount(ref_idx // whole.n_latents, minlength=len(x))
        first, second = int(per_row[:32].sum()), int(per_row[32:].sum())
        assert first > 2 * second, (first, second)  # the halves differ strongly
        for variant in ("cpu", "accelerator"):
            ranks = [torch.load(tmp_path / f"{variant}-{name}-{r}.pt") for r in range(world)]
            union = torch.cat([r["entries"] for r in ranks]).sort().values
            assert torch.equal(union, ref_idx), (variant, name)
            torch.testing.assert_close(torch.cat([r["x_hat"] for r in ranks]), ref.x_hat.detach())
            assert float(sum(r["l0"] for r in ranks) / world) == pytest.approx(float(ref.l0))
            for r in ranks:
                torch.testing.assert_close(r["threshold"], whole.threshold)
            for p_name, p in whole.named_parameters():  # DDP's mean of the workers' gradients
                mean = sum(r["grads"][p_name] for r in ranks) / world
                torch.testing.assert_close(mean, p.grad, rtol=1e-9, atol=1e-12,
                                           msg=f"{variant} {name} {p_name}")
