"""The search's pictures: trials in order, parameter importance, parameters against the metric, curves."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator, NullFormatter

from kd import plots as kplots
from kd.config import Config
from kd.plots import plt, save_figure
from search.analyze import best_trials, searched_keys

log = logging.getLogger("search")
COLOURS = {"completed": "tab:blue", "stopped early": "tab:orange", "failed": "tab:red", "unfinished": "tab:grey"}


def draw_all(cfg: Config, run_dir: Path, table: pd.DataFrame, histories: dict[str, list[dict[str, Any]]]) -> None:
    out = run_dir / "plots"
    if len(table):
        trials_in_order(cfg, table, out / "trials.png")
        params_vs_metric(cfg, table, out / "params.png")
        top = best_trials(cfg, table, 5)
        if len(top):
            kplots.learning_curves({f"{r['trial']} ({r['status']})": histories[r["trial"]] for _, r in top.iterrows()},
                                   out / "learning_curves.png", "top trials")
        soft_vs_hard(cfg, table, out / "soft_vs_hard.png")
        importance(cfg, run_dir, out / "importance.png")
    best = run_dir / "best" / "metrics.json"
    if best.is_file():
        m = json.loads(best.read_text())
        kplots.confusion_matrix(m["test"]["confusion_matrix"], m["classes"], out / "confusion_matrix_test.png",
                                f"best student (trial {m['trial']}) on the held-out test split")


def trials_in_order(cfg: Config, table: pd.DataFrame, path: Path) -> None:
    metric = cfg.search.metric
    fig, ax = plt.subplots(figsize=(9, 4))
    for status, group in table.groupby("status"):
        y = group[metric].fillna(0.0) if status != "failed" else np.zeros(len(group))
        ax.scatter(group["number"], y, label=status, color=COLOURS.get(status, "black"),
                   marker="x" if status == "failed" else "o", zorder=3)
    done = table[table["status"].isin(["completed", "stopped early"])].sort_values("number")
    if len(done):
        running = done[metric].cummax() if cfg.search.mode == "max" else done[metric].cummin()
        ax.step(done["number"], running, where="post", color="black", linewidth=1.2, label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial (in order of start)", ylabel=metric, title=f"{metric} per trial (last epoch run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hides behind it
    save_figure(fig, path)


def params_vs_metric(cfg: Config, table: pd.DataFrame, path: Path) -> None:
    keys = searched_keys(cfg, table)
    if not keys:
        return
    metric = cfg.search.metric
    done = table[table["status"].isin(["completed", "stopped early"])]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    mode_colour = {"soft": "tab:blue", "hard": "tab:green"}
    for ax, key in zip(axes.flat, keys):
        sub = done[done[key].notna()] if key in done else done.iloc[:0]
        colours = [mode_colour.get(m, "tab:grey") for m in sub.get("distill.mode", pd.Series(["?"] * len(sub)))]
        spec = cfg.search.space[key]
        if spec.get("type") == "choice":
            values = [str(v) for v in spec["values"]]
            x = [values.index(str(v)) + np.random.default_rng(i).uniform(-0.15, 0.15) for i, v in enumerate(sub[key])]
            many = len(values) > 2
            ax.set_xticks(range(len(values)), values, rotation=30 if many else 0, ha="right" if many else "center",
                          fontsize=8)
        else:
            x = sub[key].astype(float)
            if spec.get("type") == "loguniform" or spec.get("log"):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.scatter(x, sub[metric], c=colours, s=24, alpha=0.8, edgecolors="none")
        ax.set(title=key, ylabel=metric if ax in axes[:, 0] else "")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("each searched parameter against the metric (blue: soft, green: hard)")
    fig.tight_layout()
    save_figure(fig, path)


def soft_vs_hard(cfg: Config, table: pd.DataFrame, path: Path) -> None:
    if "distill.mode" not in table.columns:
        return
    ranked = best_trials(cfg, table, len(table))
    best = {m: ranked[ranked["distill.mode"] == m].head(1) for m in ("soft", "hard")}
    if any(b.empty for b in best.values()):
        return
    recalls = [c for c in table.columns if c.startswith("val_recall_")]
    names = ["val_accuracy", "val_balanced_accuracy", *recalls, "val_macro_f1"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.8))
    for i, (mode, b) in enumerate(best.items()):
        values = [float(b.iloc[0][n]) for n in names]
        bars = ax.bar(x + (i - 0.5) * 0.38, values, 0.38, label=f"best {mode} (trial {b.iloc[0]['trial']})")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x, [n.removeprefix("val_").replace("_", " ") for n in names], fontsize=8)
    ax.set(ylim=(0, 1.1), title="best soft vs best hard distillation (validation)")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def importance(cfg: Config, run_dir: Path, path: Path) -> None:
    """Optuna's fANOVA importances from the saved study; a conditional parameter among the trials it applies to."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    journal = run_dir / "optuna.journal"
    if not journal.is_file():
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        study = optuna.load_study(study_name=cfg.name, storage=storage)
        trials = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if len(trials) < 3:
            return
        common = set.intersection(*(set(t.params) for t in trials))
        scores: dict[str, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if len(common) >= 1:
                scores.update(get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                                    params=sorted(common)))
            for name in sorted(set().union(*(t.params for t in trials)) - common):
                subset = [t for t in trials if name in t.params]
                if len(subset) < 3:
                    continue
                sub = optuna.create_study(direction=study.direction)
                sub.add_trials(subset)
                local = get_param_importances(sub, evaluator=FanovaImportanceEvaluator(seed=0),
                                              params=sorted(common | {name}))
                scores[f"{name} (where it applies)"] = local[name]
    except Exception as e:  # importance needs variety among trials; say so rather than fail the report
        log.warning("parameter importance not computed: %s", e)
        return
    if not scores:
        return
    names = sorted(scores, key=scores.get)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.4))
    ax.barh(names, [scores[n] for n in names], color=["tab:purple" if "applies" in n else "tab:blue" for n in names])
    ax.set(xlabel="fANOVA importance (share of variance)", title=f"parameter importance for {cfg.search.metric}")
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)
