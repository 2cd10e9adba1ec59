"""Shared helpers for the ops (argument checks, autocast), reusable by every op module.

* :func:`check_tensor` / :func:`check_same_device`: clear ``TypeError``/``ValueError`` naming the argument
  and the expected and received shape/dtype/device (DESIGN.md §7).
* :func:`check_ids`: routing ids (one per sample): integer dtype, shape (B,), device of ``h``. Values are
  checked where that needs no host synchronisation (see :func:`check_ids_range`).
* :func:`is_exact_gelu`: whether an activation module is the exact GELU that fused epilogues compute.
* :func:`autocast_dtype`: the autocast dtype for a device, or None when autocast is off there. Ops run
  in the autocast dtype by casting their weights (differentiably), never by silently casting otherwise.
* :func:`resolve_compute_dtype`: the weight dtype an op runs with, raising on a dtype mismatch outside
  autocast.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..reference.adapter import check_id_tensor

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


def check_same_device(ref_name: str, ref: torch.Tensor, others: Iterable[tuple[str, torch.Tensor | None]]) -> None:
    """Raise ValueError when a tensor is on another device than ``ref``."""
    for name, t in others:
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_ids(name: str, ids: object, h: torch.Tensor) -> torch.Tensor:
    """Routing ids: an int64/int32 tensor of shape (B,) with B = h.shape[0], on h's device."""
    if h.dim() < 2:
        raise ValueError(f"h must have a batch dim when {name} is a tensor, got shape {tuple(h.shape)}")
    return check_id_tensor(ids, h, name)


def check_ids_range(name: str, ids: torch.Tensor, num_groups: int) -> None:
    """Values in [0, num_groups). Reads the values: call it only where a host sync is acceptable (CPU
    tensors, or a fallback that syncs anyway)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_groups):
        bad = ids[(ids < 0) | (ids >= num_groups)].unique().tolist()
        raise ValueError(f"{name} values must be in [0, {num_groups - 1}], got out-of-range values {bad}")


def is_exact_gelu(act: object) -> bool:
    """Whether ``act`` is ``nn.GELU()`` with the exact (erf) form, which fused epilogues implement."""
    return isinstance(act, torch.nn.GELU) and act.approximate == "none"


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
