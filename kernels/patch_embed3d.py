"""3D patch embedding projection: one GEMM whose prologue gathers the patches from the volume.

``y[b, l, :] = W @ (x[b, :, patch l] * scale + shift) + bias`` with ``W`` the Conv3d weight viewed as
(E, K), K = C·pd·ph·pw. The (B·L, K) patch matrix is never written to memory: each A tile is loaded
straight from the (B, C, D, H, W) volume (any strides, uint8/int or float), converted to fp32, normalised,
cast to the weight dtype and fed to ``tl.dot``; the bias is added in the epilogue. Row m = b·L + l with
l = (d'·NH + h')·NW + w' (Conv3d's flatten(2) order); column k = ((c·pd + dd)·ph + hh)·pw + ww (the
flattened Conv3d weight order). The LayerNorm that follows runs in torch.

The patch sizes are compile-time constants, so the index arithmetic is divisions by constants.
Under ``TRITON_INTERPRET=1`` one fixed block config is used (autotuning there would time every config
on the CPU); on the GPU a small autotuned set keyed on the GEMM shape and the patch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .precision import dot_precision
from .tuning import tuned_configs


@triton.jit
def _patch_embed3d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K, L, NH, NW,
    sxb, sxc, sxd, sxh, sxw,
    swn, swk, sym, syn,
    scale, shift,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share the weight column tiles while they are in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N

    # Row (patch) -> offset of the patch's first voxel in the volume.
    rm64 = rm.to(tl.int64)
    b = rm64 // L
    tok = rm64 % L
    iw = tok % NW
    ih = (tok // NW) % NH
    idp = tok // (NW * NH)
    row_off = b * sxb + (idp * PD) * sxd + (ih * PH) * sxh + (iw * PW) * sxw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        rk64 = rk.to(tl.int64)
        ww = rk64 % PW
        hh = (rk64 // PW) % PH
        dd = (rk64 // (PW * PH)) % PD
        cc = rk64 // (PW * PH * PD)
        col_off = cc * sxc + dd * sxd + hh * sxh + ww * sxw
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=a_mask, other=0)
        a = tl.where(a_mask, a.to(tl.float32) * scale + shift, 0.0)
        w = tl.load(w_ptr + rn[None, :] * swn + rk[:, None] * swk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a.to(w.dtype), w, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm64[:, None] * sym + rn[None, :] * syn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 256, 32, 8, 3),
    ]
]

_TUNED_CONFIGS = tuned_configs(_AUTOTUNE_CONFIGS)

_patch_embed3d_fwd_autotuned = triton.autotune(configs=_TUNED_CONFIGS, key=["M", "N", "K", "PD", "PH", "PW"])(
    _patch_embed3d_fwd_kernel
)

#: The one config used under Triton's interpreter (and the smallest block that tl.dot accepts is 16).
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def patch_embed3d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: tuple[int, int, int],
    scale: float,
    shift: float,
) -> torch.Tensor:
    """Launch the fused gather + GEMM + bias kernel.

    ``x``: (B, C, D, H, W), any strides, integer or floating dtype (not float64/bool); ``weight``:
    (E, C, pd, ph, pw) Conv3d weight (fp32/fp16/bf16); ``bias``: (E,) or None. Returns (B, L, E) in the
    weight dtype. The caller validates shapes (the op layer does); no host synchronisation happens here.
    """
    pd, ph, pw = patch_size
    bsz, chans, dep, hei, wid = x.shape
    nd, nh, nw = dep // pd, hei // ph, wid // pw
    n_tok = nd * nh * nw
    e = weight.shape[0]
    k = chans * pd * ph * pw
    w2 = weight.reshape(e, k)
    m = bsz * n_tok
    y = torch.empty((bsz, n_tok, e), device=x.device, dtype=weight.dtype)
    if m == 0:
        return y
    y2 = y.view(m, e)
    args = (
        x, w2, bias.contiguous() if bias is not None else w2, y2,  # (the kernel reads the bias densely)
        m, e, k, n_tok, nh, nw,
        *x.stride(), w2.stride(0), w2.stride(1), y2.stride(0), y2.stride(1),
        float(scale), float(shift),
    )
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        cfg = _INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(e, cfg["BLOCK_N"]),)
        _patch_embed3d_fwd_kernel[grid](*args, PD=pd, PH=ph, PW=pw, HAS_BIAS=bias is not None,
                                        DOT_PRECISION=dot_precision(weight.dtype), **cfg)
    else:

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(e, meta["BLOCK_N"]),)

        _patch_embed3d_fwd_autotuned[grid](*args, PD=pd, PH=ph, PW=pw, HAS_BIAS=bias is not None,
                                           DOT_PRECISION=dot_precision(weight.dtype))
    return y
