"""After the trials: re-rank the top trials over further seeds, export the winner, test it once, write the report.

Selection uses validation only (pooled out-of-fold predictions when cross-validated). The winner of the
re-ranking (search.rerank) is exported: with folds, a final student refitted on all of train + validation with
the winner's config and epochs, its threshold tuned on the winner's out-of-fold predictions; with a holdout,
the trial's own checkpoint of the epoch that ranked it. The export is evaluated exactly once on the test
split, which nothing in the search has seen.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kd.config import Config
from kd.cost import distill_report
from kd.crossval import Folds, pooled, refit_data
from kd.data import Dataset, load_dataset
from kd.distill import evaluate_model, train_student
from kd.errors import UserError
from kd.export import export_student
from kd.files import atomic_write_json, load_tensors, read_json, save_tensors
from kd.metrics import scalars, tune_threshold
from kd.models import create_model
from kd.selection import THRESHOLD, decision_rule
from kd.teacher import Teacher, load_teacher_model
from kd.train import COMPLETED, load_state
from search.cluster import Prepared, call, prepare_teacher_once, trial_resources
from search.format import params_text, shown
from search.report import write_report
from search.rerank import candidates, rerank
from search.run import BEST, RERANK, RERANK_PROBS, Run, latest_checkpoint


def export_trial(run: Run, row: pd.Series, out_dir: Path, data: Dataset | None = None,
                 teacher: Teacher | None = None) -> dict[str, Any]:
    """Export one trial's last checkpoint; with `data`, evaluate it on validation and (once) on test, and with its
    `teacher` too, measure what the student costs against it."""
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
        if teacher is not None:
            metrics["cost"] = _cost(run, row, tcfg, model, load_teacher_model(tcfg, data, teacher.directory)[0])
    export_student(out_dir, model, tcfg, classes, threshold, metrics)
    return metrics


def export_command(run_dir: str | Path, trial: str | None, out: str | Path) -> str:
    """`kdsearch export`: a chosen trial (default: the best on validation) exported to `out`."""
    run = Run(run_dir)
    if trial:
        row = run.trial(trial)
    elif run.reranking is not None:  # the search's own pick: the re-ranked winner
        row = run.trial(run.reranking.winner)
    else:
        top = run.best_trials(1, within_budget=True)
        if top.empty:
            raise UserError(f"no finished trial within the budget in {run_dir} to export")
        row = top.iloc[0]
    if run.config.search.folds >= 2:  # a cross-validated trial's student is its config refitted on train + val
        metrics = refit_and_export(run, row, load_dataset(run.config.data, progress=False), [], Path(out))
        how = f"refitted on train + validation for {metrics['epoch']} epochs"
    else:
        metrics = export_trial(run, row, Path(out))
        how = f"epoch {metrics['epoch']}"
    return (f"exported trial {row['trial']} ({how}; validation {run.config.search.metric} "
            f"{row[run.config.search.metric]:.4f}, {run.rule_label}) to {out}")


def refit_and_export(run: Run, row: pd.Series, data: Dataset, probs: list[np.ndarray], out_dir: Path) -> dict[str, Any]:
    """Cross-validated searches: the final student trained on all of train + validation with the winner's config and
    epochs (its teacher fine-tuned on the same pool), its threshold tuned on the winner's out-of-fold predictions,
    evaluated once on the test split."""
    tcfg = run.trial_config(row)
    pool = refit_data(data)
    teacher = prepare_teacher_once(tcfg, pool, tcfg.train.epochs)
    state = call(_refit, trial_resources(run.config), tcfg, pool, teacher.logits)
    model = create_model(dataclasses.replace(tcfg.student, pretrained=False), len(data.classes), data.image_size)
    model.load_state_dict(state)
    if not probs:  # no further seeds: the trial's own out-of-fold predictions, saved with its last checkpoint
        ckpt = latest_checkpoint(row["path"])
        saved = load_state(ckpt)["oof_probs"] if ckpt else None
        probs = [saved.numpy()] if saved is not None else []
    threshold = None
    if decision_rule(len(data.classes), tcfg.train.tune_threshold) == THRESHOLD and probs:
        labels = np.tile(pooled(data).labels.numpy(), len(probs))
        threshold = tune_threshold(labels, np.concatenate(probs)[:, 1])
    metrics: dict[str, Any] = {"trial": row["trial"], "classes": data.classes, "threshold": threshold,
                               "epoch": tcfg.train.epochs, "params": run.params(row), "refit": True,
                               "train_images": len(pool.train), "teacher": teacher.info.to_dict(),
                               "val_last_epoch": {k: row[k] for k in row.index if k.startswith("val_")
                                                  and not pd.isna(row[k])},
                               "test": evaluate_model(model, data, "test", threshold, tcfg)}
    metrics["cost"] = _cost(run, row, tcfg, model, load_teacher_model(tcfg, pool, teacher.directory)[0])
    export_student(out_dir, model, tcfg, data.classes, threshold, metrics)
    return metrics


def _cost(run: Run, row: pd.Series, cfg: Config, model: torch.nn.Module,
          teacher_model: torch.nn.Module | None) -> dict[str, Any]:
    """The compression report of an exported student against its teacher, both judged as the search judged them:
    the teacher by its validation figure (the mean over its folds), the student by the trial's."""
    teacher = run.teacher
    student_figure = {"balanced_accuracy": float(row["val_balanced_accuracy"])}
    return distill_report(cfg, model, teacher_model, teacher.metrics if teacher else None, student_figure)


def _refit(cfg: Config, data: Dataset, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    result = train_student(cfg, data, logits, progress=False)
    if result.status != COMPLETED:
        raise UserError(f"the final student diverged when refitted on train + validation (epoch "
                        f"{len(result.history)}); its config: {cfg.distill}, lr {cfg.train.lr}")
    return {k: v.detach().cpu() for k, v in result.model.state_dict().items()}


def _saved(path: Path, trial: str | None = None, **match: Any) -> dict[str, Any] | None:
    """A record a resumed search already wrote (for this trial and these settings), else None."""
    saved = read_json(path)
    if not saved or (trial is not None and saved.get("trial") != trial):
        return None
    return saved if all(saved.get(k) == v for k, v in match.items()) else None


def finalize(run_dir: Path, data: Dataset, prepared: Prepared, echo: Callable[[str], None] = print) -> None:
    """Re-rank the top trials with further seeds, export the winner (refitted when cross-validated), test it once,
    write the report."""
    run = Run(run_dir, refresh=False)  # mirrored (if remote) when the trials ended
    cfg = run.config
    top = run.best_trials(1, within_budget=True)
    if top.empty:
        echo("no trial finished successfully within the budget (search.max_params, search.max_latency_ms): nothing "
             "to re-rank or export (see trials.csv)")
        write_report(run)
        return
    row = top.iloc[0]
    metric = cfg.search.metric
    echo(f"best trial {row['trial']} ({row['status']}): {metric} {row[metric]:.4f} with {params_text(run.params(row))}")
    seeds = [cfg.train.seed + i for i in range(1, cfg.search.confirm_seeds + 1)]
    probs: list[np.ndarray] = []
    if seeds:
        record = _saved(run_dir / RERANK, seeds=seeds)
        if record is None:
            chosen = candidates(run)
            echo(f"re-ranking {len(chosen)} candidates (the top {cfg.search.rerank} and the hand-picked points) "
                 f"with {len(seeds)} further seeds ...")
            record, probs = rerank(run, prepared, seeds, chosen)
            if probs and isinstance(prepared.data, Folds):  # the winner's out-of-fold probabilities: the refit's
                # threshold, after a resume too
                save_tensors(run_dir / RERANK_PROBS, {"probs": torch.from_numpy(np.stack(probs))}, {})
            atomic_write_json(run_dir / RERANK, record)
        elif (run_dir / RERANK_PROBS).is_file():
            probs = list(load_tensors(run_dir / RERANK_PROBS)[0]["probs"].numpy())
        for entry in record["candidates"]:
            echo(f"  {entry['trial']}: {metric} {entry['mean']:.4f} ± {entry['std']:.4f} over seeds {seeds} "
                 f"(in the search {entry['search_value']:.4f})" + (f", hand-picked {entry['hand_picked']}"
                                                                    if entry["hand_picked"] else ""))
        row = run.trial(record["winner"])
        echo(f"winner: {row['trial']} (the best mean over the further seeds)")
        for c in record["against_points"]:
            echo(f"  against hand-picked {c['point']}: the winner {c['verdict']} "
                 f"({c['difference']:+.4f} paired over {c['seeds']} seeds)")
    best = _saved(run_dir / BEST / "metrics.json", row["trial"])
    if best is None:
        if isinstance(prepared.data, Folds):
            echo("refitting the winner on all of train + validation ...")
            best = refit_and_export(run, row, data, probs, run_dir / BEST)
        else:
            best = export_trial(run, row, run_dir / BEST, data, prepared.teachers[0])
    t = best["test"]
    echo(f"exported the best student to {shown(run_dir / BEST)}; held-out test (evaluated once): balanced accuracy "
         f"{t['balanced_accuracy']:.4f}, accuracy {t['accuracy']:.4f}, "
         + ", ".join(f"recall {c} {r:.3f}" for c, r in t["recall"].items()))
    if best.get("cost"):
        echo(best["cost"]["summary"])
    write_report(run)
    echo(f"summary: {shown(run_dir / 'summary.md')}; table: {shown(run_dir / 'trials.csv')}; "
         f"plots: {shown(run_dir / 'plots')}")
