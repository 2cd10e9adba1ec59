"""Every Triton kernel launched from kernels/ compiles for Hopper (sm_90) without a GPU (see sm90_compile.py):
no compile errors, and the first autotuning config of every case (the one MOSAIC_FAST_AUTOTUNE=0 runs) fits
in shared memory, at ViT-B's width and at D = 384, 1024, 1280 and an odd width (200), and at the ViT widths
does not spill registers in the dtypes with tensor-core dots; the other autotuning configs compiled (bf16,
the benchmark shapes) fit in shared memory too, since one that does not can only be skipped. A kernel entry
point that the script does not compile fails the test, and so does a grouped adapter kernel not compiled both
with and without its alignment hints (R_ALIGNED)."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from sm90_resources import HOPPER_SHARED_BYTES, parse_resource_usage, warps_per_sm

#: Spill bytes per thread tolerated in a first config: a few words that ptxas moves at 255 registers, which
#: differ between ptxas versions (the one-pass forward: 8 with triton 3.8's, none with 3.6's; the dh kernel
#: recomputing the pre-activation in bf16/fp16: none with 3.8's at 183 registers, 56/64 with 3.6's at 255
#: with the alignment hints, 32 without). A tile that does not fit spills far more: the split up projection's
#: first config spilled 160 bytes before it ran 8 warps, the fp32 dh kernel 5-15 KB at BK 64.
SPILL_SLACK_BYTES = 64


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


#: A cubin's ``cuobjdump -res-usage -sass`` output (lines of the fp32 weight-gradient kernel's): the spill
#: stores and loads are the bytes its STL/LDL instructions move (4, or 8 for .64, 16 for .128), which for the
#: whole kernel gave ptxas -v's own "872 bytes spill stores, 744 bytes spill loads".
CUOBJDUMP_SAMPLE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _bwd_w_kernel:
  REG:255 STACK:592 SHARED:1024 LOCAL:0 CONSTANT[0]:800 TEXTURE:0 SURFACE:0 SAMPLER:0

        code for sm_90a
        /*1a40*/                   STL [R1+0x140], R27 ;                                       /* 0x0001401b01007387 */
        /*1a50*/                   STL.64 [R1+0x148], R28 ;                                    /* 0x0001481c01007387 */
        /*1a60*/                   STL.128 [R1+0x150], R4 ;                                    /* 0x0001500401007387 */
        /*2b10*/                   LDL.LU R27, [R1+0x140] ;                                    /* 0x00014000011b7983 */
        /*2b20*/                   LDL.LU.64 R28, [R1+0x148] ;                                 /* 0x00014800011c7983 */
        /*2b30*/                   LDL R4, [R1+0x150] ;                                        /* 0x0001500001047983 */
        /*2b40*/                   LDG.E.64 R6, desc[UR4][R2.64] ;                             /* 0x0000000402067981 */
"""


def test_resource_usage_parsing():
    """Registers, local memory (stack frame) and the spill bytes of the STL/LDL instructions; a cubin
    without a resource line gives None."""
    usage = parse_resource_usage(CUOBJDUMP_SAMPLE)
    assert usage == {"registers": 255, "local": 592, "spill_stores": 4 + 8 + 16, "spill_loads": 4 + 8 + 4}
    assert set(parse_resource_usage("no kernel here").values()) == {None}


def test_warps_per_sm_follows_the_occupancy_rules():
    """sm_90: 64 K registers in four sub-partitions, allocated per warp in units of 256; 64 warps, 32 blocks;
    228 KiB of shared memory per SM with 1 KiB reserved per block (CUDA's occupancy calculator)."""
    assert warps_per_sm(32, 0, 8) == 64  # full occupancy
    assert warps_per_sm(128, 0, 4) == 16  # 4,096 registers per warp: 65,536 / 4,096
    assert warps_per_sm(96, 0, 1) == 20  # 3,072 per warp: 5 per sub-partition (not 65,536 // 3,072 = 21)
    assert warps_per_sm(52, 0, 4) == 36  # 56 x 32 = 1,792 per warp: 9 per sub-partition, 9 blocks of 4
    assert warps_per_sm(255, 0, 8) == 8  # 8,192 per warp: one block of 8 warps
    assert warps_per_sm(64, 100 * 1024, 4) == 8  # (100 + 1) KiB per block: 2 blocks in 228 KiB
    assert warps_per_sm(64, HOPPER_SHARED_BYTES, 4) == 4  # the largest block: alone on its SM
    assert warps_per_sm(16, 0, 1) == 32  # at most 32 blocks


def _fma_dots(dtype: str) -> bool:
    """fp32 operands: IEEE dots are FMA loops with both operand tiles in registers (sm90_compile.py's dtype
    names: "fp32/ieee", "fp32", "u8/fp32", "fp32/fp32"; "fp32 act/bf16 w" has bf16 dots)."""
    return dtype.endswith("ieee") or dtype.endswith("fp32")


def _spill_accepted(e: dict) -> bool:
    """Whether a first config's spills are accepted. At the ViT widths (multiples of 16) with the benchmark
    bottlenecks, a dtype with tensor-core dots may spill :data:`SPILL_SLACK_BYTES` at most, and a kernel
    without autotuning (token skipping, gated specialist: its only config) nothing in any dtype."""
    spilled = max(e.get("spill_stores") or 0, e.get("spill_loads") or 0)
    if not spilled or not any(w % 16 == 0 for w in e["first_widths"]):
        return True  # the odd width 200: unaligned rows leave every load scalar, each with a 64-bit address
    if e["module"] in ("token_skip", "gated_specialist"):
        return False
    if _fma_dots(e["dtype"]) or all("r = 200" in case for case in e["cases"]):
        # not asserted (the script's summary lists them): fp32 FMA dots; the MoE adapter at r = 200, whose
        # combine loads a (BLOCK_R = 256, BN) weight tile per expert element by element
        return True
    return spilled <= SPILL_SLACK_BYTES


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

    # the grouped kernels with their alignment hints (bottlenecks all multiples of 16) and without
    hints = defaultdict(set)
    for e in entries:
        if "R_ALIGNED" in e["constexprs"]:
            hints[e["kernel"]].add(e["constexprs"]["R_ALIGNED"])
    grouped = {"_fwd_kernel", "_up_kernel", "_bwd_dh_kernel", "_bwd_w_kernel"}
    assert set(hints) == grouped and all(v == {"True", "False"} for v in hints.values()), dict(hints)

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
    # every config compiled fits: a first config must, and another one that does not is one the autotuner can
    # only skip (route-and-down's BH 256 tile was, at three stages)
    too_big = [e for e in entries if e.get("shared", 0) > HOPPER_SHARED_BYTES]
    assert not too_big, "configs over the shared memory limit:\n" + "\n".join(
        f"{e['module']}.{e['kernel']} {e['dtype']} config {e['config']} {e['cases']} {e['constexprs']}: "
        f"{e['shared']} bytes" for e in too_big
    )

    # registers and spills (cuobjdump from Triton's bundle; without it the checks below would pass unread)
    unread = [e["kernel"] for e in entries if "error" not in e and e["registers"] is None]
    assert not unread, f"no register counts (cuobjdump missing?) for {sorted(set(unread))}"
    spilling = [e for e in entries if e["first"] and not _spill_accepted(e)]
    assert not spilling, "first configs that spill registers:\n" + "\n".join(
        f"{e['module']}.{e['kernel']} {e['dtype']} {e['cases'][0]} {e['constexprs']} {e['num_warps']} warps: "
        f"{e['registers']} registers, spill stores/loads {e['spill_stores']}/{e['spill_loads']} B"
        for e in spilling
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
