"""Run the CUDA code path on a machine without a GPU: fake CUDA tensors, Triton launches recorded.

CI has no GPU, so the branches taken only for CUDA tensors (backend "auto" sending each op to its kernel
or to cuBLAS, the fused DynaMer inference ops, the trainer's handling of absent specialists) and the
promise that a forward or backward never waits on the host would first run on a scarce GPU.
Under torch's ``FakeTensorMode`` a tensor on "cuda" has a shape, dtype and device but no data: every op
computes only its output's metadata, and reading a value on the host (``.item()``, ``.tolist()``,
``bool(t)``, ``nonzero``, ``repeat_interleave`` without ``output_size``) raises, which is exactly the
host synchronisation that CUDA-graph capture and ``torch.compile`` cannot take. Each Triton launch is
checked against its kernel's parameters (every argument known, none missing once the autotuning configs
and heuristics add theirs) and counted instead of run; copies from host memory to the GPU (which wait for
the GPU when the memory is pageable) are listed.

Autograd's engine needs a CUDA driver for CUDA tensors, so :func:`backward` runs the graph node by node
in Python (the same node functions, in a topological order). Module-level caches keyed by device are
restored on exit; the dry run is for machines without CUDA only (on a GPU the real CUDA tests run).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import sys
import traceback
import types
import warnings
from collections.abc import Iterator

import torch
from torch._library.custom_ops import CustomOpDef
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import mosaic_fast.ops  # noqa: F401  (imports every op module)
from mosaic_fast.kernels import grouped_adapter
from mosaic_fast.nn import moe

#: Module-level caches keyed by device: fake "cuda" entries must not outlive the dry run.
DEVICE_CACHES = ((grouped_adapter, "_META_CACHE"), (grouped_adapter, "_SM_COUNT"),
                 (grouped_adapter, "_GROUP_OF_ROW_CACHE"), (moe, "_ROW_OFFSETS"))

#: Launch options Triton takes next to a kernel's own parameters.
LAUNCH_OPTIONS = {"grid", "warmup", "num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion"}

#: What the fast paths ask of the device (an H200's figures).
DEVICE_PROPERTIES = types.SimpleNamespace(name="fake H200", major=9, minor=0, multi_processor_count=132,
                                          total_memory=141 * 2**30)


def _kernel_function(launcher) -> tuple[types.FunctionType, set[str]]:
    """The Python function under an autotuner/heuristics/jit wrapper, and the parameters the wrappers
    supply (every autotuning config's and heuristic's keys)."""
    supplied: set[str] = set()
    node = launcher
    while not inspect.isfunction(node):
        if isinstance(node, Autotuner):
            for config in node.configs:
                supplied |= set(config.kwargs)
        elif isinstance(node, Heuristics):
            supplied |= set(node.values)
        node = node.fn
    return node, supplied


class LaunchRecorder:
    """Counts launches per kernel name (a launch whose arguments do not fit the kernel raises) and lists
    the host-to-device copies (``host_copies``: op and the package's innermost line)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.host_copies: list[str] = []

    def __call__(self, launcher, *args, **kwargs) -> None:
        fn, supplied = _kernel_function(launcher)
        params = inspect.signature(fn).parameters
        user = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
        bound = inspect.signature(fn).bind_partial(*args, **user)  # TypeError on a surplus or unknown one
        missing = set(params) - set(bound.arguments) - supplied
        if missing:
            raise TypeError(f"launch of {fn.__name__} misses {sorted(missing)}")
        for name, value in bound.arguments.items():
            if isinstance(value, torch.Tensor) and value.device.type != "cuda":
                raise TypeError(f"launch of {fn.__name__}: {name} is on {value.device}, not on the GPU")
        self.counts[fn.__name__] += 1

    def clear(self) -> None:
        self.counts.clear()
        self.host_copies.clear()


class _HostCopies(TorchDispatchMode):
    """Records ops that combine a CPU tensor with CUDA tensors or make CUDA tensors from one: a copy from
    pageable host memory, after which the host waits for the GPU. 0-dim CPU tensors are read as numbers
    (no copy) and not recorded."""

    def __init__(self, recorder: LaunchRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in inputs):
            outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if any(t.is_cuda for t in inputs + outputs):
                self.recorder.host_copies.append(f"{func} at {_package_line()}")
        return out


def _package_line() -> str:
    frames = [f for f in traceback.extract_stack() if "/mosaic_fast/" in f.filename or "/kernels/" in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "outside the package"


@contextlib.contextmanager
def fake_cuda(monkeypatch) -> Iterator[LaunchRecorder]:
    """Inside: tensors created on or moved to "cuda" are fake, Triton launches go to the recorder.

    Move modules to "cuda" inside the block (``model.to("cuda")``); build them before it (their
    initialisers read values)."""
    recorder = LaunchRecorder()
    for cls in (JITFunction, InterpretedFunction, Autotuner, Heuristics):
        monkeypatch.setattr(cls, "run", lambda self, *args, **kwargs: recorder(self, *args, **kwargs))
    for op in _custom_ops():  # eager CUDA runs an op's implementation, not its shape-only fake
        monkeypatch.setattr(op, "_abstract_fn", op._init_fn)
    _record_function_args(monkeypatch)
    saved = [(module, name, dict(getattr(module, name))) for module, name in DEVICE_CACHES]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
            # the caches of the fast modules key on data_ptr(), which fake tensors still answer
            warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
            # after FakeTensorMode: moving a module to "cuda" must not see a CUDA runtime
            monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: DEVICE_PROPERTIES)
            monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
            monkeypatch.setattr(torch.cuda, "synchronize", _refuse_synchronize)
            monkeypatch.setattr(torch.Tensor, "backward", backward)
            monkeypatch.setattr(torch.autograd, "grad", grad)
            with _HostCopies(recorder):
                yield recorder
    finally:
        for module, name, content in saved:
            cache = getattr(module, name)
            cache.clear()
            cache.update(content)
        _TENSOR_ARGS.clear()


def enable_autocast(monkeypatch) -> None:
    """``torch.autocast("cuda")`` refuses to start without CUDA; call after the modules are on "cuda"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def _refuse_synchronize(*args, **kwargs) -> None:
    raise RuntimeError("torch.cuda.synchronize() called: a host synchronisation on the CUDA path")


def backward(output: torch.Tensor, grad: torch.Tensor | None = None) -> int:
    """``output.backward(grad)`` without autograd's engine (what ``Tensor.backward`` does inside
    :func:`fake_cuda`): each node's backward in topological order, gradients summed per (node, input),
    leaves accumulated into ``.grad``. Returns the number of nodes run."""
    if output.grad_fn is None:
        raise ValueError("output does not require grad")
    return len(_execute([output], [grad], capture={}))


def grad(outputs, inputs, grad_outputs=None, **unused) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad`` without the engine: the gradients arriving at ``inputs``; nothing is
    accumulated into ``.grad``."""
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    grad_outputs = [grad_outputs] if isinstance(grad_outputs, torch.Tensor) or grad_outputs is None \
        else list(grad_outputs)
    edges = [torch.autograd.graph.get_gradient_edge(t) for t in inputs]
    capture = {(e.node, e.output_nr): None for e in edges}
    _execute(outputs, grad_outputs * (len(outputs) if len(grad_outputs) == 1 else 1), capture)
    return tuple(capture[e.node, e.output_nr] for e in edges)


def _execute(outputs: list, grad_outputs: list, capture: dict) -> list:
    """Run the graph below ``outputs``. With ``capture`` (gradient edge -> gradient) non-empty, record the
    gradients arriving at those edges and accumulate nothing (``autograd.grad``); else accumulate into
    the leaves (``backward``)."""
    pending: dict[object, list[torch.Tensor | None]] = {}
    for out, g in zip(outputs, grad_outputs):
        if out.grad_fn is None:
            continue
        g = torch.ones_like(out) if g is None else g
        _send(pending, out.grad_fn, out.output_nr, g)
    order = _topological([out.grad_fn for out in outputs if out.grad_fn is not None])
    with torch.no_grad():
        _run_order(order, pending, capture)
    return order


def _run_order(order: list, pending: dict, capture: dict) -> None:
    for node in order:
        grads = pending.pop(node, None)
        if grads is None:
            continue
        grads += [None] * (len(node._input_metadata) - len(grads))
        for slot, g in enumerate(grads):
            key = (node, slot)
            if key in capture and g is not None:
                capture[key] = g
        if capture and type(node).__name__ == "AccumulateGrad":
            continue
        for (nxt, slot), g in zip(node.next_functions, _run_node(node, grads)):
            if nxt is not None and g is not None:
                _send(pending, nxt, slot, g)


def _send(pending: dict, node, slot: int, g: torch.Tensor) -> None:
    into = pending.setdefault(node, [])
    into += [None] * (slot + 1 - len(into))
    g = _conform(g, node._input_metadata[slot])
    into[slot] = g if into[slot] is None else into[slot] + g


def _conform(grad: torch.Tensor, meta) -> torch.Tensor:
    """What the engine's ``validate_outputs`` does: sum a broadcast gradient back, cast to the input's dtype."""
    if tuple(grad.shape) != tuple(meta.shape):
        grad = grad.sum_to_size(meta.shape)
    return grad if grad.dtype == meta.dtype else grad.to(meta.dtype)


def _topological(roots: list) -> list:
    """Nodes reachable from ``roots``, each before the nodes it feeds gradients to (reversed DFS post-order)."""
    order, done, stack = [], set(), [(root, False) for root in roots]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node not in done:
            done.add(node)
            stack.append((node, True))
            stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in done)
    return order[::-1]


def _custom_ops() -> list:
    """The package's ``torch.library.custom_op`` objects."""
    found = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("mosaic_fast.ops."):
            found.update({id(v): v for v in vars(module).values() if isinstance(v, CustomOpDef)})
    return list(found.values())


#: Per custom-Function node: which forward arguments were tensors (its backward returns one value per
#: argument; its ``next_functions`` list only the tensors).
_TENSOR_ARGS: dict[object, list[bool]] = {}


def _run_node(node, grads: list) -> tuple:
    if not hasattr(node, "_forward_cls"):  # a C++ node (aten backward, AccumulateGrad)
        outs = node(*grads)
        return (outs,) if isinstance(outs, torch.Tensor) or outs is None else tuple(outs)
    grads = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
             for g, m in zip(grads, node._input_metadata)]
    outs = node.apply(*grads)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return tuple(g for g, is_tensor in zip(outs, _TENSOR_ARGS[node]) if is_tensor)


def _record_function_args(monkeypatch) -> None:
    """Remember the argument kinds of every custom autograd Function applied from now on."""
    apply = torch.autograd.Function.__dict__["apply"]  # a classmethod of the C base (torch >= 2.x)

    def recording_apply(cls, *args, **kwargs):
        out = apply.__get__(None, cls)(*args, **kwargs)
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None and hasattr(t.grad_fn, "_forward_cls"):
                _TENSOR_ARGS[t.grad_fn] = [isinstance(a, torch.Tensor) for a in args]
        return out

    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(recording_apply))
