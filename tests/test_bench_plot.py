"""`mosaic-fast bench --plot`: rows per run, every column drawn, ρ lines within one run and column, PNG written."""

import pathlib
import random

from mosaic_fast.bench.plot import bar_columns, log_ticks, plot_results, rho_series, speedup_rows
from mosaic_fast.bench.run import load_results

ROOT = pathlib.Path(__file__).resolve().parents[1]


def record(name, times, params=None, run=None, speedups=True):
    """A result record; speed-ups derived from ``times`` unless ``speedups`` is False."""
    r = {"suite": "ops", "name": name, "params": params or {}, "times_s": times}
    if speedups:
        r["speedup_vs_reference"] = {c: times["reference"] / t for c, t in times.items()}
    if run is not None:
        r["run"] = run
    return r


def results_of(records, runs=None):
    return {"environment": {"device": "cpu (2 threads)", "dtype": "float32", "torch": "2.x"}, "records": records,
            **({"runs": runs} if runs is not None else {})}


def test_two_runs_give_distinct_labels_and_keep_every_record():
    times = {"reference": 2e-3, "fast": 1e-3}
    tagged = [record(n, times, run=k) for k in (0, 1) for n in ("a", "b", "c")]
    for records in (tagged, [{k: v for k, v in r.items() if k != "run"} for r in tagged]):  # tags, or repeats
        rows = speedup_rows(results_of(records, [{"file": "x.json", "date": "d"}] * 2))
        assert len(rows) == len(records)
        assert len({row.label for row in rows}) == len(rows)
        assert [(row.name, row.run) for row in rows] == [(r["name"], k) for k in (0, 1) for r in records[:3]]
    (single,) = speedup_rows(results_of([record("a", times)]))
    assert single.label == "a" and single.speedups == {"fast": 2.0}


def test_every_non_reference_column_gets_bars():
    columns = ["compiled", "reference+graphs", "fast", "fast+graphs", "fast+compiled", "fast+cudnn-attn", "kernel",
               "fast+mkl", "my+col"]
    records = [record(f"case{i}", {"reference": 1e-3, column: 5e-4}) for i, column in enumerate(columns)]
    records.append(record("no_speedups", {"reference": 1e-3, "fast": 2.5e-4}, speedups=False))  # from times
    records.append(record("failed", {"reference": 1e-3}))  # kept, with no bar
    rows = speedup_rows(results_of(records))
    assert set(bar_columns(rows)) == set(columns)
    assert bar_columns(rows)[:2] == ["compiled", "reference+graphs"]  # reference side first
    for row, column in zip(rows, columns):
        assert row.speedups == {column: 2.0}
    assert rows[-2].speedups == {"fast": 4.0} and rows[-1].speedups == {}


def test_rho_series_stay_within_one_run_and_column_sorted_by_rho():
    rhos = [1.0, 0.5, 0.3, 0.1]
    records = []
    for run in (0, 1):
        shuffled = rhos[:]
        random.Random(run).shuffle(shuffled)
        for family in ("dynamer_block", "moe_skip"):
            for rho in shuffled:
                t = (run + 1) * (1 + rho)  # run and ρ recoverable from the time
                times = {"reference": t, "fast": t / 2} if run == 0 else {"reference": t, "fast+graphs": t / 4}
                records.append(record(f"{family}_rho{rho:g}", times, {"rho": rho}, run))
    series = rho_series(results_of(records))
    assert {(s.run, s.family, s.column) for s in series} == {
        (run, family, column) for run, columns in ((0, ("reference", "fast")), (1, ("reference", "fast+graphs")))
        for family in ("dynamer_block", "moe_skip") for column in columns}
    for s in series:
        assert s.rhos == sorted(rhos)
        scale = {"reference": 1, "fast": 2, "fast+graphs": 4}[s.column]
        assert s.times_ms == [1e3 * (s.run + 1) * (1 + rho) / scale for rho in s.rhos]
    # one family at two shapes: two lines, never one joining both
    two_shapes = [record(f"moe_skip_rho{rho:g}", {"reference": 1.0}, {"rho": rho, "B": b}) for b in (8, 32)
                  for rho in rhos]
    lines = rho_series(results_of(two_shapes))
    assert len(lines) == 2 and all(s.rhos == sorted(rhos) for s in lines)
    assert len({s.family for s in lines}) == 2


def test_log_ticks():
    assert log_ticks(0.2, 60) == [0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]
    assert 1.0 in log_ticks(0.6, 1.8) and len(log_ticks(0.6, 1.8)) >= 3


def test_plot_writes_png_for_a_cpu_run_and_a_merged_gpu_file(tmp_path):
    cpu = [record("mos_adapter_single_B2_fwd", {"reference": 2e-3, "compiled": 2e-3, "fast": 1e-3, "fast+mkl": 1.5e-3}),
           record("outlier", {"reference": 43e-3, "fast": 1e-3}),
           *(record(f"dynamer_block_rho{rho:g}", {"reference": 5e-2, "fast": rho * 4e-2}, {"rho": rho,
                                                                                              "skip_mode": "block"})
             for rho in (1.0, 0.5, 0.1))]
    gpu = load_results([str(ROOT / "benchmarks" / "results" / "2026-11-30_h200_run2.json")])
    assert len({r["run"] for r in gpu["records"]}) > 1
    for name, results in (("cpu.png", results_of(cpu)), ("gpu.png", gpu)):
        path = tmp_path / name
        plot_results(results, str(path))
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
