"""Autograd functions and dispatch: Triton kernels on CUDA, torch fallbacks on CPU.

Every op is registered with ``torch.library.custom_op`` so ``torch.compile`` does not graph-break.
"""
