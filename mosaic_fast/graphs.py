"""CUDA-graph replay: one launch per forward (and per backward) instead of hundreds.

Small-batch ViT inference with routers and gathers (DynaMer: over a thousand torch ops per forward) is
bound by the host launching kernels, not by the GPU: on an H200 both DynaMer models took 22-45 ms per
batch of 32 whatever ρ in the first two GPU runs. The fast paths never synchronise with the host, so a
whole forward can be captured once into a ``torch.cuda.CUDAGraph`` and replayed (the pattern of PyTorch's
CUDA-graph notes; ``torch.compile(..., mode="reduce-overhead")`` does the same after compiling, at a
compile cost per shape).

* :class:`CUDAGraphInference`: a no-grad forward (inference, an EMA teacher) replayed.
* :class:`CUDAGraphTraining`: a module's forward and backward replayed inside an otherwise eager training
  step (``torch.cuda.make_graphed_callables``): the loss, optimizer and EMA update stay ordinary code.
  A MOSAIC training step is host-bound too (thousands of small ops per step on an H200).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["CUDAGraphInference", "CUDAGraphTraining"]


def _check_cuda_args(args: tuple, who: str) -> None:
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor) or not a.is_cuda:
            got = f"a tensor on {a.device}" if isinstance(a, torch.Tensor) else type(a).__name__
            raise TypeError(f"{who} takes CUDA tensors only; argument {i} is {got}")


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
    and must take only CUDA tensors. Parameters may change in place between calls (an EMA teacher): the
    replay reads them where they are (the fast adapters skip their packed-weight cache while capturing).
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 3, key: Callable[[], Hashable] | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning must happen before capture), got {warmup}")
        self.fn, self.warmup, self.key = fn, warmup, key
        self._graphs: dict[Hashable, _Captured] = {}

    def __call__(self, *args: torch.Tensor) -> Any:
        """``fn(*args)`` by replaying the graph of this input signature (captured on its first call); returns
        clones of the outputs."""
        _check_cuda_args(args, "CUDAGraphInference")
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


class _Bound(nn.Module):
    """``call(module, *args)`` as a module whose parameters are ``module``'s (what make_graphed_callables
    differentiates)."""

    def __init__(self, module: nn.Module, call: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self._call = call

    def forward(self, *args: torch.Tensor) -> Any:
        return self._call(self.module, *args)


class CUDAGraphTraining:
    """``call(module, *tensors)`` whose forward and backward replay CUDA graphs, for a training step.

    ``student = CUDAGraphTraining(model, lambda m, x, ids: m(x, task_id=0, expert_id=ids))``, then
    ``feats, logits = student(x, ids)`` behaves like the eager call under autograd: a backward through
    anything computed from the outputs replays the captured backward and accumulates the gradients of
    ``module``'s trainable parameters into ``.grad`` as usual, so the loss, gradient clipping, optimizer and
    EMA update stay eager code. Non-tensor arguments (a routing letter, a task id) belong in ``call``.
    The outputs live in the graph's static buffers (make_graphed_callables returns them detached, not
    copied): the next call overwrites them, so use them within the step or clone what must outlive it.

    One graph pair per input signature (shapes, dtypes, and the module's training flag), captured on first
    use by ``torch.cuda.make_graphed_callables`` (``warmup`` eager iterations on a side stream first, so
    Triton autotuning happens before capture) under the autocast state of that call; autocast's weight
    cache is switched off during capture, as capture requires. The usual CUDA-graph rules hold: ``call``
    must not synchronise with the host, shapes are fixed per graph, which parameters require grad must not
    change after capture (build a new instance), and no module hooks. Parameters may be updated in place
    between steps (optimizers do): the graphs read them where they are.
    """

    def __init__(self, module: nn.Module, call: Callable[..., Any], warmup: int = 3) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(call):
            raise TypeError(f"call must be callable, got {type(call).__name__}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning must happen before capture), got {warmup}")
        self.module, self.call, self.warmup = module, call, warmup
        self._graphed: dict[Hashable, nn.Module] = {}

    def __call__(self, *args: torch.Tensor) -> Any:
        """``call(module, *args)`` through the graphed forward (and, under autograd, backward) of this input
        signature, captured on its first call; the outputs live in the graph's static buffers."""
        _check_cuda_args(args, "CUDAGraphTraining")
        signature = tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args)
        signature += (self.module.training, torch.is_autocast_enabled("cuda"),
                      torch.get_autocast_dtype("cuda"))
        graphed = self._graphed.get(signature)
        if graphed is None:
            graphed = self._graphed[signature] = self._capture(args)
        return graphed(*args)

    def _capture(self, args: tuple[torch.Tensor, ...]) -> nn.Module:
        bound = _Bound(self.module, self.call)
        samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            return torch.cuda.make_graphed_callables(bound, samples, num_warmup_iters=self.warmup,
                                                     allow_unused_input=True)
        finally:
            torch.set_autocast_cache_enabled(cache)
