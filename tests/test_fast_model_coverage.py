"""The fast MosaicModel where tests/test_fast_model.py leaves claims open (DESIGN.md §5 tolerances):

* fp16 and bf16 CPU autocast with a letter, mixed per-sample ids and a packed 2D+3D batch: outputs within
  the dtype's bound of float64, and outputs and gradients at most 2x the error of the reference model run
  under the same autocast (README's parity rules);
* fp32 gradients through ``forward_packed``: every parameter and both inputs against the float64
  reference model;
* ``torch.compile`` (fullgraph) of ``forward_packed`` and of a training step, against eager.

The fast model runs on the torch backend and, where cheap, in the Triton interpreter.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from parity import TOL_BF16, TOL_CPU_FWD, TOL_CPU_GRAD, TOL_FP16, TOL_INTERPRETER, assert_parity, rel_err
from test_fast_model import model_pair

import mosaic_fast
from mosaic_fast import nn, reference

#: A parameter's gradient under 16-bit autocast may miss float64 by this much (relative) and still pass
#: on its own (its share of the whole gradient is held to the 2x rule): at these tiny shapes a single
#: ReLU-mask flip of one adapter pre-activation moves a specialist's gradient by up to ~0.5 relative, in
#: the reference model as well as the fast one (seen over 40 seeds, bf16). A missing, zeroed,
#: misrouted or sign-flipped gradient is ~1 or more off.
MAX_PARAM_ERR_16BIT = 0.75


@pytest.fixture
def backend(request):
    """The fast model's backend (parametrized indirectly): the torch fallback, or the Triton kernels
    (in the interpreter on CPU)."""
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    mosaic_fast.set_backend(request.param)
    return request.param


def batches_2d_3d(seed: int = 1, ids=(1, 0, 2, 0)):
    """A 2D batch with mixed per-sample ids and a 3D batch routed to "C" (fresh random inputs)."""
    gen = torch.Generator().manual_seed(seed)
    x2 = torch.randn(len(ids), 3, 32, 32, generator=gen)
    x3 = torch.rand(2, 1, 16, 16, 16, generator=gen)
    return [(x2, torch.tensor(ids)), (x3, "C")]


def run(model, batches, kind, *, autocast=None, seed=2):
    """Forward + backward of ``model``; returns (outputs, input grads, {param name: grad}).

    kind "packed": ``forward_packed(batches)`` (outputs: features per batch); "model": ``model(x, 0,
    expert_id=e)`` on the one batch (outputs: features, logits). The loss is a fixed random weighting of
    every output (a loss on the returned features, heads included for "model"). Inputs are float64 for a
    float64 model, else float32 (autocast, when given, casts inside). ``model`` may be a compiled module."""
    params = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes the parameter names
    dtype = next(params.parameters()).dtype
    xs = [x.detach().to(dtype).clone().requires_grad_() for x, _ in batches]
    inputs = [(x, e) for x, (_, e) in zip(xs, batches)]
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if kind == "packed":
            outs = model.forward_packed(inputs)
        else:
            (x, e), = inputs
            outs = list(model(x, 0, expert_id=e))
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in params.named_parameters() if p.grad is not None and p.grad.any()}
    return [o.detach() for o in outs], [x.grad for x in xs], grads


def flat(grads: dict, names) -> torch.Tensor:
    return torch.cat([grads[n].detach().double().flatten() for n in names])


def assert_no_extra_grads(model, reached: dict) -> None:
    """A parameter the reference gives no gradient gets none (or zeros) from the fast model."""
    for name, p in model.named_parameters():
        if name not in reached:
            assert p.grad is None or not p.grad.any(), f"{name}: the reference has no gradient, fast has one"


# ------------------------------------------------------------------------------------------------------
# 2. fp32 gradients through forward_packed
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, frozen", [("torch", False), ("torch", True), ("triton", False)],
                         indirect=["backend"])
def test_forward_packed_gradients_match_reference(backend, frozen):
    """2D mixed ids + 3D "C" in one packed pass: the features, both inputs' gradients and EVERY
    parameter's gradient against the float64 reference model with the same weights (whole model
    trainable, or frozen for MOSAIC training)."""
    ref, fast = model_pair()
    if frozen:
        ref.freeze_backbone(verbose=False)
        fast.freeze_backbone(verbose=False)
    fwd_tol, grad_tol = (TOL_INTERPRETER, TOL_INTERPRETER) if backend == "triton" else (TOL_CPU_FWD, TOL_CPU_GRAD)
    batches = batches_2d_3d()
    want, want_dx, want_grads = run(ref, batches, "packed")
    got, got_dx, got_grads = run(fast, batches, "packed")
    for g, w, what in zip(got, want, ("2D", "3D")):
        assert_parity(g, w, fwd_tol, f"{what} packed features")
    for g, w, what in zip(got_dx, want_dx, ("2D", "3D")):
        assert g is not None, f"{what} input: no gradient"
        assert_parity(g, w, grad_tol, f"{what} input gradient")
    for name, want_g in want_grads.items():
        assert name in got_grads, f"{name}: no gradient (the reference has one)"
        assert_parity(got_grads[name], want_g, grad_tol, f"grad {name}")
    assert_no_extra_grads(fast, want_grads)
    expect = {f"encoder.blocks.{i}.adapter.expert_{e}.{p}" for i in (0, 1) for e in "abc"
              for p in ("layer_norm.weight", "down_proj.weight", "up_proj.weight", "up_proj.bias")}
    expect |= {"pos_embed_3d", "patch_embed.patch_embed_3d.proj.weight"}
    if not frozen:
        expect |= {"pos_embed_2d", "cls_token", "encoder.blocks.0.attn.qkv.weight", "encoder.norm.weight"}
    assert expect <= set(want_grads), sorted(expect - set(want_grads))
    assert not any(n.startswith("heads.") for n in got_grads)


# ------------------------------------------------------------------------------------------------------
# 1 and 4. fp16 / bf16 CPU autocast
# ------------------------------------------------------------------------------------------------------


def cpu_autocast_unsupported(dtype: torch.dtype) -> str | None:
    """Why CPU autocast cannot run the model's ops in ``dtype`` (None when it can)."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            x = torch.randn(1, 2, 4, 8)
            lin = F.linear(x, torch.randn(8, 8))
            att = F.scaled_dot_product_attention(lin, lin, lin)
            conv = F.conv3d(torch.randn(1, 1, 4, 4, 4), torch.randn(2, 1, 2, 2, 2), stride=2)
    except (RuntimeError, AssertionError) as e:
        return f"torch {torch.__version__}: CPU autocast to {dtype} fails: {e}"
    if lin.dtype != dtype or att.dtype != dtype or conv.dtype != dtype:
        return (f"torch {torch.__version__}: CPU autocast to {dtype} does not cast linear/sdpa/conv3d "
                f"(got {lin.dtype}, {att.dtype}, {conv.dtype})")
    return None


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-module"])
def test_cpu_bf16_attention_is_the_references_product(autocast):
    """On CPU in bfloat16 the fast Attention computes the reference's explicit softmax product (torch's fused
    CPU attention was slower there, nn/vit.py): output and every gradient bitwise equal to the reference's,
    under autocast (cached weight casts equal autocast's own) and for a module cast to bfloat16."""
    reason = cpu_autocast_unsupported(torch.bfloat16)
    if reason:
        pytest.skip(reason)
    ref = reference.Attention(48, num_heads=4)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    fast = nn.convert(torch.nn.Sequential(copy.deepcopy(ref)))[0]
    assert type(fast) is not reference.Attention
    x = torch.randn(3, 17, 48)
    if not autocast:
        ref, fast, x = ref.to(torch.bfloat16), fast.to(torch.bfloat16), x.to(torch.bfloat16)
    results = []
    for module in (ref, fast):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(xi)
        out.float().square().sum().backward()
        results.append([out, xi.grad, *(p.grad for p in module.parameters())])
    for want, got in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


AUTOCAST_CASES = [
    # (backend, autocast dtype, batch): fp16 letter/mixed/packed, bf16 mixed/packed (test_fast_model.py
    # has bf16 with a letter); the interpreter (slow) runs the packed batch, which routes mixed 2D ids too
    ("torch", torch.float16, "letter"),
    ("torch", torch.float16, "mixed"),
    ("torch", torch.float16, "packed"),
    ("torch", torch.bfloat16, "mixed"),
    ("torch", torch.bfloat16, "packed"),
    ("triton", torch.float16, "packed"),
    ("triton", torch.bfloat16, "packed"),
]


@pytest.mark.parametrize("backend, dtype, batch", AUTOCAST_CASES, indirect=["backend"],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_autocast_parity(backend, dtype, batch):
    """Fast model under CPU autocast vs the float64 reference model: every output within the dtype's
    absolute bound (fp16 5e-3, bf16 2e-2), and outputs, both input gradients and the whole parameter
    gradient at most 2x the error of the fp32 reference model run under the same autocast. The 2x rule
    holds the parameter gradients as one vector: per parameter it fails either way at these shapes (one
    16-bit ReLU-mask flip put one specialist's gradient of the fast model ~37x past the reference's
    error, and with another seed the reference's ~38x past the fast model's), while the whole vector
    stayed within 1.5x over 40 seeds. Each parameter's gradient is also
    checked on its own (present, finite, within MAX_PARAM_ERR_16BIT)."""
    reason = cpu_autocast_unsupported(dtype)
    if reason:
        pytest.skip(reason)
    tol = TOL_FP16 if dtype == torch.float16 else TOL_BF16
    ref, fast = model_pair()
    ref32 = copy.deepcopy(ref).float()
    if batch == "packed":
        batches, kind = batches_2d_3d(), "packed"
    else:
        (x2, ids), _ = batches_2d_3d()
        batches, kind = [(x2, "A" if batch == "letter" else ids)], "model"
    want, want_dx, want_grads = run(ref, batches, kind)
    same, same_dx, same_grads = run(ref32, batches, kind, autocast=dtype)
    got, got_dx, got_grads = run(fast, batches, kind, autocast=dtype)

    def within_2x(g, s, w, what):
        err, same_err = rel_err(g, w), rel_err(s, w)
        assert err <= 2 * same_err + 1e-6, (f"{what}: fast {err:.3e} vs the reference under the same autocast "
                                            f"{same_err:.3e} (2x rule)")

    for i, (g, s, w) in enumerate(zip(got, same, want)):
        assert_parity(g.float(), w, tol, f"output {i}")
        assert rel_err(s.float(), w) > TOL_CPU_FWD, "the reference ran in fp32: autocast did not engage"
        within_2x(g, s, w, f"output {i}")
    for i, (g, s, w) in enumerate(zip(got_dx, same_dx, want_dx)):
        assert g is not None and torch.isfinite(g).all(), f"input {i}: no or non-finite gradient"
        within_2x(g, s, w, f"input {i} gradient")
    names = sorted(want_grads)
    missing = [n for n in names if n not in got_grads]
    assert not missing, f"no gradient for {missing}"
    within_2x(flat(got_grads, names), flat(same_grads, names), flat(want_grads, names), "all parameter gradients")
    for n in names:
        g = got_grads[n]
        assert torch.isfinite(g).all(), f"grad {n}: NaN/Inf"
        assert rel_err(g, want_grads[n]) <= MAX_PARAM_ERR_16BIT, f"grad {n}: {rel_err(g, want_grads[n]):.3e} off"
    assert_no_extra_grads(fast, want_grads)


# ------------------------------------------------------------------------------------------------------
# 3. torch.compile
# ------------------------------------------------------------------------------------------------------


def test_compiled_forward_packed_matches_eager():
    """``torch.compile(forward_packed, fullgraph=True)`` on a 2D (mixed ids) + 3D batch: one graph,
    same features as eager and as the float64 reference."""
    ref, fast = model_pair()
    batches = batches_2d_3d()
    compiled = torch.compile(fast.forward_packed, fullgraph=True)
    with torch.no_grad():
        got = compiled(batches)
        eager = fast.forward_packed(batches)
        want = ref.forward_packed([(x.double(), e) for x, e in batches])
    for g, e, w, what in zip(got, eager, want, ("2D", "3D")):
        assert_parity(g, e, TOL_CPU_FWD, f"compiled vs eager {what} features")
        assert_parity(g, w, TOL_CPU_FWD, f"compiled vs float64 {what} features")


def test_compiled_training_step_matches_eager():
    """Forward + backward through ``torch.compile(model, fullgraph=True)`` (frozen backbone: adapters and
    heads train) on mixed 2D batches: logits and every trainable gradient equal eager's; a second step
    with a specialist absent (same shapes: the same graph) gives it no (or a zero) gradient."""
    _, fast = model_pair()
    fast.freeze_backbone(verbose=False)
    fast.train()
    eager = copy.deepcopy(fast)
    compiled = torch.compile(fast, fullgraph=True)
    for step, ids in enumerate(((1, 0, 2, 0), (2, 0, 0, 2))):
        for m in (fast, eager):
            m.zero_grad(set_to_none=True)
        (x, e), _ = batches_2d_3d(seed=10 + step, ids=ids)
        got, got_dx, got_grads = run(compiled, [(x, e)], "model")
        want, want_dx, want_grads = run(eager, [(x, e)], "model")
        for g, w, what in zip(got, want, ("features", "logits")):
            assert_parity(g, w, TOL_CPU_FWD, f"step {step} compiled {what}")
        assert_parity(got_dx[0], want_dx[0], TOL_CPU_GRAD, f"step {step} input gradient")
        for name, w in want_grads.items():
            assert name in got_grads, f"step {step} {name}: no gradient from the compiled model"
            assert_parity(got_grads[name], w, TOL_CPU_GRAD, f"step {step} grad {name}")
        assert_no_extra_grads(fast, want_grads)
        present = {"abc"[i] for i in ids}
        adapters = {n.split(".adapter.")[1].split(".")[0] for n in want_grads if ".adapter." in n}
        assert adapters == {f"expert_{c}" for c in present}, adapters
