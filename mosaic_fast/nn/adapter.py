"""Fast drop-in ``Adapter`` and ``MoSAdapter``: the grouped specialist-adapter op behind the reference API.

Same class names, constructor arguments, parameters and state_dict keys as :mod:`mosaic_fast.reference`
(each class subclasses its reference twin and adds no parameters or buffers).

* ``forward(h)`` / ``forward(h, expert_id)``: the adapter output ``s * up(relu(down(LN(h))))``, as the
  reference returns it. ``expert_id`` is 'A'/'B'/'C' (whole batch: one group, no packing) or an integer
  tensor (B,) of 0/1/2 (mixed batch: all three specialists in one kernel launch).
* ``forward_fused(h, base[, expert_id])`` = ``base + adapter(h)`` with the residual add fused into the
  kernel epilogue (the model passes ``base = x + mlp(h)``).

When the fast path is not exact, these modules run the reference computation instead:
  * dropout p > 0 in training mode (the fused kernels do not implement dropout);
  * a bottleneck above 256 (the largest the kernels keep on chip);
  * specialists with different ``scale`` or LayerNorm ``eps`` (the op takes one of each);
  * an inner layer replaced (another activation than ReLU, a LoRA-wrapped or parametrized Linear, a
    specialist that is not an ``Adapter``) or hooked (:mod:`.bypass`; warns once).

The three specialists' weights are packed per call with ``torch.cat`` (differentiable: gradients reach
each specialist's own parameters). When no gradient is needed (inference, ``torch.no_grad``) the packed
copy — and under autocast the copy cast to the autocast dtype — is cached per module and rebuilt when a
parameter changes (another tensor object, data pointer or in-place version counter), so inference runs a
single launch. Under
CUDA-graph capture nothing is cached: the graph packs on every replay from the live parameters.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .. import reference
from ..ops._common import autocast_dtype, check_ids_range
from ..ops.grouped_adapter import pack_adapters, run_adapter, run_packed, single_adapter_uses_torch
from ..reference.adapter import check_expert_id, check_id_tensor
from .bypass import has_hooks, may_bypass, warn_fallback
from .caches import same_tensors, weak_refs

#: Largest bottleneck the fast path runs (the Triton kernels keep the hidden tile on chip).
MAX_FAST_BOTTLENECK = 256

_PACK_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_parameters(adapters: Sequence[reference.Adapter]) -> list[torch.Tensor]:
    """The six tensors the fused ops read from each Adapter (LayerNorm weight and bias, down and up weights
    and biases), through the modules' dicts: ``Module.__getattr__`` costs ~1.3 µs a lookup on a 2-core Zen 3
    (55 vs 11 µs for three specialists), and this runs on every forward. Callers have checked
    :func:`bypassable` (every tensor present)."""
    tensors = []
    for a in adapters:
        layers = a._modules
        ln, down, up = (layers[name]._parameters for name in ("layer_norm", "down_proj", "up_proj"))
        tensors += (ln["weight"], ln["bias"], down["weight"], down["bias"], up["weight"], up["bias"])
    return tensors


def _packed_weights(owner: torch.nn.Module, adapters: Sequence[reference.Adapter], h: torch.Tensor
                    ) -> tuple[tuple[torch.Tensor, ...], list[int]]:
    """Packed (weights, bottlenecks) of ``adapters``; cached on ``owner`` when no gradient is needed."""
    cast = autocast_dtype(h.device.type)
    if len(adapters) == 1 and (cast is None or cast == adapters[0].down_proj.weight.dtype):
        return pack_adapters(adapters)  # views of the parameters: nothing to pack or cache
    if torch.compiler.is_compiling():
        return pack_adapters(adapters)
    if h.is_cuda and torch.cuda.is_current_stream_capturing():
        # a CUDA graph must pack (and cast) on every replay, reading the parameters as they are then
        # (e.g. an EMA teacher updated in place between replays), not a copy frozen at capture
        tensors, bottlenecks = pack_adapters(adapters)
        return (tuple(t.to(cast) for t in tensors) if cast is not None else tensors), bottlenecks
    params = adapter_parameters(adapters)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return pack_adapters(adapters)  # differentiable cat, every call
    key = (
        tuple(id(a) for a in adapters),
        cast,
        tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params),
        # a copy made under inference_mode is an inference tensor, which autograd may not save later
        torch.is_inference_mode_enabled(),
    )
    per_owner = _PACK_CACHE.setdefault(owner, {})
    hit = per_owner.get(key[0])
    if hit is not None and hit[0] == key and same_tensors(hit[1], params):
        return hit[2]
    with torch.no_grad():
        tensors, bottlenecks = pack_adapters(adapters)
        if cast is not None:
            tensors = tuple(t.to(cast) for t in tensors)
        tensors = tuple(t.contiguous() for t in tensors)
    per_owner[key[0]] = (key, weak_refs(params), (tensors, bottlenecks))
    return tensors, bottlenecks


#: The inner layers of an Adapter the fused op reads instead of calling, and the classes it assumes.
ADAPTER_LAYERS = {"layer_norm": (nn.LayerNorm,), "down_proj": (nn.Linear,), "activation": (nn.ReLU,),
                  "up_proj": (nn.Linear,), "dropout": (nn.Dropout,)}


def _complete(a: reference.Adapter) -> bool:
    """Whether the Adapter's layers have every tensor the fused op reads (a LayerNorm affine, both biases)."""
    layers = a._modules
    ln = layers["layer_norm"]._parameters
    return (ln.get("weight") is not None and ln.get("bias") is not None
            and layers["down_proj"]._parameters.get("bias") is not None
            and layers["up_proj"]._parameters.get("bias") is not None)


def bypassable(owner: torch.nn.Module, adapters: Sequence[nn.Module]) -> bool:
    """Whether a fused op may read the weights of ``adapters`` instead of calling their layers (warns when
    not, see :mod:`.bypass`). ``adapters`` other than ``owner`` (specialists inside a MoSAdapter or a
    GatedSpecialistAdapter) are not called either: they must be unhooked Adapters."""
    for a in adapters:
        if a is not owner:
            if type(a) not in (Adapter, reference.Adapter):
                warn_fallback(owner, f"a specialist is a {type(a).__qualname__}, not an Adapter")
                return False
            if has_hooks(a):
                warn_fallback(owner, "a specialist has a forward or backward hook")
                return False
        if not may_bypass(a, ADAPTER_LAYERS):
            return False
        if not _complete(a):
            warn_fallback(owner, "an inner layer lacks its bias or LayerNorm affine")
            return False
    return True


def _exact(owner: torch.nn.Module, adapters: Sequence[reference.Adapter]) -> bool:
    """Whether the fused op computes exactly what the reference modules compute."""
    if not bypassable(owner, adapters):
        return False
    first = adapters[0]
    eps = first._modules["layer_norm"].eps
    for a in adapters:  # (through _modules: this runs on every forward)
        layers = a._modules
        if a.training and layers["dropout"].p > 0:
            return False
        if a.bottleneck > MAX_FAST_BOTTLENECK or a.scale != first.scale or layers["layer_norm"].eps != eps:
            return False
    return True


def _run(owner: torch.nn.Module, adapters: Sequence[reference.Adapter], h: torch.Tensor, base: torch.Tensor | None,
         expert_id: torch.Tensor | None) -> torch.Tensor:
    first = adapters[0]
    eps = first._modules["layer_norm"].eps
    if expert_id is None and single_adapter_uses_torch(h):
        # one specialist on torch ops: the module's own parameters, nothing packed or cast ahead
        return run_adapter(h, adapter_parameters(adapters), base=base, scale=first.scale, eps=eps)
    tensors, bottlenecks = _packed_weights(owner, adapters, h)
    return run_packed(h, tensors, bottlenecks, base=base, expert_id=expert_id, scale=first.scale, eps=eps)


class Adapter(reference.Adapter):
    """Fast AdaptFormer adapter (same API and parameters as :class:`mosaic_fast.reference.Adapter`)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The reference's ``s · up(relu(down(LN(h))))``, fused (see the module docstring for fallbacks)."""
        if not _exact(self, [self]):
            return super().forward(h)
        return _run(self, [self], h, None, None)

    def forward_fused(self, h: torch.Tensor, base: torch.Tensor, expert_id: str | torch.Tensor | None = None
                      ) -> torch.Tensor:
        """``base + adapter(h)`` with the add fused into the kernel epilogue.

        ``expert_id`` (DESIGN §8's signature, shared with :meth:`MoSAdapter.forward_fused` so call sites can
        take either module) is checked like MoSAdapter's and otherwise unused: one adapter serves every id."""
        if expert_id is not None:
            check_expert_id(expert_id, h)
        if not _exact(self, [self]):
            return base + super().forward(h)
        return _run(self, [self], h, base, None)


class MoSAdapter(reference.MoSAdapter):
    """Fast MOSAIC three-specialist adapter (same API and parameters as the reference).

    A specialist without samples in a mixed batch gets no gradient (``.grad`` stays None, as with the
    reference, so AdamW leaves it alone) where the ids are on the CPU. CUDA ids are not read (that would
    synchronise the host): every specialist is packed and an absent one gets a zero gradient, which
    weight decay and momentum act on; the trainer drops those gradients itself, since it knows the
    batch's specialists.
    """

    expert_cls = Adapter

    def forward(self, h: torch.Tensor, expert_id: str | torch.Tensor = "A") -> torch.Tensor:
        """The reference's output for a letter or a mixed (B,) routing, every specialist in one launch."""
        return self._run(h, None, expert_id)

    def _present_experts(self, ids: torch.Tensor, h: torch.Tensor) -> tuple[list[Adapter], torch.Tensor]:
        """The specialists to pack for per-sample ``ids`` and the ids renumbered over them: all three,
        except for CPU ids while a gradient is recorded (then only those with samples, see the class
        docstring)."""
        experts = list(self.experts)
        if ids.is_cuda or not torch.is_grad_enabled() or torch.compiler.is_compiling() or ids.numel() == 0:
            return experts, ids
        check_ids_range("expert_id", ids, len(experts))  # values (free on CPU) before bincount reads them
        present = torch.bincount(ids.long(), minlength=len(experts)) > 0
        if bool(present.all()):
            return experts, ids
        renumber = torch.cumsum(present, 0) - 1
        return [e for e, p in zip(experts, present.tolist()) if p], renumber[ids.long()].to(ids.dtype)

    def forward_fused(self, h: torch.Tensor, base: torch.Tensor, expert_id: str | torch.Tensor = "A") -> torch.Tensor:
        """``base + self(h, expert_id)`` for the whole (possibly mixed) batch in one kernel launch."""
        return self._run(h, base, expert_id)

    def _run(self, h: torch.Tensor, base: torch.Tensor | None, expert_id: str | torch.Tensor) -> torch.Tensor:
        if isinstance(expert_id, str):
            check_expert_id(expert_id, h)
            adapters, ids = [self.get_expert(expert_id)], None
        else:
            check_id_tensor(expert_id, h)
            adapters, ids = self._present_experts(expert_id, h)
        if not _exact(self, adapters):
            out = reference.MoSAdapter.forward(self, h, expert_id)
            return out if base is None else base + out
        return _run(self, adapters, h, base, ids)
