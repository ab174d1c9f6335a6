"""The report of a search, rebuilt from its run directory alone: trials.csv, configs/, plots/, summary.md.

Works on a finished, running or interrupted search (`kdsearch analyze`), and on a copy of one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from kd.config import save_config
from kd.files import atomic_path, atomic_write_text
from search import plots
from search.run import Run
from search.summary import summary_markdown

log = logging.getLogger("search")


def write_report(run: Run) -> pd.DataFrame:
    """Rebuild trials.csv, configs/, plots/ and summary.md; returns the trials table."""
    table = run.table
    if len(table):
        out = table.drop(columns="path")
        out.insert(3, "rule", run.rule_label)  # the decision rule every figure in the row was computed with
    else:
        out = table
    with atomic_path(run.directory / "trials.csv") as tmp:
        out.to_csv(tmp, index=False)
    for _, row in table.iterrows():
        try:
            save_config(run.trial_config(row), run.directory / "configs" / f"{row['trial']}.yaml")
        except Exception as e:  # a trial written by an older config: its table row still stands
            log.warning("no config for trial %s: %s", row["trial"], e)
    plots.draw_all(run)
    atomic_write_text(run.directory / "summary.md", summary_markdown(run))
    return table


def analyze(run_dir: str | Path) -> str:
    """`kdsearch analyze`: the report rebuilt, and one line saying what is in it."""
    run = Run(run_dir)
    table = write_report(run)
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    d = run.directory
    return (f"{len(table)} trials (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"); wrote "
            f"{d / 'trials.csv'}, {d / 'summary.md'} and {d / 'plots'}")
