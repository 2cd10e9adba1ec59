"""The small real MedMNIST subset shipped with the package for ``mosaic-fast train --demo``.

Three official 28-size files, subsampled (a 2D grey, a 2D RGB and a 3D set; CC BY 4.0, see
``demo/SOURCES.md``), in the official npz layout, so the demo runs on a fresh machine without a download.
:func:`build_demo_files` is how they were made from the official files (seeded, reproducible).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .npz import SPLITS, load_split
from .registry import npz_filename

DEMO_ROOT = Path(__file__).resolve().parent / "demo"
DEMO_DATASETS = ("BreastMNIST", "RetinaMNIST", "AdrenalMNIST3D")

#: Samples kept per split (None: the whole split), chosen to keep the package data under 2 MB.
DEMO_SUBSET = {
    "BreastMNIST": {"train": 400, "val": None, "test": None},
    "RetinaMNIST": {"train": 320, "val": 60, "test": 150},
    "AdrenalMNIST3D": {"train": None, "val": None, "test": None},
}


def build_demo_files(source_root: str | Path, out_root: str | Path = DEMO_ROOT, seed: int = 0) -> list[Path]:
    """Write the demo subsets of the official 28-size files in ``source_root`` to ``out_root``.

    Each split keeps a uniformly random subset (sorted, so the original order is preserved) of the
    size in :data:`DEMO_SUBSET`; arrays are stored unchanged in a compressed npz.
    """
    rng = np.random.default_rng(seed)
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    written = []
    for name in DEMO_DATASETS:
        filename = npz_filename(name, 28)
        arrays = {}
        for split in SPLITS:
            images, labels = load_split(Path(source_root) / filename, split)
            keep = DEMO_SUBSET[name][split]
            idx = np.arange(len(images)) if keep is None else np.sort(rng.permutation(len(images))[:keep])
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[idx], labels[idx]
        np.savez_compressed(out_root / filename, **arrays)
        written.append(out_root / filename)
    return written
