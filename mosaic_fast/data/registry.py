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
