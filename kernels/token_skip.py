"""Triton kernels of top-k token skipping: the selection, and the gated merge in place.

* :func:`skip_select`: the router's score (GELU and last Linear over its first Linear's output), the top
  ⌈ρN⌉ tokens with CLS kept, in ascending order, and their gates σ(s): one launch for the batch.
* :func:`skip_merge`: ``out[rows[t]] = x[rows[t]] + coef[t] ⊙ (update[t] − x[rows[t]])`` for the T
  selected rows only: the prologue gathers x through the index, the epilogue scatters to the same rows
  (out may be x), so the unselected rows of the residual stream are neither read nor written and the
  cost is ∝ T.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import check_dense_out

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _skip_merge_kernel(
    x_ptr, out_ptr, rows_ptr, upd_ptr, c_ptr,
    T, D, G, GW,
    BM: tl.constexpr, BN: tl.constexpr,
):
    t = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    tmask = t < T
    m2 = tmask[:, None] & (cols < D)[None, :]
    row = tl.load(rows_ptr + t, mask=tmask, other=0).to(tl.int64)
    x = tl.load(x_ptr + row[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    u = tl.load(upd_ptr + t.to(tl.int64)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + t[:, None] * G + (cols // GW)[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(out_ptr + row[:, None] * D + cols[None, :], (x + c * (u - x)).to(out_ptr.dtype.element_ty), mask=m2)


def skip_merge(x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, update: torch.Tensor,
               coef: torch.Tensor) -> None:
    """Write ``x[rows] + coef ⊙ (update − x[rows])`` into ``out[rows]``.

    x/out (M, D) contiguous (out may be x), rows (T,) int, update (T, D) contiguous, coef (T, G), G | D."""
    t = rows.numel()
    if t == 0:
        return
    check_dense_out("skip_merge", out=out)
    x = x if x is out else x.contiguous()  # the kernel indexes every operand densely
    rows, update, coef = rows.contiguous(), update.contiguous(), coef.contiguous()
    d = x.shape[1]
    g = coef.shape[1]
    bm, bn = (16, 64) if _INTERPRET else (16, 256)
    grid = (triton.cdiv(t, bm), triton.cdiv(d, bn))
    _skip_merge_kernel[grid](x, out, rows, update, coef, t, d, g, d // g, BM=bm, BN=bn)


@triton.jit
def _skip_select_kernel(
    h_ptr, w2_ptr, b2_ptr, rank_ptr, idx_ptr, gate_ptr,
    N, F, KEPT,
    BLOCK_N: tl.constexpr, BF: tl.constexpr, BJ: tl.constexpr, ALL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ii = tl.arange(0, BLOCK_N)
    imask = ii < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for f0 in range(0, F, BF):
        ff = f0 + tl.arange(0, BF)
        fmask = ff < F
        h = tl.load(h_ptr + (b * N + ii)[:, None] * F + ff[None, :], mask=imask[:, None] & fmask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w2_ptr + ff, mask=fmask, other=0.0).to(tl.float32)
        acc += tl.sum(0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476)) * w[None, :], axis=1)
    # fp32 scores: a bf16 reference rounds them to 8 mantissa bits first, and ties far more often
    s = acc + tl.load(b2_ptr).to(tl.float32)
    gate = tl.sigmoid(s).to(gate_ptr.dtype.element_ty)
    if ALL:
        tl.store(idx_ptr + b * N + ii, ii.to(tl.int64), mask=imask)
        tl.store(gate_ptr + b * N + ii, gate, mask=imask)
    else:
        # rank = how many tokens come first in (score descending, index ascending) order, with the CLS
        # token first and NaN scores counted as +inf (as torch.topk orders them)
        ranked = tl.where((ii == 0) | (s != s), float("inf"), s)
        ranked = tl.where(imask, ranked, float("-inf"))
        tl.store(rank_ptr + b * BLOCK_N + ii, ranked)
        tl.debug_barrier()
        rank = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for j0 in range(0, BLOCK_N, BJ):
            jj = j0 + tl.arange(0, BJ)
            rj = tl.load(rank_ptr + b * BLOCK_N + jj)
            first = (rj[None, :] > ranked[:, None]) | ((rj[None, :] == ranked[:, None]) & (jj[None, :] < ii[:, None]))
            rank += tl.sum(first.to(tl.int32), axis=1)
        keep = (rank < KEPT) & imask
        pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1  # kept tokens in ascending index order
        tl.store(idx_ptr + b * KEPT + pos, ii.to(tl.int64), mask=keep)
        tl.store(gate_ptr + b * KEPT + pos, gate, mask=keep)


def select_meta(block_n: int) -> dict:
    """Block sizes and warps of the selection kernel for ``block_n`` (padded) tokens: the (BLOCK_N, BF)
    hidden tiles and (BLOCK_N, BJ) comparison tiles are kept at ~8-16 K elements per program."""
    if _INTERPRET:
        return dict(BLOCK_N=block_n, BF=16, BJ=min(block_n, 16), num_warps=4)
    return dict(BLOCK_N=block_n, BF=max(8, min(64, 8192 // block_n)), BJ=max(16, min(64, 16384 // block_n)),
                num_warps=4 if block_n <= 256 else 8)


def skip_select(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``kept`` tokens of each sample by the score ``s = GELU(h) · w2 + b2``, CLS (token 0) always kept.

    h (B, N, F) contiguous (the router's first Linear), w2 (1, F), b2 (1,). Returns the kept token
    indices (B, kept) int64 in ascending order and their gates σ(s) (B, kept) in h's dtype. Equal scores
    go to the lower token index. One program per sample: the scores stay on chip, ranks by pairwise
    comparison (no sort), positions by a prefix sum."""
    b, n, f = h.shape
    h, w2, b2 = h.contiguous(), w2.contiguous(), b2.contiguous()  # (read densely)
    idx = torch.empty(b, kept, device=h.device, dtype=torch.int64)
    gate = torch.empty(b, kept, device=h.device, dtype=h.dtype)
    if b == 0:
        return idx, gate
    block_n = max(16, triton.next_power_of_2(n))
    ranked = torch.empty(b, block_n, device=h.device, dtype=torch.float32)
    _skip_select_kernel[(b,)](
        h, w2, b2, ranked, idx, gate, n, f, kept, **select_meta(block_n),
        ALL=kept == n,
    )
    return idx, gate
