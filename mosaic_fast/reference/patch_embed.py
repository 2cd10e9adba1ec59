"""Reference tokenizers: Conv2d/Conv3d patch projection followed by LayerNorm (MedCoSS style)."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .checks import check_input_dtype, check_is_tensor


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class PatchEmbed2D(nn.Module):
    """(B, C, H, W) -> (B, (H/p)(W/p), D): Conv2d(C, D, p, stride p) then LayerNorm."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if not isinstance(patch_size, numbers.Integral) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if img_size % patch_size:  # as PatchEmbed3D: else the model is built for inputs its forward rejects
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float images -> (B, L, embed_dim) tokens (Conv2d patches, then LayerNorm)."""
        check_is_tensor("x", x)
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x: expected (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if any(s % self.patch_size or s == 0 for s in x.shape[-2:]):
            raise ValueError(
                f"x: H and W must be non-zero and divisible by patch_size {self.patch_size}, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point image batch (normalised), got {x.dtype}")
        check_input_dtype("x", x, self.proj.weight)
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class PatchEmbed3D(nn.Module):
    """(B, C, D, H, W) -> (B, L, embed_dim): Conv3d(C, embed_dim, p, stride p) then LayerNorm.

    ``patch_size`` may be an int or a (pd, ph, pw) triple (anisotropic patches). Integer (uint8)
    volumes are converted to float as they are (no scaling): normalise before, or use the fast module.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int, int] = 64,
        patch_size: int | tuple[int, int, int] = 8,
        in_chans: int = 1,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size = _triple(img_size), _triple(patch_size)
        if len(self.patch_size) != 3 or any(not isinstance(p, numbers.Integral) or p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be a positive int or three positive ints, got {patch_size!r}")
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        self.in_chans, self.embed_dim = in_chans, embed_dim
        grid = [s // p for s, p in zip(self.img_size, self.patch_size)]
        self.num_patches = grid[0] * grid[1] * grid[2]
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for a wrong rank, channel count or dtype, or a size not divisible by the patch."""
        check_is_tensor("x", x)
        if x.dim() != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"x: expected (B, {self.in_chans}, D, H, W), got {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"x: expected an integer or floating dtype, got {x.dtype}")
        if any(s % p or s == 0 for s, p in zip(x.shape[2:], self.patch_size)):
            raise ValueError(
                f"x: volume {tuple(x.shape[2:])} is empty or not divisible by patch_size {self.patch_size}"
            )
        check_input_dtype("x", x, self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) volumes (integer volumes are cast) -> (B, L, embed_dim) tokens."""
        self.check_input(x)
        if not x.is_floating_point():
            x = x.to(self.proj.weight.dtype)
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class UnifiedPatchEmbed(nn.Module):
    """Chooses the 2D or 3D tokenizer by input rank (4-D image or 5-D volume)."""

    def __init__(
        self,
        img_size_2d: int = 224,
        patch_size_2d: int = 16,
        in_chans_2d: int = 3,
        img_size_3d: int = 64,
        patch_size_3d: int = 8,
        in_chans_3d: int = 1,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.patch_embed_2d = PatchEmbed2D(img_size_2d, patch_size_2d, in_chans_2d, embed_dim)
        self.patch_embed_3d = self.patch_embed_3d_cls(img_size_3d, patch_size_3d, in_chans_3d, embed_dim)
        self.num_patches_2d = self.patch_embed_2d.num_patches
        self.num_patches_3d = self.patch_embed_3d.num_patches

    patch_embed_3d_cls = PatchEmbed3D

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Returns (tokens (B, N, D), is_3d)."""
        check_is_tensor("x", x)
        if x.dim() == 4:
            return self.patch_embed_2d(x), False
        if x.dim() == 5:
            return self.patch_embed_3d(x), True
        raise ValueError(f"x: expected a 4-D image batch or a 5-D volume batch, got shape {tuple(x.shape)}")
