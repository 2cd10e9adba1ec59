"""Triton kernels of the gated top-k MoE adapter (DynaMer): grouped down projection + fused combine.

Notation: M rows per stream (x_gen, x_med are (M, D), contiguous), T selected rows (both streams'
selections concatenated), K experts per row, A = T·K (row, slot) assignments, n experts of bottleneck r.
Expert e maps the pair u = [x_gen[row] ; x_med[row]] (2D wide) to up_e(relu(down_e(u))).

1. :func:`moe_down`: assignments are sorted by expert (stable argsort of indices only, on the device);
   one launch of cdiv(A, BM) + n programs (an upper bound on the tiles of n groups, so no host sync) runs
   the grouped GEMM ``hidden[a] = relu(u[row(a)] @ W_down[e]ᵀ + b_down[e])``; each program finds its
   expert and first assignment from a tiny cumulative tile table, gathers its rows in the prologue and
   writes the r-wide hidden (r/2D of the input, kept for the backward) at the unsorted assignment id.
2. :func:`moe_combine`: per tile of one stream's selected rows, ``mix = Σ_e (Σ_k [e_k = e] p_k h_k) @
   W_up[e]ᵀ + p_e b_up[e]`` (one dot per expert the tile's rows use, absent ones skipped), then the epilogue
   gathers x[row] and writes ``x + c ⊙ (mix − x)`` to out[row] (out may be x: in place). Only selected
   rows are read or written; there is no (T×n×D) or (T×K×D) intermediate.
"""

from __future__ import annotations

import copy
import os

import torch
import triton
import triton.language as tl

from .layout import check_dense_out
from .precision import dot_precision
from .tuning import tuned_configs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


@triton.jit
def _moe_down_kernel(
    xg_ptr, xm_ptr, rows_ptr, order_ptr, offs_ptr, tcum_ptr, wd_ptr, bd_ptr, h_ptr,
    n_exp, D, R, K, A_BUCKET,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    eo = tl.arange(0, BLOCK_E)
    tile_end = tl.load(tcum_ptr + 1 + eo, mask=eo < n_exp, other=2147483647)
    e = tl.sum((tile_end <= pid).to(tl.int32), axis=0)
    valid = e < n_exp
    e = tl.minimum(e, n_exp - 1)
    start = tl.load(offs_ptr + e) + (pid - tl.load(tcum_ptr + e)) * BM
    end = tl.load(offs_ptr + e + 1)
    a_pos = start + tl.arange(0, BM)
    amask = a_pos < tl.where(valid, end, start)  # (no block & scalar mask: triton 3.9's interpreter refuses it)
    aid = tl.load(order_ptr + a_pos, mask=amask, other=0)
    row = tl.load(rows_ptr + aid // K, mask=amask, other=0).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    C = 2 * D
    w_base = wd_ptr + e.to(tl.int64) * R * C
    acc = tl.zeros((BM, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        umask = amask[:, None] & kmask[None, :]
        wmask = kmask[:, None] & rmask[None, :]
        u = tl.load(xg_ptr + row[:, None] * D + kk[None, :], mask=umask, other=0.0)
        w = tl.load(w_base + rr[None, :] * C + kk[:, None], mask=wmask, other=0.0)
        acc += tl.dot(u, w, input_precision=DOT_PRECISION)
        u = tl.load(xm_ptr + row[:, None] * D + kk[None, :], mask=umask, other=0.0)
        w = tl.load(w_base + rr[None, :] * C + (kk + D)[:, None], mask=wmask, other=0.0)
        acc += tl.dot(u, w, input_precision=DOT_PRECISION)
    b = tl.load(bd_ptr + e * R + rr, mask=rmask, other=0.0).to(tl.float32)
    hid = tl.maximum(acc + b[None, :], 0.0)
    tl.store(h_ptr + aid.to(tl.int64)[:, None] * R + rr[None, :], hid.to(h_ptr.dtype.element_ty),
             mask=amask[:, None] & rmask[None, :])


@triton.jit
def _moe_combine_kernel(
    x_ptr, out_ptr, rows_ptr, eidx_ptr, p_ptr, h_ptr, wu_ptr, bu_ptr, c_ptr, mix_ptr,
    T, n_exp, D, R, K, G, GW, T_BUCKET,
    BM: tl.constexpr, BN: tl.constexpr, BLOCK_R: tl.constexpr, STORE_MIX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = pid_m * BM + tl.arange(0, BM)
    tmask = t < T
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < D
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for e in range(n_exp):
        # the rows' probability-weighted hidden units for expert e (zero where a row did not pick it):
        # one dot per expert, not one per (expert, slot)
        p_e = tl.zeros((BM,), dtype=tl.float32)
        h_e = tl.zeros((BM, BLOCK_R), dtype=tl.float32)
        for j in range(K):
            ex = tl.load(eidx_ptr + t * K + j, mask=tmask, other=-1)
            p = tl.where(ex == e, tl.load(p_ptr + t * K + j, mask=tmask, other=0.0).to(tl.float32), 0.0)
            if tl.max(p != 0.0, axis=0):
                h = tl.load(h_ptr + (t * K + j).to(tl.int64)[:, None] * R + rr[None, :],
                            mask=tmask[:, None] & rmask[None, :], other=0.0)
                h_e += p[:, None] * h.to(tl.float32)
                p_e += p
        if tl.max(p_e != 0.0, axis=0):
            w = tl.load(wu_ptr + e * D * R + cols[None, :] * R + rr[:, None],
                        mask=rmask[:, None] & cmask[None, :], other=0.0)
            b = tl.load(bu_ptr + e * D + cols, mask=cmask, other=0.0).to(tl.float32)
            acc += tl.dot(h_e.to(w.dtype), w, input_precision=DOT_PRECISION) + p_e[:, None] * b[None, :]
    row = tl.load(rows_ptr + t, mask=tmask, other=0).to(tl.int64)
    m2 = tmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + row[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + t[:, None] * G + (cols // GW)[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(out_ptr + row[:, None] * D + cols[None, :], (x + c * (acc - x)).to(out_ptr.dtype.element_ty), mask=m2)
    if STORE_MIX:
        tl.store(mix_ptr + t.to(tl.int64)[:, None] * D + cols[None, :], acc.to(mix_ptr.dtype.element_ty), mask=m2)


def _down_configs() -> list[triton.Config]:
    """BK, warps and stages only: BM is fixed by the host-built tile table (``_DOWN_BM``)."""
    if _INTERPRET:
        return [triton.Config({"BK": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BK": bk}, num_warps=w, num_stages=st)
        for bk, w, st in [(64, 4, 3), (64, 8, 3), (128, 8, 2), (32, 4, 4)]
    ]


def _combine_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BM": 16, "BN": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (128, 64, 8, 3),
                              (16, 128, 4, 3)]
    ]


def _prune_down(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Bottlenecks above 128 (BLOCK_R 256 and up) take K chunks narrower in proportion (BK scaled by
    128/BLOCK_R, at least 16): the two streams' pipelined (BK, BLOCK_R) weight tiles would otherwise need
    240-320 KiB of shared memory on sm_90 at r = 200 (limit 227 KiB; tests/sm90_compile.py), so the first
    config (MOSAIC_FAST_AUTOTUNE=0) could not launch, nor any fp32 config. Scaled: 80-164 KiB."""
    block_r = kwargs["BLOCK_R"]
    if block_r <= 128:
        return configs
    narrow = []
    for config in configs:
        config = copy.copy(config)
        config.kwargs = {**config.kwargs, "BK": max(16, config.kwargs["BK"] * 128 // block_r)}
        narrow.append(config)
    return narrow


# The first config of each list is what the kernels ran before they were tuned (and what
# MOSAIC_FAST_AUTOTUNE=0 keeps). The combine kernel may write in place (out is x): the autotuner
# restores ``out`` (and ``mix``) after each timed run, so tuning never applies the update twice.
_moe_down = triton.autotune(configs=tuned_configs(_down_configs()), key=["D", "R", "n_exp", "A_BUCKET"],
                            prune_configs_by={"early_config_prune": _prune_down})(_moe_down_kernel)
_moe_combine = triton.autotune(configs=tuned_configs(_combine_configs()),
                               key=["D", "R", "K", "n_exp", "G", "STORE_MIX", "T_BUCKET"],
                               restore_value=["out_ptr", "mix_ptr"])(_moe_combine_kernel)
_DOWN_BM = 16 if _INTERPRET else 64


def _bucket(n: int) -> int:
    """Autotuning key for a row count (unused by the kernels): powers of two from 1024."""
    return max(1024, triton.next_power_of_2(max(1, n)))


def moe_down(
    x_gen: torch.Tensor, x_med: torch.Tensor, rows: torch.Tensor, expert_idx: torch.Tensor,
    w_down: torch.Tensor, b_down: torch.Tensor,
) -> torch.Tensor:
    """hidden (T·K, r) = relu([x_gen; x_med][rows[a // K]] @ w_down[e_a]ᵀ + b_down[e_a]) per assignment a.

    x_gen/x_med (M, D) contiguous, rows (T,) int, expert_idx (T, K) int in [0, n), w_down (n, r, 2D),
    b_down (n, r). No host synchronisation."""
    n, r, _ = w_down.shape
    d = x_gen.shape[1]
    k = expert_idx.shape[1]
    # the kernel indexes every operand densely (a no-op for contiguous ones)
    x_gen, x_med, rows, w_down, b_down = (t.contiguous() for t in (x_gen, x_med, rows, w_down, b_down))
    flat = expert_idx.reshape(-1)
    a = flat.numel()
    bm = _DOWN_BM
    hidden = torch.empty(a, r, device=x_gen.device, dtype=x_gen.dtype)
    if a == 0:
        return hidden
    order = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.zeros(n, device=flat.device, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat))
    zero = counts.new_zeros(1)
    offs = torch.cat([zero, counts.cumsum(0)]).to(torch.int32)
    tcum = torch.cat([zero, ((counts + bm - 1) // bm).cumsum(0)]).to(torch.int32)
    grid = (triton.cdiv(a, bm) + n,)
    _moe_down[grid](
        x_gen, x_med, rows, order, offs, tcum, w_down, b_down, hidden,
        n, d, r, k, _bucket(a),
        BM=bm, BLOCK_R=_pow2(r), BLOCK_E=_pow2(n + 1, 2),
        DOT_PRECISION=dot_precision(w_down.dtype),
    )
    return hidden


def moe_combine(
    x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, expert_idx: torch.Tensor, probs: torch.Tensor,
    hidden: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, coef: torch.Tensor,
    mix: torch.Tensor | None = None,
) -> None:
    """out[rows[t]] = x[rows[t]] + coef[t] ⊙ (mix_t − x[rows[t]]), mix_t = Σ_k probs[t,k]·expert_{e}(hidden[t·K+k]).

    x/out (M, D) contiguous (out may be x), rows (T,), expert_idx/probs (T, K), hidden (T·K, r) as written
    by :func:`moe_down` for these rows, w_up (n, D, r), b_up (n, D), coef (T, G) with G | D (value g
    covers channels [g·D/G, (g+1)·D/G)). ``mix`` (T, D), if given, receives the expert mixture."""
    t, k = expert_idx.shape
    if t == 0:
        return
    n, d, r = w_up.shape
    g = coef.shape[1]
    # the kernel indexes every operand densely: it cannot write a strided out or mix in place
    check_dense_out("moe_combine", out=out, mix=mix)
    if x is not out:
        x = x.contiguous()
    rows, expert_idx, probs, hidden, w_up, b_up, coef = (
        v.contiguous() for v in (rows, expert_idx, probs, hidden, w_up, b_up, coef))
    grid = lambda m: (triton.cdiv(t, m["BM"]), triton.cdiv(d, m["BN"]))
    _moe_combine[grid](
        x, out, rows, expert_idx, probs, hidden, w_up, b_up, coef, mix if mix is not None else out,
        t, n, d, r, k, g, d // g, _bucket(t),
        BLOCK_R=_pow2(r), STORE_MIX=mix is not None, DOT_PRECISION=dot_precision(w_up.dtype),
    )
