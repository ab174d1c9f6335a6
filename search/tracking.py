"""The tracking tools users already run: Ray Tune's own logger callbacks, chosen by `search.loggers`.

`tensorboard` is Ray's `TBXLoggerCallback` (event files in each trial's folder, per-epoch metrics and the
trial's hyperparameters), `mlflow` is Ray's `MLflowLoggerCallback` (one MLflow run per trial, in the store
`search.mlflow_uri` names, by default a SQLite store in the run directory). Ray's CSV and JSON loggers are
always on: the run model (search/run.py, search/experiment.py) reads their `params.json` and `result.json`. The
Optuna study needs no callback: its journal opens in optuna-dashboard (`dashboard_command`).

Ray adds its CSV, JSON and TensorBoard loggers to an experiment unless `TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`
is "1" when `Tuner.fit` starts (its only switch for it, read by `ray.tune.utils.callback._create_default_callbacks`
in the driver's process): `exact_loggers` sets it around the fit of a new search and puts it back after, so
nothing else in the process (a later resumed search, a notebook's own Tune run) sees it.

The viewers and MLflow are optional extras (`pip install "kd-search[track]"`): a search that names a
logger whose package is missing refuses before anything starts.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

from kd.errors import UserError
from search.compat import mlflow_trial_runs
from search.config import Config
from search.records import JOURNAL, MLFLOW_DB

AUTO_LOGGERS_OFF = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # Ray Tune's switch for its own loggers

_NEEDS = {"tensorboard": ["tensorboardX"], "mlflow": ["mlflow"]}  # the packages each logger imports
_SQLITE = ["sqlalchemy", "alembic"]  # MLflow's SQLite store (mlflow-skinny does not bring them)


def check_loggers(cfg: Config) -> None:
    """Refuse, before anything starts, a logger whose packages are not installed."""
    uri = cfg.search.mlflow_uri
    sqlite = "://" not in uri or uri.startswith("sqlite:")  # mlflow_uri() makes a SQLite store of a folder
    for name in cfg.search.loggers:
        needs = _NEEDS[name] + (_SQLITE if name == "mlflow" and sqlite else [])
        missing = [package for package in needs if importlib.util.find_spec(package) is None]
        if missing:
            raise UserError(f"search.loggers names {name}, but {', '.join(missing)} is not installed: "
                            "pip install 'kd-search[track]' (or drop it from search.loggers)")


def mlflow_uri(cfg: Config, run_dir: Path) -> str:
    """The MLflow tracking URI: `search.mlflow_uri` when it is a URI, a SQLite store inside it when it is a
    folder, else a SQLite store in the run directory (MLflow 3 refuses its old plain-folder store)."""
    uri = cfg.search.mlflow_uri
    if "://" in uri:
        return uri
    folder = Path(uri).expanduser() if uri else run_dir
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / MLFLOW_DB).resolve()}"


def logger_callbacks(cfg: Config, run_dir: Path) -> list[Callback]:
    """Exactly the loggers asked for, for a new search, whose `Tuner.fit` runs within `exact_loggers()` (else
    Ray adds its own beside them); a resumed search keeps the loggers it started with, so this is not called
    for one."""
    callbacks: list[Callback] = [CSVLoggerCallback(), JsonLoggerCallback()]
    if "tensorboard" in cfg.search.loggers:
        callbacks.append(TBXLoggerCallback())
    if "mlflow" in cfg.search.loggers:
        for name in ("mlflow", "alembic"):  # their INFO lines (creating tables, ...) are not the user's business
            logging.getLogger(name).setLevel(logging.WARNING)
        callbacks.append(_mlflow_callback()(tracking_uri=mlflow_uri(cfg, run_dir), experiment_name=cfg.name,
                                            tags={"kdsearch.run": str(run_dir.resolve())}))
    return callbacks


def _mlflow_callback() -> Callable[..., Callback]:
    """Ray's `MLflowLoggerCallback`, which continues a trial's MLflow run when a resumed search brings the trial
    back (Ray's own starts a second run for it). Imported only when asked for: it imports mlflow."""
    from mlflow import MlflowClient
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class MLflowAcrossResumes(MLflowLoggerCallback):
        def log_trial_start(self, trial: Any) -> None:
            runs = mlflow_trial_runs(self)  # None: a Ray without the map; its own callback's behaviour
            if runs is not None and trial not in runs:
                client = MlflowClient(self.tracking_uri)
                name, here = self.experiment_name, (self.tags or {}).get("kdsearch.run", "")
                experiment = client.get_experiment_by_name(name) if name else None
                this_search = f"tags.trial_name = '{trial}' and tags.`kdsearch.run` = '{here}'"
                found = client.search_runs([experiment.experiment_id], filter_string=this_search,
                                           max_results=1) if experiment is not None else []
                if found:
                    runs[trial] = found[0].info.run_id
            super().log_trial_start(trial)

    return MLflowAcrossResumes


@contextlib.contextmanager
def exact_loggers(on: bool = True) -> Iterator[None]:
    """Within the block (a new search's `Tuner.fit`), Ray adds none of its own loggers: the search's callbacks
    (`logger_callbacks`) are all there are. The variable is put back as it was after, whatever happens. With
    `on` false (a resumed search, which may be of a version that relied on Ray's own) it is left alone."""
    before = os.environ.get(AUTO_LOGGERS_OFF)
    if on:
        os.environ[AUTO_LOGGERS_OFF] = "1"
    try:
        yield
    finally:
        if on:
            if before is None:
                os.environ.pop(AUTO_LOGGERS_OFF, None)
            else:
                os.environ[AUTO_LOGGERS_OFF] = before


def dashboard_command(run_dir: Path) -> str:
    """The command that opens a search's Optuna study in optuna-dashboard."""
    return f"optuna-dashboard {shlex.quote(str(run_dir / JOURNAL))}"
