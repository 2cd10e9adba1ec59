"""Grouped specialist-adapter op (mosaic_fast.ops.grouped_adapter): parity, routing edge cases, bad input.

Parity follows DESIGN.md §5: fresh random inputs and parameters (no zero up-projections), outputs
poisoned before the call (torch.empty inside the op; the Triton path writes every row), relative error
against a float64 reference. CPU fallback: 1e-5 forward / 1e-4 grads; Triton interpreter: 1e-4; CUDA:
TF32 3e-3, bf16 2e-2, fp16 5e-3 plus the 2x-of-same-dtype-reference rule.
"""

import pytest
import torch
from parity import (
    TOL_BF16,
    TOL_CPU_FWD,
    TOL_CPU_GRAD,
    TOL_CUDA_TF32,
    TOL_FP16,
    TOL_INTERPRETER,
    assert_parity,
    rel_err,
)

import mosaic_fast
from mosaic_fast.backend import INTERPRET, triton_available
from mosaic_fast.ops import grouped_adapter as ga

NAMES = ("ln_w", "ln_b", "down_w", "down_b", "up_w", "up_b")


def make_weights(D, bottlenecks, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    G, R = len(bottlenecks), sum(bottlenecks)

    def rnd(*shape, std=0.3, mean=0.0):
        return (torch.randn(*shape, generator=gen) * std + mean).to(device=device, dtype=dtype)

    return [rnd(G, D, mean=1.0), rnd(G, D), rnd(R, D), rnd(R), rnd(D, R), rnd(G, D)]


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, generator=gen) + 0.5).to(device=device, dtype=dtype)
    base = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    return h, base


def reference(h, weights, bottlenecks, expert_id=None, base=None, scale=0.1, eps=1e-5):
    """Per-row float64 (or given dtype) reference built from plain torch ops; differentiable."""
    ln_w, ln_b, wd, bd, wu, bu = weights
    D = h.shape[-1]
    offs = ga.group_offsets(bottlenecks)
    x = h.reshape(-1, D)
    if expert_id is None:
        row_group = torch.zeros(x.shape[0], dtype=torch.long, device=h.device)
    else:
        row_group = expert_id.long().repeat_interleave(x.shape[0] // max(1, expert_id.shape[0]))
    out = torch.zeros_like(x)
    for g, r in enumerate(bottlenecks):
        mask = row_group == g
        if not bool(mask.any()):
            continue
        o = offs[g]
        y = torch.nn.functional.layer_norm(x[mask], (D,), ln_w[g], ln_b[g], eps)
        a = torch.relu(y @ wd[o : o + r].t() + bd[o : o + r])
        out = out.index_put((mask,), (a @ wu[:, o : o + r].t() + bu[g]) * scale)
    out = out.reshape(h.shape)
    return out if base is None else base + out


def run_parity(device, dtype, shape, bottlenecks, expert_id, with_base, tol_fwd, tol_grad, seed=0, scale=0.1,
               eps=1e-5, h_scale=1.0):
    D = shape[-1]
    weights = make_weights(D, bottlenecks, dtype=dtype, device=device, seed=seed)
    h, base = make_inputs(shape, dtype=dtype, device=device, seed=seed + 1)
    h = h * h_scale
    ids = None if expert_id is None else expert_id.to(device)
    leaves = [t.clone().requires_grad_() for t in (h, base, *weights)]
    out = ga.grouped_adapter(
        leaves[0], *leaves[2:], bottlenecks, base=leaves[1] if with_base else None, expert_id=ids, scale=scale,
        eps=eps,
    )
    assert out.dtype == dtype and out.shape == h.shape
    ref_leaves = [t.detach().double().requires_grad_() for t in (h, base, *weights)]
    ref = reference(ref_leaves[0], ref_leaves[2:], bottlenecks, None if ids is None else ids,
                    base=ref_leaves[1] if with_base else None, scale=scale, eps=eps)
    assert_parity(out, ref, tol_fwd, "output")
    gout = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 7)).to(device=device, dtype=dtype)
    out.backward(gout)
    ref.backward(gout.double())
    names = ("h", "base", *NAMES)
    for name, fast_leaf, ref_leaf in zip(names, leaves, ref_leaves):
        if name == "base" and not with_base:
            assert fast_leaf.grad is None
            continue
        if ref_leaf.grad is None or float(ref_leaf.grad.norm()) == 0.0:
            assert fast_leaf.grad is None or float(fast_leaf.grad.abs().max()) == 0.0, name
            continue
        assert_parity(fast_leaf.grad, ref_leaf.grad, tol_grad, f"grad {name}")
    return out


MIXED = torch.tensor([2, 0, 1, 2, 0])


# ----------------------------------------------------------------------------------------------------
# CPU torch fallback
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize(
    "routing", ["single", "mixed", "one_group_only", "empty_group", "per_row"]
)
def test_cpu_fallback_parity(routing, with_base):
    mosaic_fast.set_backend("torch")
    rs = [16, 24, 48]
    if routing == "single":
        rs, ids, shape = [24], None, (3, 7, 32)
    elif routing == "mixed":
        ids, shape = MIXED, (5, 7, 32)
    elif routing == "one_group_only":
        ids, shape = torch.tensor([1, 1, 1]), (3, 7, 32)
    elif routing == "empty_group":
        ids, shape = torch.tensor([0, 2, 2, 0]), (4, 6, 32)
    else:
        ids, shape = torch.tensor([0, 2, 1, 1, 2, 0, 2, 1, 0, 0]), (10, 32)
    run_parity("cpu", torch.float32, shape, rs, ids, with_base, TOL_CPU_FWD, TOL_CPU_GRAD)


def test_cpu_fallback_int32_ids_and_single_token():
    mosaic_fast.set_backend("torch")
    run_parity("cpu", torch.float32, (1, 1, 32), [16, 32], torch.tensor([1], dtype=torch.int32), True,
               TOL_CPU_FWD, TOL_CPU_GRAD)


def test_cpu_fallback_non_contiguous_inputs():
    mosaic_fast.set_backend("torch")
    rs = [16, 32, 16]
    weights = make_weights(32, rs)
    h_full, base_full = make_inputs((7, 4, 64))
    h = h_full[..., ::2].transpose(0, 1)  # (4, 7, 32), non-contiguous
    base = base_full[..., 1::2].transpose(0, 1)
    ids = torch.tensor([2, 0, 1, 1])
    assert not h.is_contiguous()
    out = ga.grouped_adapter(h, *weights, rs, base=base, expert_id=ids)
    ref = reference(h.double(), [w.double() for w in weights], rs, ids, base=base.double())
    assert_parity(out, ref, TOL_CPU_FWD)


#: A scale other than the default 0.1 and an eps that matters: h is scaled so that its per-row variance
#: (~1e-4) is below eps (1e-3); with eps = 1e-5 instead, LN(h) would be ~3x larger.
SCALE_EPS = dict(scale=0.37, eps=1e-3, h_scale=0.01)


@pytest.mark.parametrize("routing", ["single", "mixed"])
def test_cpu_fallback_non_default_scale_and_eps(routing):
    mosaic_fast.set_backend("torch")
    rs, ids, shape = ([24], None, (3, 7, 32)) if routing == "single" else ([16, 24, 48], MIXED, (5, 7, 32))
    run_parity("cpu", torch.float32, shape, rs, ids, True, TOL_CPU_FWD, TOL_CPU_GRAD, **SCALE_EPS)
    run_parity("cpu", torch.float32, shape, rs, ids, False, TOL_CPU_FWD, TOL_CPU_GRAD, **SCALE_EPS)


def test_empty_batch():
    for backend in ("torch",):
        mosaic_fast.set_backend(backend)
        weights = [w.requires_grad_() for w in make_weights(32, [16, 32])]
        h = torch.randn(0, 5, 32, requires_grad=True)
        out = ga.grouped_adapter(h, *weights, [16, 32], base=torch.randn(0, 5, 32),
                                 expert_id=torch.zeros(0, dtype=torch.long))
        assert out.shape == (0, 5, 32)
        out.sum().backward()
        assert h.grad.shape == h.shape
        assert all(float(w.grad.abs().sum()) == 0.0 for w in weights)


def test_no_grad_skips_saving():
    mosaic_fast.set_backend("torch")
    weights = make_weights(32, [16])
    h, base = make_inputs((4, 32))
    out = torch.ops.mosaic_fast.grouped_adapter_fwd(h, base, None, 4, *weights, [16], 0.1, 1e-5, False)
    assert out[1].numel() == 0 and out[3].numel() == 0


# ----------------------------------------------------------------------------------------------------
# Triton kernels: interpreter on CPU (CI), compiled on CUDA
# ----------------------------------------------------------------------------------------------------


def _kernels():
    from mosaic_fast.kernels import grouped_adapter as k

    return k


def _tol(device):
    return (TOL_INTERPRETER, TOL_INTERPRETER) if device == "cpu" else (TOL_CUDA_TF32, TOL_CUDA_TF32)


@pytest.fixture(params=["fused", "split", "onepass"])
def forward_variant(request, monkeypatch):
    """Every forward variant of the kernels (kernels.grouped_adapter.FORWARD_VARIANT)."""
    monkeypatch.setattr(_kernels(), "FORWARD_VARIANT", request.param)
    return request.param


@pytest.mark.parametrize(
    "case",
    ["mixed_seg", "mixed_perm", "single", "empty_group", "odd_width", "recompute_split", "per_row", "no_base"],
)
def test_triton_parity(triton_backend, forward_variant, monkeypatch, case):
    device = triton_backend
    k = _kernels()
    rs, shape, ids, with_base = [16, 32, 48], (5, 6, 32), MIXED, True
    if case == "mixed_perm":
        monkeypatch.setattr(k, "SEG_MAX", 0)  # sorted-segment routing (argsort on the device)
    elif case == "single":
        rs, ids = [48], None
    elif case == "empty_group":
        ids = torch.tensor([0, 2, 0, 2, 2])
    elif case == "odd_width":
        shape, rs = (5, 3, 40), [16, 24, 40]  # D and bottlenecks not multiples of the tiles
    elif case == "recompute_split":
        monkeypatch.setattr(k, "SAVE_PREACT", False)
        monkeypatch.setattr(k, "WGRAD_SPLIT", 3)
        shape = (5, 9, 32)
    elif case == "per_row":
        shape, ids = (20, 32), torch.arange(20) % 3
    elif case == "no_base":
        with_base = False
    tol_fwd, tol_grad = _tol(device)
    run_parity(device, torch.float32, shape, rs, ids, with_base, tol_fwd, tol_grad)


@pytest.mark.parametrize("routing", ["single", "mixed"])
def test_triton_non_default_scale_and_eps(triton_backend, forward_variant, routing):
    rs, ids = ([48], None) if routing == "single" else ([16, 32, 48], MIXED)
    tol_fwd, tol_grad = _tol(triton_backend)
    run_parity(triton_backend, torch.float32, (5, 3, 32), rs, ids, True, tol_fwd, tol_grad, **SCALE_EPS)


def test_triton_rows_with_large_mean(triton_backend, forward_variant):
    """Rows whose mean is 100x their spread (residual streams can look like that): the one-pass variant's
    shifted sums must not cancel (its plain E[x²] - E[x]² would lose ~4 digits here)."""
    device = triton_backend
    rs = [16, 32, 48]
    weights = make_weights(32, rs, device=device)
    gen = torch.Generator().manual_seed(3)
    h = (torch.randn(5, 6, 32, generator=gen) * 0.5 + 50.0).to(device)
    base = torch.randn(5, 6, 32, generator=gen).to(device)
    ids = MIXED.to(device)
    out = ga.grouped_adapter(h, *weights, rs, base=base, expert_id=ids)
    ref = reference(h.double(), [w.double() for w in weights], rs, ids, base=base.double())
    assert_parity(out - base, ref - base.double(), _tol(device)[0], "adapter output")


def test_triton_many_segments_chunked(triton_backend):
    """More segments than one routing chunk (16 ids per chunk under the interpreter)."""
    device = triton_backend
    ids = torch.tensor([(7 * i) % 3 for i in range(37)])
    tol_fwd, tol_grad = _tol(device)
    run_parity(device, torch.float32, (37, 2, 32), [16, 32, 16], ids, True, tol_fwd, tol_grad)


def test_triton_fp16(triton_backend, forward_variant):
    device = triton_backend
    rs, shape = [16, 32, 48], (5, 4, 32)
    weights = make_weights(32, rs, dtype=torch.float16, device=device)
    h, base = make_inputs(shape, dtype=torch.float16, device=device)
    ids = MIXED.to(device)
    out = ga.grouped_adapter(h, *weights, rs, base=base, expert_id=ids)
    assert out.dtype == torch.float16
    ref = reference(h.double(), [w.double() for w in weights], rs, ids, base=base.double())
    assert_parity(out, ref, TOL_FP16)


def test_triton_bf16_is_never_garbage(triton_backend):
    """bf16 runs (upcast to fp32 under the interpreter, whose bf16 dot is silently wrong)."""
    device = triton_backend
    rs, shape = [16, 32, 48], (5, 4, 32)
    weights = make_weights(32, rs, dtype=torch.bfloat16, device=device)
    h, base = make_inputs(shape, dtype=torch.bfloat16, device=device)
    ids = MIXED.to(device)
    out = ga.grouped_adapter(h, *weights, rs, base=base, expert_id=ids)
    assert out.dtype == torch.bfloat16
    ref = reference(h.double(), [w.double() for w in weights], rs, ids, base=base.double())
    assert_parity(out, ref, TOL_BF16)


def _invalid_ids_case(device):
    """Kernels, bottlenecks, weights, h, base and ids of which samples 1 and 3 are out of range."""
    rs = [16, 32]
    h, base = make_inputs((4, 3, 32), device=device)
    return _kernels(), rs, make_weights(32, rs, device=device), h, base, torch.tensor([1, 5, 0, -1], device=device)


def test_triton_invalid_ids_give_nan_rows(triton_backend, forward_variant):
    """The kernels cannot raise without a host sync: rows of out-of-range ids are NaN, others exact."""
    device = triton_backend
    k, rs, weights, h, base, ids = _invalid_ids_case(device)
    out, *_ = k.forward(h.view(-1, 32), base.view(-1, 32), ids, 3, *weights, rs, 0.1, 1e-5, False)
    out = out.view(4, 3, 32)
    assert torch.isnan(out[1]).all() and torch.isnan(out[3]).all()
    ok = torch.tensor([0, 2], device=device)
    ref = reference(h[ok].double(), [w.double() for w in weights], rs, ids[ok], base=base[ok].double())
    assert_parity(out[ok], ref, _tol(device)[0])


@pytest.mark.parametrize("saved_preact", [True, False])
def test_triton_backward_invalid_ids_give_nan_rows(triton_backend, saved_preact):
    """The backward kernels cannot raise either: dh rows of out-of-range ids are NaN (never a plausible
    number), the other rows equal the reference's input gradient."""
    device = triton_backend
    k, rs, weights, h, base, ids = _invalid_ids_case(device)
    _, mean, rstd, a = k.forward(h.view(-1, 32), base.view(-1, 32), ids, 3, *weights, rs, 0.1, 1e-5, True)
    if not saved_preact:
        a = a[:0]  # the backward recomputes the pre-activation
    dout = torch.randn(12, 32, generator=torch.Generator().manual_seed(5)).to(device)
    dh, *_ = k.backward(dout, h.view(-1, 32), ids, 3, *weights, rs, mean, rstd, a, 0.1, 1e-5, True, False)
    dh = dh.view(4, 3, 32)
    assert torch.isnan(dh[1]).all() and torch.isnan(dh[3]).all()
    ok = torch.tensor([0, 2], device=device)
    h_ok = h[ok].double().requires_grad_()
    ref = reference(h_ok, [w.double() for w in weights], rs, ids[ok])
    ref.backward(dout.view(4, 3, 32)[ok].double())
    assert_parity(dh[ok], h_ok.grad, _tol(device)[1], "dh of the valid samples")


def test_triton_deterministic_backward(triton_backend, monkeypatch):
    device = triton_backend
    monkeypatch.setattr(_kernels(), "WGRAD_SPLIT", 2)
    rs = [16, 32, 16]
    weights = [w.requires_grad_() for w in make_weights(32, rs, device=device)]
    h, base = make_inputs((5, 4, 32), device=device)
    grads = []
    for _ in range(2):
        hh = h.clone().requires_grad_()
        out = ga.grouped_adapter(hh, *weights, rs, base=base, expert_id=MIXED.to(device))
        gs = torch.autograd.grad(out, [hh, *weights], torch.ones_like(out))
        grads.append(gs)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weight_grads_without_input_grad(request, backend):
    """Frozen layers before an adapter: h needs no gradient, the kernels skip dh (NEED_DH = False) but
    the weight gradients must still match the reference."""
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    mosaic_fast.set_backend(backend)
    rs = [16, 32, 24]
    weights = [w.requires_grad_() for w in make_weights(32, rs, device=device, seed=5)]
    h, base = make_inputs((4, 6, 32), device=device, seed=6)
    ids = torch.tensor([2, 0, 1, 2], device=device)
    gout = torch.randn(h.shape, device=device)
    out = ga.grouped_adapter(h, *weights, rs, base=base, expert_id=ids)
    got = torch.autograd.grad(out, weights, gout)
    ref_w = [w.detach().double().requires_grad_() for w in weights]
    ref = reference(h.double(), ref_w, rs, ids, base=base.double())
    want = torch.autograd.grad(ref, ref_w, gout.double())
    tol = _tol(device)[1] if backend == "triton" else TOL_INTERPRETER
    for name, g, w in zip(NAMES, got, want):
        assert_parity(g, w, tol, f"grad {name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("routing", ["single", "mixed"])
def test_custom_op_autograd_matches_reference(backend, routing):
    """The registered autograd formula of the custom op (what torch.compile uses), called eagerly."""
    if backend == "triton" and not (triton_available() and INTERPRET):
        pytest.skip("needs the Triton interpreter")
    mosaic_fast.set_backend(backend)
    rs = [16] if routing == "single" else [16, 32, 24]
    ids = None if routing == "single" else torch.tensor([2, 0, 1, 2])
    weights = [w.requires_grad_() for w in make_weights(32, rs)]
    h, base = make_inputs((4, 3, 32))
    h.requires_grad_()
    base.requires_grad_()
    out = torch.ops.mosaic_fast.grouped_adapter_fwd(h.view(12, 32), base.view(12, 32), ids, 3, *weights, rs, 0.1,
                                                    1e-5, True)[0]
    leaves = [t.detach().double().requires_grad_() for t in (h, base, *weights)]
    ref = reference(leaves[0], leaves[2:], rs, ids, base=leaves[1]).view(12, 32)
    tol = TOL_INTERPRETER if backend == "triton" else TOL_CPU_FWD
    assert_parity(out, ref, tol)
    gout = torch.randn(12, 32)
    out.backward(gout)
    ref.backward(gout.double())
    for name, a, b in zip(("h", "base", *NAMES), (h, base, *weights), leaves):
        assert_parity(a.grad, b.grad, max(tol, TOL_CPU_GRAD), f"grad {name}")


def test_opcheck_torch_fallback():
    mosaic_fast.set_backend("torch")
    rs = [16, 16, 32]
    weights = [w.requires_grad_() for w in make_weights(32, rs)]
    h, base = make_inputs((12, 32))
    h.requires_grad_()
    base.requires_grad_()
    ids = torch.tensor([2, 0, 1, 2])
    torch.library.opcheck(torch.ops.mosaic_fast.grouped_adapter_fwd.default,
                          (h, base, ids, 3, *weights, rs, 0.1, 1e-5, True))
    single = [weights[0][:1], weights[1][:1], weights[2][:16], weights[3][:16], weights[4][:, :16].contiguous(),
              weights[5][:1]]
    torch.library.opcheck(torch.ops.mosaic_fast.grouped_adapter_fwd.default,
                          (h, None, None, 12, *single, [16], 0.1, 1e-5, True))
    out, mean, rstd, a = torch.ops.mosaic_fast.grouped_adapter_fwd(h, base, ids, 3, *weights, rs, 0.1, 1e-5, True)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.mosaic_fast.grouped_adapter_bwd.default,
        (dout, h.detach(), ids, 3, *[w.detach() for w in weights], mean, rstd, a, rs, 0.1, 1e-5, True, True),
    )


def test_opcheck_triton(triton_backend):
    device = triton_backend
    rs = [16, 32]
    weights = [w.requires_grad_() for w in make_weights(32, rs, device=device)]
    h, base = make_inputs((8, 32), device=device)
    h.requires_grad_()
    ids = torch.tensor([1, 0, 1, 1], device=device)
    torch.library.opcheck(torch.ops.mosaic_fast.grouped_adapter_fwd.default,
                          (h, base, ids, 2, *weights, rs, 0.1, 1e-5, True))
    out, mean, rstd, a = torch.ops.mosaic_fast.grouped_adapter_fwd(h, base, ids, 2, *weights, rs, 0.1, 1e-5, True)
    torch.library.opcheck(
        torch.ops.mosaic_fast.grouped_adapter_bwd.default,
        (torch.randn_like(out), h.detach(), ids, 2, *[w.detach() for w in weights], mean, rstd, a, rs, 0.1, 1e-5,
         True, True),
    )


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------


def _call(h=None, weights=None, rs=(16, 32), **kw):
    weights = make_weights(32, list(rs)) if weights is None else weights
    h = torch.randn(4, 3, 32) if h is None else h
    return ga.grouped_adapter(h, *weights, list(rs), **kw)


def test_bad_forward_variant(triton_backend, monkeypatch):
    monkeypatch.setattr(_kernels(), "FORWARD_VARIANT", "fast")
    weights = make_weights(32, [16])
    with pytest.raises(ValueError, match="FORWARD_VARIANT"):
        mosaic_fast.set_backend("triton")
        ga.grouped_adapter(torch.randn(2, 3, 32, device=triton_backend), *[w.to(triton_backend) for w in weights], [16])


def test_bad_width():
    with pytest.raises(ValueError, match="last dim 32"):
        _call(h=torch.randn(4, 3, 31), expert_id=torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_ids_out_of_range(backend):
    if backend == "triton" and not (triton_available() and INTERPRET):
        pytest.skip("needs the Triton interpreter")
    mosaic_fast.set_backend(backend)
    with pytest.raises(ValueError, match="out-of-range"):
        _call(expert_id=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="out-of-range"):
        _call(expert_id=torch.tensor([0, -1, 1, 0]))


def test_bad_ids_dtype_length_type():
    with pytest.raises(TypeError, match="int64"):
        _call(expert_id=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        _call(expert_id=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        _call(expert_id=torch.tensor([[0, 1, 0, 1]]))
    with pytest.raises(TypeError, match="str or an integer tensor"):
        _call(expert_id=[0, 1, 0, 1])
    with pytest.raises(ValueError, match="expert_id is required"):
        _call()


def test_bad_dtype_and_device_mismatch():
    with pytest.raises(TypeError, match="dtype mismatch"):
        _call(h=torch.randn(4, 3, 32, dtype=torch.float64), expert_id=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(TypeError, match="base dtype"):
        _call(base=torch.randn(4, 3, 32, dtype=torch.float64), expert_id=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="base must have h's shape"):
        _call(base=torch.randn(4, 3, 16), expert_id=torch.tensor([0, 1, 0, 1]))
    meta_weights = make_weights(32, [16, 32], device="meta")
    with pytest.raises(ValueError, match="is on meta but h is on cpu"):
        _call(weights=meta_weights, expert_id=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="is on meta but h is on cpu"):
        _call(expert_id=torch.tensor([0, 1, 0, 1], device="meta"))


def test_bad_weight_shapes():
    weights = make_weights(32, [16, 32])
    with pytest.raises(ValueError, match="down_w must have shape"):
        _call(weights=weights, rs=(16, 16), expert_id=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="bottlenecks"):
        ga.grouped_adapter(torch.randn(2, 32), *weights, [], expert_id=None)


# ----------------------------------------------------------------------------------------------------
# CUDA (compiled kernels, real shapes)
# ----------------------------------------------------------------------------------------------------


def _outputs_and_grads(h, base, weights, rs, ids, gout, fast: bool):
    """Output and the gradients of (h, base, *weights) of the fast op or of the reference."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, base, *weights)]
    if fast:
        out = ga.grouped_adapter(leaves[0], *leaves[2:], rs, base=leaves[1], expert_id=ids)
    else:
        out = reference(leaves[0], leaves[2:], rs, ids, base=leaves[1])
    out.backward(gout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("routing", ["mixed", "single"])
def test_cuda_parity_real_shapes(cuda_device, dtype, routing):
    """fp32 (IEEE dots, torch's default precision): DESIGN's CUDA fp32 bound on output and every gradient.

    bf16/fp16: the output within the dtype's bound of the float64 reference, and the output and every
    gradient within 2x the error of the same-dtype reference (flash-attention's rule). An absolute
    gradient bound cannot hold in these dtypes: rounding of the pre-activation flips ReLU masks, and the
    bf16 reference's own grad h is ~4e-2 (fp16: ~1.6e-2) off the float64 one at these shapes.
    Backend "triton": the kernel even for one group (which "auto" sends to cuBLAS).
    """
    mosaic_fast.set_backend("triton")
    rs = [64, 96, 192] if routing == "mixed" else [192]
    ids = (torch.arange(32) % 3)[torch.randperm(32)]
    ids = ids.to(cuda_device) if routing == "mixed" else None
    shape = (32, 197, 768)
    if dtype == torch.float32:
        run_parity(cuda_device, dtype, shape, rs, ids, True, TOL_CUDA_TF32, TOL_CUDA_TF32,
                   seed=int(torch.randint(0, 2**16, ())))
        return
    weights = make_weights(768, rs, device=cuda_device, seed=int(torch.randint(0, 2**16, ())))
    h, base = make_inputs(shape, device=cuda_device, seed=int(torch.randint(0, 2**16, ())))
    gout = torch.randn(shape, device=cuda_device)
    low = [t.to(dtype) for t in (h, base, *weights)]
    want = _outputs_and_grads(*[t.double() for t in (h, base)], [w.double() for w in weights], rs, ids, gout, False)
    same_dtype = _outputs_and_grads(low[0], low[1], low[2:], rs, ids, gout, False)
    got = _outputs_and_grads(low[0], low[1], low[2:], rs, ids, gout, True)
    assert_parity(got[0], want[0], {torch.bfloat16: TOL_BF16, torch.float16: TOL_FP16}[dtype], "output")
    for name, g, s_, w in zip(("output", "h", "base", *NAMES), got, same_dtype, want):
        assert torch.isfinite(g).all(), name
        err, err_ref = rel_err(g, w), rel_err(s_, w)
        assert err <= 2 * err_ref + 1e-6, f"{name}: {err:.3e} > 2 x same-dtype reference {err_ref:.3e}"


@pytest.mark.cuda
@pytest.mark.parametrize("routing", ["mixed", "single"])
def test_cuda_forward_variants_match_fused(cuda_device, monkeypatch, routing):
    """The split variant computes the same rounded pre-activation (only the up-projection's summation
    order differs); the one-pass variant folds the LayerNorm into the GEMM (other rounding). Every
    variant's adapter output against float64 at the bf16 tolerance."""
    mosaic_fast.set_backend("triton")
    rs = [64, 96, 192] if routing == "mixed" else [192]
    weights = make_weights(768, rs, dtype=torch.bfloat16, device=cuda_device)
    h, base = make_inputs((32, 197, 768), dtype=torch.bfloat16, device=cuda_device)
    ids = (torch.arange(32, device=cuda_device) % 3) if routing == "mixed" else None
    outs, grads = {}, {}
    dout = torch.randn_like(h)
    for variant in ("fused", "split", "onepass", "auto"):
        monkeypatch.setattr(_kernels(), "FORWARD_VARIANT", variant)
        x = h.detach().requires_grad_()
        outs[variant] = ga.grouped_adapter(x, *weights, rs, base=base, expert_id=ids)
        outs[variant].backward(dout)  # the backward reads the forward's saved LayerNorm statistics
        grads[variant] = x.grad
    assert_parity(outs["split"], outs["fused"], 1e-2)
    for variant in ("split", "onepass", "auto"):
        assert_parity(grads[variant], grads["fused"], TOL_BF16, f"{variant} input gradient")
    want = reference(h.double(), [w.double() for w in weights], rs, ids, base=base.double()) - base.double()
    for variant, out in outs.items():  # the adapter's own output (base subtracted) against float64
        assert_parity(out.double() - base.double(), want, TOL_BF16, f"{variant} adapter output")


@pytest.mark.cuda
def test_cuda_forward_has_no_host_sync(cuda_device):
    rs = [64, 96, 192]
    weights = make_weights(768, rs, dtype=torch.bfloat16, device=cuda_device)
    h, base = make_inputs((8, 197, 768), dtype=torch.bfloat16, device=cuda_device)
    ids = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2], device=cuda_device)
    with torch.no_grad():
        ga.grouped_adapter(h, *weights, rs, base=base, expert_id=ids)  # autotune (syncs) first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ga.grouped_adapter(h, *weights, rs, base=base, expert_id=ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_invalid_ids_nan_rows(cuda_device):
    rs = [64, 96]
    weights = make_weights(128, rs, device=cuda_device)
    h, base = make_inputs((3, 5, 128), device=cuda_device)
    out = ga.grouped_adapter(h, *weights, rs, base=base, expert_id=torch.tensor([0, 7, 1], device=cuda_device))
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


def test_fp32_dots_follow_torch_matmul_precision():
    """IEEE fp32 dots unless the user opts into TF32 the torch way (TF32 flips ReLU masks: ~1e-2 grads)."""
    from mosaic_fast.kernels.precision import dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) == "tf32"  # ignored by tl.dot for 16-bit operands
    finally:
        torch.set_float32_matmul_precision(before)


def test_autotune_can_be_switched_off():
    """MOSAIC_FAST_AUTOTUNE=0 leaves each autotuned kernel one config (a quick CUDA test run); the forward
    runs exactly one for each FORWARD_VARIANT ("auto": the two-pass one)."""
    import os
    import subprocess
    import sys

    code = ("import mosaic_fast.kernels.grouped_adapter as g, mosaic_fast.kernels.patch_embed3d as p; "
            "fwd = [len(g._fwd_for(v).configs) for v in g.FORWARD_VARIANTS]; "
            "print(max(fwd), len(g._up.configs), len(g._bwd_dh.configs), len(g._bwd_w.configs), "
            "len(p._TUNED_CONFIGS))")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOSAIC_FAST_AUTOTUNE")}

    def counts(**extra):
        run = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             check=True)
        return [int(n) for n in run.stdout.split()]

    assert all(n > 1 for n in counts())
    assert counts(MOSAIC_FAST_AUTOTUNE="0") == [1] * 5


def test_forward_variant_auto_times_both_layernorm_variants(monkeypatch):
    """On a GPU with autotuning, "auto" offers the autotuner the two-pass and the one-pass configs; each
    explicit variant gets only its own; without timing (interpreter, MOSAIC_FAST_AUTOTUNE=0) "auto" is
    the two-pass kernel. Each autotuner holds only the configs its variant runs: triton < 3.8 times even a
    lone config left by pruning, which the interpreter cannot."""
    k = _kernels()

    def kinds(variant):
        return sorted({c.kwargs["ONEPASS"] for c in k._fwd_for(variant).configs})

    monkeypatch.setattr(k, "INTERPRET", False)
    monkeypatch.setattr(k, "AUTOTUNE", True)
    assert kinds("auto") == [False, True]
    assert kinds("onepass") == [True] and kinds("fused") == [False] and kinds("split") == [False]
    monkeypatch.setattr(k, "AUTOTUNE", False)
    assert kinds("auto") == [False]
    monkeypatch.setattr(k, "AUTOTUNE", True)
    monkeypatch.setattr(k, "INTERPRET", True)
    assert kinds("auto") == [False]
    assert k.FORWARD_VARIANT == "auto"


def test_fp32_tiles_run_one_pipeline_stage_fewer_where_shared_memory_needs_it(monkeypatch):
    """fp32 tiles take twice the shared memory of bf16 ones: the one-pass forward configs and the
    recomputing dh configs drop a pipeline stage in fp32 (tests/sm90_compile.py measures the fit on
    sm_90); bf16, the two-pass forward and the dh kernel with a saved pre-activation keep theirs. The fp32
    dh configs also take K chunks of 16 (their FMA dots spill registers with wider ones), each distinct
    config once, in the list's order; the shared configs are left alone."""
    k = _kernels()
    monkeypatch.setattr(k, "INTERPRET", False)
    monkeypatch.setattr(k, "AUTOTUNE", True)
    fwd, dh = k._fwd_configs(), k._dh_configs()
    stages = {(c.kwargs["ONEPASS"], tuple(sorted(c.kwargs.items()))): c.num_stages for c in fwd}

    def fwd_stages(dtype):
        t = torch.empty(0, dtype=dtype)
        pruned = k._prune_fwd(fwd, {"h_ptr": t, "wd_ptr": t})
        return {(c.kwargs["ONEPASS"], tuple(sorted(c.kwargs.items()))): c.num_stages for c in pruned}

    assert fwd_stages(torch.bfloat16) == stages
    assert fwd_stages(torch.float32) == {key: st - 1 if key[0] else st for key, st in stages.items()}
    assert all(c.num_stages == stages[(c.kwargs["ONEPASS"], tuple(sorted(c.kwargs.items())))] for c in fwd)

    def dh_tiles(dtype, recompute):
        t = torch.empty(0, dtype=dtype)
        pruned = k._prune_dh(dh, {"h_ptr": t, "wd_ptr": t}, RECOMPUTE=recompute)
        return [(c.kwargs["BK"], c.num_warps, c.num_stages) for c in pruned]

    tiles = [(c.kwargs["BK"], c.num_warps, c.num_stages) for c in dh]
    assert dh_tiles(torch.bfloat16, True) == dh_tiles(torch.bfloat16, False) == tiles
    for recompute in (False, True):
        fp32 = [(16, warps, max(1, stages - recompute)) for _, warps, stages in tiles]
        assert dh_tiles(torch.float32, recompute) == list(dict.fromkeys(fp32))
    assert [(c.kwargs["BK"], c.num_warps, c.num_stages) for c in dh] == tiles


def test_fp32_pipeline_stage_reduction_needs_both_operands_fp32_and_keeps_one_stage():
    """Only fp32 activations *and* fp32 weights make fp32 (IEEE) tiles: mixed bf16/fp32 operands keep the
    configs' stages. A config with a single stage (the interpreter's, MOSAIC_FAST_AUTOTUNE=0) keeps it:
    Triton needs at least one, and the copy leaves the shared config alone."""
    import triton

    k = _kernels()
    f32, bf16 = torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.bfloat16)
    assert k._fp32_tiles({"h_ptr": f32, "wd_ptr": f32})
    assert not k._fp32_tiles({"h_ptr": f32, "wd_ptr": bf16})
    assert not k._fp32_tiles({"h_ptr": bf16, "wd_ptr": f32})
    one = triton.Config({"BK": 16}, num_warps=4, num_stages=1)
    assert k._one_stage_fewer(one).num_stages == 1 and one.num_stages == 1
    dh = k._dh_configs()
    mixed = k._prune_dh(dh, {"h_ptr": f32, "wd_ptr": bf16}, RECOMPUTE=True)
    assert [c.num_stages for c in mixed] == [c.num_stages for c in dh]
