"""Benchmark cases for the 3D patch embedding (suite "ops"): reference vs fast on uint8 volumes.

"reference" is :class:`mosaic_fast.reference.PatchEmbed3D` (uint8 -> float, Conv3d — cuDNN on GPU,
oneDNN on CPU — then LayerNorm on the transposed output); "fast" is :class:`mosaic_fast.nn.PatchEmbed3D`
with the same weights (C++ patchify + GEMM + LayerNorm on CPU, the fused Triton gather-GEMM on CUDA).
Both run forward only under ``torch.no_grad()`` (tokenizer inference), on the same uint8 volumes.
"""

from __future__ import annotations

import torch

from .. import nn as fast_nn
from .. import reference
from .core import Case

EMBED_DIM = 768


def _case(device: torch.device, dtype: torch.dtype, batch: int, size: int, patch: int) -> Case:
    """One workload: B uint8 volumes of size³, cubic patches, 768-wide embedding in ``dtype``."""
    torch.manual_seed(0)
    ref = reference.PatchEmbed3D(size, patch, 1, EMBED_DIM).to(device=device, dtype=dtype).eval()
    fast = fast_nn.PatchEmbed3D(size, patch, 1, EMBED_DIM).to(device=device, dtype=dtype).eval()
    fast.load_state_dict(ref.state_dict())

    def make_inputs(i: int) -> tuple[torch.Tensor]:
        gen = torch.Generator(device=device).manual_seed(1000 + i)
        shape = (batch, 1, size, size, size)
        return (torch.randint(1, 256, shape, generator=gen, device=device, dtype=torch.uint8),)

    @torch.no_grad()
    def run_reference(x: torch.Tensor) -> torch.Tensor:
        return ref(x)

    @torch.no_grad()
    def run_fast(x: torch.Tensor) -> torch.Tensor:
        return fast(x)

    n_tok = (size // patch) ** 3
    k = patch**3
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(
        suite="ops",
        name=f"patch_embed3d B={batch} {size}^3 p{patch}",
        params={
            "batch": batch,
            "size": size,
            "patch": patch,
            "embed_dim": EMBED_DIM,
            "input": "uint8",
            "dtype": str(dtype).removeprefix("torch."),
        },
        make_inputs=make_inputs,
        impls={"reference": run_reference, "fast": run_fast},
        floor_bytes=batch * size**3 + EMBED_DIM * (k + 3) * itemsize + batch * n_tok * EMBED_DIM * itemsize,
        floor_flops=2.0 * batch * n_tok * k * EMBED_DIM,
        notes="forward, uint8 input; reference = uint8->float, Conv3d, LayerNorm",
    )


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """Patch embed 3D workloads: 64³ with patch 8 for B in {1, 8, 32}, and 28³ with patch 4 and 7.

    ``quick``: B in {1, 8} at 64³ and one 28³ case (B = 8, patch 4).
    """
    if quick:
        shapes = [(1, 64, 8), (8, 64, 8), (8, 28, 4)]
    else:
        shapes = [(1, 64, 8), (8, 64, 8), (32, 64, 8), (32, 28, 4), (32, 28, 7)]
    return [_case(device, dtype, batch, size, patch) for batch, size, patch in shapes]
