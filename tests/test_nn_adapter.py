"""Drop-in nn.Adapter / nn.MoSAdapter: API and state_dict twins of reference/, parity, fallbacks, compile."""

import copy

import pytest
import torch
from parity import TOL_BF16, TOL_CPU_FWD, TOL_CPU_GRAD, TOL_INTERPRETER, assert_parity, randomize_

import mosaic_fast
from mosaic_fast import nn as fast_nn
from mosaic_fast import reference

D = 32
RS = dict(bottleneck_a=16, bottleneck_b=24, bottleneck_c=48)


def make_pair(seed=0, **kw):
    ref = randomize_(reference.MoSAdapter(d_model=D, **{**RS, **kw}), seed=seed)
    fast = fast_nn.MoSAdapter(d_model=D, **{**RS, **kw})
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def test_same_parameters_and_state_dict_keys():
    ref, fast = make_pair()
    assert isinstance(fast, reference.MoSAdapter)
    assert list(ref.state_dict()) == list(fast.state_dict())
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in fast.named_parameters()]
    assert all(type(e) is fast_nn.Adapter for e in fast.experts)
    a_ref = reference.Adapter(D, 16)
    a_fast = fast_nn.Adapter(D, 16)
    assert list(a_ref.state_dict()) == list(a_fast.state_dict())
    fast.load_state_dict(ref.state_dict(), strict=True)


def test_default_init_outputs_zero_like_reference():
    fast = fast_nn.MoSAdapter(d_model=D, **RS)
    with torch.no_grad():
        out = fast(torch.randn(2, 3, D), torch.tensor([0, 2]))
    assert float(out.abs().max()) == 0.0


@pytest.mark.parametrize("expert_id", ["A", "B", "C", "mixed"])
def test_parity_cpu_forward_and_backward(expert_id):
    ref, fast = make_pair()
    ref = ref.double()
    B, N = 5, 6
    ids = torch.tensor([2, 0, 1, 2, 0]) if expert_id == "mixed" else expert_id
    h = torch.randn(B, N, D) + 0.3
    base = torch.randn(B, N, D)
    hf, bf = h.clone().requires_grad_(), base.clone().requires_grad_()
    hr, br = h.double().requires_grad_(), base.double().requires_grad_()
    out_f = fast.forward_fused(hf, bf, ids)
    out_r = br + ref(hr, ids)
    assert_parity(out_f, out_r, TOL_CPU_FWD)
    assert_parity(fast(h, ids), ref(h.double(), ids), TOL_CPU_FWD, "forward")
    gout = torch.randn_like(out_f)
    out_f.backward(gout)
    out_r.backward(gout.double())
    assert_parity(hf.grad, hr.grad, TOL_CPU_GRAD, "grad h")
    assert_parity(bf.grad, br.grad, TOL_CPU_GRAD, "grad base")
    for (name, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters()):
        if pr.grad is None:
            assert pf.grad is None, f"{name} got a gradient but its specialist was not routed"
        else:
            assert_parity(pf.grad, pr.grad, TOL_CPU_GRAD, f"grad {name}")


@pytest.mark.parametrize("differ", ["scale", "eps", "both"])
def test_specialists_with_different_scale_or_eps_match_the_reference(differ):
    """The grouped op takes one scale and one eps: specialists that differ in either must still compute
    what the reference computes (mixed batch, forward, forward_fused and gradients). h is small (per-row
    variance ~2.5e-3) so that eps = 1e-2 changes the LayerNorm by ~2.2x."""
    ref, fast = make_pair(seed=3)
    for m in (ref, fast):
        if differ in ("scale", "both"):
            m.expert_b.scale = 0.5
        if differ in ("eps", "both"):
            m.expert_c.layer_norm.eps = 1e-2
    ref = ref.double()
    ids = torch.tensor([2, 1, 0, 2])
    h, base = torch.randn(4, 3, D) * 0.05, torch.randn(4, 3, D)
    assert_parity(fast(h, ids), ref(h.double(), ids), TOL_CPU_FWD, "forward")
    hf, hr = h.clone().requires_grad_(), h.double().requires_grad_()
    out_f, out_r = fast.forward_fused(hf, base, ids), base.double() + ref(hr, ids)
    assert_parity(out_f, out_r, TOL_CPU_FWD, "forward_fused")
    gout = torch.randn_like(out_f)
    out_f.backward(gout)
    out_r.backward(gout.double())
    assert_parity(hf.grad, hr.grad, TOL_CPU_GRAD, "grad h")
    for (name, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters()):
        assert_parity(pf.grad, pr.grad, TOL_CPU_GRAD, f"grad {name}")


def test_every_specialist_gets_its_gradient_in_a_mixed_batch():
    _, fast = make_pair()
    out = fast(torch.randn(3, 4, D), torch.tensor([0, 1, 2]))
    out.square().sum().backward()
    for name, p in fast.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_absent_specialists_get_no_gradient_and_adamw_leaves_them():
    """As with the reference (which never calls them), a specialist without samples in a mixed batch gets
    ``.grad`` None, so AdamW's weight decay and momentum do not move it."""
    ref, fast = make_pair()
    h, ids = torch.randn(3, 4, D), torch.tensor([0, 2, 0])
    for model in (ref, fast):
        model(h, ids).square().sum().backward()
    for (name, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters()):
        if name.startswith("expert_b."):
            assert pr.grad is None and pf.grad is None, name
        else:
            assert_parity(pf.grad, pr.grad, TOL_CPU_GRAD, f"grad {name}")
    before = copy.deepcopy(fast.expert_b.state_dict())
    torch.optim.AdamW(fast.parameters(), lr=1e-2, weight_decay=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in fast.expert_b.state_dict().items())
    fast.zero_grad(set_to_none=True)
    fast(h, torch.tensor([1, 1, 1])).sum().backward()  # one specialist present, ids renumbered to it
    assert [n for n, p in fast.named_parameters() if p.grad is not None] == [
        n for n, _ in fast.named_parameters() if n.startswith("expert_b.")]


def test_cache_built_in_inference_mode_does_not_break_autograd():
    ref, fast = make_pair()
    fast.requires_grad_(False)
    h, ids = torch.randn(3, 4, D), torch.tensor([0, 1, 2])
    with torch.inference_mode():
        fast(h, ids)
    hf, hr = h.clone().requires_grad_(), h.clone().requires_grad_()
    fast(hf, ids).square().sum().backward()
    ref(hr, ids).square().sum().backward()
    assert_parity(hf.grad, hr.grad, TOL_CPU_GRAD, "grad h")


def test_clear_caches_after_an_edit_through_data():
    """``.data`` edits bypass the version counter the caches check; ``clear_caches`` makes them visible."""
    ref, fast = make_pair()
    h, base, ids = torch.randn(3, 4, D), torch.randn(3, 4, D), torch.tensor([0, 1, 2])
    with torch.no_grad():
        fast.forward_fused(h, base, ids)
        for p in (ref.expert_b.up_proj.weight, fast.expert_b.up_proj.weight):
            p.data.mul_(3.0)
        fast_nn.clear_caches(fast)
        assert_parity(fast.forward_fused(h, base, ids), base + ref(h, ids), TOL_CPU_FWD)
    with pytest.raises(TypeError, match="model"):
        fast_nn.clear_caches("fast")


def test_triton_interpreter_float64_takes_the_torch_path(triton_backend):
    """float64 is computed in float64 (the kernels would use fp32 and have no float64 backward)."""
    if triton_backend != "cpu":
        pytest.skip("interpreter check")
    ref, fast = make_pair(seed=5)
    ref, fast = ref.double(), fast.double()
    h = torch.randn(3, 2, D, dtype=torch.float64)
    for ids in (torch.tensor([0, 2, 1]), "B"):
        hr, hf = h.clone().requires_grad_(), h.clone().requires_grad_()
        w = torch.randn(3, 2, D, dtype=torch.float64)
        (ref(hr, ids) * w).sum().backward()
        (fast(hf, ids) * w).sum().backward()
        assert_parity(hf.grad, hr.grad, 1e-12, f"grad h ({ids})")
        for (name, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters()):
            if pr.grad is not None:
                assert_parity(pf.grad, pr.grad, 1e-12, f"grad {name} ({ids})")
        ref.zero_grad(set_to_none=True)
        fast.zero_grad(set_to_none=True)


def test_adapter_forward_and_fused():
    ref = randomize_(reference.Adapter(D, 16), seed=3)
    fast = fast_nn.Adapter(D, 16)
    fast.load_state_dict(ref.state_dict())
    h, base = torch.randn(2, 5, D), torch.randn(2, 5, D)
    assert_parity(fast(h), ref(h), TOL_CPU_FWD)
    assert_parity(fast.forward_fused(h, base), base + ref(h), TOL_CPU_FWD)
    for expert_id in ("B", torch.tensor([2, 0])):  # DESIGN §8's signature: checked, one adapter serves all
        assert_parity(fast.forward_fused(h, base, expert_id), base + ref(h), TOL_CPU_FWD)
    with pytest.raises(ValueError, match="expert_id must be one of"):
        fast.forward_fused(h, base, "D")
    with pytest.raises(ValueError, match=r"expert_id values must be in \{0, 1, 2\}"):
        fast.forward_fused(h, base, torch.tensor([0, 3]))


def test_triton_interpreter_module_parity(triton_backend):
    device = triton_backend
    ref, fast = make_pair(seed=4)
    ref, fast = ref.to(device), fast.to(device)
    h = torch.randn(4, 3, D, device=device)
    base = torch.randn(4, 3, D, device=device)
    ids = torch.tensor([1, 0, 2, 1], device=device)
    tol = TOL_INTERPRETER if device == "cpu" else 3e-3
    assert_parity(fast.forward_fused(h, base, ids), base + ref(h, ids), tol)
    assert_parity(fast(h, "B"), ref(h, "B"), tol)


def test_convert_swaps_in_place_and_keeps_outputs():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mos = reference.MoSAdapter(d_model=D, **RS)
            self.single = reference.Adapter(D, 16)

        def forward(self, h, ids):
            return self.mos(h, ids) + self.single(h)

    model = randomize_(torch.nn.Sequential(Block()), seed=5)
    h, ids = torch.randn(3, 4, D), torch.tensor([2, 2, 0])
    before = model[0](h, ids)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    assert fast_nn.convert(model) is model
    assert type(model[0].mos) is fast_nn.MoSAdapter
    assert type(model[0].mos.expert_a) is fast_nn.Adapter
    assert type(model[0].single) is fast_nn.Adapter
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert_parity(model[0](h, ids), before, TOL_CPU_FWD)


def test_dropout_in_training_falls_back_to_reference():
    ref, fast = make_pair(dropout=0.5)
    ref.train()
    fast.train()
    h, ids = torch.randn(3, 4, D), torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    out_r = ref(h, ids)
    torch.manual_seed(0)
    out_f = fast(h, ids)
    assert torch.equal(out_r, out_f)
    base = torch.randn(3, 4, D)
    torch.manual_seed(1)
    out_r = base + ref(h, "C")
    torch.manual_seed(1)
    assert torch.equal(fast.forward_fused(h, base, "C"), out_r)
    ref.eval()
    fast.eval()  # dropout is the identity in eval: the fused path runs
    assert_parity(fast(h, ids), ref(h, ids), TOL_CPU_FWD)


def test_large_bottleneck_falls_back():
    ref = randomize_(reference.Adapter(D, 300), seed=1)
    fast = fast_nn.Adapter(D, 300)
    fast.load_state_dict(ref.state_dict())
    h = torch.randn(2, D)
    assert torch.equal(fast(h), ref(h))


def test_inference_cache_follows_parameter_updates():
    ref, fast = make_pair()
    h, base, ids = torch.randn(3, 4, D), torch.randn(3, 4, D), torch.tensor([0, 1, 2])
    with torch.no_grad():
        first = fast.forward_fused(h, base, ids)
        assert torch.equal(first, fast.forward_fused(h, base, ids))
        for p in (ref.expert_b.up_proj.weight, fast.expert_b.up_proj.weight):
            p.add_(0.1)
        assert_parity(fast.forward_fused(h, base, ids), base + ref(h, ids), TOL_CPU_FWD)
        fast.load_state_dict(make_pair(seed=9)[0].state_dict())
        ref.load_state_dict(fast.state_dict())
        assert_parity(fast.forward_fused(h, base, ids), base + ref(h, ids), TOL_CPU_FWD)


def test_autocast_cpu_bf16():
    ref, fast = make_pair()
    h, base, ids = torch.randn(3, 4, D), torch.randn(3, 4, D), torch.tensor([2, 0, 1])
    ref64 = base.double() + copy.deepcopy(ref).double()(h.double(), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast.forward_fused(h, base, ids)
        adapter_only = fast(h, "C")
        ref_only = ref(h, "C")  # (the reference's mixed path cannot run under autocast: index_put dtypes)
        mixed_only = fast(h, ids)
        with torch.no_grad():
            cached = fast.forward_fused(h, base, ids)
    assert out.dtype == torch.float32
    assert adapter_only.dtype == ref_only.dtype == mixed_only.dtype == torch.bfloat16
    assert_parity(adapter_only, ref_only, TOL_BF16)
    assert_parity(out, ref64, TOL_BF16)
    assert_parity(cached, ref64, TOL_BF16)
    assert all(p.dtype == torch.float32 for p in fast.parameters())


@pytest.mark.parametrize(("eps", "h_std"), [(1e-5, 1.0), (1e-2, 0.01)], ids=["default-eps", "large-eps"])
def test_autocast_cpu_bf16_backward_mixed_and_single(eps, h_std):
    """Training under bf16 autocast: fp32 residual stream, fp32 parameters, bf16 compute (the trainer's
    setting). Gradients of both routings reach every parameter and agree with a float64 reference.
    The bf16 backward recomputes the LayerNorm from h: with h of std 0.01 and eps 1e-2, eps dominates
    the variance, so a recomputation with any other eps changes every gradient."""
    ref, fast = make_pair()
    for module in (ref, fast):
        for expert in module.experts:
            expert.layer_norm.eps = eps
    h = (torch.randn(3, 4, D) * h_std).requires_grad_(True)
    base, ids, gout = torch.randn(3, 4, D), torch.tensor([2, 0, 1]), torch.randn(3, 4, D)
    for routing in (ids, "B"):
        ref64 = copy.deepcopy(ref).double()
        h64 = h.detach().double().requires_grad_(True)
        (base.double() + ref64(h64, routing)).backward(gout.double())
        fast.zero_grad(set_to_none=True)
        h.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fast.forward_fused(h, base, routing)
        out.backward(gout)
        assert_parity(h.grad, h64.grad, TOL_BF16)
        for (name, p), p64 in zip(fast.named_parameters(), ref64.parameters()):
            if p64.grad is None:
                assert p.grad is None or not p.grad.any(), name
            else:
                assert p.grad is not None and p.grad.dtype == torch.float32, name
                assert_parity(p.grad, p64.grad, TOL_BF16)


def test_bad_inputs():
    _, fast = make_pair()
    h = torch.randn(3, 4, D)
    with pytest.raises(ValueError, match=f"last dim {D}"):
        fast(torch.randn(3, 4, D + 1), "A")
    with pytest.raises(ValueError, match="expert_id must be one of"):
        fast(h, "D")
    with pytest.raises(TypeError, match="int64"):
        fast(h, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        fast(h, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out-of-range"):
        fast(h, torch.tensor([0, 1, 3]))
    with pytest.raises(TypeError, match="dtype mismatch"):
        fast(h.double(), "A")
    with pytest.raises(TypeError, match="base dtype"):
        fast.forward_fused(h, h.double(), "A")
    with pytest.raises(TypeError, match="expert_id must be a str or an integer tensor"):
        fast(h, None)


def test_torch_compile_fullgraph_forward_fused():
    ref, fast = make_pair(seed=2)
    compiled = torch.compile(fast.forward_fused, fullgraph=True)
    h = torch.randn(4, 3, D, requires_grad=True)
    base = torch.randn(4, 3, D)
    ids = torch.tensor([2, 0, 1, 0])
    out = compiled(h, base, ids)
    assert_parity(out, base + ref(h, ids), TOL_CPU_FWD)
    out.sum().backward()
    assert h.grad is not None and fast.expert_c.down_proj.weight.grad is not None
    assert_parity(compiled(h, base, "A"), base + ref(h, "A"), TOL_CPU_FWD)


def test_backend_torch_on_cpu_is_default():
    assert mosaic_fast.get_backend() == "auto"
    from mosaic_fast.backend import use_triton

    assert not use_triton(torch.empty(1))


@pytest.mark.parametrize("base", [True, False])
def test_one_specialist_backward_has_no_view_copies(base, onednn_calls):
    """A letter-routed specialist on CPU runs the reference's ops through oneDNN, whose outputs for N-D
    inputs are views: an in-place ReLU or scale on them would make autograd copy the whole gradient of
    their base in the backward (CopySlices, AsStridedBackward). The graph must hold neither."""
    _, fast = make_pair()
    h = torch.randn(2, 5, fast.expert_a.layer_norm.weight.shape[0], requires_grad=True)
    out = fast.forward_fused(h, torch.randn_like(h), "A") if base else fast(h, "A")
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    names = {type(n).__name__ for n in seen}
    assert "ReluBackward0" in names, names  # the graph was walked
    assert onednn_calls, "the specialist's products did not reach oneDNN"
    assert not names & {"CopySlices", "AsStridedBackward0"}, names
