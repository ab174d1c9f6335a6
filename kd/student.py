"""One student: built from its config, its distillation loss, trained from a teacher's cached logits, evaluated.

The library part of a distillation, imported by every trial of a search; the `kdsearch distill` command
around it (export, compression report, plots) is kd.distill.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from kd.config import Config
from kd.data import Dataset
from kd.infer import Runner, resolve_device
from kd.losses import DistillLoss
from kd.metrics import compute_metrics
from kd.models import create_model
from kd.train import FitResult, ReportFn, Training, fit, seed_everything


def new_student(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The untrained student of `cfg`, seeded with train.seed: a config always starts from the same weights."""
    seed_everything(cfg.train.seed)
    return create_model(cfg.student, num_classes, cfg.data.image_size, role="student")


def student_shell(cfg: Config, num_classes: int, image_size: int) -> torch.nn.Module:
    """The student's architecture without pretrained weights: to load trained weights into, or to measure."""
    return create_model(dataclasses.replace(cfg.student, pretrained=False), num_classes, image_size)


def student_loss(cfg: Config, data: Dataset) -> DistillLoss:
    """The distillation loss of `cfg`, with class weights (or logit adjustment) from `data`'s own counts."""
    return DistillLoss.build(cfg.distill, cfg.imbalance, data.class_counts())


def student_training(cfg: Config, data: Dataset, teacher_logits: torch.Tensor | None,
                     resume: dict[str, Any] | None = None, progress: bool = False) -> Training:
    """One new student of `cfg` training on `data.train` from a teacher's cached logits: a member of a fit (kd.train's
    `Fitting`); every such student starts from the same seeded weights."""
    return Training(new_student(cfg, len(data.classes)), cfg.train, data, student_loss(cfg, data), cfg.augment,
                    teacher_logits=teacher_logits, balanced_sampling=cfg.imbalance.method == "balanced_sampling",
                    resume=resume, progress=progress, desc=f"student {cfg.student.name}")


def train_student(cfg: Config, data: Dataset, teacher_logits: torch.Tensor | None, report: ReportFn | None = None,
                  resume: dict[str, Any] | None = None, progress: bool = True,
                  model: torch.nn.Module | None = None) -> FitResult:
    """Distil the student from the cached teacher logits: `model` when given (made by `new_student(cfg, ...)`
    for this data's classes), else a new one. Training reseeds itself each epoch, so both start alike."""
    model = model if model is not None else new_student(cfg, len(data.classes))
    return fit(model, cfg.train, data, student_loss(cfg, data), cfg.augment, teacher_logits=teacher_logits,
               balanced_sampling=cfg.imbalance.method == "balanced_sampling", report=report, resume=resume,
               progress=progress, desc=f"student {cfg.student.name}")


def split_probs(model: torch.nn.Module, data: Dataset, split: str, cfg: Config) -> np.ndarray:
    """An in-memory model's class probabilities for every image of one split, on `cfg.train`'s device."""
    device = resolve_device(cfg.train.device)
    return Runner.for_config(model, cfg.train, device).split_probs(data, split, cfg.train.eval_batch_size)


def evaluate_model(model: torch.nn.Module, data: Dataset, split: str, threshold: float | None,
                   cfg: Config) -> dict[str, Any]:
    """Metrics of an in-memory model on one split, at the given decision threshold; on the test split, the full
    report (balanced accuracy's interval, AUC and balanced log-loss: kd.metrics.compute_metrics)."""
    part = data.split(split)
    return compute_metrics(part.labels.numpy(), split_probs(model, data, split, cfg), data.classes, threshold,
                           full=split == "test", groups=part.groups())
