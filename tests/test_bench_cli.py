"""`mosaic-fast bench`: JSON written per case, failures recorded not fatal, re-rendering from JSON."""

import json

import pytest
import torch
from benchmark_scripts import load_benchmark_script

from mosaic_fast.bench.core import Case, floor_seconds, time_case
from mosaic_fast.bench.run import format_table, main


def test_run_writes_json_then_renders_it(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["ops", "--device", "cpu", "--filter", "moe_skip_rho0.1", "--no-compile", "--min-run-time", "0.02",
                 "--graphs", "--json", str(out)]) == 0
    assert "--graphs needs --device cuda" in capsys.readouterr().err  # said, not silently ignored
    results = json.loads(out.read_text())
    (record,) = results["records"]
    assert record["name"] == "moe_skip_rho0.1" and set(record["times_s"]) == {"reference", "fast"}
    assert all(t > 0 for t in record["times_s"].values())
    md, png, merged = tmp_path / "t.md", tmp_path / "t.png", tmp_path / "merged.json"
    assert main(["--from-json", str(out), str(out), "--markdown", str(md), "--plot", str(png),
                 "--json", str(merged)]) == 0
    assert md.read_text().count("| moe_skip_rho0.1 |") == 2
    assert md.read_text().count("(cpu.json)\n\n| case |") == 2  # one table per run, each under its source
    assert png.stat().st_size > 1000
    assert len(json.loads(merged.read_text())["runs"]) == 2


def test_failing_implementation_is_recorded_and_the_others_timed():
    def broken(x):
        raise RuntimeError("kernel exploded")

    case = Case("ops", "toy", {}, lambda i: (torch.randn(64, 64),), {"reference": torch.relu, "fast": broken})
    record = time_case(case, torch.device("cpu"), rotate=2, with_compile=False, min_run_time=0.01, repeats=1)
    assert set(record["times_s"]) == {"reference"}
    assert "kernel exploded" in record["errors"]["fast"]


def test_every_implementation_is_checked_against_the_reference():
    """A fast column computing something else (or returning another shape) is flagged in the record and
    the table; agreeing ones show their error; in-place implementations get fresh inputs for the check."""

    def doubled_in_place(x):
        return x.mul_(2.0)  # run first: a shared input set would reach "fast" already doubled

    seeded = lambda i: (torch.randn(64, 64, generator=torch.Generator().manual_seed(i)),)
    impls = {"reference": doubled_in_place, "fast": lambda x: x * 2.0, "wrong": lambda x: x * 2.02,
             "shape": lambda x: (x * 2.0)[:1]}
    case = Case("ops", "toy", {}, seeded, impls)
    record = time_case(case, torch.device("cpu"), rotate=2, with_compile=False, min_run_time=0.01, repeats=1)
    errors = record["rel_error_vs_reference"]
    assert errors["fast"] == 0.0 and abs(errors["wrong"] - 0.01) < 1e-6 and errors["shape"] != errors["shape"]
    table = format_table([record], torch.device("cpu"), "float32")
    assert "wrong differs from the reference: relative error 1.0e-02" in table
    assert "shape differs from the reference: relative error nan" in table
    assert "fast differs" not in table
    no_outputs = Case("ops", "step", {}, seeded, {"reference": lambda x: None, "fast": lambda x: None})
    record = time_case(no_outputs, torch.device("cpu"), rotate=1, with_compile=False, min_run_time=0.01, repeats=1)
    assert "rel_error_vs_reference" not in record


def test_floor_uses_measured_ceilings():
    case = Case("ops", "toy", {}, lambda i: (), {}, floor_bytes=4e9, floor_flops=1e12)
    assert floor_seconds(case, {"bytes_per_s": 4e12, "flops_bf16": 5e14}) == 2e-3  # compute-bound here
    assert floor_seconds(case, {"bytes_per_s": 1e12, "flops_bf16": 5e15}) == 4e-3  # memory-bound here


def test_profile_cases_writes_one_table_per_implementation(tmp_path, capsys):
    profile_cases = load_benchmark_script("profile_cases")
    out = tmp_path / "profile.txt"
    assert profile_cases.main(["--device", "cpu", "--suite", "ops", "--filter", "moe_skip_rho0.1", "--calls", "1",
                               "--filter", "moe_skip_rho0.55", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "no case name contains 'moe_skip_rho0.55'" in said and "contains 'moe_skip_rho0.1'" not in said
    text = out.read_text()
    for impl in ("reference", "fast"):
        assert f"== moe_skip_rho0.1 / {impl} (cpu, float32)" in text
    assert text.count("aten calls per call") == 2 and "aten::" in text
    assert profile_cases.main(["--device", "cpu", "--suite", "ops", "--filter", "no_such_case",
                               "--out", str(out)]) == 2


def test_fast_mkl_column_times_the_fast_path_without_onednn(onednn_calls):
    """``--cpu-gemm-mkl``: a "fast+mkl" column whose calls never reach oneDNN, while "fast" does."""
    from mosaic_fast.ops import cpu_gemm

    w = torch.randn(48, 32)

    def fast(x):
        before = len(onednn_calls)
        out = cpu_gemm.linear(x, w)
        calls.append(len(onednn_calls) - before)
        return out

    calls: list[int] = []
    case = Case("ops", "toy", {}, lambda i: (torch.randn(16, 32),), {"reference": torch.relu, "fast": fast})
    record = time_case(case, torch.device("cpu"), rotate=2, with_compile=False, min_run_time=0.01, repeats=1,
                       with_mkl=True)
    assert set(record["times_s"]) == {"reference", "fast", "fast+mkl"}
    assert 0 in calls and 1 in calls  # the mkl column's calls skipped oneDNN, the fast column's did not
    assert cpu_gemm.onednn_enabled()  # the library is restored afterwards


def test_from_json_errors_name_the_file(tmp_path, capsys):
    """A missing, malformed or foreign --from-json file is one message naming it (exit 2), not a traceback."""
    bad, foreign = tmp_path / "bad.json", tmp_path / "foreign.json"
    bad.write_text("{bad")
    foreign.write_text("[]")
    for path, message in ((tmp_path / "none.json", "cannot read the file"), (bad, "not valid JSON"),
                          (foreign, "not a mosaic-fast bench results file")):
        assert main(["--from-json", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"--from-json {path}: {message}" in err and "Traceback" not in err


def _results_file(tmp_path, records):
    path = tmp_path / "r.json"
    env = {"device": "cpu", "dtype": "float32", "torch": torch.__version__, "triton": "3.8", "date": "D0",
           "bench_device": "cpu"}
    path.write_text(json.dumps({"environment": env, "records": records}))
    return str(path)


def _record(name, **extra):
    return {"suite": "model", "name": name, "params": {}, "times_s": {"reference": 2e-3, "fast": 1e-3},
            "speedup_vs_reference": {"fast": 2.0}, **extra}


def test_strict_exit_status_follows_the_flagged_lines(tmp_path, capsys):
    """--strict turns the table's '!' lines (a failed implementation, or one beyond the dtype's tolerance)
    into exit status 3; without it, or with every column agreeing, the status is 0."""
    good = _results_file(tmp_path, [_record("ok", rel_error_vs_reference={"fast": 1e-6})])
    assert main(["--from-json", good, "--strict"]) == 0
    for bad in ({"rel_error_vs_reference": {"fast": 5e-3}}, {"rel_error_vs_reference": {"fast": float("nan")}},
                {"errors": {"fast": "RuntimeError: boom"}}):
        path = _results_file(tmp_path, [_record("ok"), _record("wrong", **bad)])
        assert main(["--from-json", path]) == 0
        capsys.readouterr()
        assert main(["--from-json", path, "--strict"]) == 3
        assert "1 case(s) with a failed or disagreeing implementation: wrong" in capsys.readouterr().err


def test_table_shows_throughput_and_peak_memory():
    records = [_record("infer", items_per_s={"reference": 5309.4, "fast": 9072.4}),
               _record("step", peak_memory_bytes={"reference": 6_506_724_824, "fast": 4_615_985_624, "x": "n/a"})]
    table = format_table(records, torch.device("cpu"))
    assert "    items/s: reference 5,309 · fast 9,072" in table
    assert "    peak memory: reference 6.51 GB · fast 4.62 GB (0.71×)" in table


def test_merged_runs_keep_their_own_machine_and_dtype(tmp_path, capsys):
    """Each run of merged files is rendered under its own environment line, and --strict judges each
    run by its own dtype's tolerance (a bf16 error of 1e-2 is fine after an fp32 file)."""
    cpu = _results_file(tmp_path, [_record("a", rel_error_vs_reference={"fast": 1e-6})])
    gpu = tmp_path / "gpu.json"
    env = {"device": "NVIDIA H200", "dtype": "bfloat16", "torch": "2.11", "triton": "3.6", "date": "D",
           "bench_device": "cuda"}
    gpu.write_text(json.dumps({"environment": env, "records": [_record("b", rel_error_vs_reference={"fast": 1e-2})]}))
    md = tmp_path / "m.md"
    assert main(["--from-json", cpu, str(gpu), "--markdown", str(md), "--strict"]) == 0
    text = md.read_text()
    assert "NVIDIA H200, bfloat16, torch 2.11, triton 3.6, D (gpu.json)\n\n| case |" in text
    assert text.startswith("cpu, float32, torch ")
    out = capsys.readouterr().out  # the printed tables too: one per run, under its machine, by its tolerance
    assert "== suite model (cpu, float32) ==" in out and "== suite model (NVIDIA H200, bfloat16) ==" in out
    assert "fast %floor" in out.split("NVIDIA H200")[1] and "differs" not in out


def test_cases_that_fail_to_build_are_recorded(tmp_path, monkeypatch, capsys):
    """A case module that cannot build its cases is reported, kept in the JSON as a failed record, and
    makes --strict fail (it is not a silently shorter suite)."""
    from mosaic_fast.bench import cases_patch_embed

    def broken(*args, **kwargs):
        raise RuntimeError("no cases today")

    monkeypatch.setattr(cases_patch_embed, "cases", broken)
    out = tmp_path / "r.json"
    argv = ["ops", "--device", "cpu", "--filter", "moe_skip_rho0.1", "--no-compile", "--min-run-time", "0.02",
            "--json", str(out)]
    assert main(argv) == 0
    assert main([*argv, "--strict"]) == 3
    err = capsys.readouterr().err
    assert "building the cases_patch_embed cases failed: RuntimeError: no cases today" in err
    names = [r["name"] for r in json.loads(out.read_text())["records"]]
    assert names == ["cases_patch_embed (building the cases)", "moe_skip_rho0.1"]


def test_cpu_gemm_libraries_times_every_product_with_both_libraries(capsys, onednn_calls):
    """benchmarks/cpu_gemm_libraries.py: forward and both gradients of the four Linears, each library
    really used for its column (a spy counts the calls that reach oneDNN), the active library restored."""
    from mosaic_fast.ops import cpu_gemm

    script = load_benchmark_script("cpu_gemm_libraries")
    before = cpu_gemm._library
    script.main(["--dim", "8", "--tokens", "6", "--rounds", "2"])
    assert cpu_gemm._library == before
    assert len(onednn_calls) == 12 * 3  # 12 products, the oneDNN column once per round and in the warm-up
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("qkv", "proj", "fc1", "fc2"))]
    assert len(rows) == 12 and any(line.startswith("layer total") for line in lines)
    products = script.layer_products(8, 6)
    assert products["fc1 forward"]().shape == (6, 32) and products["fc2 weight grad"]().shape == (8, 32)


def test_compiled_reference_graph_breaks_are_recorded_not_printed(caplog):
    """A reference that reads a tensor on the host compiles to several graphs: the record counts the
    breaks with their reason and the table shows them, while Dynamo's console advice stays out; a
    reference without host reads records none."""

    def host_read(x):
        return x * 2 if bool((x > 0).any()) else x

    def seeded(i):
        return (torch.randn(8, 8, generator=torch.Generator().manual_seed(i)),)

    branching = Case("ops", "branching", {}, seeded, {"reference": host_read, "fast": host_read})
    straight = Case("ops", "straight", {}, seeded, {"reference": torch.relu, "fast": torch.relu})
    from torch._dynamo.variables.tensor import TensorVariable

    TensorVariable._warn_capture_scalar_outputs.cache_clear()  # Dynamo gives that advice once per process
    with caplog.at_level("WARNING"):
        records = [time_case(c, torch.device("cpu"), rotate=2, min_run_time=0.01, repeats=1)
                   for c in (branching, straight)]
    breaks = records[0]["compiled_graph_breaks"]
    assert sum(breaks.values()) >= 1 and any("item()" in reason for reason in breaks)
    assert "compiled_graph_breaks" not in records[1]
    assert "capture_scalar_outputs = True" not in caplog.text
    table = format_table(records, torch.device("cpu"))
    reason = next(iter(breaks))
    count = breaks[reason]
    assert f"    compiled: {count} graph break{'s' if count > 1 else ''}: {reason}" in table.split("straight")[0]


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:"])
def test_bad_device_is_a_usage_error(device, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ops", "--device", device])
    assert exit_info.value.code == 2
    assert f"argument --device: expected cpu, cuda or cuda:N, got {device!r}" in capsys.readouterr().err
