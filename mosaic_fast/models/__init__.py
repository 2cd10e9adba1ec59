"""Assembled networks: MosaicModel, its EMA teacher, ViT weight loading."""

from .ema import EMATeacher
from .mosaic import MosaicModel
from .weights import load_vit_npz

__all__ = ["EMATeacher", "MosaicModel", "load_vit_npz"]
