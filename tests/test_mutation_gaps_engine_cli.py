"""Tests found missing by mutation testing of the ``mosaic-fast`` commands (engine/config.py, engine/commands.py,
engine/distributed.py, cli.py, cliutil.py, info.py): each checks one behaviour against a value that README.md or
DESIGN.md states (defaults, ranges, which rank does what) that an undetected code change would have broken."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tiny_cli import TINY_MODEL

from mosaic_fast import info
from mosaic_fast.cli import main
from mosaic_fast.data.registry import ALL_DATASETS
from mosaic_fast.data.synthetic import write_synthetic_npz
from mosaic_fast.engine import commands, distributed
from mosaic_fast.engine.config import parse_train_args
from mosaic_fast.engine.distributed import DistInfo

TINY = list(TINY_MODEL)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- config.py: defaults and ranges ---------------------------------------------------------------------------


def test_train_defaults_are_those_of_design_and_readme():
    """DESIGN.md §3 "Training (seed defaults)" / "MoS adapter" / "Tokenizer" and README.md's option notes."""
    a = parse_train_args([])
    expected = {
        # DESIGN §3 Training: AdamW lr 1e-4, wd 0.01, grad clip 1.0, batch 32, warm-up 5 rounds, cosine to 1e-6,
        # patience 5, min_delta 1e-3; EMA 0.9 (A/B), 0.95 (C); consistency weight 0.1.
        "lr": 1e-4, "weight_decay": 0.01, "max_grad_norm": 1.0, "batch_size": 32, "warmup_rounds": 5,
        "min_lr": 1e-6, "early_stopping_patience": 5, "early_stopping_min_delta": 1e-3, "ema_momentum": 0.9,
        "ema_momentum_3d": 0.95, "consist_weight": 0.1,
        # DESIGN §3 MoS adapter / Adapter / Tokenizer; ViT-B: D = 768, 12 blocks, 12 heads.
        "adapter_mode": "v2_moe", "adapter_bottleneck_a": 64, "adapter_bottleneck_b": 96, "adapter_bottleneck_c": 192,
        "adapter_scalar": 0.1, "embed_dim": 768, "depth": 12, "num_heads": 12, "img_size_2d": 224,
        "patch_size_2d": 16, "img_size_3d": 64, "patch_size_3d": 8,
        # README: --num_rounds 50, --seed 42, --data_root ./data, --device auto, --num_workers by device,
        # --precision auto, --metrics medmnist; last.pt every round unless --checkpoint_every N.
        "num_rounds": 50, "seed": 42, "data_root": "./data", "device": "auto", "num_workers": None,
        "precision": "auto", "metrics": "medmnist", "checkpoint_every": 0, "max_steps": None,
        "samples_per_round": None, "mixed_batches": False, "interleaved": False, "freeze_backbone": False,
        "freeze_3d_tokenizer": False, "resume": None, "pretrained": None, "output_dir": "./output",
    }
    got = {k: getattr(a, k) for k in expected}
    assert got == expected
    assert a.datasets == ALL_DATASETS and len(a.datasets) == 18


@pytest.mark.parametrize("num_rounds", [1, 2, 3, 5, 6, 7, 50])
def test_default_warmup_is_five_rounds_capped_below_num_rounds(num_rounds):
    """README: ``--warmup_rounds`` defaults to 5 capped at ``--num_rounds - 1``."""
    assert parse_train_args(["--num_rounds", str(num_rounds)]).warmup_rounds == min(5, num_rounds - 1)


@pytest.mark.parametrize(
    ("argv", "attr", "value"),
    [
        (["--seed", "0"], "seed", 0),
        (["--seed", str(2**32 - 1)], "seed", 2**32 - 1),  # numpy's global generator takes [0, 2**32)
        (["--weight_decay", "0"], "weight_decay", 0.0),
        (["--consist_weight", "0"], "consist_weight", 0.0),
        (["--min_lr", "0"], "min_lr", 0.0),
        (["--early_stopping_min_delta", "0"], "early_stopping_min_delta", 0.0),
        (["--ema_momentum", "1"], "ema_momentum", 1.0),  # [0, 1]: a frozen teacher is allowed
        (["--ema_momentum_3d", "0"], "ema_momentum_3d", 0.0),
        (["--batch_size", "1"], "batch_size", 1),
        (["--checkpoint_every", "0"], "checkpoint_every", 0),
    ],
)
def test_range_boundaries_that_are_accepted(argv, attr, value):
    assert getattr(parse_train_args(argv), attr) == value


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--seed", str(2**32)], "--seed"),
        (["--lr", "0"], "--lr"),
        (["--max_grad_norm", "0"], "--max_grad_norm"),
        (["--ema_momentum_3d", "1.0001"], "--ema_momentum_3d"),
        (["--ema_momentum", "-0.1"], "--ema_momentum"),
        (["--num_rounds", "0"], "--num_rounds"),
        (["--img_size_3d", "28", "--patch_size_3d", "8"], "--patch_size_3d"),
        (["--img_size_2d", "30"], "--patch_size_2d"),
    ],
)
def test_values_out_of_range_are_refused_naming_the_option(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(argv)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_help_formatter_adds_a_default_only_where_it_tells_something():
    """cliutil.DefaultsHelpFormatter: "(default: X)" is appended, except for None, a flag's False, or a help
    text that already speaks of its default."""
    from mosaic_fast.cliutil import DefaultsHelpFormatter, ShortUsageParser

    p = ShortUsageParser(prog="t", formatter_class=DefaultsHelpFormatter)
    p.add_argument("--plain", type=int, default=3, help="a number")
    p.add_argument("--stated", type=int, default=4, help="a number (default: 4 unless capped)")
    p.add_argument("--none", default=None, help="nothing")
    p.add_argument("--flag", action="store_true", help="a flag")
    text = " ".join(p.format_help().split())
    assert "--plain PLAIN a number (default: 3)" in text
    assert "(default: 4 unless capped)" in text and text.count("default") == 2
    assert "nothing (default" not in text and "a flag (default" not in text


# --- cli.py ---------------------------------------------------------------------------------------------------


def test_cli_help_spellings_and_unknown_command(capsys, monkeypatch):
    for flag in ("-h", "--help"):
        assert main([flag]) == 0
        assert "usage: mosaic-fast <command>" in capsys.readouterr().out
    assert main(["trian"]) == 2  # bad input exits 2, as every option error does
    assert "unknown command 'trian'" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["mosaic-fast", "--help"])  # the console script passes no argv
    assert main() == 0
    assert "commands:" in capsys.readouterr().out


# --- commands.py: precision, workers, seeding, download rank --------------------------------------------------


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_amp_dtype_follows_the_precision_option(monkeypatch, bf16_supported):
    """README: ``--precision auto`` is bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert commands.amp_dtype("auto", cuda) == (torch.bfloat16 if bf16_supported else torch.float16)
    assert commands.amp_dtype("bf16", cuda) == torch.bfloat16
    assert commands.amp_dtype("fp16", cuda) == torch.float16
    assert commands.amp_dtype("fp32", cuda) is None
    assert commands.amp_dtype("auto", cpu) is None and commands.amp_dtype("fp32", cpu) is None
    with pytest.raises(ValueError, match="--precision fp16"):
        commands.amp_dtype("fp16", cpu)


def test_data_loader_workers_default_by_device_and_an_explicit_zero_wins():
    """README: ``--num_workers`` defaults to 4 on CUDA and 0 on CPU; a value given is used as is."""
    cuda = DistInfo(device=torch.device("cuda", 0))
    assert commands._workers(SimpleNamespace(num_workers=None), cuda) == 4
    assert commands._workers(SimpleNamespace(num_workers=None), DistInfo()) == 0
    assert commands._workers(SimpleNamespace(num_workers=0), cuda) == 0
    assert commands._workers(SimpleNamespace(num_workers=3), DistInfo()) == 3


def test_seeding_seeds_python_numpy_and_torch_generators():
    """README: every run is seeded (``--seed``): python's, numpy's legacy global and torch's generators."""
    seed = int(np.random.default_rng().integers(0, 2**31))
    commands._seed_everything(seed)
    got = (random.random(), float(np.random.rand()), torch.rand(3))  # noqa: NPY002
    assert got[0] == random.Random(seed).random()
    assert got[1] == float(np.random.RandomState(seed).rand())
    assert torch.equal(got[2], torch.rand(3, generator=torch.Generator().manual_seed(seed)))


def test_download_runs_on_each_nodes_local_rank_zero(monkeypatch):
    """With --download under torchrun, local rank 0 of every node fetches (each node has its own data folder)
    while the others wait at the barrier and then read the files."""
    calls = []

    class FakeSplit:
        def __init__(self, name, split, root, input_size, file_size, download):
            calls.append((name, download))

    monkeypatch.setattr(commands, "MedMNISTSplit", FakeSplit)
    monkeypatch.setattr(commands, "find_all_npz", lambda *a, **k: None)
    monkeypatch.setattr(commands, "MultiSource", list)
    monkeypatch.setattr(commands, "barrier", lambda info: calls.append("barrier"))
    args = SimpleNamespace(download=True, data_root="/nowhere", size_2d=None, size_3d=None)
    for rank, local_rank, fetches in ((4, 0, True), (5, 1, False), (0, 0, True), (1, 1, False)):
        calls.clear()
        commands.build_split(["BreastMNIST"], "train", args, DistInfo(rank, 8, local_rank), 28, 28)
        expected = [("BreastMNIST", True), "barrier"] if fetches else ["barrier", ("BreastMNIST", False)]
        assert calls == expected, (rank, local_rank)


# --- commands.py: what ``train`` hands the trainer ------------------------------------------------------------


class _CapturingTrainer:
    """Stands in for Trainer: records what ``train`` built and trains nothing."""

    last = None

    def __init__(self, student, teacher, train, val, test, settings, info, out_dir):
        type(self).last = SimpleNamespace(student=student, teacher=teacher, train=train, settings=settings,
                                          info=info, out_dir=out_dir)

    def resume(self, *args):
        raise AssertionError("not resuming")

    def fit(self):
        return None


@pytest.fixture(scope="module")
def four_sets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("four")
    for i, name in enumerate(("BreastMNIST", "ChestMNIST", "RetinaMNIST", "AdrenalMNIST3D")):
        write_synthetic_npz(root, name, 28, (16, 4, 4), seed=i)
    return root


def _captured(monkeypatch, root: Path, out: Path, *extra: str) -> SimpleNamespace:
    monkeypatch.setattr(commands, "Trainer", _CapturingTrainer)
    _CapturingTrainer.last = None
    argv = ["train", "--data_root", str(root), "--datasets", "breastmnist,chestmnist,retinamnist,adrenalmnist3d",
            *TINY, "--device", "cpu", "--output_dir", str(out), *extra]
    assert main(argv) == 0
    return _CapturingTrainer.last


def test_every_training_option_reaches_the_trainer(four_sets, tmp_path, monkeypatch):
    """Each option, given a non-default value, arrives unchanged in TrainSettings and args.json."""
    given = {"num_rounds": 7, "batch_size": 3, "lr": 2e-3, "weight_decay": 0.05, "warmup_rounds": 2,
             "min_lr": 3e-6, "consist_weight": 0.3, "ema_momentum": 0.7, "ema_momentum_3d": 0.8,
             "max_grad_norm": 2.5, "early_stopping_patience": 4, "early_stopping_min_delta": 0.02, "seed": 7,
             "samples_per_round": 11, "eval_batch_size": 5, "checkpoint_every": 3, "max_steps": 9,
             "metrics": "mosaic"}
    argv = [x for k, v in given.items() for x in (f"--{k}", str(v))]
    got = _captured(monkeypatch, four_sets, tmp_path, *argv, "--mixed_batches", "--num_workers", "0")
    s = got.settings
    assert {k: getattr(s, k) for k in given} == given
    assert s.mixed_batches is True and s.num_workers == 0 and s.amp_dtype is None  # fp32 on CPU
    recorded = json.loads((tmp_path / "args.json").read_text())
    assert {k: recorded[k] for k in given} == given
    assert s.config["args"] == recorded and s.config["datasets"] == [ds.spec.name for ds in got.train.sources]
    assert s.config["model"]["embed_dim"] == 32 and s.config["model"]["adapter_bottleneck_c"] == 16


def test_round_order_follows_interleaved(four_sets, tmp_path, monkeypatch):
    """DESIGN §3: a round visits the seed's order, 2D then 3D; ``--interleaved`` alternates 2D and 3D (the seed's
    interleaved list: Path, OrganMNIST3D, Derma, Nodule, OCT, Adrenal, Pneumonia, Vessel, Chest, ..., Breast, ...)."""
    plain = _captured(monkeypatch, four_sets, tmp_path / "a", "--max_steps", "1")
    assert [ds.spec.name for ds in plain.train.sources] == ["ChestMNIST", "BreastMNIST", "RetinaMNIST",
                                                            "AdrenalMNIST3D"]
    inter = _captured(monkeypatch, four_sets, tmp_path / "b", "--max_steps", "1", "--interleaved")
    assert [ds.spec.name for ds in inter.train.sources] == ["AdrenalMNIST3D", "ChestMNIST", "BreastMNIST",
                                                            "RetinaMNIST"]


def test_model_options_build_the_model_train_asked_for(four_sets, tmp_path, monkeypatch):
    """--freeze_backbone --freeze_3d_tokenizer freezes the 3D tokenizer and pos_embed_3d too (DESIGN §3
    trainable set); --reference_model builds the plain modules; the initialisation follows --seed."""
    got = _captured(monkeypatch, four_sets, tmp_path / "a", "--freeze_backbone", "--freeze_3d_tokenizer",
                    "--seed", "5", "--reference_model")
    trainable = {n for n, p in got.student.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n or n.startswith("heads.") for n in trainable)
    assert got.student.fast is False
    torch.manual_seed(5)
    fresh = commands.MosaicModel(commands.NUM_CLASSES, **got.settings.config["model"], fast=False).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in got.student.state_dict().items())

    got = _captured(monkeypatch, four_sets, tmp_path / "b", "--freeze_backbone")
    trainable = {n for n, p in got.student.named_parameters() if p.requires_grad}
    assert any(n.startswith("pos_embed_3d") for n in trainable)
    assert any(n.startswith("patch_embed.patch_embed_3d.") for n in trainable)
    assert got.student.fast is True


def test_every_rank_is_seeded_with_the_seed_and_only_rank_zero_writes(four_sets, tmp_path, monkeypatch):
    """Under torchrun, rank 1 seeds as rank 0 does (the same --seed: same initial model and batch plans)
    and, not being rank 0, writes no args.json."""
    monkeypatch.setattr(commands, "setup", lambda device: DistInfo(rank=1, world_size=2, local_rank=1))
    got = _captured(monkeypatch, four_sets, tmp_path, "--seed", "9", "--reference_model")
    assert got.info.rank == 1 and got.settings.seed == 9
    torch.manual_seed(9)
    fresh = commands.MosaicModel(commands.NUM_CLASSES, **got.settings.config["model"], fast=False).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in got.student.state_dict().items())
    assert not (tmp_path / "args.json").exists()


def test_chance_table_scores_the_training_majority_on_the_test_labels():
    """Chance level: ACC of always predicting the *training* set's majority class, measured on the test labels."""
    spec = SimpleNamespace(task="binary-class", name="BreastMNIST")
    rng = np.random.default_rng()
    test_labels = torch.from_numpy(rng.integers(0, 2, size=(40, 1)))
    train = SimpleNamespace(sources=[SimpleNamespace(spec=spec, labels=torch.tensor([[1]] * 7 + [[0]] * 3))])
    test = SimpleNamespace(sources=[SimpleNamespace(spec=spec, labels=test_labels)])
    row = commands._chance_table(train, test).splitlines()[-1].split()
    assert row[0] == "BreastMNIST"
    assert float(row[1]) == pytest.approx(100 * float((test_labels == 1).float().mean()), abs=0.006)
    assert float(row[2]) == 50.0


def test_run_synchronizes_teardown_only_after_a_normal_end(monkeypatch, capsys):
    """On an error another rank may never reach the final barrier: tear down without it (and exit 2 for bad
    input, 1 for a diverged model)."""
    torn = []
    monkeypatch.setattr(commands, "setup", lambda device: DistInfo())
    monkeypatch.setattr(commands, "teardown", lambda synchronize=True: torn.append(synchronize))

    def bad(args, info):
        raise ValueError("bad input")

    def diverged(args, info):
        raise commands.NonFiniteLossError("loss is nan")

    args = SimpleNamespace(device="cpu")
    assert commands._run("train", lambda a, i: 0, args) == 0
    assert commands._run("train", bad, args) == 2
    assert commands._run("train", diverged, args) == 1
    assert torn == [True, False, False]
    assert "mosaic-fast train: error: bad input" in capsys.readouterr().err


# --- distributed.py -------------------------------------------------------------------------------------------


@pytest.fixture
def fake_group(monkeypatch):
    """torchrun's environment of process 3 of 4 (second GPU of its node), with a recording process group."""
    calls = {"init": [], "set_device": []}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls["init"].append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    return calls


def test_torchrun_rank_local_rank_and_backend_on_cpu(fake_group, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    got = distributed.setup("auto")
    assert (got.rank, got.world_size, got.local_rank, got.device) == (3, 4, 1, torch.device("cpu"))
    assert fake_group["init"] == ["gloo"] and fake_group["set_device"] == []
    assert not got.is_main and got.enabled


def test_torchrun_on_cuda_takes_the_local_ranks_gpu_and_nccl(fake_group, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    got = distributed.setup("auto")
    assert (got.rank, got.local_rank, got.device) == (3, 1, torch.device("cuda", 1))
    assert fake_group["init"] == ["nccl"] and fake_group["set_device"] == [1]


def test_single_process_device_choice_and_bad_devices(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.setup("cuda:1") == DistInfo(0, 1, 0, torch.device("cuda", 1))
    assert distributed.setup("auto").device == torch.device("cuda")
    assert distributed.setup("cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu'"):
        distributed.setup("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda:0'.*CUDA is not available"):
        distributed.setup("cuda:0")
    assert distributed.setup("auto") == DistInfo()


def test_only_global_rank_zero_is_main():
    """The second node's local rank 0 must not write files or print tables (module doc: rank 0 only)."""
    assert not DistInfo(rank=2, world_size=4, local_rank=0).is_main
    assert DistInfo(rank=0, world_size=4, local_rank=0).is_main
    assert not DistInfo().enabled and DistInfo(world_size=2).enabled


def test_mean_across_ranks_divides_the_sum_by_the_world_size(monkeypatch):
    others = float(np.random.default_rng().uniform(0.5, 5))  # (no cancellation against 1.5 in float32)

    def all_reduce(t):  # the sum over a world of 2: this rank's value plus the other rank's
        t += others

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    mine = torch.tensor(1.5)
    got = distributed.mean_across_ranks(mine, DistInfo(world_size=2))
    assert got.item() == pytest.approx((1.5 + others) / 2) and mine.item() == 1.5
    assert distributed.mean_across_ranks(mine, DistInfo()).item() == 1.5


def test_teardown_skips_the_barrier_on_an_error_path(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.teardown(synchronize=False)
    assert calls == ["destroy"]
    calls.clear()
    distributed.teardown()
    assert calls == ["barrier", "destroy"]


# --- info.py --------------------------------------------------------------------------------------------------


def test_a_nightly_that_meets_the_bound_is_not_a_complaint(monkeypatch):
    """torch nightlies are pre-releases (2.12.0.dev...): above ``>=2.11`` they meet the requirement."""
    from importlib import metadata

    monkeypatch.setattr(metadata, "requires", lambda dist: ["torch>=2.11"])
    monkeypatch.setattr(metadata, "version", lambda name: "2.12.0.dev20260101+cu130")
    assert info.unmet_requirements() == []
    monkeypatch.setattr(metadata, "version", lambda name: "2.11.0.dev20250101")  # before 2.11.0: not met
    assert info.unmet_requirements() == ["torch 2.11.0.dev20250101 (needs >=2.11)"]
