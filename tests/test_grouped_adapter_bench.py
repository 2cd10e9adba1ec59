"""The grouped-adapter benchmark cases build, run, and compare the same function on the same inputs."""

import torch
from parity import assert_parity

from mosaic_fast.bench.cases_adapter import cases
from mosaic_fast.bench.core import Case, time_case


def test_quick_cases_run_and_agree():
    all_cases = cases(torch.device("cpu"), torch.float32, quick=True)
    assert len(all_cases) == 8
    names = {c.name for c in all_cases}
    assert len(names) == len(all_cases)
    for case in all_cases:
        assert isinstance(case, Case)
        assert set(case.impls) == {"reference", "fast"}
        assert case.floor_bytes > 0 and case.floor_flops > 0
        inputs = case.make_inputs(0)
        h = inputs[0]
        assert float(h.detach().abs().sum()) > 0
        if case.params["pass"] == "fwd":
            ref = case.impls["reference"](*inputs)
            fast = case.impls["fast"](*inputs)
            assert_parity(fast, ref, 1e-5)
        else:
            # each implementation on its own fresh inputs returns this call's dh; 1e-3: one ReLU unit
            # rounding to the other side of zero in either fp32 computation moves dh by ~5e-4
            ref, fast = (impl(*case.make_inputs(0)) for impl in (case.impls["reference"], case.impls["fast"]))
            assert_parity(fast, ref, 1e-3, f"{case.name} dh")


def test_floors_follow_design():
    case = next(c for c in cases(torch.device("cpu"), torch.bfloat16, quick=True) if c.name.endswith("mixed_B8_fwd"))
    T, D = 8 * 197, 768
    assert case.floor_bytes > 3 * T * D * 2
    assert case.floor_bytes < 3 * T * D * 2 + 4 * 1024 * 1024
    r_rows = sum([64, 96, 192][i % 3] for i in range(8)) * 197
    assert case.floor_flops == 4 * D * r_rows


def test_time_case_smoke():
    case = cases(torch.device("cpu"), torch.float32, quick=True)[0]
    record = time_case(case, torch.device("cpu"), rotate=2, with_compile=False, min_run_time=0.05)
    assert set(record["times_s"]) == {"reference", "fast"}
