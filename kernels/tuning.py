"""Which autotuning configs the kernels get: all of them, or only the first under MOSAIC_FAST_AUTOTUNE=0.

MOSAIC_FAST_AUTOTUNE=0 gives a quick start-up (e.g. a CUDA test run on a rationed GPU): each autotuned
kernel runs its first config, untuned; the first configs are the ones the pruning always keeps.
"""

from __future__ import annotations

import os

AUTOTUNE = os.environ.get("MOSAIC_FAST_AUTOTUNE", "1") != "0"


def tuned_configs(configs: list) -> list:
    """``configs`` to autotune over, or only the first when autotuning is switched off."""
    return configs if AUTOTUNE else configs[:1]
