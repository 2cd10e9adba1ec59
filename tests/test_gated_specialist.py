"""M4oE gated specialists: fast (one concatenated adapter, folded LayerNorms) vs reference."""

import copy

import pytest
import torch
from parity import TOL_CPU_FWD, TOL_CPU_GRAD, TOL_CUDA_TF32, TOL_INTERPRETER, assert_parity, randomize_

from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.ops import cpu_gemm

D = 32
BOTTLENECKS = (8, 12, 24)


def make(gate):
    ref = randomize_(reference.GatedSpecialistAdapter(D, BOTTLENECKS, gate), std=0.2, seed=2)
    with torch.no_grad():  # LayerNorm affines far from identity so the folding is exercised
        for e in ref.experts:
            e.layer_norm.weight.uniform_(0.5, 1.5)
            e.layer_norm.bias.normal_(0.0, 0.5)
    return ref, fast_nn.convert(copy.deepcopy(ref))


def triton_tol(device):
    """Triton kernels against a reference: the interpreter's bound on CPU, the CUDA one when compiled."""
    return TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32


def run(module, h, grad):
    module.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_()
    out = module(h)
    out.backward(grad)
    return [out, h.grad, *(p.grad for p in module.parameters())]


def check(ref, fast, h, tol_f, tol_g):
    grad = torch.randn_like(h)
    want = run(copy.deepcopy(ref).double().to(h.device), h.double(), grad.double())
    got = run(fast.to(h.device), h, grad)
    assert_parity(got[0], want[0], tol_f, "output")
    names = ["h", *(n for n, _ in ref.named_parameters())]
    for name, g, w in zip(names, got[1:], want[1:]):
        assert_parity(g, w, tol_g, f"grad {name}")


@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_parity_torch(gate):
    ref, fast = make(gate)
    check(ref, fast, torch.randn(2, 5, D), TOL_CPU_FWD, TOL_CPU_GRAD)


@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_parity_triton(triton_backend, gate):
    ref, fast = make(gate)
    tol = triton_tol(triton_backend)
    check(ref, fast, torch.randn(1, 19, D, device=triton_backend), tol, tol)


def make_own_scales_and_eps(gate):
    """Experts with their own scalars and a LayerNorm eps (1e-2) that matters for the small inputs below
    (per-row variance ~2.5e-3: eps = 1e-5 instead would change LN(h) by ~2.2x)."""
    ref, fast = make(gate)
    for m in (ref, fast):
        for e, s in zip(m.experts, (0.1, 0.7, 1.3)):
            e.scale = s
            e.layer_norm.eps = 1e-2
    return ref, fast


@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_own_scales_and_eps_torch(gate):
    ref, fast = make_own_scales_and_eps(gate)
    check(ref, fast, torch.randn(2, 5, D) * 0.05, TOL_CPU_FWD, TOL_CPU_GRAD)


@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_own_scales_and_eps_triton(triton_backend, gate):
    ref, fast = make_own_scales_and_eps(gate)
    tol = triton_tol(triton_backend)
    check(ref, fast, torch.randn(1, 7, D, device=triton_backend) * 0.05, tol, tol)


def test_single_token_and_fp16_interpreter(triton_backend):
    ref, fast = make("expert")
    fast.to(triton_backend)
    h = torch.randn(1, 1, D, device=triton_backend)
    with torch.no_grad():
        assert_parity(fast(h), ref.to(triton_backend)(h), triton_tol(triton_backend))
        got = copy.deepcopy(fast).half()(h.half()).float()
    assert_parity(got, ref(h), 5e-3, "fp16")


@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_inference_folds_once_and_follows_weight_updates(monkeypatch, gate):
    """Inference keeps the folded weights between calls; an in-place update refolds; with gradients the
    fold is recomputed every call (and differentiable)."""
    ref, fast = make(gate)
    folds = [0]
    real = fast._fold

    def counted():
        folds[0] += 1
        return real()

    monkeypatch.setattr(fast, "_fold", counted)
    h = torch.randn(2, 5, D)
    with torch.no_grad():
        assert_parity(fast(h), ref(h), TOL_CPU_FWD)
        fast(h)
        assert folds[0] == 1
        for m in (ref, fast):
            m.expert_b.down_proj.weight.mul_(-1.5)
            m.expert_c.layer_norm.bias.add_(0.3)
        assert_parity(fast(h), ref(h), TOL_CPU_FWD, "after an in-place update")
        assert folds[0] == 2
    fast(h.requires_grad_()).sum().backward()
    fast(h).sum().backward()
    assert folds[0] == 4 and fast.expert_a.up_proj.weight.grad is not None


@pytest.mark.parametrize("library", ["mkl", "onednn"])
@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_inference_finishing_in_place_matches_float64(monkeypatch, library, gate):
    """Without gradients the torch path finishes its GEMM outputs in place (ReLU and unit scales on the
    hidden product, the up-projection summed into the bias term, the channel weights): the reference's
    function in float64, on either CPU GEMM library, with the input left alone."""
    monkeypatch.setattr(cpu_gemm, "MIN_ONEDNN_MACS", 0)
    ref, fast = make(gate)
    h = torch.randn(3, 7, D)
    kept = h.clone()
    with cpu_gemm.cpu_gemm_library(library), torch.no_grad():
        got = fast(h)
        want = copy.deepcopy(ref).double()(h.double())
    assert_parity(got, want, TOL_CPU_FWD)
    assert torch.equal(h, kept)


def test_load_from_mos_adapter():
    mos = randomize_(reference.MoSAdapter(D, *BOTTLENECKS), seed=4)
    gated = reference.GatedSpecialistAdapter.from_mos_adapter(mos)
    h = torch.randn(3, D)
    with torch.no_grad():
        # zero gate -> uniform mixture of the three trained specialists
        want = sum(mos(h, e) for e in ("A", "B", "C")) / 3
        assert_parity(gated(h), want, TOL_CPU_FWD)
        assert_parity(fast_nn.convert(gated)(h), want, TOL_CPU_FWD)
    assert set(gated.state_dict()) >= {f"expert_{c}.down_proj.weight" for c in "abc"}
    with pytest.raises(ValueError, match="bottleneck"):
        reference.GatedSpecialistAdapter(D, (8, 8, 8)).load_specialists(mos)
    with pytest.raises(TypeError, match="MoSAdapter"):
        reference.GatedSpecialistAdapter(D).load_specialists(torch.nn.Linear(2, 2))


def test_dropout_training_falls_back_to_reference():
    ref = reference.GatedSpecialistAdapter(D, BOTTLENECKS, dropout=0.5)
    fast = fast_nn.convert(copy.deepcopy(randomize_(ref, seed=5)))
    fast.train()
    torch.manual_seed(0)
    a = fast(torch.ones(2, D))
    torch.manual_seed(0)
    b = ref.train()(torch.ones(2, D))
    assert torch.equal(a, b)


def test_opcheck():
    _, fast = make("channel")
    h = torch.randn(4, D)
    r = sum(BOTTLENECKS)
    args = (h.requires_grad_(), torch.randn(r, D, requires_grad=True), torch.randn(r, requires_grad=True),
            fast._unit_expert(h.device), torch.rand(4, 3, requires_grad=True), torch.randn(D, r, requires_grad=True),
            torch.randn(3, D, requires_grad=True), torch.rand(4, D, requires_grad=True), 1e-5)
    torch.library.opcheck(torch.ops.mosaic_fast.gated_specialist.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_input():
    _, fast = make("expert")
    with pytest.raises(ValueError, match="h"):
        fast(torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="gate"):
        reference.GatedSpecialistAdapter(D, gate="token")


def test_cuda(cuda_device):
    for gate in ("expert", "channel"):
        ref, fast = make(gate)
        check(ref, fast, torch.randn(4, 50, D, device=cuda_device), TOL_CUDA_TF32, TOL_CUDA_TF32)


@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_reference_equals_design_formula(gate):
    """DESIGN.md §3 (not fast vs reference): "expert": Σ_e softmax(W_g h)_e · adapter_e(h) with each
    specialist's own LayerNorm and scale; "channel": softmax over the D channels of Linear(D, D)(h) times
    Σ_e adapter_e(h)."""
    ref, _ = make(gate)
    ref = ref.double()
    ref.expert_b.scale = 0.3  # per-expert scaling
    h = torch.randn(2, 5, D, dtype=torch.float64)

    def adapter(e):
        ln = torch.nn.functional.layer_norm(h, (D,), e.layer_norm.weight, e.layer_norm.bias, 1e-5)
        return e.scale * (torch.relu(ln @ e.down_proj.weight.T + e.down_proj.bias) @ e.up_proj.weight.T
                          + e.up_proj.bias)

    outs = [adapter(e) for e in ref.experts]
    logits = h @ ref.gate.weight.T + ref.gate.bias
    if gate == "expert":
        assert logits.shape[-1] == 3
        want = sum(torch.softmax(logits, -1)[..., e, None] * outs[e] for e in range(3))
    else:
        assert logits.shape[-1] == D
        want = torch.softmax(logits, -1) * sum(outs)
    with torch.no_grad():
        torch.testing.assert_close(ref(h), want, rtol=1e-12, atol=1e-12)
