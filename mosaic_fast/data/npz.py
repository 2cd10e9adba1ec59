"""Finding, checking and (only when asked) downloading the official MedMNIST ``.npz`` files.

A file holds ``{train,val,test}_images`` (uint8; 2D: (N, H, W) or (N, H, W, 3), 3D: (N, D, H, W)) and
``{train,val,test}_labels`` (uint8, (N, L)). Nothing is fetched unless ``download=True`` (the
``--download`` flag), and then medmnist's own downloader (with its MD5 check) does the work.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .registry import available_sizes, dataset_spec, npz_filename

SPLITS = ("train", "val", "test")


class DatasetFileError(ValueError):
    """A MedMNIST file is missing, unreadable or not in the official layout (the message names it)."""


def find_npz(
    root: str | Path, name: str, size: int | None = None, download: bool = False, prefer: int | None = None
) -> tuple[Path, int]:
    """Path and size of dataset ``name``'s file under ``root``.

    ``size`` picks one published size. ``None`` takes ``prefer`` (the model's input size) when that file
    is present, else the largest file present. With ``download`` a missing file is fetched through
    medmnist (``size``, else ``prefer`` if published, else the largest published size).
    """
    root = Path(root)
    sizes = available_sizes(name)
    if size is not None and size not in sizes:
        raise ValueError(f"size: {name} is published at sizes {sizes}, got {size}")
    if size is not None:
        wanted = [size]
    else:
        wanted = ([prefer] if prefer in sizes else []) + [s for s in sorted(sizes, reverse=True) if s != prefer]
    for s in wanted:
        path = root / npz_filename(name, s)
        if path.is_file():
            return path, s
    if download:
        s = wanted[0]
        download_npz(root, name, s)
        return root / npz_filename(name, s), s
    names = " or ".join(npz_filename(name, s) for s in wanted)
    raise FileNotFoundError(
        f"{name}: no file {names} in {root}. Put the official MedMNIST file there, or run again with "
        f"--download to fetch it (from Zenodo, through the medmnist package)."
    )


def download_npz(root: str | Path, name: str, size: int) -> None:
    """Fetch the official file of ``name`` at ``size`` into ``root`` with medmnist (MD5 checked)."""
    import medmnist

    spec = dataset_spec(name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data_class = getattr(medmnist, medmnist.INFO[spec.flag]["python_class"])
    data_class(split="test", download=True, root=str(root), size=size)


def load_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of ``split`` from an official file, checked for layout and consistency.

    Raises :class:`DatasetFileError` naming ``path`` when the file is unreadable (corrupt or truncated)
    or lacks a key, and when the image and label counts disagree.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist; use --download to fetch it")
    keys = (f"{split}_images", f"{split}_labels")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise DatasetFileError(
                    f"dataset file {path} is not in the MedMNIST layout: missing {missing} (has {data.files})"
                )
            images, labels = data[keys[0]], data[keys[1]]
    except DatasetFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise DatasetFileError(
            f"dataset file {path} is corrupt or truncated ({type(err).__name__}: {err}); delete it and "
            f"fetch it again (--download)"
        ) from err
    if labels.ndim == 1:
        labels = labels[:, None]
    if images.shape[0] != labels.shape[0] or labels.ndim != 2:
        raise DatasetFileError(
            f"dataset file {path}: {keys[0]} has {images.shape[0]} samples but {keys[1]} has shape "
            f"{labels.shape}"
        )
    if images.dtype != np.uint8:
        raise DatasetFileError(f"dataset file {path}: {keys[0]} must be uint8, got {images.dtype}")
    return images, labels
