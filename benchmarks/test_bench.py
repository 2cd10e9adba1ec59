"""pytest-benchmark entry points for the cases of ``mosaic-fast bench``.

Run with ``pytest benchmarks/ --benchmark-only`` (CPU: the quick shapes; CUDA: the real ones, bf16).
Ratios between implementations are read from pytest-benchmark's comparison table. The columns are the
runner's ("compiled" = ``torch.compile`` of the reference where the case allows it). As in the runner, each
implementation is first checked against the reference on fresh inputs (a column that computes something
else fails instead of being timed), warmed up twice, and an implementation that writes into its inputs
(``Case.mutates_inputs``) gets them put back before every timed round, untimed.
"""

import pytest
import torch

from mosaic_fast.bench.core import Rotating, case_implementations, output_errors, pristine_copy
from mosaic_fast.bench.run import AGREEMENT_TOLERANCE, SUITES, collect_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = collect_cases(list(SUITES), DEVICE, DTYPE, quick=DEVICE.type == "cpu")
#: The runner's columns: the case's implementations plus torch.compile of the reference where it allows it.
PARAMS = [pytest.param(case, label, id=f"{case.name}-{label}") for case in CASES
          for label in [*case.impls, *(["compiled"] if case.compile_reference and "reference" in case.impls else [])]]
#: Timed rounds of a case whose inputs are put back before each (pytest-benchmark's pedantic mode).
MUTATING_ROUNDS = 50


@pytest.mark.parametrize("case, label", PARAMS)
def test_case(benchmark, case, label):
    fn = case_implementations(case, DEVICE, with_compile=label == "compiled")[label]
    benchmark.group = case.name
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    if label != "reference" and "reference" in case.impls:
        err = output_errors(case, {"reference": case.impls["reference"], label: fn}).get(label)
        tol = AGREEMENT_TOLERANCE[str(DTYPE).removeprefix("torch.")]
        # (None: the case returns no outputs to compare, e.g. a training step)
        assert err is None or err <= tol, f"{case.name}/{label} differs from the reference: relative error {err:.1e}"
    input_sets = [case.make_inputs(i) for i in range(3)]
    runner = Rotating(fn, input_sets, pristine_copy(input_sets) if case.mutates_inputs else None)

    def run():
        runner()
        sync()

    for _ in range(2):  # warm-up: compilation, autotuning, allocator (as the runner does)
        run()
        runner.restore()
    if case.mutates_inputs:
        benchmark.pedantic(run, setup=runner.restore, rounds=MUTATING_ROUNDS, iterations=1)
    else:
        benchmark(run)
