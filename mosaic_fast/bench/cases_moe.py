"""Op suite, DynaMer/M4oE part: the gated MoE adapter, the adapter + token skipping at ρ ∈ {1, .5, .3, .1},
and the M4oE gated specialist adapter (both gate kinds).

CUDA (real shapes): B = 32 images × 197 tokens, D = 768, n = 4 experts, k = 2, r = 64. CPU (quick):
B = 4 × 65 tokens, D = 192. Reference: the dense reference module (every expert on every token, then
gather/scatter); fast: top-k experts only, and for skipping the selected rows only, in place.
Skipping cases fix the selection in the inputs (so the router MLP is not timed) and put ``rho`` in
``params`` so the runner can plot time against ρ; the target is time(ρ)/time(1) ≤ ρ + 0.1.
"""

from __future__ import annotations

import copy

import torch

from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.bench.core import Case
from mosaic_fast.graphs import CUDAGraphInference
from mosaic_fast.reference.moe import num_kept

RHOS = (1.0, 0.5, 0.3, 0.1)


def _config(quick: bool) -> dict:
    if quick:
        return dict(batch=4, tokens=65, dim=192, experts=4, top_k=2, bottleneck=64)
    return dict(batch=32, tokens=197, dim=768, experts=4, top_k=2, bottleneck=64)


def _modules(cfg: dict, device: torch.device, dtype: torch.dtype):
    ref = reference.GatedMoEAdapter(cfg["dim"], cfg["experts"], cfg["top_k"], cfg["bottleneck"], cfg["dim"])
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial weights (the up projection starts at zero)
            p.normal_(0.0, 0.05)
    fast = fast_nn.convert(copy.deepcopy(ref))
    return ref.to(device, dtype).eval(), fast.to(device, dtype).eval()


def _pair_inputs(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (cfg["batch"], cfg["tokens"], cfg["dim"])
    return [torch.randn(shape, generator=g).to(device, dtype) for _ in range(2)]


def _selection(cfg: dict, rho: float, device: torch.device, dtype: torch.dtype, seed: int):
    """Random kept tokens (CLS first, ascending) and skip gates for one stream."""
    g = torch.Generator().manual_seed(seed)
    b, n = cfg["batch"], cfg["tokens"]
    k = num_kept(rho, n)
    scores = torch.rand(b, n, generator=g)
    scores[:, 0] = 2.0
    idx = scores.topk(k, dim=1).indices.sort(dim=1).values
    return idx.to(device), torch.rand(b, k, generator=g).to(device, dtype)


def _floor(cfg: dict, rows: float, dtype: torch.dtype) -> tuple[float, float]:
    """Bytes and flops of both streams' updates over ``rows`` selected rows per stream."""
    d, r, k = cfg["dim"], cfg["bottleneck"], cfg["top_k"]
    elt = torch.finfo(dtype).bits // 8
    bytes_ = 2 * rows * (2 * d + d) * elt  # read the pair once per stream, write the row
    flops = 2 * rows * k * (2 * 2 * d * r + 2 * r * d)
    return bytes_, flops


def cases(device: torch.device, dtype: torch.dtype, quick: bool, graphs: bool = False) -> list[Case]:
    """MoE adapter, skipping and M4oE cases; with ``graphs`` the fast skip op also under CUDA-graph replay
    ("fast+graphs": the op's device time without the launch overhead that dominates at B = 32)."""
    cfg = _config(quick)
    ref, fast = _modules(cfg, device, dtype)
    shape = dict(B=cfg["batch"], N=cfg["tokens"], D=cfg["dim"], experts=cfg["experts"], top_k=cfg["top_k"],
                 r=cfg["bottleneck"])

    def full(module):
        def run(xg, xm):
            with torch.no_grad():
                return module(xg, xm)
        return run

    rows = cfg["batch"] * cfg["tokens"]
    fb, ff = _floor(cfg, rows, dtype)
    out = [Case("ops", "moe_adapter", dict(shape), lambda i: _pair_inputs(cfg, device, dtype, i),
                {"reference": full(ref), "fast": full(fast)}, floor_bytes=fb, floor_flops=ff,
                notes="both streams, no skipping (every token of both streams updated)")]

    def skipped(module, inplace):
        def run(xg, xm, idx_g, gate_g, idx_m, gate_m):
            with torch.no_grad():
                return module.forward_skip(xg, xm, idx_g, gate_g, idx_m, gate_m, inplace=inplace)
        return run

    for rho in RHOS:
        def make(i, rho=rho):
            xg, xm = _pair_inputs(cfg, device, dtype, i)
            sel_g = _selection(cfg, rho, device, dtype, 100 + i)
            return [xg, xm, *sel_g, *_selection(cfg, rho, device, dtype, 200 + i)]

        kept = cfg["batch"] * num_kept(rho, cfg["tokens"])
        fb, ff = _floor(cfg, kept, dtype)
        out.append(Case("ops", f"moe_skip_rho{rho:g}", dict(shape, rho=rho), make,
                        {"reference": skipped(ref, False), "fast": skipped(fast, True),
                         **({"fast+graphs": CUDAGraphInference(skipped(fast, True))} if graphs else {})},
                        floor_bytes=fb, floor_flops=ff,
                        notes="adapter on the kept tokens of both streams; fast: in place, kept rows only"))
    return out + m4oe_cases(device, dtype, quick)


def m4oe_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """The M4oE gated specialist adapter (bottlenecks 64/96/192, dense mixture): reference = every
    specialist as its own adapter, fast = one adapter of concatenated bottleneck with the gate applied to
    the hidden units (or the channels)."""
    batch, tokens, dim = (4, 65, 192) if quick else (32, 197, 768)
    bottlenecks = (64, 96, 192)
    rows = batch * tokens
    elt = torch.finfo(dtype).bits // 8
    r_total = sum(bottlenecks)
    out = []
    for gate in ("expert", "channel"):
        ref = reference.GatedSpecialistAdapter(dim, bottlenecks, gate=gate)
        with torch.no_grad():
            for p in ref.parameters():  # non-trivial weights (up projections and gate start at zero)
                p.normal_(0.0, 0.05)
        fast = fast_nn.convert(copy.deepcopy(ref))
        ref, fast = ref.to(device, dtype).eval(), fast.to(device, dtype).eval()

        def run(module):
            def call(h):
                with torch.no_grad():
                    return module(h)
            return call

        def make(i):
            g = torch.Generator().manual_seed(300 + i)
            return [torch.randn(batch, tokens, dim, generator=g).to(device, dtype)]

        gate_flops = 2 * rows * dim * (len(bottlenecks) if gate == "expert" else dim)
        out.append(Case("ops", f"m4oe_adapter_{gate}", dict(B=batch, N=tokens, D=dim, bottlenecks=bottlenecks,
                                                            gate=gate), make,
                        {"reference": run(ref), "fast": run(fast)},
                        floor_bytes=2 * rows * dim * elt, floor_flops=2 * rows * dim * r_total * 2 + gate_flops,
                        notes="M4oE: dense mixture of the three specialists, gate over experts or channels"))
    return out
