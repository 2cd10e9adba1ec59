"""CUDA-graph inference replay (mosaic_fast.graphs): argument errors here, replay parity on a GPU."""

import pytest
import torch
from parity import TOL_BF16, assert_parity

from mosaic_fast.graphs import CUDAGraphInference, CUDAGraphTraining
from mosaic_fast.models import DynaMerModel, MosaicModel


def test_rejects_cpu_tensors_and_bad_arguments():
    replay = CUDAGraphInference(torch.relu)
    with pytest.raises(TypeError, match="argument 0 is a tensor on cpu"):
        replay(torch.randn(3))
    with pytest.raises(TypeError, match="argument 0 is int"):
        replay(4)
    with pytest.raises(TypeError, match="fn must be callable"):
        CUDAGraphInference(3)
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphInference(torch.relu, warmup=0)


def _check_replays(replay, fn, make_inputs):
    for seed in range(3):  # fresh inputs each call: the replay must read them, not the captured ones
        inputs = make_inputs(seed)
        with torch.no_grad():
            want = fn(*inputs)
        assert_parity(replay(*inputs).float(), want.float(), 1e-6 if want.dtype == torch.float32 else TOL_BF16)


def test_cuda_dynamer_replay_matches_eager(cuda_device):
    model = DynaMerModel(5, img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, skip_mode="block",
                         keep_ratio=0.5).to(cuda_device).eval()
    replay = CUDAGraphInference(model, key=lambda: model.keep_ratio)

    def images(seed):
        return (torch.randn(4, 3, 64, 64, device=cuda_device),)

    _check_replays(replay, model, images)
    model.keep_ratio = 0.25  # another ρ keeps fewer tokens: another graph
    _check_replays(replay, model, images)
    assert len(replay._graphs) == 2


def test_cuda_mosaic_replay_matches_eager(cuda_device):
    model = MosaicModel(embed_dim=64, depth=2, num_heads=4, fast=True).to(cuda_device).eval()
    ids = torch.tensor([0, 1, 1, 0], device=cuda_device)
    replay = CUDAGraphInference(model.forward_features)
    _check_replays(replay, model.forward_features, lambda s: (torch.randn(4, 3, 224, 224, device=cuda_device), ids))


def test_cuda_mosaic_replay_reads_weights_updated_in_place(cuda_device):
    """An EMA teacher's weights change in place between replays: the replay must see them (the fast
    adapters' packed copy of a mixed batch is not frozen at capture)."""
    model = MosaicModel(embed_dim=64, depth=2, num_heads=4, fast=True).to(cuda_device).eval()
    ids = torch.tensor([0, 1, 2, 0], device=cuda_device)
    x = torch.randn(4, 3, 224, 224, device=cuda_device)
    replay = CUDAGraphInference(model.forward_features)
    replay(x, ids)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter" in name:
                p.add_(torch.randn_like(p) * 0.05)
        want = model.forward_features(x, ids)
    assert_parity(replay(x, ids), want, 1e-6, "replay after an in-place weight update")


def test_training_replay_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        CUDAGraphTraining(torch.relu, lambda m, x: m(x))
    with pytest.raises(TypeError, match="call must be callable"):
        CUDAGraphTraining(torch.nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphTraining(torch.nn.Linear(2, 2), lambda m, x: m(x), warmup=0)
    with pytest.raises(TypeError, match="argument 0 is a tensor on cpu"):
        CUDAGraphTraining(torch.nn.Linear(2, 2), lambda m, x: m(x))(torch.randn(2))


def _train_steps(model, batches, graphed: bool, autocast: bool):
    """Losses and trainable parameters after a few SGD steps, the student eager or replayed. (SGD, not
    Adam: Adam's normalised update would turn last-bit gradient noise of near-zero gradients into
    lr-sized parameter differences.)"""
    model.train()
    model.freeze_backbone(verbose=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    replays = {}
    losses = []
    for x, ids, y in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            if not graphed:
                feats, logits = model(x, task_id=0, expert_id=ids)
            elif isinstance(ids, str):
                replay = replays.setdefault(ids, CUDAGraphTraining(model, lambda m, x, e=ids: m(x, 0, False, e)))
                feats, logits = replay(x)
            else:
                replay = replays.setdefault("ids", CUDAGraphTraining(model, lambda m, x, e: m(x, 0, False, e)))
                feats, logits = replay(x, ids)
            loss = torch.nn.functional.cross_entropy(logits.float(), y) + feats.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("routing", ["A", "ids"])
def test_cuda_graphed_training_steps_match_eager(cuda_device, routing, autocast):
    torch.manual_seed(0)
    eager = MosaicModel(embed_dim=64, depth=2, num_heads=4, img_size_2d=32, fast=True).to(cuda_device)
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if "up_proj" in name:
                p.normal_(0.0, 0.05)
    graphed = MosaicModel(embed_dim=64, depth=2, num_heads=4, img_size_2d=32, fast=True).to(cuda_device)
    graphed.load_state_dict(eager.state_dict())
    initial = [p.detach().clone() for p in graphed.parameters() if p.requires_grad]
    batches = []
    for seed in range(4):  # fresh inputs every step: the replay must read them
        g = torch.Generator().manual_seed(seed)
        ids = "A" if routing == "A" else torch.randint(0, 3, (4,), generator=g).to(cuda_device)
        batches.append((torch.randn(4, 3, 32, 32, generator=g).to(cuda_device), ids,
                        torch.randint(0, 9, (4,), generator=g).to(cuda_device)))
    want_losses, want_params = _train_steps(eager, batches, graphed=False, autocast=autocast)
    got_losses, got_params = _train_steps(graphed, batches, graphed=True, autocast=autocast)
    tol = TOL_BF16 if autocast else 1e-4
    assert_parity(got_losses, want_losses, tol, "losses")
    for got, want in zip(got_params, want_params):  # (some stay zero: specialists a letter does not route to)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1e-3)))
    assert any(not torch.equal(p, q) for p, q in zip(got_params, initial)), "nothing trained"


@pytest.mark.parametrize("routing", ["A", "ids"])
def test_cuda_bench_train_step_with_graphs_matches_eager(cuda_device, routing):
    """The benchmark's replayed MOSAIC step (student fwd+bwd and EMA-teacher forward replayed; AdamW and
    the in-place EMA update eager) trains the student and the teacher as the eager step does."""
    from mosaic_fast.bench.cases_model import TrainStep

    torch.manual_seed(0)
    models = [MosaicModel(embed_dim=64, depth=2, num_heads=4, img_size_2d=32, fast=True).to(cuda_device)
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    steps = [TrainStep(m, cuda_device, torch.float32, graphs=g) for m, g in zip(models, (False, True))]
    for step in steps:  # SGD instead of the step's AdamW: see _train_steps
        step.opt = torch.optim.SGD([p for p in step.model.parameters() if p.requires_grad], lr=0.05)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        ids = "A" if routing == "A" else torch.randint(0, 3, (4,), generator=g).to(cuda_device)
        x = torch.randn(4, 3, 32, 32, generator=g).to(cuda_device)
        y = torch.randint(0, 9, (4,), generator=g).to(cuda_device)
        for step in steps:
            step(x, ids, y, ("A",) if routing == "A" else ("A", "B", "C"))
    for (name, want), got in zip(steps[0].teacher.model.state_dict().items(),
                                 steps[1].teacher.model.state_dict().values()):
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"teacher {n}: {m}")
    for (name, want), got in zip(models[0].named_parameters(), models[1].parameters()):
        if want.requires_grad:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"student {n}: {m}")


def test_bench_step_replays_one_graph_per_routing():
    """The benchmark step's replay cache (CPU-testable part): a letter is baked into its captured call,
    per-sample ids are passed as a graph input, and each routing is captured once."""
    from mosaic_fast.bench.cases_model import TrainStep

    made, seen = [], []

    def make(call):  # stands in for CUDAGraphTraining / CUDAGraphInference
        made.append(call)
        return call

    def fn(x, e):
        seen.append(e)
        return x

    cache, x, ids = {}, torch.zeros(2), torch.tensor([0, 1])
    for routing in ("A", "A", ids, "C", ids):
        TrainStep._replayed(cache, make, fn, x, routing)
    assert len(made) == 3 and set(cache) == {"A", "C", "ids"}
    assert seen[:2] == ["A", "A"] and seen[2] is ids and seen[3] == "C"


def test_training_replay_captures_once_per_signature(monkeypatch):
    """CPU-testable logic of CUDAGraphTraining (capture stubbed): one capture per input signature and
    training flag, autocast's cache off during capture and restored after, the module's parameters
    reachable by the captured callable, and the call's result returned."""
    import mosaic_fast.graphs as graphs

    captures = []

    def fake_make_graphed_callables(module, samples, num_warmup_iters, allow_unused_input):
        captures.append((torch.is_autocast_cache_enabled(), [s.shape for s in samples],
                         {id(p) for p in module.parameters()}))
        return module

    monkeypatch.setattr(graphs, "_check_cuda_args", lambda args, who: None)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    model = torch.nn.Linear(4, 3)
    replay = CUDAGraphTraining(model, lambda m, x: m(x) * 2)
    x = torch.randn(5, 4)
    torch.testing.assert_close(replay(x), model(x) * 2)
    replay(torch.randn(5, 4))  # same signature: no new capture
    replay(torch.randn(2, 4))  # new shape
    model.eval()
    replay(torch.randn(2, 4))  # new training flag
    assert [c[1] for c in captures] == [[(5, 4)], [(2, 4)], [(2, 4)]]
    assert all(c[2] == {id(model.weight), id(model.bias)} for c in captures)
    assert torch.is_autocast_cache_enabled()
    assert not any(c[0] for c in captures), "autocast's cache must be off while capturing"
