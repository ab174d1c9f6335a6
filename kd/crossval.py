"""The folds of cross-validation, and the pool a final student is refitted on.

The train and validation splits are pooled and cut into K stratified folds (seeded; a subject's images, or
identical images, stay in one fold: kd.groups); the test split is left alone. Fold f's dataset trains on the
other folds and validates on fold f; how its students train and are judged is kd.schemes.CrossValidated.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from kd.data import Dataset, Split
from kd.errors import DataError
from kd.metrics import subject_codes
from kd.selection import fold_ids


@dataclass
class Folds:
    """K folds of the pooled train + validation images."""
    ids: np.ndarray                # the fold of each pooled image (train images first, then validation)
    labels: np.ndarray             # the pooled labels
    datasets: list[Dataset]        # per fold: train = the other folds, val = this fold, test = the test split
    groups: np.ndarray | None = None  # each pooled image's subject code where subjects repeat (metrics.subject_codes)


def pooled(data: Dataset) -> Split:
    """Train and validation as one split (train first)."""
    a, b = data.train, data.val
    images = torch.cat([a.images, b.images]) if a.images is not None and b.images is not None else None
    subjects = a.subjects + b.subjects if a.subjects is not None and b.subjects is not None else None
    return Split(torch.cat([a.labels, b.labels]), a.paths + b.paths, a.hashes + b.hashes, images, subjects)


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
    groups = pool.groups()
    for c, name in enumerate(data.classes):  # folds keep a group whole: each needs k groups of every class
        distinct = len({g for g, y in zip(groups, labels, strict=True) if y == c})
        if distinct < k:
            raise DataError(f"search.folds is {k} but class '{name}' has only {distinct} distinct "
                            f"{'subjects (data.groups)' if pool.subjects is not None else 'images'} in train + val: "
                            "every fold needs one of each class (lower search.folds)")
    ids = fold_ids(labels, groups, k, seed)
    datasets = [replace(data, train=pool.subset(np.flatnonzero(ids != f)), val=pool.subset(np.flatnonzero(ids == f)),
                        fingerprint=_derived(data.fingerprint, "fold", f, k, seed)) for f in range(k)]
    return Folds(ids, labels, datasets, subject_codes(groups))


def refit_data(data: Dataset) -> Dataset:
    """All of train + validation to train on, no validation split: the final student (and its teacher)."""
    pool = pooled(data)
    return replace(data, train=pool, val=pool.subset(np.zeros(0, dtype=np.int64)),
                   fingerprint=_derived(data.fingerprint, "refit"))
