"""Triton kernels of the gated MoE adapter's inference path with routing fused in: two launches in all.

Both DynaMer streams in one launch each (grid axis 2 is the stream s; stream s has T_s = B·KEPT_s
selected rows, row(t) = (t // KEPT_s)·N + idx_s[t], or row(t) = t for the full forward). Notation as in
:mod:`kernels.moe_adapter`: u = [x_gen[row] ; x_med[row]] (2D wide), n experts of bottleneck r, H = n·r.

1. ``_moe_route_down_kernel``, per tile of rows and per chunk of output columns:
   * hidden chunks: ``hw[t, e·r + j] = p_e(t) · relu(u_t · W_down[e, j] + b_down[e, j])`` for every
     expert, where p(t) is the softmax over the top-k router scores of stream s (router logits
     ``x_s[row] W_router_sᵀ + b`` accumulate in the same loop over D; ties go to the lower expert index)
     and p_e = 0 for the experts the row did not pick. The hidden is H wide (r/2D of the input), never D.
   * gate chunks: ``coef[t, g] = σ(x_s[row] · W_gate_s[g] + b_gate_s[g]) · skip_s[t]``.
   Dense over the n experts: n/k times the sparse down FLOPs, but no sort and no tile tables, and u is
   read once per hidden chunk (once when BH ≥ H), not once per (row, expert) pair.
2. ``_moe_gate_combine_kernel``, per tile of rows and columns: ``mix = hw[t] @ W_up_catᵀ + Σ_e p_e b_up[e]``
   (one dot chain of depth H), then ``out[row] = x[row] + coef ⊙ (mix − x[row])`` (out may be x: every
   program reads and writes only its own (rows, columns) block, after launch 1 has read all inputs).
Only selected rows are read or written. The routing scores, probabilities and gates never leave the chip
except as the (T, n) probabilities and (T, G) gates the second launch needs. :func:`moe_routed_update`
launches both.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import check_dense_out
from .precision import dot_precision
from .tuning import tuned_configs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _of_stream(s, gen_value, med_value):
    """``gen_value`` for stream 0 (gen), ``med_value`` for stream 1 (med); s is a runtime program id."""
    if s == 0:
        value = gen_value
    else:
        value = med_value
    return value


@triton.jit
def _tile_rows(pid_m, s, T_G, T_M, idxg_ptr, idxm_ptr, KEPT_G, KEPT_M, N, SB_G, SK_G, SB_M, SK_M,
               BM: tl.constexpr, IDENTITY: tl.constexpr):
    """Selected-row numbers t of tile pid_m of stream s, their mask, and their rows in the flattened
    (B·N, D) stream: row = (t // KEPT)·N + idx[t // KEPT, t % KEPT] (idx with strides SB, SK), or t."""
    t = pid_m * BM + tl.arange(0, BM)
    tmask = t < _of_stream(s, T_G, T_M)
    if IDENTITY:
        row = t.to(tl.int64)
    else:
        kept = _of_stream(s, KEPT_G, KEPT_M)
        b = (t // kept).to(tl.int64)
        offset = b * _of_stream(s, SB_G, SB_M) + (t % kept) * _of_stream(s, SK_G, SK_M)
        tok = tl.load(_of_stream(s, idxg_ptr, idxm_ptr) + offset, mask=tmask, other=0).to(tl.int64)
        row = b * N + tok
    return t, tmask, row


# Row counts are never specialised to the constant 1: the per-stream scalars are chosen by a runtime branch
# on the stream, and both branches must give them one type.
_ROW_ARGS = ["T_G", "T_M", "T_MAX", "KEPT_G", "KEPT_M", "N", "SB_G", "SK_G", "SB_M", "SK_M"]


@triton.jit(do_not_specialize=_ROW_ARGS)
def _moe_route_down_kernel(
    xg_ptr, xm_ptr, idxg_ptr, idxm_ptr, skg_ptr, skm_ptr,
    wrg_ptr, brg_ptr, wrm_ptr, brm_ptr, wgg_ptr, bgg_ptr, wgm_ptr, bgm_ptr,
    wd_ptr, bd_ptr, hw_ptr, p_ptr, coef_ptr,
    T_G, T_M, T_MAX, KEPT_G, KEPT_M, N, SB_G, SK_G, SB_M, SK_M, D, R, H, G, n_exp, TOPK, T_BUCKET,
    IDENTITY: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK_E: tl.constexpr,
    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = tl.program_id(2)
    t, tmask, row = _tile_rows(pid_m, s, T_G, T_M, idxg_ptr, idxm_ptr, KEPT_G, KEPT_M, N, SB_G, SK_G, SB_M, SK_M,
                               BM, IDENTITY)
    out_t = (s * T_MAX + t).to(tl.int64)  # row of the (2, T_MAX, ·) scratch buffers
    hidden_chunks = tl.cdiv(H, BH)
    if pid_c < hidden_chunks:
        cols = pid_c * BH + tl.arange(0, BH)
        cmask = cols < H
        eo = tl.arange(0, BLOCK_E)
        emask = eo < n_exp
        acc = tl.zeros((BM, BH), dtype=tl.float32)
        logits = tl.zeros((BM, BLOCK_E), dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < D
            umask = tmask[:, None] & kmask[None, :]
            ug = tl.load(xg_ptr + row[:, None] * D + kk[None, :], mask=umask, other=0.0)
            um = tl.load(xm_ptr + row[:, None] * D + kk[None, :], mask=umask, other=0.0)
            wmask = kmask[:, None] & cmask[None, :]
            w = tl.load(wd_ptr + cols[None, :] * (2 * D) + kk[:, None], mask=wmask, other=0.0)
            acc += tl.dot(ug, w, input_precision=DOT_PRECISION)
            w = tl.load(wd_ptr + cols[None, :] * (2 * D) + (kk + D)[:, None], mask=wmask, other=0.0)
            acc += tl.dot(um, w, input_precision=DOT_PRECISION)
            wr = tl.load(_of_stream(s, wrg_ptr, wrm_ptr) + eo[None, :] * D + kk[:, None],
                         mask=kmask[:, None] & emask[None, :], other=0.0)
            logits += tl.dot(tl.where(s == 0, ug, um), wr, input_precision=DOT_PRECISION)
        br = tl.load(_of_stream(s, brg_ptr, brm_ptr) + eo, mask=emask, other=0.0).to(tl.float32)
        # fp32 scores: a bf16 reference rounds them first and ties more often (8 mantissa bits)
        logits = logits + br[None, :]
        logits = tl.where(emask[None, :], logits, float("-inf"))
        chosen = tl.zeros((BM, BLOCK_E), dtype=tl.int32)
        for _ in range(TOPK):
            cand = tl.where(chosen > 0, float("-inf"), logits)
            best = tl.max(cand, axis=1)
            first = tl.min(tl.where((cand == best[:, None]) & emask[None, :], eo[None, :], BLOCK_E), axis=1)
            chosen = tl.where(eo[None, :] == first[:, None], 1, chosen)
        top = tl.max(tl.where(chosen > 0, logits, float("-inf")), axis=1)
        num = tl.where(chosen > 0, tl.exp(logits - top[:, None]), 0.0)
        prob = num / tl.sum(num, axis=1)[:, None]
        b = tl.load(bd_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        hw = tl.maximum(acc + b[None, :], 0.0)
        expert_of_col = cols // R
        for e in range(n_exp):  # scale each expert's columns by its probability (0 when not picked)
            p_e = tl.sum(tl.where(eo[None, :] == e, prob, 0.0), axis=1)
            hw = tl.where((expert_of_col == e)[None, :], hw * p_e[:, None], hw)
        tl.store(hw_ptr + out_t[:, None] * H + cols[None, :], hw.to(hw_ptr.dtype.element_ty),
                 mask=tmask[:, None] & cmask[None, :])
        if pid_c == 0:
            tl.store(p_ptr + out_t[:, None] * n_exp + eo[None, :], prob, mask=tmask[:, None] & emask[None, :])
    else:
        xs_ptr = _of_stream(s, xg_ptr, xm_ptr)
        wg_ptr = _of_stream(s, wgg_ptr, wgm_ptr)
        gcols = (pid_c - hidden_chunks) * BH + tl.arange(0, BH)
        gmask = gcols < G
        acc = tl.zeros((BM, BH), dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < D
            x = tl.load(xs_ptr + row[:, None] * D + kk[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(wg_ptr + gcols[None, :] * D + kk[:, None], mask=kmask[:, None] & gmask[None, :], other=0.0)
            acc += tl.dot(x, w, input_precision=DOT_PRECISION)
        bg = tl.load(_of_stream(s, bgg_ptr, bgm_ptr) + gcols, mask=gmask, other=0.0).to(tl.float32)
        coef = tl.sigmoid(acc + bg[None, :])
        if HAS_SKIP:
            coef = coef * tl.load(_of_stream(s, skg_ptr, skm_ptr) + t, mask=tmask, other=0.0).to(tl.float32)[:, None]
        tl.store(coef_ptr + out_t[:, None] * G + gcols[None, :], coef, mask=tmask[:, None] & gmask[None, :])


@triton.jit(do_not_specialize=_ROW_ARGS)
def _moe_gate_combine_kernel(
    xg_ptr, xm_ptr, outg_ptr, outm_ptr, idxg_ptr, idxm_ptr, hw_ptr, p_ptr, coef_ptr, wu_ptr, bu_ptr,
    T_G, T_M, T_MAX, KEPT_G, KEPT_M, N, SB_G, SK_G, SB_M, SK_M, D, R, H, G, GW, n_exp, T_BUCKET,
    IDENTITY: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    t, tmask, row = _tile_rows(pid_m, s, T_G, T_M, idxg_ptr, idxm_ptr, KEPT_G, KEPT_M, N, SB_G, SK_G, SB_M, SK_M,
                               BM, IDENTITY)
    x_ptr = _of_stream(s, xg_ptr, xm_ptr)
    out_ptr = _of_stream(s, outg_ptr, outm_ptr)
    src_t = (s * T_MAX + t).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < D
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < H
        h = tl.load(hw_ptr + src_t[:, None] * H + kk[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        w_off = (kk // R).to(tl.int64)[:, None] * D * R + cols[None, :] * R + (kk % R)[:, None]
        w = tl.load(wu_ptr + w_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(h, w, input_precision=DOT_PRECISION)
    for e in range(n_exp):
        p_e = tl.load(p_ptr + src_t * n_exp + e, mask=tmask, other=0.0)
        b = tl.load(bu_ptr + e * D + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += p_e[:, None] * b[None, :]
    m2 = tmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + row[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    c = tl.load(coef_ptr + src_t[:, None] * G + (cols // GW)[None, :], mask=m2, other=0.0)
    tl.store(out_ptr + row[:, None] * D + cols[None, :], (x + c * (acc - x)).to(out_ptr.dtype.element_ty), mask=m2)


# (BM, column block, BK, warps, stages). The last two of each: few rows (small ρ), more programs and half
# the serial steps over D (route-and-down) or H (combine). Route-and-down's BH 256 tile takes two stages: with
# three it needs 238 KiB of shared memory in bf16, over Hopper's 227 (tests/sm90_compile.py), so the autotuner
# could only ever skip it.
_ROUTE_DOWN_TILES = [(64, 128, 64, 4, 3), (64, 256, 64, 8, 2), (128, 128, 64, 8, 3), (32, 128, 64, 4, 3),
                     (64, 64, 64, 4, 4), (128, 256, 32, 8, 3), (32, 64, 128, 4, 2), (16, 64, 128, 4, 2)]
_COMBINE_TILES = [(64, 128, 64, 4, 3), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3), (32, 128, 64, 4, 3),
                  (32, 64, 64, 4, 4), (128, 64, 64, 4, 3), (32, 64, 128, 4, 2), (16, 64, 128, 4, 2)]


def _configs(column_block: str, tiles: list[tuple[int, ...]]) -> list[triton.Config]:
    """Autotuning configs over ``tiles``; the column block is "BH" (route-and-down) or "BN" (combine)."""
    if _INTERPRET:
        return [triton.Config({"BM": 16, column_block: 32, "BK": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BM": bm, column_block: bc, "BK": bk}, num_warps=w, num_stages=st)
            for bm, bc, bk, w, st in tiles]


def _route_down_configs() -> list[triton.Config]:
    return _configs("BH", _ROUTE_DOWN_TILES)


def _combine_configs() -> list[triton.Config]:
    return _configs("BN", _COMBINE_TILES)


# The first config of each list is what MOSAIC_FAST_AUTOTUNE=0 keeps. The combine may write in place
# (out is x): the autotuner restores both outputs after each timed run, so tuning never updates twice.
_KEYS = ["D", "H", "G", "n_exp", "IDENTITY", "T_BUCKET"]
_moe_route_down = triton.autotune(configs=tuned_configs(_route_down_configs()), key=_KEYS)(
    _moe_route_down_kernel)
_moe_gate_combine = triton.autotune(configs=tuned_configs(_combine_configs()), key=_KEYS,
                                    restore_value=["outg_ptr", "outm_ptr"])(_moe_gate_combine_kernel)


def _bucket(n: int) -> int:
    """Autotuning key for a row count (unused by the kernels): powers of two from 1024."""
    return max(1024, triton.next_power_of_2(max(1, n)))


def moe_routed_update(
    x_gen: torch.Tensor, x_med: torch.Tensor, out_gen: torch.Tensor, out_med: torch.Tensor,
    idx_gen: torch.Tensor | None, skip_gen: torch.Tensor | None,
    idx_med: torch.Tensor | None, skip_med: torch.Tensor | None,
    router_gen: tuple[torch.Tensor, torch.Tensor], router_med: tuple[torch.Tensor, torch.Tensor],
    gate_gen: tuple[torch.Tensor, torch.Tensor], gate_med: tuple[torch.Tensor, torch.Tensor],
    w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, top_k: int,
) -> None:
    """Route, gate and update the selected rows of both streams into out_gen/out_med (which may be x).

    x_*/out_* (B, N, D) contiguous, one dtype; idx_* (B, KEPT_s) int64 token indices (any strides, e.g.
    an expanded arange), ascending or not, without repeats, and skip_* (B, KEPT_s) contiguous skip gates
    multiplying the sigmoid gate (all four None: every token in row order, no skip gate); router_*
    (weight (n, D), bias (n,)), gate_* (weight (G, D), bias (G,)) with G | D; w_down (n, r, 2D),
    b_down (n, r), w_up (n, D, r), b_up (n, D). All contiguous and in x's dtype. No host synchronisation.
    """
    b, n_tok, d = x_gen.shape
    n, r, _ = w_down.shape
    h, g = n * r, gate_gen[0].shape[0]
    # The kernels index everything but idx densely: they cannot write a strided out in place; the read-only
    # operands are made contiguous (a no-op for contiguous ones).
    check_dense_out("moe_routed_update", out_gen=out_gen, out_med=out_med)
    x_gen = x_gen if x_gen is out_gen else x_gen.contiguous()
    x_med = x_med if x_med is out_med else x_med.contiguous()
    skip_gen, skip_med = (s.contiguous() if s is not None else None for s in (skip_gen, skip_med))
    router_gen, router_med, gate_gen, gate_med = (
        tuple(t.contiguous() for t in pair) for pair in (router_gen, router_med, gate_gen, gate_med))
    w_down, b_down, w_up, b_up = (t.contiguous() for t in (w_down, b_down, w_up, b_up))
    identity = idx_gen is None
    kept_g = n_tok if identity else idx_gen.shape[1]
    kept_m = n_tok if identity else idx_med.shape[1]
    t_g, t_m = b * kept_g, b * kept_m
    t_max = max(t_g, t_m)
    if t_max == 0:
        return
    hw = torch.empty(2, t_max, h, device=x_gen.device, dtype=x_gen.dtype)
    probs = torch.empty(2, t_max, n, device=x_gen.device, dtype=torch.float32)
    coef = torch.empty(2, t_max, g, device=x_gen.device, dtype=torch.float32)
    idx_g = x_gen if identity else idx_gen  # (unread under IDENTITY)
    idx_m = x_gen if identity else idx_med
    strides = (0, 0, 0, 0) if identity else (*idx_gen.stride(), *idx_med.stride())
    has_skip = skip_gen is not None
    sk_g = skip_gen if has_skip else x_gen
    sk_m = skip_med if has_skip else x_gen
    precision = dot_precision(x_gen.dtype)
    bucket = _bucket(t_max)
    grid = lambda m: (triton.cdiv(t_max, m["BM"]), triton.cdiv(h, m["BH"]) + triton.cdiv(g, m["BH"]), 2)
    _moe_route_down[grid](
        x_gen, x_med, idx_g, idx_m, sk_g, sk_m, *router_gen, *router_med, *gate_gen, *gate_med,
        w_down, b_down, hw, probs, coef,
        t_g, t_m, t_max, kept_g, kept_m, n_tok, *strides, d, r, h, g, n, top_k, bucket,
        IDENTITY=identity, HAS_SKIP=has_skip, BLOCK_E=max(16, triton.next_power_of_2(n)),
        DOT_PRECISION=precision,
    )
    grid = lambda m: (triton.cdiv(t_max, m["BM"]), triton.cdiv(d, m["BN"]), 2)
    _moe_gate_combine[grid](
        x_gen, x_med, out_gen, out_med, idx_g, idx_m, hw, probs, coef, w_up, b_up,
        t_g, t_m, t_max, kept_g, kept_m, n_tok, *strides, d, r, h, g, d // g, n, bucket,
        IDENTITY=identity, DOT_PRECISION=precision,
    )
