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


#: How to get missing files, the end of every missing-file message.
GET_FILES_HINT = ("Put the official MedMNIST {what} there, or run again with --download to fetch {it} (from Zenodo, "
                  "through the medmnist package).")


def _wanted_sizes(name: str, size: int | None, prefer: int | None) -> list[int]:
    """The file sizes to look for, in order: ``size``; else ``prefer`` then the others, largest first."""
    sizes = available_sizes(name)
    if size is not None and size not in sizes:
        raise ValueError(f"size: {name} is published at sizes {sizes}, got {size}")
    if size is not None:
        return [size]
    return ([prefer] if prefer in sizes else []) + [s for s in sorted(sizes, reverse=True) if s != prefer]


def _present(root: Path, name: str, wanted: list[int]) -> tuple[Path, int] | None:
    for s in wanted:
        path = root / npz_filename(name, s)
        if path.is_file():
            return path, s
    return None


def _file_names(name: str, wanted: list[int]) -> str:
    return " or ".join(npz_filename(name, s) for s in wanted)


def _missing_error(root: Path, missing: list[tuple[str, list[int]]], present: list[str] = ()) -> FileNotFoundError:
    """One error for the datasets in ``missing`` (name, sizes looked for), with how to get the files
    (and, when some are ``present``, how to use only those)."""
    only = (f" Or use the {len(present)} present ones only: --datasets {','.join(present).lower()}"
            if present else "")
    if not root.is_dir():
        root = f"{root} (no such folder)"
    if len(missing) == 1 and not present:
        name, wanted = missing[0]
        return FileNotFoundError(f"{name}: no file {_file_names(name, wanted)} in {root}. "
                                 + GET_FILES_HINT.format(what="file", it="it"))
    lines = [f"  {name}: {_file_names(name, wanted)}" for name, wanted in missing]
    verb = "has" if len(missing) == 1 else "have"
    return FileNotFoundError(f"{len(missing)} of {len(missing) + len(present)} datasets {verb} no file in {root}; "
                             f"looked for\n" + "\n".join(lines) + "\n" + GET_FILES_HINT.format(what="files", it="them")
                             + only)


def find_npz(
    root: str | Path, name: str, size: int | None = None, download: bool = False, prefer: int | None = None
) -> tuple[Path, int]:
    """Path and size of dataset ``name``'s file under ``root``.

    ``size`` picks one published size. ``None`` takes ``prefer`` (the model's input size) when that file
    is present, else the largest file present. With ``download`` a missing file is fetched through
    medmnist (``size``, else ``prefer`` if published, else the largest published size).
    """
    root = Path(root)
    wanted = _wanted_sizes(name, size, prefer)
    found = _present(root, name, wanted)
    if found is not None:
        return found
    if download:
        s = wanted[0]
        download_npz(root, name, s)
        return root / npz_filename(name, s), s
    raise _missing_error(root, [(name, wanted)])


def find_all_npz(
    root: str | Path, requests: list[tuple[str, int | None, int | None]]
) -> list[tuple[Path, int]]:
    """:func:`find_npz` (without download) of every ``(name, size, prefer)``; the missing files of all
    datasets are reported together in one FileNotFoundError (each dataset with the names it looked for),
    rather than one dataset per run."""
    root = Path(root)
    found, present, missing = [], [], []
    for name, size, prefer in requests:
        wanted = _wanted_sizes(name, size, prefer)
        hit = _present(root, name, wanted)
        if hit is None:
            missing.append((name, wanted))
        else:
            found.append(hit)
            present.append(name)
    if missing:
        raise _missing_error(root, missing, present)
    return found


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
