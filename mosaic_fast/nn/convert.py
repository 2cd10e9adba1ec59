"""Swap reference modules for their fast twins in place.

Every fast class in :mod:`mosaic_fast.nn` subclasses the reference class of the same name and adds no
parameters or buffers, so converting is a class swap: weights, devices, dtypes, hooks and
``requires_grad`` flags are kept and the state_dict keys do not change. A user subclass of a reference class
is left alone (with a warning): its overrides may compute something the fast twin does not.
"""

from __future__ import annotations

import warnings

from torch import nn

from .. import reference


def fast_twins() -> dict[type, type]:
    """Map each reference class to the fast class of the same name in :mod:`mosaic_fast.nn`."""
    from .. import nn as fast_nn

    twins = {}
    for name in reference.__all__:
        ref_cls = getattr(reference, name)
        fast_cls = getattr(fast_nn, name, None)
        if isinstance(ref_cls, type) and fast_cls is not None and fast_cls is not ref_cls:
            twins[ref_cls] = fast_cls
    return twins


def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, every reference module inside ``model`` by its fast twin; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    twins = fast_twins()
    kept: set[str] = set()
    for module in model.modules():
        fast_cls = twins.get(type(module))
        if fast_cls is not None:
            module.__class__ = fast_cls
        elif isinstance(module, tuple(twins)) and not isinstance(module, tuple(twins.values())):
            kept.add(type(module).__name__)
    if kept:
        warnings.warn(
            f"convert: left {', '.join(sorted(kept))} as {'it is' if len(kept) == 1 else 'they are'}: a subclass of "
            "a reference module may change its computation, so it has no fast twin (subclass the "
            "mosaic_fast.nn class instead to keep the fast path)",
            stacklevel=2,
        )
    return model
