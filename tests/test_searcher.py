"""What Optuna learns from a search's trials (search.tuner.Searcher): a trial ASHA stopped is PRUNED in the study,
with its epochs' figures, not a finished trial with its early figure.

The calls are those Ray's Tune controller makes (ray/tune/execution/tune_controller.py): each result goes to
`on_trial_result`, except the one a scheduler stops on (and the last), which goes marked done to
`on_trial_complete` alone."""
import math

import numpy as np
import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from ray.tune.result import DONE, TRAINING_ITERATION

from search.config import load_config
from search.records import JOURNAL
from search.tuner import _searcher


def test_stopped_trials_are_pruned_with_their_last_figure_and_tpe_learns_from_the_finished_ones(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=study", "search.num_samples=20", "train.epochs=4",
                             "search.metric=val_balanced_accuracy",
                             "search.seed=3"])
    (tmp_path / "study").mkdir()  # the run directory, which the driver makes before the searcher
    searcher = _searcher(cfg.updated({"search.space": {"train.lr": {"type": "loguniform", "low": 1e-4,
                                                                     "high": 1.0}}}))
    # a high learning rate looks good early (0.9 at epoch 2) but is stopped there; a low one finishes at 0.7.
    # Were the stopped trials COMPLETE with 0.9 (Ray's OptunaSearch), TPE would go for high learning rates.
    lrs = []
    for i in range(12):
        lrs.append(searcher.suggest(f"t{i}")["train.lr"])
        stopped = lrs[-1] > 0.01
        figures = [0.8, 0.9] if stopped else [0.5, 0.6, 0.65, 0.7]
        for epoch, value in enumerate(figures[:-1], start=1):
            searcher.on_trial_result(f"t{i}", {"val_balanced_accuracy": value, TRAINING_ITERATION: epoch})
        searcher.on_trial_complete(f"t{i}", {"val_balanced_accuracy": figures[-1], TRAINING_ITERATION: len(figures),
                                             DONE: True})
    journal = JournalStorage(JournalFileBackend(str(tmp_path / "study" / JOURNAL)))
    trials = optuna.load_study(study_name="study", storage=journal).trials
    assert len(trials) == 12 and 0 < sum(lr > 0.01 for lr in lrs) < 12
    for trial, lr in zip(trials, lrs, strict=True):
        if lr > 0.01:
            assert trial.state == optuna.trial.TrialState.PRUNED and trial.value == 0.9  # its epoch-2 figure
            assert trial.intermediate_values == {1: 0.8, 2: 0.9}
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.7
    # the sampler still proposes, from the finished trials' region
    proposed = [searcher.suggest(f"next{i}")["train.lr"] for i in range(8)]
    assert all(1e-4 <= lr <= 1.0 for lr in proposed)
    assert np.median(np.log10(proposed)) < math.log10(0.01), proposed


def test_a_failed_trial_is_failed_and_a_finished_one_complete(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=study", "train.epochs=2",
                             "search.metric=val_balanced_accuracy"])
    (tmp_path / "study").mkdir()
    searcher = _searcher(cfg)
    searcher.suggest("a")
    searcher.suggest("b")
    searcher.on_trial_result("a", {"val_balanced_accuracy": 0.6, TRAINING_ITERATION: 1})
    searcher.on_trial_complete("a", None, error=True)
    searcher.on_trial_result("b", {"val_balanced_accuracy": 0.6, TRAINING_ITERATION: 1})
    searcher.on_trial_complete("b", {"val_balanced_accuracy": 0.75, TRAINING_ITERATION: 2, DONE: True})
    journal = JournalStorage(JournalFileBackend(str(tmp_path / "study" / JOURNAL)))
    a, b = optuna.load_study(study_name="study", storage=journal).trials
    assert a.state == optuna.trial.TrialState.FAIL
    assert b.state == optuna.trial.TrialState.COMPLETE and b.value == 0.75


def test_a_search_anneals_the_learning_rate_at_each_asha_rung_and_restarts_it():
    """A plain cosine over 8 epochs is still at 85% of its peak at the end of epoch 2, where ASHA's first rung
    judges: the search's recipe anneals to zero at each rung and restarts at the peak; the user's config wins."""
    from kd.errors import ConfigError
    from kd.train import lr_factor
    from search.tuner import at_rungs

    cfg = load_config(None, ["train.epochs=8", "search.grace_period=2", "search.reduction_factor=2"])
    plain = [lr_factor(cfg.train, s, 10) for s in range(80)]
    assert plain[19] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 80))) and plain[19] > 0.85
    searched = at_rungs(cfg)
    assert searched.train.restarts == [2, 4] and cfg.train.restarts == []
    f = [lr_factor(searched.train, s, 10) for s in range(80)]
    for start, end in ((0, 20), (20, 40), (40, 80)):  # each cycle: from the peak down to near zero, never up
        assert f[start] == 1.0 and f[end - 1] < 0.01
        assert all(a >= b for a, b in zip(f[start:end], f[start + 1:end], strict=False))
        assert f[start + (end - start) // 2] == pytest.approx(0.5)
    assert at_rungs(load_config(None, ["train.epochs=8", "search.scheduler=none"])).train.restarts == []
    assert at_rungs(load_config(None, ["train.epochs=8", "search.anneal_at_rungs=false"])).train.restarts == []
    assert at_rungs(load_config(None, ["train.epochs=8", "train.schedule=step"])).train.restarts == []
    assert at_rungs(load_config(None, ["train.epochs=8", "train.restarts=[3]"])).train.restarts == [3]
    assert at_rungs(load_config(None, ["train.epochs=8", "train.warmup_epochs=2"])).train.restarts == [4]
    for bad in ("[4, 3]", "[8]", "[0]"):
        with pytest.raises(ConfigError, match=r"train\.restarts"):
            load_config(None, ["train.epochs=8", f"train.restarts={bad}"])
