"""The training loop shared by teacher fine-tuning and student distillation.

The training set lives on the device as uint8; each batch is augmented there (`kd.augment`), the
teacher's logits for that exact view come from the cache, and nothing synchronises with the host until
the epoch ends. The forward pass (normalisation, memory format, autocast) is `kd.infer.Runner`'s, the
same one evaluation and the teacher's logits use. Each epoch's metrics go to a `report(metrics, state_fn)`
callback: the caller (the CLI, or the search's trainable) decides what to print or where to checkpoint;
`state_fn()` builds the resumable state only when asked. kd/ never imports Ray.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from kd.models import is_distilled
from kd.selection import decision_rule, held_out_metrics, validation_parts
from kd.stream import BatchSource

ReportFn = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]

# FitResult.status; an epoch's history row carries a status only when that epoch diverged
COMPLETED = "completed"
DIVERGED = "diverged"


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = COMPLETED          # COMPLETED | DIVERGED
    threshold: float | None = None   # two classes: tuned on all of validation, shipped with the model (None: argmax)
    val_probs: np.ndarray | None = None  # the last epoch's validation probabilities


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
    """Linear warmup, then cosine to zero over the remaining steps, a step decay, or constant."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / total)))
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
    lockstep (`kd.crossval`). `train_epoch` trains the next epoch; `val_probs` evaluates on `data.val`.

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
        self.status = COMPLETED
        if resume:
            model.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            self.history = list(resume["history"])
        self.bar = tqdm(total=(cfg.epochs - len(self.history)) * self.steps, desc=desc, unit="batch", leave=False,
                        disable=None if progress else True)  # None: shown on a terminal only

    @property
    def done(self) -> bool:
        return self.status == DIVERGED or len(self.history) >= self.cfg.epochs

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
            self.status = DIVERGED
            row["status"] = DIVERGED
        return row

    def val_probs(self) -> np.ndarray | None:
        """Class probabilities of the validation split (None where the data has none: a final refit)."""
        if not len(self.data.val):
            return None
        return self.run.split_probs(self.data, "val", self.cfg.eval_batch_size)

    def record(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if "val_balanced_accuracy" in row:
            self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_bacc=f"{row['val_balanced_accuracy']:.3f}")

    def close(self) -> nn.Module:
        self.bar.close()
        if self.distilled:
            cast(Any, self.model).set_distilled_training(False)
        return self.model.eval()


def fit(model: nn.Module, cfg: TrainConfig, data: Dataset, loss_fn: DistillLoss, augment: AugmentConfig, *,
        teacher_logits: torch.Tensor | None = None, balanced_sampling: bool = False,
        report: ReportFn | None = None, resume: dict[str, Any] | None = None,
        progress: bool = True, desc: str = "train") -> FitResult:
    """Train `model` on `data.train`, judging it on `data.val` after every epoch by the one decision rule
    (`kd.selection`: for two classes a threshold cross-fitted over two halves of validation, else argmax).

    Each epoch's row goes to `report(row, state_fn)`; `state_fn()` builds the resumable state only when asked.
    """
    training = Training(model, cfg, data, loss_fn, augment, teacher_logits=teacher_logits,
                        balanced_sampling=balanced_sampling, resume=resume, progress=progress, desc=desc)
    result = FitResult(model, training.history)
    labels = data.val.labels.numpy()
    rule = decision_rule(len(data.classes), cfg.tune_threshold)
    parts = validation_parts(labels, seed=0)  # the same halves for every trial: comparisons share their noise
    while not training.done:
        row = training.train_epoch()
        probs = training.val_probs() if row.get("status") != DIVERGED else None
        if probs is not None:
            row.update(held_out_metrics(labels, probs, data.classes, parts, rule))
            result.val_probs = probs
        training.record(row)
        if report:
            report(row, training.state)
    result.status = training.status
    if result.status == COMPLETED and result.val_probs is None and len(data.val):  # resumed after the last epoch
        result.val_probs = training.val_probs()
    result.threshold = result.history[-1].get("threshold") if result.history else None
    training.close()
    return result
