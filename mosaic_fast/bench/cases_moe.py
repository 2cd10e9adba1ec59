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


def _weight_bytes(cfg: dict, elt: int) -> int:
    """Every parameter of the module (experts, both routers, both gates), read once."""
    d, r, n, g = cfg["dim"], cfg["bottleneck"], cfg["experts"], cfg["dim"]
    experts = n * (r * 2 * d + r + d * r + d)
    return elt * (experts + 2 * (d * n + n) + 2 * (d * g + g))


def _floor(cfg: dict, kept: int, dtype: torch.dtype) -> tuple[float, float]:
    """Bytes and flops of both streams' updates when each stream updates ``kept`` tokens per sample.

    Bytes: each token of the union of the two selections reads its pair (both streams' rows, 2·D), each
    updated row is written (D per stream and kept token), plus the weights once. The selections are
    independent apart from CLS, so the expected union is ``1 + (N−1)(1 − (1 − (kept−1)/(N−1))²)`` tokens
    (N when every token is kept). Flops per updated row: k experts (down 2D→r, up r→D), the router
    (D→n) and the gate (D→g; g = D here, the largest GEMM of the op)."""
    b, n_tok, d, r, k = cfg["batch"], cfg["tokens"], cfg["dim"], cfg["bottleneck"], cfg["top_k"]
    elt = torch.finfo(dtype).bits // 8
    frac = (kept - 1) / (n_tok - 1) if n_tok > 1 else 1.0
    union = 1 + (n_tok - 1) * (1 - (1 - frac) ** 2)
    bytes_ = b * (union * 2 * d + 2 * kept * d) * elt + _weight_bytes(cfg, elt)
    per_row = k * (2 * 2 * d * r + 2 * r * d) + 2 * d * cfg["experts"] + 2 * d * cfg["dim"]
    return bytes_, 2.0 * b * kept * per_row


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

    fb, ff = _floor(cfg, cfg["tokens"], dtype)
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

        fb, ff = _floor(cfg, num_kept(rho, cfg["tokens"]), dtype)
        # "fast" writes into its inputs: mutates_inputs has the runner put them back between timed calls
        # (repeated in-place updates would converge the rows and collapse the routing onto two experts)
        out.append(Case("ops", f"moe_skip_rho{rho:g}", dict(shape, rho=rho), make,
                        {"reference": skipped(ref, False), "fast": skipped(fast, True),
                         **({"fast+graphs": CUDAGraphInference(skipped(fast, True))} if graphs else {})},
                        floor_bytes=fb, floor_flops=ff, mutates_inputs=True,
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

        gate_out = len(bottlenecks) if gate == "expert" else dim
        gate_flops = 2 * rows * dim * gate_out
        weights = sum(2 * dim + 2 * r * dim + r + dim for r in bottlenecks) + dim * gate_out + gate_out
        out.append(Case("ops", f"m4oe_adapter_{gate}", dict(B=batch, N=tokens, D=dim, bottlenecks=bottlenecks,
                                                            gate=gate), make,
                        {"reference": run(ref), "fast": run(fast)},
                        floor_bytes=(2 * rows * dim + weights) * elt,
                        floor_flops=2 * rows * dim * r_total * 2 + gate_flops,
                        notes="M4oE: dense mixture of the three specialists, gate over experts or channels"))
    return out
