"""Sparse autoencoders in pure torch: TopK, BatchTopK and Matryoshka as options of one module.

Shapes: B samples, D = ``d_in`` embedding width, M = ``n_latents``, k active latents per sample,
L Matryoshka levels (nested prefixes of the dictionary).

The model takes RAW embeddings: per-dimension standardisation statistics (``mean``, ``std``) are
buffers stored in the artifact, so ``encode(x_raw)`` needs nothing but the artifact. Losses are
measured in the standardised space, where every embedding dimension weighs the same.

Training path (``forward``) is sparse end to end:
- the encoder pre-activations ``pre[B, M]`` are one dense matmul without autograd; the latents
  chosen (top-k, the 4k of the multi-k loss, the aux-k dead latents; BatchTopK by an exact
  sampled threshold on CPU, ``_batch_topk``, and under data parallelism by the cutoff over all
  workers' rows, ``_global_batch_topk``) enter autograd through ``_SparseEncode``, whose
  backward touches only the chosen entries (bag sums over the entries grouped by latent instead
  of a dense ``[M, B] @ [B, D]``);
- decoding is ``embedding_bag`` over the chosen latents (``B*k*D`` work instead of ``B*M*D``);
  Matryoshka levels are bags of (sample, level) whose prefix sums and losses ``_PrefixMSE``
  computes level by level. Encoder and decoder share one grouping of the entries by latent.
``forward(x, dense=True)`` is the plain dense reference of the same maths (tests check equality).
On accelerators a step reads nothing back to the host (bar one look at the dead-latent counters
every dead_steps/4 steps, ``_aux_k_now``), so Python queues kernels while the device runs them;
the CPU takes faster variants that do (``_host_paths``). Tests run both variants on the CPU.

No Ray, no storage: ``save``/``load`` write local directories; an ``s3://`` URL is handed to
``galaxysae.storage`` imported only then, so loading an artifact needs no training code.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SAEConfig", "SparseAutoencoder", "Output", "fvu", "safe_std"]

FORMAT_VERSION = 1


@dataclass
class SAEConfig:
    """Everything needed to rebuild a model (written as ``cfg.json``)."""

    d_in: int
    n_latents: int
    k: int
    activation: str = "topk"  # "topk" (per sample) or "batchtopk" (k*B over the batch)
    matryoshka_groups: list[int] = field(default_factory=list)  # sizes summing to n_latents
    matryoshka_weights: list[float] = field(default_factory=list)  # per level; empty = equal
    aux_k: int = 0  # dead latents used by the AuxK loss; 0 = off
    aux_coeff: float = 0.0
    dead_steps: int = 256  # a latent is dead after this many training steps without firing
    multik: int = 0  # the multi-k auxiliary reconstruction with this many latents; 0 = off
    multik_coeff: float = 0.0
    l1_coeff: float = 0.0
    threshold_decay: float = 0.99  # EMA of the BatchTopK inference threshold

    def __post_init__(self) -> None:
        self.matryoshka_groups = [int(g) for g in self.matryoshka_groups]
        self.matryoshka_weights = [float(w) for w in self.matryoshka_weights]
        self.validate()

    def validate(self) -> None:
        if self.activation not in ("topk", "batchtopk"):
            raise ValueError(f"activation must be 'topk' or 'batchtopk', got {self.activation!r}")
        if self.d_in <= 0 or self.n_latents <= 0:
            raise ValueError(f"d_in and n_latents must be positive, got {self.d_in}, {self.n_latents}")
        if not 0 < self.k <= self.n_latents:
            raise ValueError(f"k must be in 1..n_latents={self.n_latents}, got {self.k}")
        if self.matryoshka_groups:
            if any(g <= 0 for g in self.matryoshka_groups):
                raise ValueError(f"matryoshka_groups must be positive, got {self.matryoshka_groups}")
            if sum(self.matryoshka_groups) != self.n_latents:
                raise ValueError(
                    f"matryoshka_groups {self.matryoshka_groups} sum to {sum(self.matryoshka_groups)}"
                    f", not n_latents={self.n_latents}")
        if self.matryoshka_weights and len(self.matryoshka_weights) != self.n_levels:
            raise ValueError(f"matryoshka_weights has {len(self.matryoshka_weights)} entries for "
                             f"{self.n_levels} levels")
        if self.multik and not self.k <= self.multik <= self.n_latents:
            raise ValueError(f"multik must be in k..n_latents, got {self.multik}")
        if self.multik and self.activation != "topk":
            raise ValueError("multik applies to activation='topk' only")
        if not 0 <= self.aux_k <= self.n_latents:
            raise ValueError(f"aux_k must be in 0..n_latents, got {self.aux_k}")

    @property
    def n_levels(self) -> int:
        return max(1, len(self.matryoshka_groups))

    @property
    def level_ends(self) -> list[int]:
        """Dictionary size of each nested level, e.g. [64, 128, 256, 512, 1024, 2048]."""
        if not self.matryoshka_groups:
            return [self.n_latents]
        out, total = [], 0
        for g in self.matryoshka_groups:
            total += g
            out.append(total)
        return out

    def to_json(self) -> dict:
        return {"kind": "sae", "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> "SAEConfig":
        if data.get("kind") != "sae":
            raise ValueError(f"cfg.json: kind is {data.get('kind')!r}, expected 'sae'")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - {"kind", "format_version"})
        if unknown:
            raise ValueError(f"cfg.json: unknown keys {unknown}")
        return cls(**{k: v for k, v in data.items() if k in names})


# A dimension whose std is at most this fraction of its scale, max(1, |mean|), counts as constant.
CONSTANT_STD = 1e-6


def safe_std(mean: Tensor, std: Tensor) -> Tensor:
    """Per-dimension std [D] to divide by: 1 where a dimension is constant (its std tiny next to
    its scale, max(1, |mean|)). A constant dimension carries no information; divided by its
    near-zero std, a jitter of 1e-3 that appears elsewhere (test rows, another encoder run)
    would become a z of 1000. The SAE and the PCA baseline both standardise with this rule."""
    tiny = std <= CONSTANT_STD * mean.abs().clamp_min(1.0)
    return torch.where(tiny, torch.ones_like(std), std)


class Output(NamedTuple):
    """Loss terms of one training batch (scalars unless noted)."""

    loss: Tensor
    recon: Tensor  # MSE of the full reconstruction (standardised space)
    level_mse: Tensor  # [L] MSE of each nested prefix (L = 1 without Matryoshka)
    multik: Tensor
    aux: Tensor
    l1: Tensor
    l0: Tensor  # mean active latents per sample
    x_hat: Tensor  # [B, D] full reconstruction, standardised space


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained, 1 - R^2 pooled over dims; x, x_hat: [N, D]."""
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return resid / total


class _SparseEncode(torch.autograd.Function):
    """The chosen encoder pre-activations as a differentiable function of the encoder weights.

    ``vals[n] = pre[rows[n], cols[n]]`` with ``pre = zc @ W_enc^T + b_enc`` and ``zc = z - b_pre``;
    the values were read (without autograd) from the dense ``pre`` the selection computed anyway.
    The backward only touches the N chosen entries: grad W_enc = G^T zc as an ``embedding_bag``
    over the entries grouped by latent (``_column_order``), grad b_enc their sums per latent,
    grad b_pre = -(those sums) @ W_enc.
    """

    @staticmethod
    def forward(ctx, vals, zc, b_pre, w_enc, b_enc, rows, cols, corder, cptr):  # noqa: D401
        ctx.save_for_backward(zc, w_enc, rows, cols, corder, cptr)
        return vals.clone()

    @staticmethod
    def backward(ctx, g):
        zc, w_enc, rows, cols, corder, cptr = ctx.saved_tensors
        M = w_enc.shape[0]
        g = g.contiguous()
        col_sum = torch.zeros(M, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        grad_w = grad_b_pre = None
        if ctx.needs_input_grad[3]:
            grad_w = _transpose_bag(rows, g, zc, corder, cptr)
        if ctx.needs_input_grad[2]:
            grad_b_pre = -(col_sum @ w_enc)
        grad_b_enc = col_sum if ctx.needs_input_grad[4] else None
        return None, None, grad_b_pre, grad_w, grad_b_enc, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """out[j] = sum over entries n of bag j of vals[n] * W[cols[n]]: [n_bags, D].

    Entries are grouped by bag (``bags`` sorted, ``ptr`` [n_bags + 1] its CSR row pointer;
    ``corder``/``cptr`` the same entries grouped by latent, see ``_column_order``). The forward is
    ``embedding_bag``; the backward avoids its slow dense-gradient path: grad W is the same bag sum
    transposed (``_transpose_bag``), grad vals a sampled matmul (SDDMM) that only computes the N
    needed dot products.
    """

    @staticmethod
    def forward(ctx, vals, w, bags, cols, ptr, corder, cptr):  # noqa: D401
        ctx.save_for_backward(vals, w, bags, cols, ptr, corder, cptr)
        # detached: with an input that requires grad, embedding_bag takes its training kernel,
        # which also builds the bookkeeping for its own backward (twice the time on CPU)
        return F.embedding_bag(cols, w.detach(), ptr, mode="sum", per_sample_weights=vals.detach(),
                               include_last_offset=True)

    @staticmethod
    def backward(ctx, g):
        vals, w, bags, cols, ptr, corder, cptr = ctx.saved_tensors
        g = g.contiguous()
        grad_vals = grad_w = None
        with warnings.catch_warnings():  # "CSR is beta": the ops used here are tested
            warnings.simplefilter("ignore", UserWarning)
            if ctx.needs_input_grad[1]:
                grad_w = _transpose_bag(bags, vals, g, corder, cptr)
            if ctx.needs_input_grad[0]:
                grad_vals = _entry_dots(g, w, bags, cols, ptr, sampled=_host_paths(g))
        return grad_vals, grad_w, None, None, None, None, None


# entries per gathered block of _entry_dots: 2 x 16384 x D floats (84 MB at D = 640)
_DOT_BLOCK = 16384


def _entry_dots(g: Tensor, w: Tensor, bags: Tensor, cols: Tensor, ptr: Tensor,
                sampled: bool) -> Tensor:
    """out[n] = g[bags[n]] . w[cols[n]] for every entry n (bags sorted, ``ptr`` their CSR row
    pointer): the N dot products of a sampled matmul (SDDMM), not the dense [n_bags, M] one.

    ``sampled``: torch's CSR ``sampled_addmm`` (the CPU kernel takes the entries in any order).
    Else gathered rows in blocks: cuSPARSE's CSR routines assume the columns of a row sorted,
    which top-k order is not, and a gathered dot product needs no such promise.
    """
    if sampled:
        mask = torch.sparse_csr_tensor(ptr, cols, torch.ones(cols.numel(), dtype=g.dtype,
                                                             device=g.device),
                                       (ptr.numel() - 1, w.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(mask, g, w.t(), beta=0.0).values()
    out = torch.empty(cols.numel(), dtype=g.dtype, device=g.device)
    for s in range(0, cols.numel(), _DOT_BLOCK):
        b, c = bags[s:s + _DOT_BLOCK], cols[s:s + _DOT_BLOCK]
        out[s:s + _DOT_BLOCK] = (g.index_select(0, b) * w.index_select(0, c)).sum(-1)
    return out


class _PrefixMSE(torch.autograd.Function):
    """Matryoshka level losses from the per-level decoder parts in one pass.

    parts[B, L, D] (level l's latents decoded), t[B, D] (the target minus the input bias) ->
    (mse[L], s[B, D]): mse[l] = mean((parts[:, :l+1].sum(1) - t)^2), s = parts.sum(1). The
    residuals are accumulated level by level, each step a [B, D] slab that stays in cache, and the
    backward runs the same loop in reverse (suffix sums): about twice as fast as autograd through
    cumsum, broadcasting and pow over the whole [B, L, D].
    """

    @staticmethod
    def forward(ctx, parts, t):  # noqa: D401
        L = parts.shape[1]
        r = torch.empty_like(parts)  # r[:, l] = S_l - t, S_l the prefix sum of the parts
        torch.sub(parts[:, 0], t, out=r[:, 0])
        for lv in range(1, L):
            torch.add(r[:, lv - 1], parts[:, lv], out=r[:, lv])
        ctx.save_for_backward(r)
        mse = torch.stack([r[:, lv].pow(2).mean() for lv in range(L)])
        return mse, r[:, -1] + t

    @staticmethod
    def backward(ctx, g_mse, g_s):
        (r,) = ctx.saved_tensors
        B, L, D = r.shape
        c = g_mse * (2.0 / (B * D))
        g_parts = torch.empty_like(r)
        acc = r[:, -1] * c[-1]  # sum over levels >= l of c[l'] r[:, l']
        g_parts[:, -1] = acc if g_s is None else acc + g_s
        for lv in range(L - 2, -1, -1):
            acc = acc + r[:, lv] * c[lv]
            g_parts[:, lv] = acc if g_s is None else acc + g_s
        return g_parts, -acc


class SparseAutoencoder(nn.Module):
    """TopK / BatchTopK / Matryoshka sparse autoencoder on raw embeddings x[B, D]."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        D, M = cfg.d_in, cfg.n_latents
        w_dec = torch.randn(M, D)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)  # [M, D], unit-norm rows
        self.W_enc = nn.Parameter(w_dec.clone())  # [M, D], tied init: encoder = decoder^T
        self.b_enc = nn.Parameter(torch.zeros(M))
        self.b_pre = nn.Parameter(torch.zeros(D))  # input bias, standardised space
        self.register_buffer("mean", torch.zeros(D))
        self.register_buffer("std", torch.ones(D))
        self.register_buffer("threshold", torch.zeros(()))  # BatchTopK inference threshold
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_since_active", torch.zeros(M, dtype=torch.long))
        self.register_buffer("level_ends", torch.tensor(cfg.level_ends, dtype=torch.long))
        w = cfg.matryoshka_weights or [1.0] * cfg.n_levels
        self.register_buffer("level_weights", torch.tensor(w) / sum(w))
        self._aux_step, self._aux_until, self._aux_k = 0, 0, cfg.aux_k  # see _aux_k_now

    # ------------------------------------------------------------------ properties and init

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @torch.no_grad()
    def init_from_data(self, x: Tensor, b_pre: str = "median", standardize: bool = True) -> None:
        """Standardisation stats and input bias from a sample of raw embeddings x[N, D]."""
        x = x.to(self.mean.device, torch.float32)
        if standardize:
            mean = x.mean(0)
            self.mean.copy_(mean)
            self.std.copy_(safe_std(mean, x.std(0)))
        z = self.standardize(x)
        if b_pre == "median":
            self.b_pre.copy_(z.median(0).values)
        elif b_pre == "geometric_median":
            self.b_pre.copy_(_geometric_median(z))
        elif b_pre == "mean":
            self.b_pre.copy_(z.mean(0))
        elif b_pre == "zero":
            self.b_pre.zero_()
        else:
            raise ValueError(f"b_pre init must be median, geometric_median, mean or zero, got {b_pre!r}")

    def standardize(self, x: Tensor) -> Tensor:
        """Raw x[B, D] -> standardised z[B, D]."""
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def destandardize(self, z: Tensor) -> Tensor:
        return z * self.std + self.mean

    # ------------------------------------------------------------------ inference API

    def pre_acts(self, x: Tensor) -> Tensor:
        """Raw x[B, D] -> encoder pre-activations [B, M]."""
        return torch.addmm(self.b_enc, self.standardize(x) - self.b_pre, self.W_enc.t())

    def encode(self, x: Tensor) -> Tensor:
        """Raw embeddings x[B, D] -> codes[B, M] (non-negative; about k non-zero per sample).

        ``topk`` keeps each sample's k largest; ``batchtopk`` keeps pre-activations above the
        learned threshold, so a sample's code never depends on the rest of its batch.
        """
        pre = self.pre_acts(x)
        if self.cfg.activation == "batchtopk":
            return torch.where(pre > self.threshold.clamp_min(0), pre, torch.zeros_like(pre))
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.clamp_min(0))

    def decode(self, codes: Tensor, level: Optional[int] = None) -> Tensor:
        """codes[B, M] -> raw-space reconstruction x_hat[B, D]; ``level`` uses that prefix only."""
        if level is not None:
            end = int(self.level_ends[level])
            z = codes[:, :end] @ self.W_dec[:end] + self.b_pre
        else:
            z = codes @ self.W_dec + self.b_pre
        return self.destandardize(z)

    # ------------------------------------------------------------------ training

    def forward(self, x: Tensor, dense: bool = False) -> Output:
        """Loss terms for a batch of raw embeddings x[B, D].

        In training mode this also updates the dead-latent counters and the BatchTopK threshold
        (like BatchNorm's running statistics). ``dense=True`` is the dense reference path.
        """
        cfg = self.cfg
        B, M = x.shape[0], cfg.n_latents
        z = self.standardize(x)
        dev = z.device
        # workers training together (DDP): BatchTopK selects on, and the state counts, the batch
        # of all of them; outside training a forward is one process's own (no collective)
        world = _data_parallel_world() if self.training else 1
        cutoff = None  # BatchTopK's cutoff over all workers' rows (world > 1)
        with torch.no_grad():
            zc = z - self.b_pre
            pre_ng = torch.addmm(self.b_enc, zc, self.W_enc.t())  # [B, M]
            # Selection (no autograd): the chosen entries (rows, cols) in row-major order and
            # their pre-activations; topk (+ multi-k) and aux are regular [B, n] patterns.
            if cfg.activation == "topk":
                kk = max(cfg.k, cfg.multik)
                top_v, top_i = pre_ng.topk(kk, dim=-1)  # sorted: the first k are the top-k
                rows, cols = _regular(top_i)
                sel_ng = top_v.reshape(-1)
            elif world == 1:
                flat_i, sel_ng = _batch_topk(pre_ng, cfg.k * B)
                rows, cols = flat_i // M, flat_i % M
            else:
                flat_i, sel_ng, cutoff = _global_batch_topk(pre_ng, cfg.k * B, world)
                rows, cols = flat_i // M, flat_i % M
            aux_k = self._aux_k_now() if cfg.aux_k else 0
            if aux_k:
                dead = self.steps_since_active >= cfg.dead_steps  # [M]
                aux_i = pre_ng.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1).indices
                aux_alive = dead[aux_i]  # [B, aux_k]; False where fewer than aux_k are dead

        if dense:
            pre = torch.addmm(self.b_enc, z - self.b_pre, self.W_enc.t())

        def gather(vals_ng, rows_, cols_, corder=None, cptr=None):
            """relu of the chosen pre-activations, differentiable w.r.t. the encoder. An entry
            handed in as 0 stays 0 (``_global_batch_topk``'s padding on accelerators)."""
            if dense:
                return F.relu(pre[rows_, cols_]) * (vals_ng > 0)
            if corder is None:
                corder, cptr = _column_order(cols_, M)
            return F.relu(_SparseEncode.apply(vals_ng, zc, self.b_pre, self.W_enc, self.b_enc,
                                              rows_, cols_, corder, cptr))

        L = cfg.n_levels
        if cfg.activation == "topk":
            sel_vals = gather(sel_ng, rows, cols)
            vals_2d = sel_vals.view(B, -1)  # [B, max(k, multik)]
            vals = vals_2d[:, : cfg.k].reshape(-1)
            rows = rows.view(B, -1)[:, : cfg.k].reshape(-1)
            cols = top_i[:, : cfg.k].reshape(-1)
            bag_order = None
        else:
            # Entries come sorted by row then column, hence by (row, level): the decoder bags use
            # them as they are and share the encoder's grouping by latent.
            corder, cptr = (None, None) if dense else _column_order(cols, M)
            vals = gather(sel_ng, rows, cols, corder, cptr)
            bag_order = (corder, cptr)

        # Main (and Matryoshka nested) reconstructions.
        if dense:
            codes = torch.zeros(B, M, device=dev, dtype=vals.dtype).index_put((rows, cols), vals)
            recons = []
            for end in cfg.level_ends:
                recons.append(codes[:, :end] @ self.W_dec[:end] + self.b_pre)
            level_hat = torch.stack(recons, 1)  # [B, L, D]
            level_mse = (level_hat - z[:, None, :]).pow(2).mean(dim=(0, 2))  # [L]
            x_hat = level_hat[:, -1]
        else:
            key, bag_cols, bag_vals = rows, cols, vals
            if L > 1:
                key = rows * L + torch.bucketize(cols, self.level_ends, right=True)
                if bag_order is None:  # top-k entries are in rank order within a row
                    key, order = key.sort(stable=True)
                    bag_cols, bag_vals = cols.index_select(0, order), vals.index_select(0, order)
            if bag_order is None:
                bag_order = _column_order(bag_cols, M)
            ptr = torch.zeros(B * L + 1, dtype=torch.long, device=dev)
            ptr[1:] = _counts(key, B * L).cumsum(0)
            parts = _SparseDecode.apply(bag_vals, self.W_dec, key, bag_cols, ptr, *bag_order)
            if L > 1:
                level_mse, s_last = _PrefixMSE.apply(parts.view(B, L, -1), z - self.b_pre)
                x_hat = s_last + self.b_pre
            else:
                x_hat = parts + self.b_pre
                level_mse = (x_hat - z).pow(2).mean()[None]
        recon = level_mse[-1]
        loss = (level_mse * self.level_weights).sum()
        zero = torch.zeros((), device=dev)

        multik = zero
        if cfg.multik:
            # the multi-k code is the top-k code plus the next (multik - k) latents
            mk_hat = x_hat + self._bag_decode(top_i[:, cfg.k: cfg.multik], vals_2d[:, cfg.k:], dense)
            multik = (mk_hat - z).pow(2).mean()
            loss = loss + cfg.multik_coeff * multik

        aux = zero
        if aux_k:
            aux_vals = gather(pre_ng.gather(1, aux_i).reshape(-1), *_regular(aux_i))
            aux_vals = aux_vals.view(B, aux_k) * aux_alive
            residual = (z - x_hat).detach()
            aux_hat = self._bag_decode(aux_i, aux_vals, dense)
            # the path also runs while latents are only near death (_aux_k_now): with none dead,
            # aux_hat is 0 and the term would be the residual's MSE, logged as loss without a
            # gradient; aux_alive.any() zeroes it on the device (no host read)
            aux = (aux_hat - residual).pow(2).mean() * aux_alive.any()
            loss = loss + cfg.aux_coeff * aux

        l1 = zero
        if cfg.l1_coeff:
            l1 = vals.sum() / B  # vals >= 0; decoder rows are unit norm
            loss = loss + cfg.l1_coeff * l1

        l0 = (vals > 0).sum().to(torch.float32) / B
        if self.training:
            if cfg.activation == "batchtopk" and cutoff is None:  # one process: its own batch's
                cutoff = _positive_min(vals.detach())
            self._update_state(cols, vals, world, cutoff)
        return Output(loss, recon, level_mse, multik, aux, l1, l0, x_hat)

    def _aux_k_now(self) -> int:
        """How many dead latents the AuxK loss needs now: min(aux_k, latents that can be dead).

        In training, one host sync every R = dead_steps/4 steps reads the activity counters: a
        latent R steps or more from being dead cannot die before the next look, so the aux path
        is skipped while none can be dead and sized to the candidates otherwise. The selection
        is exactly the plain rule's (top aux_k of the dead latents); only wasted work goes.
        """
        cfg = self.cfg
        if not self.training:
            return cfg.aux_k
        if self._aux_step >= self._aux_until:
            r = max(1, cfg.dead_steps // 4)
            near = int((self.steps_since_active >= cfg.dead_steps - r).sum())
            self._aux_k, self._aux_until = min(cfg.aux_k, near), self._aux_step + r
        self._aux_step += 1
        return self._aux_k

    def _bag_decode(self, cols: Tensor, vals: Tensor, dense: bool) -> Tensor:
        """cols[B, n], vals[B, n] -> sum_j vals[b, j] * W_dec[cols[b, j]]: [B, D]."""
        if dense:
            codes = torch.zeros(cols.shape[0], self.cfg.n_latents, device=cols.device,
                                dtype=vals.dtype).scatter_add(1, cols, vals)
            return codes @ self.W_dec
        bags, flat_cols = _regular(cols)
        ptr = torch.arange(0, bags.numel() + 1, cols.shape[1], device=cols.device)
        return _SparseDecode.apply(vals.reshape(-1), self.W_dec, bags, flat_cols, ptr,
                                   *_column_order(flat_cols, self.cfg.n_latents))

    @torch.no_grad()
    def _update_state(self, cols, vals, world: int, cutoff: Optional[Tensor] = None) -> None:
        """Dead-latent counters and the BatchTopK threshold from this step's batch: under data
        parallelism (``world`` workers) the batch of all workers together (a latent that fired
        on any of them is alive; the threshold follows the cutoff of the top k*B of all their
        rows, which selected the entries), so every worker holds the same state, as one process
        on the whole batch would. ``cols``/``vals``: the chosen entries; ``cutoff``: the
        smallest value selected (BatchTopK only; inf when nothing was)."""
        # vals >= 0: a latent fired when its values sum above zero (no boolean indexing: no sync)
        fired = _counts(cols, self.cfg.n_latents, vals.detach()) > 0
        if world > 1:  # one MIN all-reduce of -fired: fired on any worker
            import torch.distributed as dist

            packed = -fired.to(self.threshold.dtype)
            dist.all_reduce(packed, op=dist.ReduceOp.MIN)
            fired = packed < 0
        self.steps_since_active.add_(1).masked_fill_(fired, 0)
        if cutoff is None:
            return
        cutoff = torch.where(torch.isfinite(cutoff), cutoff, self.threshold)
        d = self.cfg.threshold_decay
        first = self.threshold_updates == 0
        self.threshold.copy_(torch.where(first, cutoff, d * self.threshold + (1 - d) * cutoff))
        self.threshold_updates.add_(1)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the component of each decoder row's gradient along the row (rows stay unit norm)."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec.data, self.W_dec.grad
        # in place and in slabs of rows: a fresh [M, D] temporary costs more in page faults on CPU
        # than the arithmetic
        step = max(1, (1 << 18) // w.shape[1])
        for i in range(0, w.shape[0], step):
            gi, wi = g[i:i + step], w[i:i + step]
            gi.addcmul_(wi, (gi * wi).sum(1, keepdim=True), value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data.div_(self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def dead_fraction(self) -> Tensor:
        return (self.steps_since_active >= self.cfg.dead_steps).float().mean()

    # ------------------------------------------------------------------ artifact

    def save(self, directory: str) -> None:
        """Write ``sae.safetensors`` and ``cfg.json`` into ``directory`` (local or s3://)."""
        from safetensors.torch import save as st_save

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _write(directory, "sae.safetensors", st_save(tensors, metadata={"format": "pt"}))
        _write(directory, "cfg.json", json.dumps(self.cfg.to_json(), indent=2).encode())

    @classmethod
    def load(cls, directory: str, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        """Rebuild a model from an artifact directory (local or s3://) written by ``save``."""
        from safetensors.torch import load as st_load

        try:
            cfg = SAEConfig.from_json(json.loads(_read(directory, "cfg.json")))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{directory}/cfg.json: {exc}") from None
        model = cls(cfg)
        state = st_load(_read(directory, "sae.safetensors"))
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise ValueError(f"{directory}/sae.safetensors lacks tensors {sorted(missing)}")
        model.load_state_dict(state)
        return model.to(device).eval()


def _column_order(cols: Tensor, M: int) -> tuple[Tensor, Tensor]:
    """Entries regrouped by latent: (order [N], ptr [M + 1]) with entries ``order[ptr[m]:ptr[m+1]]``
    in column m. One stable sort of N ints, shared by every backward that uses the same entries.
    On CPU with M <= 65536 it is numpy's radix sort of 16-bit keys, ten times torch's sort."""
    if _host_paths(cols) and M <= 1 << 16:
        order = torch.from_numpy(np.argsort(cols.numpy().astype(np.uint16), kind="stable"))
    else:
        order = cols.sort(stable=True).indices
    ptr = torch.zeros(M + 1, dtype=torch.long, device=cols.device)
    ptr[1:] = _counts(cols, M).cumsum(0)
    return order, ptr


def _data_parallel_world() -> int:
    """Workers training this model together (torch.distributed, e.g. Ray Train's DDP), else 1."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _host_paths(t: Tensor) -> bool:
    """Whether ``t`` takes the CPU variants (numpy's radix sort, the sampled BatchTopK threshold,
    bincount). Accelerators take variants that never read a value back to the host, so the CPU
    queues the next kernels while the device works; tests run those on the CPU too."""
    return t.device.type == "cpu"


def _counts(idx: Tensor, n: int, weights: Optional[Tensor] = None) -> Tensor:
    """``bincount(idx, weights, minlength=n)`` for indices known to be < n. On accelerators an
    ``index_add_``: torch's CUDA bincount copies the input's min and max to the host first."""
    if _host_paths(idx):
        return torch.bincount(idx, weights=weights, minlength=n)
    src = torch.ones_like(idx) if weights is None else weights
    return torch.zeros(n, dtype=src.dtype, device=idx.device).index_add_(0, idx, src)


def _transpose_bag(rows: Tensor, vals: Tensor, y: Tensor, corder: Tensor, cptr: Tensor) -> Tensor:
    """G^T y for the sparse G[R, M] with entries (rows, cols, vals), y[R, D] -> [M, D].

    ``corder``/``cptr`` group the entries by column (``_column_order``) and ``embedding_bag`` sums
    them: N*D work, where torch's CSR transpose + matmul re-sorts a copy and is several times slower.
    """
    # index_select: a few times faster than advanced indexing for 1-d gathers on CPU
    return F.embedding_bag(rows.index_select(0, corder), y, cptr, mode="sum",
                           per_sample_weights=vals.index_select(0, corder),
                           include_last_offset=True)


def _batch_topk(pre: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """BatchTopK selection: the n largest positive entries of pre[B, M] as (flat indices, values),
    indices ascending (rows ascending, columns ascending within a row).

    On CPU a full ``topk`` of B*M values is the slowest op of a step, so the n-th largest value is
    found from a sample instead: a strided sample's high quantile bounds it from below, the few
    values above that bound (in index order, from one ``nonzero``) are ranked exactly and the
    entries at or above the n-th kept in order (no sort). The result is exact: if the bound turns
    out too high (fewer than n values above it), all values are ranked. Exact ties at the
    threshold are all kept; values <= 0 never are (they would decode to nothing). On
    accelerators, ``topk`` + sort (no host sync).
    """
    flat = pre.reshape(-1)
    N = flat.numel()
    n = min(n, N)
    if not _host_paths(flat):
        idx = flat.clamp_min(0).topk(n, sorted=False).indices.sort().values
        return idx, flat[idx]
    stride = max(1, N // 8192) | 1  # odd: the sample walks across rows and columns
    sample = flat[::stride]
    S = sample.numel()
    expect = n * S / N  # sample values expected above the n-th largest
    r = min(S, int(expect + 4 * math.sqrt(expect) + 16))
    bound = sample.topk(r, sorted=False).values.min()
    idx = (flat >= bound).nonzero().squeeze(1)  # candidates, ascending
    if idx.numel() < n:  # the sample missed: rank everything
        idx = torch.arange(N)
    vals = flat[idx]
    thr = vals.kthvalue(idx.numel() - n + 1).values
    keep = vals >= thr if thr > 0 else vals > 0
    return idx[keep], vals[keep]


def _positive_min(v: Tensor) -> Tensor:
    """The smallest positive value of v (inf when none is): the cutoff of a BatchTopK selection,
    which keeps no value <= 0."""
    return torch.where(v > 0, v, torch.full_like(v, math.inf)).min()


def _global_batch_topk(pre: Tensor, n: int, world: int) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK under data parallelism: this worker's share of what one process selecting the
    top n*world entries of the batch of all ``world`` workers would choose (each worker with
    ``pre`` [B, M] and ``n`` = k*B; the workers step with equal batches), as (flat indices
    ascending, values, cutoff). A worker selecting its own top k*B instead would give its rows
    k latents a sample on average whatever they hold, and train on other codes than the
    threshold (the cutoff over all rows) gives at inference.

    The cutoff is the smallest positive value among the top n*world of all the workers' values:
    a worker holds at most n*world of them, so each sends its top n*world values (one
    all_gather, no host read) and keeps its entries at or above the cutoff (exact ties all
    kept, values <= 0 never, as ``_batch_topk``). On CPU its candidates come from
    ``_batch_topk`` and the kept ones are returned. On accelerators the count kept is not read
    back: the n*world local top entries are returned, those below the cutoff with value 0 (they
    decode to nothing and take no gradient), ties as its ``topk`` breaks them; a worker's sparse
    work (the bag sums over the entries) then scales with the whole batch's k*B*world entries,
    not its own k*B.
    """
    import torch.distributed as dist

    flat = pre.reshape(-1)
    total = min(n * world, flat.numel())  # a worker's share of the selection, at most
    host = _host_paths(flat)
    if host:
        idx, vals = _batch_topk(pre, total)  # ascending; ties at its cutoff may exceed total
        top = vals.topk(total, sorted=False).values if vals.numel() > total else vals
        top = F.pad(top, (0, total - top.numel()))  # zeros: never a cutoff
    else:
        top, idx = flat.topk(total, sorted=False)
    gathered = [torch.empty_like(top) for _ in range(world)]
    dist.all_gather(gathered, top.contiguous())
    every = torch.cat(gathered)
    cutoff = _positive_min(every.topk(min(n * world, every.numel()), sorted=False).values)
    if host:
        keep = vals >= cutoff
        return idx[keep], vals[keep], cutoff
    idx = idx.sort().values
    vals = flat[idx]
    return idx, torch.where(vals >= cutoff, vals, torch.zeros_like(vals)), cutoff


def _regular(idx: Tensor) -> tuple[Tensor, Tensor]:
    """idx[B, n] -> (rows, cols) of the pattern with n entries in every row, row-major."""
    B, n = idx.shape
    return torch.arange(B, device=idx.device)[:, None].expand(B, n).reshape(-1), idx.reshape(-1)


def _geometric_median(z: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld iterations on z[N, D] -> [D]."""
    y = z.median(0).values
    for _ in range(iters):
        d = (z - y).norm(dim=1).clamp_min(eps)
        w = 1 / d
        y_new = (w[:, None] * z).sum(0) / w.sum()
        if (y_new - y).norm() < eps * (1 + y.norm()):
            return y_new
        y = y_new
    return y


def _is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _write(directory: str, name: str, data: bytes) -> None:
    if _is_url(directory):
        from galaxysae import storage  # only for URLs: the model itself knows no storage

        storage.write_bytes(storage.join(directory, name), data)
        return
    import os

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _read(directory: str, name: str) -> bytes:
    if _is_url(directory):
        from galaxysae import storage

        return storage.read_bytes(storage.join(directory, name))
    import os

    path = os.path.join(str(directory).removeprefix("file://"), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (not an SAE artifact directory?)")
    with open(path, "rb") as fh:
        return fh.read()
