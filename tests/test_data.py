"""MedMNIST data: official files (real ones when ../shared/data/medmnist holds them), errors, plans."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaic_fast.data import (
    DEMO_DATASETS,
    DEMO_ROOT,
    DatasetFileError,
    MedMNISTSplit,
    MultiSource,
    collate,
    find_npz,
    load_split,
    npz_filename,
    resolve_datasets,
    round_plan,
    shard_batch,
    training_order,
)
from mosaic_fast.data.synthetic import write_synthetic_npz
from mosaic_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

REAL_ROOT = Path(__file__).resolve().parents[2] / "shared/data/medmnist"

#: Official split sizes and label counts (medmnist INFO) of the real test files.
OFFICIAL = {
    "BreastMNIST": ((546, 78, 156), (28, 28), 2),
    "RetinaMNIST": ((1080, 120, 400), (28, 28, 3), 5),
    "AdrenalMNIST3D": ((1188, 98, 298), (28, 28, 28), 2),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> tuple[Path, bool]:
    """The real files when present, else generated files of the official shapes."""
    if all((REAL_ROOT / npz_filename(n, 28)).is_file() for n in OFFICIAL):
        return REAL_ROOT, True
    root = tmp_path_factory.mktemp("medmnist")
    for name, (sizes, _, _) in OFFICIAL.items():
        write_synthetic_npz(root, name, 28, sizes)
    return root, False


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_shapes_and_labels(data_root, name):
    root, _ = data_root
    (n_train, n_val, n_test), shape, n_classes = OFFICIAL[name]
    for split, n in zip(("train", "val", "test"), (n_train, n_val, n_test)):
        images, labels = load_split(root / npz_filename(name, 28), split)
        assert images.shape == (n, *shape) and images.dtype == np.uint8
        assert labels.shape == (n, 1) and set(np.unique(labels)) == set(range(n_classes))
    ds = MedMNISTSplit(name, "val", root, input_size=28)
    x, y = ds[0]
    is_3d = len(shape) == 3 and name.endswith("3D")
    assert x.shape == ((1, 28, 28, 28) if is_3d else (3, 28, 28)) and x.dtype == torch.float32
    assert y.shape == (1,) and y.dtype == torch.int64


def test_2d_view_is_rgb_normalised_and_resized(data_root):
    root, _ = data_root
    ds = MedMNISTSplit("BreastMNIST", "test", root, input_size=32)
    x, _ = ds[3]
    assert x.shape == (3, 32, 32)
    grey = [x[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c] for c in range(3)]
    assert torch.allclose(grey[0], grey[1], atol=1e-6) and torch.allclose(grey[0], grey[2], atol=1e-6)
    same = MedMNISTSplit("BreastMNIST", "test", root, input_size=28)
    raw = torch.from_numpy(same.images[3]).float() / 255
    assert torch.allclose(same[3][0][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0], raw, atol=1e-6)


def test_3d_view_in_unit_range_and_resized(data_root):
    root, _ = data_root
    ds = MedMNISTSplit("AdrenalMNIST3D", "val", root, input_size=16)
    x, _ = ds[0]
    assert x.shape == (1, 16, 16, 16) and 0.0 <= x.min() and x.max() <= 1.0
    student, teacher = ds.views(0, np.random.default_rng(0))
    assert student.shape == teacher.shape and 0.0 <= student.min() and student.max() <= 1.0


def test_augmentation_is_a_function_of_the_seed(data_root):
    root, _ = data_root
    ds = MultiSource([MedMNISTSplit("RetinaMNIST", "train", root, input_size=28)])
    a = ds[(0, 5, 123)]
    b = ds[(0, 5, 123)]
    c = ds[(0, 5, 124)]
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert torch.equal(a[3], c[3])  # the clean (teacher) view does not depend on the seed
    views = [ds[(0, 5, s)][2] for s in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_larger_files_are_preferred_and_resized(tmp_path):
    write_synthetic_npz(tmp_path, "AdrenalMNIST3D", 28, (4, 2, 2))
    write_synthetic_npz(tmp_path, "AdrenalMNIST3D", 64, (4, 2, 2))
    assert find_npz(tmp_path, "AdrenalMNIST3D", prefer=28)[1] == 28
    assert find_npz(tmp_path, "AdrenalMNIST3D")[1] == 64
    ds = MedMNISTSplit("AdrenalMNIST3D", "train", tmp_path, input_size=32)
    assert ds.file_size == 64 and ds[0][0].shape == (1, 32, 32, 32)
    for size in (64, 128, 224):
        write_synthetic_npz(tmp_path, "ChestMNIST", size, (2, 2, 2))
        ds = MedMNISTSplit("ChestMNIST", "val", tmp_path, input_size=48, file_size=size)
        x, y = ds[1]
        assert x.shape == (3, 48, 48) and y.shape == (14,)


def test_multi_source_mixed_batch_collates_by_modality(data_root):
    root, _ = data_root
    data = MultiSource([
        MedMNISTSplit("BreastMNIST", "val", root, 28),
        MedMNISTSplit("AdrenalMNIST3D", "val", root, 28),
    ])
    batch = collate([data[(1, 0, 7)], data[(0, 2, 8)], data[(0, 3, 9)]])
    assert [p.x.shape[1:] for p in batch.parts] == [(3, 28, 28), (1, 28, 28, 28)]
    assert batch.keys == [(0, 2, 8), (0, 3, 9), (1, 0, 7)]
    assert batch.parts[0].source.tolist() == [0, 0] and batch.parts[1].x_clean is not None


def test_missing_file_names_file_and_download_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"breastmnist\.npz.*--download"):
        MedMNISTSplit("BreastMNIST", "train", tmp_path, input_size=28)
    with pytest.raises(FileNotFoundError, match=r"pathmnist_224\.npz"):
        find_npz(tmp_path, "PathMNIST", size=224)


def test_corrupt_and_foreign_files_are_named(tmp_path, data_root):
    root, _ = data_root
    bad = tmp_path / "breastmnist.npz"
    data = (root / "breastmnist.npz").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFileError, match=r"breastmnist\.npz.*corrupt"):
        MedMNISTSplit("BreastMNIST", "train", tmp_path, input_size=28)
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(DatasetFileError, match=r"breastmnist\.npz"):
        load_split(bad, "test")
    np.savez(bad, train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DatasetFileError, match=r"missing \['train_labels'\]"):
        load_split(bad, "train")
    np.savez(bad, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((3, 1), np.uint8))
    with pytest.raises(DatasetFileError, match="3"):
        load_split(bad, "train")
    np.savez(bad, train_images=np.zeros((2, 32, 32), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(DatasetFileError, match=r"shape"):
        MedMNISTSplit("BreastMNIST", "train", tmp_path, input_size=28)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'nomnist'"):
        resolve_datasets("breastmnist,nomnist")
    with pytest.raises(ValueError, match="size"):
        npz_filename("AdrenalMNIST3D", 224)
    with pytest.raises(ValueError, match="split"):
        load_split("x.npz", "training")
    with pytest.raises(ValueError, match="batch_size"):
        round_plan([10], batch_size=3, seed=0, round_idx=0, world_size=2)
    with pytest.raises(ValueError, match="samples_per_round"):
        round_plan([10], batch_size=2, seed=0, round_idx=0, samples_per_round=0)


def test_names_order_and_routing():
    assert resolve_datasets(["adrenalmnist3d", "BreastMNIST", "breastmnist"]) == ("AdrenalMNIST3D", "BreastMNIST")
    assert training_order(["AdrenalMNIST3D", "RetinaMNIST", "BreastMNIST"]) == (
        "BreastMNIST", "RetinaMNIST", "AdrenalMNIST3D")
    assert training_order(["OrganMNIST3D", "DermaMNIST", "PathMNIST"], interleaved=True) == (
        "PathMNIST", "OrganMNIST3D", "DermaMNIST")


def test_cyclic_plan_is_deterministic_balanced_and_one_dataset_per_batch():
    sizes = [100, 30, 7]
    plan = round_plan(sizes, batch_size=8, seed=1, round_idx=2, samples_per_round=60)
    assert plan == round_plan(sizes, batch_size=8, seed=1, round_idx=2, samples_per_round=60)
    assert plan != round_plan(sizes, batch_size=8, seed=1, round_idx=3, samples_per_round=60)
    per_source = [sum(len(b) for b in plan if b[0][0] == s) for s in range(3)]
    assert per_source == [16, 16, 7]  # share ⌈60/3⌉ = 20 → full batches of 8; 7 < 8 → one batch of 7
    for batch in plan:
        assert len({k[0] for k in batch}) == 1
        assert len({k[1] for k in batch}) == len(batch)
    all_keys = [k for b in plan for k in b]
    assert len({k[2] for k in all_keys}) == len(all_keys)  # one augmentation seed per sample


def test_mixed_plan_groups_specialists_and_shards_evenly():
    plan = round_plan([40, 40, 40], batch_size=12, seed=0, round_idx=0, mixed=True, experts="BAC", world_size=2)
    assert len(plan) == 10 and all(len(b) == 12 for b in plan)
    assert any(len({k[0] for k in b}) == 3 for b in plan)
    for b in plan:
        rank = [{"A": 0, "B": 1, "C": 2}["BAC"[k[0]]] for k in b]
        assert rank == sorted(rank)
    b = plan[0]
    assert shard_batch(b, 0, 2) + shard_batch(b, 1, 2) == b


def test_demo_subset_is_packaged_and_small():
    total = 0
    for name in DEMO_DATASETS:
        path = DEMO_ROOT / npz_filename(name, 28)
        total += path.stat().st_size
        for split in ("train", "val", "test"):
            images, labels = load_split(path, split)
            assert len(images) == len(labels) > 0
    assert total < 2_000_000
    assert "CC BY 4.0" in (DEMO_ROOT / "SOURCES.md").read_text()


def test_download_is_never_attempted_without_the_flag(tmp_path, monkeypatch):
    import mosaic_fast.data.npz as npz

    monkeypatch.setattr(npz, "download_npz", lambda *a: pytest.fail("download attempted"))
    missing = rf"no file breastmnist_224\.npz or .*breastmnist\.npz in {re.escape(str(tmp_path))}\..*--download"
    with pytest.raises(FileNotFoundError, match=missing):
        find_npz(tmp_path, "BreastMNIST")
    calls = []
    monkeypatch.setattr(npz, "download_npz", lambda root, name, size: calls.append((name, size)) or shutil.copy(
        DEMO_ROOT / "breastmnist.npz", Path(root) / npz_filename(name, size)))
    assert find_npz(tmp_path, "BreastMNIST", size=28, download=True)[1] == 28 and calls == [("BreastMNIST", 28)]


def test_corrupt_compressed_stream_is_named(tmp_path):
    """Bytes flipped inside a deflate stream raise zlib.error deep in numpy: reported like any corrupt file."""
    import zlib

    path = tmp_path / "breastmnist.npz"
    images = (np.arange(8 * 28 * 28) % 97).astype(np.uint8).reshape(8, 28, 28)  # compressible: a Huffman stream
    np.savez_compressed(path, train_images=images, train_labels=np.zeros((8, 1), np.uint8))
    data = bytearray(path.read_bytes())
    data[60:76] = bytes(b ^ 0xFF for b in data[60:76])  # inside train_images.npy's compressed bytes
    path.write_bytes(bytes(data))
    with pytest.raises(zlib.error), np.load(path) as raw:
        raw["train_images"]
    with pytest.raises(DatasetFileError, match=r"breastmnist\.npz is corrupt.*zlib\.error"):
        load_split(path, "train")


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    """medmnist's download failure (a RuntimeError chained on the network error) becomes one DownloadError
    naming the dataset, the file, the network error and where to fetch it by hand."""
    import medmnist.dataset

    from mosaic_fast.data import DownloadError

    def offline(self):
        try:
            raise OSError("[Errno 101] Network is unreachable")
        except OSError as err:
            raise RuntimeError("Automatic download failed! Please download it manually.") from err

    monkeypatch.setattr(medmnist.dataset.MedMNIST, "download", offline)
    with pytest.raises(DownloadError) as exc:
        MedMNISTSplit("BreastMNIST", "train", tmp_path, input_size=28, download=True)
    message = str(exc.value)
    for part in ("BreastMNIST", "breastmnist.npz", "Network is unreachable", "zenodo.org", str(tmp_path)):
        assert part in message, part
