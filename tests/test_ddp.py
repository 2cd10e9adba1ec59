"""torchrun + DDP (gloo, CPU): two processes agree with one process, in training and in evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_cli import TINY_MODEL

from mosaic_fast.data.synthetic import write_synthetic_npz
from mosaic_fast.engine import checkpoint as ckpt_io

NAMES = ("BreastMNIST", "ChestMNIST", "AdrenalMNIST3D")
TINY = [*TINY_MODEL, "--reference_model"]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("mixed", [False, True], ids=["cyclic", "mixed"])
def test_two_gloo_processes_match_one_process(tmp_path, mixed):
    for i, name in enumerate(NAMES):
        write_synthetic_npz(tmp_path / "data", name, 28, (32, 8, 8), seed=i)
    common = ["train", "--data_root", str(tmp_path / "data"), "--datasets", ",".join(NAMES), *TINY,
              "--num_rounds", "2", "--warmup_rounds", "0", "--lr", "1e-3", "--max_steps", "4", "--device", "cpu"]
    if mixed:
        common.append("--mixed-batches")
    _run([sys.executable, "-m", "mosaic_fast.cli", *common, "--batch_size", "8", "--output_dir", "one"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "mosaic_fast.cli", *common, "--batch_size", "4", "--output_dir", "two"], tmp_path)
    one = ckpt_io.load(tmp_path / "one" / "last.pt")
    two = ckpt_io.load(tmp_path / "two" / "last.pt")
    assert one["progress"]["global_step"] == two["progress"]["global_step"] == 4
    initial = None
    for key in ("student_state_dict", "teacher_state_dict"):
        for name, p_one in one[key].items():
            p_two = two[key][name]
            if name.endswith("attn.qkv.bias"):
                # The key bias gets an exactly-zero gradient (softmax is shift-invariant), so its update is
                # Adam-normalised rounding noise of order lr; compare the query and value biases only.
                d = p_one.numel() // 3
                p_one, p_two = torch.cat([p_one[:d], p_one[2 * d :]]), torch.cat([p_two[:d], p_two[2 * d :]])
            torch.testing.assert_close(p_two, p_one, rtol=1e-4, atol=1e-5, msg=f"{key}: {name}")
        initial = one[key]
    from mosaic_fast.models import MosaicModel  # the run did move the weights: the check is not vacuous

    torch.manual_seed(42)
    fresh = MosaicModel(**{"num_classes_list": (9, 7, 4, 2, 14, 2, 8, 8, 5, 11, 11, 11, 11, 2, 2, 2, 3, 2),
                           "embed_dim": 32, "depth": 1, "num_heads": 2, "img_size_2d": 28, "patch_size_2d": 7,
                           "img_size_3d": 28, "patch_size_3d": 14, "adapter_bottleneck_a": 8,
                           "adapter_bottleneck_b": 8, "adapter_bottleneck_c": 16, "fast": False}).state_dict()
    assert any(not torch.equal(fresh[k], initial[k]) for k in fresh)


def test_eval_under_two_gloo_processes_matches_one_process(tmp_path):
    """Sharded evaluation in a real process group: each rank predicts its share of every split and the
    logits gathered from the ranks go back in file order, so two processes print the one-process table.
    (Synthetic labels are random: logits gathered out of order would change ACC and AUC.)"""
    for i, name in enumerate(NAMES):
        write_synthetic_npz(tmp_path / "data", name, 28, (32, 8, 11), seed=i)
    data = ["--data_root", str(tmp_path / "data"), "--datasets", ",".join(NAMES), "--device", "cpu"]
    _run([sys.executable, "-m", "mosaic_fast.cli", "train", *data, *TINY, "--num_rounds", "1", "--warmup_rounds",
          "0", "--lr", "1e-2", "--max_steps", "3", "--batch_size", "8", "--output_dir", "run"], tmp_path)
    evaluate = ["-m", "mosaic_fast.cli", "eval", "--checkpoint", "run/last.pt", *data, "--split", "test",
                "--eval_batch_size", "4"]
    _run([sys.executable, *evaluate, "--output_dir", "one"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *evaluate,
          "--output_dir", "two"], tmp_path)
    one = json.loads((tmp_path / "one" / "eval_test_medmnist.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_test_medmnist.json").read_text())
    for model in ("student", "teacher"):
        for name in NAMES:
            for metric in ("acc", "auc"):
                assert two[model][name][metric] == pytest.approx(one[model][name][metric], abs=1e-6), (model, name)
