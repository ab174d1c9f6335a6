"""How a search's winner ships: one type per way (`Shipment.of(way)`), each owning how its model is made, where its
decision threshold comes from, and how it is told.

A scheme (kd.schemes) hands a shipment the winning trial as it was judged (a `Winner`: its students at the epoch that
ranked it, their held-out probabilities, the images the shipped model may learn from) and says which ways it can
ship (`Scheme.ships`); the config's `search.final` names one (auto: the scheme's first). The record of what shipped
(search.records.BestRecord) stores the way's value. A new way to ship is one `Way` value and one subclass here.

- `Checkpoint`: the trial's own student as it was checkpointed (a holdout's), with the threshold it tuned on
  validation.
- `Refit`: the winner's config trained again on all of train + validation with a teacher fine-tuned on the same
  images; its threshold tuned on the winner's out-of-fold predictions over the re-ranking's further seeds.
- `FoldEnsemble`: the winner's K fold students, their probabilities averaged (kd.ensemble); its threshold tuned on the
  out-of-fold predictions of those very students.
- `DistilledEnsemble`: one student of the winner's config trained on all of train + validation with the fold
  ensemble as its teacher (its logits on every view the student trains on).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from kd.config import Config
from kd.data import Dataset
from kd.ensemble import Ensemble
from kd.errors import Diverged
from kd.files import load_tensors, save_tensors
from kd.infer import resolve_device
from kd.metrics import predict, tune_threshold
from kd.selection import cross_fitted_predictions, validation_parts
from kd.student import student_shell, student_training
from kd.teacher import Teacher, view_logits
from kd.train import Fitting, Outcome, run_fitting
from kd.typed import Vocabulary

T = TypeVar("T")


class Way(Vocabulary):
    """How a winner ships: the value of `search.final` (besides auto) and of best/metrics.json's `final`."""
    CHECKPOINT = "checkpoint"   # the trial's own checkpoint
    REFIT = "refit"             # its config trained again on all of train + validation
    ENSEMBLE = "ensemble"       # its fold students, averaged
    DISTILLED = "distilled"     # one student distilled from its fold students, averaged


class Compute(Protocol):
    """Where the heavy steps of a shipment run (search.teachers.RayCompute: as the search runs its tasks)."""

    def teacher(self, cfg: Config, data: Dataset) -> Teacher:
        """The teacher of `cfg` fine-tuned on `data.train`, with logits for `cfg.train.epochs` epochs of views."""
        ...

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, with a trial's threads."""
        ...


@dataclass
class Judged:
    """One fit of the winner's config that the re-ranking judged, kept: its students' weights (one per member, trained
    for all of `train.epochs`) and their pooled held-out probabilities."""
    weights: list[dict[str, torch.Tensor]]
    probs: np.ndarray
    seed: int

    def save(self, path: Path) -> None:
        tensors = {f"member{m}.{k}": v for m, w in enumerate(self.weights) for k, v in w.items()}
        save_tensors(path, {**tensors, "probs": torch.tensor(np.asarray(self.probs))},
                     {"seed": self.seed, "members": len(self.weights)})

    @classmethod
    def load(cls, path: Path) -> Judged | None:
        """The fit saved at `path`, or None where there is none."""
        if not path.is_file():
            return None
        tensors, meta = load_tensors(path)
        weights: list[dict[str, torch.Tensor]] = [{} for _ in range(int(meta["members"]))]
        for key, value in tensors.items():
            if key != "probs":
                member, name = key.split(".", 1)
                weights[int(member.removeprefix("member"))][name] = value
        return cls(weights, tensors["probs"].numpy(), int(meta["seed"]))


@dataclass(frozen=True)
class Decision:
    """The decision rule a model ships with, and how it was chosen: argmax, or (two classes) the threshold on p(class
    1) tuned on held-out predictions. `auto` ships the threshold only where it judged better than argmax on those
    predictions, each part of them thresholded by a threshold tuned on the other parts (never on itself)."""
    threshold: float | None            # what ships: None is argmax
    tuned: float | None = None         # the threshold tuned on all the held-out predictions
    argmax: float | None = None        # balanced accuracy of the held-out predictions at argmax ...
    cross_fitted: float | None = None  # ... and under a threshold cross-fitted over their parts
    how: str = "argmax"                # auto, threshold or argmax (search.shipped_rule), or argmax: more classes
    called: list[float] = field(default_factory=list)  # the share of the held-out images it calls each class

    @property
    def rule(self) -> str:
        return "argmax" if self.threshold is None else "threshold"

    def text(self, where: str, positive: str = "class 1") -> str:
        """The rule in a sentence: 'argmax (on the 2 fits' out-of-fold predictions: 0.912 at argmax, 0.905 with a
        cross-fitted threshold)'."""
        if self.tuned is None:
            return "argmax"
        shipped = "argmax" if self.threshold is None else f"p({positive}) >= {self.threshold:.4f}"
        if self.how != "auto" or self.argmax is None or self.cross_fitted is None:
            return f"{shipped} (search.shipped_rule {self.how})"
        return (f"{shipped}: on {where}, balanced accuracy {self.argmax:.4f} at argmax, {self.cross_fitted:.4f} with a "
                "threshold each part of them did not tune")


def decide(labels: np.ndarray, probs: list[np.ndarray], parts: np.ndarray | None, how: str, tunes: bool) -> Decision:
    """The rule to ship with, from held-out predictions `probs` (one array per fit, each over the images `labels`)
    and the parts a threshold is cross-fitted over (`parts`, per image; None: two stratified halves)."""
    if not tunes or not probs or len(np.unique(labels)) < 2:
        return Decision(None, called=_called(probs, None))
    tuned = tune_threshold(np.tile(labels, len(probs)), np.concatenate(probs)[:, 1])
    if how != "auto":
        threshold = tuned if how == "threshold" else None
        return Decision(threshold, tuned, how=how, called=_called(probs, threshold))
    parts = parts if parts is not None else validation_parts(labels, seed=1)
    argmax = float(np.mean([balanced_accuracy_score(labels, p.argmax(axis=1)) for p in probs]))
    crossed = float(np.mean([balanced_accuracy_score(labels, cross_fitted_predictions(labels, p, parts))
                             for p in probs]))
    threshold = tuned if crossed > argmax else None  # a tie ships argmax: nothing tuned that did not earn its place
    return Decision(threshold, tuned, argmax, crossed, "auto", _called(probs, threshold))


def _called(probs: list[np.ndarray], threshold: float | None) -> list[float]:
    """The share of the images each class is called under the rule, over `probs` (one array per fit)."""
    if not probs:
        return []
    pred = np.concatenate([predict(p, threshold) for p in probs])
    return (np.bincount(pred, minlength=probs[0].shape[1]) / len(pred)).tolist()


@dataclass
class Winner:
    """A winning trial as its scheme hands it to a shipment."""
    cfg: Config
    students: list[nn.Module]        # its students at the epoch that ranked it (one, or its K fold students), eval
    epoch: int                       # that epoch
    pool: Dataset                    # the labelled images the shipped model may learn from (its train split)
    labels: np.ndarray               # the labels of the held-out images its probabilities are of
    tunes: bool                      # the decision rule tunes a threshold on p(class 1) (two classes)
    own_probs: list[np.ndarray] = field(default_factory=list)  # its held-out probabilities, saved with the checkpoint
    probs: list[np.ndarray] = field(default_factory=list)      # the same over the re-ranking's further seeds
    own_threshold: float | None = None                         # the threshold its own fit tuned (a holdout's)
    parts: np.ndarray | None = None    # the held-out images' cross-fitting parts (the folds)
    judged: list[nn.Module] = field(default_factory=list)  # the re-ranking's students of one further seed, full epochs
    judged_probs: np.ndarray | None = None                  # their pooled held-out probabilities
    judged_epoch: int = 0

    def decision(self, probs: list[np.ndarray]) -> Decision:
        """The rule the shipped model uses, chosen on `probs` (each over the held-out images) as
        `search.shipped_rule` says."""
        return decide(self.labels, probs, self.parts, self.cfg.search.shipped_rule, self.tunes)

    def threshold(self, probs: list[np.ndarray]) -> float | None:
        """The shipped threshold chosen on `probs`, or None where the rule is argmax."""
        return self.decision(probs).threshold

    @property
    def fold_students(self) -> tuple[list[nn.Module], list[np.ndarray], int]:
        """The fold students an ensemble is made of, their own held-out probabilities and their epochs: those the
        re-ranking judged (trained for all epochs), else the trial's checkpoint's (at the epoch that ranked it)."""
        if self.judged and self.judged_probs is not None:
            return self.judged, [self.judged_probs], self.judged_epoch
        return self.students, self.own_probs, self.epoch


@dataclass
class Final:
    """The student a search ships, made from its winning trial, and the teacher it learned from."""
    model: nn.Module
    threshold: float | None     # two classes: on p(class 1), tuned on predictions of images it was not fitted on
    epoch: int                  # the epochs it trained
    way: Way                    # how it was made
    sees_validation: bool       # it trained on the validation split (so no figure of it there means anything)
    train_images: int
    teacher: Teacher
    teacher_data: Dataset       # the data that teacher was fine-tuned on
    # models of the same config whose held-out predictions the threshold was tuned on, where the shipped model is
    # not one of them (a refit: the winner's fold students): its calibration against theirs is measured on export
    tuned_on: list[nn.Module] = field(default_factory=list)
    teacher_label: str = "the teacher it learned from"  # how the teacher set beside it is named
    fits_tuned_on: int = 0      # how many cross-validated fits' out-of-fold predictions tuned the threshold
    members: int = 0            # the fold students it averages or was distilled from
    distilled_from: Ensemble | None = None  # the fold ensemble that taught it (a distilled student)
    decision: Decision = field(default_factory=lambda: Decision(None))  # how its rule was chosen


class Shipment(ABC):
    """One way a winner ships."""
    way: ClassVar[Way]
    threshold_source: ClassVar[str] = "out-of-fold predictions"  # the predictions its threshold is tuned on
    sees_validation: ClassVar[bool] = True  # the shipped model learned from the validation images

    @staticmethod
    def of(way: Way | str) -> Shipment:
        """The shipment of `way`: the one place that maps a way to its type."""
        return _SHIPMENTS[Way(way)]()

    @abstractmethod
    def make(self, winner: Winner, compute: Compute) -> Final:
        """The model that ships, with its threshold and the teacher set beside it."""

    def making(self, members: int) -> str:
        """What the console says while it is made ('' where that takes no time)."""
        return ""

    @abstractmethod
    def text(self, epoch: int, train_images: int, members: int) -> str:
        """What ships, in a sentence's object: 'its checkpoint of epoch 8'."""

    @abstractmethod
    def noun(self, members: int) -> str:
        """The exported model as a noun: 'the exported refit'."""


class Checkpoint(Shipment):
    way = Way.CHECKPOINT
    threshold_source = "validation"
    sees_validation = False

    def make(self, winner: Winner, compute: Compute) -> Final:
        decision = winner.decision(winner.own_probs) if winner.own_probs else Decision(winner.own_threshold)
        if decision.threshold is not None:  # the one its own fit tuned on the same predictions, at full precision
            decision = replace(decision, threshold=winner.own_threshold)
        return Final(winner.students[0], decision.threshold, winner.epoch, self.way, False, len(winner.pool.train),
                     compute.teacher(winner.cfg, winner.pool), winner.pool, decision=decision)

    def text(self, epoch: int, train_images: int, members: int) -> str:
        return f"its checkpoint of epoch {epoch}"

    def noun(self, members: int) -> str:
        return "the exported checkpoint"


class Refit(Shipment):
    way = Way.REFIT

    def make(self, winner: Winner, compute: Compute) -> Final:
        cfg, pool = winner.cfg, winner.pool
        probs = winner.probs or winner.own_probs
        decision = winner.decision(probs)
        teacher = compute.teacher(cfg, pool)
        model = student_shell(cfg, len(pool.classes), pool.image_size)
        model.load_state_dict(compute.run(refit, cfg, pool, teacher.logits))
        # its calibration is set against fold students whose predictions chose the rule: the judged ones, if kept
        tuned_on = (winner.judged or winner.students) if decision.tuned is not None else []
        return Final(model, decision.threshold, cfg.train.epochs, self.way, True, len(pool.train), teacher, pool,
                     tuned_on, fits_tuned_on=len(probs), decision=decision)

    def making(self, members: int) -> str:
        return "refitting the winner on all of train + validation ..."

    def text(self, epoch: int, train_images: int, members: int) -> str:
        return f"refitted on all {train_images} train + validation images with its config and {epoch} epochs"

    def noun(self, members: int) -> str:
        return "the exported refit"


class FoldEnsemble(Shipment):
    way = Way.ENSEMBLE

    def make(self, winner: Winner, compute: Compute) -> Final:
        students, probs, epoch = winner.fold_students  # with the out-of-fold predictions of those very students
        decision = winner.decision(probs)
        teacher = compute.teacher(winner.cfg, winner.pool)  # set beside it: the one a refit would learn from
        return Final(Ensemble(students).eval(), decision.threshold, epoch, self.way, True,
                     len(winner.pool.train), teacher, winner.pool, students if decision.tuned is not None else [],
                     "a teacher fine-tuned on all of train + validation (the fold students learned from the fold "
                     "teachers)", len(probs), len(students), decision=decision)

    def making(self, members: int) -> str:
        return f"the winner ships as its {members} fold students, averaged ..."

    def text(self, epoch: int, train_images: int, members: int) -> str:
        return (f"its {members} fold students at epoch {epoch} (each trained on the other folds of the "
                f"{train_images} train + validation images), their probabilities averaged")

    def noun(self, members: int) -> str:
        return f"the exported ensemble of {members}"


class DistilledEnsemble(Shipment):
    way = Way.DISTILLED

    def make(self, winner: Winner, compute: Compute) -> Final:
        cfg, pool = winner.cfg, winner.pool
        probs = winner.probs or winner.own_probs
        decision = winner.decision(probs)
        teacher = compute.teacher(cfg, pool)  # set beside it, as beside a refit
        students = winner.fold_students[0]  # the judged fold students, if kept
        ensemble = Ensemble(students).eval()
        model = student_shell(cfg, len(pool.classes), pool.image_size)
        model.load_state_dict(compute.run(distil_ensemble, cfg, pool, ensemble))
        return Final(model, decision.threshold, cfg.train.epochs, self.way, True, len(pool.train), teacher, pool,
                     students if decision.tuned is not None else [],
                     "a teacher fine-tuned on all of train + validation (the student learned from the fold ensemble, "
                     "its fold students from the fold teachers)", len(probs), len(students), ensemble,
                     decision=decision)

    def making(self, members: int) -> str:
        return (f"distilling one student from the winner's {members} fold students, averaged, on all of train + "
                "validation ...")

    def text(self, epoch: int, train_images: int, members: int) -> str:
        return (f"one student distilled from its {members} fold students averaged, trained on all {train_images} "
                f"train + validation images with its config and {epoch} epochs")

    def noun(self, members: int) -> str:
        return "the exported distilled student"


_SHIPMENTS: dict[Way, type[Shipment]] = {s.way: s for s in (Checkpoint, Refit, FoldEnsemble, DistilledEnsemble)}


def refit(cfg: Config, pool: Dataset, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """One student trained on all of `pool.train` (nothing held out), its weights on the CPU."""
    result = run_fitting(Fitting([student_training(cfg, pool, logits)], None))
    if result.status != Outcome.COMPLETED:
        raise Diverged(f"the final student diverged when refitted on train + validation (epoch "
                       f"{len(result.history)}); its config: {cfg.distill}, lr {cfg.train.lr}")
    return {k: v.detach().cpu() for k, v in result.model.state_dict().items()}


def distil_ensemble(cfg: Config, pool: Dataset, ensemble: Ensemble) -> dict[str, torch.Tensor]:
    """One student trained on all of `pool.train` with `ensemble` as its teacher: the ensemble's logits (the log of
    its members' mean probability) on every view the student trains on, in place of a fine-tuned teacher's."""
    logits = view_logits(ensemble, cfg.train, cfg, pool, range(cfg.train.epochs), resolve_device(cfg.train.device),
                         desc="fold ensemble logits")
    return refit(cfg, pool, logits)
