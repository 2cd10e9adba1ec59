"""mosaic-fast: fused kernels for mixture-of-specialists adapters on Vision Transformers.

Submodules: ``reference`` (plain-torch ground truth), ``nn`` (drop-in fast modules), ``ops`` (autograd +
dispatch), ``models`` (MosaicModel, DynaMerModel), ``data`` (MedMNIST), ``engine`` (train/eval).
"""

from . import models, nn, reference
from .backend import get_backend, set_backend

__version__ = "0.1.0"

__all__ = ["__version__", "get_backend", "models", "nn", "reference", "set_backend"]
