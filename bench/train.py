"""Benchmark: our SAE training step vs faithful re-implementations of the original loops.

Side by side in one run, on the same embeddings, hyper-parameters and initial weights:
- TopK (train_sae.py): 5120 latents, k=64, dense top-k scattered into a dense [B, M] code, dense
  decoder matmuls for the main, multi-k (4k) and AuxK (k/4) reconstructions, batch 1024;
- Matryoshka (train_matryoshka_sae.py): 2048 latents in groups [64, 64, 128, 256, 512, 1024],
  BatchTopK k=64 scattered dense, one reconstruction per level built on a clone of the previous,
  L1 1e-3, aux 0.03 with aux k = 16k, batch 256.
Our step is the production one (``galaxysae.train.train_step``). The implementations alternate
one epoch at a time so both see the same machine load; the speed-up is the median of
the per-epoch-pair ratios, with torch pinned to the same thread count for both. Test FVU is measured by the same code
(``galaxysae.evaluation``) for both.

    .venv/bin/python bench/train.py [--embeddings ROOT_OR_NPY] [--epochs 5] [--n-train 8192] [--threads N]

Ends with ``target <name>: <measured> (goal <goal>) PASS|FAIL`` lines.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from galaxysae import config, evaluation  # noqa: E402
from galaxysae import train as train_job  # noqa: E402
from galaxysae.sae import SparseAutoencoder, _batch_topk  # noqa: E402

SPEED_GOALS = ((3.0, ""), (5.0, "_5x"))  # issue 4's goal, then issue 8's (target name suffix)
FVU_SLACK = 1.01  # "equal or lower": within 1% of the original's test FVU counts as equal


# ----------------------------------------------------------------------------- the originals


class OriginalTopK(nn.Module):
    """The k-sparse SAE loop of train_sae.py: dense codes, dense decoder, x[B, D] standardised."""

    def __init__(self, d, m, k, auxk, multik, dead_steps):
        super().__init__()
        self.k, self.auxk, self.multik, self.dead_steps = k, auxk, multik, dead_steps
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.encoder = nn.Linear(d, m, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(m))
        self.decoder = nn.Linear(m, d, bias=False)  # weight [D, M]: columns are the atoms
        self.register_buffer("stats_last_nonzero", torch.zeros(m, dtype=torch.long))

    def topk_dense(self, pre, k):
        vals, idx = torch.topk(pre, k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))

    def forward(self, x):
        pre = self.encoder(x - self.pre_bias) + self.latent_bias
        latents = self.topk_dense(pre, self.k)
        recons = self.decoder(latents) + self.pre_bias
        self.stats_last_nonzero *= (latents == 0).all(dim=0).long()
        self.stats_last_nonzero += 1
        loss = (recons - x).pow(2).mean()
        multik = self.decoder(self.topk_dense(pre, self.multik)) + self.pre_bias
        loss = loss + 0.125 * (multik - x).pow(2).mean()
        dead = self.stats_last_nonzero > self.dead_steps
        aux_pre = torch.where(dead, pre, torch.full_like(pre, -math.inf))
        aux_latents = self.topk_dense(aux_pre, self.auxk)
        aux_recons = self.decoder(aux_latents)
        aux = (aux_recons - (x - recons).detach()).pow(2).mean()
        loss = loss + (1 / 32) * torch.nan_to_num(aux)
        return loss

    def step_fix(self):
        w = self.decoder.weight  # [D, M]
        if w.grad is not None:
            w.grad -= (w.grad * w.data).sum(0, keepdim=True) * w.data

    def renorm(self):
        self.decoder.weight.data /= self.decoder.weight.data.norm(dim=0, keepdim=True)


class OriginalMatryoshka(nn.Module):
    """The Matryoshka BatchTopK loop of train_matryoshka_sae.py, x[B, D] standardised."""

    def __init__(self, d, groups, k, l1, aux_penalty, aux_k, dead_batches):
        super().__init__()
        m = sum(groups)
        self.groups, self.k, self.l1, self.aux_penalty = groups, k, l1, aux_penalty
        self.aux_k, self.dead_batches = aux_k, dead_batches
        self.W_enc = nn.Parameter(torch.empty(d, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("num_batches_not_active", torch.zeros(m))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.bounds = [0] + list(np.cumsum(groups))

    def forward(self, x):
        B = x.shape[0]
        pre = F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = torch.topk(pre.flatten(), self.k * B, dim=-1)
        acts = torch.zeros_like(pre.flatten()).scatter(-1, top.indices, top.values).view_as(pre)
        x_rec = self.b_dec.expand_as(x)
        losses = []
        for i in range(len(self.groups)):
            s, e = self.bounds[i], self.bounds[i + 1]
            x_rec = x_rec.clone() + acts[:, s:e] @ self.W_dec[s:e]
            losses.append((x_rec - x).pow(2).mean())
        loss = torch.stack(losses).mean()
        loss = loss + self.l1 * acts.abs().sum(-1).mean()
        with torch.no_grad():
            self.num_batches_not_active += (acts.sum(0) == 0).float()
            self.num_batches_not_active[acts.sum(0) > 0] = 0
            pos = acts[acts > 0]
            if pos.numel():
                # EMA of the smallest kept activation; started at the first batch's value, as
                # ours is, so the inference comparison measures training, not the EMA warm-up.
                if self.threshold == 0:
                    self.threshold.copy_(pos.min())
                else:
                    self.threshold.mul_(0.99).add_(0.01 * pos.min())
        dead = self.num_batches_not_active >= self.dead_batches
        if dead.sum() > 0:
            residual = (x - x_rec).detach()
            k_aux = min(self.aux_k, int(dead.sum()))
            aux_top = torch.topk(pre[:, dead], k_aux, dim=-1)
            aux_acts = torch.zeros_like(pre[:, dead]).scatter(-1, aux_top.indices, aux_top.values)
            aux_rec = aux_acts @ self.W_dec[dead]
            loss = loss + self.aux_penalty * (aux_rec - residual).pow(2).mean()
        return loss

    def step_fix(self):
        if self.W_dec.grad is not None:
            w = self.W_dec.data / self.W_dec.data.norm(dim=-1, keepdim=True)
            self.W_dec.grad -= (self.W_dec.grad * w).sum(-1, keepdim=True) * w

    def renorm(self):
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------- setup


def hyper(kind: str, d: int, shrink: int = 1) -> dict:
    """The original scripts' hyper-parameters; ``shrink`` > 1 divides widths (smoke runs only)."""
    s = shrink
    if kind == "topk":
        return dict(epochs=200, batch_size=1024 // s, model=dict(
            activation="topk", n_latents=5120 // s, k=64 // s, aux_k=16 // s, aux_coeff=1 / 32,
            dead_steps=256, multik=256 // s, multik_coeff=0.125),
            optim=dict(lr=1e-4, weight_decay=1e-6, schedule="cosine", grad_clip=1.0))
    return dict(epochs=200, batch_size=256 // s, model=dict(
        activation="batchtopk", n_latents=2048 // s,
        matryoshka_groups=[g // s for g in (64, 64, 128, 256, 512, 1024)],
        k=64 // s, l1_coeff=1e-3, aux_k=1024 // s, aux_coeff=0.03, dead_steps=256, multik=0),
        optim=dict(lr=1e-4, weight_decay=0.01, schedule="constant", grad_clip=0.0))


def build(kind: str, x_train: np.ndarray, epochs: int, device: str, shrink: int = 1):
    """(ours, original, cfg) with identical initial weights, stats and input bias."""
    d = x_train.shape[1]
    h = hyper(kind, d, shrink)
    h["epochs"] = epochs
    cfg = config.from_dict(train_job.Config, {"embeddings": "bench", "output": "bench", **h})
    init = train_job.init_stats(cfg, x_train[:65536])
    ours = SparseAutoencoder(train_job.sae_config(cfg, d))
    ours.load_state_dict(init)
    m = cfg.model
    if kind == "topk":
        orig = OriginalTopK(d, m.n_latents, m.k, m.aux_k, m.multik, m.dead_steps)
        with torch.no_grad():
            orig.encoder.weight.copy_(ours.W_enc)
            orig.decoder.weight.copy_(ours.W_dec.t())
            orig.pre_bias.copy_(ours.b_pre)
    else:
        orig = OriginalMatryoshka(d, m.matryoshka_groups, m.k, m.l1_coeff, m.aux_coeff, m.aux_k,
                                  m.dead_steps)
        with torch.no_grad():
            orig.W_enc.copy_(ours.W_enc.t())
            orig.W_dec.copy_(ours.W_dec)
            orig.b_dec.copy_(ours.b_pre)
    return ours.to(device), orig.to(device), cfg


def original_to_ours(kind: str, orig, ours: SparseAutoencoder) -> SparseAutoencoder:
    """The original's weights in our module, so both are evaluated by the same code."""
    out = SparseAutoencoder(ours.cfg)
    out.load_state_dict({k: v.cpu() for k, v in ours.state_dict().items()})
    with torch.no_grad():
        if kind == "topk":
            out.W_enc.copy_(orig.encoder.weight)
            out.W_dec.copy_(orig.decoder.weight.t())
            out.b_pre.copy_(orig.pre_bias)
            out.b_enc.copy_(orig.latent_bias)
        else:
            out.W_enc.copy_(orig.W_enc.t())
            out.W_dec.copy_(orig.W_dec)
            out.b_pre.copy_(orig.b_dec)
            out.b_enc.copy_(orig.b_enc)
            out.threshold.copy_(orig.threshold)
    return out.cpu().eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _original_step(cfg, orig, opt, sched, z) -> None:
    """One step of the original loop on standardised z[B, D]."""
    loss = orig(z)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    _original_update(cfg, orig, opt, sched)


def _original_update(cfg, orig, opt, sched) -> None:
    """The original loop after backward: gradient fix-up, clipping, AdamW, decoder renorm."""
    orig.step_fix()
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(orig.parameters(), cfg.optim.grad_clip)
    opt.step()
    sched.step()
    orig.renorm()


def compare(kind: str, x_train: np.ndarray, x_test: np.ndarray, epochs: int, device: str = "cpu",
            seed: int = 0, shrink: int = 1) -> list[dict]:
    """Train ours and the original alternately, one epoch each; rows of the results table.

    Each epoch is timed on its own; the speed-up is the median over epochs of the ratio of the
    two epochs run back to back (the order alternates), so a burst of load from elsewhere on the
    machine hits one pair, not the verdict.
    """
    from torch.optim.lr_scheduler import LambdaLR

    torch.manual_seed(seed)
    ours, orig, cfg = build(kind, x_train, epochs, device, shrink)
    bs = cfg.batch_size
    n = len(x_train)
    per_epoch = n // bs
    total = per_epoch * epochs
    x_all = torch.as_tensor(x_train).to(device)
    mean, std = ours.mean, ours.std
    opt_ours = train_job.make_optimizer(cfg, ours)
    sched_ours = LambdaLR(opt_ours, train_job.lr_lambda(cfg, total))
    kw = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    opt_orig = torch.optim.AdamW(orig.parameters(), **kw)
    sched_orig = LambdaLR(opt_orig, train_job.lr_lambda(cfg, total))
    times: dict[str, list[float]] = {"ours": [], "original": []}
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        batches = [x_all[perm[i * bs:(i + 1) * bs]] for i in range(per_epoch)]
        order = ("ours", "original") if epoch % 2 == 0 else ("original", "ours")
        for impl in order:
            _sync(device)
            t0 = time.perf_counter()
            if impl == "ours":
                ours.train()
                for x in batches:
                    train_job.train_step(cfg, ours, opt_ours, sched_ours, x)
            else:
                orig.train()
                for x in batches:
                    _original_step(cfg, orig, opt_orig, sched_orig, (x - mean) / std)
            _sync(device)
            times[impl].append(time.perf_counter() - t0)
    ratios = sorted(o / s for o, s in zip(times["original"], times["ours"]))
    median_ratio = float(np.median(ratios))
    rows = []
    for impl, model in (("original", original_to_ours(kind, orig, ours)), ("ours", ours.cpu().eval())):
        m = evaluation.evaluate(model, x_test, x_train)
        rows.append({"kind": kind, "impl": impl, "batch": bs, "steps": total,
                     "samples_per_s": per_epoch * bs / float(np.median(times[impl])),
                     "fvu": m["fvu"], "l0": m["l0"], "median_ratio": median_ratio,
                     "ratios": ratios})
    return rows


def _timed(fn, device: str, reps: int) -> float:
    """Median wall ms of fn() over reps calls (after one warm-up)."""
    fn()
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(out))


def step_setup(kind: str, x_train: np.ndarray, device: str = "cpu", shrink: int = 1):
    """Single-step measurements' start: (ours, original, cfg, our optimiser, a constant-rate
    scheduler for it, the first batch on the device), seeded."""
    from torch.optim.lr_scheduler import LambdaLR

    torch.manual_seed(0)
    ours, orig, cfg = build(kind, x_train, 1, device, shrink)
    opt = train_job.make_optimizer(cfg, ours)
    sched = LambdaLR(opt, lambda _: 1.0)
    return ours, orig, cfg, opt, sched, torch.as_tensor(x_train[: cfg.batch_size]).to(device)


def parts(kind: str, x_train: np.ndarray, device: str = "cpu", reps: int = 5,
          shrink: int = 1) -> list[dict]:
    """Where a step's time goes, ours vs the original, on one batch (median ms of ``reps``).

    Encoder GEMM and top-k are timed alone (both implementations run the same ops there); the
    forward's remainder is the decoders and losses; backward is ``loss.backward()``; optimizer is
    gradient fix-up, clipping, AdamW and the decoder renorm. The parts of one step are measured
    separately, interleaved ours/original, so their sum is close to, not equal to, a step.
    """
    from torch.optim.lr_scheduler import LambdaLR

    ours, orig, cfg, opt_o, sched_o, x = step_setup(kind, x_train, device, shrink)
    z = (x - ours.mean) / ours.std
    m = cfg.model
    kk = max(m.k, m.multik) if kind == "topk" else m.k * cfg.batch_size
    # the original's own top-k calls: k, the multi-k 4k and the aux-k of the TopK loop
    orig_ks = (m.k, m.multik, m.aux_k) if kind == "topk" else (kk,)
    opt_r = torch.optim.AdamW(orig.parameters(), lr=cfg.optim.lr)
    sched_r = LambdaLR(opt_r, lambda _: 1.0)
    ours.train()
    orig.train()

    def gemm():
        with torch.no_grad():
            return torch.addmm(ours.b_enc, z - ours.b_pre, ours.W_enc.t())

    pre = gemm()

    def topk_orig():
        with torch.no_grad():
            if kind == "topk":
                return [pre.topk(k_, dim=-1) for k_ in orig_ks]
            return pre.clamp_min(0).flatten().topk(kk)

    def topk_ours():
        with torch.no_grad():
            if kind == "topk":
                return pre.topk(kk, dim=-1)
            return _batch_topk(pre, kk)

    def fwd_ours():
        return ours(x).loss

    def fwd_orig():
        return orig(z)

    def bwd(fwd, model):
        def f():
            model.zero_grad(set_to_none=True)
            loss = fwd()
            t0 = time.perf_counter()
            loss.backward()
            _sync(device)
            return time.perf_counter() - t0
        return f

    def optim_ours():
        train_job.optimizer_step(cfg, ours, opt_o, sched_o)

    def optim_orig():
        _original_update(cfg, orig, opt_r, sched_r)

    def bwd_ms(fwd, model):
        f = bwd(fwd, model)
        f()
        return float(np.median([f() for _ in range(reps)])) * 1e3

    t_gemm = _timed(gemm, device, reps)
    t_topk, t_topk_orig = _timed(topk_ours, device, reps), _timed(topk_orig, device, reps)
    fo, fr = _timed(fwd_ours, device, reps), _timed(fwd_orig, device, reps)
    bo, br = bwd_ms(fwd_ours, ours), bwd_ms(fwd_orig, orig)
    oo, orr = _timed(optim_ours, device, reps), _timed(optim_orig, device, reps)
    rows = [
        ("encoder GEMM", t_gemm, t_gemm),
        ("top-k", t_topk, t_topk_orig),
        # parts timed apart do not add up exactly: a remainder below 0 is noise, shown as 0
        ("decoders + losses (rest of fwd)", max(fo - t_gemm - t_topk, 0.0),
         max(fr - t_gemm - t_topk_orig, 0.0)),
        ("backward (sparse vs dense)", bo, br),
        ("optimizer (fix, clip, AdamW, renorm)", oo, orr),
        ("step (sum)", fo + bo + oo, fr + br + orr),
    ]
    return [{"kind": kind, "part": p, "ours_ms": a, "original_ms": b} for p, a, b in rows]


def report_parts(rows: list[dict]) -> None:
    print(f"{'model':<11} {'part':<38} {'ours ms':>9} {'orig ms':>9} {'orig/ours':>9}")
    for r in rows:
        ratio = f"{r['original_ms'] / r['ours_ms']:>9.2f}" if r["ours_ms"] >= 0.05 else f"{'n/a':>9}"
        print(f"{r['kind']:<11} {r['part']:<38} {r['ours_ms']:>9.1f} {r['original_ms']:>9.1f} {ratio}")


def load_embeddings(args) -> tuple[np.ndarray, np.ndarray, str]:
    if args.embeddings:
        train, test = train_job.load_data(config.from_dict(train_job.Config, {
            "embeddings": args.embeddings, "output": "bench"}))
        return train.x[: args.n_train], test.x[: args.n_test], args.embeddings
    from galaxysae.embeddings import planted

    x, _ = planted(args.n_train + args.n_test, 640, 4096, 32, seed=0, noise=0.05, offset=0.2)
    return x[: args.n_train], x[args.n_train:], "generated (planted 4096-atom dictionary, 640-d)"


def report(rows: list[dict], source: str, prefix: str = "") -> list[str]:
    print(f"embeddings: {source}; torch threads {torch.get_num_threads()} (both implementations)")
    print(f"{'model':<11} {'impl':<9} {'batch':>5} {'steps':>6} {'samples/s':>10} {'test FVU':>9} {'L0':>6}")
    for r in rows:
        print(f"{r['kind']:<11} {r['impl']:<9} {r['batch']:>5} {r['steps']:>6} "
              f"{r['samples_per_s']:>10.0f} {r['fvu']:>9.4f} {r['l0']:>6.1f}")
    lines = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        o = next(r for r in rows if r["kind"] == kind and r["impl"] == "original")
        s = next(r for r in rows if r["kind"] == kind and r["impl"] == "ours")
        speed = s["median_ratio"]
        per = ", ".join(f"{x:.2f}" for x in s["ratios"])
        print(f"ratio {kind}: median {speed:.2f}x samples/s over epoch pairs [{per}], "
              f"FVU ours/original {s['fvu'] / o['fvu']:.4f}")
        for goal, suffix in SPEED_GOALS:
            ok = speed >= goal and s["fvu"] <= o["fvu"] * FVU_SLACK
            lines.append(f"target {prefix}{kind}_speedup{suffix}_at_equal_fvu: {speed:.2f}x (FVU "
                         f"{s['fvu']:.4f} vs {o['fvu']:.4f}) (goal >= {goal:g}x at FVU <= "
                         f"{FVU_SLACK:g} x original) {'PASS' if ok else 'FAIL'}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", default="", help="embed output root or .npy (default: generated)")
    p.add_argument("--n-train", type=int, default=8192)
    p.add_argument("--n-test", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=5, help="epoch pairs; the median ratio is reported")
    p.add_argument("--only", choices=["topk", "matryoshka"], default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (0: all cores)")
    p.add_argument("--no-parts", action="store_true", help="skip the per-part timing table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or (os.cpu_count() or 1))
    x_train, x_test, source = load_embeddings(args)
    rows, part_rows = [], []
    for kind in ("topk", "matryoshka"):
        if args.only in (None, kind):
            rows += compare(kind, x_train, x_test, args.epochs, args.device)
            if not args.no_parts:
                part_rows += parts(kind, x_train, args.device)
    if part_rows:
        report_parts(part_rows)
    for line in report(rows, source):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
