"""The search's pictures: trials in order, parameter importance, parameters against the metric, curves."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from kd import plots as kplots
from kd.plots import THRESHOLD_FREE, new_figure, save_figure
from search.config import COSTS
from search.records import JOURNAL, RANKED, TrialStatus
from search.run import Run

log = logging.getLogger("search")
# keyed by TrialStatus, a str: the table's plain "completed" finds its colour
COLOURS: dict[str, str] = {TrialStatus.COMPLETED: "tab:blue", TrialStatus.STOPPED: "tab:orange",
                           TrialStatus.FAILED: "tab:red", TrialStatus.UNFINISHED: "tab:grey"}


def colour_of(status: object) -> str:
    """A status's colour; black for anything else (a missing status is NaN)."""
    return COLOURS.get(status, "black") if isinstance(status, str) else "black"


def draw_all(run: Run) -> None:
    out = run.directory / "plots"
    if len(run.table):
        trials_in_order(run, out / "trials.png")
        params_vs_metric(run, out / "params.png")
        top = run.best_trials(5)
        if len(top):
            metric = run.config.search.metric
            exported = run.best.trial if run.best is not None else None
            curves, losses = {}, {}  # by each trial's label: its history, and the mode its loss is a sum of
            for _, r in top.iterrows():
                label = (f"{r['trial']} ({'exported; ' if r['trial'] == exported else ''}{r['status']}, "
                         f"{r.get('distill.mode', '')})").replace(", )", ")")
                curves[label] = run.histories[r["trial"]]
                mode = r.get("distill.mode")
                losses[label] = mode if isinstance(mode, str) else run.config.distill.mode
            kplots.learning_curves(curves, out / "learning_curves.png", f"the top trials by {metric}", run.rule_label,
                                   metric, len(run.classes), losses=losses)
        soft_vs_hard(run, out / "soft_vs_hard.png")
        pareto(run, out / "pareto.png")
        importance(run, out / "importance.png")
        timeline(run, out / "timeline.png")
    best = run.best
    if best is not None:
        rule = "argmax" if best.threshold is None else f"p({best.classes[1]}) >= {best.threshold:.3f}"
        kplots.confusion_matrix(best.test["confusion_matrix"], best.classes, out / "confusion_matrix_test.png",
                                f"the exported {best.final} (trial {best.trial}'s config)\non the held-out test "
                                f"split, at {rule}")


def trials_in_order(run: Run, path: Path) -> None:
    cfg, table = run.config, run.table
    metric = cfg.search.metric
    fig = new_figure((9, 4))
    ax = fig.subplots()
    for status, group in table.groupby("status"):
        y = group[metric].fillna(0.0) if status != TrialStatus.FAILED else np.zeros(len(group))
        ax.scatter(group["number"], y, label=status, color=colour_of(status),
                   marker="x" if status == TrialStatus.FAILED else "o", zorder=3)
    done = table[table["status"].isin(RANKED)].sort_values("number")
    if len(done):
        running = done[metric].cummax() if cfg.search.direction == "max" else done[metric].cummin()
        ax.step(done["number"], running, where="post", color="black", linewidth=1.2, label="best so far")
    marked = [(run.best.trial if run.best is not None else None, "exported", "*", 260)]
    marked += [(r["trial"], f"hand-picked {i + 1}", "D", 90) for i, point in enumerate(cfg.search.points)
               if (r := run.point_trial(point)) is not None]
    last = table["number"].max() if len(table) else 0
    marks = []  # (trial number, figure, trial, what, marker, size), left to right
    for trial, what, marker, size in marked:
        found = table[table["trial"] == trial]
        if len(found) and pd.notna(found.iloc[0][metric]):
            marks.append((found.iloc[0]["number"], found.iloc[0][metric], trial, what, marker, size))
    marks.sort(key=lambda m: m[0])
    near = max(2, last / 5)  # a label runs about two trials wide, level with its point and the next mark
    above = False
    for i, (x, y, trial, what, marker, size) in enumerate(marks):
        ax.scatter([x], [y], s=size, marker=marker, facecolors="none", edgecolors="black", zorder=6)
        left = x > last - max(1, last / 8)  # near the right edge: the label to the left, not cut by the frame
        # close marks: the first label on the side away from the next mark, then each on the other side by turns
        after = marks[i + 1] if i + 1 < len(marks) and marks[i + 1][0] - x <= near else None
        follows = i > 0 and x - marks[i - 1][0] <= near
        above = not above if follows else (after is not None and after[1] <= y)
        ax.annotate(f"{trial}\n{what}", (x, y), textcoords="offset points", xytext=(-6 if left else 6,
                    8 if above else -18), fontsize=7, ha="right" if left else "left", zorder=5,
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    if len(marks) > 1:  # room above the top mark for a label
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.08 * (high - low))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rule = _rule_note(run, metric)
    ax.set(xlabel="trial, in order of start (the table's trial ids at the marked ones)", ylabel=metric,
           title=f"{metric} per trial, at its last epoch{rule}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hides behind it
    save_figure(fig, path)


def _rule_note(run: Run, metric: str) -> str:
    """` (the decision rule)` for a figure that has one; nothing for AUC and the log-loss, which judge probabilities."""
    return "" if metric in THRESHOLD_FREE else f" ({run.rule_label})"


def mark_exported(ax: Any, x: Any, y: Any, trial: str | None = None) -> None:
    """The exported trial's point ringed with a star (the same mark in every picture); `trial` labels it for the
    legend."""
    ax.scatter(x, y, s=200, marker="*", facecolors="none", edgecolors="black", linewidths=1.0, zorder=4,
               label=exported_handle(trial).get_label() if trial else None)


def exported_handle(trial: str) -> Line2D:
    return Line2D([], [], marker="*", markersize=11, linestyle="", markerfacecolor="none", color="black",
                  label=f"exported ({trial})")


def log_axis(ax: Any, low: float, high: float) -> None:
    """A log x axis labelled in plain numbers: its decades where it spans several, else a few values between
    (matplotlib's default labels a narrow log axis "1.4x10^0 1.6x10^0 ...", overlapping)."""
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    if high / low < 100:
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())


def params_vs_metric(run: Run, path: Path) -> None:
    cfg, table = run.config, run.table
    keys = run.searched_keys()
    if not keys:
        return
    metric = cfg.search.metric
    done = table[table["status"].isin(RANKED)]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig = new_figure((4.2 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    mode_colour = {"soft": "tab:blue", "hard": "tab:green"}
    exported = run.best.trial if run.best is not None else None
    for ax, key in zip(axes.flat, keys, strict=False):
        sub = done[done[key].notna()] if key in done else done.iloc[:0]
        colours = [mode_colour.get(m, "tab:grey") for m in sub.get("distill.mode", pd.Series(["?"] * len(sub)))]
        spec = cfg.search.space[key]
        x: list[float] | pd.Series[float]
        if spec.get("type") == "choice":
            values = [str(v) for v in spec["values"]]
            x = [values.index(str(v)) + np.random.default_rng(i).uniform(-0.15, 0.15) for i, v in enumerate(sub[key])]
            many = len(values) > 2
            ax.set_xticks(range(len(values)), values, rotation=30 if many else 0, ha="right" if many else "center",
                          fontsize=8)
            ax.set_xlim(-0.5, len(values) - 0.5)  # every choice in view, tried or not
        else:
            x = sub[key].astype(float)
            if spec.get("type") == "loguniform" or spec.get("log"):
                log_axis(ax, float(spec["low"]), float(spec["high"]))
        stopped = (sub["status"] != TrialStatus.COMPLETED).to_numpy() if len(sub) else np.zeros(0, dtype=bool)
        xs = np.asarray(x, dtype=float)
        ys = sub[metric].to_numpy(dtype=float)
        ax.scatter(xs[~stopped], ys[~stopped], c=[c for c, s in zip(colours, stopped, strict=True) if not s], s=24,
                   alpha=0.8, edgecolors="none")
        ax.scatter(xs[stopped], ys[stopped], facecolors="none", s=24, alpha=0.8,
                   edgecolors=[c for c, s in zip(colours, stopped, strict=True) if s])
        mark_exported(ax, xs[(sub["trial"] == exported).to_numpy()], ys[(sub["trial"] == exported).to_numpy()])
        ax.set(title=key, ylabel=metric if ax in axes[:, 0] else "")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    rule = _rule_note(run, metric)
    fig.suptitle(f"each searched parameter against {metric}{rule}, each trial at its last epoch")
    key_handles = [Line2D([], [], marker="o", linestyle="", color=c, label=f"{m} distillation")
                   for m, c in mode_colour.items()]
    if (done["status"] != TrialStatus.COMPLETED).any():
        key_handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="grey",
                                  label="stopped early (an earlier epoch's figure)"))
    if exported is not None:
        key_handles.append(exported_handle(exported))
    fig.legend(handles=key_handles, loc="lower center", ncol=len(key_handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path)


def soft_vs_hard(run: Run, path: Path) -> None:
    table = run.table
    if "distill.mode" not in table.columns:
        return
    ranked = run.best_trials(len(table))
    best = {m: ranked[ranked["distill.mode"] == m].head(1) for m in ("soft", "hard")}
    if any(b.empty for b in best.values()):
        return
    recalls = [c for c in table.columns if c.startswith("val_recall_")]
    names = ["val_accuracy", "val_balanced_accuracy", *recalls, "val_macro_f1"]
    x = np.arange(len(names))
    fig = new_figure((1.4 * len(names) + 2, 3.8))
    ax = fig.subplots()
    exported = run.best.trial if run.best is not None else None
    for i, (mode, b) in enumerate(best.items()):
        values = [float(b.iloc[0][n]) for n in names]
        trial = b.iloc[0]["trial"]
        bars = ax.bar(x + (i - 0.5) * 0.38, values, 0.38, label=f"best {mode} (trial {trial}"
                      f"{', exported' if trial == exported else ''}, epoch {int(b.iloc[0]['epochs'])})")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x, [n.removeprefix("val_").replace("_", " ") for n in names], fontsize=8)
    epochs = {int(b.iloc[0]["epochs"]) for b in best.values()}
    unlike = "\nat different epochs (ASHA stopped one earlier): not like for like" if len(epochs) > 1 else ""
    ax.set(ylim=(0, 1.1), title=f"best soft vs best hard distillation, by {run.config.search.metric} "
           f"({run.rule_label}){unlike}")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)  # below: it hides no bar
    save_figure(fig, path)


def importance(run: Run, path: Path) -> None:
    """Optuna's fANOVA importances from the saved study; a conditional parameter among the trials it applies to."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    cfg = run.config
    journal = run.directory / JOURNAL
    if not journal.is_file():
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = JournalStorage(JournalFileBackend(str(journal)))
        study = optuna.load_study(study_name=cfg.name, storage=storage)
        trials = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if len(trials) < 3:
            return
        common = set.intersection(*(set(t.params) for t in trials))
        # for search.metric: a multi-objective study's first objective (its costs follow from student.name alone)
        target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
        scores: dict[str, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if len(common) >= 1:
                scores.update(get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                                    params=sorted(common), target=target))
            for name in sorted(set().union(*(t.params for t in trials)) - common):
                subset = [t for t in trials if name in t.params]
                if len(subset) < 3:
                    continue
                sub = optuna.create_study(directions=study.directions)
                sub.add_trials(subset)
                local = get_param_importances(sub, evaluator=FanovaImportanceEvaluator(seed=0),
                                              params=sorted(common | {name}), target=target)
                scores[f"{name} (where it applies)"] = local[name]
    except Exception as e:  # importance needs variety among trials; say so rather than fail the report
        log.warning("parameter importance not computed: %s", e)
        return
    if not scores:
        return
    names = sorted(scores, key=lambda n: scores[n])
    fig = new_figure((7, 0.45 * len(names) + 1.4))
    ax = fig.subplots()
    ax.barh(names, [scores[n] for n in names], color=["tab:purple" if "applies" in n else "tab:blue" for n in names])
    ax.set(xlabel="fANOVA importance (share of variance)", title=f"parameter importance for {cfg.search.metric} "
           f"(fANOVA over the {len(trials)} trials that ran every epoch)")
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)


COST_LABELS = {"student_latency_ms": "latency at batch 1 (ms)", "student_params": "parameters",
               "student_mflops": "MFLOPs (torch's flop counter)"}


def pareto(run: Run, path: Path) -> None:
    """The metric against what the student costs (the search's cost objectives, else latency and parameters), each
    trial a point (hollow: stopped early, so off the front), the front of the trials that ran every epoch joined."""
    metric = run.config.search.metric
    done = run.best_trials(len(run.table))
    if not len(done) or "student_latency_ms" not in done or done["student_latency_ms"].isna().all():
        return
    costs = list(dict.fromkeys([n for n in run.objectives if n in COSTS] + ["student_latency_ms", "student_params"]))
    if run.costs_alike:
        return  # a column of points at one cost is no front (summary.md says why)
    students = done.get("student.name", pd.Series([run.config.student.name] * len(done), index=done.index))
    full = done["status"] == TrialStatus.COMPLETED
    exported = done[done["trial"] == run.best.trial] if run.best is not None else done.iloc[:0]
    fig = new_figure((11, 4))
    axes = fig.subplots(1, 2)
    for ax, cost in zip(axes, costs, strict=False):
        for k, name in enumerate(sorted(set(students))):
            colour = f"C{k}"
            mine = done[(students == name) & full]
            ax.scatter(mine[cost], mine[metric], label=name, s=28, alpha=0.8, color=colour)
            stopped = done[(students == name) & ~full]
            ax.scatter(stopped[cost], stopped[metric], s=28, facecolors="none", edgecolors=colour,
                       label=f"{name}, stopped early" if len(stopped) else None)
        front = run.front([metric, cost])
        ax.step(front[cost], front[metric], where="post", color="black", linewidth=1.2)
        own_front = run.objectives == [metric, cost]  # this panel's front is the search's own
        ax.scatter(front[cost], front[metric], s=90, facecolors="none", edgecolors="black", linewidths=1.2,
                   label="the front (trials that ran every epoch)" if own_front else None)
        if len(exported):
            mark_exported(ax, exported[cost], exported[metric], str(exported.iloc[0]["trial"]))
        if not own_front:
            ax.set_title(f"front of {metric} against this cost alone", fontsize=9)
        ax.set(xlabel=COST_LABELS[cost], ylabel=metric if ax is axes[0] else "")
        if cost == "student_params":  # 372,000 reads as 0.37M, and five ticks do not overlap
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:.2f}M"))
        values = done[cost].dropna()
        if len(values) and values.min() > 0 and values.max() / values.min() >= 10:  # a log axis spans decades
            log_axis(ax, float(values.min()), float(values.max()))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # the first panel's front is the search's (or summary's)
    axes[1].legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    searched = ", the search's objectives" if run.config.search.objectives else ""
    rule = _rule_note(run, metric)
    fig.suptitle(f"accuracy against what the student costs{searched}{rule}\n"
                 "each student's cost measured once before the trials, on a trial's device", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def timeline(run: Run, path: Path) -> None:
    """When each trial ran and on which Ray node (and GPU): one row per trial, in order of start, a bar from its
    first start to its last report (a retried trial's bar spans its retry), labelled with its id (and "exported"
    for the winner) and, where there are several, the node and GPU it finished on. The height stops growing at 200
    trials (matplotlib's image size limit); the bars get thinner."""
    table = run.table
    if "started" not in table.columns or table["started"].isna().all():
        return
    ran = table[table["started"].notna() & table["ended"].notna()].copy()
    ran["slot"] = [f"node {str(n)[:8]}" + (f" GPU {g}" if str(g) not in ("", "nan") else "")
                   for n, g in zip(ran["node"], ran["gpus"], strict=True)]
    slots = sorted(ran["slot"].unique())
    t0 = ran["started"].min()
    fig = new_figure((9, 1.2 + 0.5 * min(len(ran), 200)))
    ax = fig.subplots()
    for row, (_, trial) in enumerate(ran.sort_values("started").iterrows()):
        ax.barh(row, trial["ended"] - trial["started"], left=trial["started"] - t0,
                color=colour_of(trial["status"]), alpha=0.8)
        shipped = " (exported)" if run.best is not None and trial["trial"] == run.best.trial else ""
        where = f" · {trial['slot']}" if len(slots) > 1 else ""  # one node: the title says so, once
        ax.text(trial["ended"] - t0, row, f" {trial['trial']}{shipped}{where}", va="center", fontsize=7)
    ax.set_xlim(0, (ran["ended"].max() - t0) * (1.3 if len(slots) > 1 else 1.2))  # room for the last bars' labels
    ax.set_yticks([])
    where = f"{len(slots)} slots (node, GPU)" if len(slots) > 1 else "one node"
    ax.set(xlabel="seconds since the first trial started", title=f"trials over time, on {where}")
    ax.legend(handles=[Patch(color=colour_of(status), alpha=0.8, label=str(status))
                       for status in dict.fromkeys(ran["status"])], fontsize=8, loc="upper left")
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
