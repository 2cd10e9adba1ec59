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
