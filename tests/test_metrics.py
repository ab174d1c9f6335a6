import numpy as np
import pytest

from kd.metrics import (
    balanced_accuracy_ci,
    balanced_log_loss,
    calibration_shift,
    compute_metrics,
    flatten,
    format_metrics,
    macro_auc,
    tune_threshold,
)


def test_metrics_by_hand():
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1]] * 7 + [[0.4, 0.6]] + [[0.3, 0.7], [0.8, 0.2]])
    m = compute_metrics(labels, probs, ["maj", "min"])
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["recall"] == {"maj": pytest.approx(7 / 8), "min": pytest.approx(0.5)}
    assert m["balanced_accuracy"] == pytest.approx((7 / 8 + 0.5) / 2)
    f1_maj = 2 * (7 / 8) * (7 / 8) / (7 / 8 + 7 / 8)   # precision 7/8, recall 7/8
    f1_min = 2 * 0.5 * 0.5 / (0.5 + 0.5)               # precision 1/2, recall 1/2
    assert m["macro_f1"] == pytest.approx((f1_maj + f1_min) / 2)
    assert m["confusion_matrix"] == [[7, 1], [1, 1]]
    flat = flatten(m, "val")
    assert flat["val_recall_min"] == pytest.approx(0.5) and "val_balanced_accuracy" in flat
    assert "confusion matrix" in format_metrics(m, ["maj", "min"])


def test_majority_only_predictions_have_balanced_accuracy_one_half():
    labels = np.array([0] * 279 + [1] * 21)       # the second reference project's test set
    probs = np.tile([0.8, 0.2], (300, 1))
    m = compute_metrics(labels, probs, ["majority", "minority"])
    assert m["accuracy"] == pytest.approx(0.93) and m["balanced_accuracy"] == pytest.approx(0.5)


def test_threshold_tuned_for_balanced_accuracy():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    p1 = np.array([0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.28, 0.4])
    t = tune_threshold(labels, p1)
    assert 0.25 < t <= 0.28  # both positives above, five of six negatives below
    m = compute_metrics(labels, np.stack([1 - p1, p1], 1), ["a", "b"], t)
    assert m["balanced_accuracy"] == pytest.approx((5 / 6 + 1) / 2)
    assert compute_metrics(labels, np.stack([1 - p1, p1], 1), ["a", "b"])["balanced_accuracy"] == 0.5


def test_threshold_free_figures_by_hand():
    # two classes: of the 3 x 1 (negative, positive) pairs, the positive (0.7) outranks 0.1 and 0.2, not 0.8
    y = np.array([0, 0, 0, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.3, 0.7]])
    assert macro_auc(y, p) == pytest.approx(2 / 3)
    # each class weighs the same: mean(-log 0.9, -log 0.2, -log 0.8) and -log 0.7, averaged
    by_hand = (np.mean(-np.log([0.9, 0.2, 0.8])) + -np.log(0.7)) / 2
    assert balanced_log_loss(y, p) == pytest.approx(by_hand)
    # three classes: one-vs-rest per class, averaged. Class 0 (0.7 and 0.5 against 0.1, 0.1, 0.5): 5.5 of 6 pairs
    # (a tie counts half); class 1 (0.8 against the rest): 1; class 2 (0.6 and 0.4 against 0.1, 0.1, 0.45): 5 of 6
    y3 = np.array([0, 1, 2, 2, 0])
    p3 = np.array([[.7, .2, .1], [.1, .8, .1], [.1, .3, .6], [.5, .1, .4], [.5, .05, .45]])
    assert macro_auc(y3, p3) == pytest.approx((11 / 12 + 1 + 5 / 6) / 3)
    # a moved probability moves the figure; balanced accuracy at argmax would not see it
    sharper = p.copy()
    sharper[3] = [0.1, 0.9]
    assert balanced_log_loss(y, sharper) < balanced_log_loss(y, p)
    assert np.isnan(macro_auc(np.zeros(3, dtype=int), p[:3]))


def test_the_test_figures_interval_is_a_stratified_bootstrap_of_the_images():
    # 279 majority and 21 minority images, as in the second reference project's test split; 15 of 21 found
    labels = np.array([0] * 279 + [1] * 21)
    pred = labels.copy()
    pred[:14] = 1          # 14 majority images called minority
    pred[279:285] = 0      # 6 minority images missed
    probs = np.eye(2)[pred]
    full = compute_metrics(labels, probs, ["majority", "minority"], full=True)
    lo, hi = full["balanced_accuracy_interval"]
    assert full["balanced_accuracy"] == pytest.approx((265 / 279 + 15 / 21) / 2)
    # brute force: resample the images of each class, recompute balanced accuracy
    rng = np.random.default_rng(1)
    draws = []
    for _ in range(4000):
        idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), (labels == c).sum()) for c in (0, 1)])
        right, truth = pred[idx] == labels[idx], labels[idx]
        draws.append((right[truth == 0].mean() + right[truth == 1].mean()) / 2)
    assert lo == pytest.approx(np.quantile(draws, 0.025), abs=0.01)
    assert hi == pytest.approx(np.quantile(draws, 0.975), abs=0.01)
    assert hi - lo > 0.15  # 21 rare images: the figure alone hides about ten points either way
    assert "(95% interval" in format_metrics(full, ["majority", "minority"])
    assert full["auc"] == pytest.approx(macro_auc(labels, probs)) and "balanced_log_loss" in full
    assert balanced_accuracy_ci([[10, 0], [0, 10]]) == [1.0, 1.0]
    assert "balanced_accuracy_interval" not in compute_metrics(labels, probs, ["majority", "minority"])


def test_calibration_shift_by_hand():
    """A refit sharper than its fold students: at their threshold it calls fewer images class 1."""
    def two(p1):
        p1 = np.asarray(p1, dtype=float)
        return np.stack([1 - p1, p1], axis=1)
    folds = [two([0.1, 0.3, 0.45, 0.6, 0.9]), two([0.2, 0.35, 0.5, 0.55, 0.8])]
    refit = two([0.01, 0.05, 0.2, 0.35, 0.99])
    c = calibration_shift(refit, folds, threshold=0.4)
    assert c["images"] == 5 and c["models_tuned_on"] == 2 and c["threshold"] == 0.4
    assert c["called_class_1_tuned_on"] == pytest.approx((3 / 5 + 3 / 5) / 2)
    assert c["called_class_1_shipped"] == pytest.approx(1 / 5)
    assert c["median_p1_tuned_on"] == pytest.approx((0.45 + 0.5) / 2) and c["median_p1_shipped"] == pytest.approx(0.2)
