"""Kernels not yet run on a GPU compile for Hopper (sm_90), every autotuning config, without a GPU
(see sm90_compile.py): the DynaMer kernels and the grouped-adapter forward's one-pass variant."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Largest dynamic shared memory one block may use on H100/H200 (227 KiB).
HOPPER_SHARED_BYTES = 232_448


def test_kernels_compile_for_sm90():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    entries = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    kernels = {e["kernel"] for e in entries}
    assert {"_moe_route_down_kernel", "_moe_gate_combine_kernel", "_skip_select_kernel", "_fwd_kernel"} <= kernels
    failed = [e for e in entries if "error" in e]
    assert not failed, json.dumps(failed, indent=1)[:3000]
    seen = set()
    for e in entries:  # the first config of each kernel and dtype is the one MOSAIC_FAST_AUTOTUNE=0 runs
        key = (e["kernel"], e["dtype"])
        if key not in seen:
            seen.add(key)
            assert e["shared"] <= HOPPER_SHARED_BYTES, f"{key}: {e['shared']} bytes of shared memory"
