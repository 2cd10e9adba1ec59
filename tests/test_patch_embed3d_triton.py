"""3D patch embedding, Triton path: the fused gather + GEMM + bias kernel.

On CPU the kernel runs in Triton's interpreter on small volumes (tolerance TOL_INTERPRETER); the
``cuda_device`` tests run it compiled on a GPU (TF32 / bf16 tolerances) at the real 64³ size.
"""

from __future__ import annotations

import pytest
import torch
from parity import TOL_BF16, TOL_CUDA_TF32, TOL_INTERPRETER, assert_parity, randomize_

import mosaic_fast
from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.ops import patch_embed3d as ops


def _volume(shape, dtype, device="cpu", requires_grad=False):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def _pair(img, patch, chans, dim, scale=1.0, shift=0.0, device="cpu"):
    ref = randomize_(reference.PatchEmbed3D(img, patch, chans, dim))
    fast = fast_nn.PatchEmbed3D(img, patch, chans, dim, input_scale=scale, input_shift=shift)
    fast.load_state_dict(ref.state_dict())
    return ref.double().to(device), fast.to(device)


def _check(x, ref64, fast, tol, scale=1.0, shift=0.0):
    """Forward/backward parity against the float64 reference; returns nothing, asserts everything."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    out = fast(x)
    out_ref = ref64(x64 * scale + shift)
    assert_parity(out, out_ref, tol, "forward")
    g = torch.randn_like(out_ref)
    out.backward(g.to(out.dtype))
    out_ref.backward(g)
    for (name, p_ref), p in zip(ref64.named_parameters(), fast.parameters()):
        assert_parity(p.grad, p_ref.grad, tol, f"grad {name}")
    if x.requires_grad:
        assert_parity(x.grad, x64.grad, tol, "grad x")


class _NoExtension:
    def __getattr__(self, name):
        raise AssertionError(f"the Triton path must not call the C++ extension ({name})")


@pytest.mark.parametrize(
    ("dtype", "patch", "batch"),
    [
        (torch.uint8, (8, 8, 8), 2),
        (torch.float32, (8, 8, 8), 1),
        (torch.uint8, (4, 8, 8), 1),
        (torch.float32, (4, 8, 8), 2),
    ],
)
def test_interpreter_parity(triton_backend, monkeypatch, dtype, patch, batch):
    if triton_backend == "cuda":
        pytest.skip("interpreter test; the cuda tests below cover the compiled kernel")
    ref64, fast = _pair(16, patch, 1, 48)  # E = 48: a partial 32-wide column tile
    x = _volume((batch, 1, 16, 16, 16), dtype, requires_grad=dtype.is_floating_point)
    with monkeypatch.context() as m:  # the forward must not touch the C++ patchify
        m.setattr(ops, "_C", _NoExtension())
        fast(x.detach())
    _check(x, ref64, fast, TOL_INTERPRETER)


def test_interpreter_normalisation_channels_strides(triton_backend):
    if triton_backend == "cuda":
        pytest.skip("interpreter test")
    scale, shift = 1 / 255, -0.5
    ref64, fast = _pair((4, 8, 12), (2, 4, 3), 2, 40, scale, shift)
    x = torch.randn(2, 4, 12, 8, 2).permute(0, 4, 1, 3, 2).requires_grad_()  # (2, 2, 4, 8, 12), strided
    _check(x, ref64, fast, TOL_INTERPRETER, scale, shift)
    u8 = _volume((3, 2, 4, 8, 12), torch.uint8)
    ref64.zero_grad()
    fast.zero_grad()
    _check(u8, ref64, fast, TOL_INTERPRETER, scale, shift)


def test_interpreter_bf16_is_upcast(triton_backend):
    if triton_backend == "cuda":
        pytest.skip("interpreter test")
    ref64, fast = _pair(8, 4, 1, 32)
    fast = fast.to(torch.bfloat16)
    x = _volume((2, 1, 8, 8, 8), torch.uint8)
    out = fast(x)
    assert out.dtype == torch.bfloat16
    assert_parity(out, ref64(x.double()), TOL_BF16)


def test_proj_opcheck(triton_backend):
    device = triton_backend
    x = _volume((2, 1, 8, 8, 8), torch.float32, device=device, requires_grad=True)
    w = torch.randn(32, 1, 4, 4, 4, device=device, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mosaic_fast.patch_embed3d_proj, (x, w, b, [4, 4, 4], 0.5, 0.25))
    x8 = _volume((1, 1, 8, 8, 8), torch.uint8, device=device)
    torch.library.opcheck(torch.ops.mosaic_fast.patch_embed3d_proj, (x8, w, None, [4, 4, 4], 1.0, 0.0))


def test_proj_without_bias_and_errors(triton_backend):
    device = triton_backend
    x = _volume((1, 2, 4, 4, 4), torch.uint8, device=device)
    w = torch.randn(16, 2, 2, 2, 2, device=device)
    y = ops.patch_embed3d_proj(x, w, None, (2, 2, 2))
    # float64: on CUDA a float32 conv3d would run in TF32 (cuDNN's default), itself ~1e-3 off
    want = torch.nn.functional.conv3d(x.double(), w.double(), stride=2).flatten(2).transpose(1, 2)
    assert_parity(y, want, TOL_INTERPRETER if device == "cpu" else TOL_CUDA_TF32)
    with pytest.raises(TypeError, match="weight: the Triton path"):
        ops.patch_embed3d_proj(x, w.double(), None, (2, 2, 2))
    with pytest.raises(ValueError, match="not divisible"):
        ops.patch_embed3d_proj(x, w, None, (3, 2, 2))


# ---------------------------------------------------------------- compiled on a GPU


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("patch", [(8, 8, 8), (4, 8, 8)])
def test_cuda_parity(cuda_device, dtype, patch):
    ref64, fast = _pair(64, patch, 1, 768, device=cuda_device)
    x = _volume((2, 1, 64, 64, 64), dtype, cuda_device, requires_grad=dtype.is_floating_point)
    _check(x, ref64, fast, TOL_CUDA_TF32)


def test_cuda_bf16_and_scaling(cuda_device):
    ref64, fast = _pair(28, 4, 1, 768, 1 / 255, 0.0, device=cuda_device)
    fast = fast.to(torch.bfloat16)
    x = _volume((3, 1, 28, 28, 28), torch.uint8, cuda_device)
    out = fast(x)
    assert out.dtype == torch.bfloat16
    assert_parity(out, ref64(x.double() / 255), TOL_BF16)


def test_cuda_auto_backend_runs_triton(cuda_device, monkeypatch):
    mosaic_fast.set_backend("auto")
    monkeypatch.setattr(ops, "_C", _NoExtension())
    _, fast = _pair(16, 8, 1, 64, device=cuda_device)
    assert fast(_volume((1, 1, 16, 16, 16), torch.uint8, cuda_device)).is_cuda
