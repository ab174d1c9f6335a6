"""The driver's record of what happened to each trial, and a readable console.

`TrialLog` is a Tune callback (it runs in the driver and is pickled with the experiment, so a resumed
search keeps using it). It appends every trial's end (completed, stopped early, failed) and every retry to
`trial_events.jsonl` as it happens, flushed to disk: the analysis trusts this over Ray's experiment-state
snapshots, which can lag behind the last events. Unless quiet, it also prints one line per finished trial
instead of Ray's pages of per-trial tables.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kd.files import read_jsonl

EVENTS = "trial_events.jsonl"
SHORT = {"distill.mode": "", "distill.temperature": "T=", "distill.alpha": "alpha=", "train.lr": "lr=",
         "imbalance.method": "", "imbalance.beta": "beta=", "imbalance.tau": "tau="}


def describe(config: dict[str, Any]) -> str:
    parts = []
    for key, value in config.items():
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(SHORT.get(key, f"{key}=") + text)
    return " ".join(parts)


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(Path(run_dir) / EVENTS) if "trial" in e and "status" in e]


def _error(trial: Any) -> str:
    """The last line naming the exception, from the error Ray holds or the trial's error.txt ("" if neither)."""
    texts = []
    try:
        texts.append(str(trial.get_error() or ""))
    except Exception:
        pass
    for path in (getattr(trial, "path", None), getattr(trial, "local_path", None)):
        try:
            texts.append(Path(path, "error.txt").read_text(errors="replace"))
        except (OSError, TypeError):
            pass
    for text in texts:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        causes = [ln for ln in lines if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]]
        if causes or lines:
            return (causes[-1] if causes else lines[-1])[:300]
    return ""


class TrialLog(Callback):
    def __init__(self, run_dir: str | Path, metric: str, mode: str, max_epochs: int, echo: bool = True):
        self.path = str(Path(run_dir) / EVENTS)
        self.metric, self.mode, self.max_epochs, self.echo = metric, mode, max_epochs, echo
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.last: dict[str, dict[str, Any]] = {}
        self.started = time.time()

    def __setstate__(self, state: dict[str, Any]) -> None:  # a resumed search counts its time afresh
        self.__dict__.update(state)
        self._reset()

    def _record(self, event: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**event, "time": time.time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _print(self, text: str) -> None:
        if self.echo:
            elapsed = time.time() - self.started
            print(f"[{int(elapsed // 60):>3}:{int(elapsed % 60):02d}] {text}", file=sys.stdout, flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.last[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = self.last.get(trial.trial_id) or trial.last_result or {}
        value, epochs = result.get(self.metric), result.get("epoch", 0)
        status = "completed" if epochs >= self.max_epochs else "stopped early"
        self._record({"trial": trial.trial_id, "status": status, "epochs": epochs})
        if value is not None and (self.best is None or (value > self.best) == (self.mode == "max")):
            self.best = value
        how = "completed" if status == "completed" else f"stopped early at epoch {epochs}"
        shown = f"{value:.4f}" if value is not None else "n/a"
        best = f"{self.best:.4f}" if self.best is not None else "n/a"
        self._print(f"trial {trial.trial_id} {how}: {self.metric} {shown} (best {best}) | {describe(trial.config)}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _error(trial)
        self._record({"trial": trial.trial_id, "status": "retry", "error": error})
        self._print(f"trial {trial.trial_id} will be retried after: {error or 'its process died'}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _error(trial)
        self._record({"trial": trial.trial_id, "status": "failed", "error": error})
        self._print(f"trial {trial.trial_id} failed: {error or 'its process died'} | {describe(trial.config)}")
