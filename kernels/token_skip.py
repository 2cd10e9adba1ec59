"""Triton kernel of top-k token skipping: gather the selected rows, gated update, scatter in place.

``out[rows[t]] = x[rows[t]] + coef[t] ⊙ (update[t] − x[rows[t]])`` for the T selected rows only: the
prologue gathers x through the index, the epilogue scatters to the same rows (out may be x), so the
unselected rows of the residual stream are neither read nor written and the cost is ∝ T.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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
    d = x.shape[1]
    g = coef.shape[1]
    bm, bn = (16, 64) if _INTERPRET else (16, 256)
    grid = (triton.cdiv(t, bm), triton.cdiv(d, bn))
    _skip_merge_kernel[grid](x, out, rows, update, coef, t, d, g, d // g, BM=bm, BN=bn)
