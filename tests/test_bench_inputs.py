"""What the benchmark times: in-place implementations get their inputs back between timed calls, floors
count all the work, a replayed training step's memory includes its CUDA-graph pools, and the tune
script's "cuBLAS" backward is the torch ops' backward."""

import json
import sys
import time
import types

import pytest
import torch
from benchmark_scripts import load_benchmark_script

import mosaic_fast
from mosaic_fast.bench import cases_model, cases_moe
from mosaic_fast.bench.core import Case, Rotating, pristine_copy, time_case


def test_in_place_implementation_is_timed_on_its_original_inputs():
    """An implementation that writes into its inputs must not be timed on what earlier calls left there
    (here the values would double at every call and overflow): every call sees a pristine input set."""
    seen: dict[str, list[float]] = {"reference": [], "fast": []}

    def doubling(label):
        def run(x):
            seen[label].append(float(x.abs().max()))
            return x.mul_(2.0) if label == "fast" else x * 2.0
        return run

    def make(i):
        return (torch.randn(64, 64, generator=torch.Generator().manual_seed(i)),)

    case = Case("ops", "toy", {}, make, {"reference": doubling("reference"), "fast": doubling("fast")},
                mutates_inputs=True)
    record = time_case(case, torch.device("cpu"), rotate=3, with_compile=False, min_run_time=0.01, repeats=2)
    pristine = {float(make(i)[0].abs().max()) for i in range(3)} | {float(make(10_000)[0].abs().max())}
    assert record["rel_error_vs_reference"]["fast"] == 0.0
    for label, values in seen.items():
        assert len(values) > 20 and set(values) <= pristine, label


def test_rotating_restores_only_used_sets_and_keeps_the_rest():
    sets = [(torch.zeros(3),), (torch.ones(3),)]
    runner = Rotating(lambda x: x.add_(5.0), sets, pristine_copy(sets))
    runner()
    assert float(sets[0][0].sum()) == 15.0 and float(sets[1][0].sum()) == 3.0
    runner.restore()
    assert float(sets[0][0].sum()) == 0.0 and float(sets[1][0].sum()) == 3.0
    plain = Rotating(lambda x: x.add_(1.0), [(torch.zeros(2),)])
    plain()
    plain.restore()  # nothing to restore without a pristine copy
    assert float(plain.input_sets[0][0].sum()) == 2.0


def test_moe_skip_fast_path_sees_fresh_inputs_and_routing():
    """The MoE skipping op updates its inputs in place; timed as is, its rows converge to a fixed point
    and the top-k routing collapses onto two experts within ~50 calls. The cases declare it and every
    timed call of "fast" sees one of the original input sets."""
    case = next(c for c in cases_moe.cases(torch.device("cpu"), torch.float32, quick=True)
                if c.name == "moe_skip_rho1")
    assert case.mutates_inputs
    originals = {round(float(case.make_inputs(i)[0].double().sum()), 6) for i in (0, 1, 2, 10_000)}
    seen = []
    fast = case.impls["fast"]

    def watched(xg, *rest):
        seen.append(round(float(xg.double().sum()), 6))
        return fast(xg, *rest)

    case.impls["fast"] = watched
    record = time_case(case, torch.device("cpu"), rotate=3, with_compile=False, min_run_time=0.02, repeats=1)
    assert len(seen) > 10 and set(seen) <= originals
    assert record["rel_error_vs_reference"]["fast"] < 1e-5


def test_moe_floors_count_the_gate_router_and_weights():
    """Real shapes (bf16): the per-stream gate Linear(D, D) is the op's largest GEMM and belongs in the
    flops floor; bytes read the token pairs once, write the updated rows, and read the weights."""
    cfg = cases_moe._config(quick=False)
    b, n, d, r, k, e = (cfg[key] for key in ("batch", "tokens", "dim", "bottleneck", "top_k", "experts"))
    by_name = {c.name: c for c in cases_moe.cases(torch.device("cpu"), torch.bfloat16, quick=False)}
    full = by_name["moe_adapter"]
    per_row = k * (4 * d * r + 2 * r * d) + 2 * d * e + 2 * d * d
    assert full.floor_flops == 2 * b * n * per_row
    weights = 2 * (e * (2 * d * r + r + d * r + d) + 2 * (d * e + e) + 2 * (d * d + d))
    assert full.floor_bytes == pytest.approx(4 * b * n * d * 2 + weights)
    half = by_name["moe_skip_rho0.5"]
    kept = 99  # ⌈0.5 · 197⌉
    assert half.floor_flops == 2 * b * kept * per_row
    # the union of two independent selections of 99 tokens lies between 99 and 197 tokens
    assert 4 * b * kept * d * 2 + weights < half.floor_bytes < (2 * b * n * d + 2 * b * kept * d) * 2 + weights
    m4oe = by_name["m4oe_adapter_expert"]
    assert m4oe.floor_bytes > 2 * b * n * d * 2  # activations plus the specialists' and gate's weights


class _FakeStep:
    """A training step whose first call "captures" a CUDA graph (a private pool segment) and whose replays
    allocate only 100 MB beyond the baseline."""

    def __init__(self, memory):
        self.memory, self.calls = memory, 0
        self.model, self.teacher = torch.nn.Linear(1, 1), types.SimpleNamespace(model=torch.nn.Linear(1, 1))
        self.opt = types.SimpleNamespace(state={}, zero_grad=lambda set_to_none=True: None)

    def __call__(self, *inputs):
        self.calls += 1
        if self.calls == 1:
            self.memory["segments"].append({"address": 1 << 40, "total_size": 5 << 30, "segment_pool_id": (1, 0)})
        self.memory["peak"] = max(self.memory["peak"], self.memory["allocated"] + (100 << 20))


def test_training_peak_memory_counts_the_graph_pool_of_a_replayed_step(monkeypatch):
    memory = {"allocated": 2 << 30, "peak": 2 << 30,
              "segments": [{"address": 1, "total_size": 2 << 30, "segment_pool_id": (0, 0)},
                           {"address": 2, "total_size": 1 << 30, "segment_pool_id": (7, 0)}]}  # another graph's
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda *a: memory["allocated"])
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: memory["peak"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a: memory.update(peak=memory["allocated"]))
    monkeypatch.setattr(cuda, "memory_snapshot", lambda *a: [dict(s) for s in memory["segments"]])
    peak = cases_model._peak_memory(_FakeStep(memory), (), torch.device("cuda"))
    assert peak == (5 << 30) + (100 << 20)  # the step's pool and its eager peak; not the other graph's pool


def test_tune_cublas_backward_is_the_torch_path(monkeypatch):
    """`benchmarks/tune_grouped_adapter.py` builds its variants on backend "triton"; the "bwd: cuBLAS
    autograd" row must still differentiate the torch ops (recorded on "auto"), not the kernels' Function."""
    tune = load_benchmark_script("tune_grouped_adapter")
    from mosaic_fast.ops import grouped_adapter as ga

    recorded = []
    apply = ga.GroupedAdapterFunction.apply
    monkeypatch.setattr(ga.GroupedAdapterFunction, "apply", lambda *a: recorded.append(1) or apply(*a))
    d, n, rs = 16, 4, [8]
    h_sets = [torch.randn(1, n, d) for _ in range(3)]
    weights = tune._weights(d, rs, torch.device("cpu"), torch.float32)
    mosaic_fast.set_backend("triton")
    variants = tune._backward_variants(h_sets, None, weights, rs, torch.device("cpu"))
    assert mosaic_fast.get_backend() == "triton"
    mosaic_fast.set_backend("auto")
    variants["bwd: cuBLAS autograd"](0)
    assert not recorded


@pytest.mark.kernels
@pytest.mark.parametrize("autotune", [True, False])
def test_tune_forced_configs_run_the_config_they_name(triton_backend, monkeypatch, autotune):
    """Each "kernel one-pass/two-pass ..." row of the tune script launches exactly its config, with
    autotuning on or off (MOSAIC_FAST_AUTOTUNE=0 sends "auto" to the two-pass autotuner), and leaves the
    forward variant and the autotuners as they were."""
    tune = load_benchmark_script("tune_grouped_adapter")
    from mosaic_fast.kernels import grouped_adapter as kernels

    monkeypatch.setattr(kernels, "AUTOTUNE", autotune)
    launched = []
    real_fwd_for = kernels._fwd_for

    def recording(variant):  # the configs of the autotuner the kernels' forward launches
        tuner = real_fwd_for(variant)
        if sys._getframe(1).f_code is kernels.forward.__code__:
            launched.append([c.all_kwargs() for c in tuner.configs])
        return tuner

    monkeypatch.setattr(kernels, "_fwd_for", recording)
    d, rs = 32, [8, 16]
    dev = torch.device(triton_backend)
    h_sets = [torch.randn(2, 4, d, device=dev) for _ in range(2)]
    ids = torch.tensor([0, 1], device=dev)
    weights = tune._weights(d, rs, dev, torch.float32)
    variants = tune._variants(h_sets, [None, None], ids, weights, rs, dev)
    before = {name: list(real_fwd_for(name).configs) for name in kernels.FORWARD_VARIANTS}
    forced = {name: run for name, run in variants.items() if name.startswith(("kernel one-pass", "kernel two-pass"))}
    assert len(forced) == len(kernels._fwd_configs())
    for cfg, (name, run) in zip(kernels._fwd_configs(), forced.items()):
        launched.clear()
        run(0)
        assert launched == [[cfg.all_kwargs()]], name
    assert kernels.FORWARD_VARIANT == "auto"
    assert {name: list(real_fwd_for(name).configs) for name in kernels.FORWARD_VARIANTS} == before


def test_tune_floors_include_the_weights():
    tune = load_benchmark_script("tune_grouped_adapter")
    ceilings = {"bytes_per_s": 1.0, "flops_bf16": 1e30}  # memory-bound: the floors are byte counts
    t, d, rs = 197, 768, [64, 96, 192]
    fwd, bwd = tune.floors(t, d, rs, [64, 96, 192], 197, 2, ceilings)
    weights = sum(2 * d + 2 * r * d + r + d for r in rs) * 2
    assert fwd == 3 * t * d * 2 + weights and bwd == 3 * t * d * 2 + 2 * weights


def test_profile_of_an_in_place_implementation_gives_each_call_its_own_inputs():
    profile_cases = load_benchmark_script("profile_cases")
    seen = []
    x = torch.ones(8)

    def in_place(t):
        seen.append(float(t.sum()))
        return t.mul_(3.0)

    profile_cases.profile_impl(in_place, (x,), torch.device("cpu"), calls=2, rows=5, mutates_inputs=True)
    assert seen == [8.0] * 5 and float(x.sum()) == 8.0


def test_kernel_column_leaves_the_chosen_backend_alone():
    """The "kernel" columns switch to backend "triton" for their own calls only: a run under
    MOSAIC_FAST_BACKEND=torch must keep timing the other columns on "torch"."""
    from mosaic_fast.bench.core import on_triton_backend

    inside = []
    mosaic_fast.set_backend("torch")
    on_triton_backend(lambda: inside.append(mosaic_fast.get_backend()))()
    assert inside == ["triton"] and mosaic_fast.get_backend() == "torch"


def test_training_steps_are_compared_from_one_common_state():
    """A training step updates its weights, so the timed steps cannot be compared with each other: the
    case builds fresh steps from the same weights and compares the clipped gradients of one step. A fast
    step that trains another specialist, or skips the clipping, is flagged."""
    from mosaic_fast.bench.core import output_errors

    case = cases_model.training_cases(torch.device("cpu"), torch.float32, quick=True, with_compile=False)[0]
    errors = output_errors(case, case.impls)
    assert set(errors) == {"fast"} and errors["fast"] < 1e-4
    build = case.agreement_impls

    def with_fast(wrap):
        def make():
            steps = build()
            steps["fast"] = wrap(steps["fast"])
            return steps
        return make

    case.agreement_impls = with_fast(lambda fast: lambda x, ids, y, experts: fast(x, "B", y, ("B",)))
    assert output_errors(case, case.impls)["fast"] > 0.5

    def unclipped(fast):
        def run(*inputs):
            clip = torch.nn.utils.clip_grad_norm_
            torch.nn.utils.clip_grad_norm_ = lambda *a, **k: None
            try:
                return fast(*inputs)
            finally:
                torch.nn.utils.clip_grad_norm_ = clip
        return run

    case.agreement_impls = with_fast(unclipped)
    assert output_errors(case, case.impls)["fast"] > 0.5


def test_restore_puts_back_only_the_sets_used_since_the_last_restore():
    """A restore copies back the sets used since the previous restore, not every set ever used (each
    extra copy costs time between calls and warms caches for the next one)."""
    sets = [(torch.zeros(3),), (torch.zeros(3),)]
    copies = []
    runner = Rotating(lambda x: x.add_(1.0), sets, pristine_copy(sets))
    runner()
    runner.restore()
    runner()  # the second set
    original = torch.Tensor.copy_
    try:
        torch.Tensor.copy_ = lambda self, src, *a, **k: copies.append(self) or original(self, src, *a, **k)
        runner.restore()
    finally:
        torch.Tensor.copy_ = original
    assert len(copies) == 1 and copies[0] is sets[1][0]
    assert float(sets[0][0].sum()) == 0.0 and float(sets[1][0].sum()) == 0.0


def test_agreement_compares_only_the_implementations_being_timed():
    """``agreement_impls`` may build more implementations than the case times (e.g. a "kernel" column
    that failed its warm-up): only the labels passed in are compared."""
    from mosaic_fast.bench.core import output_errors

    def make(i):
        return (torch.randn(4, 4, generator=torch.Generator().manual_seed(i)),)

    def broken(x):
        raise AssertionError("not timed, must not be compared")

    fresh = {"reference": lambda x: x * 2.0, "fast": lambda x: x + x, "kernel": broken}
    case = Case("ops", "toy", {}, make, {"reference": lambda x: x * 3.0, "fast": lambda x: x * 3.0},
                agreement_impls=lambda: dict(fresh))
    assert output_errors(case, dict(case.impls)) == {"fast": 0.0}
    assert output_errors(case, {"fast": case.impls["fast"]}) == {}  # no reference timed: nothing to compare


def test_agreement_steps_train_their_own_copies_of_the_common_weights(monkeypatch):
    """Each extra timed column ("compiled", "kernel", "fast+graphs") gets its agreement step on its own
    copy of the reference's or the fast model's weights, copied before any step runs: sharing a model
    would let one step's update (and gradients) leak into another's."""
    built = []

    class Recording:
        def __init__(self, model, device, dtype, compile_model=False, graphs=False):
            built.append((model, compile_model, graphs))
            self.computed = lambda *inputs: []

    monkeypatch.setattr(cases_model, "TrainStep", Recording)
    monkeypatch.setattr(cases_model, "_pair", lambda cfg, device: (torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    labels = ("reference", "fast", "compiled", "kernel", "fast+graphs")
    steps = cases_model._agreement_steps({}, torch.device("cpu"), torch.float32, labels)
    assert set(steps) == set(labels)
    (compiled, c_opt, _), (kernel, _, _), (graphed, _, g_opt), (ref, _, _), (fast, _, _) = built
    assert c_opt and g_opt
    for twin, source in ((compiled, ref), (kernel, fast), (graphed, fast)):
        assert twin is not source and all(p is not q for p, q in zip(twin.parameters(), source.parameters()))
        assert all(torch.equal(p, q) for p, q in zip(twin.parameters(), source.parameters()))
    built.clear()
    assert set(cases_model._agreement_steps({}, torch.device("cpu"), torch.float32, ("reference", "fast"))) == {
        "reference", "fast"}
    assert len(built) == 2  # nothing built for columns not timed


def test_compiled_training_step_is_compared_with_the_reference():
    """The "compiled" column of a training step (torch.compile of the reference) is checked too."""
    from mosaic_fast.bench.core import output_errors

    case = cases_model.training_cases(torch.device("cpu"), torch.float32, quick=True, with_compile=True)[0]
    errors = output_errors(case, {k: case.impls[k] for k in ("reference", "compiled")})
    assert set(errors) == {"compiled"} and errors["compiled"] < 1e-4


def test_dynamer_cases_compile_the_reference_where_they_compile_the_fast_model():
    """DESIGN §6 wants torch.compile of the reference next to the fast path: on CUDA the block-mode cases
    at the compiled ρ get both columns (each ρ is a two-backbone compile); CPU runs stay eager."""
    from mosaic_fast.bench import cases_dynamer

    cuda = {c.name: c for c in cases_dynamer.cases(torch.device("cuda"), torch.bfloat16, quick=True)}
    compiled = sorted(n for n, c in cuda.items() if c.compile_reference)
    assert compiled == sorted(n for n, c in cuda.items() if "fast+compiled" in c.impls)
    assert compiled == ["dynamer_block_rho0.5", "dynamer_block_rho1"]
    cpu = cases_dynamer.cases(torch.device("cpu"), torch.float32, quick=True)
    assert not any(c.compile_reference or "fast+compiled" in c.impls for c in cpu)


def test_tune_writes_each_row_as_it_is_measured(tmp_path, monkeypatch):
    """gpu_session.sh runs the tune script under `timeout`: a run cut short must leave the rows it measured
    in its JSON (it used to write the file only at the end), and print each row when measured."""
    tune = load_benchmark_script("tune_grouped_adapter")
    monkeypatch.setattr(tune, "profile", lambda *a, **k: "profile tables")
    first = dict(routing="single", B=1, variant="kernel (autotuned)", ms=1.5, pct_floor=50.0)

    def cut_short(*args, **kwargs):
        yield first
        yield dict(routing="single", B=1, variant="split kernels (autotuned)", error="OutOfResources: shared")
        raise TimeoutError("killed by the stage's time limit")

    monkeypatch.setattr(tune, "run", cut_short)
    out = tmp_path / "tune.json"
    with pytest.raises(TimeoutError):
        tune.main(["--smoke", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"][0] == first and saved["rows"][1]["error"].startswith("OutOfResources")
    assert set(saved["ceilings"]) == {"bytes_per_s", "flops_bf16"}


@pytest.mark.slow
def test_tune_smoke_run_measures_every_row(tmp_path, capsys, monkeypatch):
    """`tune_grouped_adapter.py --smoke` (the plumbing check README and NOTES give for CPU) runs every row under
    the interpreter: each forward and backward variant, hinted and unhinted, both routings, a time and no error,
    and the printed rows are the saved ones. Each row is timed once after its warm-up call, not sampled
    repeatedly (the interpreter takes seconds per backward row)."""
    from mosaic_fast.backend import INTERPRET

    if not INTERPRET:
        pytest.skip("the smoke run is the interpreter's (CPU tensors)")
    tune = load_benchmark_script("tune_grouped_adapter")

    def once(fn, device, **kwargs):  # what is checked is that every row runs, not its time
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    monkeypatch.setattr(tune, "measure", once)
    out = tmp_path / "tune.json"
    tune.main(["--smoke", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r for r in rows if "error" in r or not r["ms"] > 0] == []
    variants = {(r["routing"], r["variant"]) for r in rows}
    for routing in ("single", "mixed"):
        for name in ("kernel (autotuned)", "bwd: dh + weight kernels", "bwd: dh kernel only"):
            assert {(routing, name), (routing, f"{name}, no alignment hints")} <= variants
    assert ("single", "cuBLAS path (auto)") in variants and ("single", "bwd: cuBLAS autograd") in variants
    printed = capsys.readouterr().out
    assert all(r["variant"] in printed for r in rows) and "== mixed, backend triton" in printed
    assert mosaic_fast.get_backend() == "auto"
