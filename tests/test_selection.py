"""Honest selection: folds, the cross-fitted decision rule, cross-validated students (no Ray)."""
import numpy as np
import pytest
import torch

from kd.crossval import make_folds, refit_data
from kd.errors import ConfigError
from kd.metrics import compute_metrics, tune_threshold
from kd.schemes import CrossValidated, Holdout, Scheme
from kd.selection import (
    ARGMAX,
    THRESHOLD,
    check_metric,
    cross_fitted_predictions,
    decision_rule,
    fold_ids,
    held_out_metrics,
    validation_parts,
)
from kd.shipping import Way, decide
from kd.student import train_student


def test_cross_fitted_threshold_by_hand():
    # part 0 is thresholded by the threshold tuned on part 1 alone, and the other way round
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.35, 0.3, 0.9, 0.2, 0.6, 0.7, 0.8])
    parts = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probs = np.stack([1 - p1, p1], 1)
    t0 = tune_threshold(labels[parts == 1], p1[parts == 1])  # part 1 separates at 0.65: between 0.6 and 0.7
    t1 = tune_threshold(labels[parts == 0], p1[parts == 0])  # part 0 at 0.325: between 0.3 and 0.35
    assert t0 == pytest.approx(0.65) and t1 == pytest.approx(0.5)  # ties go to the threshold nearest 0.5
    pred = cross_fitted_predictions(labels, probs, parts)
    assert pred.tolist() == [0, 0, 0, 1, 0, 1, 1, 1]  # 0.3 < 0.65 misses a positive; 0.6 >= 0.5 a false alarm


def test_on_noise_a_threshold_tuned_in_sample_flatters_and_the_cross_fitted_one_does_not():
    rng = np.random.default_rng(0)
    in_sample, crossed = [], []
    for _ in range(40):
        labels = (rng.random(200) < 0.1).astype(int)  # 10% rare, as on the mission's data
        p1 = rng.random(200)                           # a model that knows nothing
        probs = np.stack([1 - p1, p1], 1)
        tuned = tune_threshold(labels, p1)
        in_sample.append(compute_metrics(labels, probs, ["a", "b"], tuned)["balanced_accuracy"])
        crossed.append(held_out_metrics(labels, probs, ["a", "b"], validation_parts(labels, 0), THRESHOLD)
                       ["val_balanced_accuracy"])
    assert np.mean(in_sample) > 0.55           # the old val_balanced_accuracy_tuned: a winner's curse by design
    assert abs(np.mean(crossed) - 0.5) < 0.03  # chance, as it should be


def test_folds_are_stratified_seeded_and_keep_identical_images_together():
    labels = np.array([0] * 90 + [1] * 10)
    groups = [f"h{i // 2}" for i in range(100)]  # every image has a twin
    ids = fold_ids(labels, groups, 5, seed=3)
    assert np.array_equal(ids, fold_ids(labels, groups, 5, seed=3))
    assert not np.array_equal(ids, fold_ids(labels, groups, 5, seed=4))
    for f in range(5):
        assert np.bincount(labels[ids == f], minlength=2).tolist() == [18, 2]
    for i in range(0, 100, 2):
        assert ids[i] == ids[i + 1]


def test_rule_and_metric_checks():
    assert decision_rule(2) == THRESHOLD and decision_rule(3) == ARGMAX and decision_rule(2, tune=False) == ARGMAX
    check_metric("val_recall_rare", ["common", "rare"], THRESHOLD, CrossValidated.extra_metrics())
    check_metric("val_balanced_accuracy_fold_std", ["a", "b"], THRESHOLD, CrossValidated.extra_metrics())
    with pytest.raises(ConfigError, match="is not reported by this search"):
        check_metric("val_balanced_accuracy_fold_std", ["a", "b"], THRESHOLD, Holdout.extra_metrics())
    with pytest.raises(ConfigError, match="did you mean 'val_balanced_accuracy'"):
        check_metric("val_balanced_acuracy", ["a", "b"], THRESHOLD, Holdout.extra_metrics())
    with pytest.raises(ConfigError, match="is not reported by this search"):
        check_metric("val_balanced_accuracy_argmax", ["a", "b", "c"], ARGMAX, [])  # the same as the metric itself
    with pytest.raises(ConfigError, match="is not reported"):
        check_metric("val_balanced_accuracy_tuned", ["a", "b"], THRESHOLD, [])  # the flattering figure is gone


def test_every_pooled_image_is_judged_once_by_a_student_that_never_trained_on_it(digits_setup):
    _cfg, data, _ = digits_setup
    folds = make_folds(data, 3, seed=0)
    pooled = len(data.train) + len(data.val)
    assert len(folds.ids) == pooled and sorted(np.bincount(folds.ids)) == [479, 479, 479]
    for _f, fold in enumerate(folds.datasets):
        assert set(fold.train.hashes).isdisjoint(fold.val.hashes)
        assert len(fold.train) + len(fold.val) == pooled
        assert fold.test is data.test  # the test split stays untouched
    assert len({d.fingerprint for d in folds.datasets}) == 3  # each fold's teacher is cached by its own content
    refit = refit_data(data)
    assert len(refit.train) == pooled and len(refit.val) == 0


def test_cross_validated_students_learn_and_resume_exactly(digits_setup):
    cfg, data, _ = digits_setup
    from kd.teacher import prepare_teacher
    cfg = cfg.updated({"search.folds": 2})
    assert Scheme.of(cfg) is CrossValidated
    split = CrossValidated.split(cfg, data)
    scheme = split.taught([prepare_teacher(cfg, d, progress=False).logits for d in split.members])
    states = []
    full = scheme.fit(cfg, report=lambda row, state: states.append(state()))
    last = full.history[-1]
    assert last["val_balanced_accuracy"] > 0.75  # pooled out-of-fold, cross-fitted threshold: far above chance
    assert {"val_balanced_accuracy_argmax", "val_balanced_accuracy_fold_mean", "threshold"} <= set(last)
    assert full.probs is not None and len(full.probs) == len(data.train) + len(data.val)
    assert np.allclose(full.probs.sum(1), 1.0, atol=1e-5)  # every pooled image has its held-out prediction
    resumed = scheme.fit(cfg, resume=states[1])
    assert resumed.history[-1]["train_loss"] == pytest.approx(last["train_loss"], rel=1e-5)
    assert np.allclose(resumed.probs, full.probs, atol=1e-5)
    assert torch.is_tensor(states[-1]["probs"]) and len(states[-1]["members"]) == 2
    # judged at the last epoch only (a re-ranking's fit): the same students, the earlier epochs unjudged
    unwatched = scheme.fit(cfg, every_epoch=False)
    assert [("val_auc" in row) for row in unwatched.history] == [False] * (cfg.train.epochs - 1) + [True]
    assert unwatched.history[-1]["val_auc"] == last["val_auc"] and np.array_equal(unwatched.probs, full.probs)
    # a checkpoint of the earlier layout (before kd.schemes: "folds" and "oof_probs") resumes the same K students
    old = {"folds": states[1]["members"], "history": states[1]["history"], "epoch": 2, "oof_probs": states[1]["probs"]}
    again = scheme.fit(cfg, resume=old)
    assert again.history[-1]["train_loss"] == pytest.approx(last["train_loss"], rel=1e-5)
    # and ships as one: refitted on the pool, its threshold tuned on the out-of-fold predictions it saved
    old_last = {**old, "history": full.history, "oof_probs": torch.from_numpy(full.probs.astype(np.float32))}
    final = scheme.final(cfg.updated({"search.shipped_rule": "threshold"}), old_last, [], LocalCompute())
    pool = refit_data(data)
    assert final.way == Way.REFIT and final.sees_validation and final.train_images == len(pool.train) == len(full.probs)
    saved = old_last["oof_probs"].numpy()  # as checkpoints keep them, in float32
    assert final.threshold == pytest.approx(tune_threshold(pool.train.labels.numpy(), saved[:, 1]), abs=1e-6)


class LocalCompute:
    """kd.schemes.Compute in this process."""

    def teacher(self, cfg, data):
        from kd.teacher import prepare_teacher
        return prepare_teacher(cfg, data, progress=False)

    def run(self, fn, *args):
        return fn(*args)


def test_a_holdout_is_one_member_judged_on_validation(digits_setup):
    """The holdout scheme trains exactly what train_student trains, through the same loop, and resumes a checkpoint
    of the earlier (flat) layout."""
    cfg, data, teacher = digits_setup
    assert Scheme.of(cfg) is Holdout
    scheme = Holdout.split(cfg, data).taught([teacher.logits])
    states = []
    fit = scheme.fit(cfg, report=lambda row, state: states.append(state()))
    alone = train_student(cfg, data, teacher.logits, progress=False)
    assert fit.history[-1]["val_balanced_accuracy"] == alone.history[-1]["val_balanced_accuracy"]
    assert fit.threshold == alone.threshold and fit.probs.shape == (len(data.val), 2)
    flat = {**states[0]["members"][0], "history": states[0]["history"]}  # how a holdout trial checkpointed before
    resumed = scheme.fit(cfg, resume=flat)
    assert resumed.history[-1]["train_loss"] == pytest.approx(fit.history[-1]["train_loss"], rel=1e-5)
    state = {**states[-1]["members"][0], "history": states[-1]["history"], "probs": states[-1]["probs"]}
    final = scheme.final(cfg.updated({"search.shipped_rule": "threshold"}), state, [], LocalCompute())
    assert final.way == Way.CHECKPOINT and not final.sees_validation and final.epoch == cfg.train.epochs
    assert final.threshold == fit.threshold  # the trial's own, tuned on all of validation
    auto = scheme.final(cfg, state, [], LocalCompute()).decision  # the threshold only where it judged better
    assert auto.tuned == pytest.approx(fit.threshold, abs=1e-6) and auto.how == "auto"
    assert (auto.threshold is not None) == (auto.cross_fitted > auto.argmax)
    images = (data.test.images[:8].float() / 255 - 0.5) / 0.5
    assert torch.allclose(final.model.eval()(images), fit.model.cpu().eval()(images), atol=1e-5)


def test_the_shipped_rule_is_a_threshold_only_where_it_judged_better_than_argmax():
    """search.shipped_rule auto: each part of the held-out predictions is thresholded by the threshold the other
    parts tuned, and that threshold ships only where it beats argmax there."""
    labels = np.array([0] * 40 + [1] * 8)
    parts = np.arange(48) % 2

    def two(p1):
        return np.stack([1 - p1, p1], axis=1)

    # the rare class ranked apart but below 0.5: argmax never calls it, any threshold between the groups does
    low = two(np.r_[np.linspace(0.01, 0.2, 40), np.linspace(0.3, 0.45, 8)])
    chosen = decide(labels, [low], parts, "auto", tunes=True)
    assert chosen.argmax == 0.5 and chosen.cross_fitted == 1.0
    assert chosen.threshold == chosen.tuned and 0.2 < chosen.threshold < 0.3
    assert chosen.called == pytest.approx([40 / 48, 8 / 48])
    # already balanced at argmax, and a tuned cut that overfits one part: argmax ships (a tie would too)
    noisy = two(np.r_[np.linspace(0.01, 0.45, 38), [0.55, 0.6], np.linspace(0.52, 0.9, 7), [0.4]])
    kept = decide(labels, [noisy], parts, "auto", tunes=True)
    assert kept.threshold is None and kept.tuned is not None and kept.argmax >= kept.cross_fitted
    assert kept.text("the out-of-fold predictions").startswith("argmax: on the out-of-fold predictions, balanced")
    # the rule as configured, or argmax where nothing is tuned (more classes, train.tune_threshold false)
    assert decide(labels, [noisy], parts, "threshold", tunes=True).threshold == kept.tuned
    assert decide(labels, [low], parts, "argmax", tunes=True).threshold is None
    assert decide(labels, [low], parts, "auto", tunes=False).threshold is None
