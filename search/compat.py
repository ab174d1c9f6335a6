"""The one place kd-search reaches into Ray's internals (and reads Ray's files by hand), each behind a version
check and a tested fallback.

- `swap_ray_printer`: Ray's driver prints the errors its cluster publishes with the module-level
  `ray._private.worker.print_to_stdstream`, looked up at each call; Ray has no setting for it. Fallback (a Ray
  without it): nothing is swapped, Ray's own printing stays, the block is told so (it yields False).
- `mlflow_trial_runs`: the trial -> MLflow run id map that Ray's `MLflowLoggerCallback` keeps in `_trial_runs`
  (set by its `setup`), which search/tracking.py fills to continue a resumed trial's run. Fallback: None, and
  a resumed trial gets a second MLflow run, as with Ray's own callback.
- `trial_statuses`: the trials' statuses and failure counts in Ray's `experiment_state-*.json` files, the newest's
  word standing (their `trial_data`, JSON written by Ray's TuneController; `ray.tune.ExperimentAnalysis` would
  unpickle the whole experiment). Fallback: a file it cannot read is skipped (the caller derives those trials'
  statuses from their folders).
- `trial_folder_id`: the trial id and number in a trial folder's name (Ray's `<trainable>_<8-hex id>_<number>_
  <tag>_<date>`). Fallback: the folder's name and number 0.
- `numbered_after`: a `trial_dirname_creator` that names trial folders in that layout with numbers going on after
  the trials an experiment folder already holds (the number is the head of the trial's `experiment_tag`, as
  Ray's SearchGenerator writes it). Fallback (a tag without it): Ray's own name, with one warning.
- `started_ray_node`: the Ray runtime this process started (`ray._private.worker._global_node`, a Node): its GCS
  server and raylet processes (its `all_processes`) and a stop for all of them (its `kill_all_processes`), which
  search/cluster.py's `ended_if_ray_dies` watches. Fallback (a Ray without them): None, no watcher; the search
  runs, and a Ray that dies under it ends the search as Ray ends it (its GCS timeout, exit 1).
- `optuna_trial`: the Optuna trial and study behind a Ray trial in Ray's `OptunaSearch` (its `_ot_trials`,
  `_ot_study`, `_completed_trials`), with which search/tuner.py's `Searcher` tells Optuna that a trial ASHA
  stopped was PRUNED. Fallback: None, and such a trial is told as Ray's own OptunaSearch tells it (COMPLETE with
  its last figure).

`RAY_TESTED` and `MLFLOW_TESTED` name the releases these were tested with (tests/test_compat.py): another one
logs one warning. pyproject.toml caps Ray (and optuna) at the next major release, as far as these fallbacks
reach, and MLflow just beyond its tested release. The timm internals are in kd/compat.py.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.compat import check_version, warn_once

log = logging.getLogger("search")

RAY_TESTED = ("2.60",)  # major.minor; tests ran with ray 2.60.0
OPTUNA_TESTED = ("5.0", "5.1")  # tests ran with optuna 5.0.0 and 5.1.0 (a fresh install took 5.1.0 once it was out)
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
    """trial_id -> {status, failures} from the experiment states in `exp`, the newest one's word standing where
    they differ (a search that added trials ran a second Tune experiment in the same folder, whose state holds
    only its own trials); {} where they cannot be read."""
    # Newest last: names carry the session's start time (Ray rewrites all of them at the end, so their
    # modification times do not tell which is newest).
    _check_ray()
    out: dict[str, dict[str, Any]] = {}
    for file in sorted(glob.glob(os.path.join(str(exp), EXPERIMENT_STATE))):
        try:
            state = json.loads(Path(file).read_text())
            for entry in state.get("trial_data", []):
                trial = json.loads(entry[0] if isinstance(entry, list) else entry)
                runtime = json.loads(entry[1]) if isinstance(entry, list) and len(entry) > 1 else {}
                out[trial["trial_id"]] = {"status": trial.get("status"), "failures": runtime.get("num_failures", 0)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("could not read trial statuses from %s (%s); deriving them from the trial folders", file, e)
    return out


def trial_folder_id(name: str) -> tuple[str, int]:
    """(trial id, trial number) in the name of a Ray trial folder; (the name, 0) where the name has neither."""
    _check_ray()
    match = _TRIAL_FOLDER.match(name)
    if match:
        return match.group(1), int(match.group(2))
    warn_once(log, "ray:trial_folder", "a trial folder's name (%s) is not Ray's <trainable>_<id>_<number>_...: the "
              "folder's name stands for the trial id (search/compat.py)", name)
    return name, 0


def numbered_after(last: int) -> Callable[[Any], str]:
    """Ray's trial folder name (`<trainable>_<id>_<number>_<tag>_<date>`, forbidden characters replaced by Ray)
    with the number going on after `last`: trials that a later Tune run adds to an experiment folder are numbered
    after the ones it holds (Ray's SearchGenerator numbers each run's trials from 1)."""
    import time

    def name(trial: Any) -> str:
        number, _, rest = str(trial.experiment_tag).partition("_")
        if number.isdigit():
            tag = f"{int(number) + last}_{rest}"
        else:
            warn_once(log, "ray:experiment_tag", "a trial's experiment tag (%s) does not start with its number: "
                      "added trials keep Ray's numbers (search/compat.py)", trial.experiment_tag)
            tag = str(trial.experiment_tag)
        return f"{trial}_{tag}"[:130] + time.strftime("_%Y-%m-%d_%H-%M-%S")
    return name


# ------------------------------------------------------------------------------------- Ray's own node

@dataclass(frozen=True)
class RayNode:
    """The Ray runtime this process started: its `processes` ((kind, process) of its GCS server and raylet, each
    process with `poll()` and `pid`, as subprocess.Popen) and `kill`, which stops every process of it at once."""

    processes: list[tuple[str, Any]]
    kill: Callable[[], None]


def started_ray_node() -> RayNode | None:
    """The Ray runtime `ray.init` started in this process; None where it started none (a joined cluster, no Ray)
    or (one warning) where this Ray does not tell its processes."""
    _check_ray()
    worker: Any = None
    with contextlib.suppress(ImportError):
        worker = importlib.import_module("ray._private.worker")
    if worker is not None and hasattr(worker, "_global_node"):
        node = worker._global_node
        if node is None:
            return None
        processes = getattr(node, "all_processes", None)
        kill = getattr(node, "kill_all_processes", None)
        if isinstance(processes, dict) and callable(kill):
            watched = [(kind, info.process) for kind in ("gcs_server", "raylet") for info in processes.get(kind, [])]
            return RayNode(watched, lambda: kill(check_alive=False, allow_graceful=False))
    warn_once(log, "ray:_global_node", "this Ray has no ray._private.worker._global_node with its processes: the "
              "search does not watch the Ray runtime it started, and should that die under it, the search ends as "
              "Ray ends it (search/compat.py)")
    return None


# ------------------------------------------------------------------------------------- Ray's OptunaSearch

@dataclass(frozen=True)
class OptunaTrial:
    """The Optuna `trial` and `study` behind a Ray trial of an OptunaSearch; `told()` marks the trial told in
    the searcher (as its own `on_trial_complete` does), once the study has been told."""

    trial: Any
    study: Any
    told: Callable[[], None]


def optuna_trial(searcher: Any, trial_id: str) -> OptunaTrial | None:
    """The Optuna trial that `searcher` (a `ray.tune.search.optuna.OptunaSearch`) asked its study for as Ray's
    trial `trial_id` and has not told yet; None where there is none (an unknown trial, a trial already told) or
    (one warning) where this Ray's OptunaSearch does not keep them: the caller then leaves the trial to it."""
    _check_ray()
    trials = getattr(searcher, "_ot_trials", None)
    completed = getattr(searcher, "_completed_trials", None)
    if isinstance(trials, dict) and isinstance(completed, set) and hasattr(searcher, "_ot_study"):
        study = searcher._ot_study
        if trial_id not in trials or trial_id in completed or study is None:
            return None
        return OptunaTrial(trials[trial_id], study, lambda: completed.add(trial_id))
    warn_once(log, "ray:_ot_trials", "this Ray's OptunaSearch keeps no _ot_trials, _ot_study and _completed_trials: "
              "a trial that ASHA stops is told to Optuna as Ray's own OptunaSearch tells it (COMPLETE with its last "
              "figure, not PRUNED) (search/compat.py)")
    return None
