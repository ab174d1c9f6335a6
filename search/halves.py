"""The two judging halves of the held-out images: each half judges what the other half picked (search.rerank).

Fixed per search (a stratified cut that keeps a subject whole), so that the trials can report the search metric on
each half (records.HALF_FIGURES) and the re-ranking can choose each half's candidates on the other half alone.
"""
from __future__ import annotations

import math

import numpy as np

from kd.metrics import macro_auc
from kd.selection import held_out_metrics, image_terms, validation_parts
from kd.train import HeldOut
from search.records import HALF_FIGURES


def judging_halves(held: HeldOut | None) -> np.ndarray:
    """Two halves of the held-out images (0/1 per image, fixed): each half judges what the other picked. Pooled
    out-of-fold predictions are cut into whole folds (the even folds against the odd): a candidate's luck with a
    fold (its teacher, its training images, its views) stays from seed to seed, so a half that shared folds with
    the other would pick on the very luck it then judges. One validation split is cut into stratified halves that
    keep a subject whole."""
    if held is None:
        return np.zeros(0, dtype=np.int64)
    if held.member.max(initial=0) > 0:
        return (held.member % 2).astype(np.int64)
    return validation_parts(held.labels, 1, held.groups)


def half_figure(metric: str, held: HeldOut, probs: np.ndarray, idx: np.ndarray) -> float:
    """`metric` of the held-out images `idx` under the search's rule (kd.selection.held_out_metrics)."""
    sub = held.subset(idx)
    if metric == "val_auc":
        return macro_auc(sub.labels, probs[idx])
    terms = image_terms(metric, sub.labels, probs[idx], sub.parts, sub.rule)
    if terms is not None:  # a sum over images (the same figure, without the rest of the report)
        return float(np.sum(terms[0] * terms[1]))
    return float(held_out_metrics(sub.labels, probs[idx], sub.classes, sub.parts, sub.rule,
                                  folds=sub.member if sub.spread else None).get(metric, math.nan))


def half_figures(metric: str, held: HeldOut, probs: np.ndarray) -> dict[str, float]:
    """`metric` on each judging half, as a trial reports it with every epoch (records.HALF_FIGURES)."""
    halves = judging_halves(held)
    return {name: half_figure(metric, held, probs, np.flatnonzero(halves == h)) for h, name in enumerate(HALF_FIGURES)}
