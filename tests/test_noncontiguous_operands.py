"""Non-contiguous operands of every Triton launcher and of the ops (and custom ops) that call them.

The Triton kernels index most operands densely (``ptr + row * D + col``): a launcher, or the op that calls
it, must make such an operand contiguous (or raise) before the launch, or pass and use its strides. A
strided view handed on as it is reads the wrong elements -- silently. Three such bugs were found by
mutation testing (tests/test_mutation_gaps_kernels.py); the audit of every launcher and op found more:
the public skip_merge and moe_gated_update passed strided int64 row/expert indices on (``check_index``
returned ``t.to(torch.int64, memory_format=torch.contiguous_format)``, which is t itself for int64), and
the entry points that skip the public functions' ``.contiguous()`` calls, the ``torch.ops.mosaic_fast``
custom ops called directly (skip_merge(_), skip_select, gated_specialist, moe_gated_update(_),
moe_routed_update_, grouped_adapter_fwd's ``base`` with a column stride, grouped_adapter_bwd's saved
statistics and pre-activation), and a spurious error of the grouped kernels for a width-1 ``h`` whose
(size-1) last dim has a stride other than 1.

The first tests reproduce those bugs against float64 plain-torch formulas (forward and backward); the
parametrised one feeds a non-contiguous version of every tensor input of every public op and custom op
(transposed storage, last-dim stride 2, strided index columns; or 0-stride expanded rows) and of the
incoming gradient, and compares with the same call on contiguous inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parity import TOL_CUDA_TF32, TOL_INTERPRETER, assert_parity

from mosaic_fast.ops import gated_specialist as gs_ops
from mosaic_fast.ops import grouped_adapter as ga
from mosaic_fast.ops import moe_adapter as moe_ops
from mosaic_fast.ops import moe_routed as routed_ops
from mosaic_fast.ops import patch_embed3d as pe_ops
from mosaic_fast.ops import token_skip as skip_ops

OPS = torch.ops.mosaic_fast


def _tol(device: str) -> float:
    return TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32


def _stride2(t: torch.Tensor) -> torch.Tensor:
    """t's values with a last-dim stride of 2 (every other element of a buffer); differentiable."""
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """t's values stored with the dims in reverse order (a transposed layout); differentiable. Falls back to
    a last-dim stride of 2 where reversing the storage order leaves t contiguous (size-1 dims)."""
    if t.dim() < 2:
        return _stride2(t)
    perm = list(range(t.dim()))[::-1]
    strides = torch.empty(tuple(t.shape[p] for p in perm)).permute(perm).stride()
    out = torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)
    return out if not out.is_contiguous() else _stride2(t)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rnd(gen, device, *shape, std=1.0, mean=0.0):
    return (torch.randn(*shape, generator=gen) * std + mean).to(device)


# ----------------------------------------------------------------------------------------------------
# float64 formulas
# ----------------------------------------------------------------------------------------------------


def _blend64(x, rows, mix, coef):
    """x with rows ``rows`` set to x + c ⊙ (mix − x), c (T, G) covering D/G channels each."""
    sel = x.index_select(0, rows)
    c = coef.repeat_interleave(x.shape[1] // coef.shape[1], dim=1)
    return x.index_copy(0, rows, sel + c * (mix - sel))


def _mix64(u, eidx, p, w_down, b_down, w_up, b_up):
    """Σ_k p[t,k]·(W_up[e] relu(W_down[e] u_t + b_down[e]) + b_up[e]) with e = eidx[t,k]."""
    a = torch.relu(torch.einsum("tkrc,tc->tkr", w_down[eidx], u) + b_down[eidx])
    y = torch.einsum("tkdr,tkr->tkd", w_up[eidx], a) + b_up[eidx]
    return (p.unsqueeze(-1) * y).sum(1)


def _moe64(xg, xm, rows, eidx, probs, coefs, w_down, b_down, w_up, b_up):
    """Both streams after the gated MoE update (ops.moe_adapter's docstring)."""
    outs = []
    for s, x in enumerate((xg, xm)):
        u = torch.cat([xg.index_select(0, rows[s]), xm.index_select(0, rows[s])], 1)
        outs.append(_blend64(x, rows[s], _mix64(u, eidx[s], probs[s], w_down, b_down, w_up, b_up), coefs[s]))
    return outs


def _grouped64(h, weights, rs, row_group, base, scale=0.1, eps=1e-5):
    """base + s·(relu(LN_g(h) Wd_gᵀ + bd_g) Wu_gᵀ + bu_g) per row of group row_group[row]."""
    ln_w, ln_b, wd, bd, wu, bu = weights
    out, o = base, 0
    for g, r in enumerate(rs):
        m = (row_group == g).to(h.dtype).unsqueeze(1)
        y = F.layer_norm(h, (h.shape[-1],), ln_w[g], ln_b[g], eps)
        a = torch.relu(y @ wd[o : o + r].t() + bd[o : o + r])
        out = out + m * (a @ wu[:, o : o + r].t() + bu[g]) * scale
        o += r
    return out


def _double_leaves(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


# ----------------------------------------------------------------------------------------------------
# Reproducers of the bugs (each failed before the fix)
# ----------------------------------------------------------------------------------------------------


def test_public_ops_with_strided_int64_indices(triton_backend):
    """ops.token_skip.skip_merge and ops.moe_adapter.moe_gated_update (out of place and in place) with int64
    row and expert indices that are strided views (a column of a table, a transposed (K, T) table): their
    argument check returned ``t.to(torch.int64, memory_format=torch.contiguous_format)``, which is t itself
    for an int64 t, so the kernels read the indices densely -- other rows, other experts, silently
    (relative errors ~1). Against float64, forward and backward."""
    device = triton_backend
    tol = _tol(device)
    gen = _gen(20)
    x, update, coef = _rnd(gen, device, 11, 36), _rnd(gen, device, 5, 36), torch.rand(5, 4, generator=gen).to(device)
    rows = torch.tensor([[3, 9], [0, 1], [7, 2], [10, 0], [5, 4]], device=device)[:, 0]
    assert rows.dtype == torch.int64 and rows.stride(0) == 2
    x64, u64, c64 = _double_leaves(x, update, coef)
    want = _blend64(x64, rows, u64, c64)
    leaves = [t.clone().requires_grad_() for t in (x, update, coef)]
    got = skip_ops.skip_merge(*leaves[:1], rows, *leaves[1:])
    assert_parity(got, want, tol, "skip_merge")
    grad = _rnd(gen, device, *x.shape)
    got.backward(grad)
    want.backward(grad.double())
    for name, leaf, ref in zip(("x", "update", "coef"), leaves, (x64, u64, c64)):
        assert_parity(leaf.grad, ref.grad, tol, f"skip_merge grad {name}")
    y = x.clone()
    skip_ops.skip_merge(y, rows, update, coef, inplace=True)
    assert_parity(y, want, tol, "skip_merge in place")

    xg, xm, rows, eidx, probs, coefs, weights = _moe_inputs(_gen(19), device)
    rows = [_stride2(t) for t in rows]
    eidx = [t.t().contiguous().t() for t in eidx]
    assert all(t.dtype == torch.int64 and not t.is_contiguous() for t in (*rows, *eidx))
    floats = (xg, xm, probs[0], coefs[0], probs[1], coefs[1], *weights)
    f64 = _double_leaves(*floats)
    want = _moe64(f64[0], f64[1], rows, eidx, (f64[2], f64[4]), (f64[3], f64[5]), *f64[6:])
    leaves = [t.clone().requires_grad_() for t in floats]
    lg, lm, pg, cg, pm, cm, *lw = leaves
    got = moe_ops.moe_gated_update(lg, lm, rows[0], rows[1], eidx[0], pg, cg, eidx[1], pm, cm, *lw)
    grads = [_rnd(_gen(18), device, *xg.shape), _rnd(_gen(17), device, *xm.shape)]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(want, [g.double() for g in grads])
    for s in range(2):
        assert_parity(got[s], want[s], tol, f"moe_gated_update stream {s}")
    names = ("x_gen", "x_med", "p_gen", "c_gen", "p_med", "c_med", "w_down", "b_down", "w_up", "b_up")
    for name, leaf, ref in zip(names, leaves, f64):
        assert_parity(leaf.grad, ref.grad, tol, f"moe_gated_update grad {name}")
    yg, ym = xg.clone(), xm.clone()
    with torch.no_grad():
        moe_ops.moe_gated_update(yg, ym, rows[0], rows[1], eidx[0], probs[0], coefs[0], eidx[1], probs[1], coefs[1],
                                 *weights, inplace=True)
    assert_parity(yg, want[0], tol, "moe_gated_update in place, gen")
    assert_parity(ym, want[1], tol, "moe_gated_update in place, med")


def test_skip_merge_custom_ops_with_non_contiguous_operands(triton_backend):
    """torch.ops.mosaic_fast.skip_merge / skip_merge_ called directly (what torch.compile and opcheck call):
    a transposed x and rows as a column of a table were read densely (relative errors 0.8-0.9), and the
    in-place op wrote densely into a strided x. Forward and backward against float64."""
    device = triton_backend
    gen = _gen(21)
    m, d, g = 11, 36, 4
    x = _rnd(gen, device, m, d)
    table = torch.tensor([[3, 9], [0, 1], [7, 2], [10, 0], [5, 4]], device=device)
    rows = table[:, 0]
    update, coef = _rnd(gen, device, 5, d), torch.rand(5, g, generator=gen).to(device)
    x64, u64, c64 = _double_leaves(x, update, coef)
    want = _blend64(x64, rows, u64, c64)

    leaves = [t.clone().requires_grad_() for t in (x, update, coef)]
    xs, us, cs = _transposed(leaves[0]), _stride2(leaves[1]), _transposed(leaves[2])
    assert rows.stride(0) == 2 and not any(t.is_contiguous() for t in (xs, us, cs))
    got = OPS.skip_merge(xs, rows, us, cs)
    tol = _tol(device)
    assert_parity(got, want, tol, "skip_merge op")
    grad = _transposed(_rnd(gen, device, m, d))
    got.backward(grad)
    want.backward(grad.double())
    for name, leaf, ref in zip(("x", "update", "coef"), leaves, (x64, u64, c64)):
        assert_parity(leaf.grad, ref.grad, tol, f"grad {name}")

    y = _transposed(x)
    OPS.skip_merge_(y, rows, update, coef)
    assert_parity(y, want, tol, "skip_merge_ op (in place on a transposed x)")


def test_skip_select_custom_op_with_a_non_contiguous_hidden(triton_backend):
    """torch.ops.mosaic_fast.skip_select with a transposed router hidden (B, N, F): it was read densely
    (other tokens kept). Against the float64 scores: top-kept by score with CLS kept, ascending."""
    device = triton_backend
    gen = _gen(22)
    b, n, f, kept = 3, 13, 20, 5
    h, w2, b2 = _rnd(gen, device, b, n, f), _rnd(gen, device, 1, f, std=0.3), _rnd(gen, device, 1)
    s = (F.gelu(h.double()) * w2.double()).sum(-1) + b2.double()
    ranked = s.clone()
    ranked[:, 0] = float("inf")
    want_idx = torch.argsort(-ranked, dim=1, stable=True)[:, :kept].sort(dim=1).values
    want_gate = torch.sigmoid(s).gather(1, want_idx)
    hs = _transposed(h)
    assert not hs.is_contiguous()
    idx, gate = OPS.skip_select(hs, _stride2(w2), b2, kept)
    assert torch.equal(idx, want_idx)
    assert_parity(gate, want_gate, _tol(device), "gates")


def test_gated_specialist_custom_op_with_non_contiguous_operands(triton_backend):
    """torch.ops.mosaic_fast.gated_specialist called directly with every operand non-contiguous: the
    kernels read all of them densely (relative errors 0.3-1.3). Forward and backward against float64."""
    device = triton_backend
    gen = _gen(23)
    t, d, r, e = 13, 24, 20, 3
    h = _rnd(gen, device, t, d, mean=0.5)
    w_fold, b_fold = _rnd(gen, device, r, d, std=0.2), _rnd(gen, device, r, std=0.2)
    unit = (torch.arange(r) % e).to(device, torch.int32)
    scale, w_up = torch.rand(t, e, generator=gen).to(device), _rnd(gen, device, d, r, std=0.2)
    b_up, cw = _rnd(gen, device, e, d, std=0.2), torch.rand(t, d, generator=gen).to(device)
    floats = (h, w_fold, b_fold, scale, w_up, b_up, cw)
    f64 = _double_leaves(*floats)
    xhat = F.layer_norm(f64[0], (d,), eps=1e-5)
    hid = torch.relu(xhat @ f64[1].t() + f64[2]) * f64[3][:, unit.long()]
    want = (hid @ f64[4].t() + f64[3] @ f64[5]) * f64[6]

    leaves = [v.clone().requires_grad_() for v in floats]
    views = [_transposed(v) if i % 2 == 0 else _stride2(v) for i, v in enumerate(leaves)]
    assert not any(v.is_contiguous() for v in views)
    hs, wf, bf, sc, wu, bu, cws = views
    got = OPS.gated_specialist(hs, wf, bf, _stride2(unit), sc, wu, bu, cws, 1e-5)
    tol = _tol(device)
    assert_parity(got, want, tol, "output")
    grad = _rnd(gen, device, 1, d).expand(t, d)  # a 0-stride incoming gradient
    got.backward(grad)
    want.backward(grad.double())
    for name, leaf, ref in zip(("h", "w_fold", "b_fold", "scale", "w_up", "b_up", "channel_weight"), leaves, f64):
        assert_parity(leaf.grad, ref.grad, tol, f"grad {name}")


def _moe_inputs(gen, device, m=9, d=24, n=4, r=7, k=2, g=4):
    xg, xm = _rnd(gen, device, m, d), _rnd(gen, device, m, d)
    rows = [torch.tensor([3, 0, 7, 8, 1], device=device), torch.tensor([2, 5, 6], device=device)]
    eidx = [torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(len(v))]).to(device) for v in rows]
    probs = [torch.rand(len(v), k, generator=gen).to(device) for v in rows]
    coefs = [torch.rand(len(v), g, generator=gen).to(device) for v in rows]
    weights = [_rnd(gen, device, n, r, 2 * d, std=0.2), _rnd(gen, device, n, r, std=0.2),
               _rnd(gen, device, n, d, r, std=0.2), _rnd(gen, device, n, d, std=0.2)]
    return xg, xm, rows, eidx, probs, coefs, weights


def test_moe_gated_update_custom_ops_with_non_contiguous_operands(triton_backend):
    """torch.ops.mosaic_fast.moe_gated_update / moe_gated_update_ called directly: streams, row and expert
    indices, probabilities, gates and expert weights were all read densely (relative errors 0.03-0.7), and
    the in-place op wrote densely into strided streams. Forward and backward against float64."""
    device = triton_backend
    xg, xm, rows, eidx, probs, coefs, weights = _moe_inputs(_gen(24), device)
    floats = (xg, xm, probs[0], coefs[0], probs[1], coefs[1], *weights)
    f64 = _double_leaves(*floats)
    want = _moe64(f64[0], f64[1], rows, eidx, (f64[2], f64[4]), (f64[3], f64[5]), *f64[6:])

    leaves = [v.clone().requires_grad_() for v in floats]
    v = [_transposed(t) if i % 2 == 0 else _stride2(t) for i, t in enumerate(leaves)]
    idx = [_stride2(t) for t in (*rows, *eidx)]
    assert not any(t.is_contiguous() for t in (*v, *idx))
    got = OPS.moe_gated_update(v[0], v[1], idx[0], idx[1], idx[2], v[2], v[3], idx[3], v[4], v[5], *v[6:], True)
    tol = _tol(device)
    for s in range(2):
        assert_parity(got[s], want[s], tol, f"stream {s}")
    grads = [_transposed(_rnd(_gen(25), device, *xg.shape)), _rnd(_gen(26), device, 1, xg.shape[1]).expand_as(xm)]
    torch.autograd.backward(got[:2], grads)
    torch.autograd.backward(want, [gr.double() for gr in grads])
    names = ("x_gen", "x_med", "p_gen", "c_gen", "p_med", "c_med", "w_down", "b_down", "w_up", "b_up")
    for name, leaf, ref in zip(names, leaves, f64):
        assert_parity(leaf.grad, ref.grad, tol, f"grad {name}")

    yg, ym = _transposed(xg), _stride2(xm)
    c = [_transposed(t) for t in floats[2:]]
    OPS.moe_gated_update_(yg, ym, idx[0], idx[1], idx[2], c[0], c[1], idx[3], c[2], c[3], *c[4:])
    for s, y in enumerate((yg, ym)):
        assert_parity(y, want[s], tol, f"in place, stream {s}")


def test_moe_routed_update_custom_op_with_non_contiguous_operands(triton_backend):
    """torch.ops.mosaic_fast.moe_routed_update_ called directly (the public function checks the streams'
    layout, the op did not): strided streams were written densely, non-contiguous skip gates and weights
    read densely (relative errors 0.01-0.3). Against float64 routing (top-k softmax), gates and update."""
    device = triton_backend
    gen = _gen(27)
    b, n_tok, d, n, r, g, top_k = 2, 5, 24, 4, 7, 4, 2
    xg, xm = _rnd(gen, device, b, n_tok, d), _rnd(gen, device, b, n_tok, d)
    router = [_rnd(gen, device, n, d, std=0.3), _rnd(gen, device, n, std=0.3),
              _rnd(gen, device, n, d, std=0.3), _rnd(gen, device, n, std=0.3)]
    gates = [_rnd(gen, device, g, d, std=0.3), _rnd(gen, device, g, std=0.3),
             _rnd(gen, device, g, d, std=0.3), _rnd(gen, device, g, std=0.3)]
    experts = [_rnd(gen, device, n, r, 2 * d, std=0.2), _rnd(gen, device, n, r, std=0.2),
               _rnd(gen, device, n, d, r, std=0.2), _rnd(gen, device, n, d, std=0.2)]
    idx = [torch.tensor([[0, 2, 4], [0, 1, 3]], device=device), torch.tensor([[0, 3], [0, 4]], device=device)]
    skip = [torch.rand(2, 3, generator=gen).to(device), torch.rand(2, 2, generator=gen).to(device)]

    x64 = [xg.double().reshape(-1, d), xm.double().reshape(-1, d)]
    e64 = [w.double() for w in experts]
    rows, eidx, probs, coefs = [], [], [], []
    for s in range(2):
        rows.append((torch.arange(b, device=device).unsqueeze(1) * n_tok + idx[s]).reshape(-1))
        xs = x64[s].index_select(0, rows[s])
        logits = xs @ router[2 * s].double().t() + router[2 * s + 1].double()
        top = logits.topk(top_k, dim=1)
        eidx.append(top.indices)
        probs.append(torch.softmax(top.values, dim=1))
        coefs.append(torch.sigmoid(xs @ gates[2 * s].double().t() + gates[2 * s + 1].double())
                     * skip[s].double().reshape(-1, 1))
    want = _moe64(x64[0], x64[1], rows, eidx, probs, coefs, *e64)

    yg, ym = _transposed(xg), _stride2(xm)
    weights = [_transposed(w) for w in (*router, *gates, *experts)]
    assert not any(t.is_contiguous() for t in (yg, ym, *weights))
    OPS.moe_routed_update_(yg, ym, _transposed(idx[0]), _transposed(skip[0]), _stride2(idx[1]), _transposed(skip[1]),
                           *weights, top_k)
    tol = _tol(device)
    assert_parity(yg.reshape(-1, d), want[0], tol, "gen stream")
    assert_parity(ym.reshape(-1, d), want[1], tol, "med stream")


def _grouped_inputs(gen, device, t=10, d=24, rs=(5, 9)):
    g, r = len(rs), sum(rs)
    h, base = _rnd(gen, device, t, d, mean=0.5), _rnd(gen, device, t, d)
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0][:t], device=device)
    weights = [_rnd(gen, device, g, d, std=0.3, mean=1.0), _rnd(gen, device, g, d, std=0.3),
               _rnd(gen, device, r, d, std=0.3), _rnd(gen, device, r, std=0.3),
               _rnd(gen, device, d, r, std=0.3), _rnd(gen, device, g, d, std=0.3)]
    return h, base, ids, weights, list(rs)


def test_grouped_adapter_custom_ops_with_non_contiguous_operands(triton_backend):
    """torch.ops.mosaic_fast.grouped_adapter_fwd with a base whose column stride is 2 (the kernels use
    base's row stride only; relative error 1.3), and grouped_adapter_bwd with strided saved statistics and
    pre-activation (read densely: relative errors 0.1-1.2) and a 0-stride incoming gradient. Against
    float64 (output and every gradient)."""
    device = triton_backend
    h, base, ids, weights, rs = _grouped_inputs(_gen(28), device)
    h64, b64, *w64 = _double_leaves(h, base, *weights)
    want = _grouped64(h64, w64, rs, ids, b64)
    bs = _stride2(base)
    assert bs.stride() == (2 * h.shape[1], 2)
    out, mean, rstd, pre = OPS.grouped_adapter_fwd(h, bs, ids, 1, *weights, rs, 0.1, 1e-5, True)
    tol = _tol(device)
    assert_parity(out, want, tol, "output")

    dout = _rnd(_gen(29), device, 1, h.shape[1]).expand_as(h)
    want.backward(dout.double())
    grads = OPS.grouped_adapter_bwd(dout, h, ids, 1, *weights, _stride2(mean), _stride2(rstd), _transposed(pre), rs,
                                    0.1, 1e-5, True, True)
    for name, got, ref in zip(("h", "ln_w", "ln_b", "down_w", "down_b", "up_w", "up_b"), grads, (h64, *w64)):
        assert_parity(got, ref.grad, tol, f"grad {name}")


def test_grouped_adapter_width_one_with_a_strided_last_dim(triton_backend):
    """D = 1: an (T, 1) h whose size-1 last dim has stride T (a transposed row, contiguous by torch's rule)
    was refused by the kernels' layout check ("contiguous last dim") although a width of 1 reads one element
    per row. Output and gradients against float64 (LN of one channel is its bias: dh and dln_w are 0)."""
    device = triton_backend
    gen = _gen(30)
    t, rs = 7, [3]
    h = _rnd(gen, device, 1, t).t()
    assert h.stride(-1) != 1 and h.is_contiguous()
    weights = [_rnd(gen, device, 1, 1, mean=1.0), _rnd(gen, device, 1, 1), _rnd(gen, device, 3, 1),
               _rnd(gen, device, 3), _rnd(gen, device, 1, 3), _rnd(gen, device, 1, 1)]
    base = _rnd(gen, device, t, 1)
    leaves = [v.clone().requires_grad_() for v in (h, base, *weights)]
    out = ga.grouped_adapter(leaves[0], *leaves[2:], rs, base=leaves[1])
    f64 = _double_leaves(h, base, *weights)
    want = _grouped64(f64[0], f64[2:], rs, torch.zeros(t, device=device), f64[1])
    tol = _tol(device)
    assert_parity(out, want, tol, "output")
    dout = _rnd(gen, device, t, 1)
    out.backward(dout)
    want.backward(dout.double())
    for name, leaf, ref in zip(("base", "ln_b", "down_w", "down_b", "up_w", "up_b"),
                               [leaves[1], *leaves[3:]], [f64[1], *f64[3:]]):
        assert_parity(leaf.grad, ref.grad, tol, f"grad {name}")
    assert leaves[0].grad.abs().max() < 1e-6 and leaves[2].grad.abs().max() < 1e-6


# ----------------------------------------------------------------------------------------------------
# Every public op and custom op: non-contiguous inputs give what contiguous ones give
# ----------------------------------------------------------------------------------------------------


def _case_grouped(device, public):
    h, base, ids, weights, rs = _grouped_inputs(_gen(40), device, t=12, d=20)
    h, base = h.view(4, 3, 20), base.view(4, 3, 20)
    ids = ids[:4]
    names = ("h", "base", "ln_w", "ln_b", "down_w", "down_b", "up_w", "up_b")
    tensors = dict(zip(names, (h, base, *weights)), expert_id=ids)
    if public:
        def fn(h, base, expert_id, **w):
            return ga.grouped_adapter(h, *(w[k] for k in names[2:]), rs, base=base, expert_id=expert_id)
    else:
        def fn(h, base, expert_id, **w):
            out = OPS.grouped_adapter_fwd(h.reshape(-1, 20), base.reshape(-1, 20), expert_id, 3,
                                          *(w[k] for k in names[2:]), rs, 0.1, 1e-5, True)[0]
            return out.view(h.shape)
    # (the op refuses an h whose last dim is strided with a clear error: h keeps its layout there)
    return fn, tensors, set(names), set(), {"h"} if not public else set()


def _case_moe(device, kind):
    xg, xm, rows, eidx, probs, coefs, weights = _moe_inputs(_gen(41), device, d=20, r=5)
    tensors = dict(x_gen=xg, x_med=xm, rows_gen=rows[0], rows_med=rows[1], eidx_gen=eidx[0], p_gen=probs[0],
                   c_gen=coefs[0], eidx_med=eidx[1], p_med=probs[1], c_med=coefs[1], w_down=weights[0],
                   b_down=weights[1], w_up=weights[2], b_up=weights[3])
    floats = {k for k, v in tensors.items() if v.is_floating_point()}
    if kind == "public":
        return (lambda **a: moe_ops.moe_gated_update(**a)), tensors, floats, set(), set()
    if kind == "public_inplace":
        def fn(**a):
            with torch.no_grad():
                return moe_ops.moe_gated_update(**a, inplace=True)
        return fn, tensors, set(), {"x_gen", "x_med"}, set()
    if kind == "op":
        return (lambda **a: OPS.moe_gated_update(*a.values(), True)[:2]), tensors, floats, set(), set()

    def fn(**a):
        OPS.moe_gated_update_(*a.values())
        return a["x_gen"], a["x_med"]
    return fn, tensors, set(), {"x_gen", "x_med"}, set()


def _case_routed(device, public):
    gen = _gen(42)
    b, n_tok, d, n, r, g = 2, 5, 20, 4, 5, 4
    tensors = dict(x_gen=_rnd(gen, device, b, n_tok, d), x_med=_rnd(gen, device, b, n_tok, d),
                   idx_gen=torch.tensor([[0, 2, 4], [0, 1, 3]], device=device),
                   skip_gen=torch.rand(2, 3, generator=gen).to(device),
                   idx_med=torch.tensor([[0, 3], [0, 4]], device=device),
                   skip_med=torch.rand(2, 2, generator=gen).to(device),
                   wr_gen=_rnd(gen, device, n, d, std=0.3), br_gen=_rnd(gen, device, n, std=0.3),
                   wr_med=_rnd(gen, device, n, d, std=0.3), br_med=_rnd(gen, device, n, std=0.3),
                   wg_gen=_rnd(gen, device, g, d, std=0.3), bg_gen=_rnd(gen, device, g, std=0.3),
                   wg_med=_rnd(gen, device, g, d, std=0.3), bg_med=_rnd(gen, device, g, std=0.3),
                   w_down=_rnd(gen, device, n, r, 2 * d, std=0.2), b_down=_rnd(gen, device, n, r, std=0.2),
                   w_up=_rnd(gen, device, n, d, r, std=0.2), b_up=_rnd(gen, device, n, d, std=0.2))

    def fn(**a):
        if public:
            return routed_ops.moe_routed_update_(*a.values(), 2)
        OPS.moe_routed_update_(*a.values(), 2)
        return a["x_gen"], a["x_med"]
    # the public function refuses non-contiguous streams (they are updated in place): a clear error
    return fn, tensors, set(), {"x_gen", "x_med"}, {"x_gen", "x_med"} if public else set()


def _case_skip_merge(device, kind):
    gen = _gen(43)
    tensors = dict(x=_rnd(gen, device, 11, 20), rows=torch.tensor([3, 0, 7, 10, 5], device=device),
                   update=_rnd(gen, device, 5, 20), coef=torch.rand(5, 4, generator=gen).to(device))
    floats = {"x", "update", "coef"}
    if kind == "public":
        return (lambda **a: skip_ops.skip_merge(**a)), tensors, floats, set(), set()
    if kind == "public_inplace":
        def fn(**a):
            with torch.no_grad():
                return skip_ops.skip_merge(**a, inplace=True)
        return fn, tensors, set(), {"x"}, set()
    if kind == "op":
        return (lambda **a: OPS.skip_merge(*a.values())), tensors, floats, set(), set()

    def fn(**a):
        OPS.skip_merge_(*a.values())
        return a["x"]
    return fn, tensors, set(), {"x"}, set()


def _case_skip_select(device, public):
    gen = _gen(44)
    tensors = dict(h=_rnd(gen, device, 3, 11, 20), w2=_rnd(gen, device, 1, 20, std=0.3), b2=_rnd(gen, device, 1))
    select = skip_ops.skip_select if public else OPS.skip_select
    return (lambda **a: select(*a.values(), 4)), tensors, set(), set(), set()


def _case_gated_specialist(device, public):
    gen = _gen(45)
    t, d, r, e = 13, 20, 12, 3
    tensors = dict(h=_rnd(gen, device, t, d, mean=0.5), w_fold=_rnd(gen, device, r, d, std=0.2),
                   b_fold=_rnd(gen, device, r, std=0.2), unit_expert=(torch.arange(r) % e).to(device, torch.int32),
                   scale=torch.rand(t, e, generator=gen).to(device), w_up=_rnd(gen, device, d, r, std=0.2),
                   b_up=_rnd(gen, device, e, d, std=0.2), channel_weight=torch.rand(t, d, generator=gen).to(device))
    floats = {k for k, v in tensors.items() if v.is_floating_point()}
    if public:
        return (lambda **a: gs_ops.gated_specialist(**a)), tensors, floats, set(), set()
    return (lambda **a: OPS.gated_specialist(*a.values(), 1e-5)), tensors, floats, set(), set()


def _case_patch(device, kind):
    gen = _gen(46)
    tensors = dict(x=_rnd(gen, device, 2, 3, 4, 6, 4), weight=_rnd(gen, device, 7, 3, 2, 3, 2, std=0.2),
                   bias=_rnd(gen, device, 7, std=0.2))
    patch = (2, 3, 2)
    if kind == "proj":
        fn = lambda x, weight, bias: pe_ops.patch_embed3d_proj(x, weight, bias, patch, 0.5, 0.25)
    elif kind == "public":
        fn = lambda x, weight, bias: pe_ops.patch_embed3d(x, weight, bias, patch, 0.5, 0.25)
    elif kind == "op":
        fn = lambda x, weight, bias: OPS.patch_embed3d_proj(x, weight, bias, list(patch), 0.5, 0.25)
    elif kind == "patchify":
        del tensors["weight"], tensors["bias"]
        fn = lambda x: pe_ops.patchify3d(x, patch, 0.5, 0.25)
    else:  # unpatchify
        tensors = dict(patches=_rnd(gen, device, 2, 8, 12))
        fn = lambda patches: pe_ops.unpatchify3d(patches, (2, 1, 4, 6, 4), patch, 0.5)
    return fn, tensors, set(tensors), set(), set()


CASES = {
    "grouped_adapter": lambda dev: _case_grouped(dev, True),
    "op:grouped_adapter_fwd": lambda dev: _case_grouped(dev, False),
    "moe_gated_update": lambda dev: _case_moe(dev, "public"),
    "moe_gated_update(inplace)": lambda dev: _case_moe(dev, "public_inplace"),
    "op:moe_gated_update": lambda dev: _case_moe(dev, "op"),
    "op:moe_gated_update_": lambda dev: _case_moe(dev, "op_inplace"),
    "moe_routed_update_": lambda dev: _case_routed(dev, True),
    "op:moe_routed_update_": lambda dev: _case_routed(dev, False),
    "skip_merge": lambda dev: _case_skip_merge(dev, "public"),
    "skip_merge(inplace)": lambda dev: _case_skip_merge(dev, "public_inplace"),
    "op:skip_merge": lambda dev: _case_skip_merge(dev, "op"),
    "op:skip_merge_": lambda dev: _case_skip_merge(dev, "op_inplace"),
    "skip_select": lambda dev: _case_skip_select(dev, True),
    "op:skip_select": lambda dev: _case_skip_select(dev, False),
    "gated_specialist": lambda dev: _case_gated_specialist(dev, True),
    "op:gated_specialist": lambda dev: _case_gated_specialist(dev, False),
    "patch_embed3d_proj": lambda dev: _case_patch(dev, "proj"),
    "patch_embed3d": lambda dev: _case_patch(dev, "public"),
    "op:patch_embed3d_proj": lambda dev: _case_patch(dev, "op"),
    "patchify3d": lambda dev: _case_patch(dev, "patchify"),
    "unpatchify3d": lambda dev: _case_patch(dev, "unpatchify"),
}


def _run(fn, tensors, diff, mutated, layouts):
    """fn on the tensors (fresh copies; ``layouts[name](leaf)`` gives each argument), then, when ``diff``,
    backward with the incoming-gradient layout ``layouts["grad"]``: (outputs, gradients of the leaves)."""
    leaves, args = {}, {}
    for name, v in tensors.items():
        leaf = v.clone()
        if name in layouts.get("leaf_rows", set()):
            leaf = leaf[:1].clone()
        if name in diff:
            leaf.requires_grad_()
        leaves[name] = leaf
        args[name] = layouts[name](leaf)
    outs = fn(**args)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if not diff:
        return [o.detach() for o in outs], {}
    gens = [_gen(50 + i) for i in range(len(outs))]
    grads = [layouts["grad"](torch.randn(o.shape, generator=gens[i]).to(o.device)) for i, o in enumerate(outs)]
    torch.autograd.backward([o for o in outs if o.requires_grad], [g for o, g in zip(outs, grads) if o.requires_grad])
    return [o.detach() for o in outs], {k: leaves[k].grad for k in diff}


@pytest.mark.parametrize("mode", ["strided", "expanded"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_op_takes_non_contiguous_inputs(triton_backend, case, mode):
    """Every tensor input (and the incoming gradient) in a non-contiguous layout: "strided" (transposed
    storage or a last-dim stride of 2 for values, a strided column for indices) or "expanded" (0-stride
    rows: each floating input is its first row broadcast, the gradient too). Same results as contiguous
    inputs, forward and backward (where the op is differentiable)."""
    device = triton_backend
    fn, tensors, diff, mutated, keep = CASES[case](device)
    same = {name: (lambda t: t) for name in tensors}
    contiguous = dict(same, grad=lambda t: t.contiguous())
    if mode == "strided":
        layout = {name: (_transposed if i % 2 == 0 or not tensors[name].is_floating_point() else _stride2)
                  for i, name in enumerate(tensors)}
        layout = {name: (same[name] if name in keep else f) for name, f in layout.items()}
        layout["grad"] = _transposed
    else:
        expand = {name for name, v in tensors.items()
                  if v.is_floating_point() and v.dim() >= 1 and v.shape[0] > 1 and name not in mutated | keep}
        if not expand:
            pytest.skip("no input this op could take expanded")
        shapes = {name: v.shape for name, v in tensors.items()}
        layout = dict(same, leaf_rows=expand, grad=lambda t: t[:1].expand_as(t) if t.dim() else t)
        contiguous = dict(contiguous, leaf_rows=expand,
                          grad=lambda t: t[:1].expand_as(t).contiguous() if t.dim() else t)
        for name in expand:
            layout[name] = lambda leaf, s=shapes[name]: leaf.expand(s)
            contiguous[name] = lambda leaf, s=shapes[name]: leaf.expand(s).contiguous()
    if mode == "strided":
        # the same values, other layouts: every argument but the ones kept must really be non-contiguous
        probe = {name: layout[name](v) for name, v in tensors.items() if name not in keep and v.numel() > 1}
        assert not any(t.is_contiguous() for t in probe.values()), [n for n, t in probe.items() if t.is_contiguous()]
    want_out, want_grads = _run(fn, tensors, diff, mutated, contiguous)
    got_out, got_grads = _run(fn, tensors, diff, mutated, layout)
    for i, (got, want) in enumerate(zip(got_out, want_out)):
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"output {i}: {m}")
        else:
            assert torch.equal(got, want), f"output {i}"
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")


def test_launchers_refuse_a_strided_output_buffer_naming_it(triton_backend):
    """The kernels write their outputs densely: a launcher given a strided ``out`` (or ``mix``) raises a
    ValueError naming that buffer before launching, instead of writing the wrong elements."""
    from mosaic_fast.kernels.moe_adapter import moe_combine
    from mosaic_fast.kernels.moe_routed import moe_routed_update
    from mosaic_fast.kernels.token_skip import skip_merge

    device = triton_backend
    t, d, n, r, k, g = 3, 8, 2, 4, 1, 2
    x = torch.randn(5, d, device=device)
    strided = torch.randn(d, 5, device=device).t()  # (5, D), column-major
    rows = torch.arange(t, device=device)
    update, coef = torch.randn(t, d, device=device), torch.rand(t, g, device=device)
    with pytest.raises(ValueError, match=r"skip_merge: out must be contiguous"):
        skip_merge(x, strided, rows, update, coef)

    eidx = torch.zeros(t, k, dtype=torch.int64, device=device)
    probs, hidden = torch.rand(t, k, device=device), torch.randn(t * k, r, device=device)
    w_up, b_up = torch.randn(n, d, r, device=device), torch.randn(n, d, device=device)
    with pytest.raises(ValueError, match=r"moe_combine: out must be contiguous"):
        moe_combine(x, strided, rows, eidx, probs, hidden, w_up, b_up, coef)
    with pytest.raises(ValueError, match=r"moe_combine: mix must be contiguous"):
        moe_combine(x, x, rows, eidx, probs, hidden, w_up, b_up, coef, mix=torch.randn(d, t, device=device).t())

    xs = torch.randn(2, 4, d, device=device)
    out_med = torch.randn(2, d, 4, device=device).transpose(1, 2)
    router = (torch.randn(n, d, device=device), torch.randn(n, device=device))
    gate = (torch.randn(g, d, device=device), torch.randn(g, device=device))
    w_down, b_down = torch.randn(n, r, 2 * d, device=device), torch.randn(n, r, device=device)
    with pytest.raises(ValueError, match=r"moe_routed_update: out_med must be contiguous"):
        moe_routed_update(xs, xs, xs, out_med, None, None, None, None, router, router, gate, gate,
                          w_down, b_down, w_up, b_up, 1)
