"""Test set-up: Triton's interpreter on machines without a GPU, parity helpers as fixtures.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before mosaic_fast is imported.
On a CUDA machine the kernels are compiled for real and the interpreter tests are skipped.
torch.compile's on-disk AOTAutograd cache is off: its key does not cover the Python backward of a custom
op (pytorch/pytorch#144344), so after an edit of a fused op's backward a warm cache would serve the old
compiled backward to the compile tests (Inductor's own cache, keyed by the traced graphs, stays on).
Property-based (hypothesis) tests run a fixed, derandomised set of examples by default, so CI sees the
same inputs every run; `pytest --hypothesis-profile=fuzz` draws 20× as many fresh ones (tests/fuzzing.py;
keep any failure found as an `@example`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch._functorch.config as functorch_config
from hypothesis import HealthCheck, settings

import mosaic_fast
from mosaic_fast.backend import INTERPRET, triton_available

functorch_config.enable_autograd_cache = False

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("default", derandomize=True, database=None, deadline=None,
                          suppress_health_check=_SUPPRESSED)
settings.register_profile("fuzz", max_examples=2000, derandomize=False, deadline=None, database=None,
                          suppress_health_check=_SUPPRESSED)
settings.load_profile("default")


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts on the "auto" backend and leaves it there."""
    mosaic_fast.set_backend("auto")
    yield
    mosaic_fast.set_backend("auto")


@pytest.fixture
def triton_backend():
    """Run the Triton kernels: compiled on CUDA, in the interpreter on CPU (skips when neither)."""
    if not triton_available():
        pytest.skip("triton is not installed")
    if not (torch.cuda.is_available() or INTERPRET):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    mosaic_fast.set_backend("triton")
    yield "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on shared CPUs threads wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def breast_root(tmp_path_factory):
    """A data folder with a small synthetic BreastMNIST (28², 24/8/8 samples) for the CLI tests."""
    from mosaic_fast.data.synthetic import write_synthetic_npz

    root = tmp_path_factory.mktemp("breast")
    write_synthetic_npz(root, "BreastMNIST", 28, (24, 8, 8), seed=0)
    return root


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def pytest_report_header(config) -> list[str]:
    """Which mosaic_fast the run tests (the installed package, ``--import-mode=importlib``), on what stack; and
    a warning when that package is another checkout's source tree (an editable install of another clone), so
    a clone's edits are not silently left untested (set ``PYTHONPATH`` to the clone's root to test them)."""
    from pathlib import Path

    from mosaic_fast.info import collect

    env = collect()
    package = Path(mosaic_fast.__file__).resolve().parent
    keys = ("torch", "triton", "triton kernels", "C++ extension (mosaic_fast._C)", "CPU float32 GEMMs (fast modules)")
    lines = [f"mosaic_fast {mosaic_fast.__version__} from {package}", "; ".join(f"{k}: {env[k]}" for k in keys)]
    root = Path(config.rootpath).resolve()
    installed = {"site-packages", "dist-packages"} & set(package.parts)
    if not installed and package.parent != root:
        lines.append(f"WARNING: these tests import mosaic_fast from {package.parent}, not from this checkout "
                     f"({root}); run them with PYTHONPATH={root} to test this checkout's code")
    return lines


def pytest_collection_modifyitems(config, items):
    """Tests that take the ``cuda_device`` fixture carry the ``cuda`` marker (``pytest -m cuda``), those
    that take ``triton_backend`` the ``kernels`` marker (``pytest -m kernels`` on a GPU runs the
    interpreter parity tests against the compiled kernels)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "cuda_device" in fixtures:
            item.add_marker(pytest.mark.cuda)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "triton_backend" in fixtures or params.get("backend") == "triton":  # also via getfixturevalue
            item.add_marker(pytest.mark.kernels)


@pytest.fixture
def fused_op_calls(monkeypatch):
    """Calls of the inference-only fused ops' kernel launchers: {"select": skip selections, "moe": routed
    MoE updates} (so a test can tell that the fused path, not a fallback, ran)."""
    from mosaic_fast.ops import moe_routed, token_skip

    calls = {"select": 0, "moe": 0}

    def count(module, name, key):
        real = getattr(module, name)

        def counted(*args):
            calls[key] += 1
            return real(*args)

        monkeypatch.setattr(module, name, counted)

    count(token_skip, "_select", "select")
    count(moe_routed, "_launch", "moe")
    return calls


@pytest.fixture
def onednn_library(monkeypatch):
    """The fast modules' fp32 CPU GEMMs on oneDNN, whatever the CPU (the default only on AVX-512 CPUs);
    skips where this torch build has no oneDNN Linear."""
    from mosaic_fast.ops import cpu_gemm

    if not cpu_gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(cpu_gemm, "_library", "onednn")


@pytest.fixture
def onednn_calls(onednn_library, monkeypatch):
    """The epilogue of every call that reaches oneDNN's Linear, in order; every size goes there (tests use
    small shapes). Each operand must be row- or column-major (oneDNN is slow on any other layout)."""
    from mosaic_fast.ops import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "MIN_ONEDNN_MACS", 0)
    calls = []
    real = cpu_gemm._ONEDNN_LINEAR

    def spy(*args):
        for operand in args[:2]:
            assert operand.is_contiguous() or (operand.dim() == 2 and operand.t().is_contiguous())
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(cpu_gemm, "_ONEDNN_LINEAR", spy)
    return calls
