"""DESIGN.md §5's routing edge cases that no other file checked end to end (session 22's conformance audit):

* ties in top-k, forward AND backward (parameter gradients included), on the torch fallback and on the
  Triton kernels, for the DynaMer expert router (all scores tied, and ties across the k-th place) and the
  skip router (all token scores tied);
* k = 0: every entry point that takes k, ρ or a selection of k tokens refuses k = 0 with an error naming the
  argument (DESIGN.md §7: "k or ρ out of range"), in the reference and in the fast module alike;
* a batch of one dataset only routed by an id tensor (all ids equal) through the grouped kernels, forward
  and backward, equals the reference's letter routing.

Every comparison is against the float64 reference module on fresh random inputs and parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity import TOL_CPU_FWD, TOL_CPU_GRAD, TOL_CUDA_TF32, TOL_INTERPRETER, assert_parity, randomize_

import mosaic_fast
from mosaic_fast import nn as fast_nn
from mosaic_fast import reference

D = 32


@pytest.fixture(params=["torch", "triton"])
def device(request) -> str:
    """'torch': the fallback on CPU; 'triton': the kernels (interpreter on CPU, compiled on CUDA)."""
    if request.param == "triton":
        return request.getfixturevalue("triton_backend")
    mosaic_fast.set_backend("torch")
    return "cpu"


def tolerances(device: str) -> tuple[float, float]:
    """(forward, gradient) bounds of DESIGN.md §5 for the active backend."""
    if mosaic_fast.get_backend() == "torch":
        return TOL_CPU_FWD, TOL_CPU_GRAD
    tol = TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32
    return tol, tol


def forward_backward(module: torch.nn.Module, call, inputs: list[torch.Tensor], grads: list[torch.Tensor]):
    """Outputs, input gradients and {parameter name: gradient} of one forward and backward."""
    module.zero_grad(set_to_none=True)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outs = call(module, *leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    torch.autograd.backward(outs, grads)
    return outs, [x.grad for x in leaves], {n: p.grad for n, p in module.named_parameters()}


def check_fast_against_reference(ref: torch.nn.Module, fast: torch.nn.Module, call, inputs: list[torch.Tensor],
                                 device: str) -> None:
    """``fast`` (float32) against the float64 ``ref`` on ``inputs``: outputs, input and parameter gradients.
    A parameter gradient the reference has exactly zero must be zero (or None) in the fast module too."""
    tol_fwd, tol_grad = tolerances(device)
    ref64 = copy.deepcopy(ref).double().to(device)
    with torch.no_grad():
        shapes = [o.shape for o in (lambda o: o if isinstance(o, (tuple, list)) else [o])(
            call(ref64, *[x.double() for x in inputs]))]
    grads = [torch.randn(s, device=device) for s in shapes]
    want = forward_backward(ref64, call, [x.double() for x in inputs], [g.double() for g in grads])
    got = forward_backward(fast, call, inputs, grads)
    for i, (f, r) in enumerate(zip(got[0], want[0])):
        assert_parity(f, r, tol_fwd, f"output {i}")
    for i, (f, r) in enumerate(zip(got[1], want[1])):
        assert_parity(f, r, tol_grad, f"grad of input {i}")
    for name, r in want[2].items():
        f = got[2][name]
        if r is None or not r.any():
            assert f is None or not f.any(), f"{name}: reference gradient is zero, fast is not"
            continue
        assert f is not None, f"{name}: no gradient"
        assert_parity(f, r, tol_grad, f"grad {name}")


# ---------------------------------------------------------------------------------------------------- ties

#: Router biases over 4 experts with a zero router weight: every score tied, or a tie across the k-th place
#: (top-2 of [.3, .7, .3, .3] is expert 1 and then the lowest-indexed of the tied 0, 2, 3).
TIED_ROUTER_BIASES = {"all_tied": [0.25, 0.25, 0.25, 0.25], "tie_at_kth_place": [0.3, 0.7, 0.3, 0.3]}


@pytest.mark.parametrize("case", list(TIED_ROUTER_BIASES))
def test_moe_router_ties_forward_and_backward(device, case):
    """Tied expert scores in both streams go to the lower expert index in the reference and in the fast
    module; outputs and every gradient (routers, gates, experts, both streams) match the float64 reference."""
    ref = randomize_(reference.GatedMoEAdapter(D, 4, 2, 16, D // 2), std=0.2, seed=5)
    with torch.no_grad():
        for router in (ref.router_gen, ref.router_med):
            router.weight.zero_()
            router.bias.copy_(torch.tensor(TIED_ROUTER_BIASES[case]))
    fast = fast_nn.convert(copy.deepcopy(ref)).to(device)
    x_gen, x_med = (torch.randn(2, 5, D, device=device) for _ in range(2))
    index, _ = ref.route(x_gen.cpu(), 0)
    want_experts = [0, 1] if case == "all_tied" else [1, 0]
    assert torch.equal(index, torch.tensor(want_experts).expand(2, 5, 2))
    check_fast_against_reference(ref, fast, lambda m, a, b: m(a, b), [x_gen, x_med], device)


def test_moe_router_ties_in_forward_skip(device):
    """The same tie, through the skip path (a selection of tokens per stream), forward and backward."""
    ref = randomize_(reference.GatedMoEAdapter(D, 4, 2, 16, D), std=0.2, seed=6)
    with torch.no_grad():
        for router in (ref.router_gen, ref.router_med):
            router.weight.zero_()
            router.bias.fill_(0.5)
    fast = fast_nn.convert(copy.deepcopy(ref)).to(device)
    idx_gen = torch.tensor([[0, 2, 3], [0, 1, 4]], device=device)
    idx_med = torch.tensor([[0, 4], [0, 3]], device=device)

    def call(m, a, b):
        gate_gen = torch.sigmoid(torch.linspace(-1, 1, 6, dtype=a.dtype, device=a.device)).view(2, 3)
        gate_med = torch.sigmoid(torch.linspace(1, -1, 4, dtype=a.dtype, device=a.device)).view(2, 2)
        return m.forward_skip(a, b, idx_gen, gate_gen, idx_med, gate_med)

    check_fast_against_reference(ref, fast, call, [torch.randn(2, 5, D, device=device) for _ in range(2)], device)


def _update(x_sel: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x_sel) * 2.0 + x_sel.mean(dim=1, keepdim=True)


def test_skip_router_ties_forward_and_backward(device):
    """Every token score tied (zero output weight): CLS then the lowest token indices are kept, and the fast
    router's output and gradients (x, both layers; fc1's is exactly zero) equal the float64 reference's."""
    ref = randomize_(reference.SkipRouter(D, 0.5), std=0.2, seed=7)
    with torch.no_grad():
        ref.fc2.weight.zero_()
    fast = fast_nn.convert(copy.deepcopy(ref)).to(device)
    x = torch.randn(2, 7, D, device=device)
    with torch.no_grad():
        assert torch.equal(ref.select(x.cpu())[0], torch.tensor([[0, 1, 2, 3]] * 2))
    check_fast_against_reference(ref, fast, lambda m, t: m(t, _update), [x], device)


# ---------------------------------------------------------------------------------------------------- k = 0


@pytest.mark.parametrize("fast", [False, True])
def test_k_zero_is_refused_naming_the_argument(device, fast):
    """k = 0 experts, ρ = 0, or an empty (B, 0) token selection: a ValueError naming the argument, from the
    reference and the fast modules alike (never an empty launch or a silently unchanged stream)."""
    with pytest.raises(ValueError, match="top_k"):
        reference.GatedMoEAdapter(D, 4, 0, 16, D)
    with pytest.raises(ValueError, match="keep_ratio"):
        reference.SkipRouter(D, 0.0)
    moe = reference.GatedMoEAdapter(D, 4, 2, 16, D)
    router = reference.SkipRouter(D, 0.5)
    if fast:
        moe, router = fast_nn.convert(moe).to(device), fast_nn.convert(router).to(device)
        with pytest.raises(ValueError, match="keep_ratio"):
            router.keep_ratio = 0.0
    x = torch.randn(2, 5, D, device=device)
    none = torch.zeros(2, 0, dtype=torch.long, device=device)
    one = torch.zeros(2, 1, dtype=torch.long, device=device)
    gates_none, gates_one = torch.ones(2, 0, device=device), torch.ones(2, 1, device=device)
    with pytest.raises(ValueError, match="idx_gen"):
        moe.forward_skip(x, x, none, gates_none, one, gates_one)
    with pytest.raises(ValueError, match="idx_med"):
        moe.forward_skip(x, x, one, gates_one, none, gates_none)
    with pytest.raises(ValueError, match="idx_x"):
        router.merge(x, none, gates_none, torch.randn(2, 0, D, device=device))


# ---------------------------------------------------------------------------------------------------- one dataset


@pytest.mark.parametrize("expert", [0, 1, 2])
def test_batch_of_one_specialist_by_id_tensor(device, expert):
    """A batch whose id tensor names one specialist only (one dataset) runs the grouped path and equals the
    reference's letter routing, forward and backward (the absent specialists get no gradient)."""
    ref = randomize_(reference.MoSAdapter(D, 8, 12, 16), std=0.2, seed=8)
    fast = fast_nn.convert(copy.deepcopy(ref)).to(device)
    ids = torch.full((3,), expert, dtype=torch.long, device=device)
    letter = "ABC"[expert]
    h, base = torch.randn(3, 4, D, device=device), torch.randn(3, 4, D, device=device)
    grad = torch.randn(3, 4, D, device=device)
    want = forward_backward(copy.deepcopy(ref).double().to(device), lambda m, a, b: b + m(a, letter),
                            [h.double(), base.double()], [grad.double()])
    got = forward_backward(fast, lambda m, a, b: m.forward_fused(a, b, ids), [h, base], [grad])
    tol_fwd, tol_grad = tolerances(device)
    assert_parity(got[0][0] - base, want[0][0] - base.double(), tol_fwd, "adapter output")
    for i in range(2):
        assert_parity(got[1][i], want[1][i], tol_grad, f"grad of input {i}")
    for name, r in want[2].items():
        f = got[2][name]
        if r is None:  # another specialist: untouched by the reference
            assert f is None or not f.any(), f"{name}: absent specialist got a gradient"
        else:
            assert_parity(f, r, tol_grad, f"grad {name}")
