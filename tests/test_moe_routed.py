"""The gated MoE adapter's inference op with routing fused in (ops/moe_routed.py, kernels/moe_routed.py).

Each test checks that the routed op really ran (``fused_op_calls``) and compares against the float64 reference
module, in Triton's interpreter on CPU (compiled on a GPU)."""

import copy

import pytest
import torch
from parity import TOL_BF16, TOL_CUDA_TF32, TOL_INTERPRETER, assert_parity, randomize_

from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.ops import moe_routed

D, R = 32, 16


def triton_tol(device):
    """Triton kernels against a reference: the interpreter's bound on CPU, the CUDA one when compiled."""
    return TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32


def make(num_experts=4, top_k=2, gate_dim=D, seed=0, device="cpu"):
    ref = randomize_(reference.GatedMoEAdapter(D, num_experts, top_k, R, gate_dim), std=0.2, seed=seed)
    fast = fast_nn.convert(copy.deepcopy(ref)).to(device).eval()
    return ref.double().to(device), fast


def selection(b, n, kept, seed, device):
    """Random distinct token indices (B, kept) in random order, and skip gates."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:kept] for _ in range(b)])
    return idx.to(device), torch.rand(b, kept, generator=g).to(device)


@pytest.mark.parametrize(("num_experts", "top_k", "gate_dim"), [(4, 2, D), (4, 1, 1), (3, 3, D // 2), (8, 2, D // 4)])
def test_full_forward(triton_backend, fused_op_calls, num_experts, top_k, gate_dim):
    ref, fast = make(num_experts, top_k, gate_dim, device=triton_backend)
    xg, xm = (torch.randn(2, 7, D, device=triton_backend) for _ in range(2))
    with torch.no_grad():
        want = ref(xg.double(), xm.double())
        got = fast(xg, xm)
    assert fused_op_calls["moe"] == 1
    assert_parity(got[0], want[0], triton_tol(triton_backend), "gen")
    assert_parity(got[1], want[1], triton_tol(triton_backend), "med")


@pytest.mark.parametrize(("kept_g", "kept_m"), [(3, 5), (1, 7), (7, 1), (7, 7)])
@pytest.mark.parametrize("inplace", [True, False])
def test_skip_in_place_and_out_of_place(triton_backend, fused_op_calls, kept_g, kept_m, inplace):
    """Different kept counts per stream (k = 1 and k = N included), unordered indices; in place only the
    selected rows change."""
    b, n = 3, 7
    ref, fast = make(device=triton_backend)
    xg, xm = (torch.randn(b, n, D, device=triton_backend) for _ in range(2))
    idx_g, gate_g = selection(b, n, kept_g, 1, triton_backend)
    idx_m, gate_m = selection(b, n, kept_m, 2, triton_backend)
    with torch.no_grad():
        want = ref.forward_skip(xg.double(), xm.double(), idx_g, gate_g.double(), idx_m, gate_m.double())
        yg, ym = xg.clone(), xm.clone()
        got = fast.forward_skip(yg, ym, idx_g, gate_g, idx_m, gate_m, inplace=inplace)
    assert fused_op_calls["moe"] == 1
    assert (got[0] is yg) == inplace and (got[1] is ym) == inplace
    if not inplace:
        assert torch.equal(yg, xg) and torch.equal(ym, xm), "out of place wrote into its inputs"
    assert_parity(got[0], want[0], triton_tol(triton_backend), "gen")
    assert_parity(got[1], want[1], triton_tol(triton_backend), "med")
    for x, y, idx in ((xg, got[0], idx_g), (xm, got[1], idx_m)):
        untouched = torch.ones(b, n, dtype=torch.bool, device=x.device).scatter(1, idx, False)
        assert torch.equal(y[untouched], x[untouched]), "an unselected row changed"


def test_expanded_identity_selection_and_batch_of_one(triton_backend, fused_op_calls):
    """The fast SkipRouter's ρ = 1 selection is an expanded arange (stride 0 over the batch)."""
    n = 5
    ref, fast = make(device=triton_backend)
    for b in (1, 3):
        xg, xm = (torch.randn(b, n, D, device=triton_backend) for _ in range(2))
        idx = torch.arange(n, device=triton_backend).expand(b, n)
        gate = torch.rand(b, n, device=triton_backend)
        with torch.no_grad():
            want = ref.forward_skip(xg.double(), xm.double(), idx, gate.double(), idx, gate.double())
            got = fast.forward_skip(xg.clone(), xm.clone(), idx, gate, idx, gate, inplace=True)
        assert_parity(got[0], want[0], triton_tol(triton_backend), "gen")
        assert_parity(got[1], want[1], triton_tol(triton_backend), "med")
    assert fused_op_calls["moe"] == 2


def test_selection_with_column_stride(triton_backend, fused_op_calls):
    """Token indices whose columns are not adjacent in memory (a transposed copy: strides (1, B); a
    every-other-column slice: column stride 2): the kernel must follow both strides."""
    b, n = 3, 7
    ref, fast = make(device=triton_backend)
    xg, xm = (torch.randn(b, n, D, device=triton_backend) for _ in range(2))
    idx_g, gate_g = selection(b, n, 4, 5, triton_backend)
    idx_g = idx_g.t().contiguous().t()
    wide, gate_m = selection(b, n, 6, 6, triton_backend)
    idx_m, gate_m = wide[:, ::2], gate_m[:, ::2].contiguous()
    assert idx_g.stride() == (1, b) and idx_m.stride(1) == 2
    with torch.no_grad():
        want = ref.forward_skip(xg.double(), xm.double(), idx_g, gate_g.double(), idx_m, gate_m.double())
        got = fast.forward_skip(xg.clone(), xm.clone(), idx_g, gate_g, idx_m, gate_m)
    assert fused_op_calls["moe"] == 1
    assert_parity(got[0], want[0], triton_tol(triton_backend), "gen")
    assert_parity(got[1], want[1], triton_tol(triton_backend), "med")


@pytest.mark.parametrize(("fast_bias", "ref_bias"), [
    ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),  # a zero router: every score tied, as right after a zero init
    ([1.0, 0.5, 0.5, 0.0], [1.0, 0.5, 0.4, 0.0]),  # a tie at the top-k boundary must act as the lower expert
], ids=["all-tied", "boundary-tie"])
def test_router_ties_go_to_the_lower_expert(triton_backend, fused_op_calls, fast_bias, ref_bias):
    """Equal router scores: the routed op takes the lower expert index, as the reference does. With k = 2,
    scores (1, .5, .5, 0) must act as (1, .5, .4, 0): experts 0 and 1, the same probabilities."""
    ref, fast = make(device=triton_backend)
    with torch.no_grad():
        for m, bias in ((fast, fast_bias), (ref, ref_bias)):
            for router in (m.router_gen, m.router_med):
                router.weight.zero_()
                router.bias.copy_(torch.tensor(bias))
        xg, xm = (torch.randn(2, 4, D, device=triton_backend) for _ in range(2))
        want = ref(xg.double(), xm.double())
        got = fast(xg, xm)
    assert fused_op_calls["moe"] == 1
    assert_parity(got[0], want[0], triton_tol(triton_backend), "gen")
    assert_parity(got[1], want[1], triton_tol(triton_backend), "med")


def test_bf16_runs_upcast_in_the_interpreter(triton_backend, fused_op_calls):
    """bf16 module and inputs against the float64 reference of those same bf16 values (against the fp32
    originals, bf16 rounding alone flips near-tied expert choices, for the bf16 reference as well)."""
    if triton_backend == "cuda":
        pytest.skip("the interpreter's bf16 upcast only")
    ref, fast = make(device=triton_backend)
    fast = fast.bfloat16()
    ref.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    xg, xm = (torch.randn(2, 6, D).bfloat16() for _ in range(2))
    with torch.no_grad():
        want = ref(xg.double(), xm.double())
        got = fast(xg, xm)
    assert fused_op_calls["moe"] == 1 and got[0].dtype == torch.bfloat16
    assert_parity(got[0].float(), want[0], TOL_BF16, "gen")
    assert_parity(got[1].float(), want[1], TOL_BF16, "med")


def test_gradients_autocast_and_torch_backend_take_the_differentiable_path(triton_backend, fused_op_calls):
    _, fast = make(device=triton_backend)
    xg, xm = (torch.randn(2, 5, D, device=triton_backend, requires_grad=True) for _ in range(2))
    out = fast(xg, xm)
    out[0].sum().backward()
    assert xg.grad is not None and fused_op_calls["moe"] == 0
    with torch.no_grad(), torch.autocast(xg.device.type, dtype=torch.bfloat16):
        fast(xg, xm)
    assert fused_op_calls["moe"] == 0
    import mosaic_fast

    mosaic_fast.set_backend("torch")
    with torch.no_grad():
        fast(xg, xm)
    assert fused_op_calls["moe"] == 0


def test_opcheck(triton_backend):
    _, fast = make(device=triton_backend)
    xg, xm = (torch.randn(2, 5, D, device=triton_backend) for _ in range(2))
    idx = torch.tensor([[0, 3], [1, 4]], device=triton_backend)
    gate = torch.rand(2, 2, device=triton_backend)
    weights = [t.detach() for t in (fast.router_gen.weight, fast.router_gen.bias, fast.router_med.weight,
                                     fast.router_med.bias, fast.gate_gen.weight, fast.gate_gen.bias,
                                     fast.gate_med.weight, fast.gate_med.bias, fast.down_weight, fast.down_bias,
                                     fast.up_weight, fast.up_bias)]
    op = torch.ops.mosaic_fast.moe_routed_update_.default
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(op, (xg, xm, idx, gate, idx, gate, *weights, 2), test_utils=utils)
    torch.library.opcheck(op, (xg, xm, None, None, None, None, *weights, 2), test_utils=utils)


def test_cuda_bf16_two_x_rule_and_autotuned_in_place(cuda_device):
    """bf16 against the fp32 reference within twice the bf16 reference's error; fp32 within the TF32
    bound. The combine writes in place and is autotuned: a fresh autotuner over every config must undo
    each timed run (``restore_value``), so the tuning call still updates each selected row once."""
    import triton

    from mosaic_fast.kernels import moe_routed as kernels

    fresh = triton.autotune(configs=kernels._combine_configs(), key=kernels._KEYS,
                            restore_value=["outg_ptr", "outm_ptr"])(kernels._moe_gate_combine_kernel)
    real = kernels._moe_gate_combine
    kernels._moe_gate_combine = fresh
    try:
        ref, fast = make(device=cuda_device)
        ref32 = copy.deepcopy(ref).float()
        b, n = 4, 40
        xg, xm = (torch.randn(b, n, D, device=cuda_device) for _ in range(2))
        idx_g, gate_g = selection(b, n, 20, 1, cuda_device)
        idx_m, gate_m = selection(b, n, 13, 2, cuda_device)
        with torch.no_grad():
            want = ref32.forward_skip(xg, xm, idx_g, gate_g, idx_m, gate_m)
            got = fast.forward_skip(xg.clone(), xm.clone(), idx_g, gate_g, idx_m, gate_m, inplace=True)
            assert len(fresh.cache) == 1, "the combine kernel was not autotuned"
            for g, w in zip(got, want):
                assert_parity(g, w, TOL_CUDA_TF32)
            # bf16: against a float64 model of the same bf16 weights and inputs (bf16 rounding of the
            # weights alone flips near-tied expert choices against the fp32 originals)
            ref_bf, fast_bf = copy.deepcopy(ref32).bfloat16(), copy.deepcopy(fast).bfloat16()
            ref.load_state_dict({k: v.double() for k, v in fast_bf.state_dict().items()})
            xg, xm, gate_g, gate_m = (t.bfloat16() for t in (xg, xm, gate_g, gate_m))
            want = ref.forward_skip(xg.double(), xm.double(), idx_g, gate_g.double(), idx_m, gate_m.double())
            base = ref_bf.forward_skip(xg, xm, idx_g, gate_g, idx_m, gate_m)
            got = fast_bf.forward_skip(xg.clone(), xm.clone(), idx_g, gate_g, idx_m, gate_m, inplace=True)
        for g, bse, w in zip(got, base, want):
            assert_parity(g.float(), w, TOL_BF16)
            assert (g.double() - w).norm() <= 2 * (bse.double() - w).norm() + 1e-6
    finally:
        kernels._moe_gate_combine = real


def test_bad_input_names_the_argument(triton_backend):
    _, fast = make(device=triton_backend)
    weights = [t.detach() for t in fast._routed_weights()]
    x = torch.randn(2, 5, D, device=triton_backend)
    idx = torch.tensor([[0, 3], [1, 4]], device=triton_backend)
    gate = torch.rand(2, 2, device=triton_backend)

    def call(*, xg=x, xm=x, ig=idx, sg=gate, im=idx, sm=gate, w=weights, k=2):
        moe_routed.moe_routed_update_(xg.clone(), xm.clone(), ig, sg, im, sm, *w, k)

    call()  # valid
    with pytest.raises(ValueError, match="x_gen/x_med"):
        call(xm=torch.randn(2, 4, D, device=triton_backend))
    with pytest.raises(ValueError, match="w_down"):
        call(w=[*weights[:8], weights[8][:, :, :-1], *weights[9:]])
    with pytest.raises(TypeError, match="b_up"):
        call(w=[*weights[:11], weights[11].double()])
    with pytest.raises(ValueError, match="top_k"):
        call(k=5)
    with pytest.raises(ValueError, match="all given or all None"):
        call(ig=None)
    with pytest.raises(ValueError, match="idx_med"):
        call(im=idx.int())
    with pytest.raises(ValueError, match="skip_gen"):
        call(sg=gate[:, :1])
