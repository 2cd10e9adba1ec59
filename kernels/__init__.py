"""Triton kernels and their thin launchers (installed as ``mosaic_fast.kernels``).

Nothing here imports from ``mosaic_fast``; launchers take tensors and return tensors.
"""
