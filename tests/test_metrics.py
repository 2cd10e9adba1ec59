"""ACC/AUC against values computed by hand, for every task type and both metric definitions.

Logits are log-probabilities (multi-class) or logits of the probabilities (multi-label), so the
probabilities the metrics see are exactly the ones written here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mosaic_fast.engine.metrics import compute_metrics, summarize


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
