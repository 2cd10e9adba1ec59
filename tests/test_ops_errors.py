"""Bad input to the public ops raises a clear error naming the argument (DESIGN.md §7), and empty input
runs through the fast MoE adapter like through the reference.

Index values are checked only for CPU tensors (on CUDA that would synchronise the host); the Triton-only
ops refuse CPU tensors without Triton's interpreter with the backend's message."""

import copy

import pytest
import torch
from parity import randomize_

import mosaic_fast
from mosaic_fast import backend, reference
from mosaic_fast import nn as fast_nn
from mosaic_fast.ops import gated_specialist as gs_ops
from mosaic_fast.ops import moe_adapter, moe_routed, token_skip
from mosaic_fast.ops import patch_embed3d as pe_ops
from mosaic_fast.ops._common import check_index_values_on_cpu

D = 32


# ----------------------------------------------------------------------------------------------------
# 1. Triton-only ops on CPU tensors without TRITON_INTERPRET=1
# ----------------------------------------------------------------------------------------------------


def _select_call():
    token_skip.skip_select(torch.randn(2, 5, 8), torch.randn(1, 8), torch.randn(1), 2)


def _routed_call():
    m = fast_nn.GatedMoEAdapter(D, 4, 2, 8, 8)
    weights = [t.detach() for t in m._routed_weights()]
    moe_routed.moe_routed_update_(torch.randn(2, 5, D), torch.randn(2, 5, D), None, None, None, None, *weights, 2)


def _proj_call():
    pe_ops.patch_embed3d_proj(torch.randn(2, 1, 8, 8, 8), torch.randn(16, 1, 4, 4, 4), torch.randn(16), (4, 4, 4))


@pytest.mark.parametrize(("op", "call"), [("skip_select", _select_call), ("moe_routed_update_", _routed_call),
                                          ("patch_embed3d_proj", _proj_call)])
def test_triton_only_ops_refuse_cpu_without_interpreter(monkeypatch, op, call):
    monkeypatch.setattr(backend, "INTERPRET", False)
    want = "TRITON_INTERPRET=1" if backend.triton_available() else "not installed"
    with pytest.raises(RuntimeError, match=f"{op} runs Triton kernels.*{want}"):
        call()


# ----------------------------------------------------------------------------------------------------
# 2. moe_gated_update
# ----------------------------------------------------------------------------------------------------


def _moe_args():
    """Valid arguments: M = 6 rows, n = 3 experts, r = 16, K = 2, G = 4 (as a dict by name)."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 6, 3, 16
    return {
        "x_gen": torch.randn(m, D, generator=g), "x_med": torch.randn(m, D, generator=g),
        "rows_gen": torch.tensor([0, 2, 5]), "rows_med": torch.tensor([1, 2, 3, 4]),
        "eidx_gen": torch.tensor([[0, 1], [2, 0], [1, 2]]), "p_gen": torch.rand(3, 2, generator=g),
        "c_gen": torch.rand(3, 4, generator=g),
        "eidx_med": torch.tensor([[1, 0], [0, 2], [2, 1], [0, 1]]), "p_med": torch.rand(4, 2, generator=g),
        "c_med": torch.rand(4, 4, generator=g),
        "w_down": 0.1 * torch.randn(n, r, 2 * D, generator=g), "b_down": 0.1 * torch.randn(n, r, generator=g),
        "w_up": 0.1 * torch.randn(n, D, r, generator=g), "b_up": 0.1 * torch.randn(n, D, generator=g),
    }


def _moe(**changes):
    return moe_adapter.moe_gated_update(**{**_moe_args(), **changes})


MOE_BAD = [
    ("eidx_gen", ValueError, {"eidx_gen": torch.tensor([[0, 1], [2, 3], [1, 2]])}),
    ("eidx_med", ValueError, {"eidx_med": torch.tensor([[1, 0], [0, -1], [2, 1], [0, 1]])}),
    ("eidx_gen", ValueError, {"eidx_gen": torch.tensor([[0, 0], [2, 0], [1, 2]])}),  # repeated expert
    ("eidx_gen", TypeError, {"eidx_gen": torch.tensor([[0, 1], [2, 0], [1, 2]]).float()}),
    ("eidx_med", ValueError, {"eidx_med": torch.tensor([[1], [0], [2], [0]])}),  # K differs from eidx_gen
    ("rows_gen", ValueError, {"rows_gen": torch.tensor([0, 2, 6])}),
    ("rows_med", ValueError, {"rows_med": torch.tensor([1, 2, 2, 4])}),  # repeated row
    ("rows_med", ValueError, {"rows_med": torch.tensor([-1, 2, 3, 4])}),
    ("rows_gen", TypeError, {"rows_gen": torch.tensor([0.0, 2.0, 5.0])}),
    ("rows_gen", ValueError, {"rows_gen": torch.tensor([[0, 2, 5]])}),
    ("rows_gen", ValueError, {"rows_gen": None}),  # None (every row) for one stream only
    ("x_med", ValueError, {"x_med": torch.randn(4, D)}),
    ("x_gen", ValueError, {"x_gen": torch.randn(1, 6, D)}),
    ("x_gen", TypeError, {"x_gen": torch.zeros(6, D, dtype=torch.long)}),
    ("c_gen", ValueError, {"c_gen": torch.rand(3, 5)}),  # G = 5 does not divide D
    ("c_med", ValueError, {"c_med": torch.rand(4, 0)}),
    ("p_gen", ValueError, {"p_gen": torch.rand(3, 1)}),
    ("p_med", TypeError, {"p_med": torch.rand(4, 2, dtype=torch.float64)}),
    ("w_down", ValueError, {"w_down": torch.randn(3, 16, 2 * D + 2)}),
    ("b_down", ValueError, {"b_down": torch.randn(3, 15)}),
    ("w_up", ValueError, {"w_up": torch.randn(3, 16, D)}),
    ("b_up", ValueError, {"b_up": torch.randn(2, D)}),
]


@pytest.mark.parametrize(("name", "exc", "changes"), MOE_BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(MOE_BAD)])
def test_moe_gated_update_bad_input(name, exc, changes):
    with pytest.raises(exc, match=name):
        _moe(**changes)


@pytest.mark.parametrize("inplace", [False, True])
def test_moe_gated_update_accepts_int32_indices(inplace):
    args = _moe_args()
    want = moe_adapter.moe_gated_update(**args)
    idx32 = {k: args[k].int() for k in ("rows_gen", "rows_med", "eidx_gen", "eidx_med")}
    got = moe_adapter.moe_gated_update(**{**args, **idx32, "x_gen": args["x_gen"].clone(),
                                          "x_med": args["x_med"].clone()}, inplace=inplace)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_moe_gated_update_int32_shared_rows():
    """One row tensor for both streams (the full forward): int32 works and matches int64."""
    args = _moe_args()
    rows = torch.arange(6)
    e = torch.tensor([[0, 1], [2, 0], [1, 2]] * 2)
    p, c = torch.rand(6, 2), torch.rand(6, 4)
    base = {**args, "eidx_gen": e, "eidx_med": e, "p_gen": p, "p_med": p, "c_gen": c, "c_med": c}
    want = moe_adapter.moe_gated_update(**{**base, "rows_gen": rows, "rows_med": rows})
    r32 = rows.int()
    got = moe_adapter.moe_gated_update(**{**base, "rows_gen": r32, "rows_med": r32})
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_index_values_are_not_read_off_cpu():
    """Value checks run only on CPU tensors: elsewhere they would synchronise the host (here: the meta
    device, whose tensors have no values at all)."""
    check_index_values_on_cpu("rows", torch.tensor([99, -1], device="meta"), 3)
    with pytest.raises(ValueError, match="rows"):
        check_index_values_on_cpu("rows", torch.tensor([99, -1]), 3)


# ----------------------------------------------------------------------------------------------------
# 3. gated_specialist
# ----------------------------------------------------------------------------------------------------


def _gs_args():
    g = randomize_(fast_nn.GatedSpecialistAdapter(D, (4, 6, 8)), std=0.2, seed=3)
    w_fold, b_fold, w_up, b_up, _ = (t.detach() for t in g._fold())
    t = 5
    return {"h": torch.randn(t, D), "w_fold": w_fold, "b_fold": b_fold, "scale": torch.rand(t, 3), "w_up": w_up,
            "b_up": b_up, "unit_expert": g._unit_expert(torch.device("cpu"))}


GS_BAD = [
    ("unit_expert", ValueError, lambda a: {"unit_expert": torch.full_like(a["unit_expert"], 3)}),
    ("unit_expert", ValueError, lambda a: {"unit_expert": torch.full_like(a["unit_expert"], -1)}),
    ("unit_expert", TypeError, lambda a: {"unit_expert": a["unit_expert"].float()}),
    ("scale", ValueError, lambda a: {"scale": a["scale"][:, 0]}),
    ("h", TypeError, lambda a: {"h": a["h"].long()}),
    ("h", TypeError, lambda a: {"h": [1.0]}),
    ("channel_weight", TypeError, lambda a: {"channel_weight": torch.rand(5, D, dtype=torch.float64)}),
    ("channel_weight", ValueError, lambda a: {"channel_weight": torch.rand(5, D + 1)}),
    ("w_fold", TypeError, lambda a: {"h": a["h"].double()}),  # weights float32, h float64
]


@pytest.mark.parametrize(("name", "exc", "changes"), GS_BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(GS_BAD)])
def test_gated_specialist_bad_input(name, exc, changes):
    args = _gs_args()
    with pytest.raises(exc, match=name):
        gs_ops.gated_specialist(**{**args, **changes(args)})


def test_gated_specialist_accepts_int64_unit_expert():
    args = _gs_args()
    want = gs_ops.gated_specialist(**args)
    torch.testing.assert_close(gs_ops.gated_specialist(**{**args, "unit_expert": args["unit_expert"].long()}), want)


# ----------------------------------------------------------------------------------------------------
# 4. skip_merge
# ----------------------------------------------------------------------------------------------------


def _merge(**changes):
    args = {"x": torch.randn(6, D), "rows": torch.tensor([0, 3]), "update": torch.randn(2, D),
            "coef": torch.rand(2, 1)}
    return token_skip.skip_merge(**{**args, **changes})


SKIP_BAD = [
    ("coef", ValueError, {"coef": torch.rand(2, 0)}),
    ("coef", TypeError, {"coef": torch.rand(2, 1, dtype=torch.float64)}),
    ("coef", TypeError, {"coef": torch.ones(2, 1, dtype=torch.long)}),
    ("rows", ValueError, {"rows": torch.tensor([0, 6])}),
    ("rows", ValueError, {"rows": torch.tensor([-1, 3])}),
    ("rows", ValueError, {"rows": torch.tensor([3, 3])}),  # repeated row
    ("x", TypeError, {"x": [1.0]}),
]


@pytest.mark.parametrize(("name", "exc", "changes"), SKIP_BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(SKIP_BAD)])
def test_skip_merge_bad_input(name, exc, changes):
    with pytest.raises(exc, match=name):
        _merge(**changes)


def test_skip_merge_accepts_int32_rows():
    x, u, c = torch.randn(6, D), torch.randn(2, D), torch.rand(2, 4)
    rows = torch.tensor([4, 1])
    torch.testing.assert_close(token_skip.skip_merge(x, rows.int(), u, c), token_skip.skip_merge(x, rows, u, c))


def test_skip_merge_no_rows_backward(triton_backend):
    """No selected row: the output is x, the gradient flows to x only (the op's backward on 0 rows)."""
    x = torch.randn(6, D, device=triton_backend, requires_grad=True)
    u = torch.randn(0, D, device=triton_backend, requires_grad=True)
    c = torch.rand(0, 4, device=triton_backend, requires_grad=True)
    out = token_skip.skip_merge(x, torch.zeros(0, dtype=torch.long, device=triton_backend), u, c)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(out.detach(), x.detach()) and torch.equal(x.grad, g)
    assert u.grad.shape == u.shape and c.grad.shape == c.shape


# ----------------------------------------------------------------------------------------------------
# 5. patch_embed3d
# ----------------------------------------------------------------------------------------------------


def test_patch_embed3d_integer_weight():
    x = torch.randn(2, 1, 8, 8, 8)
    with pytest.raises(TypeError, match="weight"):
        pe_ops.patch_embed3d(x, torch.ones(16, 1, 4, 4, 4, dtype=torch.long), torch.ones(16, dtype=torch.long),
                             (4, 4, 4))


def test_patch_embed3d_bias_dtype():
    x = torch.randn(2, 1, 8, 8, 8)
    with pytest.raises(TypeError, match="bias"):
        pe_ops.patch_embed3d(x, torch.randn(16, 1, 4, 4, 4), torch.randn(16, dtype=torch.float64), (4, 4, 4))


def test_patch_embed3d_weight_not_a_tensor():
    with pytest.raises(TypeError, match="weight"):
        pe_ops.patch_embed3d(torch.randn(2, 1, 8, 8, 8), [1.0], None, (4, 4, 4))


def test_patch_size_int_is_a_cube():
    x = torch.randn(2, 1, 8, 8, 8)
    torch.testing.assert_close(pe_ops.patchify3d(x, 4), pe_ops.patchify3d(x, (4, 4, 4)))
    w, b = torch.randn(16, 1, 4, 4, 4), torch.randn(16)
    torch.testing.assert_close(pe_ops.patch_embed3d(x, w, b, 4), pe_ops.patch_embed3d(x, w, b, (4, 4, 4)))


@pytest.mark.parametrize("patch", [(4.0, 4, 4), "444", None, True])
def test_patch_size_bad_type(patch):
    with pytest.raises(TypeError, match="patch_size"):
        pe_ops.patchify3d(torch.randn(2, 1, 8, 8, 8), patch)


# ----------------------------------------------------------------------------------------------------
# 6. empty input through the fast GatedMoEAdapter
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 0, D), (0, 3, D)])
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_gated_moe_adapter_empty_input_forward_backward(request, backend_name, shape):
    device = request.getfixturevalue("triton_backend") if backend_name == "triton" else "cpu"
    if backend_name == "torch":
        mosaic_fast.set_backend("torch")
    ref = randomize_(reference.GatedMoEAdapter(D, 4, 2, 8, D), std=0.2, seed=0).to(device)
    fast = fast_nn.convert(copy.deepcopy(ref))
    results = []
    for module in (ref, fast):
        xs = [torch.randn(shape, device=device, requires_grad=True) for _ in range(2)]
        outs = module(*xs)
        (outs[0].sum() + 2 * outs[1].sum()).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in module.parameters()]
        results.append((list(outs), [x.grad for x in xs], grads))
    (r_out, r_in, r_par), (f_out, f_in, f_par) = results
    for f, r in zip(f_out + f_in, r_out + r_in):
        assert f.shape == r.shape == shape and f.dtype == r.dtype
    for f, r in zip(f_par, r_par):
        assert torch.equal(f, r)  # all zero: no token contributes
    with torch.no_grad():
        outs = fast(torch.randn(shape, device=device), torch.randn(shape, device=device))
    assert [tuple(o.shape) for o in outs] == [shape, shape]


_D = 32


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize(("module", "call", "name"), [
    (lambda m: m.Adapter(_D, 8), lambda mod, x: mod(x), "h"),
    (lambda m: m.MoSAdapter(_D, 8, 8, 8), lambda mod, x: mod(x, "B"), "h"),
    (lambda m: m.GatedMoEAdapter(_D, 4, 2, 8, _D), lambda mod, x: mod(x, x), "x_gen"),
    (lambda m: m.SkipRouter(_D), lambda mod, x: mod.select(x), "x"),
    (lambda m: m.GatedSpecialistAdapter(_D, (4, 6, 8)), lambda mod, x: mod(x), "h"),
], ids=["Adapter", "MoSAdapter", "GatedMoEAdapter", "SkipRouter", "GatedSpecialistAdapter"])
def test_modules_name_an_input_of_another_dtype(impl, module, call, name):
    """float64 tokens into float32 modules: a TypeError naming the input (not torch's mat1/mat2 message);
    under autocast the same call runs."""
    from mosaic_fast import nn as fast_nn
    from mosaic_fast import reference

    mod = module(reference if impl == "reference" else fast_nn)
    want = rf"\b{name} is torch\.float64 but the (module's parameters|adapter weights) are torch\.float32"
    with pytest.raises(TypeError, match=want):
        call(mod, torch.randn(2, 3, _D, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        call(mod, torch.randn(2, 3, _D))


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_patch_embed3d_names_a_float_volume_of_another_dtype(impl):
    from mosaic_fast import nn as fast_nn
    from mosaic_fast import reference

    pe = (reference if impl == "reference" else fast_nn).PatchEmbed3D(16, 4, 1, _D)
    with pytest.raises(TypeError, match=r"^x is torch\.float64"):
        pe(torch.randn(1, 1, 16, 16, 16, dtype=torch.float64))
    assert pe(torch.randint(0, 255, (1, 1, 16, 16, 16), dtype=torch.uint8)).dtype == torch.float32


@pytest.mark.parametrize("fast", [False, True])
def test_models_name_a_2d_input_of_another_dtype(fast):
    from mosaic_fast import models

    model = models.MosaicModel([2] * 18, embed_dim=_D, depth=1, num_heads=2, img_size_2d=32, patch_size_2d=16,
                               img_size_3d=16, patch_size_3d=4, adapter_bottleneck_a=4, adapter_bottleneck_b=4,
                               adapter_bottleneck_c=4, fast=fast)
    with pytest.raises(TypeError, match=r"^x is torch\.float64"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64), 0, expert_id="A")
    with pytest.raises(TypeError, match="floating-point image batch"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 0, expert_id="A")
    dyn = models.DynaMerModel(3, embed_dim=_D, depth=1, num_heads=2, img_size=32, patch_size=16, fast=fast)
    with pytest.raises(TypeError, match=r"^x is torch\.float64"):
        dyn(torch.randn(1, 3, 32, 32, dtype=torch.float64))
