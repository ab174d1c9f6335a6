"""Reading Ray Tune's experiment folder: one row per trial, its history, status, error and checkpoint.

Nothing is unpickled: Ray's per-trial `params.json` and `result.json` are plain JSON, and the parts of
its layout that are Ray's own business (the statuses in `experiment_state-*.json`, the trial folders'
names) are read through search.compat. A trial's status comes from the driver's own event log when it
has one (written as events happen), else from Ray's experiment states (the newest one's word standing), else
from its files.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd.errors import UserError
from kd.files import read_jsonl
from search.compat import trial_folder_id, trial_statuses
from search.config import Config
from search.events import TrialEvent, read_events
from search.records import COST, HALF_FIGURES, METRICS, MIRROR, PLACEMENT, STATE_FILE, TEACHER_WORK, TrialStatus

log = logging.getLogger("search")

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


# ------------------------------------------------------------------------------------- reading trials

def _status(ray_status: str | None, history: list[dict[str, Any]], error: str, epochs: int) -> TrialStatus:
    if ray_status == "ERROR" or (error and ray_status is None):
        return TrialStatus.FAILED
    if ray_status == "TERMINATED" or (ray_status is None and len(history) >= epochs):
        return TrialStatus.COMPLETED if len(history) >= epochs else TrialStatus.STOPPED
    return TrialStatus.UNFINISHED


def load_trials(cfg: Config, exp: str, run_dir: Path) -> tuple[pd.DataFrame, dict[str, list[dict[str, Any]]]]:
    """A trial's status comes from the driver's own event log when it has one (written as events happen), else
    from Ray's experiment states (the newest one's word standing), else from the trial's files."""
    statuses = trial_statuses(exp)
    events: dict[str, list[TrialEvent]] = {}
    for event in read_events(run_dir):
        events.setdefault(event.trial, []).append(event)
    metric, pick = cfg.search.metric, (max if cfg.search.direction == "max" else min)
    rows, histories = [], {}
    for params_file in sorted(glob.glob(os.path.join(exp, "*", "params.json"))):
        trial_dir = os.path.dirname(params_file)
        name = os.path.basename(trial_dir)
        trial_id, number = trial_folder_id(name)
        try:
            params = json.loads(Path(params_file).read_text())
        except ValueError:
            continue
        # Ray appends to result.json: a retried trial reports the epochs after its checkpoint again; the last stands
        history = list({r["epoch"]: r for r in read_jsonl(os.path.join(trial_dir, "result.json"))
                        if "epoch" in r}.values())
        histories[trial_id] = history
        mine = events.get(trial_id, [])
        ends = [e for e in mine if e.status != TrialStatus.RETRY]
        errors = [e.error for e in mine if e.error]
        error = errors[-1] if errors else trial_error(trial_dir) or ("the trial's process died" if mine else "")
        if ends:
            status = ends[-1].status
            failures = sum(e.status in (TrialStatus.RETRY, TrialStatus.FAILED) for e in mine)
        else:
            status = _status(statuses.get(trial_id, {}).get("status"), history, error, cfg.train.epochs)
            failures = statuses.get(trial_id, {}).get("failures", 0)
        if status not in (TrialStatus.FAILED, TrialStatus.UNFINISHED):  # a retried trial that then finished: no error
            error = ""
        row: dict[str, Any] = {"trial": trial_id, "number": number, "status": TrialStatus(status).value, **params}
        last = history[-1] if history else {}
        recalls = sorted(k for k in last if k.startswith("val_recall_"))
        for key in (*METRICS, *recalls):
            row[key] = last.get(key, np.nan)
        scored = [h for h in history if h.get(metric) is not None]
        best = pick(scored, key=lambda h: h[metric]) if scored else {}
        row["best_epoch"] = best.get("epoch", np.nan)  # the epoch with the best search metric, and its metrics
        for key in (*METRICS, *recalls):
            row[f"best_{key}"] = best.get(key, np.nan)
        for key in (*COST, *HALF_FIGURES):
            row[key] = last.get(key, np.nan)
        counted = [h[TEACHER_WORK] for h in history if TEACHER_WORK in h]  # none in a run of an earlier version
        row[TEACHER_WORK] = max(counted) if counted else np.nan
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

