"""The open issues' performance targets, checked against benchmark results (`mosaic-fast bench --targets`).

Every non-reference column of a case (fast, kernel, fast+graphs, fast+compiled, ...) is checked on its
own, so a table shows which way of running the fast path meets which target. Ratios are taken within one
run (one JSON file, or one block of a merged file), never across runs. GPU targets are checked on CUDA
results, the CPU ones on CPU results.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: Columns that time a baseline (the reference, or the per-specialist "three launches"), not a fast path:
#: never judged against a target.
REFERENCE_COLUMNS = frozenset({"reference", "compiled", "reference+graphs", "three launches"})


@dataclass(frozen=True)
class Check:
    """One target on one case and column of one run: ``value`` against ``bound`` (at least, or at most)."""

    run: int
    issue: int
    target: str
    case: str
    column: str
    value: float
    bound: float
    at_least: bool

    @property
    def met(self) -> bool:
        """Whether ``value`` meets the target: at least ``bound`` when ``at_least``, else at most."""
        return self.value >= self.bound if self.at_least else self.value <= self.bound


def split_runs(records: list[dict]) -> list[list[dict]]:
    """Records split into runs: by their "run" tag when every record has one, else (older merged files)
    a new run wherever a case name repeats."""
    if records and all("run" in r for r in records):
        groups: dict = {}
        for record in records:
            groups.setdefault(record["run"], []).append(record)
        return list(groups.values())
    runs: list[list[dict]] = []
    seen: set[str] = set()
    for record in records:
        if not runs or record["name"] in seen:
            runs.append([])
            seen = set()
        runs[-1].append(record)
        seen.add(record["name"])
    return runs


def _fast_columns(record: dict, cpu: bool) -> list[str]:
    times = record.get("times_s", {})
    if cpu:
        return ["fast"] if "fast" in times else []
    return [c for c in times if c not in REFERENCE_COLUMNS]


def _model_checks(record: dict, cpu: bool) -> list[Check]:
    name, times = record["name"], record["times_s"]
    if "reference" not in times:
        return []
    inference = name.startswith("mosaic_infer_")
    checks = []
    for col in _fast_columns(record, cpu):
        if cpu:
            checks.append(Check(0, 7, "CPU: fast model ≥ 1.0× reference", name, col, times["reference"] / times[col],
                                1.0, True))
            continue
        bound, what = (2.0, "inference ≥ 2× eager reference") if inference else (1.5, "training step ≥ 1.5× eager")
        checks.append(Check(0, 7, what, name, col, times["reference"] / times[col], bound, True))
        if inference and "compiled" in times:
            checks.append(Check(0, 7, "inference ≥ 1.2× torch.compile(reference)", name, col,
                                times["compiled"] / times[col], 1.2, True))
        memory = record.get("peak_memory_bytes", {})
        if not inference and isinstance(memory.get("reference"), int) and isinstance(memory.get(col), int):
            checks.append(Check(0, 7, "training peak memory ≤ 0.8× reference", name, col,
                                memory[col] / memory["reference"], 0.8, False))
    return checks


def _grouped_adapter_checks(record: dict, cpu: bool) -> list[Check]:
    """Issue #3 (resolved; its targets are still reported): the mixed A/B/C adapter at B = 32 on the GPU
    (forward ≥ 5× eager, ≥ 1.5× torch.compile(reference), ≥ 70 % of the memory floor; forward+backward ≥ 3×
    eager), and on the CPU every adapter case's fallback ≥ 1.0× the reference."""
    name, times = record["name"], record["times_s"]
    if "reference" not in times:
        return []
    if cpu:
        return [Check(0, 3, "CPU: adapter fallback ≥ 1.0× reference", name, col, times["reference"] / times[col],
                      1.0, True) for col in _fast_columns(record, cpu)]
    checks = []
    if name == "mos_adapter_mixed_B32_fwd":
        floor = record.get("pct_of_floor", {})
        for col in _fast_columns(record, cpu):
            checks.append(Check(0, 3, "mixed forward ≥ 5× eager", name, col, times["reference"] / times[col], 5.0,
                                True))
            if "compiled" in times:
                checks.append(Check(0, 3, "mixed forward ≥ 1.5× torch.compile(reference)", name, col,
                                    times["compiled"] / times[col], 1.5, True))
            if isinstance(floor.get(col), (int, float)):
                checks.append(Check(0, 3, "mixed forward ≥ 70 % of the memory floor", name, col, floor[col], 70.0,
                                    True))
    elif name == "mos_adapter_mixed_B32_fwd+bwd":
        checks += [Check(0, 3, "mixed forward+backward ≥ 3× eager", name, col, times["reference"] / times[col], 3.0,
                         True) for col in _fast_columns(record, cpu)]
    return checks


def _run_checks(run: list[dict], cpu: bool) -> list[Check]:
    by_name = {r["name"]: r for r in run}
    checks = []
    for record in run:
        name, times = record["name"], record.get("times_s", {})
        if name.startswith(("mosaic_infer_", "mosaic_train_step_")):
            checks += _model_checks(record, cpu)
        elif name.startswith("mos_adapter_"):
            checks += _grouped_adapter_checks(record, cpu)
        elif name.startswith("patch_embed3d B=8 64^3") and "reference" in times:
            bound, what = (1.3, "CPU: 3D patch embed ≥ 1.3× at B=8, 64³") if cpu else \
                (1.5, "3D patch embed ≥ 1.5× cuDNN at B=8, 64³")
            checks += [Check(0, 5, what, name, col, times["reference"] / times[col], bound, True)
                       for col in _fast_columns(record, cpu)]
        elif cpu:
            continue
        elif name.startswith("moe_skip_rho") and name != "moe_skip_rho1" and "moe_skip_rho1" in by_name:
            rho, full = record["params"]["rho"], by_name["moe_skip_rho1"]["times_s"]
            checks += [Check(0, 4, "skip op time(ρ)/time(1) ≤ ρ + 0.1", name, col, times[col] / full[col], rho + 0.1,
                             False) for col in _fast_columns(record, cpu) if col in full]
        elif name == "dynamer_block_rho0.5" and "dynamer_block_rho1" in by_name:
            full = by_name["dynamer_block_rho1"]["times_s"]
            checks += [Check(0, 4, "DynaMer block mode: ρ = .5 ≤ 0.6× ρ = 1", name, col, times[col] / full[col], 0.6,
                             False) for col in _fast_columns(record, cpu) if col in full]
        if not cpu and name in ("dynamer_adapter_rho1", "dynamer_block_rho1") and "reference" in times:
            checks += [Check(0, 4, "DynaMer ≥ 2× the eager reference at ρ = 1", name, col,
                             times["reference"] / times[col], 2.0, True) for col in _fast_columns(record, cpu)]
    return checks


def check_targets(results: dict) -> list[Check]:
    """Every target the results can speak to (see the module docstring), run by run."""
    # "cuda", or "cuda:1" for ``--device cuda:1``: the GPU targets either way
    cpu = str(results["environment"].get("bench_device", "cpu")).split(":")[0] != "cuda"
    return [replace(check, run=i) for i, run in enumerate(split_runs(results["records"]))
            for check in _run_checks(run, cpu)]


def format_targets(checks: list[Check]) -> str:
    """A text table: run, issue, target, case, column, value, bound, met."""
    if not checks:
        return "no target applies to these results"
    rows = [("run", "issue", "target", "case", "column", "value", "bound", "met")]
    for c in checks:
        rows.append((str(c.run), f"#{c.issue}", c.target, c.case, c.column, f"{c.value:.2f}",
                     f"{'≥' if c.at_least else '≤'} {c.bound:g}", "yes" if c.met else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
