"""Which precision ``tl.dot`` uses for float32 operands, following torch's own matmul setting.

torch runs float32 matmuls in IEEE fp32 unless the user opts into TF32
(``torch.set_float32_matmul_precision("high")`` or ``"medium"``); Triton's ``tl.dot`` defaults to TF32.
The kernels take the choice as a ``DOT_PRECISION`` constexpr so a float32 model gives float32 results,
as the reference does (TF32 rounding flips ReLU masks and costs ~1e-2 relative error in the gradients).
bf16/fp16 operands ignore it.
"""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for a ``tl.dot`` on ``dtype`` operands: "ieee" or "tf32"."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"
