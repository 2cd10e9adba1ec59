"""CUDA-graph replay for inference: one launch per forward instead of hundreds.

Small-batch ViT inference with routers and gathers (DynaMer: ~1,800 torch ops per forward) is bound by
the host launching kernels, not by the GPU: on an H200 both DynaMer models took 27-45 ms per batch of 32
whatever ρ. The fast paths never synchronise with the host, so a whole forward can be captured once into
a ``torch.cuda.CUDAGraph`` and replayed (the pattern of PyTorch's CUDA-graph notes; ``torch.compile(...,
mode="reduce-overhead")`` does the same after compiling, at a compile cost per shape).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map

__all__ = ["CUDAGraphInference"]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: Any


class CUDAGraphInference:
    """Call ``fn(*tensors)`` under ``torch.no_grad()`` by replaying a CUDA graph captured on first use.

    One graph per input signature (shapes, dtypes, devices) and per ``key()`` (e.g. ``lambda:
    model.keep_ratio`` for a model whose shapes depend on an attribute). The first call of a signature
    runs ``fn`` ``warmup`` times on a side stream (Triton autotuning, cuBLAS workspaces), then captures it;
    every call copies the inputs into the captured buffers, replays, and returns a clone of the outputs
    (so a later replay cannot overwrite what the caller holds). ``fn`` must not synchronise with the host
    and must take only CUDA tensors.
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 3, key: Callable[[], Hashable] | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning must happen before capture), got {warmup}")
        self.fn, self.warmup, self.key = fn, warmup, key
        self._graphs: dict[Hashable, _Captured] = {}

    def __call__(self, *args: torch.Tensor) -> Any:
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor) or not a.is_cuda:
                got = f"a tensor on {a.device}" if isinstance(a, torch.Tensor) else type(a).__name__
                raise TypeError(f"CUDAGraphInference takes CUDA tensors only; argument {i} is {got}")
        signature = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        signature += (self.key(),) if self.key is not None else ()
        captured = self._graphs.get(signature)
        if captured is None:
            captured = self._graphs[signature] = self._capture(args)
        for buf, a in zip(captured.inputs, args):
            buf.copy_(a)
        captured.graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, captured.output)

    def _capture(self, args: tuple[torch.Tensor, ...]) -> _Captured:
        inputs = [a.detach().clone() for a in args]
        side = torch.cuda.Stream(device=inputs[0].device if inputs else None)
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            output = self.fn(*inputs)
        return _Captured(graph, inputs, output)
