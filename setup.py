"""Build script: installs kernels/ as ``mosaic_fast.kernels`` and builds the pybind11 extension.

The extension ``mosaic_fast._C`` has no libtorch linkage (it works on raw buffers), so it builds in
seconds against any torch. OpenMP is used when the compiler accepts ``-fopenmp``.
"""

import os
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup


def _compiler_has_openmp() -> bool:
    """True when the default C++ compiler builds a tiny OpenMP program."""
    if sys.platform == "win32":
        return False
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objs, os.path.join(tmp, "omp"), extra_postargs=["-fopenmp"])
        except Exception:
            return False
    return True


def _extensions() -> list:
    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
    if not sources:
        return []
    flags = ["-O3"]
    link = []
    if _compiler_has_openmp():
        flags.append("-fopenmp")
        link.append("-fopenmp")
    return [
        Pybind11Extension(
            "mosaic_fast._C",
            sources,
            cxx_std=17,
            extra_compile_args=flags,
            extra_link_args=link,
        )
    ]


# mosaic_fast/kernels is a symlink to kernels/ so the source tree imports too; the wheel gets real files.
packages = sorted({*find_packages(include=["mosaic_fast", "mosaic_fast.*"]), "mosaic_fast.kernels"})

setup(
    packages=packages,
    package_dir={"mosaic_fast.kernels": "kernels"},
    package_data={"mosaic_fast": ["py.typed", "data/demo/*.npz", "data/demo/*.md"]},  # py.typed: PEP 561
    ext_modules=_extensions(),
    cmdclass={"build_ext": build_ext},
)
