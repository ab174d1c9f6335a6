"""Accuracy against cost as a real search: `search.objectives`, each student's cost measured once and kept, the front
from trials that ran every epoch, the same front in Optuna's study, the re-ranking on the front's members."""
from __future__ import annotations

import json

import optuna
import pytest

import search.cluster as cluster
import search.costs as costs_module
from kd.errors import ConfigError
from search.config import load_config
from search.costs import COSTS_FILE, student_costs
from search.driver import run_search
from search.records import JOURNAL
from search.run import Run
from tests.helpers import read_table, tiny_overrides


@pytest.mark.parametrize(("objectives", "message"), [
    ("[val_auc]", "must name two or more different figures"),
    ("[val_auc,val_auc]", "must name two or more different figures"),
    ("[val_balanced_accuracy,student_params]", "starts with 'val_balanced_accuracy', but search.metric is 'val_auc'"),
    ("[val_auc,val_balanced_log_loss]", "names no cost: add one of student_params"),
])
def test_objectives_that_cannot_work_are_refused_by_key(objectives, message):
    with pytest.raises(ConfigError, match=r"search\.objectives") as e:
        load_config(None, [f"search.objectives={objectives}"])
    assert message in str(e.value)


def test_an_objective_the_search_does_not_report_is_refused_before_anything_runs(tmp_path, shared_cache):
    objectives = "search.objectives=[val_auc,student_params,val_recal_rare]"
    cfg = load_config(None, [*tiny_overrides(shared_cache, tmp_path), objectives])
    with pytest.raises(ConfigError, match=r"search\.objectives 'val_recal_rare' is not reported by this search"):
        run_search(cfg, quiet=True, echo=lambda s: None)
    assert not (tmp_path / "kd").exists()


def test_each_student_is_measured_once_and_kept_across_searches(tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(tmp_path / "cache"))

    def task(*args, **kwargs):
        raise AssertionError("a Ray task was started where the trials run on this CPU")
    # as under a local Ray: the trials run on this machine's CPU, so this process measures them, with no task
    resources = cluster.trial_resources(cfg)
    monkeypatch.setattr(costs_module, "trial_resources", lambda cfg: resources)
    monkeypatch.setattr(costs_module, "trials_run_here", lambda: True)
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(cluster, "remote", task)
    first = student_costs(cfg, ["test_resnet", "test_efficientnet", "inception_v3"], 2, 32)
    assert first["test_resnet"]["student_params"] == 372882 and first["test_efficientnet"]["student_params"] == 99710
    assert first["test_resnet"]["student_mflops"] > first["test_efficientnet"]["student_mflops"] > 0
    assert all(first[n]["student_latency_ms"] > 0 for n in ("test_resnet", "test_efficientnet"))
    assert "Kernel size can't be greater than actual input size" in first["inception_v3"]["error"]
    kept = json.loads((tmp_path / "cache" / COSTS_FILE).read_text())["costs"]
    assert len(kept) == 2 and all("| 2 classes | 32 px |" in key for key in kept)  # an error is not kept

    def measured_again(*args, **kwargs):
        raise AssertionError("a cached student was measured again")
    monkeypatch.setattr(costs_module, "measure_many", measured_again)
    monkeypatch.setattr(costs_module, "call", measured_again)  # the trials run on this CPU: no task, the file answers
    again = student_costs(cfg, ["test_efficientnet", "test_resnet"], 2, 32)
    assert again == {n: first[n] for n in ("test_efficientnet", "test_resnet")}  # the same figures, not a re-run
    monkeypatch.undo()
    other_size = student_costs(cfg, ["test_resnet"], 2, 48)
    assert other_size["test_resnet"]["student_mflops"] > first["test_resnet"]["student_mflops"]
    assert len(json.loads((tmp_path / "cache" / COSTS_FILE).read_text())["costs"]) == 3


def test_a_multi_objective_search_stops_no_trial_early_unless_asked():
    """ASHA judges a trial on the accuracy figure alone: in a search for accuracy and cost it would stop the small
    students that start slower before they reach the front. So `search.scheduler: auto` is ASHA for one objective
    and none for several; asha or none still say which."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from search.tuner import _scheduler, asha_milestones
    both = "search.objectives=[val_auc,student_params]"
    assert isinstance(_scheduler(load_config(None, [both])), FIFOScheduler)
    assert not isinstance(_scheduler(load_config(None, [both])), ASHAScheduler)
    assert asha_milestones(load_config(None, [both, "train.epochs=8"])) == []  # and so no rung restarts
    assert isinstance(_scheduler(load_config(None, [both, "search.scheduler=asha"])), ASHAScheduler)
    assert isinstance(_scheduler(load_config(None, [])), ASHAScheduler)
    assert isinstance(_scheduler(load_config(None, ["search.scheduler=none"])), FIFOScheduler)


@pytest.mark.slow
def test_a_search_for_accuracy_and_size_finds_its_front(tmp_path, shared_cache):
    """Two students of different size; ASHA, asked for (a multi-objective search has none by default), stops some
    trials (PRUNED in the study, off the front). No loggers asked for: Ray adds none of its own (its TensorBoard
    logger would write event files into the trial folders)."""
    space = {"student.name": {"type": "choice", "values": ["test_resnet", "test_efficientnet"]},
             "train.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2}}
    cfg = load_config(None, tiny_overrides(shared_cache, tmp_path / "results") + [
        "name=front", "search.num_samples=6", "train.epochs=2", "search.grace_period=1", "search.confirm_seeds=1",
        "search.judge_seeds=0", "search.objectives=[val_auc,student_params]", "search.loggers=[]",
        "search.scheduler=asha",
    ]).updated({"search.space": space})
    lines: list[str] = []
    run_dir = run_search(cfg, quiet=True, echo=lines.append)
    table = read_table(run_dir / "trials.csv")
    assert set(table["student.name"]) == {"test_resnet", "test_efficientnet"}, table[["trial", "student.name"]]
    for _, same in table.groupby("student.name"):  # one measurement per architecture: identical costs
        assert same[["student_params", "student_mflops", "student_latency_ms"]].nunique().eq(1).all()

    study = optuna.load_study(study_name="front", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / JOURNAL))))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    states = table["status"].value_counts().to_dict()
    assert sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials) == states.get("stopped early", 0)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == states.get("completed", 0)

    front = Run(run_dir).front()
    assert len(front) >= 1 and (front["status"] == "completed").all()
    ours = sorted((round(r["val_auc"], 6), int(r["student_params"])) for _, r in front.iterrows())
    optunas = sorted((round(t.values[0], 6), int(t.values[1])) for t in study.best_trials)
    assert ours == optunas
    rerank = json.loads((run_dir / "rerank.json").read_text())
    assert sorted(c["trial"] for c in rerank["candidates"]) == sorted(front["trial"])
    pool, from_front = Run(run_dir).rerank_pool()
    assert from_front and sorted(pool["trial"]) == sorted(front["trial"])
    over = Run(run_dir)  # a budget no front member fits: the top trials within it, and the texts say so
    over.config = over.config.updated({"search.max_params": int(front["student_params"].min()) - 1})
    pool, from_front = over.rerank_pool()
    assert not from_front and (pool["student_params"] < front["student_params"].min()).all()
    summary = (run_dir / "summary.md").read_text()
    assert "A multi-objective search over val_auc (max), student_params (min)" in summary
    for trial in front["trial"]:
        assert f"| {trial} |" in summary.split("## Accuracy against cost")[1].split("##")[0]
    assert (run_dir / "plots" / "pareto.png").is_file()
    assert list((run_dir / "ray").glob("*/result.json")) and not list((run_dir / "ray").rglob("events.out.tfevents*"))
    assert any(line.startswith("students' cost on a trial's device: test_resnet") for line in lines), lines
