"""The driver's record of what happened to each trial, and a readable console.

`TrialLog` is a Tune callback (it runs in the driver and is pickled with the experiment, so a resumed
search keeps using it). It appends every trial's end (completed, stopped early, failed) and every retry to
`trial_events.jsonl` as it happens (a search.events.TrialEvent a line), flushed to disk: the analysis trusts
this over Ray's experiment-state snapshots, which can lag behind the last events. Unless quiet, it also prints
one line per finished trial instead of Ray's pages of per-trial tables, its time stamp followed by the trials done of
`search.num_samples` and the time left at this run's pace (`[  2:10 5/16, about 4 min left]`).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from search.events import TrialEvent, append_event
from search.experiment import error_line, trial_error
from search.format import params_text
from search.records import EVENTS, TrialStatus

BESIDE = "val_balanced_accuracy"


def _error(trial: Trial) -> str:
    """The line naming the exception, from the error Ray holds, else the trial's error.txt ("" if neither)."""
    try:
        held = error_line(str(trial.get_error() or ""))
    except Exception:  # Ray's own lookup of the error can fail on a trial whose node is gone
        held = ""
    return held or next(filter(None, (trial_error(p) for p in (trial.path, trial.local_path) if p)), "")


class TrialLog(Callback):
    def __init__(self, run_dir: str | Path, metric: str, mode: str, max_epochs: int, echo: bool = True,
                 total: int = 0, earlier: int = 0, best: float | None = None):
        self.path = str(Path(run_dir) / EVENTS)  # kept under this name: a resumed search unpickles it
        self.metric, self.mode, self.max_epochs, self.echo = metric, mode, max_epochs, echo
        self.total = total  # search.num_samples: the console counts the trials done against it
        self.earlier, self.earlier_best = earlier, best  # trials an earlier Tune experiment of the search ran, and
        self._reset()                                    # their best figure (search.tuner.Adding)

    def _reset(self) -> None:
        self.best: float | None = getattr(self, "earlier_best", None)
        self.last: dict[str, dict[str, Any]] = {}
        self.started = time.time()
        self.done: set[str] = set()   # trials finished (completed, stopped or failed), earlier runs' among them
        self.here = 0                 # of those, finished by this process: the pace the time left is read from

    def __setstate__(self, state: dict[str, Any]) -> None:  # a resumed search counts its time afresh
        self.__dict__.update(state)
        self._reset()

    def _record(self, trial: Any, status: TrialStatus, epochs: int | None = None, error: str = "") -> None:
        append_event(self.path, TrialEvent(trial.trial_id, status, epochs=epochs, error=error, time=time.time()))

    def _print(self, text: str) -> None:
        if self.echo:
            elapsed = time.time() - self.started
            print(f"[{int(elapsed // 60):>3}:{int(elapsed % 60):02d}{self._progress(elapsed)}] {text}", file=sys.stdout,
                  flush=True)

    def _finished(self, trials: list, trial: Any) -> None:
        """Count `trial` as done (and, on a resumed search, the trials an earlier run finished)."""
        if not self.done:
            self.done = {t.trial_id for t in trials if getattr(t, "status", None) in (Trial.TERMINATED, Trial.ERROR)}
        if trial.trial_id not in self.done:
            self.done.add(trial.trial_id)
            self.here += 1

    def _progress(self, elapsed: float) -> str:
        """' 3/16, about 2 min left': the trials done of search.num_samples, and the time left at this run's pace
        (the trials still to finish, at the mean time between finishes here)."""
        total = getattr(self, "total", 0)  # a search pickled by an earlier version has none
        if not total or not self.done:
            return ""
        done = len(self.done) + getattr(self, "earlier", 0)
        left = total - done
        if left <= 0 or not self.here:
            return f" {done}/{total}"
        seconds = elapsed / self.here * left
        about = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{max(seconds, 1):.0f} s"
        return f" {done}/{total}, about {about} left"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.last[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = self.last.get(trial.trial_id) or trial.last_result or {}
        value, epochs = result.get(self.metric), result.get("epoch", 0)
        status = TrialStatus.COMPLETED if epochs >= self.max_epochs else TrialStatus.STOPPED
        self._record(trial, status, epochs=int(epochs))
        self._finished(trials, trial)
        if value is not None and (self.best is None or (value > self.best) == (self.mode == "max")):
            self.best = value
        how = status if status == TrialStatus.COMPLETED else f"{TrialStatus.STOPPED} at epoch {epochs}"
        shown = f"{value:.4f}" if value is not None else "n/a"
        best = f"{self.best:.4f}" if self.best is not None else "n/a"
        beside = result.get(BESIDE)  # balanced accuracy under the shipped rule, beside any other ranking figure
        also = f", {BESIDE} {beside:.4f}" if self.metric != BESIDE and beside is not None else ""
        self._print(f"trial {trial.trial_id} {how}: {self.metric} {shown} (best {best}){also} | "
                    f"{params_text(trial.config)}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _error(trial)
        self._record(trial, TrialStatus.RETRY, error=error)
        self._print(f"trial {trial.trial_id} will be retried after: {error or 'its process died'}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _error(trial)
        self._record(trial, TrialStatus.FAILED, error=error)
        self._finished(trials, trial)
        self._print(f"trial {trial.trial_id} failed: {error or 'its process died'} | {params_text(trial.config)}")
