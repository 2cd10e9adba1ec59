"""ACC and AUC per MedMNIST task type, in two definitions.

``"medmnist"`` (default, what we report): medmnist's own ``getACC`` / ``getAUC`` on probabilities
(softmax, or sigmoid for multi-label): binary uses the last column at 0.5, multi-label the per-label mean
at 0.5, multi-class and ordinal the exact argmax; AUC is one-vs-rest averaged over all classes.

Probabilities are computed in the precision of the logits (float32 for a model's output), as the seed
and medmnist's own training scripts do (``torch.softmax`` on float32 logits): AUC is a ranking, and
float32 probabilities that round to the same value (confident predictions saturate at 1.0) tie, where
float64 ones would not, so a float64 softmax gives other AUCs than the references.

``"mosaic"`` (the seed's ``engine/evaluator.py``, to compare with its tables): ordinal ACC counts
``|argmax − y| ≤ 1`` as correct, binary ACC is the argmax of the two logits, multi-label ACC the element
mean of ``logit > 0``; AUC skips the classes (labels) absent from the split.

Where AUC is undefined (a split holding one class only, which the medmnist definition cannot score) it is
NaN rather than a made-up number; mean AUCs are taken over the defined values. (The seed returns 0.0
there, or NaN for a one-class binary split where sklearn warns instead of raising, and averages it into
its mean AUC: the one place where ``"mosaic"`` deliberately differs from it.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from medmnist.evaluator import getACC, getAUC
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

METRIC_MODES = ("medmnist", "mosaic")
TASKS = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression")


def _check(labels: np.ndarray, logits: np.ndarray, task: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if mode not in METRIC_MODES:
        raise ValueError(f"mode must be one of {METRIC_MODES}, got {mode!r}")
    labels, logits = np.asarray(labels), np.asarray(logits)
    if logits.dtype != np.float64:  # float32 stays float32 (the precision the references score in)
        logits = logits.astype(np.float32)
    if labels.ndim == 1:
        labels = labels[:, None]
    if logits.ndim != 2 or labels.ndim != 2 or len(labels) != len(logits) or len(labels) < 2:
        raise ValueError(
            f"labels (N, L) and logits (N, C) with the same N ≥ 2 are required, got labels {labels.shape} "
            f"and logits {logits.shape}"
        )
    if task.startswith("multi-label") and labels.shape[1] != logits.shape[1]:
        raise ValueError(f"multi-label: labels {labels.shape} and logits {logits.shape} must match")
    if labels.dtype.kind not in "biu" or labels.min() < 0:
        raise ValueError(f"labels must be non-negative integers, got dtype {labels.dtype}, min {labels.min()}")
    if task.startswith("multi-label") and labels.max() > 1:
        raise ValueError(f"multi-label: labels must be 0 or 1, got values up to {labels.max()}")
    if not task.startswith("multi-label") and (labels.shape[1] != 1 or labels.max() >= logits.shape[1]):
        raise ValueError(f"{task}: labels must be (N, 1) class indices < {logits.shape[1]}, got {labels.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits must be finite (NaN or inf found)")
    return labels, logits


def scores_from_logits(logits: np.ndarray, task: str) -> np.ndarray:
    """Probabilities: sigmoid for multi-label, softmax over classes otherwise (in the logits' precision:
    float64 stays float64, anything else is computed in float32)."""
    logits = np.asarray(logits)
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float64 if logits.dtype == np.float64 else np.float32))
    return (t.sigmoid() if task.startswith("multi-label") else t.softmax(dim=1)).numpy()


def _auc_or_nan(fn: Callable[[], float]) -> float:
    """``fn()``, or NaN where one class only is present (sklearn raises or warns, by version)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            return float(fn())
    except ValueError:
        return float("nan")


def _mosaic_acc(labels: np.ndarray, logits: np.ndarray, task: str) -> float:
    if task.startswith("multi-label"):
        return float(((logits > 0).astype(int) == labels).mean())
    pred, y = logits.argmax(1), labels[:, 0]
    if task == "ordinal-regression":
        return float((np.abs(pred - y) <= 1).mean())
    return float((pred == y).mean())


def _mosaic_auc(labels: np.ndarray, scores: np.ndarray, task: str) -> float:
    if task == "binary-class":
        return _auc_or_nan(lambda: roc_auc_score(labels[:, 0], scores[:, 1]))
    if task.startswith("multi-label"):
        truth = labels
    else:
        truth = np.zeros_like(scores)
        truth[np.arange(len(labels)), labels[:, 0]] = 1
    present = [i for i in range(scores.shape[1]) if len(np.unique(truth[:, i])) > 1]
    if not present:
        return float("nan")
    return float(np.mean([_auc_or_nan(lambda i=i: roc_auc_score(truth[:, i], scores[:, i])) for i in present]))


def compute_metrics(labels: np.ndarray, logits: np.ndarray, task: str, mode: str = "medmnist") -> dict[str, float]:
    """``{"acc", "auc"}`` of ``logits`` (N, C) against ``labels`` (N, 1) or (N, L) for medmnist ``task``."""
    labels, logits = _check(labels, logits, task, mode)
    scores = scores_from_logits(logits, task)
    if mode == "mosaic":
        return {"acc": _mosaic_acc(labels, logits, task), "auc": _mosaic_auc(labels, scores, task)}
    return {
        "acc": float(getACC(labels, scores, task)),
        "auc": _auc_or_nan(lambda: getAUC(labels, scores, task)),
    }


def summarize(per_dataset: dict[str, dict[str, float]], is_3d: dict[str, bool]) -> dict[str, float]:
    """Mean ACC/AUC over the datasets (AUC over defined values), and the 2D and 3D mean ACC."""
    accs = [r["acc"] for r in per_dataset.values()]
    aucs = [r["auc"] for r in per_dataset.values() if not np.isnan(r["auc"])]
    out = {"mean_acc": float(np.mean(accs)), "mean_auc": float(np.mean(aucs)) if aucs else float("nan")}
    for key, flag in (("mean_acc_2d", False), ("mean_acc_3d", True)):
        sub = [r["acc"] for name, r in per_dataset.items() if is_3d[name] == flag]
        if sub:
            out[key] = float(np.mean(sub))
    return out
