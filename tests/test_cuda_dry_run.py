"""The CUDA code path without a GPU (tests/fake_cuda.py): fake CUDA tensors, Triton launches recorded.

What runs here is what a GPU would run, minus the kernels' arithmetic (the interpreter tests check that):
which kernels each fast path launches with backend "auto", with arguments that fit the kernels, and that
no forward, backward, optimizer step or EMA update reads a value back to the host (a fake tensor has no
value to read, so any such read raises). On a GPU the real CUDA tests run instead."""

import pytest
import torch
from fake_cuda import backward, enable_autocast, fake_cuda

import mosaic_fast
from mosaic_fast import nn as fast_nn
from mosaic_fast.bench.cases_model import TrainStep
from mosaic_fast.models import DynaMerModel, MosaicModel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real CUDA tests")

DEPTH = 2
MOSAIC = dict(embed_dim=64, depth=DEPTH, num_heads=4, img_size_2d=32, patch_size_2d=8, img_size_3d=16,
              patch_size_3d=8)
DYNAMER = dict(img_size=32, patch_size=8, embed_dim=64, depth=DEPTH, num_heads=4)


def _specialist_grads(model: MosaicModel) -> dict[str, bool]:
    """Per specialist letter: whether every one of its parameters has a gradient."""
    have = {}
    for name, p in model.named_parameters():
        letter = next((e for e in "abc" if f".expert_{e}." in name), None)
        if letter is not None:
            have[letter.upper()] = have.get(letter.upper(), True) and p.grad is not None
    return have


def test_harness_catches_host_reads_and_bad_launches(monkeypatch):
    """The dry run can fail: a value read on the host raises, a launch missing an argument raises, a launch
    of host tensors raises, and copies from the host are listed."""
    from mosaic_fast.kernels import token_skip

    with fake_cuda(monkeypatch) as launches:
        x = torch.randn(4, 8, device="cuda")
        with pytest.raises(Exception, match=r"local_scalar_dense|data-dependent|DataDependent"):
            x.sum().item()
        with pytest.raises(Exception, match=r"nonzero|DynamicOutputShape|data-dependent"):
            torch.nonzero(x)
        with pytest.raises(RuntimeError, match="synchronize"):
            torch.cuda.synchronize()
        torch.arange(3).to("cuda")
        x[torch.tensor([0, 2])]  # a host index is copied to the GPU
        torch.ones(()).to("cuda")  # a 0-dim tensor is a number: no copy to record
        assert len(launches.host_copies) == 2
        kernel = token_skip._skip_merge_kernel
        with pytest.raises(TypeError, match="misses"):
            kernel[(1,)](x)
        with pytest.raises(TypeError, match="on cpu"):
            kernel[(1,)](*([torch.empty(4)] * len(kernel.arg_names)))


def test_python_backward_matches_autograd():
    """The engine-free backward gives autograd's gradients (real CPU tensors: broadcasting, a custom
    Function with non-tensor arguments, a parameter used twice, dtype casts)."""
    torch.manual_seed(0)
    model = fast_nn.GatedSpecialistAdapter(d_model=16, bottlenecks=(4, 6, 8))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(3, 5, 16, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)

    def loss():
        out = model(h + bias) * bias.to(torch.float64).float()
        return (out.sin() * torch.linspace(-1, 1, 16)).sum()

    loss().backward()
    want = [t.grad.clone() for t in (h, bias, *model.parameters())]
    for t in (h, bias, *model.parameters()):
        t.grad = None
    with pytest.MonkeyPatch.context() as mp:
        from fake_cuda import _record_function_args

        _record_function_args(mp)
        backward(loss())
    for w, t in zip(want, (h, bias, *model.parameters())):
        torch.testing.assert_close(t.grad, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("routing", ["mixed", "letter", "letter-kernel"])
def test_mosaic_training_step(monkeypatch, routing):
    """The bench's training step (student fwd/bwd, teacher, fused AdamW, clipping, EMA) in bf16 autocast:
    per-sample ids run the grouped kernels in every block (forward for student and teacher, both backward
    kernels); a letter runs cuBLAS (no Triton launch) unless backend "triton" asks for the kernels (the
    bench's "kernel" column). Absent specialists end with no gradient; the second step copies nothing
    from the host."""
    model = MosaicModel(fast=True, **MOSAIC)
    if routing == "letter-kernel":
        mosaic_fast.set_backend("triton")
    with fake_cuda(monkeypatch) as launches:
        model = model.to("cuda")
        enable_autocast(monkeypatch)
        step = TrainStep(model, torch.device("cuda"), torch.bfloat16)
        assert isinstance(step.autocast, torch.autocast)
        x = torch.randn(4, 3, 32, 32, device="cuda")
        y = torch.randint(0, 9, (4,), device="cuda")
        ids, experts = (torch.tensor([0, 1, 1, 0], device="cuda"), ("A", "B")) if routing == "mixed" else ("B", ("B",))
        step(x, ids, y, experts)
        launches.clear()
        step(x, ids, y, experts)  # optimizer state, cached casts and routing tables exist now
        if routing != "letter":
            assert launches.counts == {"_fwd_kernel": 2 * DEPTH, "_bwd_dh_kernel": DEPTH, "_bwd_w_kernel": DEPTH}
        else:
            assert not launches.counts
        assert not launches.host_copies
        assert _specialist_grads(model) == {e: e in experts for e in "ABC"}
        assert step.opt.state, "AdamW took no step"


def test_mosaic_packed_2d_3d_inference(monkeypatch):
    """A 2D batch (per-sample ids) and a 3D batch in one packed pass: the grouped kernel once per block over
    the packed tokens, the 3D patch projection kernel once; a second pass copies nothing from the host."""
    model = MosaicModel(fast=True, **MOSAIC).eval()
    with fake_cuda(monkeypatch) as launches:
        model = model.to("cuda")
        enable_autocast(monkeypatch)
        x2 = torch.randn(3, 3, 32, 32, device="cuda")
        x3 = torch.randn(2, 1, 16, 16, 16, device="cuda")
        ids = torch.tensor([0, 2, 1], device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.forward_packed([(x2, ids), (x3, "C")])
            launches.clear()
            f2, f3 = model.forward_packed([(x2, ids), (x3, "C")])
        assert (f2.shape, f3.shape) == ((3, 64), (2, 64))
        assert launches.counts == {"_fwd_kernel": DEPTH, "_patch_embed3d_fwd_kernel": 1}
        assert not launches.host_copies


def test_mosaic_3d_training(monkeypatch):
    """A 3D batch (specialist C) forward+backward in bf16 autocast: the 3D patch projection kernel in the
    forward; the trainable 3D tokenizer, specialist C and head 17 get gradients, other heads none."""
    model = MosaicModel(fast=True, **MOSAIC)
    model.freeze_backbone(verbose=False)
    with fake_cuda(monkeypatch) as launches:
        model = model.to("cuda")
        enable_autocast(monkeypatch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, logits = model(torch.randn(2, 1, 16, 16, 16, device="cuda"), task_id=17, expert_id="C")
        logits.float().sum().backward()
        assert launches.counts == {"_patch_embed3d_fwd_kernel": 1}
        assert _specialist_grads(model) == {"A": False, "B": False, "C": True}
        trainable = {n: p.grad is not None for n, p in model.named_parameters() if p.requires_grad}
        tokenizer = [n for n in trainable if "3d" in n]
        assert len(tokenizer) == 5 and all(trainable[n] for n in tokenizer)
        assert {n for n, v in trainable.items() if v and n.startswith("heads.")} == {"heads.17.weight", "heads.17.bias"}


@pytest.mark.parametrize("skip_mode", ["adapter", "block"])
@pytest.mark.parametrize("keep_ratio", [0.5, 1.0])
def test_dynamer_inference(monkeypatch, skip_mode, keep_ratio):
    """bf16 DynaMer inference: per block the routed MoE op (two launches for both streams) and one selection
    kernel per stream (at ρ = 1 it keeps every token but still computes the gates); nothing else of ours,
    and no copy from the host once the first forward has built its tables."""
    model = DynaMerModel(5, keep_ratio=keep_ratio, skip_mode=skip_mode, **DYNAMER).eval()
    with fake_cuda(monkeypatch) as launches:
        model = model.to("cuda", torch.bfloat16)
        x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            model(x)
            launches.clear()
            out = model(x)
        assert out.shape == (2, 5)
        assert not launches.host_copies
        assert launches.counts == {"_moe_route_down_kernel": DEPTH, "_moe_gate_combine_kernel": DEPTH,
                                   "_skip_select_kernel": 2 * DEPTH}


@pytest.mark.parametrize("skip_mode", ["adapter", "block"])
def test_dynamer_training(monkeypatch, skip_mode):
    """DynaMer forward+backward under bf16 autocast: per block the training MoE op's down kernel (both
    streams) and its combine kernel per stream; the backward is torch ops; every trainable parameter gets
    a gradient; the second step copies nothing from the host."""
    model = DynaMerModel(5, keep_ratio=0.5, skip_mode=skip_mode, **DYNAMER).train()
    with fake_cuda(monkeypatch) as launches:
        model = model.to("cuda")
        enable_autocast(monkeypatch)
        x = torch.randn(2, 3, 32, 32, device="cuda")
        for _ in range(2):
            launches.clear()
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
            out.float().sum().backward()
        assert launches.counts == {"_moe_down_kernel": DEPTH, "_moe_combine_kernel": 2 * DEPTH}
        assert not launches.host_copies
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing


@pytest.mark.parametrize("gate", ["expert", "channel"])
def test_m4oe_adapter(monkeypatch, gate):
    """The M4oE adapter's fused down and up kernels, forward and backward, in bf16."""
    module = fast_nn.GatedSpecialistAdapter(d_model=64, bottlenecks=(8, 12, 16), gate=gate)
    with fake_cuda(monkeypatch) as launches:
        module = module.to("cuda", torch.bfloat16)
        h = torch.randn(2, 5, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = module(h)
        out.float().sum().backward()
        assert out.shape == h.shape and h.grad is not None
        assert set(launches.counts) >= {"_gs_down_kernel", "_gs_up_kernel"}
        assert all(p.grad is not None for p in module.parameters())


def test_benchmark_shapes(monkeypatch):
    """The bench's shapes (ViT-B/16 width and 197 tokens; two blocks suffice): a mixed-batch MOSAIC training
    step at batch 64 and bf16 DynaMer inference at batch 32, ρ = .5, block mode; the launchers' shape-
    dependent choices (tile sizes, weight-gradient split over 132 SMs, selection limits) run here."""
    vit_b = dict(embed_dim=768, depth=2, num_heads=12)
    model = MosaicModel(fast=True, **vit_b)
    dynamer = DynaMerModel(9, keep_ratio=0.5, skip_mode="block", **vit_b).eval()
    with fake_cuda(monkeypatch) as launches:
        model, dynamer = model.to("cuda"), dynamer.to("cuda", torch.bfloat16)
        enable_autocast(monkeypatch)
        step = TrainStep(model, torch.device("cuda"), torch.bfloat16)
        x = torch.randn(64, 3, 224, 224, device="cuda")
        step(x, torch.arange(64, device="cuda") % 3, torch.randint(0, 9, (64,), device="cuda"), ("A", "B", "C"))
        assert launches.counts == {"_fwd_kernel": 4, "_bwd_dh_kernel": 2, "_bwd_w_kernel": 2}
        launches.clear()
        with torch.no_grad():
            out = dynamer(torch.randn(32, 3, 224, 224, device="cuda", dtype=torch.bfloat16))
        assert out.shape == (32, 9)
        assert launches.counts == {"_moe_route_down_kernel": 2, "_moe_gate_combine_kernel": 2, "_skip_select_kernel": 4}
