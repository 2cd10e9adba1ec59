"""Gaps found by mutation testing of session 22's changes: ``--output_dir`` made first (engine/commands.py
``_make_output_dir``), backend "triton" checked on the run's device (``_check_backend``), Ctrl-C's message
(``_interrupted``), ``--compile`` (``_compile``, :meth:`MosaicModel.compile_encoder`), the bench's
"fast+compiled" training column and its agreement twin, and pytest's report header (tests/conftest.py).

Expectations come from README.md ("--compile (train and eval) compiles the student's and teacher's
transformer encoders ... in place"; "Ctrl-C stops it (exit 130) with the --resume line that continues it";
outputs go to ``--output_dir``), the docstrings that state the contract of the new functions, and the
behaviour before the change (``--output_dir`` created with its parents). No torch.compile actually runs here:
``nn.Module.compile`` only wraps the module's call, so these tests check what is compiled, not how fast.
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch._dynamo
from fake_cuda import fake_cuda

import mosaic_fast
from mosaic_fast.cli import main
from mosaic_fast.data.synthetic import write_synthetic_npz
from mosaic_fast.engine import commands
from mosaic_fast.engine.distributed import DistInfo
from mosaic_fast.models import mosaic

TINY = ["--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--img_size_2d", "28", "--patch_size_2d", "7",
        "--img_size_3d", "28", "--patch_size_3d", "14", "--batch_size", "8", "--eval_batch_size", "16",
        "--device", "cpu"]
TINY_MODEL = dict(embed_dim=32, depth=1, num_heads=2, img_size_2d=28, patch_size_2d=7, img_size_3d=28,
                  patch_size_3d=14)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(breast_root, tmp_path_factory) -> Path:
    """The last.pt of a one-step tiny run."""
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY, "--num_rounds", "1",
                 "--warmup_rounds", "0", "--max_steps", "1", "--output_dir", str(out)]) == 0
    return out / "last.pt"


@pytest.fixture
def dynamo_limit():
    """compile_encoder raises Dynamo's process-wide recompile limit: put it back (Dynamo's own patch)."""
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        yield
    torch._dynamo.reset()


def compiled(module: torch.nn.Module) -> bool:
    """Whether ``nn.Module.compile`` was called on ``module`` (it sets the compiled call in place)."""
    return module._compiled_call_impl is not None


def only_encoder_compiled(model: mosaic.MosaicModel) -> bool:
    """README: --compile compiles the transformer encoders; the tokenizers and heads stay eager."""
    return (compiled(model.encoder) and not compiled(model) and not compiled(model.patch_embed)
            and not any(compiled(h) for h in model.heads))


# ---------------------------------------------------------------------------------------------------
# _make_output_dir
# ---------------------------------------------------------------------------------------------------


def test_output_dir_is_created_with_its_parent_folders(breast_root, trained, tmp_path, capsys):
    """A new --output_dir several folders deep is made, parents included, for train and eval alike (as it was
    before the folder moved up to be made first): a missing parent is no reason to refuse a run."""
    out = tmp_path / "runs" / "today" / "first"
    assert main(["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY, "--num_rounds", "1",
                 "--warmup_rounds", "0", "--max_steps", "1", "--output_dir", str(out)]) == 0
    assert (out / "args.json").is_file() and (out / "last.pt").is_file()
    tables = tmp_path / "evals" / "breast"
    assert main(["eval", "--checkpoint", str(trained), "--device", "cpu", "--output_dir", str(tables)]) == 0
    assert (tables / "eval_test_medmnist.csv").is_file()
    capsys.readouterr()


def test_eval_refuses_an_unusable_output_dir_before_building_the_model(trained, tmp_path, capsys, monkeypatch):
    """``_make_output_dir``'s contract: the folder is made "before any data is read or model built"; eval
    builds two models before it reads data, so the unusable folder must fail before those."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    unusable = blocker / "out"

    def no_model(*args, **kwargs):
        raise AssertionError("the models were built before the output folder was checked")

    monkeypatch.setattr(commands, "MosaicModel", no_model)
    assert main(["eval", "--checkpoint", str(trained), "--device", "cpu", "--output_dir", str(unusable)]) == 2
    assert f"--output_dir {unusable}: cannot create the folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# _check_backend
# ---------------------------------------------------------------------------------------------------


def test_triton_backend_is_checked_on_the_runs_device(monkeypatch):
    """Backend "triton" runs on CUDA tensors (README: on CPU only under TRITON_INTERPRET=1): with a CUDA
    device it must pass the check even where the interpreter is off, and with a CPU device it must not."""
    from mosaic_fast import backend

    monkeypatch.setattr(backend, "_backend", "triton")
    monkeypatch.setattr(backend, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        commands._check_backend(torch.device("cpu"))
    with fake_cuda(monkeypatch):  # a "cuda" tensor without a GPU
        commands._check_backend(torch.device("cuda"))


# ---------------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------------


def test_ctrl_c_in_eval_exits_130_with_one_line(trained, capsys, monkeypatch):
    """Ctrl-C during eval (no --output_dir: the tables would go next to the checkpoint): exit 130 and the
    line "mosaic-fast eval: interrupted", no traceback and no training's --resume advice."""

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "evaluate", ctrl_c)
    try:
        code = main(["eval", "--checkpoint", str(trained), "--device", "cpu"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped mosaic-fast eval as a KeyboardInterrupt traceback")
    except TypeError as err:
        pytest.fail(f"the Ctrl-C message itself failed: {err}")
    assert code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "mosaic-fast eval: interrupted", err
    assert "Traceback" not in err and "--resume" not in err and "train" not in err


def test_ctrl_c_in_a_resumed_run_after_its_own_checkpoint_offers_that_checkpoint(
        breast_root, tmp_path, capsys, monkeypatch):
    """A resumed run that has written its own last.pt when Ctrl-C comes continues from that one (the run's
    progress since the resume is in it), not from the checkpoint it resumed from."""
    out = tmp_path / "continued"

    def fit_until_ctrl_c(self):
        self.save("last.pt")
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_check_resume", lambda *args: None)  # the resumed state itself is not needed
    monkeypatch.setattr(commands.Trainer, "fit", fit_until_ctrl_c)
    argv = ["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY, "--output_dir", str(out),
            "--resume", "earlier/last.pt"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"--resume {out / 'last.pt'}" in err, err
    assert "earlier/last.pt" not in err and "before its first checkpoint" not in err, err


# ---------------------------------------------------------------------------------------------------
# --compile
# ---------------------------------------------------------------------------------------------------

CPU_WARNING = "warning: --compile on CPU"


@pytest.mark.usefixtures("dynamo_limit")
@pytest.mark.parametrize("reference", [False, True])
def test_train_compile_compiles_the_student_and_teacher_encoders(breast_root, tmp_path, capsys, monkeypatch,
                                                                 reference):
    """README: "--compile (train and eval) compiles the student's and teacher's transformer encoders with
    torch.compile in place" (tokenizers and heads eager), and "On a CPU it is the slower choice: the fast
    model's float32 GEMMs run on oneDNN only eagerly ... `train` warns": the warning is about the fast
    model, so --reference_model on a CPU gets none."""
    seen = {}

    def fit(self):
        seen.update(student=self.student, teacher=self.teacher.model)
        return None

    monkeypatch.setattr(commands.Trainer, "fit", fit)
    argv = ["train", "--data_root", str(breast_root), "--datasets", "breastmnist", *TINY, "--compile",
            "--output_dir", str(tmp_path), *(["--reference_model"] if reference else [])]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert (f"mosaic-fast train: {CPU_WARNING}" in err) == (not reference), err
    assert seen["student"] is not seen["teacher"]
    for name, model in seen.items():
        assert model.fast == (not reference)
        assert only_encoder_compiled(model), name


class _Stop(Exception):
    """Ends a run from inside, past the handlers of ``_run``."""


@pytest.mark.usefixtures("dynamo_limit")
def test_eval_compile_compiles_both_models_and_warns_as_eval(trained, capsys, monkeypatch):
    """eval --compile compiles the student's and the teacher's encoders (README), and its CPU warning names
    the command that was run."""
    seen = []

    def evaluate(model, data, **kwargs):
        seen.append(model)
        if len(seen) == 2:
            raise _Stop
        return {}

    monkeypatch.setattr(commands, "evaluate", evaluate)
    with pytest.raises(_Stop):
        main(["eval", "--checkpoint", str(trained), "--device", "cpu", "--compile"])
    err = capsys.readouterr().err
    assert f"mosaic-fast eval: {CPU_WARNING}" in err and "mosaic-fast train" not in err, err
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert all(only_encoder_compiled(m) for m in seen)


def test_a_mixed_batch_run_over_six_datasets_runs_every_variant_compiled(tmp_path, capsys):
    """README: under --compile "each routing, grad mode and input shape compiles once ... before its batches
    run compiled". A mixed-batch run (per-sample ids and the three letters in evaluation) over six datasets
    with uneven last batches meets more variants than a smaller run does (18 here, where the
    4-dataset cyclic run of test_cli_compile meets 9): every one must be compiled, none left to run eagerly
    past Dynamo's recompile limit (which COMPILE_VARIANTS raises for this)."""
    from torch._dynamo.utils import counters

    names = ("PathMNIST", "BreastMNIST", "ChestMNIST", "DermaMNIST", "AdrenalMNIST3D", "VesselMNIST3D")
    for i, name in enumerate(names):
        write_synthetic_npz(tmp_path / "data", name, 28, (37 + 5 * i, 11 + 3 * i, 9 + 2 * i), seed=i)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
            assert main(["train", "--data_root", str(tmp_path / "data"), "--datasets", ",".join(names), *TINY,
                         "--adapter_bottleneck_a", "8", "--adapter_bottleneck_b", "8", "--adapter_bottleneck_c", "16",
                         "--num_rounds", "1", "--warmup_rounds", "0", "--freeze_backbone", "--mixed_batches",
                         "--compile", "--output_dir", str(tmp_path / "run")]) == 0
        frames = dict(counters["frames"])
        assert frames["total"] > 16, frames
        assert frames["ok"] == frames["total"], frames
        assert not any("recompile limit" in reason for reason in counters["unimplemented"])
    finally:
        torch._dynamo.reset()
    capsys.readouterr()


def test_compile_warning_is_printed_by_rank_0_only(monkeypatch, capsys):
    """Like every warning of a run (``_warn``: "printed once"), the --compile one comes from rank 0 only;
    every rank compiles all the models it is given."""
    called = []
    monkeypatch.setattr(mosaic.MosaicModel, "compile_encoder", lambda self, **kw: called.append(self))
    models = [mosaic.MosaicModel(**TINY_MODEL, fast=True) for _ in range(2)]
    commands._compile("train", DistInfo(rank=1, world_size=2), *models)
    assert CPU_WARNING not in capsys.readouterr().err
    assert called == models
    called.clear()
    commands._compile("train", DistInfo(rank=0, world_size=2), *models)
    assert CPU_WARNING in capsys.readouterr().err
    assert called == models


@pytest.mark.usefixtures("dynamo_limit")
def test_compile_encoder_raises_the_recompile_limit_and_never_lowers_it():
    """compile_encoder "raises Dynamo's recompile limit to COMPILE_VARIANTS": from Dynamo's default of 8 up
    to it, and a limit already set higher (by the user) is left alone, not lowered."""
    assert mosaic.COMPILE_VARIANTS > 8
    torch._dynamo.config.recompile_limit = 8
    mosaic.MosaicModel(**TINY_MODEL).compile_encoder()
    assert torch._dynamo.config.recompile_limit == mosaic.COMPILE_VARIANTS
    torch._dynamo.config.recompile_limit = 1000
    mosaic.MosaicModel(**TINY_MODEL).compile_encoder()
    assert torch._dynamo.config.recompile_limit == 1000


@pytest.mark.usefixtures("dynamo_limit")
def test_compile_encoder_compiles_the_encoder_only_with_the_options_given(monkeypatch):
    """Its docstring: the encoder is compiled in place, ``options`` go to torch.compile, the tokenizers and
    heads stay eager; the state_dict keys do not change."""
    calls = []

    def recording_compile(fn, *args, **kwargs):
        calls.append(kwargs)
        return fn

    model = mosaic.MosaicModel(**TINY_MODEL)
    keys = list(model.state_dict())
    monkeypatch.setattr(torch, "compile", recording_compile)
    model.compile_encoder(mode="max-autotune-no-cudagraphs", dynamic=False)
    assert calls == [{"mode": "max-autotune-no-cudagraphs", "dynamic": False}]
    assert only_encoder_compiled(model)
    assert list(model.state_dict()) == keys


# ---------------------------------------------------------------------------------------------------
# The bench's "fast+compiled" training column
# ---------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("dynamo_limit")
def test_train_step_compile_encoders_compiles_student_and_teacher():
    """TrainStep(compile_encoders=True) is what ``train --compile`` runs: the student's and the EMA teacher's
    encoders compiled in place; without it nothing is."""
    from mosaic_fast.bench.cases_model import TrainStep

    step = TrainStep(mosaic.MosaicModel(**TINY_MODEL, fast=True), torch.device("cpu"), torch.float32,
                     compile_encoders=True)
    assert step.model is not step.teacher.model
    assert only_encoder_compiled(step.model) and only_encoder_compiled(step.teacher.model)
    assert step.forward is step.model  # not torch.compile of the whole model ("compiled" column)
    eager = TrainStep(mosaic.MosaicModel(**TINY_MODEL, fast=True), torch.device("cpu"), torch.float32)
    assert not compiled(eager.model.encoder) and not compiled(eager.teacher.model.encoder)


class _RecordingStep:
    """Stands in for TrainStep: records what each column is built from."""

    built: ClassVar[list] = []

    def __init__(self, model, device, dtype, compile_model=False, graphs=False, compile_encoders=False):
        self.model, self.compile_model, self.graphs, self.compile_encoders = model, compile_model, graphs, \
            compile_encoders
        _RecordingStep.built.append(self)
        self.computed = lambda *inputs: []


def _tagged_pair(cfg, device):
    """(reference, fast) stand-ins that say which they are, with the same weights as _pair's are."""
    g = torch.Generator().manual_seed(0)
    ref, fast = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), fast.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
            q.copy_(p)
    ref.fast, fast.fast = False, True
    return ref, fast


@pytest.mark.parametrize("device, with_compile, want", [
    ("cuda", True, {"reference", "fast", "compiled", "fast+compiled", "kernel"}),
    ("cuda", False, {"reference", "fast", "kernel"}),
    ("cpu", True, {"reference", "fast", "compiled"}),
])
def test_fast_compiled_training_column_is_cuda_only_and_compiles_the_fast_model(monkeypatch, device, with_compile,
                                                                               want):
    """README: "fast+compiled" is the training step's column on CUDA (``bench model --device cuda`` times
    ``train --compile`` with it; on a CPU compile is the slower one), under ``with_compile`` like every
    compiled column, and it is the fast model with compile_encoders."""
    from mosaic_fast.bench import cases_model

    _RecordingStep.built = []
    monkeypatch.setattr(cases_model, "TrainStep", _RecordingStep)
    monkeypatch.setattr(cases_model, "_pair", _tagged_pair)
    monkeypatch.setattr(cases_model, "_peak_memory", lambda *args: None)
    with fake_cuda(monkeypatch) if device == "cuda" else contextlib.nullcontext():  # its inputs go to "cuda"
        cases = cases_model.training_cases(torch.device(device), torch.float32, quick=True,
                                           with_compile=with_compile)
    assert len(cases) == 2
    for case in cases:
        want_here = want - ({"kernel"} if case.params["mixed"] else set())
        assert set(case.impls) == want_here, case.name
        if "fast+compiled" in want_here:
            step = case.impls["fast+compiled"]
            assert step.model.fast and step.compile_encoders and not step.compile_model and not step.graphs
    assert sum(s.compile_encoders for s in _RecordingStep.built) == (2 if "fast+compiled" in want else 0)


def test_the_gpu_sessions_compiled_train_stage_times_the_fast_compiled_column(monkeypatch):
    """benchmarks/gpu_session.sh's stage compiled-train is there for the "fast+compiled" training column (its
    header: "single-dataset training step with fast+compiled (train --compile)"): run as the stage runs the
    bench (its --no-compile or not, on CUDA), a case its filter selects must have that column."""
    from test_gpu_session_script import _python_calls, _stage_commands

    from mosaic_fast.bench import cases_model
    from mosaic_fast.bench import run as bench_run

    (program, argv), = _python_calls(_stage_commands()["compiled-train"], "compiled-train")
    args = bench_run.parse_args(argv)
    assert program == "benchmarks/run.py" and args.suite == "model" and args.device == "cuda"
    monkeypatch.setattr(cases_model, "TrainStep", _RecordingStep)
    monkeypatch.setattr(cases_model, "_pair", _tagged_pair)
    monkeypatch.setattr(cases_model, "_peak_memory", lambda *args: None)
    with fake_cuda(monkeypatch):
        cases = cases_model.training_cases(torch.device("cuda"), torch.bfloat16, quick=False,
                                           with_compile=not args.no_compile)
    selected = [c for c in cases if any(text in c.name for text in args.filter)]
    assert selected and all("fast+compiled" in c.impls for c in selected), [c.name for c in selected]


def test_fast_compiled_agreement_twin_is_a_copy_of_the_fast_model_with_compiled_encoders(monkeypatch):
    """Its agreement step (``_agreement_steps``: "fast+compiled" the fast model with its encoders compiled)
    trains its own copy of the fast model's weights, made before any step, with compile_encoders."""
    from mosaic_fast.bench import cases_model

    _RecordingStep.built = []
    monkeypatch.setattr(cases_model, "TrainStep", _RecordingStep)
    pairs = []
    monkeypatch.setattr(cases_model, "_pair", lambda cfg, device: pairs.append(_tagged_pair(cfg, device)) or pairs[-1])
    steps = cases_model._agreement_steps({}, torch.device("cpu"), torch.float32, ("reference", "fast", "fast+compiled"))
    assert set(steps) == {"reference", "fast", "fast+compiled"}
    (ref, fast), = pairs
    twin = next(s for s in _RecordingStep.built if s.compile_encoders)
    assert sum(s.compile_encoders for s in _RecordingStep.built) == 1
    assert twin.model.fast and twin.model is not fast
    assert all(p is not q and torch.equal(p, q) for p, q in zip(twin.model.parameters(), fast.parameters()))
    assert not twin.compile_model and not twin.graphs
    others = [s for s in _RecordingStep.built if s is not twin]
    assert {id(s.model) for s in others} == {id(ref), id(fast)} and not any(s.compile_encoders for s in others)


# ---------------------------------------------------------------------------------------------------
# tests/conftest.py: pytest's report header
# ---------------------------------------------------------------------------------------------------


def _report_header(pytestconfig, monkeypatch, package_init: Path, rootpath: Path) -> list[str]:
    """The header conftest.py gives for a mosaic_fast imported from ``package_init`` in a run rooted at
    ``rootpath``."""
    conftest = next(p for p in pytestconfig.pluginmanager.get_plugins()
                    if isinstance(p, types.ModuleType) and getattr(p, "__file__", "")
                    and Path(p.__file__).resolve() == Path(__file__).resolve().parent / "conftest.py")
    monkeypatch.setattr(mosaic_fast, "__file__", str(package_init))
    return conftest.pytest_report_header(types.SimpleNamespace(rootpath=rootpath))


def test_report_header_warns_only_about_another_checkouts_source_tree(pytestconfig, monkeypatch, tmp_path):
    """Its docstring: the header names the mosaic_fast imported and warns when that is another checkout's
    source tree (an editable install of another clone), never for this checkout's own tree or for an
    installed package (site-packages)."""
    root = tmp_path / "clone"
    (root / "mosaic_fast").mkdir(parents=True)
    other = tmp_path / "main"
    here = _report_header(pytestconfig, monkeypatch, root / "mosaic_fast" / "__init__.py", root)
    assert here[0].startswith("mosaic_fast ") and here[0].endswith(f"from {root / 'mosaic_fast'}")
    assert not any("WARNING" in line for line in here), here

    elsewhere = _report_header(pytestconfig, monkeypatch, other / "mosaic_fast" / "__init__.py", root)
    warning = [line for line in elsewhere if line.startswith("WARNING")]
    assert len(warning) == 1 and str(other) in warning[0] and f"PYTHONPATH={root}" in warning[0], elsewhere

    site = tmp_path / "venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    installed = _report_header(pytestconfig, monkeypatch, site / "mosaic_fast" / "__init__.py", root)
    assert not any("WARNING" in line for line in installed), installed


def test_report_header_does_not_warn_about_this_checkout_reached_through_a_link(pytestconfig, monkeypatch,
                                                                                tmp_path):
    """A checkout reached through a symbolic link (the rootdir as given) is still this checkout: the
    package's path is resolved, so the root must be too."""
    root = tmp_path / "clone"
    (root / "mosaic_fast").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(root, target_is_directory=True)
    header = _report_header(pytestconfig, monkeypatch, link / "mosaic_fast" / "__init__.py", link)
    assert not any("WARNING" in line for line in header), header
