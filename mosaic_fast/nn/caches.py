"""Dropping the fast modules' parameter-derived caches.

Without gradients the fast modules reuse values derived from their parameters: the packed specialist
weights (:mod:`.adapter`), the folded M4oE weights (:mod:`.moe`) and the autocast casts of frozen
weights (:mod:`.frozen_cast`). A cache entry is valid while the parameter keeps its storage, shape and
in-place version counter, which in-place ops, ``load_state_dict``, optimizers and ``torch.no_grad()``
updates all advance. An edit through ``.data`` (``p.data.mul_(2)``, an old-style EMA) does not: call
:func:`clear_caches` after such edits, or the next forward may use the old values.
"""

from __future__ import annotations

from torch import nn

from . import adapter, frozen_cast, moe


def clear_caches(model: nn.Module | None = None) -> None:
    """Forget the cached packed, folded and cast weights of ``model``'s modules (of every module if None)."""
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
