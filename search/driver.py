"""`kdsearch search`: one search from its config to results/<name>/ with the best student exported.

The flow, each step in its own module: check the config and the models (space), take the run directory
(session), decode the data (kd.data), choose how trials train (kd.schemes: a holdout or K folds) and check
the metric against what it reports (kd.selection), start or join Ray (cluster), prepare the teachers once
(one per member of the scheme: teachers, kd.teacher), run the trials (tuner, trainable, progress), then
re-rank the top trials with further seeds, export the winner as its scheme makes it, test once and report
(rerank, finalize, report, all reading the run through run.py).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ray

from kd.config import save_config
from kd.data import load_dataset
from kd.errors import Interrupted, UserError
from kd.schemes import Scheme
from kd.selection import check_metric, decision_rule
from search.cluster import (
    check_resources,
    check_stream_files,
    ended_if_ray_dies,
    ray_errors_to,
    shipping,
    start_ray,
    trial_slots,
    tune_settings,
)
from search.config import COSTS, Config
from search.costs import described, student_costs
from search.finalize import finalize
from search.format import shown
from search.phases import RunPhases
from search.records import CONFIG, RAY_ERRORS, RunRecord
from search.run import Run
from search.session import exclusive, experiment_path, run_dir_of, set_aside_stale, should_resume, sigterm_as_interrupt
from search.space import check_points, check_searched_models, parse_space, searched_students
from search.teachers import prepare_teachers
from search.tracking import check_loggers, exact_loggers
from search.tuner import Adding, at_rungs, build_tuner


def run_search(cfg: Config, address: str | None = None, storage: str | None = None, resume: bool = False,
               quiet: bool = False, echo: Callable[[str], None] = print, resume_command: str | None = None) -> Path:
    """`resume_command`: the command that continues this search, told when it is interrupted."""
    cfg = at_rungs(cfg)  # the recipe every trial, re-ranking fit and refit of this search trains with
    params = parse_space(cfg)  # a bad space, point or model is reported before anything starts
    check_points(cfg.search.points, params, cfg)
    hub_models = check_searched_models(cfg, params)  # timm weights downloaded here, once, where not cached
    students = searched_students(cfg, params)
    check_loggers(cfg)
    run_dir = run_dir_of(cfg)
    exp_path = experiment_path(cfg, run_dir, storage)
    with exclusive(run_dir):
        restore = should_resume(cfg, run_dir, exp_path, resume)
        if not restore:
            set_aside_stale(run_dir)
        phases = RunPhases(run_dir)
        with phases("decode"):
            data = load_dataset(cfg.data, progress=not quiet)
        scheme = Scheme.of(cfg)
        rule = decision_rule(len(data.classes), cfg.train.tune_threshold)
        check_metric(cfg.search.metric, data.classes, rule, scheme.extra_metrics())
        for name in cfg.search.objectives:
            if name not in COSTS:
                check_metric(name, data.classes, rule, scheme.extra_metrics(), key="search.objectives")
        split = scheme.split(cfg, data)  # the folds (or the holdout) before anything starts
        with tune_settings():  # set for this search's use of Ray only, and put back after
            started = start_ray(address)
            # Ray's published errors go to ray-errors.log until Ray is stopped (its shutdown included)
            lost = ended_if_ray_dies(started, lambda cause: interrupted(run_dir, cause, resume_command))
            with ray_errors_to(run_dir / RAY_ERRORS, echo):
                try:  # written once the data is good and Ray is up: a search that cannot start leaves nothing behind
                    with lost, shipping(hub_models) as weights:  # the timm weights files every task and trial loads
                        resources = check_resources(cfg)
                        check_stream_files(data, resources)
                        save_config(cfg, run_dir / CONFIG)
                        phases.start_record(RunRecord(experiment=exp_path, resumed=restore, classes=data.classes,
                                                      data=data.describe(), slots=cfg.search.max_concurrent or
                                                      trial_slots(resources)))
                        with phases("costs"):  # before the teachers fill the slots: a quiet device times truly
                            costs = student_costs(cfg, students, len(data.classes), data.image_size)
                        echo(f"students' cost on a trial's device: {described(costs)}")
                        with phases("teachers"):
                            prepared = prepare_teachers(cfg, split, echo)
                        prepared.record(seconds=phases.total).write(run_dir)
                        echo(("resuming" if restore else "starting") + f" the search: {cfg.search.num_samples} "
                             f"{scheme.describe(cfg)} trials of {cfg.student.name}, optimising {cfg.search.metric} "
                             f"({cfg.search.direction}); results in {shown(run_dir)}")
                        tuner = build_tuner(cfg, prepared.scheme, costs, exp_path, restore, quiet, weights)
                        with sigterm_as_interrupt(), exact_loggers(not restore), phases("trials"):
                            tuner.fit()
                            if restore and (adding := _adding(run_dir)):
                                echo(f"adding {adding.count} trial{'s' * (adding.count != 1)} to the "
                                     f"{adding.held} this search ran "
                                     f"(search.num_samples {cfg.search.num_samples}); TPE goes on from theirs")
                                with exact_loggers():
                                    build_tuner(cfg, prepared.scheme, costs, exp_path, False, quiet, weights,
                                                adding).fit()
                        _raise_if_interrupted(run_dir)
                        finalize(run_dir, prepared, phases, echo=echo)
                finally:
                    if started:
                        ray.shutdown()
    return run_dir


def _adding(run_dir: Path) -> Adding | None:
    """The trials to add to a resumed search whose `search.num_samples` was raised, once the experiment's own trials
    have all ended (a restored part that was interrupted is said as such); None when there are none to add."""
    run = Run(run_dir)
    table, s = run.table, run.config.search
    count = s.num_samples - len(table)
    if count <= 0:
        return None
    if run.finished() < len(table):
        raise Interrupted(interrupted(run_dir))
    scored = list(table[s.metric].dropna()) if s.metric in table else []
    best = float(max(scored) if s.direction == "max" else min(scored)) if scored else None
    return Adding(held=len(table), last=int(table["number"].max()) if len(table) else 0, count=count, best=best)


def _raise_if_interrupted(run_dir: Path) -> None:
    """Tune returns normally after Ctrl-C; an unfinished experiment must not be reported as a finished one."""
    run = Run(run_dir)  # a local copy when the experiment lives in remote storage
    if run.finished() < run.config.search.num_samples:
        raise Interrupted(interrupted(run_dir))


def interrupted(run_dir: Path, cause: str | None = None, resume_command: str | None = None) -> str:
    """What an interrupted search says: why (if not the user), what finished and is kept, and (where the caller
    cannot add it) how to resume."""
    try:
        run = Run(run_dir)
        finished = run.finished()
    except UserError:  # before the trials (their folder not made yet): nothing to resume
        return (f"search interrupted{': ' + cause if cause else ''}, before any trial ran; start it again with the "
                "same command (without --resume)")
    text = (f"search interrupted{': ' + cause if cause else ''}; {finished} of {run.config.search.num_samples} "
            f"trials finished and saved in {run_dir}; unfinished trials resume from their last checkpoint")
    return text + (f"\nresume with: {resume_command}" if resume_command else "")
