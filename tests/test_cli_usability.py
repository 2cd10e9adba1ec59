"""What a new user meets first: short option errors, --help with defaults, --datasets spellings, one error
for all missing files, warnings for surprising combinations, bench filters, and the README's CPU recipe."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mosaic_fast.cli import main
from mosaic_fast.cliutil import plural
from mosaic_fast.engine import commands
from mosaic_fast.engine.config import DEMO_DEFAULTS, eval_parser, parse_eval_args, parse_train_args, train_parser
from mosaic_fast.models.weights import VIT_B16_URL, read_npz

TINY = ["--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--img_size_2d", "28", "--patch_size_2d", "7",
        "--img_size_3d", "28", "--patch_size_3d", "14", "--batch_size", "8", "--eval_batch_size", "16"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_datasets_are_comma_or_space_separated():
    """The seed's --dataset_list took space-separated names: --datasets takes both spellings, mixed too."""
    want = ("BreastMNIST", "AdrenalMNIST3D")
    assert parse_train_args(["--datasets", "breastmnist", "adrenalmnist3d"]).datasets == want
    assert parse_train_args(["--datasets", "breastmnist,adrenalmnist3d"]).datasets == want
    assert parse_train_args(["--datasets", "breastmnist,", "retinamnist", "AdrenalMNIST3D"]).datasets == (
        "BreastMNIST", "RetinaMNIST", "AdrenalMNIST3D")
    assert parse_eval_args(["--checkpoint", "x.pt", "--datasets", "breastmnist", "adrenalmnist3d"]).datasets == want


@pytest.mark.parametrize(("command", "needed"), [("train", []), ("eval", ["--checkpoint", "x.pt"]), ("bench", [])])
def test_option_errors_are_three_short_lines(command, needed, capsys):
    """Not ~35 lines of usage above the one that matters (``info`` takes no options)."""
    with pytest.raises(SystemExit) as exc:
        main([command, *needed, "--no_such_option"])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(rf"usage: mosaic-fast {command} (\[\S+\] )?\[options\]", lines[0])
    assert lines[1] == f"mosaic-fast {command}: error: unrecognized arguments: --no_such_option"
    assert lines[2] == f"run 'mosaic-fast {command} --help' for all options"


def test_checks_after_parsing_use_the_short_form_too(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--embed_dim", "30", "--num_heads", "4"])
    err = capsys.readouterr().err
    assert err.startswith("usage: mosaic-fast train [options]\n") and "divisible" in err and err.count("\n") == 3


def test_help_gives_every_option_a_text_and_shows_defaults():
    for parser in (train_parser(), eval_parser()):
        for action in parser._actions:
            assert action.help, action.option_strings
    text = " ".join(train_parser().format_help().split())
    for shown in ("--lr LR peak AdamW learning rate (default: 0.0001)", "(default: 128)",
                  "--depth DEPTH number of transformer blocks (default: 12)", "(default: ./data)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_plural():
    assert (plural(1, "step"), plural(3, "step"), plural(0, "round")) == ("1 step", "3 steps", "0 rounds")


def test_max_steps_message_counts_correctly(breast_root, tmp_path, capsys):
    argv = ["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY, "--num_rounds", "1",
            "--warmup_rounds", "0", "--max_steps", "1", "--output_dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "stopped after 1 step (--max_steps)" in out


def test_frozen_random_backbone_is_warned_about(breast_root, tmp_path, capsys):
    argv = ["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY, "--num_rounds", "1",
            "--warmup_rounds", "0", "--max_steps", "1", "--output_dir", str(tmp_path)]
    assert main([*argv, "--freeze_backbone"]) == 0
    err = capsys.readouterr().err
    assert "warning: --freeze_backbone without --pretrained" in err and VIT_B16_URL in err
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err


def test_all_missing_files_are_listed_in_one_error(breast_root, capsys):
    """Every missing dataset with the files it looked for, the --download hint, and the present ones."""
    assert main(["train", "--data_root", str(breast_root), "--datasets", "pathmnist,breastmnist,adrenalmnist3d",
                 *TINY]) == 2
    err = capsys.readouterr().err
    assert "2 of 3 datasets have no file" in err
    assert "PathMNIST: pathmnist.npz or pathmnist_224.npz or pathmnist_128.npz or pathmnist_64.npz" in err
    assert "AdrenalMNIST3D: adrenalmnist3d.npz or adrenalmnist3d_64.npz" in err
    assert "--download" in err and "--datasets breastmnist" in err


def test_an_output_dir_that_cannot_be_made_fails_first_naming_the_option(breast_root, tmp_path, capsys, monkeypatch):
    """train and eval refuse an --output_dir that cannot be created before reading any data (not after the
    training or evaluation whose results it was to hold), naming the option."""
    run = tmp_path / "run"
    assert main(["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY, "--num_rounds", "1",
                 "--warmup_rounds", "0", "--max_steps", "1", "--output_dir", str(run)]) == 0
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    unusable = blocker / "out"  # a folder inside a file cannot be made

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the output folder was checked")

    monkeypatch.setattr(commands, "build_split", no_data)
    capsys.readouterr()
    for argv in (["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY],
                 ["eval", "--checkpoint", str(run / "last.pt")]):
        assert main([*argv, "--output_dir", str(unusable)]) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {unusable}: cannot create the folder" in err, err


def test_triton_backend_where_its_kernels_cannot_run_is_one_message_before_any_data(
        breast_root, tmp_path, capsys, monkeypatch):
    """MOSAIC_FAST_BACKEND=triton on a CPU without Triton's interpreter cannot run a step (README: "on CPU
    only under TRITON_INTERPRET=1"): train refuses it at once as a usage error, not with a traceback from
    inside the first forward after the data were read."""
    from mosaic_fast import backend

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the backend was checked")

    monkeypatch.setattr(backend, "_backend", "triton")
    monkeypatch.setattr(backend, "INTERPRET", False)
    monkeypatch.setattr(commands, "build_split", no_data)
    argv = ["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY, "--device", "cpu",
            "--output_dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mosaic-fast train: error: backend 'triton'") and "TRITON_INTERPRET=1" in err, err
    assert "Traceback" not in err


def test_ctrl_c_in_train_says_how_to_resume_without_a_traceback(breast_root, tmp_path, capsys, monkeypatch):
    """Ctrl-C during training exits 130 (128 + SIGINT) with one line naming the last.pt it wrote and
    --resume, instead of a KeyboardInterrupt traceback from wherever the step was."""

    def fit_until_ctrl_c(self):
        self.save("last.pt")
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.Trainer, "fit", fit_until_ctrl_c)
    argv = ["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY, "--output_dir", str(tmp_path)]
    try:
        code = main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped mosaic-fast train as a KeyboardInterrupt traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert f"mosaic-fast train: interrupted; {tmp_path / 'last.pt'} holds" in err
    assert f"--resume {tmp_path / 'last.pt'}" in err


def test_ctrl_c_before_a_checkpoint_offers_no_other_runs_last_pt(breast_root, tmp_path, capsys, monkeypatch):
    """Ctrl-C before the run wrote its first checkpoint: a last.pt already in --output_dir (another, earlier
    run's) is not offered to --resume; a resumed run offers the checkpoint it resumed from."""
    stale = tmp_path / "last.pt"
    stale.write_bytes(b"an earlier run's checkpoint")
    os.utime(stale, (0, 0))

    def ctrl_c_at_once(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.Trainer, "fit", ctrl_c_at_once)
    argv = ["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY, "--output_dir", str(tmp_path)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted before its first checkpoint" in err and "--resume" not in err, err

    monkeypatch.setattr(commands, "_check_resume", lambda *args: None)  # the resumed state itself is not needed
    assert main([*argv, "--resume", "earlier/last.pt"]) == 130
    err = capsys.readouterr().err
    assert "interrupted before its first checkpoint" in err and "(--resume earlier/last.pt)" in err, err


def test_vit_weights_error_names_the_official_address(tmp_path):
    assert VIT_B16_URL == "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz"
    with pytest.raises(FileNotFoundError, match=re.escape(VIT_B16_URL)):
        read_npz(tmp_path / "ViT-B_16.npz")


def test_bench_prints_no_table_for_a_suite_without_a_matching_case(capsys):
    from mosaic_fast.bench.run import main as bench_main

    assert bench_main(["--device", "cpu", "--filter", "moe_skip_rho0.1", "--no-compile", "--min-run-time",
                       "0.02"]) == 0
    out = capsys.readouterr().out
    assert "== suite ops" in out and "== suite model" not in out


def test_bench_names_a_filter_text_that_matches_nothing_beside_one_that_matches(capsys):
    from mosaic_fast.bench.run import main as bench_main

    assert bench_main(["ops", "--device", "cpu", "--filter", "moe_skip_rho0.1", "--filter", "moe_skip_rho0.55",
                       "--no-compile", "--min-run-time", "0.02"]) == 0
    err = capsys.readouterr().err
    assert "--filter 'moe_skip_rho0.55' matches no case of ops" in err and "'moe_skip_rho0.1' matches" not in err


def test_bench_list_names_the_filtered_cases_and_their_columns_without_timing(capsys, monkeypatch):
    from mosaic_fast.bench import core
    from mosaic_fast.bench.run import main as bench_main
    from mosaic_fast.ops import cpu_gemm

    monkeypatch.setattr(core, "time_case", lambda *a, **k: pytest.fail("--list must time nothing"))
    assert bench_main(["--device", "cpu", "--list", "--filter", "moe_skip_rho0.", "--filter", "infer_single",
                       "--no-compile", "--cpu-gemm-mkl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["ops", f"moe_skip_rho{r}"] for r in ("0.5", "0.3", "0.1")] + \
        [["model", "mosaic_infer_single_b8"]]
    mkl = ", fast+mkl" if cpu_gemm.onednn_enabled() else ""  # the column exists where oneDNN is in use
    assert lines[0].split(None, 2)[2] == f"reference, fast{mkl}" and "compiled" not in lines[-1]
    assert bench_main(["ops", "--device", "cpu", "--list", "--filter", "no_such_case"]) == 2
    assert "no case of ops matches --filter 'no_such_case'" in capsys.readouterr().err


def test_bench_filter_matching_nothing_is_an_error(capsys):
    from mosaic_fast.bench.run import main as bench_main

    assert bench_main(["ops", "--device", "cpu", "--filter", "no_such_case", "--filter", "nor_this"]) == 2
    captured = capsys.readouterr()
    assert "== suite" not in captured.out
    assert "no case of ops matches --filter 'no_such_case' or 'nor_this'" in captured.err
    assert "moe_skip_rho0.1" in captured.err  # the names to choose from


def test_readme_cpu_recipe_is_the_demo_model():
    """README's CPU example uses the demo's model options (so it stays the small model the demo trains)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Training and evaluation on MedMNIST")[1].split("\n## ")[0]
    keys = ("embed_dim", "depth", "num_heads", "img_size_2d", "patch_size_2d", "img_size_3d", "patch_size_3d")
    options = " ".join(f"--{k} {DEMO_DEFAULTS[k]}" for k in keys)
    assert options in " ".join(section.replace("\\\n", " ").split())
    assert VIT_B16_URL in section
