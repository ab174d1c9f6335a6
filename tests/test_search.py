"""End-to-end searches with Ray Tune + Optuna on the digits, tiny models, a few trials (Ray is stopped after each).

Most tests read the one search of the test run (`shared_search`, tests/conftest.py): cross-validated (2 folds), as
searches are by default, with two students under a budget; the reliability tests cover the holdout."""
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from sklearn.metrics import balanced_accuracy_score

from kd.export import load_student
from kd.files import read_jsonl
from search.cli import main
from search.config import load_config
from search.driver import run_search
from search.format import number
from search.records import HALF_FIGURES
from tests.helpers import read_table, tiny_overrides, trial_results

pytestmark = pytest.mark.slow

def test_every_output_is_written(shared_search):
    _cfg, run_dir, lines = shared_search
    assert (run_dir.parent.parent / "remote" / "tiny-search" / "ray").is_dir()  # Ray wrote to the storage
    for name in ("trials.csv", "summary.md", "config.yaml", "teacher.json", "rerank.json", "optuna.journal",
                 "best/model.safetensors", "best/config.json", "best/metrics.json", "best/model.pt2",
                 "plots/trials.png", "plots/params.png", "plots/learning_curves.png",
                 "plots/confusion_matrix_test.png"):
        assert (run_dir / name).is_file(), name
    completed = (read_table(run_dir / "trials.csv")["status"] == "completed").sum()
    # fANOVA reads complete trials only (stopped ones are pruned in the study): the plot, or the reason there is none
    assert (run_dir / "plots/importance.png").is_file() == (completed >= 3)
    assert (completed >= 3) or f"needs 3; {completed} did" in (run_dir / "summary.md").read_text()
    assert any("held-out test (evaluated once)" in line for line in lines)


def test_trials_table_has_a_row_per_trial_with_its_parameters_and_metrics(shared_search):
    cfg, run_dir, _ = shared_search
    table = read_table(run_dir / "trials.csv")
    assert len(table) == cfg.search.num_samples and table["trial"].is_unique
    for column in ("distill.mode", "distill.temperature", "train.lr", "val_balanced_accuracy", "val_accuracy",
                   "val_macro_f1", "val_recall_other", "val_recall_digit_8", "epochs", "seconds", "status", "error"):
        assert column in table.columns, column
    assert table.loc[table["distill.mode"] == "hard", "distill.temperature"].isna().all()
    ran = table[table["epochs"] > 0]
    assert (ran["best_val_balanced_accuracy"] >= ran["val_balanced_accuracy"] - 1e-12).all()
    # no GPU anywhere: every trial ran on a CPU, with no GPU from Ray, on this machine's one Ray node
    assert set(ran["device"]) == {"cpu"} and ran["gpus"].isna().all() and ran["node"].nunique() == 1
    assert (ran["ended"] > ran["started"]).all()
    assert (ran["best_epoch"] <= ran["epochs"]).all() and (ran["best_epoch"] >= 1).all()
    # both of this machine's slots trained: two trials ran at once (nothing else holds a slot during the trials)
    assert any(a.started < b.ended and b.started < a.ended for a, b in itertools.combinations(ran.itertuples(), 2))


def test_the_rerank_winner_is_refitted_and_ships_the_threshold_of_its_out_of_fold_predictions(shared_search):
    cfg, run_dir, _ = shared_search
    from kd.files import load_tensors
    from kd.metrics import tune_threshold
    table = read_table(run_dir / "trials.csv")
    rerank = json.loads((run_dir / "rerank.json").read_text())
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    top = table[table["status"] == "completed"].sort_values(cfg.search.metric, ascending=False)
    chosen = [c["trial"] for c in rerank["candidates"]]
    assert set(top["trial"].head(2)) <= set(chosen)  # the top trials are re-ranked, with the hand-picked points
    assert best["trial"] == rerank["winner"] == max(rerank["candidates"], key=lambda c: c["mean"])["trial"]
    assert all(len(c["values"]) == 2 for c in rerank["candidates"])
    assert rerank["judge_seeds"] == [3]  # the winner is judged on a seed that did not pick it, beside the points
    judged = {c["trial"] for c in rerank["candidates"] if c["judged"]}  # the winner, the points, the halves' picks
    halves = {t for c in rerank["against_points"] for t in c["judged"]}
    assert judged >= {rerank["winner"]} | {c["trial"] for c in rerank["candidates"] if c["hand_picked"]}
    assert judged <= {rerank["winner"]} | halves | {c["trial"] for c in rerank["candidates"] if c["hand_picked"]}
    for c in rerank["against_points"]:
        assert c["verdict"] == "same" or c["verdict"] == "unjudged" or (
            (c["verdict"] == "beats") == (c["lower"] > 0) and c["detectable"] > 0 and len(c["judged"]) == 2)
    assert best["final"] == "refit" and best["train_images"] == 1077 + 360  # all of train + validation
    probs = load_tensors(run_dir / "rerank_probs.safetensors")[0]["probs"].numpy()  # the winner's, per seed
    from kd.crossval import pooled
    from kd.data import load_dataset
    labels = pooled(load_dataset(cfg.data, progress=False)).labels.numpy()
    assert len(probs) == 3  # its two re-ranking seeds and its judging seed
    assert best["threshold"] == pytest.approx(tune_threshold(np.tile(labels, 3), probs.reshape(-1, 2)[:, 1]))
    lo, hi = best["test"]["balanced_accuracy_interval"]  # the test figure with its noise
    assert lo < best["test"]["balanced_accuracy"] < hi and hi - lo > 0.02
    student = load_student(run_dir / "best")
    assert student.classes == ["other", "digit_8"] and student.threshold == pytest.approx(best["threshold"])
    assert student.info["config"]["distill"]["mode"] == table.set_index("trial").loc[best["trial"], "distill.mode"]
    assert best["test"]["balanced_accuracy"] > 0.6  # a real student, on data the search never saw
    assert set(table["rule"]) == {"cross-fitted threshold, 2-fold out-of-fold"}


def test_the_student_is_set_against_its_own_teacher_on_the_same_test_images_and_rule(shared_search):
    """Not the fold teachers' validation argmax against the student's cross-fitted figure: the teacher the exported
    student learned from (the refit's) and the student, both at argmax, on the test split."""
    _cfg, run_dir, _ = shared_search
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    teacher, student = best["teacher_test"], best["test_argmax"]
    test_counts = np.asarray(best["test"]["confusion_matrix"]).sum(axis=1)
    for m in (teacher, student):
        cm = np.asarray(m["confusion_matrix"])
        assert (cm.sum(axis=1) == test_counts).all() and m["threshold"] is None  # the same images, argmax
        assert m["balanced_accuracy"] == pytest.approx(np.mean(np.diag(cm) / cm.sum(axis=1)))
    assert teacher["balanced_accuracy"] > 0.6 and teacher["auc"] > 0.8  # a real teacher, not a placeholder
    comparison = best["cost"]["comparison"]
    assert comparison["teacher_metric"] == teacher["balanced_accuracy"]
    assert comparison["student_metric"] == student["balanced_accuracy"]
    assert "test balanced accuracy at argmax (both)" in best["cost"]["summary"]
    summary = (run_dir / "summary.md").read_text()
    assert f"| the teacher it learned from | {number(teacher['balanced_accuracy'])} |" in summary


def test_the_refit_is_set_against_the_fold_students_its_threshold_was_tuned_on(shared_search):
    """The calibration shift of the shipped refit, on the test images: its side recomputed from the export itself."""
    cfg, run_dir, _ = shared_search
    from kd.data import load_dataset
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    shift = best["calibration_shift"]
    assert shift["models_tuned_on"] == 2 and shift["threshold"] == best["threshold"]
    test = load_dataset(cfg.data, progress=False).test
    probs = load_student(run_dir / "best").probs(test.images)
    assert shift["images"] == len(test) == len(probs)  # an image on the threshold may round either way
    called = np.mean(probs[:, 1] >= best["threshold"])
    assert shift["called_class_1_shipped"] == pytest.approx(called, abs=1.5 / len(test))
    assert 0 < shift["called_class_1_tuned_on"] < 1 and 0 < shift["median_p1_tuned_on"] < 1
    assert shift["fits_tuned_on"] == 3  # the winner's two re-ranking fits and its judging fit
    assert "(tuned on the out-of-fold predictions of 3 cross-validated fits of its config)" in (
        run_dir / "summary.md").read_text()


def test_summary_names_the_rule_and_sets_the_search_beside_its_reranking_and_test(shared_search):
    _cfg, run_dir, _ = shared_search
    table = read_table(run_dir / "trials.csv")
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    summary = (run_dir / "summary.md").read_text()
    assert "Figures: threshold on p(class 1) cross-fitted" in summary
    assert "pooled out-of-fold predictions of 2 folds" in summary
    assert f"Trial `{best['trial']}`, refitted on all 1437 train + validation images" in summary
    assert f"{best['test']['balanced_accuracy']:.4f}".rstrip("0") in summary
    assert "## Best soft vs best hard distillation (validation)" in summary
    first = table.sort_values("number").iloc[0]  # search.points run first; the summary sets them beside the best
    assert f"| hand-picked 1: student.name test_resnet, mode soft, T 4, lr 0.003 | {first['trial']} |" in summary
    assert "| best found by the search: " in summary
    assert "## Re-ranking over further seeds" in summary and "| re-ranking, mean ± std over seeds [1, 2] |" in summary
    assert "**Against hand-picked 1**" in summary  # said plainly, beaten beyond the noise or not
    assert "judged on images and seeds that did not pick" in summary
    assert "balanced accuracy, 95% interval (from each class's score interval)" in summary
    opening = summary.split("## Teacher")[0]  # what happened, first: the verdicts in a line and the next step
    assert "**Against the hand-picked settings:** the winner " in opening and "**Next to try:** " in opening
    assert f"| {best['trial']} (exported) |" in summary  # the exported trial marked where the trials are listed
    assert f"    kdsearch export {run_dir.name} --trial {best['trial']} --out {run_dir.name}/best-rebuilt" in summary


def test_teacher_ran_once_before_the_trials(shared_search):
    cfg, run_dir, _ = shared_search
    teacher = json.loads((run_dir / "teacher.json").read_text())
    assert teacher["teachers"] == 2  # one per fold, each trained on the other fold (half of the 1437 images)
    assert teacher["info"]["forward_images"] in (0, cfg.train.epochs * 1437)  # 0 when the cache already had it
    # every trial counted the images it ran through a teacher itself, in its own process: none
    table = read_table(run_dir / "trials.csv")
    reported = table[table["epochs"] > 0]
    assert len(reported) and (reported["teacher_forward_images"] == 0).all()
    assert f"the trials ran no teacher forward pass ({len(reported)} trials counted theirs)" in (
        run_dir / "summary.md").read_text()


def test_optuna_holds_the_stopped_trials_as_pruned(shared_search):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from search.records import TrialStatus
    cfg, run_dir, _ = shared_search
    study = optuna.load_study(study_name=cfg.name,
                              storage=JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal"))))
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    status = read_table(run_dir / "trials.csv")["status"].value_counts().to_dict()
    assert states.get("PRUNED", 0) == status.get(TrialStatus.STOPPED, 0)
    assert states.get("COMPLETE", 0) == status.get("completed", 0)
    assert states.get("FAIL", 0) == status.get("failed", 0)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert all(t.value == t.intermediate_values[t.last_step] for t in pruned)


def test_failing_and_diverging_trials_are_recorded_and_the_search_goes_on(shared_search):
    _cfg, run_dir, _ = shared_search
    table = read_table(run_dir / "trials.csv")
    failed = table[table["status"] == "failed"]
    assert set(failed["student.name"]) >= {"inception_v3"}
    errors = " ".join(failed["error"].astype(str))
    assert "Kernel size can't be greater than actual input size" in errors and "non-finite loss" in errors
    assert (failed["failures"] == 1).all()  # not retried (search.max_failures=0): failed once, then recorded
    ranked = table[table["status"].isin(["completed", "stopped early"])]
    assert len(ranked) == 2
    assert ranked[list(HALF_FIGURES)].map(lambda v: 0 <= v <= 1).all().all()  # each half's figure: its own pool
    assert failed[list(HALF_FIGURES)].isna().all().all()


def test_analyze_on_a_copy_reproduces_the_tables(shared_search, tmp_path, capsys):
    _cfg, run_dir, _ = shared_search
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "run.json").write_text(json.dumps({**json.loads((copy / "run.json").read_text()),
                                               "experiment": str(tmp_path / "gone")}))
    for name in ("trials.csv", "summary.md"):
        (copy / name).unlink()
    shutil.rmtree(copy / "plots")
    assert main(["analyze", str(copy)]) == 0
    assert "4 trials" in capsys.readouterr().out
    original, rebuilt = read_table(run_dir / "trials.csv"), read_table(copy / "trials.csv")
    pd.testing.assert_frame_equal(original, rebuilt)
    moved = (run_dir / "summary.md").read_text().replace(str(run_dir), str(copy))  # the run's folder, by its new name
    moved = moved.replace(f"export {run_dir.name} ", f"export {copy.name} ").replace(f"--out {run_dir.name}/",
                                                                                   f"--out {copy.name}/")
    assert (copy / "summary.md").read_text() == moved
    assert (copy / "plots" / "trials.png").is_file()


def test_compare_sets_searches_side_by_side(shared_search, tmp_path, capsys):
    _cfg, run_dir, _ = shared_search
    other = tmp_path / "other"  # a second search: the same run, its exported student's test figure lowered
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("ray", "plots", "best"))
    (other / "best").mkdir()
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    (other / "best" / "metrics.json").write_text(json.dumps({**best, "test": {
        **best["test"], "balanced_accuracy": 0.5, "balanced_accuracy_interval": [0.45, 0.55]}}))
    assert main(["compare", str(run_dir), str(other), "--out", str(tmp_path / "side")]) == 0
    said = capsys.readouterr().out
    assert f"the highest test balanced accuracy: tiny-search ({best['test']['balanced_accuracy']:.4f}" in said
    table = read_table(tmp_path / "side" / "compare.csv")
    assert list(table["search"]) == ["tiny-search", "other"] and list(table["winner"]) == [best["trial"]] * 2
    lo, hi = best["test"]["balanced_accuracy_interval"]
    assert table.loc[0, "test balanced accuracy"] == pytest.approx(best["test"]["balanced_accuracy"])
    assert table.loc[0, "95% interval"] == f"{lo:.3f}-{hi:.3f}"
    trials = read_table(run_dir / "trials.csv").set_index("trial")
    assert table.loc[0, "student params"] == trials.loc[best["trial"], "student_params"]
    assert table.loc[0, "trial slot-hours"] > 0 and table.loc[0, "GPU-hours"] == 0  # CPU trials
    assert table.loc[0, "wall s"] == pytest.approx(json.loads((run_dir / "run.json").read_text())["seconds"])
    winner = trials.loc[best["trial"], "student.name"]
    assert f"| tiny-search | {winner} |" in (tmp_path / "side" / "compare.md").read_text()
    assert (tmp_path / "side" / "compare.png").stat().st_size > 5000
    assert main(["compare", str(run_dir), str(tmp_path)]) == 2  # not a search: one message, nothing written
    assert f"{tmp_path} is not a search directory" in capsys.readouterr().err


def winner_fold_students(run_dir, trial):
    """A trial's config, its last checkpoint's state and its fold students from that checkpoint (in eval mode)."""
    from kd.student import student_shell
    from kd.train import load_state
    from search.experiment import latest_checkpoint
    from search.run import Run
    run = Run(run_dir)
    row = run.trial(trial)
    trial_cfg, state = run.trial_config(row), load_state(latest_checkpoint(row["path"]))
    folds = []
    for member in state["members"]:
        fold = student_shell(trial_cfg, 2, 32)
        fold.load_state_dict(member["model"])
        folds.append(fold.eval())
    return trial_cfg, state, folds


def judged_fold_students(run_dir, trial):
    """A trial's config and the fold students the re-ranking judged and kept (judged_students.safetensors: one further
    seed's, trained for all epochs), in eval mode, with their own out-of-fold probabilities."""
    from kd.shipping import Judged
    from kd.student import student_shell
    from search.records import JUDGED
    from search.run import Run
    run = Run(run_dir)
    trial_cfg = run.trial_config(run.trial(trial))
    judged = Judged.load(run_dir / JUDGED)
    folds = []
    for weights in judged.weights:
        fold = student_shell(trial_cfg, 2, 32)
        fold.load_state_dict(weights)
        folds.append(fold.eval())
    return trial_cfg, judged, folds


def test_the_winner_ships_as_its_judged_fold_students_averaged(shared_search, tmp_path, capsys):
    """`kdsearch export --final ensemble`: the fold students the re-ranking judged (all epochs, one further seed, kept
    beside rerank.json), as one model; its probabilities are their mean, and its rule is chosen on their own
    out-of-fold predictions: the shipped model is the one whose predictions chose it."""
    cfg, run_dir, _ = shared_search
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    rerank = json.loads((run_dir / "rerank.json").read_text())
    assert main(["export", str(run_dir), "--final", "ensemble", "--out", str(tmp_path / "ens")]) == 0
    assert f"its 2 fold students at epoch {cfg.train.epochs}" in capsys.readouterr().out
    ensemble = load_student(tmp_path / "ens")
    shipped = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert ensemble.info["ensemble"] == shipped["members"] == 2 and shipped["final"] == "ensemble"
    assert shipped["trial"] == best["trial"] and shipped["epoch"] == cfg.train.epochs
    from kd.crossval import pooled
    from kd.data import load_dataset
    from kd.infer import predict_probs
    from kd.metrics import tune_threshold
    _trial_cfg, judged, students = judged_fold_students(run_dir, best["trial"])
    assert judged.seed == rerank["seeds"][0]
    test = load_dataset(cfg.data, progress=False).test
    folds = [predict_probs(fold, test.images, ensemble.info["mean"], ensemble.info["std"], torch.device("cpu"))
             for fold in students]
    assert np.allclose(ensemble.probs(test.images), np.mean(folds, axis=0), atol=1e-5)
    one = read_table(run_dir / "trials.csv").set_index("trial").loc[best["trial"], "student_params"]
    assert shipped["test"]["balanced_accuracy"] > 0.6 and shipped["cost"]["student"]["parameters"] == 2 * one
    # its rule: chosen on the out-of-fold predictions of the very students it ships
    labels = pooled(load_dataset(cfg.data, progress=False)).labels.numpy()
    rule = shipped["rule"]
    assert rule["tuned"] == pytest.approx(tune_threshold(labels, judged.probs[:, 1]))
    assert rule["argmax"] == pytest.approx(balanced_accuracy_score(labels, judged.probs.argmax(1)))
    assert shipped["threshold"] == (rule["tuned"] if rule["cross_fitted"] > rule["argmax"] else None)
    if shipped["threshold"] is not None:  # its calibration against those same students: no shift to speak of
        assert shipped["calibration_shift"]["fits_tuned_on"] == 1
    assert shipped["val"] == {} and "made of the fold students" in shipped["val_about"]


def test_the_winner_distilled_from_its_fold_students_averaged(shared_search, tmp_path, capsys):
    """`kdsearch export --final distilled`: one student trained on all of train + validation with the winner's fold
    students, averaged, as its teacher; reproduced outside Ray from the checkpoint (the ensemble's logits on the
    student's own views), and not the refit; the ensemble beside it on the test images, under argmax."""
    cfg, run_dir, _ = shared_search
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert main(["export", str(run_dir), "--final", "distilled", "--out", str(tmp_path / "dis")]) == 0
    assert "one student distilled from its 2 fold students averaged" in capsys.readouterr().out
    student = load_student(tmp_path / "dis")
    shipped = json.loads((tmp_path / "dis" / "metrics.json").read_text())
    assert shipped["members"] == 2 and shipped["final"] == "distilled"
    assert shipped["trial"] == best["trial"] and shipped["threshold"] == best["threshold"]  # the same rule
    if shipped["threshold"] is not None:  # tuned on the fold students' predictions: its shift against them measured
        assert shipped["calibration_shift"]["models_tuned_on"] == 2
    from kd.crossval import refit_data
    from kd.data import load_dataset
    from kd.ensemble import Ensemble
    from kd.infer import predict_probs
    from kd.metrics import compute_metrics
    from kd.student import train_student
    from kd.teacher import view_logits
    trial_cfg, _judged, folds = judged_fold_students(run_dir, best["trial"])  # its teacher: the judged students
    ensemble = Ensemble(folds).eval()
    data = load_dataset(cfg.data, progress=False)
    pool = refit_data(data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the final student trained (search.cpus_per_trial=1)
    try:
        logits = view_logits(ensemble, trial_cfg.train, trial_cfg, pool, range(trial_cfg.train.epochs),
                             torch.device("cpu"))
        again = train_student(trial_cfg, pool, logits, progress=False).model.cpu().eval()
    finally:
        torch.set_num_threads(threads)
    images = data.test.images[:16]
    assert torch.allclose(student.logits(images), again((images.float() / 255 - 0.5) / 0.5), atol=1e-4)
    assert not torch.allclose(student.logits(images), load_student(run_dir / "best").logits(images), atol=1e-2)
    probs = np.mean([predict_probs(f, data.test.images, student.info["mean"], student.info["std"], torch.device("cpu"))
                     for f in folds], axis=0)
    averaged = compute_metrics(data.test.labels.numpy(), probs, data.classes, None)
    assert shipped["ensemble_test"]["balanced_accuracy"] == pytest.approx(averaged["balanced_accuracy"])
    assert shipped["test"]["balanced_accuracy"] > 0.6
    # no validation figure of a model that trained on every labelled image; the trial's own are named as such
    assert shipped["val"] == {} and "trained on all of train + validation" in shipped["val_about"]
    assert shipped["trial_val"] == best["trial_val"] and "the search trial's fold students" in shipped["val_about"]


def test_an_earlier_versions_best_record_is_still_read(shared_search, tmp_path):
    """best/metrics.json of a version that named the trial's figures `val_last_epoch` and said how it shipped in
    flags (`refit`, `ensemble`): read, under today's names."""
    from search.records import BestRecord
    _cfg, run_dir, _ = shared_search
    raw = json.loads((run_dir / "best" / "metrics.json").read_text())
    raw["val_last_epoch"] = raw.pop("trial_val")
    for name in ("val_about", "ensemble_test", "final", "members"):
        raw.pop(name)
    raw.update(refit=True, ensemble=0)
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "metrics.json").write_text(json.dumps(raw))
    record = BestRecord.read(tmp_path)
    assert record is not None and record.trial_val == raw["val_last_epoch"] and record.val_about == ""
    assert record.final == "refit" and record.members == 0


def test_export_a_chosen_trial_and_reproduce_it_outside_ray(shared_search, tmp_path):
    """A trial's students and its export, trained again outside Ray from its saved config: its first fold's student
    (one fold shows what both would) and the refit."""
    _cfg, run_dir, _ = shared_search
    table = read_table(run_dir / "trials.csv")
    row = table[table["status"] == "completed"].iloc[-1]
    assert main(["export", str(run_dir), "--trial", row["trial"], "--out", str(tmp_path / "exp")]) == 0
    student = load_student(tmp_path / "exp")
    assert student.info["metrics"]["trial"] == row["trial"] and student.info["metrics"]["final"] == "refit"
    trial_cfg = load_config(run_dir / "configs" / f"{row['trial']}.yaml")
    assert trial_cfg.distill.mode == row["distill.mode"] and trial_cfg.train.lr == pytest.approx(row["train.lr"])
    from kd.crossval import refit_data
    from kd.data import load_dataset
    from kd.schemes import Scheme
    from kd.student import train_student
    from kd.teacher import prepare_teacher
    data = load_dataset(trial_cfg.data, progress=False)
    first = Scheme.of(trial_cfg).split(trial_cfg, data).members[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial ran (search.cpus_per_trial=1): float sums in the same order
    try:  # the teachers come from the search's cache
        fold = train_student(trial_cfg, first, prepare_teacher(trial_cfg, first, progress=False).logits,
                             progress=False)
        pool = refit_data(data)
        refit = train_student(trial_cfg, pool, prepare_teacher(trial_cfg, pool, progress=False).logits, progress=False)
    finally:
        torch.set_num_threads(threads)
    images = data.test.images[:16]
    mean, std = (torch.tensor(student.info[k]).view(1, -1, 1, 1) for k in ("mean", "std"))  # the student's own
    scaled = (images.float() / 255 - mean) / std
    _, _, checkpointed = winner_fold_students(run_dir, row["trial"])
    assert torch.allclose(fold.model.cpu().eval()(scaled), checkpointed[0](scaled), atol=1e-4)
    assert torch.allclose(student.logits(images), refit.model.cpu().eval()(scaled), atol=1e-4)


def _histories(experiment) -> dict[str, list[dict]]:
    """Each trial's per-epoch results as Ray's JSON logger wrote them (a retried epoch: the last report), by trial."""
    return {t: list({r["epoch"]: r for r in rows}.values()) for t, rows in trial_results(experiment).items()}


def test_tensorboard_holds_every_epoch_and_each_trials_hyperparameters(shared_search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _cfg, run_dir, _ = shared_search
    experiment = run_dir.parent.parent / "remote" / "tiny-search" / "ray"  # where --storage put the experiment
    histories = _histories(experiment)
    assert histories
    for trial_dir in experiment.glob("distill_trainable_*"):
        rows = read_jsonl(trial_dir / "result.json")
        if not rows:
            continue
        events = EventAccumulator(str(trial_dir))
        events.Reload()
        logged = {e.step: e.value for e in events.Scalars("ray/tune/val_balanced_accuracy")}  # float32; last stands
        assert logged == {r["training_iteration"]: pytest.approx(r["val_balanced_accuracy"], rel=1e-6) for r in rows}
        hparams = events.PluginTagToContent("hparams")  # written at the trial's end, with its sampled keys
        assert hparams and any(b"distill.mode" in content for content in hparams.values())


def test_mlflow_holds_a_run_per_trial_with_its_parameters_metrics_and_outcome(shared_search):
    from mlflow import MlflowClient
    cfg, run_dir, _ = shared_search
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    table = read_table(run_dir / "trials.csv").set_index("trial")
    assert len(runs) == cfg.search.num_samples
    histories = _histories(run_dir.parent.parent / "remote" / "tiny-search" / "ray")
    for run in runs:
        trial = run.data.tags["trial_name"].rsplit("_", 1)[-1]
        row = table.loc[trial]
        assert run.data.params["distill.mode"] == row["distill.mode"]
        assert float(run.data.params["train.lr"]) == pytest.approx(row["train.lr"])
        assert run.info.status == ("FAILED" if row["status"] == "failed" else "FINISHED")
        if trial in histories:
            curve = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
            logged = {m.step: m.value for m in curve}  # every result, retried epochs included: the last stands
            assert {r["training_iteration"]: pytest.approx(r["val_balanced_accuracy"])
                    for r in histories[trial]} == {r["training_iteration"]: logged[r["training_iteration"]]
                                                   for r in histories[trial]}


def test_optuna_dashboard_serves_the_study_over_http(shared_search):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from search.tracking import dashboard_command
    cfg, run_dir, _ = shared_search
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = dashboard_command(run_dir).split()
    executable = str(Path(sys.executable).parent / argv[0])  # the one installed beside this Python
    server = subprocess.Popen([executable, *argv[1:], "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, studies = time.time() + 60, None
        while studies is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())["study_summaries"]
            except OSError:
                time.sleep(0.5)
        assert studies is not None, "optuna-dashboard did not answer"
        assert [s["study_name"] for s in studies] == [cfg.name]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", timeout=10) as r:
            detail = json.loads(r.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(detail["trials"]) == cfg.search.num_samples
    table = read_table(run_dir / "trials.csv")
    completed = table[table["status"] == "completed"]  # Optuna's best is among complete trials (stopped: pruned)
    best_value = detail["best_trials"][0]["values"][0]
    assert best_value == pytest.approx(completed[cfg.search.metric].max())


def test_a_second_search_on_the_same_directory_refuses(shared_search, capsys):
    cfg, run_dir, _ = shared_search
    from search.session import exclusive
    with exclusive(run_dir):
        changed = cfg.to_yaml()
        path = run_dir.parent / "same.yaml"
        path.write_text(changed)
        assert main(["search", str(path), "--quiet"]) == 2
    assert "is in use by another search" in capsys.readouterr().err
    other = cfg.updated({"distill.alpha": 0.9})
    path.write_text(other.to_yaml())
    assert main(["search", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds a search with a different config (changed: distill.alpha)" in err
    assert "may only raise search.num_samples" in err and err.count("\n") == 1  # one line, no traceback
    more = cfg.updated({"search.num_samples": cfg.search.num_samples + 2})
    path.write_text(more.to_yaml())
    assert main(["search", str(path), "--quiet"]) == 2  # more trials: only when asked to resume
    assert "to add 2 to it (the study's TPE goes on from the trials so far), run the same command with --resume" \
        in capsys.readouterr().err
    fewer = cfg.updated({"search.num_samples": cfg.search.num_samples - 1})
    path.write_text(fewer.to_yaml())
    assert main(["search", str(path), "--resume", "--quiet"]) == 2
    assert "(search.num_samples can grow, not shrink: 4 planned)" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_fresh_search_sets_an_old_study_aside_and_exports_the_epoch_that_ranked_a_trial(tmp_path, shared_cache):
    import optuna
    cfg = load_config(None, tiny_overrides(shared_cache, tmp_path / "results") + [
        "name=fresh", "search.num_samples=3", "search.grace_period=1", "search.confirm_seeds=0", "train.epochs=3",
        "search.checkpoint_every=3", "search.max_concurrent=1", "search.judge_seeds=0"])  # no verdict: not its point
    cfg = cfg.updated({"search.space": {"distill.mode": {"type": "choice", "values": ["soft", "hard"]},
                                        "train.lr": {"type": "loguniform", "low": 1e-7, "high": 0.01}},
                       "search.points": [{"distill.mode": "soft", "train.lr": 0.003},   # learns
                                         {"distill.mode": "hard", "train.lr": 1e-7}]})  # learns nothing: ASHA stops it
    run_dir = tmp_path / "results" / "fresh"
    run_dir.mkdir(parents=True)
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.journal")))
    old = optuna.create_study(study_name="fresh", storage=journal, direction="maximize")
    for _ in range(4):  # an earlier search's observations, which a fresh TPE must not inherit
        old.enqueue_trial({"distill.mode": "soft"})
        trial = old.ask()
        old.tell(trial, 0.99)
    run_search(cfg, quiet=True, echo=lambda s: None)
    study = optuna.load_study(study_name="fresh", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.journal"))))
    assert len(study.trials) == 3  # this search's trials only: the hand-picked points ran once, the old ones are gone
    assert sum(t.params["train.lr"] == 1e-7 for t in study.trials) == 1
    assert len(list(run_dir.glob("stale-*/optuna.journal"))) == 1  # set aside, not deleted
    table = read_table(run_dir / "trials.csv")
    stopped = table[table["status"] == "stopped early"]
    assert len(stopped), "the lr 1e-7 trial is stopped by ASHA at epoch 1, below the first trial"
    for _, row in stopped.iterrows():  # checkpoint_every=3, yet the export is the epoch that ranked the trial
        out = tmp_path / f"exp-{row['trial']}"
        assert main(["export", str(run_dir), "--trial", row["trial"], "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["epoch"] == row["epochs"] < 3
        assert metrics["trial_val"]["val_balanced_accuracy"] == pytest.approx(row["val_balanced_accuracy"])

    # --resume with more trials, as Optuna users extend a study: the ended search gets one more, a new Tune
    # experiment in the same folder whose trial goes on from the study (the hand-picked points not run again)
    said: list[str] = []
    run_search(cfg.updated({"search.num_samples": 4}), resume=True, quiet=True, echo=said.append)
    assert "adding 1 trial to the 3 this search ran (search.num_samples 4); TPE goes on from theirs" in said
    study = optuna.load_study(study_name="fresh", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.journal"))))
    assert len(study.trials) == 4 and sum(t.params["train.lr"] == 1e-7 for t in study.trials) == 1
    # its sampler seeded apart from the first part's: the same seed drew trial 2's settings again for trial 4
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4
    grown = read_table(run_dir / "trials.csv")
    assert sorted(grown["number"]) == [1, 2, 3, 4] and grown["trial"].is_unique
    assert set(table["trial"]) < set(grown["trial"])  # the first three as they were, and one more
    pd.testing.assert_frame_equal(grown[grown["trial"].isin(table["trial"])][["trial", "status", "epochs"]]
                                  .reset_index(drop=True), table[["trial", "status", "epochs"]])
    assert (run_dir / "best" / "model.safetensors").is_file()


def test_students_of_several_sizes_on_a_pareto_front_and_a_budget_on_the_export(shared_search):
    from search.run import Run
    _cfg, run_dir, _ = shared_search
    table = read_table(run_dir / "trials.csv")
    ran = table[table["status"] != "failed"]  # a failed trial (inception_v3, a diverged lr) reports no cost
    small = ran[ran["student.name"].isin(["test_resnet", "test_efficientnet"])].set_index("student.name")
    params = small["student_params"].groupby(level=0).first()
    assert params["test_resnet"] == 372_882 and params["test_efficientnet"] == 99_710  # measured once per student
    assert (small["student_latency_ms"] > 0).all() and (small["student_mflops"] > 0).all()
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert best["cost"]["student"]["parameters"] <= 400_000  # within search.max_params
    tight = Run(run_dir)  # a budget only the smaller student fits: the pick is that student, whatever scored best
    tight.config = tight.config.updated({"search.max_params": 200_000})
    assert set(tight.best_trials(5, within_budget=True)["student.name"]) == {"test_efficientnet"}
    summary = (run_dir / "summary.md").read_text()
    assert "## Accuracy against cost (Pareto front)" in summary and "at most 400,000 parameters" in summary
    opening = summary.split("## Teacher")[0]  # summary.md opens with what distillation bought
    assert "**What distillation bought:** student " in opening
    assert (run_dir / "plots" / "pareto.png").is_file()


def test_the_winner_is_judged_against_its_labels_only_twin(shared_search):
    """What the teacher added: the winner's config with distill.alpha 0, everything else equal, retrained on the judging
    seeds and set against the winner on halves of the held-out images that did not pick (as the hand-picked points
    are); its test figure shipped the same way; said on the console and in summary.md's first lines."""
    cfg, run_dir, lines = shared_search
    rerank = json.loads((run_dir / "rerank.json").read_text())
    twin = rerank["labels_only"]
    assert twin["trial"] == rerank["winner"] and twin["seeds"] == rerank["judge_seeds"] and len(twin["values"]) == 1
    winner = next(c for c in rerank["candidates"] if c["trial"] == rerank["winner"])
    assert twin["alpha"] == winner["params"].get("distill.alpha", cfg.distill.alpha) > 0
    assert twin["verdict"] in ("beats", "within_noise") and twin["standard_error"] > 0
    from kd.selection import Z_CLAIM
    assert twin["lower"] == pytest.approx(twin["difference"] - Z_CLAIM * twin["standard_error"])
    assert (twin["verdict"] == "beats") == (twin["lower"] > 0)
    assert len(twin["judged"]) == 2  # each half's pick against its own twin
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    shipped = best["labels_only"]
    assert shipped["verdict"] == twin["verdict"] and shipped["difference"] == twin["difference"]
    assert 0.0 <= shipped["test_balanced_accuracy"] <= 1.0 and shipped["test"]["n"] == best["test"]["n"]
    assert set(shipped["val"]) >= {cfg.search.metric, "val_balanced_accuracy"}
    # the twin's students were kept as the winner's were: its shipped model can be rebuilt
    assert (run_dir / "labels_only_students.safetensors").is_file()
    said = [line for line in lines if line.startswith("labels-only twin: ")]
    assert len(said) == 1 and f"on test {shipped['test_balanced_accuracy']:.4f}" in said[0]
    head = (run_dir / "summary.md").read_text().split("## ")[0]  # before the first section
    assert "**What the teacher added:**" in head and "**Ships:**" in head
    assert f"{best['test']['balanced_accuracy']:.4f}" in head
    assert any(line.startswith("decision rule: ") for line in lines)
