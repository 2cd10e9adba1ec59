"""Dense M4oE gated mixture as one adapter of concatenated bottleneck R = Σ r_e.

    x̂     = (h − μ(h)) / sqrt(var(h) + eps)                     (shared by every specialist)
    hid   = relu(x̂ @ w_foldᵀ + b_fold) ⊙ scale[:, unit_expert]  (T, R)
    out   = hid @ w_upᵀ + scale @ b_up    [⊙ channel_weight]     (T, D)

The caller folds each specialist's LayerNorm affine into its down projection (w_fold_e = W_e·diag(γ_e),
b_fold_e = W_e β_e + b_e) and sets ``scale[t, e]`` = gate probability × adapter scale ("expert" gate) or
the adapter scale alone ("channel" gate, which passes the softmax channel weights as ``channel_weight``).
Triton forward on CUDA (kernels/gated_specialist.py); the torch formulation above elsewhere, and as
the backward (recomputed under autograd). Registered as ``mosaic_fast::gated_specialist``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_gemm
from ._common import (
    INDEX_DTYPES,
    autocast_dtype,
    check_index_values_on_cpu,
    check_same_device,
    check_tensor,
    once_differentiable_strict,
    use_kernels,
)
from .token_skip import _interpret_upcast


def _torch_gated_specialist(h: Tensor, w_fold: Tensor, b_fold: Tensor, unit_expert: Tensor, scale: Tensor,
                            w_up: Tensor, b_up: Tensor, channel_weight: Tensor | None, eps: float) -> Tensor:
    xhat = F.layer_norm(h, (h.shape[-1],), eps=eps)
    # each hidden unit's scale (T, R): a gather, ~1.7× faster on CPU than index_select along dim 1
    unit_scale = scale.gather(1, unit_expert.long().expand(scale.shape[0], -1))
    pre = cpu_gemm.linear(xhat, w_fold, b_fold)
    if cpu_gemm.may_finish_in_place(h, w_fold, b_fold, scale, w_up, b_up, channel_weight):
        # no gradient, no autocast (so one dtype): finish the fresh GEMM outputs in place (a fresh CPU buffer
        # costs its page faults)
        hid = pre.relu_().mul_(unit_scale)
        out = cpu_gemm.add_linear(scale @ b_up, hid, w_up, None, reuse_base=True)
        return out.mul_(channel_weight) if channel_weight is not None else out
    hid = torch.relu(pre) * unit_scale
    out = cpu_gemm.linear(hid, w_up).add_(scale @ b_up)
    return out * channel_weight if channel_weight is not None else out


def _forward(h: Tensor, w_fold: Tensor, b_fold: Tensor, unit_expert: Tensor, scale: Tensor, w_up: Tensor,
             b_up: Tensor, channel_weight: Tensor | None, eps: float) -> Tensor:
    if not use_kernels(h):
        return _torch_gated_specialist(h, w_fold, b_fold, unit_expert, scale, w_up, b_up, channel_weight, eps)
    from mosaic_fast.kernels.gated_specialist import gs_down, gs_up

    if _interpret_upcast(h, w_fold):
        cw = channel_weight.float() if channel_weight is not None else None
        out = _forward(h.float(), w_fold.float(), b_fold.float(), unit_expert, scale.float(), w_up.float(),
                       b_up.float(), cw, eps)
        return out.to(h.dtype)
    hidden = gs_down(h, w_fold, b_fold, unit_expert, scale, eps)
    return gs_up(hidden, w_up, b_up, scale, channel_weight)


@torch.library.custom_op("mosaic_fast::gated_specialist", mutates_args=())
def _gated_specialist_op(h: Tensor, w_fold: Tensor, b_fold: Tensor, unit_expert: Tensor, scale: Tensor,
                         w_up: Tensor, b_up: Tensor, channel_weight: Tensor | None, eps: float) -> Tensor:
    return _forward(h, w_fold, b_fold, unit_expert, scale, w_up, b_up, channel_weight, eps)


@_gated_specialist_op.register_fake
def _(h, w_fold, b_fold, unit_expert, scale, w_up, b_up, channel_weight, eps):
    return h.new_empty(h.shape[0], w_up.shape[0])


def _setup(ctx, inputs, output) -> None:
    h, w_fold, b_fold, unit_expert, scale, w_up, b_up, channel_weight, eps = inputs
    ctx.eps = eps
    ctx.has_cw = channel_weight is not None
    cw = channel_weight if channel_weight is not None else h.new_empty(0)
    ctx.save_for_backward(h, w_fold, b_fold, unit_expert, scale, w_up, b_up, cw)


@once_differentiable_strict  # recomputes on detached inputs: a double backward would be wrong
def _backward(ctx, grad: Tensor):
    h, w_fold, b_fold, unit_expert, scale, w_up, b_up, cw = ctx.saved_tensors
    diff = [t.detach().requires_grad_() for t in (h, w_fold, b_fold, scale, w_up, b_up)]
    cw_in = cw.detach().requires_grad_() if ctx.has_cw else None
    with torch.enable_grad():
        out = _torch_gated_specialist(diff[0], diff[1], diff[2], unit_expert, diff[3], diff[4], diff[5],
                                      cw_in, ctx.eps)
        grads = torch.autograd.grad(out, diff + ([cw_in] if ctx.has_cw else []), grad)
    g_h, g_wf, g_bf, g_sc, g_wu, g_bu = grads[:6]
    return g_h, g_wf, g_bf, None, g_sc, g_wu, g_bu, grads[6] if ctx.has_cw else None, None


_gated_specialist_op.register_autograd(_backward, setup_context=_setup)


def check_gated_specialist_args(h: Tensor, w_fold: Tensor, b_fold: Tensor, unit_expert: Tensor, scale: Tensor,
                                w_up: Tensor, b_up: Tensor, channel_weight: Tensor | None) -> None:
    """Clear errors naming the argument (DESIGN.md §7): shapes, dtypes (outside autocast every floating
    argument has h's dtype) and devices always; unit_expert values in [0, E) only on CPU (no host sync)."""
    check_tensor("h", h, floating=True)
    for name, t in (("w_fold", w_fold), ("b_fold", b_fold), ("unit_expert", unit_expert), ("scale", scale),
                    ("w_up", w_up), ("b_up", b_up)):
        check_tensor(name, t)
    if h.dim() != 2 or w_fold.dim() != 2 or w_fold.shape[1] != h.shape[1]:
        raise ValueError(f"h (T, D) and w_fold (R, D) must agree, got {tuple(h.shape)} and {tuple(w_fold.shape)}")
    r, d = w_fold.shape
    if w_up.shape != (d, r) or b_fold.shape != (r,) or unit_expert.shape != (r,):
        raise ValueError(f"w_up must be ({d}, {r}), b_fold and unit_expert ({r},); got {tuple(w_up.shape)}, "
                         f"{tuple(b_fold.shape)}, {tuple(unit_expert.shape)}")
    if scale.dim() != 2 or scale.shape[0] != h.shape[0] or b_up.shape != (scale.shape[1], d):
        raise ValueError(f"scale must be ({h.shape[0]}, E) and b_up (E, {d}); got {tuple(scale.shape)} and "
                         f"{tuple(b_up.shape)}")
    if unit_expert.dtype not in INDEX_DTYPES:
        raise TypeError(f"unit_expert must be an int32 (or int64) tensor, got {unit_expert.dtype}")
    if channel_weight is not None:
        check_tensor("channel_weight", channel_weight, floating=True)
        if channel_weight.shape != h.shape:
            raise ValueError(f"channel_weight must have shape {tuple(h.shape)}, got {tuple(channel_weight.shape)}")
    floats = (("w_fold", w_fold), ("b_fold", b_fold), ("scale", scale), ("w_up", w_up), ("b_up", b_up),
              ("channel_weight", channel_weight))
    if autocast_dtype(h.device.type) is None:
        for name, t in floats:
            if t is not None and t.dtype != h.dtype:
                raise TypeError(f"{name} is {t.dtype} but h is {h.dtype}: outside autocast every floating "
                                f"argument must have h's dtype")
    check_same_device("h", h, (*floats, ("unit_expert", unit_expert)))
    check_index_values_on_cpu("unit_expert", unit_expert, scale.shape[1])


def gated_specialist(h: Tensor, w_fold: Tensor, b_fold: Tensor, unit_expert: Tensor, scale: Tensor,
                     w_up: Tensor, b_up: Tensor, channel_weight: Tensor | None = None,
                     eps: float = 1e-5) -> Tensor:
    """The gated mixture on tokens ``h`` (T, D) -> (T, D); see the module docstring for the formula.

    w_fold (R, D), b_fold (R,), unit_expert (R,) int32 or int64 (the expert of each hidden unit, in
    [0, E)), scale (T, E), w_up (D, R), b_up (E, D), channel_weight (T, D) or None; outside autocast all
    floating arguments in h's dtype."""
    check_gated_specialist_args(h, w_fold, b_fold, unit_expert, scale, w_up, b_up, channel_weight)
    if not use_kernels(h):
        return _torch_gated_specialist(h, w_fold, b_fold, unit_expert, scale, w_up, b_up, channel_weight, eps)
    cw = channel_weight.contiguous() if channel_weight is not None else None
    return _gated_specialist_op(h.contiguous(), w_fold.contiguous(), b_fold.contiguous(),
                                unit_expert.to(torch.int32).contiguous(), scale.contiguous(), w_up.contiguous(),
                                b_up.contiguous(), cw, float(eps))
