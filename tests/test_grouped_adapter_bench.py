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
        # DESIGN §6: mixed batches also run "grouped A/B/C vs three launches"
        mixed = case.params["routing"] == "mixed"
        assert set(case.impls) == {"reference", "fast", *(["three launches"] if mixed else [])}
        assert case.floor_bytes > 0 and case.floor_flops > 0
        inputs = case.make_inputs(0)
        h = inputs[0]
        assert float(h.detach().abs().sum()) > 0
        others = [label for label in case.impls if label != "reference"]
        if case.params["pass"] == "fwd":
            ref = case.impls["reference"](*inputs)
            for label in others:
                assert_parity(case.impls[label](*inputs), ref, 1e-5, f"{case.name} {label}")
        else:
            # each implementation on its own fresh inputs returns this call's dh; 1e-3: one ReLU unit
            # rounding to the other side of zero in either fp32 computation moves dh by ~5e-4
            ref = case.impls["reference"](*case.make_inputs(0))
            for label in others:
                assert_parity(case.impls[label](*case.make_inputs(0)), ref, 1e-3, f"{case.name} {label} dh")


def test_three_launches_put_every_sample_back_in_place():
    """The three-launch baseline gathers each specialist's samples, so its outputs must be un-permuted:
    with ids not sorted by specialist (and one specialist absent) it equals the grouped launch."""
    from mosaic_fast.bench.cases_adapter import _modules, _three_launches

    _, fast = _modules(torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(3)
    h, base = (torch.randn(5, 7, 768, generator=gen) for _ in range(2))
    for ids in ([2, 0, 2, 0, 0], [1, 2, 0, 1, 2]):
        eid = torch.tensor(ids)
        assert_parity(_three_launches(fast, h, base, eid), fast.forward_fused(h, base, eid), 1e-6, str(ids))


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
    assert set(record["times_s"]) == set(case.impls)
