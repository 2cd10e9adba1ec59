"""`mosaic-fast info`: what this install can run, as printed and as embedded in benchmark JSON."""

import shutil
import subprocess

import pytest

from mosaic_fast import info
from mosaic_fast.ops import cpu_gemm


def test_info_reports_extension_backend_and_cpu_gemm_library(capsys):
    collected = info.collect()
    assert collected["C++ extension (mosaic_fast._C)"] == "built"  # pip install . builds it
    assert collected["backend"] in ("auto", "triton", "torch")
    expected = "oneDNN" if cpu_gemm.onednn_enabled() else "MKL/BLAS (F.linear)"
    assert collected["CPU float32 GEMMs (fast modules)"] == expected
    with cpu_gemm.cpu_gemm_library("mkl"):
        assert info.collect()["CPU float32 GEMMs (fast modules)"] == "MKL/BLAS (F.linear)"
    assert info.main([]) == 0
    printed = capsys.readouterr().out
    assert all(key in printed for key in collected)


def test_cpu_description_names_model_family_and_avx512(tmp_path):
    """Benchmark JSON records the CPU: ratios on CPU depend on its generation (Zen 4 vs Zen 5)."""
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC 9999\n"
    cpuinfo.write_text(block.format(0) + "flags\t\t: fpu sse avx2 avx512f avx512bw\n\n"
                       + block.format(1) + "flags\t\t: fpu\n")
    assert info.cpu_description(str(cpuinfo)) == "AMD EPYC 9999 (family 26, model 2; AVX-512)"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2\n")
    assert info.cpu_description(str(cpuinfo)) == "Some CPU (no AVX-512)"
    assert info.cpu_description(str(tmp_path / "absent")) != ""
    assert info.collect()["cpu"] == info.cpu_description()


def test_unmet_requirements_name_the_versions_never_checked(monkeypatch):
    """Versions outside the package's requirements (as a --no-deps install can leave) are named; extras,
    other platforms' requirements and local version labels (torch's +cu130) are not complaints."""
    from importlib import metadata

    requires = ["torch>=2.11", "triton>=3.6; platform_system == 'Linux'", "numpy>=1.24", "medmnist>=3.0",
                "pytest>=7; extra == 'test'", "pywin32>=300; platform_system == 'Windows'"]
    versions = {"torch": "2.11.0+cu130", "triton": "3.6.0", "numpy": "1.26.4", "medmnist": "3.0.2"}

    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(metadata, "requires", lambda dist: requires)
    monkeypatch.setattr(metadata, "version", version)
    assert info.unmet_requirements() == []
    assert info.collect()["requirements"] == "all met"
    versions["torch"] = "2.9.1+cu128"
    del versions["medmnist"]
    assert info.unmet_requirements() == ["torch 2.9.1+cu128 (needs >=2.11)", "medmnist missing (needs >=3.0)"]
    assert info.collect()["requirements"] == "NOT MET: torch 2.9.1+cu128 (needs >=2.11); medmnist missing (needs >=3.0)"


def test_requirements_that_cannot_be_read_say_so(monkeypatch):
    """A distribution never installed (or no packaging module) is "not checked", never "all met"."""
    import sys

    assert info.unmet_requirements("no-such-distribution-xyz") is None
    monkeypatch.setitem(sys.modules, "packaging.requirements", None)  # import fails
    assert info.unmet_requirements() is None
    assert info.collect()["requirements"].startswith("not checked")


def test_source_revision_names_the_checkout_commit_and_local_changes(tmp_path):
    """Run from a git checkout, the revision is the short commit (and says when tracked files differ from
    it; untracked files do not count); a package directory that is not the top of a repository
    (site-packages, a venv inside a repo) is an installed package."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "checkout"
    package = repo / "mosaic_fast"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert info.source_revision(package) == f"git {commit}"
    (repo / "results.json").write_text("{}")  # untracked files (outputs, scratch) are not changes to the code
    (package / "scratch.py").write_text("")
    assert info.source_revision(package) == f"git {commit}"
    (package / "__init__.py").write_text("x = 1\n")
    assert info.source_revision(package) == f"git {commit} + uncommitted changes"
    nested = repo / "venv" / "site-packages" / "mosaic_fast"
    nested.mkdir(parents=True)
    assert info.source_revision(nested) == "installed package (no git checkout)"
    assert info.source_revision(tmp_path / "elsewhere" / "mosaic_fast") == "installed package (no git checkout)"


def test_installed_package_ships_its_type_hints_marker():
    """PEP 561: ``py.typed`` in the installed package (setup.py's package_data), so a user's type checker
    reads mosaic_fast's annotations instead of treating the package as untyped."""
    from importlib.resources import files

    assert (files("mosaic_fast") / "py.typed").is_file()
