"""Finding, checking and (only when asked) downloading the official MedMNIST ``.npz`` files.

A file holds ``{train,val,test}_images`` (uint8; 2D: (N, H, W) or (N, H, W, 3), 3D: (N, D, H, W)) and
``{train,val,test}_labels`` (uint8, (N, L)). Nothing is fetched unless ``download=True`` (the
``--download`` flag), and then medmnist's own downloader (with its MD5 check) does the work; a failed
download raises :class:`DownloadError` with the URL to fetch the file by hand.
"""

from __future__ import annotations

import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .registry import available_sizes, dataset_spec, npz_filename

SPLITS = ("train", "val", "test")

#: What reading a damaged npz raises: a broken zip directory or CRC (BadZipFile), a broken deflate stream
#: (zlib.error), a cut-off member (EOFError), a garbled ``.npy`` header (ValueError, SyntaxError or
#: tokenize.TokenError from numpy's header parser). MemoryError stays out: a big valid file can cause it.
CORRUPT_FILE_ERRORS = (
    OSError, ValueError, EOFError, KeyError, SyntaxError, zipfile.BadZipFile, zlib.error, tokenize.TokenError,
)


class DatasetFileError(ValueError):
    """A MedMNIST file is missing, unreadable or not in the official layout (the message names it)."""


class DownloadError(RuntimeError):
    """``--download`` could not fetch a MedMNIST file (the message names it, its URL and the folder)."""


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
    """Fetch the official file of ``name`` at ``size`` into ``root`` with medmnist (MD5 checked).

    Raises :class:`DownloadError` (one message, not medmnist's chain of tracebacks) when that fails.
    """
    import medmnist

    spec = dataset_spec(name)
    root = Path(root)
    info = medmnist.INFO[spec.flag]
    suffix = "" if size == 28 else f"_{size}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        data_class = getattr(medmnist, info["python_class"])
        data_class(split="test", download=True, root=str(root), size=size)
    except Exception as err:
        cause = err
        while cause.__cause__ or cause.__context__:  # the root cause (e.g. a URLError), not medmnist's wrapper
            cause = cause.__cause__ or cause.__context__
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise DownloadError(
            f"{name}: downloading {npz_filename(name, size)} into {root} failed ({reason}). Check the network "
            f"connection, or download it by hand from {info[f'url{suffix}']} (MD5 {info[f'MD5{suffix}']}) "
            f"and put it in {root}."
        ) from err


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
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array, not an archive of arrays
            raise DatasetFileError(
                f"dataset file {path} is not an npz archive (it holds one {type(loaded).__name__}, "
                f"not the MedMNIST keys {keys[0]}, {keys[1]}, ...)"
            )
        with loaded as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise DatasetFileError(
                    f"dataset file {path} is not in the MedMNIST layout: missing {missing} (has {data.files})"
                )
            images, labels = data[keys[0]], data[keys[1]]
    except DatasetFileError:
        raise
    except CORRUPT_FILE_ERRORS as err:
        kind = type(err).__qualname__
        kind = kind if type(err).__module__ == "builtins" else f"{type(err).__module__}.{kind}"
        raise DatasetFileError(
            f"dataset file {path} is corrupt or truncated ({kind}: {err}); delete it and fetch it again (--download)"
        ) from err
    if labels.ndim == 1:
        labels = labels[:, None]
    if images.ndim == 0 or labels.ndim != 2 or images.shape[0] != labels.shape[0]:
        raise DatasetFileError(
            f"dataset file {path}: {keys[0]} has shape {images.shape} but {keys[1]} has shape {labels.shape} "
            f"(expected (N, ...) images and (N, L) labels)"
        )
    if images.dtype != np.uint8:
        raise DatasetFileError(f"dataset file {path}: {keys[0]} must be uint8, got {images.dtype}")
    if labels.dtype.kind not in "biu":  # float labels would be truncated to classes silently
        raise DatasetFileError(f"dataset file {path}: {keys[1]} must be integer class labels, got {labels.dtype}")
    if labels.size and int(labels.min()) < 0:
        raise DatasetFileError(f"dataset file {path}: {keys[1]} holds negative labels ({int(labels.min())})")
    return images, labels
