"""Gaps found by mutation testing of the CPU GEMM library choice (ops/cpu_gemm.py) and the 3D patch
embedding (ops/patch_embed3d.py, nn/patch_embed.py, csrc/patchify3d.cpp): the library chosen by the
environment and restored by the context manager, the default size threshold, add_linear's two-step form
under autocast / mixed dtypes / oneDNN, the MKL addmm fallback, the patch ops' argument checks, the fake
(meta) implementations, unpatchify3d's own gradient, the dtype dispatch of the Triton path, the
extension's buffer checks. Every value is compared with a float64 formula or an unfold oracle."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity import TOL_BF16, TOL_CPU_FWD, assert_parity, randomize_

from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.nn.bypass import FastPathFallbackWarning
from mosaic_fast.ops import cpu_gemm
from mosaic_fast.ops import patch_embed3d as ops

ROOT = Path(__file__).resolve().parents[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert b.norm() > 1e-3, "reference too small to compare"
    return float((a - b).norm() / b.norm())


def _unfold_patches(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Independent oracle: the Conv3d patch matrix (B, L, C·pd·ph·pw) through unfold, in float64."""
    pd, ph, pw = patch
    u = x.double().unfold(2, pd, pd).unfold(3, ph, ph).unfold(4, pw, pw)
    b, c, nd, nh, nw = u.shape[:5]
    return u.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b, nd * nh * nw, c * pd * ph * pw)


@pytest.fixture
def spy_onednn(onednn_library, monkeypatch):
    """Epilogues of the calls that reach oneDNN's Linear, leaving MIN_ONEDNN_MACS as it is."""
    calls = []
    real = cpu_gemm._ONEDNN_LINEAR

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(cpu_gemm, "_ONEDNN_LINEAR", spy)
    return calls


# ---------------------------------------------------------------- cpu_gemm: the library choice


def _import_choice(value: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MOSAIC_FAST_CPU_GEMM"}
    env["MOSAIC_FAST_CPU_GEMM"] = value
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = "from mosaic_fast.ops import cpu_gemm; print(cpu_gemm._library, cpu_gemm.onednn_enabled())"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_environment_variable_chooses_the_library_at_import():
    """MOSAIC_FAST_CPU_GEMM=mkl turns oneDNN off whatever the CPU; an unknown name is an import-time
    ValueError naming the variable (not a silent default)."""
    mkl = _import_choice("mkl")
    assert mkl.returncode == 0, mkl.stderr
    assert mkl.stdout.split() == ["mkl", "False"]
    bad = _import_choice("openblas")
    assert bad.returncode != 0
    assert "ValueError: MOSAIC_FAST_CPU_GEMM must be one of" in bad.stderr and "'openblas'" in bad.stderr


def test_cpu_gemm_library_restores_the_previous_choice_even_on_error(onednn_calls):
    x, w = torch.randn(6, 12), torch.randn(5, 12)
    with pytest.raises(KeyError):
        with cpu_gemm.cpu_gemm_library("mkl"):
            assert not cpu_gemm.onednn_enabled()
            assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))
            raise KeyError("inside the block")
    assert onednn_calls == []
    assert cpu_gemm.onednn_enabled()
    assert rel(cpu_gemm.linear(x, w), F.linear(x.double(), w.double())) <= 1e-5
    assert onednn_calls == ["none"]  # oneDNN again after the block


def test_default_threshold_sits_between_the_measured_sizes(spy_onednn):
    """The documented measurements: MKL wins at 8×64×64 (6 vs 12 µs), oneDNN at ~20M multiply-adds."""
    w = torch.randn(64, 64)
    tiny = torch.randn(8, 64)
    assert torch.equal(cpu_gemm.linear(tiny, w), F.linear(tiny, w)) and spy_onednn == []
    x, w = torch.randn(256, 256), torch.randn(320, 256) / 16  # 21M multiply-adds
    assert rel(cpu_gemm.linear(x, w), F.linear(x.double(), w.double())) <= 1e-5
    assert spy_onednn == ["none"]


# ---------------------------------------------------------------- cpu_gemm: add_linear and addmm


def test_add_linear_under_autocast_is_the_two_step_form():
    """Autocast casts the product's inputs; the one-buffer form (addmm_ into base + bias) would bypass that
    and compute in fp32, so under autocast the result is exactly ``base + alpha·F.linear`` of autocast."""
    x, w, b = torch.randn(2, 13, 24), torch.randn(40, 24) / 5, torch.randn(40) / 5
    base = torch.randn(2, 13, 40)
    with cpu_gemm.cpu_gemm_library("mkl"), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = cpu_gemm.add_linear(base, x, w, b, alpha=0.1)
        want = torch.add(base, F.linear(x, w, b), alpha=0.1)
        reused = cpu_gemm.add_linear(base.clone(), x, w, b, alpha=0.1, reuse_base=True)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(reused, want)


@pytest.mark.parametrize("library", ["mkl", "onednn"])
def test_add_linear_with_a_base_of_another_dtype_promotes_like_the_two_step_form(library, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "MIN_ONEDNN_MACS", 0)
    x, w, b = torch.randn(3, 11, 24), torch.randn(40, 24) / 5, torch.randn(40) / 5
    base = torch.randn(3, 11, 40, dtype=torch.float64)
    kept = base.clone()
    with cpu_gemm.cpu_gemm_library(library), torch.no_grad():
        got = cpu_gemm.add_linear(base, x, w, b, alpha=0.5, reuse_base=True)
    assert got.dtype == torch.float64 and torch.equal(base, kept)
    assert rel(got, base + 0.5 * F.linear(x.double(), w.double(), b.double())) <= 1e-6


@pytest.mark.parametrize("reuse_base", [False, True])
def test_add_linear_on_onednn_multiplies_through_onednn(reuse_base, onednn_calls):
    """With oneDNN chosen the product runs there (then is added), not in MKL's addmm_."""
    x, w, b = torch.randn(2, 13, 24), torch.randn(40, 24) / 5, torch.randn(40) / 5
    base = torch.randn(2, 13, 40)
    want = base.double() + 0.1 * F.linear(x.double(), w.double(), b.double())
    with torch.no_grad():
        got = cpu_gemm.add_linear(base, x, w, b, alpha=0.1, reuse_base=reuse_base)
    assert rel(got, want) <= 1e-6
    assert (got.data_ptr() == base.data_ptr()) == reuse_base
    assert onednn_calls == ["none"]


def test_mkl_addmm_and_mm_keep_the_bias():
    a, wt, bias = torch.randn(50, 24), torch.randn(16, 24), torch.randn(16)
    with cpu_gemm.cpu_gemm_library("mkl"):
        got = cpu_gemm.addmm(bias, a, wt.t())
        plain = cpu_gemm.mm(a, wt.t())
    assert rel(got, torch.addmm(bias.double(), a.double(), wt.t().double())) <= 1e-6
    assert rel(plain, a.double() @ wt.t().double()) <= 1e-6


# ---------------------------------------------------------------- patch ops: argument checks


def test_patch_size_and_divisibility_are_checked_by_name():
    x = torch.randn(1, 1, 4, 4, 6)
    with pytest.raises(ValueError, match="patch_size: expected 3 positive ints"):
        ops.patchify3d(x, (0, 2, 2))
    with pytest.raises(TypeError, match="patch_size: expected ints"):
        ops.patchify3d(x, (True, 2, 2))
    with pytest.raises(ValueError, match=r"x: volume \(4, 4, 6\) is not divisible by patch_size \(2, 2, 4\)"):
        ops.patchify3d(x.double(), (2, 2, 4))  # only W fails (float64: the torch path, not the extension)
    assert_parity(ops.patchify3d(x, 2), _unfold_patches(x, (2, 2, 2)), 1e-7)  # one int: a cube


def test_unpatchify_checks_its_arguments():
    p = torch.randn(1, 8, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="patches: expected a floating dtype"):
        ops.unpatchify3d(p.long(), (1, 1, 4, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match=r"volume_shape: \(4, 4, 5\) is not divisible"):
        ops.unpatchify3d(p, (1, 1, 4, 4, 5), (2, 2, 2))
    with pytest.raises(ValueError, match=r"volume_shape: expected \(B, C, D, H, W\)"):
        ops.unpatchify3d(p, (1, 1, 1, 4, 4, 4), (2, 2, 2))


def test_weight_and_bias_are_checked_by_name():
    x = torch.randn(1, 1, 4, 4, 4)
    w = torch.randn(8, 1, 2, 2, 2)
    with pytest.raises(TypeError, match=r"bias: expected the weight dtype torch\.float32, got torch\.float64"):
        ops.patch_embed3d(x, w, torch.zeros(8, dtype=torch.float64), (2, 2, 2))
    with pytest.raises(TypeError, match=r"weight: expected a floating dtype, got torch\.int64"):
        ops.patch_embed3d(x, w.long(), None, (2, 2, 2))
    with pytest.raises(ValueError, match="weight: on meta but x is on cpu"):
        ops.patch_embed3d(x, w.to("meta"), None, (2, 2, 2))


def test_missing_extension_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_warned_no_extension", False)
    x, w, b = torch.randn(2, 1, 4, 4, 4), torch.randn(8, 1, 2, 2, 2), torch.randn(8)
    want = _unfold_patches(x, (2, 2, 2)) @ w.double().reshape(8, -1).t() + b.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [ops.patch_embed3d(x, w, b, (2, 2, 2)) for _ in range(3)]
    msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(msgs) == 1 and "mosaic_fast._C is not built" in msgs[0]
    for out in outs:
        assert_parity(out, want, TOL_CPU_FWD)


# ---------------------------------------------------------------- patch ops: fake impls and gradients


def test_opcheck_with_channels_and_float64():
    """The fake (meta) implementations give the real shape with C > 1 and the real dtype for float64
    (patch matrix K = C·pd·ph·pw; float64 stays float64, integers become float32)."""
    x = torch.randn(2, 3, 4, 4, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.mosaic_fast.patchify3d, (x, [2, 2, 3], 0.5, 0.25))
    x8 = torch.randint(0, 256, (1, 2, 4, 4, 4), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.mosaic_fast.patchify3d, (x8, [2, 2, 2], 1.0, 0.0))
    p = torch.randn(2, 8, 3 * 12, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.mosaic_fast.unpatchify3d, (p, [2, 3, 4, 4, 6], [2, 2, 3], 2.0))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = ops.patchify3d(torch.empty(2, 3, 4, 4, 6, dtype=torch.float64), (2, 2, 3))
    assert fake.shape == (2, 8, 36) and fake.dtype == torch.float64


def test_unpatchify_gradient_is_the_scaled_patchify():
    """unpatchify3d(q, s) = s·fold(q): its gradient is s·patchify(g), on the torch (float64) path and on
    the C++ (float32) path."""
    shape, patch, s = (2, 2, 4, 4, 6), (2, 2, 3), 0.7
    q64 = torch.randn(2, 8, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: ops.unpatchify3d(q, shape, patch, s), (q64,))
    q = torch.randn(2, 8, 24, requires_grad=True)
    g = torch.randn(shape)
    ops.unpatchify3d(q, shape, patch, s).backward(g)
    assert_parity(q.grad, s * _unfold_patches(g, patch), 1e-6)


# ---------------------------------------------------------------- dispatch of the Triton path


def test_triton_proj_rejects_input_dtypes_it_does_not_take(triton_backend):
    x = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64, device=triton_backend)
    w = torch.randn(16, 1, 2, 2, 2, device=triton_backend)
    with pytest.raises(TypeError, match=r"x: the Triton path takes dtypes .*, got torch\.float64"):
        ops.patch_embed3d_proj(x, w, None, (2, 2, 2))


def test_triton_backend_sends_float64_to_the_torch_path(triton_backend):
    """float64 is not a Triton dtype: patch_embed3d computes it in float64 (the kernel would round the
    patches to fp32 before its dot)."""
    x = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64, device=triton_backend)
    w = torch.randn(16, 1, 4, 4, 4, dtype=torch.float64, device=triton_backend)
    b = torch.randn(16, dtype=torch.float64, device=triton_backend)
    got = ops.patch_embed3d(x, w, b, (4, 4, 4), 0.5, 0.25)
    want = F.conv3d(x * 0.5 + 0.25, w, b, stride=4).flatten(2).transpose(1, 2)
    assert got.dtype == torch.float64
    assert_parity(got, want, 1e-12)


# ---------------------------------------------------------------- nn.PatchEmbed3D without its fast path


def test_hooked_module_applies_the_scale_alone():
    """A hook on proj forces the reference computation; input_scale without a shift still applies."""
    ref = randomize_(reference.PatchEmbed3D(8, 4, 1, 32)).double()
    fast = fast_nn.PatchEmbed3D(8, 4, 1, 32, input_scale=1 / 255)
    fast.load_state_dict(ref.state_dict())
    seen = []
    fast.proj.register_forward_hook(lambda *args: seen.append(1))
    x = torch.randint(0, 256, (2, 1, 8, 8, 8), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastPathFallbackWarning)
        out = fast(x)
    assert seen == [1]
    assert_parity(out, ref(x.double() / 255), TOL_CPU_FWD)


# ---------------------------------------------------------------- the C++ extension's buffer checks


def test_extension_checks_w_divisibility_and_out_layout():
    from mosaic_fast import _C

    x = np.zeros((1, 1, 4, 4, 6), np.float32)
    with pytest.raises(ValueError, match=r"x: volume \(4, 4, 6\) is not divisible by patch_size \(2, 2, 4\)"):
        _C.patchify3d(x, (2, 2, 4))
    with pytest.raises(ValueError, match=r"volume_shape: volume \(4, 4, 6\) is not divisible"):
        _C.unpatchify3d(np.zeros((1, 4, 16), np.float32), (1, 1, 4, 4, 6), (2, 2, 4))
    strided = np.zeros((1, 8, 16), np.float32)[:, :, ::2]  # (1, 8, 8), not C-contiguous
    with pytest.raises(ValueError, match="out: must be C-contiguous"):
        _C.patchify3d(np.zeros((1, 1, 4, 4, 4), np.uint8), (2, 2, 2), out=strided)


def test_extension_overlap_check_is_exact():
    """An out buffer right after the input in the same allocation is fine; one overlapping the patches of
    unpatchify3d is refused (not silently read after being written)."""
    from mosaic_fast import _C

    buf = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    x, out = buf[:64].reshape(1, 1, 4, 4, 4), buf[64:].reshape(1, 8, 8)
    x0 = x.copy()
    _C.patchify3d(x, (2, 2, 2), out=out)
    np.testing.assert_allclose(out, _unfold_patches(torch.from_numpy(x0), (2, 2, 2)).numpy(), rtol=1e-6)
    buf[:64] = np.nan  # the volume just before the patches
    _C.unpatchify3d(out, (1, 1, 4, 4, 4), (2, 2, 2), out=buf[:64].reshape(1, 1, 4, 4, 4))
    np.testing.assert_array_equal(buf[:64].reshape(1, 1, 4, 4, 4), x0)
    with pytest.raises(ValueError, match="out: must not overlap patches"):
        _C.unpatchify3d(out, (1, 1, 4, 4, 4), (2, 2, 2), out=buf[32:96].reshape(1, 1, 4, 4, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_hooked_module_in_another_dtype_normalises_a_uint8_volume(dtype):
    """The reference fallback (a hook on proj) of a bf16 / fp64 module with input_scale: the documented
    uint8 pipeline worked on the fused path but raised a dtype TypeError here (x.float() fed to the
    module's bf16/fp64 Conv3d)."""
    ref = randomize_(reference.PatchEmbed3D(8, 4, 1, 32)).double()
    fast = fast_nn.PatchEmbed3D(8, 4, 1, 32, input_scale=1 / 255, input_shift=-0.5)
    fast.load_state_dict(ref.state_dict())
    fast.to(dtype)
    x = torch.randint(0, 256, (2, 1, 8, 8, 8), dtype=torch.uint8)
    fused = fast(x)
    fast.proj.register_forward_hook(lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastPathFallbackWarning)
        hooked = fast(x)
    want = ref(x.double() / 255 - 0.5)
    tol = TOL_BF16 if dtype == torch.bfloat16 else TOL_CPU_FWD
    assert hooked.dtype == fused.dtype == dtype
    assert_parity(hooked, want, tol)
    assert_parity(fused, want, tol)
