import functools

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


@pytest.mark.parametrize("classes", [2, 4])
def test_the_auc_is_scikit_learns(classes):
    """macro_auc counts ranked pairs itself (scikit-learn's input checks cost twenty times the count): the same
    figure as roc_auc_score, one class against the rest, on probabilities with ties and a rare class."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(classes)
    for _ in range(50):
        labels = rng.choice(classes, size=int(rng.integers(10, 200)), p=[0.7] + [0.3 / (classes - 1)] * (classes - 1))
        if len(np.unique(labels)) < classes:
            continue
        probs = np.round(rng.dirichlet(np.ones(classes), len(labels)), int(rng.integers(1, 4)))  # ties
        expected = (roc_auc_score(labels, probs[:, 1]) if classes == 2 else
                    np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(classes)]))
        assert macro_auc(labels, probs) == pytest.approx(expected, abs=1e-12)


def wilson_cc(found: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Newcombe's (1998) closed form of the continuity-corrected Wilson interval, written out by hand."""
    p, q = found / n, 1 - found / n
    low = (2 * n * p + z * z - 1 - z * np.sqrt(z * z - 2 - 1 / n + 4 * p * (n * q + 1))) / (2 * (n + z * z))
    high = (2 * n * p + z * z + 1 + z * np.sqrt(z * z + 2 - 1 / n + 4 * p * (n * q - 1))) / (2 * (n + z * z))
    return (0.0 if found == 0 else low), (1.0 if found == n else high)


def test_the_test_figures_interval_combines_each_classs_score_interval():
    # 279 majority and 21 minority images, as in the second reference project's test split; 15 of 21 found
    labels = np.array([0] * 279 + [1] * 21)
    pred = labels.copy()
    pred[:14] = 1          # 14 majority images called minority
    pred[279:285] = 0      # 6 minority images missed
    probs = np.eye(2)[pred]
    full = compute_metrics(labels, probs, ["majority", "minority"], full=True)
    lo, hi = full["balanced_accuracy_interval"]
    recalls = np.array([265 / 279, 15 / 21])
    assert full["balanced_accuracy"] == pytest.approx(recalls.mean())
    # by hand: MOVER, each side of the mean from how far that side of each class's interval lies from its recall
    (l0, h0), (l1, h1) = wilson_cc(265, 279), wilson_cc(15, 21)
    assert lo == pytest.approx(recalls.mean() - np.hypot(recalls[0] - l0, recalls[1] - l1) / 2, abs=1e-9)
    assert hi == pytest.approx(recalls.mean() + np.hypot(h0 - recalls[0], h1 - recalls[1]) / 2, abs=1e-9)
    assert hi - lo > 0.15  # 21 rare images: the figure alone hides about ten points either way
    assert "(95% interval" in format_metrics(full, ["majority", "minority"])
    assert full["auc"] == pytest.approx(macro_auc(labels, probs)) and "balanced_log_loss" in full
    assert "balanced_accuracy_interval" not in compute_metrics(labels, probs, ["majority", "minority"])


def test_the_interval_moves_at_the_edges():
    """A model that calls all 25 test images the majority (5 rare): balanced accuracy 0.5, and 5 images cannot pin
    the rare recall at 0, so the interval is no point (a percentile bootstrap gave 0.500-0.500). Perfect on 10 and
    10 images is no proof of perfection either."""
    lo, hi = balanced_accuracy_ci([[20, 0], [5, 0]])
    assert lo < 0.5 < hi and hi - 0.5 > 0.2  # the rare recall alone: 0 to about 0.54
    lo, hi = balanced_accuracy_ci([[10, 0], [0, 10]])
    assert hi == 1.0 and 0.7 < lo < 0.85
    lo, hi = balanced_accuracy_ci([[2790, 0], [0, 2100]])  # thousands of images: a narrow interval, still not a point
    assert 0.998 < lo < 1.0 == hi


@pytest.mark.parametrize("rare", [5, 20, 50])
def test_the_intervals_coverage_holds_from_recall_0_to_1(rare):
    """The test figure drawn as the flow draws it: each test image of a class found with that class's true recall,
    independently (a fixed model on freshly drawn test images), the confusion matrix counted, its interval taken.
    Over true rare recalls 0 to 1 and majority recalls 0.5 to 1 (279 majority images, as in the second reference
    project), the interval holds the true balanced accuracy at least 93% of the time in every cell."""
    rng = np.random.default_rng(rare)
    reps, common = 2000, 279
    interval = functools.cache(lambda found_common, found_rare: tuple(balanced_accuracy_ci(
        [[found_common, common - found_common], [rare - found_rare, found_rare]])))
    worst = []
    for r_common in (0.5, 0.9, 0.98, 1.0):
        for r_rare in np.linspace(0, 1, 11):
            found = zip(rng.binomial(common, r_common, reps), rng.binomial(rare, r_rare, reps), strict=True)
            truth = (r_common + r_rare) / 2
            bounds = np.array([interval(int(c), int(r)) for c, r in found])
            coverage = np.mean((bounds[:, 0] <= truth + 1e-12) & (truth <= bounds[:, 1] + 1e-12))
            worst.append((coverage, r_common, r_rare))
    assert min(worst)[0] >= 0.93, sorted(worst)[:3]


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


def test_the_closed_form_score_interval_is_scipys_on_whole_counts():
    from scipy.stats import binomtest

    from kd.metrics import wilson_cc as closed_form
    for found, n in ((0, 5), (3, 5), (5, 5), (15, 21), (265, 279), (1, 2)):
        ci = binomtest(found, n).proportion_ci(0.95, "wilsoncc")
        assert closed_form(found, n, 1.959963984540054) == pytest.approx((ci.low, ci.high), abs=1e-9)


def subjects_drawn(rng, sizes, recalls, icc):
    """Test images that come in subjects (one patient's scans): each subject's own chance of being read right is
    drawn around its class's recall (a beta with intra-subject correlation `icc`), its images read with it."""
    labels, right, groups = [], [], []
    for c, ((count, per), recall) in enumerate(zip(sizes, recalls, strict=True)):
        if 0 < recall < 1:
            own = rng.beta(recall * (1 - icc) / icc, (1 - recall) * (1 - icc) / icc, count)
        else:
            own = np.full(count, recall)
        right.append((rng.random((count, per)) < own[:, None]).ravel())
        labels.append(np.full(count * per, c))
        groups.append(np.repeat(np.arange(count) + 1000 * c, per))
    labels, right, groups = np.concatenate(labels), np.concatenate(right), np.concatenate(groups)
    return labels, np.where(right, labels, 1 - labels), groups


@pytest.mark.parametrize("rare", [(5, 4), (10, 5)])
def test_with_subjects_the_interval_counts_subjects_and_holds_its_coverage(rare):
    """90 majority patients with 3 scans each and 5 (or 10) rare patients with 4 (or 5): one patient's scans are
    read alike (intra-subject correlation 0.3). Counting scans as independent, the interval held the truth about
    80% of the time where recalls are middling (measured with 10 rare patients, 300 draws a cell: 79% at a rare
    recall of 0.7); counting subjects it holds at least 93% in every cell, and it is wider."""
    from kd.metrics import grouped_balanced_accuracy_ci
    rng = np.random.default_rng(rare[0])
    reps, worst, naive, wider = 300, [], [], []
    plain = functools.cache(lambda cm: tuple(balanced_accuracy_ci(cm)))  # scipy's interval is the slow part
    for r_common in (0.9, 1.0):
        for r_rare in np.linspace(0, 1, 6):
            truth, held, held_naive = (r_common + r_rare) / 2, 0, 0
            for _ in range(reps):
                labels, pred, groups = subjects_drawn(rng, [(90, 3), rare], [r_common, r_rare], 0.3)
                lo, hi = grouped_balanced_accuracy_ci(labels, pred, groups)
                held += lo <= truth + 1e-12 <= hi + 2e-12
                nlo, nhi = plain(tuple(tuple(int(np.sum((labels == c) & (pred == d))) for d in (0, 1))
                                       for c in (0, 1)))
                held_naive += nlo <= truth + 1e-12 <= nhi + 2e-12
                wider.append(hi - lo >= nhi - nlo - 1e-12)
            worst.append((held / reps, r_common, r_rare))
            naive.append(held_naive / reps)
    assert min(worst)[0] >= 0.93, sorted(worst)[:3]
    assert min(naive) < 0.9 and np.mean(wider) > 0.95
    labels, pred, _ = subjects_drawn(rng, [(90, 3), rare], [0.9, 0.5], 0.3)
    alone = np.arange(len(labels))  # every image its own subject: the plain interval, exactly
    assert grouped_balanced_accuracy_ci(labels, pred, alone) == pytest.approx(balanced_accuracy_ci(
        [[np.sum((labels == c) & (pred == d)) for d in (0, 1)] for c in (0, 1)]))
