"""A pick that survives another seed: the top trials and the hand-picked points, retrained with further seeds.

The best of many trials on small data is mostly the luckiest, so the `search.rerank` best trials and every
`search.points` trial are trained again with `search.confirm_seeds` further seeds (Ray tasks, as the trials
ran: cross-validated when the search is) and the winner is the best mean over those seeds alone (the
search's own figure picked the candidates, so counting it again would favour the luckiest).

Whether the search beats a hand-picked point is judged on images and seeds that did not pick: the held-out
images are cut into two stratified halves; on each half, the candidate that the other half's re-ranking figures
pick is set against the point, both retrained with `search.judge_seeds` seeds more, and their paired differences
on the two halves are averaged (kd.selection.paired_difference: the images resampled by class, the seeds
averaged). The search beats the point when that difference is above 1.96 standard errors. Judged on the seeds
and images that chose it, the best of four equal candidates "beat" a point about one time in four; on fresh seeds
but the same images, 6 to 10 times in a hundred once candidates differ image by image; on fresh seeds and fresh
images, fewer than one time in twenty (tests/test_verdict.py simulates all three).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch

from kd.metrics import macro_auc, scalars
from kd.schemes import Scheme
from kd.selection import Difference, held_out_metrics, image_terms, paired_difference, validation_parts
from kd.shipping import Judged
from kd.train import HeldOut, Outcome
from search.cluster import remote, trial_resources
from search.config import Config
from search.records import (
    RANKED,
    Candidate,
    Comparison,
    LabelsOnly,
    Reranking,
    Spread,
    TrialStatus,
    Verdict,
)
from search.run import Run
from search.teachers import Prepared


def retrain(cfg: Config, scheme: Scheme) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]] | None]:
    """One candidate with one seed: its last epoch's metrics and its pooled held-out probabilities (only the last
    epoch is judged: nothing reads the others), and apart (a second Ray return, fetched only for the winner) its
    students' weights, one per member, on the CPU."""
    fit = scheme.fit(cfg, every_epoch=False)
    if fit.status != Outcome.COMPLETED or fit.probs is None:
        return {"status": fit.status}, None
    weights = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in fit.models]
    return {"status": fit.status, "metrics": scalars(fit.history[-1]), "probs": fit.probs.astype(np.float32)}, weights


def candidates(run: Run, ranked: pd.DataFrame) -> list[tuple[pd.Series, int | None]]:
    """(trial row, hand-picked point number or None): the `ranked` trials (`Run.rerank_pool`: the top trials or the
    front's members), then each point's trial, each once."""
    points: dict[str, tuple[pd.Series, int]] = {}
    for i, point in enumerate(run.config.search.points):
        row = run.point_trial(point)
        if row is not None and row["status"] in RANKED:
            points.setdefault(row["trial"], (row, i + 1))
    top = [(row, points[row["trial"]][1] if row["trial"] in points else None) for _, row in ranked.iterrows()]
    return top + [c for t, c in points.items() if t not in {r["trial"] for r, _ in top}]


@dataclass
class Reranked:
    """What the re-ranking leaves besides its record: the winner's held-out probabilities over the further seeds
    (and judging seeds), and the students it judged (those of its first further seed, and its labels-only twin's of
    its first judging seed), with their own held-out probabilities."""
    record: Reranking
    probs: list[np.ndarray]
    judged: Judged | None = None
    twin: Judged | None = None


def rerank(run: Run, prepared: Prepared, seeds: list[int], judge_seeds: list[int],
           chosen: list[tuple[pd.Series, int | None]]) -> Reranked:
    """Retrain every candidate (`candidates`) with every seed of `seeds`, pick the winner, judge it against each
    hand-picked point and against its labels-only twin on `judge_seeds`; the record (rerank.json), the winner's
    held-out probabilities and the students it judged."""
    cfg, metric = run.config, run.config.search.metric
    scheme_ref = ray.put(prepared.scheme.for_trials())
    resources = trial_resources(cfg)

    def start(tcfg: Config, some: list[int]) -> list[Any]:
        """One fit per seed: (its result's reference, its weights' reference)."""
        return [remote(retrain, resources, tcfg.updated({"train.seed": s}), scheme_ref, returns=2) for s in some]

    def fetched(fits: list[Any]) -> list[dict[str, Any]]:
        return ray.get([result for result, _ in fits])

    configs = [run.trial_config(row) for row, _ in chosen]
    jobs = [start(c, seeds) for c in configs]
    judging = {i: start(configs[i], judge_seeds) for i, (_, point) in enumerate(chosen) if point}  # whoever wins
    results = [fetched(j) for j in jobs]
    entries = [candidate(run, row, point, runs, metric) for (row, point), runs in zip(chosen, results, strict=True)]
    sign = 1 if cfg.search.direction == "max" else -1
    within = set(run.table.loc[run.within_budget(run.table), "trial"])  # a point over budget: compared only
    allowed = [e.trial in within for e in entries]
    best = pick(entries, {e.trial for e, ok in zip(entries, allowed, strict=True) if ok}, sign)
    held = prepared.scheme.held
    halves = judging_halves(held)
    winners = half_winners(results, allowed, held, halves, metric, sign) if held is not None and judge_seeds else []
    for i in {best, *winners} - set(judging):
        judging[i] = start(configs[i], judge_seeds)
    # the labels-only twin of each candidate the winner is judged as: its config with the teacher's weight at 0
    twin_seeds = judge_seeds or seeds
    twins = {i: start(labels_only(configs[i]), twin_seeds) for i in {best, *winners} if not is_labels_only(configs[i])}
    judged = {i: fetched(j) for i, j in judging.items()}
    twin_runs = {i: fetched(j) for i, j in twins.items()}
    entries = [dataclasses.replace(e, judged=[_value(r, metric) for r in judged.get(i, [])])
               for i, e in enumerate(entries)]
    comparisons = [compare(best, winners, i, entries, judged, held, halves, metric, sign)
                   for i, e in enumerate(entries) if e.hand_picked]
    twin = against_twin(best, winners, entries, configs, judged, twin_runs, held, halves, metric, sign,
                        twin_seeds) if held is not None else None
    record = Reranking(metric=metric, seeds=seeds, judge_seeds=judge_seeds, winner=entries[best].trial,
                       candidates=entries, against_points=comparisons, labels_only=twin)
    probs = [r["probs"] for r in [*results[best], *judged.get(best, [])] if r["status"] == Outcome.COMPLETED]
    return Reranked(record, probs, _judged(jobs[best], results[best], seeds),
                    _judged(twins[best], twin_runs[best], twin_seeds) if best in twins else None)


def _judged(fits: list[Any], results: list[dict[str, Any]], seeds: list[int]) -> Judged | None:
    """The students of the first of `fits` that completed, fetched from Ray, with their held-out probabilities."""
    for (_, weights), result, seed in zip(fits, results, seeds, strict=True):
        if result["status"] == Outcome.COMPLETED:
            return Judged(ray.get(weights), result["probs"], seed)
    return None


def labels_only(cfg: Config) -> Config:
    """`cfg` trained without its teacher: the distillation term's weight at 0, everything else equal."""
    return cfg.updated({"distill.alpha": 0.0}, source="the labels-only twin")


def is_labels_only(cfg: Config) -> bool:
    return cfg.distill.alpha == 0.0


def candidate(run: Run, row: pd.Series, point: int | None, runs: list[dict[str, Any]], metric: str) -> Candidate:
    values = [_value(r, metric) for r in runs]
    return Candidate(trial=row["trial"], params=run.params(row), hand_picked=point, search_value=float(row[metric]),
                     status=TrialStatus(row["status"]), values=values, mean=_mean(values), std=_std(values),
                     metrics=_summaries([r.get("metrics", {}) for r in runs]))


def pick(entries: list[Candidate], allowed: set[str], sign: int) -> int:
    """The winner: the best mean over the re-ranking seeds among the candidates within the budget."""
    ranked = sorted((i for i in range(len(entries)) if entries[i].trial in allowed),
                    key=lambda i: -sign * entries[i].mean if not math.isnan(entries[i].mean) else math.inf)
    return ranked[0]


def judging_halves(held: HeldOut | None) -> np.ndarray:
    """Two stratified halves of the held-out images (0/1 per image, fixed): each half judges what the other
    picked."""
    return validation_parts(held.labels, 1, held.groups) if held is not None else np.zeros(0, dtype=np.int64)


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


def half_winners(results: list[list[dict[str, Any]]], allowed: list[bool], held: HeldOut, halves: np.ndarray,
                 metric: str, sign: int) -> list[int]:
    """For each half h, the candidate the other half picks: the best mean over the re-ranking seeds of `metric` on
    the other half's images (among the candidates within the budget)."""
    winners = []
    for h in (0, 1):
        other = np.flatnonzero(halves != h)
        means = [_mean([half_figure(metric, held, r["probs"], other) if r["status"] == Outcome.COMPLETED
                        else math.nan for r in runs]) if ok else math.nan
                 for runs, ok in zip(results, allowed, strict=True)]
        order = sorted(range(len(means)), key=lambda i: -sign * means[i] if not math.isnan(means[i]) else math.inf)
        winners.append(order[0])
    return winners


def compare(best: int, winners: list[int], point: int, entries: list[Candidate],
            judged: dict[int, list[dict[str, Any]]], held: HeldOut | None, halves: np.ndarray, metric: str,
            sign: int) -> Comparison:
    """The search against hand-picked point `point` (indices into `entries`): on each half of the held-out images,
    the candidate the other half picked (`winners`) against the point, both retrained on the judging seeds; the
    two halves' paired differences averaged, and whether the 97.5% lower bound is above 0."""
    mine = entries[point]
    assert mine.hand_picked is not None
    if best == point:
        return Comparison(point=mine.hand_picked, trial=mine.trial, difference=0.0, standard_error=0.0, seeds=0,
                          verdict=Verdict.SAME)
    sides = [None if winner == point else (judged.get(winner, []), judged.get(point, [])) for winner in winners]
    d = halves_difference(sides, held, halves, metric, sign)
    if d is None:
        return Comparison(point=mine.hand_picked, trial=mine.trial, difference=math.nan, standard_error=math.nan,
                          seeds=0, verdict=Verdict.UNJUDGED)
    return Comparison(point=mine.hand_picked, trial=mine.trial, difference=d.mean, standard_error=d.standard_error,
                      seeds=d.seeds, verdict=Verdict.BEATS if d.beats else Verdict.WITHIN_NOISE, lower=d.lower,
                      detectable=d.detectable, judged=[entries[w].trial for w in winners])


def halves_difference(sides: list[tuple[list[dict[str, Any]], list[dict[str, Any]]] | None], held: HeldOut | None,
                      halves: np.ndarray, metric: str, sign: int) -> Difference | None:
    """On each half h of the held-out images, how much better the fits `sides[h][0]` are than `sides[h][1]` (the
    same judging seeds, paired; None: the same model on both sides, no difference and no noise in it); the two
    halves' differences averaged. None where a half could not be judged."""
    parts: list[Difference] = []
    for h, side in enumerate(sides):
        if side is None:
            parts.append(Difference(0.0, 0.0, 0))
            continue
        pairs = [(a["probs"], b["probs"]) for a, b in zip(*side, strict=True)
                 if a["status"] == Outcome.COMPLETED and b["status"] == Outcome.COMPLETED]
        if held is None or not pairs:
            return None
        idx = np.flatnonzero(halves == h)
        parts.append(paired_difference(metric, held.subset(idx), [a[idx] for a, _ in pairs], [b[idx] for _, b in pairs],
                                       sign))
    if len(parts) < 2 or any(math.isnan(d.standard_error) for d in parts):
        return None
    return Difference((parts[0].mean + parts[1].mean) / 2,
                      math.hypot(parts[0].standard_error, parts[1].standard_error) / 2,
                      min(p.seeds for p in parts if p.seeds) if any(p.seeds for p in parts) else 0)


def against_twin(best: int, winners: list[int], entries: list[Candidate], configs: list[Config],
                 judged: dict[int, list[dict[str, Any]]], twins: dict[int, list[dict[str, Any]]], held: HeldOut,
                 halves: np.ndarray, metric: str, sign: int, seeds: list[int]) -> LabelsOnly:
    """What the teacher added, judged as the hand-picked points are: on each half of the held-out images, the
    candidate the other half picked against its own labels-only twin, both on the judging seeds."""
    winner = entries[best]
    if best not in twins:  # the winner already trains on the labels alone
        return LabelsOnly(trial=winner.trial, seeds=seeds, values=list(winner.values), mean=winner.mean,
                          std=winner.std, difference=0.0, standard_error=0.0, verdict=Verdict.SAME,
                          alpha=configs[best].distill.alpha)
    runs = twins[best]
    values = [_value(r, metric) for r in runs]
    d = halves_difference([(judged.get(w, []), twins[w]) for w in winners], held, halves, metric, sign) \
        if winners else None
    unjudged = LabelsOnly(trial=winner.trial, seeds=seeds, values=values, mean=_mean(values), std=_std(values),
                          difference=math.nan, standard_error=math.nan, verdict=Verdict.UNJUDGED,
                          alpha=configs[best].distill.alpha, metrics=_summaries([r.get("metrics", {}) for r in runs]))
    if d is None:
        return unjudged
    return dataclasses.replace(unjudged, difference=d.mean, standard_error=d.standard_error,
                               verdict=Verdict.BEATS if d.beats else Verdict.WITHIN_NOISE, lower=d.lower,
                               detectable=d.detectable, judged=[entries[w].trial for w in winners])


def _value(run: dict[str, Any], metric: str) -> float:
    return float(run["metrics"].get(metric, math.nan)) if run["status"] == Outcome.COMPLETED else math.nan


def _mean(values: list[float]) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.nanmean(v)) if (~np.isnan(v)).any() else math.nan


def _std(values: list[float]) -> float:
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _summaries(runs: list[dict[str, Any]]) -> dict[str, Spread]:
    names = sorted({k for r in runs for k in r if k.startswith("val_")})
    return {n: Spread(_mean([r.get(n, math.nan) for r in runs]), _std([r.get(n, math.nan) for r in runs]))
            for n in names}
