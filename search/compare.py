"""`kdsearch compare`: several searches side by side (a search per teacher, per student family, per image size).

One row per run directory: its winner and student, the test figure with its 95% interval, the student's size,
FLOPs and latency, the wall time and the trials' slot-hours (GPU-hours where the trials ran on GPUs), read through
each run's typed model (search.run). Written as compare.csv and compare.md, with compare.png: the test figure and
its interval against the student's latency, one point per search.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from kd.errors import UserError
from kd.files import atomic_write_text
from kd.plots import new_figure, save_figure
from search.format import number, params_text
from search.run import Run, attempt_spans

COLUMNS = ["search", "teacher", "student", "trials", "how", "metric", "winner", "parameters", "test balanced accuracy",
           "95% interval", "test AUC", "student params", "student MFLOPs", "student latency ms", "wall s",
           "trial slot-hours", "GPU-hours"]


def row_of(run: Run) -> dict[str, Any]:
    """One search in one row (empty figures where it has not exported a student yet)."""
    cfg, best = run.config, run.best
    table = run.table
    row: dict[str, Any] = {
        "search": run.directory.name, "teacher": cfg.teacher.name,
        "student": (best.params.get("student.name") if best else None) or cfg.student.name,
        "trials": len(table), "how": run.scheme.describe(cfg), "metric": cfg.search.metric,
        "winner": best.trial if best else "not exported yet", "parameters": params_text(best.params) if best else "",
    }
    test = best.test if best else {}
    interval = test.get("balanced_accuracy_interval")
    row["test balanced accuracy"] = test.get("balanced_accuracy", math.nan)
    row["95% interval"] = f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else ""
    row["test AUC"] = test.get("auc", math.nan)
    chosen = table[table["trial"] == best.trial] if best is not None and len(table) else table.iloc[:0]
    for key, column in (("student_params", "student params"), ("student_mflops", "student MFLOPs"),
                        ("student_latency_ms", "student latency ms")):
        row[column] = float(chosen[key].iloc[0]) if len(chosen) and key in chosen else math.nan
    record = run.record
    row["wall s"] = record.seconds if record and record.seconds is not None else math.nan
    spans = _trial_seconds(run)
    row["trial slot-hours"] = spans / 3600
    on_gpu = len(table) and "device" in table and table["device"].astype(str).str.startswith("cuda").any()
    row["GPU-hours"] = spans / 3600 * cfg.search.gpus_per_trial if on_gpu else 0.0
    return row


def _trial_seconds(run: Run) -> float:
    """Seconds the trials' attempts ran, summed (each attempt from its start to its last report)."""
    return sum(end - start for start, end in attempt_spans(run.histories).values())


def compare(run_dirs: list[str], out: str | Path) -> str:
    """The table (compare.csv, compare.md) and the plot (compare.png) of `run_dirs`, in `out`."""
    if len(run_dirs) < 2:
        raise UserError("kdsearch compare needs at least two search directories")
    runs = [Run(d) for d in run_dirs]  # a directory that is no search is named here, before anything is written
    names = [r.directory.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.directory) for r in runs]
    table = pd.DataFrame([{**row_of(r), "search": n} for r, n in zip(runs, names, strict=True)], columns=COLUMNS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.csv", table.to_csv(index=False))
    atomic_write_text(out / "compare.md", _markdown(table))
    _plot(table, out / "compare.png")
    tested = table.dropna(subset=["test balanced accuracy"]).sort_values("test balanced accuracy", ascending=False)
    best = tested.iloc[0] if len(tested) else None
    lead = (f"; the highest test balanced accuracy: {best['search']} ({best['test balanced accuracy']:.4f}, 95% "
            f"interval {best['95% interval']})" if best is not None else "")
    return f"{len(table)} searches side by side in {out / 'compare.md'}, {out / 'compare.csv'} and " \
           f"{out / 'compare.png'}{lead}"


def _markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    lines = ["# Searches side by side", "",
             "Each search's exported student on its own held-out test split (evaluated once), with the 95% interval "
             "from each class's score interval on the test images; cost as measured in the winner's trial. Searches on "
             "different data or splits are not comparable by their test figures.", "",
             header, "|" + "---|" * len(table.columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(c, v) for c, v in row.items()) + " |")
    return "\n".join(lines) + "\n"


FORMATS = {"student params": lambda v: f"{v / 1e6:.2f}M", "student MFLOPs": "{:.1f}".format,
           "student latency ms": "{:.2f}".format, "wall s": "{:.0f}".format, "trial slot-hours": "{:.3f}".format,
           "GPU-hours": "{:.3f}".format}


def _cell(column: Any, value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else FORMATS.get(column, number)(value)
    return str(value)


def _plot(table: pd.DataFrame, path: Path) -> None:
    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    shown = table.dropna(subset=["test balanced accuracy", "student latency ms"])
    latency = shown["student latency ms"].astype(float)
    one = len(latency) > 0 and latency.max() - latency.min() < 0.05 * latency.max()
    span = 0.4 * latency.max() if one else latency.max() - latency.min()
    seen: dict[float, int] = {}
    for _, row in shown.iterrows():
        lo_hi = [float(v) for v in row["95% interval"].split("-")] if row["95% interval"] else None
        value, ms = row["test balanced accuracy"], float(row["student latency ms"])
        err = [[max(0.0, value - lo_hi[0])], [max(0.0, lo_hi[1] - value)]] if lo_hi else None
        # named in the legend, not beside the point, and set a little apart: searches of one student sit at one
        # latency, often at nearly one figure, where their names and bars were drawn on top of each other
        nth = seen[round(ms, 2)] = seen.get(round(ms, 2), -1) + 1
        ax.errorbar(ms + 0.02 * span * nth, value, yerr=err, fmt="o", capsize=4,
                    label=f"{row['search']} ({value:.3f}, {ms:.2f} ms)")
    if one:  # one latency: an axis around it, not a hundredth of a millisecond wide
        ax.set_xlim(0.8 * latency.min(), 1.2 * latency.max())
    ax.set(xlabel="student latency at batch 1 (ms, as measured in its trial)",
           ylabel="test balanced accuracy", title="searches side by side (bars: 95% interval over test images)")
    ax.grid(alpha=0.3)
    if len(shown):
        ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)
