"""After the trials: re-rank the top trials over further seeds, export the winner, test it once, write the report.

Selection uses held-out figures only (kd.schemes: the validation split, or pooled out-of-fold predictions).
The winner of the re-ranking (search.rerank) is exported as its scheme makes a final student (`Scheme.final`:
the trial's own checkpoint of the epoch that ranked it; its config refitted on all of train + validation with a
threshold from its out-of-fold predictions; its fold students averaged; or one student distilled from them). The
export is evaluated exactly once on the test split, which nothing in the search has seen.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kd.cost import distill_report
from kd.data import Dataset, load_dataset
from kd.errors import UserError
from kd.export import export_student
from kd.files import save_tensors
from kd.metrics import calibration_shift, compute_metrics, interval_text, scalars
from kd.models import fetch_pretrained
from kd.schemes import Scheme
from kd.shipping import Final, Judged, Shipment, Way
from kd.student import evaluate_model, split_probs
from kd.teacher import load_teacher_model
from kd.timing import Phases, phases_text
from kd.train import load_state
from search.cluster import trial_resources
from search.config import Config
from search.experiment import latest_checkpoint
from search.format import params_text, shown, spread
from search.records import BEST, JUDGED, RERANK_PROBS, TWIN, BestRecord, Reranking, Verdict
from search.report import write_report
from search.rerank import candidates, labels_only, rerank
from search.run import Run
from search.teachers import Prepared, RayCompute
from search.warnings import never_predicted, teacher_warning, twin_warning


def export_best(run: Run, row: pd.Series, scheme: Scheme, probs: list[np.ndarray], out_dir: Path,
                prepared: Prepared | None = None, phases: Phases | None = None, final: str | None = None,
                judged: Judged | None = None, twin: Judged | None = None) -> BestRecord:
    """The student `scheme` makes of trial `row` (`Scheme.final`, as `final` or the search's `search.final` says;
    `probs`: its held-out probabilities over further seeds, `judged`: the students of one of those fits, `twin`: its
    labels-only twin's), evaluated once on the test split, with its compression report against its teacher and its
    labels-only twin made and tested the same way, exported to `out_dir`."""
    ckpt = latest_checkpoint(row["path"])
    if ckpt is None:
        raise UserError(f"trial {row['trial']} has no checkpoint to export (status: {row['status']})")
    tcfg = run.trial_config(row)
    if final:
        tcfg = tcfg.updated({"search.final": final}, source="--final")
    state = load_state(ckpt)
    phases = phases or Phases()  # not recorded: `kdsearch export` is no phase of the search
    compute = RayCompute(trial_resources(run.config), prepared)
    with phases("final student"):
        made = scheme.final(tcfg, state, probs, compute, judged)
        # what the teacher added, on the test split too: the labels-only twin shipped the same way
        twin_made = scheme.final(labels_only(tcfg), state, [twin.probs], compute, twin) if twin is not None else None
    with phases("export"):
        return _evaluate_and_export(run, row, tcfg, state, made, scheme.data, out_dir, twin_made)


def _evaluate_and_export(run: Run, row: pd.Series, tcfg: Config, state: dict[str, Any], final: Final, data: Dataset,
                         out_dir: Path, twin: Final | None = None) -> BestRecord:
    judged = {k: v for k, v in scalars(state["history"][-1]).items() if k.startswith("val_")}
    teacher_model = load_teacher_model(tcfg, final.teacher_data, final.teacher.directory)[0]
    # the student against the teacher it learned from, under one rule (argmax) on the same images (the test split)
    as_teacher = dataclasses.replace(tcfg, train=tcfg.teacher.train)  # its own forward settings (amp, channels_last)
    teacher_test = evaluate_model(teacher_model, data, "test", None, as_teacher)
    shipped = split_probs(final.model, data, "test", tcfg)  # one forward pass: its figures at argmax and as shipped
    labels, subjects = data.test.labels.numpy(), data.test.groups()  # subjects: the interval resamples them
    student_argmax = compute_metrics(labels, shipped, data.classes, None, full=True, groups=subjects)
    cost = distill_report(tcfg, final.model, teacher_model, teacher_test, student_argmax,
                          "test balanced accuracy at argmax (both)")
    # each fold student's test probabilities, once: the calibration shift and a distilled student's teacher read them
    fold_probs = functools.cache(lambda model: split_probs(model, data, "test", tcfg))
    taught = final.distilled_from  # a distilled student's teacher: the fold ensemble (their mean), under the same rule
    ensemble_test = compute_metrics(labels, np.mean([fold_probs(m) for m in taught.members], axis=0), data.classes,
                                    None, full=True, groups=subjects) if taught is not None else {}
    shift = {**calibration_shift(shipped, [fold_probs(m) for m in final.tuned_on], final.threshold),
             "fits_tuned_on": final.fits_tuned_on} if final.threshold is not None and final.tuned_on else {}
    test = compute_metrics(labels, shipped, data.classes, final.threshold, full=True, groups=subjects)
    decision = final.decision
    tuned_test = compute_metrics(labels, shipped, data.classes, decision.tuned, full=True, groups=subjects) \
        if decision.tuned is not None and decision.threshold is None else {}
    best = BestRecord(trial=row["trial"], classes=data.classes, threshold=final.threshold, epoch=final.epoch,
                      params=run.params(row), trial_val=judged, val_about=_val_about(final), teacher_test=teacher_test,
                      test_argmax=student_argmax, calibration_shift=shift, teacher_label=final.teacher_label,
                      ensemble_test=ensemble_test,
                      test=test, final=final.way, members=final.members, train_images=final.train_images,
                      val={} if final.sees_validation else evaluate_model(final.model, data, "val", final.threshold,
                                                                          tcfg),
                      cost=cost, teacher=final.teacher.info, rule=dataclasses.asdict(decision),
                      test_threshold=tuned_test, labels_only=_labels_only(run, twin, data, tcfg))
    best = dataclasses.replace(best, warnings=[
        *teacher_warning(run.teacher),
        *never_predicted(data.classes, decision.called, test, Shipment.of(final.way).noun(final.members)),
        *twin_warning(run.reranking.labels_only if run.reranking is not None else None)])
    export_student(out_dir, final.model, tcfg, data.classes, final.threshold, dataclasses.asdict(best))
    return best


def _labels_only(run: Run, twin: Final | None, data: Dataset, tcfg: Config) -> dict[str, Any]:
    """best/metrics.json's labels_only: the twin's validation figures and its verdict (rerank.json), and its test
    balanced accuracy, shipped as the winner is (under its own rule)."""
    record = run.reranking.labels_only if run.reranking is not None else None
    if record is None:
        return {}
    out: dict[str, Any] = {"val": {k: v.mean for k, v in record.metrics.items()}, "alpha": record.alpha,
                           "difference": record.difference, "standard_error": record.standard_error,
                           "lower": record.lower, "verdict": record.verdict, "seeds": record.seeds, "text": record.text}
    if twin is not None:
        probs = split_probs(twin.model, data, "test", tcfg)
        out["test"] = compute_metrics(data.test.labels.numpy(), probs, data.classes, twin.threshold, full=True,
                                      groups=data.test.groups())
        out["test_balanced_accuracy"] = out["test"]["balanced_accuracy"]
    return out


def _val_about(final: Final) -> str:
    """What best/metrics.json's validation figures are of: the exported model's, or the search trial's students'."""
    if not final.sees_validation:
        return "val: the exported model (the trial's checkpoint) on the validation split; trial_val: the same model"
    made = ("made of the fold students that each trained on most of those images" if final.way == Way.ENSEMBLE
            else "trained on all of train + validation")
    return (f"val: none, the exported model is {made}, so no labelled image is held out from it; trial_val: the "
            "search trial's fold students on their pooled out-of-fold predictions, the figures that ranked it")


def export_command(run_dir: str | Path, trial: str | None, out: str | Path, final: str | None = None) -> str:
    """`kdsearch export`: a chosen trial (default: the search's own pick) exported to `out` as the search exports its
    winner (its scheme's final student), evaluated on the test split again."""
    run = Run(run_dir)
    if trial:
        row = run.trial(trial)
    elif run.reranking is not None:  # the search's own pick: the re-ranked winner
        row = run.trial(run.reranking.winner)
    else:
        top = run.best_trials(1, within_budget=True)
        if top.empty:
            raise UserError(f"no finished trial within the budget in {run_dir} to export")
        row = top.iloc[0]
    fetch_pretrained(run.trial_config(row))  # a refit on this machine: timm's weights from its cache, or the hub
    data = load_dataset(run.config.data, progress=False)
    # the re-ranked winner's threshold comes from its further seeds, as best/'s did
    ours = run.reranking is not None and run.reranking.winner == row["trial"]
    probs = run.rerank_probs() if ours else []
    best = export_best(run, row, run.scheme.split(run.config, data), probs, Path(out), final=final,
                       judged=Judged.load(run.directory / JUDGED) if ours else None,
                       twin=Judged.load(run.directory / TWIN) if ours else None)
    how = best.shipped_text()
    return (f"exported trial {row['trial']} ({how}; validation {run.config.search.metric} "
            f"{row[run.config.search.metric]:.4f}, {run.rule_label}) to {out}; the test split evaluated again: "
            f"balanced accuracy {best.test['balanced_accuracy']:.4f}")


def finalize(run_dir: Path, prepared: Prepared, phases: Phases, echo: Callable[[str], None] = print) -> None:
    """Re-rank the top trials with further seeds, export the winner as its scheme makes it, test it once, write the
    report."""
    run = Run(run_dir, refresh=False)  # mirrored (if remote) when the trials ended
    cfg = run.config
    top = run.best_trials(1, within_budget=True)
    if top.empty:
        echo("no trial finished successfully within the budget (search.max_params, search.max_latency_ms): nothing "
             "to re-rank or export (see trials.csv)")
        write_report(run)
        return
    if run.best is None:  # on a CPU node, the final student's teacher runs beside the re-ranking's tasks
        prepared.start_final()
    row = top.iloc[0]
    metric = cfg.search.metric
    echo(f"best trial {row['trial']} ({row['status']}): {metric} {row[metric]:.4f} with {params_text(run.params(row))}")
    seeds = [cfg.train.seed + i for i in range(1, cfg.search.confirm_seeds + 1)]
    judge_seeds = [seeds[-1] + i for i in range(1, cfg.search.judge_seeds + 1)] if seeds else []
    probs: list[np.ndarray] = []
    judged = twin = None
    if seeds:
        record = run.reranking
        if record is None or record.seeds != seeds or record.judge_seeds != judge_seeds:
            pool, from_front = run.rerank_pool()
            chosen = candidates(run, pool)
            judging = bool(judge_seeds) and any(point for _, point in chosen)
            pools = run.half_pools() if judging else None  # each judging half's pick, chosen on the other half
            chosen = candidates(run, pool, pools)
            top_text = "the front's members" if from_front else f"the top {cfg.search.rerank}"
            halves_text = f", the top {cfg.search.rerank} on each half of the images" if pools else ""
            echo(f"re-ranking {len(chosen)} candidates ({top_text}{halves_text} and the hand-picked points) "
                 f"with {len(seeds)} further seeds"
                 + (f", then the winner against them with {len(judge_seeds)} more" if judging else "") + " ...")
            with phases("re-ranking"):
                reranked = rerank(run, prepared, seeds, judge_seeds, chosen, pools)
            record, probs, judged, twin = reranked.record, reranked.probs, reranked.judged, reranked.twin
            if probs:  # the winner's held-out probabilities: the final student's threshold, after a resume too
                save_tensors(run_dir / RERANK_PROBS, {"probs": torch.from_numpy(np.stack(probs))}, {})
            for fit, name in ((judged, JUDGED), (twin, TWIN)):  # the students it judged, for the export
                if fit is not None:
                    fit.save(run_dir / name)
            record.write(run_dir)
        else:
            probs, judged, twin = run.rerank_probs(), Judged.load(run_dir / JUDGED), Judged.load(run_dir / TWIN)
        _echo_reranking(record, echo)
        row = run.trial(record.winner)
        echo(f"winner: {row['trial']} (the best mean over the further seeds)")
        for c in record.against_points:
            echo(f"  against hand-picked {c.point}: the winner {c.verdict.text}" + (
                f" ({c.difference:+.4f} paired, on halves of the images that did not pick, over {c.seeds} judging "
                f"seeds; 97.5% lower bound {c.lower:+.4f}, it could find {c.detectable:.4f})"
                if c.verdict in (Verdict.BEATS, Verdict.WITHIN_NOISE) else ""))
    best = run.best
    if best is None or best.trial != row["trial"]:
        making = prepared.scheme.shipment(cfg).making(len(prepared.scheme.members))
        if making:
            echo(making)
        best = export_best(run, row, prepared.scheme, probs, run_dir / BEST, prepared, phases, judged=judged,
                           twin=twin)
    t = best.test
    echo(f"exported the best student to {shown(run_dir / BEST)}; held-out test (evaluated once): balanced accuracy "
         f"{t['balanced_accuracy']:.4f}{interval_text(t)}, accuracy {t['accuracy']:.4f}, "
         + ", ".join(f"recall {c} {r:.3f}" for c, r in t["recall"].items()))
    echo(f"decision rule: {best.rule_text()}")
    if best.labels_only:
        added = best.labels_only
        echo(f"labels-only twin: {added['text']}" + (f"; on test {added['test_balanced_accuracy']:.4f}"
                                                     if "test_balanced_accuracy" in added else ""))
    for warning in best.warnings:
        echo(f"warning: {warning}")
    if best.cost:
        echo(best.cost["summary"])
    if best.ensemble_test:
        echo(f"the {best.members} fold students it was distilled from, averaged: test balanced accuracy (argmax) "
             f"{best.ensemble_test['balanced_accuracy']:.4f}{interval_text(best.ensemble_test)}, the distilled "
             f"student's {best.test_argmax['balanced_accuracy']:.4f}")
    shift = best.shift_text()
    if shift:
        echo(shift[0].upper() + shift[1:])
    write_report(run)
    use = run.slot_use()
    busy = {"trials": f"slots {use.busy:.0%} busy"} if use and use.busy is not None else {}
    echo("time: " + phases_text(phases.seconds, busy) + (
        f"; a slot waited {use.median_idle:.1f} s (median) between trials" if use and use.median_idle is not None
        else ""))
    echo(f"summary: {shown(run_dir / 'summary.md')}; table: {shown(run_dir / 'trials.csv')}; "
         f"plots: {shown(run_dir / 'plots')}")


def _echo_reranking(record: Reranking, echo: Callable[[str], None]) -> None:
    for entry in record.candidates:
        echo(f"  {entry.trial}: {record.metric} {spread(entry.mean, entry.std, len(entry.values))} over seeds "
             f"{record.seeds} "
             f"(in the search {entry.search_value:.4f})" + (f", hand-picked {entry.hand_picked}"
                                                             if entry.hand_picked else ""))
