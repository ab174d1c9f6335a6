"""The training loop shared by teacher fine-tuning and student distillation.

The training set lives on the device as uint8; each batch is augmented there (`kd.augment`), the
teacher's logits for that exact view come from the cache, and nothing synchronises with the host until
the epoch ends. The forward pass (normalisation, memory format, autocast) is `kd.infer.Runner`'s, the
same one evaluation and the teacher's logits use. Each epoch's metrics go to a `report(metrics, state_fn)`
callback: the caller (the CLI, or the search's trainable) decides what to print or where to checkpoint;
`state_fn()` builds the resumable state only when asked. kd/ never imports Ray. One loop (`Fitting`, run by
`run_fitting` or stepped by a search's trial) trains every member of a fit in lockstep and judges the epoch on
their pooled held-out predictions: one member for a teacher, a distillation or a holdout trial, K for a
cross-validated one.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kd.augment import Augmenter
from kd.config import AugmentConfig, TrainConfig
from kd.data import Dataset
from kd.files import atomic_path
from kd.infer import Runner, resolve_device
from kd.losses import DistillLoss
from kd.metrics import subject_codes
from kd.models import is_distilled
from kd.selection import decision_rule, held_out_metrics, validation_parts
from kd.stream import BatchSource
from kd.typed import Vocabulary

ReportFn = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]


class Outcome(Vocabulary):
    """How a fit ended. An epoch's history row carries `status` (the value) only when that epoch diverged."""
    COMPLETED = "completed"
    DIVERGED = "diverged"



@dataclass
class FitResult:
    """What one fit of one or more members (`Fitting`) leaves: the trained models, one history row per
    epoch (the members' training figures averaged, the held-out figures of their pooled predictions), the
    outcome and the last epoch's pooled held-out probabilities (None without held-out images)."""
    models: list[nn.Module]
    history: list[dict[str, Any]] = field(default_factory=list)
    status: Outcome = Outcome.COMPLETED
    probs: np.ndarray | None = None

    @property
    def model(self) -> nn.Module:
        """The model of a single-member fit."""
        return self.models[0]

    @property
    def threshold(self) -> float | None:
        """Two classes: the threshold tuned on all held-out predictions, shipped with the model (None: argmax)."""
        return self.history[-1].get("threshold") if self.history else None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def save_state(state: dict[str, Any], path: str) -> None:
    """A resumable checkpoint (tensors and plain values only: it loads with weights_only=True)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay
    groups = param_groups_weight_decay(model, cfg.weight_decay)  # no decay on norms and biases
    # CUDA only, whatever amp / channels_last say
    fused: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **fused)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warmup, then cosine to zero over the remaining steps (over each cycle, with `restarts`), a step
    decay, or constant."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        edges = [warm, *(e * steps_per_epoch for e in cfg.restarts), cfg.epochs * steps_per_epoch]
        start, end = next(((a, b) for a, b in pairwise(edges) if step < b), (edges[-2], edges[-1]))
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / max(1, end - start))))
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
    return 1.0


def epoch_order(n: int, labels: torch.Tensor, seed: int, epoch: int, balanced: bool) -> torch.Tensor:
    """The sample order of one epoch: a permutation, or class-balanced draws with replacement."""
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    if not balanced:
        return torch.randperm(n, generator=g)
    counts = torch.bincount(labels.cpu()).double()
    weights = 1.0 / counts[labels.cpu()]
    return torch.multinomial(weights, n, replacement=True, generator=g)


class Training:
    """One model trained on `data.train` epoch by epoch: what `fit` runs, and what cross-validation runs K of in
    lockstep (`kd.schemes`). `train_epoch` trains the next epoch; `val_probs` evaluates on `data.val`.

    `teacher_logits` (epochs x N x classes) are the teacher's outputs for the views of each epoch; when given, the
    loss distils from them. `resume` is a state built by an earlier `state()`.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, data: Dataset, loss_fn: DistillLoss,
                 augment: AugmentConfig, *, teacher_logits: torch.Tensor | None = None, balanced_sampling: bool = False,
                 resume: dict[str, Any] | None = None, progress: bool = True, desc: str = "train"):
        self.model, self.cfg, self.data, self.balanced_sampling = model, cfg, data, balanced_sampling
        self.device = device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
        self.run = Runner.for_config(model, cfg, device, compile=cfg.compile)  # amp and channels_last as set
        self.distilled = teacher_logits is not None and is_distilled(model)
        if self.distilled:
            cast(Any, model).set_distilled_training(True)  # DeiT's distilled models (kd.models.is_distilled)
        self.loss_fn = loss_fn.to(device)
        n = len(data.train)
        self.source, self.labels = BatchSource(data, "train", device), data.train.labels.to(device)
        self.logits = teacher_logits.to(device) if teacher_logits is not None else None
        if self.logits is not None and len(self.logits) < cfg.epochs:  # each epoch's views need their own logits
            raise ValueError(f"teacher logits cover {len(self.logits)} epochs of views; training runs {cfg.epochs}")
        self.augmenter = Augmenter(augment, n, device)
        self.drop_lone = n % cfg.batch_size == 1 and n > 1  # a lone last sample would upset BatchNorm
        self.steps = n // cfg.batch_size + (0 if n % cfg.batch_size in (0, 1) else 1)
        self.optimizer = _optimizer(model, cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg, s, self.steps))
        self.history: list[dict[str, Any]] = []
        if resume:
            model.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(copy.deepcopy(resume["optimizer"]))  # stepping must not change `resume`
            self.scheduler.load_state_dict(resume["scheduler"])
            self.history = list(resume["history"])
        self.bar = tqdm(total=(cfg.epochs - len(self.history)) * self.steps, desc=desc, unit="batch", leave=False,
                        disable=None if progress else True)  # None: shown on a terminal only

    def state(self) -> dict[str, Any]:
        """A resumable snapshot (copied to the CPU), so later epochs cannot change it."""
        return {"model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
                "optimizer": _to_cpu(self.optimizer.state_dict()),
                "scheduler": copy.deepcopy(self.scheduler.state_dict()),
                "epoch": len(self.history), "history": copy.deepcopy(self.history)}

    def train_epoch(self) -> dict[str, Any]:
        """Train the next epoch; its row of training metrics (status "diverged" if the loss is not finite)."""
        cfg, model, epoch = self.cfg, self.model, len(self.history)
        torch.manual_seed(cfg.seed * 1_000 + epoch)  # dropout / drop-path: reproducible on resume
        t0 = time.perf_counter()
        model.train()
        order = epoch_order(len(self.data.train), self.data.train.labels, cfg.seed, epoch, self.balanced_sampling)
        order = order[:-1] if self.drop_lone else order
        sums = torch.zeros(4, device=self.device)  # loss, task, kd, correct
        seen = 0
        for idx, images in self.source(order, cfg.batch_size):
            out = self.run(self.augmenter(images, idx, epoch))
            teacher = self.logits[epoch][idx] if self.logits is not None else None
            parts = self.loss_fn(out, self.labels[idx], teacher)
            self.optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            cls_out = out[0] if isinstance(out, tuple) else out
            k = len(idx)
            sums += torch.stack([parts.loss.detach().float() * k, parts.task_loss.detach().float() * k,
                                 parts.kd_loss.detach().float() * k,
                                 (cls_out.argmax(1) == self.labels[idx]).sum().float()])
            seen += k
            self.bar.update(1)
        loss, task, kd, correct = (sums / seen).tolist()  # the one host sync of the epoch
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], "train_loss": loss,
                               "train_task_loss": task, "train_kd_loss": kd, "train_accuracy": correct,
                               "epoch_time": seconds, "train_images_per_s": seen / seconds}
        if not math.isfinite(loss):
            row["status"] = Outcome.DIVERGED.value  # a plain string: checkpoints load with weights_only=True
        return row

    def val_probs(self) -> np.ndarray | None:
        """Class probabilities of the validation split (None where the data has none: a final refit)."""
        if not len(self.data.val):
            return None
        return self.run.split_probs(self.data, "val", self.cfg.eval_batch_size)

    def record(self, row: dict[str, Any]) -> None:
        self.history.append(row)

    def close(self) -> nn.Module:
        self.bar.close()
        if self.distilled:
            cast(Any, self.model).set_distilled_training(False)
        return self.model.eval()


@dataclass(frozen=True)
class HeldOut:
    """The images a fit is judged on after every epoch: their labels, which member predicts each (one member on a
    validation split; fold f's student on fold f), the parts a threshold is cross-fitted over, and the decision rule
    (kd.selection). `spread` adds the spread of balanced accuracy across the members' own images. `groups`: each
    image's subject (an integer code) where some subject has several images (data.groups, or identical images), so
    that halves keep a subject whole and standard errors resample subjects; None: every image its own."""
    labels: np.ndarray
    member: np.ndarray
    parts: np.ndarray
    classes: list[str]
    rule: str
    spread: bool = False
    groups: np.ndarray | None = None

    @classmethod
    def validation(cls, data: Dataset, tune_threshold: bool) -> HeldOut | None:
        """One model judged on `data.val`, cross-fitted over two stratified halves of it (the same halves for every
        trial: comparisons share their noise); None where there is no validation split (a final refit)."""
        if not len(data.val):
            return None
        labels, groups = data.val.labels.numpy(), subject_codes(data.val.groups())
        return cls(labels, np.zeros(len(labels), dtype=np.int64), validation_parts(labels, 0, groups), data.classes,
                   decision_rule(len(data.classes), tune_threshold), groups=groups)

    def subset(self, idx: np.ndarray) -> HeldOut:
        """The same held-out images, only those of `idx` (a half that judges what the other half picked)."""
        return dataclasses.replace(self, labels=self.labels[idx], member=self.member[idx], parts=self.parts[idx],
                                   groups=self.groups[idx] if self.groups is not None else None)

    def pool(self, trainings: list[Training]) -> np.ndarray:
        """Every held-out image's probabilities, each from the member that holds it out."""
        probs = np.zeros((len(self.labels), len(self.classes)))
        for m, training in enumerate(trainings):
            probs[self.member == m] = training.val_probs()
        return probs

    def metrics(self, probs: np.ndarray) -> dict[str, Any]:
        return held_out_metrics(self.labels, probs, self.classes, self.parts, self.rule,
                                folds=self.member if self.spread else None)


def member_states(resume: dict[str, Any] | None, k: int) -> list[dict[str, Any] | None]:
    """Each member's part of a state `Fitting.state` built (checkpoints of earlier versions too: a holdout
    trial's flat Training state, a cross-validated trial's "folds")."""
    if resume is None:
        return [None] * k
    members = resume.get("members", resume.get("folds", [resume] if "model" in resume else None))
    if members is None or len(members) != k:
        raise ValueError(f"a resumed state of {len(members or [])} members for a fit of {k}")
    return list(members)


def _pooled_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One epoch's training figures over the members: their means, the time and images summed."""
    if len(rows) == 1:
        return dict(rows[0])
    seconds = sum(r["epoch_time"] for r in rows)
    row: dict[str, Any] = {"epoch": rows[0]["epoch"], **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]
                                                         if k not in ("epoch", "epoch_time", "train_images_per_s",
                                                                      "status")},
                           "epoch_time": seconds,
                           "train_images_per_s": sum(r["train_images_per_s"] * r["epoch_time"] for r in rows) / seconds}
    if any(r.get("status") == Outcome.DIVERGED for r in rows):
        row["status"] = Outcome.DIVERGED.value
    return row


class Fitting:
    """One fit of one or more members, an epoch at a time (`step`): every member trains its next epoch, then the
    epoch is judged on the pooled held-out predictions (`held`), or only the last epoch where `every_epoch` is False
    (a fit nobody watches: a re-ranking's, which saves predicting the held-out images at every other epoch, about a
    sixth of a small student's fit). `state()` builds the state that resumes every member (`resume`); `finish()`
    closes the members and returns the result. Stops at the first diverged epoch."""

    def __init__(self, trainings: list[Training], held: HeldOut | None, resume: dict[str, Any] | None = None,
                 every_epoch: bool = True):
        self.trainings, self.held, self.every_epoch = trainings, held, every_epoch
        self.result = FitResult([t.model for t in trainings], list(resume["history"]) if resume else [])
        self.epochs = trainings[0].cfg.epochs

    @property
    def done(self) -> bool:
        return len(self.result.history) >= self.epochs or self.result.status != Outcome.COMPLETED

    def step(self) -> dict[str, Any]:
        """Train the next epoch of every member; the epoch's row (held-out figures included unless it diverged)."""
        result = self.result
        rows = [t.train_epoch() for t in self.trainings]
        row = _pooled_row(rows)
        if row.get("status") == Outcome.DIVERGED:
            result.status = Outcome.DIVERGED
        elif self.held is not None and (self.every_epoch or len(result.history) + 1 >= self.epochs):
            result.probs = self.held.pool(self.trainings)
            row.update(self.held.metrics(result.probs))
        for t, r in zip(self.trainings, rows, strict=True):
            t.record(r)
            if "val_balanced_accuracy" in row:
                t.bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_bacc=f"{row['val_balanced_accuracy']:.3f}")
        result.history.append(row)
        return row

    def state(self) -> dict[str, Any]:
        probs = self.result.probs
        return {"members": [t.state() for t in self.trainings], "history": list(self.result.history),
                "epoch": len(self.result.history),
                "probs": torch.from_numpy(probs.astype(np.float32)) if probs is not None else None}

    def finish(self) -> FitResult:
        result = self.result
        if result.status == Outcome.COMPLETED and result.probs is None and self.held is not None:  # resumed at the end
            result.probs = self.held.pool(self.trainings)
        for t in self.trainings:
            t.close()
        return result


def run_fitting(fitting: Fitting, report: ReportFn | None = None) -> FitResult:
    """The one epoch loop: `fitting` stepped to its end, each epoch's row to `report(row, state_fn)`; `state_fn()`
    builds the resumable state only when asked."""
    while not fitting.done:
        row = fitting.step()
        if report:
            report(row, fitting.state)
    return fitting.finish()


def fit(model: nn.Module, cfg: TrainConfig, data: Dataset, loss_fn: DistillLoss, augment: AugmentConfig, *,
        teacher_logits: torch.Tensor | None = None, balanced_sampling: bool = False,
        report: ReportFn | None = None, resume: dict[str, Any] | None = None,
        progress: bool = True, desc: str = "train") -> FitResult:
    """Train one `model` on `data.train`, judged on `data.val` after every epoch by the one decision rule
    (`kd.selection`: for two classes a threshold cross-fitted over two halves of validation, else argmax)."""
    training = Training(model, cfg, data, loss_fn, augment, teacher_logits=teacher_logits,
                        balanced_sampling=balanced_sampling, resume=member_states(resume, 1)[0], progress=progress,
                        desc=desc)
    return run_fitting(Fitting([training], HeldOut.validation(data, cfg.tune_threshold), resume), report)
