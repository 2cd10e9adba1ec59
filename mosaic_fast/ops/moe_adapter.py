"""Gated top-k MoE adapter update over the two DynaMer streams (forward on Triton, backward in torch).

For stream s ∈ {gen, med} and its selected rows ``rows_s`` (T_s,) of the flattened (M, D) streams:

    u_t   = [x_gen[row_t] ; x_med[row_t]]
    mix_t = Σ_k p_s[t,k] · (W_up[e] relu(W_down[e] u_t + b_down[e]) + b_up[e]),  e = eidx_s[t,k]
    out_s[row_t] = x_s[row_t] + c_s[t] ⊙ (mix_t − x_s[row_t])          (other rows: out_s = x_s)

``c_s`` (T_s, G) is σ(gate)·σ(skip score) with each of the G values covering D/G channels (the module
computes routing, probabilities and gates; this op is everything that touches D-wide rows).

Paths: Triton on CUDA (kernels/moe_adapter.py: expert-sorted grouped down GEMM, then per-row-tile up GEMM
+ probability mixing + gate epilogue, in place when asked, no host sync); a torch fallback elsewhere that
runs all experts' hidden units as one GEMM and mixes them with the routing probabilities (see
``_torch_updates``). Backward (of the Triton op) is torch:
dense over the n experts on the r-wide hidden only (T×n×r tensors, never T×n×D), deterministic weight
gradients, no host sync. ``mosaic_fast::moe_gated_update`` is the differentiable op,
``mosaic_fast::moe_gated_update_`` the in-place inference op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_gemm
from ._common import (
    check_index,
    check_index_values_on_cpu,
    check_same_device,
    check_tensor,
    once_differentiable_strict,
    use_kernels,
)
from .token_skip import _interpret_upcast, blend, expand_coef


def _torch_updates(
    x_gen: Tensor, x_med: Tensor, rows: tuple[Tensor | None, Tensor | None], eidx: tuple[Tensor, Tensor],
    probs: tuple[Tensor, Tensor], coefs: tuple[Tensor, Tensor], w_down: Tensor, b_down: Tensor, w_up: Tensor,
    b_up: Tensor,
) -> tuple[list[Tensor], list[Tensor]]:
    """(updated, mixes): each stream's selected rows after the gated update, ``x + c ⊙ (mix − x)``, and its
    expert mixture (T_s, D), by two GEMMs over the concatenated experts.

    ``mix = Σ_e p_e (W_up[e] relu(h_e) + b_up[e]) = [p_e relu(h_e)]_e @ W_up_cat^T + p @ b_up`` with
    p_e = 0 for the experts a row did not pick: all n experts' hidden units (T×n·r, never T×n×D) in one
    down GEMM, the routing probabilities applied to the hidden units, one up GEMM. n/k times the sparse
    FLOPs, but large GEMMs instead of per-expert gathers: the fast choice on CPU. Each stream's own rows
    are taken from the gathered expert input, not gathered again. ``rows`` None: every row (no gather).
    Differentiable, no host sync."""
    n, r, _ = w_down.shape
    d = x_gen.shape[1]
    w_down_cat, b_down_cat = w_down.reshape(n * r, -1), b_down.reshape(n * r)
    w_up_cat = w_up.permute(1, 0, 2).reshape(d, n * r)
    same_rows = rows[0] is rows[1]  # the full (non-skipping) forward passes one row tensor (or None) for both
    updated, mixes, hidden = [], [], None
    for stream, (rows_s, eidx_s, p_s, c_s) in enumerate(zip(rows, eidx, probs, coefs)):
        if hidden is None or not same_rows:  # the expert input is the same pair for both streams
            pair = (x_gen, x_med) if rows_s is None else (x_gen.index_select(0, rows_s), x_med.index_select(0, rows_s))
            u = torch.cat(pair, dim=1)
            hidden = torch.relu(cpu_gemm.linear(u, w_down_cat, b_down_cat)).view(-1, n, r)
        p_dense = p_s.new_zeros(p_s.shape[0], n).scatter(1, eidx_s.long(), p_s).to(hidden.dtype)
        mix = cpu_gemm.linear((hidden * p_dense.unsqueeze(-1)).view(-1, n * r), w_up_cat).add_(p_dense @ b_up)
        mixes.append(mix)
        updated.append(blend(pair[stream], mix, c_s))
    return updated, mixes


def _forward_into(
    x_gen: Tensor, x_med: Tensor, out_gen: Tensor, out_med: Tensor, rows_gen: Tensor, rows_med: Tensor,
    eidx_gen: Tensor, p_gen: Tensor, c_gen: Tensor, eidx_med: Tensor, p_med: Tensor, c_med: Tensor,
    w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, need_saved: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Write both streams' updated rows into out_gen/out_med (which may be x_gen/x_med); both streams'
    expert inputs are read before anything is written. Returns (hidden, mix_gen, mix_med) for the
    backward (all three empty unless ``need_saved``)."""
    d = x_gen.shape[1]
    # Distinct empty tensors: outputs of a custom op must not alias each other (torch checks this).
    empty_g, empty_m = x_gen.new_empty(0, d), x_gen.new_empty(0, d)
    if not use_kernels(x_gen):
        with torch.no_grad():
            (new_g, new_m), (mix_g, mix_m) = _torch_updates(
                x_gen, x_med, (rows_gen, rows_med), (eidx_gen, eidx_med), (p_gen, p_med), (c_gen, c_med),
                w_down, b_down, w_up, b_up)
            out_gen.index_copy_(0, rows_gen, new_g)
            out_med.index_copy_(0, rows_med, new_m)
        if not need_saved:
            return x_gen.new_empty(0, w_down.shape[1]), empty_g, empty_m
        # The torch backward needs the per-assignment hidden: recompute it in the kernels' layout.
        u = torch.cat([x_gen.index_select(0, torch.cat([rows_gen, rows_med])),
                       x_med.index_select(0, torch.cat([rows_gen, rows_med]))], dim=1)
        n, r, _ = w_down.shape
        dense = torch.relu(u @ w_down.reshape(n * r, -1).T + b_down.reshape(-1)).view(-1, n, r)
        eidx = torch.cat([eidx_gen, eidx_med])
        hidden = dense.gather(1, eidx.unsqueeze(-1).expand(-1, -1, r))
        return hidden.reshape(-1, r), mix_g, mix_m
    from mosaic_fast.kernels.moe_adapter import moe_combine, moe_down

    if not (out_gen.is_contiguous() and out_med.is_contiguous()):
        # the kernels write rows densely: through contiguous copies (of the streams themselves when in place,
        # of the custom op's clones of non-contiguous streams otherwise)
        og, om = out_gen.contiguous(), out_med.contiguous()
        saved = _forward_into(og if out_gen is x_gen else x_gen, om if out_med is x_med else x_med, og, om,
                              rows_gen, rows_med, eidx_gen, p_gen, c_gen, eidx_med, p_med, c_med, w_down, b_down,
                              w_up, b_up, need_saved)
        out_gen.copy_(og)
        out_med.copy_(om)
        return saved
    if _interpret_upcast(x_gen, w_down):
        args = [t.float() for t in (x_gen, x_med, p_gen, c_gen, p_med, c_med, w_down, b_down, w_up, b_up)]
        xg, xm, pg, cg, pm, cm, wd, bd, wu, bu = args
        og, om = out_gen.float(), out_med.float()
        hidden, mix_g, mix_m = _forward_into(xg, xm, og, om, rows_gen, rows_med, eidx_gen, pg, cg, eidx_med,
                                             pm, cm, wd, bd, wu, bu, need_saved)
        out_gen.copy_(og)
        out_med.copy_(om)
        return tuple(t.to(x_gen.dtype, copy=True) for t in (hidden, mix_g, mix_m))
    k = eidx_gen.shape[1]
    hidden = moe_down(x_gen, x_med, torch.cat([rows_gen, rows_med]), torch.cat([eidx_gen, eidx_med]),
                      w_down, b_down)
    t_gen = rows_gen.shape[0]
    mixes = [x_gen.new_empty(r.shape[0], d) if need_saved else None for r in (rows_gen, rows_med)]
    moe_combine(x_gen, out_gen, rows_gen, eidx_gen, p_gen, hidden[: t_gen * k], w_up, b_up, c_gen, mixes[0])
    moe_combine(x_med, out_med, rows_med, eidx_med, p_med, hidden[t_gen * k:], w_up, b_up, c_med, mixes[1])
    if not need_saved:
        return hidden.new_empty(0, hidden.shape[1]), empty_g, empty_m
    return hidden, mixes[0], mixes[1]


@torch.library.custom_op("mosaic_fast::moe_gated_update", mutates_args=())
def _moe_op(
    x_gen: Tensor, x_med: Tensor, rows_gen: Tensor, rows_med: Tensor, eidx_gen: Tensor, p_gen: Tensor,
    c_gen: Tensor, eidx_med: Tensor, p_med: Tensor, c_med: Tensor, w_down: Tensor, b_down: Tensor,
    w_up: Tensor, b_up: Tensor, need_saved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out_gen, out_med = x_gen.clone(), x_med.clone()
    saved = _forward_into(x_gen, x_med, out_gen, out_med, rows_gen, rows_med, eidx_gen, p_gen, c_gen,
                          eidx_med, p_med, c_med, w_down, b_down, w_up, b_up, need_saved)
    return out_gen, out_med, *saved


@_moe_op.register_fake
def _(x_gen, x_med, rows_gen, rows_med, eidx_gen, p_gen, c_gen, eidx_med, p_med, c_med, w_down, b_down,
      w_up, b_up, need_saved):
    d, r = x_gen.shape[1], w_down.shape[1]
    a = (rows_gen.shape[0] + rows_med.shape[0]) * eidx_gen.shape[1] if need_saved else 0
    mix_g = x_gen.new_empty(rows_gen.shape[0] if need_saved else 0, d)
    mix_m = x_gen.new_empty(rows_med.shape[0] if need_saved else 0, d)
    return torch.empty_like(x_gen), torch.empty_like(x_med), x_gen.new_empty(a, r), mix_g, mix_m


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:14], output[2], output[3], output[4])


@once_differentiable_strict  # uses the saved hidden/mixes as constants: a double backward would be wrong
def _backward(ctx, g_gen: Tensor, g_med: Tensor, _g_hidden, _g_mix_gen, _g_mix_med):
    (x_gen, x_med, rows_gen, rows_med, eidx_gen, p_gen, c_gen, eidx_med, p_med, c_med,
     w_down, _b_down, w_up, b_up, hidden, mix_gen, mix_med) = ctx.saved_tensors
    if mix_gen.shape[0] != rows_gen.shape[0] or mix_med.shape[0] != rows_med.shape[0]:
        raise RuntimeError("moe_gated_update was called with need_saved=False; it cannot be differentiated")
    n, r, _ = w_down.shape
    d = x_gen.shape[1]
    g_x, d_mix, g_c = [], [], []
    for x, g, rows, c, mix in ((x_gen, g_gen, rows_gen, c_gen, mix_gen), (x_med, g_med, rows_med, c_med, mix_med)):
        g = g if g is not None else torch.zeros_like(x)
        g_sel = g.index_select(0, rows)
        cf = expand_coef(c, d)
        g_x.append(g.index_copy(0, rows, g_sel * (1 - cf)))
        g_c.append((g_sel * (mix - x.index_select(0, rows))).view(rows.shape[0], c.shape[1], d // c.shape[1])
                   .sum(-1))
        d_mix.append(g_sel * cf)
    dmix = torch.cat(d_mix)
    eidx = torch.cat([eidx_gen, eidx_med])
    p = torch.cat([p_gen, p_med])
    rows = torch.cat([rows_gen, rows_med])
    t, k = eidx.shape
    h = hidden.view(t, k, r)
    slot = eidx.unsqueeze(-1).expand(-1, -1, r)
    g_hidden_all = (dmix @ w_up.permute(1, 0, 2).reshape(d, n * r)).view(t, n, r)  # W_up[e]ᵀ dmix_t
    g_slot = g_hidden_all.gather(1, slot)
    d_p = (g_slot * h).sum(-1) + (dmix @ b_up.T).gather(1, eidx)
    d_pre = p.unsqueeze(-1) * g_slot * (h > 0)
    d_pre_dense = h.new_zeros(t, n, r).scatter(1, slot, d_pre).view(t, n * r)
    hw_dense = h.new_zeros(t, n, r).scatter(1, slot, p.unsqueeze(-1) * h).view(t, n * r)
    u = torch.cat([x_gen.index_select(0, rows), x_med.index_select(0, rows)], dim=1)
    g_w_down = (d_pre_dense.T @ u).view(n, r, 2 * d)
    g_b_down = d_pre_dense.sum(0).view(n, r)
    g_u = d_pre_dense @ w_down.reshape(n * r, 2 * d)
    g_w_up = (dmix.T @ hw_dense).view(d, n, r).permute(1, 0, 2)
    g_b_up = h.new_zeros(t, n).scatter(1, eidx, p).T @ dmix
    g_x_gen = g_x[0].index_add(0, rows, g_u[:, :d])
    g_x_med = g_x[1].index_add(0, rows, g_u[:, d:])
    t_gen = rows_gen.shape[0]
    return (g_x_gen, g_x_med, None, None, None, d_p[:t_gen], g_c[0], None, d_p[t_gen:], g_c[1],
            g_w_down, g_b_down, g_w_up, g_b_up, None)


_moe_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("mosaic_fast::moe_gated_update_", mutates_args=("x_gen", "x_med"))
def _moe_inplace_op(
    x_gen: Tensor, x_med: Tensor, rows_gen: Tensor, rows_med: Tensor, eidx_gen: Tensor, p_gen: Tensor,
    c_gen: Tensor, eidx_med: Tensor, p_med: Tensor, c_med: Tensor, w_down: Tensor, b_down: Tensor,
    w_up: Tensor, b_up: Tensor,
) -> None:
    _forward_into(x_gen, x_med, x_gen, x_med, rows_gen, rows_med, eidx_gen, p_gen, c_gen, eidx_med, p_med,
                  c_med, w_down, b_down, w_up, b_up, False)


@_moe_inplace_op.register_fake
def _(x_gen, x_med, rows_gen, rows_med, eidx_gen, p_gen, c_gen, eidx_med, p_med, c_med, w_down, b_down,
      w_up, b_up) -> None:
    return None


def check_moe_args(
    x_gen: Tensor, x_med: Tensor, rows_gen: Tensor, rows_med: Tensor,
    eidx_gen: Tensor, p_gen: Tensor, c_gen: Tensor, eidx_med: Tensor, p_med: Tensor, c_med: Tensor,
    w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clear errors naming the argument (DESIGN.md §7) for :func:`moe_gated_update`; returns (rows_gen,
    rows_med, eidx_gen, eidx_med) as int64 (rows None stay None). Shapes, dtypes and devices always; index
    values (rows in [0, M), experts in [0, n) and distinct per row) only on CPU, where reading them costs no
    host sync."""
    check_tensor("x_gen", x_gen, dims=2, floating=True)
    m, d = x_gen.shape
    check_tensor("x_med", x_med, shape=(m, d))
    check_tensor("w_down", w_down, dims=3)
    n, r = w_down.shape[:2]
    if n == 0 or r == 0:
        raise ValueError(f"w_down: expected (n, r, 2D) with n, r >= 1, got {tuple(w_down.shape)}")
    check_tensor("w_down", w_down, shape=(n, r, 2 * d))
    check_tensor("b_down", b_down, shape=(n, r))
    check_tensor("w_up", w_up, shape=(n, d, r))
    check_tensor("b_up", b_up, shape=(n, d))
    if (rows_gen is None) != (rows_med is None):
        raise ValueError("rows_gen and rows_med must both be None (every row) or both index tensors, got "
                         f"{type(rows_gen).__name__} and {type(rows_med).__name__}")
    streams = (("gen", rows_gen, eidx_gen, p_gen, c_gen), ("med", rows_med, eidx_med, p_med, c_med))
    k = eidx_gen.shape[1] if isinstance(eidx_gen, Tensor) and eidx_gen.dim() == 2 else None
    rows, eidx = {}, {}
    for s, rows_s, eidx_s, p_s, c_s in streams:
        # one conversion when both streams pass the same row tensor (the fallback shares their expert input)
        if rows_s is None:
            rows[s] = None
        else:
            rows[s] = rows["gen"] if s == "med" and rows_s is rows_gen else check_index(f"rows_{s}", rows_s, dims=1)
        t = m if rows_s is None else rows[s].shape[0]
        eidx[s] = check_index(f"eidx_{s}", eidx_s, shape=(t, k))
        if not 1 <= k <= n:
            raise ValueError(f"eidx_{s}: expected 1 <= K <= {n} experts per row, got shape {tuple(eidx_s.shape)}")
        check_tensor(f"p_{s}", p_s, shape=(t, k))
        check_tensor(f"c_{s}", c_s, dims=2)
        if c_s.shape[0] != t or c_s.shape[1] == 0 or d % c_s.shape[1]:
            raise ValueError(f"c_{s}: expected ({t}, G) with G >= 1 dividing D={d}, got {tuple(c_s.shape)}")
    named = (("x_med", x_med), ("p_gen", p_gen), ("c_gen", c_gen), ("p_med", p_med), ("c_med", c_med),
             ("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up))
    for name, t in named:
        if t.dtype != x_gen.dtype:
            raise TypeError(f"{name} is {t.dtype} but x_gen is {x_gen.dtype}: x_gen, x_med, probabilities, gates "
                            f"and expert weights must share one dtype")
    check_same_device("x_gen", x_gen, [*named, *((f"rows_{s}", rows[s]) for s in rows if rows[s] is not None),
                                       *((f"eidx_{s}", eidx[s]) for s in eidx)])
    for s in ("gen", "med"):
        if rows[s] is not None:
            check_index_values_on_cpu(f"rows_{s}", rows[s], m, distinct=True)
        check_index_values_on_cpu(f"eidx_{s}", eidx[s], n, distinct=True)
    return rows["gen"], rows["med"], eidx["gen"], eidx["med"]


def moe_gated_update(
    x_gen: Tensor, x_med: Tensor, rows_gen: Tensor | None, rows_med: Tensor | None,
    eidx_gen: Tensor, p_gen: Tensor, c_gen: Tensor, eidx_med: Tensor, p_med: Tensor, c_med: Tensor,
    w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Both streams updated on their selected rows (see the module docstring); returns (out_gen, out_med).

    x_gen/x_med (M, D); rows_s (T_s,) int64 (or int32) without repeats, or both None: every row in order
    (the full forward: on the torch path no gather or scatter); eidx_s (T_s, K) int64 (or int32)
    distinct per row; p_s (T_s, K); c_s (T_s, G) with G | D; w_down (n, r, 2D), b_down (n, r),
    w_up (n, D, r), b_up (n, D); every floating tensor in x_gen's dtype. Argument errors name the argument
    (:func:`check_moe_args`; index values are checked on CPU only, no host sync on CUDA).
    ``inplace=True`` writes into x_gen/x_med (contiguous, no gradient needed: only selected rows are
    touched) and returns them; with gradients it computes out of place and copies."""
    rows_gen, rows_med, eidx_gen, eidx_med = check_moe_args(
        x_gen, x_med, rows_gen, rows_med, eidx_gen, p_gen, c_gen, eidx_med, p_med, c_med, w_down, b_down, w_up, b_up)
    tensors = (x_gen, x_med, p_gen, c_gen, p_med, c_med, w_down, b_down, w_up, b_up)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if rows_gen is None and not use_kernels(x_gen):  # every row on the torch path: no gather or scatter
        # the update keeps its start (the stream) for the gate gradient: copying into the stream afterwards
        # would overwrite it, so under autograd an in-place call updates from a copy
        xg, xm = (x_gen.clone(), x_med.clone()) if inplace and needs_grad else (x_gen, x_med)
        (out_gen, out_med), _ = _torch_updates(xg, xm, (None, None), (eidx_gen, eidx_med), (p_gen, p_med),
                                               (c_gen, c_med), w_down, b_down, w_up, b_up)
        return (x_gen.copy_(out_gen), x_med.copy_(out_med)) if inplace else (out_gen, out_med)
    if rows_gen is None:  # the kernels read row indices: every row, in order
        rows_gen = rows_med = torch.arange(x_gen.shape[0], device=x_gen.device)
    idx = (rows_gen, rows_med, eidx_gen, eidx_med)
    if inplace and not needs_grad and x_gen.is_contiguous() and x_med.is_contiguous():
        if use_kernels(x_gen) and torch.compiler.is_compiling():  # eagerly: no custom-op dispatch cost
            torch.ops.mosaic_fast.moe_gated_update_(x_gen, x_med, *idx[:2], idx[2], p_gen, c_gen, idx[3], p_med,
                                                    c_med, w_down, b_down, w_up, b_up)
        else:
            _forward_into(x_gen, x_med, x_gen, x_med, rows_gen, rows_med, eidx_gen, p_gen, c_gen, eidx_med,
                          p_med, c_med, w_down, b_down, w_up, b_up, False)
        return x_gen, x_med
    if use_kernels(x_gen):
        c = [t.contiguous() for t in (x_gen, x_med, p_gen, c_gen, p_med, c_med, w_down, b_down, w_up, b_up)]
        if inplace and needs_grad:  # the op saves its inputs: the copy into the streams below must not
            # overwrite the streams it read, so it reads copies
            c[0], c[1] = (t.clone() if t is x else t for t, x in ((c[0], x_gen), (c[1], x_med)))
        out_gen, out_med, *_ = _moe_op(c[0], c[1], rows_gen, rows_med, eidx_gen, c[2], c[3], eidx_med, c[4], c[5],
                                       c[6], c[7], c[8], c[9], needs_grad)
    else:
        (new_g, new_m), _ = _torch_updates(x_gen, x_med, (rows_gen, rows_med), (eidx_gen, eidx_med),
                                           (p_gen, p_med), (c_gen, c_med), w_down, b_down, w_up, b_up)
        out_gen = x_gen.index_copy(0, rows_gen, new_g)
        out_med = x_med.index_copy(0, rows_med, new_m)
    if inplace:
        x_gen.copy_(out_gen)
        x_med.copy_(out_med)
        return x_gen, x_med
    return out_gen, out_med
