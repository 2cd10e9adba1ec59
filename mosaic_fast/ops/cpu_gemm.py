"""fp32 Linear layers on CPU through oneDNN instead of MKL (torch's own ``mkldnn::_linear_pointwise``).

On CPU ``F.linear``/``addmm`` in fp32 calls MKL's sgemm. MKL chooses its code path by CPU vendor and runs
its AVX2 kernels on AMD processors even when they have AVX-512: on a 2-core AMD EPYC Zen 5 it reaches
~210–240 GFLOP/s where oneDNN, which torch also ships and which inductor uses for its CPU linear fusions,
reaches ~410–490 GFLOP/s on the same GEMMs (ViT-B's 1,576×768×3,072: 33.5 vs 15.6 ms). On a Zen 4, whose
AVX-512 units are 256 bits wide, oneDNN was 2–11 % faster in one session (40.1 vs 36.8 ms), 27 % in
another (62.9 vs 49.5 ms), its gradient products too; on Intel CPUs both
libraries run AVX-512 and are about equal. Without AVX-512 (an AVX2-only Zen 3) oneDNN is the slower one:
a ViT layer's forward, input-gradient and weight-gradient GEMMs took 22–37 % longer in total than MKL's,
the gradients (transposed operands) up to 2.4× longer (``benchmarks/cpu_gemm_libraries.py``). So oneDNN
is the default only where torch runs AVX-512 kernels (:func:`default_library`). The result is fp32 IEEE
arithmetic in both (oneDNN's fp32 math mode stays "strict" unless ``torch.backends.mkldnn`` is told otherwise); only
the summation order differs, ~1e-7 relative.

:func:`linear` is differentiable (its gradients are oneDNN Linears too, themselves differentiable) and
falls back to ``F.linear`` wherever oneDNN would change the meaning or is not there: other devices or
dtypes, autocast (which must cast the inputs first), torch.compile (Inductor chooses its own kernels),
torch.func transforms, builds without oneDNN, CPUs without AVX-512 (unless ``MOSAIC_FAST_CPU_GEMM=onednn``
in the environment asks for it), ``MOSAIC_FAST_CPU_GEMM=mkl``, and
products of at most :data:`MIN_ONEDNN_MACS` multiply-adds (where MKL's call overhead is lower).
:func:`linear_gelu` fuses the exact (erf) GELU into the GEMM's epilogue when no gradient is needed
(:func:`linear_act` when the activation is a module that may be that GELU); :func:`add_linear` adds a
product into a copy of a residual.
:func:`mm` and :func:`addmm` are the non-differentiable products the ops' hand-written forward and
backward fallbacks use.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ._common import is_exact_gelu

GEMM_LIBRARIES = ("onednn", "mkl")


def default_library() -> str:
    """"onednn" where torch dispatches its AVX-512 CPU kernels (oneDNN's fp32 GEMMs are 2–27 % faster than
    MKL's on a Zen 4, 2.0–2.3× on a Zen 5, equal on Intel), "mkl" elsewhere (on AVX2 oneDNN lost by 22–37 %
    over a ViT layer's GEMMs, forward and backward)."""
    return "onednn" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "mkl"


_library = os.environ.get("MOSAIC_FAST_CPU_GEMM") or default_library()
if _library not in GEMM_LIBRARIES:
    raise ValueError(f"MOSAIC_FAST_CPU_GEMM must be one of {GEMM_LIBRARIES}, got {_library!r}")

#: oneDNN's Linear with a fused epilogue, when this torch build has it.
_ONEDNN_LINEAR = (
    torch.ops.mkldnn._linear_pointwise
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    else None
)


#: Up to this many multiply-adds MKL's lower per-call cost wins (this CI machine: 6 vs 12 µs at 8×64×64,
#: a tie at ~3M, oneDNN 1.6× faster at 20M), so smaller products stay on ``F.linear``.
MIN_ONEDNN_MACS = 1 << 22

#: torch.func transforms (grad, vmap, jvp) need F.linear's own rules; autograd checks this flag the same way.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's fused Linear (whichever library is chosen)."""
    return _ONEDNN_LINEAR is not None


def onednn_enabled() -> bool:
    """Whether fp32 CPU Linear layers of the fast modules run through oneDNN (this module's choice, and
    oneDNN not switched off with ``torch.backends.mkldnn.enabled = False`` / ``torch.backends.mkldnn.flags``)."""
    return onednn_available() and _library == "onednn" and torch.backends.mkldnn.enabled


def set_cpu_gemm(library: str) -> None:
    """Choose the fp32 CPU GEMM library of the fast modules: "onednn" or "mkl" (plain ``F.linear``, as the
    reference modules do); the default is :func:`default_library`."""
    global _library
    if library not in GEMM_LIBRARIES:
        raise ValueError(f"library must be one of {GEMM_LIBRARIES}, got {library!r}")
    _library = library


@contextlib.contextmanager
def cpu_gemm_library(library: str) -> Iterator[None]:
    """Within the block, the fp32 CPU GEMM library is ``library`` (see :func:`set_cpu_gemm`)."""
    previous = _library
    set_cpu_gemm(library)
    try:
        yield
    finally:
        set_cpu_gemm(previous)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.is_cpu  # first: on CUDA tensors this is the only check paid
        and onednn_enabled()
        and x.dtype == torch.float32
        and x.dim() >= 2
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_cpu
        and (bias is None or (bias.dtype == torch.float32 and bias.is_cpu))
        and x.numel() // max(x.shape[-1], 1) * weight.numel() > MIN_ONEDNN_MACS
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not _functorch_active()
    )


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is row- or column-major, else a contiguous copy. oneDNN falls back to a slow generic
    kernel for other strides (a column slice of a weight took 375 ms instead of 0.18 ms)."""
    if t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous()):
        return t
    return t.contiguous()


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None, epilogue: str = "none"):
    """``a @ b_tᵀ (+ bias)`` with an optional epilogue ("none" or "gelu", the exact erf GELU)."""
    return _ONEDNN_LINEAR(_dense(a), _dense(b_t), bias, epilogue, [], "none" if epilogue == "gelu" else "")


class _OneDNNLinear(torch.autograd.Function):
    """``x @ Wᵀ + b`` through oneDNN; each gradient is one more :func:`linear`, so it runs through oneDNN
    too and is itself differentiable (double backward, e.g. gradient penalties)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if weight.requires_grad else None, weight if x.requires_grad else None)
        return _onednn_mm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(grad, weight.t())  # grad @ W
        if ctx.needs_input_grad[1]:
            grad_w = linear(grad.t(), x.t())  # gradᵀ @ x (both 2-D here)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; fp32 on CPU through oneDNN (see the module docstring)."""
    if not _use_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if _needs_grad(x, weight, bias):
        # 2-D inside the Function: oneDNN returns a view for N-D inputs, which autograd would not let
        # callers modify in place
        out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return _onednn_mm(x, weight, bias)


def _fresh_cpu_result(x: torch.Tensor) -> bool:
    """Whether a no-gradient CPU product of ``x`` may be finished in place (its GEMM output is a new
    buffer): no autocast, whose casts in-place ops would bypass, and no torch.compile, which fuses its own."""
    return x.is_cpu and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()


def may_finish_in_place(x: torch.Tensor, *operands: torch.Tensor | None) -> bool:
    """Whether the fresh outputs of CPU products of ``x`` with ``operands`` may be finished by in-place ops
    (no fresh buffer per step): no gradient recorded through any of them, no autocast, no torch.compile."""
    return _fresh_cpu_result(x) and not _needs_grad(x, *operands)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact GELU). Without gradients on CPU the GELU runs in the
    oneDNN GEMM's epilogue, or, with MKL, in place on the GEMM's output: either way no second 4·D-wide
    buffer (on CPU a fresh buffer of a few MB costs its page faults; ~4 % of the quick MosaicModel's
    inference on a Zen 3)."""
    if _needs_grad(x, weight, bias):
        return F.gelu(linear(x, weight, bias))
    if _use_onednn(x, weight, bias):
        return _onednn_mm(x, weight, bias, "gelu")
    out = F.linear(x, weight, bias)
    return torch.ops.aten.gelu_(out) if _fresh_cpu_result(x) else F.gelu(out)


def add_linear(base: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               alpha: float = 1.0, *, reuse_base: bool = False) -> torch.Tensor:
    """``base + alpha * F.linear(x, weight, bias)``, as a new tensor unless ``reuse_base``.

    Without gradients, with MKL on CPU, it is one buffer instead of two: ``base + alpha * bias``, then the
    GEMM accumulating into it (``addmm_``). A CPU product's fresh output pages cost about as much as the
    add itself: one adapter layer's forward (B = 8, D = 768, r = 192) took 14 % less time on a Zen 3.
    oneDNN's products, other devices, autocast, mixed dtypes and recorded gradients take the two-step form.
    ``reuse_base``: ``base`` is a contiguous temporary of the caller's, which the no-gradient CPU path then
    sums into instead of a copy."""
    same_dtype = base.dtype == x.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)
    same_rows = x.dim() >= 2 and base.shape == (*x.shape[:-1], weight.shape[0])
    in_place = same_dtype and same_rows and may_finish_in_place(x, base, weight, bias)
    reuse = in_place and reuse_base and base.is_contiguous()
    if not in_place or _use_onednn(x, weight, bias):
        product = linear(x, weight, bias)
        return base.add_(product, alpha=alpha) if reuse else torch.add(base, product, alpha=alpha)
    if reuse:
        out = base if bias is None else base.add_(bias, alpha=alpha)
    else:
        out = base.clone(memory_format=torch.contiguous_format) if bias is None else torch.add(base, bias, alpha=alpha)
        if not out.is_contiguous():  # (the sum keeps a strided base's layout)
            out = out.contiguous()
    out.view(-1, weight.shape[0]).addmm_(x.reshape(-1, x.shape[-1]), weight.t(), alpha=alpha)
    return out


def linear_act(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))``, through :func:`linear_gelu` when ``act`` is the exact GELU."""
    return linear_gelu(x, weight, bias) if is_exact_gelu(act) else act(linear(x, weight, bias))


def addmm(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b + bias`` for 2-D ``a``, ``b`` and a 1-D ``bias`` (or None), not differentiable; fp32 on CPU
    through oneDNN. ``b`` is typically a transposed weight (``W.t()``), which oneDNN reads as it is."""
    if not _use_onednn(a, b.t(), bias):
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    return _onednn_mm(a, b.t(), bias)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors, not differentiable; fp32 on CPU through oneDNN."""
    return addmm(None, a, b)
