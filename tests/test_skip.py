"""Top-k token skipping: reference semantics, fast merge parity (torch fallback and Triton), op checks."""

import copy

import pytest
import torch
from parity import (
    TOL_CPU_FWD,
    TOL_CPU_GRAD,
    TOL_CUDA_TF32,
    TOL_INTERPRETER,
    assert_grads_parity,
    assert_parity,
    randomize_,
)

import mosaic_fast
from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.ops.token_skip import blend, skip_merge
from mosaic_fast.reference.moe import num_kept

D = 32


def make(keep_ratio=0.5):
    ref = randomize_(reference.SkipRouter(D, keep_ratio), std=0.2, seed=1)
    return ref, fast_nn.convert(copy.deepcopy(ref))


def triton_tol(device):
    """Triton kernels against a reference: the interpreter's bound on CPU, the CUDA one when compiled."""
    return TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32


def update_fn(x_sel):
    return torch.tanh(x_sel) * 2.0 + x_sel.mean(dim=1, keepdim=True)


def run(module, x, grad):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x, update_fn)
    out.backward(grad)
    return [out, x.grad, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize(("keep_ratio", "n"), [(0.5, 7), (1.0, 5), (0.1, 6), (0.3, 10)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parity(request, backend, keep_ratio, n):
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    ref, fast = make(keep_ratio)
    fast.to(device)
    x = torch.randn(2, n, D, device=device)
    grad = torch.randn_like(x)
    want = run(copy.deepcopy(ref).double().to(device), x.double(), grad.double())
    got = run(fast, x, grad)
    tol_f, tol_g = (triton_tol(device),) * 2 if backend == "triton" else (TOL_CPU_FWD, TOL_CPU_GRAD)
    assert_parity(got[0], want[0], tol_f, "output")
    assert_parity(got[1], want[1], tol_g, "grad x")
    # fc2.bias (the scalar score bias) sums terms that nearly cancel (seen: the float32 reference itself
    # 6e-4 off at ρ = 0.3, N = 10): the module-norm allowance of assert_grads_parity
    names = [n for n, _ in ref.named_parameters()]
    assert [g.shape for g in got[2:]] == [w.shape for w in want[2:]]
    assert_grads_parity(dict(zip(names, got[2:])), dict(zip(names, want[2:])), tol_g)


def test_selection_semantics():
    """k = ⌈ρN⌉ with the CLS token always kept, sorted indices, unselected tokens untouched."""
    ref, _ = make(0.3)
    x = torch.randn(3, 10, D)
    with torch.no_grad():
        ref.fc2.bias.fill_(0.0)
        idx, gate = ref.select(x)
        out = ref(x, lambda t: t + 1.0)
    assert idx.shape == (3, 3) and gate.shape == (3, 3)
    assert (idx[:, 0] == 0).all() and (idx.diff(dim=1) > 0).all()
    mask = torch.zeros(3, 10, dtype=torch.bool).scatter(1, idx, True)
    assert torch.equal(out[~mask], x[~mask])
    assert torch.allclose(out[mask].view(3, 3, D), x.gather(1, idx[..., None].expand(-1, -1, D)) + gate[..., None])
    assert [num_kept(r, 10) for r in (0.1, 0.3, 0.5, 1.0, 0.01)] == [1, 3, 5, 10, 1]


def test_ties_keep_cls_and_agree():
    """All scores equal: CLS is still kept, then the lowest token indices, in both paths."""
    ref, fast = make(0.5)
    with torch.no_grad():
        for m in (ref, fast):
            m.fc2.weight.zero_()
    x = torch.randn(1, 6, D)
    with torch.no_grad():
        assert torch.equal(ref.select(x)[0], torch.tensor([[0, 1, 2]]))
        assert torch.equal(ref.select(x)[0], fast.select(x)[0])
        assert ref.select(x)[0][0, 0] == 0
        assert_parity(fast(x, update_fn), ref(x, update_fn), TOL_CPU_FWD)


@pytest.mark.parametrize("keep_ratio", [1.0, 0.99, 0.5])
def test_fast_select_equals_reference(keep_ratio):
    """The fast router's selection (the identity shortcut when every token is kept) returns exactly the
    reference's indices, and its gates to fp32 rounding (on CPU the scores' Linears run in oneDNN, which
    sums in another order); ρ = 0.99 of 10 tokens keeps all 10 too."""
    ref, fast = make(keep_ratio)
    x = torch.randn(3, 10, D)
    with torch.no_grad():
        (i_ref, g_ref), (i_fast, g_fast) = ref.select(x), fast.select(x)
    assert torch.equal(i_fast, i_ref) and i_fast.dtype == i_ref.dtype
    assert_parity(g_fast, g_ref, TOL_CPU_FWD)


@pytest.mark.parametrize(("b", "n", "keep_ratio"), [(3, 10, 0.5), (1, 7, 0.1), (2, 5, 1.0), (2, 37, 0.3)])
def test_fused_select_equals_reference(triton_backend, fused_op_calls, b, n, keep_ratio):
    """Inference on the Triton backend: one kernel gives the reference's indices (k = 1 and k = N
    included; N = 37 spans several comparison chunks in the interpreter) and gates."""
    ref, fast = make(keep_ratio)
    fast.to(triton_backend)
    x = torch.randn(b, n, D, device=triton_backend)
    with torch.no_grad():
        i_ref, g_ref = copy.deepcopy(ref).to(triton_backend).select(x)
        i_fast, g_fast = fast.select(x)
    assert fused_op_calls["select"] == 1
    assert torch.equal(i_fast, i_ref) and i_fast.dtype == torch.int64
    assert_parity(g_fast, g_ref, triton_tol(triton_backend), "gates")


def test_fused_select_ties_go_to_the_lower_index(triton_backend, fused_op_calls):
    """Equal scores: CLS, then the lowest token indices (torch.topk's choice among ties is unspecified)."""
    _, fast = make(0.5)
    fast.to(triton_backend)
    with torch.no_grad():
        fast.fc2.weight.zero_()
        x = torch.randn(2, 9, D, device=triton_backend)
        idx, gate = fast.select(x)
    assert fused_op_calls["select"] == 1
    assert torch.equal(idx.cpu(), torch.arange(5).expand(2, 5))
    assert torch.allclose(gate, torch.sigmoid(fast.fc2.bias).expand(2, 5))


def test_fused_select_only_without_gradients(triton_backend, fused_op_calls):
    _, fast = make(0.5)
    fast.to(triton_backend)
    x = torch.randn(2, 9, D, device=triton_backend)
    _, gate = fast.select(x)
    assert gate.requires_grad and fused_op_calls["select"] == 0
    with torch.no_grad():
        fast.select(x)
    assert fused_op_calls["select"] == 1
    with pytest.raises(ValueError, match="kept"):
        from mosaic_fast.ops.token_skip import skip_select

        w2, b2 = torch.randn(1, 8, device=triton_backend), torch.randn(1, device=triton_backend)
        skip_select(torch.randn(2, 9, 8, device=triton_backend), w2, b2, 10)
    torch.library.opcheck(torch.ops.mosaic_fast.skip_select.default,
                          (torch.randn(2, 9, 8, device=triton_backend), torch.randn(1, 8, device=triton_backend),
                           torch.randn(1, device=triton_backend), 4), test_utils=("test_schema", "test_faketensor"))


def test_fused_select_falls_back_beyond_its_token_limit(triton_backend, fused_op_calls):
    from mosaic_fast.ops.token_skip import SELECT_MAX_TOKENS, skip_select

    device = triton_backend
    ref, fast = make(0.01)
    fast.to(device)
    x = torch.randn(1, SELECT_MAX_TOKENS + 1, D, device=device)
    with torch.no_grad():
        assert torch.equal(fast.select(x)[0], copy.deepcopy(ref).to(device).select(x)[0])
    assert fused_op_calls["select"] == 0
    w2, b2 = torch.randn(1, 4, device=device), torch.randn(1, device=device)
    with pytest.raises(ValueError, match="tokens"):
        skip_select(torch.randn(1, SELECT_MAX_TOKENS + 1, 4, device=device), w2, b2, 3)
    with pytest.raises(ValueError, match="w2/b2"):
        skip_select(torch.randn(1, 9, 4, device=device), torch.randn(4, device=device), b2, 3)
    with pytest.raises(TypeError, match="w2/b2"):
        skip_select(torch.randn(1, 9, 4, device=device), w2.double(), b2, 3)
    with pytest.raises(ValueError, match="h:"):
        skip_select(torch.randn(9, 4, device=device), w2, b2, 3)


def merge_formula(x, rows, update, coef):
    """float64 ``x`` with ``x[rows] + coef ⊗ (update − x[rows])``; coef (T, G) covers D/G adjacent channels per
    value (channel c takes coef[:, c // (D/G)])."""
    want = x.double().clone()
    sel = want[rows]
    want[rows] = sel + coef.double().repeat_interleave(x.shape[1] // coef.shape[1], dim=1) * (update.double() - sel)
    return want


def _merge_backend(request, backend):
    if backend == "triton":
        return request.getfixturevalue("triton_backend")
    mosaic_fast.set_backend("torch")
    return "cpu"


@pytest.mark.parametrize("groups", [2, 8])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_grouped_coef_matches_formula(request, backend, groups):
    """Grouped gates (1 < G < D, G | D) against the explicit formula, out of place and in place."""
    device = _merge_backend(request, backend)
    tol = TOL_INTERPRETER if backend == "triton" else TOL_CPU_FWD
    x = torch.randn(12, D, device=device)
    rows = torch.tensor([3, 0, 11, 6], device=device)
    upd, coef = torch.randn(4, D, device=device), torch.rand(4, groups, device=device)
    want = merge_formula(x, rows, upd, coef)
    assert_parity(skip_merge(x, rows, upd, coef), want, tol, "out of place")
    y = x.clone()
    assert skip_merge(y, rows, upd, coef, inplace=True) is y
    assert_parity(y, want, tol, "in place")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_inplace_rows_only(request, backend):
    device = _merge_backend(request, backend)
    tol = TOL_INTERPRETER if backend == "triton" else TOL_CPU_FWD
    x = torch.randn(12, D, device=device)
    rows = torch.tensor([3, 0, 11], device=device)
    upd, coef = torch.randn(3, D, device=device), torch.rand(3, 4, device=device)
    want = merge_formula(x, rows, upd, coef)
    y = x.clone()
    assert skip_merge(y, rows, upd, coef, inplace=True) is y
    assert_parity(y, want, tol, "in place")
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[rows.cpu()] = False
    assert torch.equal(y[untouched.to(device)], x[untouched.to(device)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(request, backend):
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    x = torch.randn(8, D, device=device, requires_grad=True)
    rows = torch.tensor([1, 4, 7], device=device)
    upd = torch.randn(3, D, device=device, requires_grad=True)
    coef = torch.rand(3, 2, device=device, requires_grad=True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.mosaic_fast.skip_merge.default, (x, rows, upd, coef), test_utils=utils)
    torch.library.opcheck(torch.ops.mosaic_fast.skip_merge_.default,
                          (x.detach().clone(), rows, upd.detach(), coef.detach()), test_utils=utils[::2])


def test_bad_input():
    _, fast = make()
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match="keep_ratio"):
        reference.SkipRouter(D, 0.0)
    with pytest.raises(ValueError, match="keep_ratio"):
        fast.keep_ratio = 1.5
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="keep_ratio must be a number"):
            fast.keep_ratio = bad
    fast.keep_ratio = 1  # an int is a number
    with pytest.raises(ValueError, match="x"):
        fast(torch.randn(2, 5, D + 1), update_fn)
    with pytest.raises(TypeError, match="fn"):
        fast(x, "not callable")
    for router in (fast, make()[0]):
        with pytest.raises(ValueError, match="N >= 1 tokens"):
            router(torch.randn(2, 0, D), update_fn)
    with pytest.raises(ValueError, match="update"):
        fast(x, lambda t: t[:, :1])
    for router in (fast, make()[0]):
        with pytest.raises(TypeError, match=r"update is torch\.float64, wider than x"):
            router(x, lambda t: t.double())
        assert router(x, lambda t: t.bfloat16()).dtype == torch.float32  # narrower: merged in x's dtype
    for router in (fast, make()[0]):
        with pytest.raises(ValueError, match=r"idx_x: token indices must be in \[0, 5\)"):
            router.merge(x, torch.tensor([[0, 1], [0, 5]]), torch.ones(2, 2), torch.randn(2, 2, D))
        with pytest.raises(ValueError, match=r"idx_x: token indices must be distinct within each sample"):
            router.merge(x, torch.tensor([[0, 1], [3, 3]]), torch.ones(2, 2), torch.randn(2, 2, D))
        router.merge(x, torch.tensor([[0, 1], [1, 0]]), torch.ones(2, 2), torch.randn(2, 2, D))  # across samples: fine
    with pytest.raises(TypeError, match="rows"):
        skip_merge(x.view(-1, D), torch.tensor([0.0]), torch.randn(1, D), torch.ones(1, 1))
    with pytest.raises(ValueError, match="coef"):
        skip_merge(x.view(-1, D), torch.tensor([0]), torch.randn(1, D), torch.ones(1, 3))


@pytest.mark.parametrize("groups", [1, 4, D])
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_blend_is_the_gated_update_per_channel_group(groups, rows):
    """blend (one lerp over (T, G, D/G) views) against ``sel + coef ⊙ (update − sel)`` with coef expanded
    to channels in float64, forward and every gradient; coefficients on both sides of ½ (lerp's two
    formulas) and empty row sets."""
    g = torch.Generator().manual_seed(rows * 10 + groups)
    sel, update = (torch.randn(rows, D, generator=g, requires_grad=True) for _ in range(2))
    coef = torch.rand(rows, groups, generator=g).requires_grad_()
    gout = torch.randn(rows, D, generator=g)
    out = blend(sel, update, coef)
    s64, u64, c64 = (t.detach().double().requires_grad_() for t in (sel, update, coef))
    want = s64 + c64.repeat_interleave(D // groups, dim=1) * (u64 - s64)
    assert out.dtype == torch.float32 and out.shape == (rows, D)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    if rows:
        got = torch.autograd.grad(out, (sel, update, coef), gout)
        ref = torch.autograd.grad(want, (s64, u64, c64), gout.double())
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_blend_promotes_like_the_arithmetic_form():
    """Under autocast the update arrives in bf16 while the stream stays fp32: the result is fp32, as
    ``sel + coef * (update - sel)`` would be, not an error or a bf16 stream."""
    sel, coef = torch.randn(3, D), torch.rand(3, 2)
    update = torch.randn(3, D).bfloat16()
    out = blend(sel, update, coef)
    assert out.dtype == torch.float32
    want = sel + coef.repeat_interleave(D // 2, dim=1) * (update.float() - sel)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
