"""`kdsearch search`: one search from its config to results/<name>/ with the best student exported.

The flow, each step in its own module: check the config and the models (space), take the run directory
(session), decode the data (kd.data) and check the metric against what the task reports (kd.selection),
start or join Ray (cluster), prepare the teachers once (one per fold: cluster, kd.crossval, kd.teacher),
run the trials (tuner, trainable, progress), then re-rank the top trials with further seeds, refit, export,
test once and report (rerank, finalize, report, all reading the run through run.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import ray

from kd.config import Config, save_config
from kd.data import load_dataset
from kd.errors import Interrupted
from kd.files import atomic_write_json
from kd.selection import check_metric, decision_rule
from search.cluster import check_resources, check_stream_files, prepare_teachers, ray_errors_to, start_ray
from search.finalize import finalize
from search.format import shown
from search.run import CONFIG, RAY_ERRORS, RUN, TEACHER, Run
from search.session import exclusive, experiment_path, run_dir_of, set_aside_stale, should_resume, sigterm_as_interrupt
from search.space import check_points, check_searched_models, parse_space
from search.tracking import check_loggers
from search.tuner import build_tuner


def run_search(cfg: Config, address: str | None = None, storage: str | None = None, resume: bool = False,
               quiet: bool = False, echo: Callable[[str], None] = print) -> Path:
    params = parse_space(cfg)  # a bad space, point or model is reported before anything starts
    check_points(cfg.search.points, params, cfg)
    check_searched_models(cfg, params, weights=address is None)
    check_loggers(cfg)
    run_dir = run_dir_of(cfg)
    exp_path = experiment_path(cfg, run_dir, storage)
    with exclusive(run_dir):
        restore = should_resume(cfg, run_dir, exp_path, resume)
        if not restore:
            set_aside_stale(run_dir)
        t0 = time.perf_counter()
        data = load_dataset(cfg.data, progress=not quiet)
        check_metric(cfg.search.metric, data.classes, decision_rule(len(data.classes), cfg.train.tune_threshold),
                     cfg.search.folds)
        started = start_ray(address)
        # Ray's published errors go to ray-errors.log until Ray is stopped (its shutdown included)
        with ray_errors_to(run_dir / RAY_ERRORS, echo):
            try:  # written once the data is good and Ray is up: a search that cannot start leaves nothing behind
                check_stream_files(data, check_resources(cfg))
                save_config(cfg, run_dir / CONFIG)
                run_info = {"experiment": exp_path, "resumed": restore, "classes": data.classes,
                            "data": data.describe()}
                atomic_write_json(run_dir / RUN, run_info)
                prepared = prepare_teachers(cfg, data, echo)
                atomic_write_json(run_dir / TEACHER, {**prepared.record(), "seconds": time.perf_counter() - t0})
                how = f"{cfg.search.folds}-fold cross-validated" if cfg.search.folds >= 2 else "holdout"
                echo(("resuming" if restore else "starting") + f" the search: {cfg.search.num_samples} {how} trials "
                     f"of {cfg.student.name}, optimising {cfg.search.metric} ({cfg.search.mode}); results in "
                     f"{shown(run_dir)}")
                tuner = build_tuner(cfg, prepared.data, prepared.logits, exp_path, restore, quiet)
                with sigterm_as_interrupt():
                    tuner.fit()
                _raise_if_interrupted(run_dir)
                atomic_write_json(run_dir / RUN, {**run_info, "seconds": time.perf_counter() - t0})
                finalize(run_dir, data, prepared, echo=echo)
            finally:
                if started:
                    ray.shutdown()
    return run_dir


def _raise_if_interrupted(run_dir: Path) -> None:
    """Tune returns normally after Ctrl-C; an unfinished experiment must not be reported as a finished one."""
    run = Run(run_dir)  # a local copy when the experiment lives in remote storage
    if run.finished() < run.config.search.num_samples:
        raise Interrupted(f"search interrupted: {run.finished()} of {run.config.search.num_samples} trials finished "
                          f"and saved in {run_dir}; unfinished trials resume from their last checkpoint")
