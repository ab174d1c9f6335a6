"""A pick that survives another seed: the top trials and the hand-picked points, retrained with further seeds.

The best of many trials on small data is mostly the luckiest, so the `search.rerank` best trials and every
`search.points` trial are trained again with `search.confirm_seeds` further seeds (Ray tasks, as the trials
ran: cross-validated when the search is) and the winner is the best mean over those seeds alone (the
search's own figure picked the candidates, so counting it again would favour the luckiest).

Whether the winner beats a hand-picked point is judged on seeds that did not pick it: the winner and every point
are retrained with `search.judge_seeds` seeds more, and the winner beats the point when their paired difference on
the held-out images is above 1.96 standard errors (kd.selection.paired_difference: the images resampled by class,
the seeds averaged). Judged on the seeds that chose it, the best of four equal candidates "beat" a point about one
time in four; judged on fresh seeds, fewer than one time in twenty (tests/test_verdict.py simulates it).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd
import ray

from kd.config import Config
from kd.metrics import scalars
from kd.schemes import Scheme
from kd.selection import paired_difference
from kd.train import HeldOut, Outcome
from search.cluster import remote, trial_resources
from search.records import RANKED, Candidate, Comparison, Reranking, Spread, TrialStatus, Verdict
from search.run import Run
from search.teachers import Prepared


def retrain(cfg: Config, scheme: Scheme) -> dict[str, Any]:
    """One candidate with one seed: its last epoch's metrics and its pooled held-out probabilities."""
    fit = scheme.fit(cfg)
    if fit.status != Outcome.COMPLETED or fit.probs is None:
        return {"status": fit.status}
    return {"status": fit.status, "metrics": scalars(fit.history[-1]), "probs": fit.probs.astype(np.float32)}


def candidates(run: Run) -> list[tuple[pd.Series, int | None]]:
    """(trial row, hand-picked point number or None): the top trials, then each point's trial, each once."""
    points: dict[str, tuple[pd.Series, int]] = {}
    for i, point in enumerate(run.config.search.points):
        row = run.point_trial(point)
        if row is not None and row["status"] in RANKED:
            points.setdefault(row["trial"], (row, i + 1))
    top = [(row, points[row["trial"]][1] if row["trial"] in points else None)
           for _, row in run.best_trials(run.config.search.rerank, within_budget=True).iterrows()]
    return top + [c for t, c in points.items() if t not in {r["trial"] for r, _ in top}]


def rerank(run: Run, prepared: Prepared, seeds: list[int], judge_seeds: list[int],
           chosen: list[tuple[pd.Series, int | None]]) -> tuple[Reranking, list[np.ndarray]]:
    """Retrain every candidate (`candidates(run)`) with every seed of `seeds`, pick the winner, and judge it against
    each hand-picked point on `judge_seeds`; the record (rerank.json) and the winner's held-out probabilities."""
    cfg, metric = run.config, run.config.search.metric
    scheme_ref = ray.put(prepared.scheme.for_trials())
    resources = trial_resources(cfg)

    def start(row: pd.Series, some: list[int]) -> list[ray.ObjectRef]:
        return [remote(retrain, resources, run.trial_config(row).updated({"train.seed": s}), scheme_ref)
                for s in some]

    jobs = [start(row, seeds) for row, _ in chosen]
    judging = {row["trial"]: start(row, judge_seeds) for row, point in chosen if point}  # needed whoever wins
    results = [ray.get(j) for j in jobs]
    entries = [candidate(run, row, point, runs, metric) for (row, point), runs in zip(chosen, results, strict=True)]
    sign = 1 if cfg.search.direction == "max" else -1
    allowed = set(run.table.loc[run.within_budget(run.table), "trial"])  # a point over budget: compared only
    best = pick(entries, allowed, sign)
    winner = entries[best]
    if winner.trial not in judging:
        judging[winner.trial] = start(chosen[best][0], judge_seeds)
    judged = {trial: ray.get(j) for trial, j in judging.items()}
    entries = [dataclasses.replace(e, judged=[_value(r, metric) for r in judged.get(e.trial, [])]) for e in entries]
    winner = entries[best]
    held = prepared.scheme.held
    record = Reranking(metric=metric, seeds=seeds, judge_seeds=judge_seeds, winner=winner.trial, candidates=entries,
                       against_points=[compare(winner, e, held, metric, sign, judged[winner.trial], judged[e.trial])
                                       for e in entries if e.hand_picked])
    probs = [r["probs"] for r in [*results[best], *judged[winner.trial]] if r["status"] == Outcome.COMPLETED]
    return record, probs


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


def compare(best: Candidate, point: Candidate, held: HeldOut | None, metric: str, sign: int,
            best_runs: list[dict[str, Any]], point_runs: list[dict[str, Any]]) -> Comparison:
    """The winner against one hand-picked point, each retrained on the judging seeds (seeds that did not pick the
    winner): their paired difference on the held-out images and whether its 97.5% lower bound is above 0."""
    assert point.hand_picked is not None
    if best.trial == point.trial:
        return Comparison(point=point.hand_picked, trial=point.trial, difference=0.0, standard_error=0.0, seeds=0,
                          verdict=Verdict.SAME)
    pairs = [(a["probs"], b["probs"]) for a, b in zip(best_runs, point_runs, strict=True)
             if a["status"] == Outcome.COMPLETED and b["status"] == Outcome.COMPLETED]
    if held is None or not pairs:
        return Comparison(point=point.hand_picked, trial=point.trial, difference=math.nan, standard_error=math.nan,
                          seeds=0, verdict=Verdict.UNJUDGED)
    d = paired_difference(metric, held, [a for a, _ in pairs], [b for _, b in pairs], sign)
    return Comparison(point=point.hand_picked, trial=point.trial, difference=d.mean, standard_error=d.standard_error,
                      seeds=d.seeds, verdict=Verdict.BEATS if d.beats else Verdict.WITHIN_NOISE, lower=d.lower,
                      detectable=d.detectable)


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
