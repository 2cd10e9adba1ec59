"""Gaps found by mutation testing of the MoE / skip / gated-specialist / grouped-adapter code changed since
the last nn/ops pass (CPU in-place inference, every-row updates, index and dtype checks, bypass of hooked
layers). Each test compares against the reference modules or a hand formula on fresh random inputs with every
parameter randomised (DESIGN.md §3, §5), or checks an error DESIGN.md §7 asks for."""

import copy
import fractions
import math
import warnings

import numpy as np
import pytest
import torch
from parity import TOL_CPU_FWD, TOL_CPU_GRAD, TOL_CUDA_TF32, TOL_INTERPRETER, assert_parity, randomize_

from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.nn.bypass import FastPathFallbackWarning
from mosaic_fast.ops.grouped_adapter import pack_adapters, run_adapter, run_packed
from mosaic_fast.ops.token_skip import blend

D = 32


def _scaling_hook(calls: list):
    def hook(module, args, output):
        calls.append(type(module).__name__)
        return output * 1.5  # changes the result: a bypassed hook shows in the output

    return hook


# ---------------------------------------------------------------------------------------------------
# nn/moe.py: SkipRouter bypass of a hooked layer
# ---------------------------------------------------------------------------------------------------


def _router_pair(keep_ratio):
    ref = randomize_(reference.SkipRouter(D, keep_ratio), std=0.2, seed=11).eval()
    return ref, fast_nn.convert(copy.deepcopy(ref))


def test_skip_router_calls_a_hooked_activation():
    """A forward hook on the router's GELU: at ρ = 1 the fast router's scores (GELU fused into the GEMM
    otherwise) must run the hook, as the reference calls ``self.act``; same gates as the reference."""
    ref, fast = _router_pair(1.0)
    calls: dict[str, list] = {"ref": [], "fast": []}
    for name, m in (("ref", ref), ("fast", fast)):
        m.act.register_forward_hook(_scaling_hook(calls[name]))
    x = torch.randn(2, 6, D)
    with pytest.warns(FastPathFallbackWarning, match="act has a forward or backward hook"):
        idx, gate = fast.select(x)
    ref_idx, ref_gate = ref.select(x)
    assert torch.equal(idx, ref_idx)
    assert_parity(gate, ref_gate, TOL_CPU_FWD, "skip gates")
    with pytest.warns(FastPathFallbackWarning):
        scores = fast.scores(x)
    assert_parity(scores, ref.scores(x), TOL_CPU_FWD, "scores")
    assert calls["fast"] and calls["fast"] == calls["ref"]


def test_fused_select_calls_a_hooked_layer(triton_backend, fused_op_calls):
    """On the Triton backend in inference the selection is one fused kernel that reads fc2's weights: a
    hooked fc2 (or act) must send the router to the reference selection instead (no fused launch)."""
    device = triton_backend
    for layer in ("fc2", "act"):
        ref, fast = _router_pair(0.5)
        fast.to(device)
        ref.to(device)
        for m in (ref, fast):
            getattr(m, layer).register_forward_hook(_scaling_hook([]))
        x = torch.randn(3, 9, D, device=device)
        before = fused_op_calls["select"]
        with torch.no_grad(), pytest.warns(FastPathFallbackWarning, match=f"{layer} has a forward or backward hook"):
            idx, gate = fast.select(x)
            ref_idx, ref_gate = ref.select(x)
        assert fused_op_calls["select"] == before, f"{layer}: the fused selection bypassed the hook"
        assert torch.equal(idx, ref_idx)
        tol = TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32
        assert_parity(gate, ref_gate, tol, f"{layer}: skip gates")


# ---------------------------------------------------------------------------------------------------
# nn/moe.py: GatedMoEAdapter, every token kept in one stream only; hooked routers and gates
# ---------------------------------------------------------------------------------------------------


def _moe_pair(seed=5):
    ref = randomize_(reference.GatedMoEAdapter(D, 4, 2, 8, D // 4), std=0.2, seed=seed).eval()
    return ref, fast_nn.convert(copy.deepcopy(ref))


@pytest.mark.parametrize("full", ["gen", "med"])
def test_forward_skip_with_every_token_kept_in_one_stream_only(full):
    """k = N in one stream (a permutation) and k < N in the other: not the both-streams ρ = 1 shortcut.
    Forward and every gradient (streams, skip gates, parameters) equal the float64 reference's; in place
    under no_grad too."""
    ref, fast = _moe_pair()
    b, n = 2, 6
    g = torch.Generator().manual_seed(7)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    part = torch.tensor([[0, 2, 5], [0, 1, 3]])
    idx_g, idx_m = (perm, part) if full == "gen" else (part, perm)
    xs = [torch.randn(b, n, D, generator=g) for _ in range(2)]
    gates = [torch.rand(*i.shape, generator=g) for i in (idx_g, idx_m)]
    grads = [torch.randn(b, n, D, generator=g) for _ in range(2)]

    def run(module, dtype):
        module.zero_grad(set_to_none=True)
        x = [t.to(dtype).requires_grad_() for t in xs]
        gt = [t.to(dtype).requires_grad_() for t in gates]
        outs = module.forward_skip(x[0], x[1], idx_g, gt[0], idx_m, gt[1])
        torch.autograd.backward(outs, [t.to(dtype) for t in grads])
        return [*outs, *(t.grad for t in x), *(t.grad for t in gt), *(p.grad for p in module.parameters())]

    want = run(copy.deepcopy(ref).double(), torch.float64)
    got = run(fast, torch.float32)
    names = ["out_gen", "out_med", "grad x_gen", "grad x_med", "grad gate_gen", "grad gate_med",
             *(f"grad {k}" for k, _ in ref.named_parameters())]
    for name, a, w in zip(names, got, want):
        assert_parity(a, w, TOL_CPU_FWD if name.startswith("out") else TOL_CPU_GRAD, name)
    yg, ym = (t.clone() for t in xs)
    with torch.no_grad():
        out = fast.forward_skip(yg, ym, idx_g, gates[0], idx_m, gates[1], inplace=True)
    assert out[0] is yg and out[1] is ym
    assert_parity(yg, want[0], TOL_CPU_FWD, "gen in place")
    assert_parity(ym, want[1], TOL_CPU_FWD, "med in place")


@pytest.mark.parametrize("layer", ["router_gen", "router_med", "gate_gen", "gate_med"])
def test_gated_moe_adapter_calls_each_hooked_routing_layer(layer):
    """A forward hook on any of the four routing Linears (not only gate_med) sends forward and
    forward_skip to the reference computation: the hook runs as often as in the reference, same result."""
    ref, fast = _moe_pair(seed=6)
    calls: dict[str, list] = {"ref": [], "fast": []}
    for name, m in (("ref", ref), ("fast", fast)):
        getattr(m, layer).register_forward_hook(_scaling_hook(calls[name]))
    xg, xm = torch.randn(2, 5, D), torch.randn(2, 5, D)
    with pytest.warns(FastPathFallbackWarning, match=f"{layer} has a forward or backward hook"):
        got = fast(xg, xm)
    for a, w in zip(got, ref(xg, xm)):
        assert_parity(a, w, TOL_CPU_FWD, f"{layer}: forward")
    idx, gate = torch.tensor([[0, 2, 3], [0, 1, 4]]), torch.rand(2, 3)
    with pytest.warns(FastPathFallbackWarning, match=f"{layer} has a forward or backward hook"):
        got = fast.forward_skip(xg, xm, idx, gate, idx, gate)
    for a, w in zip(got, ref.forward_skip(xg, xm, idx, gate, idx, gate)):
        assert_parity(a, w, TOL_CPU_FWD, f"{layer}: forward_skip")
    assert calls["fast"] and calls["fast"] == calls["ref"]


# ---------------------------------------------------------------------------------------------------
# reference/moe.py: keep_ratio numbers, gate width
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.float32(0.5), np.float16(0.25), np.int64(1), fractions.Fraction(1, 3)])
def test_keep_ratio_accepts_any_real_number(value):
    """keep_ratio is "a number in (0, 1]": numpy scalars (not float/int subclasses) and Fractions are real
    numbers too; the kept count is ⌈ρN⌉ (CLS included) in the reference and the fast router."""
    for router in _router_pair(0.7):
        router.keep_ratio = value
        assert router.keep_ratio == float(value)
        n = 7
        idx, gate = router.select(torch.randn(2, n, D))
        assert idx.shape == gate.shape == (2, math.ceil(float(value) * n))


@pytest.mark.parametrize(("stream", "gate"), [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16),
                                              (torch.float16, torch.float32)])
def test_forward_skip_names_a_gate_wider_than_low_precision_streams(stream, gate):
    """"Wider than the streams" is dtype promotion, not just float64: an fp32 (or fp16) skip gate on bf16
    streams would make gated tokens the streams cannot hold. Reference and fast module raise the same
    TypeError naming the gate; a gate of the streams' own dtype passes."""
    ref = randomize_(reference.GatedMoEAdapter(D, 4, 2, 8, D), std=0.2, seed=5)
    fast = fast_nn.convert(copy.deepcopy(ref))
    x = torch.randn(2, 5, D, dtype=stream)
    idx = torch.tensor([[0, 2, 3], [0, 1, 4]])
    ok = torch.rand(2, 3, dtype=stream)
    for module in (ref.to(stream), fast.to(stream)):
        with pytest.raises(TypeError, match=rf"gate_gen is {gate}, wider than x_gen \({stream}\)"):
            module.forward_skip(x, x, idx, ok.to(gate), idx, ok)
        with pytest.raises(TypeError, match=rf"gate_med is {gate}, wider than x_gen \({stream}\)"):
            module.forward_skip(x, x, idx, ok, idx, ok.to(gate))
        with torch.no_grad():
            module.forward_skip(x, x, idx, ok, idx, ok)


# ---------------------------------------------------------------------------------------------------
# nn/moe.py GatedSpecialistAdapter
# ---------------------------------------------------------------------------------------------------


def test_fast_gated_specialist_names_an_integer_h():
    """An integer h: the fast M4oE module raises the reference's TypeError naming h (DESIGN.md §7), not
    torch's "mat1 and mat2 must have the same dtype" from its gate."""
    ref = reference.GatedSpecialistAdapter(8, (4, 4))
    fast = fast_nn.convert(copy.deepcopy(ref))
    for kind in ("expert", "channel"):
        ref.gate_kind = fast.gate_kind = kind
        for module in (ref, fast):
            with pytest.raises(TypeError, match=r"h must be a floating-point tensor, got torch\.int64"):
                module(torch.ones(3, 4, 8, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------
# ops/token_skip.py: blend
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sel_dtype", "update_dtype", "coef_dtype"), [
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float32, torch.float32, torch.float64),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16, torch.float16),
])
def test_blend_result_has_the_promoted_dtype_of_all_three(sel_dtype, update_dtype, coef_dtype):
    """blend's result dtype is the promotion of sel, update and coef, as ``sel + coef ⊙ (update − sel)``
    would give (also when the stream is the narrow one, or only coef is wide), with that dtype's accuracy."""
    g = torch.Generator().manual_seed(4)
    sel, update = torch.randn(5, D, generator=g).to(sel_dtype), torch.randn(5, D, generator=g).to(update_dtype)
    coef = torch.rand(5, 4, generator=g).to(coef_dtype)
    want_dtype = torch.promote_types(torch.promote_types(sel_dtype, update_dtype), coef_dtype)
    out = blend(sel, update, coef)
    assert out.dtype == (sel + coef.repeat_interleave(D // 4, dim=1) * (update - sel)).dtype == want_dtype
    s64, u64, c64 = sel.double(), update.double(), coef.double().repeat_interleave(D // 4, dim=1)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(want_dtype, 1e-2)
    assert_parity(out, s64 + c64 * (u64 - s64), tol, "blend")


# ---------------------------------------------------------------------------------------------------
# ops/grouped_adapter.py: packed/single-adapter entry points
# ---------------------------------------------------------------------------------------------------


def test_run_adapter_and_run_packed_name_an_integer_h():
    """run_adapter / run_packed check h themselves (they skip grouped_adapter's checks): an integer h is a
    TypeError naming h, not a LayerNorm failure or a suggestion to cast the weights to an integer dtype."""
    adapters = [randomize_(reference.Adapter(D, r), std=0.2, seed=r) for r in (4, 6)]
    weights, bottlenecks = pack_adapters(adapters)
    single, _ = pack_adapters(adapters[:1])
    a = adapters[0]
    own = [p.detach() for p in (a.layer_norm.weight, a.layer_norm.bias, a.down_proj.weight, a.down_proj.bias,
                                a.up_proj.weight, a.up_proj.bias)]
    h = torch.ones(2, 3, D, dtype=torch.long)
    with pytest.raises(TypeError, match=r"h must be a floating-point tensor, got torch\.int64"):
        run_adapter(h, own)
    with pytest.raises(TypeError, match=r"h must be a floating-point tensor, got torch\.int64"):
        run_packed(h, single, [4])
    with pytest.raises(TypeError, match=r"h must be a floating-point tensor, got torch\.int64"):
        run_packed(h, weights, bottlenecks, expert_id=torch.tensor([0, 1]))
    with warnings.catch_warnings():  # the valid call still matches the reference adapter
        warnings.simplefilter("error")
        x = torch.randn(2, 3, D)
        assert_parity(run_adapter(x, own), adapters[0](x), TOL_CPU_FWD, "run_adapter")
