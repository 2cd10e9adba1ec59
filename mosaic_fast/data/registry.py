"""The 18 MedMNIST datasets of MOSAIC, their order (the order of the model's heads) and A/B/C routing.

Task metadata (task type, class count, channels) comes from ``medmnist.INFO``; this module adds only what
MOSAIC decides: the head order and which specialist each dataset is routed to.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Seed order of the classification heads (12 2D datasets, then the 6 3D ones).
DATASETS_2D = (
    "PathMNIST", "DermaMNIST", "OCTMNIST", "PneumoniaMNIST", "ChestMNIST", "BreastMNIST",
    "BloodMNIST", "TissueMNIST", "RetinaMNIST", "OrganAMNIST", "OrganCMNIST", "OrganSMNIST",
)
DATASETS_3D = (
    "OrganMNIST3D", "NoduleMNIST3D", "AdrenalMNIST3D", "VesselMNIST3D", "FractureMNIST3D",
    "SynapseMNIST3D",
)
ALL_DATASETS = DATASETS_2D + DATASETS_3D

#: Seed's alternating 2D/3D order (``--interleaved``).
INTERLEAVED_DATASETS = (
    "PathMNIST", "OrganMNIST3D", "DermaMNIST", "NoduleMNIST3D", "OCTMNIST", "AdrenalMNIST3D",
    "PneumoniaMNIST", "VesselMNIST3D", "ChestMNIST", "FractureMNIST3D", "BreastMNIST",
    "SynapseMNIST3D", "BloodMNIST", "TissueMNIST", "RetinaMNIST", "OrganAMNIST", "OrganCMNIST",
    "OrganSMNIST",
)

#: Hard routing: A = colour microscopy/photography, B = grey radiology, C = volumes.
EXPERT_ROUTING = {
    **dict.fromkeys(("PathMNIST", "BloodMNIST", "TissueMNIST", "DermaMNIST", "RetinaMNIST"), "A"),
    **dict.fromkeys(
        ("ChestMNIST", "PneumoniaMNIST", "BreastMNIST", "OCTMNIST", "OrganAMNIST", "OrganCMNIST",
         "OrganSMNIST"),
        "B",
    ),
    **dict.fromkeys(DATASETS_3D, "C"),
}
EXPERT_INDEX = {"A": 0, "B": 1, "C": 2}


@dataclass(frozen=True)
class DatasetSpec:
    """What training needs to know about one MedMNIST dataset."""

    name: str
    flag: str  # medmnist's key, e.g. "pathmnist"
    task: str  # medmnist task string: "multi-class", "binary-class", "multi-label", "ordinal-regression"
    num_classes: int
    n_channels: int
    is_3d: bool
    expert: str


def dataset_spec(name: str) -> DatasetSpec:
    """Metadata of dataset ``name`` (e.g. "PathMNIST"), read from medmnist's INFO registry."""
    from medmnist import INFO

    if name not in EXPERT_ROUTING:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(ALL_DATASETS)}")
    flag = name.lower()
    info = INFO[flag]
    return DatasetSpec(
        name=name,
        flag=flag,
        task=info["task"],
        num_classes=len(info["label"]),
        n_channels=int(info["n_channels"]),
        is_3d=name in DATASETS_3D,
        expert=EXPERT_ROUTING[name],
    )


#: Number of classes per head in the seed's order (equals medmnist's INFO; pinned here so building a
#: model does not import medmnist).
NUM_CLASSES = (9, 7, 4, 2, 14, 2, 8, 8, 5, 11, 11, 11, 11, 2, 2, 2, 3, 2)

#: Image sizes medmnist publishes (``{flag}.npz`` is 28, the others ``{flag}_{size}.npz``).
SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)


def available_sizes(name: str) -> tuple[int, ...]:
    """File sizes medmnist offers for dataset ``name`` (2D: 28/64/128/224, 3D: 28/64)."""
    return SIZES_3D if dataset_spec(name).is_3d else SIZES_2D


def npz_filename(name: str, size: int) -> str:
    """Official file name of dataset ``name`` at ``size``: ``pathmnist.npz``, ``pathmnist_224.npz``..."""
    sizes = available_sizes(name)
    if size not in sizes:
        raise ValueError(f"size: {name} is published at sizes {sizes}, got {size}")
    flag = name.lower()
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def resolve_datasets(names: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Canonical names (e.g. "BreastMNIST") of ``names``, given as names or medmnist flags, any case.

    Accepts a comma-separated string or a sequence; keeps the given order and drops duplicates.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    by_key = {name.lower(): name for name in ALL_DATASETS}
    out: list[str] = []
    for raw in names:
        key = raw.strip().lower()
        if key not in by_key:
            raise ValueError(f"datasets: unknown dataset {raw!r}; expected names from {', '.join(ALL_DATASETS)}")
        if by_key[key] not in out:
            out.append(by_key[key])
    if not out:
        raise ValueError("datasets: at least one dataset is required")
    return tuple(out)


def training_order(names: tuple[str, ...] | list[str], interleaved: bool = False) -> tuple[str, ...]:
    """The seed's round order restricted to ``names``: 2D then 3D, or alternating with ``interleaved``."""
    order = INTERLEAVED_DATASETS if interleaved else ALL_DATASETS
    chosen = set(resolve_datasets(list(names)))
    return tuple(name for name in order if name in chosen)


def head_index(name: str) -> int:
    """Index of dataset ``name``'s classification head in MosaicModel (the seed's 18-dataset order)."""
    if name not in EXPERT_ROUTING:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(ALL_DATASETS)}")
    return ALL_DATASETS.index(name)
