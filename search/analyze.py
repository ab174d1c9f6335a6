"""Results of a search, read from its directory alone: trials table, best trials, summary.md, plots.

Works on a finished, running or interrupted search: it reads Ray's per-trial `params.json` and
`result.json` and the statuses in `experiment_state-*.json` (plain JSON; nothing is unpickled), plus the
files the search itself wrote (`config.yaml`, `teacher.json`, `confirm.json`, `best/`).
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

from kd.files import atomic_path, atomic_write_text, read_jsonl
from kd.config import Config, load_config, save_config
from kd.errors import UserError

log = logging.getLogger("search")
METRICS = ("val_balanced_accuracy", "val_accuracy", "val_macro_f1", "val_balanced_accuracy_tuned")


def load_run(run_dir: str | Path, refresh: bool = True) -> tuple[Config, str]:
    """The search's config and a local path of its Ray experiment (remote storage is mirrored first)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a search directory (it has no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    exp = run_dir / "ray"
    if (run_dir / "run.json").is_file():
        recorded = json.loads((run_dir / "run.json").read_text()).get("experiment", "")
        if "://" in recorded:
            exp = mirror(recorded, run_dir) if refresh else run_dir / "ray-mirror"
        elif recorded and os.path.isdir(recorded):
            exp = Path(recorded)
    if not exp.is_dir() and (run_dir / "ray-mirror").is_dir():  # a copied run folder of a remote experiment
        exp = run_dir / "ray-mirror"
    if not exp.is_dir():
        raise UserError(f"{run_dir} has no Ray experiment folder ({exp}); the search has not started trials yet")
    return cfg, str(exp)


def mirror(uri: str, run_dir: Path) -> Path:
    """Copy an experiment kept in remote storage (s3://, gs://, ...) to run_dir/ray-mirror for reading."""
    import pyarrow.fs
    target = run_dir / "ray-mirror"
    try:
        pyarrow.fs.copy_files(uri, str(target.absolute()))
    except Exception as e:  # no credentials, no network, a typo: say which, keep any earlier mirror
        if not target.is_dir():
            raise UserError(f"cannot read the experiment at {uri}: {e}") from None
        log.warning("could not refresh %s from %s (%s); using the copy from earlier", target, uri, e)
    return target


def _statuses(exp: str) -> dict[str, dict[str, Any]]:
    """trial_id -> {status, num_failures} from the newest experiment state, if it can be read."""
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


def _error_text(trial_dir: str) -> str:
    path = os.path.join(trial_dir, "error.txt")
    if not os.path.isfile(path):
        return ""
    lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Diverged)\b", ln)]
    return (causes[-1] if causes else lines[-1] if lines else "failed")[:300]


def load_trials(cfg: Config, exp: str, run_dir: str | Path) -> tuple[pd.DataFrame, dict[str, list[dict[str, Any]]]]:
    """One row per trial (parameters, final and best metrics, epochs, time, status, error) and each history.

    A trial's status comes from the driver's own event log when it has one (written as events happen), else
    from Ray's newest experiment state, else from the trial's files.
    """
    from search.progress import read_events

    statuses = _statuses(exp)
    events: dict[str, list[dict[str, Any]]] = {}
    for event in read_events(run_dir):
        events.setdefault(event["trial"], []).append(event)
    rows, histories = [], {}
    for trial_dir in sorted(glob.glob(os.path.join(exp, "*", "params.json"))):
        trial_dir = os.path.dirname(trial_dir)
        name = os.path.basename(trial_dir)
        match = re.match(r".*?_([0-9a-f]{8})_(\d+)_", name)
        trial_id, number = (match.group(1), int(match.group(2))) if match else (name, 0)
        try:
            params = json.loads(Path(trial_dir, "params.json").read_text())
        except ValueError:
            continue
        history = [r for r in read_jsonl(os.path.join(trial_dir, "result.json")) if "epoch" in r]
        histories[trial_id] = history
        mine = events.get(trial_id, [])
        ends = [e for e in mine if e["status"] != "retry"]
        errors = [e["error"] for e in mine if e.get("error")]
        error = errors[-1] if errors else _error_text(trial_dir) or ("the trial's process died" if mine else "")
        if ends:
            status = ends[-1]["status"]
            failures = sum(e["status"] in ("retry", "failed") for e in mine)
        else:
            status = _status(statuses.get(trial_id, {}).get("status"), history, error, cfg.train.epochs)
            failures = statuses.get(trial_id, {}).get("failures", 0)
        if status not in ("failed", "unfinished"):  # a retried trial that then finished carries no error
            error = ""
        row: dict[str, Any] = {"trial": trial_id, "number": number, "status": status, **params}
        last = history[-1] if history else {}
        for m in METRICS:
            row[m] = last.get(m, np.nan)
        for key in sorted(k for k in last if k.startswith("val_recall_")):
            row[key] = last[key]
        scored = [h for h in history if h.get(cfg.search.metric) is not None]
        pick = max if cfg.search.mode == "max" else min
        best = pick(scored, key=lambda h: h[cfg.search.metric]) if scored else {}
        row["best_epoch"] = best.get("epoch", np.nan)  # the epoch with the best search metric, and its metrics
        for key in [*METRICS, *sorted(k for k in last if k.startswith("val_recall_"))]:
            row[f"best_{key}"] = best.get(key, np.nan)
        row["threshold"] = last.get("threshold", np.nan)
        row["epochs"] = len(history)
        row["seconds"] = last.get("time_total_s", np.nan)
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


def _status(ray_status: str | None, history: list[dict[str, Any]], error: str, epochs: int) -> str:
    if ray_status == "ERROR" or (error and ray_status is None):
        return "failed"
    if ray_status == "TERMINATED" or (ray_status is None and len(history) >= epochs):
        return "completed" if len(history) >= epochs else "stopped early"
    return "unfinished"


def searched_keys(cfg: Config, table: pd.DataFrame) -> list[str]:
    return [k for k in cfg.search.space if k in table.columns]


def best_trials(cfg: Config, table: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """Ranked on validation only: trials that ran every epoch first (ASHA's survivors), then the rest."""
    metric = cfg.search.metric
    ok = table[table["status"].isin(["completed", "stopped early"]) & table[metric].notna()].copy()
    if ok.empty:
        return ok
    ok["_full"] = ok["status"] == "completed"
    ok = ok.sort_values(["_full", metric], ascending=[False, cfg.search.mode == "min"])
    return ok.drop(columns="_full").head(k)


def trial_config(cfg: Config, row: pd.Series | dict[str, Any]) -> Config:
    """The trial's full config: base config + its sampled keys (reproduces it with kdsearch distill)."""
    values = {k: _plain(row[k]) for k in cfg.search.space if k in row and not _missing(row[k])}
    return cfg.updated(values, source=f"trial {row['trial']}")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _plain(value: Any) -> Any:
    """numpy scalars from the table as Python values (kd.config coerces 3.0 to 3 where a key wants an int)."""
    return value.item() if isinstance(value, np.generic) else value


def write_report(run_dir: str | Path, refresh: bool = True) -> pd.DataFrame:
    """Rebuild trials.csv, configs/, summary.md and plots/ from the run directory."""
    from search import plots
    from search.summary import summary_markdown

    run_dir = Path(run_dir)
    cfg, exp = load_run(run_dir, refresh)
    table, histories = load_trials(cfg, exp, run_dir)
    columns = [c for c in table.columns if c != "path"]
    with atomic_path(run_dir / "trials.csv") as tmp:
        table[columns].to_csv(tmp, index=False)
    for _, row in table.iterrows():
        try:
            save_config(trial_config(cfg, row), run_dir / "configs" / f"{row['trial']}.yaml")
        except Exception as e:  # a trial written by an older config: its table row still stands
            log.warning("no config for trial %s: %s", row["trial"], e)
    plots.draw_all(cfg, run_dir, table, histories)
    atomic_write_text(run_dir / "summary.md", summary_markdown(cfg, run_dir, table))
    return table
