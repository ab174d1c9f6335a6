"""A pick that survives another seed: the top trials and the hand-picked points, retrained with further seeds.

The best of many trials on small data is mostly the luckiest, so the `search.rerank` best trials and every
`search.points` trial are trained again with `search.confirm_seeds` further seeds (Ray tasks, as the trials
ran: cross-validated when the search is) and the winner is the best mean over those seeds alone (the
search's own figure picked the candidates, so counting it again would favour the luckiest).

Whether the search beats a hand-picked point is judged on images and seeds that did not pick: the held-out
images are cut into two halves (search.halves: whole folds of pooled out-of-fold predictions); on each half, the
candidate picked on the other half alone (the top trials by their figure there, then the best mean over the
re-ranking seeds there) is set against the point, both retrained with `search.judge_seeds` seeds more, and their
paired differences on the two halves are averaged (kd.selection.paired_difference: the images resampled by class,
the seeds averaged, the seeds' own spread added, `seed_variance`, and the candidates' luck with a fold,
`fold_variance`). The search beats the point when that difference is above 1.96 standard errors. Simulated as a
search runs (tests/test_verdict.py), among equal candidates this says "beats" 1 to 2 times in a hundred; the rule
before each half had its own pool, whole folds and the spreads, 7 times; judged on the seeds and images that chose
it, about one time in four.
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

from kd.metrics import scalars
from kd.schemes import Scheme
from kd.selection import Difference, image_terms, paired_difference
from kd.shipping import Judged
from kd.train import HeldOut, Outcome
from search.cluster import remote, trial_resources
from search.config import Config
from search.halves import half_figure, judging_halves
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


def candidates(run: Run, ranked: pd.DataFrame,
               pools: list[list[str]] | None = None) -> list[tuple[pd.Series, int | None]]:
    """(trial row, hand-picked point number or None): the `ranked` trials (`Run.rerank_pool`: the top trials or the
    front's members), then those of each judging half's pool (`Run.half_pools`) not among them, then each point's
    trial, each once."""
    points: dict[str, int] = {}
    for i, point in enumerate(run.config.search.points):
        row = run.point_trial(point)
        if row is not None and row["status"] in RANKED:
            points.setdefault(row["trial"], i + 1)
    trials = dict.fromkeys([*ranked["trial"], *(t for pool in pools or [] for t in pool), *points])
    return [(run.trial(t), points.get(t)) for t in trials]


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
           chosen: list[tuple[pd.Series, int | None]], pools: list[list[str]] | None = None) -> Reranked:
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
    eligible = [[ok and (pools is None or e.trial in pools[h] or e.hand_picked is not None)
                 for e, ok in zip(entries, allowed, strict=True)] for h in (0, 1)]
    winners = half_winners(results, eligible, held, halves, metric, sign) if held is not None and judge_seeds else []
    for i in {best, *winners} - set(judging):
        judging[i] = start(configs[i], judge_seeds)
    # the labels-only twin of each candidate the winner is judged as: its config with the teacher's weight at 0
    twin_seeds = judge_seeds or seeds
    twins = {i: start(labels_only(configs[i]), twin_seeds) for i in {best, *winners} if not is_labels_only(configs[i])}
    judged = {i: fetched(j) for i, j in judging.items()}
    twin_runs = {i: fetched(j) for i, j in twins.items()}
    entries = [dataclasses.replace(e, judged=[_value(r, metric) for r in judged.get(i, [])])
               for i, e in enumerate(entries)]
    folds = fold_variance(metric, held, results) if held is not None else 0.0  # once: the same for every point
    comparisons = [compare(best, winners, i, entries, judged, held, halves, metric, sign, results, folds)
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


def half_winners(results: list[list[dict[str, Any]]], eligible: list[list[bool]], held: HeldOut, halves: np.ndarray,
                 metric: str, sign: int) -> list[int]:
    """For each half h, the candidate the other half picks: the best mean over the re-ranking seeds of `metric` on
    the other half's images, among the candidates `eligible[h]` (within the budget, and of the pool chosen on the
    other half: Run.half_pools)."""
    winners = []
    for h in (0, 1):
        other = np.flatnonzero(halves != h)
        means = [_mean([half_figure(metric, held, r["probs"], other) if r["status"] == Outcome.COMPLETED
                        else math.nan for r in runs]) if ok else math.nan
                 for runs, ok in zip(results, eligible[h], strict=True)]
        order = sorted(range(len(means)), key=lambda i: -sign * means[i] if not math.isnan(means[i]) else math.inf)
        winners.append(order[0])
    return winners


Runs = list[dict[str, Any]]


def compare(best: int, winners: list[int], point: int, entries: list[Candidate], judged: dict[int, Runs],
            held: HeldOut | None, halves: np.ndarray, metric: str, sign: int,
            further: list[Runs] | None = None, folds: float = 0.0) -> Comparison:
    """The search against hand-picked point `point` (indices into `entries`): on each half of the held-out images,
    the candidate the other half picked (`winners`) against the point, both retrained on the judging seeds; the
    two halves' paired differences averaged, and whether the 97.5% lower bound is above 0. `further`: each
    candidate's fits on the re-ranking seeds, whose paired differences on the half add to the seed-to-seed spread;
    `folds`: how much a candidate's luck with a fold moves it (`fold_variance` of those fits)."""
    mine = entries[point]
    assert mine.hand_picked is not None
    if best == point:
        return Comparison(point=mine.hand_picked, trial=mine.trial, difference=0.0, standard_error=0.0, seeds=0,
                          verdict=Verdict.SAME)
    sides = [None if winner == point else (judged.get(winner, []), judged.get(point, [])) for winner in winners]
    more = [None if further is None or winner == point else (further[winner], further[point]) for winner in winners]
    d = halves_difference(sides, held, halves, metric, sign, more, folds)
    if d is None:
        return Comparison(point=mine.hand_picked, trial=mine.trial, difference=math.nan, standard_error=math.nan,
                          seeds=0, verdict=Verdict.UNJUDGED)
    return Comparison(point=mine.hand_picked, trial=mine.trial, difference=d.mean, standard_error=d.standard_error,
                      seeds=d.seeds, verdict=Verdict.BEATS if d.beats else Verdict.WITHIN_NOISE, lower=d.lower,
                      detectable=d.detectable, judged=[entries[w].trial for w in winners])


def _completed_pairs(a: Runs, b: Runs) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x["probs"], y["probs"]) for x, y in zip(a, b, strict=True)
            if x["status"] == Outcome.COMPLETED and y["status"] == Outcome.COMPLETED]


def halves_difference(sides: list[tuple[Runs, Runs] | None], held: HeldOut | None, halves: np.ndarray, metric: str,
                      sign: int, further: list[tuple[Runs, Runs] | None] | None = None,
                      folds: float = 0.0) -> Difference | None:
    """On each half h of the held-out images, how much better the fits `sides[h][0]` are than `sides[h][1]` (the
    same judging seeds, paired; None: the same model on both sides, no difference and no noise in it); the two
    halves' differences averaged. None where a half could not be judged.

    A half's standard error is that of resampling its images (kd.selection.paired_difference) and, on top, the
    seed-to-seed spread of the paired difference over the judging seeds and the `further` ones (the re-ranking's,
    paired the same way) divided by the judging seeds: a seed moves a model's figure on every image at once, which
    no resampling of the images sees; and `folds`, the variance of a candidate's luck with one fold (`fold_variance`),
    for the two models' luck with each fold of the half, which no seed redraws."""
    parts: list[Difference] = []
    for h, side in enumerate(sides):
        if side is None:
            parts.append(Difference(0.0, 0.0, 0))
            continue
        pairs = _completed_pairs(*side)
        if held is None or not pairs:
            return None
        idx = np.flatnonzero(halves == h)
        d = paired_difference(metric, held.subset(idx), [a[idx] for a, _ in pairs], [b[idx] for _, b in pairs], sign)
        more = further[h] if further else None
        spread = pairs + (_completed_pairs(*more) if more else [])
        extra = seed_variance(metric, held, idx, spread) / len(pairs) if len(spread) > 1 else 0.0
        if folds:  # each fold's share of the half, squared: two models' independent luck with each
            shares = np.bincount(held.member[idx]) / len(idx)
            extra += 2 * folds * float(np.sum(shares ** 2))
        d = Difference(d.mean, math.sqrt(d.standard_error ** 2 + extra), d.seeds)
        parts.append(d)
    if len(parts) < 2 or any(math.isnan(d.standard_error) for d in parts):
        return None
    return Difference((parts[0].mean + parts[1].mean) / 2,
                      math.hypot(parts[0].standard_error, parts[1].standard_error) / 2,
                      min(p.seeds for p in parts if p.seeds) if any(p.seeds for p in parts) else 0)


def seed_variance(metric: str, held: HeldOut, idx: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The variance one seed adds to a paired difference of `metric` on the held-out images `idx` on top of the
    images' own noise: the spread of the seeds' differences (`pairs`, seed by seed), less what their image-by-image
    noise from seed to seed explains, for a figure that is a sum over images (that noise is already in the images'
    resampling); all of the spread for the others."""
    sub = held.subset(idx)
    weights, differences = np.zeros(len(idx)), []
    for a, b in pairs:
        ta = image_terms(metric, sub.labels, a[idx], sub.parts, sub.rule)
        tb = image_terms(metric, sub.labels, b[idx], sub.parts, sub.rule)
        if ta is None or tb is None:
            return float(np.var([half_figure(metric, held, a, idx) - half_figure(metric, held, b, idx)
                                 for a, b in pairs], ddof=1))
        weights = ta[0]
        differences.append(ta[1] - tb[1])
    per_image = np.array(differences)  # seeds x images
    noise = float(np.sum(weights ** 2 * per_image.var(axis=0, ddof=1)))
    return max(0.0, float(np.var(per_image @ weights, ddof=1)) - noise)


def fold_variance(metric: str, held: HeldOut, fits: list[Runs]) -> float:
    """How much a candidate's luck with one fold (its fold teacher, its training images and views, the same for
    every seed) moves its figure on that fold: the candidate-by-fold interaction of the candidates' figures fold by
    fold over the re-ranking seeds, less the seeds' own noise (a two-way analysis of variance with replication).
    0 for a holdout, or with fewer than two candidates or seeds."""
    members = np.unique(held.member)
    runs = [r for r in fits if r and all(f["status"] == Outcome.COMPLETED for f in r)]
    seeds = min((len(r) for r in runs), default=0)
    if len(members) < 2 or len(runs) < 2 or seeds < 2:
        return 0.0
    idx = [np.flatnonzero(held.member == m) for m in members]
    y = np.array([[[half_figure(metric, held, f["probs"], i) for f in r[:seeds]] for i in idx] for r in runs])
    cells = y.mean(axis=2)  # candidates x folds
    interaction = cells - cells.mean(axis=1, keepdims=True) - cells.mean(axis=0, keepdims=True) + cells.mean()
    between = seeds * np.sum(interaction ** 2) / ((len(runs) - 1) * (len(members) - 1))
    within = np.sum((y - cells[..., None]) ** 2) / (len(runs) * len(members) * (seeds - 1))
    return max(0.0, float(between - within) / seeds)


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
