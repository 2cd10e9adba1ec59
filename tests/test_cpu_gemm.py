"""fp32 CPU Linear through oneDNN (mosaic_fast.ops.cpu_gemm): parity with F.linear against float64,
forward and backward, the fused GELU, the non-differentiable products, and every fallback condition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mosaic_fast import reference
from mosaic_fast.nn import convert
from mosaic_fast.ops import cpu_gemm

pytestmark = pytest.mark.usefixtures("onednn_library")  # the oneDNN path, whatever the CPU (conftest)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert b.norm() > 1e-3, "reference too small to compare"
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(37, 48), (3, 29, 48)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_forward_backward_match_float64(shape, with_bias, onednn_calls):
    x = torch.randn(*shape, requires_grad=True)
    w = (torch.randn(80, 48) / 7).requires_grad_()
    b = torch.randn(80, requires_grad=True) if with_bias else None
    out = cpu_gemm.linear(x, w, b)
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [t for t in (x, w, b) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = F.linear(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None)
    ref.backward(grad.double())
    assert rel(out, ref) <= 1e-5
    for mine, theirs in zip(leaves, ref_leaves):
        assert rel(mine.grad, theirs.grad) <= 1e-4
    assert len(onednn_calls) == 3  # forward, grad_x, grad_w


def test_linear_output_may_be_modified_in_place_under_autograd():
    x = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    out = cpu_gemm.linear(x, w).relu_()
    out.sum().backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.linear(xr, wr).relu().sum().backward()
    assert rel(x.grad, xr.grad) <= 1e-4 and rel(w.grad, wr.grad) <= 1e-4


def test_linear_double_backward_matches_float64(onednn_calls):
    """A gradient penalty (the gradient's own gradient) goes through oneDNN and equals F.linear's."""
    x, w = torch.randn(5, 2, 12), torch.randn(7, 12) / 3
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    for xi, wi, fn in ((xs, ws, cpu_gemm.linear), (xr, wr, F.linear)):
        (gx,) = torch.autograd.grad(fn(xi, wi).pow(2).sum(), xi, create_graph=True)
        gx.pow(2).sum().backward()
    assert rel(xs.grad, xr.grad) <= 1e-4 and rel(ws.grad, wr.grad) <= 1e-4
    assert len(onednn_calls) >= 4


def test_torch_func_transforms_use_f_linear(onednn_calls):
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    got = torch.func.grad(lambda w: cpu_gemm.linear(x, w).pow(2).sum())(w)
    want = torch.func.grad(lambda w: F.linear(x, w).pow(2).sum())(w)
    assert torch.equal(got, want) and onednn_calls == []


def test_linear_non_contiguous_input_and_inference_mode(onednn_calls):
    x = torch.randn(48, 37).t()
    w, b = torch.randn(20, 48), torch.randn(20)
    with torch.inference_mode():
        out = cpu_gemm.linear(x, w, b)
    assert rel(out, F.linear(x.double(), w.double(), b.double())) <= 1e-5
    assert onednn_calls == ["none"]


def test_linear_gelu_fuses_without_grad_and_differentiates_with_grad(onednn_calls):
    x, w, b = torch.randn(4, 33, 24), torch.randn(96, 24) / 5, torch.randn(96) / 5
    ref = F.gelu(F.linear(x.double(), w.double(), b.double()))
    with torch.no_grad():
        fused = cpu_gemm.linear_gelu(x, w, b)
    assert rel(fused, ref) <= 1e-5
    assert onednn_calls == ["gelu"]
    xg = x.clone().requires_grad_()
    out = cpu_gemm.linear_gelu(xg, w, b)
    out.sum().backward()
    xr = x.double().requires_grad_()
    F.gelu(F.linear(xr, w.double(), b.double())).sum().backward()
    assert rel(out, ref) <= 1e-5 and rel(xg.grad, xr.grad) <= 1e-4
    assert onednn_calls[1:] == ["none", "none"]  # forward and grad_x, GELU in torch


@pytest.mark.parametrize("act", [torch.nn.GELU(), torch.nn.GELU(approximate="tanh"), torch.nn.ReLU()])
def test_linear_act_fuses_only_the_exact_gelu(act, onednn_calls):
    x, w, b = torch.randn(2, 9, 16), torch.randn(24, 16) / 4, torch.randn(24) / 4
    with torch.no_grad():
        got = cpu_gemm.linear_act(x, w, b, act)
    assert rel(got, act(F.linear(x.double(), w.double(), b.double()))) <= 1e-5
    assert onednn_calls == (["gelu"] if isinstance(act, torch.nn.GELU) and act.approximate == "none" else ["none"])


def test_linear_gelu_on_mkl_is_f_gelu_of_f_linear_bitwise():
    """Without gradients MKL's product is finished by an in-place GELU: the same values as the two-step
    form, under autocast too (which keeps the out-of-place GELU)."""
    x, w, b = torch.randn(3, 17, 24), torch.randn(96, 24) / 5, torch.randn(96) / 5
    with cpu_gemm.cpu_gemm_library("mkl"), torch.no_grad():
        assert torch.equal(cpu_gemm.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = cpu_gemm.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("library", ["mkl", "onednn"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 0.1])
def test_add_linear_matches_float64_and_leaves_base_alone(library, with_bias, alpha, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "MIN_ONEDNN_MACS", 0)
    x, w = torch.randn(2, 13, 24), torch.randn(40, 24) / 5
    b = torch.randn(40) / 5 if with_bias else None
    base = torch.randn(2, 40, 13).transpose(1, 2)  # strided: the result must still be a plain tensor
    kept = base.clone()
    with cpu_gemm.cpu_gemm_library(library), torch.no_grad():
        got = cpu_gemm.add_linear(base, x, w, b, alpha=alpha)
    want = base.double() + alpha * F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == base.shape and rel(got, want) <= 1e-6
    assert torch.equal(base, kept)


@pytest.mark.parametrize("library", ["mkl", "onednn"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_add_linear_sums_into_a_reused_base_only_when_it_may(library, with_bias, monkeypatch):
    """``reuse_base``: without gradients the sum is formed in the caller's contiguous temporary itself; a
    strided base, or a recorded gradient, gets a new tensor and the base is left alone."""
    monkeypatch.setattr(cpu_gemm, "MIN_ONEDNN_MACS", 0)
    x, w = torch.randn(2, 13, 24), torch.randn(40, 24) / 5
    b = torch.randn(40) / 5 if with_bias else None

    def want(base, x):
        return base.double() + 0.1 * F.linear(x.double(), w.double(), None if b is None else b.double())

    base = torch.randn(2, 13, 40)
    expected = want(base, x)
    strided = torch.randn(2, 40, 13).transpose(1, 2)
    kept = strided.clone()
    with cpu_gemm.cpu_gemm_library(library):
        with torch.no_grad():
            got = cpu_gemm.add_linear(base, x, w, b, alpha=0.1, reuse_base=True)
            assert got.data_ptr() == base.data_ptr() and rel(got, expected) <= 1e-6
            got = cpu_gemm.add_linear(strided, x, w, b, alpha=0.1, reuse_base=True)
            assert torch.equal(strided, kept) and rel(got, want(strided, x)) <= 1e-6
        x.requires_grad_()
        base = torch.randn(2, 13, 40)
        kept = base.clone()
        got = cpu_gemm.add_linear(base, x, w, b, alpha=0.1, reuse_base=True)
    assert got.requires_grad and torch.equal(base, kept) and rel(got, want(base, x)) <= 1e-6


def test_add_linear_differentiates_and_broadcasts_like_the_two_step_form():
    x, w, b = torch.randn(5, 24, requires_grad=True), torch.randn(40, 24, requires_grad=True), torch.randn(40)
    base = torch.randn(5, 40, requires_grad=True)
    with cpu_gemm.cpu_gemm_library("mkl"):
        cpu_gemm.add_linear(base, x, w, b, alpha=0.5).pow(2).sum().backward()
        row = torch.randn(40)  # a base broadcast over the rows
        with torch.no_grad():
            broadcast = cpu_gemm.add_linear(row, x, w, b)
    refs = [t.detach().double().requires_grad_() for t in (base, x, w)]
    (refs[0] + 0.5 * F.linear(refs[1], refs[2], b.double())).pow(2).sum().backward()
    for mine, theirs in zip((base, x, w), refs):
        assert rel(mine.grad, theirs.grad) <= 1e-5
    assert rel(broadcast, row.double() + F.linear(x.double(), w.double(), b.double())) <= 1e-6


def test_mm_and_addmm_match_float64(onednn_calls):
    a, wt, bias = torch.randn(50, 24), torch.randn(16, 24), torch.randn(16)
    got = cpu_gemm.addmm(bias, a, wt.t())
    assert rel(got, torch.addmm(bias.double(), a.double(), wt.t().double())) <= 1e-5
    b = torch.randn(24, 31)  # a row-major right operand (its transpose is the strided one)
    assert rel(cpu_gemm.mm(a, b), a.double() @ b.double()) <= 1e-5
    c = torch.randn(50, 7)
    assert rel(cpu_gemm.mm(a.t(), c), a.t().double() @ c.double()) <= 1e-5  # transposed left operand
    assert len(onednn_calls) == 3


def test_column_slices_are_multiplied_correctly(onednn_calls):
    """Operands that are neither row- nor column-major (a group's columns of a packed weight) are copied
    to a dense layout first (the spy checks every operand's layout)."""
    packed, z = torch.randn(40, 64 + 96), torch.randn(30, 96)
    got = cpu_gemm.addmm(None, z, packed[:, 64:].t())
    assert rel(got, z.double() @ packed[:, 64:].t().double()) <= 1e-5
    x, w = torch.randn(12, 2 * 40)[:, 40:], packed[:, :40]
    assert rel(cpu_gemm.linear(x, w), F.linear(x.double(), w.double())) <= 1e-5
    assert len(onednn_calls) == 2


@pytest.mark.parametrize(
    "case", ["float64", "bfloat16", "autocast", "compiling", "mkl", "mkldnn-off", "empty", "vector"]
)
def test_fallbacks_run_plain_torch(case, onednn_calls, monkeypatch):
    x, w, b = torch.randn(6, 12), torch.randn(5, 12), torch.randn(5)
    if case in ("float64", "bfloat16"):
        dtype = getattr(torch, case)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    if case == "mkl":
        monkeypatch.setattr(cpu_gemm, "_library", "onednn")
        cpu_gemm.set_cpu_gemm("mkl")
    if case == "empty":
        x = x[:0]
    if case == "vector":
        x = x[0]
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = cpu_gemm.linear(x, w, b), F.linear(x, w, b)
        assert out.dtype == torch.bfloat16
    elif case == "mkldnn-off":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        assert not cpu_gemm.onednn_enabled()
        out, ref = cpu_gemm.linear(x, w, b), F.linear(x, w, b)
    else:
        out, ref = cpu_gemm.linear(x, w, b), F.linear(x, w, b)
    assert torch.equal(out, ref)
    assert onednn_calls == []


def test_small_products_stay_on_f_linear(onednn_calls, monkeypatch):
    """Up to MIN_ONEDNN_MACS multiply-adds MKL's lower call overhead wins: plain F.linear."""
    monkeypatch.setattr(cpu_gemm, "MIN_ONEDNN_MACS", 1000)
    w = torch.randn(5, 10)
    small, large = torch.randn(20, 10), torch.randn(21, 10)  # 1,000 and 1,050 multiply-adds
    assert torch.equal(cpu_gemm.linear(small, w), F.linear(small, w)) and onednn_calls == []
    assert rel(cpu_gemm.linear(large, w), F.linear(large.double(), w.double())) <= 1e-5
    assert onednn_calls == ["none"]
    assert rel(cpu_gemm.mm(small, w.t()), small.double() @ w.t().double()) <= 1e-5 and len(onednn_calls) == 1


def test_set_cpu_gemm_rejects_unknown_library(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_library", "onednn")
    with pytest.raises(ValueError, match="library must be one of"):
        cpu_gemm.set_cpu_gemm("openblas")
    cpu_gemm.set_cpu_gemm("mkl")
    assert not cpu_gemm.onednn_enabled()
    cpu_gemm.set_cpu_gemm("onednn")
    assert cpu_gemm.onednn_enabled()


def test_fast_vit_block_runs_its_linears_through_onednn(onednn_calls):
    """The fast Attention and Mlp (the frozen backbone, ~70 % of a CPU forward) take the oneDNN path,
    with the GELU fused into fc1, and still equal the reference."""
    torch.manual_seed(0)
    ref_attn, ref_mlp = reference.Attention(48, num_heads=4), reference.Mlp(48, 96)
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        want = ref_mlp(x + ref_attn(x))
        fast_attn, fast_mlp = convert(ref_attn), convert(ref_mlp)
        got = fast_mlp(x + fast_attn(x))
    assert rel(got, want.double()) <= 1e-5
    assert sorted(onednn_calls) == ["gelu", "none", "none", "none"]  # qkv, proj, fc1+GELU, fc2


@pytest.mark.parametrize("routing", ["letter", "mixed"])
def test_fast_adapter_fallback_gemms_run_through_onednn(routing, onednn_calls):
    """The adapter's CPU fallback (one specialist: autograd through Linear; mixed: the hand-written
    forward and backward) multiplies through oneDNN, forward and backward, and matches the reference."""
    torch.manual_seed(1)
    ref = reference.MoSAdapter(32, 8, 12, 16, init_option="bert")
    fast = convert(reference.MoSAdapter(32, 8, 12, 16, init_option="bert"))
    fast.load_state_dict(ref.state_dict())
    h = torch.randn(3, 7, 32)
    ids = "B" if routing == "letter" else torch.tensor([2, 0, 2])
    hr, hf = h.clone().requires_grad_(), h.clone().requires_grad_()
    want, got = ref(hr, ids), fast(hf, ids)
    g = torch.randn_like(want)
    want.backward(g)
    calls_forward = len(onednn_calls)
    got.backward(g)
    assert rel(got, want) <= 1e-5 and rel(hf.grad, hr.grad) <= 1e-4
    assert calls_forward >= 2 and len(onednn_calls) > calls_forward


def test_fast_patch_embed3d_projects_through_onednn(onednn_calls):
    torch.manual_seed(2)
    ref = reference.PatchEmbed3D(img_size=16, patch_size=(4, 8, 8), embed_dim=24)
    fast = convert(reference.PatchEmbed3D(img_size=16, patch_size=(4, 8, 8), embed_dim=24))
    fast.load_state_dict(ref.state_dict())
    vol = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert rel(fast(vol), ref(vol)) <= 1e-5
    assert onednn_calls == ["none"]


@pytest.mark.parametrize(("capability", "library"), [("AVX512", "onednn"), ("AVX2", "mkl"), ("DEFAULT", "mkl")])
def test_default_library_follows_the_cpu_capability(capability, library, monkeypatch):
    """oneDNN by default only where torch runs AVX-512 kernels (on AVX2 its GEMMs lost to MKL's)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_gemm.default_library() == library
