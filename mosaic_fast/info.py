"""``mosaic-fast info``: versions, devices, and which fast paths this install can run."""

from __future__ import annotations

import importlib
import platform
import subprocess
from pathlib import Path

from .cliutil import ShortUsageParser


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # an optional dependency that is absent or broken
        return f"not available ({type(exc).__name__})"


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU model, with its family/model numbers and whether it has AVX-512 (Linux /proc/cpuinfo; else
    ``platform.processor()``). CPU benchmark ratios depend on it: e.g. MKL's AVX2 path on AMD against
    oneDNN's AVX-512 gains ~2x on Zen 5 and a few percent on Zen 4."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown"
    name = fields.get("model name", platform.processor() or "unknown")
    extra = [f"family {fields['cpu family']}, model {fields.get('model', '?')}"] if "cpu family" in fields else []
    extra.append("AVX-512" if "avx512f" in fields.get("flags", "").split() else "no AVX-512")
    return f"{name} ({'; '.join(extra)})"


def source_revision(package_dir: Path | None = None) -> str:
    """The git commit the package runs from (``"git 033a1ae"``, ``"+ uncommitted changes"`` when the tree
    differs from it) when imported from a checkout (editable install, PYTHONPATH); "installed package (no git
    checkout)" otherwise. Benchmark JSON records it, so each result names the code it measured."""
    package_dir = package_dir or Path(__file__).resolve().parent
    root = package_dir.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            raise ValueError("the package is not at the top of this repository")  # e.g. a venv inside a repo
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError, ValueError):
        return "installed package (no git checkout)"
    return f"git {commit}" + (" + uncommitted changes" if dirty else "")


def unmet_requirements(distribution: str = "mosaic-fast") -> list[str] | None:
    """The installed dependencies outside what ``distribution``'s metadata asks for (pyproject.toml's
    ``dependencies`` on this platform, extras left out), e.g. ``"torch 2.9.1 (needs >=2.11)"``. A
    ``pip install --no-deps`` or an older environment can leave such versions, which were never checked.
    Empty when every requirement is met; None when it cannot tell (a source tree that was never installed,
    or no ``packaging`` module to read the requirements with)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
        requirements = metadata.requires(distribution) or []
    except (ImportError, metadata.PackageNotFoundError):
        return None
    unmet = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (e.g. test) or another platform
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{req.name} missing (needs {req.specifier})")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{req.name} {version} (needs {req.specifier})")
    return unmet


def _requirements_line(unmet: list[str] | None) -> str:
    if unmet is None:
        return "not checked (no installed package metadata, or no packaging module)"
    return "NOT MET: " + "; ".join(unmet) if unmet else "all met"


def collect() -> dict[str, str]:
    """Everything ``info`` prints, as a dict (also embedded in benchmark JSON)."""
    import torch

    import mosaic_fast
    from mosaic_fast.backend import INTERPRET, get_backend, triton_available
    from mosaic_fast.ops.cpu_gemm import onednn_enabled

    try:
        from mosaic_fast import _C  # noqa: F401

        ext = "built"
    except ImportError as exc:
        ext = f"missing ({exc})"
    cuda = torch.cuda.is_available()
    return {
        "mosaic_fast": mosaic_fast.__version__,
        "source": source_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "medmnist": _version("medmnist"),
        "cuda available": str(cuda),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "cpu": cpu_description(),
        "backend": get_backend(),
        "triton kernels": (
            "available on CUDA" if triton_available() and cuda
            else "interpreter (TRITON_INTERPRET=1)" if triton_available() and INTERPRET
            else "installed, no GPU: torch fallback on CPU" if triton_available()
            else "triton not installed"
        ),
        "C++ extension (mosaic_fast._C)": ext,
        "float32 matmul precision": torch.get_float32_matmul_precision(),  # the kernels' fp32 dots follow it
        "CPU float32 GEMMs (fast modules)": "oneDNN" if onednn_enabled() else "MKL/BLAS (F.linear)",
        "requirements": _requirements_line(unmet_requirements()),
    }


def main(argv: list[str] | None = None) -> int:
    """``mosaic-fast info``: print :func:`collect`'s report, one ``key  value`` line per item."""
    ShortUsageParser(prog="mosaic-fast info", description=__doc__).parse_args(argv)
    for key, value in collect().items():
        print(f"{key:<32} {value}")
    return 0
