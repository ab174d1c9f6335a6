"""A readable console for a search: one line per finished trial and the best so far, instead of Ray's
pages of per-trial tables. (A Tune callback: it runs in the driver and is pickled with the experiment.)"""
from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

SHORT = {"distill.mode": "", "distill.temperature": "T=", "distill.alpha": "alpha=", "train.lr": "lr=",
         "imbalance.method": "", "imbalance.beta": "beta=", "imbalance.tau": "tau="}


def describe(config: dict[str, Any]) -> str:
    parts = []
    for key, value in config.items():
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(SHORT.get(key, f"{key}=") + text)
    return " ".join(parts)


class ProgressLines(Callback):
    def __init__(self, total: int, metric: str, mode: str, max_epochs: int):
        self.total, self.metric, self.mode, self.max_epochs = total, metric, mode, max_epochs
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.last: dict[str, dict[str, Any]] = {}
        self.started = time.time()

    def __setstate__(self, state: dict[str, Any]) -> None:  # a resumed search counts afresh
        self.__dict__.update(state)
        self._reset()

    def _print(self, text: str) -> None:
        elapsed = time.time() - self.started
        print(f"[{int(elapsed // 60):>3}:{int(elapsed % 60):02d}] {text}", file=sys.stdout, flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.last[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = self.last.get(trial.trial_id) or trial.last_result or {}
        value = result.get(self.metric)
        epochs = result.get("epoch", 0)
        if value is not None and (self.best is None or (value > self.best if self.mode == "max" else value < self.best)):
            self.best = value
        how = "completed" if epochs >= self.max_epochs else f"stopped early at epoch {epochs}"
        shown = f"{value:.4f}" if value is not None else "n/a"
        best = f"{self.best:.4f}" if self.best is not None else "n/a"
        self._print(f"trial {trial.trial_id} {how}: {self.metric} {shown} (best {best}) | {describe(trial.config)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            lines = [ln for ln in str(trial.get_error() or "").splitlines() if ln.strip()]
            error = lines[-1].strip() if lines else "see its error.txt"
        except Exception:
            error = "see its error.txt"
        self._print(f"trial {trial.trial_id} failed: {error} | {describe(trial.config)}")
