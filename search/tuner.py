"""The Ray Tune experiment of a search: Optuna's TPE through `OptunaSearch`, ASHA, resources, storage, callbacks.

Optuna's TPE (seeded, multivariate over the conditional space, constant-liar for parallel trials) picks each
trial's hyperparameters; ASHA stops weak trials early, and Optuna is told so (a stopped trial is PRUNED there, with
each epoch's figure as an intermediate value, as Optuna's own pruners leave it). Only the sampled keys travel in
`param_space`; the base config and the scheme (its datasets and teachers' logits) reach the trainable through
`tune.with_parameters`.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, cast

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from ray import tune
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from kd.hub import Files
from kd.schemes import Scheme
from search.cluster import trial_resources, trial_slots
from search.compat import numbered_after, optuna_trial
from search.config import Config
from search.costs import Costs
from search.progress import TrialLog
from search.records import JOURNAL
from search.session import run_dir_of
from search.space import DefineByRun, check_points, parse_space
from search.tracking import logger_callbacks
from search.trainable import DistillTrainable

log = logging.getLogger("search")


@dataclass(frozen=True)
class Adding:
    """Trials added to a search whose own have all ended (`--resume` with a larger `search.num_samples`): Ray
    restores an experiment only as it was planned, so the added trials are a second Tune experiment in the same
    folder, on the same Optuna study (TPE goes on from every trial so far; the hand-picked points are not run
    again), numbered after the trials the folder holds. ASHA judges the added trials against each other."""
    held: int                # trials the experiment folder holds, all ended
    last: int                # the highest trial number among them
    count: int               # trials to add
    best: float | None       # the best search-metric figure among the trials held


def build_tuner(cfg: Config, scheme: Scheme, costs: Costs, exp_path: str, restore: bool, quiet: bool,
                weights: Files | None = None, adding: Adding | None = None) -> tune.Tuner:
    """`costs`: each student's, measured once (search.costs); `weights`: the driver's timm weights files the trials
    load (search.cluster.shipping); `adding`: a Tune experiment of added trials (never a restore)."""
    s = cfg.search
    resources = trial_resources(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(DistillTrainable, base=cfg.to_dict(), scheme=scheme.for_trials(),
                             checkpoint_epochs=checkpoint_epochs(cfg), threads=max(1, int(s.cpus_per_trial)),
                             weights=weights or None, costs=costs),
        resources.as_tune())
    if restore:  # the loggers are those the search started with (a search of an earlier version: Ray's own)
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)

    root, name = os.path.split(exp_path.rstrip("/"))
    tune_config = tune.TuneConfig(search_alg=_searcher(cfg, adding), scheduler=_scheduler(cfg),
                                  num_samples=adding.count if adding else s.num_samples,
                                  metric=s.metric, mode=s.direction,
                                  max_concurrent_trials=s.max_concurrent or trial_slots(resources),
                                  # the next trial starts in the last one's actor (search.trainable: reset_config),
                                  # with its imports, its device and the scheme it fetched; a class trainable has no
                                  # training thread that must end first, so a busy node cannot fail the reuse
                                  reuse_actors=True,
                                  trial_dirname_creator=numbered_after(adding.last) if adding else None)
    run_config = tune.RunConfig(
        name=name, storage_path=root, verbose=0,
        callbacks=[TrialLog(run_dir_of(cfg), s.metric, s.direction, cfg.train.epochs, echo=not quiet,
                            total=s.num_samples, earlier=adding.held if adding else 0,
                            best=adding.best if adding else None),
                   *logger_callbacks(cfg, run_dir_of(cfg))],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=s.max_failures))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


class Searcher(OptunaSearch):
    """Ray's OptunaSearch tells Optuna that every trial without an error completed, with its last figure: a trial
    ASHA stopped at epoch 2 would sit in the study beside full trials' epoch-8 figures, and TPE would model the
    schedule's cut as if it were the parameters' effect. Here a trial that ended before its last epoch without an
    error is PRUNED, its last figure reported as the intermediate value of its last epoch first (Ray passes the
    result that a scheduler stops on to no `on_trial_result`, and marks it done). Optuna takes the last intermediate
    value as a pruned trial's value; the installed TPE ranks pruned trials below complete ones, deeper ones first.
    (The Optuna trial behind a Ray trial comes from search.compat.optuna_trial: a Ray whose OptunaSearch does not
    give it tells a stopped trial as its own does, with one warning.)"""

    def __init__(self, *args: Any, epochs: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._epochs = epochs
        self._reported: dict[str, int] = {}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        super().on_trial_result(trial_id, result)
        if optuna_trial(self, trial_id) is not None:  # not told yet
            self._reported[trial_id] = result[TRAINING_ITERATION]

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        step = result.get(TRAINING_ITERATION) if result else None
        # a stopped trial's Optuna trial (search.compat): where this Ray's OptunaSearch does not give it (or it is
        # unknown, or told already), Ray's own tells the trial
        if error or result is None or step is None or step >= self._epochs \
                or (found := optuna_trial(self, trial_id)) is None:
            super().on_trial_complete(trial_id, result, error)
            return
        try:  # a multi-objective study takes no intermediate values: there, a pruned trial has none
            if not isinstance(self.metric, list) and self._reported.get(trial_id) != step \
                    and result.get(self.metric) is not None:
                found.trial.report(result[self.metric], step)
            cast(optuna.Study, found.study).tell(found.trial, state=optuna.trial.TrialState.PRUNED)
        except Exception as exc:  # as Ray's own: a study that refuses (a trial told twice) must not end the search
            log.warning("could not tell Optuna that trial %s was stopped: %s", trial_id, exc)
        found.told()
        self._reported.pop(trial_id, None)


def _searcher(cfg: Config, adding: Adding | None = None) -> OptunaSearch:
    """TPE on the search's study in its journal (an earlier part's trials included), the hand-picked points enqueued
    first. For `adding` trials the points are not enqueued (they ran) and the sampler is seeded apart (the search's
    seed plus the trials held): seeded as the first part's was, its random start-up draws would repeat that part's
    trials' settings one for one (seen: added trials 3 and 4 trained the very settings of trials 1 and 2)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = cfg.search
    params = parse_space(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        seed = s.seed + (adding.held if adding else 0)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                             n_startup_trials=min(10, max(4, s.num_samples // 3)))
    # The study lives beside the results (not in remote storage): Optuna's own tools can load it from there.
    journal = run_dir_of(cfg) / JOURNAL
    storage = JournalStorage(JournalFileBackend(str(journal)))
    # several objectives (search.objectives): the same TPE in its multi-objective mode
    # (docs/searching.md: accuracy against cost)
    metric, mode = (s.objectives, s.directions) if s.objectives else (s.metric, s.direction)
    return Searcher(epochs=cfg.train.epochs, space=DefineByRun(params, cfg), metric=metric, mode=mode,
                        points_to_evaluate=(check_points(s.points, params, cfg) or None) if adding is None else None,
                        sampler=sampler,
                        storage=storage, study_name=cfg.name)


def asha_milestones(cfg: Config) -> list[int]:
    """The epochs at which ASHA may stop a trial: grace_period * reduction_factor**k below train.epochs, as Ray's
    ASHAScheduler places its rungs (one bracket)."""
    if not cfg.search.stops_early:
        return []
    grace, rf, top = min(cfg.search.grace_period, cfg.train.epochs), cfg.search.reduction_factor, cfg.train.epochs
    rungs = int(math.log(top / grace) / math.log(rf) + 1)
    return [grace * rf**k for k in range(rungs) if grace * rf**k < top]


def at_rungs(cfg: Config) -> Config:
    """The search's recipe: with `search.anneal_at_rungs`, ASHA and a cosine schedule, `train.restarts` set to
    ASHA's rungs (where the config names none), so each trial's learning rate anneals to zero at every epoch a
    rung judges it. A plain cosine over all the epochs is still high at the first rung: a trial with a high rate
    looks worse there than it ends, and ASHA stops the slow starters (docs/searching.md: what a search does to the
    schedule; bench/rungs.py measures it)."""
    t = cfg.train
    if not cfg.search.anneal_at_rungs or t.restarts or t.schedule != "cosine":
        return cfg
    rungs = [e for e in asha_milestones(cfg) if e > t.warmup_epochs]
    return replace(cfg, train=replace(t, restarts=rungs)) if rungs else cfg


def checkpoint_epochs(cfg: Config) -> frozenset[int]:
    """Every `search.checkpoint_every`-th epoch, every epoch where ASHA may stop the trial, and the last: the state
    a trial's export comes from is always that of the epoch that ranked it."""
    every = {e for e in range(1, cfg.train.epochs + 1) if e % cfg.search.checkpoint_every == 0}
    return frozenset(every | set(asha_milestones(cfg)) | {cfg.train.epochs})


def _scheduler(cfg: Config) -> TrialScheduler:
    if cfg.search.stops_early:
        return ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                             grace_period=min(cfg.search.grace_period, cfg.train.epochs),
                             reduction_factor=cfg.search.reduction_factor)
    return FIFOScheduler()
