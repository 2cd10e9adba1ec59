"""Registers, local memory and spills of a compiled cubin, and the occupancy they allow on Hopper (sm_90).

Read from the cubin with the ``cuobjdump`` that Triton bundles (``-res-usage -sass``), so they are the
compiled kernel's own, also for a kernel that Triton's cache returns without running ptxas:
``REG`` (registers per thread), ``STACK`` + ``LOCAL`` (local memory per thread: the stack frame the spills
go to), and the spill stores/loads as the bytes the SASS's local stores/loads (``STL``/``LDL``) move: a
Triton kernel has no local arrays, so these are the spills (the numbers ``ptxas -v`` reports as "bytes
spill stores/loads"). Every field is None when the tool is missing or its output cannot be read.
"""

from __future__ import annotations

import re
import subprocess
import tempfile

#: sm_90 per SM: 64 K registers in 4 sub-partitions, allocated per warp in units of 256; 64 warps
#: (2048 threads), 32 blocks; 228 KiB of shared memory, allocated in 128-byte units with 1 KiB reserved
#: per block (CUDA's cuda_occupancy.h and the Hopper tuning guide).
REGISTERS_PER_SM, REGISTER_SUB_PARTITIONS, REGISTER_UNIT = 65_536, 4, 256
WARPS_PER_SM, BLOCKS_PER_SM = 64, 32
SHARED_PER_SM, SHARED_UNIT, SHARED_RESERVED_PER_BLOCK = 233_472, 128, 1024
#: Largest dynamic shared memory one block may use on H100/H200 (227 KiB): the SM's less the block's reserve.
HOPPER_SHARED_BYTES = SHARED_PER_SM - SHARED_RESERVED_PER_BLOCK

#: What cuobjdump gives (:func:`parse_resource_usage`), then what follows from it (:func:`resource_usage`).
USAGE_FIELDS = ("registers", "local", "spill_stores", "spill_loads")
FIELDS = (*USAGE_FIELDS, "warps_per_sm")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")
_LOCAL_ACCESS = re.compile(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)\s")
_WIDTH_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _cuobjdump() -> str | None:
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError, RuntimeError):  # no triton, no such knob, or no bundled binary
        return None


def _access_bytes(suffixes: str) -> int:
    """Bytes one thread moves in an STL/LDL with these suffixes (``.64``, ``.LU.128``, ``.U8``; none: 4)."""
    return next((_WIDTH_BYTES[s] for s in suffixes.split(".") if s in _WIDTH_BYTES), 4)


def parse_resource_usage(text: str) -> dict:
    """Registers, local memory and spill stores/loads from ``cuobjdump -res-usage -sass`` output of a cubin
    with one kernel (None when it holds no resource usage line)."""
    usage = _USAGE.search(text)
    if usage is None:
        return dict.fromkeys(USAGE_FIELDS)
    spills = {"STL": 0, "LDL": 0}
    for opcode, suffixes in _LOCAL_ACCESS.findall(text):
        spills[opcode] += _access_bytes(suffixes)
    registers, stack, local = (int(v) for v in usage.groups())
    return {"registers": registers, "local": stack + local, "spill_stores": spills["STL"], "spill_loads": spills["LDL"]}


def resource_usage(cubin: bytes, shared: int, num_warps: int) -> dict:
    """The :data:`FIELDS` of a kernel compiled to ``cubin`` that uses ``shared`` bytes of shared memory per
    block and runs ``num_warps`` warps: registers per thread, local memory per thread, spill stores and
    loads (bytes), resident warps per SM (:func:`warps_per_sm`); all None when cuobjdump cannot read it."""
    tool = _cuobjdump()
    if tool is None:
        return dict.fromkeys(FIELDS)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        try:
            run = subprocess.run([tool, "-res-usage", "-sass", file.name], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return dict.fromkeys(FIELDS)
    usage = parse_resource_usage(run.stdout) if run.returncode == 0 else dict.fromkeys(USAGE_FIELDS)
    registers = usage["registers"]
    return {**usage, "warps_per_sm": None if registers is None else warps_per_sm(registers, shared, num_warps)}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def warps_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Resident warps per SM of a kernel using ``registers`` per thread and ``shared`` bytes per block, run
    with ``num_warps`` warps per block (the least of the warp, block, register and shared memory limits)."""
    per_warp = _round_up(max(registers, 1) * 32, REGISTER_UNIT)
    warps_by_registers = REGISTERS_PER_SM // REGISTER_SUB_PARTITIONS // per_warp * REGISTER_SUB_PARTITIONS
    blocks_by_shared = SHARED_PER_SM // _round_up(shared + SHARED_RESERVED_PER_BLOCK, SHARED_UNIT)
    blocks = min(WARPS_PER_SM // num_warps, BLOCKS_PER_SM, warps_by_registers // num_warps, blocks_by_shared)
    return blocks * num_warps
