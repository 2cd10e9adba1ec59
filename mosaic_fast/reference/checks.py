"""Input dtype check shared by the reference (and so the fast) modules (DESIGN.md §7)."""

from __future__ import annotations

import torch


def check_input_dtype(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise a TypeError naming ``name`` when the floating input ``x`` and the module's ``weight`` differ in
    dtype outside autocast (torch would fail later with a message about mat1/mat2 or "mixed dtype")."""
    if x.dtype == weight.dtype or not x.is_floating_point() or torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(f"{name} is {x.dtype} but the module's parameters are {weight.dtype}: convert one of them "
                    f"({name}.to({weight.dtype}) or module.to({x.dtype})) or run under torch.autocast")
