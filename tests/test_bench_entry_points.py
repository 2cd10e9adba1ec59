"""`pytest benchmarks/ --benchmark-only` (README): the pytest-benchmark entry points collect the runner's
columns and run, so they cannot rot unnoticed (they live outside this suite's testpaths)."""

import subprocess
import sys
from pathlib import Path

BENCH_TESTS = Path(__file__).resolve().parents[1] / "benchmarks" / "test_bench.py"


def _pytest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    # from a scratch directory: the installed package is what imports, as for a user
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(BENCH_TESTS), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_entry_points_collect_every_column_of_the_runner(tmp_path):
    done = _pytest(tmp_path, "--collect-only", "-q")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ids = {line.split("[", 1)[1].rstrip("]") for line in done.stdout.splitlines() if "test_case[" in line}
    for column in ("reference", "fast", "compiled"):
        assert f"moe_skip_rho0.1-{column}" in ids
    assert "mosaic_train_step_single_b8-compiled" in ids and "dynamer_block_rho1-fast" in ids


def test_entry_points_time_a_case(tmp_path):
    done = _pytest(tmp_path, "--benchmark-only", "-k", "moe_skip_rho0.1 and not compiled",
                   "--benchmark-max-time=0.05", "--benchmark-min-rounds=2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout and "moe_skip_rho0.1" in done.stdout
