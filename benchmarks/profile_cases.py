"""Where the time of benchmark cases goes: torch.profiler tables per implementation, in one text file.

For each case of ``mosaic-fast bench`` whose name contains a ``--filter`` text, and each implementation
named in ``--impl`` that the case has, runs a few warm-up calls, then profiles ``--calls`` calls and
writes the profiler's table (sorted by device time on CUDA, CPU time otherwise) plus two numbers that
separate host cost from device cost: the number of kernel launches (CUDA) or operator calls (CPU) per
call, and the wall time per call. One file, so a lent GPU's few returned files are not used up.

    python benchmarks/profile_cases.py --device cuda --filter moe_skip_rho1 --filter mosaic_train_step_single \
        --out $OUT/profile.txt
    python benchmarks/profile_cases.py --device cpu --filter moe_skip_rho1 --out /tmp/profile.txt   # quick shapes
"""

from __future__ import annotations

import argparse
import time

import torch

from mosaic_fast.bench.core import pristine_copy
from mosaic_fast.bench.run import DTYPES, SUITES, bench_dtype, collect_cases, kept_by_filter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    p.add_argument("--filter", action="append", required=True, metavar="TEXT",
                   help="profile the cases whose name contains TEXT (repeatable)")
    p.add_argument("--impl", action="append", default=None, metavar="NAME",
                   help="implementations to profile (repeatable; default: reference, fast, kernel)")
    p.add_argument("--calls", type=int, default=3, help="profiled calls per implementation")
    p.add_argument("--rows", type=int, default=25, help="table rows per implementation")
    p.add_argument("--out", required=True, help="text file to write")
    return p.parse_args(argv)


def profile_impl(fn, inputs, device: torch.device, calls: int, rows: int, mutates_inputs: bool = False) -> str:
    """The profiler table of ``calls`` calls of ``fn(*inputs)`` and launches (or ops) and wall ms per call.

    ``mutates_inputs`` (an in-place implementation): every call gets its own copy of ``inputs``, made
    before profiling, so no call runs on what an earlier one wrote."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    copies = pristine_copy([inputs] * (3 + calls)) if mutates_inputs else [inputs] * (3 + calls)
    for args in copies[:3]:
        fn(*args)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for args in copies[3:]:
            fn(*args)
        sync()
    wall_ms = 1e3 * (time.perf_counter() - start) / calls
    events = prof.key_averages()
    if cuda:
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
        count = f"{launches / calls:.0f} kernel launches per call"
    else:
        count = f"{sum(e.count for e in events if e.key.startswith('aten::')) / calls:.0f} aten calls per call"
    sort_by = "cuda_time_total" if cuda else "self_cpu_time_total"
    return f"{count}, {wall_ms:.3f} ms wall per call (profiled)\n" + events.table(sort_by=sort_by, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = bench_dtype(device, args.dtype)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    impls = args.impl or ["reference", "fast", "kernel"]
    cases = [c for c in collect_cases(suites, device, dtype, quick=device.type == "cpu", with_compile=False)
             if kept_by_filter(c.name, args.filter)]
    if not cases:
        print(f"profile_cases: no case name contains any of {args.filter}")
        return 2
    for text in args.filter:
        if not any(text in c.name for c in cases):
            print(f"profile_cases: note: no case name contains {text!r}")
    parts = []
    for case in cases:
        inputs = case.make_inputs(0)
        for name in (n for n in impls if n in case.impls):
            try:
                text = profile_impl(case.impls[name], inputs, device, args.calls, args.rows, case.mutates_inputs)
            except Exception as exc:  # keep the other cases' tables
                text = f"failed: {type(exc).__name__}: {exc}"
            header = f"== {case.name} / {name} ({device}, {str(dtype).replace('torch.', '')})"
            print(f"{header}: {text.splitlines()[0]}")
            parts.append(f"{header}\n{text}\n")
    with open(args.out, "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
