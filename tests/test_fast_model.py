"""The fast MosaicModel end to end: parity with the reference model, packed 2D+3D batches, torch.compile."""

import copy

import pytest
import torch
from parity import TOL_BF16, TOL_CPU_FWD, TOL_CPU_GRAD, assert_parity, randomize_, rel_err

from mosaic_fast import models

SMALL = dict(embed_dim=32, depth=2, num_heads=4, img_size_2d=32, patch_size_2d=8, img_size_3d=16,
             patch_size_3d=8, adapter_bottleneck_a=16, adapter_bottleneck_b=32, adapter_bottleneck_c=48)


def model_pair(seed: int = 0):
    """Reference and fast models with identical, fully randomised weights (float64 reference)."""
    torch.manual_seed(seed)
    ref = randomize_(models.MosaicModel([3, 2, 4], fast=False, task_experts=["A", "B", "C"], **SMALL), std=0.1)
    fast = models.MosaicModel([3, 2, 4], fast=True, task_experts=["A", "B", "C"], **SMALL)
    fast.load_state_dict(ref.state_dict())
    return ref.double().eval(), fast.eval()


def test_fast_model_uses_fast_modules():
    _, fast = model_pair()
    names = {type(m).__module__ for m in fast.modules()}
    assert "mosaic_fast.nn.vit" in names and "mosaic_fast.nn.adapter" in names
    assert type(fast.patch_embed.patch_embed_3d).__module__ == "mosaic_fast.nn.patch_embed"


#: Parameters each batch must give a (compared) gradient, a sample of every kind.
REACHED = {
    "A": ("heads.0.bias", "encoder.blocks.0.adapter.expert_a.down_proj.weight"),
    "C": ("heads.0.weight", "encoder.blocks.1.adapter.expert_c.up_proj.weight"),
    "mixed": ("heads.0.weight", "encoder.blocks.0.adapter.expert_a.up_proj.bias",
              "encoder.blocks.1.adapter.expert_b.layer_norm.weight",
              "encoder.blocks.1.adapter.expert_c.down_proj.bias"),
    "3d": ("heads.2.bias", "pos_embed_3d", "patch_embed.patch_embed_3d.proj.weight",
           "patch_embed.patch_embed_3d.norm.weight", "encoder.blocks.0.adapter.expert_c.layer_norm.bias"),
}


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("routing", ["A", "C", "mixed", "3d"])
def test_single_and_mixed_2d_batches_forward_backward(routing, frozen):
    """Features, logits and EVERY parameter's gradient against the float64 reference model: the whole
    model trainable, or frozen as for MOSAIC training (adapters, heads, 3D tokenizer and pos_embed_3d
    trainable). A parameter the batch does not reach (the other tokenizer, an absent specialist, another
    task's head, a frozen weight) gets no gradient in the reference and none (or zeros) in the fast model."""
    ref, fast = model_pair()
    if frozen:
        ref.freeze_backbone(verbose=False)
        fast.freeze_backbone(verbose=False)
    if routing == "3d":
        x, ids, task = torch.rand(2, 1, 16, 16, 16), "C", 2
    else:
        x, ids, task = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 0]) if routing == "mixed" else routing, 0
    ref_feats, ref_logits = ref(x.double(), task_id=task, expert_id=ids)
    feats, logits = fast(x, task_id=task, expert_id=ids)
    assert_parity(feats, ref_feats, TOL_CPU_FWD, "features")
    assert_parity(logits, ref_logits, TOL_CPU_FWD, "logits")
    weight = torch.randn_like(logits)
    (ref_logits * weight.double()).sum().backward()
    (logits * weight).sum().backward()
    ref_params = dict(ref.named_parameters())
    compared = set()
    for name, p in fast.named_parameters():
        want = ref_params[name].grad
        assert p.requires_grad == ref_params[name].requires_grad, name
        if want is None or not want.any():
            assert p.grad is None or not p.grad.any(), f"{name}: the reference has no gradient, fast has one"
            continue
        assert p.grad is not None, f"{name}: no gradient (the reference has one)"
        assert_parity(p.grad, want, TOL_CPU_GRAD, f"grad {name}")
        compared.add(name)
    expect = set(REACHED[routing]) | (set() if frozen else {"encoder.blocks.0.attn.qkv.weight"})
    assert expect <= compared, sorted(expect - compared)


def test_packed_2d_3d_batch_equals_separate_batches():
    ref, fast = model_pair()
    x2, ids2 = torch.randn(3, 3, 32, 32), torch.tensor([1, 0, 1])
    x3 = torch.rand(2, 1, 16, 16, 16)
    packed = fast.forward_packed([(x2, ids2), (x3, "C")])
    separate = [ref.forward_features(x2.double(), ids2), ref.forward_features(x3.double(), "C")]
    for got, want in zip(packed, separate):
        assert_parity(got, want, TOL_CPU_FWD, "packed features")
    # the reference model's forward_packed is the plain loop
    for got, want in zip(ref.forward_packed([(x2.double(), ids2), (x3.double(), "C")]), separate):
        torch.testing.assert_close(got, want)


def test_forward_packed_rejects_bad_input():
    _, fast = model_pair()
    with pytest.raises(ValueError, match="at least one"):
        fast.forward_packed([])
    with pytest.raises(ValueError, match="expert_id"):
        fast.forward_packed([(torch.randn(2, 3, 32, 32), "Z")])


def test_torch_compile_matches_eager():
    _, fast = model_pair()
    x, ids = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    compiled = torch.compile(fast, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, 0, expert_id=ids)[1], fast(x, 0, expert_id=ids)[1],
                                   rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_and_stays_close():
    """bf16 autocast on CPU: within TOL_BF16 of float64, and at most 2x the error of the reference model
    run under the same autocast (DESIGN.md §5's same-dtype rule)."""
    ref, fast = model_pair()
    ref32 = copy.deepcopy(ref).float()
    x = torch.randn(2, 3, 32, 32)
    want = ref.forward_features(x.double(), "B")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = fast.forward_features(x, "B")
        same_dtype = ref32.forward_features(x, "B")
    assert feats.dtype in (torch.bfloat16, torch.float32)
    assert_parity(feats.float(), want, TOL_BF16, "bf16 autocast features")
    err, ref_err = rel_err(feats.float(), want), rel_err(same_dtype.float(), want)
    assert err <= 2 * ref_err + 1e-6, f"fast {err:.3e} vs the reference under the same autocast {ref_err:.3e}"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 3e-3), (torch.bfloat16, 2e-2)])
def test_cuda_fast_model_matches_reference(cuda_device, dtype, tol):
    """On a GPU (Triton kernels, SDPA): fast vs the fp32 reference, and the same-dtype reference's error
    bounds the fast path's error (2x rule) for bf16."""
    ref, fast = model_pair()
    ref32 = ref.float().to(cuda_device)
    fast = fast.to(cuda_device, dtype)
    x2, ids = torch.randn(4, 3, 32, 32, device=cuda_device), torch.tensor([0, 2, 1, 0], device=cuda_device)
    x3 = torch.rand(2, 1, 16, 16, 16, device=cuda_device)
    with torch.no_grad():
        want = ref32.forward_packed([(x2, ids), (x3, "C")])
        got = fast.forward_packed([(x2.to(dtype), ids), (x3.to(dtype), "C")])
        same_dtype_ref = [f.float() for f in ref32.to(dtype).forward_packed([(x2.to(dtype), ids), (x3.to(dtype), "C")])]
    for g, w, s in zip(got, want, same_dtype_ref):
        assert_parity(g.float(), w, tol, f"cuda {dtype} features")
        if dtype != torch.float32:
            assert rel_err(g.float(), w) <= 2 * rel_err(s, w) + 1e-6
