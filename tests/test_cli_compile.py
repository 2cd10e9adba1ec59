"""``train --compile`` / ``eval --compile``: the encoders run compiled on every variant a run meets (more than
Dynamo's default of 8 compiled variants per function), and the run trains what the eager run trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from tiny_cli import TINY_BATCHES, TINY_MODEL
from torch._dynamo.utils import counters

from mosaic_fast.cli import main
from mosaic_fast.data.synthetic import write_synthetic_npz
from mosaic_fast.engine import checkpoint as ckpt_io

# specialists A (PathMNIST), B (BreastMNIST, ChestMNIST: multi-label) and C (a 3D set)
NAMES = ("PathMNIST", "BreastMNIST", "ChestMNIST", "AdrenalMNIST3D")
TINY = [*TINY_MODEL, *TINY_BATCHES, "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters empty before; after, its caches emptied and its recompile limit (which
    ``--compile`` raises) put back, through Dynamo's own config patch (monkeypatch would break the module)."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        yield
    torch._dynamo.reset()


def test_compiled_run_trains_what_the_eager_run_trains(tmp_path: Path, fresh_dynamo, capsys):
    for i, name in enumerate(NAMES):
        write_synthetic_npz(tmp_path / "data", name, 28, (40, 8, 8), seed=i)
    common = ["train", "--data_root", str(tmp_path / "data"), "--datasets", ",".join(NAMES), *TINY,
              "--num_rounds", "1", "--warmup_rounds", "0", "--freeze_backbone"]
    assert main([*common, "--output_dir", str(tmp_path / "eager")]) == 0
    assert counters["frames"]["total"] == 0
    assert main([*common, "--output_dir", str(tmp_path / "compiled"), "--compile"]) == 0
    err = capsys.readouterr().err
    assert "warning: --compile on CPU" in err, err

    # three letters with and without gradients and the last, smaller batches: more variants than the default 8,
    # and every one of them compiled (one past the limit would count as not ok and run eagerly)
    frames = counters["frames"]
    assert frames["total"] > 8, dict(frames)
    assert frames["ok"] == frames["total"], dict(frames)
    assert not any("recompile limit" in reason for reason in counters["unimplemented"]), dict(counters["unimplemented"])

    eager = ckpt_io.load(tmp_path / "eager" / "last.pt")
    compiled = ckpt_io.load(tmp_path / "compiled" / "last.pt")
    assert compiled["progress"]["global_step"] == eager["progress"]["global_step"] > 0
    assert compiled["student_state_dict"].keys() == eager["student_state_dict"].keys()  # no "_orig_mod." prefix
    for key in ("student_state_dict", "teacher_state_dict"):
        for name, want in eager[key].items():
            got = compiled[key][name]
            scale = want.abs().max().clamp_min(1e-6)
            assert ((got - want).abs().max() / scale) < 1e-3, f"{key}: {name}"
    # the comparison is not vacuous: the up-projections start at zero ("lora" init) and were trained
    assert all(eager["student_state_dict"][f"encoder.blocks.0.adapter.expert_{c}.up_proj.weight"].abs().max() > 0
               for c in "abc")

    counters.clear()
    assert main(["eval", "--checkpoint", str(tmp_path / "compiled" / "last.pt"), "--compile", "--device", "cpu",
                 "--output_dir", str(tmp_path / "eval")]) == 0
    assert counters["frames"]["total"] > 0 and counters["frames"]["ok"] == counters["frames"]["total"]
    assert (tmp_path / "eval" / "eval_test_medmnist.json").is_file()


def test_bench_fast_compiled_training_step_takes_the_reference_step(fresh_dynamo):
    """The bench's "fast+compiled" training step (``train --compile``'s encoders; a CUDA column, as on a CPU
    compile is the slower one) leaves the reference step's clipped gradients, from the same weights, on a
    mixed A/B batch."""
    from mosaic_fast.bench import cases_model

    cfg = dict(embed_dim=32, depth=1, num_heads=2, batch=2, batch_3d=1)
    steps = cases_model._agreement_steps(cfg, torch.device("cpu"), torch.float32, ("fast+compiled",))
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(2, 3, 224, 224, generator=g), torch.tensor([0, 1]), torch.randint(0, 9, (2,), generator=g),
              ("A", "B"))
    want = torch.cat([t.flatten() for t in steps["reference"](*inputs)])
    got = torch.cat([t.flatten() for t in steps["fast+compiled"](*inputs)])
    assert want.norm() > 0
    assert (got - want).norm() / want.norm() < 1e-4
    assert counters["frames"]["total"] > 0 and counters["frames"]["ok"] == counters["frames"]["total"]
