"""3D patch embedding ops: patchify (C++ on CPU), its adjoint, and the fused Triton projection.

Three ops, registered with ``torch.library.custom_op`` (namespace ``mosaic_fast``) so that
``torch.compile`` sees them as single nodes with fake (meta) implementations and autograd formulas:

``patchify3d(x, patch_size, scale, shift)``
    (B, C, D, H, W) volume -> (B, L, C·pd·ph·pw) patch matrix of a Conv3d with kernel == stride,
    normalised as ``x·scale + shift``. Tokens ordered (d', h', w') (Conv3d's ``flatten(2)``), entries
    (c, d, h, w) (the flattened Conv3d weight). Output dtype: ``x.dtype`` for floating ``x``, float32 for
    integer ``x``. Contiguous uint8/float32 CPU volumes go through the C++ extension ``mosaic_fast._C``
    (OpenMP over patches, GIL released); anything else through a reshape/permute in torch.
``unpatchify3d(patches, volume_shape, patch_size, scale)``
    The adjoint: ``scale · fold(patches)`` back to (B, C, D, H, W); the input gradient of patchify3d.
    C++ for float32 CPU, torch otherwise. Each op's backward is the other, so double backward works.
``patch_embed3d_proj(x, weight, bias, patch_size, scale, shift)``
    The fused Triton kernel (kernels/patch_embed3d.py): patches gathered in the GEMM prologue, bias in
    the epilogue -> (B, L, E) in the weight dtype. Backward in torch: dW = dYᵀ·patchify(x),
    db = Σ dY, dx = unpatchify(dY·W) (only when x requires grad).

:func:`patch_embed3d` is the dispatching entry point used by ``mosaic_fast.nn.PatchEmbed3D``
(projection only; the LayerNorm follows in the module).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .. import backend
from . import cpu_gemm
from ._common import check_real, check_sizes

try:
    from .. import _C
except ImportError:  # a source tree without a build; the module then warns once and uses torch
    _C = None

__all__ = [
    "extension_available",
    "patch_embed3d",
    "patch_embed3d_proj",
    "patchify3d",
    "unpatchify3d",
]

_C_DTYPES = (torch.uint8, torch.float32)
_TRITON_X_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16, torch.float32)
_TRITON_W_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned_no_extension = False


def extension_available() -> bool:
    """True when the C++ extension ``mosaic_fast._C`` was built and imported."""
    return _C is not None


def _check_patch(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    """(pd, ph, pw) from 3 positive ints, or one int for a cube (anything with ``__index__``, not bool)."""
    if hasattr(patch_size, "__index__") and not isinstance(patch_size, (bool, torch.Tensor)):
        patch_size = (patch_size,) * 3
    if not isinstance(patch_size, Sequence) or isinstance(patch_size, str):
        raise TypeError(f"patch_size: expected an int or 3 ints (pd, ph, pw), got {type(patch_size).__name__}")
    if any(isinstance(p, bool) or not hasattr(p, "__index__") for p in patch_size):
        raise TypeError(f"patch_size: expected ints, got {tuple(patch_size)}")
    patch = tuple(operator.index(p) for p in patch_size)
    if len(patch) != 3 or any(p <= 0 for p in patch):
        raise ValueError(f"patch_size: expected 3 positive ints (pd, ph, pw), got {patch}")
    return patch


def _check_volume(x: torch.Tensor, patch: tuple[int, int, int], name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{name}: expected a 5-D (B, C, D, H, W) volume, got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name}: expected an integer or floating dtype, got {x.dtype}")
    if any(s % p for s, p in zip(x.shape[2:], patch)):
        raise ValueError(f"{name}: volume {tuple(x.shape[2:])} is not divisible by patch_size {patch}")


def _geometry(shape: Sequence[int], patch: tuple[int, int, int]) -> tuple[int, int, int, int, int]:
    """(B, C, nd, nh, nw) of a (B, C, D, H, W) volume cut into ``patch`` blocks."""
    b, c, d, h, w = shape
    return b, c, d // patch[0], h // patch[1], w // patch[2]


def _patch_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


def _not_aliasing(out: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``out`` contiguous and sharing no memory with ``source``: a custom op may not return a view of its
    input, and the torch fallbacks' reshapes, ``.to`` and ``.contiguous`` all return views when the
    permutation moves only size-1 dims (one patch per single-channel volume) or the batch is empty."""
    out = out.contiguous()
    return out.clone() if out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else out


def _patchify_torch(x: torch.Tensor, patch: tuple[int, int, int], scale: float, shift: float) -> torch.Tensor:
    b, c, nd, nh, nw = _geometry(x.shape, patch)
    pd, ph, pw = patch
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.reshape(b, c, nd, pd, nh, ph, nw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7).to(compute)
    v = v.reshape(b, nd * nh * nw, c * pd * ph * pw)
    if scale != 1.0 or shift != 0.0:
        v = v * scale + shift
    return _not_aliasing(v.to(_patch_dtype(x)), x)


def _unpatchify_torch(
    patches: torch.Tensor, volume_shape: Sequence[int], patch: tuple[int, int, int], scale: float
) -> torch.Tensor:
    b, c, nd, nh, nw = _geometry(volume_shape, patch)
    pd, ph, pw = patch
    v = patches.reshape(b, nd, nh, nw, c, pd, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    v = v.reshape(*volume_shape)
    return _not_aliasing(v * scale if scale != 1.0 else v, patches)


@torch.library.custom_op("mosaic_fast::patchify3d", mutates_args=())
def _patchify3d_op(x: torch.Tensor, patch_size: Sequence[int], scale: float, shift: float) -> torch.Tensor:
    patch = tuple(patch_size)
    if _C is not None and x.device.type == "cpu" and x.dtype in _C_DTYPES:
        x = x.contiguous()
        b, c, nd, nh, nw = _geometry(x.shape, patch)
        out = torch.empty((b, nd * nh * nw, c * patch[0] * patch[1] * patch[2]), dtype=torch.float32)
        _C.patchify3d(x.detach().numpy(), patch, scale, shift, out=out.numpy(), num_threads=torch.get_num_threads())
        return out
    return _patchify_torch(x, patch, scale, shift)


@_patchify3d_op.register_fake
def _(x: torch.Tensor, patch_size: Sequence[int], scale: float, shift: float) -> torch.Tensor:
    b, c, nd, nh, nw = _geometry(x.shape, tuple(patch_size))
    k = c * patch_size[0] * patch_size[1] * patch_size[2]
    return x.new_empty((b, nd * nh * nw, k), dtype=_patch_dtype(x))


@torch.library.custom_op("mosaic_fast::unpatchify3d", mutates_args=())
def _unpatchify3d_op(
    patches: torch.Tensor, volume_shape: Sequence[int], patch_size: Sequence[int], scale: float
) -> torch.Tensor:
    patch = tuple(patch_size)
    if _C is not None and patches.device.type == "cpu" and patches.dtype == torch.float32:
        out = torch.empty(tuple(volume_shape), dtype=torch.float32)
        _C.unpatchify3d(
            patches.detach().contiguous().numpy(),
            tuple(volume_shape),
            patch,
            scale,
            out=out.numpy(),
            num_threads=torch.get_num_threads(),
        )
        return out
    return _unpatchify_torch(patches, volume_shape, patch, scale)


@_unpatchify3d_op.register_fake
def _(patches: torch.Tensor, volume_shape: Sequence[int], patch_size: Sequence[int], scale: float) -> torch.Tensor:
    return patches.new_empty(tuple(volume_shape))


def _patchify_setup(ctx, inputs, output) -> None:
    x, patch_size, scale, _ = inputs
    ctx.volume_shape, ctx.patch, ctx.scale, ctx.x_dtype = tuple(x.shape), tuple(patch_size), scale, x.dtype


def _patchify_backward(ctx, grad):
    dx = _unpatchify3d_op(grad, ctx.volume_shape, ctx.patch, ctx.scale)
    return dx.to(ctx.x_dtype), None, None, None


def _unpatchify_setup(ctx, inputs, output) -> None:
    _, _, patch_size, scale = inputs
    ctx.patch, ctx.scale = tuple(patch_size), scale


def _unpatchify_backward(ctx, grad):
    return _patchify3d_op(grad, ctx.patch, ctx.scale, 0.0), None, None, None


_patchify3d_op.register_autograd(_patchify_backward, setup_context=_patchify_setup)
_unpatchify3d_op.register_autograd(_unpatchify_backward, setup_context=_unpatchify_setup)


@torch.library.custom_op("mosaic_fast::patch_embed3d_proj", mutates_args=())
def _patch_embed3d_proj_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: Sequence[int],
    scale: float,
    shift: float,
) -> torch.Tensor:
    from ..kernels.patch_embed3d import patch_embed3d_fwd

    return patch_embed3d_fwd(x, weight, bias, tuple(patch_size), scale, shift)


@_patch_embed3d_proj_op.register_fake
def _(x, weight, bias, patch_size, scale, shift):
    b, _, nd, nh, nw = _geometry(x.shape, tuple(patch_size))
    return weight.new_empty((b, nd * nh * nw, weight.shape[0]))


def _proj_setup(ctx, inputs, output) -> None:
    x, weight, bias, patch_size, scale, shift = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.patch, ctx.scale, ctx.shift = tuple(patch_size), scale, shift


def _proj_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    e = weight.shape[0]
    w2 = weight.reshape(e, -1)
    g2 = grad.reshape(-1, e).to(weight.dtype)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        # L from grad (B, L, E), not -1: with B = 0 the view of an empty tensor would be ambiguous
        dp = (g2 @ w2).view(x.shape[0], grad.shape[1], w2.shape[1])
        dx = _unpatchify3d_op(dp, tuple(x.shape), ctx.patch, ctx.scale).to(x.dtype)
    if ctx.needs_input_grad[1]:
        p = _patchify3d_op(x, ctx.patch, ctx.scale, ctx.shift).to(weight.dtype)
        dw = (g2.t() @ p.reshape(-1, w2.shape[1])).view_as(weight)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = g2.sum(0)
    return dx, dw, db, None, None, None


_patch_embed3d_proj_op.register_autograd(_proj_backward, setup_context=_proj_setup)


def patchify3d(
    x: torch.Tensor, patch_size: int | Sequence[int], scale: float = 1.0, shift: float = 0.0
) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, L, C·pd·ph·pw) patch matrix of ``x·scale + shift`` (differentiable in x);
    ``patch_size`` (pd, ph, pw) or one int for cubes."""
    patch = _check_patch(patch_size)
    _check_volume(x, patch)
    return _patchify3d_op(x, patch, check_real("scale", scale), check_real("shift", shift))


def unpatchify3d(
    patches: torch.Tensor, volume_shape: Sequence[int], patch_size: Sequence[int], scale: float = 1.0
) -> torch.Tensor:
    """Adjoint of :func:`patchify3d`: ``scale·fold(patches)`` as a (B, C, D, H, W) volume."""
    patch = _check_patch(patch_size)
    if isinstance(volume_shape, Sequence) and not isinstance(volume_shape, str) and len(volume_shape) != 5:
        raise ValueError(f"volume_shape: expected (B, C, D, H, W), got {tuple(volume_shape)}")
    shape = tuple(check_sizes("volume_shape", volume_shape, length=5, minimum=0))
    if any(s % p for s, p in zip(shape[2:], patch)):
        raise ValueError(f"volume_shape: {shape[2:]} is not divisible by patch_size {patch}")
    b, c, nd, nh, nw = _geometry(shape, patch)
    expected = (b, nd * nh * nw, c * patch[0] * patch[1] * patch[2])
    if not isinstance(patches, torch.Tensor) or tuple(patches.shape) != expected:
        got = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
        raise ValueError(f"patches: expected shape {expected} for volume_shape {shape}, got {got}")
    if not patches.is_floating_point():
        raise TypeError(f"patches: expected a floating dtype, got {patches.dtype}")
    return _unpatchify3d_op(patches, shape, patch, check_real("scale", scale))


def patch_embed3d_proj(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: Sequence[int],
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """Fused Triton projection ``(B, L, E) = patchify(x·scale + shift) @ Wᵀ + b`` (no LayerNorm).

    Under Triton's interpreter bf16 is computed in fp32 and cast back (the interpreter has no bf16
    arithmetic and its bf16 ``tl.dot`` is silently wrong).
    """
    patch = _check_patch(patch_size)
    _check_volume(x, patch)
    _check_weight(x, weight, bias, patch)
    backend.require_triton("patch_embed3d_proj", x)
    if x.dtype not in _TRITON_X_DTYPES:
        raise TypeError(f"x: the Triton path takes dtypes {_TRITON_X_DTYPES}, got {x.dtype}")
    if weight.dtype not in _TRITON_W_DTYPES:
        raise TypeError(f"weight: the Triton path takes dtypes {_TRITON_W_DTYPES}, got {weight.dtype}")
    return _proj_checked(x, weight, bias, patch, check_real("scale", scale), check_real("shift", shift))


def _proj_checked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch: tuple[int, int, int],
    scale: float,
    shift: float,
) -> torch.Tensor:
    """The Triton projection on arguments already checked (bf16 upcast under the interpreter).

    Without autograd and outside torch.compile the launcher is called directly: the custom op's
    dispatch costs tens of microseconds per call, as much as the kernel itself at small batches."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad or torch.compiler.is_compiling():
        proj = _patch_embed3d_proj_op
    else:
        from ..kernels.patch_embed3d import patch_embed3d_fwd as proj
    if backend.INTERPRET and not x.is_cuda and torch.bfloat16 in (x.dtype, weight.dtype):
        y = proj(
            x.float() if x.dtype == torch.bfloat16 else x,
            weight.float(),
            bias.float() if bias is not None else None,
            patch,
            float(scale),
            float(shift),
        )
        return y.to(weight.dtype)
    return proj(x, weight, bias, patch, float(scale), float(shift))


def _check_weight(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, patch: tuple[int, int, int]
) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    expected = (x.shape[1], *patch)
    if weight.dim() != 5 or tuple(weight.shape[1:]) != expected:
        raise ValueError(f"weight: expected shape (E, {', '.join(map(str, expected))}), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight: on {weight.device} but x is on {x.device}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.device != x.device):
        raise ValueError(
            f"bias: expected shape ({weight.shape[0]},) on {x.device}, got {tuple(bias.shape)} on {bias.device}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating dtype, got {weight.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias: expected the weight dtype {weight.dtype}, got {bias.dtype}")


def _triton_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype in _TRITON_X_DTYPES and weight.dtype in _TRITON_W_DTYPES


def patch_embed3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: Sequence[int],
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """Projection of a 3D patch embedding: ``Conv3d(x·scale + shift).flatten(2).transpose(1, 2)``.

    Dispatch (``backend.use_triton(x)``): the fused Triton kernel when it handles the dtypes, otherwise
    :func:`patchify3d` (C++ on CPU) followed by a Linear in the weight dtype (fp32 on CPU through oneDNN,
    :mod:`mosaic_fast.ops.cpu_gemm`). Returns (B, L, E).
    """
    global _warned_no_extension
    patch = _check_patch(patch_size)
    _check_volume(x, patch)
    _check_weight(x, weight, bias, patch)
    scale, shift = check_real("scale", scale), check_real("shift", shift)
    if backend.use_triton(x) and _triton_supported(x, weight):
        return _proj_checked(x, weight, bias, patch, scale, shift)
    if _C is None and x.device.type == "cpu" and not _warned_no_extension:
        import warnings

        warnings.warn(
            "mosaic_fast._C is not built: the 3D patch embedding uses the slower torch patchify; "
            "reinstall the package (pip install .) to build it",
            RuntimeWarning,
            stacklevel=2,
        )
        _warned_no_extension = True
    p = _patchify3d_op(x, patch, float(scale), float(shift))
    if p.dtype != weight.dtype:
        p = p.to(weight.dtype)
    w2d = weight.reshape(weight.shape[0], -1)
    # on the 2-D patch matrix: a Linear on the 3-D tensor adds a copy on CPU
    return cpu_gemm.linear(p.reshape(-1, p.shape[-1]), w2d, bias).view(*p.shape[:-1], w2d.shape[0])
