"""Classification metrics for imbalanced data, and the binary decision threshold tuned on validation."""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats
from scipy.stats import binomtest
from sklearn.metrics import classification_report, confusion_matrix, f1_score, log_loss


def predict(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class indices: argmax, or for two classes `p(class 1) >= threshold` when a threshold is given."""
    probs = np.asarray(probs)
    if threshold is not None and probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def calibration_shift(shipped: np.ndarray, tuned_on: list[np.ndarray], threshold: float) -> dict[str, Any]:
    """How far a shipped model's p(class 1) lies from that of the models whose predictions its threshold was tuned on,
    on the same images (their labels unused): the share each calls class 1 at `threshold`, and the median p(class 1).
    A refit that is sharper than the fold students, or whose minority logit moved, calls fewer (or more) images
    class 1 at their threshold: balanced accuracy pays for it, and no held-out figure of the refit can show it."""
    members = [float(np.mean(p[:, 1] >= threshold)) for p in tuned_on]
    return {"images": len(shipped), "threshold": float(threshold),
            "called_class_1_shipped": float(np.mean(shipped[:, 1] >= threshold)),
            "called_class_1_tuned_on": float(np.mean(members)),
            "median_p1_shipped": float(np.median(shipped[:, 1])),
            "median_p1_tuned_on": float(np.mean([np.median(p[:, 1]) for p in tuned_on])),
            "models_tuned_on": len(tuned_on)}


def compute_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str],
                    threshold: float | None = None, full: bool = False,
                    groups: np.ndarray | list[str] | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over the classes present), macro F1, recall per class, confusion;
    `full` (a test split's report) adds balanced accuracy's 95% interval (`balanced_accuracy_interval`:
    balanced_accuracy_ci, or with `groups`, each image's subject, grouped_balanced_accuracy_ci) and the
    threshold-free `auc` and `balanced_log_loss` of the probabilities."""
    labels = np.asarray(labels, dtype=np.int64)
    pred = predict(probs, threshold)
    k = len(classes)
    subjects = subject_codes(groups) if full else None
    cm = confusion_matrix(labels, pred, labels=list(range(k)))
    support = cm.sum(axis=1)
    recall = np.divide(np.diag(cm), support, out=np.zeros(k), where=support > 0)
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if support.any() else 0.0,
        "macro_f1": float(f1_score(labels, pred, labels=list(range(k)), average="macro", zero_division=0)),
        "recall": {c: float(r) for c, r in zip(classes, recall, strict=True)},
        "confusion_matrix": cm.tolist(),
        "n": len(labels),
        "threshold": threshold,
        **({"balanced_accuracy_interval": grouped_balanced_accuracy_ci(labels, pred, subjects)
            if subjects is not None else balanced_accuracy_ci(cm),
            **({"subjects": int(subjects.max()) + 1} if subjects is not None else {}),
            "auc": macro_auc(labels, probs),
            "balanced_log_loss": balanced_log_loss(labels, probs)} if full else {}),
    }


INTERVAL_METHOD = "per-class Wilson score intervals (continuity-corrected), combined"


def balanced_accuracy_ci(confusion: np.ndarray | list[list[int]], level: float = 0.95) -> list[float]:
    """The `level` interval of balanced accuracy (the mean of the per-class recalls) from each class's Wilson score
    interval with continuity correction (scipy), combined by MOVER (Zou and Donner 2008): the bounds of a mean of
    independent proportions, each side from how far that side of every class's interval lies from its recall.

    A score interval moves at the edges, where a bootstrap cannot: 0 of 5 rare images found gives a recall interval
    of 0 to 0.54, not 0 to 0. Its coverage, simulated as the test figure is drawn (tests/test_metrics.py): at least
    95% at 5, 20 and 50 rare images with true recalls from 0 to 1 (the plain Wilson interval dips to 92%)."""
    cm = np.asarray(confusion, dtype=np.int64)
    support, right = cm.sum(axis=1), np.diag(cm)
    present = np.flatnonzero(support > 0)
    if not len(present):
        return [0.0, 0.0]
    recall = right[present] / support[present]
    bounds = np.array([binomtest(int(right[c]), int(support[c])).proportion_ci(level, "wilsoncc") for c in present],
                      dtype=np.float64)
    return _mover(recall, bounds)


def _mover(recall: np.ndarray, bounds: np.ndarray) -> list[float]:
    """The interval of the mean of independent proportions from each one's interval (MOVER, Zou and Donner 2008)."""
    k, mean = len(recall), float(recall.mean())
    low = mean - float(np.sqrt(np.sum((recall - bounds[:, 0]) ** 2))) / k
    high = mean + float(np.sqrt(np.sum((bounds[:, 1] - recall) ** 2))) / k
    return [max(0.0, low), min(1.0, high)]


def subject_codes(groups: np.ndarray | list[str] | None) -> np.ndarray | None:
    """Each image's subject as an integer code where some subject has several images; None where every image is
    its own (nothing to keep together)."""
    if groups is None:
        return None
    names, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64) if len(names) < len(groups) else None


def wilson_cc(found: float, n: float, z: float) -> tuple[float, float]:
    """The continuity-corrected Wilson score interval of found / n in Newcombe's (1998) closed form, which also
    takes the effective (non-integer) counts of a clustered sample; scipy's own for whole counts agrees
    (tests/test_metrics.py)."""
    p = found / n
    q = 1 - p
    low = (2 * n * p + z * z - 1 - z * np.sqrt(max(0.0, z * z - 2 - 1 / n + 4 * p * (n * q + 1)))) / (2 * (n + z * z))
    high = (2 * n * p + z * z + 1 + z * np.sqrt(max(0.0, z * z + 2 - 1 / n + 4 * p * (n * q - 1)))) / (2 * (n + z * z))
    return (0.0 if p <= 0 else max(0.0, float(low))), (1.0 if p >= 1 else min(1.0, float(high)))


def effective_count(right: np.ndarray, groups: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """One class's images found and in all, each shrunk by the design effect of their subjects (Kish): the variance
    of the recall when whole subjects are resampled against that of independent images, with Korn and Graubard's
    (1998) correction for few subjects (the t quantile on subjects - 1 degrees of freedom in place of z). Where
    every image was found or every one missed there is no spread to measure, and each subject counts as its
    images standing or falling together (the design effect of a perfect correlation, the mean subject size)."""
    n = len(right)
    _, subject = np.unique(groups, return_inverse=True)
    g = int(subject.max()) + 1 if n else 0
    found = float(np.sum(right))
    if g >= n:
        return found, float(n)
    p = found / n
    if g < 2:
        deff = float(n)  # one subject: one observation
    elif 0 < p < 1:
        sizes, hits = np.bincount(subject), np.bincount(subject, weights=right.astype(np.float64))
        var = g / (g - 1) * float(np.sum((hits - p * sizes) ** 2)) / n**2
        deff = max(1.0, var / (p * (1 - p) / n))
    else:
        deff = n / g
    tail = (1 + level) / 2
    few = (stats.norm.ppf(tail) / stats.t.ppf(tail, max(g - 1, 1))) ** 2
    n_eff = n / deff * few
    return p * n_eff, n_eff


def grouped_balanced_accuracy_ci(labels: np.ndarray, pred: np.ndarray, groups: np.ndarray | list[str],
                                 level: float = 0.95) -> list[float]:
    """balanced_accuracy_ci where images come in subjects (`data.groups`: one patient's scans): one patient's images
    are not independent evidence of a recall, so each class's score interval is taken on its effective counts
    (effective_count) and the classes combined by MOVER. Coverage simulated with subjects whose own recalls vary
    (tests/test_metrics.py)."""
    labels, right = np.asarray(labels), np.asarray(pred) == np.asarray(labels)
    groups = np.asarray(groups)
    present = np.unique(labels)
    z = float(stats.norm.ppf((1 + level) / 2))
    counts = [effective_count(right[labels == c], groups[labels == c], level) for c in present]
    recall = np.array([right[labels == c].mean() for c in present])
    return _mover(recall, np.array([wilson_cc(x, n, z) for x, n in counts], dtype=np.float64))


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """The area under the ROC curve, one class against the rest, averaged over the classes present (for two
    classes: that of p(class 1)). Needs no threshold: it asks only whether the images of each class are ranked
    above the others. NaN where fewer than two classes are present."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    present = np.unique(labels)
    if len(present) < 2 or not np.isfinite(probs).all():  # NaN probabilities (a diverging model): no figure
        return float("nan")
    if probs.shape[1] == 2:
        return _auc(labels == 1, probs[:, 1])
    return float(np.mean([_auc(labels == c, probs[:, c]) for c in present]))


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """The area under the ROC curve of `score` for the images where `positive` holds: the Mann-Whitney statistic,
    the share of (positive, negative) pairs ranked the right way, ties counted half. Equal to scikit-learn's
    roc_auc_score (tests/test_metrics.py), at a twentieth of its cost per call: its input checks dominate on a few
    hundred images, and every trial's epoch, each judging half and the verdict's simulations call this."""
    negatives = np.sort(score[~positive])
    below = np.searchsorted(negatives, score[positive], side="left")  # negatives under each positive
    level = np.searchsorted(negatives, score[positive], side="right") - below  # and tied with it
    return float((below.sum() + level.sum() / 2) / (len(below) * len(negatives)))


def balanced_log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """The log-loss of the true class with each class weighted equally: the mean over the classes present of
    their images' mean -log p(true class). Lower is better; 0 for certain and right."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    if not len(labels) or not np.isfinite(probs).all():
        return float("nan")
    weights = 1.0 / np.bincount(labels)[labels]
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only up to rounding
    return float(log_loss(labels, probs, sample_weight=weights, labels=list(range(probs.shape[1]))))


def flatten(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """Scalars for reporting: {prefix_accuracy, prefix_balanced_accuracy, prefix_macro_f1, prefix_recall_<class>}
    (and prefix_auc, prefix_balanced_log_loss where the metrics have them)."""
    out = {f"{prefix}_{k}": metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc",
                                                 "balanced_log_loss") if k in metrics}
    out.update({f"{prefix}_recall_{c}": r for c, r in metrics["recall"].items()})
    return out


def scalars(row: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a history row (what a search records of an epoch), plus its status where it has one."""
    return {k: v for k, v in row.items() if (isinstance(v, (int, float)) and not isinstance(v, bool)) or k == "status"}


def tune_threshold(labels: np.ndarray, p_positive: np.ndarray) -> float:
    """The threshold on p(class 1) that maximises balanced accuracy; ties go to the one nearest 0.5.

    The post-hoc form of logit adjustment for binary tasks. Pick it on validation, never on test.
    """
    labels = np.asarray(labels)
    p = np.asarray(p_positive, dtype=np.float64)
    pos, neg = np.sort(p[labels == 1]), np.sort(p[labels == 0])
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    u = np.unique(p)
    candidates = np.concatenate([[0.5], (u[:-1] + u[1:]) / 2, [u[0] / 2, (u[-1] + 1) / 2]])
    tpr = 1.0 - np.searchsorted(pos, candidates, side="left") / len(pos)
    tnr = np.searchsorted(neg, candidates, side="left") / len(neg)
    score = (tpr + tnr) / 2
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def report_text(labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float | None = None) -> str:
    """scikit-learn's classification report."""
    return classification_report(labels, predict(probs, threshold), labels=list(range(len(classes))),
                                 target_names=classes, digits=3, zero_division=0)


def format_metrics(metrics: dict[str, Any], classes: list[str], title: str = "") -> str:
    """A small plain-text table: the headline metrics, recall per class and the confusion matrix."""
    lines = [title] if title else []
    lines.append(f"  accuracy           {metrics['accuracy']:.4f}")
    lines.append(f"  balanced accuracy  {metrics['balanced_accuracy']:.4f}" + interval_text(metrics))
    lines.append(f"  macro F1           {metrics['macro_f1']:.4f}")
    for c in classes:
        lines.append(f"  recall {c:<11.11s} {metrics['recall'][c]:.4f}")
    if metrics.get("threshold") is not None:
        lines.append(f"  threshold          {metrics['threshold']:.4f}  (p({classes[1]}) >= threshold)")
    width = max(max(len(c) for c in classes), *(len(str(v)) for row in metrics["confusion_matrix"] for v in row)) + 2
    lines.append("  confusion matrix (rows: true, columns: predicted)")
    lines.append("  " + " " * width + "".join(f"{c:>{width}}" for c in classes))
    for c, row in zip(classes, metrics["confusion_matrix"], strict=True):
        lines.append("  " + f"{c:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def interval_text(metrics: dict[str, Any]) -> str:
    """` (95% interval 0.871-0.952)` where the metrics carry balanced accuracy's interval, else nothing."""
    lo_hi = metrics.get("balanced_accuracy_interval")
    if not lo_hi:
        return ""
    over = f" over its {metrics['subjects']} subjects" if metrics.get("subjects") else ""
    return f" (95% interval {lo_hi[0]:.3f}-{lo_hi[1]:.3f}, from each class's score interval{over})"


def mean_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each figure over several evaluations (per-class recall included, counts summed)."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in runs])) for k in ("accuracy", "balanced_accuracy",
                                                                             "macro_f1")}
    out["recall"] = {c: float(np.mean([r["recall"][c] for r in runs])) for c in runs[0]["recall"]}
    out["confusion_matrix"] = np.sum([r["confusion_matrix"] for r in runs], axis=0).tolist()
    out["n"] = int(sum(r["n"] for r in runs))
    return out
