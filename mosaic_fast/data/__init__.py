"""MedMNIST data: registry and routing table, datasets, transforms, samplers."""

from .registry import (
    ALL_DATASETS,
    DATASETS_2D,
    DATASETS_3D,
    EXPERT_INDEX,
    EXPERT_ROUTING,
    INTERLEAVED_DATASETS,
    NUM_CLASSES,
    DatasetSpec,
    dataset_spec,
)

__all__ = [
    "ALL_DATASETS",
    "DATASETS_2D",
    "DATASETS_3D",
    "EXPERT_INDEX",
    "EXPERT_ROUTING",
    "INTERLEAVED_DATASETS",
    "NUM_CLASSES",
    "DatasetSpec",
    "dataset_spec",
]
