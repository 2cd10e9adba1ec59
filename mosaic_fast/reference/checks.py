"""Input checks shared by the reference (and so the fast) modules and ops (DESIGN.md §7)."""

from __future__ import annotations

import numbers

import torch


def check_is_tensor(name: str, x: object) -> None:
    """Raise a TypeError naming ``name`` unless ``x`` is a tensor (torch would fail with an AttributeError)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int: an integer (not a bool) >= ``minimum``, else a TypeError/ValueError naming ``name``
    (a float or a string would fail later inside a tensor constructor or a slice)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_tokens(x: torch.Tensor, d_model: int | None, name: str, weight: torch.Tensor | None = None,
                 min_tokens: int = 0) -> None:
    """Raise unless ``x`` is a floating (B, N, d_model) tensor (any width for ``d_model`` None) with
    N >= ``min_tokens`` (of ``weight``'s dtype outside autocast)."""
    check_is_tensor(name, x)
    if x.dim() != 3 or (d_model is not None and x.shape[-1] != d_model) or x.shape[1] < min_tokens:
        at_least = f" with N >= {min_tokens} tokens" if min_tokens else ""
        raise ValueError(f"{name}: expected shape (B, N, {'D' if d_model is None else d_model}){at_least}, "
                         f"got {tuple(x.shape)}")
    check_floating(name, x)
    if weight is not None:
        check_input_dtype(name, x, weight)


def check_features(name: str, x: object, d_model: int, weight: torch.Tensor | None = None) -> None:
    """Raise unless ``x`` is a floating (..., d_model) tensor with at least one dim (of ``weight``'s dtype
    outside autocast)."""
    check_is_tensor(name, x)
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(f"{name}: expected last dim {d_model}, got shape {tuple(x.shape)}")
    check_floating(name, x)
    if weight is not None:
        check_input_dtype(name, x, weight)


def check_floating(name: str, x: torch.Tensor) -> None:
    """Raise a TypeError naming ``name`` unless ``x`` is a floating-point tensor (torch would fail inside a
    Linear or LayerNorm with "mixed dtype")."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_input_dtype(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise a TypeError naming ``name`` when the floating input ``x`` and the module's ``weight`` differ in
    dtype outside autocast (torch would fail later with a message about mat1/mat2 or "mixed dtype")."""
    if x.dtype == weight.dtype or not x.is_floating_point() or torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(f"{name} is {x.dtype} but the module's parameters are {weight.dtype}: convert one of them "
                    f"({name}.to({weight.dtype}) or module.to({x.dtype})) or run under torch.autocast")


def repeats_in_rows(idx: torch.Tensor, bound: int) -> bool:
    """Whether some row of the index tensor ``idx`` (values in [0, ``bound``); a 1-D tensor is one row)
    holds a value twice: a scatter through it would keep either write. One histogram of the values
    offset by row, no sort (~10 µs at thousands of indices on CPU). Reads values: CPU tensors only."""
    rows = idx.reshape(1, -1) if idx.dim() == 1 else idx
    flat = rows.long() + bound * torch.arange(rows.shape[0], device=idx.device).unsqueeze(1)
    return bool(torch.bincount(flat.flatten(), minlength=rows.shape[0] * bound).max() > 1)
