"""Triton kernels of the dense M4oE gated mixture as ONE adapter of concatenated bottleneck R = Σ r_e.

Every specialist has its own LayerNorm, but they share the normalised x̂ = (h − μ)/σ:
LN_e(h) = x̂·γ_e + β_e, so γ_e and β_e fold into the down projection (W'_e = W_e·diag(γ_e),
b'_e = W_e β_e + b_e; done by the caller). Then

1. :func:`gs_down`: LayerNorm statistics in the prologue, ``hid = relu(x̂ @ W'ᵀ + b') ⊙ scale[t, e(unit)]``
   (the per-expert gate times the adapter scale, applied to each hidden unit of expert e), (T, R);
2. :func:`gs_up`: ``out = hid @ W_upᵀ + Σ_e scale[t, e]·b_up[e]``, times the channel weights w (T, D) in
   the "channel" variant.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .precision import dot_precision

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gs_down_kernel(
    h_ptr, wf_ptr, bf_ptr, unit_ptr, sc_ptr, hid_ptr,
    T, D, R, E, eps,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    t = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    tmask = t < T
    rmask = rr < R
    row = t.to(tl.int64) * D
    s1 = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        x = tl.load(h_ptr + row[:, None] + kk[None, :], mask=tmask[:, None] & (kk < D)[None, :], other=0.0)
        s1 += tl.sum(x.to(tl.float32), axis=1)
    mean = s1 / D
    s2 = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        m = tmask[:, None] & (kk < D)[None, :]
        x = tl.load(h_ptr + row[:, None] + kk[None, :], mask=m, other=0.0).to(tl.float32)
        dx = tl.where(m, x - mean[:, None], 0.0)
        s2 += tl.sum(dx * dx, axis=1)
    rstd = 1.0 / tl.sqrt(s2 / D + eps)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        x = tl.load(h_ptr + row[:, None] + kk[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        xh = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None]).to(wf_ptr.dtype.element_ty)
        w = tl.load(wf_ptr + rr[None, :].to(tl.int64) * D + kk[:, None], mask=kmask[:, None] & rmask[None, :],
                    other=0.0)
        acc += tl.dot(xh, w, input_precision=DOT_PRECISION)
    b = tl.load(bf_ptr + rr, mask=rmask, other=0.0).to(tl.float32)
    unit = tl.load(unit_ptr + rr, mask=rmask, other=0)
    m2 = tmask[:, None] & rmask[None, :]
    sc = tl.load(sc_ptr + t[:, None] * E + unit[None, :], mask=m2, other=0.0).to(tl.float32)
    hid = tl.maximum(acc + b[None, :], 0.0) * sc
    tl.store(hid_ptr + t.to(tl.int64)[:, None] * R + rr[None, :], hid.to(hid_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gs_up_kernel(
    hid_ptr, wu_ptr, bu_ptr, sc_ptr, cw_ptr, out_ptr,
    T, D, R, E,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, CHANNEL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    t = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    tmask = t < T
    cmask = cols < D
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        rmask = rr < R
        h = tl.load(hid_ptr + t.to(tl.int64)[:, None] * R + rr[None, :], mask=tmask[:, None] & rmask[None, :],
                    other=0.0)
        w = tl.load(wu_ptr + cols[None, :].to(tl.int64) * R + rr[:, None], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        acc += tl.dot(h, w, input_precision=DOT_PRECISION)
    for e in range(E):
        sc = tl.load(sc_ptr + t * E + e, mask=tmask, other=0.0).to(tl.float32)
        b = tl.load(bu_ptr + e * D + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += sc[:, None] * b[None, :]
    m2 = tmask[:, None] & cmask[None, :]
    if CHANNEL:
        acc *= tl.load(cw_ptr + t.to(tl.int64)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m2)


def gs_down(h: torch.Tensor, w_fold: torch.Tensor, b_fold: torch.Tensor, unit_expert: torch.Tensor,
            scale: torch.Tensor, eps: float) -> torch.Tensor:
    """hidden (T, R) = relu(LN(h) @ w_foldᵀ + b_fold) ⊙ scale[:, unit_expert]; h (T, D), w_fold (R, D),
    b_fold (R,), unit_expert (R,) int32 (expert of each hidden unit), scale (T, E)."""
    t, d = h.shape
    r = w_fold.shape[0]
    # the kernel indexes every operand densely (a no-op for contiguous ones)
    h, w_fold, b_fold, unit_expert, scale = (v.contiguous() for v in (h, w_fold, b_fold, unit_expert, scale))
    hidden = torch.empty(t, r, device=h.device, dtype=h.dtype)
    if t == 0:
        return hidden
    bm, bk, br = (16, 32, 32) if _INTERPRET else (64, 64, 64)
    grid = (triton.cdiv(t, bm), triton.cdiv(r, br))
    _gs_down_kernel[grid](h, w_fold, b_fold, unit_expert, scale, hidden, t, d, r, scale.shape[1], eps,
                          BM=bm, BK=bk, BR=br, DOT_PRECISION=dot_precision(w_fold.dtype))
    return hidden


def gs_up(hidden: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, scale: torch.Tensor,
          channel_weight: torch.Tensor | None) -> torch.Tensor:
    """out (T, D) = (hidden @ w_upᵀ + scale @ b_up) [⊙ channel_weight]; hidden (T, R), w_up (D, R)
    (the experts' up projections concatenated), b_up (E, D), scale (T, E), channel_weight (T, D)."""
    t, r = hidden.shape
    d = w_up.shape[0]
    # the kernel indexes every operand densely (a no-op for contiguous ones)
    hidden, w_up, b_up, scale = (v.contiguous() for v in (hidden, w_up, b_up, scale))
    if channel_weight is not None:
        channel_weight = channel_weight.contiguous()
    out = torch.empty(t, d, device=hidden.device, dtype=hidden.dtype)
    if t == 0:
        return out
    bm, bn, br = (16, 32, 32) if _INTERPRET else (64, 128, 32)
    grid = (triton.cdiv(t, bm), triton.cdiv(d, bn))
    cw = channel_weight if channel_weight is not None else out
    _gs_up_kernel[grid](hidden, w_up, b_up, scale, cw, out, t, d, r, scale.shape[1],
                        BM=bm, BN=bn, BR=br, CHANNEL=channel_weight is not None,
                        DOT_PRECISION=dot_precision(w_up.dtype))
    return out
