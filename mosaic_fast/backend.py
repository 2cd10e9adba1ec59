"""Backend selection: which implementation the fast ops dispatch to.

``"auto"``   Triton kernels on CUDA tensors, the torch fallback on CPU tensors (default). Exception:
             the grouped adapter with one specialist runs torch (cuBLAS) on CUDA too, faster there
             (see :mod:`mosaic_fast.ops.grouped_adapter`).
``"triton"`` always the Triton kernels; on CPU tensors this needs Triton's interpreter, i.e. the
             environment variable ``TRITON_INTERPRET=1`` set before ``import mosaic_fast``.
``"torch"``  always the plain-torch fallback (useful to bisect a numerical problem).

The environment variable ``MOSAIC_FAST_BACKEND`` sets the default.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")

#: Whether Triton's interpreter was requested before import (it cannot be switched on later).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_backend = os.environ.get("MOSAIC_FAST_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"MOSAIC_FAST_BACKEND must be one of {BACKENDS}, got {_backend!r}")


def set_backend(name: str) -> None:
    """Choose the implementation of every fast op: "auto", "triton" or "torch"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend chosen by :func:`set_backend` (or ``MOSAIC_FAST_BACKEND``)."""
    return _backend


#: Looked up once at import: every fast op asks, and a module search costs tens of microseconds.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return _TRITON_FOUND


def use_triton(x: torch.Tensor) -> bool:
    """Decide whether an op on tensor ``x`` runs the Triton kernels (True) or the torch fallback."""
    if _backend == "torch":
        return False
    if _backend == "auto":
        return x.is_cuda and triton_available()
    require_triton("backend 'triton'", x)
    return True


def require_triton(who: str, x: torch.Tensor) -> None:
    """Raise a clear error unless the Triton kernels can run on ``x`` (CUDA, or CPU in the interpreter);
    ``who`` (backend 'triton', or a Triton-only op) starts the message."""
    if not triton_available():
        raise RuntimeError(f"{who} runs Triton kernels, but the triton package is not installed")
    if x.is_cuda or INTERPRET:
        return
    raise RuntimeError(
        f"{who} runs Triton kernels; on CPU tensors they run in Triton's interpreter, which must be enabled "
        f"with TRITON_INTERPRET=1 before mosaic_fast is imported; use set_backend('auto') or move the "
        f"tensors to CUDA (got {x.device})"
    )
