"""Top-k token skipping: the merge ``x[rows] ← x[rows] + coef ⊙ (update − x[rows])`` (unselected rows
untouched) and, for inference, the selection itself.

Merge: Triton on CUDA (one gather/scatter kernel, in place when asked, cost ∝ number of selected rows); a
torch fallback (index_select/index_copy) elsewhere. Registered as ``mosaic_fast::skip_merge`` (functional,
differentiable) and ``mosaic_fast::skip_merge_`` (in place, inference).
Selection (:func:`skip_select`, Triton only, no gradient): the router's score, top-k with CLS kept, the
indices in ascending order and the gates σ(s) in one launch instead of ~8 torch ops; registered as
``mosaic_fast::skip_select``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backend
from ._common import check_index, check_index_values_on_cpu, check_same_device, check_tensor, use_kernels


def expand_coef(coef: Tensor, d: int) -> Tensor:
    """(T, G) per-group coefficients -> (T, D): value g covers channels [g·D/G, (g+1)·D/G)."""
    return coef.repeat_interleave(d // coef.shape[1], dim=1)


def blend(sel: Tensor, update: Tensor, coef: Tensor) -> Tensor:
    """``sel + coef ⊙ (update − sel)`` for (T, D) rows and (T, G) per-group coefficients (value g covers
    channels [g·D/G, (g+1)·D/G)): one ``torch.lerp`` over (T, G, D/G) views. The arithmetic form's three
    passes took 1.2–3.1× as long on a 2-core CPU (6,304 × 768, G = D: 4.1 vs 1.3 ms), 1.6–4.1× with
    ``coef`` expanded to channels first. Equal up to rounding (for coef ≥ ½ lerp computes
    ``update − (1 − coef)(update − sel)``); the result has the promoted dtype of the three, as the arithmetic
    form does (under autocast ``update`` may be bf16 and ``sel`` fp32); differentiable in all three."""
    t, d = sel.shape
    g = coef.shape[1]
    dtype = torch.promote_types(torch.promote_types(sel.dtype, update.dtype), coef.dtype)
    start, end = sel.to(dtype).view(t, g, d // g), update.to(dtype).reshape(t, g, d // g)
    return torch.lerp(start, end, coef.to(dtype).unsqueeze(-1)).view(t, d)


def _interpret_upcast(*tensors: Tensor) -> bool:
    """The interpreter has no bf16 arithmetic (DESIGN.md §5): such inputs run in fp32 there."""
    return backend.INTERPRET and any(t.dtype == torch.bfloat16 for t in tensors)


def _merge_into(x: Tensor, out: Tensor, rows: Tensor, update: Tensor, coef: Tensor) -> None:
    if use_kernels(x):
        from mosaic_fast.kernels.token_skip import skip_merge as kernel

        if not out.is_contiguous():
            # the kernel writes rows densely: it updates a contiguous copy (of x itself when in place, of the
            # op's clone of a non-contiguous x otherwise) that is copied back
            work = out.contiguous()
            _merge_into(work if out is x else x, work, rows, update, coef)
            out.copy_(work)
            return

        if _interpret_upcast(x, update):
            tmp = out.float()
            kernel(x.float(), tmp, rows, update.float().contiguous(), coef.float().contiguous())
            out.copy_(tmp)
            return
        kernel(x, out, rows, update.contiguous(), coef.contiguous())
        return
    out.index_copy_(0, rows, blend(x.index_select(0, rows), update, coef))


@torch.library.custom_op("mosaic_fast::skip_merge", mutates_args=())
def _skip_merge_op(x: Tensor, rows: Tensor, update: Tensor, coef: Tensor) -> Tensor:
    out = x.clone()
    _merge_into(x, out, rows, update, coef)
    return out


@_skip_merge_op.register_fake
def _(x: Tensor, rows: Tensor, update: Tensor, coef: Tensor) -> Tensor:
    return torch.empty_like(x)


def _setup(ctx, inputs, output) -> None:
    x, rows, update, coef = inputs
    ctx.save_for_backward(x, rows, update, coef)


def _backward(ctx, grad: Tensor):
    x, rows, update, coef = ctx.saved_tensors
    t, d = update.shape
    g_sel = grad.index_select(0, rows)
    c = expand_coef(coef, d)
    g_x = grad.index_copy(0, rows, g_sel * (1 - c))
    g_coef = (g_sel * (update - x.index_select(0, rows))).view(t, coef.shape[1], d // coef.shape[1]).sum(-1)
    return g_x, None, g_sel * c, g_coef


_skip_merge_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("mosaic_fast::skip_merge_", mutates_args=("x",))
def _skip_merge_inplace_op(x: Tensor, rows: Tensor, update: Tensor, coef: Tensor) -> None:
    _merge_into(x, x, rows, update, coef)


@_skip_merge_inplace_op.register_fake
def _(x: Tensor, rows: Tensor, update: Tensor, coef: Tensor) -> None:
    return None


def check_merge_args(x: Tensor, rows: Tensor, update: Tensor, coef: Tensor) -> Tensor:
    """Clear errors naming the argument for wrong ranks, widths, dtypes or devices (DESIGN.md §7), and for
    rows out of [0, M) where that needs no host sync (CPU tensors). Returns ``rows`` as int64."""
    check_tensor("x", x, floating=True)
    if x.dim() != 2:
        raise ValueError(f"x: expected (M, D), got {tuple(x.shape)}")
    rows = check_index("rows", rows, dims=1)
    check_tensor("update", update)
    if update.shape != (rows.shape[0], x.shape[1]):
        raise ValueError(f"update: expected {(rows.shape[0], x.shape[1])}, got {tuple(update.shape)}")
    check_tensor("coef", coef)
    if coef.dim() != 2 or coef.shape[0] != rows.shape[0] or coef.shape[1] == 0 or x.shape[1] % coef.shape[1]:
        raise ValueError(f"coef: expected ({rows.shape[0]}, G) with G >= 1 dividing {x.shape[1]}, got "
                         f"{tuple(coef.shape)}")
    if update.dtype != x.dtype:
        raise TypeError(f"update dtype {update.dtype} differs from x dtype {x.dtype}")
    if coef.dtype != x.dtype:
        raise TypeError(f"coef dtype {coef.dtype} differs from x dtype {x.dtype}")
    check_same_device("x", x, (("rows", rows), ("update", update), ("coef", coef)))
    check_index_values_on_cpu("rows", rows, x.shape[0], distinct=True)
    return rows


def skip_merge(x: Tensor, rows: Tensor, update: Tensor, coef: Tensor, inplace: bool = False) -> Tensor:
    """``x`` (M, D) with rows ``rows`` (T,) set to ``x + coef ⊙ (update − x)``; ``coef`` (T, G), G | D.

    ``rows`` int64 (or int32) in [0, M), without repeats; ``update`` and ``coef`` in x's dtype.
    ``inplace=True`` writes into ``x`` (which must be contiguous and not need a gradient) and returns it:
    only the selected rows are read and written."""
    rows = check_merge_args(x, rows, update, coef)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, update, coef))
    if inplace and not needs_grad and x.is_contiguous():
        if use_kernels(x):
            torch.ops.mosaic_fast.skip_merge_(x, rows, update, coef)
        else:
            _merge_into(x, x, rows, update, coef)
        return x
    if use_kernels(x):
        out = _skip_merge_op(x.contiguous(), rows, update.contiguous(), coef.contiguous())
    else:
        out = x.index_copy(0, rows, blend(x.index_select(0, rows), update, coef))
    if inplace:
        x.copy_(out)
        return x
    return out


#: Most tokens per sample :func:`skip_select` takes (the kernel keeps a sample's scores and ranks in
#: registers); the fast SkipRouter falls back to the torch selection beyond.
SELECT_MAX_TOKENS = 2048


def _select(h: Tensor, w2: Tensor, b2: Tensor, kept: int) -> tuple[Tensor, Tensor]:
    from mosaic_fast.kernels.token_skip import skip_select as kernel

    if _interpret_upcast(h, w2, b2):
        idx, gate = kernel(h.float(), w2.float(), b2.float(), kept)
        return idx, gate.to(h.dtype)
    return kernel(h, w2, b2, kept)


@torch.library.custom_op("mosaic_fast::skip_select", mutates_args=())
def _skip_select_op(h: Tensor, w2: Tensor, b2: Tensor, kept: int) -> tuple[Tensor, Tensor]:
    return _select(h, w2, b2, kept)


@_skip_select_op.register_fake
def _(h: Tensor, w2: Tensor, b2: Tensor, kept: int) -> tuple[Tensor, Tensor]:
    return h.new_empty(h.shape[0], kept, dtype=torch.int64), h.new_empty(h.shape[0], kept)


def skip_select(h: Tensor, w2: Tensor, b2: Tensor, kept: int) -> tuple[Tensor, Tensor]:
    """Kept token indices (B, kept) ascending and gates σ(s) (B, kept) from the router's hidden ``h``.

    ``s = GELU(h) · w2ᵀ + b2`` per token (h (B, N, F): the router's first Linear applied; w2 (1, F) and
    b2 (1,): its last), the top ``kept`` tokens by s with token 0 (CLS) always kept; equal scores go to
    the lower token index. Triton backend only, for inference (no gradient flows to the router)."""
    for name, t in (("h", h), ("w2", w2), ("b2", b2)):
        check_tensor(name, t)
    if h.dim() != 3 or not h.is_floating_point():
        raise ValueError(f"h: expected a floating (B, N, F) tensor, got {h.dtype} {tuple(h.shape)}")
    if tuple(w2.shape) != (1, h.shape[2]) or tuple(b2.shape) != (1,):
        raise ValueError(f"w2/b2: expected shapes (1, {h.shape[2]}) and (1,), got {tuple(w2.shape)} and "
                         f"{tuple(b2.shape)}")
    if w2.dtype != h.dtype or b2.dtype != h.dtype or w2.device != h.device or b2.device != h.device:
        raise TypeError(f"w2/b2 must be {h.dtype} on {h.device} like h")
    if not 1 <= kept <= h.shape[1]:
        raise ValueError(f"kept: expected 1 <= kept <= N={h.shape[1]}, got {kept}")
    if h.shape[1] > SELECT_MAX_TOKENS:
        raise ValueError(f"h: at most {SELECT_MAX_TOKENS} tokens per sample, got {h.shape[1]}")
    backend.require_triton("skip_select", h)
    h, w2, b2 = h.contiguous(), w2.contiguous(), b2.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.mosaic_fast.skip_select(h, w2, b2, kept)
    return _select(h, w2, b2, kept)
