"""`mosaic-fast info`: what this install can run, as printed and as embedded in benchmark JSON."""

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
