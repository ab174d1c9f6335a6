"""After the trials: confirm the best config over further seeds, export it, test it once, write the report.

Selection uses validation only. The winner is retrained with `search.confirm_seeds` other seeds (as Ray
tasks, with the trials' resources) and reported as mean +- std; the exported student is evaluated exactly
once on the test split, which nothing in the search has seen.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import ray
import torch

from kd.config import Config
from kd.data import Dataset
from kd.distill import evaluate_model, train_student
from kd.errors import UserError
from kd.export import export_student
from kd.files import atomic_write_json, read_json
from kd.metrics import scalars
from kd.models import create_model
from kd.teacher import Teacher
from kd.train import load_state
from search.cluster import remote, trial_resources
from search.format import params_text, shown
from search.report import write_report
from search.run import BEST, CONFIRM, Run, latest_checkpoint

CONFIRM_METRICS = ("val_balanced_accuracy", "val_balanced_accuracy_tuned", "val_accuracy", "val_macro_f1")


def export_trial(run: Run, row: pd.Series, out_dir: Path, data: Dataset | None = None) -> dict[str, Any]:
    """Export one trial's last checkpoint; with `data`, evaluate it on validation and (once) on test."""
    ckpt = latest_checkpoint(row["path"])
    if ckpt is None:
        raise UserError(f"trial {row['trial']} has no checkpoint to export (status: {row['status']})")
    tcfg = run.trial_config(row)
    classes = run.classes
    state = load_state(ckpt)
    model = create_model(dataclasses.replace(tcfg.student, pretrained=False), len(classes), tcfg.data.image_size)
    model.load_state_dict(state["model"])
    last = state["history"][-1]
    threshold = last.get("threshold")
    metrics: dict[str, Any] = {"trial": row["trial"], "classes": classes, "threshold": threshold,
                               "epoch": last["epoch"], "params": run.params(row), "val_last_epoch": scalars(last)}
    if data is not None:
        metrics["val"] = evaluate_model(model, data, "val", threshold, tcfg)
        metrics["test"] = evaluate_model(model, data, "test", threshold, tcfg)
    export_student(out_dir, model, tcfg, classes, threshold, metrics)
    return metrics


def export_command(run_dir: str | Path, trial: str | None, out: str | Path) -> str:
    """`kdsearch export`: a chosen trial (default: the best on validation) exported to `out`."""
    run = Run(run_dir)
    if trial:
        row = run.trial(trial)
    else:
        top = run.best_trials(1)
        if top.empty:
            raise UserError(f"no finished trial in {run_dir} to export")
        row = top.iloc[0]
    metrics = export_trial(run, row, Path(out))
    return (f"exported trial {row['trial']} (epoch {metrics['epoch']}, validation {run.config.search.metric} "
            f"{row[run.config.search.metric]:.4f}) to {out}")


def _retrain(cfg: Config, data: Dataset, logits: torch.Tensor) -> dict[str, Any]:
    result = train_student(cfg, data, logits, progress=False)
    return scalars(result.history[-1]) if result.status == "completed" else {"status": "diverged"}


def confirm(run: Run, row: pd.Series, data: Dataset, logits: torch.Tensor, seeds: list[int]) -> dict[str, Any]:
    """Retrain the trial's config with each seed, in parallel Ray tasks; mean and std of the validation metrics."""
    tcfg = run.trial_config(row)
    data_ref, logits_ref = ray.put(data), ray.put(logits)
    resources = trial_resources(run.config)
    runs = ray.get([remote(_retrain, resources, tcfg.updated({"train.seed": s}), data_ref, logits_ref)
                    for s in seeds])
    reported = {k for r in runs for k in r}  # no tuned threshold beyond two classes
    names = [n for n in CONFIRM_METRICS if n in reported] + sorted(k for k in reported if k.startswith("val_recall_"))
    summary = {}
    for name in names:
        values = np.array([r.get(name, np.nan) for r in runs], dtype=float)
        summary[name] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values, ddof=1)) if len(values) > 1
                         else 0.0, "values": values.tolist()}
    return {"trial": row["trial"], "seeds": seeds, "runs": runs, "summary": summary,
            "search_value": {n: (None if pd.isna(row.get(n)) else float(row[n])) for n in names if n in row}}


def _saved(path: Path, trial: str, **match: Any) -> dict[str, Any] | None:
    """A record a resumed search already wrote for this trial (and these settings), else None."""
    saved = read_json(path)
    return saved if saved and saved.get("trial") == trial and all(saved.get(k) == v for k, v in match.items()) else None


def finalize(run_dir: Path, data: Dataset, teacher: Teacher, echo: Callable[[str], None] = print) -> None:
    run = Run(run_dir, refresh=False)  # mirrored (if remote) when the trials ended
    cfg = run.config
    top = run.best_trials(1)
    if top.empty:
        echo("no trial finished successfully: nothing to confirm or export (see trials.csv for the errors)")
        write_report(run)
        return
    row = top.iloc[0]
    echo(f"best trial {row['trial']} ({row['status']}): {cfg.search.metric} {row[cfg.search.metric]:.4f} with "
         f"{params_text(run.params(row))}")
    seeds = [cfg.train.seed + i for i in range(1, cfg.search.confirm_seeds + 1)]
    if seeds:
        result = _saved(run_dir / CONFIRM, row["trial"], seeds=seeds)
        if result is None:
            echo(f"confirming it with {len(seeds)} further seeds ...")
            result = confirm(run, row, data, teacher.logits, seeds)
            atomic_write_json(run_dir / CONFIRM, result)
        s = result["summary"]["val_balanced_accuracy"]
        echo(f"confirmation: validation balanced accuracy {s['mean']:.4f} ± {s['std']:.4f} over seeds {seeds}")
    best = _saved(run_dir / BEST / "metrics.json", row["trial"])
    if best is None:
        best = export_trial(run, row, run_dir / BEST, data)
    t = best["test"]
    echo(f"exported the best student to {shown(run_dir / BEST)}; held-out test (evaluated once): balanced accuracy "
         f"{t['balanced_accuracy']:.4f}, accuracy {t['accuracy']:.4f}, "
         + ", ".join(f"recall {c} {r:.3f}" for c, r in t["recall"].items()))
    write_report(run)
    echo(f"summary: {shown(run_dir / 'summary.md')}; table: {shown(run_dir / 'trials.csv')}; "
         f"plots: {shown(run_dir / 'plots')}")
