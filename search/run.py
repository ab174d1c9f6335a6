"""A typed, read-only view of a search's run directory: the one model every reader of a search uses.

The report, the plots, finalize, export, the console progress and the interruption check all read a
search through `Run`, so which trials rank first, what the budget admits and how a figure is named are
written once, here. The files and their records are search.records; Ray's experiment is read by
search.experiment.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd.errors import UserError
from kd.files import load_tensors
from kd.schemes import Scheme
from kd.selection import decision_rule, rule_label, rule_text
from search.config import Config, load_config
from search.experiment import load_trials, mirror
from search.records import (
    CONFIG,
    EXPERIMENT,
    FINISHED,
    HALF_FIGURES,
    MIRROR,
    RANKED,
    RERANK_PROBS,
    BestRecord,
    Reranking,
    RunRecord,
    TeacherRecord,
    TrialStatus,
)


@dataclass(frozen=True)
class SlotUse:
    busy: float | None       # the share of slot-seconds spent in trials during the trial phase
    idle: list[float]        # each wait of a slot between one trial's last report and the next trial's start

    @property
    def median_idle(self) -> float | None:
        return float(np.median(self.idle)) if self.idle else None


def attempt_spans(histories: dict[str, list[dict[str, Any]]]) -> dict[tuple[Any, ...], list[float]]:
    """(node, pid, start) -> [start, last report] of every attempt of every trial, from its epochs' reports."""
    attempts: dict[tuple[Any, ...], list[float]] = {}
    for history in histories.values():
        for h in history:
            if h.get("attempt_started") is None or h.get("reported_at") is None:
                continue
            key = (h.get("node"), h.get("pid"), h["attempt_started"])
            span = attempts.setdefault(key, [h["attempt_started"], h["reported_at"]])
            span[1] = max(span[1], h["reported_at"])
    return attempts


def slot_use(histories: dict[str, list[dict[str, Any]]], slots: int | None) -> SlotUse | None:
    """How busy `slots` trial slots were while the trials of `histories` ran, and how long a slot (a trial's process:
    a reused actor runs several) waited between one trial and the next. Read per attempt, from each epoch's report
    of its process and start: a trial retried after its node was lost ran twice, in two processes."""
    attempts = attempt_spans(histories)
    if not attempts:
        return None
    spans = list(attempts.values())
    window = max(e for _, e in spans) - min(s for s, _ in spans)
    busy = sum(e - s for s, e in spans) / (slots * window) if slots and window > 0 else None
    idle: list[float] = []
    by_process: dict[tuple[Any, Any], list[list[float]]] = {}
    for (node, pid, _), span in attempts.items():
        if pid is not None:
            by_process.setdefault((node, pid), []).append(span)
    for process in by_process.values():
        process.sort()
        idle += [b[0] - a[1] for a, b in itertools.pairwise(process)]
    return SlotUse(busy, idle)


class Run:
    """A search's run directory, read once and on demand. `refresh` copies a remote experiment first."""

    def __init__(self, directory: str | Path, refresh: bool = True):
        self.directory = Path(directory)
        if not (self.directory / CONFIG).is_file():
            raise UserError(f"{self.directory} is not a search directory (it has no {CONFIG})")
        self.config: Config = load_config(self.directory / CONFIG)
        self._refresh = refresh

    # ---- the files the search wrote

    @property
    def classes(self) -> list[str]:
        if self.record and self.record.classes:
            return self.record.classes
        return [k.removeprefix("val_recall_") for k in self.table.columns if k.startswith("val_recall_")]

    @property
    def record(self) -> RunRecord | None:
        """run.json, as it is now (the search rewrites it as each of its phases ends)."""
        return RunRecord.read(self.directory)

    @property
    def teacher(self) -> TeacherRecord | None:
        return TeacherRecord.read(self.directory)

    @property
    def reranking(self) -> Reranking | None:
        return Reranking.read(self.directory)

    @property
    def best(self) -> BestRecord | None:
        return BestRecord.read(self.directory)

    def rerank_probs(self) -> list[np.ndarray]:
        """The re-ranked winner's pooled held-out probabilities, one array per further seed ([] if none were kept)."""
        path = self.directory / RERANK_PROBS
        return list(load_tensors(path)[0]["probs"].numpy()) if path.is_file() else []

    @cached_property
    def experiment(self) -> Path:
        """A local path of Ray's experiment (a remote one is mirrored into ray-mirror/ first)."""
        exp = self.directory / EXPERIMENT
        recorded = self.record.experiment if self.record else ""
        if "://" in recorded:
            exp = mirror(recorded, self.directory) if self._refresh else self.directory / MIRROR
        elif recorded and os.path.isdir(recorded):
            exp = Path(recorded)
        if not exp.is_dir() and (self.directory / MIRROR).is_dir():  # a copied run folder of a remote experiment
            exp = self.directory / MIRROR
        if not exp.is_dir() and recorded and recorded != str(self.directory / EXPERIMENT):
            raise UserError(f"{self.directory}: its Ray experiment ({recorded}, where --storage put it) is gone, and "
                            f"{exp} holds no copy: copy the experiment folder there")
        if not exp.is_dir():
            raise UserError(f"{self.directory} has no Ray experiment folder ({exp}); the search has not started "
                            "trials yet")
        return exp

    # ---- the trials

    @cached_property
    def _trials(self) -> tuple[pd.DataFrame, dict[str, list[dict[str, Any]]]]:
        return load_trials(self.config, str(self.experiment), self.directory)

    @property
    def table(self) -> pd.DataFrame:
        """One row per trial: parameters, final and best metrics, epochs, time, status, retries, error, path."""
        return self._trials[0]

    @property
    def histories(self) -> dict[str, list[dict[str, Any]]]:
        """Each trial's reported epochs, by trial id."""
        return self._trials[1]

    @property
    def rule(self) -> str:
        """The decision rule every figure of this search uses (kd.selection), named in full."""
        return rule_text(self._decision_rule, self.scheme.where(self.config))

    @property
    def rule_label(self) -> str:
        return rule_label(self._decision_rule, self.scheme.short(self.config))

    @property
    def _decision_rule(self) -> str:
        return decision_rule(len(self.classes), self.config.train.tune_threshold)

    @property
    def scheme(self) -> type[Scheme]:
        """How this search's trials trained (kd.schemes), which names where its figures come from."""
        return Scheme.of(self.config)

    def finished(self) -> int:
        return int(self.table["status"].isin(FINISHED).sum()) if len(self.table) else 0

    def searched_keys(self) -> list[str]:
        return [k for k in self.config.search.space if k in self.table.columns]

    def params(self, row: pd.Series) -> dict[str, Any]:
        """The searched keys this trial sampled (a conditional key it never sampled is left out)."""
        return {k: _plain(row[k]) for k in self.config.search.space if k in row and not _missing(row[k])}

    def best_trials(self, k: int = 5, within_budget: bool = False) -> pd.DataFrame:
        """Ranked on validation only: trials that ran every epoch first (ASHA's survivors), then the rest; with
        `within_budget`, only trials whose student fits `search.max_params` and `search.max_latency_ms`."""
        table = self.table
        if within_budget and len(table):
            table = table[self.within_budget(table)]
        return best_trials(self.config, table, k)

    def within_budget(self, table: pd.DataFrame) -> pd.Series:
        s = self.config.search
        ok = pd.Series(True, index=table.index)
        if s.max_params and "student_params" in table:
            ok &= table["student_params"] <= s.max_params
        if s.max_latency_ms and "student_latency_ms" in table:
            ok &= table["student_latency_ms"] <= s.max_latency_ms
        return ok

    @property
    def objectives(self) -> list[str]:
        """What the front is over: `search.objectives`, or the metric against the student's latency."""
        return self.config.search.objectives or [self.config.search.metric, "student_latency_ms"]

    @property
    def costs_alike(self) -> bool:
        """One student architecture and no cost among the objectives: every trial costs the same, so there is no
        front of accuracy against cost to draw or list."""
        table = self.table
        students = table["student.name"].nunique() if "student.name" in table else 1
        return students < 2 and not self.config.search.objectives

    def front(self, objectives: list[str] | None = None) -> pd.DataFrame:
        """The trials that ran every epoch (an early-stopped trial's figure is not comparable) and that no other such
        trial beats on all of `objectives` (default: `self.objectives`), cheapest first. Optuna's study of a
        multi-objective search holds the same front (its stopped trials are PRUNED, the rest COMPLETE)."""
        names = objectives or self.objectives
        directions = [self.config.search.direction_of(n) for n in names]
        done = self.best_trials(len(self.table)) if len(self.table) else self.table
        if not len(done) or any(n not in done for n in names):
            return done.iloc[:0]
        done = done[(done["status"] == TrialStatus.COMPLETED) & done[names].notna().all(axis=1)]
        loss = np.column_stack([done[n].to_numpy(float) * (-1 if d == "max" else 1)
                                for n, d in zip(names, directions, strict=True)])
        kept = [i for i in range(len(done)) if not any(
            (loss[j] <= loss[i]).all() and (loss[j] < loss[i]).any() for j in range(len(done)))]
        return done.iloc[kept].sort_values(names[1:] + names[:1])

    def rerank_pool(self) -> tuple[pd.DataFrame, bool]:
        """The trials the re-ranking retrains beside the hand-picked points, best figure first, and whether they are
        the front: a multi-objective search's front members within the budget, or, where it has no objectives or
        no front member fits the budget, the top `search.rerank` trials within it."""
        if self.config.search.objectives:
            front = self.front()
            front = front[self.within_budget(front)]
            if not front.empty:
                ordered = self.best_trials(len(self.table))
                return ordered[ordered["trial"].isin(front["trial"])], True
        return self.best_trials(self.config.search.rerank, within_budget=True), False

    def half_pools(self) -> list[list[str]] | None:
        """For each judging half h (search.halves), the trials its pick comes from (`half_pools`), within the budget;
        None for a run of an earlier version, whose trials did not report their halves' figures."""
        table = self.table
        if not len(table) or any(c not in table or table[c].isna().all() for c in HALF_FIGURES):
            return None
        return half_pools(self.config, table[self.within_budget(table)])

    def slot_use(self) -> SlotUse | None:
        """How busy the trial slots were while trials ran, and how long a slot waited between trials."""
        return slot_use(self.histories, self.record.slots if self.record else None)

    def trial(self, trial_id: str) -> pd.Series:
        match = self.table[self.table["trial"] == trial_id] if len(self.table) else self.table
        if match.empty:
            known = ", ".join(self.table["trial"]) if len(self.table) else "none yet"
            raise UserError(f"no trial '{trial_id}' in {self.directory} (trials: {known})")
        return match.iloc[0]

    def point_trial(self, point: dict[str, Any]) -> pd.Series | None:
        """The first trial that ran a `search.points` entry (every given key at its given value)."""
        table = self.table
        if not len(table) or any(k not in table.columns for k in point):
            return None
        same = np.ones(len(table), dtype=bool)
        for key, value in point.items():
            column = table[key]
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            same &= np.isclose(column.astype(float), float(value)) if numeric and \
                pd.api.types.is_numeric_dtype(column) else (column == value).to_numpy()
        found = table[same].sort_values("number")
        return found.iloc[0] if len(found) else None

    def trial_config(self, row: pd.Series) -> Config:
        """The trial's full config: base config + its sampled keys (reproduces it with kdsearch distill)."""
        return self.config.updated(self.params(row), source=f"trial {row['trial']}")


def best_trials(cfg: Config, table: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    metric = cfg.search.metric
    if not len(table):
        return table
    ok = table[table["status"].isin(RANKED) & table[metric].notna()].copy()
    if ok.empty:
        return ok
    ok["_full"] = ok["status"] == TrialStatus.COMPLETED
    ok = ok.sort_values(["_full", metric], ascending=[False, cfg.search.direction == "min"])
    return ok.drop(columns="_full").head(k)


def half_pools(cfg: Config, table: pd.DataFrame) -> list[list[str]]:
    """For each judging half h, the top `search.rerank` trials of `table` by the search metric on the other half
    alone, as the trials reported it (HALF_FIGURES): nothing a half judges was chosen on its images."""
    metric = cfg.search.metric
    return [list(best_trials(cfg, table.assign(**{metric: table[HALF_FIGURES[1 - h]]}), cfg.search.rerank)["trial"])
            for h in (0, 1)]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _plain(value: Any) -> Any:
    """numpy scalars from the table as Python values (kd.config coerces 3.0 to 3 where a key wants an int)."""
    return value.item() if isinstance(value, np.generic) else value
