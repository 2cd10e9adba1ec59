"""Fast 3D patch embedding: a drop-in for :class:`mosaic_fast.reference.PatchEmbed3D`.

Same constructor arguments, parameters (``proj.weight``/``proj.bias`` of the Conv3d, ``norm.weight``/
``norm.bias``) and state_dict keys. The Conv3d (kernel == stride) is computed as a GEMM on the patch
matrix instead: on CPU the C++ extension ``mosaic_fast._C`` builds the patch matrix (OpenMP, uint8 or
float32 in) and torch runs the linear layer and the LayerNorm on contiguous rows; on CUDA one Triton
kernel gathers the patches from the volume in its GEMM prologue and adds the bias in its epilogue.

Two plain attributes (not parameters, not in the state_dict) fuse an affine intensity normalisation
into the patch gather: the module computes ``reference(x.float() * input_scale + input_shift)`` (an integer
volume is normalised into the module's dtype, a floating one keeps its own dtype). The
defaults (1, 0) give exactly ``reference(x)``; ``input_scale=1/255`` fuses the MedMNIST 3D ``/255``
scaling so a pipeline can feed the raw uint8 volumes and skip a float copy of the whole batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import reference
from ..ops.patch_embed3d import patch_embed3d
from .bypass import may_bypass

#: The layer the fused op reads instead of calling (see :mod:`.bypass`).
PATCH_LAYERS = {"proj": (nn.Conv3d,)}


class PatchEmbed3D(reference.PatchEmbed3D):
    """(B, C, D, H, W) uint8/float volume -> (B, L, embed_dim) tokens (Conv3d patches, then LayerNorm).

    ``input_scale``/``input_shift``: the fused normalisation ``x·input_scale + input_shift`` applied to
    the input before the projection (class-level defaults 1.0/0.0, so a module converted with
    :func:`mosaic_fast.nn.convert` computes exactly its reference). Gradients flow to all parameters and,
    when a floating input requires grad, to the input.
    """

    input_scale: float = 1.0
    input_shift: float = 0.0

    def __init__(
        self,
        img_size: int | tuple[int, int, int] = 64,
        patch_size: int | tuple[int, int, int] = 8,
        in_chans: int = 1,
        embed_dim: int = 768,
        input_scale: float = 1.0,
        input_shift: float = 0.0,
    ) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.input_scale = float(input_scale)
        self.input_shift = float(input_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``reference(x · input_scale + input_shift)``, the Conv3d computed as a GEMM on the gathered patches."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not may_bypass(self, PATCH_LAYERS):
            if self.input_scale != 1.0 or self.input_shift != 0.0:
                # as the fused path: normalised in fp32 (fp64 for fp64), then in the dtype the reference
                # takes (a float x's own, the weight's for an integer x), so a bf16 or fp64 module works here too
                dtype = x.dtype if x.is_floating_point() else self.proj.weight.dtype
                compute = torch.promote_types(dtype, torch.float32)
                x = (x.to(compute) * self.input_scale + self.input_shift).to(dtype)
            return super().forward(x)
        self.check_input(x)
        y = patch_embed3d(x, self.proj.weight, self.proj.bias, self.patch_size, self.input_scale, self.input_shift)
        return self.norm(y)

    def extra_repr(self) -> str:
        """The fused normalisation in the repr (plain attributes, which ``nn.Module`` would not show)."""
        return f"input_scale={self.input_scale}, input_shift={self.input_shift}"
