"""Grouped specialist-adapter kernels: A/B/C adapters with different bottlenecks in ONE launch.

For a packed token matrix ``h`` (T, D) whose rows belong to groups (specialists) g = 0..G-1 with
bottlenecks r_g (any size up to 256; 64/96/192 in MOSAIC) every row gets

    out = base + s * (relu(LN_g(h) @ Wd_g^T + bd_g) @ Wu_g^T + bu_g)

Forward: one program per (group, tile of BM rows). The LayerNorm is the GEMM prologue (statistics in
one pass over D with Chan's combination, normalised on the fly per K chunk), the hidden activation
(BM, r_g) stays in registers, and the epilogue adds the bias, scales, adds ``base`` and stores.

Backward (deterministic, no float atomics):
  * ``_bwd_dh_kernel`` (same tiles as the forward): dz = (s * dout) @ Wu_g, da = dz * (a > 0) (written to
    a (T, R_MAX) buffer); the LayerNorm backward's row sums mean(dy w) and mean(dy w xhat) come from da
    and a through two packed per-group vectors (Wd_g w_g and bd + Wd_g b_g), so one pass over D computes
    dy = da @ Wd_g, dh and one row of per-tile partial sums of the LN weight/bias gradients (sum over the
    tile of dy * xhat and dy).
  * ``_bwd_w_kernel``: one program per (group, r-block, D-block, row split): dWd, dWu, dbd, dbu by
    looping over the group's rows in a fixed order, and the LN gradients by summing the per-tile
    partials of its group in a fixed order. With SPLIT > 1 the splits go to a (SPLIT, ...) buffer that
    is summed afterwards (torch's sum over a dim is deterministic).

Routing (no host synchronisation anywhere):
  * MODE_SINGLE: one group, row p of the group is row p of h.
  * MODE_SEG: ``ids`` (S,) gives the group of each segment of L consecutive rows (a sample of N tokens,
    so T = S * L). Every program loads the S ids, counts the rows of each group, finds its own group and
    tile from the cumulative tile counts, and maps the positions of its tile to rows through the rank of
    each segment inside its group (an inclusive cumsum of the membership mask). Used while S <= SEG_MAX.
  * MODE_PERM: for many segments (e.g. per-row routing), the segments sorted by group (stable argsort on
    the device) and per-group segment counts are precomputed with torch ops (no sync); the kernel reads
    them.
  Segment ids outside [0, G) form a pseudo-group G whose rows are written as NaN (an error cannot be
  raised from the device without a sync; on CPU the ops layer raises ValueError before launching).

The grid is ``cdiv(T, BM) + G + 1`` programs, an upper bound of the number of tiles over all groups
(including the pseudo-group); surplus programs see no valid rows and store nothing.

Weights are packed per tensor kind (DESIGN.md, kernel notes): ln_w, ln_b, bu (G, D); wd (R_total, D) with
the rows of group g at [off_g, off_g + r_g); bd (R_total,); wu (D, R_total) with the columns of group g
at [off_g, off_g + r_g). A tiny int32 table ``meta`` (G, 2) holds (off_g, r_g).

Dtypes: h/base/out may differ from the weight dtype (autocast: fp32 activations, bf16 weights); the
LayerNorm and every accumulation run in fp32, the dot operands are in the weight dtype. fp32 dots follow
torch's float32 matmul precision (IEEE by default, TF32 after ``torch.set_float32_matmul_precision("high")``).
Under TRITON_INTERPRET=1 bf16 is upcast to fp32 by the launchers (the interpreter's bf16
dot is silently wrong).

Nothing here imports from ``mosaic_fast``.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .precision import dot_precision
from .tuning import AUTOTUNE, tuned_configs

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MODE_SINGLE = 0
MODE_SEG = 1
MODE_PERM = 2

#: Largest number of segments routed in-kernel (MODE_SEG); more use MODE_PERM (a device argsort first).
SEG_MAX = 1024
#: Largest bottleneck the kernels hold on chip.
MAX_BOTTLENECK = 256
#: Save the pre-activation in the forward (True) or recompute it in the backward (False).
SAVE_PREACT = True
#: Row splits of the weight-gradient kernel; None picks from the SM count.
WGRAD_SPLIT: int | None = None
#: Forward variant. "fused": one kernel, the hidden stays on chip and each row tile runs the whole up
#: projection in sequence (measured on an H200, 2026-11-30: 12 % of the memory floor). "split": the
#: LayerNorm + down projection kernel writes the pre-activation (T, R_MAX) and a second kernel runs the
#: up projection over (row tile, column block) programs in parallel: ~8 % more bytes, far more
#: parallelism (unmeasured; ``benchmarks/tune_grouped_adapter.py`` times both).
#: "onepass": the fused kernel with the LayerNorm folded into the down projection, so h is read once
#: and every loop over D is a pipelined dot loop (the statistics pass has no dot, so Triton does not
#: pipeline its loads): ``LN(h) Wdᵀ = rstd (h - c) (w∘Wd)ᵀ - rstd (mean - c) (Wd w) + Wd b`` with the
#: row sums of (h - c) and (h - c)² accumulated in the same loop, c a per-row shift (the mean of the first
#: chunk) against cancellation. Unmeasured on a GPU; parity-tested in the interpreter and compiled for sm_90.
#: "auto" (default): the fused kernel with the two-pass or the one-pass LayerNorm, whichever the autotuner
#: times faster for the shape (with MOSAIC_FAST_AUTOTUNE=0 and in the interpreter: two-pass).
FORWARD_VARIANT = "auto"
FORWARD_VARIANTS = ("auto", "fused", "split", "onepass")
#: Tell the compiler that every group's offset and width in the packed R dimension are multiples of 16 when
#: every bottleneck is (then so is every offset: 64/96/192 in MOSAIC). Wu's tiles are contiguous along R and
#: masked by r: without the hint each element is a separate 2-byte load, unpipelined; with it they are vector
#: loads / cp.async (tests/sm90_compile.py). False: never hint (``benchmarks/tune_grouped_adapter.py`` times both).
ALIGN_HINTS = True


# ----------------------------------------------------------------------------------------------------
# Device-side routing helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _members(ids_ptr, offs, S, g, G):
    """Whether segments ``offs`` belong to group g (g == G: the pseudo-group of out-of-range ids)."""
    inb = offs < S
    ids = tl.load(ids_ptr + offs, mask=inb, other=0)
    return tl.where(g < G, inb & (ids == g), inb & ((ids < 0) | (ids >= G)))


@triton.jit
def _seg_count(ids_ptr, S, g, G, SC: tl.constexpr):
    """Number of segments in group g (chunks of SC ids, so registers do not grow with S)."""
    n = g * 0
    for s0 in range(0, S, SC):
        n += tl.sum(_members(ids_ptr, s0 + tl.arange(0, SC), S, g, G).to(tl.int32), axis=0)
    return n


@triton.jit
def _seg_sample(k, ids_ptr, S, g, G, SC: tl.constexpr):
    """Index of the k-th segment of group g, for each k: the number of segments whose inclusive
    group-g count is <= k (the k-th member is the first whose inclusive count is k + 1)."""
    sample = k * 0
    carry = g * 0
    for s0 in range(0, S, SC):
        offs = s0 + tl.arange(0, SC)
        member = _members(ids_ptr, offs, S, g, G).to(tl.int32)
        incl = tl.cumsum(member, axis=0) + carry
        hit = (incl[None, :] <= k[:, None]) & (offs < S)[None, :]
        sample += tl.sum(hit.to(tl.int32), axis=1)
        carry += tl.sum(member, axis=0)
    return sample


@triton.jit
def _schedule(pid, ids_ptr, cnt_ptr, S, L, G, MODE: tl.constexpr, SC: tl.constexpr, BM: tl.constexpr):
    """Find the tile of program ``pid``: (group or -1, tile index in group, rows of group, first segment)."""
    if MODE == 0:
        g = pid * 0
        j = pid
        n = pid * 0 + S * L
        seg_off = pid * 0
    else:
        g = pid * 0 - 1
        j = pid * 0
        n = pid * 0
        seg_off = pid * 0
        tile_start = pid * 0
        seg_start = pid * 0
        for gg in range(0, G + 1):
            if MODE == 1:
                nseg = _seg_count(ids_ptr, S, pid * 0 + gg, G, SC)
            else:
                nseg = tl.load(cnt_ptr + gg).to(tl.int32)
            ntiles = tl.cdiv(nseg * L, BM)
            sel = (pid >= tile_start) & (pid < tile_start + ntiles)
            g = tl.where(sel, gg, g)
            j = tl.where(sel, pid - tile_start, j)
            n = tl.where(sel, nseg * L, n)
            seg_off = tl.where(sel, seg_start, seg_off)
            tile_start += ntiles
            seg_start += nseg
    return g, j, n, seg_off


@triton.jit
def _tile(pid, ids_ptr, perm_ptr, cnt_ptr, S, L, G, MODE: tl.constexpr, SC: tl.constexpr, BM: tl.constexpr):
    """Program ``pid``'s tile: (group or -1, positions in the group's sorted rows, which are valid, their
    rows of h, the group's first segment)."""
    g, j, n, seg_off = _schedule(pid, ids_ptr, cnt_ptr, S, L, G, MODE, SC, BM)
    pos = j * BM + tl.arange(0, BM)
    valid = pos < n
    rows = _rows_of(pos, valid, g, G, seg_off, ids_ptr, perm_ptr, S, L, MODE, SC)
    return g, pos, valid, rows, seg_off


@triton.jit
def _packed_range(meta_ptr, g, R_ALIGNED: tl.constexpr):
    """Group g's (offset, width) in the packed R dim, marked as multiples of 16 when R_ALIGNED (every bottleneck
    is: :func:`_r_aligned`). The hints go on the loads: on a helper's arguments Triton drops them silently."""
    roff = tl.load(meta_ptr + 2 * g)
    r = tl.load(meta_ptr + 2 * g + 1)
    if R_ALIGNED:
        roff = tl.multiple_of(roff, 16)
        r = tl.multiple_of(r, 16)
    return roff, r


@triton.jit
def _group_meta(g, G, meta_ptr, R_ALIGNED: tl.constexpr):
    """(valid group?, group clamped into [0, G), its offset in the packed R dim, its bottleneck or 0)."""
    ok = (g >= 0) & (g < G)
    gc = tl.minimum(tl.maximum(g, 0), G - 1)
    roff, r = _packed_range(meta_ptr, gc, R_ALIGNED)
    return ok, gc, roff, tl.where(ok, r, 0)


@triton.jit
def _group_info(g, ids_ptr, cnt_ptr, S, L, G, MODE: tl.constexpr, SC: tl.constexpr, BM: tl.constexpr):
    """For group g: (rows, first segment in sorted order, first tile, tiles) with tiles of BM rows."""
    if MODE == 0:
        n = g * 0 + S * L
        seg_off = g * 0
        tile_start = g * 0
    else:
        n = g * 0
        seg_off = g * 0
        tile_start = g * 0
        for gg in range(0, G + 1):
            if MODE == 1:
                nseg = _seg_count(ids_ptr, S, g * 0 + gg, G, SC)
            else:
                nseg = tl.load(cnt_ptr + gg).to(tl.int32)
            before = gg < g
            tile_start += tl.where(before, tl.cdiv(nseg * L, BM), 0)
            seg_off += tl.where(before, nseg, 0)
            n = tl.where(gg == g, nseg * L, n)
    return n, seg_off, tile_start, tl.cdiv(n, BM)


@triton.jit
def _rows_of(pos, valid, g, G, seg_off, ids_ptr, perm_ptr, S, L, MODE: tl.constexpr, SC: tl.constexpr):
    """Row of h (int64) of each position ``pos`` in the sorted rows of group g."""
    if MODE == 0:
        rows = pos.to(tl.int64)
    else:
        k = pos // L
        o = pos - k * L
        if MODE == 1:
            sample = _seg_sample(k, ids_ptr, S, g, G, SC)
        else:
            sample = tl.load(perm_ptr + seg_off + k, mask=valid, other=0).to(tl.int32)
        rows = sample.to(tl.int64) * L + o
    return rows


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    h_ptr, base_ptr, out_ptr, a_ptr, mean_ptr, rstd_ptr,
    lnw_ptr, lnb_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, meta_ptr,
    ids_ptr, perm_ptr, cnt_ptr,
    D, S, L, G, T_BUCKET,
    stride_h, stride_base, stride_out, stride_a,
    stride_lnw, stride_lnb, stride_wd, stride_wu, stride_bu,
    scale, eps,
    MODE: tl.constexpr, S_BLOCK: tl.constexpr, HAS_BASE: tl.constexpr, SAVE: tl.constexpr, SAVE_A: tl.constexpr,
    R_BLOCK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EVEN_D: tl.constexpr,
    UP: tl.constexpr, ONEPASS: tl.constexpr, DOT_PRECISION: tl.constexpr, R_ALIGNED: tl.constexpr,
):
    g, _, valid, rows, _ = _tile(tl.program_id(0), ids_ptr, perm_ptr, cnt_ptr, S, L, G, MODE, S_BLOCK, BM)
    ok, gc, roff, r = _group_meta(g, G, meta_ptr, R_ALIGNED)
    offr = tl.arange(0, R_BLOCK)
    rmask = offr < r
    offk = tl.arange(0, BK)
    h_rows = h_ptr + rows[:, None] * stride_h
    x_ptrs = h_rows + offk[None, :]

    if ONEPASS:
        a, mean, rstd = _ln_down_onepass(x_ptrs, valid, gc, roff, offr, rmask, offk, lnw_ptr, lnb_ptr, wd_ptr,
                                         bd_ptr, D, stride_lnw, stride_lnb, stride_wd, eps, BM, BK, R_BLOCK,
                                         DOT_PRECISION)
    else:
        a, mean, rstd = _ln_down_twopass(x_ptrs, valid, gc, roff, offr, rmask, offk, lnw_ptr, lnb_ptr, wd_ptr,
                                         bd_ptr, D, stride_lnw, stride_lnb, stride_wd, eps, BM, BK, R_BLOCK,
                                         EVEN_D, DOT_PRECISION)
    if SAVE_A:
        # the padded columns (r <= col < R_MAX) hold zeros: the output is fully defined
        tl.store(a_ptr + rows[:, None] * stride_a + offr[None, :], a, mask=valid[:, None] & (offr < stride_a)[None, :])
    if SAVE:
        tl.store(mean_ptr + rows, mean, mask=valid)
        tl.store(rstd_ptr + rows, rstd, mask=valid)
    if UP:  # fused variant; the split variant's _up_kernel does this part
        _up_epilogue(tl.maximum(a, 0.0).to(wd_ptr.dtype.element_ty), rows, valid, ok, gc, roff, offr, rmask,
                     base_ptr, out_ptr, wu_ptr, bu_ptr, D, stride_base, stride_out, stride_wu, stride_bu, scale,
                     HAS_BASE, BN, EVEN_D, DOT_PRECISION)


@triton.jit
def _ln_down_twopass(x_ptrs, valid, gc, roff, offr, rmask, offk, lnw_ptr, lnb_ptr, wd_ptr, bd_ptr, D,
                     stride_lnw, stride_lnb, stride_wd, eps,
                     BM: tl.constexpr, BK: tl.constexpr, R_BLOCK: tl.constexpr, EVEN_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """(pre-activation a = LN_g(x) @ Wd_gᵀ + bd_g (BM, R_BLOCK) fp32, mean, rstd): the statistics in a first
    pass over D, then the down projection with the LayerNorm applied per K chunk in its prologue."""
    # LayerNorm statistics in one pass (Chan et al. combination of per-chunk mean and M2).
    mean = tl.zeros((BM,), dtype=tl.float32)
    m2 = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        km = (k0 + offk) < D
        if EVEN_D:
            x = tl.load(x_ptrs + k0, mask=valid[:, None], other=0.0).to(tl.float32)
            cmean = tl.sum(x, axis=1) / BK
            dx = x - cmean[:, None]
            nk = BK * 1.0
        else:
            x = tl.load(x_ptrs + k0, mask=valid[:, None] & km[None, :], other=0.0).to(tl.float32)
            nk = tl.minimum(D - k0, BK) * 1.0
            cmean = tl.sum(x, axis=1) / nk
            dx = tl.where(km[None, :], x - cmean[:, None], 0.0)
        seen = k0 * 1.0
        cm2 = tl.sum(dx * dx, axis=1)
        tot = seen + nk
        delta = cmean - mean
        mean = mean + delta * (nk / tot)
        m2 = m2 + cm2 + delta * delta * (seen * nk / tot)
    rstd = 1.0 / tl.sqrt(m2 / D + eps)

    # down projection with the LayerNorm in the prologue
    acc = tl.zeros((BM, R_BLOCK), dtype=tl.float32)
    wd_ptrs = wd_ptr + (roff + offr)[None, :] * stride_wd + offk[:, None]
    lnw_ptrs = lnw_ptr + gc * stride_lnw + offk
    lnb_ptrs = lnb_ptr + gc * stride_lnb + offk
    for k0 in range(0, D, BK):
        if EVEN_D:
            x = tl.load(x_ptrs + k0, mask=valid[:, None], other=0.0).to(tl.float32)
            w = tl.load(lnw_ptrs + k0).to(tl.float32)
            b = tl.load(lnb_ptrs + k0).to(tl.float32)
            wdt = tl.load(wd_ptrs + k0, mask=rmask[None, :], other=0.0)
        else:
            km = (k0 + offk) < D
            x = tl.load(x_ptrs + k0, mask=valid[:, None] & km[None, :], other=0.0).to(tl.float32)
            w = tl.load(lnw_ptrs + k0, mask=km, other=0.0).to(tl.float32)
            b = tl.load(lnb_ptrs + k0, mask=km, other=0.0).to(tl.float32)
            wdt = tl.load(wd_ptrs + k0, mask=rmask[None, :] & km[:, None], other=0.0)
        y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
        acc = tl.dot(y.to(wdt.dtype), wdt, acc, input_precision=DOT_PRECISION)
    bdv = tl.load(bd_ptr + roff + offr, mask=rmask, other=0.0).to(tl.float32)
    return acc + bdv[None, :], mean, rstd


@triton.jit
def _ln_down_onepass(x_ptrs, valid, gc, roff, offr, rmask, offk, lnw_ptr, lnb_ptr, wd_ptr, bd_ptr, D,
                     stride_lnw, stride_lnb, stride_wd, eps,
                     BM: tl.constexpr, BK: tl.constexpr, R_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Same result as :func:`_ln_down_twopass` in one pass over D (FORWARD_VARIANT "onepass"):

    with c the mean of each row's first chunk, xs = x - c, Wf = Wd_g ∘ w_g (the LN weight folded into the
    down weights, per K chunk in registers), v1 = Wd_g w_g and cb = Wd_g b_g (accumulated alongside):
    ``a = rstd (xs @ Wfᵀ - mean(xs) v1) + cb + bd``, rstd from the sums of xs and xs² (shifted data:
    no cancellation when |mean| >> std)."""
    lnw_ptrs = lnw_ptr + gc * stride_lnw + offk
    lnb_ptrs = lnb_ptr + gc * stride_lnb + offk
    wd_ptrs = wd_ptr + (roff + offr)[None, :] * stride_wd + offk[:, None]
    km = offk < D
    x = tl.load(x_ptrs, mask=valid[:, None] & km[None, :], other=0.0).to(tl.float32)
    shift = tl.sum(x, axis=1) / tl.minimum(D, BK)
    s1 = tl.zeros((BM,), dtype=tl.float32)
    s2 = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, R_BLOCK), dtype=tl.float32)
    v1 = tl.zeros((R_BLOCK,), dtype=tl.float32)
    cb = tl.zeros((R_BLOCK,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        km = (k0 + offk) < D
        x = tl.load(x_ptrs + k0, mask=valid[:, None] & km[None, :], other=0.0).to(tl.float32)
        xs = tl.where(km[None, :], x - shift[:, None], 0.0)
        s1 += tl.sum(xs, axis=1)
        s2 += tl.sum(xs * xs, axis=1)
        w = tl.load(lnw_ptrs + k0, mask=km, other=0.0).to(tl.float32)
        b = tl.load(lnb_ptrs + k0, mask=km, other=0.0).to(tl.float32)
        wdt = tl.load(wd_ptrs + k0, mask=rmask[None, :] & km[:, None], other=0.0)
        wdf = wdt.to(tl.float32)
        wf = wdf * w[:, None]
        v1 += tl.sum(wf, axis=0)
        cb += tl.sum(wdf * b[:, None], axis=0)
        acc = tl.dot(xs.to(wdt.dtype), wf.to(wdt.dtype), acc, input_precision=DOT_PRECISION)
    mean_s = s1 / D
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 / D - mean_s * mean_s, 0.0) + eps)
    bdv = tl.load(bd_ptr + roff + offr, mask=rmask, other=0.0).to(tl.float32)
    a = rstd[:, None] * (acc - mean_s[:, None] * v1[None, :]) + (cb + bdv)[None, :]
    return a, shift + mean_s, rstd


@triton.jit
def _up_epilogue(z, rows, valid, ok, gc, roff, offr, rmask,
                 base_ptr, out_ptr, wu_ptr, bu_ptr, D, stride_base, stride_out, stride_wu, stride_bu, scale,
                 HAS_BASE: tl.constexpr, BN: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[rows] = (z @ Wu_gᵀ + bu_g)·scale [+ base[rows]] over all D columns, BN at a time (NaN rows for
    invalid groups)."""
    offn = tl.arange(0, BN)
    wu_ptrs = wu_ptr + offn[None, :] * stride_wu + (roff + offr)[:, None]
    bu_ptrs = bu_ptr + gc * stride_bu + offn
    o_ptrs = out_ptr + rows[:, None] * stride_out + offn[None, :]
    b_ptrs = base_ptr + rows[:, None] * stride_base + offn[None, :]
    for n0 in range(0, D, BN):
        if EVEN_D:
            m = valid[:, None]
            wut = tl.load(wu_ptrs + n0 * stride_wu, mask=rmask[:, None], other=0.0)
            buv = tl.load(bu_ptrs + n0).to(tl.float32)
        else:
            nm = (n0 + offn) < D
            m = valid[:, None] & nm[None, :]
            wut = tl.load(wu_ptrs + n0 * stride_wu, mask=rmask[:, None] & nm[None, :], other=0.0)
            buv = tl.load(bu_ptrs + n0, mask=nm, other=0.0).to(tl.float32)
        o = tl.dot(z, wut, input_precision=DOT_PRECISION)
        res = (o + buv[None, :]) * scale
        if HAS_BASE:
            res += tl.load(b_ptrs + n0, mask=m, other=0.0).to(tl.float32)
        res = tl.where(ok, res, float("nan"))
        tl.store(o_ptrs + n0, res, mask=m)


@triton.jit
def _up_kernel(
    a_ptr, base_ptr, out_ptr, wu_ptr, bu_ptr, meta_ptr,
    ids_ptr, perm_ptr, cnt_ptr,
    D, S, L, G, T_BUCKET,
    stride_a, stride_base, stride_out, stride_wu, stride_bu,
    scale,
    MODE: tl.constexpr, S_BLOCK: tl.constexpr, HAS_BASE: tl.constexpr,
    R_BLOCK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, R_ALIGNED: tl.constexpr,
):
    """Split forward, second kernel: program (tile, column block) computes BN output columns of a tile
    of BM rows of one group from the pre-activation ``a`` written by ``_fwd_kernel`` (UP=False)."""
    g, _, valid, rows, _ = _tile(tl.program_id(0), ids_ptr, perm_ptr, cnt_ptr, S, L, G, MODE, S_BLOCK, BM)
    ok, gc, roff, r = _group_meta(g, G, meta_ptr, R_ALIGNED)
    offn = tl.program_id(1) * BN + tl.arange(0, BN)
    nm = offn < D
    offk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, r, BK):
        km = (k0 + offk) < r
        z = tl.load(a_ptr + rows[:, None] * stride_a + (k0 + offk)[None, :], mask=valid[:, None] & km[None, :],
                    other=0.0)
        z = tl.maximum(z, 0.0).to(wu_ptr.dtype.element_ty)
        w = tl.load(wu_ptr + offn[None, :] * stride_wu + (roff + k0 + offk)[:, None], mask=km[:, None] & nm[None, :],
                    other=0.0)
        acc = tl.dot(z, w, acc, input_precision=DOT_PRECISION)
    buv = tl.load(bu_ptr + gc * stride_bu + offn, mask=nm, other=0.0).to(tl.float32)
    res = (acc + buv[None, :]) * scale
    m = valid[:, None] & nm[None, :]
    if HAS_BASE:
        res += tl.load(base_ptr + rows[:, None] * stride_base + offn[None, :], mask=m, other=0.0).to(tl.float32)
    res = tl.where(ok, res, float("nan"))
    tl.store(out_ptr + rows[:, None] * stride_out + offn[None, :], res, mask=m)


@triton.jit
def _bwd_dh_kernel(
    dout_ptr, h_ptr, dh_ptr, da_ptr, a_ptr, mean_ptr, rstd_ptr, wsw_ptr, wsb_ptr, srows_ptr,
    lnw_ptr, lnb_ptr, wd_ptr, bd_ptr, wu_ptr, v1_ptr, cg_ptr, meta_ptr,
    ids_ptr, perm_ptr, cnt_ptr,
    D, S, L, G, T_BUCKET,
    stride_do, stride_h, stride_dh, stride_a, stride_ws,
    stride_lnw, stride_lnb, stride_wd, stride_wu,
    scale,
    MODE: tl.constexpr, S_BLOCK: tl.constexpr, RECOMPUTE: tl.constexpr, NEED_DH: tl.constexpr,
    R_BLOCK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, R_ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    g, pos, valid, rows, seg_off = _tile(pid, ids_ptr, perm_ptr, cnt_ptr, S, L, G, MODE, S_BLOCK, BM)
    if MODE != 0:
        # rows in sorted order, for the weight-gradient kernel
        tl.store(srows_ptr + seg_off * L + pos, rows.to(tl.int32), mask=valid)
    ok, gc, roff, r = _group_meta(g, G, meta_ptr, R_ALIGNED)
    offr = tl.arange(0, R_BLOCK)
    rmask = offr < r
    offk = tl.arange(0, BK)
    ct = wd_ptr.dtype.element_ty
    mean = tl.load(mean_ptr + rows, mask=valid, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=valid, other=0.0)
    h_rows = h_ptr + rows[:, None] * stride_h
    a_tile = rows[:, None] * stride_a + offr[None, :]
    amask = valid[:, None] & rmask[None, :]

    # dz = (s * dout) @ Wu_g (and the pre-activation again when it was not saved)
    dz = tl.zeros((BM, R_BLOCK), dtype=tl.float32)
    acc = tl.zeros((BM, R_BLOCK), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + offk
        km = kk < D
        m = valid[:, None] & km[None, :]
        do = tl.load(dout_ptr + rows[:, None] * stride_do + kk[None, :], mask=m, other=0.0).to(tl.float32)
        wuc = tl.load(
            wu_ptr + kk[:, None] * stride_wu + (roff + offr)[None, :],
            mask=km[:, None] & rmask[None, :],
            other=0.0,
        )
        dz = tl.dot((do * scale).to(ct), wuc, dz, input_precision=DOT_PRECISION)
        if RECOMPUTE:
            x = tl.load(h_rows + kk[None, :], mask=m, other=0.0).to(tl.float32)
            w = tl.load(lnw_ptr + gc * stride_lnw + kk, mask=km, other=0.0).to(tl.float32)
            b = tl.load(lnb_ptr + gc * stride_lnb + kk, mask=km, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            wdt = tl.load(
                wd_ptr + (roff + offr)[None, :] * stride_wd + kk[:, None],
                mask=rmask[None, :] & km[:, None],
                other=0.0,
            )
            acc = tl.dot(y.to(ct), wdt, acc, input_precision=DOT_PRECISION)
    if RECOMPUTE:
        bdv = tl.load(bd_ptr + roff + offr, mask=rmask, other=0.0).to(tl.float32)
        a = acc + bdv[None, :]
        tl.store(a_ptr + a_tile, a, mask=amask)
    else:
        a = tl.load(a_ptr + a_tile, mask=amask, other=0.0).to(tl.float32)
    da = tl.where(a > 0.0, dz, 0.0)
    tl.store(da_ptr + a_tile, da, mask=amask)
    dac = da.to(ct)

    # The LayerNorm backward's row sums without a pass over dy:
    # mean_k(dy_k w_k) = da . (Wd_g w_g) / D and mean_k(dy_k w_k xhat_k) = da . (a - bd - Wd_g b_g) / D,
    # because Wd_g (w_g xhat) = a - bd - Wd_g b_g. v1 = Wd w and cg = bd + Wd b come packed per group.
    dacf = dac.to(tl.float32)
    v1 = tl.load(v1_ptr + roff + offr, mask=rmask, other=0.0)
    cg = tl.load(cg_ptr + roff + offr, mask=rmask, other=0.0)
    c1 = tl.sum(dacf * v1[None, :], axis=1) / D
    c2 = tl.sum(dacf * (a - cg[None, :]), axis=1) / D

    # dy = da @ Wd_g, D columns at a time: this tile's LN weight/bias partials and (NEED_DH) dh
    for k0 in range(0, D, BK):
        kk = k0 + offk
        km = kk < D
        wdc = tl.load(
            wd_ptr + (roff + offr)[:, None] * stride_wd + kk[None, :],
            mask=rmask[:, None] & km[None, :],
            other=0.0,
        )
        dy = tl.dot(dac, wdc, input_precision=DOT_PRECISION)
        m = valid[:, None] & km[None, :]
        x = tl.load(h_rows + kk[None, :], mask=m, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * rstd[:, None]
        tl.store(wsw_ptr + pid * stride_ws + kk, tl.sum(dy * xhat, axis=0), mask=km)
        tl.store(wsb_ptr + pid * stride_ws + kk, tl.sum(dy, axis=0), mask=km)
        if NEED_DH:
            w = tl.load(lnw_ptr + gc * stride_lnw + kk, mask=km, other=0.0).to(tl.float32)
            dh = rstd[:, None] * (dy * w[None, :] - c1[:, None] - xhat * c2[:, None])
            dh = tl.where(ok, dh, float("nan"))
            tl.store(dh_ptr + rows[:, None] * stride_dh + kk[None, :], dh, mask=m)


@triton.jit
def _bwd_w_kernel(
    dout_ptr, h_ptr, da_ptr, a_ptr, mean_ptr, rstd_ptr, wsw_ptr, wsb_ptr, srows_ptr,
    lnw_ptr, lnb_ptr, meta_ptr, ids_ptr, perm_ptr, cnt_ptr,
    dlnw_ptr, dlnb_ptr, dwd_ptr, dbd_ptr, dwu_ptr, dbu_ptr,
    D, S, L, G, R_MAX, SPLIT, T_BUCKET,
    stride_do, stride_h, stride_a, stride_ws,
    stride_lnw, stride_lnb,
    sp_g, sp_wd, sp_bd, sp_wu,
    stride_pg, stride_pwd, stride_pwu,
    scale,
    MODE: tl.constexpr, S_BLOCK: tl.constexpr, BM1: tl.constexpr,
    BR: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, R_ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    nrb = tl.cdiv(R_MAX, BR)
    ndb = tl.cdiv(D, BN)
    g = pid // (nrb * ndb)
    rem = pid - g * (nrb * ndb)
    rb = rem // ndb
    db = rem - rb * ndb
    roff, r = _packed_range(meta_ptr, g, R_ALIGNED)
    r0 = rb * BR
    active = r0 < r
    ct = da_ptr.dtype.element_ty

    n, seg_off, tile_start, ntiles = _group_info(g, ids_ptr, cnt_ptr, S, L, G, MODE, S_BLOCK, BM1)
    chunk = tl.cdiv(tl.cdiv(n, SPLIT), BM) * BM
    p_start = split * chunk
    p_end = tl.minimum(p_start + chunk, n)
    p_end = tl.where(active, p_end, p_start)

    offn = db * BN + tl.arange(0, BN)
    nm = offn < D
    offr = r0 + tl.arange(0, BR)
    rm = offr < r
    offm = tl.arange(0, BM)
    w = tl.load(lnw_ptr + g * stride_lnw + offn, mask=nm, other=0.0).to(tl.float32)
    b = tl.load(lnb_ptr + g * stride_lnb + offn, mask=nm, other=0.0).to(tl.float32)

    acc_wd = tl.zeros((BR, BN), dtype=tl.float32)
    acc_wu = tl.zeros((BN, BR), dtype=tl.float32)
    acc_bu = tl.zeros((BN,), dtype=tl.float32)
    acc_bd = tl.zeros((BR,), dtype=tl.float32)
    for p0 in range(p_start, p_end, BM):
        pos = p0 + offm
        valid = pos < p_end
        if MODE == 0:
            rows = pos.to(tl.int64)
        else:
            rows = tl.load(srows_ptr + seg_off * L + pos, mask=valid, other=0).to(tl.int64)
        mean = tl.load(mean_ptr + rows, mask=valid, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=valid, other=0.0)
        mx = valid[:, None] & nm[None, :]
        x = tl.load(h_ptr + rows[:, None] * stride_h + offn[None, :], mask=mx, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
        y = tl.where(mx, y, 0.0)
        do = tl.load(dout_ptr + rows[:, None] * stride_do + offn[None, :], mask=mx, other=0.0).to(tl.float32)
        do = do * scale
        mr = valid[:, None] & rm[None, :]
        a_tile = rows[:, None] * stride_a + offr[None, :]
        da = tl.load(da_ptr + a_tile, mask=mr, other=0.0)
        z = tl.maximum(tl.load(a_ptr + a_tile, mask=mr, other=0.0), 0.0)
        acc_wd = tl.dot(tl.trans(da.to(ct)), y.to(ct), acc_wd, input_precision=DOT_PRECISION)
        acc_wu = tl.dot(tl.trans(do.to(ct)), z.to(ct), acc_wu, input_precision=DOT_PRECISION)
        acc_bu += tl.sum(do, axis=0)
        acc_bd += tl.sum(da.to(tl.float32), axis=0)

    # LayerNorm gradients: the per-tile partials of this group, summed in a fixed order
    acc_lw = tl.zeros((BN,), dtype=tl.float32)
    acc_lb = tl.zeros((BN,), dtype=tl.float32)
    nt = tl.where(rb == 0, ntiles, 0)
    for t in range(split, nt, SPLIT):
        acc_lw += tl.load(wsw_ptr + (tile_start + t) * stride_ws + offn, mask=nm, other=0.0)
        acc_lb += tl.load(wsb_ptr + (tile_start + t) * stride_ws + offn, mask=nm, other=0.0)

    m_wd = rm[:, None] & nm[None, :]
    tl.store(dwd_ptr + split * sp_wd + (roff + offr)[:, None] * stride_pwd + offn[None, :], acc_wd, mask=m_wd)
    m_wu = nm[:, None] & rm[None, :]
    tl.store(dwu_ptr + split * sp_wu + offn[:, None] * stride_pwu + (roff + offr)[None, :], acc_wu, mask=m_wu)
    # (scalar conditions as branches, not ANDed into the masks: triton 3.9's interpreter refuses a mask made
    # from a block and a scalar boolean)
    if db == 0:
        tl.store(dbd_ptr + split * sp_bd + roff + offr, acc_bd, mask=rm)
    if rb == 0:
        tl.store(dbu_ptr + split * sp_g + g * stride_pg + offn, acc_bu, mask=nm)
        tl.store(dlnw_ptr + split * sp_g + g * stride_pg + offn, acc_lw, mask=nm)
        tl.store(dlnb_ptr + split * sp_g + g * stride_pg + offn, acc_lb, mask=nm)


# ----------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def _fwd_configs() -> list[triton.Config]:
    """Two-pass LayerNorm configs, then one-pass ones (ONEPASS is a config key, so the "auto" forward
    variant lets the autotuner time both)."""
    if INTERPRET:
        return [triton.Config({"BM": 16, "BK": 16, "BN": 16, "ONEPASS": onepass}, num_warps=4, num_stages=1)
                for onepass in (False, True)]
    # BN is the up-projection chunk. Every config is tried for every bottleneck: on an H200 (bf16, r = 192,
    # R_BLOCK = 256, 2026-11-30) the fastest forced configs were BM 128/BN 32 (172 us, mixed, B = 128) and
    # BM 64/BN 64 (188 us, single) -- the very ones a register-budget pruning (from an offline ptxas sweep)
    # had excluded, leaving the autotuner 225-290 us choices (benchmarks/NOTES.md). The one-pass variant
    # gets those two tile shapes and the first.
    two_pass = [(64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (128, 64, 32, 8, 3), (128, 64, 64, 8, 3),
                (32, 64, 32, 8, 3), (64, 128, 32, 8, 2), (64, 32, 32, 8, 3)]
    one_pass = [(64, 64, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 64, 8, 3)]
    return [
        triton.Config({"BM": bm, "BK": bk, "BN": bn, "ONEPASS": onepass}, num_warps=w, num_stages=st)
        for tiles, onepass in ((two_pass, False), (one_pass, True))
        for bm, bk, bn, w, st in tiles
    ]


def _one_stage_fewer(config: triton.Config) -> triton.Config:
    fewer = copy.copy(config)
    fewer.num_stages = max(1, config.num_stages - 1)
    return fewer


def _fp32_tiles(named_args: dict) -> bool:
    """Whether the GEMM tiles are fp32 (IEEE dots): twice the shared memory per pipeline stage of bf16."""
    return named_args["h_ptr"].element_size() == 4 and named_args["wd_ptr"].element_size() == 4


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """One-pass configs in fp32 run one pipeline stage fewer: with three, each needs 246-295 KB of shared
    memory on sm_90 (limit 227 KiB; tests/sm90_compile.py), with two 164-197 KB."""
    if _fp32_tiles(named_args):
        return [_one_stage_fewer(c) if c.kwargs["ONEPASS"] else c for c in configs]
    return configs


def _fwd_autotuner(configs: list[triton.Config]):
    """The forward kernel autotuned over ``configs`` (each LayerNorm variant has its own autotuner, so that
    none holds a config its variant cannot run: triton < 3.8 times even a lone config left by pruning,
    which needs a GPU and so fails in the interpreter)."""
    return triton.autotune(
        configs=configs,
        key=["D", "R_BLOCK", "MODE", "HAS_BASE", "SAVE", "SAVE_A", "UP", "T_BUCKET", "R_ALIGNED"],
        prune_configs_by={"early_config_prune": _prune_fwd},
    )(triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BK"] == 0 and args["D"] % args["BN"] == 0})(
        _fwd_kernel))


_TWO_PASS_CONFIGS = tuned_configs([c for c in _fwd_configs() if not c.kwargs["ONEPASS"]])
_ONE_PASS_CONFIGS = tuned_configs([c for c in _fwd_configs() if c.kwargs["ONEPASS"]])
_fwd_two_pass = _fwd_autotuner(_TWO_PASS_CONFIGS)
_fwd_one_pass = _fwd_autotuner(_ONE_PASS_CONFIGS)
_fwd_both = _fwd_autotuner(_TWO_PASS_CONFIGS + _ONE_PASS_CONFIGS)


def _fwd_for(variant: str):
    """The forward autotuner of a FORWARD_VARIANT: "onepass" one-pass configs only, "fused"/"split" two-pass
    only, "auto" both (two-pass only where nothing is timed: the interpreter, MOSAIC_FAST_AUTOTUNE=0)."""
    if variant == "onepass":
        return _fwd_one_pass
    if variant == "auto" and not INTERPRET and AUTOTUNE:
        return _fwd_both
    return _fwd_two_pass


def _up_configs() -> list[triton.Config]:
    # The first tile runs 8 warps: with 4 it spills 160 bytes per thread in bf16 (255 registers; sm90_compile.py)
    # where a bottleneck is not a multiple of 16 (R_ALIGNED False). There its (BK, BN) weight tile is read one
    # element per load (the mask on r, Wu's contiguous dim, allows no vector loads, nor cp.async pipelining in
    # bf16), 64 loads and addresses per thread at 4 warps, 32 at 8; with R_ALIGNED it is pipelined (93 registers).
    if INTERPRET:
        return [triton.Config({"BM": 16, "BK": 16, "BN": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BM": bm, "BK": 64, "BN": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(64, 128, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 256, 8, 3)]
    ]


_up = triton.autotune(
    configs=tuned_configs(_up_configs()), key=["D", "R_BLOCK", "MODE", "HAS_BASE", "T_BUCKET", "R_ALIGNED"]
)(_up_kernel)


def _dh_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BK": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BK": bk}, num_warps=w, num_stages=s)
        for bk, w, s in [(64, 8, 3), (32, 8, 3), (32, 4, 3), (128, 8, 2)]
    ]


#: K chunk of the dh kernel in fp32. IEEE dots are FMA loops with both operand chunks in registers: at BK 64 the
#: first config spills 5 KB per thread recomputing the pre-activation (and 15 KB with it saved under triton 3.6's
#: ptxas), at 16 nothing (tests/sm90_compile.py). An FMA dot accumulates k in order onto its acc, so the chunk
#: does not change the sums.
_FP32_DH_BK = 16


def _fp32_dh_config(config: triton.Config, recompute: bool) -> triton.Config:
    """``config`` with the fp32 K chunk, and one pipeline stage fewer when recomputing the pre-activation (with
    three it still spills 20-100 bytes at BK 16; at BK 64 it needed 304 KB of shared memory, over 227 KiB)."""
    fp32 = _one_stage_fewer(config) if recompute else copy.copy(config)
    fp32.kwargs = {**config.kwargs, "BK": _FP32_DH_BK}
    return fp32


def _prune_dh(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The fp32 configs (:func:`_fp32_dh_config`), those that then coincide kept once; others unchanged."""
    if not _fp32_tiles(named_args):
        return configs
    fp32 = (_fp32_dh_config(c, kwargs["RECOMPUTE"]) for c in configs)
    return list({(repr(c.kwargs), c.num_warps, c.num_stages): c for c in fp32}.values())


_bwd_dh = triton.autotune(
    configs=tuned_configs(_dh_configs()),
    key=["D", "R_BLOCK", "MODE", "RECOMPUTE", "NEED_DH", "BM", "T_BUCKET", "R_ALIGNED"],
    prune_configs_by={"early_config_prune": _prune_dh},
)(_bwd_dh_kernel)


def _w_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BR": 16, "BN": 16, "BM": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BR": br, "BN": bn, "BM": bm}, num_warps=w, num_stages=s)
        for br, bn, bm, w, s in [
            (64, 64, 64, 8, 2),
            (64, 128, 64, 8, 2),
            (64, 64, 128, 8, 2),
            (64, 64, 32, 8, 3),
            (32, 64, 32, 8, 3),
        ]
    ]


_bwd_w = triton.autotune(
    configs=tuned_configs(_w_configs()), key=["D", "R_MAX", "MODE", "SPLIT", "BM1", "T_BUCKET", "R_ALIGNED"]
)(_bwd_w_kernel)


def _dh_block_m(r_block: int) -> int:
    """Rows per tile of the dh kernel (fixed, not tuned: the weight kernel re-derives its tiles)."""
    if INTERPRET:
        return 16
    return 64 if r_block <= 128 else 32


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

_META_CACHE: dict[tuple, torch.Tensor] = {}
_SM_COUNT: dict[int, int] = {}


def _t_bucket(T: int) -> int:
    """Autotuning key for the number of rows (unused by the kernels): powers of two from 1024."""
    return max(1024, triton.next_power_of_2(max(1, T)))


def _r_aligned(bottlenecks: Sequence[int]) -> bool:
    """The kernels' R_ALIGNED: ALIGN_HINTS and every bottleneck a multiple of 16, so that every group's offset
    and width in :func:`_meta` are too (an invalid group's width, 0, as well)."""
    return ALIGN_HINTS and all(int(r) % 16 == 0 for r in bottlenecks)


def _meta(bottlenecks: Sequence[int], device: torch.device) -> torch.Tensor:
    """(start, width) of each group in the packed R dimension, flattened int32 on ``device`` (cached)."""
    key = (tuple(int(r) for r in bottlenecks), device)
    t = _META_CACHE.get(key)
    if t is None:
        rows = [[start, r] for start, r in zip(itertools.accumulate(key[0][:-1], initial=0), key[0])]
        t = torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1)
        _META_CACHE[key] = t
    return t


_GROUP_OF_ROW_CACHE: dict[tuple, torch.Tensor] = {}


def _ln_backward_vectors(bottlenecks, ln_w, ln_b, wd, bd) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (R_total,) fp32 ``v1 = Wd_g w_g`` and ``cg = bd + Wd_g b_g`` of every group (the dh kernel's
    LayerNorm row sums come from them instead of from a second pass over dy)."""
    key = (tuple(int(r) for r in bottlenecks), wd.device)
    group_of_row = _GROUP_OF_ROW_CACHE.get(key)
    if group_of_row is None:
        rows = [g for g, r in enumerate(bottlenecks) for _ in range(int(r))]
        group_of_row = torch.tensor(rows).to(wd.device)
        _GROUP_OF_ROW_CACHE[key] = group_of_row
    wdf = wd.float()
    v1 = (wdf * ln_w.float()[group_of_row]).sum(1)
    cg = bd.float() + (wdf * ln_b.float()[group_of_row]).sum(1)
    return v1, cg


def _routing(ids: torch.Tensor | None, T: int, seg_len: int, G: int, device: torch.device):
    """(MODE, S, L, S_BLOCK, ids, perm, counts) for the kernels; no host synchronisation."""
    if ids is None:
        dummy = torch.empty(1, dtype=torch.int32, device=device)
        return MODE_SINGLE, 1, T, 16, dummy, dummy, dummy
    S = ids.shape[0]
    ids = ids.contiguous()  # the kernels read the ids densely (a strided view, e.g. a column of a table)
    if S <= SEG_MAX:
        return MODE_SEG, S, seg_len, min(64, _pow2(S)), ids, ids, ids
    ids_c = torch.where((ids < 0) | (ids >= G), torch.full_like(ids, G), ids)
    perm = torch.argsort(ids_c, stable=True).to(torch.int32)
    groups = torch.arange(G + 1, device=device, dtype=ids_c.dtype)
    counts = (ids_c[None, :] == groups[:, None]).sum(dim=1).to(torch.int32)
    return MODE_PERM, S, seg_len, 16, ids, perm, counts


def _interp_upcast(*tensors):
    """Under the interpreter, bf16 dots are silently wrong: run bf16 tensors in fp32."""
    if not INTERPRET:
        return tensors
    return tuple(t.float() if t is not None and t.dtype == torch.bfloat16 else t for t in tensors)


def _check(h: torch.Tensor, bottlenecks) -> None:
    if max(bottlenecks) > MAX_BOTTLENECK:
        raise ValueError(f"grouped adapter kernels support bottlenecks up to {MAX_BOTTLENECK}, got {bottlenecks}")
    if h.dim() != 2 or (h.stride(-1) != 1 and h.shape[-1] != 1):  # (a width of 1 reads one element per row)
        raise ValueError(f"h must be a 2-D tensor with a contiguous last dim, got {tuple(h.shape)}")


def forward(h: torch.Tensor, base: torch.Tensor | None, ids: torch.Tensor | None, seg_len: int,
            ln_w: torch.Tensor, ln_b: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor, wu: torch.Tensor,
            bu: torch.Tensor, bottlenecks: Sequence[int], scale: float, eps: float,
            save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (T, D) in h's dtype, and when ``save``: mean, rstd (T,) fp32 and the pre-activation (T, R_MAX)
    in the weight dtype (empty tensors otherwise; a is also empty when SAVE_PREACT is False)."""
    _check(h, bottlenecks)
    T, D = h.shape
    G = len(bottlenecks)
    r_max = max(bottlenecks)
    out_dtype, w_dtype = h.dtype, wd.dtype
    h, base, ln_w, ln_b, wd, bd, wu, bu = _interp_upcast(h, base, ln_w, ln_b, wd, bd, wu, bu)
    ln_w, ln_b, wd, bd, wu, bu = (t.contiguous() for t in (ln_w, ln_b, wd, bd, wu, bu))
    if base is not None and base.stride(-1) != 1:  # (the kernels take base's row stride, not its column stride)
        base = base.contiguous()
    dev = h.device
    out = torch.empty((T, D), device=dev, dtype=h.dtype)
    if FORWARD_VARIANT not in FORWARD_VARIANTS:
        raise ValueError(f"FORWARD_VARIANT must be one of {FORWARD_VARIANTS}, got {FORWARD_VARIANT!r}")
    split = FORWARD_VARIANT == "split"
    save_a = save and SAVE_PREACT
    mean = torch.empty(T if save else 0, device=dev, dtype=torch.float32)
    rstd = torch.empty(T if save else 0, device=dev, dtype=torch.float32)
    a = torch.empty((T if (save_a or split) else 0, r_max), device=dev, dtype=wd.dtype)
    if T > 0:
        mode, S, L, s_block, ids_t, perm, counts = _routing(ids, T, seg_len, G, dev)
        meta = _meta(bottlenecks, dev)
        aligned = _r_aligned(bottlenecks)
        base_arg, base_stride = (base, base.stride(0)) if base is not None else (h, 0)
        grid = lambda m: (triton.cdiv(T, m["BM"]) + G + 1,)
        _fwd_for(FORWARD_VARIANT)[grid](
            h, base_arg, out, a, mean, rstd,
            ln_w, ln_b, wd, bd, wu, bu, meta,
            ids_t, perm, counts,
            D, S, L, G, _t_bucket(T),
            h.stride(0), base_stride, out.stride(0), r_max,
            ln_w.stride(0), ln_b.stride(0), wd.stride(0), wu.stride(0), bu.stride(0),
            float(scale), float(eps),
            MODE=mode, S_BLOCK=s_block, HAS_BASE=base is not None, SAVE=bool(save), SAVE_A=save_a or split,
            R_BLOCK=_pow2(r_max), UP=not split, DOT_PRECISION=dot_precision(wd.dtype), R_ALIGNED=aligned,
        )
        if split:
            grid_up = lambda m: (triton.cdiv(T, m["BM"]) + G + 1, triton.cdiv(D, m["BN"]))
            _up[grid_up](
                a, base_arg, out, wu, bu, meta, ids_t, perm, counts,
                D, S, L, G, _t_bucket(T),
                r_max, base_stride, out.stride(0), wu.stride(0), bu.stride(0),
                float(scale),
                MODE=mode, S_BLOCK=s_block, HAS_BASE=base is not None, R_BLOCK=_pow2(r_max),
                DOT_PRECISION=dot_precision(wu.dtype), R_ALIGNED=aligned,
            )
        if split and not save_a:
            a = a[:0]
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    if a.dtype != w_dtype:
        a = a.to(w_dtype)
    return out, mean, rstd, a


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _wgrad_split(T: int, D: int, G: int, r_max: int, device: torch.device) -> int:
    if WGRAD_SPLIT is not None:
        return max(1, int(WGRAD_SPLIT))
    programs = G * triton.cdiv(r_max, 64) * triton.cdiv(D, 64)
    want = triton.cdiv(2 * _num_sms(device), programs)
    return int(max(1, min(want, 16, T // (64 * 4 * G) if G else 1)))


def backward(dout: torch.Tensor, h: torch.Tensor, ids: torch.Tensor | None, seg_len: int, ln_w: torch.Tensor,
             ln_b: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor, wu: torch.Tensor, bu: torch.Tensor,
             bottlenecks: Sequence[int], mean: torch.Tensor, rstd: torch.Tensor, a: torch.Tensor, scale: float,
             eps: float, need_dh: bool, need_w: bool) -> tuple[torch.Tensor, ...]:
    """(dh, dln_w, dln_b, dwd, dbd, dwu, dbu); dh is empty unless need_dh, the weight grads are empty
    unless need_w. ``a`` empty means: recompute the pre-activation."""
    _check(h, bottlenecks)
    T, D = h.shape
    G = len(bottlenecks)
    r_max = max(bottlenecks)
    h_dtype, w_dtype = h.dtype, wd.dtype
    dout, h, ln_w, ln_b, wd, bd, wu, bu, a = _interp_upcast(dout, h, ln_w, ln_b, wd, bd, wu, bu, a)
    ln_w, ln_b, wd, bd, wu, bu = (t.contiguous() for t in (ln_w, ln_b, wd, bd, wu, bu))
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    # the saved statistics (T,) and pre-activation (T, R_MAX) are read densely
    mean, rstd, a = mean.contiguous(), rstd.contiguous(), a.contiguous()
    dev = h.device
    ct = wd.dtype
    recompute = a.shape[0] != T or T == 0
    if recompute:
        a = torch.empty((T, r_max), device=dev, dtype=ct)
    da = torch.empty((T, r_max), device=dev, dtype=ct)
    dh = torch.empty((T if need_dh else 0, D), device=dev, dtype=h.dtype)
    grads = [torch.zeros(0, device=dev, dtype=w_dtype) for _ in range(6)]
    if T == 0:
        if need_w:
            grads = [torch.zeros_like(t, dtype=w_dtype) for t in (ln_w, ln_b, wd, bd, wu, bu)]
        return (dh.to(h_dtype), *grads)

    mode, S, L, s_block, ids_t, perm, counts = _routing(ids, T, seg_len, G, dev)
    meta = _meta(bottlenecks, dev)
    aligned = _r_aligned(bottlenecks)
    r_block = _pow2(r_max)
    bm1 = _dh_block_m(r_block)
    n_tiles = triton.cdiv(T, bm1) + G + 1
    ws_w = torch.empty((n_tiles, D), device=dev, dtype=torch.float32)
    ws_b = torch.empty((n_tiles, D), device=dev, dtype=torch.float32)
    srows = torch.empty(T if mode != MODE_SINGLE else 1, device=dev, dtype=torch.int32)
    v1, cg = _ln_backward_vectors(bottlenecks, ln_w, ln_b, wd, bd)
    _bwd_dh[(n_tiles,)](
        dout, h, dh if need_dh else h, da, a, mean, rstd, ws_w, ws_b, srows,
        ln_w, ln_b, wd, bd, wu, v1, cg, meta,
        ids_t, perm, counts,
        D, S, L, G, _t_bucket(T),
        dout.stride(0), h.stride(0), D, r_max, D,
        ln_w.stride(0), ln_b.stride(0), wd.stride(0), wu.stride(0),
        float(scale),
        MODE=mode, S_BLOCK=s_block, RECOMPUTE=recompute, NEED_DH=bool(need_dh), R_BLOCK=r_block, BM=bm1,
        DOT_PRECISION=dot_precision(ct), R_ALIGNED=aligned,
    )
    if need_w:
        split = _wgrad_split(T, D, G, r_max, dev)
        pdt = w_dtype if (split == 1 and w_dtype == ct) else torch.float32
        r_tot = wd.shape[0]
        p_lnw = torch.empty((split, G, D), device=dev, dtype=pdt)
        p_lnb = torch.empty((split, G, D), device=dev, dtype=pdt)
        p_bu = torch.empty((split, G, D), device=dev, dtype=pdt)
        p_wd = torch.empty((split, r_tot, D), device=dev, dtype=pdt)
        p_bd = torch.empty((split, r_tot), device=dev, dtype=pdt)
        p_wu = torch.empty((split, D, r_tot), device=dev, dtype=pdt)
        grid = lambda m: (G * triton.cdiv(r_max, m["BR"]) * triton.cdiv(D, m["BN"]), split)
        _bwd_w[grid](
            dout, h, da, a, mean, rstd, ws_w, ws_b, srows,
            ln_w, ln_b, meta, ids_t, perm, counts,
            p_lnw, p_lnb, p_wd, p_bd, p_wu, p_bu,
            D, S, L, G, r_max, split, _t_bucket(T),
            dout.stride(0), h.stride(0), r_max, D,
            ln_w.stride(0), ln_b.stride(0),
            G * D, r_tot * D, r_tot, D * r_tot,
            D, D, r_tot,
            float(scale),
            MODE=mode, S_BLOCK=s_block, BM1=bm1, DOT_PRECISION=dot_precision(ct), R_ALIGNED=aligned,
        )
        parts = (p_lnw, p_lnb, p_wd, p_bd, p_wu, p_bu)
        grads = [(p[0] if split == 1 else p.sum(dim=0)).to(w_dtype) for p in parts]
    if need_dh and dh.dtype != h_dtype:
        dh = dh.to(h_dtype)
    return (dh, *grads)
