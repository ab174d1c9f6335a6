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
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from kd.config import Config
from kd.data import Dataset
from kd.ensemble import Ensemble
from kd.errors import Diverged
from kd.infer import resolve_device
from kd.metrics import tune_threshold
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

    def threshold(self, probs: list[np.ndarray]) -> float | None:
        """A threshold tuned on `probs` (each over the held-out images), or None where the rule is argmax."""
        if not self.tunes or not probs:
            return None
        return tune_threshold(np.tile(self.labels, len(probs)), np.concatenate(probs)[:, 1])


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
        return Final(winner.students[0], winner.own_threshold, winner.epoch, self.way, False, len(winner.pool.train),
                     compute.teacher(winner.cfg, winner.pool), winner.pool)

    def text(self, epoch: int, train_images: int, members: int) -> str:
        return f"its checkpoint of epoch {epoch}"

    def noun(self, members: int) -> str:
        return "the exported checkpoint"


class Refit(Shipment):
    way = Way.REFIT

    def make(self, winner: Winner, compute: Compute) -> Final:
        cfg, pool = winner.cfg, winner.pool
        probs = winner.probs or winner.own_probs
        threshold = winner.threshold(probs)
        teacher = compute.teacher(cfg, pool)
        model = student_shell(cfg, len(pool.classes), pool.image_size)
        model.load_state_dict(compute.run(refit, cfg, pool, teacher.logits))
        return Final(model, threshold, cfg.train.epochs, self.way, True, len(pool.train), teacher, pool,
                     winner.students if threshold is not None else [], fits_tuned_on=len(probs))

    def making(self, members: int) -> str:
        return "refitting the winner on all of train + validation ..."

    def text(self, epoch: int, train_images: int, members: int) -> str:
        return f"refitted on all {train_images} train + validation images with its config and {epoch} epochs"

    def noun(self, members: int) -> str:
        return "the exported refit"


class FoldEnsemble(Shipment):
    way = Way.ENSEMBLE

    def make(self, winner: Winner, compute: Compute) -> Final:
        probs = winner.own_probs  # the out-of-fold predictions of the very students it ships
        threshold = winner.threshold(probs)
        teacher = compute.teacher(winner.cfg, winner.pool)  # set beside it: the one a refit would learn from
        return Final(Ensemble(winner.students).eval(), threshold, winner.epoch, self.way, True,
                     len(winner.pool.train), teacher, winner.pool, winner.students if threshold is not None else [],
                     "a teacher fine-tuned on all of train + validation (the fold students learned from the fold "
                     "teachers)", len(probs), len(winner.students))

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
        threshold = winner.threshold(probs)
        teacher = compute.teacher(cfg, pool)  # set beside it, as beside a refit
        ensemble = Ensemble(winner.students).eval()
        model = student_shell(cfg, len(pool.classes), pool.image_size)
        model.load_state_dict(compute.run(distil_ensemble, cfg, pool, ensemble))
        return Final(model, threshold, cfg.train.epochs, self.way, True, len(pool.train), teacher, pool,
                     winner.students if threshold is not None else [],
                     "a teacher fine-tuned on all of train + validation (the student learned from the fold ensemble, "
                     "its fold students from the fold teachers)", len(probs), len(winner.students), ensemble)

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
