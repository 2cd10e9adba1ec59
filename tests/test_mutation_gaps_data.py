"""Tests found missing by mutation testing of data/, engine/metrics, engine/trainer and engine/history: each
checks one behaviour against a hand-written formula or literal from DESIGN.md §3 (or torch's own seed
scheduler) that an undetected code change would have broken."""

from __future__ import annotations

import csv
import json
import math
import time

import numpy as np
import pytest
import torch

from mosaic_fast.data import DatasetFileError, MedMNISTSplit, MultiSource, load_split, round_plan
from mosaic_fast.data import npz as npz_mod
from mosaic_fast.data.datasets import NO_AUGMENT, collate
from mosaic_fast.data.registry import NUM_CLASSES
from mosaic_fast.data.synthetic import write_synthetic_npz
from mosaic_fast.data.transforms import clean_view_2d, clean_view_3d
from mosaic_fast.engine import checkpoint as ckpt_io
from mosaic_fast.engine import metrics as metrics_mod
from mosaic_fast.engine import trainer as trainer_mod
from mosaic_fast.engine.distributed import DistInfo
from mosaic_fast.engine.history import write_history
from mosaic_fast.engine.metrics import compute_metrics, summarize
from mosaic_fast.engine.trainer import Trainer, TrainSettings
from mosaic_fast.models import EMATeacher, MosaicModel

#: ImageNet statistics written out (DESIGN.md §3: "ImageNet mean/std"), in RGB order.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TINY = dict(embed_dim=32, depth=1, num_heads=2, img_size_2d=28, patch_size_2d=7, img_size_3d=28, patch_size_3d=14,
            adapter_bottleneck_a=8, adapter_bottleneck_b=8, adapter_bottleneck_c=16)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- transforms
def test_2d_view_uses_imagenet_mean_std_per_rgb_channel():
    rgb = np.empty((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 128, 250
    x = clean_view_2d(rgb, 4)
    for c, v in enumerate((10, 128, 250)):
        assert torch.allclose(x[c], torch.full((4, 4), (v / 255 - MEAN[c]) / STD[c]), atol=1e-6), c


def test_2d_downsizing_is_antialiased_bilinear():
    """Halving with antialiased bilinear = the triangle filter stretched ×2: weights (1, 3, 3, 1) / 8 over the
    pixels 2i-1 … 2i+2 (interior outputs; the borders renormalise)."""
    img = np.random.default_rng(0).integers(0, 256, (56, 56), dtype=np.uint8)
    x = clean_view_2d(img, 28)
    src = img.astype(np.float64) / 255
    w = np.array([1, 3, 3, 1]) / 8
    rows = np.stack([src[2 * i - 1 : 2 * i + 3].T @ w for i in range(1, 27)])  # (26, 56)
    grey = np.stack([rows[:, 2 * j - 1 : 2 * j + 3] @ w for j in range(1, 27)], axis=1)  # (26, 26)
    for c in range(3):
        expected = torch.from_numpy((grey - MEAN[c]) / STD[c]).float()
        assert torch.allclose(x[c, 1:27, 1:27], expected, atol=1e-5), c


def test_3d_downsizing_is_trilinear_half_pixel():
    """Halving a volume with trilinear (align_corners=False) samples at 2i + 0.5: the mean of each 2×2×2
    block, of values /255."""
    vol = np.random.default_rng(1).integers(0, 256, (32, 32, 32), dtype=np.uint8)
    x = clean_view_3d(vol, 16)
    expected = (vol.astype(np.float64) / 255).reshape(16, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5))
    assert x.shape == (1, 16, 16, 16)
    assert torch.allclose(x[0], torch.from_numpy(expected).float(), atol=1e-6)


# ---------------------------------------------------------------- datasets
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gaps_data")
    write_synthetic_npz(root, "BreastMNIST", 28, (16, 6, 6), seed=0)
    write_synthetic_npz(root, "ChestMNIST", 28, (16, 6, 6), seed=1)
    write_synthetic_npz(root, "AdrenalMNIST3D", 28, (4, 2, 2), seed=2)
    write_synthetic_npz(root, "AdrenalMNIST3D", 64, (4, 2, 2), seed=3)
    return root


def test_multi_source_eval_keys_give_the_clean_view_and_left_aligned_labels(root):
    """NO_AUGMENT gives the unaugmented normalised image; a one-column label row is padded on the right to
    the widest label row (ChestMNIST's 14); head ids are the seed's dataset indices (Breast 5, Chest 4)."""
    breast, chest = MedMNISTSplit("BreastMNIST", "val", root, 28), MedMNISTSplit("ChestMNIST", "val", root, 28)
    data = MultiSource([breast, chest])
    assert data.head_ids() == [5, 4]
    for i in range(len(breast)):
        _key, is_3d, x, x_clean, labels = data[(0, i, NO_AUGMENT)]
        grey = torch.from_numpy(breast.images[i]).double() / 255
        expected = torch.stack([(grey - MEAN[c]) / STD[c] for c in range(3)]).float()
        assert not is_3d and x_clean is None and torch.allclose(x, expected, atol=1e-6)
        assert labels.shape == (14,) and labels[0] == int(breast.labels[i, 0]) and not labels[1:].any()
        assert torch.equal(data[(1, i, NO_AUGMENT)][4], chest.labels[i])
    batch = collate([data[(1, 2, 7)], data[(0, 3, 8)], data[(1, 4, 9)]])
    assert len(batch.parts) == 1 and batch.parts[0].source.tolist() == [1, 0, 1]
    assert torch.equal(batch.parts[0].labels[1], data[(0, 3, 8)][4])


def test_the_file_of_the_models_input_size_is_preferred(root):
    """With the 28 and 64 files present, an input size of 28 reads the 28 file (no resize of the 64 one)."""
    ds = MedMNISTSplit("AdrenalMNIST3D", "train", root, input_size=28)
    assert ds.file_size == 28 and ds.images.shape[1:] == (28, 28, 28)
    assert MedMNISTSplit("AdrenalMNIST3D", "train", root, input_size=64).file_size == 64


def test_non_uint8_images_are_named(tmp_path):
    """Float images (e.g. already in [0, 1]) would be divided by 255 again: a clear error naming the file."""
    path = tmp_path / "breastmnist.npz"
    np.savez(path, train_images=np.random.default_rng(0).random((2, 28, 28), np.float32),
             train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(DatasetFileError, match=r"breastmnist\.npz.*uint8"):
        load_split(path, "train")


def test_download_fetches_and_returns_the_wanted_size(tmp_path, monkeypatch):
    """--download with no file present fetches ``prefer`` when published (else the largest size) and returns
    that file (medmnist's downloader replaced by one writing a synthetic file)."""
    fetched = []

    def fake_download(root, name, size):
        fetched.append(size)
        write_synthetic_npz(root, name, size, (2, 2, 2))

    monkeypatch.setattr(npz_mod, "download_npz", fake_download)
    path, size = npz_mod.find_npz(tmp_path / "a", "BreastMNIST", download=True, prefer=28)
    assert (path.name, size, fetched) == ("breastmnist.npz", 28, [28]) and path.is_file()
    path, size = npz_mod.find_npz(tmp_path / "b", "AdrenalMNIST3D", download=True, prefer=32)
    assert (path.name, size, fetched[1:]) == ("adrenalmnist3d_64.npz", 64, [64]) and path.is_file()


# ---------------------------------------------------------------- sampling
def test_balanced_subsample_is_shuffled_and_drawn_afresh_every_round():
    chosen = [{k[1] for b in round_plan([100], 5, seed=3, round_idx=r, samples_per_round=10) for k in b}
              for r in range(4)]
    assert all(len(c) == 10 for c in chosen)
    assert len(set().union(*chosen)) > 10 and len({frozenset(c) for c in chosen}) == 4
    assert chosen[0] != set(range(10))
    order = [k[1] for b in round_plan([50], 5, seed=3, round_idx=0) for k in b]
    assert sorted(order) == list(range(50)) and order != sorted(order)


def test_mixed_batches_group_by_specialist_then_dataset():
    experts = "ABAB"
    plan = round_plan([30, 30, 30, 30], 24, seed=0, round_idx=0, mixed=True, experts=experts)
    assert any(len({k[0] for k in b}) == 4 for b in plan)
    for b in plan:
        order = [("ABC".index(experts[k[0]]), k[0]) for k in b]
        assert order == sorted(order)


# ---------------------------------------------------------------- metrics
def test_float64_logits_are_scored_in_float64():
    """Margins of 20-23 saturate float32 probabilities at 1.0 (a tie, AUC 0.5); float64 keeps the ranking."""
    labels = np.array([[0], [0], [1], [1]])
    logits = np.array([[0.0, 20.0], [0.0, 21.0], [0.0, 22.0], [0.0, 23.0]])
    for mode in ("medmnist", "mosaic"):
        assert compute_metrics(labels, logits, "binary-class", mode)["auc"] == pytest.approx(1.0)
        assert compute_metrics(labels, logits.astype(np.float32), "binary-class", mode)["auc"] == pytest.approx(0.5)


def test_label_equal_to_the_class_count_is_refused():
    logits = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    for task in ("multi-class", "ordinal-regression"):
        with pytest.raises(ValueError, match="class indices"):
            compute_metrics(np.array([[0], [1], [2], [3]]), logits, task)


@pytest.mark.parametrize("sklearn_raises", [False, True], ids=["sklearn-warns", "sklearn-raises"])
def test_auc_of_a_one_class_split_is_nan_not_zero(monkeypatch, sklearn_raises):
    """Only negatives: AUC is undefined (NaN, left out of the mean AUC), not 0, whether sklearn warns (and
    returns NaN) or raises ValueError (other sklearn versions; simulated here)."""
    import medmnist.evaluator
    from sklearn.metrics import roc_auc_score

    def raising(y_true, y_score, *args, **kwargs):
        if len(np.unique(y_true)) < 2:
            raise ValueError("Only one class present in y_true. ROC AUC score is not defined in that case.")
        return roc_auc_score(y_true, y_score, *args, **kwargs)

    if sklearn_raises:
        monkeypatch.setattr(medmnist.evaluator, "roc_auc_score", raising)
        monkeypatch.setattr(metrics_mod, "roc_auc_score", raising)
    logits = np.random.default_rng(1).normal(size=(6, 2)).astype(np.float32)
    for mode in ("medmnist", "mosaic"):
        result = compute_metrics(np.zeros((6, 1), np.int64), logits, "binary-class", mode)
        assert math.isnan(result["auc"]), mode


def test_summary_means_split_2d_and_3d():
    per = {"A": {"acc": 0.1, "auc": 0.5}, "B": {"acc": 0.2, "auc": 0.6}, "C": {"acc": 0.9, "auc": 1.0}}
    s = summarize(per, {"A": False, "B": False, "C": True})
    assert s["mean_acc"] == pytest.approx(0.4) and s["mean_auc"] == pytest.approx(0.7)
    assert s["mean_acc_2d"] == pytest.approx(0.15) and s["mean_acc_3d"] == pytest.approx(0.9)


# ---------------------------------------------------------------- trainer
def _trainer(root, out, **overrides) -> Trainer:
    torch.manual_seed(0)
    student = MosaicModel(NUM_CLASSES, **TINY, fast=False)
    data = {s: MultiSource([MedMNISTSplit("BreastMNIST", s, root, 28)]) for s in ("train", "val")}
    settings = TrainSettings(**{"num_rounds": 10, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-5, "warmup_rounds": 3,
                                "progress": False, "config": {"model": TINY}, **overrides})
    return Trainer(student, EMATeacher(student), data["train"], data["val"], None, settings, DistInfo(), out)


def _val(acc_s, acc_t, auc_s):
    def one(acc, auc):
        return {"BreastMNIST": {"acc": acc, "auc": auc}, "mean_acc": acc, "mean_auc": auc, "mean_acc_2d": acc}
    return {"student": one(acc_s, auc_s), "teacher": one(acc_t, 0.5)}


def test_early_stopping_best_checkpoint_and_lr_per_round(root, tmp_path, monkeypatch):
    """The seed's rule on the student's mean val ACC: a new best is strictly higher (a tie keeps the earlier
    round); a drop of less than min_delta resets the patience counter; patience drops in a row stop.
    best.pt is the best round's; the history's lr is the seed's LinearLR(0.01 → 1) + cosine schedule."""
    monkeypatch.setattr(trainer_mod, "write_history", lambda *a: None)
    trainer = _trainer(root, tmp_path, early_stopping_patience=2, early_stopping_min_delta=0.01)
    student = [0.50, 0.40, 0.60, 0.58, 0.595, 0.60, 0.55, 0.54, 0.53, 0.52]
    # counter:    0     1     0  (best) 1     0      0 (tie) 1     2 → stop after round 8
    teacher = [1 - a for a in student]  # another best round if the teacher's ACC were watched
    auc = [0.9 - 0.05 * r for r in range(10)]  # falls every round: stops at once if AUC were watched
    trainer.validate = lambda data, when="": _val(student[r], teacher[r], auc[r])
    stopped = None
    for r in range(10):
        if trainer._end_round(r, time.time()):
            stopped = r
            break
    assert stopped == 7 and len(trainer.history) == 8 and trainer.no_improve == 2
    best = ckpt_io.load(tmp_path / "best.pt")
    assert best["round"] == 2 and best["best_acc"] == pytest.approx(0.60) and trainer.best_round == 2

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    ref = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10 - 3, eta_min=1e-5)], milestones=[3])
    expected = []
    for _ in range(8):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert [e["lr"] for e in trainer.history] == pytest.approx(expected, rel=1e-6)


def test_consistency_weight_setting_is_used(root, tmp_path):
    trainer = _trainer(root, tmp_path, consist_weight=0.5)
    batch = collate([trainer.train_data[k] for k in trainer._round_batches(0)[0]])
    out = trainer.train_step(batch, {"B"}, ["BreastMNIST"])
    assert out["loss_consist"] > 0
    assert out["loss"] == pytest.approx(out["loss_cls"] + 0.5 * out["loss_consist"], rel=1e-5)


class _FakeScaler:
    """A loss scaler (as fp16 GradScaler) on CPU: scales the loss by ``s``, divides the gradients back in
    ``unscale_`` and records the gradients the optimizer steps with."""

    def __init__(self, s):
        self.s, self.grads = s, None

    def scale(self, loss):
        return loss * self.s

    def unscale_(self, opt):
        for p in opt.param_groups[0]["params"]:
            if p.grad is not None:
                p.grad.div_(self.s)

    def step(self, opt):
        self.grads = [None if p.grad is None else p.grad.clone() for p in opt.param_groups[0]["params"]]
        opt.step()

    def update(self):
        pass


def test_gradients_are_clipped_after_unscaling(root, tmp_path):
    """The optimizer steps with the true gradient clipped to max_grad_norm: g · min(1, c / ‖g‖), whatever
    the loss scale."""
    grads = {}
    for name, scale, clip in (("true", 1.0, 1e9), ("scaled", 4096.0, 1e-3)):
        trainer = _trainer(root, tmp_path / name, max_grad_norm=clip)
        trainer.scaler = _FakeScaler(scale)
        keys = trainer._round_batches(0)[0]
        batch = collate([trainer.train_data[k] for k in keys])
        trainer.train_step(batch, {"A", "B"}, ["BreastMNIST"])
        grads[name] = [g for g in trainer.scaler.grads if g is not None]
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads["true"]))
    assert norm > 1e-2  # clipping is active
    for g, h in zip(grads["true"], grads["scaled"]):
        assert torch.allclose(h, g * (1e-3 / norm), rtol=1e-3, atol=1e-12)


# ---------------------------------------------------------------- history
def _entry(r, scale):
    val = {m: {"BreastMNIST": {"acc": 0.5 * scale + i, "auc": 0.6 * scale + i}, "mean_acc": 0.5 * scale + i,
               "mean_auc": 0.6 * scale + i} for i, m in enumerate(("student", "teacher"))}
    return {"round": r, "lr": 1e-4 * scale, "time_s": 3.0 * scale,
            "train_loss": {"BreastMNIST": 0.7 * scale, "ChestMNIST": 0.3 * scale, "mean": 0.5 * scale},
            "train_loss_cls": 0.4 * scale, "train_loss_consist": 2.0 * scale, "val": val,
            "avg_forgetting": 0.05 * scale}


def test_history_csv_has_one_named_column_per_value(tmp_path):
    history = [_entry(1, 1.0), _entry(2, 0.5)]
    write_history(history, tmp_path)
    assert json.loads((tmp_path / "history.json").read_text()) == history
    assert (tmp_path / "curves.png").stat().st_size > 0
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    for row, e in zip(rows, history):
        expected = {"round": e["round"], "lr": e["lr"], "time_s": e["time_s"], "train_loss": e["train_loss"]["mean"],
                    "train_loss_cls": e["train_loss_cls"], "train_loss_consist": e["train_loss_consist"],
                    "avg_forgetting": e["avg_forgetting"]}
        for m in ("student", "teacher"):
            for k in ("acc", "auc"):
                expected[f"val_{m}_BreastMNIST_{k}"] = e["val"][m]["BreastMNIST"][k]
                expected[f"val_{m}_mean_{k}"] = e["val"][m][f"mean_{k}"]
        assert set(row) == set(expected)
        assert {k: float(v) for k, v in row.items()} == pytest.approx(expected)
