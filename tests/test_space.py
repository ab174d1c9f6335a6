"""The search space, sampled by Optuna's define-by-run directly (no Ray needed)."""
import re

import optuna
import pytest

from kd.errors import ConfigError
from search.config import load_config
from search.space import DefineByRun, check_points, parse_space


def sample(cfg, n=150):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    space = DefineByRun(parse_space(cfg), cfg)
    trials = []
    for _ in range(n):
        trial = study.ask()
        space(trial)
        study.tell(trial, 0.0)
        trials.append(trial.params)
    return trials


def test_default_space_never_samples_temperature_for_hard_mode():
    trials = sample(load_config(None))
    modes = {t["distill.mode"] for t in trials}
    methods = {t["imbalance.method"] for t in trials}
    assert modes == {"soft", "hard"} and len(methods) == 5
    for t in trials:
        assert ("distill.temperature" in t) == (t["distill.mode"] == "soft")
        assert ("imbalance.beta" in t) == (t["imbalance.method"] == "effective")
        assert ("imbalance.tau" in t) == (t["imbalance.method"] == "logit_adjust")
        assert 1.0 <= t.get("distill.temperature", 1.0) <= 20.0 and 0.0 <= t["distill.alpha"] <= 1.0


def test_conditions_on_fixed_keys_follow_the_base_config():
    cfg = load_config(None, ["distill.mode=hard"])
    cfg = cfg.updated({"search.space": {"distill.temperature": {"type": "uniform", "low": 1, "high": 5,
                                                                  "when": {"distill.mode": "soft"}},
                                        "distill.alpha": {"type": "uniform", "low": 0, "high": 1}}})
    assert all("distill.temperature" not in t for t in sample(cfg, 20))


def test_conditions_are_ordered_after_what_they_depend_on():
    cfg = load_config(None)
    space = dict(reversed(list(cfg.search.space.items())))  # conditions first in the YAML
    params = parse_space(cfg.updated({"search.space": space}))
    order = [p.key for p in params]
    assert order.index("distill.mode") < order.index("distill.temperature")
    assert order.index("imbalance.method") < order.index("imbalance.tau")


@pytest.mark.parametrize("space, message", [
    ({"distill.temprature": {"type": "uniform", "low": 1, "high": 2}}, "'distill.temprature' is not a config key"),
    ({"distill.alpha": {"type": "uniform", "low": 0, "high": 2}}, "'distill.alpha' must be in [0, 1]"),
    ({"distill.mode": {"type": "choice", "values": ["soft", "warm"]}}, "must be one of soft, hard"),
    ({"train.lr": {"type": "loguniform", "low": 0, "high": 1}}, "a log scale needs low > 0"),
    ({"train.lr": {"type": "normal", "low": 0, "high": 1}}, "type must be one of"),
    ({"train.lr": {"type": "uniform", "low": 0.5, "high": 0.1}}, "must be below high"),
    ({"train.lr": {"type": "uniform", "low": 0.1, "hi": 0.5}}, "unknown field hi"),
    ({"train.batch_size": {"type": "int", "low": 2.5, "high": 4}}, "int bounds must be whole numbers"),
    # what a search prepares once for every trial cannot vary between trials (the cached logits would be wrong)
    ({"augment.rotation": {"type": "uniform", "low": 0, "high": 30}}, "'augment.rotation' cannot be searched: the "
                                                                       "teacher's logits are cached"),
    ({"teacher.name": {"type": "choice", "values": ["resnet18"]}}, "'teacher.name' cannot be searched"),
    ({"data.image_size": {"type": "choice", "values": [32, 64]}}, "'data.image_size' cannot be searched"),
    ({"train.epochs": {"type": "int", "low": 2, "high": 8}}, "the budget ASHA divides"),
    ({"search.seed": {"type": "int", "low": 0, "high": 8}}, "'search.seed' cannot be searched: it is not a training"),
    ({"train.lr": 0.1}, "must be a mapping"),
    ({"distill.alpha": {"type": "uniform", "low": 0, "high": 1, "when": {"distill.alpha": 0.5}},
      "train.lr": {"type": "uniform", "low": 0.1, "high": 0.5}}, "circular"),
])
def test_bad_spaces_are_named(space, message):
    cfg = load_config(None).updated({"search.space": space})
    with pytest.raises(ConfigError) as e:
        parse_space(cfg)
    assert message in str(e.value)


def test_points_are_checked():
    cfg = load_config(None)
    params = parse_space(cfg)
    good = [{"distill.mode": "soft", "distill.temperature": 5.0, "distill.alpha": 0.5}]
    assert check_points(good, params, cfg) == good
    for point, message in [({"distill.mode": "hard", "distill.temperature": 5.0}, "only applies when"),
                           ({"train.epochs": 3}, "is not in search.space"),
                           ({"distill.alpha": 1.5}, "must be in [0, 1]"),
                           ({"train.lr": 5.0}, "outside the searched range")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_points([point], params, cfg)


def test_enqueued_points_are_evaluated_first():
    cfg = load_config(None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    point = {"distill.mode": "hard", "distill.alpha": 0.25, "train.lr": 0.01, "imbalance.method": "none"}
    study.enqueue_trial(point)
    trial = study.ask()
    DefineByRun(parse_space(cfg), cfg)(trial)
    assert trial.params == point


def test_a_searched_model_that_cannot_exist_is_refused_before_the_search_starts():
    from kd.errors import UserError
    from search.space import check_searched_models
    cfg = load_config(None).updated({"search.space": {
        "student.name": {"type": "choice", "values": ["test_resnet", "resnet_51"]},
        "distill.alpha": {"type": "uniform", "low": 0, "high": 1}}})
    with pytest.raises(UserError, match=re.escape("search.space['student.name'] offers 'resnet_51', which cannot "
                                                  "work: student.name: 'resnet_51' is not a timm model name")):
        check_searched_models(cfg, parse_space(cfg), weights=False)
