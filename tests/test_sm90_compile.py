"""Every Triton kernel launched from kernels/ compiles for Hopper (sm_90) without a GPU (see sm90_compile.py):
no compile errors, and the first autotuning config of every case (the one MOSAIC_FAST_AUTOTUNE=0 runs) fits
in shared memory, at ViT-B's width and at D = 384, 1024, 1280 and an odd width (200). A kernel entry point
that the script does not compile fails the test."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

#: Largest dynamic shared memory one block may use on H100/H200 (227 KiB).
HOPPER_SHARED_BYTES = 232_448


def _is_triton_jit(decorator: ast.expr) -> bool:
    """``@triton.jit``, ``@triton.jit(...)``, ``@jit`` or ``@jit(...)``."""
    if isinstance(decorator, ast.Call):
        decorator = decorator.func
    if isinstance(decorator, ast.Attribute):
        return decorator.attr == "jit"
    return isinstance(decorator, ast.Name) and decorator.id == "jit"


def kernel_entry_points(root: Path | None = None) -> set[tuple[str, str]]:
    """(module, function) of every ``@triton.jit`` function in kernels/*.py (or ``root``) that host code launches.

    The rule: an entry point is a jit function whose name is used outside the bodies of the module's jit
    functions (``kernel[grid](...)``, ``triton.autotune(...)(kernel)``); a helper is used only inside
    them (called from other kernels). Read from the source, so it does not depend on TRITON_INTERPRET."""
    if root is None:
        root = Path(next(iter(importlib.util.find_spec("mosaic_fast.kernels").submodule_search_locations)))
    entries = set()
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        jit = [
            node
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and any(_is_triton_jit(d) for d in node.decorator_list)
        ]
        names = {node.name for node in jit}
        in_kernels = {id(n) for node in jit for n in ast.walk(node)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Name) and n.id in names and id(n) not in in_kernels:
                entries.add((path.stem, n.id))
    return entries


def test_kernel_entry_points_rule():
    """The rule finds the launched kernels and leaves out the helpers they call."""
    entries = kernel_entry_points()
    kernels = {("grouped_adapter", "_fwd_kernel"), ("grouped_adapter", "_bwd_dh_kernel"),
               ("token_skip", "_skip_merge_kernel"), ("patch_embed3d", "_patch_embed3d_fwd_kernel")}  # fmt: skip
    helpers = {("grouped_adapter", "_tile"), ("grouped_adapter", "_ln_down_onepass"), ("moe_routed", "_of_stream")}
    assert kernels <= entries
    assert not helpers & entries


def test_kernels_compile_for_sm90():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    entries = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]

    compiled = {(e["module"], e["kernel"]) for e in entries}
    missing = kernel_entry_points() - compiled
    hint = "add a case that calls their launcher"
    assert not missing, f"kernels that tests/sm90_compile.py does not compile ({hint}): {sorted(missing)}"

    # every autotuning config of every kernel is compiled in some case (the configs after the launcher's pruning)
    seen, counts = defaultdict(set), defaultdict(int)
    for e in entries:
        seen[e["module"], e["kernel"]].add(e["config"])
        counts[e["module"], e["kernel"]] = max(counts[e["module"], e["kernel"]], e["configs"])
    partial = {k: (sorted(seen[k]), counts[k]) for k in seen if seen[k] != set(range(counts[k]))}
    assert not partial, f"kernels with autotuning configs never compiled (indices seen, configs): {partial}"

    # a non-first config that the autotuner would skip (OutOfResources, PTXASError) is no failure
    failed = [e for e in entries if "error" in e and (e["first"] or not e["skippable"])]
    assert not failed, json.dumps(failed, indent=1)[:4000]
    too_big = [e for e in entries if e["first"] and e["shared"] > HOPPER_SHARED_BYTES]
    assert not too_big, "first configs over the shared memory limit:\n" + "\n".join(
        f"{e['module']}.{e['kernel']} {e['dtype']} {e['cases']} {e['constexprs']}: {e['shared']} bytes" for e in too_big
    )

    # the other ViT widths (384, 1024, 1280) and the odd width: every kernel's first config compiled there too
    widths = {768, 384, 1024, 1280, 200}
    at_width = defaultdict(set)
    for e in entries:
        for w in e["first_widths"]:
            at_width[w].add((e["module"], e["kernel"]))
    assert set(at_width) == widths, f"widths compiled: {sorted(at_width)}"
    short = {w: sorted(kernel_entry_points() - at_width[w]) for w in widths if kernel_entry_points() - at_width[w]}
    assert not short, f"kernels without a first config compiled at these widths: {short}"
