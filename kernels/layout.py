"""Layout checks the launchers share: most kernels index their operands densely (``ptr + row * D + col``)."""

from __future__ import annotations

import torch


def check_dense_out(launcher: str, **outputs: torch.Tensor | None) -> None:
    """ValueError naming an output buffer the kernel cannot write: it writes its outputs densely, so a
    strided view would be written in the wrong places (read-only operands are made contiguous instead)."""
    for name, t in outputs.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{launcher}: {name} must be contiguous (the kernel writes it densely), got strides "
                             f"{t.stride()} for shape {tuple(t.shape)}")
