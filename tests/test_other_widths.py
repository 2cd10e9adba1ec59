"""The Triton kernels at ViT widths other than ViT-B's D = 768, in Triton's interpreter (compiled on a GPU).

The other kernel tests run at D = 32/40/48; users drop the modules into ViT-Ti/S/L/H (D = 192, 384, 1024,
1280) and odd configurations. Here every fast module runs forward and backward against its float64
reference at D = 192 (ViT-Ti), 1024 (ViT-L) and widths that are not multiples of 16 (100, 200), with odd
bottlenecks (1, 7, 200), 1/3/8 experts with top-k 1 or n, gate widths 1 and D/4. A covering subset, not
the full product (the interpreter is slow): each case names what it adds. Each test also checks that the
kernels it is about really ran (``launches``), so a silent torch fallback cannot pass for them.
Shared-memory checks at these widths for sm_90: tests/sm90_compile.py (``--widths``).
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from parity import TOL_CUDA_TF32, TOL_INTERPRETER, assert_grads_parity, assert_parity, randomize_, run_with_grads

from mosaic_fast import nn as fast_nn
from mosaic_fast import reference


def _tol(device: str) -> float:
    return TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32


def _std(d: int) -> float:
    """Parameter noise that keeps pre-activations O(1) at any width. (A fixed 0.2 at D = 1024 saturates the
    skip router's sigmoid: its fc1 gradient then cancels so far that even the float32 reference misses the
    float64 one by ~7e-4, which would test float32, not the kernels.)"""
    return min(0.2, 2.0 / d**0.5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: kernel module -> the launchers of kernels/*.py that the ops call (looked up at call time)
LAUNCHERS = {
    "grouped_adapter": ("forward", "backward"),
    "moe_adapter": ("moe_down", "moe_combine"),
    "moe_routed": ("moe_routed_update",),
    "token_skip": ("skip_merge", "skip_select"),
    "gated_specialist": ("gs_down", "gs_up"),
    "patch_embed3d": ("patch_embed3d_fwd",),
}


@pytest.fixture
def launches(monkeypatch):
    """Counter of kernel-launcher calls, keyed ``module.launcher``."""
    import importlib

    calls: Counter = Counter()
    for mod_name, names in LAUNCHERS.items():
        module = importlib.import_module(f"mosaic_fast.kernels.{mod_name}")
        for name in names:
            real = getattr(module, name)

            def counted(*args, _real=real, _key=f"{mod_name}.{name}", **kwargs):
                calls[_key] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    return calls


def _check(ref, fast, call, inputs, tol, same_grad_set=True):
    """Forward and backward of ``fast`` (fp32) against the float64 reference (which gets integer inputs
    as float64 too)."""
    device = inputs[0].device
    ref64 = copy.deepcopy(ref).double().to(device)
    r_out, r_in, r_par = run_with_grads(ref64, call, [x.double() for x in inputs])
    f_out, f_in, f_par = run_with_grads(fast.to(device), call, inputs)
    for i, (f, r) in enumerate(zip(f_out, r_out)):
        assert_parity(f, r, tol, f"output {i}")
    for i, (f, r) in enumerate(zip(f_in, r_in)):
        assert_parity(f, r, tol, f"input grad {i}")
    if same_grad_set:
        assert set(f_par) == set(r_par), f"parameters with gradients differ: {sorted(set(f_par) ^ set(r_par))}"
    # a parameter the reference routes no signal to (e.g. the router under top_k = 1) must get none either
    zero = {n for n, g in r_par.items() if not g.any()}
    for n in zero:
        assert n not in f_par or not f_par[n].any(), f"{n}: reference gradient is 0, fast is not"
    keep = [n for n in r_par if n not in zero]
    assert_grads_parity({n: f_par[n] for n in keep}, {n: r_par[n] for n in keep}, tol)


# ----------------------------------------------------------------------------------------------------
# Adapter / MoSAdapter (grouped adapter kernels)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("d", "r"), [(192, 7), (1024, 1)], ids=["ViT-Ti-r7", "ViT-L-r1"])
def test_adapter(triton_backend, launches, d, r):
    device = triton_backend
    ref = randomize_(reference.Adapter(d, r), seed=d + r)
    fast = fast_nn.Adapter(d, r)
    fast.load_state_dict(ref.state_dict())
    h = torch.randn(2, 3, d, device=device) + 0.5
    base = torch.randn(2, 3, d, device=device)
    _check(
        ref,
        fast,
        lambda m, x, b: m.forward_fused(x, b) if hasattr(m, "forward_fused") else b + m(x),
        [h, base],
        _tol(device),
    )
    if d < 1024:  # no base (the interpreter needs ~3 s per check at D = 1024)
        _check(ref, fast, lambda m, x: m(x), [h], _tol(device))
    assert launches["grouped_adapter.forward"] >= 1 and launches["grouped_adapter.backward"] >= 1


# (d, bottlenecks A/B/C, expert ids): ViT-Ti with MOSAIC's bottlenecks, a mixed batch without specialist C;
# ViT-L with odd bottlenecks (C absent); an odd width with r = 200 > D and whole-batch letters (one group,
# as nn.Adapter runs); an odd width with all three groups mixed. (The weight-gradient kernel runs
# G·⌈r_max/16⌉·⌈D/16⌉ programs in the interpreter, ~25 ms each: r_max and D are not both large here.)
MOS_CASES = [
    (192, (64, 96, 192), [1, 0, 0]),
    (1024, (1, 7, 200), [1, 0, 0]),
    (100, (7, 1, 200), "C"),
    (200, (7, 1, 33), [2, 0, 1, 2]),
]


@pytest.mark.parametrize(("d", "bottlenecks", "expert_id"), MOS_CASES, ids=["ViT-Ti", "ViT-L-odd-r", "D100-C", "D200"])
def test_mos_adapter(triton_backend, launches, d, bottlenecks, expert_id):
    device = triton_backend
    ra, rb, rc = bottlenecks
    ref = randomize_(reference.MoSAdapter(d, ra, rb, rc), seed=d)
    fast = fast_nn.MoSAdapter(d, ra, rb, rc)
    fast.load_state_dict(ref.state_dict())
    b = len(expert_id) if isinstance(expert_id, list) else 2
    ids = torch.tensor(expert_id, device=device) if isinstance(expert_id, list) else expert_id
    h = torch.randn(b, 3, d, device=device) + 0.5
    base = torch.randn(b, 3, d, device=device)
    tol = _tol(device)
    _check(
        ref,
        fast,
        lambda m, x, bs: m.forward_fused(x, bs, ids) if hasattr(m, "forward_fused") else bs + m(x, ids),
        [h, base],
        tol,
    )
    if isinstance(expert_id, str):
        _check(ref, fast, lambda m, x: m(x, "A"), [h], tol)
    assert launches["grouped_adapter.forward"] >= 1 and launches["grouped_adapter.backward"] >= 1


# ----------------------------------------------------------------------------------------------------
# GatedMoEAdapter (MoE adapter kernels for training, routed MoE kernels for inference)
# ----------------------------------------------------------------------------------------------------

# (d, num_experts, top_k, gate_dim, bottleneck); forward_skip's training path runs for the first two
MOE_CASES = [
    (1024, 3, 3, 1, 1),  # ViT-L, top-k = n, one gate value, r = 1
    (100, 1, 1, 25, 200),  # odd width, one expert, r = 200 > D (moe_adapter's narrower K chunks for r > 128)
    (192, 8, 1, 48, 7),  # ViT-Ti, 8 experts top-1, gate D/4
    (200, 8, 8, 1, 7),  # odd width, dense top-8
]
MOE_IDS = ["ViT-L-n3k3-g1-r1", "D100-n1-r200", "ViT-Ti-n8k1", "D200-n8k8"]


def _moe_pair(d, n, k, g, r):
    ref = randomize_(reference.GatedMoEAdapter(d, n, k, r, g), std=_std(d), seed=d + n)
    fast = fast_nn.convert(copy.deepcopy(ref))
    assert type(fast) is fast_nn.GatedMoEAdapter
    return ref, fast


def _selection(b, n, kept, seed, device):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=gen)[:kept] for _ in range(b)])
    return idx.to(device), torch.rand(b, kept, generator=gen).to(device)


@pytest.mark.parametrize(("d", "n", "k", "g", "r"), MOE_CASES, ids=MOE_IDS)
def test_gated_moe_training(triton_backend, launches, d, n, k, g, r):
    """Forward and backward, full and ``forward_skip`` (the differentiable path: moe_adapter kernels)."""
    device = triton_backend
    ref, fast = _moe_pair(d, n, k, g, r)
    xg, xm = (torch.randn(2, 5, d, device=device) for _ in range(2))
    tol = _tol(device)
    _check(ref, fast, lambda m, a, b: m(a, b), [xg, xm], tol)
    if (d, n, k, g, r) not in MOE_CASES[:2]:
        assert launches["moe_adapter.moe_down"] >= 1 and launches["moe_adapter.moe_combine"] >= 2
        return
    idx_g, gate_g = _selection(2, 5, 3, 1, device)
    idx_m, gate_m = _selection(2, 5, 2, 2, device)

    def skip(m, a, b):
        dt = a.dtype
        return m.forward_skip(a, b, idx_g, gate_g.to(dt), idx_m, gate_m.to(dt))

    _check(ref, fast, skip, [xg, xm], tol)
    assert launches["moe_adapter.moe_down"] >= 2 and launches["moe_adapter.moe_combine"] >= 2


@pytest.mark.parametrize(("d", "n", "k", "g", "r"), MOE_CASES, ids=MOE_IDS)
def test_gated_moe_fused_inference(triton_backend, launches, d, n, k, g, r):
    """Under no_grad: the routing-fused kernels, full forward and ``forward_skip`` in place."""
    device = triton_backend
    ref, fast = _moe_pair(d, n, k, g, r)
    ref64, fast = ref.double().to(device), fast.to(device).eval()
    xg, xm = (torch.randn(2, 5, d, device=device) for _ in range(2))
    idx_g, gate_g = _selection(2, 5, 1, 3, device)
    idx_m, gate_m = _selection(2, 5, 5, 4, device)
    tol = _tol(device)
    with torch.no_grad():
        want = ref64(xg.double(), xm.double())
        got = fast(xg, xm)
        for i in range(2):
            assert_parity(got[i], want[i], tol, f"full stream {i}")
        want = ref64.forward_skip(xg.double(), xm.double(), idx_g, gate_g.double(), idx_m, gate_m.double())
        yg, ym = xg.clone(), xm.clone()
        got = fast.forward_skip(yg, ym, idx_g, gate_g, idx_m, gate_m, inplace=True)
        assert got[0] is yg and got[1] is ym
        for i in range(2):
            assert_parity(got[i], want[i], tol, f"skip stream {i}")
    assert launches["moe_routed.moe_routed_update"] == 2


def test_gated_moe_gate_dim_must_divide_odd_width():
    with pytest.raises(ValueError, match=r"gate_dim must divide d_model=100 .*got 30"):
        fast_nn.GatedMoEAdapter(100, 4, 2, 16, 30)
    with pytest.raises(ValueError, match=r"gate_dim must divide d_model=200 .*got 768.*gate_dim=None means D"):
        fast_nn.GatedMoEAdapter(200)


# ----------------------------------------------------------------------------------------------------
# SkipRouter (token-skip selection and merge kernels)
# ----------------------------------------------------------------------------------------------------


def _update(x_sel):
    return torch.tanh(x_sel) * 2.0 + x_sel.mean(dim=1, keepdim=True)


@pytest.mark.parametrize(
    ("d", "keep_ratio", "n"), [(192, 0.5, 9), (1024, 0.3, 7), (100, 0.5, 6)], ids=["ViT-Ti", "ViT-L", "D100"]
)
def test_skip_router(triton_backend, launches, d, keep_ratio, n):
    device = triton_backend
    ref = randomize_(reference.SkipRouter(d, keep_ratio), std=_std(d), seed=d)
    fast = fast_nn.convert(copy.deepcopy(ref))
    x = torch.randn(2, n, d, device=device)
    tol = _tol(device)
    _check(ref, fast, lambda m, a: m(a, _update), [x], tol)
    with torch.no_grad():  # the fused selection kernel
        i_ref, g_ref = copy.deepcopy(ref).double().to(device).select(x.double())
        i_fast, g_fast = fast.select(x)
        assert torch.equal(i_fast, i_ref)
        assert_parity(g_fast, g_ref, tol, "gates")
    assert launches["token_skip.skip_merge"] >= 1 and launches["token_skip.skip_select"] == 1


# ----------------------------------------------------------------------------------------------------
# GatedSpecialistAdapter (gated specialist kernels)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "bottlenecks", "gate"),
    [
        (192, (64, 96, 192), "channel"),
        (1024, (1, 7, 200), "expert"),
        (100, (7, 1, 200), "channel"),
        (200, (200, 7, 1), "expert"),
    ],
    ids=["ViT-Ti-channel", "ViT-L-expert", "D100-channel", "D200-expert"],
)
def test_gated_specialist(triton_backend, launches, d, bottlenecks, gate):
    device = triton_backend
    ref = randomize_(reference.GatedSpecialistAdapter(d, bottlenecks, gate), std=_std(d), seed=d)
    with torch.no_grad():  # LayerNorm affines far from identity, so the folding is exercised
        for e in ref.experts:
            e.layer_norm.weight.uniform_(0.5, 1.5)
            e.layer_norm.bias.normal_(0.0, 0.5)
    fast = fast_nn.convert(copy.deepcopy(ref))
    _check(ref, fast, lambda m, h: m(h), [torch.randn(1, 5, d, device=device)], _tol(device))
    assert launches["gated_specialist.gs_down"] >= 1 and launches["gated_specialist.gs_up"] >= 1


# ----------------------------------------------------------------------------------------------------
# PatchEmbed3D (3D patch embedding kernel)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("embed_dim", "dtype"),
    [(192, torch.uint8), (1024, torch.float32), (100, torch.float32)],
    ids=["ViT-Ti-u8", "ViT-L-f32", "E100-f32"],
)
def test_patch_embed3d(triton_backend, launches, embed_dim, dtype):
    device = triton_backend
    ref = randomize_(reference.PatchEmbed3D(16, 8, 1, embed_dim), seed=embed_dim)
    fast = fast_nn.PatchEmbed3D(16, 8, 1, embed_dim)
    fast.load_state_dict(ref.state_dict())
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (2, 1, 16, 16, 16), dtype=dtype, device=device)
    else:
        x = torch.randn(1, 1, 16, 16, 16, device=device)
    _check(ref, fast, lambda m, v: m(v), [x], _tol(device))
    assert launches["patch_embed3d.patch_embed3d_fwd"] >= 1
