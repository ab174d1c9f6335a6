"""A pick that survives another seed: the top trials and the hand-picked points, retrained with further seeds.

The best of many trials on small data is mostly the luckiest, so the `search.rerank` best trials and every
`search.points` trial are trained again with `search.confirm_seeds` further seeds (Ray tasks, as the trials
ran: cross-validated when the search is) and the winner is the best mean over those seeds alone (the
search's own figure picked the candidates, so counting it again would favour the luckiest). Each seed
trains every candidate, so candidates are compared pairwise on the same seeds; the search's best beats a
hand-picked point "beyond the noise" when its mean paired difference exceeds twice that difference's
standard error.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import ray

from kd.config import Config
from kd.metrics import scalars
from kd.schemes import Scheme
from kd.train import Outcome
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


def rerank(run: Run, prepared: Prepared, seeds: list[int],
           chosen: list[tuple[pd.Series, int | None]]) -> tuple[Reranking, list[np.ndarray]]:
    """Retrain every candidate (`candidates(run)`) with every seed; the record (rerank.json) and the winner's
    held-out probabilities."""
    cfg, metric = run.config, run.config.search.metric
    scheme_ref = ray.put(prepared.scheme.for_trials())
    resources = trial_resources(cfg)
    jobs = [[remote(retrain, resources, run.trial_config(row).updated({"train.seed": s}), scheme_ref)
             for s in seeds] for row, _ in chosen]
    results = [ray.get(j) for j in jobs]
    entries = []
    for (row, point), runs in zip(chosen, results, strict=True):
        values = [r["metrics"].get(metric, math.nan) if r["status"] == Outcome.COMPLETED else math.nan for r in runs]
        entries.append(Candidate(trial=row["trial"], params=run.params(row), hand_picked=point,
                                 search_value=float(row[metric]), status=TrialStatus(row["status"]), values=values,
                                 mean=_mean(values), std=_std(values),
                                 metrics=_summaries([r.get("metrics", {}) for r in runs])))
    sign = 1 if cfg.search.direction == "max" else -1
    allowed = set(run.table.loc[run.within_budget(run.table), "trial"])  # a point over budget: compared only
    ranked = sorted((i for i in range(len(entries)) if entries[i].trial in allowed),
                    key=lambda i: -sign * entries[i].mean if not math.isnan(entries[i].mean) else math.inf)
    winner = entries[ranked[0]]
    record = Reranking(metric=metric, seeds=seeds, winner=winner.trial, candidates=entries,
                       against_points=[compare(winner, e, sign) for e in entries if e.hand_picked])
    probs = [r["probs"] for r in results[ranked[0]] if r["status"] == Outcome.COMPLETED]
    return record, probs


def compare(best: Candidate, point: Candidate, sign: int) -> Comparison:
    """The search's best against one hand-picked point on the same seeds: the paired difference and its noise."""
    assert point.hand_picked is not None
    d = sign * (np.asarray(best.values, dtype=float) - np.asarray(point.values, dtype=float))
    d = d[~np.isnan(d)]
    mean = float(d.mean()) if len(d) else math.nan
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    verdict = (Verdict.SAME if best.trial == point.trial else Verdict.BEATS if len(d) > 1 and mean > 2 * se
               else Verdict.WITHIN_NOISE)
    return Comparison(point=point.hand_picked, trial=point.trial, difference=mean, standard_error=se, seeds=len(d),
                      verdict=verdict)


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
