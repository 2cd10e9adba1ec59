"""3D patch embedding, CPU path: the C++ extension mosaic_fast._C, the patchify ops and nn.PatchEmbed3D.

Parity is checked against the reference Conv3d + LayerNorm run in float64 (DESIGN.md §5 fp32 CPU
tolerances), forward and backward, for uint8 and float volumes, isotropic and anisotropic patches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity import TOL_CPU_FWD, TOL_CPU_GRAD, assert_parity, randomize_

import mosaic_fast
from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.ops import patch_embed3d as ops


def _torch_patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Independent oracle: the Conv3d patch matrix through unfold."""
    pd, ph, pw = patch
    u = x.double().unfold(2, pd, pd).unfold(3, ph, ph).unfold(4, pw, pw)  # B C nd nh nw pd ph pw
    b, c, nd, nh, nw = u.shape[:5]
    return u.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b, nd * nh * nw, c * pd * ph * pw)


def _volume(shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool = False) -> torch.Tensor:
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    if not dtype.is_floating_point:
        return torch.randint(-300, 300, shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)


def _pair(img, patch, chans, dim, scale=1.0, shift=0.0):
    """A randomised reference module (float64 copy for the oracle) and its fast twin with equal weights."""
    ref = randomize_(reference.PatchEmbed3D(img, patch, chans, dim))
    fast = fast_nn.PatchEmbed3D(img, patch, chans, dim, input_scale=scale, input_shift=shift)
    fast.load_state_dict(ref.state_dict())
    return ref.double(), fast


def _check_parity(x, ref64, fast, scale=1.0, shift=0.0):
    """Forward and backward of ``fast(x)`` against ``ref64(x·scale + shift)`` in float64."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    out_fast = fast(x)
    out_ref = ref64(x64 * scale + shift)
    assert out_fast.dtype == torch.float32
    assert_parity(out_fast, out_ref, TOL_CPU_FWD, "forward")
    g = torch.randn_like(out_ref)
    out_fast.backward(g.float())
    out_ref.backward(g)
    for (name, p_ref), p_fast in zip(ref64.named_parameters(), fast.parameters()):
        assert_parity(p_fast.grad, p_ref.grad, TOL_CPU_GRAD, f"grad {name}")
    if x.requires_grad:
        assert_parity(x.grad, x64.grad, TOL_CPU_GRAD, "grad x")


# ---------------------------------------------------------------- the extension itself


def test_extension_is_built_and_compiled():
    import mosaic_fast._C as C

    assert ops.extension_available()
    assert C.__file__.endswith((".so", ".pyd")), C.__file__
    info = C.build_info()
    assert set(info) >= {"openmp", "max_threads"}
    assert info["max_threads"] >= 1


class _Counting:
    """Wraps the extension and counts calls, to prove the CPU path really goes through it."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {"patchify3d": 0, "unpatchify3d": 0}

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def wrapped(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped


@pytest.mark.parametrize("backend_name", ["auto", "torch"])
def test_cpu_path_uses_the_extension(monkeypatch, backend_name):
    counter = _Counting(ops._C)
    monkeypatch.setattr(ops, "_C", counter)
    mosaic_fast.set_backend(backend_name)
    _, fast = _pair(8, 4, 1, 32)
    fast(_volume((2, 1, 8, 8, 8), torch.uint8))
    assert counter.calls["patchify3d"] == 1
    x = _volume((2, 1, 8, 8, 8), torch.float32, requires_grad=True)
    fast(x).sum().backward()
    assert counter.calls == {"patchify3d": 2, "unpatchify3d": 1}


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("patch", [(2, 2, 2), (2, 4, 3)])
def test_extension_patchify_matches_unfold(dtype, patch):
    from mosaic_fast import _C

    x = _volume((2, 3, 4, 8, 6), torch.uint8 if dtype == np.uint8 else torch.float32)
    got = _C.patchify3d(x.numpy(), patch, 0.5, -1.25)
    assert got.dtype == np.float32
    want = _torch_patchify(x, patch) * 0.5 - 1.25
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


def test_extension_writes_into_out_zero_copy_and_threads_agree():
    from mosaic_fast import _C

    x = _volume((3, 2, 8, 8, 8), torch.uint8)
    out = torch.full((3, 8, 2 * 64), float("nan"))
    ret = _C.patchify3d(x.numpy(), (4, 4, 4), 2.0, 1.0, out=out.numpy(), num_threads=2)
    assert ret.ctypes.data == out.data_ptr()  # the numpy result is a view of the torch buffer
    one = _C.patchify3d(x.numpy(), (4, 4, 4), 2.0, 1.0, num_threads=1)
    np.testing.assert_array_equal(out.numpy(), one)
    np.testing.assert_allclose(one, (_torch_patchify(x, (4, 4, 4)) * 2 + 1).numpy(), rtol=1e-6)


def test_extension_unpatchify_is_inverse_and_adjoint():
    from mosaic_fast import _C

    shape, patch = (2, 2, 4, 6, 8), (2, 3, 4)
    x = torch.randn(shape)
    p = _C.patchify3d(x.numpy(), patch)
    np.testing.assert_array_equal(_C.unpatchify3d(p, shape, patch), x.numpy())
    # <patchify(x)*s, q> == <x, unpatchify(q, s)>
    q = np.random.default_rng(0).standard_normal(p.shape).astype(np.float32)
    lhs = float((_C.patchify3d(x.numpy(), patch, 3.0).astype(np.float64) * q).sum())
    rhs = float((x.numpy().astype(np.float64) * _C.unpatchify3d(q, shape, patch, 3.0)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-5)


def test_extension_bad_inputs():
    from mosaic_fast import _C

    x = np.zeros((1, 1, 4, 4, 4), np.uint8)
    vol, patch = (1, 1, 4, 4, 4), (2, 2, 2)
    cases = [
        (ValueError, "5-D", lambda: _C.patchify3d(x[0], (2, 2, 2))),
        (TypeError, "uint8 or float32", lambda: _C.patchify3d(x.astype(np.int16), (2, 2, 2))),
        (TypeError, "uint8 or float32", lambda: _C.patchify3d(x.astype(np.float64), (2, 2, 2))),
        (ValueError, "not divisible", lambda: _C.patchify3d(x, (3, 2, 2))),
        (ValueError, "C-contiguous", lambda: _C.patchify3d(np.zeros((1, 1, 4, 4, 8), np.uint8)[..., ::2], (2, 2, 2))),
        (ValueError, "3 values", lambda: _C.patchify3d(x, (2, 2))),
        (ValueError, "positive", lambda: _C.patchify3d(x, (0, 2, 2))),
        (TypeError, "out: expected dtype float32", lambda: _C.patchify3d(x, (2, 2, 2), out=np.zeros((1, 8, 8)))),
        (ValueError, "out: expected shape", lambda: _C.patchify3d(x, (2, 2, 2), out=np.zeros((1, 8, 7), np.float32))),
        (ValueError, "num_threads", lambda: _C.patchify3d(x, (2, 2, 2), num_threads=-1)),
        (ValueError, "patches: expected shape", lambda: _C.unpatchify3d(np.zeros((1, 8, 7), np.float32), vol, patch)),
        (TypeError, "patches: expected dtype", lambda: _C.unpatchify3d(np.zeros((1, 8, 8)), vol, patch)),
        (ValueError, "volume_shape", lambda: _C.unpatchify3d(np.zeros((1, 8, 8), np.float32), vol[1:], patch)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
    buf = np.zeros(64, np.float32)  # out aliasing the input must be refused, not silently corrupt it
    with pytest.raises(ValueError, match="overlap"):
        _C.patchify3d(buf.reshape(1, 1, 4, 4, 4), (2, 2, 2), out=buf.reshape(1, 8, 8))


# ---------------------------------------------------------------- ops


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.int16])
def test_patchify_op_all_dtypes(dtype):
    x = _volume((2, 2, 4, 4, 6), dtype)
    p = ops.patchify3d(x, (2, 2, 3), 0.25, 0.5)
    assert p.dtype == (dtype if dtype.is_floating_point else torch.float32)
    torch.testing.assert_close(p.double(), _torch_patchify(x, (2, 2, 3)) * 0.25 + 0.5, rtol=1e-6, atol=1e-6)


def test_patchify_op_non_contiguous_input():
    base = torch.randn(2, 4, 8, 4, 6)
    x = base.permute(0, 3, 1, 2, 4)[:, :, ::2]  # (2, 4, 2, 8, 6) strided
    torch.testing.assert_close(ops.patchify3d(x, (2, 4, 3)).double(), _torch_patchify(x, (2, 4, 3)))


@pytest.mark.parametrize("extension", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 1, 4, 4, 4), (0, 1, 8, 8, 8)], ids=["one_patch", "empty_batch"])
def test_ops_return_fresh_tensors_where_the_torch_path_would_return_views(monkeypatch, extension, dtype, shape):
    """One patch per single-channel volume, or an empty batch: the torch fallback's reshapes are views of
    the input there, which a custom op may not return (torch raised "may not alias any inputs"). Taken by
    dtypes the extension does not handle, by builds without it and by CUDA tensors on the torch backend."""
    if not extension:
        monkeypatch.setattr(ops, "_C", None)
    patch = (4, 4, 4) if shape[0] else (4, 8, 2)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    p = ops.patchify3d(x, patch)
    assert p.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() or p.numel() == 0
    torch.testing.assert_close(p.detach().double(), _torch_patchify(x.detach(), patch))
    v = ops.unpatchify3d(p.detach(), shape, patch)
    torch.testing.assert_close(v, x.detach())
    (p * torch.randn_like(p)).sum().backward()
    assert x.grad.shape == x.shape


def test_patchify_and_unpatchify_gradients():
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.patchify3d(v, (2, 2, 2), 1.5, 0.3), (x,))
    p = torch.randn(1, 8, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: ops.unpatchify3d(v, (1, 2, 4, 4, 4), (2, 2, 2), 0.7), (p,))


def test_ops_opcheck():
    x32 = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.mosaic_fast.patchify3d, (x32, [2, 2, 2], 0.5, 0.1))
    x8 = _volume((2, 1, 4, 4, 4), torch.uint8)
    torch.library.opcheck(torch.ops.mosaic_fast.patchify3d, (x8, [2, 2, 2], 1.0, 0.0))
    p = torch.randn(2, 8, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.mosaic_fast.unpatchify3d, (p, [2, 1, 4, 4, 4], [2, 2, 2], 2.0))


def test_ops_bad_inputs():
    x = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="patch_size"):
        ops.patchify3d(x, (2, 2))
    with pytest.raises(ValueError, match="x: expected a 5-D"):
        ops.patchify3d(x[0], (2, 2, 2))
    with pytest.raises(ValueError, match="not divisible"):
        ops.patchify3d(x, (3, 2, 2))
    with pytest.raises(TypeError, match="x: expected an integer or floating dtype"):
        ops.patchify3d(x.bool(), (2, 2, 2))
    with pytest.raises(ValueError, match="patches: expected shape"):
        ops.unpatchify3d(torch.zeros(1, 8, 7), (1, 1, 4, 4, 4), (2, 2, 2))
    w = torch.zeros(8, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="weight: expected shape"):
        ops.patch_embed3d(x, w[:, :, :1], None, (2, 2, 2))
    with pytest.raises(ValueError, match="bias: expected shape"):
        ops.patch_embed3d(x, w, torch.zeros(7), (2, 2, 2))


# ---------------------------------------------------------------- nn.PatchEmbed3D


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("patch", [(8, 8, 8), (4, 8, 8)])
@pytest.mark.parametrize("batch", [1, 2])
def test_module_parity(dtype, patch, batch):
    ref64, fast = _pair(16, patch, 1, 64)
    x = _volume((batch, 1, 16, 16, 16), dtype, requires_grad=dtype.is_floating_point)
    _check_parity(x, ref64, fast)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_module_fused_normalisation_and_channels(dtype):
    """input_scale=1/255 fuses the MedMNIST scaling; two channels, anisotropic patch and volume."""
    scale, shift = 1 / 255, -0.5
    ref64, fast = _pair((8, 16, 12), (2, 4, 3), 2, 48, scale, shift)
    x = _volume((2, 2, 8, 16, 12), dtype, requires_grad=dtype.is_floating_point)
    _check_parity(x, ref64, fast, scale, shift)


def test_module_non_contiguous_float_input():
    ref64, fast = _pair(8, (4, 4, 2), 1, 32)
    x = torch.randn(2, 8, 8, 1, 8).permute(0, 3, 1, 2, 4).requires_grad_()  # leaf, strided
    _check_parity(x, ref64, fast)


def test_module_other_dtypes_use_torch_path():
    ref64, fast = _pair(8, 4, 1, 32)
    x = _volume((2, 1, 8, 8, 8), torch.int16)
    assert_parity(fast(x), ref64(x.double()), TOL_CPU_FWD)
    fast64 = fast.double()
    x64 = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64)
    out = fast64(x64)
    assert out.dtype == torch.float64
    assert_parity(out, ref64(x64), 1e-12)


def test_module_is_a_drop_in():
    ref = reference.PatchEmbed3D(16, (4, 8, 8), 1, 32)
    fast = fast_nn.PatchEmbed3D(16, (4, 8, 8), 1, 32)
    assert isinstance(fast, reference.PatchEmbed3D)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in fast.named_buffers()] == []
    assert fast.num_patches == ref.num_patches == 2 * 2 * 4
    x = _volume((1, 1, 16, 16, 16), torch.uint8)
    model = torch.nn.Sequential(randomize_(reference.UnifiedPatchEmbed(32, 16, 3, 16, (4, 8, 8), 1, 32)))
    ref_out, _ = model[0](x)
    mosaic_fast.nn.convert(model)
    assert type(model[0].patch_embed_3d) is fast_nn.PatchEmbed3D
    assert model[0].patch_embed_3d.input_scale == 1.0  # class default: convert() does not call __init__
    out, is_3d = model[0](x)
    assert is_3d
    assert_parity(out, ref_out, TOL_CPU_FWD)


def test_module_empty_batch():
    ref64, fast = _pair(8, 4, 1, 32)
    x = torch.zeros(0, 1, 8, 8, 8, dtype=torch.uint8)
    assert fast(x).shape == ref64(x.double()).shape == (0, 8, 32)


def test_module_compiles_without_graph_breaks():
    """The ops are torch.library custom ops: fullgraph=True compiles, forward and backward agree."""
    ref64, fast = _pair(8, (2, 4, 4), 1, 32)
    compiled = torch.compile(fast, fullgraph=True)
    x = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    out = compiled(x)
    assert_parity(out, ref64(x.detach().double()), TOL_CPU_FWD)
    out.square().sum().backward()
    x_eager = x.detach().clone().requires_grad_()
    fast(x_eager).square().sum().backward()
    assert_parity(x.grad, x_eager.grad, TOL_CPU_GRAD, "grad x")


def test_module_bad_inputs():
    fast = fast_nn.PatchEmbed3D(16, 8, 1, 32)
    with pytest.raises(ValueError, match="x: expected"):
        fast(torch.zeros(1, 16, 16, 16))
    with pytest.raises(ValueError, match="x: expected"):
        fast(torch.zeros(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="not divisible"):
        fast(torch.zeros(1, 1, 16, 16, 12))
    with pytest.raises(TypeError, match=r"x: expected a torch\.Tensor"):
        fast(np.zeros((1, 1, 16, 16, 16), np.float32))
    with pytest.raises(TypeError, match="x: expected an integer or floating dtype"):
        fast(torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool))
    for patch in (0, (8, 8, -8), (8, 8)):
        with pytest.raises(ValueError, match="patch_size must be a positive int"):
            fast_nn.PatchEmbed3D(16, patch, 1, 32)
    with pytest.raises(ValueError, match=r"img_size .* must be divisible by patch_size"):
        reference.PatchEmbed3D(20, 8, 1, 32)
    for module in (fast, reference.PatchEmbed3D(16, 8, 1, 32)):  # the reference checks the same
        with pytest.raises(TypeError, match="x: expected an integer or floating dtype"):
            module(torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"volume \(0, 16, 16\) is empty"):
            module(torch.zeros(1, 1, 0, 16, 16))
