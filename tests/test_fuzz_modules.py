"""Property-based differential tests of the drop-in modules: ``mosaic_fast.nn`` against ``reference``.

Hypothesis draws a module configuration (widths, bottlenecks, expert counts, top-k, gate widths, keep
ratios, patch geometry), a routing (letters, per-sample ids with empty or single groups, token
selections in any order), exact ties (duplicated router rows and repeated tokens with dyadic values,
integer-valued scores, a constant score), input layouts (transposed, strided, batch-major views), the
call (forward, forward_fused, forward_skip in and out of place), the CPU GEMM library and the mode
(training with gradients, eval under ``torch.no_grad`` or ``torch.inference_mode``, which take separate
fused, cached and in-place paths). The fast module, built by :func:`mosaic_fast.nn.convert` from a
randomised reference, must match the float64 reference in its outputs, its input gradients and every
parameter gradient within DESIGN.md §5, leave the arguments of an out-of-place call untouched, and give
the same result when called again without gradients: on the torch fallback (fp32 and float64 fast
modules) and, with tiny shapes, on the Triton interpreter.

The hand-picked cases of tests/test_moe.py, test_skip.py, test_nn_adapter.py, ... pin single
configurations; these properties look for the combinations between them.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from fuzzing import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st
from parity import TOL_CPU_FWD, TOL_CPU_GRAD, TOL_INTERPRETER, assert_grads_parity, assert_parity, randomize_

import mosaic_fast
from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.backend import INTERPRET, triton_available
from mosaic_fast.ops import cpu_gemm

needs_interpreter = pytest.mark.skipif(not (INTERPRET and triton_available()),
                                       reason="needs Triton's interpreter (TRITON_INTERPRET=1, no GPU)")

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
LAYOUTS = ("contiguous", "transposed", "strided", "batch_major")
MODES = ("grad", "no_grad", "inference")
#: fp32 CPU products: as chosen by size ("auto"), every one through oneDNN, or every one through MKL
GEMMS = ("auto", "onednn", "mkl") if cpu_gemm.onednn_available() else ("auto",)


# ------------------------------------------------------------------------------------------------------
# the differential harness
# ------------------------------------------------------------------------------------------------------


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values in another memory layout (differentiable, so gradients reach ``x``)."""
    if layout == "transposed" and x.dim() >= 2:  # last dim not unit-stride
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a wider buffer
        return torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]
    if layout == "batch_major" and x.dim() >= 3:  # samples interleaved in memory
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def pure(fn, *args):
    """``fn(*args)``, asserting that it leaves its tensor arguments as they were; without gradients it runs
    twice (the second call hits the modules' inference caches) and must give the same result."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [t.detach().clone() for t in tensors]
    out = fn(*args)
    for i, (t, old) in enumerate(zip(tensors, before)):
        assert torch.equal(t.detach(), old), f"argument {i} was modified by an out-of-place call"
    if not torch.is_grad_enabled():
        again = fn(*args)
        for first, second in zip(*(o if isinstance(o, tuple) else (o,) for o in (out, again))):
            assert torch.equal(first, second), "a second call (cached inference state) gave another result"
    return out


def run(module, call, inputs, mode: str, seed: int):
    """(outputs, input grads, {parameter name: grad}) of ``call(module, *inputs)`` in ``mode``."""
    module.zero_grad(set_to_none=True)
    grad = mode == "grad"
    leaves = [x.detach().clone().requires_grad_(grad and x.is_floating_point()) for x in inputs]
    if mode == "grad":
        outs = call(module, *leaves)
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            outs = call(module, *leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if not grad:
        return outs, [], {}
    gen = torch.Generator().manual_seed(seed)
    gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, gouts)
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return outs, [x.grad for x in leaves if x.requires_grad], grads


def close(fast: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """assert_parity, except that a reference that is exactly zero (a dead ReLU, a router under top_k = 1)
    must be matched by a fast result that is zero too."""
    if not ref.detach().any():
        assert fast.shape == ref.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(ref.shape)}"
        assert float(fast.detach().double().abs().max()) <= 1e-12, f"{what}: reference is 0, fast is not"
        return
    assert_parity(fast, ref, tol, what)


def flatten(result) -> dict[str, torch.Tensor]:
    """{name: tensor} of everything :func:`run` returned (outputs, input grads, parameter grads)."""
    outs, input_grads, param_grads = result
    named = {f"output {i}": o for i, o in enumerate(outs)}
    named.update({f"input grad {i}": g for i, g in enumerate(input_grads) if g is not None})
    named.update({f"grad {n}": g for n, g in param_grads.items()})
    return named


def compare(got, want, tol_fwd: float, tol_grad: float) -> None:
    """DESIGN.md §5 on every output and gradient (assert_grads_parity's allowance for parameters)."""
    assert len(got[0]) == len(want[0])
    for i, (f, r) in enumerate(zip(got[0], want[0])):
        close(f, r, tol_fwd, f"output {i}")
    for i, (f, r) in enumerate(zip(got[1], want[1])):
        assert (f is None) == (r is None), f"input grad {i}: fast {f is None}, reference {r is None}"
        if r is not None:
            close(f, r, tol_grad, f"input grad {i}")
    fast_grads, ref_grads = got[2], want[2]
    assert set(fast_grads) == set(ref_grads), f"parameters with gradients differ: {set(fast_grads) ^ set(ref_grads)}"
    nonzero = {}
    for name, r in ref_grads.items():
        if r.any():
            nonzero[name] = r
        else:
            close(fast_grads[name], r, tol_grad, f"grad {name}")
    assert_grads_parity({n: fast_grads[n] for n in nonzero}, nonzero, tol_grad)


def differential(ref, fast, call, inputs, *, mode: str, training: bool, tol_fwd: float, tol_grad: float,
                 seed: int = 0):
    """Run ``fast`` and the float64 twin of ``ref`` on the same inputs and compare everything.

    Where an fp32 result misses the tolerance, the rule DESIGN.md §5 sets for 16-bit results decides:
    the fast error must be at most twice that of the reference run in the same dtype (an ill-conditioned
    gradient, e.g. a router's under integer-valued ties, where the fp32 reference itself was 1.7e-4 off)."""
    ref64 = copy.deepcopy(ref).double().train(training)
    fast.train(training)
    ref_mode = "grad" if mode == "grad" else "no_grad"
    inputs64 = [x.double() if x.is_floating_point() else x.clone() for x in inputs]
    want = run(ref64, call, inputs64, ref_mode, seed)
    got = run(fast, call, inputs, mode, seed)
    for i, f in enumerate(got[0]):
        assert f.dtype == fast_dtype(fast), f"output {i}: dtype {f.dtype}"
    try:
        compare(got, want, tol_fwd, tol_grad)
    except AssertionError:
        if fast_dtype(fast) == torch.float64:
            raise
        same = run(copy.deepcopy(ref).to(fast_dtype(fast)).train(training), call, inputs, ref_mode, seed)
        got_n, want_n, same_n = flatten(got), flatten(want), flatten(same)
        assert set(got_n) == set(want_n) == set(same_n)
        for name, r in want_n.items():
            assert torch.isfinite(got_n[name]).all(), f"{name}: fast result has NaN/Inf"
            err = float((got_n[name].detach().double() - r.detach()).norm())
            err_same = float((same_n[name].detach().double() - r.detach()).norm())
            tol = tol_fwd if name.startswith("output") else tol_grad
            assert err <= max(tol * float(r.detach().norm()), 2 * err_same), (
                f"{name}: error {err:.3e} exceeds the tolerance and twice the same-dtype reference's {err_same:.3e}")


def fast_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def twin(ref: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The fast module with ``ref``'s weights, in ``dtype``."""
    return fast_nn.convert(copy.deepcopy(ref)).to(dtype)


def tolerances(backend: str) -> tuple[float, float]:
    return (TOL_INTERPRETER, TOL_INTERPRETER) if backend == "triton" else (TOL_CPU_FWD, TOL_CPU_GRAD)


def use(backend: str) -> None:
    mosaic_fast.set_backend("triton" if backend == "triton" else "auto")


@contextlib.contextmanager
def cpu_gemms(choice: str):
    """The fast modules' fp32 CPU products on ``choice`` (see GEMMS) within the block."""
    saved = cpu_gemm._library, cpu_gemm.MIN_ONEDNN_MACS
    if choice != "auto":
        cpu_gemm._library, cpu_gemm.MIN_ONEDNN_MACS = choice, 0
    try:
        yield
    finally:
        cpu_gemm._library, cpu_gemm.MIN_ONEDNN_MACS = saved


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def dyadic(t: torch.Tensor, limit: float = 3.0) -> torch.Tensor:
    """``t`` rounded to multiples of 1/8 in [-limit, limit]. Products and sums of a few dozen such values are
    exact in fp32 whatever the summation order, so equal rows give exactly equal scores in every precision
    and library (plain float rows do not: a GEMM rounds its tail rows or columns differently; seen with
    F.linear itself, 1 ulp apart in fp32 and fp64, which breaks a "tie" differently per precision)."""
    return (t * 8).round().clamp(-8 * limit, 8 * limit) / 8


# ------------------------------------------------------------------------------------------------------
# Adapter and MoSAdapter
# ------------------------------------------------------------------------------------------------------


@st.composite
def adapter_cases(draw, tiny: bool = False):
    module = draw(st.sampled_from(["mos", "adapter"]))
    rank = draw(st.sampled_from([2, 3, 4]))
    b = draw(st.integers(1, 3 if tiny else 4))
    tokens = [draw(st.integers(1, 3 if tiny else 5)) for _ in range(rank - 2)]
    route = draw(st.sampled_from(["A", "B", "C", "ids", "ids32"] + (["none"] if module == "adapter" else [])))
    ids = draw(st.lists(st.integers(0, 2), min_size=b, max_size=b)) if route.startswith("ids") else []
    big = st.just(257) if not tiny else st.nothing()  # above MAX_FAST_BOTTLENECK: the reference fallback
    return dict(
        module=module, d=draw(st.integers(3, 24 if tiny else 40)),
        bottlenecks=tuple(draw(st.integers(1, 16 if tiny else 24) | big) for _ in range(3)),
        shape=(b, *tokens), route=route, ids=ids, fused=draw(st.booleans()),
        layout_h=draw(st.sampled_from(LAYOUTS)), layout_base=draw(st.sampled_from(LAYOUTS)),
        mode=draw(st.sampled_from(MODES)), training=draw(st.booleans()),
        dtype=draw(st.sampled_from(["fp32"] if tiny else ["fp32", "fp64"])), seed=draw(st.integers(0, 2**16)),
        gemm=draw(st.sampled_from(GEMMS[:1] if tiny else GEMMS)),
    )


def check_adapter(case: dict, backend: str) -> None:
    use(backend)
    d, (ra, rb, rc) = case["d"], case["bottlenecks"]
    if case["module"] == "mos":
        ref = reference.MoSAdapter(d, ra, rb, rc)
    else:
        ref = reference.Adapter(d, ra)
    randomize_(ref, std=0.3, seed=case["seed"])
    dtype = DTYPES[case["dtype"]]
    fast = twin(ref, dtype)
    gen = torch.Generator().manual_seed(case["seed"])
    h, base = randn(gen, *case["shape"], d).to(dtype), randn(gen, *case["shape"], d).to(dtype)
    route = case["route"]
    if route.startswith("ids"):
        eid = torch.tensor(case["ids"], dtype=torch.int32 if route == "ids32" else torch.int64)
    else:
        eid = None if route == "none" else route

    def call(m, h, base):
        h = laid_out(h, case["layout_h"])
        fast_module = isinstance(m, (fast_nn.Adapter, fast_nn.MoSAdapter))
        if case["fused"]:
            base = laid_out(base, case["layout_base"])
            if fast_module:
                return pure(m.forward_fused, h, base) if eid is None else pure(m.forward_fused, h, base, eid)
            return base + (m(h) if isinstance(m, reference.Adapter) else m(h, eid))
        return pure(m, h) if isinstance(m, reference.Adapter) else pure(m, h, eid)

    tol_fwd, tol_grad = tolerances(backend)
    differential(ref, fast, call, [h, base], mode=case["mode"], training=case["training"], tol_fwd=tol_fwd,
                 tol_grad=tol_grad, seed=case["seed"])


@settings(max_examples=examples(60))
@given(case=adapter_cases())
def test_adapter_and_mos_adapter_torch(case):
    """nn.Adapter / nn.MoSAdapter (forward, forward_fused) equal the reference on the torch fallback."""
    with cpu_gemms(case["gemm"]):
        check_adapter(case, "torch")


@needs_interpreter
@settings(max_examples=examples(8))
@given(case=adapter_cases(tiny=True))
def test_adapter_and_mos_adapter_triton(case):
    """The same property on the Triton kernels (interpreter), tiny shapes."""
    check_adapter(case, "triton")


# ------------------------------------------------------------------------------------------------------
# GatedMoEAdapter
# ------------------------------------------------------------------------------------------------------


@st.composite
def selections(draw, b: int, n: int):
    """(B, k) distinct token indices per sample, in any order, with 1 <= k <= N; and their skip gates."""
    k = draw(st.integers(1, n))
    rows = [draw(st.permutations(range(n)))[:k] for _ in range(b)]
    if draw(st.booleans()):
        rows = [sorted(r) for r in rows]
    return rows


@st.composite
def moe_cases(draw, tiny: bool = False):
    d = 4 * draw(st.integers(1, 4 if tiny else 8))
    n = draw(st.integers(1, 4 if tiny else 6))
    b, tokens = draw(st.integers(1, 2 if tiny else 3)), draw(st.integers(1, 4 if tiny else 6))
    return dict(
        d=d, num_experts=n, top_k=draw(st.integers(1, n)), bottleneck=draw(st.integers(1, 8 if tiny else 12)),
        gate_dim=draw(st.sampled_from([d, d // 2, d // 4, 1])), shape=(b, tokens),
        call=draw(st.sampled_from(["forward", "skip", "skip_inplace"])),
        sel_gen=draw(selections(b, tokens)), sel_med=draw(selections(b, tokens)),
        ties=draw(st.sampled_from(["none", "duplicate", "integer"])),
        tied_pairs=draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3)),
        layout_gen=draw(st.sampled_from(LAYOUTS)), layout_med=draw(st.sampled_from(LAYOUTS)),
        mode=draw(st.sampled_from(MODES)), training=draw(st.booleans()),
        dtype=draw(st.sampled_from(["fp32"] if tiny else ["fp32", "fp64"])), seed=draw(st.integers(0, 2**16)),
        gemm=draw(st.sampled_from(GEMMS[:1] if tiny else GEMMS)),
    )


def check_moe(case: dict, backend: str) -> None:
    use(backend)
    d = case["d"]
    ref = reference.GatedMoEAdapter(d, case["num_experts"], case["top_k"], case["bottleneck"], case["gate_dim"])
    randomize_(ref, std=0.3, seed=case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    xg, xm = randn(gen, *case["shape"], d), randn(gen, *case["shape"], d)
    with torch.no_grad():
        for router in (ref.router_gen, ref.router_med):
            if case["ties"] == "duplicate":  # equal rows of exact (dyadic) scores: those experts tie
                router.weight.copy_(dyadic(router.weight * 4, 1.0))
                router.bias.copy_(dyadic(router.bias * 4, 1.0))
                for src, dst in case["tied_pairs"]:
                    router.weight[dst] = router.weight[src]
                    router.bias[dst] = router.bias[src]
            elif case["ties"] == "integer":  # small integer scores: many ties
                router.weight.copy_(torch.randint(-1, 2, router.weight.shape, generator=gen))
                router.bias.zero_()
        if case["ties"] == "integer":
            xg, xm = (torch.randint(-2, 3, xg.shape, generator=gen).double() for _ in range(2))
        elif case["ties"] == "duplicate":
            xg, xm = dyadic(xg), dyadic(xm)
    dtype = DTYPES[case["dtype"]]
    fast = twin(ref, dtype)
    idx_g, idx_m = torch.tensor(case["sel_gen"]), torch.tensor(case["sel_med"])
    gate_g, gate_m = torch.rand(idx_g.shape, generator=gen).double(), torch.rand(idx_m.shape, generator=gen).double()
    kind = case["call"]

    def call(m, xg, xm, gate_g, gate_m):
        xg, xm = laid_out(xg, case["layout_gen"]), laid_out(xm, case["layout_med"])
        if kind == "forward":
            return pure(m, xg, xm)
        if kind == "skip" or not isinstance(m, fast_nn.GatedMoEAdapter):
            # (the reference's in-place mode is for inference: under autograd it overwrites what its backward
            # saved, so it is compared out of place, which in place must equal)
            return pure(m.forward_skip, xg, xm, idx_g, gate_g, idx_m, gate_m)
        if xg.requires_grad:  # in place under autograd: on non-leaf streams, as inside a model
            xg, xm = xg * 1.0, xm * 1.0
        before = [t.detach().clone() for t in (xg, xm)]
        out = m.forward_skip(xg, xm, idx_g, gate_g, idx_m, gate_m, inplace=True)
        assert out[0] is xg and out[1] is xm, "inplace=True must return the streams themselves"
        for x, old, idx in zip(out, before, (idx_g, idx_m)):
            kept = torch.zeros(x.shape[:2], dtype=torch.bool).scatter_(1, idx, True)
            assert torch.equal(x.detach()[~kept], old[~kept]), "inplace=True wrote an unselected token"
        return out

    tol_fwd, tol_grad = tolerances(backend)
    differential(ref, fast, call, [x.to(dtype) for x in (xg, xm, gate_g, gate_m)], mode=case["mode"],
                 training=case["training"], tol_fwd=tol_fwd, tol_grad=tol_grad, seed=case["seed"])


@settings(max_examples=examples(40))
@given(case=moe_cases())
@example(case=dict(  # found: every token kept, in place under autograd: the routing saved the overwritten streams
    d=4, num_experts=1, top_k=1, bottleneck=1, gate_dim=4, shape=(1, 1), call="skip_inplace", sel_gen=[[0]],
    sel_med=[[0]], ties="none", tied_pairs=[], layout_gen="contiguous", layout_med="contiguous", mode="grad",
    training=False, dtype="fp32", seed=0, gemm="auto"))
def test_gated_moe_adapter_torch(case):
    """nn.GatedMoEAdapter (forward, forward_skip, in place) equals the reference on the torch fallback."""
    with cpu_gemms(case["gemm"]):
        check_moe(case, "torch")


@needs_interpreter
@settings(max_examples=examples(8))
@given(case=moe_cases(tiny=True))
@example(case=dict(  # found: in place under autograd, the op's backward read the overwritten streams
    d=4, num_experts=1, top_k=1, bottleneck=1, gate_dim=4, shape=(1, 1), call="skip_inplace", sel_gen=[[0]],
    sel_med=[[0]], ties="none", tied_pairs=[], layout_gen="contiguous", layout_med="contiguous", mode="grad",
    training=False, dtype="fp32", seed=0, gemm="auto"))
@example(case=dict(  # found: the same with one stream not contiguous (the module copied into it afterwards)
    d=4, num_experts=1, top_k=1, bottleneck=1, gate_dim=4, shape=(1, 2), call="skip_inplace", sel_gen=[[0]],
    sel_med=[[0]], ties="none", tied_pairs=[], layout_gen="contiguous", layout_med="transposed", mode="grad",
    training=False, dtype="fp32", seed=0, gemm="auto"))
def test_gated_moe_adapter_triton(case):
    """The same property on the Triton kernels (interpreter; inference runs the routed op), tiny shapes."""
    check_moe(case, "triton")


# ------------------------------------------------------------------------------------------------------
# SkipRouter
# ------------------------------------------------------------------------------------------------------


@st.composite
def skip_cases(draw, tiny: bool = False):
    n = draw(st.integers(1, 8 if tiny else 12))
    kept = draw(st.integers(1, n))
    # any ρ with ⌈ρN⌉ = kept (ρ = kept/N exactly, or a bit below)
    below = draw(st.sampled_from([0.0, 0.5, 0.999]) | st.floats(0.0, 0.999))
    return dict(
        d=4 * draw(st.integers(1, 4 if tiny else 8)), b=draw(st.integers(1, 2 if tiny else 3)), n=n,
        keep_ratio=(kept - below) / n, ties=draw(st.sampled_from(["none", "constant", "exact"])),
        layout=draw(st.sampled_from(LAYOUTS)), mode=draw(st.sampled_from(MODES)),
        dtype=draw(st.sampled_from(["fp32"] if tiny else ["fp32", "fp64"])), seed=draw(st.integers(0, 2**16)),
        gemm=draw(st.sampled_from(GEMMS[:1] if tiny else GEMMS)),
    )


def check_skip(case: dict, backend: str) -> None:
    use(backend)
    d, n = case["d"], case["n"]
    ref = randomize_(reference.SkipRouter(d, case["keep_ratio"]), std=0.3, seed=case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    x = randn(gen, case["b"], n, d)
    with torch.no_grad():
        if case["ties"] == "constant":  # every score equal
            ref.fc2.weight.zero_()
        elif case["ties"] == "exact":
            # every token one of three, and scores computed exactly in any precision (dyadic inputs and
            # weights; the first layer's outputs >= 10, where GELU(z) = z in fp32 and fp64): equal tokens
            # tie exactly, and different ones often do too
            pick = torch.randint(0, min(3, n), (case["b"], n), generator=gen)
            x = (dyadic(x) + 3)[torch.arange(case["b"]).unsqueeze(1), pick] / 2
            ref.fc1.weight.copy_(dyadic(ref.fc1.weight).abs())
            ref.fc1.bias.fill_(10.0)
            ref.fc2.weight.copy_(dyadic(ref.fc2.weight * 4, 1.0) / 8)
            ref.fc2.bias.copy_(-10.0 * ref.fc2.weight.sum(1))  # scores near 0, where the gates σ(s) are not flat
    dtype = DTYPES[case["dtype"]]
    fast = twin(ref, dtype)
    mix = randn(gen, d, d).to(dtype) / d**0.5

    def fn(sel):
        # depends on every selected token and on their order (CLS first, the others ascending)
        return torch.tanh(sel @ mix.to(sel.dtype)) + 0.1 * sel.cumsum(dim=1)

    def call(m, x):
        return pure(m, laid_out(x, case["layout"]), fn)

    tol_fwd, tol_grad = tolerances(backend)
    differential(ref, fast, call, [x.to(dtype)], mode=case["mode"], training=True, tol_fwd=tol_fwd,
                 tol_grad=tol_grad, seed=case["seed"])
    with torch.no_grad():
        idx_f, gate_f = fast.select(x.to(dtype))
        idx_r, gate_r = copy.deepcopy(ref).double().select(x)
    assert torch.equal(idx_f, idx_r), f"selection differs: {idx_f.tolist()} vs {idx_r.tolist()}"
    close(gate_f, gate_r, tol_fwd, "skip gates")


@settings(max_examples=examples(60))
@given(case=skip_cases())
def test_skip_router_torch(case):
    """nn.SkipRouter selects the reference's tokens (ties, CLS) and merges like it, on the torch fallback."""
    with cpu_gemms(case["gemm"]):
        check_skip(case, "torch")


@needs_interpreter
@settings(max_examples=examples(8))
@given(case=skip_cases(tiny=True))
def test_skip_router_triton(case):
    """The same property on the Triton kernels (interpreter; inference runs the fused selection)."""
    check_skip(case, "triton")


# ------------------------------------------------------------------------------------------------------
# GatedSpecialistAdapter
# ------------------------------------------------------------------------------------------------------


@st.composite
def specialist_cases(draw, tiny: bool = False):
    rank = draw(st.sampled_from([2, 3, 4]))
    return dict(
        d=draw(st.integers(3, 24 if tiny else 40)), gate=draw(st.sampled_from(["expert", "channel"])),
        bottlenecks=tuple(draw(st.lists(st.integers(1, 12 if tiny else 24), min_size=1, max_size=4))),
        scales=draw(st.sampled_from(["shared", "own"])),
        shape=tuple(draw(st.integers(1, 3 if tiny else 4)) for _ in range(rank - 1)),
        layout=draw(st.sampled_from(LAYOUTS)), mode=draw(st.sampled_from(MODES)), training=draw(st.booleans()),
        dtype=draw(st.sampled_from(["fp32"] if tiny else ["fp32", "fp64"])), seed=draw(st.integers(0, 2**16)),
        gemm=draw(st.sampled_from(GEMMS[:1] if tiny else GEMMS)),
    )


def check_specialist(case: dict, backend: str) -> None:
    use(backend)
    d = case["d"]
    ref = randomize_(reference.GatedSpecialistAdapter(d, case["bottlenecks"], case["gate"]), std=0.3,
                     seed=case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        for i, e in enumerate(ref.experts):
            e.layer_norm.bias.normal_(0.0, 0.5, generator=gen)  # LayerNorm shifts the folding must carry
            if case["scales"] == "own":
                e.scale = 0.1 * (i + 1)
    dtype = DTYPES[case["dtype"]]
    fast = twin(ref, dtype)
    h = randn(gen, *case["shape"], d).to(dtype)

    def call(m, h):
        return pure(m, laid_out(h, case["layout"]))

    tol_fwd, tol_grad = tolerances(backend)
    differential(ref, fast, call, [h], mode=case["mode"], training=case["training"], tol_fwd=tol_fwd,
                 tol_grad=tol_grad, seed=case["seed"])


@settings(max_examples=examples(50))
@given(case=specialist_cases())
def test_gated_specialist_adapter_torch(case):
    """nn.GatedSpecialistAdapter (gate "expert"/"channel") equals the reference on the torch fallback."""
    with cpu_gemms(case["gemm"]):
        check_specialist(case, "torch")


@needs_interpreter
@settings(max_examples=examples(8))
@given(case=specialist_cases(tiny=True))
def test_gated_specialist_adapter_triton(case):
    """The same property on the Triton kernels (interpreter), tiny shapes."""
    check_specialist(case, "triton")


# ------------------------------------------------------------------------------------------------------
# PatchEmbed3D
# ------------------------------------------------------------------------------------------------------


@st.composite
def patch_cases(draw, tiny: bool = False):
    patch = tuple(draw(st.integers(1, 3 if tiny else 4)) for _ in range(3))
    grid = tuple(draw(st.integers(1, 2 if tiny else 3)) for _ in range(3))
    volume_grid = grid if draw(st.booleans()) else tuple(draw(st.integers(1, 3)) for _ in range(3))
    return dict(
        patch=patch if draw(st.booleans()) or len(set(patch)) > 1 else patch[0],
        img=tuple(p * g for p, g in zip(patch, grid)), volume=tuple(p * g for p, g in zip(patch, volume_grid)),
        in_chans=draw(st.integers(1, 3)), embed_dim=draw(st.integers(3, 16 if tiny else 24)),
        batch=draw(st.integers(1, 2 if tiny else 3)), input=draw(st.sampled_from(["uint8", "float"])),
        layout=draw(st.sampled_from(["contiguous", "permuted", "strided"])), mode=draw(st.sampled_from(MODES)),
        dtype=draw(st.sampled_from(["fp32"] if tiny else ["fp32", "fp64"])), seed=draw(st.integers(0, 2**16)),
        gemm=draw(st.sampled_from(GEMMS[:1] if tiny else GEMMS)),
    )


def volume_laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "permuted":  # channels-last-3d style strides
        return x.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
    if layout == "strided":
        return torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]
    return x


def check_patch(case: dict, backend: str) -> None:
    use(backend)
    ref = randomize_(reference.PatchEmbed3D(case["img"], case["patch"], case["in_chans"], case["embed_dim"]),
                     std=0.3, seed=case["seed"])
    dtype = DTYPES[case["dtype"]]
    fast = twin(ref, dtype)
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["in_chans"], *case["volume"])
    if case["input"] == "uint8":
        x = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    else:
        x = randn(gen, *shape).to(dtype)

    def call(m, x):
        return pure(m, volume_laid_out(x, case["layout"]))

    tol_fwd, tol_grad = tolerances(backend)
    differential(ref, fast, call, [x], mode=case["mode"], training=True, tol_fwd=tol_fwd, tol_grad=tol_grad,
                 seed=case["seed"])


@settings(max_examples=examples(50))
@given(case=patch_cases())
def test_patch_embed3d_torch(case):
    """nn.PatchEmbed3D (C++ patchify + GEMM) equals the Conv3d reference for any divisible geometry."""
    with cpu_gemms(case["gemm"]):
        check_patch(case, "torch")


@needs_interpreter
@settings(max_examples=examples(8))
@given(case=patch_cases(tiny=True))
def test_patch_embed3d_triton(case):
    """The same property on the Triton kernel (interpreter), tiny volumes."""
    check_patch(case, "triton")
