"""Frozen weights are cast for autocast once (nn/frozen_cast.py): same results as plain autocast, fewer casts,
and never a stale cast after the weight changes."""

import collections
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.nn import frozen_cast


class CountCasts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def frozen_pair():
    torch.manual_seed(0)
    ref = reference.Mlp(16, 64)
    fast = fast_nn.convert(copy.deepcopy(ref))
    assert type(fast) is fast_nn.Mlp
    for m in (ref, fast):
        m.requires_grad_(False)
    return ref, fast


def run(module, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return module(x)


def test_same_bits_as_autocast_and_fewer_casts():
    ref, fast = frozen_pair()
    x = torch.randn(3, 5, 16)
    assert torch.equal(run(fast, x), run(ref, x))
    counts = {}
    for name, module in (("ref", ref), ("fast", fast)):
        with CountCasts() as mode:
            out = run(module, x)
        counts[name] = mode.counts["_to_copy"]
    assert counts["ref"] - counts["fast"] == 4, counts  # fc1/fc2 weight and bias, cast once already
    assert out.dtype == torch.bfloat16 and torch.equal(out, run(ref, x))
    casts = frozen_cast.cached_casts(fast)  # what the benchmark counts as memory the model holds
    assert sorted(t.numel() for t in casts) == sorted(p.numel() for p in fast.parameters())
    assert all(t.dtype == torch.bfloat16 for t in casts)


def test_cast_follows_in_place_updates_devices_and_dtypes():
    ref, fast = frozen_pair()
    x = torch.randn(2, 4, 16)
    run(fast, x)
    with torch.no_grad():
        for m in (ref, fast):
            m.fc1.weight.mul_(-2.0)  # bumps the version counter
    assert torch.equal(run(fast, x), run(ref, x))
    fast.load_state_dict({k: v * 0.5 for k, v in ref.state_dict().items()})
    ref.load_state_dict(fast.state_dict())
    assert torch.equal(run(fast, x), run(ref, x))
    fast.double()  # new storage: the autocast dtype now differs from a new weight dtype
    ref.double()
    assert torch.equal(run(fast, x.double()), run(ref, x.double()))
    assert list(fast.state_dict()) == list(ref.state_dict())


def test_trainable_weights_are_not_cached_and_get_gradients():
    _, fast = frozen_pair()
    fast.fc2.requires_grad_(True)
    x = torch.randn(2, 4, 16)
    run(fast, x).float().sum().backward()
    assert fast.fc2.weight.grad is not None and fast.fc1.weight.grad is None
    cached = {id(p) for p in (fast.fc1.weight, fast.fc1.bias)}
    assert set(frozen_cast._CASTS[fast]) == cached
    teacher = copy.deepcopy(fast)
    assert teacher not in frozen_cast._CASTS, "a deep copy carried the casts along"


def test_without_autocast_nothing_is_cast_or_cached():
    ref, fast = frozen_pair()
    x = torch.randn(2, 4, 16)
    with CountCasts() as mode:
        out = fast(x)
    assert mode.counts["_to_copy"] == 0 and fast not in frozen_cast._CASTS
    assert torch.equal(out, ref(x))


def test_casts_made_under_inference_mode_do_not_leak_into_training():
    _, fast = frozen_pair()
    fast.fc2.bias.requires_grad_(True)
    x = torch.randn(2, 4, 16, requires_grad=True)
    with torch.inference_mode():
        run(fast, x.detach())
    run(fast, x).float().sum().backward()  # would raise if an inference tensor were saved for backward
    assert x.grad is not None and fast.fc2.bias.grad is not None
