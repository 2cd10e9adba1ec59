"""Gaps found by mutation testing of the nn/ops dispatch layer (caches, convert, adapters, MoE glue,
grouped-adapter packing, backend, benchmark protocol). Each test compares against the reference modules
or a hand formula on fresh random inputs with every parameter randomised (DESIGN.md §5)."""

import copy

import pytest
import torch
from parity import TOL_CPU_FWD, TOL_CPU_GRAD, TOL_CUDA_TF32, TOL_INTERPRETER, assert_parity, randomize_

from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.nn import frozen_cast

D = 32


def _frozen_mlp_pair():
    ref = randomize_(reference.Mlp(D, 2 * D), std=0.2)
    fast = fast_nn.convert(copy.deepcopy(ref))
    for m in (ref, fast):
        m.requires_grad_(False)
    return ref, fast


def _autocast(module, x, dtype=torch.bfloat16):
    with torch.autocast("cpu", dtype=dtype):
        return module(x)


# ---------------------------------------------------------------------------------------------------
# nn/frozen_cast.py
# ---------------------------------------------------------------------------------------------------


def test_frozen_cast_follows_a_change_of_autocast_dtype():
    """A cast made under bf16 autocast must not be reused under fp16 autocast (same weight, same version)."""
    ref, fast = _frozen_mlp_pair()
    x = torch.randn(2, 5, D)
    assert torch.equal(_autocast(fast, x, torch.bfloat16), _autocast(ref, x, torch.bfloat16))
    got, want = _autocast(fast, x, torch.float16), _autocast(ref, x, torch.float16)
    assert got.dtype == want.dtype == torch.float16
    assert torch.equal(got, want)


def test_frozen_cast_follows_a_new_data_tensor():
    """``p.data = new`` keeps the version counter but changes the storage: the cast must be redone."""
    ref, fast = _frozen_mlp_pair()
    x = torch.randn(3, 4, D)
    _autocast(fast, x)
    new_w = torch.randn_like(ref.fc1.weight) * 0.2
    new_b = torch.randn_like(ref.fc2.bias)
    for m in (ref, fast):
        m.fc1.weight.data = new_w.clone()
        m.fc2.bias.data = new_b.clone()
    assert torch.equal(_autocast(fast, x), _autocast(ref, x))


def test_cached_casts_of_a_model_include_its_submodules_and_no_uncast_weights():
    """``cached_casts(model)`` is what the benchmark counts as memory held beyond the parameters: every
    submodule's casts (owned by the submodule), and nothing for weights already in the autocast dtype."""
    ref, fast = _frozen_mlp_pair()
    model = torch.nn.Sequential(fast)
    x = torch.randn(2, 3, D)
    assert torch.equal(_autocast(model, x), _autocast(ref, x))
    casts = frozen_cast.cached_casts(model)
    assert sorted(t.numel() for t in casts) == sorted(p.numel() for p in fast.parameters())
    assert all(t.dtype == torch.bfloat16 for t in casts)
    bf16 = torch.nn.Sequential(copy.deepcopy(fast).bfloat16())
    want = _autocast(copy.deepcopy(ref).bfloat16(), x.bfloat16())
    assert torch.equal(_autocast(bf16, x.bfloat16()), want)
    assert frozen_cast.cached_casts(bf16) == []


# ---------------------------------------------------------------------------------------------------
# nn/caches.py
# ---------------------------------------------------------------------------------------------------


def _cached_models():
    """(reference, fast) pairs of every cache kind: frozen casts (Mlp), packed specialists (MoSAdapter),
    folded M4oE weights (GatedSpecialistAdapter), nested one level inside a container."""
    mlp_r, mlp_f = _frozen_mlp_pair()
    mos_r = randomize_(reference.MoSAdapter(D, 8, 12, 16), std=0.2)
    gsa_r = randomize_(reference.GatedSpecialistAdapter(D, (8, 12, 16), "expert"), std=0.2)
    ref = torch.nn.ModuleDict({"mlp": mlp_r, "mos": mos_r, "gsa": gsa_r})
    fast = torch.nn.ModuleDict({"mlp": mlp_f, "mos": fast_nn.convert(copy.deepcopy(mos_r)),
                                "gsa": fast_nn.convert(copy.deepcopy(gsa_r))})
    return ref, fast


def _run_all(model, x, ids):
    with torch.no_grad():
        return [_autocast(model["mlp"], x), model["mos"](x, ids), model["gsa"](x)]


def _edit_through_data(model):
    model["mlp"].fc1.weight.data.mul_(-2.0)
    model["mos"].expert_b.up_proj.weight.data.mul_(3.0)
    model["gsa"].expert_c.down_proj.weight.data.mul_(-1.5)


@pytest.mark.parametrize("scope", ["all", "model"])
def test_clear_caches_forgets_every_cache_kind_of_nested_modules(scope):
    """``.data`` edits bypass the version counters; ``clear_caches()`` (every module) and
    ``clear_caches(container)`` (its submodules) must drop the casts, the packs and the folds."""
    ref, fast = _cached_models()
    x, ids = torch.randn(3, 4, D), torch.tensor([1, 0, 2])
    for got, want in zip(_run_all(fast, x, ids), _run_all(ref, x, ids)):
        assert_parity(got, want, 1e-2)
    for m in (ref, fast):
        _edit_through_data(m)
    fast_nn.clear_caches() if scope == "all" else fast_nn.clear_caches(fast)
    got, want = _run_all(fast, x, ids), _run_all(ref, x, ids)
    assert torch.equal(got[0], want[0]), "frozen cast kept after clear_caches"
    assert_parity(got[1], want[1], TOL_CPU_FWD, "packed specialists kept after clear_caches")
    assert_parity(got[2], want[2], TOL_CPU_FWD, "folded M4oE weights kept after clear_caches")


# ---------------------------------------------------------------------------------------------------
# nn/convert.py
# ---------------------------------------------------------------------------------------------------


def test_convert_leaves_user_subclasses_alone_and_names_a_bad_argument():
    """Only the reference classes themselves are swapped: a user's subclass (its own forward) is kept."""

    class DoubledAdapter(reference.Adapter):
        def forward(self, h):
            return 2.0 * super().forward(h)

    model = torch.nn.Sequential(randomize_(DoubledAdapter(D, 8)), randomize_(reference.Adapter(D, 8)))
    h = torch.randn(2, 3, D)
    want0 = 2.0 * reference.Adapter.forward(model[0], h)
    want1 = model[1](h)
    with pytest.warns(UserWarning, match="left DoubledAdapter as it is"):
        fast_nn.convert(model)
    assert type(model[0]) is DoubledAdapter and type(model[1]) is fast_nn.Adapter
    assert_parity(model[0](h), want0, TOL_CPU_FWD)
    assert_parity(model[1](h), want1, TOL_CPU_FWD)
    with pytest.raises(TypeError, match="model"):
        fast_nn.convert("not a module")


def test_convert_swaps_every_reference_class_that_has_a_fast_twin():
    """DESIGN §8: ``nn.<same class names>``; convert swaps each of them, nested too, and a converted Block
    still computes the reference's block."""
    names = ["Adapter", "MoSAdapter", "Attention", "Mlp", "Block", "GatedMoEAdapter", "SkipRouter",
             "GatedSpecialistAdapter", "PatchEmbed3D"]
    parts = {
        "Adapter": reference.Adapter(D, 8),
        "MoSAdapter": reference.MoSAdapter(D, 8, 12, 16),
        "Attention": reference.Attention(D, 4),
        "Mlp": reference.Mlp(D, 2 * D),
        "Block": reference.Block(D, 4, 2.0, True, 8, 12, 16),
        "GatedMoEAdapter": reference.GatedMoEAdapter(D, 4, 2, 8, D),
        "SkipRouter": reference.SkipRouter(D, 0.5),
        "GatedSpecialistAdapter": reference.GatedSpecialistAdapter(D, (8, 12, 16)),
        "PatchEmbed3D": reference.PatchEmbed3D(16, 8, 1, D),
    }
    model = randomize_(torch.nn.ModuleDict({"outer": torch.nn.ModuleDict(parts)}))
    x, ids = torch.randn(3, 5, D), torch.tensor([2, 0, 1])
    want = model["outer"]["Block"](x, ids)
    fast_nn.convert(model)
    for name in names:
        assert type(model["outer"][name]) is getattr(fast_nn, name), name
    block = model["outer"]["Block"]
    assert type(block.attn) is fast_nn.Attention and type(block.ffn) is fast_nn.Mlp
    assert type(block.adapter) is fast_nn.MoSAdapter and type(block.adapter.expert_c) is fast_nn.Adapter
    assert_parity(block(x, ids), want, TOL_CPU_FWD)


# ---------------------------------------------------------------------------------------------------
# nn/adapter.py
# ---------------------------------------------------------------------------------------------------


def _mos_pair(seed=None, **kw):
    ref = randomize_(reference.MoSAdapter(D, 8, 12, 16, **kw), std=0.2, seed=seed)
    return ref, fast_nn.convert(copy.deepcopy(ref))


def test_packed_weights_follow_autocast_on_off_and_its_dtype():
    """The inference pack is cached per autocast dtype: bf16, then no autocast, then fp16 each use their own."""
    ref, fast = _mos_pair()
    h, base, ids = torch.randn(3, 4, D), torch.randn(3, 4, D), torch.tensor([2, 0, 1])
    want64 = base.double() + copy.deepcopy(ref).double()(h.double(), ids)
    with torch.no_grad():
        for dtype, tol in ((torch.bfloat16, 2e-2), (None, TOL_CPU_FWD), (torch.float16, 5e-3), (None, TOL_CPU_FWD)):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = fast.forward_fused(h, base, ids)
                alone = fast(h, ids)
            assert out.dtype == torch.float32, dtype
            assert_parity(out, want64, tol, f"forward_fused under {dtype}")
            assert alone.dtype == (dtype or torch.float32), dtype  # autocast dtype also from a cached pack
            assert_parity(alone.float(), want64 - base.double(), 3 * tol, f"forward under {dtype}")


def test_packed_weights_follow_a_new_data_tensor():
    """``p.data = new`` keeps the version counter; the packed copy must still be rebuilt (new storage)."""
    ref, fast = _mos_pair()
    h, ids = torch.randn(3, 4, D), torch.tensor([1, 2, 0])
    with torch.no_grad():
        fast(h, ids)
        new = torch.randn_like(ref.expert_b.down_proj.weight)
        for m in (ref, fast):
            m.expert_b.down_proj.weight.data = new.clone()
        assert_parity(fast(h, ids), ref(h, ids), TOL_CPU_FWD)


def test_bottleneck_above_the_kernel_limit_falls_back_on_the_triton_backend(triton_backend):
    """A specialist wider than the kernels keep on chip (256) runs the reference computation, also when the
    backend asks for the kernels (they would refuse it)."""
    device = triton_backend
    ref = randomize_(reference.MoSAdapter(D, 8, 12, 260), std=0.2).to(device)
    fast = fast_nn.convert(copy.deepcopy(ref))
    h, base = torch.randn(3, 2, D, device=device), torch.randn(3, 2, D, device=device)
    ids = torch.tensor([2, 0, 1], device=device)
    with torch.no_grad():
        assert_parity(fast.forward_fused(h, base, ids), base + ref(h, ids), TOL_CPU_FWD)
        assert_parity(fast(h, "C"), ref(h, "C"), TOL_CPU_FWD)
        assert_parity(fast.expert_c.forward_fused(h, base), base + ref.expert_c(h), TOL_CPU_FWD)


def test_adapter_forward_fused_with_dropout_in_training_keeps_the_base():
    """The dropout fallback of a single ``Adapter.forward_fused`` still adds ``base``."""
    ref = randomize_(reference.Adapter(D, 8, dropout=0.3), std=0.2)
    fast = fast_nn.convert(copy.deepcopy(ref))
    h, base = torch.randn(2, 5, D), torch.randn(2, 5, D)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    want = base + ref(h)
    torch.manual_seed(seed)
    assert_parity(fast.forward_fused(h, base), want, TOL_CPU_FWD)


def test_a_common_non_default_adapter_scalar_reaches_every_path():
    """All specialists sharing one scale s != 0.1 (``adapter_scalar``): the grouped op must use s, not the
    default, in the mixed and single paths, forward_fused, and the gradients."""
    s = float(torch.empty(()).uniform_(0.3, 2.0))
    ref, fast = _mos_pair(adapter_scalar=s)
    assert all(e.scale == s for e in fast.experts)
    ref = ref.double()
    h, base, ids = torch.randn(4, 3, D), torch.randn(4, 3, D), torch.tensor([1, 2, 0, 1])
    for routing in (ids, "B"):
        hf, hr = h.clone().requires_grad_(), h.double().requires_grad_()
        out_f, out_r = fast.forward_fused(hf, base, routing), base.double() + ref(hr, routing)
        assert_parity(out_f, out_r, TOL_CPU_FWD, f"forward_fused ({routing})")
        gout = torch.randn_like(out_f)
        out_f.backward(gout)
        out_r.backward(gout.double())
        assert_parity(hf.grad, hr.grad, TOL_CPU_GRAD, "grad h")
        for (name, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters()):
            if pr.grad is not None:
                assert_parity(pf.grad, pr.grad, TOL_CPU_GRAD, f"grad {name}")
        fast.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        with torch.no_grad():
            assert_parity(fast(h, routing), ref(h.double(), routing), TOL_CPU_FWD, f"forward ({routing})")


# ---------------------------------------------------------------------------------------------------
# nn/moe.py
# ---------------------------------------------------------------------------------------------------


def _moe_pair(gate_dim=D):
    ref = randomize_(reference.GatedMoEAdapter(D, 4, 2, 8, gate_dim), std=0.2)
    return ref, fast_nn.convert(copy.deepcopy(ref))


def test_forward_skip_in_place_with_only_the_med_stream_non_contiguous():
    """inplace=True with a contiguous x_gen and a strided (batch-major transposed) x_med: both must be
    written, nothing else."""
    ref, fast = _moe_pair()
    xg = torch.randn(2, 6, D)
    buf = torch.randn(6, 2, 2 * D)
    before = buf.clone()
    xm = buf[..., D:].transpose(0, 1)  # (2, 6, D), not even viewable as (12, D)
    assert xg.is_contiguous() and not xm.is_contiguous()
    idx_g, idx_m = torch.tensor([[0, 3, 4], [0, 1, 5]]), torch.tensor([[0, 2], [0, 5]])
    gate_g, gate_m = torch.rand(2, 3), torch.rand(2, 2)
    with torch.no_grad():
        want = copy.deepcopy(ref).double().forward_skip(xg.double(), xm.double(), idx_g, gate_g.double(), idx_m,
                                                        gate_m.double())
        out = fast.forward_skip(xg, xm, idx_g, gate_g, idx_m, gate_m, inplace=True)
    assert out[0] is xg and out[1] is xm
    assert_parity(xg, want[0], TOL_CPU_FWD, "gen written in place")
    assert_parity(xm, want[1], TOL_CPU_FWD, "med written in place")
    assert torch.equal(buf[..., :D], before[..., :D])


def test_forward_skip_names_a_gate_wider_than_the_streams():
    _, fast = _moe_pair()
    xg, xm = torch.randn(2, 4, D), torch.randn(2, 4, D)
    idx = torch.tensor([[0, 1], [0, 3]])
    for wide in ("gen", "med"):
        gates = {k: torch.rand(2, 2, dtype=torch.float64 if k == wide else torch.float32) for k in ("gen", "med")}
        with pytest.raises(TypeError, match=f"gate_{wide}"):
            fast.forward_skip(xg, xm, idx, gates["gen"], idx, gates["med"])


@pytest.mark.parametrize(("n", "ratio"), [(5, 0.8), (8, 0.75), (6, 0.5), (4, 1.0)])
def test_skip_router_keeps_exactly_ceil_rho_n_tokens(n, ratio):
    """k = ⌈ρN⌉ kept (N - 1 included: only ρ = 1 keeps every token), matching the reference end to end."""
    ref = randomize_(reference.SkipRouter(D, ratio), std=0.3)
    fast = fast_nn.convert(copy.deepcopy(ref))
    x = torch.randn(3, n, D)
    w = torch.randn(D, D) / D**0.5

    def fn(t):
        return torch.tanh(t @ w) + 1.0

    idx_f, gate_f = fast.select(x)
    idx_r, gate_r = ref.select(x)
    assert idx_f.shape == idx_r.shape and torch.equal(idx_f, idx_r)
    assert_parity(gate_f, gate_r, TOL_CPU_FWD, "gates")
    assert_parity(fast(x, fn), ref(x, fn), TOL_CPU_FWD, "forward")


@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_gated_specialists_follow_a_changed_scale_between_inference_calls(gate):
    """The folded weights kept for inference include each specialist's scale: changing ``scale`` (a plain
    attribute, no version counter) must show in the next call."""
    ref = randomize_(reference.GatedSpecialistAdapter(D, (8, 12, 16), gate), std=0.2)
    fast = fast_nn.convert(copy.deepcopy(ref))
    h = torch.randn(2, 5, D)
    with torch.no_grad():
        assert_parity(fast(h), ref(h), TOL_CPU_FWD)
        s = float(torch.empty(()).uniform_(0.5, 2.0))
        for m in (ref, fast):
            m.expert_b.scale = s
        assert_parity(fast(h), ref(h), TOL_CPU_FWD, "after a scale change")


def test_gated_specialists_folded_under_inference_mode_then_differentiated_wrt_h():
    """A frozen M4oE module used under inference_mode, then with a trainable input: the fold made under
    inference_mode (inference tensors) must not be saved for backward."""
    ref = randomize_(reference.GatedSpecialistAdapter(D, (8, 12, 16), "expert"), std=0.2)
    fast = fast_nn.convert(copy.deepcopy(ref))
    for m in (ref, fast):
        m.requires_grad_(False)
    h = torch.randn(2, 5, D)
    with torch.inference_mode():
        fast(h)
    hf, hr = h.clone().requires_grad_(), h.clone().requires_grad_()
    gout = torch.randn_like(h)
    fast(hf).backward(gout)
    ref(hr).backward(gout)
    assert_parity(hf.grad, hr.grad, TOL_CPU_GRAD, "grad h")


@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_gated_specialists_with_different_layer_norm_eps(gate):
    """Specialists whose LayerNorm eps differ (the fused op takes one): still the reference's function. h is
    small (per-row variance ~2.5e-3) so that eps 1e-2 vs 1e-5 changes LN(h) by ~2x."""
    ref = randomize_(reference.GatedSpecialistAdapter(D, (8, 12, 16), gate), std=0.2)
    for e, eps in zip(ref.experts, (1e-5, 1e-2, 3e-3)):
        e.layer_norm.eps = eps
    fast = fast_nn.convert(copy.deepcopy(ref))
    h = torch.randn(2, 5, D) * 0.05
    with torch.no_grad():
        assert_parity(fast(h), copy.deepcopy(ref).double()(h.double()), TOL_CPU_FWD)


# ---------------------------------------------------------------------------------------------------
# ops/grouped_adapter.py
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_forward_fused_differentiates_base_alone(request, backend):
    """Frozen specialists, an input h without gradient, and a trainable base: d(out)/d(base) is the
    incoming gradient (the op must record the graph although only base requires grad)."""
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    ref, fast = _mos_pair()
    ref, fast = ref.to(device), fast.to(device)
    fast.requires_grad_(False)
    h, ids = torch.randn(3, 4, D, device=device), torch.tensor([0, 2, 1], device=device)
    base = torch.randn(3, 4, D, device=device, requires_grad=True)
    out = fast.forward_fused(h, base, ids)
    assert out.requires_grad
    gout = torch.randn_like(out)
    out.backward(gout)
    assert torch.equal(base.grad, gout)
    with torch.no_grad():
        tol = {"cpu": TOL_CPU_FWD if backend == "torch" else TOL_INTERPRETER}.get(str(device), TOL_CUDA_TF32)
        assert_parity(out, base + ref(h, ids), tol)


def _packed(bottlenecks=(8, 12, 16)):
    from mosaic_fast.ops.grouped_adapter import pack_adapters

    mos = randomize_(reference.MoSAdapter(D, *bottlenecks), std=0.2)
    tensors, rs = pack_adapters(mos.experts)
    return mos, [t.detach().clone() for t in tensors], rs


def test_grouped_adapter_refuses_empty_bottlenecks_and_mixed_weight_dtypes():
    from mosaic_fast.ops.grouped_adapter import grouped_adapter

    _, w, rs = _packed()
    h, ids = torch.randn(3, 2, D), torch.tensor([0, 1, 2])
    # a zero-width group: down_w/down_b/up_w shaped for it, so only the size check can catch it
    zero = [w[0], w[1], w[2][: rs[0] + rs[1]], w[3][: rs[0] + rs[1]], w[4][:, : rs[0] + rs[1]], w[5]]
    with pytest.raises(ValueError, match="bottlenecks"):
        grouped_adapter(h, *zero, [rs[0], rs[1], 0], expert_id=ids)
    for i in range(6):
        mixed = [t.double() if j == i else t for j, t in enumerate(w)]
        with pytest.raises(TypeError, match="one dtype"):
            grouped_adapter(h, *mixed, rs, expert_id=ids)


# ---------------------------------------------------------------------------------------------------
# bench/core.py (timing protocol, DESIGN.md §6) and the adapter floors
# ---------------------------------------------------------------------------------------------------


def _toy_case(calls, fast_error=0.0, fast_shape=None):
    from mosaic_fast.bench.core import Case

    def make(i):
        return (torch.randn(8, 8, generator=torch.Generator().manual_seed(i)) + 2.0, i)

    def impl(label):
        def run(x, i):
            calls.append((label, i))
            out = x * 3.0
            if label == "fast":
                out = out + fast_error * out.flip(0)
                if fast_shape is not None:
                    out = out.reshape(fast_shape)
            return out
        return run

    return Case("ops", "toy", {}, make, {"reference": impl("reference"), "fast": impl("fast")})


def test_time_case_warms_up_rotates_inputs_and_takes_medians(monkeypatch):
    """Every implementation is called (warm-up) before it is timed, the timed calls cycle through all
    input sets, and each figure is the median over the repeats."""
    from mosaic_fast.bench import core

    calls = []
    fake = {"reference": iter([9.0, 1.0, 4.0]), "fast": iter([0.5, 3.0, 2.0])}
    warm_before_timing = {}

    def fake_measure(fn, device, min_run_time=0.5, setup=None):
        label = next(lab for lab in ("reference", "fast") if fn.fn is _impls[lab])
        warm_before_timing.setdefault(label, sum(1 for lab, _ in calls if lab == label))
        for _ in range(6):
            fn()
        return next(fake[label])

    case = _toy_case(calls)
    _impls = case.impls
    monkeypatch.setattr(core, "measure", fake_measure)
    record = core.time_case(case, torch.device("cpu"), rotate=3, with_compile=False, repeats=3)
    assert record["times_s"] == {"reference": 4.0, "fast": 2.0}
    assert record["speedup_vs_reference"]["fast"] == pytest.approx(2.0)
    # 2 warm-up calls each (+1 agreement call for the reference, which runs first)
    assert warm_before_timing["reference"] >= 2 and warm_before_timing["fast"] >= 2
    timed = {lab: [i for lab2, i in calls if lab2 == lab and i != core.AGREEMENT_INPUT] for lab in _impls}
    for lab, seen in timed.items():
        assert set(seen) == {0, 1, 2}, lab


def test_time_case_reports_the_agreement_of_each_implementation():
    from mosaic_fast.bench import core

    for err in (0.0, 0.05):
        calls = []
        case = _toy_case(calls, fast_error=err)
        errors = core.output_errors(case, dict(case.impls))
        x = case.make_inputs(core.AGREEMENT_INPUT)[0].double() * 3.0
        want = float((err * x.flip(0)).norm() / x.norm())
        assert errors["fast"] == pytest.approx(want, rel=1e-6, abs=1e-12)
        assert ("fast", core.AGREEMENT_INPUT) in calls and ("reference", core.AGREEMENT_INPUT) in calls
    wrong_shape = _toy_case([], fast_shape=(4, 16))
    assert core.output_errors(wrong_shape, dict(wrong_shape.impls))["fast"] != core.output_errors(
        wrong_shape, dict(wrong_shape.impls))["fast"]  # NaN: another shape is never "agreeing"


def test_cpu_measure_returns_the_median_of_its_samples(monkeypatch):
    """CPU timing is torch.utils.benchmark's median (with a per-call setup: the median of >= 5 single
    calls), never the minimum or the mean."""
    from torch.utils import benchmark

    from mosaic_fast.bench import core

    samples = iter([5.0, 1.0, 4.0, 2.0, 3.0, 100.0, 100.0])

    class FakeTimer:
        def __init__(self, *args, **kwargs):
            pass

        def timeit(self, number=1):
            return type("M", (), {"median": next(samples)})()

        def blocked_autorange(self, min_run_time=0.2):
            return type("M", (), {"median": 2.0, "mean": 7.0})()

    monkeypatch.setattr(benchmark, "Timer", FakeTimer)
    assert core.measure(lambda: None, torch.device("cpu"), min_run_time=0.01, setup=lambda: None) == 3.0
    assert core.measure(lambda: None, torch.device("cpu"), min_run_time=0.01) == 2.0


def test_adapter_floor_counts_activations_and_every_weight_of_the_routed_specialists():
    """DESIGN §6: bytes = 3·T·D·elem (read h and base, write out) + the routed specialists' weights
    (LayerNorm weight and bias, down W and b, up W and b); flops = 4·T·D·r."""
    from mosaic_fast.bench.cases_adapter import cases

    d, tokens = 768, 197
    checked = 0
    for case in cases(torch.device("cpu"), torch.bfloat16, quick=True):
        b = case.params["B"]
        if case.params["pass"] != "fwd":
            continue
        checked += 1
        used = (192,) if "single" in case.name else (64, 96, 192)[: min(b, 3)]  # sample i goes to "ABC"[i % 3]
        weights = sum(2 * d + (d * r + r) + (r * d + d) for r in used)
        assert case.floor_bytes == (3 * b * tokens * d + weights) * 2, case.name
    assert checked == 4


def test_time_case_percent_of_floor_on_cuda_records(monkeypatch):
    """% of floor = 100 · floor / time (higher is better), from the case's floor and the ceilings."""
    from mosaic_fast.bench import core

    case = _toy_case([])
    case.floor_bytes, case.floor_flops = 6e9, 1e12
    times = {"reference": 0.004, "fast": 0.003}
    monkeypatch.setattr(core, "measure", lambda fn, *a, **k: times["fast" if fn.fn is case.impls["fast"] else
                                                                     "reference"])
    ceilings = {"bytes_per_s": 3e12, "flops_bf16": 1e15}
    record = core.time_case(case, torch.device("cuda"), rotate=2, with_compile=False, repeats=1, ceilings=ceilings)
    assert record["floor_s"] == pytest.approx(2e-3)
    assert record["pct_of_floor"] == pytest.approx({"reference": 50.0, "fast": 200.0 / 3})


# ---------------------------------------------------------------------------------------------------
# backend.py
# ---------------------------------------------------------------------------------------------------


def test_backend_environment_default_validation_and_interpreter_flag(monkeypatch):
    """MOSAIC_FAST_BACKEND sets the default ("auto" without it; a bad value is refused at import);
    TRITON_INTERPRET=1 (only) enables the interpreter; set_backend validates its argument."""
    import importlib

    import mosaic_fast
    from mosaic_fast import backend

    saved = {k: backend.__dict__[k] for k in ("_backend", "INTERPRET")}
    try:
        monkeypatch.delenv("MOSAIC_FAST_BACKEND", raising=False)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        importlib.reload(backend)
        assert backend.get_backend() == "auto" and backend.INTERPRET is False
        monkeypatch.setenv("MOSAIC_FAST_BACKEND", "torch")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        importlib.reload(backend)
        assert mosaic_fast.get_backend() == "torch" and backend.INTERPRET is True
        monkeypatch.setenv("MOSAIC_FAST_BACKEND", "gpu")
        with pytest.raises(ValueError, match="MOSAIC_FAST_BACKEND"):
            importlib.reload(backend)
    finally:
        backend.__dict__.update(saved)
    with pytest.raises(ValueError, match="backend"):
        mosaic_fast.set_backend("gpu")


def test_triton_backend_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    import mosaic_fast
    from mosaic_fast import backend

    monkeypatch.setattr(backend, "INTERPRET", False)
    monkeypatch.setattr(backend, "_TRITON_FOUND", True)
    mosaic_fast.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.use_triton(torch.empty(1))


def test_grouped_adapter_names_weights_on_another_device_or_of_an_integer_dtype():
    from mosaic_fast.ops.grouped_adapter import grouped_adapter

    _, w, rs = _packed()
    h, ids = torch.randn(3, 2, D), torch.tensor([0, 2, 1])
    with pytest.raises(ValueError, match="ln_w is on meta"):
        grouped_adapter(h, *[t.to("meta") for t in w], rs, expert_id=ids)
    with pytest.raises(TypeError, match="ln_w must be a floating tensor"):
        grouped_adapter(h, *[(t * 10).long() for t in w], rs, expert_id=ids)


def test_grouped_adapter_kernel_on_rows_with_a_strided_last_dim(triton_backend):
    """h and base viewed with a last-dim stride of 2 (every other channel of wider buffers)."""
    from mosaic_fast.ops.grouped_adapter import grouped_adapter

    device = triton_backend
    mos, w, rs = _packed()
    mos, w = mos.to(device), [t.to(device) for t in w]
    h = torch.randn(3, 4, 2 * D, device=device)[..., ::2]
    base = torch.randn(3, 4, 2 * D, device=device)[..., 1::2]
    ids = torch.tensor([2, 0, 1], device=device)
    assert h.stride(-1) == 2 and base.stride(-1) == 2
    with torch.no_grad():
        out = grouped_adapter(h, *w, rs, base=base, expert_id=ids)
        assert_parity(out, base + mos(h, ids), TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32)


def test_skip_router_with_tanh_gelu_is_not_given_the_exact_gelu_kernel(triton_backend):
    """The fused selection computes the exact GELU; a router built with GELU(approximate="tanh") must take
    the reference selection (same indices and gates as the reference module)."""
    device = triton_backend
    ref = randomize_(reference.SkipRouter(D, 0.5), std=0.5)
    ref.act = torch.nn.GELU(approximate="tanh")
    ref = ref.to(device)
    fast = fast_nn.convert(copy.deepcopy(ref))
    x = torch.randn(2, 9, D, device=device) * 3.0
    with torch.no_grad():
        idx_f, gate_f = fast.select(x)
        idx_r, gate_r = ref.select(x)
    assert torch.equal(idx_f, idx_r)
    assert_parity(gate_f, gate_r, 1e-6, "gates")


# ---------------------------------------------------------------------------------------------------
# ops/_common.py (argument checks, DESIGN.md §7)
# ---------------------------------------------------------------------------------------------------


def test_common_checks_name_device_rank_and_empty_index_errors():
    from mosaic_fast.ops.grouped_adapter import grouped_adapter
    from mosaic_fast.ops.token_skip import skip_merge

    x, rows = torch.randn(6, D), torch.tensor([0, 3])
    update, coef = torch.randn(2, D), torch.rand(2, 1)
    want = x.clone()
    want[rows] = x[rows] + coef * (update - x[rows])
    assert_parity(skip_merge(x, rows, update, coef), want, TOL_CPU_FWD)
    with pytest.raises(ValueError, match="update is on meta"):
        skip_merge(x, rows, update.to("meta"), coef)
    with pytest.raises(ValueError, match="rows must be empty"):
        skip_merge(torch.randn(0, D), rows, update, coef)
    _, w, rs = _packed()
    h, ids = torch.randn(3, 2, D), torch.tensor([0, 2, 1])
    with pytest.raises(ValueError, match="down_b must have shape"):
        grouped_adapter(h, w[0], w[1], w[2], w[3].unsqueeze(1), w[4], w[5], rs, expert_id=ids)
