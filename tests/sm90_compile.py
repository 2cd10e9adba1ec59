"""Compile Triton kernels for Hopper (sm_90) without a GPU: `python tests/sm90_compile.py`.

Triton's interpreter (how CI runs the kernels) checks their arithmetic but not that they compile: type
mismatches between branches, unsupported ops or too much shared memory only show on a GPU. This script
compiles every autotuning config of each kernel ahead of time for sm_90 (Triton's bundled ptxas), with
the argument types the launchers pass, in bf16 and in fp32 with IEEE dots, and prints one JSON line per
kernel and config: shared memory bytes, or the error. Run by tests/test_sm90_compile.py in a process
without TRITON_INTERPRET (the interpreter replaces the kernels when it is set). Covered: the DynaMer
kernels (routed MoE, skip selection, the training MoE kernels) and the grouped-adapter forward with
the one-pass variant, i.e. the kernels that have not yet run on a GPU.
"""

from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mosaic_fast.kernels import grouped_adapter, moe_adapter, moe_routed, token_skip
from mosaic_fast.ops.token_skip import SELECT_MAX_TOKENS

TARGET = GPUTarget("cuda", 90, 32)
INT64_PTRS = {"idxg_ptr", "idxm_ptr", "idx_ptr", "rows_ptr", "eidx_ptr"}
INT32_PTRS = {"order_ptr", "offs_ptr", "tcum_ptr"}
FP32_PTRS = {"p_ptr", "coef_ptr", "rank_ptr"}


def _types(fn, dtype: str, fp32_probs: bool, overrides: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in overrides:
            sig[name] = overrides[name]
        elif name in INT64_PTRS:
            sig[name] = "*i64"
        elif name in INT32_PTRS:
            sig[name] = "*i32"
        elif name in FP32_PTRS and fp32_probs:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


def _compile(fn, constexprs: dict, dtype: str, fp32_probs: bool, options: dict, overrides: dict) -> dict:
    sig = _types(fn, dtype, fp32_probs, overrides)
    sig.update({name: "constexpr" for name in constexprs})
    entry = {"kernel": fn.__name__, "dtype": dtype, "constexprs": {k: str(v) for k, v in constexprs.items()},
             **options}
    try:
        compiled = triton.compile(ASTSource(fn, sig, constexprs), target=TARGET, options=options)
        entry["shared"] = compiled.metadata.shared
    except Exception as exc:  # reported, and the test fails on it
        entry["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    return entry


def _options(config: triton.Config) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def _grouped_forward_jobs() -> list[tuple]:
    """The grouped-adapter forward (kernels/grouped_adapter.py: ``forward``): every config, two-pass and
    one-pass LayerNorm (the one-pass never run on a GPU yet), bf16, bottleneck up to 192 (R_BLOCK 256),
    segment routing (ids) and, for the first config, permuted routing (ids, perm, counts)."""
    ga = grouped_adapter
    fp32 = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "meta_ptr": "*i32", "scale": "fp32", "eps": "fp32"}
    routing = {ga.MODE_SEG: {"ids_ptr": "*i64", "perm_ptr": "*i64", "cnt_ptr": "*i64"},
               ga.MODE_PERM: {"ids_ptr": "*i64", "perm_ptr": "*i32", "cnt_ptr": "*i32"}}
    jobs = []
    for i, cfg in enumerate(ga._fwd_configs()):  # two-pass then one-pass configs (ONEPASS in cfg.kwargs)
        for mode in (ga.MODE_SEG, ga.MODE_PERM) if i == 0 else (ga.MODE_SEG,):
            constexprs = dict(MODE=mode, S_BLOCK=64 if mode == ga.MODE_SEG else 16, HAS_BASE=True,
                              SAVE=True, SAVE_A=False, R_BLOCK=256, EVEN_D=True, UP=True,
                              DOT_PRECISION="tf32", **cfg.kwargs)
            jobs.append((ga._fwd_kernel, constexprs, "bf16", False, _options(cfg), {**fp32, **routing[mode]}))
    return jobs


def main() -> None:
    jobs = []
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        configs = moe_routed._route_down_configs() if dtype == "bf16" else moe_routed._route_down_configs()[:1]
        for i, cfg in enumerate(configs):
            for identity in ((False, True) if i == 0 else (False,)):
                jobs.append((moe_routed._moe_route_down_kernel,
                             dict(IDENTITY=identity, HAS_SKIP=not identity, BLOCK_E=16, DOT_PRECISION=precision,
                                  **cfg.kwargs), dtype, True, _options(cfg)))
        configs = moe_routed._combine_configs() if dtype == "bf16" else moe_routed._combine_configs()[:1]
        for cfg in configs:
            jobs.append((moe_routed._moe_gate_combine_kernel,
                         dict(IDENTITY=False, DOT_PRECISION=precision, **cfg.kwargs), dtype, True,
                         _options(cfg)))
        for block_n in (256, 1024, SELECT_MAX_TOKENS):
            meta = token_skip.select_meta(block_n)
            warps = {"num_warps": meta.pop("num_warps")}
            for all_tokens in (False, True) if block_n == 256 else (False,):
                jobs.append((token_skip._skip_select_kernel, dict(ALL=all_tokens, **meta), dtype, True, warps))
        cfg = moe_adapter._down_configs()[0]
        jobs.append((moe_adapter._moe_down_kernel, dict(BM=moe_adapter._DOWN_BM, BLOCK_R=64, BLOCK_E=8,
                                                        DOT_PRECISION=precision, **cfg.kwargs),
                     dtype, False, _options(cfg)))
        cfg = moe_adapter._combine_configs()[0]
        jobs.append((moe_adapter._moe_combine_kernel, dict(BLOCK_R=64, STORE_MIX=True, DOT_PRECISION=precision,
                                                           **cfg.kwargs), dtype, False, _options(cfg)))
    jobs = [(*job, {}) for job in jobs] + _grouped_forward_jobs()
    for fn, constexprs, dtype, fp32_probs, options, overrides in jobs:
        print(json.dumps(_compile(fn, constexprs, dtype, fp32_probs, options, overrides)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
