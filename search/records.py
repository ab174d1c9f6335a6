"""The files of a run directory and the records in them: one dataclass per record, used by its writer and its readers.

A record is written with `write(run_dir)` and read back with `read(run_dir)` through kd.typed (every key
checked against the fields, every value coerced to its type), so a field renamed on one side fails at once,
in mypy and at the first read, naming the file and the key, instead of leaving a report quietly empty.

Layout of `results/<name>/`:

    config.yaml          the resolved config           run.json        classes, data, experiment path, time
    teacher.json         the teachers' record          rerank.json     the top trials retrained with other seeds
    trial_events.jsonl   every trial end and retry     optuna.journal  the Optuna study
    best/                the exported best student     trials.csv, summary.md, plots/, configs/: the report
    ray/                 Ray Tune's experiment (or ray-mirror/, a local copy of one in remote storage)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from kd.records import JsonRecord
from kd.shipping import Decision, Shipment, Way
from kd.teacher import TeacherInfo
from kd.typed import Vocabulary

CONFIG, RUN, TEACHER, RERANK, BEST = "config.yaml", "run.json", "teacher.json", "rerank.json", "best"
RERANK_PROBS = "rerank_probs.safetensors"  # the winner's held-out probabilities over the further seeds
# the students the re-ranking judged, kept beside rerank.json: the winner's of its first further seed, and its
# labels-only twin's of its first judging seed (kd.shipping.Judged)
JUDGED, TWIN = "judged_students.safetensors", "labels_only_students.safetensors"
EVENTS, JOURNAL, EXPERIMENT, MIRROR = "trial_events.jsonl", "optuna.journal", "ray", "ray-mirror"
STATE_FILE = "state.pt"  # the file inside a trial's checkpoint folder
RAY_ERRORS = "ray-errors.log"  # the errors Ray's cluster published to this search, whole (the console gets a line)
MLFLOW_DB = "mlflow.db"  # search.loggers' MLflow store, unless search.mlflow_uri names another


class TrialStatus(Vocabulary):
    """A trial's status: the one vocabulary of the table, the console, the plots and the summary."""
    COMPLETED = "completed"
    STOPPED = "stopped early"
    FAILED = "failed"
    UNFINISHED = "unfinished"
    RETRY = "retry"  # an event only: the trial is run again



RANKED = (TrialStatus.COMPLETED, TrialStatus.STOPPED)                        # trials with a score to rank
FINISHED = (TrialStatus.COMPLETED, TrialStatus.STOPPED, TrialStatus.FAILED)  # trials that will not run again

# the held-out figures every trial reports (kd.selection), and those of a scheme or a task that may be absent
METRICS = ("val_balanced_accuracy", "val_accuracy", "val_macro_f1", "val_auc", "val_balanced_log_loss",
           "val_balanced_accuracy_argmax",
           "val_balanced_accuracy_fold_mean", "val_balanced_accuracy_fold_std")
COST = ("student_params", "student_mflops", "student_latency_ms", "student_images_per_s")  # measured in each trial
PLACEMENT = ("node", "gpus", "device", "pid")  # the Ray node, the GPU ids Ray gave it, torch's device, its process
# the search metric on each judging half of the held-out images (search.halves.judging_halves), reported with every
# epoch: each half's re-ranking pool is chosen on the other half alone
HALF_FIGURES = ("half0_figure", "half1_figure")
TEACHER_WORK = "teacher_forward_images"  # images the trial ran through a teacher itself (its process counted them)


R = TypeVar("R", bound="Record")


@dataclass(frozen=True)
class Record(JsonRecord):
    """A JSON record in a run directory (`FILE`, relative to it): kd.records' rules, addressed by the run directory."""
    FILE: ClassVar[str]

    def write(self, run_dir: str | Path) -> None:
        super().write(Path(run_dir) / self.FILE)

    @classmethod
    def read(cls: type[R], run_dir: str | Path) -> R | None:
        """The record, or None where the file does not exist yet (or cannot be parsed: cut short by a kill); a file
        whose fields are not this record's is an error naming the file and the field."""
        return super().read(Path(run_dir) / cls.FILE)


@dataclass(frozen=True)
class RunRecord(Record):
    """run.json: what the search was given and where its experiment lives."""
    FILE: ClassVar[str] = RUN
    experiment: str
    classes: list[str]
    data: str = ""
    resumed: bool = False
    seconds: float | None = None                 # since the search (or its resumption) started
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (search.phases)
    slots: int | None = None                     # trials that could run at once when it started


@dataclass(frozen=True)
class Placement:
    node: str = ""    # the Ray node ("" without Ray)
    gpus: str = ""    # the GPU ids Ray gave it ("" on CPUs)
    started: float = 0.0  # wall-clock seconds (time.time()) when it began, and ended
    ended: float = 0.0


@dataclass(frozen=True)
class TeacherRecord(Record):
    """teacher.json: the teachers' validation metrics (the mean over folds) and how they were prepared."""
    FILE: ClassVar[str] = TEACHER
    metrics: dict[str, Any]
    info: TeacherInfo                            # summed over the teachers; cached only if all were
    teachers: int = 1                            # one per member of the scheme (per fold when cross-validated)
    placement: list[Placement] = field(default_factory=list)
    seconds: float = 0.0                         # from the search's start to the teachers being ready
    # each teacher's own validation figures (its fold's images): balanced_accuracy and confusion_matrix
    each: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        return self.info.describe()


class Verdict(Vocabulary):
    """The search's winner against one hand-picked point."""
    SAME = "same"                 # the winner is the hand-picked point itself
    BEATS = "beats"               # beats it beyond the noise
    WITHIN_NOISE = "within_noise"  # does not beat it beyond the noise
    UNJUDGED = "unjudged"          # not judged: no judging seeds, their runs diverged, or a class of one image


    @property
    def text(self) -> str:
        return {"same": "is the hand-picked point itself", "beats": "beats it beyond the noise",
                "within_noise": "does not beat it beyond the noise",
                "unjudged": "was not judged against it (no judging seeds ran both, or a class has one image)"
                }[self.value]

    @classmethod
    def _missing_(cls, value: object) -> Verdict | None:  # rerank.json of an earlier version kept the sentence
        return next((m for m in cls if m.text == value), None)


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float


@dataclass(frozen=True)
class Candidate:
    """One trial retrained with the further seeds."""
    trial: str
    params: dict[str, Any]
    hand_picked: int | None           # the number of its `search.points` entry, or None (a top trial)
    search_value: float               # its figure in the search (one seed, the figure that picked it)
    status: TrialStatus               # its status in the search
    values: list[float]               # the search metric per further seed (NaN: that run diverged)
    mean: float
    std: float
    metrics: dict[str, Spread]        # every held-out figure over the further seeds
    judged: list[float] = field(default_factory=list)  # the search metric per judging seed (the winner and points)


@dataclass(frozen=True)
class Comparison:
    """The winner against one hand-picked point, paired on the same seeds."""
    point: int
    trial: str
    difference: float                 # mean paired difference, in the direction of search.mode (higher is better)
    standard_error: float             # of the images' resampling (kd.selection.paired_difference)
    seeds: int                        # the judging seeds both ran (an earlier version: the re-ranking seeds)
    verdict: Verdict
    lower: float = math.nan           # the 97.5% lower bound: the winner beats the point when it is above 0
    detectable: float = math.nan      # the true difference this noise would find 4 times in 5
    judged: list[str] = field(default_factory=list)  # the trial each half of the held-out images judged (the
    #                                                  other half's pick)


@dataclass(frozen=True)
class LabelsOnly:
    """The winner against its labels-only twin (its config with distill.alpha 0, everything else equal), judged as
    the hand-picked points are: what the teacher added."""
    trial: str                        # the winner
    seeds: list[int]                  # the seeds the twin trained with (the judging seeds)
    values: list[float]               # the twin's search metric per seed
    mean: float
    std: float
    difference: float                 # the winner's paired difference over the twin (better direction)
    standard_error: float
    verdict: Verdict                  # beats: distillation added something beyond the noise; same: alpha was 0
    alpha: float = math.nan           # the winner's distill.alpha
    lower: float = math.nan
    detectable: float = math.nan
    metrics: dict[str, Spread] = field(default_factory=dict)  # the twin's held-out figures over its seeds
    judged: list[str] = field(default_factory=list)  # the trial each half judged against its own twin

    @property
    def text(self) -> str:
        """What distillation added, in a sentence."""
        if self.verdict == Verdict.SAME:
            return "the winner trains on the labels alone (distill.alpha 0): the teacher added nothing to it"
        if self.verdict == Verdict.UNJUDGED:
            return "what the teacher added was not measured (no judging seeds completed both fits)"
        added = (f"the teacher added {self.difference:+.4f} (paired, on halves of the held-out images that did not "
                 f"pick; 97.5% lower bound {self.lower:+.4f})")
        if self.verdict == Verdict.BEATS:
            return f"distillation beats its labels-only twin beyond the noise: {added}"
        return (f"distillation added nothing measurable over its labels-only twin: {added}; it could find "
                f"{self.detectable:.4f}")


@dataclass(frozen=True)
class Reranking(Record):
    """rerank.json: the top trials and the hand-picked points retrained with further seeds, and the winner."""
    FILE: ClassVar[str] = RERANK
    metric: str
    seeds: list[int]
    winner: str
    candidates: list[Candidate]
    against_points: list[Comparison]
    judge_seeds: list[int] = field(default_factory=list)  # the seeds the winner was judged on (not picked on)
    labels_only: LabelsOnly | None = None  # the winner against its labels-only twin

    def candidate(self, trial: str) -> Candidate | None:
        return next((c for c in self.candidates if c.trial == trial), None)


@dataclass(frozen=True)
class BestRecord(Record):
    """best/metrics.json: the exported student, what it was judged on and its one test evaluation."""
    FILE: ClassVar[str] = f"{BEST}/metrics.json"
    RENAMED: ClassVar[dict[str, str]] = {"val_last_epoch": "trial_val"}
    trial: str
    classes: list[str]
    threshold: float | None
    epoch: int                                   # the epochs it trained
    params: dict[str, Any]
    # the winning trial's held-out figures at its last epoch, the figures that ranked it: its own students' (its fold
    # students' pooled out-of-fold predictions, or its checkpoint on validation), the exported model's only for a
    # holdout's checkpoint (`val_about` says which)
    trial_val: dict[str, Any]
    test: dict[str, Any]
    final: Way = Way.CHECKPOINT                  # how it shipped (kd.shipping)
    members: int = 0                             # the fold students it averages or was distilled from
    train_images: int = 0
    val: dict[str, Any] = field(default_factory=dict)  # the exported model on the validation split (a holdout's)
    val_about: str = ""                          # what `val` and `trial_val` are figures of, in a sentence
    cost: dict[str, Any] = field(default_factory=dict)  # the compression report against the teacher (kd.cost)
    teacher: TeacherInfo | None = None           # the teacher the exported student learned from
    teacher_test: dict[str, Any] = field(default_factory=dict)  # that teacher on the test split, at argmax ...
    test_argmax: dict[str, Any] = field(default_factory=dict)   # ... and the exported student, at argmax too
    # a refit against the fold students its threshold was tuned on, on the test images (kd.metrics.calibration_shift)
    calibration_shift: dict[str, Any] = field(default_factory=dict)
    teacher_label: str = "the teacher it learned from"  # what teacher_test's teacher is to the exported model
    ensemble_test: dict[str, Any] = field(default_factory=dict)  # their average, its teacher, on test at argmax
    rule: dict[str, Any] = field(default_factory=dict)  # how its decision rule was chosen (kd.shipping.Decision)
    # the exported model on test at the tuned threshold, where it ships argmax (recorded, never used to choose)
    test_threshold: dict[str, Any] = field(default_factory=dict)
    # the winner's labels-only twin (distill.alpha 0): its validation figures, the paired difference and verdict
    # (rerank.json's labels_only), and its test balanced accuracy, shipped the same way
    labels_only: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what a user must not miss (search.warnings)

    @classmethod
    def upgraded(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Before `final`, three flags said how it shipped: refit (true or false), ensemble and distilled (counts)."""
        if "final" in raw or not {"refit", "ensemble", "distilled"} & set(raw):
            return raw
        raw = dict(raw)
        refit, ensemble, distilled = raw.pop("refit", False), raw.pop("ensemble", 0), raw.pop("distilled", 0)
        raw["final"] = (Way.ENSEMBLE if ensemble else Way.DISTILLED if distilled else Way.REFIT if refit
                        else Way.CHECKPOINT)
        raw["members"] = ensemble or distilled
        return raw

    @property
    def shipment(self) -> Shipment:
        return Shipment.of(self.final)

    def shipped_text(self) -> str:
        """What shipped, in a sentence's object: 'refitted on all 1437 train + validation images ...'."""
        return self.shipment.text(self.epoch, self.train_images, self.members)

    def rule_text(self) -> str:
        """The shipped decision rule and how it was chosen, in a sentence's object."""
        if not self.rule:
            return "argmax" if self.threshold is None else f"p({self.classes[-1]}) >= {self.threshold:.4f}"
        return Decision(**self.rule).text("the held-out predictions of fits trained as its students were",
                                          self.classes[-1])

    def shift_text(self) -> str:
        """The calibration shift in a sentence ("" where the threshold was tuned on the shipped model itself)."""
        c = self.calibration_shift
        if not c:
            return ""
        shipped = self.shipment.noun(self.members)
        fits = c.get("fits_tuned_on", 0)
        tuned = (f"tuned on the out-of-fold predictions of {fits} cross-validated fit{'s' if fits != 1 else ''} of "
                 "its config" if fits else "tuned on out-of-fold predictions")
        return (f"calibration of {shipped} against the winner's {c['models_tuned_on']} fold students, each alone, at "
                f"the threshold {c['threshold']:.4f} ({tuned}), on the {c['images']} test images (labels unused): "
                f"the fold students call {c['called_class_1_tuned_on']:.1%} of the images {self.classes[1]}, {shipped} "
                f"{c['called_class_1_shipped']:.1%}; median p({self.classes[1]}) {c['median_p1_tuned_on']:.3g} "
                f"against {c['median_p1_shipped']:.3g}")
