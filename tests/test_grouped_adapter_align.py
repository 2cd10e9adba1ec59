"""Alignment hints of the grouped adapter kernels (kernels/grouped_adapter.py, R_ALIGNED).

The kernels may tell the compiler that every group's offset and width in the packed R dimension are multiples
of 16 (vector loads of Wu's tiles) only when every bottleneck is: then so is every offset, and an invalid
group's width 0. Tested here: the launchers' flag, that every grouped kernel gets it and keys its autotuning on
it, the benchmark rows without hints, and parity against the reference with aligned and unaligned bottlenecks,
forward and backward (DESIGN.md §5). The interpreter ignores the hints, so parity shows that both paths compute
the same; tests/sm90_compile.py compiles both for sm_90.
"""

from collections.abc import Callable
from functools import partial

import pytest
import torch
from benchmark_scripts import load_benchmark_script
from test_grouped_adapter import MIXED, _tol, make_weights, run_parity
from triton.runtime.jit import KernelInterface

from mosaic_fast.kernels import grouped_adapter as kernels

ALIGNED = [32, 16, 48]
UNALIGNED = [24, 8, 40]


@pytest.mark.parametrize(
    "rs, aligned",
    [([64, 96, 192], True), ([16], True), (ALIGNED, True), (UNALIGNED, False), ([64, 24, 192], False), ([8], False)],
)
def test_flag_holds_exactly_when_every_offset_and_width_is_a_multiple_of_16(monkeypatch, rs, aligned):
    assert kernels._r_aligned(rs) is aligned
    table = kernels._meta(rs, torch.device("cpu"))
    assert bool((table % 16 == 0).all()) is aligned
    monkeypatch.setattr(kernels, "ALIGN_HINTS", False)
    assert kernels._r_aligned(rs) is False


def test_autotuners_key_on_the_flag():
    """A config timed with the hints is never reused without them (the compiled kernels differ anyway: the flag
    is a constexpr)."""
    tuners = (kernels._fwd_two_pass, kernels._fwd_one_pass, kernels._fwd_both, kernels._up, kernels._bwd_dh,
              kernels._bwd_w)  # fmt: skip
    assert all("R_ALIGNED" in tuner.keys for tuner in tuners)


def _launched_flags(monkeypatch, call: Callable[[], object]) -> list[bool]:
    """R_ALIGNED of every kernel launch ``call`` makes (recorded, nothing runs)."""
    flags = []
    with monkeypatch.context() as m:
        m.setattr(KernelInterface, "__getitem__", lambda kernel, grid: lambda *a, **kw: flags.append(kw["R_ALIGNED"]))
        call()
    return flags


@pytest.mark.parametrize("hints", [True, False])
@pytest.mark.parametrize("rs", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
def test_every_grouped_kernel_gets_the_flag(monkeypatch, rs, hints):
    """Split forward (forward + up projection) and backward (dh + weight gradients): four launches."""
    monkeypatch.setattr(kernels, "ALIGN_HINTS", hints)
    monkeypatch.setattr(kernels, "FORWARD_VARIANT", "split")
    T, D = 30, 32
    h, weights = torch.randn(T, D), make_weights(D, rs)
    ids = MIXED[:3] % len(rs)

    def both():
        kernels.forward(h, h, ids, T // 3, *weights, rs, 0.1, 1e-5, True)
        stats = torch.zeros(T)
        kernels.backward(h, h, ids, T // 3, *weights, rs, stats, stats, torch.zeros(T, max(rs)), 0.1, 1e-5, True, True)

    assert _launched_flags(monkeypatch, both) == [hints and rs is ALIGNED] * 4


def test_tune_script_rows_without_hints(triton_backend, monkeypatch):
    """benchmarks/tune_grouped_adapter.py: the "no alignment hints" rows launch without them, the others with."""
    tune = load_benchmark_script("tune_grouped_adapter")
    d, n = 32, 4
    dev = torch.device(triton_backend)
    h_sets = [torch.randn(3, n, d, device=dev) for _ in range(3)]
    ids = torch.tensor([0, 1, 2], device=dev)
    weights = tune._weights(d, ALIGNED, dev, torch.float32)
    with torch.no_grad():
        rows = {**tune._variants(h_sets, h_sets, ids, weights, ALIGNED, dev),
                **tune._backward_variants(h_sets, ids, weights, ALIGNED, dev)}  # fmt: skip
        unhinted = [name for name in rows if name.endswith("no alignment hints")]
        assert len(unhinted) == 3
        for name in unhinted:
            hinted = name.removesuffix(", no alignment hints")
            assert set(_launched_flags(monkeypatch, partial(rows[hinted], 0))) == {True}
            assert set(_launched_flags(monkeypatch, partial(rows[name], 0))) == {False}
    assert kernels.ALIGN_HINTS is True


@pytest.mark.parametrize("variant", ["fused", "split"])
@pytest.mark.parametrize("rs", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
def test_parity_with_aligned_and_unaligned_bottlenecks(triton_backend, monkeypatch, variant, rs):
    monkeypatch.setattr(kernels, "FORWARD_VARIANT", variant)
    flags = []
    r_aligned = kernels._r_aligned
    monkeypatch.setattr(kernels, "_r_aligned", lambda b: flags.append(r_aligned(b)) or flags[-1])
    run_parity(triton_backend, torch.float32, (5, 6, 32), rs, MIXED, True, *_tol(triton_backend))
    assert flags == [rs is ALIGNED] * 2  # forward and backward
