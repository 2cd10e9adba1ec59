"""The data pipeline against its references: medmnist's INFO and dataset classes, the seed's registry and
transforms (BurkeBelle/MOSAIC-MedMNIST config/datasets.py, dataloader/), and the batch-plan invariants.

The seed's tables are written out here as facts (order, classes, task, 3D, channels, routing), not imported.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaic_fast.data import (
    ALL_DATASETS,
    DATASETS_2D,
    DATASETS_3D,
    DEMO_ROOT,
    EXPERT_ROUTING,
    INTERLEAVED_DATASETS,
    NUM_CLASSES,
    DatasetFileError,
    MedMNISTSplit,
    dataset_spec,
    eval_keys,
    head_index,
    round_plan,
    shard_batch,
)
from mosaic_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, augment_2d, augment_3d

#: The seed's DATASET_CONFIGS in its order: (name, classes, task, is_3d, channels, expert).
SEED = [
    ("PathMNIST", 9, "multi-class", False, 3, "A"),
    ("DermaMNIST", 7, "multi-class", False, 3, "A"),
    ("OCTMNIST", 4, "multi-class", False, 1, "B"),
    ("PneumoniaMNIST", 2, "binary-class", False, 1, "B"),
    ("ChestMNIST", 14, "multi-label", False, 1, "B"),
    ("BreastMNIST", 2, "binary-class", False, 1, "B"),
    ("BloodMNIST", 8, "multi-class", False, 3, "A"),
    ("TissueMNIST", 8, "multi-class", False, 1, "A"),
    ("RetinaMNIST", 5, "ordinal-regression", False, 3, "A"),
    ("OrganAMNIST", 11, "multi-class", False, 1, "B"),
    ("OrganCMNIST", 11, "multi-class", False, 1, "B"),
    ("OrganSMNIST", 11, "multi-class", False, 1, "B"),
    ("OrganMNIST3D", 11, "multi-class", True, 1, "C"),
    ("NoduleMNIST3D", 2, "binary-class", True, 1, "C"),
    ("AdrenalMNIST3D", 2, "binary-class", True, 1, "C"),
    ("VesselMNIST3D", 2, "binary-class", True, 1, "C"),
    ("FractureMNIST3D", 3, "multi-class", True, 1, "C"),
    ("SynapseMNIST3D", 2, "binary-class", True, 1, "C"),
]
SEED_INTERLEAVED = (
    "PathMNIST OrganMNIST3D DermaMNIST NoduleMNIST3D OCTMNIST AdrenalMNIST3D PneumoniaMNIST VesselMNIST3D "
    "ChestMNIST FractureMNIST3D BreastMNIST SynapseMNIST3D BloodMNIST TissueMNIST RetinaMNIST OrganAMNIST "
    "OrganCMNIST OrganSMNIST"
).split()


def test_registry_matches_the_seed_and_medmnist_info():
    from medmnist import INFO

    assert list(ALL_DATASETS) == [row[0] for row in SEED] and len(DATASETS_2D) == 12 and len(DATASETS_3D) == 6
    assert list(INTERLEAVED_DATASETS) == SEED_INTERLEAVED
    assert {name.lower() for name in ALL_DATASETS} == set(INFO)
    for i, (name, classes, task, is_3d, channels, expert) in enumerate(SEED):
        spec = dataset_spec(name)
        info = INFO[spec.flag]
        assert spec.task == info["task"] and spec.task.split(",")[0] == task  # seed: "multi-label" for Chest
        assert spec.num_classes == classes == len(info["label"]) == NUM_CLASSES[i]
        assert spec.n_channels == channels == info["n_channels"] and spec.is_3d == is_3d
        assert spec.expert == expert == EXPERT_ROUTING[name] and head_index(name) == i
        assert info["python_class"] == name


def _seed_eval_2d(image):
    """The seed's eval transform on medmnist's as_rgb PIL image: ToTensor, ImageNet Normalize."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image)


@pytest.mark.parametrize("name", ["BreastMNIST", "RetinaMNIST", "AdrenalMNIST3D"])
def test_clean_views_equal_medmnist_plus_the_seeds_transforms(name):
    """Bit-equal to medmnist's dataset class (as_rgb for 2D; 3D already /255) and the seed's eval
    transform, at the file's own size (the seed's case: 224 / 64 files at the model's size)."""
    import medmnist

    ref = getattr(medmnist, name)(split="test", root=str(DEMO_ROOT), size=28, as_rgb=not name.endswith("3D"))
    ours = MedMNISTSplit(name, "test", DEMO_ROOT, input_size=28)
    for i in range(0, len(ours), max(1, len(ours) // 12)):  # (medmnist's len() asserts the full split size)
        image, label = ref[i]
        if name.endswith("3D"):
            expected = torch.from_numpy(image).float()  # seed's Normalize3D: values are ≤ 1 already
        else:
            expected = _seed_eval_2d(image)
        x, y = ours[i]
        assert torch.equal(x, expected), i
        assert torch.equal(y, torch.as_tensor(label).view(-1)) and y.dtype == torch.int64


def test_student_augmentations_are_the_seeds():
    """HFlip(0.5) then RandomRotation(15) (nearest, fill 0 after Normalize), and the 3D intensity
    augmentation with the seed's draw order, for the draws of the same generator."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    image = torch.randn(3, 20, 20)
    volume = torch.rand(1, 6, 6, 6)
    flips = 0
    for seed in range(12):
        draws = np.random.default_rng(seed)
        flip, angle = draws.random() < 0.5, float(draws.uniform(-15, 15))
        flips += flip
        expected = F.rotate(F.hflip(image) if flip else image, angle, InterpolationMode.NEAREST, fill=[0.0])
        assert torch.equal(augment_2d(image, np.random.default_rng(seed)), expected)

        draws, x = np.random.default_rng(seed), volume.clone()
        if draws.random() < 0.5:
            x = x + draws.uniform(-0.1, 0.1)
        if draws.random() < 0.5:
            x = (x - x.mean()) * draws.uniform(0.9, 1.1) + x.mean()
        assert torch.allclose(augment_3d(volume, np.random.default_rng(seed)), x.clamp(0, 1), atol=1e-7)
    assert 0 < flips < 12


def test_batch_plans_never_repeat_or_split_unevenly():
    """Random plans: no sample twice in a round, equal rank slices covering each global batch, one
    dataset per batch in cyclic mode (in the round order), only the last partial batch of a source
    (cyclic) or of the round (mixed) dropped, and evaluation shards covering every sample once."""
    rng = np.random.default_rng(0)
    for _ in range(150):
        k = int(rng.integers(1, 5))
        sizes = [int(rng.integers(1, 60)) for _ in range(k)]
        world = int(rng.choice([1, 2, 3, 4]))
        batch = world * int(rng.integers(1, 6))
        per_round = None if rng.random() < 0.5 else int(rng.integers(1, 100))
        mixed = bool(rng.random() < 0.5)
        experts = "".join(rng.choice(list("ABC"), k))
        plan = round_plan(sizes, batch, 7, 3, per_round, mixed, experts, world)
        assert plan == round_plan(sizes, batch, 7, 3, per_round, mixed, experts, world)
        keys = [key for b in plan for key in b]
        assert len({key[:2] for key in keys}) == len(keys)
        for b in plan:
            shards = [shard_batch(b, r, world) for r in range(world)]
            assert [key for s in shards for key in s] == b and 0 < len(b) <= batch
            assert len({len(s) for s in shards}) == 1
        share = [n if per_round is None else min(n, -(-per_round // k)) for n in sizes]

        def kept(n, batch=batch, world=world):
            return n - n % batch if n >= batch else n - n % world

        if mixed:
            assert len(keys) == kept(sum(share))
        else:
            assert all(len({key[0] for key in b}) == 1 for b in plan)
            assert [b[0][0] for b in plan] == sorted(b[0][0] for b in plan)
            assert [sum(key[0] == s for key in keys) for s in range(k)] == [kept(n) for n in share]
    for size in (1, 5, 17):
        for world in (1, 2, 3, 8):
            got = sorted(key[1] for r in range(world) for key in eval_keys(size, 0, r, world))
            assert got == list(range(size))


def _write_npy(path, images):
    with open(path, "wb") as f:
        np.save(f, images)


MALFORMED = {
    "bare npy": ("BreastMNIST", None, "is not an npz archive"),
    "float labels": ("BreastMNIST", np.array([[0.5], [1.7]]), "integer"),
    "negative labels": ("BreastMNIST", np.array([[-1], [1]]), "negative"),
    "scalar labels": ("BreastMNIST", np.uint8(0), r"shape \(\)"),
    "multi-label 2": ("ChestMNIST", np.full((2, 14), 2, np.uint8), "reach 2.*0 or 1"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_are_named(tmp_path, case):
    """Each gives a DatasetFileError naming the file; before, a bare .npy and scalar labels raised
    TypeError / IndexError, and float, negative or multi-label-2 labels loaded silently."""
    name, labels, match = MALFORMED[case]
    path = tmp_path / f"{name.lower()}.npz"
    images = np.zeros((2, 28, 28), np.uint8)
    if labels is None:
        _write_npy(path, images)
    else:
        np.savez(path, train_images=images, train_labels=labels)
    with pytest.raises(DatasetFileError, match=rf"{name.lower()}\.npz.*{match}"):
        MedMNISTSplit(name, "train", tmp_path, input_size=28)


def test_scalar_images_are_named(tmp_path):
    """Scalar (0-d) images give a DatasetFileError naming the file and both shapes, not an IndexError."""
    from mosaic_fast.data.npz import load_split

    path = tmp_path / "breastmnist.npz"
    np.savez(path, train_images=np.uint8(0), train_labels=np.array([0]))
    with pytest.raises(DatasetFileError, match=r"breastmnist\.npz.*train_images has shape \(\)"):
        load_split(path, "train")
