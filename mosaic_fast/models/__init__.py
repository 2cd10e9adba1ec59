"""Assembled networks: MosaicModel, its EMA teacher, ViT weight loading."""

from .dynamer import DynaMerModel
from .ema import EMATeacher
from .mosaic import MosaicModel
from .weights import load_vit_npz

__all__ = ["DynaMerModel", "EMATeacher", "MosaicModel", "load_vit_npz"]
