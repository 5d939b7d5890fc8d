"""evaluation.evaluate: the sparse decode gives the metrics of the original dense evaluation.

The reference is the original dense implementation, kept in bench/evaluation.py as
``original_evaluate`` (the bench times it against ours). "Equal": every float within 1e-9
relative (float64 sums in another order: ~1e-15 seen), every count, L0 and dead fraction exactly.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.evaluation import differences, original_evaluate
from galaxysae import evaluation
from galaxysae.sae import SAEConfig, SparseAutoencoder

D, M, K = 24, 96, 5
RTOL = 1e-9
TRAIN_ONLY = [40, 41, 42]  # latents that fire on a few train rows and never on the test rows
RARE = list(range(50, 62))  # latents that fire now and then, a few only on train rows, narrowly


def build(activation="topk", groups=(), n_test=600, n_train=1200, dead=8, seed=0):
    """A fresh SAE on random rows: the first ``dead`` latents never fire; TRAIN_ONLY latents
    fire on train rows aimed at them and never on test rows; RARE ones seldom (checked by the
    tests). -> model, test, train."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SparseAutoencoder(SAEConfig(d_in=D, n_latents=M, k=K, activation=activation,
                                        matryoshka_groups=list(groups)))
    x = (rng.standard_normal((n_test + n_train, D)) * np.linspace(0.5, 3, D) + 2).astype(np.float32)
    model.init_from_data(torch.from_numpy(x[n_test:]))
    with torch.no_grad():
        model.b_enc[:dead] = -1e6
        # |w| = 3 and bias -60: a random row (|z| ~ 6) never fires them; a row along w at
        # |z| = 40 gives pre = 120 - 60 = 60, above any other latent's 40 |cos| (unit rows)
        model.W_enc[TRAIN_ONLY] *= 3
        model.b_enc[TRAIN_ONLY] = -60.0
        model.b_enc[RARE] -= 1.5
        aimed = model.b_pre + 40 * model.W_enc[TRAIN_ONLY] / 3
        x[n_test:n_test + len(TRAIN_ONLY)] = model.destandardize(aimed).numpy()
        if activation == "batchtopk":  # the threshold training would learn: about K a row
            pre = model.pre_acts(torch.from_numpy(x[n_test:]))
            model.threshold.fill_(float(pre.flatten().topk(K * n_train).values[-1]))
    return model.eval(), x[:n_test], x[n_test:]


def fired_on(model, x):
    with torch.no_grad():
        return (model.encode(torch.from_numpy(x)) > 0).any(0)


def assert_equal_metrics(ours, ref):
    worst = max(differences(ours, ref), key=lambda d: d[1])
    assert worst[1] <= RTOL, worst
    assert ours["dead_fraction"] == ref["dead_fraction"]
    assert [lv["l0"] for lv in ours["levels"]] == [lv["l0"] for lv in ref["levels"]]


@pytest.mark.parametrize("activation,groups", [
    ("topk", ()), ("batchtopk", ()), ("topk", (8, 8, 16, 64)), ("batchtopk", (16, 16, 64))])
def test_metrics_equal_the_dense_evaluation(activation, groups):
    model, test, train = build(activation, groups)
    on_test, on_train = fired_on(model, test), fired_on(model, train)
    # the scenario: latents that fire on train only (some of them narrowly: RARE), and latents
    # that never fire
    assert on_train[TRAIN_ONLY].all() and not on_test[TRAIN_ONLY].any()
    assert (on_train & ~on_test)[RARE].any()
    assert 0 < float((on_test | on_train).float().mean()) < 1
    if activation == "batchtopk":  # a variable number of latents a row
        counts = (model.encode(torch.from_numpy(test)) > 0).sum(1)
        assert counts.min() < counts.max()
    ref = original_evaluate(model, test, train, batch=256)
    ours = evaluation.evaluate(model, test, train, batch=256)
    assert_equal_metrics(ours, ref)
    assert ours["dead_fraction"] == pytest.approx(1 - float((on_test | on_train).float().mean()))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_metrics_equal_when_the_test_split_leaves_most_latents_unfired(activation):
    """A few test rows: most latents are left for the train rows, which are encoded in full."""
    model, test, train = build(activation, n_test=4)
    assert float(fired_on(model, test).float().mean()) < 0.5
    assert_equal_metrics(evaluation.evaluate(model, test, train, batch=100),
                         original_evaluate(model, test, train, batch=100))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_a_latent_that_fires_once_at_the_cutoff_on_a_train_row_is_alive(activation):
    """Latent 70 is aimed at train row 500 and fires there only, just above the row's cutoff
    (TopK: between its k-th and k+1-th largest other pre-activations; BatchTopK: the threshold):
    the bound that spares the other train rows their full encode must not be above it."""
    model, test, train = build(activation)
    r, row = 70, 500
    with torch.no_grad():
        zc = (model.standardize(torch.from_numpy(train[row])) - model.b_pre).double()
        q = torch.linalg.qr(model.W_enc[TRAIN_ONLY].t().double())[0]
        u = zc - q @ (q.t() @ zc)  # away from the rows aimed at TRAIN_ONLY (|z| = 40)
        u = (u / u.norm()).float()
        model.W_enc[r] = 10 * u
        model.b_enc[r] = 0.0
        pre = model.pre_acts(torch.from_numpy(train[row:row + 1]))[0]
        if activation == "topk":  # r takes the k-th place, the k-th other goes to k+1
            top = torch.cat([pre[:r], pre[r + 1:]]).topk(K).values
            cut = float((top[K - 2] + top[K - 1]) / 2)
        else:
            cut = float(model.threshold) + 1e-3
        model.b_enc[r] = cut - float(pre[r])
        codes = model.encode(torch.from_numpy(train)) > 0
    assert codes[:, r].nonzero().flatten().tolist() == [row]
    assert not fired_on(model, test)[r]
    ref = original_evaluate(model, test, train, batch=256)
    assert_equal_metrics(evaluation.evaluate(model, test, train, batch=256), ref)


class _Rows:
    """Counts the rows the model encodes in full (``pre_acts``: the [b, M] matmul)."""

    def __init__(self, model):
        self.n, self.inner = 0, model.pre_acts
        model.pre_acts = self

    def __call__(self, x):
        self.n += len(x)
        return self.inner(x)


def test_train_rows_are_encoded_only_near_a_cutoff_of_an_unfired_latent():
    model, test, train = build("topk")
    ref = original_evaluate(model, test, train, batch=256)
    rows = _Rows(model)
    ours = evaluation.evaluate(model, test, train, batch=256)
    assert_equal_metrics(ours, ref)
    # every test row; of the train rows (all of which the original encoded) the aimed ones and
    # a few where a RARE latent nears the cutoff
    assert len(TRAIN_ONLY) <= rows.n - len(test) <= len(train) // 8, rows.n


def test_train_rows_are_not_encoded_once_every_latent_fired():
    model, test, train = build("topk", dead=0)
    model.b_enc.data[TRAIN_ONLY + RARE] = 0.0
    assert fired_on(model, test).all()
    ref = original_evaluate(model, test, train, batch=256)
    rows = _Rows(model)
    assert_equal_metrics(evaluation.evaluate(model, test, train, batch=256), ref)
    assert rows.n == len(test)


class _WideFloat64(TorchDispatchMode):
    """Records the shapes of the float64 tensors with ``width`` columns that ops produce."""

    def __init__(self, width):
        super().__init__()
        self.width, self.seen = width, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.dim() == 2 \
                    and t.shape[1] == self.width:
                self.seen.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("groups", [(), (8, 8, 16, 64)])
def test_no_dense_float64_code_is_built(groups):
    model, test, train = build("topk", groups)
    with _WideFloat64(M) as mode:
        evaluation.evaluate(model, test, train, batch=256)
    assert mode.seen == []


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_active_entries_are_those_of_encode(activation):
    model, test, _ = build(activation)
    with torch.no_grad():
        model.b_enc -= 3.0  # some rows with fewer than K positive pre-activations
        x = torch.from_numpy(test)
        codes = model.encode(x)
        rows, cols, vals = evaluation._active(model, x)
    assert (rows[1:] >= rows[:-1]).all() and (vals > 0).all()
    dense = torch.zeros_like(codes)
    dense[rows, cols] = vals
    assert torch.equal(dense, codes)
    if activation == "topk":
        assert ((codes > 0).sum(1) < K).any()


def test_the_bench_runs_and_both_evaluations_agree(capsys):
    from bench import evaluation as bench_evaluation

    bench_evaluation.main(["--rows", "512", "--train-rows", "512", "--dims", "32",
                           "--latents", "256", "--k", "8", "--batch", "128"])
    out = capsys.readouterr().out
    assert re.search(r"^metrics equal: yes \(\d+ values", out, re.M), out
    target = (r"^target evaluate_beyond_encode: [0-9.]+x less time beyond the test rows' encode "
              r"\(goal >= 5x, equal metrics\) (PASS|FAIL)$")
    assert re.search(target, out, re.M), out
