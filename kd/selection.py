"""Honest selection on small data: cross-validation folds and the one decision rule that is ranked and shipped.

On the datasets this tool exists for, validation holds a handful of rare images: one image moves balanced
accuracy by several points, and a threshold tuned on the images it is then scored on flatters every trial.
So a trial is judged by the rule its exported model will use, on predictions of images that did not choose
that rule:

- more than two classes: argmax;
- two classes: a threshold on p(class 1), cross-fitted. The held-out predictions are cut into parts (the
  folds with `search.folds` >= 2; two stratified halves of the validation split with a holdout); each part
  is judged with the threshold tuned on the other parts, so no image votes for the threshold that judges it.
  The exported model ships the threshold tuned on all held-out predictions, whose quality this estimates.

Metrics under the rule are reported as `val_*`; `val_balanced_accuracy_argmax` sits beside them for two
classes. With folds, `val_balanced_accuracy_fold_mean` and `_fold_std` give the spread across folds. Two figures
need no rule at all, as they judge the probabilities themselves: `val_auc` (one-vs-rest, averaged over the classes)
and `val_balanced_log_loss` (the log-loss with each class weighted equally; lower is better). One rare image moves
balanced accuracy by a whole step; these move by how far its probability moved, so they separate two students
with less noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from kd.errors import ConfigError
from kd.metrics import balanced_log_loss, compute_metrics, flatten, macro_auc, tune_threshold

THRESHOLD, ARGMAX = "threshold", "argmax"


def decision_rule(num_classes: int, tune: bool = True) -> str:
    """`threshold` (two classes, when thresholds are tuned) or `argmax`."""
    return THRESHOLD if num_classes == 2 and tune else ARGMAX


def rule_text(rule: str, where: str) -> str:
    """How a table or plot names the figure it shows; `where` names the held-out images (kd.schemes)."""
    how = "threshold on p(class 1) cross-fitted (each part judged by a threshold tuned on the others)" \
        if rule == THRESHOLD else "argmax"
    return f"{how}, on {where}"


def rule_label(rule: str, where: str) -> str:
    """The short form, for a table column or a plot's axis: `cross-fitted threshold, 5-fold out-of-fold`."""
    how = "cross-fitted threshold" if rule == THRESHOLD else "argmax"
    return f"{how}, {where}"


def fold_ids(labels: np.ndarray, groups: list[str] | None, k: int, seed: int) -> np.ndarray:
    """A fold number 0..k-1 per sample: stratified by class, seeded, identical images (same group) together."""
    labels = np.asarray(labels)
    x = np.zeros(len(labels))
    if groups is not None and len(set(groups)) < len(groups):
        splitter: Any = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(x, labels, groups)
    else:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, labels)
    out = np.empty(len(labels), dtype=np.int64)
    for fold, (_, held) in enumerate(splits):
        out[held] = fold
    return out


def validation_parts(labels: np.ndarray, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Two stratified halves of held-out images (0/1 per sample): the parts a holdout cross-fits over, the halves the
    re-ranking judges on. With `groups` (each image's subject), a subject's images stay in one half."""
    labels = np.asarray(labels)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    if len(np.unique(labels)) < 2 or counts[counts > 0].min() < 2:
        return np.arange(len(labels)) % 2  # a class with a single image: no stratified halves exist
    if groups is not None and len(np.unique(groups)) < 2:
        return np.arange(len(labels)) % 2  # one subject: no halves can keep it whole
    return fold_ids(labels, None if groups is None else list(groups), 2, seed)


def cross_fitted_predictions(labels: np.ndarray, probs: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """Class predictions where the samples of each part are thresholded by a threshold tuned on the other parts."""
    labels, probs, parts = np.asarray(labels), np.asarray(probs), np.asarray(parts)
    pred = np.empty(len(labels), dtype=np.int64)
    for part in np.unique(parts):
        mine = parts == part
        threshold = tune_threshold(labels[~mine], probs[~mine, 1]) if (~mine).any() else 0.5
        pred[mine] = (probs[mine, 1] >= threshold).astype(np.int64)
    return pred


def held_out_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], parts: np.ndarray, rule: str,
                     folds: np.ndarray | None = None) -> dict[str, Any]:
    """Flat `val_*` metrics of held-out predictions under `rule`, plus the threshold the export would ship.

    `parts` are what a threshold is cross-fitted over; `folds` (cross-validation only) give the spread of balanced
    accuracy across folds.
    """
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs)
    out: dict[str, Any] = {}
    if rule == THRESHOLD:
        pred = cross_fitted_predictions(labels, probs, parts)
        metrics = compute_metrics(labels, np.eye(2)[pred], classes)
        argmax = compute_metrics(labels, probs, classes)
        out["val_balanced_accuracy_argmax"] = argmax["balanced_accuracy"]
        out["threshold"] = tune_threshold(labels, probs[:, 1])
    else:
        pred = probs.argmax(axis=1)
        metrics = compute_metrics(labels, probs, classes)
    out.update(flatten(metrics, "val"))
    out["val_auc"] = macro_auc(labels, probs)
    out["val_balanced_log_loss"] = balanced_log_loss(labels, probs)
    if folds is not None:
        per_fold = [compute_metrics(labels[folds == f], np.eye(len(classes))[pred[folds == f]], classes)
                    ["balanced_accuracy"] for f in np.unique(folds)]
        out["val_balanced_accuracy_fold_mean"] = float(np.mean(per_fold))
        out["val_balanced_accuracy_fold_std"] = float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0
    return out


def check_metric(metric: str, classes: list[str], rule: str, extra: list[str], key: str = "search.metric") -> None:
    """`search.metric` (or another `key` naming a figure) must name a figure this task reports (`extra`: those only
    its scheme reports): refused before anything is trained."""
    names = reported_metrics(classes, rule, extra)
    if metric not in names:
        import difflib
        close = difflib.get_close_matches(metric, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key} '{metric}' is not reported by this search{hint}; it reports: "
                          f"{', '.join(names)}")


def reported_metrics(classes: list[str], rule: str, extra: list[str]) -> list[str]:
    """Every held-out figure a trial of this task reports: what `search.metric` may name (training figures are
    reported too, but selecting on them would select on the images the student trained on)."""
    names = ["val_balanced_accuracy", "val_accuracy", "val_macro_f1", "val_auc", "val_balanced_log_loss",
             *[f"val_recall_{c}" for c in classes]]
    if rule == THRESHOLD:
        names.append("val_balanced_accuracy_argmax")
    return names + extra


# ---- judging one model against another on the same held-out images

# A win is claimed when the difference is above 1.96 standard errors: a one-sided test at 2.5% on paper, because the
# standard error (the images' resampling) leaves out the noise of the tuned threshold and of the seeds. Simulated
# under the null (tests/test_verdict.py: four equal candidates, 300 images, 2 judging seeds) it says "beats" 4% of
# the time for balanced accuracy (at 1.645, a nominal 5% test, it said so 7.7% of the time).
Z_CLAIM = 1.96
Z_POWER_80 = 0.8416  # the extra standard errors a true difference needs to be found 4 times in 5


def image_terms(metric: str, labels: np.ndarray, probs: np.ndarray, parts: np.ndarray,
                rule: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Weights w and per-image values v with figure = sum(w * v), equal weights within a class, for the figures
    that are such a sum (balanced accuracy and accuracy under `rule`, the balanced log-loss); None for the others
    (AUC, macro F1, a class's recall, the spread across folds)."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    counts = np.bincount(labels, minlength=probs.shape[1])
    balanced = 1.0 / (np.count_nonzero(counts) * counts[labels])
    if metric == "val_balanced_log_loss":
        p = probs[np.arange(len(labels)), labels] / probs.sum(axis=1)
        return balanced, -np.log(np.clip(p, 1e-15, 1.0))
    argmax = metric == "val_balanced_accuracy_argmax" or rule != THRESHOLD
    pred = probs.argmax(axis=1) if argmax else cross_fitted_predictions(labels, probs, parts)
    right = (pred == labels).astype(np.float64)
    if metric in ("val_balanced_accuracy", "val_balanced_accuracy_argmax"):
        return balanced, right
    if metric == "val_accuracy":
        return np.full(len(labels), 1.0 / len(labels)), right
    return None


@dataclass(frozen=True)
class Difference:
    """A paired difference of one figure between two models on the same images, in the better direction."""
    mean: float
    standard_error: float   # of a resampling of the images by class (NaN: a class of one image)
    seeds: int

    @property
    def lower(self) -> float:
        """The 97.5% lower bound: a win is claimed when it is above 0."""
        return self.mean - Z_CLAIM * self.standard_error

    @property
    def detectable(self) -> float:
        """The smallest true difference this noise finds 4 times in 5."""
        return (Z_CLAIM + Z_POWER_80) * self.standard_error

    @property
    def beats(self) -> bool:
        return bool(self.lower > 0)


def paired_difference(metric: str, held: Any, a: list[np.ndarray], b: list[np.ndarray], sign: int,
                      seed: int = 0, reps: int = 400) -> Difference:
    """How much better model `a` is than `b` by `metric` on the held-out images of `held` (kd.train.HeldOut:
    labels, cross-fitting parts, rule), each given as its probabilities from one or more seeds, seed i of `a`
    beside seed i of `b`. The standard error is that of a stratified resampling of the images: for a figure that
    is a sum over images, exactly (the per-image differences averaged over the seeds); for the others, a
    bootstrap of `reps` resamplings (images stratified by class, seeds resampled too). Where `held.groups` says some
    subject has several images, subjects are resampled whole: the standard error is that of a cluster resampling
    (each figure linearised, its per-image terms summed by subject; the bootstrap draws subjects)."""
    labels, parts, rule = np.asarray(held.labels), np.asarray(held.parts), held.rule
    groups = getattr(held, "groups", None)
    pairs = list(zip(a, b, strict=True))
    if not pairs or np.bincount(labels)[np.unique(labels)].min(initial=len(labels)) < 2:
        return Difference(math.nan, math.nan, len(pairs))  # a class of one image: its spread is unknown
    weights, differences = np.zeros(len(labels)), []
    for pa, pb in pairs:
        ta, tb = image_terms(metric, labels, pa, parts, rule), image_terms(metric, labels, pb, parts, rule)
        if ta is None or tb is None:
            break
        weights = ta[0]
        differences.append(ta[1] - tb[1])
    else:  # a sum over images: its variance under a stratified resampling of them, exactly
        d = sign * np.mean(differences, axis=0)
        if groups is not None:  # each class's share moves with the subjects drawn: linearised, by subject
            centred = d.copy()
            for c in np.unique(labels):
                centred[labels == c] -= d[labels == c].mean()
            return Difference(float(np.sum(weights * d)), clustered_error(weights * centred, groups), len(pairs))
        var = sum((labels == c).sum() * weights[labels == c][0] ** 2 * d[labels == c].var(ddof=1)
                  for c in np.unique(labels) if (labels == c).sum() > 1)
        return Difference(float(np.sum(weights * d)), float(math.sqrt(var)), len(pairs))

    if metric == "val_auc" and all(pa.shape[1] == 2 for pa, _ in pairs):  # DeLong's paired test, per image
        return _delong(labels, pairs, sign, groups)
    members = np.asarray(held.member) if getattr(held, "spread", False) else None

    def figure(probs: np.ndarray, idx: np.ndarray) -> float:
        if metric == "val_auc":
            return macro_auc(labels[idx], probs[idx])
        return float(held_out_metrics(labels[idx], probs[idx], list(held.classes), parts[idx], rule,
                                      folds=members[idx] if members is not None else None)[metric])

    everyone = np.arange(len(labels))
    mean = sign * float(np.mean([figure(pa, everyone) - figure(pb, everyone) for pa, pb in pairs]))
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    by_subject = [np.flatnonzero(groups == g) for g in np.unique(groups)] if groups is not None else []
    draws = []
    for _ in range(reps):
        if groups is not None:  # whole subjects, drawn until every class is among their images
            while True:
                idx = np.concatenate([by_subject[i] for i in rng.choice(len(by_subject), len(by_subject))])
                if len(np.unique(labels[idx])) == len(by_class):
                    break
        else:
            idx = np.concatenate([rng.choice(members, len(members)) for members in by_class])
        chosen = rng.choice(len(pairs), len(pairs)) if len(pairs) > 1 else [0]
        draws.append(sign * np.mean([figure(pairs[s][0], idx) - figure(pairs[s][1], idx) for s in chosen]))
    return Difference(mean, float(np.std(draws, ddof=1)), len(pairs))


def _placements(labels: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of the AUC of `score`: for each positive, the share of negatives it outranks
    (ties half); for each negative, the share of positives that outrank it. AUC is the mean of either."""
    pos, neg = score[labels == 1], score[labels == 0]
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    below = np.searchsorted(neg_sorted, pos, side="left")
    tied = np.searchsorted(neg_sorted, pos, side="right") - below
    above = len(pos) - np.searchsorted(pos_sorted, neg, side="right")
    tied_neg = np.searchsorted(pos_sorted, neg, side="right") - np.searchsorted(pos_sorted, neg, side="left")
    return (below + 0.5 * tied) / len(neg), (above + 0.5 * tied_neg) / len(pos)


def _delong(labels: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]], sign: int,
            groups: np.ndarray | None = None) -> Difference:
    """The paired difference of two models' AUC with DeLong's standard error (DeLong et al. 1988): each image's
    structural component, averaged over the seeds, differenced between the models; the variance of a resampling
    of the positives and of the negatives. With `groups`, of a resampling of subjects: each image's share of the
    difference summed by subject (Obuchowski 1997's clustered AUC)."""
    comps = [(_placements(labels, a[:, 1]), _placements(labels, b[:, 1])) for a, b in pairs]
    d_pos = sign * np.mean([ca[0] - cb[0] for ca, cb in comps], axis=0)
    d_neg = sign * np.mean([ca[1] - cb[1] for ca, cb in comps], axis=0)
    if groups is not None:
        share = np.zeros(len(labels))
        share[labels == 1] = (d_pos - d_pos.mean()) / len(d_pos)
        share[labels == 0] = (d_neg - d_neg.mean()) / len(d_neg)
        return Difference(float(d_pos.mean()), clustered_error(share, groups), len(pairs))
    var = d_pos.var(ddof=1) / len(d_pos) + d_neg.var(ddof=1) / len(d_neg)
    return Difference(float(d_pos.mean()), float(math.sqrt(var)), len(pairs))


def clustered_error(terms: np.ndarray, groups: np.ndarray) -> float:
    """The standard error of a figure whose linearised per-image terms (each image's share of its deviation) are
    `terms`, under a resampling of whole subjects (`groups`, per image): the subjects' totals' spread."""
    _, subject = np.unique(groups, return_inverse=True)
    totals = np.bincount(subject, weights=terms)
    g = len(totals)
    return float(math.sqrt(g / (g - 1) * np.sum(totals ** 2))) if g > 1 else math.nan
