"""Dropping the fast modules' parameter-derived caches.

Without gradients the fast modules reuse values derived from their parameters: the packed specialist
weights (:mod:`.adapter`), the folded M4oE weights (:mod:`.moe`) and the autocast casts of frozen
weights (:mod:`.frozen_cast`). A cache entry is valid while the parameter is the same tensor object and
keeps its storage, shape and in-place version counter, which in-place ops, ``load_state_dict``,
optimizers and ``torch.no_grad()`` updates all advance. An edit through ``.data`` (``p.data.mul_(2)``, an
old-style EMA) does not: call :func:`clear_caches` after such edits, or the next forward may use the old
values.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn


def weak_refs(tensors: Sequence[torch.Tensor]) -> tuple[weakref.ref, ...]:
    """Weak references to ``tensors``, for :func:`same_tensors` (a cache must not keep them alive)."""
    return tuple(weakref.ref(t) for t in tensors)


def same_tensors(refs: Sequence[weakref.ref], tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``refs`` still point at exactly ``tensors``: a parameter replaced by a new one that happens to
    reuse the old storage address (and version 0) is another object, so its cache entry is stale."""
    return len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors))


def clear_caches(model: nn.Module | None = None) -> None:
    """Forget the cached packed, folded and cast weights of ``model``'s modules (of every module if None)."""
    from . import adapter, frozen_cast, moe

    caches = (adapter._PACK_CACHE, moe._FOLDED, frozen_cast._CASTS)
    if model is None:
        for cache in caches:
            cache.clear()
        return
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    for module in model.modules():
        for cache in caches:
            cache.pop(module, None)
