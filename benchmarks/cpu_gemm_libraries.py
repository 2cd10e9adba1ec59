"""MKL against oneDNN on this CPU, for the fp32 GEMMs of one ViT layer, forward and backward.

The fast modules send their fp32 CPU GEMMs to oneDNN only where torch runs AVX-512 kernels
(``mosaic_fast.ops.cpu_gemm.default_library``); this script measures whether that choice holds on the
machine at hand. For each of the layer's four Linears (qkv, proj, fc1, fc2) it times the forward product,
the input gradient (``grad @ W``) and the weight gradient (``gradᵀ @ x``, transposed operands) through
:func:`mosaic_fast.ops.cpu_gemm.linear` with each library, alternating the libraries between rounds so
that a slow spell of a shared machine hits both, and prints the median times and their ratio.

    python benchmarks/cpu_gemm_libraries.py                 # ViT-B: D = 768, 8 images of 197 tokens
    python benchmarks/cpu_gemm_libraries.py --dim 192       # the bench's quick model width
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mosaic_fast.ops import cpu_gemm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=768, help="model width D (MLP 4·D)")
    p.add_argument("--tokens", type=int, default=8 * 197, help="rows M of every product (images × tokens)")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds per library (alternating)")
    return p.parse_args(argv)


def layer_products(dim: int, tokens: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> product, for the forward and both gradients of a ViT layer's four Linears."""
    g = torch.Generator().manual_seed(0)
    products = {}
    shapes = {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, 4 * dim), "fc2": (4 * dim, dim)}
    for name, (k, n) in shapes.items():
        x, w = torch.randn(tokens, k, generator=g), torch.randn(n, k, generator=g)
        b, grad = torch.randn(n, generator=g), torch.randn(tokens, n, generator=g)
        products[f"{name} forward"] = lambda x=x, w=w, b=b: cpu_gemm.linear(x, w, b)
        products[f"{name} input grad"] = lambda grad=grad, w=w: cpu_gemm.linear(grad, w.t())
        products[f"{name} weight grad"] = lambda grad=grad, x=x: cpu_gemm.linear(grad.t(), x.t())
    return products


def median_ms(products: dict[str, Callable[[], torch.Tensor]], rounds: int) -> dict[str, dict[str, float]]:
    """Library -> product name -> median ms over ``rounds`` rounds, the libraries alternating each round."""
    times: dict[str, dict[str, list[float]]] = {lib: {name: [] for name in products} for lib in cpu_gemm.GEMM_LIBRARIES}
    for r in range(rounds + 1):  # round 0 warms both libraries up
        for lib in cpu_gemm.GEMM_LIBRARIES[:: 1 if r % 2 else -1]:
            with cpu_gemm.cpu_gemm_library(lib):
                for name, product in products.items():
                    start = time.perf_counter()
                    product()
                    if r:
                        times[lib][name].append(1e3 * (time.perf_counter() - start))
    return {lib: {name: statistics.median(v) for name, v in per.items()} for lib, per in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not cpu_gemm.onednn_available():
        raise SystemExit("this torch build has no oneDNN linear: nothing to compare")
    ms = median_ms(layer_products(args.dim, args.tokens), args.rounds)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"default library: {cpu_gemm.default_library()}; D = {args.dim}, M = {args.tokens}")
    print(f"{'product':<18}{'mkl ms':>10}{'onednn ms':>12}{'mkl/onednn':>12}")
    for name, mkl in ms["mkl"].items():
        onednn = ms["onednn"][name]
        print(f"{name:<18}{mkl:>10.2f}{onednn:>12.2f}{mkl / onednn:>12.2f}")
    total = {lib: sum(per.values()) for lib, per in ms.items()}
    print(f"{'layer total':<18}{total['mkl']:>10.2f}{total['onednn']:>12.2f}{total['mkl'] / total['onednn']:>12.2f}"
          "   (> 1: oneDNN faster)")


if __name__ == "__main__":
    main()
