"""Autocast casts of frozen weights, made once instead of at every call.

Under autocast every Linear casts its fp32 weight and bias to the autocast dtype on each call: a kernel
launch and a full read of the weight. Autocast's own cache keeps only casts of tensors that require
grad, and only within one autocast region. MOSAIC and DynaMer freeze their ViT backbones, whose four
Linear layers per block were therefore re-cast in every student and teacher forward of a training step
(192 of the ~440 casts of a ViT-B/16 MOSAIC step). The fast modules reuse the cast of a parameter while
it stays frozen and unchanged (same tensor, storage, shape and version counter) and use the parameter
itself otherwise, so the results are bitwise those of plain autocast. torch.compile and CUDA-graph
capture see plain casts (a captured graph then reads the live weights, as without this module). A layer
that is not a plain unhooked nn.Linear (a LoRA wrapper, a hooked layer) is called as it is.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..ops import cpu_gemm
from ..ops._common import autocast_dtype
from .bypass import global_hooks, has_hooks

#: Per owning module: id(parameter) -> (weak reference, stamp, cast). Kept outside the module so that
#: neither deepcopy (the EMA teacher is a copy of the student) nor pickling carries casts along.
_CASTS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def cast_frozen(owner: nn.Module, p: torch.Tensor | None) -> torch.Tensor | None:
    """``p`` in the autocast dtype when autocast is on and ``p`` is frozen (cached on ``owner``), else ``p``."""
    if p is None or p.requires_grad or not p.is_floating_point() or p.dtype == torch.float64:
        return p  # (autocast leaves float64 alone too)
    dtype = autocast_dtype(p.device.type)
    if dtype is None or dtype == p.dtype or torch.compiler.is_compiling():
        return p
    if p.is_cuda and torch.cuda.is_current_stream_capturing():
        return p.to(dtype)  # a captured graph casts the live weight: replays see later in-place updates
    cache = _CASTS.setdefault(owner, {})
    # (a cast made under inference_mode is an inference tensor, which autograd may not save later)
    stamp = (p.data_ptr(), tuple(p.shape), p._version, dtype, torch.is_inference_mode_enabled())
    entry = cache.get(id(p))
    if entry is not None and entry[0]() is p and entry[1] == stamp:
        return entry[2]
    cast = p.to(dtype)
    cache[id(p)] = (weakref.ref(p), stamp, cast)
    return cast


def cached_casts(model: nn.Module) -> list[torch.Tensor]:
    """The casts kept for ``model`` and its submodules (memory the model holds beyond its parameters)."""
    return [entry[2] for module in model.modules() for entry in _CASTS.get(module, {}).values()]


def _plain(layer: nn.Module) -> bool:
    """Whether ``layer`` may be computed from its weights: a plain, unhooked nn.Linear (:mod:`.bypass`)."""
    return type(layer) is nn.Linear and not has_hooks(layer) and not global_hooks()


def linear(owner: nn.Module, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with its frozen weight and bias cast once for autocast (see the module docstring);
    fp32 on CPU through oneDNN (:mod:`mosaic_fast.ops.cpu_gemm`). A replaced or hooked layer is called."""
    if not _plain(layer):
        return layer(x)
    return cpu_gemm.linear(x, cast_frozen(owner, layer.weight), cast_frozen(owner, layer.bias))


def linear_act(owner: nn.Module, layer: nn.Linear, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """``act(layer(x))``, cast as :func:`linear`; an exact GELU is fused into the CPU GEMM (unless hooked)."""
    if not _plain(layer) or has_hooks(act):
        return act(linear(owner, layer, x))
    return cpu_gemm.linear_act(x, cast_frozen(owner, layer.weight), cast_frozen(owner, layer.bias), act)
