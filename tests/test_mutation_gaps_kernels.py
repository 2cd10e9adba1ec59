"""Mutation gaps in the Triton kernels and their launchers (mosaic_fast/kernels/*.py).

The kernel tests elsewhere mostly use widths, bottlenecks and row counts that fit one tile or a whole
number of tiles, and the interpreter's one square block config. Here each kernel runs (in Triton's
interpreter on CPU, compiled on a GPU) on odd, non-power-of-two shapes: several row tiles, partial tiles
in every dimension, group sizes one row past a full tile, strided rows, block configs whose row and column
tiles differ (as the GPU autotuning configs do). Forward and backward against float64 references at the
DESIGN.md §5 tolerances; every parameter randomised.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from parity import TOL_CUDA_TF32, TOL_INTERPRETER, assert_grads_parity, assert_parity, randomize_, run_with_grads

from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.ops import grouped_adapter as ga


def _tol(device: str) -> float:
    return TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32


def _ga_kernels():
    from mosaic_fast.kernels import grouped_adapter as k

    return k


# ----------------------------------------------------------------------------------------------------
# Grouped adapter (kernels/grouped_adapter.py)
# ----------------------------------------------------------------------------------------------------


def _ga_weights(d, rs, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G, R = len(rs), sum(rs)

    def rnd(*shape, mean=0.0):
        return (torch.randn(*shape, generator=gen) * 0.3 + mean).to(device)

    return [rnd(G, d, mean=1.0), rnd(G, d), rnd(R, d), rnd(R), rnd(d, R), rnd(G, d)]


def _ga_reference(h, weights, rs, row_group, base=None, scale=0.1, eps=1e-5):
    """DESIGN.md §3 per row: base + s·(relu(LN_g(h) Wd_gᵀ + bd_g) Wu_gᵀ + bu_g); rows of no group are 0."""
    ln_w, ln_b, wd, bd, wu, bu = weights
    out = torch.zeros_like(h)
    o = 0
    for g, r in enumerate(rs):
        m = row_group == g
        y = F.layer_norm(h[m], (h.shape[-1],), ln_w[g], ln_b[g], eps)
        a = torch.relu(y @ wd[o : o + r].t() + bd[o : o + r])
        out = out.index_put((m,), (a @ wu[:, o : o + r].t() + bu[g]) * scale)
        o += r
    return out if base is None else out + base


def _same_layout(x):
    """A copy of x with x's strides (clone() makes a non-dense view contiguous)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)


def _ga_check(device, h, base, weights, rs, ids, row_group, dout):
    """Output and every gradient of the op against the float64 reference (h, base: (..., D) views)."""
    d = h.shape[-1]
    leaves = [_same_layout(h).requires_grad_()] + [w.clone().requires_grad_() for w in weights]
    b = _same_layout(base).requires_grad_()
    out = ga.grouped_adapter(leaves[0], *leaves[1:], rs, base=b, expert_id=ids)
    ref_leaves = [t.detach().double().requires_grad_() for t in (h, *weights)]
    b64 = base.detach().double().requires_grad_()
    ref = _ga_reference(ref_leaves[0].reshape(-1, d), ref_leaves[1:], rs, row_group, b64.reshape(-1, d))
    ref = ref.view(h.shape)
    tol = _tol(device)
    assert_parity(out, ref, tol, "output")
    out.backward(dout)
    ref.backward(dout.double())
    for name, f, r in zip(("h", "ln_w", "ln_b", "down_w", "down_b", "up_w", "up_b"), leaves, ref_leaves):
        assert_parity(f.grad, r.grad, tol, f"grad {name}")
    assert_parity(b.grad, b64.grad, tol, "grad base")


@pytest.mark.parametrize("routing", ["segments", "sorted"])
def test_grouped_groups_one_row_past_a_full_tile(triton_backend, monkeypatch, routing):
    """Per-row routing, three groups of 17 rows each (one row past a 16-row tile, two tiles each): the
    launch grid must cover cdiv(T, BM) + G tiles, not cdiv(T, BM) + 1. D = 24 and the bottlenecks 5/19/33
    are not multiples of the tiles. "sorted": the routing of many segments (device argsort)."""
    device = triton_backend
    if routing == "sorted":
        monkeypatch.setattr(_ga_kernels(), "SEG_MAX", 0)
    d, rs = 24, [5, 19, 33]
    gen = torch.Generator().manual_seed(11)
    row_group = torch.arange(51).remainder(3)[torch.randperm(51, generator=gen)].to(device)
    h = (torch.randn(51, d, generator=gen) + 0.5).to(device)
    base = torch.randn(51, d, generator=gen).to(device)
    dout = torch.randn(51, d, generator=gen).to(device)
    _ga_check(device, h, base, _ga_weights(d, rs, device), rs, row_group, row_group, dout)


@pytest.mark.parametrize("routing", ["segments", "sorted"])
def test_grouped_invalid_ids_as_a_fourth_partial_group(triton_backend, monkeypatch, routing):
    """Kernel level (the ops layer range-checks ids first): 3 groups of 17 rows plus 2 rows with ids -1
    and 3 (the pseudo-group of out-of-range ids, in both the in-kernel and the sorted routing): those rows
    are NaN in out and dh, every other row equals the reference, also with the tiles packed as tightly
    as the grid bound allows (2 + 2 + 2 + 1 tiles = cdiv(53, 16) + G)."""
    device = triton_backend
    k = _ga_kernels()
    if routing == "sorted":
        monkeypatch.setattr(k, "SEG_MAX", 0)
    d, rs = 24, [5, 19, 33]
    gen = torch.Generator().manual_seed(12)
    groups = torch.cat([torch.arange(51).remainder(3), torch.tensor([-1, 3])])
    ids = groups[torch.randperm(53, generator=gen)].to(device)
    h = (torch.randn(53, d, generator=gen) + 0.5).to(device)
    base = torch.randn(53, d, generator=gen).to(device)
    dout = torch.randn(53, d, generator=gen).to(device)
    weights = _ga_weights(d, rs, device)
    out, mean, rstd, a = k.forward(h, base, ids, 1, *weights, rs, 0.1, 1e-5, True)
    dh, *_ = k.backward(dout, h, ids, 1, *weights, rs, mean, rstd, a, 0.1, 1e-5, True, False)
    bad = (ids < 0) | (ids >= len(rs))
    assert torch.isnan(out[bad]).all() and torch.isnan(dh[bad]).all()
    ok = ~bad
    h64 = h.double().requires_grad_()
    ref = _ga_reference(h64, [w.double() for w in weights], rs, ids, base.double())
    ref.backward(dout.double())
    assert_parity(out[ok], ref[ok], _tol(device), "output of the valid rows")
    assert_parity(dh[ok], h64.grad[ok], _tol(device), "dh of the valid rows")


def test_grouped_rows_with_a_row_stride(triton_backend):
    """h, base and the output gradient as (B, N, D) slices of wider buffers: contiguous rows whose stride
    is not D (the reshape to (T, D) stays a view), so the kernels must use each tensor's own row stride."""
    device = triton_backend
    d, rs = 40, [7, 16, 33]
    gen = torch.Generator().manual_seed(13)
    h = (torch.randn(5, 3, d + 7, generator=gen) + 0.5).to(device)[..., :d]
    base = torch.randn(5, 3, d + 5, generator=gen).to(device)[..., 3 : 3 + d]
    dout = torch.randn(5, 3, d + 9, generator=gen).to(device)[..., 2 : 2 + d]
    assert _same_layout(h).reshape(15, d).stride(0) == d + 7 and _same_layout(base).reshape(15, d).stride(0) == d + 5
    ids = torch.tensor([2, 0, 1, 2, 0], device=device)
    row_group = ids.repeat_interleave(3)
    _ga_check(device, h, base, _ga_weights(d, rs, device), rs, ids, row_group, dout)


def test_grouped_strided_expert_ids(triton_backend):
    """expert_id as a column of a (B, 2) table (stride 2), e.g. ``meta[:, 0]``: the in-kernel routing reads
    the ids densely, so the launcher must not hand it a strided view (it read the other column: NaN rows)."""
    device = triton_backend
    d, rs = 24, [5, 19, 33]
    table = torch.tensor([[2, 7], [0, -1], [1, 7], [2, 3], [0, 5]], device=device)
    ids = table[:, 0]
    assert ids.stride(0) == 2
    gen = torch.Generator().manual_seed(15)
    h = (torch.randn(5, 3, d, generator=gen) + 0.5).to(device)
    base = torch.randn(5, 3, d, generator=gen).to(device)
    dout = torch.randn(5, 3, d, generator=gen).to(device)
    _ga_check(device, h, base, _ga_weights(d, rs, device), rs, ids, ids.repeat_interleave(3), dout)


def test_grouped_largest_bottleneck(triton_backend):
    """A group of bottleneck 256, the largest the kernels take ("any size up to 256"; nn falls back to
    torch only above it), next to one of 3: forward and backward on the kernels."""
    device = triton_backend
    d, rs = 24, [3, 256]
    gen = torch.Generator().manual_seed(18)
    ids = torch.tensor([1, 0, 1], device=device)
    h = (torch.randn(3, 5, d, generator=gen) + 0.5).to(device)
    base = torch.randn(3, 5, d, generator=gen).to(device)
    dout = torch.randn(3, 5, d, generator=gen).to(device)
    _ga_check(device, h, base, _ga_weights(d, rs, device), rs, ids, ids.repeat_interleave(5), dout)


def test_grouped_forward_with_an_up_chunk_wider_than_the_k_chunk(triton_backend, monkeypatch):
    """A forward config whose up-projection chunk (BN 32) is wider than its K chunk (BK 16), as several
    GPU configs are (BK 64 / BN 128): at D = 48 the K loop is even but the up loop is not, so the unmasked
    (EVEN_D) path must not be taken."""
    import triton

    device = triton_backend
    k = _ga_kernels()
    config = triton.Config({"BM": 16, "BK": 16, "BN": 32, "ONEPASS": False}, num_warps=4, num_stages=1)
    monkeypatch.setattr(k, "_fwd_two_pass", k._fwd_autotuner([config]))
    monkeypatch.setattr(k, "FORWARD_VARIANT", "fused")
    d, rs = 48, [7, 16, 33]
    gen = torch.Generator().manual_seed(14)
    h = (torch.randn(5, 3, d, generator=gen) + 0.5).to(device)
    base = torch.randn(5, 3, d, generator=gen).to(device)
    ids = torch.tensor([2, 0, 1, 2, 0], device=device)
    weights = _ga_weights(d, rs, device)
    with torch.no_grad():
        out = ga.grouped_adapter(h, *weights, rs, base=base, expert_id=ids)
    ref = _ga_reference(h.double().reshape(-1, d), [w.double() for w in weights], rs, ids.repeat_interleave(3),
                        base.double().reshape(-1, d))
    assert_parity(out, ref.view(h.shape), _tol(device), "output")


# ----------------------------------------------------------------------------------------------------
# Shared helpers for the nn modules
# ----------------------------------------------------------------------------------------------------


def _check_module(ref, fast, call, inputs, tol):
    """Outputs, input gradients and parameter gradients of ``fast`` against the float64 reference."""
    device = inputs[0].device
    r_out, r_in, r_par = run_with_grads(copy.deepcopy(ref).double().to(device), call, [x.double() for x in inputs])
    f_out, f_in, f_par = run_with_grads(fast.to(device), call, inputs)
    for i, (f, r) in enumerate(zip(f_out, r_out)):
        assert_parity(f, r, tol, f"output {i}")
    for i, (f, r) in enumerate(zip(f_in, r_in)):
        assert_parity(f, r, tol, f"input grad {i}")
    live = [n for n, g in r_par.items() if g.any()]
    assert_grads_parity({n: f_par[n] for n in live}, {n: r_par[n] for n in live}, tol)


def _count_calls(monkeypatch, module, name):
    """A list that gets one entry per call of ``module.name`` (a kernel launcher): proof the kernel ran."""
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _selection(b, n, kept, seed, device):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=gen)[:kept] for _ in range(b)])
    return idx.to(device), torch.rand(b, kept, generator=gen).to(device)


# ----------------------------------------------------------------------------------------------------
# Gated MoE adapter (kernels/moe_adapter.py for training, kernels/moe_routed.py for inference)
# ----------------------------------------------------------------------------------------------------

# D = 72 (three 32-wide column tiles, K chunks with a partial one), 5 experts top-3, bottleneck 11 (H = 55:
# two hidden chunks), gate width 36 (two channels per gate value; two gate chunks), 2 x 9 tokens (two
# 16-row tiles)
MOE = dict(d_model=72, num_experts=5, top_k=3, bottleneck=11, gate_dim=36)


def _moe_pair(device):
    ref = randomize_(reference.GatedMoEAdapter(**MOE), std=0.2, seed=5)
    fast = fast_nn.convert(copy.deepcopy(ref))
    assert type(fast) is fast_nn.GatedMoEAdapter
    return ref, fast.to(device)


def test_moe_training_odd_shapes(triton_backend):
    """Forward and backward, full and forward_skip (different selection sizes per stream)."""
    device = triton_backend
    ref, fast = _moe_pair(device)
    gen = torch.Generator().manual_seed(6)
    xg, xm = (torch.randn(2, 9, 72, generator=gen).to(device) for _ in range(2))
    tol = _tol(device)
    _check_module(ref, fast, lambda m, a, b: m(a, b), [xg, xm], tol)
    idx_g, gate_g = _selection(2, 9, 7, 1, device)
    idx_m, gate_m = _selection(2, 9, 4, 2, device)
    _check_module(ref, fast, lambda m, a, b: m.forward_skip(a, b, idx_g, gate_g.to(a.dtype), idx_m,
                                                            gate_m.to(a.dtype)), [xg, xm], tol)


def test_moe_fused_inference_odd_shapes(triton_backend, fused_op_calls):
    """Under no_grad (the routing-fused kernels): full forward, and forward_skip in place with 7 rows of
    one stream and 4 of the other selected per sample."""
    device = triton_backend
    ref, fast = _moe_pair(device)
    ref64, fast = ref.double().to(device), fast.eval()
    gen = torch.Generator().manual_seed(7)
    xg, xm = (torch.randn(2, 9, 72, generator=gen).to(device) for _ in range(2))
    idx_g, gate_g = _selection(2, 9, 7, 3, device)
    idx_m, gate_m = _selection(2, 9, 4, 4, device)
    tol = _tol(device)
    with torch.no_grad():
        want = ref64(xg.double(), xm.double())
        got = fast(xg, xm)
        for i in range(2):
            assert_parity(got[i], want[i], tol, f"full stream {i}")
        want = ref64.forward_skip(xg.double(), xm.double(), idx_g, gate_g.double(), idx_m, gate_m.double())
        got = fast.forward_skip(xg.clone(), xm.clone(), idx_g, gate_g, idx_m, gate_m, inplace=True)
        for i in range(2):
            assert_parity(got[i], want[i], tol, f"skip stream {i}")
    assert fused_op_calls["moe"] == 2


def test_moe_gated_update_in_place_with_non_contiguous_operands(triton_backend):
    """ops.moe_adapter.moe_gated_update(inplace=True) without gradients on the kernels, with transposed
    probabilities and gates and non-contiguous expert weights (the out-of-place path made them contiguous,
    the in-place one passed them to the kernels as they were: a silently wrong update). Against the
    formula of its docstring in float64; unselected rows stay untouched."""
    from mosaic_fast.ops.moe_adapter import moe_gated_update

    device = triton_backend
    m, d, n, r, k, g = 11, 40, 5, 11, 3, 8
    gen = torch.Generator().manual_seed(16)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    xg, xm = rnd(m, d), rnd(m, d)
    rows = {"gen": torch.tensor([3, 0, 7, 10, 5, 1, 8]), "med": torch.tensor([9, 2, 4, 6])}
    eidx = {s: torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(len(v))]) for s, v in rows.items()}
    probs = {s: torch.rand(k, len(v), generator=gen).to(device).t() for s, v in rows.items()}
    coef = {s: torch.rand(g, len(v), generator=gen).to(device).t() for s, v in rows.items()}
    w_down = rnd(n, 2 * d, r, std=0.2).transpose(1, 2)
    b_down = rnd(n, 2 * r, std=0.2)[:, ::2]
    w_up = rnd(n, r, d, std=0.2).transpose(1, 2)
    b_up = rnd(d, n, std=0.2).t()
    assert not any(t.is_contiguous() for t in (*probs.values(), *coef.values(), w_down, b_down, w_up, b_up))
    rows = {s: v.to(device) for s, v in rows.items()}
    eidx = {s: v.to(device) for s, v in eidx.items()}

    want = {}
    x64 = {"gen": xg.double(), "med": xm.double()}
    for s in ("gen", "med"):
        out = x64[s].clone()
        for t, row in enumerate(rows[s].tolist()):
            u = torch.cat([x64["gen"][row], x64["med"][row]])
            mix = sum(probs[s][t, j].double() * (torch.relu(w_down[e].double() @ u + b_down[e].double())
                                                 @ w_up[e].double().t() + b_up[e].double())
                      for j, e in enumerate(eidx[s][t].tolist()))
            c = coef[s][t].double().repeat_interleave(d // g)
            out[row] = x64[s][row] + c * (mix - x64[s][row])
        want[s] = out
    yg, ym = xg.clone(), xm.clone()
    with torch.no_grad():
        got = moe_gated_update(yg, ym, rows["gen"], rows["med"], eidx["gen"], probs["gen"], coef["gen"],
                               eidx["med"], probs["med"], coef["med"], w_down, b_down, w_up, b_up, inplace=True)
    assert got[0] is yg and got[1] is ym
    assert_parity(yg, want["gen"], _tol(device), "gen stream")
    assert_parity(ym, want["med"], _tol(device), "med stream")


def test_moe_down_config_pruning_keeps_dot_sized_k_chunks(monkeypatch):
    """The GPU configs of the down-projection kernel: bottlenecks above 128 get K chunks narrowed by
    128/BLOCK_R, but never below 16 (the smallest K a tl.dot takes, DESIGN.md kernel notes), however wide the
    bottleneck; up to BLOCK_R 128 the configs are kept as they are."""
    from mosaic_fast.kernels import moe_adapter as kma

    monkeypatch.setattr(kma, "_INTERPRET", False)
    configs = kma._down_configs()
    assert len(configs) > 1
    for block_r in (16, 64, 128, 256, 512, 1024):
        pruned = kma._prune_down(configs, {}, BLOCK_R=block_r)
        assert len(pruned) == len(configs)
        for c, p in zip(configs, pruned):
            want = c.kwargs["BK"] if block_r <= 128 else max(16, c.kwargs["BK"] * 128 // block_r)
            assert p.kwargs["BK"] == want >= 16
            assert (p.num_warps, p.num_stages) == (c.num_warps, c.num_stages)
    assert [c.kwargs["BK"] for c in configs] == [c.kwargs["BK"] for c in kma._down_configs()]  # not mutated


# ----------------------------------------------------------------------------------------------------
# Skip router (kernels/token_skip.py)
# ----------------------------------------------------------------------------------------------------


def _update(x_sel):
    return torch.tanh(x_sel) * 2.0 + x_sel.mean(dim=1, keepdim=True)


def test_skip_router_odd_shapes(triton_backend, fused_op_calls):
    """D = 84 (router hidden F = 21: a partial 16-wide chunk; two 64-wide merge column tiles), 19 tokens
    (two comparison chunks), 3 samples keeping 8 each (24 merged rows: two row tiles)."""
    device = triton_backend
    ref = randomize_(reference.SkipRouter(84, 0.4), std=0.2, seed=8)
    fast = fast_nn.convert(copy.deepcopy(ref))
    x = torch.randn(3, 19, 84, generator=torch.Generator().manual_seed(9)).to(device)
    _check_module(ref, fast, lambda m, a: m(a, _update), [x], _tol(device))
    with torch.no_grad():
        i_ref, g_ref = copy.deepcopy(ref).double().to(device).select(x.double())
        i_fast, g_fast = fast.select(x)
    assert fused_op_calls["select"] == 1
    assert torch.equal(i_fast, i_ref)
    assert_parity(g_fast, g_ref, _tol(device), "gates")


def test_skip_select_nan_score_ranks_first(triton_backend, fused_op_calls):
    """A token whose score is NaN (NaN features) ranks first, after the CLS token, as the reference's sort
    orders NaN; the kernel must not let it drop out of the ranking (which kept one token too many)."""
    device = triton_backend
    ref = randomize_(reference.SkipRouter(84, 0.4), std=0.2, seed=19)
    fast = fast_nn.convert(copy.deepcopy(ref)).to(device)
    x = torch.randn(2, 19, 84, generator=torch.Generator().manual_seed(20)).to(device)
    x[0, 6] = float("nan")
    x[1, 13, 3] = float("nan")
    with torch.no_grad():
        i_ref, g_ref = copy.deepcopy(ref).double().to(device).select(x.double())
        i_fast, g_fast = fast.select(x)
    assert fused_op_calls["select"] == 1
    assert (i_ref == 6).any(dim=1).tolist() == [True, False] and (i_ref == 13).any(dim=1).tolist() == [False, True]
    assert torch.equal(i_fast, i_ref)
    nan = torch.isnan(g_ref)
    assert torch.equal(torch.isnan(g_fast), nan) and nan.sum() == 2
    assert_parity(g_fast[~nan], g_ref[~nan], _tol(device), "gates")


# ----------------------------------------------------------------------------------------------------
# Gated specialist adapter (kernels/gated_specialist.py)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_gated_specialist_odd_shapes(triton_backend, monkeypatch, gate):
    """D = 84 (partial K chunk and column tile), bottlenecks 5/19/13 (R = 37: two 32-wide hidden tiles),
    19 tokens (two row tiles)."""
    from mosaic_fast.kernels import gated_specialist as kgs

    device = triton_backend
    down, up = _count_calls(monkeypatch, kgs, "gs_down"), _count_calls(monkeypatch, kgs, "gs_up")
    ref = randomize_(reference.GatedSpecialistAdapter(84, (5, 19, 13), gate), std=0.2, seed=10)
    with torch.no_grad():  # LayerNorm affines far from identity, so the folding is exercised
        for e in ref.experts:
            e.layer_norm.weight.uniform_(0.5, 1.5)
            e.layer_norm.bias.normal_(0.0, 0.5)
    fast = fast_nn.convert(copy.deepcopy(ref))
    h = torch.randn(1, 19, 84, generator=torch.Generator().manual_seed(11)).to(device) + 0.5
    _check_module(ref, fast, lambda m, x: m(x), [h], _tol(device))
    assert down and up


# ----------------------------------------------------------------------------------------------------
# 3D patch embedding (kernels/patch_embed3d.py)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [None, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 3}],
    ids=["default", "rectangular"],
)
def test_patch_embed3d_many_row_tiles(triton_backend, monkeypatch, config):
    """200 patches: 7 row tiles of 32, in GROUP_M groups of 4 and 3 (a last group narrower than GROUP_M),
    E = 37 (a partial column tile), K = 3·2·3·2 = 36.
    "rectangular": row and column tiles of different sizes and GROUP_M 3 (the GPU autotuner's configs are
    rectangular too), 13 row tiles in groups of 3, 3, 3, 3, 1."""
    from mosaic_fast.kernels import patch_embed3d as kpe

    device = triton_backend
    if config is not None:
        if device != "cpu":
            pytest.skip("the interpreter's block config")
        monkeypatch.setattr(kpe, "_INTERPRETER_CONFIG", config)
    calls = _count_calls(monkeypatch, kpe, "patch_embed3d_fwd")
    ref = randomize_(reference.PatchEmbed3D((4, 12, 10), (2, 3, 2), 3, 37), seed=12)
    fast = fast_nn.PatchEmbed3D((4, 12, 10), (2, 3, 2), 3, 37)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 4, 12, 10, generator=torch.Generator().manual_seed(13)).to(device)
    _check_module(ref, fast, lambda m, v: m(v), [x], _tol(device))
    assert calls


def test_patch_embed3d_proj_with_a_strided_bias(triton_backend):
    """ops.patch_embed3d_proj with a bias that is a strided view (every other element of a buffer) and a
    non-contiguous weight: the kernel reads the bias densely, so the launcher must not pass the view
    (it added the wrong elements). Odd shapes: 3 channels, patch (2, 3, 2), 60 patches, E = 37. Forward
    and backward against a float64 Conv3d."""
    from mosaic_fast.ops.patch_embed3d import patch_embed3d_proj

    device = triton_backend
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 3, 4, 9, 10, generator=gen).to(device)
    w_buf = torch.randn(3, 37, 2, 3, 2, generator=gen).to(device).requires_grad_()
    b_buf = torch.randn(74, generator=gen).to(device).requires_grad_()
    x_leaf = x.clone().requires_grad_()
    w, b = w_buf.transpose(0, 1), b_buf[::2]
    assert not w.is_contiguous() and b.stride(0) == 2
    out = patch_embed3d_proj(x_leaf, w, b, (2, 3, 2), 0.5, 0.25)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.conv3d(x64 * 0.5 + 0.25, w64, b64, stride=(2, 3, 2)).flatten(2).transpose(1, 2)
    tol = _tol(device)
    assert_parity(out, ref, tol, "output")
    g = torch.randn(ref.shape, generator=gen).to(device)
    out.backward(g)
    ref.backward(g.double())
    assert_parity(x_leaf.grad, x64.grad, tol, "grad x")
    assert_parity(w_buf.grad.transpose(0, 1), w64.grad, tol, "grad weight")
    assert_parity(b_buf.grad[::2], b64.grad, tol, "grad bias")
    assert not b_buf.grad[1::2].any()
