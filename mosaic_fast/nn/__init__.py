"""Drop-in fast modules: same class names, constructor arguments and state_dict keys as ``reference``.

Each class subclasses its reference twin (adding no parameters), so :func:`convert` can swap them in
place.
"""

from .adapter import Adapter, MoSAdapter
from .caches import clear_caches
from .convert import convert
from .moe import GatedMoEAdapter, GatedSpecialistAdapter, SkipRouter
from .patch_embed import PatchEmbed3D
from .vit import Attention, Block, Mlp

__all__ = [
    "Adapter",
    "Attention",
    "Block",
    "GatedMoEAdapter",
    "GatedSpecialistAdapter",
    "Mlp",
    "MoSAdapter",
    "PatchEmbed3D",
    "SkipRouter",
    "clear_caches",
    "convert",
]
