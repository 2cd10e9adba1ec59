"""Where the grouped-adapter forward and backward spend their time, in one GPU call (benchmarks/NOTES.md).

Times, on the same rotating bf16 inputs (D = 768, 197 tokens per image): the fused kernel with each of
its forward configs (two-pass and one-pass LayerNorm) forced in turn, the autotuned kernel (variant "auto":
the autotuner's pick among all of them), the split (two kernels) and one-pass-only variants, the
cuBLAS path (LayerNorm, addmm, ReLU, addmm, add) and that path's pieces alone, and prints each as ms and
% of the roofline floor measured against this device's copy bandwidth and GEMM rate. Then the
backward: both Triton kernels, the dh kernel alone, and (one group) autograd through the cuBLAS path.
The autotuned forward and both Triton backward rows run again without the kernels' alignment hints
(``ALIGN_HINTS = False``: the code the kernels compile to when a bottleneck is not a multiple of 16).
First, torch.profiler tables of forward+backward (device time per kernel) for each path.

    python benchmarks/tune_grouped_adapter.py --json $OUT/tune.json          # on a GPU
    TRITON_INTERPRET=1 python benchmarks/tune_grouped_adapter.py --smoke       # plumbing check on CPU
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import mosaic_fast
from mosaic_fast.bench.core import Rotating, measure, measure_ceilings
from mosaic_fast.kernels import grouped_adapter as kernels
from mosaic_fast.ops import grouped_adapter as ga


def _weights(d: int, rs: list[int], device, dtype):
    g, r = len(rs), sum(rs)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, mean=0.0):
        return (torch.randn(*shape, generator=gen) * 0.05 + mean).to(device, dtype)

    return [rnd(g, d, mean=1.0), rnd(g, d), rnd(r, d), rnd(r), rnd(d, r), rnd(g, d)]


def _switched(fn, **settings):
    """``fn`` with ``kernels.NAME = value`` for each setting while it runs (restored after)."""
    def run(i):
        saved = {name: getattr(kernels, name) for name in settings}
        for name, value in settings.items():
            setattr(kernels, name, value)
        try:
            return fn(i)
        finally:
            for name, value in saved.items():
                setattr(kernels, name, value)
    return run


def _variants(h_sets, base_sets, ids, weights, rs, device):
    """name -> callable(i) for input set i."""
    ln_w, ln_b, wd, bd, wu, bu = weights
    out = {}

    def kernel(i):
        return ga.grouped_adapter(h_sets[i], *weights, rs, base=base_sets[i], expert_id=ids)

    out["kernel (autotuned)"] = kernel  # FORWARD_VARIANT "auto": two-pass and one-pass configs
    out["kernel (autotuned), no alignment hints"] = _switched(kernel, ALIGN_HINTS=False)
    out["split kernels (autotuned)"] = _switched(kernel, FORWARD_VARIANT="split")
    out["one-pass kernel (autotuned)"] = _switched(kernel, FORWARD_VARIANT="onepass")
    for cfg in kernels._fwd_configs():
        def forced(i, cfg=cfg):
            # the config's own variant and its autotuner, left this one config ("auto" would run the
            # two-pass autotuner wherever nothing is timed, whatever config it was given)
            variant = "onepass" if cfg.kwargs["ONEPASS"] else "fused"
            tuner = kernels._fwd_for(variant)
            saved = tuner.configs, tuner.cache, kernels.FORWARD_VARIANT
            tuner.configs, tuner.cache, kernels.FORWARD_VARIANT = [cfg], {}, variant
            try:
                return kernel(i)
            finally:
                tuner.configs, tuner.cache, kernels.FORWARD_VARIANT = saved
        kw = cfg.kwargs
        ln = "one-pass" if kw["ONEPASS"] else "two-pass"
        out[f"kernel {ln} BM{kw['BM']} BK{kw['BK']} BN{kw['BN']} w{cfg.num_warps} s{cfg.num_stages}"] = forced
    if ids is None:  # the cuBLAS path and its pieces (one group)
        d = h_sets[0].shape[-1]
        y0 = F.layer_norm(h_sets[0], (d,), ln_w[0], ln_b[0]).view(-1, d)
        z0 = torch.relu(torch.addmm(bd, y0, wd.t()))
        out["cuBLAS path (auto)"] = kernel  # run under backend "auto": one group goes to cuBLAS
        out["  LayerNorm alone"] = lambda i: F.layer_norm(h_sets[i], (d,), ln_w[0], ln_b[0])
        out["  down addmm alone"] = lambda i: torch.addmm(bd, y0, wd.t())
        out["  up addmm alone"] = lambda i: torch.addmm(bu[0], z0, wu.t())
    return out


def _backward_variants(h_sets, ids, weights, rs, device):
    """name -> callable(i): the Triton backward (both kernels, or the dh kernel alone) on saved forward
    state, and for one group autograd's backward through the cuBLAS path (graph kept between calls)."""
    d = h_sets[0].shape[-1]
    seg_len = h_sets[0].shape[1]
    flat = [h.reshape(-1, d) for h in h_sets]
    douts = [torch.randn_like(h) for h in flat]
    saved = [kernels.forward(h, None, ids, seg_len, *weights, rs, 0.1, 1e-5, True)[1:] for h in flat]
    out = {}
    for name, need_dh, need_w in (("bwd: dh + weight kernels", True, True), ("bwd: dh kernel only", True, False)):
        def bwd(i, need_dh=need_dh, need_w=need_w):
            return kernels.backward(douts[i], flat[i], ids, seg_len, *weights, rs, *saved[i], 0.1, 1e-5,
                                    need_dh, need_w)
        out[name] = bwd
        out[f"{name}, no alignment hints"] = _switched(bwd, ALIGN_HINTS=False)
    if ids is None:
        leaves = [[t.detach().clone().requires_grad_() for t in (h, *weights)] for h in flat]
        # The forward decides what autograd runs backward: record it on backend "auto" (one group: the
        # torch ops), whatever the caller's backend ("triton" would record the kernels' autograd Function).
        saved_backend = mosaic_fast.get_backend()
        mosaic_fast.set_backend("auto")
        try:
            with torch.enable_grad():
                graphs = [ga.grouped_adapter(lv[0], *lv[1:], rs) for lv in leaves]
        finally:
            mosaic_fast.set_backend(saved_backend)

        def cublas_bwd(i):
            graphs[i].backward(douts[i], retain_graph=True)

        out["bwd: cuBLAS autograd"] = cublas_bwd
    return out


def floors(t: int, d: int, rs: list[int], routed_r: list[int], n: int, elem: int,
           ceilings: dict) -> tuple[float, float]:
    """Roofline floors (seconds) of the forward and of the backward alone (DESIGN.md §6): forward reads h
    and base and writes out (3·T·D) plus the weights, 4·T·D·r flops; backward reads dout and h and
    writes dh (3·T·D), reads the weights and writes their gradients, twice the forward's flops."""
    weights = sum(2 * d + 2 * r * d + r + d for r in rs) * elem
    flops = 4.0 * d * n * sum(routed_r)
    act = 3 * t * d * elem
    fwd = max((act + weights) / ceilings["bytes_per_s"], flops / ceilings["flops_bf16"])
    bwd = max((act + 2 * weights) / ceilings["bytes_per_s"], 2 * flops / ceilings["flops_bf16"])
    return fwd, bwd


def run(batches: list[int], device: torch.device, dtype: torch.dtype, ceilings: dict,
        d: int = 768, n: int = 197) -> Iterator[dict]:
    """Every variant's row (ms and % of the floor, or the error) per routing and batch, each yielded as soon as
    it is measured (so a run cut short by a time limit still leaves what it measured)."""
    for routing, rs in (("single", [192]), ("mixed", [64, 96, 192])):
        for b in batches:
            t = b * n
            h_sets = [torch.randn(b, n, d, device=device, dtype=dtype) for _ in range(3)]
            base_sets = [torch.randn(b, n, d, device=device, dtype=dtype) for _ in range(3)]
            ids = None if routing == "single" else torch.arange(b, device=device) % 3  # per sample, as the model
            weights = _weights(d, rs, device, dtype)
            routed_r = [rs[i % len(rs)] for i in range(b)] if routing == "mixed" else [rs[0]] * b
            elem = torch.empty((), dtype=dtype).element_size()
            floor, floor_bwd = floors(t, d, rs, routed_r, n, elem, ceilings)
            mosaic_fast.set_backend("triton")
            try:
                with torch.no_grad():
                    variants = _variants(h_sets, base_sets, ids, weights, rs, device)
                    variants.update(_backward_variants(h_sets, ids, weights, rs, device))
                    for name, fn in variants.items():
                        torch_path = name.startswith(("cuBLAS", "  ", "bwd: cuBLAS"))
                        mosaic_fast.set_backend("auto" if torch_path else "triton")
                        floor_v = floor_bwd if name.startswith("bwd") else floor
                        try:
                            fn(0)
                            sec = measure(Rotating(fn, [(i,) for i in range(3)]), device, min_run_time=0.01)
                            row = dict(routing=routing, B=b, variant=name, ms=sec * 1e3, pct_floor=100 * floor_v / sec)
                        except Exception as exc:  # a config that does not compile: report, go on
                            row = dict(routing=routing, B=b, variant=name, error=f"{type(exc).__name__}: {exc}"[:200])
                        yield row
            finally:
                mosaic_fast.set_backend("auto")


def _step(h, base, weights, rs, ids, gout) -> None:
    ga.grouped_adapter(h, *weights, rs, base=base, expert_id=ids).backward(gout)


def profile(device: torch.device, dtype: torch.dtype, batch: int, calls: int = 5, d: int = 768, n: int = 197) -> str:
    """torch.profiler tables (device time per kernel) of ``calls`` forward+backward calls, kernel vs cuBLAS path,
    one specialist and mixed: shows which kernel or torch op the time goes to."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    tables = []
    for routing, rs, backend in (("single", [192], "triton"), ("single", [192], "auto"),
                                 ("mixed", [64, 96, 192], "triton")):
        weights = [w.requires_grad_() for w in _weights(d, rs, device, dtype)]
        h = torch.randn(batch, n, d, device=device, dtype=dtype, requires_grad=True)
        base = torch.randn(batch, n, d, device=device, dtype=dtype, requires_grad=True)
        gout = torch.randn(batch, n, d, device=device, dtype=dtype)
        ids = None if routing == "single" else torch.arange(batch, device=device) % 3
        mosaic_fast.set_backend(backend)
        try:
            _step(h, base, weights, rs, ids, gout)  # autotuning outside the profile
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(calls):
                    _step(h, base, weights, rs, ids, gout)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        finally:
            mosaic_fast.set_backend("auto")
        table = prof.key_averages().table(sort_by=sort_by, row_limit=12, max_name_column_width=60)
        tables.append(f"== {routing}, backend {backend}, B={batch}, {calls} x (fwd + bwd)\n{table}")
    return "\n".join(tables)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (D = 64) on CPU under TRITON_INTERPRET=1")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:
        device, dtype, batches = torch.device("cpu"), torch.float32, [1]
        ceilings = {"bytes_per_s": 1e10, "flops_bf16": 1e11}
    else:
        device, dtype, batches = torch.device("cuda"), torch.bfloat16, [32, 128]
        ceilings = measure_ceilings(device)
    shape = dict(d=64, n=8) if args.smoke else {}
    print(profile(device, dtype, batches[-1], calls=1 if args.smoke else 5, **shape), flush=True)
    rows = []
    for row in run(batches, device, dtype, ceilings, **shape):  # printed and saved (all so far) as measured
        rows.append(row)
        tail = row["error"] if "error" in row else f"{row['ms']:9.3f} ms {row['pct_floor']:6.1f}% of floor"
        print(f"{row['routing']:<7}B={row['B']:<4}{row['variant']:<46}{tail}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ceilings": ceilings, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
