"""Drop-in audit: what a user swapping ``reference`` modules for ``mosaic_fast.nn`` ones runs into beyond the
parity tests of each module (DESIGN.md §4, §5, §7, §8), on the torch fallback and on the Triton kernels
(interpreter on CPU).

Every fast module is the class-swapped copy (``nn.convert``) of a randomised reference module (up-projections
and gates included) and is compared with the float64 reference on fresh inputs: non-contiguous, strided,
expanded and storage-offset views, channels-last volumes; batch of one, one token, empty batch, zero tokens
(the fast module works like the reference or raises the same exception type); frozen parameters with a
trainable input and the reverse; ``no_grad``/``inference_mode``; deepcopy, pickle, ``torch.save`` and
state_dict round trips; float64 (computed in float64, as the reference), float16 and bfloat16 modules;
dropout in train and eval; gradient accumulation, ``retain_graph`` and double backward (exact, or a clear
error, never a silently wrong second derivative); bad arguments named in the error.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from parity import TOL_CPU_FWD, TOL_CPU_GRAD, TOL_CUDA_TF32, TOL_INTERPRETER, rel_err

import mosaic_fast
from mosaic_fast import nn as fast_nn
from mosaic_fast import reference

D = 32
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.kernels)]


# ---------------------------------------------------------------------------------------------------- cases


def _ids(x: torch.Tensor) -> torch.Tensor:
    """Mixed routing of a batch (all three specialists from B = 3 on)."""
    return torch.tensor([2, 0, 1, 1, 0, 2], device=x.device)[: x.shape[0]]


def _fused(m, h, base, expert_id=None):
    """``base + adapter(h)``: forward_fused on the fast modules, the reference's composition otherwise."""
    args = () if expert_id is None else (expert_id,)
    if isinstance(m, (fast_nn.Adapter, fast_nn.MoSAdapter)):
        return m.forward_fused(h, base, *args)
    return base + m(h, *args)


def _skip(m, xg, xm):
    b, n = xg.shape[:2]
    k = max(1, n - 1)
    idx = torch.arange(k, device=xg.device).flip(0).expand(b, k)  # a strided (expanded) selection
    gate = torch.sigmoid(torch.linspace(-1, 1, b * k, dtype=xg.dtype, device=xg.device)).view(b, k)
    return m.forward_skip(xg, xm, idx, gate, idx, gate.flip(1))


def _update(x_sel):
    return torch.tanh(x_sel) * 2.0 + 0.5


#: name -> (reference module factory, call(module, *inputs), input shapes)
CASES = {
    "Adapter.fused": (lambda: reference.Adapter(D, 16), lambda m, h, b: _fused(m, h, b), [(2, 3, D)] * 2),
    "MoS.mixed": (lambda: reference.MoSAdapter(D, 8, 12, 16), lambda m, h: m(h, _ids(h)), [(3, 3, D)]),
    "MoS.fused_mixed": (lambda: reference.MoSAdapter(D, 8, 12, 16), lambda m, h, b: _fused(m, h, b, _ids(h)),
                        [(3, 3, D)] * 2),
    "PatchEmbed3D": (lambda: reference.PatchEmbed3D(8, (2, 4, 4), 2, D), lambda m, x: m(x), [(2, 2, 8, 8, 8)]),
    "GatedMoE": (lambda: reference.GatedMoEAdapter(D, 4, 2, 8, D // 4), lambda m, a, b: m(a, b), [(2, 3, D)] * 2),
    "GatedMoE.skip": (lambda: reference.GatedMoEAdapter(D, 4, 2, 8, D), _skip, [(2, 4, D)] * 2),
    "SkipRouter": (lambda: reference.SkipRouter(D, 0.5), lambda m, x: m(x, _update), [(2, 5, D)]),
    "GSA.expert": (lambda: reference.GatedSpecialistAdapter(D, (4, 6, 8), "expert"), lambda m, h: m(h),
                   [(2, 3, D)]),
    "GSA.channel": (lambda: reference.GatedSpecialistAdapter(D, (4, 6, 8), "channel"), lambda m, h: m(h),
                    [(2, 3, D)]),
    "Mlp": (lambda: reference.Mlp(D, 64), lambda m, x: m(x), [(2, 3, D)]),
    "Block.mixed": (lambda: reference.Block(D, 4, 2.0, True, 8, 12, 16), lambda m, x: m(x, _ids(x)), [(3, 3, D)]),
}
#: one case per fast code path (the others share them: MoS.mixed ~ MoS.fused_mixed, GSA.expert ~ GSA.channel)
CORE = ["Adapter.fused", "MoS.fused_mixed", "PatchEmbed3D", "GatedMoE", "GatedMoE.skip", "SkipRouter", "GSA.channel",
        "Block.mixed"]


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (zero-initialised up-projections and gates too); 1-D weights near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(1.0 + noise if name.endswith("weight") and p.dim() == 1 else noise)
    return module


def make_pair(name: str, device="cpu", seed: int = 0):
    ref = _randomize(CASES[name][0](), seed).to(device)
    fast = fast_nn.convert(copy.deepcopy(ref))
    assert type(fast).__module__.startswith("mosaic_fast.nn"), type(fast)
    return ref, fast


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny shapes: threads only wait on each other (conftest's one_thread)."""
    yield


@pytest.fixture(params=BACKENDS)
def device(request):
    """'torch': the torch fallback on CPU; 'triton': the kernels (interpreter on CPU, compiled on CUDA)."""
    if request.param == "triton":
        return torch.device(request.getfixturevalue("triton_backend"))
    mosaic_fast.set_backend("torch")
    return torch.device("cpu")


def tols(device) -> tuple[float, float]:
    if mosaic_fast.get_backend() == "torch":
        return TOL_CPU_FWD, TOL_CPU_GRAD
    tol = TOL_INTERPRETER if device.type == "cpu" else TOL_CUDA_TF32
    return tol, tol


def outs_of(o) -> list[torch.Tensor]:
    return list(o) if isinstance(o, (tuple, list)) else [o]


def leaves_for(name, device, shapes=None, dtype=torch.float32, requires_grad=True):
    return [torch.randn(s, dtype=dtype, device=device).requires_grad_(requires_grad) for s in shapes or CASES[name][2]]


def run(module, call, leaves, view, grads):
    """Outputs, leaf gradients and parameter gradients of ``call(module, *view(leaves))`` after one backward."""
    module.zero_grad(set_to_none=True)
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in leaves]
    outs = outs_of(call(module, *(view(x) for x in leaves)))
    if any(o.requires_grad for o in outs):
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outs, [x.grad for x in leaves], [p.grad for p in module.parameters()]


def assert_close(got, want, tol, what, none_is_zero=False):
    """Fail on a None mismatch, NaN, a shape mismatch or a relative error above ``tol`` (float64 metric)."""
    if none_is_zero:
        got = torch.zeros_like(want) if got is None and want is not None else got
        want = torch.zeros_like(got) if want is None and got is not None else want
    assert (got is None) == (want is None), f"{what}: fast gradient is {got}, reference {want}"
    if got is None:
        return
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: NaN/Inf"
    scale = float(want.detach().double().norm())
    if scale == 0.0:
        assert float(got.detach().double().norm()) <= tol, f"{what}: reference is 0, fast is not"
        return
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def check_against_reference(name, ref, fast, leaves, view=lambda t: t, tol=None):
    """Forward and backward of ``fast`` (float32) against the float64 reference on the same inputs and views."""
    call = CASES[name][1]
    ref64 = copy.deepcopy(ref).double()
    leaves64 = [x.detach().double().requires_grad_(x.requires_grad) for x in leaves]
    with torch.no_grad():
        shapes = [o.shape for o in outs_of(call(ref64, *(view(x) for x in leaves64)))]
    grads = [torch.randn(s, dtype=torch.float64, device=leaves[0].device) for s in shapes]
    want = run(ref64, call, leaves64, view, grads)
    got = run(fast, call, leaves, view, [g.float() for g in grads])
    tol_f, tol_g = tol or tols(leaves[0].device)
    for i, (f, r) in enumerate(zip(got[0], want[0])):
        assert float(r.detach().norm()) > 1e-3 * r.numel() ** 0.5, f"output {i}: reference ~0 proves nothing"
        assert f.dtype == torch.float32, f"output {i} is {f.dtype}"
        assert_close(f, r, tol_f, f"output {i}")
    for i, (f, r) in enumerate(zip(got[1], want[1])):
        assert_close(f, r, tol_g, f"grad input {i}")
    names = [n for n, _ in ref.named_parameters()]
    for n, f, r in zip(names, got[2], want[2]):
        assert_close(f, r, tol_g, f"grad {n}")


# ---------------------------------------------------------------------------------------------------- views

TOKEN_VIEWS = {
    # batch/token strides swapped, storage offset, stride 2 along the channels
    "offset_strided": (lambda s: (s[1], s[0] + 1, 2 * s[2]), lambda t: t.transpose(0, 1)[1:, :, ::2]),
    # one sample broadcast over the batch (batch stride 0): its gradient sums over the batch
    "expanded": (lambda s: (1, s[1], s[2]), None),
}


@pytest.mark.parametrize("view", list(TOKEN_VIEWS))
@pytest.mark.parametrize("name", ["Adapter.fused", "MoS.fused_mixed", "GatedMoE.skip", "SkipRouter", "GSA.channel",
                                  "Block.mixed"])
def test_non_contiguous_token_inputs(device, name, view):
    ref, fast = make_pair(name, device)
    shapes = CASES[name][2]
    leaf_shape, fn = TOKEN_VIEWS[view]
    if fn is None:
        fn = lambda t, b=shapes[0][0]: t.expand(b, -1, -1)
    leaves = leaves_for(name, device, [leaf_shape(s) for s in shapes])
    assert not fn(leaves[0]).is_contiguous()
    check_against_reference(name, ref, fast, leaves, fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_patch_embed3d_channels_last_volume_with_storage_offset(device, dtype):
    ref, fast = make_pair("PatchEmbed3D", device)
    shape = (3, 8, 8, 8, 2)  # (B + 1, D, H, W, C): channels last
    if dtype == torch.uint8:
        leaf = torch.randint(0, 256, shape, dtype=dtype, device=device)
    else:
        leaf = torch.randn(shape, device=device, requires_grad=True)
    view = lambda t: t.permute(0, 4, 1, 2, 3)[1:]
    x = view(leaf)
    assert x.is_contiguous(memory_format=torch.channels_last_3d) and x.storage_offset() > 0
    check_against_reference("PatchEmbed3D", ref, fast, [leaf], view)


# ---------------------------------------------------------------------------------------------------- sizes

SIZES = {
    "batch_1": lambda s: (1, *s[1:]),
    "one_token": lambda s: (s[0], 1, *s[2:]),
    "empty_batch": lambda s: (0, *s[1:]),
    "zero_tokens": lambda s: (s[0], 0, *s[2:]),
}


def _attempt(module, call, leaves):
    """(outputs, leaf grads, parameter grads) or the exception raised by forward or backward."""
    try:
        with torch.no_grad():
            grads = [torch.full_like(o, 0.5) for o in outs_of(call(module, *leaves))]
        return run(module, call, leaves, lambda t: t, grads)
    except Exception as exc:  # the exception itself is what is compared
        return exc


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", CORE)
def test_degenerate_sizes_work_like_the_reference(device, name, size):
    """Batch of 1, one token, B = 0, N = 0: the fast module computes what the reference does (forward and
    backward), or raises the exception type the reference raises."""
    shapes = [SIZES[size](s) for s in CASES[name][2]]
    if name == "PatchEmbed3D" and size in ("one_token", "zero_tokens"):
        pytest.skip("a volume has no token dim")
    ref, fast = make_pair(name, device)
    leaves = leaves_for(name, device, shapes)
    want = _attempt(copy.deepcopy(ref), CASES[name][1], leaves)
    got = _attempt(fast, CASES[name][1], leaves)
    if isinstance(want, Exception):
        assert isinstance(got, type(want)), f"reference raised {want!r}, fast gave {got!r}"
        return
    assert not isinstance(got, Exception), f"reference works, fast raised {got!r}"
    if min(min(s) for s in shapes) > 0:
        check_against_reference(name, ref, fast, leaves)
        return
    for kind, fs, rs in zip(("output", "grad input", "grad param"), got, want):
        for i, (f, r) in enumerate(zip(fs, rs)):
            # (empty: a gradient the reference leaves None may be an empty/zero tensor, and the reverse)
            assert_close(f, r, 0.0, f"{kind} {i}", none_is_zero=True)
            if kind == "output":
                assert f.dtype == r.dtype


# ---------------------------------------------------------------------------------------------------- autograd modes


@pytest.mark.parametrize("mode", ["frozen_module", "input_without_grad"])
@pytest.mark.parametrize("name", CORE)
def test_frozen_module_trainable_input_and_the_reverse(device, name, mode):
    """Gradients exist exactly where the reference has them (None elsewhere) and agree."""
    ref, fast = make_pair(name, device)
    if mode == "frozen_module":
        ref.requires_grad_(False)
        fast.requires_grad_(False)
    leaves = leaves_for(name, device, requires_grad=mode == "frozen_module")
    check_against_reference(name, ref, fast, leaves)


@pytest.mark.parametrize("name", CORE)
def test_no_grad_and_inference_mode_then_training(device, name):
    """Outputs under no_grad/inference_mode equal the reference's and record nothing; a training step after
    them (caches built there) still gets every gradient right."""
    ref, fast = make_pair(name, device)
    call = CASES[name][1]
    leaves = leaves_for(name, device)
    tol_f, _ = tols(device)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            want = outs_of(call(copy.deepcopy(ref).double(), *(x.double() for x in leaves)))
            got = outs_of(call(fast, *leaves))
        for f, r in zip(got, want):
            assert not f.requires_grad and f.grad_fn is None
            assert f.is_inference() == (ctx is torch.inference_mode)
            assert_close(f, r, tol_f, f"output under {ctx.__name__}")
    check_against_reference(name, ref, fast, leaves)


@pytest.mark.parametrize("name", CORE)
def test_gradient_accumulation_and_retain_graph(device, name):
    """Two backward passes accumulate into .grad as with the reference, over two graphs and over one
    retained graph."""
    ref, fast = make_pair(name, device)
    call = CASES[name][1]
    ref64 = copy.deepcopy(ref).double()
    leaves = leaves_for(name, device, requires_grad=False)
    with torch.no_grad():
        grads = [torch.randn(o.shape, dtype=torch.float64, device=device)
                 for o in outs_of(call(ref64, *(x.double() for x in leaves)))]
    _, tol_g = tols(device)
    for retain in (False, True):
        results = []
        for module, dtype in ((ref64, torch.float64), (fast, torch.float32)):
            module.zero_grad(set_to_none=True)
            xs = [x.detach().to(dtype).requires_grad_() for x in leaves]
            outs = outs_of(call(module, *xs))
            for step in (1, 2):
                if step == 2 and not retain:
                    outs = outs_of(call(module, *xs))
                torch.autograd.backward(outs, [g.to(dtype) * step for g in grads], retain_graph=retain and step == 1)
            results.append([x.grad for x in xs] + [p.grad for p in module.parameters()])
        for i, (f, r) in enumerate(zip(results[1], results[0])):
            assert_close(f, r, tol_g, f"accumulated grad {i} (retain_graph={retain})")


@pytest.mark.parametrize("name", [*CORE, "MoS.mixed", "GSA.expert", "Mlp"])
def test_double_backward_is_exact_or_raises(device, name):
    """A gradient penalty ‖∇ₓL‖² through the module next to an MLP: its gradient equals the reference's, or
    the double backward raises a clear RuntimeError. (torch's once_differentiable let such a penalty through
    the fused ops silently, their second derivative taken as 0: relative errors 1e-3..1.)"""
    ref, fast = make_pair(name, device)
    call = CASES[name][1]
    mlp = _randomize(reference.Mlp(D, 16), 3).to(device)
    leaves = leaves_for(name, device, requires_grad=False)
    results = []
    for module, dtype in ((copy.deepcopy(ref).double(), torch.float64), (fast, torch.float32)):
        m2 = copy.deepcopy(mlp).to(dtype)
        xs = [x.detach().to(dtype).requires_grad_() for x in leaves]
        outs = outs_of(call(module, *xs))
        loss = sum((o * torch.linspace(-2, 2, o.numel(), dtype=dtype, device=device).view(o.shape)).sum()
                   for o in outs)
        loss = loss + sum(0.1 * m2(x.reshape(x.shape[0], -1)[:, :D]).pow(2).sum() for x in xs)  # the MLP next to it
        grads = torch.autograd.grad(loss, xs, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        try:
            results.append(torch.autograd.grad(penalty, xs + [p for p in module.parameters() if p.requires_grad],
                                               allow_unused=True))
        except RuntimeError as exc:
            assert module is fast, f"the reference raised {exc!r}"
            assert "not differentiable" in str(exc) or "not implemented" in str(exc), f"unclear error: {exc!r}"
            return
    _, tol_g = tols(device)
    for i, (f, r) in enumerate(zip(results[1], results[0])):
        assert_close(f, r, tol_g * 10, f"second-order grad {i}", none_is_zero=True)


# ---------------------------------------------------------------------------------------------------- copies, dtypes


@pytest.mark.parametrize("name", CORE)
def test_copies_pickling_and_state_dict_round_trips(device, name):
    """deepcopy / pickle / torch.save+load of the whole module (after inference caches were built) keep the
    class and the function; an in-place edit of a copy reaches the copy only; a state_dict goes reference →
    fast → reference with strict=True unchanged, and loading new weights into a used fast module is seen."""
    ref, fast = make_pair(name, device)
    make, call, _ = CASES[name]
    leaves = leaves_for(name, device, requires_grad=False)
    tol_f, _ = tols(device)

    def fwd(module):
        with torch.no_grad():
            return outs_of(call(module, *leaves))

    want = fwd(ref)
    fwd(fast)  # build the inference caches
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    copies = {"deepcopy": copy.deepcopy(fast), "pickle": pickle.loads(pickle.dumps(fast)),
              "torch.save": torch.load(buf, weights_only=False)}
    for how, clone in copies.items():
        assert type(clone) is type(fast), how
        for f, r in zip(fwd(clone), want):
            assert_close(f, r, tol_f, how)
    clone, ref_edit = copies["deepcopy"], copy.deepcopy(ref)
    with torch.no_grad():
        for module in (clone, ref_edit):
            for p in module.parameters():
                p.mul_(1.5).add_(0.01)
    for f, r in zip(fwd(fast), want):
        assert_close(f, r, tol_f, "original after editing its copy")
    for f, r in zip(fwd(clone), fwd(ref_edit)):
        assert_close(f, r, tol_f, "edited copy")

    fresh = fast_nn.convert(make().to(device))
    fresh.load_state_dict(ref.state_dict(), strict=True)
    back = make().to(device)
    back.load_state_dict(fresh.state_dict(), strict=True)
    assert list(back.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    other = _randomize(make(), seed=7).to(device)
    fast.load_state_dict(other.state_dict(), strict=True)
    for f, r in zip(fwd(fast), fwd(other)):
        assert_close(f, r, tol_f, "after load_state_dict into a used module")


@pytest.mark.parametrize("name", [*CORE, "GSA.expert"])
def test_float64_module_is_computed_in_float64(device, name):
    """``.double()`` then forward/backward (with gradients and in inference): float64 precision, as the
    reference. The Triton kernels load and accumulate in fp32: before the fix the Triton backend gave the
    gated MoE, the skip merge and the M4oE mixture ~3e-8 errors (fp32 precision) and fp32 top-k choices."""
    ref, fast = make_pair(name, device)
    fast.double()
    leaves = leaves_for(name, device, dtype=torch.float64)
    call = CASES[name][1]
    with torch.no_grad():
        want = outs_of(call(copy.deepcopy(ref).double(), *leaves))
        for f, r in zip(outs_of(call(fast, *leaves)), want):
            assert f.dtype == torch.float64
            assert_close(f, r, 1e-10, "float64 inference output")
    ref64 = copy.deepcopy(ref).double()
    grads = [torch.randn_like(o) for o in want]
    got = run(fast, call, leaves, lambda t: t, grads)
    exp = run(ref64, call, leaves, lambda t: t, grads)
    for kind, fs, rs in zip(("output", "grad input", "grad param"), got, exp):
        for i, (f, r) in enumerate(zip(fs, rs)):
            assert_close(f, r, 1e-10, f"float64 {kind} {i}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CORE)
def test_half_and_bfloat16_modules(device, name, dtype):
    """``.half()`` / ``.bfloat16()`` then forward on inputs of that dtype: the reference's output dtype, and
    an error against float64 (same rounded weights and inputs) within DESIGN §5's bound or 2x the
    same-dtype reference's."""
    ref, fast = make_pair(name, device)
    call = CASES[name][1]
    leaves = [x.to(dtype) for x in leaves_for(name, device, requires_grad=False)]
    ref_lp, fast_lp = copy.deepcopy(ref).to(dtype), copy.deepcopy(fast).to(dtype)
    with torch.no_grad():
        want = outs_of(call(ref_lp, *leaves))
        exact = outs_of(call(copy.deepcopy(ref_lp).double(), *(x.double() for x in leaves)))
        got = outs_of(call(fast_lp, *leaves))
    bound = 5e-3 if dtype == torch.float16 else 2e-2
    for f, r, e in zip(got, want, exact):
        assert f.dtype == r.dtype == dtype
        assert torch.isfinite(f).all()
        assert rel_err(f, e) <= max(bound, 2 * rel_err(r, e)), f"{rel_err(f, e):.2e} vs reference {rel_err(r, e):.2e}"


@pytest.mark.parametrize("name", ["GSA.channel", "Block.mixed"])
def test_dropout_train_and_eval(device, name):
    """Dropout p > 0: in train mode the fast module runs the reference computation (same random masks
    from the same seed: equal results and gradients); in eval dropout is the identity and the fast path
    matches the reference."""
    make = {
        "MoS.fused_mixed": lambda: reference.MoSAdapter(D, 8, 12, 16, dropout=0.3),
        "GSA.channel": lambda: reference.GatedSpecialistAdapter(D, (4, 6, 8), "channel", dropout=0.3),
        "Block.mixed": lambda: reference.Block(D, 4, 2.0, True, 8, 12, 16, adapter_dropout=0.3),
    }[name]
    ref = _randomize(make(), 0).to(device)
    fast = fast_nn.convert(copy.deepcopy(ref))
    call = CASES[name][1]
    leaves = leaves_for(name, device)
    tol_f, tol_g = tols(device)
    for train in (True, False):
        ref.train(train)
        fast.train(train)
        results = []
        for module in (ref, fast):
            torch.manual_seed(11)
            grads = [torch.randn(o.shape, device=device) for o in outs_of(call(ref, *leaves))]
            torch.manual_seed(5)
            results.append(run(module, call, leaves, lambda t: t, grads))
        (r_out, r_in, r_par), (f_out, f_in, f_par) = results
        if train:  # the masks differ from eval's: dropout is active
            ev = copy.deepcopy(ref).eval()
            with torch.no_grad():
                assert rel_err(r_out[0], outs_of(call(ev, *leaves))[0]) > 1e-6
        for what, fs, rs, tol in (("output", f_out, r_out, tol_f), ("grad input", f_in, r_in, tol_g),
                                  ("grad param", f_par, r_par, tol_g)):
            for i, (f, r) in enumerate(zip(fs, rs)):
                # (train mode: identical masks; the rest of the module is the fast path, hence a tolerance)
                assert_close(f, r, tol, f"{what} {i} (train={train})")


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_arguments_are_named(device):
    """Wrong id dtypes and devices, a base on another device, integer tokens, a gate wider than the streams:
    TypeError/ValueError naming the argument (DESIGN §7), not a kernel or torch-internal message."""
    _, mos = make_pair("MoS.mixed", device)
    _, block = make_pair("Block.mixed", device)
    h = torch.randn(3, 4, D, device=device)
    for module, call in ((mos, lambda m, ids: m(h, ids)), (mos, lambda m, ids: m.forward_fused(h, h, ids)),
                         (block, lambda m, ids: m(h, ids))):
        for dtype in (torch.int16, torch.uint8, torch.bool):
            with pytest.raises(TypeError, match=rf"expert_id tensor must be int64 \(or int32\), got {dtype}"):
                call(module, torch.zeros(3, dtype=dtype, device=device))
        with pytest.raises(ValueError, match="expert_id is on meta"):
            call(module, torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="base is on meta"):
        mos.forward_fused(h, torch.randn(3, 4, D, device="meta"), "B")
    _, adapter = make_pair("Adapter.fused", device)
    _, gsa = make_pair("GSA.expert", device)
    for module in (adapter, mos.expert_b, gsa):
        with pytest.raises(TypeError, match=r"h must be a floating-point tensor, got torch\.int64"):
            module(torch.ones(3, 4, D, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"h must be a floating-point tensor, got torch\.int64"):
        mos(torch.ones(3, 4, D, dtype=torch.long, device=device), _ids(h))
    _, moe = make_pair("GatedMoE.skip", device)
    idx = torch.zeros(3, 1, dtype=torch.long, device=device)
    ones = torch.ones(3, 1, device=device)
    with pytest.raises(TypeError, match=r"gate_med is torch\.float64, wider than x_gen"):
        moe.forward_skip(h, h, idx, ones, idx, ones.double())
    with pytest.raises(ValueError, match="idx_gen"):
        moe.forward_skip(h, h, idx.to("meta"), ones, idx, ones)
