"""Gaps found by mutation testing of the input checks added since the last pass (reference/checks.py,
ops/_common.py and their callers: DESIGN.md §7) and of GatedMoEAdapter.forward_skip(inplace=True) under
autograd. Each test checks an error DESIGN.md §7 asks for (a ValueError/TypeError naming the argument,
the argument name being the literal asserted) or compares against the reference module on fresh random
inputs with every parameter randomised (DESIGN.md §3, §5)."""

import copy

import pytest
import torch
from parity import TOL_CPU_FWD, TOL_CPU_GRAD, TOL_CUDA_TF32, TOL_INTERPRETER, assert_parity, randomize_

import mosaic_fast
from mosaic_fast import models, reference
from mosaic_fast import nn as fast_nn
from mosaic_fast.ops import grouped_adapter as ga_ops
from mosaic_fast.ops import patch_embed3d as pe_ops

D = 8


# ---------------------------------------------------------------------------------------------------
# ops/_common.py check_real: a bool is not a real-valued argument
# ---------------------------------------------------------------------------------------------------


def _packed_adapter():
    a = randomize_(reference.Adapter(D, 3), std=0.3, seed=1)
    return ga_ops.pack_adapters([a])


@pytest.mark.parametrize("name", ["scale", "eps"])
@pytest.mark.parametrize("entry", ["grouped_adapter", "run_packed", "run_adapter"])
def test_grouped_adapter_refuses_a_bool_scale_or_eps(entry, name):
    """``scale=True`` is a bool, not a real number (ops/_common.check_real): a TypeError naming the argument,
    not a silent scale of 1.0 (eps=True would silently be an epsilon of 1.0)."""
    weights, bottlenecks = _packed_adapter()
    h = torch.randn(2, 3, D)
    with pytest.raises(TypeError, match=name):
        if entry == "grouped_adapter":
            ga_ops.grouped_adapter(h, *weights, bottlenecks, **{name: True})
        elif entry == "run_packed":
            ga_ops.run_packed(h, weights, bottlenecks, **{name: True})
        else:
            single = [t[0] if t.dim() == 2 and t.shape[0] == 1 else t for t in weights]
            ga_ops.run_adapter(h, single, **{name: True})


@pytest.mark.parametrize("name", ["scale", "shift"])
def test_patch_ops_refuse_a_bool_scale_or_shift(name):
    """The 3D patch ops' scale/shift: a bool raises a TypeError naming it (check_real)."""
    x = torch.rand(1, 1, 4, 4, 4)
    weight, bias = torch.randn(5, 1, 2, 2, 2), torch.randn(5)
    with pytest.raises(TypeError, match=name):
        pe_ops.patch_embed3d(x, weight, bias, (2, 2, 2), **{name: True})
    with pytest.raises(TypeError, match=name):
        pe_ops.patchify3d(x, (2, 2, 2), **{name: True})
    if name == "scale":
        with pytest.raises(TypeError, match="scale"):
            pe_ops.unpatchify3d(torch.randn(1, 8, 8), (1, 1, 4, 4, 4), (2, 2, 2), scale=True)


# ---------------------------------------------------------------------------------------------------
# reference/adapter.py: Adapter sizes; MoSAdapter's own check of h
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["d_model", "bottleneck"])
@pytest.mark.parametrize("value", [True, 8.0])
def test_adapter_sizes_must_be_ints(name, value):
    """Adapter(d_model=True) built a 1-wide adapter silently, d_model=8.0 failed inside nn.Linear naming
    nothing: a TypeError naming the argument (check_int)."""
    kwargs = {"d_model": D, "bottleneck": 4, name: value}
    with pytest.raises(TypeError, match=name):
        reference.Adapter(**kwargs)


@pytest.mark.parametrize("impl", [reference, fast_nn])
@pytest.mark.parametrize(("h", "exc"), [(torch.randn(0, 3, D + 1), ValueError),
                                        (torch.zeros(0, 3, D, dtype=torch.long), TypeError)])
def test_mos_adapter_checks_h_of_an_empty_mixed_batch(impl, h, exc):
    """A mixed batch (ids (B,)) with B = 0 runs no specialist, so only MoSAdapter's own check sees h: a wrong
    width or an integer h must still raise an error naming h (it returned zeros of h's shape and dtype)."""
    ids = torch.zeros(0, dtype=torch.long)
    m = randomize_(impl.MoSAdapter(D, 4, 5, 6), seed=2)
    with pytest.raises(exc, match="h"):
        m(h, ids)


# ---------------------------------------------------------------------------------------------------
# reference/patch_embed.py: PatchEmbed2D's x
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x", [[1.0] * 4, None, 3.0])
def test_patch_embed_2d_names_a_non_tensor_x(x):
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        reference.PatchEmbed2D(8, 4, 3, D)(x)


# ---------------------------------------------------------------------------------------------------
# reference/moe.py: skip-gate dtype and the merge's width message
# ---------------------------------------------------------------------------------------------------


def _moe_pair(seed=0):
    ref = randomize_(reference.GatedMoEAdapter(D, 3, 2, 4, D), std=0.3, seed=seed)
    return ref, fast_nn.convert(copy.deepcopy(ref))


@pytest.mark.parametrize("which", ["ref", "fast"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_skip_gates_are_a_type_error(which, dtype):
    """A skip gate of the right shape but an integer/bool dtype is a dtype error: TypeError naming the gate
    (as check_floating does for every other floating argument)."""
    ref, fast = _moe_pair()
    m = ref if which == "ref" else fast
    xg, xm = torch.randn(2, 4, D), torch.randn(2, 4, D)
    idx = torch.tensor([[0, 2], [1, 3]])
    good, bad = torch.rand(2, 2), torch.ones(2, 2, dtype=dtype)
    with pytest.raises(TypeError, match="gate_gen"):
        m.forward_skip(xg, xm, idx, bad, idx, good)
    with pytest.raises(TypeError, match="gate_med"):
        m.forward_skip(xg, xm, idx, good, idx, bad)
    router = reference.SkipRouter(D, 0.5) if which == "ref" else fast_nn.convert(reference.SkipRouter(D, 0.5))
    with pytest.raises(TypeError, match="gate_x"):
        router.merge(xg, idx, bad, torch.randn(2, 2, D))


@pytest.mark.parametrize("which", ["ref", "fast"])
def test_merge_gate_wider_than_x_names_x(which):
    """SkipRouter.merge(x, idx, gate, update) with a float64 gate on float32 tokens: the TypeError names the
    gate and x, merge's own argument (not x_gen, the MoE adapter's)."""
    router = reference.SkipRouter(D, 0.5)
    if which == "fast":
        router = fast_nn.convert(router)
    x, idx = torch.randn(2, 4, D), torch.tensor([[0, 2], [1, 3]])
    with pytest.raises(TypeError, match="gate") as info:
        router.merge(x, idx, torch.rand(2, 2, dtype=torch.float64), torch.randn(2, 2, D))
    assert "x (torch.float32)" in str(info.value) and "x_gen" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# nn/moe.py: forward_skip(inplace=True) when only the weights, or only the skip gates, need gradients
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("grad_of", ["weights", "gates"])
@pytest.mark.parametrize("every_row", [True, False])
def test_inplace_skip_with_grad_only_on_weights_or_gates(request, backend, grad_of, every_row):
    """Streams that need no gradient (a frozen backbone's tokens), but adapter weights (training the adapter)
    or skip gates (training the skip routers) that do: ``inplace=True`` writes the reference's out-of-place
    result into the streams and gives the reference's gradients (in float64) for the weights or gates.
    Every token kept (ρ = 1) or some."""
    if backend == "triton":
        device = request.getfixturevalue("triton_backend")
        tol_fwd = tol_grad = TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32
    else:
        mosaic_fast.set_backend("torch")
        device, tol_fwd, tol_grad = "cpu", TOL_CPU_FWD, TOL_CPU_GRAD
    ref, fast = _moe_pair(seed=5)
    fast.to(device)
    b, n = 2, 5
    gen = torch.Generator().manual_seed(7)
    xg, xm = (torch.randn(b, n, D, generator=gen) for _ in range(2))
    if every_row:
        idx_g, idx_m = (torch.stack([torch.randperm(n, generator=gen) for _ in range(b)]) for _ in range(2))
    else:
        idx_g, idx_m = torch.tensor([[0, 3], [4, 1]]), torch.tensor([[2, 0], [1, 3]])
    gates = [torch.rand(idx.shape, generator=gen) * 0.8 + 0.1 for idx in (idx_g, idx_m)]
    gout = [torch.randn(b, n, D, generator=gen) for _ in range(2)]

    ref64 = copy.deepcopy(ref).double()
    ref64.requires_grad_(grad_of == "weights")
    rg = [g.double().requires_grad_(grad_of == "gates") for g in gates]
    want = ref64.forward_skip(xg.double(), xm.double(), idx_g, rg[0], idx_m, rg[1])
    torch.autograd.backward(want, [g.double() for g in gout])
    want_grads = [p.grad for p in ref64.parameters()] if grad_of == "weights" else [g.grad for g in rg]

    fast.requires_grad_(grad_of == "weights")
    fg = [g.to(device).requires_grad_(grad_of == "gates") for g in gates]
    yg, ym = xg.to(device), xm.to(device)
    out = fast.forward_skip(yg, ym, idx_g.to(device), fg[0], idx_m.to(device), fg[1], inplace=True)
    assert out[0] is yg and out[1] is ym
    torch.autograd.backward(out, [g.to(device) for g in gout])
    got_grads = [p.grad for p in fast.parameters()] if grad_of == "weights" else [g.grad for g in fg]
    assert_parity(yg, want[0], tol_fwd, "gen in place")
    assert_parity(ym, want[1], tol_fwd, "med in place")
    for i, (got, w) in enumerate(zip(got_grads, want_grads)):
        assert w is not None and w.norm() > 1e-4, f"grad {i} is missing or near zero: the check proves nothing"
        assert got is not None, f"grad {i}: none"
        assert_parity(got, w, tol_grad, f"grad {i}")


# ---------------------------------------------------------------------------------------------------
# models/mosaic.py: num_classes_list and forward_packed's pairs
# ---------------------------------------------------------------------------------------------------

MOSAIC = dict(embed_dim=D, depth=1, num_heads=2, img_size_2d=8, patch_size_2d=4, img_size_3d=8, patch_size_3d=4,
              adapter_bottleneck_a=4, adapter_bottleneck_b=5, adapter_bottleneck_c=6)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("empty", [[], ()])
def test_mosaic_needs_at_least_one_head(fast, empty):
    """An empty num_classes_list builds a model without heads: a ValueError naming num_classes_list."""
    with pytest.raises(ValueError, match="num_classes_list"):
        models.MosaicModel(empty, fast=fast, **MOSAIC)


@pytest.mark.parametrize("fast", [False, True])
def test_forward_packed_takes_pairs_given_as_lists(fast):
    """forward_packed's (x, expert_id) pairs may be lists, as ``batches`` itself may (e.g. read from a config):
    the result equals ``[forward_features(x, e) for x, e in batches]`` (its documented meaning)."""
    ref = randomize_(models.MosaicModel([2, 3], fast=False, task_experts=["A", "C"], **MOSAIC), std=0.2, seed=3)
    m = ref
    if fast:
        m = models.MosaicModel([2, 3], fast=True, task_experts=["A", "C"], **MOSAIC)
        m.load_state_dict(ref.state_dict())
    m.eval()
    ref.eval()
    x2d, x3d = torch.randn(2, 3, 8, 8), torch.randn(1, 1, 8, 8, 8)
    ids = torch.tensor([0, 1])
    with torch.no_grad():
        got = m.forward_packed([[x2d, ids], [x3d, "C"]])
        want = [ref.forward_features(x2d, ids), ref.forward_features(x3d, "C")]
    assert len(got) == 2
    for g, w in zip(got, want):
        assert w.norm() > 1e-3
        assert_parity(g, w, TOL_CPU_FWD, "packed features")


# ---------------------------------------------------------------------------------------------------
# bench/run.py: the note for a --filter text that matches no case, over several suites
# ---------------------------------------------------------------------------------------------------


def test_bench_filter_note_looks_at_every_suite(capsys, monkeypatch):
    """``mosaic-fast bench`` (all suites) with one text matching an ops case and one matching nothing: the
    note names only the unmatched text, "of ops/model"; a text matching a case of an earlier suite is no
    misspelling. (Timing is stubbed out: the note is what is checked.)"""
    from mosaic_fast.bench import core
    from mosaic_fast.bench.run import main as bench_main

    def not_timed(case, *args, **kwargs):
        raise RuntimeError("not timed in this test")

    monkeypatch.setattr(core, "time_case", not_timed)
    assert bench_main(["--device", "cpu", "--no-compile", "--filter", "moe_skip_rho0.1",
                       "--filter", "no_such_case_text"]) == 0
    err = capsys.readouterr().err
    assert "--filter 'no_such_case_text' matches no case of ops/model" in err
    assert "'moe_skip_rho0.1' matches no case" not in err
