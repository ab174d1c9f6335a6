"""After the trials: confirm the best config over further seeds, export it, test it once, write the report.

Selection uses validation only. The winner is retrained with `search.confirm_seeds` other seeds (as Ray
tasks, with the trials' resources) and reported as mean +- std; the exported student is evaluated exactly
once on the test split, which nothing in the search has seen.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from kd.files import atomic_write_json
from search.format import shown
from kd.config import Config
from kd.data import Dataset
from kd.errors import UserError
from kd.export import export_student
from kd.models import create_model
from kd.train import load_state
from search.analyze import best_trials, load_run, load_trials, trial_config, write_report
from search.trainable import STATE_FILE, numeric

log = logging.getLogger("search")
CONFIRM_METRICS = ("val_balanced_accuracy", "val_balanced_accuracy_tuned", "val_accuracy", "val_macro_f1")


def latest_checkpoint(trial_dir: str) -> str | None:
    found = sorted(glob.glob(os.path.join(trial_dir, "checkpoint_*", STATE_FILE)))
    return found[-1] if found else None


def export_trial(cfg: Config, row: pd.Series, classes: list[str], out_dir: Path,
                 data: Dataset | None = None) -> dict[str, Any]:
    """Export one trial's last checkpoint; with `data`, evaluate it on validation and (once) on test."""
    ckpt = latest_checkpoint(row["path"])
    if ckpt is None:
        raise UserError(f"trial {row['trial']} has no checkpoint to export (status: {row['status']})")
    tcfg = trial_config(cfg, row)
    state = load_state(ckpt)
    model = create_model(dataclasses.replace(tcfg.student, pretrained=False), len(classes), tcfg.data.image_size)
    model.load_state_dict(state["model"])
    last = state["history"][-1]
    threshold = last.get("threshold")
    metrics: dict[str, Any] = {"trial": row["trial"], "classes": classes, "threshold": threshold,
                               "epoch": last["epoch"], "params": {k: row[k] for k in cfg.search.space
                                                                   if k in row and not pd.isna(row[k])},
                               "val_last_epoch": numeric(last)}
    if data is not None:
        from kd.distill import evaluate_model
        metrics["val"] = evaluate_model(model, data, "val", threshold, tcfg)
        metrics["test"] = evaluate_model(model, data, "test", threshold, tcfg)
    export_student(out_dir, model, tcfg, classes, threshold, metrics)
    return metrics


def confirm(cfg: Config, row: pd.Series, data: Dataset, logits: Any, seeds: list[int]) -> dict[str, Any]:
    """Retrain the trial's config with each seed, in parallel Ray tasks; mean and std of the validation metrics."""
    import ray

    tcfg = trial_config(cfg, row)
    gpus = cfg.search.gpus_per_trial if ray.cluster_resources().get("GPU", 0) > 0 else 0

    @ray.remote
    def retrain(cfg_dict: dict, data: Dataset, logits: Any, threads: int) -> dict[str, Any]:
        import torch

        from kd.config import from_dict
        from kd.distill import train_student
        torch.set_num_threads(threads)
        result = train_student(from_dict(cfg_dict), data, logits, progress=False)
        return numeric(result.history[-1]) if result.status == "completed" else {"status": "diverged"}

    data_ref, logits_ref = ray.put(data), ray.put(logits)
    threads = max(1, int(cfg.search.cpus_per_trial))
    jobs = [retrain.options(num_gpus=gpus, num_cpus=cfg.search.cpus_per_trial)
            .remote(tcfg.updated({"train.seed": s}).to_dict(), data_ref, logits_ref, threads) for s in seeds]
    runs = ray.get(jobs)
    reported = {k for r in runs for k in r}  # no tuned threshold beyond two classes
    names = [n for n in CONFIRM_METRICS if n in reported] + sorted(k for k in reported if k.startswith("val_recall_"))
    summary = {}
    for name in names:
        values = np.array([r.get(name, np.nan) for r in runs], dtype=float)
        summary[name] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values, ddof=1)) if len(values) > 1
                         else 0.0, "values": values.tolist()}
    return {"trial": row["trial"], "seeds": seeds, "runs": runs, "summary": summary,
            "search_value": {n: (None if pd.isna(row.get(n)) else float(row[n])) for n in names if n in row}}


def _cached(path: Path, trial: str, **match: Any) -> dict[str, Any] | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("trial") == trial and all(saved.get(k) == v for k, v in match.items()) else None


def finalize(cfg: Config, run_dir: Path, data: Dataset, teacher: Any, echo: Callable[[str], None] = print) -> None:
    _, exp = load_run(run_dir, refresh=False)  # mirrored (if remote) when the trials ended
    table, _ = load_trials(cfg, exp, run_dir)
    top = best_trials(cfg, table, 1)
    if top.empty:
        echo("no trial finished successfully: nothing to confirm or export (see trials.csv for the errors)")
        write_report(run_dir, refresh=False)
        return
    row = top.iloc[0]
    params = ", ".join(f"{k}={_short(row[k])}" for k in cfg.search.space if k in row and not pd.isna(row[k]))
    echo(f"best trial {row['trial']} ({row['status']}): {cfg.search.metric} {row[cfg.search.metric]:.4f} with {params}")
    seeds = [cfg.train.seed + i for i in range(1, cfg.search.confirm_seeds + 1)]
    if seeds:
        result = _cached(run_dir / "confirm.json", row["trial"], seeds=seeds)
        if result is None:
            echo(f"confirming it with {len(seeds)} further seeds ...")
            result = confirm(cfg, row, data, teacher.logits, seeds)
            atomic_write_json(run_dir / "confirm.json", result)
        s = result["summary"]["val_balanced_accuracy"]
        echo(f"confirmation: validation balanced accuracy {s['mean']:.4f} ± {s['std']:.4f} over seeds {seeds}")
    best = _cached(run_dir / "best" / "metrics.json", row["trial"])
    if best is None:
        best = export_trial(cfg, row, data.classes, run_dir / "best", data)
    t = best["test"]
    echo(f"exported the best student to {shown(run_dir / 'best')}; held-out test (evaluated once): balanced accuracy "
         f"{t['balanced_accuracy']:.4f}, accuracy {t['accuracy']:.4f}, "
         + ", ".join(f"recall {c} {r:.3f}" for c, r in t["recall"].items()))
    write_report(run_dir, refresh=False)
    echo(f"summary: {shown(run_dir / 'summary.md')}; table: {shown(run_dir / 'trials.csv')}; "
         f"plots: {shown(run_dir / 'plots')}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
