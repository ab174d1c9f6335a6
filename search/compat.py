"""The one place kd-search reaches into Ray's internals (and reads Ray's files by hand), each behind a version
check and a tested fallback.

- `swap_ray_printer`: Ray's driver prints the errors its cluster publishes with the module-level
  `ray._private.worker.print_to_stdstream`, looked up at each call; Ray has no setting for it. Fallback (a Ray
  without it): nothing is swapped, Ray's own printing stays, the block is told so (it yields False).
- `mlflow_trial_runs`: the trial -> MLflow run id map that Ray's `MLflowLoggerCallback` keeps in `_trial_runs`
  (set by its `setup`), which search/tracking.py fills to continue a resumed trial's run. Fallback: None, and
  a resumed trial gets a second MLflow run, as with Ray's own callback.
- `trial_statuses`: the trials' statuses and failure counts in Ray's newest `experiment_state-*.json` (its
  `trial_data`, JSON written by Ray's TuneController; `ray.tune.ExperimentAnalysis` would unpickle the whole
  experiment). Fallback: {} (the caller derives statuses from the trial folders).
- `trial_folder_id`: the trial id and number in a trial folder's name (Ray's `<trainable>_<8-hex id>_<number>_
  <tag>_<date>`). Fallback: the folder's name and number 0.

`RAY_TESTED` and `MLFLOW_TESTED` name the releases these were tested with (tests/test_compat.py): another one
logs one warning, and pyproject.toml caps both just beyond them. The timm internals are in kd/compat.py.
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.metadata
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kd.compat import check_version, warn_once

log = logging.getLogger("search")

RAY_TESTED = ("2.60",)  # major.minor; tests ran with ray 2.60.0
MLFLOW_TESTED = ("3.17",)  # tests ran with mlflow-skinny 3.17.2 (through Ray 2.60's MLflowLoggerCallback)
EXPERIMENT_STATE = "experiment_state-*.json"  # ray.tune.execution.tune_controller.TuneController.CKPT_FILE_TMPL
_TRIAL_FOLDER = re.compile(r".*?_([0-9a-f]{8})_(\d+)_")


def _check_ray() -> None:
    """One warning where the installed Ray is not a tested one (read from its metadata: no import of Ray)."""
    try:
        version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return
    check_version("ray", version, RAY_TESTED, log)


# ------------------------------------------------------------------------------------- Ray's error printer

@contextlib.contextmanager
def swap_ray_printer(printer: Callable[..., None]) -> Iterator[bool]:
    """Within the block, Ray's driver hands each message it would print (a dict with `lines`, `pid`, `is_err`;
    and `ignore_prefix`) to `printer` instead; Ray's own printer is put back after. Yields whether it could."""
    _check_ray()
    worker: Any = None
    with contextlib.suppress(ImportError):
        worker = importlib.import_module("ray._private.worker")
    original = getattr(worker, "print_to_stdstream", None)
    if worker is None or not callable(original):
        warn_once(log, "ray:print_to_stdstream", "this Ray has no ray._private.worker.print_to_stdstream: the "
                  "errors its cluster publishes are printed by Ray itself (search/compat.py)")
        yield False
        return
    worker.print_to_stdstream = printer
    try:
        yield True
    finally:
        worker.print_to_stdstream = original


# ------------------------------------------------------------------------------------- Ray's MLflow callback

def mlflow_trial_runs(callback: Any) -> dict[Any, str] | None:
    """The trial -> MLflow run id map of a set-up `ray.air.integrations.mlflow.MLflowLoggerCallback`: a trial
    put in it before `log_trial_start` continues that run. None (one warning) where this Ray keeps none."""
    _check_ray()
    import mlflow

    check_version("mlflow", mlflow.__version__, MLFLOW_TESTED, log)
    runs = getattr(callback, "_trial_runs", None)
    if isinstance(runs, dict):
        return runs
    warn_once(log, "ray:_trial_runs", "this Ray's MLflowLoggerCallback keeps no _trial_runs: a resumed trial starts "
              "a second MLflow run (search/compat.py)")
    return None


# ------------------------------------------------------------------------------------- Ray's experiment files

def trial_statuses(exp: str | Path) -> dict[str, dict[str, Any]]:
    """trial_id -> {status, failures} from the newest experiment state in `exp`; {} where it cannot be read."""
    # The newest session's file: names carry the session's start time (Ray rewrites all of them at the end,
    # so their modification times do not tell which is newest).
    _check_ray()
    files = sorted(glob.glob(os.path.join(str(exp), EXPERIMENT_STATE)))
    if not files:
        return {}
    try:
        state = json.loads(Path(files[-1]).read_text())
        out = {}
        for entry in state.get("trial_data", []):
            trial = json.loads(entry[0] if isinstance(entry, list) else entry)
            runtime = json.loads(entry[1]) if isinstance(entry, list) and len(entry) > 1 else {}
            out[trial["trial_id"]] = {"status": trial.get("status"), "failures": runtime.get("num_failures", 0)}
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("could not read trial statuses from %s (%s); deriving them from the trial folders", files[-1], e)
        return {}


def trial_folder_id(name: str) -> tuple[str, int]:
    """(trial id, trial number) in the name of a Ray trial folder; (the name, 0) where the name has neither."""
    _check_ray()
    match = _TRIAL_FOLDER.match(name)
    if match:
        return match.group(1), int(match.group(2))
    warn_once(log, "ray:trial_folder", "a trial folder's name (%s) is not Ray's <trainable>_<id>_<number>_...: the "
              "folder's name stands for the trial id (search/compat.py)", name)
    return name, 0
