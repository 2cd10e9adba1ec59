"""ACC/AUC against values computed by hand, for every task type and both metric definitions.

Logits are log-probabilities (multi-class) or logits of the probabilities (multi-label), so the
probabilities the metrics see are exactly the ones written here.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import roc_auc_score

from mosaic_fast.engine.metrics import compute_metrics, summarize

TASKS = ("binary-class", "multi-class", "ordinal-regression", "multi-label, binary-class")


def _logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p))


# Binary: p(class 1) = .2 .7 .4 .6 for labels 0 1 1 0 → predictions 0 1 0 1: ACC 2/4.
# AUC: positive scores {.7, .4} vs negative {.2, .6}: 3 of 4 pairs ordered → 0.75.
BINARY_LABELS = np.array([[0], [1], [1], [0]])
BINARY_LOGITS = np.stack([np.zeros(4), _logit([0.2, 0.7, 0.4, 0.6])], axis=1)

# Multi-class: argmax 0 1 2 0 against labels 0 1 2 2 → ACC 3/4.
# AUC one-vs-rest: class 0: {.6} vs {.2 .1 .5} = 1; class 1: {.5} vs {.3 .2 .3} = 1;
# class 2: {.7 .2} vs {.1 .3} = 3/4 → mean 2.75 / 3.
MC_LABELS = np.array([[0], [1], [2], [2]])
MC_PROBS = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])

# Multi-label (3 labels): predictions at 0.5 are right on 4, 3 and 2 of 4 samples → ACC (1 + .75 + .5) / 3.
# AUC per label: 1, 1, and {.6 .3} vs {.2 .8} = 2/4 → mean 2.5 / 3.
ML_LABELS = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
ML_PROBS = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.3], [0.6, 0.4, 0.2], [0.3, 0.1, 0.8]])

# Ordinal (5 grades, grade 3 absent): argmax 1 2 2 1 against labels 0 2 4 1 → exact 2/4, within ±1 3/4.
# Seed AUC skips grade 3: grade 0: {.35} vs {.1 .15 .2} = 1; grade 1: {.5} vs {.4 .2 .1} = 1;
# grade 2: {.5} vs {.1 .55 .1} = 2/3; grade 4: {.1} vs {.05 .15 .05} = 2/3 → mean (2 + 4/3) / 4.
ORD_LABELS = np.array([[0], [2], [4], [1]])
ORD_PROBS = np.array([
    [0.35, 0.4, 0.1, 0.1, 0.05],
    [0.1, 0.2, 0.5, 0.05, 0.15],
    [0.15, 0.1, 0.55, 0.1, 0.1],
    [0.2, 0.5, 0.1, 0.15, 0.05],
])


@pytest.mark.parametrize("mode", ["medmnist", "mosaic"])
def test_binary(mode):
    m = compute_metrics(BINARY_LABELS, BINARY_LOGITS, "binary-class", mode)
    assert m["acc"] == pytest.approx(0.5) and m["auc"] == pytest.approx(0.75)


@pytest.mark.parametrize("mode", ["medmnist", "mosaic"])
def test_multi_class(mode):
    m = compute_metrics(MC_LABELS, np.log(MC_PROBS), "multi-class", mode)
    assert m["acc"] == pytest.approx(0.75) and m["auc"] == pytest.approx(2.75 / 3)


@pytest.mark.parametrize("mode", ["medmnist", "mosaic"])
def test_multi_label(mode):
    m = compute_metrics(ML_LABELS, _logit(ML_PROBS), "multi-label, binary-class", mode)
    assert m["acc"] == pytest.approx(0.75) and m["auc"] == pytest.approx(2.5 / 3)


def test_ordinal_official_is_exact_argmax_and_auc_needs_every_grade():
    m = compute_metrics(ORD_LABELS, np.log(ORD_PROBS), "ordinal-regression", "medmnist")
    assert m["acc"] == pytest.approx(0.5)
    assert math.isnan(m["auc"])  # grade 3 never occurs: the official one-vs-rest AUC is undefined


def test_ordinal_seed_variant_counts_off_by_one_and_skips_absent_grades():
    m = compute_metrics(ORD_LABELS, np.log(ORD_PROBS), "ordinal-regression", "mosaic")
    assert m["acc"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx((2 + 4 / 3) / 4)


def test_ordinal_with_every_grade_matches_multi_class_auc():
    for mode in ("medmnist", "mosaic"):
        m = compute_metrics(MC_LABELS, np.log(MC_PROBS), "ordinal-regression", mode)
        # argmax 0 1 2 0 vs 0 1 2 2: the last is 2 grades off, wrong in both definitions.
        assert m["acc"] == pytest.approx(0.75) and m["auc"] == pytest.approx(2.75 / 3)


def test_seed_variant_skips_absent_labels_in_multi_label():
    labels = ML_LABELS.copy()
    labels[:, 2] = 0  # label 2 never positive
    official = compute_metrics(labels, _logit(ML_PROBS), "multi-label, binary-class", "medmnist")
    seed = compute_metrics(labels, _logit(ML_PROBS), "multi-label, binary-class", "mosaic")
    assert math.isnan(official["auc"]) and seed["auc"] == pytest.approx(1.0)


def test_summary_means_skip_undefined_auc():
    per = {"A": {"acc": 0.5, "auc": 0.8}, "B": {"acc": 1.0, "auc": float("nan")}, "C": {"acc": 0.75, "auc": 0.6}}
    s = summarize(per, {"A": False, "B": False, "C": True})
    assert s["mean_acc"] == pytest.approx(0.75) and s["mean_auc"] == pytest.approx(0.7)
    assert s["mean_acc_2d"] == pytest.approx(0.75) and s["mean_acc_3d"] == pytest.approx(0.75)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="task"):
        compute_metrics(BINARY_LABELS, BINARY_LOGITS, "regression")
    with pytest.raises(ValueError, match="mode"):
        compute_metrics(BINARY_LABELS, BINARY_LOGITS, "binary-class", "sklearn")
    with pytest.raises(ValueError, match="same N"):
        compute_metrics(BINARY_LABELS[:3], BINARY_LOGITS, "binary-class")
    with pytest.raises(ValueError, match="class indices"):
        compute_metrics(np.array([[0], [5], [1], [0]]), BINARY_LOGITS, "binary-class")
    with pytest.raises(ValueError, match="multi-label"):
        compute_metrics(ML_LABELS, BINARY_LOGITS, "multi-label, binary-class")


def test_labels_must_be_valid_class_indices():
    with pytest.raises(ValueError, match="non-negative integers"):
        compute_metrics(np.array([[0], [-1], [1], [0]]), BINARY_LOGITS, "binary-class")
    with pytest.raises(ValueError, match="non-negative integers"):
        compute_metrics(BINARY_LABELS.astype(np.float32) + 0.5, BINARY_LOGITS, "binary-class")
    with pytest.raises(ValueError, match="0 or 1"):
        compute_metrics(ML_LABELS * 2, _logit(ML_PROBS), "multi-label, binary-class")
    with pytest.raises(ValueError, match="finite"):
        compute_metrics(BINARY_LABELS, np.where(BINARY_LOGITS > 0.5, np.nan, BINARY_LOGITS), "binary-class")


# ---- property tests: the two modes against medmnist's own functions and the seed's formula ----------------


def _reference_probs(logits: np.ndarray, task: str) -> np.ndarray:
    """Scores as the seed and medmnist's training scripts make them: torch on the float32 model output."""
    t = torch.tensor(logits)
    return (t.sigmoid() if task.startswith("multi-label") else t.softmax(dim=1)).numpy()


def _seed_metrics(labels: np.ndarray, logits: np.ndarray, task: str) -> dict[str, float]:
    """The seed's engine/evaluator.py, re-derived: labels (N,) class indices or (N, L) 0/1 (its loader
    squeezes the (1,) label rows); ACC: ``logit > 0`` element mean (multi-label), |argmax − y| ≤ 1
    (ordinal), argmax (others); AUC: positive-class score (binary), else the mean one-vs-rest AUC over the
    columns holding both values; 0.0 when nothing can be scored or sklearn raises (newer sklearn returns
    NaN with a warning for a one-class binary split instead)."""
    probs = _reference_probs(logits, task)
    if task.startswith("multi-label"):
        acc = np.mean((logits > 0) == labels.astype(bool))
        truth = labels
    else:
        y = labels[:, 0]
        pred = np.argmax(logits, axis=1)
        acc = np.mean(np.abs(pred - y) <= 1) if task == "ordinal-regression" else np.mean(pred == y)
        truth = np.eye(logits.shape[1])[y]
    try:
        if task == "binary-class":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                auc = roc_auc_score(labels[:, 0], probs[:, 1])
        else:
            cols = [c for c in range(logits.shape[1]) if 0 < truth[:, c].sum() < len(truth)]
            auc = np.mean([roc_auc_score(truth[:, c], probs[:, c]) for c in cols]) if cols else 0.0
    except ValueError:
        auc = 0.0
    return {"acc": float(acc), "auc": float(auc)}


def _cases(seed: int, count: int):
    """Random float32 logits and labels for every task: small and large logit scales (saturated
    probabilities that tie in float32), classes or labels absent, splits of one class only."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        task = TASKS[i % len(TASKS)]
        n = int(rng.integers(2, 50))
        c = 14 if task.startswith("multi-label") else 2 if task == "binary-class" else int(rng.integers(3, 12))
        scale = float(rng.choice([0.5, 3.0, 30.0, 80.0]))
        logits = (rng.normal(size=(n, c)) * scale).astype(np.float32)
        if rng.random() < 0.3:  # coarse logits: ties in the scores
            logits = np.round(logits)
        kind = rng.random()
        if task.startswith("multi-label"):
            labels = (rng.random((n, c)) < rng.uniform(0.05, 0.6)).astype(np.int64)
            if kind < 0.2:
                labels[:, rng.integers(c)] = 0  # a label never positive
        else:
            k = c if kind > 0.4 else int(rng.integers(1, c))  # sometimes only k < c classes occur
            labels = rng.integers(0, k, size=(n, 1)).astype(np.int64)
            if kind < 0.1:
                labels[:] = labels[0]  # one class only
        yield task, labels, logits


def _both_nan_or_equal(ours: float, ref: float) -> bool:
    return (math.isnan(ours) and math.isnan(ref)) or ours == ref


def test_medmnist_mode_is_medmnists_getacc_getauc_exactly():
    for task, labels, logits in _cases(0, 40):
        probs = _reference_probs(logits, task)
        ours = compute_metrics(labels, logits, task, "medmnist")
        assert ours["acc"] == getACC(labels, probs, task), (task, labels.T, logits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ref = float(getAUC(labels, probs, task))
            except ValueError:  # sklearn versions that raise for a one-class column
                ref = float("nan")
        assert _both_nan_or_equal(ours["auc"], ref), (task, ours["auc"], ref)


def test_mosaic_mode_is_the_seeds_formula_exactly():
    for task, labels, logits in _cases(1, 40):
        ours = compute_metrics(labels, logits, task, "mosaic")
        seed = _seed_metrics(labels, logits, task)
        assert ours["acc"] == seed["acc"], (task, ours, seed)
        if math.isnan(ours["auc"]):  # documented difference: undefined AUC is NaN here, 0.0 in the seed
            assert seed["auc"] == 0.0 or math.isnan(seed["auc"])  # (recent sklearn returns NaN, older raise)
        else:
            assert ours["auc"] == seed["auc"], (task, ours, seed)


def test_confident_float32_scores_tie_as_in_the_references():
    """float32 softmax saturates at 1.0 for logit gaps above ~17: those samples tie in the ranking, as in
    the seed and medmnist's scripts. A float64 softmax would rank them and give AUC 0.5 here."""
    labels = np.array([[1], [0], [0], [1]])
    logits = np.array([[0, 20], [0, 25], [0, -3], [0, 1]], dtype=np.float32)
    for mode in ("medmnist", "mosaic"):
        assert compute_metrics(labels, logits, "binary-class", mode)["auc"] == 0.625
    assert compute_metrics(labels, logits.astype(np.float64), "binary-class")["auc"] == 0.5
