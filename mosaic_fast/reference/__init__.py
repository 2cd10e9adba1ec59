"""Plain-PyTorch reference modules: the ground truth every fast path is tested against."""

from .adapter import EXPERT_NAMES, Adapter, MoSAdapter
from .moe import GatedMoEAdapter, GatedSpecialistAdapter, SkipRouter
from .patch_embed import PatchEmbed2D, PatchEmbed3D, UnifiedPatchEmbed
from .vit import Attention, Block, Encoder, Mlp

__all__ = [
    "EXPERT_NAMES",
    "Adapter",
    "Attention",
    "Block",
    "Encoder",
    "GatedMoEAdapter",
    "GatedSpecialistAdapter",
    "Mlp",
    "MoSAdapter",
    "PatchEmbed2D",
    "PatchEmbed3D",
    "SkipRouter",
    "UnifiedPatchEmbed",
]
