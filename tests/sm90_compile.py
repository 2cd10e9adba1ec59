"""Compile every Triton kernel for Hopper (sm_90) without a GPU: `python tests/sm90_compile.py`.

Triton's interpreter (how CI runs the kernels) checks their arithmetic but not that they compile: type
mismatches between branches, unsupported ops or too much shared memory only show on a GPU. This script
compiles the kernels ahead of time for sm_90 with Triton's bundled ptxas and prints one JSON line per
kernel, case and config (shared memory bytes, or the error; ``first``: the config MOSAIC_FAST_AUTOTUNE=0
runs; registers per thread, local memory and spill stores/loads in bytes per thread, and the resident warps
per SM they allow, from the cubin: see sm90_resources.py) and a summary on stderr (also the configs that
spill, and the first configs' registers and warps per SM). Run by tests/test_sm90_compile.py in a process
without TRITON_INTERPRET (the interpreter replaces the kernels when it is set), which also fails when a
kernel launched from kernels/*.py is not compiled here.

How: each case calls a launcher of kernels/*.py with tensors on torch's "meta" device (shapes and
dtypes, no data) at the benchmark shapes (ViT-B: D = 768, 197 tokens, batch 32; grouped bottlenecks
64/96/192, so R_BLOCK 256; 4 experts of r = 64, top-2, 768 gates; 64³ volumes, patch 8, E = 768), with
``kernel[grid](...)`` recording the launch instead of running it. Each launch is then compiled as
Triton would compile it: the autotuner's configs after the launcher's ``early_config_prune``, the
heuristics, and the signature from Triton's own specialisation of the arguments (pointer dtypes,
i32/fp32 scalars, 16-divisible pointers and ints, ints equal to 1 as constants, ``do_not_specialize``).
So argument types, constexprs (block sizes derived from the shapes, routing modes, dot precision) and
configs are the launchers' own and cannot drift from them. (The divisibility matters: it enables the
pipelined loads, e.g. the routed down kernel's first bf16 config needs 145 KB of shared memory, not
the 33 KB it compiles to without it.) The grouped weight-gradient split is computed for an H200's
132 SMs (fp32 partials), and once for a split of 1 (partials in the weight dtype).

Coverage: all 13 kernels, ~170 compiles, ~160 s of CPU (in two worker processes). Every config in every
dtype would take about four times as long (mostly the fp32 configs), so not every config is compiled:
  * every config, bf16: the kernels not yet run on a GPU (routed MoE route-and-down and gate-combine;
    the grouped forward's one-pass LayerNorm, which shares the forward's autotuning list, so all 10
    forward configs, and the split variant's 7), the backward kernels (grouped dh with the
    pre-activation saved and recomputed, grouped weight gradients), the training MoE kernels
    (moe_adapter down and combine), the split forward's up projection, and the 3D patch embedding
    (uint8 volume, bf16 weights);
  * the first config, for the other cases: fp32 with IEEE dots and fp16 (routed MoE, MoE adapter,
    grouped forward auto/one-pass/split and backward saved/recomputed; fp32 routed MoE also without
    selection), fp32 activations with bf16 weights (grouped, as under autocast), and in bf16 each
    routing mode (single group, segments, permuted rows), no base, inference (nothing saved), grouped
    bottlenecks that are not all multiples of 16 (24/96/192: the kernels without their alignment hints),
    weight-dtype split partials, identity routing without skip gates (routed MoE), no mixture output
    (MoE adapter), and the patch embedding with uint8/fp32/bf16 volumes and fp32/bf16/fp16 weights;
  * kernels without autotuning, their one config in bf16, fp32 and fp16: the gated specialist (expert
    and channel gate), the token-skip merge and selection (197 tokens, all kept, 1,000, 2,048);
  * other widths (:data:`WIDTHS`: ViT-S/L/H, D = 384, 1024, 1280; ViT-H with 257 tokens), every kernel's
    first config in bf16, fp32 and fp16, and the MoE kernels with r = 200 at D = 1024; an odd width
    (:data:`ODD_WIDTH` = 200, not a multiple of 16) in bf16 (``--all-dtypes``: fp32 and fp16 too).
    At widths divisible by 16 nearly all of these are the very compiles of D = 768 (D is a runtime
    argument and no tile spans a whole row): ~33 compiles and ~60 s of CPU more in all.
    ``--widths 1024,1280`` picks the widths (``none``: the benchmark shapes only); ``--table`` prints the
    first configs at each width; the summary counts them per width.
A non-first config over the shared-memory limit is not an error: the autotuner skips it (it catches
OutOfResources while timing configs).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # before triton and the kernels are imported
os.environ["MOSAIC_FAST_AUTOTUNE"] = "1"  # every config in the autotuning lists

import torch
import triton
from sm90_resources import HOPPER_SHARED_BYTES, resource_usage  # (tests/, the script's folder)
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.errors import OutOfResources, PTXASError
from triton.runtime.jit import JITFunction, KernelInterface

from mosaic_fast.kernels import (
    gated_specialist,
    grouped_adapter,
    moe_adapter,
    moe_routed,
    patch_embed3d,
    token_skip,
)

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
#: Errors the autotuner catches while timing a config (it then skips that config).
SKIPPABLE = (OutOfResources, CompileTimeAssertionFailure, PTXASError)
#: Streaming multiprocessors of an H200 (the grouped weight-gradient split depends on it).
H200_SMS = 132

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
I32, I64, U8 = torch.int32, torch.int64, torch.uint8
DTYPE_NAMES = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}

# Benchmark shapes (ViT-B/16); the MoE gates have gate_dim = D (the default).
B, N, D = 32, 197, 768
T = B * N
BOTTLENECKS = [64, 96, 192]
#: Grouped bottlenecks that are not all multiples of 16: the kernels compile without their alignment hints
#: (R_ALIGNED False; the first configs in bf16).
UNALIGNED_BOTTLENECKS = [24, 96, 192]
EXPERTS, R, TOPK = 4, 64, 2
#: Other ViT widths -> tokens per sample at 224² (ViT-S/16 and ViT-L/16: 197, ViT-H/14: 257), compiled at the
#: first config in bf16, fp32 (IEEE dots) and fp16. The kernels loop over D in BK/BN chunks (no tile holds
#: a whole row) and D is a runtime argument, so at a width divisible by 16 a kernel compiles exactly as at
#: 768 (the same compile, listed once with all its cases); the MoE adapter's larger bottleneck and ViT-H's
#: 257 tokens change tiles (BLOCK_R, the selection's BLOCK_N) and are compiled anew.
WIDTHS = {384: 197, 1024: 197, 1280: 257}
#: A width that is not a multiple of 16 (odd configurations): unaligned rows, the EVEN_D = False branches.
#: First config in bf16 by default; ``--all-dtypes`` adds fp32 and fp16 (about a minute more of CPU).
ODD_WIDTH = 200
#: A MoE bottleneck above the benchmark's 64 (the MoE adapter kernels' BLOCK_R 256), compiled with ViT-L.
WIDE_R = 200


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------------------------------------------
# Recording launches
# ----------------------------------------------------------------------------------------------------

_LAUNCHES: list[tuple[KernelInterface, tuple, dict]] = []


@contextmanager
def _recording():
    """``kernel[grid](*args, **kwargs)`` records the launch instead of running it, for every JIT function,
    autotuner and heuristics object (they inherit ``__getitem__`` from KernelInterface)."""
    launch = KernelInterface.__getitem__

    def record(kernel, grid):
        return lambda *args, **kwargs: _LAUNCHES.append((kernel, args, kwargs))

    KernelInterface.__getitem__ = record
    try:
        yield
    finally:
        KernelInterface.__getitem__ = launch


@contextmanager
def _patched(patches: dict):
    """Set ``(module, attribute): value`` for the duration of the block."""
    saved = {key: getattr(*key) for key in patches}
    try:
        for (module, name), value in patches.items():
            setattr(module, name, value)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


@dataclass
class Job:
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    info: dict = field(default_factory=dict)


def _specialize(fn: JITFunction, bound: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) exactly as ``JITFunction.run`` derives them from the arguments."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, spec = native_specialize_impl(
            BACKEND, value, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        elif isinstance(spec, str):
            attrs[(i,)] = BACKEND.parse_attr(spec)
    return signature, constexprs, attrs


def _expand(kernel: KernelInterface, args: tuple, kwargs: dict, first_only: bool) -> list[Job]:
    """The compiles one launch triggers: one per autotuning config (after pruning), heuristics applied."""
    configs, prune, heuristics = [None], None, []
    obj = kernel
    while not isinstance(obj, JITFunction):
        if isinstance(obj, Autotuner):
            configs, prune = obj.configs, obj.early_config_prune
        elif isinstance(obj, Heuristics):
            heuristics.append(obj.values)
        else:
            raise TypeError(f"unexpected kernel wrapper {type(obj).__name__}")
        obj = obj.fn
    fn = obj
    names = set(fn.arg_names)
    nargs = dict(zip(fn.arg_names, args))
    if prune is not None:
        configs = prune(configs, nargs, **kwargs)
    jobs = []
    for index, config in enumerate(configs[:1] if first_only else configs):
        call = {**kwargs, **(config.all_kwargs() if config is not None else {})}
        for values in heuristics:  # outermost first, as they run (after the autotuner's config)
            for name, rule in values.items():
                call[name] = rule({**nargs, **call})
        bound = {**nargs, **{k: v for k, v in call.items() if k in names}}
        options = {k: v for k, v in call.items() if k not in names}
        missing = [name for name in fn.arg_names if name not in bound]
        if missing:
            raise TypeError(f"{fn.__name__}: launch without {missing}")
        signature, constexprs, attrs = _specialize(fn, bound)
        info = {
            "module": fn.__module__.rsplit(".", 1)[-1],
            "kernel": fn.__name__,
            "config": index,
            "configs": len(configs),
            "first": index == 0,
            "constexprs": {fn.arg_names[k[0]]: str(v) for k, v in constexprs.items()},
            **{k: v for k, v in options.items() if k in ("num_warps", "num_stages")},
        }
        jobs.append(Job(fn, signature, constexprs, attrs, options, info))
    return jobs


# ----------------------------------------------------------------------------------------------------
# Launcher calls (meta tensors at the benchmark shapes)
# ----------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    dtype: str
    call: Callable[[], None]
    all_configs: bool = False
    patches: dict = field(default_factory=dict)
    width: int = D


def _grouped_weights(dtype, d=D, rs=BOTTLENECKS):
    g, r_tot = len(rs), sum(rs)
    shapes = ((g, d), (g, d), (r_tot, d), (r_tot,), (d, r_tot), (g, d))
    return [meta(*s, dtype=dtype) for s in shapes]


def _grouped_routing(routing: str, rows: int):
    """(h rows, ids, seg_len) for "single" (no ids), "seg" (one id per sample) or "perm" (one per row)."""
    if routing == "single":
        return rows, None, 0
    if routing == "seg":
        return rows, meta(B, dtype=I64), rows // B
    return rows, meta(rows, dtype=I64), 1  # per-row routing: more segments than SEG_MAX


def grouped_forward(act, wdt=None, routing="seg", base=True, save=True, rows=T, d=D, rs=BOTTLENECKS):
    wdt = wdt or act
    t, ids, seg_len = _grouped_routing(routing, rows)
    h = meta(t, d, dtype=act)
    grouped_adapter.forward(
        h, meta(t, d, dtype=act) if base else None, ids, seg_len, *_grouped_weights(wdt, d, rs), rs, 0.1, 1e-5, save,
    )  # fmt: skip


def grouped_backward(act, wdt=None, routing="seg", saved_a=True, need_dh=True, rows=T, d=D, rs=BOTTLENECKS):
    wdt = wdt or act
    t, ids, seg_len = _grouped_routing(routing, rows)
    a = meta(t if saved_a else 0, max(rs), dtype=wdt)
    grouped_adapter.backward(
        meta(t, d, dtype=act), meta(t, d, dtype=act), ids, seg_len, *_grouped_weights(wdt, d, rs), rs,
        meta(t, dtype=FP32), meta(t, dtype=FP32), a, 0.1, 1e-5, need_dh, True,
    )  # fmt: skip


def moe_adapter_update(dtype, store_mix=True, d=D, r=R):
    t = T // 2  # rows selected per stream (ρ = 0.5)
    x_gen, x_med = meta(T, d, dtype=dtype), meta(T, d, dtype=dtype)
    rows, eidx = meta(t, dtype=I64), meta(t, TOPK, dtype=I64)
    w_down, b_down = meta(EXPERTS, r, 2 * d, dtype=dtype), meta(EXPERTS, r, dtype=dtype)
    w_up, b_up = meta(EXPERTS, d, r, dtype=dtype), meta(EXPERTS, d, dtype=dtype)
    hidden = moe_adapter.moe_down(x_gen, x_med, torch.cat([rows, rows]), torch.cat([eidx, eidx]), w_down, b_down)
    moe_adapter.moe_combine(
        x_gen, x_gen, rows, eidx, meta(t, TOPK, dtype=dtype), hidden[: t * TOPK], w_up, b_up,
        meta(t, d, dtype=dtype), meta(t, d, dtype=dtype) if store_mix else None,
    )  # fmt: skip


def moe_routed_update(dtype, identity=False, d=D, n=N, r=R):
    kept = (n + 1) // 2
    x_gen, x_med = meta(B, n, d, dtype=dtype), meta(B, n, d, dtype=dtype)
    idx = None if identity else meta(B, kept, dtype=I64)
    skip = None if identity else meta(B, kept, dtype=dtype)
    router = (meta(EXPERTS, d, dtype=dtype), meta(EXPERTS, dtype=dtype))
    gate = (meta(d, d, dtype=dtype), meta(d, dtype=dtype))  # gate_dim = D (the default)
    moe_routed.moe_routed_update(
        x_gen, x_med, x_gen, x_med, idx, skip, idx, skip, router, router, gate, gate,
        meta(EXPERTS, r, 2 * d, dtype=dtype), meta(EXPERTS, r, dtype=dtype), meta(EXPERTS, d, r, dtype=dtype),
        meta(EXPERTS, d, dtype=dtype), TOPK,
    )  # fmt: skip


def skip_select(dtype, tokens=N, kept=(N + 1) // 2, d=D):
    f = d // 4
    token_skip.skip_select(meta(B, tokens, f, dtype=dtype), meta(1, f, dtype=dtype), meta(1, dtype=dtype), kept)


def skip_merge(dtype, d=D):
    t = T // 2
    x = meta(T, d, dtype=dtype)
    token_skip.skip_merge(x, x, meta(t, dtype=I64), meta(t, d, dtype=dtype), meta(t, d, dtype=dtype))


def gated_specialist_forward(dtype, channel=False, d=D):
    r_tot = EXPERTS * R
    hidden = gated_specialist.gs_down(
        meta(T, d, dtype=dtype), meta(r_tot, d, dtype=dtype), meta(r_tot, dtype=dtype), meta(r_tot, dtype=I32),
        meta(T, EXPERTS, dtype=dtype), 1e-5,
    )  # fmt: skip
    gated_specialist.gs_up(
        hidden, meta(d, r_tot, dtype=dtype), meta(EXPERTS, d, dtype=dtype), meta(T, EXPERTS, dtype=dtype),
        meta(T, d, dtype=dtype) if channel else None,
    )  # fmt: skip


def patch_embed(x_dtype, w_dtype, bias=True, size=64, patch=8, batch=32, d=D):
    x = meta(batch, 1, size, size, size, dtype=x_dtype)
    weight = meta(d, 1, patch, patch, patch, dtype=w_dtype)
    b = meta(d, dtype=w_dtype) if bias else None
    patch_embed3d.patch_embed3d_fwd(x, weight, b, (patch, patch, patch), 1 / 255, 0.0)


def _width_cases(d: int, n: int, dtypes, variant: dict, h200: dict) -> list[Case]:
    """First configs of every kernel at width ``d`` with ``n`` tokens per sample."""
    cases = []
    for dtype in dtypes:
        name = DTYPE_NAMES[dtype] + ("/ieee" if dtype == FP32 else "")
        at = f" (D = {d})"
        cases += [
            Case("grouped forward (auto), training" + at, name, lambda t=dtype: grouped_forward(t, d=d),
                 patches=variant["auto"], width=d),
            Case("grouped forward, one-pass variant" + at, name, lambda t=dtype: grouped_forward(t, d=d),
                 patches=variant["onepass"], width=d),
            Case("grouped forward, split variant" + at, name, lambda t=dtype: grouped_forward(t, d=d),
                 patches=variant["split"], width=d),
            Case("grouped backward, pre-activation saved" + at, name, lambda t=dtype: grouped_backward(t, d=d),
                 patches=h200, width=d),
            Case("grouped backward, pre-activation recomputed" + at, name,
                 lambda t=dtype: grouped_backward(t, saved_a=False, d=d), patches=h200, width=d),
            Case("routed MoE, kept tokens, skip gates" + at, name, lambda t=dtype: moe_routed_update(t, d=d, n=n),
                 width=d),
            Case("MoE adapter (training), mixture saved" + at, name, lambda t=dtype: moe_adapter_update(t, d=d),
                 width=d),
            Case("gated specialist, expert gate" + at, name, lambda t=dtype: gated_specialist_forward(t, d=d),
                 width=d),
            Case("gated specialist, channel gate" + at, name,
                 lambda t=dtype: gated_specialist_forward(t, channel=True, d=d), width=d),
            Case("token-skip merge" + at, name, lambda t=dtype: skip_merge(t, d=d), width=d),
            Case(f"token-skip selection, {n} tokens" + at, name, lambda t=dtype: skip_select(t, n, (n + 1) // 2, d=d),
                 width=d),
            Case("patch embed, uint8 volume" + at, "u8/" + DTYPE_NAMES[dtype],
                 lambda t=dtype: patch_embed(U8, t, d=d), width=d),
        ]  # fmt: skip
        if d == 1024:
            at = f" (D = {d}, r = {WIDE_R})"
            cases += [
                Case("routed MoE, kept tokens, skip gates" + at, name,
                     lambda t=dtype: moe_routed_update(t, d=d, n=n, r=WIDE_R), width=d),
                Case("MoE adapter (training), mixture saved" + at, name,
                     lambda t=dtype: moe_adapter_update(t, d=d, r=WIDE_R), width=d),
            ]  # fmt: skip
    return cases


def _cases(widths: dict[int, int] | None = None, odd_dtypes=(BF16,)) -> list[Case]:
    """The benchmark-shape cases, then the first configs at ``widths`` (default :data:`WIDTHS` and
    :data:`ODD_WIDTH` in ``odd_dtypes``; ``{}``: none)."""
    ga = grouped_adapter
    h200 = {(ga, "_num_sms"): lambda device: H200_SMS}
    variant = {name: {(ga, "FORWARD_VARIANT"): name, **h200} for name in ga.FORWARD_VARIANTS}
    cases = [
        # every config: not yet run on a GPU, backward kernels, training MoE kernels
        Case("routed MoE, kept tokens, skip gates", "bf16", lambda: moe_routed_update(BF16), True),
        Case("grouped forward (auto: two-pass + one-pass), training", "bf16", lambda: grouped_forward(BF16), True,
             variant["auto"]),
        Case("grouped forward, split variant (training)", "bf16", lambda: grouped_forward(BF16), True,
             variant["split"]),
        Case("grouped backward, pre-activation saved", "bf16", lambda: grouped_backward(BF16), True, h200),
        Case("grouped backward, pre-activation recomputed", "bf16", lambda: grouped_backward(BF16, saved_a=False),
             True, h200),
        Case("MoE adapter (training), mixture saved", "bf16", lambda: moe_adapter_update(BF16), True),
        # first config
        Case("routed MoE, identity (rho = 1)", "bf16", lambda: moe_routed_update(BF16, identity=True)),
        Case("MoE adapter, no mixture output", "bf16", lambda: moe_adapter_update(BF16, store_mix=False)),
        Case("grouped forward, one-pass variant", "bf16", lambda: grouped_forward(BF16), patches=variant["onepass"]),
        Case("grouped forward, inference (no save)", "bf16", lambda: grouped_forward(BF16, save=False),
             patches=variant["auto"]),
        Case("grouped forward, single group, no base", "bf16",
             lambda: grouped_forward(BF16, routing="single", base=False), patches=variant["auto"]),
        Case("grouped forward, permuted routing", "bf16", lambda: grouped_forward(BF16, routing="perm"),
             patches=variant["auto"]),
        Case("grouped backward, single group, no dh", "bf16",
             lambda: grouped_backward(BF16, routing="single", need_dh=False), patches=h200),
        Case("grouped backward, permuted routing", "bf16", lambda: grouped_backward(BF16, routing="perm"),
             patches=h200),
        Case("grouped backward, split 1 (weight-dtype partials)", "bf16", lambda: grouped_backward(BF16, rows=512),
             patches=h200),
        Case("patch embed, uint8 volume", "u8/bf16", lambda: patch_embed(U8, BF16), True),
        Case("patch embed, uint8 volume", "u8/fp32", lambda: patch_embed(U8, FP32)),
        Case("patch embed, uint8 volume, no bias", "u8/fp16", lambda: patch_embed(U8, FP16, bias=False)),
        Case("patch embed, float volume", "fp32/fp32", lambda: patch_embed(FP32, FP32)),
        Case("patch embed, float volume", "bf16/bf16", lambda: patch_embed(BF16, BF16)),
        Case("grouped forward, autocast", "fp32 act/bf16 w", lambda: grouped_forward(FP32, BF16),
             patches=variant["auto"]),
        Case("grouped backward, autocast", "fp32 act/bf16 w", lambda: grouped_backward(FP32, BF16), patches=h200),
        Case("grouped forward, unaligned bottlenecks", "bf16", lambda: grouped_forward(BF16, rs=UNALIGNED_BOTTLENECKS),
             patches=variant["auto"]),
        Case("grouped forward, split variant, unaligned bottlenecks", "bf16",
             lambda: grouped_forward(BF16, rs=UNALIGNED_BOTTLENECKS), patches=variant["split"]),
        Case("grouped backward, unaligned bottlenecks", "bf16",
             lambda: grouped_backward(BF16, rs=UNALIGNED_BOTTLENECKS), patches=h200),
        Case("grouped backward, pre-activation recomputed, unaligned bottlenecks", "bf16",
             lambda: grouped_backward(BF16, saved_a=False, rs=UNALIGNED_BOTTLENECKS), patches=h200),
    ]  # fmt: skip
    cases.append(Case("routed MoE, identity (rho = 1)", "fp32/ieee", lambda: moe_routed_update(FP32, identity=True)))
    for dtype in (FP32, FP16):
        name = DTYPE_NAMES[dtype] + ("/ieee" if dtype == FP32 else "")
        cases += [
            Case("routed MoE, kept tokens, skip gates", name, lambda d=dtype: moe_routed_update(d)),
            Case("MoE adapter (training), mixture saved", name, lambda d=dtype: moe_adapter_update(d)),
            Case("grouped forward (auto), training", name, lambda d=dtype: grouped_forward(d), patches=variant["auto"]),
            Case("grouped forward, one-pass variant", name, lambda d=dtype: grouped_forward(d),
                 patches=variant["onepass"]),
            Case("grouped forward, split variant", name, lambda d=dtype: grouped_forward(d), patches=variant["split"]),
            Case("grouped backward, pre-activation saved", name, lambda d=dtype: grouped_backward(d), patches=h200),
            Case("grouped backward, pre-activation recomputed", name,
                 lambda d=dtype: grouped_backward(d, saved_a=False), patches=h200),
        ]  # fmt: skip
    for dtype in (BF16, FP32, FP16):
        name = DTYPE_NAMES[dtype]
        cases += [
            Case("gated specialist, expert gate", name, lambda d=dtype: gated_specialist_forward(d)),
            Case("gated specialist, channel gate", name, lambda d=dtype: gated_specialist_forward(d, channel=True)),
            Case("token-skip merge", name, lambda d=dtype: skip_merge(d)),
            Case("token-skip selection, 197 tokens", name, lambda d=dtype: skip_select(d)),
            Case("token-skip selection, all 197 tokens kept", name, lambda d=dtype: skip_select(d, kept=N)),
            Case("token-skip selection, 1,000 tokens", name, lambda d=dtype: skip_select(d, 1000, 500)),
            Case("token-skip selection, 2,048 tokens", name, lambda d=dtype: skip_select(d, 2048, 1024)),
        ]
    if widths is None:
        widths = {**WIDTHS, ODD_WIDTH: N}
    for d, n in widths.items():
        dtypes = (BF16, FP32, FP16) if d % 16 == 0 else odd_dtypes
        cases += _width_cases(d, n, dtypes, variant, h200)
    return cases


def build_jobs(widths: dict[int, int] | None = None, odd_dtypes=(BF16,)) -> list[Job]:
    """Every compile of every case, each distinct compile once (the cases that need it listed in it, and in
    ``first_widths`` the widths at which it is a first config)."""
    jobs: dict[str, Job] = {}
    for case in _cases(widths, odd_dtypes):
        _LAUNCHES.clear()
        with _patched(case.patches), _recording():
            case.call()
        if not _LAUNCHES:
            raise RuntimeError(f"case {case.name!r} launched nothing")
        for kernel, args, kwargs in _LAUNCHES:
            for job in _expand(kernel, args, kwargs, first_only=not case.all_configs):
                key = repr((id(job.fn), job.signature, job.constexprs, job.attrs, sorted(job.options.items())))
                first_at = [case.width] if job.info["first"] else []
                if key in jobs:
                    seen = jobs[key].info
                    seen["first"] = seen["first"] or job.info["first"]
                    if case.name not in seen["cases"]:
                        seen["cases"].append(case.name)
                    seen["first_widths"] = sorted(set(seen["first_widths"] + first_at))
                    continue
                job.info = {**job.info, "dtype": case.dtype, "cases": [case.name], "first_widths": first_at}
                jobs[key] = job
    return list(jobs.values())


# ----------------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------------

JOBS: list[Job] = []


def compile_job(index: int) -> dict:
    job = JOBS[index]
    entry = dict(job.info)
    start = time.perf_counter()
    try:
        src = ASTSource(job.fn, job.signature, job.constexprs, job.attrs)
        compiled = triton.compile(src, target=TARGET, options=job.options)
        entry["shared"] = compiled.metadata.shared
        entry["num_warps"] = compiled.metadata.num_warps
        entry.update(resource_usage(compiled.asm["cubin"], entry["shared"], entry["num_warps"]))
    except Exception as exc:  # reported; the test fails on it unless the autotuner would skip the config
        entry["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
        entry["skippable"] = isinstance(exc, SKIPPABLE)
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def _parse_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default=None,
                        help="comma-separated widths D (tokens N: 257 for 1280, else 197) compiled at their first "
                             f"configs besides the benchmark shapes; 'none' for none (default: {sorted(WIDTHS)} "
                             f"and {ODD_WIDTH})")
    parser.add_argument("--all-dtypes", action="store_true",
                        help="widths that are not multiples of 16 in fp32 and fp16 too (default: bf16 only)")
    parser.add_argument("--table", action="store_true",
                        help="print the first configs at each width (kernel, dtype, shared memory) on stderr")
    args = parser.parse_args(argv)
    if args.widths is None:
        widths = None
    elif args.widths.strip().lower() == "none":
        widths = {}
    else:
        widths = {int(w): WIDTHS.get(int(w), N) for w in args.widths.split(",") if w.strip()}
    return widths, (BF16, FP32, FP16) if args.all_dtypes else (BF16,), args.table


def _spills(e: dict) -> bool:
    return bool(e.get("spill_stores") or e.get("spill_loads"))


def _width_summary(entries: list[dict]) -> dict:
    """Per width: the first-config compiles (at 768 the benchmark cases'), the largest shared memory among
    them, how many exceed the limit, how many spill registers, and errors."""
    out: dict[int, dict] = {}
    for e in entries:
        for w in e["first_widths"]:
            row = out.setdefault(w, {"first configs": 0, "max shared": 0, "over the limit": 0, "spill": 0, "errors": 0})
            row["first configs"] += 1
            row["max shared"] = max(row["max shared"], e.get("shared", 0))
            row["over the limit"] += e.get("shared", 0) > HOPPER_SHARED_BYTES
            row["spill"] += _spills(e)
            row["errors"] += "error" in e
    return dict(sorted(out.items()))


def _resource_summary(entries: list[dict]) -> dict:
    """The compiles that spill (kernel, dtype, config, warps, first case: spill stores/loads in bytes per
    thread), and per kernel and dtype the registers and resident warps per SM of its first configs (ranges
    over the cases and widths)."""
    spilling = [
        f"{e['module']}.{e['kernel']} {e['dtype']} config {e['config']}/{e['configs']}{' (first)' * e['first']} "
        f"{e['num_warps']} warps, {e['cases'][0]}: {e['spill_stores']}/{e['spill_loads']} B"
        for e in entries
        if _spills(e)
    ]
    first: dict[str, dict[str, list]] = {}
    for e in entries:
        if e["first"] and e.get("registers") is not None:
            row = first.setdefault(f"{e['module']}.{e['kernel']}", {}).setdefault(e["dtype"], [[], []])
            row[0].append(e["registers"])
            row[1].append(e["warps_per_sm"])

    def span(values: list[int]) -> str:
        return f"{min(values)}-{max(values)}" if min(values) != max(values) else str(values[0])

    return {
        "configs that spill": spilling,
        "first configs (registers, warps per SM)": {
            kernel: {dtype: f"{span(regs)} registers, {span(warps)} warps/SM" for dtype, (regs, warps) in rows.items()}
            for kernel, rows in sorted(first.items())
        },
    }


def main(argv: list[str] | None = None) -> int:
    import multiprocessing

    widths, odd_dtypes, table = _parse_args(sys.argv[1:] if argv is None else argv)
    # fp32 (IEEE dots) compiles take several times longer: start them first so both workers end together
    JOBS.extend(sorted(build_jobs(widths, odd_dtypes), key=lambda job: not job.info["dtype"].startswith("fp32/")))
    workers = int(os.environ.get("SM90_COMPILE_WORKERS", "2"))
    summary = {"compiles": len(JOBS), "errors": 0, "first configs over the limit": 0, "other configs over": 0}
    entries = []
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # workers inherit JOBS as built here
        results = pool.imap(compile_job, range(len(JOBS))) if workers > 1 else map(compile_job, range(len(JOBS)))
        for entry in results:
            print(json.dumps(entry), flush=True)
            entries.append(entry)
            summary["errors"] += "error" in entry
            if entry.get("shared", 0) > HOPPER_SHARED_BYTES:
                summary["first configs over the limit" if entry["first"] else "other configs over"] += 1
    summary["first configs per width"] = _width_summary(entries)
    summary.update(_resource_summary(entries))
    if table:
        for e in sorted(entries, key=lambda e: (e["module"], e["kernel"], e["dtype"])):
            for w in e["first_widths"]:
                if w != D:
                    print(f"D={w:<5} {e['module']}.{e['kernel']:<26} {e['dtype']:<10} "
                          f"{e.get('shared', e.get('error', '')[:60])}", file=sys.stderr)
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
