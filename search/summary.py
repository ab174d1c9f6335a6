"""summary.md: what a person reads first after a search."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd.config import Config
from search.analyze import best_trials, searched_keys

SHORT = {"distill.mode": "mode", "distill.temperature": "T", "distill.alpha": "alpha", "train.lr": "lr",
         "imbalance.method": "imbalance", "imbalance.beta": "beta", "imbalance.tau": "tau"}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_rows(metrics: dict[str, Any], classes: list[str]) -> list[tuple[str, Any]]:
    return [("accuracy", metrics["accuracy"]), ("balanced accuracy", metrics["balanced_accuracy"]),
            *[(f"recall {c}", metrics["recall"][c]) for c in classes], ("macro F1", metrics["macro_f1"])]


def _point_trial(table: pd.DataFrame, point: dict[str, Any]) -> pd.Series | None:
    """The first trial that ran a `search.points` entry (every given key at its given value)."""
    if not len(table) or any(k not in table.columns for k in point):
        return None
    same = np.ones(len(table), dtype=bool)
    for key, value in point.items():
        column = table[key]
        same &= np.isclose(column.astype(float), float(value)) if isinstance(value, (int, float)) and \
            not isinstance(value, bool) and pd.api.types.is_numeric_dtype(column) else (column == value).to_numpy()
    found = table[same].sort_values("number")
    return found.iloc[0] if len(found) else None


def _points_against_best(cfg: Config, table: pd.DataFrame, top: pd.DataFrame, classes: list[str]) -> list[str]:
    """The hand-picked settings (`search.points`, e.g. the seeds' own) beside what the search found."""
    rows = []
    for i, point in enumerate(cfg.search.points):
        r = _point_trial(table, point)
        if r is not None:
            what = ", ".join(f"{SHORT.get(k, k)} {_fmt(v)}" for k, v in point.items())
            rows.append([f"hand-picked {i + 1}: {what}", r])
    if not rows or not len(top):
        return []
    rows.append(["best found by the search: " + ", ".join(f"{SHORT.get(k, k)} {_fmt(top.iloc[0][k])}"
                                                          for k in searched_keys(cfg, table)
                                                          if not pd.isna(top.iloc[0][k])), top.iloc[0]])
    recall = [c for c in classes if f"val_recall_{c}" in table.columns]
    header = ["setting", "trial", "bal. acc", "acc", *[f"recall {c}" for c in recall], "epochs", "status"]
    body = [[what, r["trial"], r["val_balanced_accuracy"], r["val_accuracy"],
             *[r[f"val_recall_{c}"] for c in recall], r["epochs"], r["status"]] for what, r in rows]
    return ["## Hand-picked settings against the search (validation)", "",
            "The settings in `search.points` ran first, as ordinary trials (ASHA may stop them too):", "",
            _table(header, body), ""]


def summary_markdown(cfg: Config, run_dir: Path, table: pd.DataFrame) -> str:
    run, teacher = _read(run_dir / "run.json") or {}, _read(run_dir / "teacher.json")
    confirm, best = _read(run_dir / "confirm.json"), _read(run_dir / "best" / "metrics.json")
    classes = run.get("classes") or [k.removeprefix("val_recall_") for k in table.columns
                                     if k.startswith("val_recall_")]
    metric = cfg.search.metric
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    status = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials yet"
    out = [f"# Search `{cfg.name}`", "",
           f"{cfg.search.num_samples} trials of `{cfg.student.name}` distilled from `{cfg.teacher.name}` "
           f"({run.get('data', cfg.data.source)}), optimising `{metric}` ({cfg.search.mode}) with Optuna TPE"
           f"{' and ASHA early stopping' if cfg.search.scheduler == 'asha' else ''}. "
           f"Trials so far: {len(table)} ({status}).", ""]
    if run.get("seconds"):
        out[-1:] = [f"Wall time of the whole search: {run['seconds'] / 60:.1f} min.", ""]

    out += ["## Teacher", ""]
    if teacher:
        info, m = teacher["info"], teacher["metrics"]
        how = "found in the cache" if info.get("cached") else f"fine-tuned in {info.get('finetune_seconds', 0):.1f} s"
        logits = (f"{info['forward_images']} forward passes to cache its logits for every training view"
                  if info.get("forward_images") else "its logits for every training view found in the cache")
        out += [f"`{cfg.teacher.name}`, prepared once before the trials ({how}; {logits}; the trials ran no "
                "teacher forward pass).", "",
                _table(["validation", "value"], _metric_rows(m, classes)), ""]
    else:
        out += ["Not prepared yet.", ""]

    keys = searched_keys(cfg, table) if len(table) else []
    top = best_trials(cfg, table, 10) if len(table) else table
    out += ["## Top trials (validation)", ""]
    if len(top):
        recall = [f"val_recall_{c}" for c in classes if f"val_recall_{c}" in top.columns]
        header = ["trial", *[SHORT.get(k, k) for k in keys], "bal. acc", "acc", "macro F1",
                  *[f"recall {c}" for c in classes[:len(recall)]], "epochs", "status"]
        rows = [[r["trial"], *[r.get(k) for k in keys], r["val_balanced_accuracy"], r["val_accuracy"],
                 r["val_macro_f1"], *[r[c] for c in recall], r["epochs"], r["status"]] for _, r in top.iterrows()]
        out += [_table(header, rows), ""]
    else:
        out += ["No trial has finished yet.", ""]
    failed = table[table["status"] == "failed"] if len(table) else table
    if len(failed):
        out += ["Failed trials: " + "; ".join(f"`{r['trial']}`: {r['error']}" for _, r in failed.iterrows()), ""]

    out += _points_against_best(cfg, table, top, classes)

    if "distill.mode" in table.columns and len(top):
        ranked = best_trials(cfg, table, len(table))
        soft, hard = ranked[ranked["distill.mode"] == "soft"].head(1), ranked[ranked["distill.mode"] == "hard"].head(1)
        if len(soft) and len(hard):
            s, h = soft.iloc[0], hard.iloc[0]
            rows = [["trial", s["trial"], h["trial"]], ["accuracy", s["val_accuracy"], h["val_accuracy"]],
                    ["balanced accuracy", s["val_balanced_accuracy"], h["val_balanced_accuracy"]],
                    *[[f"recall {c}", s[f"val_recall_{c}"], h[f"val_recall_{c}"]] for c in classes],
                    ["macro F1", s["val_macro_f1"], h["val_macro_f1"]]]
            out += ["## Best soft vs best hard distillation (validation)", "", _table(["", "soft", "hard"], rows), ""]

    out += ["## Confirmation over further seeds (validation)", ""]
    if confirm:
        rows = [[name, f"{v['mean']:.4f} ± {v['std']:.4f}", _fmt(confirm['search_value'].get(name))]
                for name, v in confirm["summary"].items()]
        out += [f"The best trial's config (`{confirm['trial']}`) retrained with seeds {confirm['seeds']} "
                "(student initialisation, sample order, dropout); mean ± std:", "",
                _table(["metric", "mean ± std", "in the search"], rows), ""]
    else:
        out += ["Not run yet (it follows the search).", ""]

    out += ["## Exported best student: held-out test split (evaluated once)", ""]
    if best:
        t = best["test"]
        thr = f"; decision threshold {best['threshold']:.4f} on p({classes[1]}), chosen on validation" \
            if best.get("threshold") is not None else ""
        out += [f"Trial `{best['trial']}`, exported to `best/`{thr}.", "",
                _table(["test", "value"], _metric_rows(t, classes)), "",
                "![confusion matrix](plots/confusion_matrix_test.png)", ""]
    else:
        out += ["Not exported yet (it follows the search).", ""]

    out += ["## Plots", ""]
    for name, title in (("trials.png", "balanced accuracy per trial"), ("importance.png", "parameter importance"),
                        ("params.png", "each parameter against balanced accuracy"),
                        ("learning_curves.png", "learning curves of the top trials"),
                        ("soft_vs_hard.png", "best soft vs best hard")):
        if (run_dir / "plots" / name).is_file():
            out += [f"![{title}](plots/{name})", ""]
    if len(top):
        out += ["## Reproduce", "", "Every trial's full config is in `configs/`; outside Ray:", "",
                f"    kdsearch distill {run_dir / 'configs' / (top.iloc[0]['trial'] + '.yaml')}", ""]
    return "\n".join(out)
