"""Parity of the fast gated top-k MoE adapter (DynaMer) with the reference, forward and backward."""

import copy

import pytest
import torch
from parity import (
    TOL_BF16,
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
from mosaic_fast.nn.moe import _flat_rows
from mosaic_fast.ops.moe_adapter import moe_gated_update

D, R = 32, 16


def make(num_experts=4, top_k=2, gate_dim=D, seed=0):
    ref = randomize_(reference.GatedMoEAdapter(D, num_experts, top_k, R, gate_dim), std=0.2, seed=seed)
    fast = fast_nn.convert(copy.deepcopy(ref))
    assert type(fast) is fast_nn.GatedMoEAdapter
    return ref, fast


def pair(b=2, n=5, dtype=torch.float32, device="cpu"):
    return [torch.randn(b, n, D, dtype=dtype, device=device, requires_grad=True) for _ in range(2)]


def run(module, call, inputs, grads):
    """Outputs, input gradients and parameter gradients of ``call(module, *inputs)``."""
    module.zero_grad(set_to_none=True)
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    outs = call(module, *inputs)
    torch.autograd.backward(outs, grads)
    params = [p.grad for p in module.parameters()]
    return list(outs), [x.grad for x in inputs if x.requires_grad], params


def check(ref, fast, call, inputs, tol_fwd, tol_grad):
    """fast (its dtype) against the float64 reference, poisoning nothing shared."""
    grads = [torch.randn(inputs[0].shape, dtype=inputs[0].dtype, device=inputs[0].device) for _ in range(2)]
    ref64 = copy.deepcopy(ref).double().to(inputs[0].device)
    r_out, r_in, r_par = run(ref64, call, [x.double() for x in inputs], [g.double() for g in grads])
    f_out, f_in, f_par = run(fast, call, inputs, grads)
    for i, (f, r) in enumerate(zip(f_out, r_out)):
        assert_parity(f, r, tol_fwd, f"output {i}")
    for i, (f, r) in enumerate(zip(f_in, r_in)):
        assert_parity(f, r, tol_grad, f"input grad {i}")
    got, want = {}, {}
    for (name, _), f, r in zip(ref.named_parameters(), f_par, r_par):
        assert f is not None, f"{name}: no gradient"
        assert f.shape == r.shape, f"{name}: gradient shape {tuple(f.shape)} != {tuple(r.shape)}"
        if not r.any():  # e.g. the router under top_k = 1: softmax over one score is constant
            assert not f.any(), f"{name}: reference gradient is 0, fast is not"
            continue
        got[name], want[name] = f, r
    # a gate bias of gate_dim = 1 sums terms that nearly cancel (seen: norm 1.7e-3 against 16 for its weight,
    # the float32 reference itself 2.7e-4 off): the module-norm allowance of assert_grads_parity
    assert_grads_parity(got, want, tol_grad)


def triton_tol(device):
    """Triton kernels against a reference: the interpreter's bound on CPU, the CUDA one when compiled."""
    return TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32


def full(m, xg, xm):
    return m(xg, xm)


def skip_call(idx_g, idx_m):
    def call(m, xg, xm):
        gate_g = torch.sigmoid(torch.linspace(-1, 1, idx_g.numel(), dtype=xg.dtype, device=xg.device)).view(idx_g.shape)
        gate_m = torch.sigmoid(torch.linspace(1, -2, idx_m.numel(), dtype=xg.dtype, device=xg.device)).view(idx_m.shape)
        return m.forward_skip(xg, xm, idx_g.to(xg.device), gate_g, idx_m.to(xg.device), gate_m)
    return call


@pytest.mark.parametrize(("num_experts", "top_k", "gate_dim"), [(4, 2, D), (4, 1, D // 2), (4, 4, D // 4), (3, 2, 1)])
def test_forward_backward_torch(num_experts, top_k, gate_dim):
    ref, fast = make(num_experts, top_k, gate_dim)
    check(ref, fast, full, pair(), TOL_CPU_FWD, TOL_CPU_GRAD)


@pytest.mark.parametrize(("num_experts", "top_k", "gate_dim"), [(4, 2, D), (4, 1, 1), (4, 4, D // 4)])
def test_forward_backward_triton(triton_backend, num_experts, top_k, gate_dim):
    ref, fast = make(num_experts, top_k, gate_dim)
    tol = triton_tol(triton_backend)
    check(ref, fast.to(triton_backend), full, pair(device=triton_backend), tol, tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_skip(request, backend):
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    ref, fast = make()
    fast.to(device)
    idx_g = torch.tensor([[0, 2, 4], [0, 1, 3]])
    idx_m = torch.tensor([[0, 3], [0, 4]])
    tol = triton_tol(device) if backend == "triton" else TOL_CPU_GRAD
    check(ref, fast, skip_call(idx_g, idx_m), pair(device=device), tol if backend == "triton" else TOL_CPU_FWD, tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("order", ["ascending", "permuted"])
def test_forward_skip_every_token_kept(request, backend, order):
    """k = N in both streams (ρ = 1) takes the every-row update with the skip gates moved to token order:
    forward and backward equal the reference's, also for a selection in another order than ascending (each
    gate must follow its token), and in place under no_grad."""
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    ref, fast = make()
    fast.to(device)
    b, n = 2, 5
    gen = torch.Generator().manual_seed(3)
    if order == "ascending":
        idx_g = idx_m = torch.arange(n).expand(b, n)
    else:
        idx_g, idx_m = (torch.stack([torch.randperm(n, generator=gen) for _ in range(b)]) for _ in range(2))
        assert not torch.equal(idx_g, torch.arange(n).expand(b, n))
    tol_fwd = triton_tol(device) if backend == "triton" else TOL_CPU_FWD
    tol_grad = triton_tol(device) if backend == "triton" else TOL_CPU_GRAD
    check(ref, fast, skip_call(idx_g, idx_m), pair(b, n, device=device), tol_fwd, tol_grad)
    xg, xm = (torch.randn(b, n, D, device=device) for _ in range(2))
    gates = [torch.rand(b, n, device=device) for _ in range(2)]
    idx_g, idx_m = idx_g.to(device), idx_m.to(device)
    with torch.no_grad():
        want = copy.deepcopy(ref).double().to(device).forward_skip(xg.double(), xm.double(), idx_g,
                                                                   gates[0].double(), idx_m, gates[1].double())
        out = fast.forward_skip(xg, xm, idx_g, gates[0], idx_m, gates[1], inplace=True)
    assert out[0] is xg and out[1] is xm
    assert_parity(xg, want[0], tol_fwd, "gen in place")
    assert_parity(xm, want[1], tol_fwd, "med in place")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_skip_inplace_touches_selected_rows_only(request, backend):
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    ref, fast = make()
    fast.to(device)
    xg, xm = (torch.randn(1, 6, D, device=device) for _ in range(2))
    idx_g, idx_m = torch.tensor([[0, 5]], device=device), torch.tensor([[0, 1, 2, 3, 4, 5]], device=device)
    gates = (torch.rand(1, 2, device=device), torch.rand(1, 6, device=device))
    with torch.no_grad():
        expect = copy.deepcopy(ref).to(device).forward_skip(xg, xm, idx_g, gates[0], idx_m, gates[1])
        yg, ym = xg.clone(), xm.clone()
        out = fast.forward_skip(yg, ym, idx_g, gates[0], idx_m, gates[1], inplace=True)
    assert out[0] is yg and out[1] is ym
    tol = triton_tol(device) if backend == "triton" else TOL_CPU_FWD
    assert_parity(yg, expect[0], tol, "gen")
    assert_parity(ym, expect[1], tol, "med")
    assert torch.equal(yg[0, 1:5], xg[0, 1:5]), "unselected rows were written"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_skip_inplace_non_contiguous_streams(request, backend, fused_op_calls):
    """In place on streams that are views (B, N, :D) of wider buffers (not contiguous): the op runs on a
    contiguous copy and must write the result back into the views; the rest of the buffers stays."""
    if backend == "triton":
        device = request.getfixturevalue("triton_backend")
    else:
        device = "cpu"
        mosaic_fast.set_backend("torch")
    ref, fast = make()
    fast.to(device)
    bufs = [torch.randn(2, 6, 2 * D, device=device) for _ in range(2)]
    before = [b.clone() for b in bufs]
    xg, xm = (b[..., :D] for b in bufs)
    assert not xg.is_contiguous() and not xm.is_contiguous()
    idx_g = torch.tensor([[0, 2, 5], [0, 1, 3]], device=device)
    idx_m = torch.tensor([[0, 4], [0, 2]], device=device)
    gate_g, gate_m = torch.rand(2, 3, device=device), torch.rand(2, 2, device=device)
    with torch.no_grad():
        want = copy.deepcopy(ref).double().to(device).forward_skip(xg.double(), xm.double(), idx_g, gate_g.double(),
                                                                   idx_m, gate_m.double())
        out = fast.forward_skip(xg, xm, idx_g, gate_g, idx_m, gate_m, inplace=True)
    assert fused_op_calls["moe"] == (1 if backend == "triton" else 0)  # triton: the routed inference op
    assert out[0] is xg and out[1] is xm
    tol = triton_tol(device) if backend == "triton" else TOL_CPU_FWD
    assert_parity(xg, want[0], tol, "gen written in place")
    assert_parity(xm, want[1], tol, "med written in place")
    for buf, old in zip(bufs, before):
        assert torch.equal(buf[..., D:], old[..., D:]), "the rest of the buffer changed"


def test_all_tied_router_scores_pick_the_lowest_experts_in_every_path():
    """A zero router (all scores tied) routes every token to experts 0..k-1 in the reference and in the
    fast module, with and without gradients (the routed op's ties: tests/test_moe_routed.py)."""
    ref, fast = make(seed=4)
    with torch.no_grad():
        for m in (ref, fast):
            for router in (m.router_gen, m.router_med):
                router.weight.zero_()
                router.bias.zero_()
    x = torch.randn(2, 5, D)
    index, probs = ref.route(x, 0)
    assert torch.equal(index, torch.tensor([0, 1]).expand(2, 5, 2))
    assert torch.allclose(probs, torch.full_like(probs, 0.5))
    xg, xm = torch.randn(2, 5, D), torch.randn(2, 5, D)
    want = copy.deepcopy(ref).double()(xg.double(), xm.double())
    with_grad = fast(xg.clone().requires_grad_(), xm)
    with torch.no_grad():
        without_grad = fast(xg, xm)
    for got in (with_grad, without_grad):
        assert_parity(got[0], want[0], TOL_CPU_FWD, "gen")
        assert_parity(got[1], want[1], TOL_CPU_FWD, "med")


def test_router_ties_and_batch_of_one():
    """Equal router scores: both paths take the lower expert index, so they agree exactly in routing."""
    ref, fast = make(seed=3)
    with torch.no_grad():
        for m in (ref, fast):
            m.router_gen.weight.zero_()
            m.router_gen.bias.fill_(0.5)
    xg, xm = (torch.randn(1, 4, D, requires_grad=True) for _ in range(2))
    grads = [torch.randn(1, 4, D) for _ in range(2)]
    r_out, r_in, _ = run(ref, full, [xg, xm], grads)
    f_out, f_in, _ = run(fast, full, [xg, xm], grads)
    for f, r in zip(f_out + f_in, r_out + r_in):
        assert_parity(f, r, TOL_CPU_GRAD)


def test_state_dict_and_parameters_unchanged():
    ref, fast = make()
    assert list(ref.state_dict()) == list(fast.state_dict())
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in fast.parameters())


def test_bad_input():
    _, fast = make()
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match="x_gen"):
        fast(torch.randn(2, 5, D + 1), x)
    with pytest.raises(ValueError, match="same shape"):
        fast(x, torch.randn(2, 4, D))
    with pytest.raises(TypeError, match="x_med"):
        fast(x, x.long())
    with pytest.raises(TypeError, match="idx_gen"):
        fast.forward_skip(x, x, torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long),
                          torch.ones(2, 1))
    with pytest.raises(ValueError, match="gate_med"):
        fast.forward_skip(x, x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                          torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 2))
    for module in (fast, make()[0]):
        with pytest.raises(ValueError, match=r"idx_med: token indices must be in \[0, 5\)"):
            module.forward_skip(x, x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                                torch.tensor([[0], [5]]), torch.ones(2, 1))
    with pytest.raises(ValueError, match="top_k"):
        reference.GatedMoEAdapter(D, 4, 5, R, D)
    with pytest.raises(ValueError, match="gate_dim"):
        reference.GatedMoEAdapter(D, 4, 2, R, 5)
    with pytest.raises(ValueError, match="gate_dim=None means D"):  # the default 768 with a smaller width
        reference.GatedMoEAdapter(D)
    assert reference.GatedMoEAdapter(D, gate_dim=None).gate_dim == D
    with pytest.raises(TypeError, match="dtype"):
        moe_gated_update(*[torch.randn(3, D)] * 2, *[torch.arange(3)] * 2, torch.zeros(3, 1, dtype=torch.long),
                         torch.ones(3, 1, dtype=torch.float64), torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long),
                         torch.ones(3, 1), torch.ones(3, 1), *fast._params(torch.randn(3, D)))


def _op_args(device):
    m, n, r, k = 6, 3, 16, 2
    xg, xm = torch.randn(m, D, device=device), torch.randn(m, D, device=device)
    rows_g, rows_m = torch.tensor([0, 2, 5], device=device), torch.tensor([1, 2, 3, 4], device=device)
    e_g = torch.tensor([[0, 1], [2, 0], [1, 2]], device=device)
    e_m = torch.tensor([[1, 0], [0, 2], [2, 1], [0, 1]], device=device)
    p_g, p_m = torch.rand(3, k, device=device), torch.rand(4, k, device=device)
    c_g, c_m = torch.rand(3, 4, device=device), torch.rand(4, 4, device=device)
    w = [torch.randn(n, r, 2 * D), torch.randn(n, r), torch.randn(n, D, r), torch.randn(n, D)]
    w = [t.to(device) * 0.1 for t in w]
    return xg, xm, rows_g, rows_m, e_g, p_g, c_g, e_m, p_m, c_m, *w


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(request, backend):
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    args = _op_args(device)
    grad_args = [t.requires_grad_() if t.is_floating_point() else t for t in args]
    torch.library.opcheck(torch.ops.mosaic_fast.moe_gated_update.default, (*grad_args, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.mosaic_fast.moe_gated_update_.default, _op_args(device),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inference_forward_matches_training_forward(request, backend):
    """Under no_grad the op saves nothing; its (empty) saved outputs must still be distinct tensors
    (a custom op's outputs may not alias each other: this failed on CUDA before)."""
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    mosaic_fast.set_backend(backend)
    _, fast = make()
    fast.to(device)
    xg, xm = (x.detach() for x in pair(device=device))
    want = fast(xg, xm)
    with torch.no_grad():
        got = fast(xg, xm)
    for g, w in zip(got, want):
        assert_parity(g, w.detach(), triton_tol(device) if backend == "triton" else TOL_INTERPRETER)
    torch.library.opcheck(torch.ops.mosaic_fast.moe_gated_update.default, (*_op_args(device), False),
                          test_utils=("test_schema", "test_faketensor"))


def test_cuda_fp32_and_bf16(cuda_device):
    ref, fast = make()
    fast = fast.to(cuda_device)
    check(ref, fast, full, pair(b=4, n=33, device=cuda_device), TOL_CUDA_TF32, TOL_CUDA_TF32)
    mosaic_fast.set_backend("auto")
    # bf16 (the routed inference op): against a float64 model of the same bf16 weights and inputs, since
    # bf16 rounding of the weights alone flips near-tied expert choices against the fp32 originals
    xg, xm = (torch.randn(4, 33, D, device=cuda_device).bfloat16() for _ in range(2))
    with torch.no_grad():
        fast_bf = copy.deepcopy(fast).bfloat16()
        ref_bf = copy.deepcopy(ref).to(cuda_device).bfloat16()
        ref64 = copy.deepcopy(ref_bf).double()
        want = ref64(xg.double(), xm.double())
        got = fast_bf(xg, xm)
        base = ref_bf(xg, xm)
    for g, b, w in zip(got, base, want):
        assert_parity(g.float(), w, TOL_BF16)
        assert (g.double() - w).norm() <= 2 * (b.double() - w).norm() + 1e-6


def test_cuda_inplace_skip_is_applied_once_while_autotuning(cuda_device, monkeypatch):
    """The combine kernel writes in place and is autotuned: every timed config run must be undone
    (``restore_value``), so the first (tuning) call still updates each selected row exactly once."""
    import triton

    from mosaic_fast.kernels import moe_adapter as kernels

    # a fresh autotuner over every config (the module's may be cut to one by MOSAIC_FAST_AUTOTUNE=0, or tuned)
    fresh = triton.autotune(configs=kernels._combine_configs(), key=["D", "R", "K", "n_exp", "G", "STORE_MIX",
                                                                     "T_BUCKET"],
                            restore_value=["out_ptr", "mix_ptr"])(kernels._moe_combine_kernel)
    monkeypatch.setattr(kernels, "_moe_combine", fresh)
    ref, fast = make()
    ref, fast = ref.to(cuda_device), fast.to(cuda_device)
    b, n = 3, 40
    xg, xm = (torch.randn(b, n, D, device=cuda_device) for _ in range(2))
    idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n - 1)[:19].sort().values + 1])
                       for _ in range(b)]).to(cuda_device)
    gates = (torch.rand(b, 20, device=cuda_device), torch.rand(b, 20, device=cuda_device))
    with torch.no_grad():  # the op itself: the module's inference runs the routed op (test_moe_routed.py)
        expect = ref.forward_skip(xg, xm, idx, gates[0], idx, gates[1])
        yg, ym = xg.clone(), xm.clone()
        rows = _flat_rows(idx, n)
        eg, pg, cg = fast._routing(xg.view(-1, D).index_select(0, rows), 0, gates[0].reshape(-1))
        em, pm, cm = fast._routing(xm.view(-1, D).index_select(0, rows), 1, gates[1].reshape(-1))
        moe_gated_update(yg.view(-1, D), ym.view(-1, D), rows, rows, eg, pg, cg, em, pm, cm, *fast._params(yg),
                         inplace=True)
    assert len(fresh.cache) == 1, "the combine kernel was not autotuned"
    assert_parity(yg, expect[0], TOL_CUDA_TF32, "gen")
    assert_parity(ym, expect[1], TOL_CUDA_TF32, "med")


@pytest.mark.parametrize("call", ["full", "skip"])
def test_autocast_cpu_bf16_runs_in_the_stream_dtype(call):
    """Under autocast the routing comes out in mixed dtypes; the fused update runs in the streams' dtype
    (it raised a dtype TypeError before). Outputs and every gradient against float64 by the 2x rule: within
    twice the error of the reference module under the same autocast."""
    torch.manual_seed(0)
    ref, fast = make()
    idx = torch.tensor([[0, 2, 5], [0, 1, 4]])
    gate = torch.rand(2, 3)
    gouts = [torch.randn(2, 6, D) for _ in range(2)]
    inputs = pair(b=2, n=6)

    def run(module, dtype, autocast):
        xg, xm = (t.detach().to(dtype).requires_grad_(True) for t in inputs)
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = module(xg, xm) if call == "full" else module.forward_skip(xg, xm, idx, gate, idx, gate)
        sum((o * g.to(dtype)).sum() for o, g in zip(outs, gouts)).backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        return [*outs, xg.grad, xm.grad], grads

    want, want_grads = run(copy.deepcopy(ref).double(), torch.float64, False)
    base, base_grads = run(ref, torch.float32, True)
    got, got_grads = run(fast, torch.float32, True)
    assert all(t.dtype == torch.float32 for t in got)
    assert set(got_grads) == set(want_grads)
    pairs = [(f"tensor {i}", g, b, w) for i, (g, b, w) in enumerate(zip(got, base, want))]
    pairs += [(n, got_grads[n], base_grads[n], w) for n, w in want_grads.items()]
    for name, g, b, w in pairs:
        w = w.detach()
        err, err_ref = (float((t.detach().double() - w).norm()) for t in (g, b))
        assert err <= 2 * err_ref + 1e-6 * float(w.norm()), f"{name}: {err:.3e} > 2 x reference {err_ref:.3e}"


@pytest.mark.parametrize("gate_dim", [D, D // 2, D // 4, 1])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_reference_equals_design_formula(gate_dim, top_k):
    """DESIGN.md §3 written out token by token (not fast vs reference): expert j on [x_gen ; x_med], top-k of
    the stream's own router scores softmaxed over the kept ones, gate value c of σ(G(x)) on channels
    [c·D/g, (c+1)·D/g), x̂ = σ·x̃ + (1 − σ)·x."""
    ref = randomize_(reference.GatedMoEAdapter(D, 4, top_k, R, gate_dim), std=0.3, seed=3).double()
    xg, xm = (torch.randn(2, 3, D, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        got = ref(xg, xm)
        for b in range(2):
            for i in range(3):
                u = torch.cat([xg[b, i], xm[b, i]])
                experts = [ref.up_weight[j] @ torch.relu(ref.down_weight[j] @ u + ref.down_bias[j]) + ref.up_bias[j]
                           for j in range(4)]
                for s, (x, router, gate) in enumerate(((xg, ref.router_gen, ref.gate_gen),
                                                       (xm, ref.router_med, ref.gate_med))):
                    scores = router.weight @ x[b, i] + router.bias
                    kept = sorted(range(4), key=lambda j: -float(scores[j]))[:top_k]
                    p = torch.softmax(scores[kept], dim=0)
                    mix = sum(p[t] * experts[j] for t, j in enumerate(kept))
                    g = torch.sigmoid(gate.weight @ x[b, i] + gate.bias)
                    g = torch.stack([g[c // (D // gate_dim)] for c in range(D)])
                    want = g * mix + (1 - g) * x[b, i]
                    torch.testing.assert_close(got[s][b, i], want, rtol=1e-12, atol=1e-12)


def _every_row_args(m: int, n: int, r: int, k: int, groups: int, seed: int):
    """(eidx_gen, eidx_med, floats) for moe_gated_update on m rows: distinct top-k experts per row, then x_gen,
    x_med, p_gen, c_gen, p_med, c_med (G = ``groups``) and the four expert weights."""
    g = torch.Generator().manual_seed(seed)
    e_g = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(m)])
    e_m = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(m)])
    floats = [torch.randn(m, D, generator=g), torch.randn(m, D, generator=g), torch.rand(m, k, generator=g),
              torch.rand(m, groups, generator=g), torch.rand(m, k, generator=g), torch.rand(m, groups, generator=g),
              0.1 * torch.randn(n, r, 2 * D, generator=g), 0.1 * torch.randn(n, r, generator=g),
              0.1 * torch.randn(n, D, r, generator=g), 0.1 * torch.randn(n, D, generator=g)]
    return e_g, e_m, floats


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
def test_rows_none_means_every_row(request, backend, inplace):
    """``rows_gen = rows_med = None`` (the full forward, no gather or scatter on the torch path) computes
    what the explicit rows 0..M-1 compute: outputs and every input's gradient, and in place when asked."""
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    mosaic_fast.set_backend(backend)
    m = 6
    e_g, e_m, floats = _every_row_args(m, n=3, r=16, k=2, groups=4, seed=7)
    rows = torch.arange(m, device=device)
    results = []
    for rows_arg in (rows, None):
        xg, xm, pg, cg, pm, cm, *w = [t.to(device, copy=True).requires_grad_(not inplace) for t in floats]
        out = moe_gated_update(xg, xm, rows_arg, rows_arg, e_g.to(device), pg, cg, e_m.to(device), pm, cm, *w,
                               inplace=inplace)
        if inplace:
            assert out[0] is xg and out[1] is xm
            results.append([o.detach().clone() for o in out])
            continue
        gouts = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3)).to(device) for o in out]
        grads = torch.autograd.grad(out, [xg, xm, pg, cg, pm, cm, *w], gouts)
        results.append([o.detach() for o in out] + list(grads))
    tol = triton_tol(device) if backend == "triton" else TOL_CPU_FWD
    for i, (got, want) in enumerate(zip(results[1], results[0])):
        assert want.norm() > 1e-3, f"tensor {i} is near zero: the check would prove nothing"
        assert_parity(got, want, tol, f"tensor {i}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("every_row", [True, False])
def test_inplace_with_gradients_matches_out_of_place(request, backend, every_row):
    """``inplace=True`` under autograd (non-leaf streams, gates and weights that need gradients) computes out
    of place and copies into the streams: same outputs and leaf gradients as ``inplace=False``, for
    every row (rows None) and for explicit rows; the copy must not overwrite what the backward needs (the
    Triton path's op saved the streams themselves: its backward failed, "modified by an inplace operation")."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    else:
        mosaic_fast.set_backend("torch")
    e_g, e_m, leaves = _every_row_args(6, n=4, r=3, k=2, groups=2, seed=11)
    rows = None if every_row else torch.tensor([0, 2, 3, 5])
    e_g, e_m = (e_g, e_m) if every_row else (e_g[rows], e_m[rows])
    results = []
    for inplace in (False, True):
        ls = [t.clone().requires_grad_() for t in leaves]
        xg, xm = ls[0] * 1.0, ls[1] * 1.0  # non-leaf streams, as inside a model
        pg, cg, pm, cm = ((t if every_row else t[rows]) for t in ls[2:6])
        out = moe_gated_update(xg, xm, rows, rows, e_g, pg, cg, e_m, pm, cm, *ls[6:], inplace=inplace)
        assert (out[0] is xg) == inplace
        (out[0] * torch.arange(D) + out[1].pow(2)).sum().backward()
        results.append([o.detach() for o in out] + [t.grad for t in ls])
    for i, (got, want) in enumerate(zip(results[1], results[0])):
        assert want.norm() > 1e-4, f"tensor {i} is near zero: the check would prove nothing"
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"tensor {i}")
