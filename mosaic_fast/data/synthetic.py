"""Synthetic files in the official MedMNIST layout, to smoke-test a pipeline without the real data.

The images are learnable on purpose: the brightness of the image rises with the class index (per
label for multi-label sets), plus noise, so a few training steps visibly lower the loss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .registry import dataset_spec, npz_filename


def write_synthetic_npz(
    root: str | Path, name: str, size: int = 28, n: tuple[int, int, int] = (64, 16, 16), seed: int = 0
) -> Path:
    """Write ``root/{flag}[_{size}].npz`` for dataset ``name`` with ``n`` = (train, val, test) samples.

    Shapes, dtypes and label widths follow the official file of that dataset; every class occurs in
    every split when the split has at least as many samples as classes.
    """
    spec = dataset_spec(name)
    path = Path(root) / npz_filename(name, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if spec.is_3d:
        shape: tuple[int, ...] = (size, size, size)
    else:
        shape = (size, size) if spec.n_channels == 1 else (size, size, 3)
    arrays = {}
    multi_label = spec.task.startswith("multi-label")
    for split, count in zip(("train", "val", "test"), n):
        if multi_label:
            labels = (rng.random((count, spec.num_classes)) < 0.3).astype(np.uint8)
            level = labels.mean(axis=1)
        else:
            labels = (np.arange(count) % spec.num_classes)[rng.permutation(count)][:, None].astype(np.uint8)
            level = labels[:, 0] / max(spec.num_classes - 1, 1)
        base = 40.0 + 170.0 * level.reshape((count,) + (1,) * len(shape))
        images = base + rng.normal(0.0, 25.0, (count, *shape))
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez_compressed(path, **arrays)
    return path
