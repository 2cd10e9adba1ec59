"""CUDA-graph inference replay (mosaic_fast.graphs): argument errors here, replay parity on a GPU."""

import pytest
import torch
from parity import TOL_BF16, assert_parity

from mosaic_fast.graphs import CUDAGraphInference
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
