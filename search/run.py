"""A typed, read-only view of a search's run directory: the one model every reader of a search uses.

The report, the plots, finalize, export, the console progress and the interruption check all read a
search through `Run`, so how a file is laid out, how a trial's status is decided and which trials rank
first are written once, here. Nothing here writes, and nothing is unpickled: Ray's per-trial
`params.json` and `result.json`, the statuses in `experiment_state-*.json`, the driver's own event log
and the files the search wrote itself are all plain JSON or YAML.

Layout of `results/<name>/`:

    config.yaml          the resolved config           run.json        classes, data, experiment path, time
    teacher.json         the teachers' record          rerank.json     the top trials retrained with other seeds
    trial_events.jsonl   every trial end and retry     optuna.journal  the Optuna study
    best/                the exported best student     trials.csv, summary.md, plots/, configs/: the report
    ray/                 Ray Tune's experiment (or ray-mirror/, a local copy of one in remote storage)
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd.config import Config, load_config
from kd.errors import UserError
from kd.files import read_json, read_jsonl
from kd.selection import decision_rule, rule_label, rule_text
from kd.teacher import TeacherInfo

log = logging.getLogger("search")

CONFIG, RUN, TEACHER, RERANK, BEST = "config.yaml", "run.json", "teacher.json", "rerank.json", "best"
RERANK_PROBS = "rerank_probs.safetensors"  # the winner's held-out probabilities over the further seeds
EVENTS, JOURNAL, EXPERIMENT, MIRROR = "trial_events.jsonl", "optuna.journal", "ray", "ray-mirror"
STATE_FILE = "state.pt"  # the file inside a trial's checkpoint folder
RAY_ERRORS = "ray-errors.log"  # the errors Ray's cluster published to this search, whole (the console gets a line)
MLFLOW_DB = "mlflow.db"  # search.loggers' MLflow store, unless search.mlflow_uri names another

# A trial's status: the one vocabulary of the table, the console, the plots and the summary.
COMPLETED, STOPPED, FAILED, UNFINISHED = "completed", "stopped early", "failed", "unfinished"
RETRY = "retry"                              # an event only: the trial is run again
RANKED = (COMPLETED, STOPPED)                # trials with a score to rank
FINISHED = (COMPLETED, STOPPED, FAILED)      # trials that will not run again
METRICS = ("val_balanced_accuracy", "val_accuracy", "val_macro_f1", "val_balanced_accuracy_argmax",
           "val_balanced_accuracy_fold_mean", "val_balanced_accuracy_fold_std")
COST = ("student_params", "student_mflops", "student_latency_ms", "student_images_per_s")  # measured in each trial
PLACEMENT = ("node", "gpus", "device")  # the Ray node, the GPU ids Ray gave the trial, torch's device


# ----------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class RunRecord:
    """run.json: what the search was given and where its experiment lives."""
    experiment: str
    classes: list[str]
    data: str = ""
    resumed: bool = False
    seconds: float | None = None


@dataclass(frozen=True)
class TeacherRecord:
    """teacher.json: the teacher's validation metrics (the mean over folds) and how it was prepared."""
    metrics: dict[str, Any]
    info: dict[str, Any]
    seconds: float = 0.0
    teachers: int = 1                            # one per fold in a cross-validated search

    def describe(self) -> str:
        return TeacherInfo.from_dict(self.info).describe()


@dataclass(frozen=True)
class Reranking:
    """rerank.json: the top trials and the hand-picked points retrained with further seeds, and the winner."""
    metric: str
    seeds: list[int]
    winner: str
    candidates: list[dict[str, Any]]             # trial, params, hand_picked, search_value, values, mean, std, metrics
    against_points: list[dict[str, Any]]         # the winner against each hand-picked point: paired difference


@dataclass(frozen=True)
class BestRecord:
    """best/metrics.json: the exported student, its validation metrics and its one test evaluation."""
    trial: str
    classes: list[str]
    threshold: float | None
    epoch: int
    params: dict[str, Any]
    val_last_epoch: dict[str, Any]
    val: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    refit: bool = False                          # refitted on train + validation (cross-validated searches)
    cost: dict[str, Any] = field(default_factory=dict)  # the compression report against the teacher (kd.cost)
    train_images: int = 0


def _record(cls: Any, raw: dict[str, Any] | None) -> Any:
    """A record from its JSON, or None where the file is missing, unreadable or of another shape."""
    if raw is None:
        return None
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in names})
    except TypeError as e:
        log.warning("ignoring a %s record that does not have the expected fields (%s)", cls.__name__, e)
        return None


# ------------------------------------------------------------------------------------------ trial errors

_CAUSE = re.compile(r"^[\w.]+(Error|Exception|Diverged)\b")


def error_line(text: str) -> str:
    """The line of an error report that names the exception (the last one: the root cause), else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    causes = [ln for ln in lines if _CAUSE.match(ln)]
    return (causes[-1] if causes else lines[-1] if lines else "")[:300]


def trial_error(trial_dir: str | Path) -> str:
    """The error line of the error.txt Ray writes into a failed trial's folder ('' if there is none)."""
    try:
        return error_line(Path(trial_dir, "error.txt").read_text(errors="replace"))
    except OSError:
        return ""


def latest_checkpoint(trial_dir: str | Path) -> str | None:
    found = sorted(glob.glob(os.path.join(trial_dir, "checkpoint_*", STATE_FILE)))
    return found[-1] if found else None


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(Path(run_dir) / EVENTS) if "trial" in e and "status" in e]


# ------------------------------------------------------------------------------------------------- run

class Run:
    """A search's run directory, read once and on demand. `refresh` copies a remote experiment first."""

    def __init__(self, directory: str | Path, refresh: bool = True):
        self.directory = Path(directory)
        if not (self.directory / CONFIG).is_file():
            raise UserError(f"{self.directory} is not a search directory (it has no {CONFIG})")
        self.config: Config = load_config(self.directory / CONFIG)
        self.record: RunRecord | None = _record(RunRecord, read_json(self.directory / RUN))
        self._refresh = refresh

    # ---- the files the search wrote

    @property
    def classes(self) -> list[str]:
        if self.record and self.record.classes:
            return self.record.classes
        return [k.removeprefix("val_recall_") for k in self.table.columns if k.startswith("val_recall_")]

    @property
    def teacher(self) -> TeacherRecord | None:
        return _record(TeacherRecord, read_json(self.directory / TEACHER))

    @property
    def reranking(self) -> Reranking | None:
        return _record(Reranking, read_json(self.directory / RERANK))

    @property
    def best(self) -> BestRecord | None:
        return _record(BestRecord, read_json(self.directory / BEST / "metrics.json"))

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
        return _load_trials(self.config, str(self.experiment), self.directory)

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
        return rule_text(decision_rule(len(self.classes), self.config.train.tune_threshold), self.config.search.folds)

    @property
    def rule_label(self) -> str:
        return rule_label(decision_rule(len(self.classes), self.config.train.tune_threshold), self.config.search.folds)

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

    def pareto(self, cost: str = "student_latency_ms") -> pd.DataFrame:
        """The ranked trials no other trial beats on both the search's metric and `cost` (lower is better)."""
        metric, sign = self.config.search.metric, (1 if self.config.search.mode == "max" else -1)
        done = self.best_trials(len(self.table)) if len(self.table) else self.table
        if not len(done) or cost not in done:
            return done.iloc[:0]
        done = done[done[cost].notna()]
        value, price = sign * done[metric].to_numpy(), done[cost].to_numpy()
        front = [i for i in range(len(done)) if not any(
            value[j] >= value[i] and price[j] <= price[i] and (value[j] > value[i] or price[j] < price[i])
            for j in range(len(done)))]
        return done.iloc[front].sort_values(cost)

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
    ok["_full"] = ok["status"] == COMPLETED
    ok = ok.sort_values(["_full", metric], ascending=[False, cfg.search.mode == "min"])
    return ok.drop(columns="_full").head(k)


def mirror(uri: str, run_dir: Path) -> Path:
    """Copy an experiment kept in remote storage (s3://, gs://, ...) to run_dir/ray-mirror for reading."""
    import pyarrow.fs
    target = run_dir / MIRROR
    try:
        pyarrow.fs.copy_files(uri, str(target.absolute()))
    except Exception as e:  # no credentials, no network, a typo: say which, keep any earlier mirror
        if not target.is_dir():
            raise UserError(f"cannot read the experiment at {uri}: {e}") from None
        log.warning("could not refresh %s from %s (%s); using the copy from earlier", target, uri, e)
    return target


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _plain(value: Any) -> Any:
    """numpy scalars from the table as Python values (kd.config coerces 3.0 to 3 where a key wants an int)."""
    return value.item() if isinstance(value, np.generic) else value


# ------------------------------------------------------------------------------------- reading trials

def _ray_statuses(exp: str) -> dict[str, dict[str, Any]]:
    """trial_id -> {status, failures} from the newest experiment state, if it can be read."""
    # The newest session's file: names carry the session's start time (Ray rewrites all of them at the end,
    # so their modification times do not tell which is newest).
    files = sorted(glob.glob(os.path.join(exp, "experiment_state-*.json")))
    if not files:
        return {}
    try:
        state = json.loads(Path(files[-1]).read_text())
        out = {}
        for entry in state.get("trial_data", []):
            trial = json.loads(entry[0] if isinstance(entry, list) else entry)
            runtime = json.loads(entry[1]) if isinstance(entry, list) and len(entry) > 1 else {}
            out[trial["trial_id"]] = {"status": trial.get("status"), "failures": runtime.get("num_failures", 0)}
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("could not read trial statuses from %s (%s); deriving them from the trial folders", files[-1], e)
        return {}


def _status(ray_status: str | None, history: list[dict[str, Any]], error: str, epochs: int) -> str:
    if ray_status == "ERROR" or (error and ray_status is None):
        return FAILED
    if ray_status == "TERMINATED" or (ray_status is None and len(history) >= epochs):
        return COMPLETED if len(history) >= epochs else STOPPED
    return UNFINISHED


def _load_trials(cfg: Config, exp: str, run_dir: Path) -> tuple[pd.DataFrame, dict[str, list[dict[str, Any]]]]:
    """A trial's status comes from the driver's own event log when it has one (written as events happen), else
    from Ray's newest experiment state, else from the trial's files."""
    statuses = _ray_statuses(exp)
    events: dict[str, list[dict[str, Any]]] = {}
    for event in read_events(run_dir):
        events.setdefault(event["trial"], []).append(event)
    metric, pick = cfg.search.metric, (max if cfg.search.mode == "max" else min)
    rows, histories = [], {}
    for params_file in sorted(glob.glob(os.path.join(exp, "*", "params.json"))):
        trial_dir = os.path.dirname(params_file)
        name = os.path.basename(trial_dir)
        match = re.match(r".*?_([0-9a-f]{8})_(\d+)_", name)
        trial_id, number = (match.group(1), int(match.group(2))) if match else (name, 0)
        try:
            params = json.loads(Path(params_file).read_text())
        except ValueError:
            continue
        # Ray appends to result.json: a retried trial reports the epochs after its checkpoint again; the last stands
        history = list({r["epoch"]: r for r in read_jsonl(os.path.join(trial_dir, "result.json"))
                        if "epoch" in r}.values())
        histories[trial_id] = history
        mine = events.get(trial_id, [])
        ends = [e for e in mine if e["status"] != RETRY]
        errors = [e["error"] for e in mine if e.get("error")]
        error = errors[-1] if errors else trial_error(trial_dir) or ("the trial's process died" if mine else "")
        if ends:
            status = ends[-1]["status"]
            failures = sum(e["status"] in (RETRY, FAILED) for e in mine)
        else:
            status = _status(statuses.get(trial_id, {}).get("status"), history, error, cfg.train.epochs)
            failures = statuses.get(trial_id, {}).get("failures", 0)
        if status not in (FAILED, UNFINISHED):  # a retried trial that then finished carries no error
            error = ""
        row: dict[str, Any] = {"trial": trial_id, "number": number, "status": status, **params}
        last = history[-1] if history else {}
        recalls = sorted(k for k in last if k.startswith("val_recall_"))
        for key in (*METRICS, *recalls):
            row[key] = last.get(key, np.nan)
        scored = [h for h in history if h.get(metric) is not None]
        best = pick(scored, key=lambda h: h[metric]) if scored else {}
        row["best_epoch"] = best.get("epoch", np.nan)  # the epoch with the best search metric, and its metrics
        for key in (*METRICS, *recalls):
            row[f"best_{key}"] = best.get(key, np.nan)
        for key in COST:
            row[key] = last.get(key, np.nan)
        row["threshold"] = last.get("threshold", np.nan)
        row["epochs"] = len(history)
        row["seconds"] = last.get("time_total_s", np.nan)
        for key in PLACEMENT:  # where its last epoch ran
            row[key] = last.get(key, "")
        starts = [h["attempt_started"] for h in history if "attempt_started" in h]
        row["started"] = min(starts) if starts else np.nan  # wall-clock seconds, its first attempt
        row["ended"] = last.get("reported_at", np.nan)
        row["failures"] = failures
        row["error"] = error
        row["path"] = trial_dir
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        first = ["trial", "number", "status", *[k for k in cfg.search.space if k in table.columns]]
        table = table[first + [c for c in table.columns if c not in first]]
        table = table.sort_values("number").reset_index(drop=True)
    return table, histories
