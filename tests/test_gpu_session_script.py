"""benchmarks/gpu_session.sh, the script a lent GPU runs, checked on CPU: a lent GPU has 15 minutes, so a
misspelt stage, a bench flag that no longer exists or a ``--filter`` that matches no case must fail here,
not there (a filter that matches nothing among several is otherwise dropped without a word)."""

from __future__ import annotations

import re
import shlex
import subprocess
from functools import cache
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark_script

from mosaic_fast.bench import run as bench_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _script_text() -> str:
    return SCRIPT.read_text().replace("\\\n", " ")


def _stage_commands() -> dict[str, str]:
    """Each stage of the script's ``case`` and its command line (continuations joined)."""
    body = _script_text().split('for stage in "$@"; do\n  case $stage in', 1)[1]
    commands = {}
    for match in re.finditer(r"^\s{4}([\w|-]+)\)(.*?);;", body, re.M | re.S):
        for stage in match.group(1).split("|"):
            commands[stage] = match.group(2)
    return commands


def _declared_stages() -> set[str]:
    return set(re.search(r'^stages="([^"]+)"', SCRIPT.read_text(), re.M).group(1).split())


def _python_calls(command: str, stage: str) -> list[tuple[str, list[str]]]:
    """``(program, argv)`` of each ``python3 PROGRAM ...`` in a stage's command, with the script's variables
    given the values they have there."""
    calls = []
    for match in re.finditer(r"python3 (-m pytest|benchmarks/\w+\.py)(.*?)(?=\s2>|\s\||$)", command, re.S):
        argv = match.group(2).replace('"$stage"', stage).replace("$stage", stage)
        argv = argv.replace("$OUT", "/out").replace("${tag}", "tag")
        calls.append((match.group(1), shlex.split(argv)))
    return calls


@cache
def _case_names(suite: str) -> tuple[str, ...]:
    """The bench's case names of ``suite`` (quick CPU shapes: the names differ from the GPU's in batch only)."""
    suites = list(bench_run.SUITES) if suite == "all" else [suite]
    failures: list[dict] = []
    cases = bench_run.collect_cases(suites, torch.device("cpu"), torch.float32, True, with_compile=False,
                                    failures=failures)
    assert not failures, failures
    return tuple(c.name for c in cases)


def _documented_runs() -> list[tuple[str, list[str]]]:
    """Every ``bash benchmarks/gpu_session.sh STAGE ...`` in the script's header, README.md and NOTES.md."""
    runs = []
    for path in (SCRIPT, ROOT / "README.md", ROOT / "benchmarks" / "NOTES.md"):
        for match in re.finditer(r"bash benchmarks/gpu_session\.sh((?: [a-z][\w-]*)+)", path.read_text()):
            runs.append((path.name, match.group(1).split()))
    return runs


def test_the_script_parses_and_refuses_an_unknown_stage_before_installing_anything():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    done = subprocess.run(["bash", str(SCRIPT), "tests", "modle"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "unknown stage 'modle'" in done.stdout
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "usage:" in done.stdout


def test_every_stage_is_declared_and_every_declared_stage_runs_something():
    assert set(_stage_commands()) == _declared_stages()
    for stage, command in _stage_commands().items():
        assert _python_calls(command, stage), stage


def test_every_documented_invocation_names_existing_stages():
    runs = _documented_runs()
    assert len(runs) >= 5, runs  # the header's examples and the plan in NOTES at least
    for where, stages in runs:
        assert set(stages) <= _declared_stages(), (where, stages)


def test_each_documented_call_leaves_at_most_eight_files_in_out():
    """The device tool brings back at most 8 files from $OUT per call, so a planned call (the script's header,
    NOTES.md) that writes more would lose some (README's user on their own GPU has no such limit)."""
    commands = _stage_commands()
    for where, stages in (run for run in _documented_runs() if run[0] != "README.md"):
        files = {path for stage in stages
                 for path in re.findall(r'\$OUT/([^"\s]+)', commands[stage].replace("$stage", stage))}
        assert len(files) <= 8, (where, stages, sorted(files))


@pytest.mark.parametrize("stage", sorted(_stage_commands()))
def test_each_stage_calls_its_programs_with_arguments_they_accept(stage, pytestconfig):
    for program, argv in _python_calls(_stage_commands()[stage], stage):
        if program == "-m pytest":
            names = {m.split(":")[0] for m in pytestconfig.getini("markers")}
            expression = argv[argv.index("-m") + 1]
            assert set(re.findall(r"\w+", expression)) - {"and", "or", "not"} <= names, expression
            assert argv[-1] == "tests"
        elif program == "benchmarks/run.py":
            args = bench_run.parse_args(argv)
            assert args.device == "cuda" and args.json_path
            for text in args.filter or []:
                assert any(text in name for name in _case_names(args.suite)), (stage, text)
        elif program == "benchmarks/profile_cases.py":
            args = load_benchmark_script("profile_cases").parse_args(argv)
            for text in args.filter:
                assert any(text in name for name in _case_names(args.suite)), (stage, text)
        elif program == "benchmarks/tune_grouped_adapter.py":
            assert not load_benchmark_script("tune_grouped_adapter").parse_args(argv).smoke
        else:
            pytest.fail(f"stage {stage} runs {program}, which this test does not know")
