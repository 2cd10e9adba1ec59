"""Mutation-test gaps of the benchmark tooling (bench.run, bench.core, bench.cases_adapter, bench.cases_model,
bench.targets) and the repeated-index / q-k-v shape checks: each test pins one behaviour a plausible edit
could change without any other test noticing."""

import json
import types

import numpy as np
import pytest
import torch

from mosaic_fast.bench import cases_adapter, cases_model, core
from mosaic_fast.bench.run import _extra_lines, _markdown_run, format_table, load_results, main
from mosaic_fast.bench.targets import split_runs


def _env(device, dtype, date):
    return {"device": device, "dtype": dtype, "torch": "2.9", "triton": "3.5", "date": date,
            "bench_device": "cuda" if device != "cpu" else "cpu"}


def _record(name, **extra):
    return {"suite": "ops", "name": name, "params": {}, "times_s": {"reference": 2e-3, "fast": 1e-3},
            "speedup_vs_reference": {"fast": 2.0}, **extra}


def _write(path, env, records, **more):
    path.write_text(json.dumps({"environment": env, "records": records, **more}))
    return str(path)


def test_merged_results_take_the_first_files_environment(tmp_path):
    """load_results documents the merged environment as the first file's (it sets the device the tables
    and the targets are read for), not the last one's."""
    cpu = _write(tmp_path / "cpu.json", _env("cpu", "float32", "D1"), [_record("a")])
    gpu = _write(tmp_path / "gpu.json", _env("H200", "bfloat16", "D2"), [_record("b")])
    merged = load_results([cpu, gpu])
    assert merged["environment"]["device"] == "cpu" and merged["environment"]["date"] == "D1"
    assert [r["run"] for r in merged["records"]] == [0, 1]


def test_a_merged_file_reloaded_keeps_each_runs_environment(tmp_path):
    """Re-reading a file written by a merge keeps the environment each of its runs came with (the machine
    line and --strict tolerance of a bf16 run stay bf16), not the merged file's top-level one."""
    cpu = _write(tmp_path / "cpu.json", _env("cpu", "float32", "D1"), [_record("a")])
    gpu = _write(tmp_path / "gpu.json", _env("H200", "bfloat16", "D2"),
                 [_record("b", rel_error_vs_reference={"fast": 1e-2})])  # fine in bf16 (2e-2), not in fp32 (1e-3)
    merged = tmp_path / "merged.json"
    assert main(["--from-json", cpu, gpu, "--json", str(merged)]) == 0
    again = load_results([str(merged)])
    assert [r["file"] for r in again["runs"]] == ["cpu.json", "gpu.json"]
    assert [r["environment"]["dtype"] for r in again["runs"]] == ["float32", "bfloat16"]
    assert main(["--from-json", str(merged), "--strict"]) == 0


def test_markdown_memory_column_needs_a_fast_figure():
    """The peak-memory column appears when some record has a fast peak (bytes); a run whose fast step only
    recorded an error gets no column, even with a reference figure."""
    failed = _record("step", peak_memory_bytes={"reference": 4_000_000_000, "fast": "RuntimeError: OOM"})
    assert "peak GB" not in _markdown_run("env", [failed])
    ok = _record("step", peak_memory_bytes={"reference": 4_000_000_000, "fast": 3_000_000_000})
    assert "| step | 2.000 | 1.000 | 2.00 | 4.00 / 3.00 |" in _markdown_run("env", [ok])


def test_markdown_throughput_needs_both_figures():
    """A record with a fast throughput but none for the reference shows '–' in the images/s column (both
    figures are needed for 'ref / fast'), instead of failing the whole render."""
    text = _markdown_run("env", [_record("a", items_per_s={"fast": 900.0}),
                                 _record("b", items_per_s={"reference": 500.0, "fast": 900.0})])
    assert "| a | 2.000 | 1.000 | 2.00 | – |" in text
    assert "| b | 2.000 | 1.000 | 2.00 | 500 / 900 |" in text


def test_peak_memory_line_without_a_reference_figure():
    """A peak-memory line with no reference figure lists the bytes without ratios (no division by None)."""
    record = _record("step", peak_memory_bytes={"fast": 3_000_000_000, "fast+graphs": 2_500_000_000})
    assert _extra_lines(record) == ["    peak memory: fast 3.00 GB · fast+graphs 2.50 GB"]


def test_table_header_and_failed_lines():
    """The header has one time column per label (label + 5 wide at least, so a long label keeps a gap),
    ratio columns for every label but the reference, and each failed implementation gets a '!' line."""
    record = _record("mix", times_s={"reference": 2e-3, "fast": 1e-3, "three launches": 1.5e-3},
                     speedup_vs_reference={"fast": 2.0, "three launches": 2e-3 / 1.5e-3},
                     errors={"kernel": "RuntimeError: boom"})
    table = format_table([record], torch.device("cpu"))
    head = table.splitlines()[0]
    assert head == (f"{'case':<44}{'reference ms':>14}{'fast ms':>14}{'three launches ms':>19}"
                    f"{'x fast':>11}{'x three launches':>18}{'err':>9}")
    assert "fast ms  three launches ms" in head and "x reference" not in head
    assert "    ! kernel failed: RuntimeError: boom" in table.splitlines()


def test_a_module_that_fails_to_build_is_in_its_suites_table_and_suite(tmp_path, monkeypatch, capsys):
    """The failed-build record belongs to the suite that was run ("ops", not the module's name, so a
    re-render groups it there) and is in the printed table with its error line."""
    from mosaic_fast.bench import cases_patch_embed

    def broken(*args, **kwargs):
        raise RuntimeError("no cases today")

    monkeypatch.setattr(cases_patch_embed, "cases", broken)
    out = tmp_path / "r.json"
    assert main(["ops", "--device", "cpu", "--filter", "no_such_case", "--no-compile", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cases_patch_embed (building the cases)" in printed
    assert "    ! cases failed: RuntimeError: no cases today" in printed
    (record,) = json.loads(out.read_text())["records"]
    assert record["suite"] == "ops"


def _toy_case(impls, compile_reference=True):
    return core.Case("ops", "toy", {}, lambda i: (torch.randn(4, 4),), impls, compile_reference=compile_reference)


def test_case_implementations_fast_mkl_only_on_cpu_with_a_fast_column(onednn_library):
    """"fast+mkl" is a CPU column (the MKL/oneDNN split exists there only) and needs a "fast" column to
    wrap: a CUDA run or a case without "fast" gets none (and no KeyError)."""
    impls = {"reference": torch.relu, "fast": torch.relu}
    cpu = core.case_implementations(_toy_case(impls), torch.device("cpu"), with_compile=False, with_mkl=True)
    assert set(cpu) == {"reference", "fast", "fast+mkl"}
    cuda = core.case_implementations(_toy_case(impls), torch.device("cuda"), with_compile=False, with_mkl=True)
    assert set(cuda) == {"reference", "fast"}
    no_fast = core.case_implementations(_toy_case({"reference": torch.relu}), torch.device("cpu"),
                                        with_compile=False, with_mkl=True)
    assert set(no_fast) == {"reference"}


def test_case_implementations_respect_compile_reference():
    """A case that builds its own compiled column (compile_reference=False) gets no runner "compiled"."""
    impls = {"reference": torch.relu, "fast": torch.relu}
    assert set(core.case_implementations(_toy_case(impls, compile_reference=False), torch.device("cpu"))) == {
        "reference", "fast"}


def test_grouped_adapter_floors_by_hand():
    """DESIGN.md §6 floors, written out for the single-specialist case (only C, r = 192, is routed, so only
    its weights count) in fp32: fwd reads h, base and writes out (3·T·D) plus C's weights once; fwd+bwd
    doubles the activations and passes the weights three times; flops 4·T·D·r, three times for fwd+bwd."""
    D, r, e = 768, 192, 4
    T = 2 * 197
    weights = (2 * D + 2 * r * D + r + D) * e  # LayerNorm (2·D), down and up (2·r·D), biases (r + D)
    by_name = {c.name: c for c in cases_adapter.cases(torch.device("cpu"), torch.float32, quick=True)}
    fwd, bwd = by_name["mos_adapter_single_B2_fwd"], by_name["mos_adapter_single_B2_fwd+bwd"]
    assert fwd.floor_bytes == 3 * T * D * e + weights and fwd.floor_flops == 4 * T * D * r
    assert bwd.floor_bytes == 6 * T * D * e + 3 * weights and bwd.floor_flops == 3 * 4 * T * D * r


def test_three_launches_column_runs_on_the_triton_backend_on_cuda(monkeypatch):
    """On CUDA the three-launch baseline times the fused single-adapter kernels (backend "triton"), as
    the grouped launch it is compared with does; on CPU it is the plain fallback."""
    wrapped = []
    monkeypatch.setattr(cases_adapter, "on_triton_backend", lambda fn: wrapped.append(fn) or fn)
    monkeypatch.setattr(cases_adapter, "_modules", lambda device, dtype: (None, None))  # no CUDA tensors
    cases_adapter._case(torch.device("cpu"), torch.float32, "mixed", 2, False, 4)
    assert wrapped == []
    case = cases_adapter._case(torch.device("cuda"), torch.float32, "mixed", 2, False, 4)
    assert wrapped == [case.impls["three launches"]]


def test_agreement_kernel_step_runs_on_the_triton_backend(monkeypatch):
    """The "kernel" column's agreement step runs on the fused kernels, as the timed "kernel" column does."""
    marked = []

    class Step:
        def __init__(self, model, device, dtype, compile_model=False, graphs=False):
            self.computed = lambda *inputs: []

    monkeypatch.setattr(cases_model, "TrainStep", Step)
    monkeypatch.setattr(cases_model, "_pair", lambda cfg, device: (torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    monkeypatch.setattr(cases_model, "on_triton_backend", lambda fn: marked.append(fn) or "on triton")
    steps = cases_model._agreement_steps({}, torch.device("cpu"), torch.float32, ("reference", "fast", "kernel"))
    assert steps["kernel"] == "on triton" and len(marked) == 1


def test_split_runs_by_tag_only_when_every_record_has_one():
    """Runs follow the "run" tags only when every record carries one; otherwise (a hand-edited or older
    file) they are split by repeated names, without a KeyError on the untagged record."""
    partly_tagged = [{"name": "a", "run": 0}, {"name": "a"}]  # not every record tagged: split by names
    assert [[r["name"] for r in run] for run in split_runs(partly_tagged)] == [["a"], ["a"]]



def test_index_check_messages():
    """The repeated-value message says "within a row" only for a 2-D index (a 1-D one is one set)."""
    from mosaic_fast.ops._common import check_index_values_on_cpu

    with pytest.raises(ValueError, match=r"rows must not repeat values, got"):
        check_index_values_on_cpu("rows", torch.tensor([1, 1]), 4, distinct=True)
    with pytest.raises(ValueError, match=r"eidx must not repeat values within a row"):
        check_index_values_on_cpu("eidx", torch.tensor([[0, 1], [2, 2]]), 4, distinct=True)



def test_every_qkv_kernel_is_shape_checked():
    """The value kernel is checked like query and key: one with another head grouping is named."""
    from mosaic_fast.models.weights import vit_block_assignments

    block = types.SimpleNamespace(norm1=types.SimpleNamespace(weight=torch.zeros(32)),
                                  attn=types.SimpleNamespace(num_heads=4))
    att = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
    weights = {f"{att}/{n}/kernel": np.zeros((32, 4, 8), np.float32) for n in ("query", "key")}
    weights[f"{att}/value/kernel"] = np.zeros((32, 2, 16), np.float32)
    with pytest.raises(ValueError, match=r"value/kernel: checkpoint shape \(32, 2, 16\) does not fit"):
        vit_block_assignments(block, weights, 0)


def test_reference_graphs_column_is_a_baseline():
    """"reference+graphs" (the reference replayed as CUDA graphs) is a baseline like "compiled": a GPU
    target is judged on the fast columns only."""
    from mosaic_fast.bench.targets import check_targets

    times = {"reference": 4e-3, "reference+graphs": 3e-3, "fast": 1e-3, "fast+graphs": 8e-4}
    records = [{"suite": "model", "name": "dynamer_adapter_rho1", "params": {}, "times_s": times}]
    checks = check_targets({"environment": _env("H200", "bfloat16", "D"), "records": records})
    assert {c.column for c in checks} == {"fast", "fast+graphs"}
    assert {round(c.value, 6) for c in checks} == {4.0, 5.0}  # 4e-3 / 1e-3 and 4e-3 / 8e-4
