"""``mosaic-fast bench`` (= ``python benchmarks/run.py``): every fast path against its reference.

Runs, in one process and on the same inputs, the reference (eager), ``torch.compile`` of the reference
and the fast path; prints one table per suite (median time, ratio to reference, % of the roofline floor
on CUDA) and optionally writes JSON (``--json``) and PNG charts (``--plot``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import inspect
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mosaic_fast.cliutil import ShortUsageParser

#: Case modules of each suite; each exposes ``cases(device, dtype, quick) -> list[Case]``.
SUITES = {
    "ops": ("cases_adapter", "cases_moe", "cases_patch_embed"),
    "model": ("cases_model", "cases_dynamer"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_name(text: str) -> str:
    """argparse type of --device: "cpu", "cuda" or "cuda:N" (a usage error otherwise, not a traceback)."""
    index = text[len("cuda:"):] if text.startswith("cuda:") else None
    if text not in ("cpu", "cuda") and not (index is not None and index.isdigit()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options of ``mosaic-fast bench`` (a bad option is a short usage error, see :class:`ShortUsageParser`)."""
    p = ShortUsageParser(prog="mosaic-fast bench", short_usage="mosaic-fast bench [ops|model|all] [options]",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", nargs="?", default="all", choices=[*SUITES, "all"],
                   help="which suite to run (default: all)")
    p.add_argument("--device", type=_device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="activation dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--json", dest="json_path", default=None, help="write every figure to this JSON file")
    p.add_argument("--plot", dest="plot_path", default=None, help="write speed-up and time-vs-ρ charts (PNG)")
    p.add_argument("--markdown", dest="markdown_path", default=None, help="write the tables as Markdown (README)")
    p.add_argument("--full", action="store_true", help="real (GPU) shapes even on CPU (slow)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA: also time the model inference cases, the MoE skip op and the training step under "
                        "CUDA-graph replay (mosaic_fast.graphs), as extra columns")
    p.add_argument("--cpu-gemm-mkl", action="store_true",
                   help="CPU: also time the fast path with MKL GEMMs, as the reference uses (column fast+mkl), "
                        "to separate the oneDNN GEMM speed-up from the rest")
    p.add_argument("--filter", action="append", default=None, metavar="TEXT",
                   help="only cases whose name contains TEXT (repeat for any of several)")
    p.add_argument("--list", action="store_true",
                   help="time nothing: print the cases (those --filter keeps) and the columns each would time")
    p.add_argument("--min-run-time", type=float, default=None, help="CPU seconds of timing per measurement")
    p.add_argument("--targets", action="store_true",
                   help="also check the results against the issues' performance targets (GPU or CPU ones)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 3 when an implementation failed or differs from the reference "
                        "beyond the dtype's tolerance (the table's '!' lines)")
    p.add_argument("--from-json", nargs="+", default=None, metavar="PATH",
                   help="time nothing: re-render results JSON file(s) (merged in order) as tables, "
                        "--markdown, --plot and --json")
    return p.parse_args(argv)


def bench_dtype(device: torch.device, name: str | None) -> torch.dtype:
    """The ``--dtype`` given, else the default: bfloat16 on CUDA, float32 on CPU."""
    if name:
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _read_results(path: str) -> dict:
    """One results file, or a ValueError naming it (missing, unreadable, not JSON, not a bench result)."""
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as err:
        raise ValueError(f"--from-json {path}: cannot read the file ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--from-json {path}: not valid JSON ({err})") from None
    if not (isinstance(results, dict) and isinstance(results.get("environment"), dict)
            and isinstance(results.get("records"), list)):
        raise ValueError(f"--from-json {path}: not a mosaic-fast bench results file "
                         f"(no 'environment' object and 'records' list; write one with --json)")
    return results


def load_results(paths: list[str]) -> dict:
    """Results of one or more JSON files (e.g. an ops and a model run on one GPU), records concatenated and
    tagged with their run (``"run"``: ratios between cases are only taken within one run); the environment
    is the first file's, and each run keeps its source in ``runs`` (file, date and that file's environment;
    the sources a merged file lists). A file that cannot be read as results raises ValueError naming it."""
    from mosaic_fast.bench.targets import split_runs

    merged: dict = {"environment": None, "records": [], "runs": []}
    for path in paths:
        results = _read_results(path)
        merged["environment"] = merged["environment"] or results["environment"]
        inner = results.get("runs") or []  # a merged file: where each of its runs came from
        for run in split_runs(results["records"]):
            tag = len(merged["runs"])
            merged["records"] += [{**record, "run": tag} for record in run]
            old_tag = run[0].get("run")
            source = {"file": os.path.basename(path), "date": results["environment"].get("date")}
            if isinstance(old_tag, int) and 0 <= old_tag < len(inner):
                source = inner[old_tag]
            merged["runs"].append({**source, "environment": source.get("environment", results["environment"])})
    return merged


def write_outputs(results: dict, args: argparse.Namespace) -> None:
    """--targets, --json, --markdown and --plot of ``results``."""
    if args.targets:
        from mosaic_fast.bench.targets import check_targets, format_targets

        print("\n== targets ==")
        print(format_targets(check_targets(results)))
    if args.json_path:
        write_json(results, args.json_path)
        print(f"\nwrote {args.json_path}")
    if args.markdown_path:
        with open(args.markdown_path, "w") as f:
            f.write(markdown_table(results))
        print(f"wrote {args.markdown_path}")
    if args.plot_path:
        from mosaic_fast.bench.plot import plot_results

        plot_results(results, args.plot_path)
        print(f"wrote {args.plot_path}")


def collect_cases(suites: list[str], device: torch.device, dtype: torch.dtype, quick: bool,
                  graphs: bool = False, with_compile: bool = True, failures: list[dict] | None = None) -> list:
    """Every case of ``suites``; a module whose cases cannot be built is reported and left out (and, with
    ``failures``, appended there as a record with an error, so the JSON and ``--strict`` see it).
    ``graphs`` (CUDA-graph variants of inference cases) and ``with_compile`` (cases that build their own
    compiled implementation) go to the modules whose ``cases`` take them."""
    cases = []
    options = {"graphs": graphs, "with_compile": with_compile}
    for suite in suites:
        for module_name in SUITES[suite]:
            module = importlib.import_module(f"mosaic_fast.bench.{module_name}")
            accepted = inspect.signature(module.cases).parameters
            extra = {k: v for k, v in options.items() if k in accepted}
            try:
                cases += module.cases(device, dtype, quick, **extra)
            except Exception as exc:  # report and go on: one broken module must not lose the others
                message = f"{type(exc).__name__}: {exc}"
                print(f"mosaic-fast bench: building the {module_name} cases failed: {message}", file=sys.stderr)
                if failures is not None:
                    failures.append({"suite": suite, "name": f"{module_name} (building the cases)", "params": {},
                                     "times_s": {}, "speedup_vs_reference": {}, "errors": {"cases": message[:300]}})
    return cases


#: Largest relative output difference to the reference that a benchmarked implementation may show before
#: the table flags it: DESIGN.md §5's bf16/fp16 tolerances, and 1e-3 for fp32, where one ReLU unit whose
#: pre-activation rounds to the other side of zero in one of two fp32 computations moves a gradient by
#: ~5e-4 (seen: the fp32 reference's dh 5.8e-4 from float64's, the fast one's 4e-7, B = 8 single adapter).
AGREEMENT_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 5e-3}


def disagreements(record: dict, dtype: str) -> list[str]:
    """Warnings for the implementations of ``record`` whose output differs from the reference's by more
    than :data:`AGREEMENT_TOLERANCE` (or could not be compared)."""
    tol = AGREEMENT_TOLERANCE.get(dtype.removeprefix("torch."), AGREEMENT_TOLERANCE["float32"])
    return [f"    ! {label} differs from the reference: relative error {err:.1e} (tolerance {tol:g})"
            for label, err in record.get("rel_error_vs_reference", {}).items() if not err <= tol]


def worst_error(record: dict) -> float | None:
    """The largest relative output difference to the reference among the record's implementations (NaN
    if one could not be compared; None when the case returns no outputs to compare)."""
    errs = list(record.get("rel_error_vs_reference", {}).values())
    if not errs:
        return None
    return float("nan") if any(e != e for e in errs) else max(errs)


def _extra_lines(record: dict) -> list[str]:
    """Indented lines under a case's row: throughput (items/s), a training step's peak memory and the
    compiled reference's graph breaks."""
    lines = []
    rate = record.get("items_per_s") or {}
    if rate:
        lines.append("    items/s: " + " · ".join(f"{k} {v:,.0f}" for k, v in rate.items()))
    memory = {k: v for k, v in (record.get("peak_memory_bytes") or {}).items() if isinstance(v, int)}
    if memory:
        ref = memory.get("reference")
        lines.append("    peak memory: " + " · ".join(
            f"{k} {v / 1e9:.2f} GB" + (f" ({v / ref:.2f}×)" if ref and k != "reference" else "")
            for k, v in memory.items()))
    for reason, count in (record.get("compiled_graph_breaks") or {}).items():
        lines.append(f"    compiled: {count} graph break{'s' if count > 1 else ''}: {reason}")
    return lines


def format_table(records: list[dict], device: torch.device, dtype: str = "float32") -> str:
    """A fixed-width table: one row per case, median ms per implementation, ratios to reference and the
    largest relative output difference of any implementation to the reference ("err")."""
    labels = []
    for r in records:
        labels += [k for k in r["times_s"] if k not in labels]
    time_w = {lab: max(14, len(lab) + 5) for lab in labels}  # (long labels keep a gap to the column before)
    ratio_w = {lab: max(11, len(lab) + 4) for lab in labels}
    head = f"{'case':<44}" + "".join(f"{lab + ' ms':>{time_w[lab]}}" for lab in labels)
    head += "".join(f"{'x ' + lab:>{ratio_w[lab]}}" for lab in labels if lab != "reference")
    if device.type == "cuda":
        head += f"{'fast %floor':>12}"
    head += f"{'err':>9}"
    lines = [head, "-" * len(head)]
    for r in records:
        row = f"{r['name'][:44]:<44}"
        row += "".join(f"{1e3 * r['times_s'][lab]:>{time_w[lab]}.3f}" if lab in r["times_s"]
                       else f"{'-':>{time_w[lab]}}" for lab in labels)
        row += "".join(f"{r['speedup_vs_reference'][lab]:>{ratio_w[lab]}.2f}" if lab in r["speedup_vs_reference"]
                       else f"{'-':>{ratio_w[lab]}}" for lab in labels if lab != "reference")
        if device.type == "cuda":
            pct = r.get("pct_of_floor", {}).get("fast")
            row += f"{pct:>11.1f}%" if pct is not None else f"{'-':>12}"
        worst = worst_error(r)
        row += f"{worst:>9.1e}" if worst is not None else f"{'-':>9}"
        lines.append(row)
        lines += _extra_lines(r)
        for label, err in r.get("errors", {}).items():
            lines.append(f"    ! {label} failed: {err}")
        lines += disagreements(r, dtype)
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    """The results as Markdown for README.md: one table per run (a merged file holds several, each with
    its own columns, date and source file), each under its environment line."""
    from mosaic_fast.bench.targets import split_runs

    runs = split_runs(results["records"])
    tables = []
    for records in runs:
        source = run_source(results, records[0]) if len(runs) > 1 else None
        env = run_environment(results, records[0])
        on_cpu = env.get("bench_device") == "cpu" and "cpu" in env  # (runs before the field lack it)
        device = f"{env['device']}, {env['cpu']}" if on_cpu else env["device"]
        line = f"{device}, {env['dtype']}, torch {env['torch']}, triton {env['triton']}, "
        if str(env.get("source", "")).startswith("git "):  # the code measured (runs since it was recorded)
            line += f"{env['source']}, "
        line += f"{source['date']} ({source['file']})" if source else str(env["date"])
        tables.append(_markdown_run(line, records))
    return "\n".join(tables)


def run_environment(results: dict, record: dict) -> dict:
    """The environment (machine, dtype, versions) of ``record``'s run: its own in merged results."""
    return (run_source(results, record) or {}).get("environment", results["environment"])


def run_source(results: dict, record: dict) -> dict | None:
    """The ``runs`` entry of ``record``'s run (file, date, environment) in merged results, else None."""
    sources = results.get("runs") or []
    tag = record.get("run")
    return sources[tag] if isinstance(tag, int) and 0 <= tag < len(sources) else None


def _markdown_run(env_line: str, records: list[dict]) -> str:
    """One run's records as a Markdown table under ``env_line``, with only the columns the run has."""
    labels = [lab for lab in ("reference", "compiled", "fast") if any(lab in r["times_s"] for r in records)]
    labels += list(dict.fromkeys(lab for r in records for lab in r["times_s"] if lab not in labels))
    ratio_labels = [lab for lab in ("fast", "compiled") if lab in labels]
    ratio_labels += [lab for lab in labels if lab not in ("reference", "compiled", "fast")]
    cuda = any("pct_of_floor" in r for r in records)
    memory = any(isinstance(r.get("peak_memory_bytes", {}).get("fast"), int) for r in records)
    throughput = any("items_per_s" in r for r in records)
    agreement = any("rel_error_vs_reference" in r for r in records)
    lines = [
        env_line,
        "",
        "| case | " + " | ".join([f"{lab} ms" for lab in labels] + [f"{lab} × ref" for lab in ratio_labels]) + " |"
        + (" fast % of floor |" if cuda else "") + (" peak GB ref / fast |" if memory else "")
        + (" images/s ref / fast |" if throughput else "") + (" max rel. err vs ref |" if agreement else ""),
        "|---|" + "---:|" * (len(labels) + len(ratio_labels) + cuda + memory + throughput + agreement),
    ]
    for r in records:
        times = [f"{1e3 * r['times_s'][lab]:.3f}" if lab in r["times_s"] else "–" for lab in labels]
        ratios = [f"{r['speedup_vs_reference'][lab]:.2f}" if lab in r["speedup_vs_reference"] else "–"
                  for lab in ratio_labels]
        row = f"| {r['name']} | " + " | ".join(times + ratios) + " |"
        if cuda:
            pct = r.get("pct_of_floor", {}).get("fast")
            row += f" {pct:.1f}% |" if pct is not None else " – |"
        if memory:
            peak = r.get("peak_memory_bytes") or {}
            ok = all(isinstance(peak.get(k), int) for k in ("reference", "fast"))
            row += f" {peak['reference'] / 1e9:.2f} / {peak['fast'] / 1e9:.2f} |" if ok else " – |"
        if throughput:
            rate = r.get("items_per_s") or {}
            ok = all(k in rate for k in ("reference", "fast"))
            row += f" {rate['reference']:.0f} / {rate['fast']:.0f} |" if ok else " – |"
        if agreement:
            worst = worst_error(r)
            row += f" {worst:.1e} |" if worst is not None else " – |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """What the results were measured on: :func:`mosaic_fast.info.collect` plus the date (UTC), the bench
    device and the dtype, recorded in the JSON so runs can be told apart."""
    from mosaic_fast.info import collect

    env = collect()
    env.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               bench_device=str(device), dtype=str(dtype).replace("torch.", ""))
    return env


def write_json(results: dict, path: str) -> None:
    """Write ``results`` atomically (a temporary file renamed over ``path``)."""
    Path(os.path.dirname(os.path.abspath(path))).mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)


def list_cases(suites: list[str], device: torch.device, dtype: torch.dtype, quick: bool,
               args: argparse.Namespace) -> int:
    """``--list``: one line per case a run with these options would time (suite, name, columns), for
    choosing ``--filter`` texts; builds the cases (their models and inputs) but times nothing."""
    from mosaic_fast.bench.core import case_implementations

    shown, names = 0, []
    for suite in suites:
        for case in collect_cases([suite], device, dtype, quick, graphs=args.graphs and device.type == "cuda",
                                  with_compile=not args.no_compile):
            names.append(case.name)
            if kept_by_filter(case.name, args.filter):
                columns = case_implementations(case, device, with_compile=not args.no_compile,
                                               with_mkl=args.cpu_gemm_mkl)
                print(f"{suite:<6} {case.name:<34} {', '.join(columns)}")
                shown += 1
    if not shown:
        print(no_match_message(suites, args.filter or [], names), file=sys.stderr)
        return 2
    return 0


def kept_by_filter(name: str, filters: list[str] | None) -> bool:
    """Whether ``--filter`` keeps the case ``name``: no filter, or its name contains one of the texts."""
    return filters is None or any(text in name for text in filters)


def no_match_message(suites: list[str], filters: list[str], names: list[str]) -> str:
    """The error for ``--filter`` texts that no case name contains, with the names to choose from."""
    return (f"mosaic-fast bench: error: no case of {'/'.join(suites)} matches --filter "
            f"{' or '.join(repr(f) for f in filters)} (a case is kept when its name contains the text); "
            f"the cases are: {', '.join(names)}")


def main(argv: list[str] | None = None) -> int:
    """``mosaic-fast bench``: time the suites (or re-render ``--from-json`` results) and write the outputs.

    Returns the exit code: 0, 2 for a usage problem (no CUDA device, a ``--filter`` matching nothing, an
    unreadable ``--from-json`` file), 3 under ``--strict`` (:func:`strict_status`)."""
    args = parse_args(argv)
    if args.from_json:
        try:
            results = load_results(args.from_json)
        except ValueError as err:
            print(f"mosaic-fast bench: error: {err}", file=sys.stderr)
            return 2
        from mosaic_fast.bench.targets import split_runs

        for run in split_runs(results["records"]):  # each run under its own machine and dtype
            env = run_environment(results, run[0])
            device = torch.device(env.get("bench_device", "cpu"))
            for suite in dict.fromkeys(r["suite"] for r in run):
                print(f"\n== suite {suite} ({env['device']}, {env['dtype']}) ==")
                print(format_table([r for r in run if r["suite"] == suite], device, str(env.get("dtype", "float32"))))
        write_outputs(results, args)
        return strict_status(results, args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mosaic-fast bench: --device cuda was requested but no CUDA device is available", file=sys.stderr)
        return 2
    if args.graphs and device.type != "cuda":
        print("mosaic-fast bench: note: --graphs needs --device cuda (CUDA graphs); no graph columns on "
              f"{device.type}", file=sys.stderr)
    dtype = bench_dtype(device, args.dtype)
    quick = device.type == "cpu" and not args.full
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.2 if quick else 0.5)
    from mosaic_fast.bench.core import measure_ceilings, time_case

    if args.list:
        return list_cases(suites, device, dtype, quick, args)
    results = {"environment": environment(device, dtype), "records": []}
    ceilings = measure_ceilings(device) if device.type == "cuda" else None
    if ceilings:
        results["environment"]["ceilings"] = ceilings
        print(f"ceilings: copy {ceilings['bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 GEMM {ceilings['flops_bf16'] / 1e12:.0f} TFLOP/s", file=sys.stderr)
    # for the error when --filter matches nothing (not said when a module failed to build: its cases might)
    matched, build_failures, names = 0, 0, []
    for suite in suites:
        failures: list[dict] = []
        built = collect_cases([suite], device, dtype, quick, graphs=args.graphs and device.type == "cuda",
                              with_compile=not args.no_compile, failures=failures)
        cases = [c for c in built if kept_by_filter(c.name, args.filter)]
        names += [c.name for c in built]
        matched, build_failures = matched + len(cases), build_failures + len(failures)
        if not cases and not failures:
            continue  # --filter matched nothing here: no empty table
        records = list(failures)
        results["records"] += failures
        for case in tqdm(cases, desc=f"bench {suite}", unit="case", file=sys.stderr):
            try:
                record = time_case(case, device, with_compile=not args.no_compile, min_run_time=min_run_time,
                                   ceilings=ceilings, with_mkl=args.cpu_gemm_mkl)
            except Exception as exc:  # e.g. out of memory: record it, keep the other cases
                record = {"suite": case.suite, "name": case.name, "params": case.params, "times_s": {},
                          "speedup_vs_reference": {}, "errors": {"case": f"{type(exc).__name__}: {exc}"[:300]}}
            records.append(record)
            results["records"].append(record)
            if args.json_path:  # after every case, so an interrupted run keeps what it measured
                write_json(results, args.json_path)
        print(f"\n== suite {suite} ({device}, {str(dtype).replace('torch.', '')}) ==")
        print(format_table(records, device, str(dtype)))
    if args.filter is not None and not matched and not build_failures:
        print(no_match_message(suites, args.filter, names), file=sys.stderr)
        return 2
    for text in args.filter or []:  # one of several texts matching nothing is most likely misspelt
        if not build_failures and not any(text in name for name in names):
            print(f"mosaic-fast bench: note: --filter {text!r} matches no case of {'/'.join(suites)}",
                  file=sys.stderr)
    write_outputs(results, args)
    return strict_status(results, args)


def strict_status(results: dict, args: argparse.Namespace) -> int:
    """0, or with ``--strict`` 3 when an implementation failed or differs from the reference beyond
    :data:`AGREEMENT_TOLERANCE` (so scripts and CI can act on the table's ``!`` lines)."""
    if not args.strict:
        return 0
    flagged = [r["name"] for r in results["records"]
               if r.get("errors") or disagreements(r, str(run_environment(results, r).get("dtype", "float32")))]
    if flagged:
        print(f"mosaic-fast bench: --strict: {len(flagged)} case(s) with a failed or disagreeing "
              f"implementation: {', '.join(flagged)}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
