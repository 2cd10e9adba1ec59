"""Gated MoE adapter inference with the routing fused into the kernels: two launches for both streams.

For stream s ∈ {gen, med} and its selected tokens (all of them when no selection is given):

    p_s   = softmax over the top-k of router_s(x_s[row])        (ties: the lower expert index)
    c_s   = σ(gate_s(x_s[row])) · skip_s                         (skip_s = 1 without a selection)
    x_s[row] ← x_s[row] + c_s ⊙ (Σ_e p_e·expert_e([x_gen[row] ; x_med[row]]) − x_s[row])

in place, reading both streams' rows before any is written. This is the whole of
:meth:`mosaic_fast.nn.GatedMoEAdapter.forward_skip` in one op (kernels/moe_routed.py), for inference on
the Triton backend: no gradients, no autocast, parameters in the streams' dtype. Training keeps the
differentiable :mod:`mosaic_fast.ops.moe_adapter` op with routing in torch. Registered as
``mosaic_fast::moe_routed_update_`` so ``torch.compile`` keeps it whole; eagerly the launcher is called
directly (no custom-op dispatch cost). No host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backend
from ._common import check_tensor
from .token_skip import _interpret_upcast


def _launch(
    x_gen: Tensor, x_med: Tensor, idx_gen: Tensor | None, skip_gen: Tensor | None, idx_med: Tensor | None,
    skip_med: Tensor | None, wr_gen: Tensor, br_gen: Tensor, wr_med: Tensor, br_med: Tensor, wg_gen: Tensor,
    bg_gen: Tensor, wg_med: Tensor, bg_med: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
    top_k: int,
) -> None:
    from mosaic_fast.kernels.moe_routed import moe_routed_update as kernel

    if not (x_gen.is_contiguous() and x_med.is_contiguous()):
        # only the custom op called directly gets here (the public function raises): the kernels write the
        # streams densely, so they update contiguous copies that are copied back
        xg, xm = x_gen.contiguous(), x_med.contiguous()
        _launch(xg, xm, idx_gen, skip_gen, idx_med, skip_med, wr_gen, br_gen, wr_med, br_med, wg_gen, bg_gen,
                wg_med, bg_med, w_down, b_down, w_up, b_up, top_k)
        x_gen.copy_(xg)
        x_med.copy_(xm)
        return
    floats = [skip_gen, skip_med, wr_gen, br_gen, wr_med, br_med, wg_gen, bg_gen, wg_med, bg_med,
              w_down, b_down, w_up, b_up]
    if _interpret_upcast(x_gen, *[t for t in floats if t is not None]):
        xg, xm = x_gen.float(), x_med.float()
        f = [t.float() if t is not None else None for t in floats]
        kernel(xg, xm, xg, xm, idx_gen, f[0], idx_med, f[1], (f[2], f[3]), (f[4], f[5]), (f[6], f[7]),
               (f[8], f[9]), f[10], f[11], f[12], f[13], top_k)
        x_gen.copy_(xg)
        x_med.copy_(xm)
        return
    kernel(x_gen, x_med, x_gen, x_med, idx_gen, skip_gen, idx_med, skip_med, (wr_gen, br_gen), (wr_med, br_med),
           (wg_gen, bg_gen), (wg_med, bg_med), w_down, b_down, w_up, b_up, top_k)


@torch.library.custom_op("mosaic_fast::moe_routed_update_", mutates_args=("x_gen", "x_med"))
def _routed_op(
    x_gen: Tensor, x_med: Tensor, idx_gen: Tensor | None, skip_gen: Tensor | None, idx_med: Tensor | None,
    skip_med: Tensor | None, wr_gen: Tensor, br_gen: Tensor, wr_med: Tensor, br_med: Tensor, wg_gen: Tensor,
    bg_gen: Tensor, wg_med: Tensor, bg_med: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
    top_k: int,
) -> None:
    _launch(x_gen, x_med, idx_gen, skip_gen, idx_med, skip_med, wr_gen, br_gen, wr_med, br_med, wg_gen, bg_gen,
            wg_med, bg_med, w_down, b_down, w_up, b_up, top_k)


@_routed_op.register_fake
def _(x_gen, x_med, idx_gen, skip_gen, idx_med, skip_med, wr_gen, br_gen, wr_med, br_med, wg_gen, bg_gen,
      wg_med, bg_med, w_down, b_down, w_up, b_up, top_k) -> None:
    return None


def check_routed_args(
    x_gen: Tensor, x_med: Tensor, idx_gen: Tensor | None, skip_gen: Tensor | None, idx_med: Tensor | None,
    skip_med: Tensor | None, weights: tuple[Tensor, ...], top_k: int,
) -> None:
    """Clear errors, naming the argument, for what the kernels cannot survive (shapes, dtypes, devices,
    layout); host-side only, no device synchronisation (values such as repeated indices are not checked)."""
    check_tensor("x_gen", x_gen, floating=True)
    check_tensor("x_med", x_med)
    if x_gen.dim() != 3 or x_med.shape != x_gen.shape:
        raise ValueError(f"x_gen/x_med: expected two (B, N, D) tensors of one shape, got {tuple(x_gen.shape)} and "
                         f"{tuple(x_med.shape)}")
    if not (x_gen.is_contiguous() and x_med.is_contiguous()):
        raise ValueError("x_gen/x_med must be contiguous (they are updated in place)")
    b, n_tok, d = x_gen.shape
    names = ("wr_gen", "br_gen", "wr_med", "br_med", "wg_gen", "bg_gen", "wg_med", "bg_med", "w_down", "b_down",
             "w_up", "b_up")
    tensors = dict(zip(names, weights))
    for name, t in tensors.items():
        check_tensor(name, t)
    n, r = tensors["w_down"].shape[:2] if tensors["w_down"].dim() == 3 else (0, 0)
    g = tensors["wg_gen"].shape[0] if tensors["wg_gen"].dim() == 2 else 0
    want = {"wr_gen": (n, d), "br_gen": (n,), "wr_med": (n, d), "br_med": (n,), "wg_gen": (g, d), "bg_gen": (g,),
            "wg_med": (g, d), "bg_med": (g,), "w_down": (n, r, 2 * d), "b_down": (n, r), "w_up": (n, d, r),
            "b_up": (n, d)}
    for name, t in tensors.items():
        if n == 0 or g == 0 or tuple(t.shape) != want[name]:
            raise ValueError(f"{name}: expected shape {want[name]} for D={d}, got {tuple(t.shape)}")
        if t.dtype != x_gen.dtype or t.device != x_gen.device:
            raise TypeError(f"{name}: expected {x_gen.dtype} on {x_gen.device} like x_gen, got {t.dtype} on {t.device}")
    if d % g:
        raise ValueError(f"wg_gen: the gate width {g} must divide D={d}")
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k: expected 1 <= top_k <= {n} experts, got {top_k}")
    if (idx_gen is None) != (idx_med is None) or (idx_gen is None) != (skip_gen is None) or \
            (skip_gen is None) != (skip_med is None):
        raise ValueError("idx_gen, skip_gen, idx_med and skip_med must be all given or all None")
    if idx_gen is None:
        return
    for stream, idx, skip in (("gen", idx_gen, skip_gen), ("med", idx_med, skip_med)):
        if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != b or not 1 <= idx.shape[1] <= n_tok:
            raise ValueError(f"idx_{stream}: expected int64 (B={b}, k) with 1 <= k <= N={n_tok}, got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        if skip.shape != idx.shape or not skip.is_floating_point():
            raise ValueError(f"skip_{stream}: expected a floating tensor of shape {tuple(idx.shape)}, got "
                             f"{skip.dtype} {tuple(skip.shape)}")
        if idx.device != x_gen.device or skip.device != x_gen.device:
            raise ValueError(f"idx_{stream}/skip_{stream} must be on {x_gen.device}")


def routed_update_(
    x_gen: Tensor, x_med: Tensor, idx_gen: Tensor | None, skip_gen: Tensor | None, idx_med: Tensor | None,
    skip_med: Tensor | None, weights: tuple[Tensor, ...], top_k: int,
) -> tuple[Tensor, Tensor]:
    """:func:`moe_routed_update_` without the argument checks (for callers that made them)."""
    skips = [s.to(x_gen.dtype).contiguous() if s is not None else None for s in (skip_gen, skip_med)]
    args = (x_gen, x_med, idx_gen, skips[0], idx_med, skips[1], *(t.contiguous() for t in weights), top_k)
    if torch.compiler.is_compiling():
        torch.ops.mosaic_fast.moe_routed_update_(*args)
    else:
        _launch(*args)
    return x_gen, x_med


def moe_routed_update_(
    x_gen: Tensor, x_med: Tensor, idx_gen: Tensor | None, skip_gen: Tensor | None, idx_med: Tensor | None,
    skip_med: Tensor | None, wr_gen: Tensor, br_gen: Tensor, wr_med: Tensor, br_med: Tensor, wg_gen: Tensor,
    bg_gen: Tensor, wg_med: Tensor, bg_med: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
    top_k: int,
) -> tuple[Tensor, Tensor]:
    """Update both (B, N, D) streams in place (see the module docstring) and return them.

    x_gen/x_med contiguous, one dtype; idx_* (B, KEPT_s) int64 token indices without repeats (any
    strides) and skip_* (B, KEPT_s) gates, or all four None for every token; router (n, D), (n,) and gate
    (G, D), (G,) weights and biases per stream, expert weights (n, r, 2D), (n, r), (n, D, r), (n, D), all
    in the streams' dtype. Triton backend (CUDA, or CPU under TRITON_INTERPRET=1), no gradients."""
    weights = (wr_gen, br_gen, wr_med, br_med, wg_gen, bg_gen, wg_med, bg_med, w_down, b_down, w_up, b_up)
    check_routed_args(x_gen, x_med, idx_gen, skip_gen, idx_med, skip_med, weights, top_k)
    backend.require_triton("moe_routed_update_", x_gen)
    return routed_update_(x_gen, x_med, idx_gen, skip_gen, idx_med, skip_med, weights, top_k)
