"""`mosaic-fast bench --targets`: the issues' targets checked against committed benchmark results."""

from pathlib import Path

import pytest

from mosaic_fast.bench.run import load_results, main
from mosaic_fast.bench.targets import check_targets, format_targets, split_runs

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
H200 = RESULTS / "2026-11-30_h200_run2.json"
CPU = RESULTS / "2026-11-30_cpu-2core.json"


def find(checks, target, case, column, run=None):
    hits = [c for c in checks if c.target.startswith(target) and c.case == case and c.column == column
            and (run is None or c.run == run)]
    assert hits, f"no check {target!r} on {case}/{column}"
    return hits[-1]


def test_gpu_targets_from_the_h200_run():
    """The verdicts README states for GPU session 2, recomputed from its JSON (three runs merged in it: ops,
    model, graphs)."""
    checks = check_targets(load_results([str(H200)]))
    assert {c.run for c in checks} == {0, 1, 2}
    single = find(checks, "inference ≥ 2×", "mosaic_infer_single_b64", "fast", run=1)
    assert single.value == pytest.approx(1.71, abs=0.01) and not single.met
    assert find(checks, "inference ≥ 2×", "mosaic_infer_mixedAB_b64", "fast", run=1).met
    assert find(checks, "inference ≥ 1.2×", "mosaic_infer_single_b64", "fast").met
    step = find(checks, "training step", "mosaic_train_step_single_b64", "fast")
    assert step.value == pytest.approx(0.88, abs=0.01) and not step.met
    memory = find(checks, "training peak memory", "mosaic_train_step_single_b64", "fast")
    assert memory.value == pytest.approx(0.71, abs=0.01) and memory.met and not memory.at_least
    skip = find(checks, "skip op", "moe_skip_rho0.1", "fast+graphs")
    assert skip.value == pytest.approx(0.213 / 0.409, abs=0.01) and skip.bound == pytest.approx(0.2)
    assert find(checks, "DynaMer ≥ 2×", "dynamer_adapter_rho1", "fast+graphs").met
    assert not find(checks, "DynaMer block mode", "dynamer_block_rho0.5", "fast+graphs").met
    assert find(checks, "3D patch embed ≥ 1.5×", "patch_embed3d B=8 64^3 p8", "fast").met
    grouped = find(checks, "mixed forward ≥ 5×", "mos_adapter_mixed_B32_fwd", "fast")
    assert grouped.issue == 3 and grouped.value == pytest.approx(2.79, abs=0.01) and not grouped.met
    floor = find(checks, "mixed forward ≥ 70 %", "mos_adapter_mixed_B32_fwd", "fast")
    assert floor.value == pytest.approx(2.24, abs=0.01) and not floor.met
    assert not find(checks, "mixed forward+backward", "mos_adapter_mixed_B32_fwd+bwd", "fast").met
    assert not [c for c in checks if c.target.startswith("CPU")]


def test_cpu_targets_and_the_cli(capsys):
    checks = check_targets(load_results([str(CPU)]))
    assert {c.target for c in checks} == {"CPU: fast model ≥ 1.0× reference", "CPU: 3D patch embed ≥ 1.3× at B=8, 64³",
                                          "CPU: adapter fallback ≥ 1.0× reference"}
    adapter = [c for c in checks if c.issue == 3]
    assert len(adapter) == 8 and all(c.case.startswith("mos_adapter_") for c in adapter)
    assert {c.column for c in checks} == {"fast"}
    assert main(["--from-json", str(CPU), "--targets"]) == 0
    out = capsys.readouterr().out
    assert "== targets ==" in out and "#5" in out and "mosaic_train_step_single_b8" in out


def test_runs_split_by_tag_or_by_repeated_names():
    untagged = [{"name": "a"}, {"name": "b"}, {"name": "a"}, {"name": "c"}]
    assert [[r["name"] for r in run] for run in split_runs(untagged)] == [["a", "b"], ["a", "c"]]
    tagged = [{"name": "a", "run": 0}, {"name": "a", "run": 1}, {"name": "b", "run": 0}]
    assert [[r["name"] for r in run] for run in split_runs(tagged)] == [["a", "b"], ["a"]]
    assert format_targets([]) == "no target applies to these results"


def test_merged_files_keep_their_runs_apart():
    """Each run keeps its source: a plain file its own name and date, a merged file the sources it lists."""
    merged = load_results([str(CPU), str(H200)])
    assert len(merged["runs"]) == 4 and {r["run"] for r in merged["records"]} == {0, 1, 2, 3}
    assert [r["file"] for r in merged["runs"]] == [CPU.name, "ops_nocompile.json", "2026-11-30_h200_model.json",
                                                   "2026-11-30_h200_graphs.json"]
    assert merged["runs"][2]["date"] == "2026-11-30T18:56:26+00:00"
    assert {r["suite"] for r in merged["records"] if r["run"] == 1} == {"ops"}


def test_gpu_targets_apply_to_a_run_on_an_indexed_cuda_device():
    """`--device cuda:1` records bench_device "cuda:1": still a GPU run, checked against the GPU targets."""
    results = load_results([str(H200)])
    results["environment"]["bench_device"] = "cuda:1"
    checks = check_targets(results)
    assert not [c for c in checks if c.target.startswith("CPU")]
    assert find(checks, "inference ≥ 2×", "mosaic_infer_single_b64", "fast", run=1)


@pytest.mark.parametrize("json_name", ["2026-11-30_h200_run2.json", "2026-12-03_cpu-2core-zen5.json",
                                       "2026-12-02_cpu-2core-zen3_s16.json", "2026-12-02_cpu-2core-zen4.json",
                                       "2026-12-02_cpu-2core-zen1.json"])
def test_readme_tables_are_the_render_of_the_committed_json(json_name, tmp_path):
    """README's Performance tables are what `--from-json … --markdown` writes from the JSON it cites, line
    for line, so no figure in README can drift from the committed results."""
    md = tmp_path / "t.md"
    assert main(["--from-json", str(RESULTS / json_name), "--markdown", str(md)]) == 0
    readme = (RESULTS.parents[1] / "README.md").read_text()
    rendered = md.read_text().strip()  # one table per run, each under its environment line
    assert rendered.count("| case |") == (3 if "h200" in json_name else 1)
    assert rendered in readme, f"README differs from the render of {json_name}"


def test_baseline_columns_are_not_judged():
    """"three launches" is a baseline of the grouped kernel: a fast-path target never applies to it."""
    record = {"suite": "ops", "name": "mos_adapter_mixed_B32_fwd", "params": {},
              "times_s": {"reference": 1e-3, "fast": 2e-4, "three launches": 9e-4}}
    env = {"device": "H200", "dtype": "bfloat16", "bench_device": "cuda"}
    checks = check_targets({"environment": env, "records": [record]})
    assert checks and {c.column for c in checks} == {"fast"}


def test_markdown_names_the_cpu_of_a_cpu_run():
    """A CPU run's table says which CPU it ran on (ratios differ between CPU generations); a GPU run's does
    not (its device is the GPU), nor a CPU run recorded before the field existed."""
    from mosaic_fast.bench.run import markdown_table

    record = {"suite": "ops", "name": "x", "params": {}, "times_s": {"reference": 2e-3, "fast": 1e-3},
              "speedup_vs_reference": {"fast": 2.0}}
    env = {"device": "cpu (2 threads)", "dtype": "float32", "torch": "2", "triton": "3", "date": "d",
           "bench_device": "cpu", "cpu": "AMD EPYC (family 25, model 17; AVX-512)"}
    assert markdown_table({"environment": env, "records": [record]}).startswith(
        "cpu (2 threads), AMD EPYC (family 25, model 17; AVX-512), float32, torch 2")
    old = {k: v for k, v in env.items() if k != "cpu"}
    assert markdown_table({"environment": old, "records": [record]}).startswith("cpu (2 threads), float32")
    gpu = {**env, "bench_device": "cuda", "device": "NVIDIA H200"}
    assert markdown_table({"environment": gpu, "records": [record]}).startswith("NVIDIA H200, float32")


def test_markdown_names_the_commit_a_run_measured():
    """A run recorded from a git checkout names the commit before its date in the environment line; an
    installed package's run and runs recorded before the field existed do not."""
    from mosaic_fast.bench.run import markdown_table

    record = {"suite": "ops", "name": "x", "params": {}, "times_s": {"reference": 2e-3, "fast": 1e-3},
              "speedup_vs_reference": {"fast": 2.0}}
    env = {"device": "NVIDIA H200", "dtype": "bfloat16", "torch": "2", "triton": "3", "date": "d",
           "bench_device": "cuda", "source": "git 033a1ae + uncommitted changes"}
    first_line = markdown_table({"environment": env, "records": [record]}).splitlines()[0]
    assert first_line == "NVIDIA H200, bfloat16, torch 2, triton 3, git 033a1ae + uncommitted changes, d"
    installed = {**env, "source": "installed package (no git checkout)"}
    assert markdown_table({"environment": installed, "records": [record]}).splitlines()[0].endswith("triton 3, d")
