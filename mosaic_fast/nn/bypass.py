"""When a fast module may compute from its inner layers' weights instead of calling those layers.

The fast modules read the parameters of their inner layers (LayerNorm, Linear, ReLU, Conv3d) and run
fused ops, so the layers themselves are never called. That equals the reference only while every such
layer is the plain layer the reference built: the same class (not a LoRA wrapper, a quantised or
parametrized Linear, another activation) and without hooks (a forward or backward hook on the layer,
or a global module hook, would silently not run). Otherwise the fast module runs the reference
computation, which calls every layer, and warns (:class:`FastPathFallbackWarning`, shown once per
message by Python's default filter) that it lost its fast path.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules import module as _module


class FastPathFallbackWarning(UserWarning):
    """A fast module ran its reference computation because an inner layer was replaced or hooked."""


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has a forward (pre-)hook or a backward (pre-)hook of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def global_hooks() -> bool:
    """Whether a global module hook (``torch.nn.modules.module.register_module_forward_hook`` & co.) is set."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


#: Inner layer name -> the exact classes the fast path assumes for it, or None for any class (hooks only).
Layers = Mapping[str, "tuple[type, ...] | None"]


def _class_name(kind: type) -> str:
    """``torch.nn.Linear`` rather than ``torch.nn.modules.linear.Linear``."""
    module = "torch.nn" if kind.__module__.startswith("torch.nn.modules") else kind.__module__
    return f"{module}.{kind.__qualname__}"


def bypass_blocker(module: nn.Module, layers: Layers) -> str | None:
    """Why ``module`` must call its inner ``layers`` rather than read their weights, or None when it may
    bypass them. (On every fast forward: a few dictionary lookups per layer.)"""
    if global_hooks():
        return "a global module hook is registered"
    modules = module._modules
    for name, kinds in layers.items():
        layer = modules.get(name)
        if kinds is not None and type(layer) not in kinds:
            expected = " or ".join(_class_name(k) for k in kinds)
            return f"{name} is a {type(layer).__qualname__}, not a plain {expected}"
        if isinstance(layer, nn.Module) and has_hooks(layer):
            return f"{name} has a forward or backward hook"
    return None


def warn_fallback(module: nn.Module, reason: str) -> None:
    """Warn that ``module`` runs its reference computation because of ``reason`` (not while compiling)."""
    if torch.compiler.is_compiling():
        return
    warnings.warn(
        f"{type(module).__qualname__}: {reason}, so the fast path would bypass it; running the reference "
        "computation instead (same result, reference speed)",
        FastPathFallbackWarning,
        stacklevel=3,
    )


def may_bypass(module: nn.Module, layers: Layers) -> bool:
    """:func:`bypass_blocker` is None; warns (:func:`warn_fallback`) when it is not."""
    reason = bypass_blocker(module, layers)
    if reason is None:
        return True
    warn_fallback(module, reason)
    return False
