"""Cross-validated distillation: K students, one per fold, trained in lockstep, judged on pooled out-of-fold
predictions.

The train and validation splits are pooled and cut into K stratified folds (seeded; identical images stay
in one fold); the test split is left alone. Fold f's student trains on the other folds with the logits of
a teacher fine-tuned on those folds only (a teacher that saw fold f would leak its labels into the student
through its logits), and predicts fold f. After every epoch the K students' predictions of their own
folds are pooled, so every pooled image is judged once, by a student that never trained on it, and the
pooled figure (under `kd.selection`'s one decision rule) is what a search ranks and stops trials by.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from kd.config import Config
from kd.data import Dataset, Split
from kd.distill import new_student, student_loss
from kd.errors import DataError
from kd.selection import decision_rule, fold_ids, held_out_metrics
from kd.train import COMPLETED, DIVERGED, ReportFn, Training

TRAIN_KEYS = ("train_loss", "train_task_loss", "train_kd_loss", "train_accuracy", "lr")


@dataclass
class Folds:
    """K folds of the pooled train + validation images."""
    ids: np.ndarray                # the fold of each pooled image (train images first, then validation)
    labels: np.ndarray             # the pooled labels
    datasets: list[Dataset]        # per fold: train = the other folds, val = this fold, test = the test split

    @property
    def k(self) -> int:
        return len(self.datasets)


def pooled(data: Dataset) -> Split:
    """Train and validation as one split (train first)."""
    a, b = data.train, data.val
    images = torch.cat([a.images, b.images]) if a.images is not None and b.images is not None else None
    return Split(torch.cat([a.labels, b.labels]), a.paths + b.paths, a.hashes + b.hashes, images)


def _derived(fingerprint: str, *parts: Any) -> str:
    """The content address of a dataset made from another: a fold, or the refit pool."""
    return hashlib.sha256(repr((fingerprint, *parts)).encode()).hexdigest()[:24]


def make_folds(data: Dataset, k: int, seed: int) -> Folds:
    pool = pooled(data)
    labels = pool.labels.numpy()
    counts = np.bincount(labels, minlength=len(data.classes))
    if counts.min() < k:
        rare = data.classes[int(counts.argmin())]
        raise DataError(f"search.folds is {k} but class '{rare}' has only {counts.min()} images in train + val: "
                        f"every fold needs one of each class (lower search.folds)")
    ids = fold_ids(labels, pool.hashes, k, seed)
    datasets = [replace(data, train=pool.subset(np.flatnonzero(ids != f)), val=pool.subset(np.flatnonzero(ids == f)),
                        fingerprint=_derived(data.fingerprint, "fold", f, k, seed)) for f in range(k)]
    return Folds(ids, labels, datasets)


def refit_data(data: Dataset) -> Dataset:
    """All of train + validation to train on, no validation split: the final student (and its teacher)."""
    pool = pooled(data)
    return replace(data, train=pool, val=pool.subset(np.zeros(0, dtype=np.int64)),
                   fingerprint=_derived(data.fingerprint, "refit"))


@dataclass
class CrossValResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = COMPLETED
    oof_probs: np.ndarray | None = None   # the last epoch's pooled out-of-fold probabilities


def cross_validate(cfg: Config, folds: Folds, logits: list[torch.Tensor], report: ReportFn | None = None,
                   resume: dict[str, Any] | None = None) -> CrossValResult:
    """Train K students in lockstep; after each epoch, report the pooled out-of-fold metrics (and the spread across
    folds) with a state that resumes all K."""
    trainings = []
    for f, data in enumerate(folds.datasets):  # every fold's student starts from the same seeded weights
        model = new_student(cfg, len(data.classes))
        trainings.append(Training(model, cfg.train, data, student_loss(cfg, data), cfg.augment,
                                  teacher_logits=logits[f],
                                  balanced_sampling=cfg.imbalance.method == "balanced_sampling",
                                  resume=resume["folds"][f] if resume else None, progress=False))
    result = CrossValResult(list(resume["history"]) if resume else [])
    classes = folds.datasets[0].classes
    rule = decision_rule(len(classes), cfg.train.tune_threshold)

    def state() -> dict[str, Any]:
        oof = torch.from_numpy(result.oof_probs.astype(np.float32)) if result.oof_probs is not None else None
        return {"folds": [t.state() for t in trainings], "history": list(result.history),
                "epoch": len(result.history), "oof_probs": oof}

    while len(result.history) < cfg.train.epochs:
        rows = [t.train_epoch() for t in trainings]
        row: dict[str, Any] = {"epoch": rows[0]["epoch"],
                               **{k: float(np.mean([r[k] for r in rows])) for k in TRAIN_KEYS},
                               "epoch_time": float(sum(r["epoch_time"] for r in rows))}
        if any(r.get("status") == DIVERGED for r in rows):
            result.status = row["status"] = DIVERGED
        else:
            oof = _pooled_probs(folds, trainings, len(classes))
            row.update(held_out_metrics(folds.labels, oof, classes, folds.ids, rule, folds=folds.ids))
            result.oof_probs = oof
        for t, r in zip(trainings, rows, strict=False):
            t.record(r)
        result.history.append(row)
        if report:
            report(row, state)
        if result.status == DIVERGED:
            break
    if result.status == COMPLETED and result.oof_probs is None:  # resumed after the last epoch
        result.oof_probs = _pooled_probs(folds, trainings, len(classes))
    for t in trainings:
        t.close()
    return result


def _pooled_probs(folds: Folds, trainings: list[Training], num_classes: int) -> np.ndarray:
    oof = np.zeros((len(folds.labels), num_classes))
    for f, t in enumerate(trainings):
        oof[folds.ids == f] = t.val_probs()
    return oof

