"""MedMNIST datasets over the official ``.npz`` files, and the batch structure the trainer consumes.

:class:`MedMNISTSplit` is one split of one dataset, returning model-ready tensors at the model's input
size (files of another published size are resized). :class:`MultiSource` puts several of them behind one
index of ``(source, sample, aug_seed)`` keys, which the samplers of :mod:`.sampling` produce, so that a
batch can mix datasets, and :func:`collate` groups a list of samples into 2D and 3D :class:`Part` s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .npz import DatasetFileError, find_npz, load_split
from .registry import DatasetSpec, dataset_spec, head_index
from .transforms import augment_2d, augment_3d, clean_view_2d, clean_view_3d

#: ``aug_seed`` value of a key that asks for the clean (evaluation) view only.
NO_AUGMENT = -1


class MedMNISTSplit(Dataset):
    """One split (train/val/test) of one MedMNIST dataset read from ``root``.

    ``file_size`` picks the published file (None: the one of ``input_size`` if present, else the largest
    present, see :func:`find_npz`) and ``input_size`` is the model's input size images are resized to.
    ``self[i]`` returns the clean view and the label row (int64, (L,)); :meth:`views` also gives the
    student's augmented view.
    """

    def __init__(
        self,
        name: str,
        split: str,
        root: str | Path,
        input_size: int,
        file_size: int | None = None,
        download: bool = False,
    ) -> None:
        self.spec: DatasetSpec = dataset_spec(name)
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.split = split
        self.input_size = input_size
        self.path, self.file_size = find_npz(root, name, file_size, download, prefer=input_size)
        images, labels = load_split(self.path, split)
        self._check_layout(images, labels)
        self.images = images
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def _check_layout(self, images: np.ndarray, labels: np.ndarray) -> None:
        s, spec = self.file_size, self.spec
        if spec.is_3d:
            expected: tuple[int, ...] = (s, s, s)
        else:
            expected = (s, s) if spec.n_channels == 1 else (s, s, 3)
        multi_label = spec.task.startswith("multi-label")
        width = spec.num_classes if multi_label else 1
        if tuple(images.shape[1:]) != expected or labels.shape[1] != width:
            raise DatasetFileError(
                f"dataset file {self.path}: {self.split} images have shape {images.shape[1:]} and labels "
                f"{labels.shape[1:]}, expected {expected} and ({width},) for {spec.name}"
            )
        limit = 2 if multi_label else spec.num_classes  # multi-label: one 0/1 column per label
        if labels.size and int(labels.max()) >= limit:
            what = "its labels are 0 or 1" if multi_label else f"it has {spec.num_classes} classes"
            raise DatasetFileError(
                f"dataset file {self.path}: {self.split} labels reach {int(labels.max())} but {spec.name} "
                f"is {spec.task}: {what}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def clean(self, index: int) -> torch.Tensor:
        """The teacher's / evaluation view of sample ``index``."""
        if self.spec.is_3d:
            return clean_view_3d(self.images[index], self.input_size)
        return clean_view_2d(self.images[index], self.input_size)

    def views(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(student view, teacher view)`` of sample ``index``; augmentation draws from ``rng``."""
        clean = self.clean(index)
        augment = augment_3d if self.spec.is_3d else augment_2d
        return augment(clean, rng), clean

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clean(index), self.labels[index]


@dataclass
class Part:
    """The samples of one modality in a batch.

    ``x``: student views (B, 3, H, W) or (B, 1, D, H, W); ``x_clean``: teacher views (None in evaluation);
    ``source``: (B,) index into the sources; ``labels``: (B, L_max) int64, each row's first L columns
    valid (L = 1, or the label count of a multi-label set).
    """

    x: torch.Tensor
    x_clean: torch.Tensor | None
    source: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Part:
        """The part's tensors on ``device`` (``x_clean`` stays None in evaluation)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return Part(move(self.x), move(self.x_clean), move(self.source), move(self.labels))

    def pin_memory(self) -> Part:
        """The part's tensors in page-locked memory, so the copies to the GPU can run asynchronously."""
        pin = lambda t: None if t is None else t.pin_memory()
        return Part(pin(self.x), pin(self.x_clean), pin(self.source), pin(self.labels))


@dataclass
class Batch:
    """A batch: its 2D and/or 3D parts and the sample keys it came from (their order in the parts)."""

    parts: list[Part]
    keys: list[tuple[int, int, int]]

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Every part on ``device`` (the trainer moves each batch with ``non_blocking=True``)."""
        return Batch([p.to(device, non_blocking) for p in self.parts], self.keys)

    def pin_memory(self) -> Batch:
        """Every part pinned: what ``DataLoader(pin_memory=True)`` calls on a custom batch type."""
        return Batch([p.pin_memory() for p in self.parts], self.keys)


class MultiSource(Dataset):
    """Several :class:`MedMNISTSplit` s indexed by keys ``(source, sample, aug_seed)``.

    ``aug_seed`` ≥ 0 returns the student and teacher views with augmentation drawn from a generator
    seeded by it; :data:`NO_AUGMENT` returns the clean view only.
    """

    def __init__(self, sources: Sequence[MedMNISTSplit]) -> None:
        if not sources:
            raise ValueError("sources must not be empty")
        self.sources = list(sources)
        self.label_width = max(s.labels.shape[1] for s in self.sources)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, key: tuple[int, int, int]
                    ) -> tuple[tuple[int, int, int], bool, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        source, index, aug_seed = key
        ds = self.sources[source]
        if aug_seed == NO_AUGMENT:
            x, x_clean = ds.clean(index), None
        else:
            x, x_clean = ds.views(index, np.random.default_rng(aug_seed))
        labels = torch.zeros(self.label_width, dtype=torch.int64)
        row = ds.labels[index]
        labels[: row.numel()] = row
        return key, ds.spec.is_3d, x, x_clean, labels

    def head_ids(self) -> list[int]:
        """Model head index of each source."""
        return [head_index(s.spec.name) for s in self.sources]


def collate(items: list) -> Batch:
    """Stack the samples of :meth:`MultiSource.__getitem__` into a :class:`Batch` (2D part first)."""
    parts = []
    keys: list[tuple[int, int, int]] = []
    for want_3d in (False, True):
        group = [it for it in items if it[1] == want_3d]
        if not group:
            continue
        keys += [tuple(int(v) for v in it[0]) for it in group]
        x_clean = None if group[0][3] is None else torch.stack([it[3] for it in group])
        parts.append(
            Part(
                x=torch.stack([it[2] for it in group]),
                x_clean=x_clean,
                source=torch.tensor([int(it[0][0]) for it in group], dtype=torch.int64),
                labels=torch.stack([it[4] for it in group]),
            )
        )
    return Batch(parts, keys)
