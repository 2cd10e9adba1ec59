"""``mosaic-fast train`` / ``eval``: a tiny end-to-end run, resume, option spellings, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_cli import TINY_BATCHES, TINY_MODEL

from mosaic_fast.cli import main
from mosaic_fast.data.demo import DEMO_DATASETS, DEMO_ROOT
from mosaic_fast.data.synthetic import write_synthetic_npz
from mosaic_fast.engine.config import parse_train_args

NAMES = ("BreastMNIST", "ChestMNIST", "RetinaMNIST", "AdrenalMNIST3D")
TINY = [*TINY_MODEL, *TINY_BATCHES]


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
        (["--lr", "-1"], "--lr: must be a positive finite number"),
        (["--lr", "inf"], "--lr: must be a positive finite number"),
        (["--lr", "fast"], "--lr: must be a number"),
        (["--max_grad_norm", "-1"], "--max_grad_norm.*positive"),
        (["--consist_weight", "-1"], "--consist_weight.*non-negative"),
        (["--early_stopping_min_delta", "-1"], "--early_stopping_min_delta.*non-negative"),
        (["--weight_decay", "nan"], "--weight_decay.*non-negative finite"),
        (["--min_lr=-1e-6"], "--min_lr.*non-negative"),
        (["--adapter_scalar", "nan"], "--adapter_scalar.*finite"),
        (["--seed", "-1"], "--seed"),
        (["--size_3d", "128"], "--size_3d.*invalid choice"),
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


def test_diverged_model_is_reported_not_scored_or_saved(data_root, tmp_path, capsys):
    """--lr 1e30: the one step's loss is finite but the model then gives NaN/inf logits; validation must stop
    the run (exit 1, no traceback) instead of scoring it as "always class 0" and saving it as best.pt."""
    out = tmp_path / "run"
    argv = ["train", "--data_root", str(data_root), "--datasets", "breastmnist", *TINY, "--samples_per_round", "8",
            "--num_rounds", "1", "--warmup_rounds", "0", "--lr", "1e30", "--output_dir", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for part in ("validation after round 1", "student", "non-finite logits", "BreastMNIST", "without writing"):
        assert part in err, part
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()


@pytest.fixture(scope="module")
def trained_64(tmp_path_factory) -> tuple[Path, Path]:
    """A run trained with --size_3d 64 on a root that also holds the 28³ file (and an untrained ChestMNIST)."""
    root = tmp_path_factory.mktemp("data64")
    write_synthetic_npz(root, "BreastMNIST", 28, (24, 8, 8), seed=0)
    write_synthetic_npz(root, "ChestMNIST", 28, (24, 8, 8), seed=1)
    write_synthetic_npz(root, "AdrenalMNIST3D", 28, (24, 8, 8), seed=2)
    write_synthetic_npz(root, "AdrenalMNIST3D", 64, (24, 8, 8), seed=3)
    out = tmp_path_factory.mktemp("run64")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data_root", str(root), "--datasets", "breastmnist,adrenalmnist3d", *TINY,
                     "--size_3d", "64", "--num_rounds", "1", "--warmup_rounds", "0", "--output_dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, out


def test_eval_reads_the_files_training_read(trained_64, tmp_path, monkeypatch, capsys):
    """Without --data_root / --size_3d, eval takes the checkpoint's recorded root and file sizes (so it
    reports the numbers training did), prints the file of each dataset, and explicit options still win."""
    root, out = trained_64
    monkeypatch.chdir(tmp_path)  # no ./data here: the root must come from the checkpoint
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--eval_batch_size", "16",
                 "--output_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert str(root / "adrenalmnist3d_64.npz") in printed and str(root / "breastmnist.npz") in printed
    ours = json.loads((tmp_path / "eval_test_medmnist.json").read_text())
    trained = json.loads((out / "test_results.json").read_text())
    for model in ("student", "teacher"):
        for name in ("BreastMNIST", "AdrenalMNIST3D"):
            assert ours[model][name] == pytest.approx(trained[model][name], abs=1e-6), (model, name)
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--size_3d", "28", "--output_dir", str(tmp_path)]) == 0
    assert str(root / "adrenalmnist3d.npz") in capsys.readouterr().out


def test_eval_warns_about_untrained_heads_and_keeps_them_out_of_the_mean(trained_64, tmp_path, capsys):
    _, out = trained_64
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--datasets", "breastmnist,chestmnist,adrenalmnist3d",
                 "--output_dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "never trained on ChestMNIST" in captured.err
    assert "ChestMNIST *" in captured.out and "mean (trained)" in captured.out
    table = json.loads((tmp_path / "eval_test_medmnist.json").read_text())
    for res in table.values():
        assert res["mean_acc"] == pytest.approx((res["BreastMNIST"]["acc"] + res["AdrenalMNIST3D"]["acc"]) / 2)
        assert res["mean_datasets"] == ["BreastMNIST", "AdrenalMNIST3D"]


def test_failed_download_is_one_message(tmp_path, monkeypatch, capsys):
    import medmnist.dataset

    def offline(self):
        try:
            raise OSError("[Errno 101] Network is unreachable")
        except OSError as err:
            raise RuntimeError("Automatic download failed!") from err

    monkeypatch.setattr(medmnist.dataset.MedMNIST, "download", offline)
    assert main(["train", "--data_root", str(tmp_path), "--datasets", "pathmnist", "--download", *TINY]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "pathmnist" in err and "Network is unreachable" in err and "zenodo.org" in err


def test_resume_folder_and_pretrained_messages(data_root, tmp_path, capsys):
    """--resume DIR takes DIR/last.pt (a folder without one is named); --pretrained of a non-ViT npz says so."""
    assert main(_train_args(data_root, tmp_path, "--resume", str(tmp_path))) == 2
    assert f"--resume {tmp_path} is a directory without a last.pt" in capsys.readouterr().err
    other = tmp_path / "weights.npz"
    np.savez(other, w=np.zeros(3))
    assert main(_train_args(data_root, tmp_path, "--pretrained", str(other))) == 2
    err = capsys.readouterr().err
    assert f"--pretrained {other} is not a Google ViT checkpoint" in err


def test_readme_lists_the_seed_options_that_differ(capsys):
    """README's option notes match the parser: the seed options it says we lack are refused, and the
    --data_root default it states is the parser's."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "The seed's options keep their names and defaults" not in readme
    for option in ("--dataset_list", "--only_2d", "--only_3d", "--eval_every", "--save_every", "--exp_name",
                   "--adapter_bottleneck`", "--no_adapter"):
        assert option in readme, option
        with pytest.raises(SystemExit):
            parse_train_args([option.rstrip("`"), "1"])
    capsys.readouterr()
    assert parse_train_args([]).data_root == "./data" and "`--data_root` defaults to `./data`" in readme


def test_option_prefixes_are_refused():
    """A prefix of an option is refused like any unknown option (argparse would otherwise guess it)."""
    from mosaic_fast.engine.config import eval_parser, train_parser

    cases = ((train_parser(), ["--num_r", "3"]), (eval_parser(), ["--checkpoint", "x.pt", "--metr", "mosaic"]))
    for parser, argv in cases:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


@pytest.fixture
def no_data_reads(monkeypatch):
    """Make reading any dataset fail the test: the checks under test must come before the data."""
    from mosaic_fast.engine import commands

    def fail(*args, **kwargs):
        raise AssertionError("the data were read before the option checks")

    monkeypatch.setattr(commands, "build_split", fail)


def test_resume_problems_are_reported_before_any_data_is_read(trained_64, tmp_path, no_data_reads, capsys):
    """A missing file, a best.pt and a checkpoint of other datasets / another model fail at once, and the
    error lists the differences and points to the args.json the run was trained with."""
    root, out = trained_64
    argv = ["train", "--data_root", str(root), "--datasets", "breastmnist,adrenalmnist3d", *TINY, "--size_3d", "64",
            "--output_dir", str(tmp_path)]
    assert main([*argv, "--resume", str(out / "missing.pt")]) == 2
    assert "missing.pt: the checkpoint does not exist" in capsys.readouterr().err
    assert main([*argv, "--resume", str(out / "best.pt")]) == 2
    assert "cannot resume training" in capsys.readouterr().err
    other = [a if a != "breastmnist,adrenalmnist3d" else "breastmnist" for a in argv]
    assert main([*other, "--depth", "2", "--resume", str(out / "last.pt")]) == 2
    err = capsys.readouterr().err
    assert "was trained with other options" in err and "trained on BreastMNIST,AdrenalMNIST3D (now BreastMNIST)" in err
    assert "depth 1 (now 2)" in err and str(out / "args.json") in err


def test_resume_of_a_demo_run_without_demo_says_so(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert main(["train", "--demo", *TINY, "--samples_per_round", "16", "--max_steps", "1", "--output_dir",
                 str(out)]) == 0
    capsys.readouterr()
    from mosaic_fast.engine import commands

    monkeypatch.setattr(commands, "build_split", lambda *a, **k: pytest.fail("data read before the resume check"))
    assert main(["train", "--resume", str(out / "last.pt"), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "PathMNIST: no file" not in err and "add --demo" in err and str(out / "args.json") in err


def test_missing_pretrained_file_is_reported_first_with_its_address(data_root, tmp_path, no_data_reads, capsys):
    from mosaic_fast.models.weights import VIT_B16_URL

    assert main(_train_args(data_root, tmp_path, "--pretrained", str(tmp_path / "ViT-B_16.npz"))) == 2
    err = capsys.readouterr().err
    assert "ViT-B_16.npz" in err and VIT_B16_URL in err


def test_eval_missing_files_name_what_came_from_the_checkpoint(trained_64, tmp_path, capsys):
    """An eval that cannot find its files says which settings it took from the checkpoint (and only
    those), and a --data_root that does not exist is called that."""
    _root, out = trained_64
    missing = tmp_path / "nowhere"
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--data_root", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"in {missing} (no such folder)" in err
    assert "eval used the file sizes that training recorded" in err and "--size_2d/--size_3d" in err
    assert "used the data root" not in err and "--data_root to choose" not in err
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--size_3d", "28", "--size_2d", "64"]) == 2
    err = capsys.readouterr().err
    assert "BreastMNIST: breastmnist_64.npz" in err
    assert "eval used the data root that training recorded" in err and "give --data_root to choose" in err


def test_demo_with_a_dataset_it_does_not_bundle_points_to_data_root(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(["--demo", "--datasets", "breastmnist,pneumoniamnist"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--demo bundles only {', '.join(DEMO_DATASETS)}; for PneumoniaMNIST give --data_root" in err
    for extra in (["--download"], ["--data_root", str(DEMO_ROOT / ".." / "demo")]):  # same folder, other spelling
        with pytest.raises(SystemExit):
            parse_train_args(["--demo", "--datasets", "pathmnist", *extra])
        assert "give --data_root: a folder with the official npz files, or with --download the folder to fetch " \
               "them into" in capsys.readouterr().err
    args = parse_train_args(["--demo", "--datasets", "pneumoniamnist", "--data_root", "/somewhere"])
    assert args.datasets == ("PneumoniaMNIST",) and args.data_root == "/somewhere"


def test_resuming_a_finished_run_says_there_is_nothing_to_train(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(data_root, out)) == 0
    capsys.readouterr()
    assert main(_train_args(data_root, out, "--resume", str(out / "last.pt"))) == 0
    printed = capsys.readouterr().out
    assert "this run has done all of its --num_rounds 2: nothing to train" in printed
    assert "test (medmnist metrics)" in printed and "round 1 " not in printed


def test_resuming_a_run_that_stopped_early_in_its_last_round_says_so(data_root, tmp_path, capsys):
    """Early stopping wins over "all rounds done": a larger --num_rounds would not train it further."""
    out = tmp_path / "run"
    frozen = ("--lr", "1e-12", "--early_stopping_patience", "1", "--early_stopping_min_delta", "0")  # no gain
    assert main(_train_args(data_root, out, *frozen)) == 0
    assert "early stopping after round 2" in capsys.readouterr().out
    assert main(_train_args(data_root, out, *frozen, "--resume", str(out / "last.pt"))) == 0
    printed = capsys.readouterr().out
    assert "this run had stopped early after round 2" in printed and "nothing to train" not in printed
