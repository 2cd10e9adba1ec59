"""``mosaic-fast train`` / ``eval``: a tiny end-to-end run, resume, option spellings, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mosaic_fast.cli import main
from mosaic_fast.data.demo import DEMO_DATASETS, DEMO_ROOT
from mosaic_fast.data.synthetic import write_synthetic_npz
from mosaic_fast.engine.config import parse_train_args

NAMES = ("BreastMNIST", "ChestMNIST", "RetinaMNIST", "AdrenalMNIST3D")
TINY = ["--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--img_size_2d", "28", "--patch_size_2d", "7",
        "--img_size_3d", "28", "--patch_size_3d", "14", "--adapter_bottleneck_a", "8", "--adapter_bottleneck_b", "8",
        "--adapter_bottleneck_c", "16", "--batch_size", "8", "--eval_batch_size", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_data")
    for i, name in enumerate(NAMES):
        write_synthetic_npz(root, name, 28, (24, 8, 8), seed=i)
    return root


def _train_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data-root", str(data_root), "--datasets", ",".join(n.lower() for n in NAMES), *TINY,
            "--num_rounds", "2", "--warmup_rounds", "0", "--output_dir", str(out), *extra]


def test_train_then_eval_end_to_end(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(data_root, out, "--mixed_batches")) == 0
    printed = capsys.readouterr().out
    assert "test (medmnist metrics)" in printed and "ChestMNIST" in printed and "trainable" in printed
    for name in ("best.pt", "last.pt", "args.json", "history.csv", "curves.png", "test_results.json"):
        assert (out / name).is_file(), name
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--data_root", str(data_root), "--metrics",
                 "mosaic", "--split", "val", "--reference-model"]) == 0
    printed = capsys.readouterr().out
    assert "val (mosaic metrics)" in printed
    table = json.loads((out / "eval_val_mosaic.json").read_text())
    assert set(NAMES) <= set(table["student"]) and "mean_auc" in table["teacher"]


def test_resume_through_the_cli(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    frozen = ("--interleaved", "--freeze_backbone")
    assert main(_train_args(data_root, out, "--max_steps", "3", *frozen)) == 0
    printed = capsys.readouterr().out
    assert "--resume" in printed and "100.00%" not in printed  # part of the model is frozen
    assert main(_train_args(data_root, out, *frozen, "--resume", str(out / "last.pt"))) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "test (medmnist metrics)" in printed
    assert torch.load(out / "last.pt", weights_only=False)["progress"]["round"] == 2


def test_both_spellings_and_seed_aliases():
    a = parse_train_args(["--num-rounds", "3", "--batch_size", "4", "--ema-momentum-3d", "0.9", "--use_interleaved",
                          "--freeze-backbone", "--freeze_3d_tokenizer", "--adapter-bottleneck-c", "32"])
    assert (a.num_rounds, a.batch_size, a.ema_momentum_3d, a.interleaved) == (3, 4, 0.9, True)
    assert a.freeze_backbone and a.freeze_3d_tokenizer and a.adapter_bottleneck_c == 32
    assert len(a.datasets) == 18 and a.metrics == "medmnist"


def test_demo_defaults_and_overrides():
    a = parse_train_args(["--demo"])
    assert Path(a.data_root) == DEMO_ROOT and a.datasets == DEMO_DATASETS and a.embed_dim == 128
    b = parse_train_args(["--demo", "--num_rounds", "1", "--datasets", "breastmnist"])
    assert b.num_rounds == 1 and b.datasets == ("BreastMNIST",)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--datasets", "nomnist"], "unknown dataset 'nomnist'"),
        (["--metrics", "f1"], "invalid choice"),
        (["--batch_size", "0"], "positive integer"),
        (["--ema_momentum", "1.5"], r"\[0, 1\]"),
        (["--img_size_2d", "30"], "divisible"),
        (["--num_rounds", "3", "--warmup_rounds", "3"], "warmup_rounds"),
        (["--freeze_3d_tokenizer"], "freeze_backbone"),
    ],
)
def test_bad_options_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_missing_data_names_the_file_and_the_download_flag(tmp_path, capsys):
    assert main(["train", "--data_root", str(tmp_path), "--datasets", "pathmnist", *TINY]) == 2
    err = capsys.readouterr().err
    assert "pathmnist" in err and "--download" in err


def test_cpu_mixed_precision_is_refused(data_root, tmp_path, capsys):
    assert main(_train_args(data_root, tmp_path, "--device", "cpu", "--precision", "bf16")) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_eval_rejects_missing_and_foreign_checkpoints(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data_root", str(DEMO_ROOT)]) == 2
    assert "none.pt" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "foreign.pt"), "--data_root", str(DEMO_ROOT)]) == 2
    assert "student_state_dict" in capsys.readouterr().err
