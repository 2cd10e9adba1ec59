"""Benchmark cases and their timing: one case = one workload run by several implementations.

A :class:`Case` says how to build inputs and which implementations ("reference", "fast", ...) to run
on them. :func:`time_case` times every implementation on the same rotating input sets in one process
(CUDA: ``triton.testing.do_bench`` medians; CPU: ``torch.utils.benchmark`` medians) and adds
``torch.compile`` of the reference when the case allows it. Before timing it checks that every
implementation computes what the reference computes (:func:`output_errors`), so a fast column can never
be the time of a wrong or skipped computation without the record saying so.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
from collections.abc import Callable, Iterator, Sequence
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
    ``mutates_inputs``: an implementation writes into its input tensors (an in-place fast path). Repeated
    calls would then run on inputs that drift (an in-place skip op converges its rows to a fixed point, its
    tokens onto two experts); :func:`time_case` instead puts every input set back from a pristine copy
    after each call, outside the timed region, for every implementation of the case alike.
    ``agreement_impls``: for implementations that carry state across calls (a training step updates its
    weights), a factory of fresh implementations from one common state for :func:`output_errors`; each
    returns the tensors one call computed (a training step: the gradients it leaves, after clipping).
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
    mutates_inputs: bool = False
    agreement_impls: Callable[[], dict[str, Callable[..., Any]]] | None = None


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
    when the reference returns no tensors. With ``case.agreement_impls`` the fresh implementations it
    builds are compared instead (those of ``impls``'s labels that it provides). NaN marks outputs of
    another structure or shape, or non-finite values."""
    if "reference" not in impls:
        return {}
    if case.agreement_impls is not None:
        fresh = case.agreement_impls()
        impls = {label: fresh[label] for label in impls if label in fresh}
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


class Rotating:
    """A no-argument call of ``fn`` on the input sets in turn (so caches don't flatter).

    With ``pristine`` (a copy of every input set), :meth:`restore` puts back each set used since the
    last restore: called between timed calls (never inside one) for implementations that write into
    their inputs, so every call sees the inputs it was built with. A set is restored right after its
    use, not right before its next one, so restoring does not warm the caches for the next call."""

    def __init__(self, fn: Callable[..., Any], input_sets: list[Sequence[Any]],
                 pristine: list[Sequence[Any]] | None = None) -> None:
        self.fn, self.input_sets, self.pristine = fn, input_sets, pristine
        self._order = itertools.cycle(range(len(input_sets)))
        self._used: list[int] = []

    def __call__(self) -> Any:
        """``fn`` on the next input set in turn (noted for :meth:`restore` when there are pristine copies)."""
        i = next(self._order)
        if self.pristine is not None:
            self._used.append(i)
        return self.fn(*self.input_sets[i])

    def restore(self) -> None:
        """Copy the pristine inputs back into every set used since the last restore (nothing without
        ``pristine``)."""
        if self.pristine is None:
            return
        with torch.no_grad():
            for i in dict.fromkeys(self._used):
                for t, p in zip(self.input_sets[i], self.pristine[i]):
                    if isinstance(t, torch.Tensor):
                        t.copy_(p)
        self._used.clear()


def pristine_copy(input_sets: list[Sequence[Any]]) -> list[list[Any]]:
    """A detached copy of every tensor of ``input_sets`` (other items as they are)."""
    return [[t.detach().clone() if isinstance(t, torch.Tensor) else t for t in s] for s in input_sets]


#: L2 flush between timed calls, as ``triton.testing.do_bench`` does (256 MB, larger than any L2).
_L2_FLUSH_BYTES = 256 * 10**6


def _cuda_median_with_setup(fn: Callable[[], Any], setup: Callable[[], Any], warmup_ms: float = 25,
                            rep_ms: float = 100) -> float:
    """``triton.testing.do_bench(fn, warmup_ms, rep_ms, return_mode="median")`` with ``setup()`` before
    every call, outside the timed region (do_bench has no per-call setup): the same estimate, warm-up,
    L2 flush before each call, CUDA events around each call, median; milliseconds."""
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def timed(n: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            setup()
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    setup()
    fn()
    torch.cuda.synchronize()
    estimate_ms = max(statistics.mean(timed(5)), 1e-6)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        setup()
        fn()
    return statistics.median(timed(max(1, int(rep_ms / estimate_ms))))


def measure(fn: Callable[[], Any], device: torch.device, min_run_time: float = 0.5,
            setup: Callable[[], Any] | None = None) -> float:
    """Median seconds of one call of ``fn`` (the caller warms it up first).

    ``setup`` (e.g. :meth:`Rotating.restore`) runs before every call, untimed: on CUDA in a do_bench-like
    loop (:func:`_cuda_median_with_setup`), on CPU by timing single calls with ``torch.utils.benchmark``
    (each sample also makes two untimed warm-up calls, so such cases take about three times as long)."""
    if device.type == "cuda":
        if setup is not None:
            return _cuda_median_with_setup(fn, setup) / 1e3
        import triton.testing

        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) / 1e3
    from torch.utils import benchmark

    if setup is None:
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return float(timer.blocked_autorange(min_run_time=min_run_time).median)
    timer = benchmark.Timer(stmt="fn()", setup="setup()", globals={"fn": fn, "setup": setup},
                            num_threads=torch.get_num_threads())
    samples: list[float] = []
    while len(samples) < 5 or sum(samples) < min_run_time:
        samples.append(float(timer.timeit(number=1).median))
    return statistics.median(samples)


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


def case_implementations(case: Case, device: torch.device, *, with_compile: bool = True,
                         with_mkl: bool = False) -> dict[str, Callable[..., Any]]:
    """The case's implementations plus the columns the runner derives from them: "compiled"
    (``torch.compile`` of the reference, where the case allows it) and, on CPU with ``with_mkl``,
    "fast+mkl" (the fast path with its fp32 GEMMs on MKL). Shared by the runner and pytest-benchmark."""
    impls = dict(case.impls)
    if with_mkl and device.type == "cpu" and "fast" in impls and cpu_gemm.onednn_enabled():
        impls["fast+mkl"] = with_cpu_gemm("mkl", impls["fast"])
    if with_compile and case.compile_reference and "reference" in impls:
        # Every case compiles the same closure code: without a reset Dynamo would hit its recompile
        # limit after a few cases and silently run the later "compiled" columns eagerly.
        torch._dynamo.reset()
        impls["compiled"] = torch.compile(impls["reference"])
    return impls


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
    pristine = pristine_copy(input_sets) if case.mutates_inputs else None
    impls = case_implementations(case, device, with_compile=with_compile, with_mkl=with_mkl)
    record: dict[str, Any] = {"suite": case.suite, "name": case.name, "params": case.params, "times_s": {}}
    runners: dict[str, Rotating] = {}
    for label, fn in impls.items():
        runner = Rotating(fn, input_sets, pristine)
        breaks: dict[str, int] = {}
        try:
            with counting_graph_breaks(breaks) if label == "compiled" else contextlib.nullcontext():
                for _ in range(2):  # warm-up: compilation, autotuning, allocator
                    runner()
                    runner.restore()
            runners[label] = runner
            if breaks:
                record["compiled_graph_breaks"] = breaks
        except Exception as exc:  # torch.compile may fail on some setups: record, don't hide
            runner.restore()
            record.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"[:300]
    errors = output_errors(case, {label: impls[label] for label in runners})
    if errors:
        record["rel_error_vs_reference"] = errors
    # Round-robin repeats, median per implementation: drifting machine load hits all of them alike.
    samples: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(repeats):
        for label, runner in runners.items():
            setup = runner.restore if case.mutates_inputs else None
            samples[label].append(measure(runner, device, min_run_time, setup))
            runner.restore()
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


def _not_scalar_capture_advice(record: logging.LogRecord) -> bool:
    """Logging filter: drops Dynamo's advice to capture ``.item()`` outputs, keeps every other message."""
    return "capture_scalar_outputs" not in record.getMessage()


@contextlib.contextmanager
def counting_graph_breaks(reasons: dict[str, int]) -> Iterator[None]:
    """Collects the Dynamo graph breaks of the block into ``reasons`` (first line of each reason -> count),
    for the record, and keeps Dynamo's console advice about them (capture ``.item()`` outputs) out of the
    bench's output. The reference's masked mixed routing reads ``mask.any()`` on the host, so its compiled
    column is several graphs; that is the reference as written, not a setting to change."""
    from torch._dynamo.utils import counters

    before = dict(counters["graph_break"])
    advice = logging.getLogger("torch._dynamo.variables.tensor")
    advice.addFilter(_not_scalar_capture_advice)
    try:
        yield
    finally:
        advice.removeFilter(_not_scalar_capture_advice)
        for reason, count in counters["graph_break"].items():
            if count > before.get(reason, 0):
                key = reason.strip().splitlines()[0][:160]
                reasons[key] = reasons.get(key, 0) + count - before.get(reason, 0)


def with_cpu_gemm(library: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with the fast modules' fp32 CPU GEMMs on ``library`` ("mkl" or "onednn")."""

    def run(*args):
        with cpu_gemm.cpu_gemm_library(library):
            return fn(*args)

    return run


def on_triton_backend(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with backend "triton" (the fused kernel even for one specialist), then back to the
    backend that was set (e.g. "torch" from MOSAIC_FAST_BACKEND, which the other columns keep)."""

    def run(*args):
        saved = mosaic_fast.get_backend()
        mosaic_fast.set_backend("triton")
        try:
            return fn(*args)
        finally:
            mosaic_fast.set_backend(saved)

    return run
