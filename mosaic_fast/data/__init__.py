"""MedMNIST data: registry and routing table, official npz files, datasets, transforms, batch plans."""

from .datasets import Batch, MedMNISTSplit, MultiSource, Part, collate
from .demo import DEMO_DATASETS, DEMO_ROOT
from .npz import DatasetFileError, DownloadError, find_npz, load_split
from .registry import (
    ALL_DATASETS,
    DATASETS_2D,
    DATASETS_3D,
    EXPERT_INDEX,
    EXPERT_ROUTING,
    INTERLEAVED_DATASETS,
    NUM_CLASSES,
    SIZES_2D,
    SIZES_3D,
    DatasetSpec,
    dataset_spec,
    head_index,
    npz_filename,
    resolve_datasets,
    training_order,
)
from .sampling import eval_keys, round_plan, shard_batch

__all__ = [
    "ALL_DATASETS",
    "DATASETS_2D",
    "DATASETS_3D",
    "DEMO_DATASETS",
    "DEMO_ROOT",
    "EXPERT_INDEX",
    "EXPERT_ROUTING",
    "INTERLEAVED_DATASETS",
    "NUM_CLASSES",
    "SIZES_2D",
    "SIZES_3D",
    "Batch",
    "DatasetFileError",
    "DatasetSpec",
    "DownloadError",
    "MedMNISTSplit",
    "MultiSource",
    "Part",
    "collate",
    "dataset_spec",
    "eval_keys",
    "find_npz",
    "head_index",
    "load_split",
    "npz_filename",
    "resolve_datasets",
    "round_plan",
    "shard_batch",
    "training_order",
]
