"""Shared helpers for the ops (argument checks, autocast), reusable by every op module.

* :func:`check_tensor` / :func:`check_same_device`: clear ``TypeError``/``ValueError`` naming the argument
  and the expected and received shape/dtype/device (DESIGN.md §7); :func:`check_real` and
  :func:`check_sizes` for scalar and size arguments (scale, eps, bottlenecks, shapes).
* :func:`check_ids`: routing ids (one per sample): integer dtype, shape (B,), device of ``h``. Values are
  checked where that needs no host synchronisation (see :func:`check_ids_range`).
* :func:`check_index`: an int64/int32 index tensor of a given shape, returned as int64.
  :func:`check_index_values_on_cpu`: its values in range (and unique where asked), only for CPU tensors
  (on CUDA reading the values would synchronise the host, which the fast paths never do).
* :func:`once_differentiable_strict`: a backward that refuses to be differentiated (double backward raises).
* :func:`use_kernels`: the backend's choice of the Triton kernels, float64 excepted (torch fallback).
* :func:`is_exact_gelu`: whether an activation module is the exact GELU that fused epilogues compute.
* :func:`autocast_dtype`: the autocast dtype for a device, or None when autocast is off there. Ops run
  in the autocast dtype by casting their weights (differentiably), never by silently casting otherwise.
* :func:`resolve_compute_dtype`: the weight dtype an op runs with, raising on a dtype mismatch outside
  autocast.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .. import backend
from ..reference.adapter import check_id_tensor
from ..reference.checks import check_int, repeats_in_rows

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    t: object,
    *,
    dims: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    floating: bool = False,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a tensor of the given rank/shape (None = any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16), got {t.dtype}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else tuple(dims)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t


def check_real(name: str, value: object) -> float:
    """``value`` (a real number, not a bool) as a float, else a TypeError naming ``name`` (``float()`` would
    raise without naming it, or take a one-element tensor silently)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_sizes(name: str, sizes: object, *, length: int | None = None, minimum: int = 1) -> list[int]:
    """A sequence of ints (not bools) >= ``minimum`` (``length`` of them when given), as a list, else a
    TypeError/ValueError naming ``name``."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(sizes).__name__}")
    if (length is not None and len(sizes) != length) or not sizes:
        count = f"{length} " if length is not None else "a non-empty list of "
        raise ValueError(f"{name} must be {count}ints >= {minimum}, got {list(sizes)}")
    return [check_int(f"{name}[{i}]", s, minimum) for i, s in enumerate(sizes)]


def check_same_device(ref_name: str, ref: torch.Tensor, others: Iterable[tuple[str, torch.Tensor | None]]) -> None:
    """Raise ValueError when a tensor is on another device than ``ref``."""
    for name, t in others:
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_ids(name: str, ids: object, h: torch.Tensor) -> torch.Tensor:
    """Routing ids: an int64/int32 tensor of shape (B,) with B = h.shape[0], on h's device."""
    return check_id_tensor(ids, h, name)


def check_ids_range(name: str, ids: torch.Tensor, num_groups: int) -> None:
    """Values in [0, num_groups). Reads the values: call it only where a host sync is acceptable (CPU
    tensors, or a fallback that syncs anyway)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_groups):
        bad = ids[(ids < 0) | (ids >= num_groups)].unique().tolist()
        raise ValueError(f"{name} values must be in [0, {num_groups - 1}], got out-of-range values {bad}")


INDEX_DTYPES = (torch.int64, torch.int32)


def check_index(name: str, t: object, *, shape: Sequence[int | None] | None = None,
                dims: int | None = None) -> torch.Tensor:
    """An int64/int32 index tensor of the given rank/shape (None = any size), returned as a contiguous int64
    tensor (the kernels index it densely; int32 or strided input costs one small copy, no host sync)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int64 (or int32) index tensor, got {t.dtype}")
    check_tensor(name, t, dims=dims, shape=shape)
    # (not ``t.to(torch.int64, memory_format=torch.contiguous_format)``: that returns an int64 t itself,
    # strides and all, so a strided int64 index reached the kernels as it was)
    return t.to(torch.int64).contiguous()


def check_index_values_on_cpu(name: str, t: torch.Tensor, bound: int, *, distinct: bool = False) -> None:
    """Values of the index tensor ``t`` in [0, bound) and, with ``distinct``, no value twice in a row (the
    whole of a 1-D ``t``; each row of a 2-D one). Only for CPU tensors in eager mode (a no-op elsewhere):
    on CUDA it would synchronise the host, under torch.compile it would break the graph."""
    if t.device.type != "cpu" or not t.numel() or torch.compiler.is_compiling():
        return
    if bound <= 0:
        raise ValueError(f"{name} must be empty when indexing a dim of size 0, got shape {tuple(t.shape)}")
    check_ids_range(name, t, bound)
    if distinct and repeats_in_rows(t, bound):
        where = "" if t.dim() == 1 else " within a row"
        raise ValueError(f"{name} must not repeat values{where}, got repeated values")


def is_exact_gelu(act: object) -> bool:
    """Whether ``act`` is ``nn.GELU()`` with the exact (erf) form, which fused epilogues implement."""
    return isinstance(act, torch.nn.GELU) and act.approximate == "none"


def use_kernels(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs its Triton kernels: the backend's choice, except for float64. The kernels
    load and accumulate in fp32, so float64 would silently get fp32 precision (seen: ~3e-8 relative error
    against the float64 reference, and top-k choices made on fp32 scores); float64 takes the torch fallback
    and is computed in float64 like the reference (as the grouped adapter already does)."""
    return x.dtype != torch.float64 and backend.use_triton(x)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on ``device_type`` when autocast is enabled there, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def resolve_compute_dtype(
    h: torch.Tensor, weights: Sequence[torch.Tensor], what: str = "the weights"
) -> torch.dtype | None:
    """The dtype the weights must be cast to (None: use them as they are).

    Outside autocast every weight must have h's dtype (TypeError otherwise: no silent casts). Under
    autocast on h's device the op runs in the autocast dtype."""
    ac = autocast_dtype(h.device.type)
    if ac is not None:
        return None if all(w.dtype == ac for w in weights) else ac
    for w in weights:
        if w.dtype != h.dtype:
            raise TypeError(
                f"dtype mismatch: h is {h.dtype} but {what} are {w.dtype}; cast the module (e.g. "
                f".to({h.dtype})) or run under torch.autocast"
            )
    return None


class _NotTwiceDifferentiable(torch.autograd.Function):
    """Identity on the first ``num`` tensors, attached to the ``anchors`` that follow; its backward raises."""

    @staticmethod
    def forward(ctx, num, *tensors):
        return tuple(t.clone() for t in tensors[:num])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("mosaic_fast: this fused op's backward is not differentiable (double backward, "
                           "create_graph=True); use the mosaic_fast.reference modules for higher-order gradients")


def once_differentiable_strict(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.autograd.function.once_differentiable`` for a backward ``fn(ctx, *grads)``, made strict.

    torch's decorator attaches its error node to detached copies of the gradients, and only when an incoming
    gradient requires grad. A double backward taken with ``torch.autograd.grad(..., inputs)`` prunes that
    node, and with constant incoming gradients there is none: this backward was then silently taken as
    constant and second-order gradients came out wrong (seen: relative errors 1e-3 to 1 against the
    reference, e.g. a gradient penalty ‖∇ₓ L‖²) instead of raising. Here, under ``create_graph=True``, the
    computed gradients hang off the tensors they depend on (incoming gradients and saved tensors that
    require grad) through a node whose backward raises. When none of those requires grad the gradients are
    constants, which is exact. Without ``create_graph`` (grad mode is off in a backward, also when
    torch.compile traces it) ``fn`` runs unchanged."""

    @functools.wraps(fn)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return fn(ctx, *grads)
        with torch.no_grad():
            outputs = fn(ctx, *grads)
        single = not isinstance(outputs, tuple)
        outs = [outputs] if single else list(outputs)
        anchors = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
        which = [i for i, t in enumerate(outs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if anchors and which:
            wrapped = _NotTwiceDifferentiable.apply(len(which), *(outs[i] for i in which), *anchors)
            for i, t in zip(which, wrapped):
                outs[i] = t
        return outs[0] if single else tuple(outs)

    return wrapper
