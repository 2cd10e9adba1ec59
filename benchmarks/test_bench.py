"""pytest-benchmark entry points for the cases of ``mosaic-fast bench``.

Run with ``pytest benchmarks/ --benchmark-only`` (CPU: the quick shapes; CUDA: the real ones, bf16).
Ratios between implementations are read from pytest-benchmark's comparison table.
"""

import itertools

import pytest
import torch

from mosaic_fast.bench.run import SUITES, collect_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = collect_cases(list(SUITES), DEVICE, DTYPE, quick=DEVICE.type == "cpu")
PARAMS = [pytest.param(case, label, id=f"{case.name}-{label}") for case in CASES for label in case.impls]


@pytest.mark.parametrize("case, label", PARAMS)
def test_case(benchmark, case, label):
    inputs = itertools.cycle([case.make_inputs(i) for i in range(3)])
    fn = case.impls[label]
    benchmark.group = case.name
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        fn(*next(inputs))
        sync()

    benchmark(run)
