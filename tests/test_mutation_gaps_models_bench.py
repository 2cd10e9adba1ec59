"""Mutation-test gaps of the code changed since the last passes (bench.core's graph-break record, bench.run's
--device / --filter / Markdown header, DynaMer's key-mismatch error, MosaicModel.forward_packed's hook check,
the q/k/v kernel shape check, the missing-file report of find_all_npz, the resume checks and the resumed
schedule) and of mosaic_fast.graphs, whose replay logic runs here on a stand-in for CUDA-graph capture:
each test pins one behaviour a plausible edit could change without any other test noticing."""

from __future__ import annotations

import argparse
import contextlib
import logging

import pytest
import torch

import mosaic_fast.graphs as graphs
from mosaic_fast.bench.core import _not_scalar_capture_advice, counting_graph_breaks
from mosaic_fast.bench.run import _device_name, markdown_table
from mosaic_fast.engine import checkpoint as ckpt_io
from mosaic_fast.graphs import CUDAGraphInference, CUDAGraphTraining
from mosaic_fast.models.dynamer import describe_key_mismatch

# ------------------------------------------------------------------------------------------ bench.core


def test_graph_breaks_are_counted_per_block_by_the_first_line_of_their_reason():
    """Only the breaks of the block are recorded (the counter is process-wide: an earlier case's breaks are
    not this one's), keyed by the first line of the reason; a reason that did not recur is not listed."""
    from torch._dynamo.utils import counters

    old, new, new_elsewhere, still = ("mut-gap: earlier break\ndetails", "  mut-gap: new break\nwhere it was\n",
                                      "mut-gap: new break\nelsewhere", "mut-gap: silent\nx")
    try:
        counters["graph_break"][old] += 3  # another case's breaks
        counters["graph_break"][still] += 1
        reasons: dict[str, int] = {}
        with counting_graph_breaks(reasons):
            counters["graph_break"][old] += 2
            counters["graph_break"][new] += 1
            counters["graph_break"][new_elsewhere] += 1  # same first line: one entry
        assert reasons == {"mut-gap: earlier break": 2, "mut-gap: new break": 2}
        again: dict[str, int] = {}
        with counting_graph_breaks(again):  # the same case once more: the same figures, not the running total
            counters["graph_break"][old] += 2
        assert again == {"mut-gap: earlier break": 2}
    finally:
        for key in (old, new, new_elsewhere, still):
            counters["graph_break"].pop(key, None)


def test_only_dynamos_scalar_capture_advice_is_kept_out_and_only_during_the_block():
    def record(message):
        return logging.LogRecord("torch._dynamo.variables.tensor", logging.WARNING, __file__, 1, message, None, None)

    assert not _not_scalar_capture_advice(record("set torch._dynamo.config.capture_scalar_outputs = True"))
    assert _not_scalar_capture_advice(record("Graph break from `Tensor.item()`"))  # other messages stay
    logger = logging.getLogger("torch._dynamo.variables.tensor")
    with counting_graph_breaks({}):
        assert _not_scalar_capture_advice in logger.filters
    assert _not_scalar_capture_advice not in logger.filters  # nothing outside the bench is silenced


# ------------------------------------------------------------------------------------------ bench.run


@pytest.mark.parametrize("text", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(text):
    assert _device_name(text) == text


@pytest.mark.parametrize("text", ["cudax1", "cuda1", "cuda:", "cuda:x", "cuda:-1", "CPU", "mps"])
def test_device_names_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected cpu, cuda or cuda:N"):
        _device_name(text)


def _results(env):
    record = {"suite": "ops", "name": "a", "params": {}, "times_s": {"reference": 2e-3, "fast": 1e-3},
              "speedup_vs_reference": {"fast": 2.0}}
    base = {"dtype": "float32", "torch": "2.9", "triton": "3.5", "date": "D1"}
    return {"environment": {**base, **env}, "records": [record]}


def test_markdown_header_names_the_cpu_of_a_cpu_run_and_the_code_measured():
    """DESIGN §6: the table says what was measured. A CPU run names its processor, a GPU run its GPU only
    (its record may hold the host's CPU too); a run recorded with its git source names it."""
    cpu = markdown_table(_results({"device": "cpu", "bench_device": "cpu", "cpu": "AMD EPYC 9R45",
                                   "source": "git 1234abc (clean)"}))
    assert cpu.splitlines()[0] == "cpu, AMD EPYC 9R45, float32, torch 2.9, triton 3.5, git 1234abc (clean), D1"
    gpu = markdown_table(_results({"device": "NVIDIA H200", "bench_device": "cuda", "cpu": "Intel Xeon",
                                   "source": "installed package"}))
    assert gpu.splitlines()[0] == "NVIDIA H200, float32, torch 2.9, triton 3.5, D1"


# ------------------------------------------------------------------------------------------ DynaMer keys


def test_key_mismatch_lists_six_keys_then_counts():
    six = [f"k{i}" for i in range(6)]
    assert describe_key_mismatch(six, [], set()) == "backbone state_dict does not fit: missing keys " + ", ".join(six)
    seven = [*six, "k6"]
    assert describe_key_mismatch([], seven, set()) == (
        "backbone state_dict does not fit: unexpected keys " + ", ".join(six) + ", … (7 in all)")
    assert describe_key_mismatch(["a"], ["b"], set()) == (
        "backbone state_dict does not fit: missing keys a; unexpected keys b")


def test_key_mismatch_names_the_prefix_only_when_stripping_it_gives_every_missing_key():
    own = {"cls_token", "pos_embed", "norm.weight"}
    # a whole model's state_dict: every backbone key is there under "backbone_med."
    whole = ["backbone_med.cls_token", "backbone_med.norm.weight", "backbone_med.pos_embed", "head.weight"]
    message = describe_key_mismatch(sorted(own), whole, own)
    assert message.endswith(". The keys carry the prefix 'backbone_med.' (a whole model's state_dict?): pass "
                            "{k.removeprefix('backbone_med.'): v for k, v in state.items() "
                            "if k.startswith('backbone_med.')}")
    # a nested prefix: the one that gives the backbone's keys is named, not the outer one
    nested = ["module.backbone_med.cls_token", "module.backbone_med.norm.weight", "module.backbone_med.pos_embed"]
    assert "prefix 'module.backbone_med.'" in describe_key_mismatch(sorted(own), nested, own)
    # under the prefix only part of the backbone: stripping it would not fit, so no hint
    partial = ["backbone_med.cls_token", "backbone_med.norm.weight"]
    assert "prefix" not in describe_key_mismatch(sorted(own), partial, own)
    # extra keys that are no backbone key under any prefix: no prefix to name
    assert describe_key_mismatch([], ["extra.thing"], own) == (
        "backbone state_dict does not fit: unexpected keys extra.thing")


def test_backbone_load_refuses_extra_keys():
    from mosaic_fast.models import DynaMerModel

    model = DynaMerModel(num_classes=3, img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=4, fast=False)
    state = {**model.backbone_med.state_dict(), "adapter.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"backbone state_dict does not fit: unexpected keys adapter\.weight$"):
        model.load_backbone("med", state)


# ------------------------------------------------------------------------------------------ resume checks


def test_resume_refuses_the_same_datasets_in_another_order():
    """The order of --datasets is the order of the heads: the same names in another order would train each
    head on another dataset's labels."""
    refused, _ = ckpt_io.resume_differences({"datasets": ["BloodMNIST", "PathMNIST"]},
                                            {"datasets": ["PathMNIST", "BloodMNIST"]})
    assert refused == ["datasets: trained on BloodMNIST,PathMNIST (now PathMNIST,BloodMNIST)"]


def test_resume_refuses_a_model_option_only_the_current_settings_have():
    refused, noted = ckpt_io.resume_differences({"model": {"depth": 2}}, {"model": {"depth": 2, "embed_dim": 64}})
    assert refused == ["embed_dim None (now 64)"] and noted == []


def test_resume_notes_data_and_demo_differences_without_refusing(tmp_path):
    saved = {"datasets": ["BloodMNIST"], "data": {"root": "/a", "size_2d": 64, "size_3d": 28},
             "args": {"demo": True}}
    current = {"datasets": ["BloodMNIST"], "data": {"root": "/b", "size_2d": 64}, "args": {"demo": 1}}
    assert ckpt_io.resume_differences(saved, current) == ([], ["data root /a (now /b)"])  # (size_3d: not known now)
    current["args"] = {"demo": False}
    noted = ckpt_io.check_resume_config(tmp_path / "last.pt", saved, current)
    assert noted == ["data root /a (now /b)", "--demo on (now off)"]


# ------------------------------------------------------------------------------------------ graphs (CPU stand-in)


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: what the captured call registered re-runs on replay, on the
    buffers it was captured with (a CUDA graph's static memory)."""

    capturing: _FakeGraph | None = None

    def __init__(self):
        self.kernels, self.replays = [], 0

    def replay(self):
        self.replays += 1
        with torch.no_grad():  # (a replay records nothing for autograd)
            for kernel in self.kernels:
                kernel()


class _FakeStream:
    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


@contextlib.contextmanager
def _fake_capture(graph):
    _FakeGraph.capturing = graph
    try:
        yield
    finally:
        _FakeGraph.capturing = None


@pytest.fixture
def fake_graph_capture(monkeypatch):
    monkeypatch.setattr(graphs, "_check_cuda_args", lambda args, who: None)  # (tested in test_graphs.py)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _fake_capture)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


def _graphable(log):
    """``x * w + y.sum()``, written to a static output buffer at capture and recomputed into it on replay;
    every call logged as (captured?, grad enabled?)."""
    w = torch.randn(5, requires_grad=True)

    def fn(x, y):
        log.append((_FakeGraph.capturing is not None, torch.is_grad_enabled()))
        out = x * w + y.sum()
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.kernels.append(lambda: out.copy_(x * w + y.sum()))
        return {"out": out, "tag": "kept"}

    return fn, w


def test_inference_replay_reads_fresh_inputs_and_returns_its_own_copy(fake_graph_capture):
    log = []
    fn, w = _graphable(log)
    replay = CUDAGraphInference(fn, warmup=2)
    xs = [(torch.randn(5), torch.randn(3)) for _ in range(3)]
    kept = [x.clone() for pair in xs for x in pair]
    results = [replay(*pair) for pair in xs]
    for (x, y), got in zip(xs, results):  # each call's result is that call's, not overwritten by later replays
        torch.testing.assert_close(got["out"], (x * w + y.sum()).detach())
        assert got["tag"] == "kept" and not got["out"].requires_grad
    for before, after in zip(kept, (x for pair in xs for x in pair)):
        assert torch.equal(before, after)  # the callers' tensors are not the graph's input buffers
    assert log == [(False, False), (False, False), (True, False)]  # warm-up x2, then one capture, all no-grad
    assert len(replay._graphs) == 1 and next(iter(replay._graphs.values())).graph.replays == 3


def test_inference_replay_captures_once_per_signature_and_key(fake_graph_capture):
    log = []
    fn, w = _graphable(log)
    rho = [0.5]
    replay = CUDAGraphInference(fn, warmup=1, key=lambda: rho[0])
    x, y = torch.randn(5), torch.randn(3)
    replay(x, y)
    replay(torch.randn(5), torch.randn(3))  # same signature
    replay(x, torch.randn(4))  # another shape
    replay(x.double(), y)  # another dtype
    rho[0] = 0.25  # another key (e.g. another keep ratio)
    got = replay(x, y)
    torch.testing.assert_close(got["out"], (x * w + y.sum()).detach())
    assert len(replay._graphs) == 4 and sum(captured for captured, _ in log) == 4


def test_training_replay_signature_covers_requires_grad_and_autocast(monkeypatch):
    """A new capture when an input's requires_grad or the autocast state differs (a graph captured without
    autocast would replay fp32 kernels under autocast); the samples keep requires_grad (the captured
    backward must produce the inputs' gradients) and the warm-up count is passed on."""
    captures = []

    def fake_make_graphed_callables(module, samples, num_warmup_iters, allow_unused_input):
        captures.append(([s.requires_grad for s in samples], num_warmup_iters))
        return module

    monkeypatch.setattr(graphs, "_check_cuda_args", lambda args, who: None)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    model = torch.nn.Linear(4, 3)
    replay = CUDAGraphTraining(model, lambda m, x: m(x), warmup=5)
    x = torch.randn(2, 4)
    replay(x)
    replay(x.clone().requires_grad_())
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    try:
        torch.set_autocast_enabled("cuda", True)
        replay(x)
        torch.set_autocast_dtype("cuda", torch.float16 if dtype == torch.bfloat16 else torch.bfloat16)
        replay(x)
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)
    replay(x)  # back to the first signature: no new capture
    assert captures == [([False], 5), ([True], 5), ([False], 5), ([False], 5)]


def test_training_capture_restores_a_disabled_autocast_cache(monkeypatch):
    monkeypatch.setattr(graphs, "_check_cuda_args", lambda args, who: None)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda module, *a, **k: module)
    cache = torch.is_autocast_cache_enabled()
    try:
        torch.set_autocast_cache_enabled(False)
        CUDAGraphTraining(torch.nn.Linear(4, 3), lambda m, x: m(x))(torch.randn(2, 4))
        assert not torch.is_autocast_cache_enabled()  # the caller's setting, not "on"
    finally:
        torch.set_autocast_cache_enabled(cache)


# ------------------------------------------------------------------------------------------ data files


def test_find_all_npz_reports_the_missing_ones_with_the_present_ones_to_keep(tmp_path):
    from mosaic_fast.data.npz import find_all_npz

    (tmp_path / "breastmnist_64.npz").write_bytes(b"")
    (tmp_path / "pathmnist.npz").write_bytes(b"")
    found = find_all_npz(tmp_path, [("PathMNIST", 28, None), ("BreastMNIST", None, 128)])
    assert found == [(tmp_path / "pathmnist.npz", 28), (tmp_path / "breastmnist_64.npz", 64)]
    with pytest.raises(FileNotFoundError) as error:
        find_all_npz(tmp_path, [("BreastMNIST", None, None), ("PathMNIST", 64, None)])
    assert str(error.value) == (
        f"1 of 2 datasets has no file in {tmp_path}; looked for\n  PathMNIST: pathmnist_64.npz\nPut the official "
        "MedMNIST files there, or run again with --download to fetch them (from Zenodo, through the medmnist "
        "package). Or use the 1 present ones only: --datasets breastmnist")


def test_find_npz_says_when_the_data_folder_does_not_exist(tmp_path):
    from mosaic_fast.data.npz import find_npz

    with pytest.raises(FileNotFoundError) as error:
        find_npz(tmp_path / "nowhere", "PathMNIST", 28)
    assert str(error.value).startswith(f"PathMNIST: no file pathmnist.npz in {tmp_path / 'nowhere'} (no such folder). ")
    with pytest.raises(FileNotFoundError) as error:
        find_npz(tmp_path, "PathMNIST", 28)
    assert f"in {tmp_path}. Put the official MedMNIST file there" in str(error.value)


def test_refusal_names_every_difference_and_the_demo_hint_only_when_demo_was_dropped(tmp_path):
    saved = {"model": {"depth": 2}, "data": {"root": "/a"}, "args": {"demo": True}}
    path = tmp_path / "last.pt"
    with pytest.raises(ValueError) as error:
        ckpt_io.check_resume_config(path, saved, {"model": {"depth": 3}, "data": {"root": "/b"}, "args": {}})
    assert str(error.value) == (
        f"--resume {path} was trained with other options than these: depth 2 (now 3); data root /a (now /b). "
        "Resume with the options it was trained with; they are recorded in the checkpoint's config['args'] "
        "(it was trained with --demo: add --demo)")
    with pytest.raises(ValueError) as error:
        ckpt_io.check_resume_config(path, saved, {"model": {"depth": 3}, "args": {"demo": True}})
    assert "--demo" not in str(error.value)  # given again: nothing to add


def test_resume_needs_every_part_of_last_pt(tmp_path):
    """A checkpoint lacking any of the optimizer, scheduler or position cannot resume (named, not a KeyError
    half-way through loading)."""
    full = {"student_state_dict": {}, "teacher_state_dict": {}, "optimizer_state_dict": {},
            "scheduler_state_dict": {}, "progress": {}}
    for key in ("optimizer_state_dict", "scheduler_state_dict", "progress"):
        torch.save({k: v for k, v in full.items() if k != key}, tmp_path / "last.pt")
        with pytest.raises(ValueError, match=rf"cannot resume training: it lacks \['{key}'\]"):
            ckpt_io.load_for_resume(tmp_path)
    torch.save(full, tmp_path / "last.pt")
    assert ckpt_io.load_for_resume(tmp_path)[0] == tmp_path / "last.pt"


# ------------------------------------------------------------------------------------------ MosaicModel packing


def _packed_and_separate(model, batches):
    return model.forward_packed(batches), [model.forward_features(x, e) for x, e in batches]


def _small_fast_model():
    from mosaic_fast.models import MosaicModel

    torch.manual_seed(0)
    model = MosaicModel([3], embed_dim=32, depth=2, num_heads=4, img_size_2d=16, patch_size_2d=8, img_size_3d=16,
                        patch_size_3d=8, task_experts=["A"], fast=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "up_proj" in name:  # (zero at init: the adapters would add nothing)
                p.normal_(0.0, 0.1)
    return model


_BATCHES = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 2])), (torch.randn(1, 1, 16, 16, 16), "C")]


@pytest.mark.filterwarnings("ignore:.*a global module hook is registered")
def test_forward_packed_honours_encoder_and_global_hooks():
    """forward_packed equals the per-batch forward_features also when a hook on the encoder or a global
    module hook would see (or change) what the packed blocks bypass."""
    model = _small_fast_model()
    handle = model.encoder.register_forward_hook(lambda m, args, out: out * 2)
    try:
        got, want = _packed_and_separate(model, _BATCHES)
    finally:
        handle.remove()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(type(m).__name__) if type(m).__name__ == "Block" else None)
    try:
        with torch.no_grad():
            model.forward_packed(_BATCHES)
    finally:
        handle.remove()
    assert seen == ["Block"] * 4  # two blocks, two batches


def test_forward_packed_runs_a_block_subclass_own_forward():
    from mosaic_fast.nn.vit import Block

    class ScaledBlock(Block):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * 0.5

    model = _small_fast_model()
    model.encoder.blocks[1].__class__ = ScaledBlock
    got, want = _packed_and_separate(model, _BATCHES)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_vit_weights_path_that_is_a_folder_is_not_a_weights_file(tmp_path):
    from mosaic_fast.models.weights import VIT_B16_URL, require_weights_file

    with pytest.raises(FileNotFoundError, match=f"ViT weights not found: {tmp_path}. .*{VIT_B16_URL}"):
        require_weights_file(tmp_path)


# ------------------------------------------------------------------------------------------ resumed schedule


def test_resumed_scheduler_reports_the_lr_the_optimizer_uses(tmp_path):
    """After a resume with another --lr, LambdaLR's get_last_lr() is the lr of the new schedule that the
    optimizer now uses (base_lr x schedule(round)), not the checkpoint's."""
    from test_train import NAMES, _trainer

    from mosaic_fast.data.synthetic import write_synthetic_npz
    from mosaic_fast.engine.trainer import RoundSchedule

    root = tmp_path / "data"
    for i, name in enumerate(NAMES):
        write_synthetic_npz(root, name, 28, (48, 16, 16), seed=i)
    _trainer(root, tmp_path, max_steps=1).fit()
    resumed = _trainer(root, tmp_path, num_rounds=3, warmup_rounds=0, lr=6e-3)
    resumed.resume(tmp_path / "last.pt")
    want = 6e-3 * RoundSchedule(3, 0, 6e-3, 1e-6)(resumed.scheduler.last_epoch)
    assert resumed.scheduler.get_last_lr() == pytest.approx([want])
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(want)
