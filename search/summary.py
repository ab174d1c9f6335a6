"""summary.md: what a person reads first after a search, written from the run model alone."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from kd.metrics import flatten, interval_text
from kd.timing import phases_text
from search.config import COSTS
from search.format import number, param_name, params_text, spread
from search.records import TEACHER_WORK, BestRecord, TrialStatus, Verdict
from search.run import Run
from search.space import parse_space, searched_students


def _table(header: list[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(number(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_rows(metrics: dict[str, Any], classes: list[str]) -> list[tuple[str, Any]]:
    interval = metrics.get("balanced_accuracy_interval")
    return [("accuracy", metrics["accuracy"]), ("balanced accuracy", metrics["balanced_accuracy"]),
            *([("balanced accuracy, 95% interval (from each class's score interval)",
                f"{interval[0]:.4f} to {interval[1]:.4f}")] if interval else []),
            *[(f"recall {c}", metrics["recall"][c]) for c in classes], ("macro F1", metrics["macro_f1"]),
            *[(name, metrics[key]) for name, key in (("AUC (one-vs-rest)", "auc"),
                                                      ("balanced log-loss", "balanced_log_loss")) if key in metrics]]


def summary_markdown(run: Run) -> str:
    top = run.best_trials(10)
    out = _heading(run)
    out += _teacher(run)
    out += _top_trials(run, top)
    out += _points_against_best(run, top)
    out += _soft_vs_hard(run, top)
    out += _pareto(run)
    out += _reranking(run)
    out += _best_student(run)
    out += _time(run)
    out += ["## Plots", ""]
    metric = run.config.search.metric
    for name, title in ((("trials.png", f"{metric} per trial"), ("importance.png", "parameter importance"),
                         ("params.png", f"each parameter against {metric}"),
                         ("learning_curves.png", "learning curves of the top trials"),
                         ("soft_vs_hard.png", "best soft vs best hard"),
                         ("timeline.png", "each trial slot over the search: where the time went"),
                         ("confusion_matrix_test.png", "the exported model on the test split"))):
        if (run.directory / "plots" / name).is_file():
            out += [f"![{title}](plots/{name})", ""]
        elif name == "importance.png" and len(run.table):
            full = int((run.table["status"] == TrialStatus.COMPLETED).sum())
            out += [f"No parameter importance: Optuna's fANOVA reads the trials that ran all their epochs (those "
                    f"stopped early are pruned in the study, their figures from earlier epochs), and needs 3; "
                    f"{full} did.", ""]
    best = run.best
    picked = best.trial if best is not None else top.iloc[0]["trial"] if len(top) else None
    if picked:
        name = run.directory.name
        out += ["## Reproduce", "", f"The export in `best/`, rebuilt the way the search made it ({run.config.ships}, "
                "with its decision rule), from the folder that holds this run:", "",
                f"    kdsearch export {name} --trial {picked} --out {name}/best-rebuilt", "",
                f"Every trial's full config is in `configs/` (the exported one: `configs/{picked}.yaml`); "
                "`kdsearch distill` on it trains one student on the train split alone, checked on validation, "
                "which is not the export.", ""]
    return "\n".join(out)


def _heading(run: Run) -> list[str]:
    cfg, table, record = run.config, run.table, run.record
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    status = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials yet"
    data = record.data if record and record.data else cfg.data.source
    students = searched_students(cfg, parse_space(cfg))
    objective = f"`{cfg.search.metric}` ({cfg.search.direction})"
    if cfg.search.objectives:  # the first is the metric; then at least one cost, and maybe other figures
        objective += "".join(f" and `{name}` ({cfg.search.direction_of(name)})"
                             for name in cfg.search.objectives[1:]) + " together"
    out = [f"# Search `{cfg.name}`", "",
           f"{cfg.search.num_samples} trials of {'students ' if len(students) > 1 else ''}"
           f"{', '.join(f'`{n}`' for n in students)} distilled from `{cfg.teacher.name}` "
           f"({data}), optimising {objective} with Optuna TPE"
           f"{' and ASHA early stopping' if cfg.search.stops_early else ''}. "
           f"Trials so far: {len(table)} ({status}).", ""]
    if record and record.seconds:
        out[-1:] = [f"Wall time of the whole search: {record.seconds / 60:.1f} min.", ""]
    best = run.best
    if best is not None:
        for w in best.warnings:  # a paragraph each
            out += [f"**Warning:** {w[0].upper()}{w[1:]}.", ""]
        out += [f"**Ships:** {best.shipment.noun(best.members)}, {best.shipped_text()}; its decision rule: "
                f"{best.rule_text()}. Test balanced accuracy {best.test['balanced_accuracy']:.4f}"
                f"{interval_text(best.test)}.", ""]
        twin = best.labels_only
        if twin:
            tested = (f" On the test split the twin, shipped the same way, scored {twin['test_balanced_accuracy']:.4f}"
                      f" against {best.test['balanced_accuracy']:.4f}." if "test_balanced_accuracy" in twin else "")
            out += [f"**What the teacher added:** {twin['text'][0].upper()}{twin['text'][1:]}.{tested}", ""]
        against = _against_points(run)
        if against:
            out += [f"**Against the hand-picked settings:** {against}.", ""]
        out += [f"**Next to try:** {next_step(run, best)}", ""]
    if best is not None and best.cost:
        out += [f"**What distillation bought:** {best.cost['summary']} (the exported best; parameters, FLOPs from "
                "torch's flop counter and latency measured the same way for both, details in "
                "`best/kdsearch.json` under `compression`).", ""]
    return out


def _against_points(run: Run) -> str:
    """One clause per hand-picked point: the re-ranking's verdict, in a line."""
    rr = run.reranking
    if rr is None:
        return ""
    parts = []
    for c in rr.against_points:
        what = f"hand-picked {c.point} (`{c.trial}`)"
        if c.verdict == Verdict.BEATS:
            parts.append(f"beats {what} beyond the noise ({c.difference:+.4f} in `{rr.metric}`)")
        elif c.verdict == Verdict.WITHIN_NOISE:
            parts.append(f"does not beat {what} beyond the noise ({c.difference:+.4f}; the test could find "
                         f"{c.detectable:.4f})")
        elif c.verdict == Verdict.SAME:
            parts.append(f"is {what} itself")
        else:
            parts.append(f"was not judged against {what}")
    return "the winner " + "; ".join(parts) if parts else ""


def next_step(run: Run, best: BestRecord) -> str:
    """What to try next, from what the search measured: the first that applies."""
    rr, cfg = run.reranking, run.config
    twin = rr.labels_only if rr is not None else None
    if twin is not None and twin.verdict == Verdict.WITHIN_NOISE:
        return ("a stronger teacher (more `teacher.train.epochs`, `teacher.pretrained: true`, a larger "
                "`data.image_size`): the teacher added nothing measurable, so distillation has nothing to pass on.")
    if best.warnings:
        return "act on the warning above; then search again."
    if rr is not None and rr.against_points and all(c.verdict == Verdict.WITHIN_NOISE for c in rr.against_points):
        return (f"more trials (`search.num_samples`, {cfg.search.num_samples} now) or more judging seeds "
                f"(`search.judge_seeds`, {cfg.search.judge_seeds} now): the search's pick is not yet told apart "
                "from the hand-picked settings.")
    interval = best.test.get("balanced_accuracy_interval")
    if interval and interval[1] - interval[0] > 0.1:
        rare = min(sum(row) for row in best.test["confusion_matrix"])
        return (f"more test images of the rare class before trusting the figure to a few points: {rare} leave "
                f"its 95% interval {interval[1] - interval[0]:.2f} wide. The model itself is ready to use.")
    return "nothing the search measured asks for more; use the export in `best/`."


def _teacher(run: Run) -> list[str]:
    teacher = run.teacher
    if teacher is None:
        return ["## Teacher", "", "Not prepared yet.", ""]
    what = f"{run.scheme.teachers_text(run.config)}: {teacher.describe()}; {_trials_teacher_work(run)}."
    return ["## Teacher", "", f"`{run.config.teacher.name}`, {what}", "",
            _table(["validation", "value"], _metric_rows(teacher.metrics, run.classes)), ""]


def _trials_teacher_work(run: Run) -> str:
    """What the trials themselves ran through a teacher, as each trial counted it in its own process."""
    table = run.table
    counted = table[TEACHER_WORK].dropna() if TEACHER_WORK in table else table.iloc[:0]
    if not len(counted):
        return "no trial has counted its teacher forward passes yet"
    total, running = int(counted.to_numpy().sum()), int((counted.to_numpy() > 0).sum())
    if total == 0:
        return f"the trials ran no teacher forward pass ({len(counted)} trials counted theirs)"
    return f"{total} teacher forward passes ran inside {running} trials"


def _figures(run: Run, classes: list[str], top: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The columns of a trials table: the search's metric first, by its name, then the other held-out figures."""
    metric = run.config.search.metric
    names = [metric, *[m for m in ("val_balanced_accuracy", "val_accuracy", "val_macro_f1") if m != metric]]
    names += [f"val_recall_{c}" for c in classes if f"val_recall_{c}" in top.columns and f"val_recall_{c}" != metric]
    short = {"val_balanced_accuracy": "bal. acc", "val_accuracy": "acc", "val_macro_f1": "macro F1",
             **{f"val_recall_{c}": f"recall {c}" for c in classes}}
    return names, [f"{short.get(metric, metric)} (search.metric)" if n == metric else short.get(n, n)
                   for n in names]


def _top_trials(run: Run, top: pd.DataFrame) -> list[str]:
    out = ["## Top trials (validation)", "", f"Figures: {run.rule}.", ""]
    table, classes = run.table, run.classes
    if len(top):
        keys = run.searched_keys()
        names, labels = _figures(run, classes, top)
        header = ["trial", *[param_name(k) for k in keys], *labels, "epochs", "status"]
        exported = run.best.trial if run.best is not None else None
        rows = [[f"{r['trial']} (exported)" if r["trial"] == exported else r["trial"], *[r.get(k) for k in keys],
                 *[r[n] for n in names], r["epochs"], r["status"]] for _, r in top.iterrows()]
        out += [_table(header, rows), ""]
        if exported is not None:
            out += [f"Each trial's figures are from its last epoch (the epochs column: ASHA stopped some early). "
                    f"The export is `{exported}`'s config, retrained as `search.final` says; its own figures are in "
                    "the re-ranking and the test below.", ""]
    else:
        out += ["No trial has finished yet.", ""]
    failed = table[table["status"] == TrialStatus.FAILED] if len(table) else table
    if len(failed):
        out += ["Failed trials: " + "; ".join(f"`{r['trial']}`: {r['error']}" for _, r in failed.iterrows()), ""]
    return out


def _points_against_best(run: Run, top: pd.DataFrame) -> list[str]:
    """The hand-picked settings (`search.points`, e.g. the reference projects' own) beside what the search found."""
    table, classes = run.table, run.classes
    rows: list[tuple[str, pd.Series]] = []
    for i, point in enumerate(run.config.search.points):
        r = run.point_trial(point)
        if r is not None:
            rows.append((f"hand-picked {i + 1}: {params_text(point)}", r))
    if not rows or not len(top):
        return []
    rows.append(("best found by the search: " + params_text(run.params(top.iloc[0])), top.iloc[0]))
    names, labels = _figures(run, classes, table)
    header = ["setting", "trial", *labels, "epochs", "status"]
    body = [[what, r["trial"], *[r[n] for n in names], r["epochs"], r["status"]] for what, r in rows]
    return ["## Hand-picked settings against the search (validation)", "",
            "The settings in `search.points` ran first, as ordinary trials (ASHA may stop them too):", "",
            _table(header, body), ""]


def _soft_vs_hard(run: Run, top: pd.DataFrame) -> list[str]:
    table, classes = run.table, run.classes
    if "distill.mode" not in table.columns or not len(top):
        return []
    ranked = run.best_trials(len(table))
    soft, hard = ranked[ranked["distill.mode"] == "soft"].head(1), ranked[ranked["distill.mode"] == "hard"].head(1)
    if not (len(soft) and len(hard)):
        return []
    s, h = soft.iloc[0], hard.iloc[0]
    rows = [["trial", s["trial"], h["trial"]], ["accuracy", s["val_accuracy"], h["val_accuracy"]],
            ["balanced accuracy", s["val_balanced_accuracy"], h["val_balanced_accuracy"]],
            *[[f"recall {c}", s[f"val_recall_{c}"], h[f"val_recall_{c}"]] for c in classes],
            ["macro F1", s["val_macro_f1"], h["val_macro_f1"]], ["epochs", s["epochs"], h["epochs"]]]
    note = ("" if s["epochs"] == h["epochs"] else
            " Their figures are from different epochs (ASHA stopped one earlier): not a like-for-like comparison.")
    return ["## Best soft vs best hard distillation (validation)", "",
            f"Each mode's best trial by the search's figure, at its last epoch.{note}", "",
            _table(["", "soft", "hard"], rows), ""]


def _pareto(run: Run) -> list[str]:
    """Accuracy against what the student costs: the trials no other beats on all objectives, and the budget."""
    front = run.front()
    if not len(front):
        return []
    s = run.config.search
    if run.costs_alike:
        r = front.iloc[0]
        return ["## Accuracy against cost", "",
                f"One student architecture (`{r.get('student.name', run.config.student.name)}`): every trial costs "
                f"the same ({r['student_params'] / 1e6:.2f}M parameters, {number(r['student_latency_ms'])} ms at "
                "batch 1 on a trial's device), so there is no front to draw. Put `student.name` in "
                "`search.space` (and `search.objectives`) to weigh accuracy against size.", ""]
    figures = [n for n in run.objectives if n not in COSTS]
    budget = [f"at most {s.max_params:,} parameters" if s.max_params else "",
              f"at most {s.max_latency_ms:g} ms at batch 1" if s.max_latency_ms else ""]
    budget_text = " and ".join(b for b in budget if b)
    fits = run.within_budget(front)
    rows = [[r["trial"], r.get("student.name", run.config.student.name), f"{r['student_params'] / 1e6:.2f}M",
             r["student_mflops"], r["student_latency_ms"], *[r[n] for n in figures], "yes" if fit else "no"]
            for fit, (_, r) in zip(fits, front.iterrows(), strict=True)]
    over = ", ".join(f"{n} ({d})" for n, d in zip(run.objectives, [s.direction_of(n) for n in run.objectives],
                                                     strict=True))
    if s.objectives:
        what = (f"A multi-objective search over {over}: Optuna's TPE in its multi-objective mode proposed the trials, "
                "and the study in optuna.journal holds this front as its best trials. The re-ranking retrains the "
                "front's members within the budget (the top trials within it where none fits). ")
    else:
        what = f"Not searched for (`search.objectives` is not set): the trials no other beats on {over}. "
    return ["## Accuracy against cost (Pareto front)", "",
            what + "Only trials that ran every epoch are on the front (a stopped trial's figure is from an earlier "
            "epoch). Each student's cost was measured once before the trials, on a trial's device (median of "
            "repeats after warm-up), so students of one architecture cost the same. "
            + (f"The exported student must fit the budget: {budget_text}." if budget_text else
               "No budget is set (`search.max_params`, `search.max_latency_ms`)."), "",
            _table(["trial", "student", "params", "MFLOPs", "latency ms (batch 1)", *figures, "within budget"], rows),
            "", "![accuracy against cost](plots/pareto.png)", ""]


def _reranking(run: Run) -> list[str]:
    out = ["## Re-ranking over further seeds", ""]
    rr, metric = run.reranking, run.config.search.metric
    if rr is None:
        return out + ["Not run yet (it follows the search), or `search.confirm_seeds` is 0.", ""]
    from_front = run.rerank_pool()[1]
    why = "front" if from_front else "top"
    rows = [[e.trial, params_text(e.params), f"hand-picked {e.hand_picked}" if e.hand_picked else why,
             e.search_value, spread(e.mean, e.std, len(e.values)), " ".join(number(v) for v in e.values),
             " ".join(number(v) for v in e.judged),
             "winner" if e.trial == rr.winner else ""] for e in rr.candidates]
    top = "The front's members" if from_front else f"The top {run.config.search.rerank} trials"
    out += [f"{top} and the hand-picked points, each retrained with seeds "
            f"{rr.seeds} ({run.rule}). The winner is the best mean over these seeds alone: the search's own "
            "figure chose the candidates, so it flatters them (compare its column with the mean).", "",
            _table(["trial", "parameters", "why", f"{metric} in the search", "mean ± std over the seeds",
                    "per seed", "judging seeds", ""], rows), ""]
    if rr.judge_seeds and rr.against_points:
        out += ["Whether the search beats a hand-picked point is judged on images and seeds that did not pick: "
                "the held-out images are cut into two halves; on each half the candidate the other "
                f"half picks (among the top {run.config.search.rerank} trials by the search's figure on that other "
                "half, by their mean over the re-ranking seeds there) is set against the point, both retrained "
                f"with seeds {rr.judge_seeds}, and the two halves' paired differences in `{metric}` are averaged. "
                "The search beats the point when that difference is above 1.96 standard errors (from resampling "
                "the images within each class, and the paired difference's spread from seed to seed: its 97.5% "
                "lower bound must be above 0). With pooled out-of-fold predictions the halves are whole folds, "
                "so that no half picks on a candidate's luck with a fold it then judges. Simulated as a search "
                "runs (16 equal trials, seed shifts and candidate-by-fold effects) this says \"beats\" 1 to 2 "
                "times in a hundred; judged on the images and seeds that picked it, about one time in four.", ""]
    for c in rr.against_points:
        if c.verdict == Verdict.SAME:
            out += [f"**Against hand-picked {c.point}**: the search's winner is that point itself.", ""]
        elif c.verdict == Verdict.UNJUDGED:
            out += [f"**Against hand-picked {c.point}** (`{c.trial}`): the search's winner {c.verdict.text}; "
                    "`search.judge_seeds` sets how many seeds judge it.", ""]
        elif math.isnan(c.lower):  # an earlier version's rerank.json: the same seeds picked and judged
            out += [f"**Against hand-picked {c.point}** (`{c.trial}`): the search's winner {c.verdict.text}: "
                    f"paired difference {number(c.difference)} over {c.seeds} seeds (standard error "
                    f"{number(c.standard_error)}; it had to exceed twice that, on the seeds that picked it).", ""]
        else:
            picks = f" (the halves' picks: {', '.join(f'`{t}`' for t in c.judged)})" if c.judged else ""
            out += [f"**Against hand-picked {c.point}** (`{c.trial}`): the search {c.verdict.text}{picks}: "
                    f"paired difference {c.difference:+.4f} over {c.seeds} judging seeds, 97.5% lower bound "
                    f"{c.lower:+.4f}. With this noise the test finds a true difference of {c.detectable:.4f} "
                    "four times in five; smaller ones it would mostly miss.", ""]
    return out


def _time(run: Run) -> list[str]:
    """Where the search's time went, phase by phase, and how busy the trial slots were."""
    record = run.record
    if record is None or not record.phases:
        return []
    use = run.slot_use()
    out = ["## Where the time went", "", "Seconds per phase of this run" + (" (resumed)" if record.resumed else "")
           + ": " + phases_text(record.phases, {"trials": f"slots {use.busy:.0%} busy"} if use and use.busy is not None
                                else {}) + ".", ""]
    if use and use.idle:
        out += [f"Between one trial and the next, a slot (a trial's process, reused for the next trial) waited "
                f"{use.median_idle:.1f} s at the median ({len(use.idle)} waits, longest {max(use.idle):.1f} s); "
                f"{record.slots} slots.", ""]
    return out


def _best_student(run: Run) -> list[str]:
    out = ["## Exported best student: held-out test split (evaluated once)", ""]
    best, classes = run.best, run.classes
    if best is None:
        return out + ["Not exported yet (it follows the search).", ""]
    thr = f"; decision threshold {best.threshold:.4f} on p({classes[1]}), chosen on " \
        f"{best.shipment.threshold_source}" if best.threshold is not None else "; argmax"
    how = best.shipped_text()
    side = _side_by_side(run, best)
    return out + [f"Trial `{best.trial}`, {how}, exported to `best/`{thr}.", "",
                  _table(["test", "value"], _metric_rows(best.test, classes)), "", *side, *_against_teacher(best),
                  *([f"The {best.shift_text()}. Where the two shares differ, the exported model does not sit "
                     "where its threshold was tuned, and its balanced accuracy pays for the difference.", ""]
                    if best.shift_text() else []),
                  "![confusion matrix](plots/confusion_matrix_test.png)", ""]


def _against_teacher(best: BestRecord) -> list[str]:
    """The exported student and the teacher it learned from, under one rule (argmax) on the test images."""
    if not best.teacher_test or not best.test_argmax:
        return []
    rows = []
    taught = [(f"the {best.members} fold students averaged, the teacher it was distilled from",
               best.ensemble_test)] if best.ensemble_test else []
    for who, m in ((best.teacher_label, best.teacher_test), *taught, ("the exported student", best.test_argmax)):
        lo_hi = m.get("balanced_accuracy_interval")
        rows.append([who, m["balanced_accuracy"], f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}" if lo_hi else "", m.get("auc")])
    return ["Student and teacher on the same test images under the same rule (argmax, whatever the student ships "
            "with):", "", _table(["test, argmax", "balanced accuracy", "95% interval", "AUC"], rows), ""]


def _side_by_side(run: Run, best: BestRecord) -> list[str]:
    """The winner's `search.metric` as the search saw it, over the further seeds, and on the test split."""
    metric = run.config.search.metric
    rr = run.reranking
    entry = rr.candidate(best.trial) if rr else None
    rows = [["in the search (one seed)", best.trial_val.get(metric)]]
    if rr and entry and metric in entry.metrics:
        m = entry.metrics[metric]
        rows.append([f"re-ranking, mean ± std over seeds {rr.seeds}", spread(m.mean, m.std, len(rr.seeds))])
    # the same figure of the test split (a figure only held-out predictions have, like a fold spread, has none)
    rows.append(["held-out test, the exported student", flatten(best.test, "val").get(metric)])
    return [f"`{metric}` of the winner ({run.rule}), side by side:", "", _table(["where", metric], rows), ""]
