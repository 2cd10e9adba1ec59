"""Benchmark cases and their timing: one case = one workload run by several implementations.

A :class:`Case` says how to build inputs and which implementations ("reference", "fast", ...) to run
on them. :func:`time_case` times every implementation on the same rotating input sets in one process
(CUDA: ``triton.testing.do_bench`` medians; CPU: ``torch.utils.benchmark`` medians) and adds
``torch.compile`` of the reference when the case allows it. Before timing it checks that every
implementation computes what the reference computes (:func:`output_errors`), so a fast column can never
be the time of a wrong or skipped computation without the record saying so.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import mosaic_fast
from mosaic_fast.ops import cpu_gemm

#: Measured on an H100 (DESIGN.md §6); the "% of floor" column uses these unless the run measured its own
#: device's ceilings (:func:`measure_ceilings`, done by ``mosaic-fast bench`` on CUDA).
PEAK_BYTES_PER_S = 3.0e12
PEAK_FLOPS_BF16 = 7.9e14


@dataclass
class Case:
    """One benchmark workload.

    ``make_inputs(i)`` builds the i-th input set (fresh random data, never zeros); implementations take
    the unpacked input set. ``floor_bytes``/``floor_flops`` give the roofline floor of the workload;
    ``items_per_call`` (e.g. images per batch) adds a throughput (items/s) per implementation.
    """

    suite: str
    name: str
    params: dict[str, Any]
    make_inputs: Callable[[int], Sequence[Any]]
    impls: dict[str, Callable[..., Any]]
    compile_reference: bool = True
    floor_bytes: float | None = None
    floor_flops: float | None = None
    items_per_call: int | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


#: Input set used for the agreement check (not one of the timed sets, which in-place cases overwrite).
AGREEMENT_INPUT = 10_000


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def output_errors(case: Case, impls: dict[str, Callable[..., Any]]) -> dict[str, float]:
    """‖impl − reference‖ / ‖reference‖ (float64, all output tensors together) of every implementation on
    one freshly built input set per implementation (so in-place updates cannot leak between them); empty
    when the reference returns no tensors (e.g. a training step). NaN marks outputs of another structure
    or shape, or non-finite values."""
    if "reference" not in impls:
        return {}
    want = _tensors(impls["reference"](*case.make_inputs(AGREEMENT_INPUT)))
    if not want:
        return {}
    want64 = torch.cat([t.detach().double().flatten().cpu() for t in want])
    errors = {}
    for label, fn in impls.items():
        if label == "reference":
            continue
        got = _tensors(fn(*case.make_inputs(AGREEMENT_INPUT)))
        if [t.shape for t in got] != [t.shape for t in want]:
            errors[label] = float("nan")
            continue
        got64 = torch.cat([t.detach().double().flatten().cpu() for t in got])
        errors[label] = float((got64 - want64).norm() / want64.norm().clamp_min(1e-300))
    return errors


def rotating(fn: Callable[..., Any], input_sets: list[Sequence[Any]]) -> Callable[[], Any]:
    """A no-argument call of ``fn`` on the input sets in turn (so caches don't flatter)."""
    cycle = itertools.cycle(input_sets)
    return lambda: fn(*next(cycle))


def measure(fn: Callable[[], Any], device: torch.device, min_run_time: float = 0.5) -> float:
    """Median seconds of one call of ``fn`` (the caller warms it up first)."""
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) / 1e3
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """This GPU's copy bandwidth (bytes read + written per second) and bf16 GEMM rate, on random data."""
    n_copy = 256 * 2**20  # 1 GiB of fp32
    src = torch.randn(n_copy, device=device)
    copy_s = measure(lambda: torch.empty_like(src).copy_(src), device)
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_s = measure(lambda: a @ b, device)
    return {"bytes_per_s": 2 * 4 * n_copy / copy_s, "flops_bf16": 2.0 * n**3 / mm_s}


def floor_seconds(case: Case, ceilings: dict[str, float] | None = None) -> float | None:
    """Roofline floor: the larger of the memory time and the compute time."""
    bytes_per_s = ceilings["bytes_per_s"] if ceilings else PEAK_BYTES_PER_S
    flops = ceilings["flops_bf16"] if ceilings else PEAK_FLOPS_BF16
    times = []
    if case.floor_bytes:
        times.append(case.floor_bytes / bytes_per_s)
    if case.floor_flops:
        times.append(case.floor_flops / flops)
    return max(times) if times else None


def time_case(
    case: Case,
    device: torch.device,
    rotate: int = 3,
    with_compile: bool = True,
    min_run_time: float = 0.5,
    repeats: int = 3,
    ceilings: dict[str, float] | None = None,
    with_mkl: bool = False,
) -> dict[str, Any]:
    """Time every implementation of ``case``; returns a JSON-ready record with ratios to "reference".

    ``with_mkl`` (CPU): also the fast path with its fp32 GEMMs on MKL, as the reference's are ("fast+mkl"),
    to separate what the oneDNN GEMMs (:mod:`mosaic_fast.ops.cpu_gemm`) bring from the rest."""
    input_sets = [case.make_inputs(i) for i in range(rotate)]
    impls = dict(case.impls)
    if with_mkl and device.type == "cpu" and "fast" in impls and cpu_gemm.onednn_enabled():
        impls["fast+mkl"] = with_cpu_gemm("mkl", impls["fast"])
    if with_compile and case.compile_reference and "reference" in impls:
        # Every case compiles the same closure code: without a reset Dynamo would hit its recompile
        # limit after a few cases and silently run the later "compiled" columns eagerly.
        torch._dynamo.reset()
        impls["compiled"] = torch.compile(impls["reference"])
    record: dict[str, Any] = {"suite": case.suite, "name": case.name, "params": case.params, "times_s": {}}
    runners = {}
    for label, fn in impls.items():
        runner = rotating(fn, input_sets)
        try:
            for _ in range(2):  # warm-up: compilation, autotuning, allocator
                runner()
            runners[label] = runner
        except Exception as exc:  # torch.compile may fail on some setups: record, don't hide
            record.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"[:300]
    errors = output_errors(case, {label: impls[label] for label in runners})
    if errors:
        record["rel_error_vs_reference"] = errors
    # Round-robin repeats, median per implementation: drifting machine load hits all of them alike.
    samples: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(repeats):
        for label, runner in runners.items():
            samples[label].append(measure(runner, device, min_run_time))
    record["times_s"] = {label: statistics.median(v) for label, v in samples.items()}
    ref = record["times_s"].get("reference")
    record["speedup_vs_reference"] = {k: ref / v for k, v in record["times_s"].items() if ref and v}
    if case.items_per_call:
        record["items_per_s"] = {k: case.items_per_call / v for k, v in record["times_s"].items() if v}
    floor = floor_seconds(case, ceilings) if device.type == "cuda" else None
    if floor is not None:
        record["floor_s"] = floor
        record["pct_of_floor"] = {k: 100.0 * floor / v for k, v in record["times_s"].items()}
    if case.notes:
        record["notes"] = case.notes
    record.update(case.extra)
    return record


def with_cpu_gemm(library: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with the fast modules' fp32 CPU GEMMs on ``library`` ("mkl" or "onednn")."""

    def run(*args):
        with cpu_gemm.cpu_gemm_library(library):
            return fn(*args)

    return run


def on_triton_backend(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with backend "triton" (the fused kernel even for one specialist), then back to "auto"."""

    def run(*args):
        mosaic_fast.set_backend("triton")
        try:
            return fn(*args)
        finally:
            mosaic_fast.set_backend("auto")

    return run
