"""Benchmark cases of the grouped specialist adapter (MOSAIC A/B/C), one adapter layer on T = B * 197 tokens.

Implementations, on the same inputs:
  * "reference": the seed's computation, ``base + reference.MoSAdapter(h, expert_id)`` (for a mixed batch
    the three specialists run on their masked samples, as the seed does);
  * "fast": ``nn.MoSAdapter.forward_fused(h, base, expert_id)`` (one launch for A/B/C; for one specialist
    on CUDA the default backend runs cuBLAS, so "kernel" times the fused Triton kernel there too);
  * "three launches" (mixed routing, DESIGN.md §6's "grouped A/B/C vs three launches"): each specialist's
    own fused single-adapter kernel (``nn.Adapter.forward_fused``) on its gathered samples, one launch per
    specialist, outputs put back in sample order: what grouping saves over fusing each adapter alone
    (on CUDA on the Triton backend; on CPU the torch fallback of each adapter);
  * the runner adds ``torch.compile`` of the reference.

Routings: "single" (the whole batch on specialist C, the largest bottleneck) and "mixed" (samples spread
over A/B/C by a random permutation; every specialist present once B >= 3). Passes: "fwd" (inference,
under ``torch.no_grad``) and "fwd+bwd" (``backward`` inside the callable; h, base and the adapter
parameters require grad, as in training with earlier trainable layers).

Floors (DESIGN.md §6): bytes = 3·T·D·elem (read h and base, write out) plus the routed specialists'
weights; fwd+bwd adds 3·T·D·elem (read dout and h, write dh; d(base) is dout itself) and two more weight
passes (read again, write the gradients). Flops = 4·T·D·r per routed row for the forward, three times
that for fwd+bwd. (DESIGN.md writes the bf16 byte floor as 2·(3·T·D): the 2 is the bf16 element size.)
"""

from __future__ import annotations

import copy

import torch

from .. import nn as fast_nn
from .. import reference
from .core import Case, on_triton_backend

D_MODEL = 768
TOKENS = 197
BOTTLENECKS = (64, 96, 192)
SINGLE_EXPERT = "C"


def _randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere (the up-projections are zero at init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for expert in module.experts:
            expert.layer_norm.weight.add_(1.0)
    return module


def _modules(device: torch.device, dtype: torch.dtype):
    ref = reference.MoSAdapter(D_MODEL, *BOTTLENECKS)
    _randomize_(ref, seed=0)
    ref = ref.to(device=device, dtype=dtype).eval()
    fast = fast_nn.convert(copy.deepcopy(ref))
    return ref, fast


def _routed_bottlenecks(routing: str, batch: int) -> list[int]:
    if routing == "single":
        return [BOTTLENECKS["ABC".index(SINGLE_EXPERT)]] * batch
    return [BOTTLENECKS[i % 3] for i in range(batch)]


def _floors(routing: str, batch: int, elem: int, backward: bool) -> tuple[float, float]:
    T = batch * TOKENS
    rows_r = [r for r in _routed_bottlenecks(routing, batch) for _ in range(TOKENS)]
    used = set(_routed_bottlenecks(routing, batch))  # only the routed specialists' weights are read
    weights = sum(2 * D_MODEL + 2 * r * D_MODEL + r + D_MODEL for r in used) * elem
    act = 3 * T * D_MODEL * elem
    flops = 4.0 * D_MODEL * sum(rows_r)
    if backward:
        return 2 * act + 3 * weights, 3 * flops
    return act + weights, flops


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """Single-specialist and mixed A/B/C cases, forward and forward+backward."""
    device = torch.device(device)
    batches = (2, 8) if quick else (8, 32, 128)
    elem = torch.empty((), dtype=dtype).element_size()
    out: list[Case] = []
    for routing in ("single", "mixed"):
        for batch in batches:
            for backward in (False, True):
                out.append(_case(device, dtype, routing, batch, backward, elem))
    return out


def _three_launches(fast: fast_nn.MoSAdapter, h: torch.Tensor, base: torch.Tensor, eid: torch.Tensor) -> torch.Tensor:
    """``base + adapter_{eid}(h)`` per sample by one fused single-adapter call per specialist (the
    baseline a grouped launch replaces); reads the group sizes on the host, as per-group launches must."""
    picks = [(eid == g).nonzero().squeeze(1) for g in range(len(fast.experts))]
    outs = [expert.forward_fused(h[idx], base[idx]) for expert, idx in zip(fast.experts, picks) if idx.numel()]
    order = torch.cat([idx for idx in picks if idx.numel()])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(outs)[inverse]


def _case(device, dtype, routing: str, batch: int, backward: bool, elem: int) -> Case:
    ref, fast = _modules(device, dtype)
    T = batch * TOKENS

    def make_inputs(i: int):
        gen = torch.Generator().manual_seed(1000 + i)
        h = torch.randn(batch, TOKENS, D_MODEL, generator=gen).to(device=device, dtype=dtype)
        base = torch.randn(batch, TOKENS, D_MODEL, generator=gen).to(device=device, dtype=dtype)
        gout = torch.randn(batch, TOKENS, D_MODEL, generator=gen).to(device=device, dtype=dtype)
        if routing == "single":
            eid = SINGLE_EXPERT
        else:
            eid = (torch.randperm(batch, generator=gen) % 3).to(device)
        if backward:
            h.requires_grad_(True)
            base.requires_grad_(True)
        return h, base, eid, gout

    if backward:

        # h.grad is returned for the agreement check (on fresh inputs it is this call's gradient)
        def reference_impl(h, base, eid, gout):
            (base + ref(h, eid)).backward(gout)
            return h.grad

        def fast_impl(h, base, eid, gout):
            fast.forward_fused(h, base, eid).backward(gout)
            return h.grad

        def three_impl(h, base, eid, gout):
            _three_launches(fast, h, base, eid).backward(gout)
            return h.grad

    else:

        def reference_impl(h, base, eid, gout):
            with torch.no_grad():
                return base + ref(h, eid)

        def fast_impl(h, base, eid, gout):
            with torch.no_grad():
                return fast.forward_fused(h, base, eid)

        def three_impl(h, base, eid, gout):
            with torch.no_grad():
                return _three_launches(fast, h, base, eid)

    impls = {"reference": reference_impl, "fast": fast_impl}
    if routing == "single" and device.type == "cuda":
        impls["kernel"] = on_triton_backend(fast_impl)  # "fast" is cuBLAS for one group (ops docstring)
    if routing == "mixed":
        impls["three launches"] = on_triton_backend(three_impl) if device.type == "cuda" else three_impl
    floor_bytes, floor_flops = _floors(routing, batch, elem, backward)
    pass_name = "fwd+bwd" if backward else "fwd"
    return Case(
        suite="ops",
        name=f"mos_adapter_{routing}_B{batch}_{pass_name}",
        params={
            "op": "grouped_adapter",
            "routing": routing if routing == "mixed" else f"single:{SINGLE_EXPERT}",
            "pass": pass_name,
            "B": batch,
            "N": TOKENS,
            "T": T,
            "D": D_MODEL,
            "bottlenecks": list(BOTTLENECKS),
            "dtype": str(dtype).replace("torch.", ""),
        },
        make_inputs=make_inputs,
        impls=impls,
        floor_bytes=floor_bytes,
        floor_flops=floor_flops,
        notes="fast = nn.MoSAdapter.forward_fused (one launch for A/B/C); reference = base + seed MoSAdapter",
    )
