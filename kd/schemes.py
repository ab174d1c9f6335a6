"""The ways a trial trains and is judged: one type each, chosen once from the config (`Scheme.of(cfg)`).

A scheme owns the datasets its students train on (its members), one teacher's logits per member, the
held-out images its students are judged on, `fit(cfg, report, resume)` (kd.train's one epoch loop over
its members, whose result carries the pooled held-out probabilities), how it names its figures, and how
which ways its winner can ship (`ships`, kd.shipping). Nothing outside this module asks which
scheme it holds; a new way to train a trial (an ensemble of fold students, say) is one more subclass.

- `Holdout`: one student trains on the train split and is judged on the validation split, a threshold
  cross-fitted over two stratified halves of it (kd.selection). It ships the trial's own checkpoint.
- `CrossValidated`: train + validation pooled into K stratified folds (kd.crossval). Fold f's student
  trains on the other folds with the logits of a teacher fine-tuned on those folds only (a teacher that
  saw fold f would leak its labels into the student through its logits) and predicts fold f; the K train
  in lockstep and are judged on the pooled out-of-fold predictions, each fold thresholded by a threshold
  tuned on the others. It ships the winner's config refitted on all of train + validation, its fold students
  averaged, or one student distilled from that average (kd.shipping: `search.final`).

How a winner becomes the shipped model is kd.shipping's: a scheme says which ways it can ship (`ships`) and hands the
chosen one its winning trial as it was judged (`winner`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from kd.config import Config
from kd.crossval import make_folds, pooled, refit_data
from kd.data import Dataset
from kd.errors import ConfigError
from kd.selection import THRESHOLD, decision_rule
from kd.shipping import Compute, Final, Judged, Shipment, Way, Winner
from kd.student import student_shell, student_training
from kd.train import FitResult, Fitting, HeldOut, ReportFn, member_states, run_fitting


@dataclass
class Scheme(ABC):
    """One way a trial trains and is judged. `logits` (one per member) arrive once the teachers are prepared."""
    data: Dataset                           # the decoded dataset; its test split is never used here
    members: list[Dataset]                  # per student: its train split, and its val split (its held-out images)
    held: HeldOut | None                    # the pooled held-out images every epoch is judged on (None: a refit)
    logits: list[torch.Tensor] | None = None

    ships: ClassVar[tuple[Way, ...]]        # the ways its winner can ship (kd.shipping), its default first
    scheme_text: ClassVar[str]              # the setting that chooses it, for messages

    @staticmethod
    def of(cfg: Config) -> type[Scheme]:
        """The scheme a config asks for (`search.folds`): the one place that asks."""
        return Scheme.with_folds(cfg.search.folds)

    @staticmethod
    def with_folds(folds: int) -> type[Scheme]:
        return CrossValidated if folds >= 2 else Holdout

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
        trainings = [student_training(cfg, data, logits[m], states[m], progress)  # each from the same seeded weights
                     for m, data in enumerate(self.members)]
        return Fitting(trainings, self.held, resume, every_epoch)

    def final_teacher_data(self) -> Dataset | None:
        """The data of a teacher `final` needs beyond the members' (search.teachers prepares it beside the trials or
        the re-ranking), if any."""
        return None

    @classmethod
    def way(cls, final: str) -> Way:
        """The way `search.final` names for this scheme (auto: its first), or an error naming the key."""
        way = cls.ships[0] if final == "auto" else Way(final)
        if way not in cls.ships:
            raise ConfigError(f"'search.final' is {way}, but a search with {cls.scheme_text} ships "
                              f"{' or '.join(cls.ships)} (auto: {cls.ships[0]})")
        return way

    @classmethod
    def shipment(cls, cfg: Config) -> Shipment:
        """How a winner of `cfg` ships (`search.final`)."""
        return Shipment.of(cls.way(cfg.search.final))

    def final(self, cfg: Config, state: dict[str, Any], probs: list[np.ndarray], compute: Compute,
              judged: Judged | None = None) -> Final:
        """The student to ship from a trial of `cfg` whose last checkpoint is `state`, as `search.final` says;
        `probs` are its pooled held-out probabilities over further seeds (empty: only the trial's own), `judged`
        the students of one of those fits (the re-ranking's, kept)."""
        return self.shipment(cfg).make(self.winner(cfg, state, probs, judged), compute)

    def students(self, cfg: Config, state: dict[str, Any]) -> list[nn.Module]:
        """The students of a trial's checkpoint `state`, one per member, in eval mode."""
        return self.shells(cfg, [member["model"] for member in member_states(state, len(self.members))])  # type: ignore[index]

    def shells(self, cfg: Config, weights: list[dict[str, torch.Tensor]]) -> list[nn.Module]:
        """Students of `cfg` with `weights` (one per member), in eval mode."""
        out = []
        for w in weights:
            model = student_shell(cfg, len(self.classes), self.data.image_size)
            model.load_state_dict(w)
            out.append(model.eval())
        return out

    @abstractmethod
    def winner(self, cfg: Config, state: dict[str, Any], probs: list[np.ndarray], judged: Judged | None = None
               ) -> Winner:
        """A trial of `cfg` whose last checkpoint is `state` as a shipment gets it (`probs`: further seeds',
        `judged`: the students of one of those fits)."""

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


@dataclass
class Holdout(Scheme):
    ships = (Way.CHECKPOINT,)
    scheme_text = "search.folds 1 (a holdout)"

    @classmethod
    def split(cls, cfg: Config, data: Dataset) -> Holdout:
        held = HeldOut.validation(data, cfg.train.tune_threshold)
        if held is None:
            raise ValueError("a holdout needs a validation split")
        return cls(data, [data], held)

    def winner(self, cfg: Config, state: dict[str, Any], probs: list[np.ndarray], judged: Judged | None = None
               ) -> Winner:
        """The trial's own student, with its validation probabilities and the threshold it tuned on them (a
        holdout ships its checkpoint: the re-ranking's students are not kept for it)."""
        last = state["history"][-1]
        saved = state.get("probs")
        return Winner(cfg, self.students(cfg, state), last["epoch"], self.data, self.data.val.labels.numpy(),
                      last.get("threshold") is not None, [saved.numpy()] if saved is not None else [], probs=probs,
                      own_threshold=last.get("threshold"), parts=self.held.parts if self.held is not None else None)

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


@dataclass
class CrossValidated(Scheme):
    ships = (Way.REFIT, Way.ENSEMBLE, Way.DISTILLED)  # each made from its fold students
    scheme_text = "search.folds >= 2 (cross-validated)"

    @classmethod
    def split(cls, cfg: Config, data: Dataset) -> CrossValidated:
        folds = make_folds(data, cfg.search.folds, cfg.data.split_seed)
        held = HeldOut(folds.labels, folds.ids, folds.ids, data.classes,
                       decision_rule(len(data.classes), cfg.train.tune_threshold), spread=True, groups=folds.groups)
        return cls(data, folds.datasets, held)

    def final_teacher_data(self) -> Dataset:
        return refit_data(self.data)

    def winner(self, cfg: Config, state: dict[str, Any], probs: list[np.ndarray], judged: Judged | None = None
               ) -> Winner:
        """The trial's K fold students at the epoch that ranked it, their pooled out-of-fold probabilities (saved with
        that checkpoint, and over the further seeds), the re-ranking's fold students of one further seed (`judged`,
        trained for all epochs), and all of train + validation to learn from."""
        saved = state.get("probs", state.get("oof_probs"))  # an earlier version's name
        return Winner(cfg, self.students(cfg, state), state["history"][-1]["epoch"], self.final_teacher_data(),
                      pooled(self.data).labels.numpy(),
                      decision_rule(len(self.classes), cfg.train.tune_threshold) == THRESHOLD,
                      [saved.numpy()] if saved is not None else [], probs,
                      parts=self.held.parts if self.held is not None else None,
                      judged=self.shells(cfg, judged.weights) if judged is not None else [],
                      judged_probs=judged.probs if judged is not None else None, judged_epoch=cfg.train.epochs)

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

