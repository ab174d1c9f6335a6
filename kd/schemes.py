"""The ways a trial trains and is judged: one type each, chosen once from the config (`Scheme.of(cfg)`).

A scheme owns the datasets its students train on (its members), one teacher's logits per member, the
held-out images its students are judged on, `fit(cfg, report, resume)` (kd.train's one epoch loop over
its members, whose result carries the pooled held-out probabilities), how it names its figures, and how
the student a search ships is made from a winning trial (`final`). Nothing outside this module asks which
scheme it holds; a new way to train a trial (an ensemble of fold students, say) is one more subclass.

- `Holdout`: one student trains on the train split and is judged on the validation split, a threshold
  cross-fitted over two stratified halves of it (kd.selection). It ships the trial's own checkpoint.
- `CrossValidated`: train + validation pooled into K stratified folds (kd.crossval). Fold f's student
  trains on the other folds with the logits of a teacher fine-tuned on those folds only (a teacher that
  saw fold f would leak its labels into the student through its logits) and predicts fold f; the K train
  in lockstep and are judged on the pooled out-of-fold predictions, each fold thresholded by a threshold
  tuned on the others. It ships the winner's config refitted on all of train + validation, with a
  threshold tuned on out-of-fold predictions; or (`search.final`) the winner's fold students averaged, or one
  student trained on all of train + validation with those fold students, averaged, as its teacher.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from kd.config import Config
from kd.crossval import make_folds, pooled, refit_data
from kd.data import Dataset
from kd.ensemble import Ensemble
from kd.errors import Diverged
from kd.infer import resolve_device
from kd.metrics import tune_threshold
from kd.selection import THRESHOLD, decision_rule
from kd.student import new_student, student_loss, student_shell
from kd.teacher import Teacher, view_logits
from kd.train import FitResult, Fitting, HeldOut, Outcome, ReportFn, Training, member_states, run_fitting

T = TypeVar("T")


class Compute(Protocol):
    """Where the heavy steps of `Scheme.final` run (search.teachers.RayCompute: as the search runs its tasks)."""

    def teacher(self, cfg: Config, data: Dataset) -> Teacher:
        """The teacher of `cfg` fine-tuned on `data.train`, with logits for `cfg.train.epochs` epochs of views."""
        ...

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, with a trial's threads."""
        ...


@dataclass
class Final:
    """The student a search ships, made from its winning trial, and the teacher it learned from."""
    model: nn.Module
    threshold: float | None     # two classes: on p(class 1), tuned on predictions of images it was not fitted on
    epoch: int                  # the epochs it trained
    refit: bool                 # retrained on all of train + validation (not the trial's own checkpoint)
    sees_validation: bool       # it trained on the validation split (so no figure of it there means anything)
    train_images: int
    teacher: Teacher
    teacher_data: Dataset       # the data that teacher was fine-tuned on
    # models of the same config whose held-out predictions the threshold was tuned on, where the shipped model is
    # not one of them (a refit: the winner's fold students): its calibration against theirs is measured on export
    tuned_on: list[nn.Module] = field(default_factory=list)
    teacher_label: str = "the teacher it learned from"  # how the teacher set beside it is named
    fits_tuned_on: int = 0      # how many cross-validated fits' out-of-fold predictions tuned the threshold
    distilled_from: Ensemble | None = None  # the fold ensemble that taught it (search.final: distilled)


@dataclass
class Scheme(ABC):
    """One way a trial trains and is judged. `logits` (one per member) arrive once the teachers are prepared."""
    data: Dataset                           # the decoded dataset; its test split is never used here
    members: list[Dataset]                  # per student: its train split, and its val split (its held-out images)
    held: HeldOut | None                    # the pooled held-out images every epoch is judged on (None: a refit)
    logits: list[torch.Tensor] | None = None

    making_final: ClassVar[str] = ""        # what the console says while `final` runs, if it takes a while

    @staticmethod
    def of(cfg: Config) -> type[Scheme]:
        """The scheme a config asks for (`search.folds`): the one place that asks."""
        return CrossValidated if cfg.search.folds >= 2 else Holdout

    @classmethod
    @abstractmethod
    def split(cls, cfg: Config, data: Dataset) -> Scheme:
        """The members and held-out images of `data`, before any teacher."""

    def for_trials(self) -> Scheme:
        """This scheme as the trials get it: they train on the members, so the whole dataset's images stay behind
        (where it is not one of the members itself)."""
        if any(d is self.data for d in self.members):
            return self
        bare = replace(self.data, train=replace(self.data.train, images=None), val=replace(self.data.val, images=None))
        return replace(self, data=bare)

    def taught(self, logits: list[torch.Tensor]) -> Scheme:
        """This scheme with each member's teacher logits (from teachers fine-tuned on `members[i].train`)."""
        if len(logits) != len(self.members):
            raise ValueError(f"{len(logits)} teachers' logits for {len(self.members)} members")
        return replace(self, logits=list(logits))

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    def fit(self, cfg: Config, report: ReportFn | None = None, resume: dict[str, Any] | None = None,
            progress: bool = False, every_epoch: bool = True) -> FitResult:
        """Train a student per member with `cfg`, in lockstep, every epoch (or only the last: `every_epoch` False)
        judged on the pooled held-out images; each epoch's row to `report(row, state_fn)`."""
        return run_fitting(self.start(cfg, resume, progress, every_epoch), report)

    def start(self, cfg: Config, resume: dict[str, Any] | None = None, progress: bool = False,
              every_epoch: bool = True) -> Fitting:
        """The same fit, an epoch per `step()` (a search's trial steps it)."""
        logits: list[torch.Tensor | None] = list(self.logits) if self.logits else [None] * len(self.members)
        states = member_states(resume, len(self.members))
        trainings = [Training(new_student(cfg, len(self.classes)), cfg.train, data, student_loss(cfg, data),
                              cfg.augment, teacher_logits=logits[m],
                              balanced_sampling=cfg.imbalance.method == "balanced_sampling", resume=states[m],
                              progress=progress, desc=f"student {cfg.student.name}")
                     for m, data in enumerate(self.members)]  # every member starts from the same seeded weights
        return Fitting(trainings, self.held, resume, every_epoch)

    def final_teacher_data(self) -> Dataset | None:
        """The data of a teacher `final` needs beyond the members' (search.teachers prepares it beside the trials or
        the re-ranking), if any."""
        return None

    @abstractmethod
    def final(self, cfg: Config, state: dict[str, Any], probs: list[np.ndarray], compute: Compute) -> Final:
        """The student to ship from a trial of `cfg` whose last checkpoint is `state`; `probs` are its pooled held-out
        probabilities over further seeds (empty: the trial's own, saved in `state`)."""

    # ---- how its figures are named (from the config alone: readers of a finished search have no data)

    @classmethod
    @abstractmethod
    def where(cls, cfg: Config) -> str:
        """The held-out images in a sentence: 'pooled out-of-fold predictions of 5 folds'."""

    @classmethod
    @abstractmethod
    def short(cls, cfg: Config) -> str:
        """The same for a column or an axis: '5-fold out-of-fold'."""

    @classmethod
    @abstractmethod
    def describe(cls, cfg: Config) -> str:
        """How its trials train: '5-fold cross-validated'."""

    @classmethod
    def extra_metrics(cls) -> list[str]:
        """Held-out figures only this scheme reports."""
        return []

    @classmethod
    @abstractmethod
    def teachers_text(cls, cfg: Config) -> str:
        """Its teachers in a sentence: 'prepared once before the trials'."""

    @classmethod
    def member_name(cls, m: int, k: int) -> str:
        """How the console names member m of k ('' for a single one)."""
        return ""

    @classmethod
    @abstractmethod
    def final_text(cls, epoch: int, train_images: int, ensemble: int = 0, distilled: int = 0) -> str:
        """What its shipped student is: 'its checkpoint of epoch 8' (`ensemble`: how many fold students it
        averages, `distilled`: how many it was distilled from; 0 for neither)."""

    @classmethod
    @abstractmethod
    def threshold_source(cls) -> str:
        """The predictions its shipped threshold is tuned on."""


@dataclass
class Holdout(Scheme):

    @classmethod
    def split(cls, cfg: Config, data: Dataset) -> Holdout:
        held = HeldOut.validation(data, cfg.train.tune_threshold)
        if held is None:
            raise ValueError("a holdout needs a validation split")
        return cls(data, [data], held)

    def final(self, cfg: Config, state: dict[str, Any], probs: list[np.ndarray], compute: Compute) -> Final:
        """The trial's own checkpoint, with the threshold it tuned on all of validation."""
        model = student_shell(cfg, len(self.classes), self.data.image_size)
        model.load_state_dict(member_states(state, 1)[0]["model"])  # type: ignore[index]
        last = state["history"][-1]
        return Final(model, last.get("threshold"), last["epoch"], False, False, len(self.data.train),
                     compute.teacher(cfg, self.data), self.data)

    @classmethod
    def where(cls, cfg: Config) -> str:
        return "the validation split"

    @classmethod
    def short(cls, cfg: Config) -> str:
        return "validation split"

    @classmethod
    def describe(cls, cfg: Config) -> str:
        return "holdout"

    @classmethod
    def teachers_text(cls, cfg: Config) -> str:
        return "prepared once before the trials"

    @classmethod
    def final_text(cls, epoch: int, train_images: int, ensemble: int = 0, distilled: int = 0) -> str:
        return f"its checkpoint of epoch {epoch}"

    @classmethod
    def threshold_source(cls) -> str:
        return "validation"


@dataclass
class CrossValidated(Scheme):
    making_final: ClassVar[str] = "refitting the winner on all of train + validation ..."

    @classmethod
    def split(cls, cfg: Config, data: Dataset) -> CrossValidated:
        folds = make_folds(data, cfg.search.folds, cfg.data.split_seed)
        held = HeldOut(folds.labels, folds.ids, folds.ids, data.classes,
                       decision_rule(len(data.classes), cfg.train.tune_threshold), spread=True)
        return cls(data, folds.datasets, held)

    def final_teacher_data(self) -> Dataset:
        return refit_data(self.data)

    def final(self, cfg: Config, state: dict[str, Any], probs: list[np.ndarray], compute: Compute) -> Final:
        """`search.final` refit: the winner's config refitted on all of train + validation (its teacher fine-tuned on
        the same pool); ensemble: the winner's K fold students at the epoch that ranked it, their probabilities
        averaged (kd.ensemble); distilled: one student of the winner's config trained on all of train + validation
        with that ensemble as its teacher. The ensemble's threshold is tuned on the out-of-fold predictions of the
        students it ships; the others' on the winner's out-of-fold predictions over the further seeds (else the
        trial's own), and their calibration against the fold students is measured on export."""
        pool = self.final_teacher_data()
        teacher = compute.teacher(cfg, pool)  # the refit's teacher; the others are set beside it (kd.cost)
        folds = []
        for member in member_states(state, len(self.members)):  # the winner's fold students, as it ranked
            fold = student_shell(cfg, len(self.classes), self.data.image_size)
            fold.load_state_dict(member["model"])  # type: ignore[index]
            folds.append(fold.eval())
        saved = state.get("probs", state.get("oof_probs"))  # the trial's own, saved with its last checkpoint
        own = [saved.numpy()] if saved is not None else []
        probs = own if cfg.search.final == "ensemble" or not probs else probs
        threshold = None
        if decision_rule(len(self.classes), cfg.train.tune_threshold) == THRESHOLD and probs:
            labels = np.tile(pooled(self.data).labels.numpy(), len(probs))
            threshold = tune_threshold(labels, np.concatenate(probs)[:, 1])
        tuned_on = folds if threshold is not None else []
        if cfg.search.final == "ensemble":
            return Final(Ensemble(folds).eval(), threshold, state["history"][-1]["epoch"], False, True,
                         len(pool.train), teacher, pool, tuned_on,
                         "a teacher fine-tuned on all of train + validation (the fold students learned from the "
                         "fold teachers)", len(probs))
        model = student_shell(cfg, len(self.classes), self.data.image_size)
        if cfg.search.final == "distilled":
            ensemble = Ensemble(folds).eval()
            model.load_state_dict(compute.run(distil_ensemble, cfg, pool, ensemble))
            return Final(model, threshold, cfg.train.epochs, True, True, len(pool.train), teacher, pool, tuned_on,
                         "a teacher fine-tuned on all of train + validation (the student learned from the fold "
                         "ensemble, its fold students from the fold teachers)", len(probs), ensemble)
        model.load_state_dict(compute.run(refit, cfg, pool, teacher.logits))
        return Final(model, threshold, cfg.train.epochs, True, True, len(pool.train), teacher, pool, tuned_on,
                     fits_tuned_on=len(probs))

    @classmethod
    def where(cls, cfg: Config) -> str:
        return f"pooled out-of-fold predictions of {cfg.search.folds} folds"

    @classmethod
    def short(cls, cfg: Config) -> str:
        return f"{cfg.search.folds}-fold out-of-fold"

    @classmethod
    def describe(cls, cfg: Config) -> str:
        return f"{cfg.search.folds}-fold cross-validated"

    @classmethod
    def extra_metrics(cls) -> list[str]:
        return ["val_balanced_accuracy_fold_mean", "val_balanced_accuracy_fold_std"]

    @classmethod
    def teachers_text(cls, cfg: Config) -> str:
        return (f"one per fold ({cfg.search.folds}), each fine-tuned on the other folds only, prepared before the "
                "trials (validation figures: the mean over the teachers' own folds)")

    @classmethod
    def member_name(cls, m: int, k: int) -> str:
        return f"fold {m + 1}/{k}"

    @classmethod
    def final_text(cls, epoch: int, train_images: int, ensemble: int = 0, distilled: int = 0) -> str:
        if ensemble:
            return (f"its {ensemble} fold students at epoch {epoch} (each trained on the other folds of the "
                    f"{train_images} train + validation images), their probabilities averaged")
        if distilled:
            return (f"one student distilled from its {distilled} fold students averaged, trained on all "
                    f"{train_images} train + validation images with its config and {epoch} epochs")
        return f"refitted on all {train_images} train + validation images with its config and {epoch} epochs"

    @classmethod
    def threshold_source(cls) -> str:
        return "out-of-fold predictions"


def refit(cfg: Config, pool: Dataset, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """One student trained on all of `pool.train` (nothing held out), its weights on the CPU."""
    result = Holdout(pool, [pool], None, [logits]).fit(cfg)
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
